"""The depth profile: per-layer representational change and weight change between θ₀ and θ_T.

    change_ℓ         = 1 − CKA(H_ℓ(θ₀), H_ℓ(θ_T))        on the held-out probe set
    weight_change_g  = ‖W_g(θ_T) − W_g(θ₀)‖_F / ‖W_g(θ₀)‖_F   per parameter group
    locality gradient = OLS slope of change_ℓ on normalized depth ℓ/L over the blocks ℓ = 1..L
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from depthfast.cka import StreamingCKA
from depthfast.layers import BlockCapture, ModelLayers


@dataclass
class ProbeResult:
    cka: list[float]  # per layer (L+1): embeddings, block.1 … block.L
    num_samples: int
    loss_base: float
    loss_tuned: float
    accuracy_base: float | None
    accuracy_tuned: float | None


@torch.no_grad()
def measure_probe(base: torch.nn.Module, tuned: torch.nn.Module, base_layers: ModelLayers,
                  tuned_layers: ModelLayers, batches: list[dict], device: torch.device, pooling: str,
                  estimator: str, progress: bool = True) -> ProbeResult:
    """Run the probe set through both models, stream CKA of every layer, and score the task."""
    base.eval()
    tuned.eval()
    cka = StreamingCKA(base_layers.num_blocks + 1, pooling=pooling, estimator=estimator)
    losses = {"base": [], "tuned": []}
    correct = {"base": 0, "tuned": 0}
    counted = 0
    with BlockCapture(base_layers) as base_capture, BlockCapture(tuned_layers) as tuned_capture:
        for batch in tqdm(batches, desc="probe", disable=not progress, unit="batch"):
            batch = {k: v.to(device) for k, v in batch.items()}
            out_base, out_tuned = base(**batch), tuned(**batch)
            cka.update(base_capture.activations, tuned_capture.activations, batch["attention_mask"])
            weight = float(_loss_weight(batch))
            losses["base"].append((float(out_base.loss), weight))
            losses["tuned"].append((float(out_tuned.loss), weight))
            if batch["labels"].dim() == 1:  # classification
                correct["base"] += int((out_base.logits.argmax(-1) == batch["labels"]).sum())
                correct["tuned"] += int((out_tuned.logits.argmax(-1) == batch["labels"]).sum())
                counted += batch["labels"].shape[0]
    mean = lambda pairs: sum(v * w for v, w in pairs) / max(1e-12, sum(w for _, w in pairs))  # noqa: E731
    return ProbeResult(
        cka=cka.compute().tolist(),
        num_samples=cka.num_samples,
        loss_base=mean(losses["base"]),
        loss_tuned=mean(losses["tuned"]),
        accuracy_base=correct["base"] / counted if counted else None,
        accuracy_tuned=correct["tuned"] / counted if counted else None,
    )


def _loss_weight(batch: dict) -> torch.Tensor:
    labels = batch["labels"]
    return torch.tensor(labels.shape[0]) if labels.dim() == 1 else (labels != -100).sum()


@torch.no_grad()
def weight_changes(base_groups: list[tuple[str, list[torch.Tensor]]],
                   tuned_groups: list[tuple[str, list[torch.Tensor]]]) -> dict[str, float]:
    """‖W_T − W_0‖_F / ‖W_0‖_F per group, sums of squares in float64 (0 for an all-zero W_0 group)."""
    changes = {}
    for (name, base), (_, tuned) in zip(base_groups, tuned_groups):
        delta = sum(float(((t.double() - b.double()) ** 2).sum()) for b, t in zip(base, tuned))
        norm = sum(float((b.double() ** 2).sum()) for b in base)
        changes[name] = math.sqrt(delta / norm) if norm > 0 else 0.0
    return changes


def locality_gradient(depths: list[float], changes: list[float]) -> float | None:
    """OLS slope of change on normalized depth; None with fewer than two points."""
    if len(depths) < 2:
        return None
    n = len(depths)
    mean_x, mean_y = sum(depths) / n, sum(changes) / n
    sxx = sum((x - mean_x) ** 2 for x in depths)
    if sxx == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(depths, changes)) / sxx
