"""The probe pass: θ₀ and θ_T on the held-out probe set → the depth profile, and the weight change.

    change_ℓ         = 1 − CKA(H_ℓ(θ₀), H_ℓ(θ_T))        on the held-out probe set
    weight_change_g  = ‖W_g(θ_T) − W_g(θ₀)‖_F / ‖W_g(θ₀)‖_F   per parameter group (role groups,
                       depthfast.layers.ModelLayers.param_groups; None where W₀ = 0 and W moved)

Profile-shape numbers (locality gradient, steepness, width, …) are in depthfast.metrics.profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from depthfast.all_pairs import AllPairsCKA
from depthfast.cka import StreamingCKA, pool_activations
from depthfast.distributed import group_sums_of_squares, is_sharded
from depthfast.cka_change import hsic_triples_from_moments
from depthfast.layers import BlockCapture, ModelLayers
from depthfast.metrics.per_text import per_text_change_batch


@dataclass
class ProbeResult:
    # per layer (L+1): embeddings, block.1 … block.L. change = 1 − CKA formed from the statistics of X and
    # D = Y − X (StreamingCKA.compute_change: exact relative to the change); cka = 1 − change
    change: list[float]
    num_samples: int
    loss_base: float
    loss_tuned: float
    accuracy_base: float | None
    accuracy_tuned: float | None
    per_text_hsic: torch.Tensor | None = None  # (texts, L+1, 3): HSIC₁ (K,L), (K,K), (L,L) of each text's tokens
    # (texts, L+1, 3): HSIC₁ (K,K), (K,M), (M,M) of each text's tokens, M = L − K built from D = Y − X
    # (metrics.per_text_change_batch); per_text_hsic is derived from it, the bootstrap reads this one
    per_text_change: torch.Tensor | None = None
    base_features: torch.Tensor | None = None  # (texts, d): θ₀'s last block, mean over real tokens (cls only)
    labels: torch.Tensor | None = None  # (texts,) (cls only)
    accumulator: StreamingCKA | None = None  # pass back to measure_probe to reuse θ₀'s statistics

    @property
    def cka(self) -> list[float]:
        return [1.0 - c for c in self.change]


@torch.no_grad()
def measure_probe(base: torch.nn.Module, tuned: torch.nn.Module, base_layers: ModelLayers,
                  tuned_layers: ModelLayers, batches: list[dict], device: torch.device, pooling: str,
                  estimator: str, progress: bool = True, cka: StreamingCKA | None = None,
                  all_pairs: AllPairsCKA | None = None) -> ProbeResult:
    """Run the probe set through both models, stream CKA of every layer, and score the task.

    CKA always compares the activations on the clean probe texts (``input_ids``). An mlm batch
    (one with ``masked_input_ids``, see depthfast.batches.probe_batches) takes a second forward of
    each model on its masked copy for the masked-LM loss; the clean one then runs only up to the
    last block (the LM head's logits are not needed), except under FSDP2, where the root module's
    hooks must gather the parameters outside the blocks.

    Pass the ``cka`` accumulator of an earlier pass over the same probe batches to reuse the base
    model's statistics (its XᵀX), which do not change during training: the profile trajectory.
    ``all_pairs`` (a depthfast.all_pairs.AllPairsCKA) is fed the same captured activations.
    """
    base.eval()
    tuned.eval()
    if cka is None:
        cka = StreamingCKA(base_layers.num_blocks + 1, pooling=pooling, estimator=estimator)
    else:
        cka.reset_tuned()
    losses = {"base": [], "tuned": []}
    correct = {"base": 0, "tuned": 0}
    counted = 0
    hsic, features, labels = [], [], []
    clean_base, clean_tuned = _without_lm_head(base), _without_lm_head(tuned)
    with BlockCapture(base_layers) as base_capture, BlockCapture(tuned_layers) as tuned_capture:
        for batch in tqdm(batches, desc="probe", disable=not progress, unit="batch"):
            batch = {k: v.to(device) for k, v in batch.items()}
            masked = batch.pop("masked_input_ids", None)
            if masked is None:
                out_base, out_tuned = base(**batch), tuned(**batch)
            else:  # mlm: the clean texts for CKA, the masked copy for the loss (below)
                clean = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                clean_base(**clean)
                clean_tuned(**clean)
            mask = batch["attention_mask"]
            cka.update(base_capture.activations, tuned_capture.activations, mask)
            if all_pairs is not None:
                all_pairs.update(base_capture.activations, tuned_capture.activations, mask)
            # Per-text statistics, for the bootstrap over probe texts (depthfast.metrics)
            hsic.append(per_text_change_batch(base_capture.activations, tuned_capture.activations, mask).cpu())
            if batch["labels"].dim() == 1:
                features.append(pool_activations(base_capture.activations[-1], mask, "mean").cpu())
                labels.append(batch["labels"].cpu())
            if masked is not None:
                scored = {**batch, "input_ids": masked}
                out_base, out_tuned = base(**scored), tuned(**scored)
            weight = float(_loss_weight(batch))
            if weight > 0:  # an mlm batch without a target (texts with no token of their own) has no loss
                losses["base"].append((float(out_base.loss), weight))
                losses["tuned"].append((float(out_tuned.loss), weight))
            if batch["labels"].dim() == 1:  # classification
                correct["base"] += int((out_base.logits.argmax(-1) == batch["labels"]).sum())
                correct["tuned"] += int((out_tuned.logits.argmax(-1) == batch["labels"]).sum())
                counted += batch["labels"].shape[0]
    mean = lambda pairs: sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else math.nan  # noqa: E731
    per_text_change = torch.cat(hsic) if hsic else None
    return ProbeResult(
        change=cka.compute_change().tolist(),
        num_samples=cka.num_samples,
        loss_base=mean(losses["base"]),
        loss_tuned=mean(losses["tuned"]),
        accuracy_base=correct["base"] / counted if counted else None,
        accuracy_tuned=correct["tuned"] / counted if counted else None,
        per_text_hsic=hsic_triples_from_moments(per_text_change) if per_text_change is not None else None,
        per_text_change=per_text_change,
        base_features=torch.cat(features) if features else None,
        labels=torch.cat(labels) if labels else None,
        accumulator=cka,
    )


def _without_lm_head(model: torch.nn.Module) -> torch.nn.Module:
    """The model's base (blocks and what feeds them, no LM head), for a pass whose outputs only the
    block hooks read; an FSDP2-sharded model runs whole (its root hooks gather the embeddings)."""
    if any(is_sharded(p) for p in model.parameters()):
        return model
    return getattr(model, "base_model", model)


def _loss_weight(batch: dict) -> torch.Tensor:
    labels = batch["labels"]
    return torch.tensor(labels.shape[0]) if labels.dim() == 1 else (labels != -100).sum()


@torch.no_grad()
def weight_changes(base_groups: list[tuple[str, list[torch.Tensor]]],
                   tuned_groups: list[tuple[str, list[torch.Tensor]]]) -> dict[str, float | None]:
    """‖W_T − W_0‖_F / ‖W_0‖_F per group, sums of squares in float64.

    A group that did not move (‖W_T − W_0‖ = 0) reports 0.0, whatever its ‖W_0‖ (also 0/0: nothing
    changed). A group that moved from W_0 = 0 (e.g. a zero-initialised bias-only group) has no
    relative change: it reports None (null in results.json, "n/a" in tables), never 0, which would
    read as "unchanged", and never inf, which would poison means over groups.

    Sharded (FSDP2) parameters: local sums, then one all-reduce of the (groups, 2) partial sums.
    """
    sums = group_sums_of_squares([t for _, t in tuned_groups], [b for _, b in base_groups])
    return {name: relative_change(delta, norm) for (name, _), (delta, norm) in zip(base_groups, sums.tolist())}


def relative_change(delta_sq: float, norm_sq: float) -> float | None:
    """sqrt(delta_sq / norm_sq), 0.0 when nothing moved, None when W_0 = 0 moved (weight_changes' rule)."""
    if delta_sq == 0:
        return 0.0
    if norm_sq == 0:
        return None
    return math.sqrt(delta_sq / norm_sq)
