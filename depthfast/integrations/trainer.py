"""The depth profile of a ``transformers.Trainer`` run: a callback that measures it on a probe set.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[DepthProfileCallback(probe_texts, steps=(0, 100))])

The callback copies θ₀, the model as given to the Trainer, when the Trainer is built (a callback added
later with ``add_callback``, or a ``model_init``'s model: at train begin): a frozen copy, on the device
or, with ``offload``, in host memory streamed to the device module by module while measuring. So
``train(resume_from_checkpoint=…)`` in a new process, with the Trainer built on the pretrained model,
measures from the pretrained weights (``resumed_from_step`` in results.json); the trajectory measured
before the interruption is not carried over. At the
steps in ``steps`` (0 = before the first update) and at train end it measures, on the probe set,

    change_ℓ        = 1 − CKA(H_ℓ(θ₀), H_ℓ(θ_t))            ℓ = 0 (embedding output) … L (block L)
    weight_change_g = ‖W_g(θ_t) − W_g(θ₀)‖_F / ‖W_g(θ₀)‖_F   per role group (train end)

with depthfast's own probe session (depthfast.measure.ProbeSession), as ``python -m depthfast.run``
does; θ₀'s probe statistics (its XᵀX) are computed once and reused by every later measurement. It
writes a run's artifacts into ``out`` (default ``args.output_dir/depthfast``), each file atomically,
results.json last, on the main process only: results.json (the run's schema where it applies, plus
``"source": "trainer"``), profile.csv, profile.png, config.json (the callback's settings and the
Trainer's arguments), trajectory.csv (one row per measured step and layer, rewritten after every
measurement) and, when the optimizer is depthfast's equal-step one, train_log.csv (per-step update
ratios before and after the control).

Measuring leaves training as it was: no random numbers are drawn, and the model returns to the mode
it was in. Under DDP only the main process measures (the others wait at their next collective);
sharded models (FSDP, DeepSpeed ZeRO-3) are refused.
"""

from __future__ import annotations

import copy
import json
import os
import time
from types import SimpleNamespace

import torch
from transformers import TrainerCallback
from transformers.models.auto import modeling_auto as auto

import depthfast
from depthfast.artifacts import atomic_write_csv, atomic_write_json
from depthfast.batches import probe_batches
from depthfast.constants import ESTIMATORS, POOLINGS
from depthfast.distributed import is_sharded
from depthfast.errors import DepthfastError
from depthfast.integrations.optimizer import find_equal_step
from depthfast.layers import check_tied_policy, discover_layers, prepare_for_measurement
from depthfast.results import group_entries, model_entries, probe_entry, write_profile, write_train_log
from depthfast.rundir import RunDir, publish_results
from depthfast.run_metrics import run_metrics
from depthfast.measure import ProbeSession, Theta0, host_copy

OBJECTIVES = ("cls", "mlm", "clm")


def objective_of(model: torch.nn.Module) -> str | None:
    """"clm", "mlm" or "cls" from the model's class (transformers' auto mappings), None if unknown."""
    name = type(model).__name__
    mappings = (("clm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"), ("mlm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
                ("cls", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"))
    for objective, mapping in mappings:
        if name in set(getattr(auto, mapping, {}).values()):
            return objective
    if name == "SequenceClassifier":  # depthfast.models' classifier (a backbone and a fresh head)
        return "cls"
    return None


def _innermost(optimizer):
    """The torch optimizer under the wrappers (AcceleratedOptimizer, EqualStepOptimizer, EqualStep)."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            return optimizer
        optimizer = inner
    return optimizer


class DepthProfileCallback(TrainerCallback):
    """Measure the depth profile of the Trainer's run on a held-out probe set (see the module docstring).

    probe: a list of texts, tokenized with the Trainer's ``processing_class`` (or ``tokenizer``) into
    clean probe batches by depthfast.batches.probe_batches (mlm: with their masked copy; cls: with
    ``probe_labels``), or ready probe batches (dicts of (batch, seq) ``input_ids``, ``attention_mask``,
    ``labels``, as probe_batches makes them). out: results directory (default
    ``args.output_dir/depthfast``). steps: optimizer steps at which to also measure (0 = before
    training). pooling "token"|"mean", estimator "exact"|"unbiased": as ``--pooling``/``--estimator``.
    offload: keep θ₀ in host memory (``--theta0-offload``). objective: "cls"|"mlm"|"clm" (default:
    from the model's class). tied_embeddings: the group of a tied input/output matrix. overwrite: replace
    finished results in ``out`` whole (without it, a directory holding results.json is refused at train
    begin); ``out`` is locked from train begin to train end (depthfast.rundir), on the main process.
    """

    def __init__(self, probe, out: str | None = None, steps=(), pooling: str = "token", estimator: str = "exact",
                 offload: bool = False, *, probe_labels: list[int] | None = None, objective: str | None = None,
                 tokenizer=None, max_length: int = 128, batch_size: int = 32, mlm_probability: float = 0.15,
                 seed: int = 0, tied_embeddings: str = "head", progress: bool = False, overwrite: bool = False) -> None:
        if pooling not in POOLINGS:
            raise DepthfastError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
        if estimator not in ESTIMATORS:
            raise DepthfastError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}")
        if objective is not None and objective not in OBJECTIVES:
            raise DepthfastError(f"objective must be one of {OBJECTIVES}; got {objective!r}")
        check_tied_policy(tied_embeddings)
        steps = sorted({int(s) for s in steps})
        if any(s < 0 for s in steps):
            raise DepthfastError(f"measurement steps must be ≥ 0; got {steps}")
        probe = list(probe)
        if not probe:
            raise DepthfastError("the probe set is empty")
        self.texts = probe if all(isinstance(t, str) for t in probe) else None
        if self.texts is None and not all(isinstance(b, dict) and {"input_ids", "attention_mask", "labels"} <= set(b)
                                          for b in probe):
            raise DepthfastError("probe must be a list of texts or of probe batches (dicts with input_ids, "
                                 "attention_mask and labels, see depthfast.batches.probe_batches)")
        self.batches = None if self.texts is not None else probe
        self.probe_labels = probe_labels
        self.out, self.steps, self.pooling, self.estimator, self.offload = out, steps, pooling, estimator, offload
        self.objective, self.tokenizer, self.max_length, self.probe_batch_size = objective, tokenizer, max_length, batch_size
        self.mlm_probability, self.seed, self.tied_embeddings, self.progress = mlm_probability, seed, tied_embeddings, progress
        self.trajectory: list[dict] = []
        self.results: dict | None = None  # results.json's contents after train end (main process)
        self._theta0: Theta0 | None = None  # from Trainer construction (or train begin) to train end
        self._session: ProbeSession | None = None  # θ₀ against the Trainer's model, from train begin
        self._ratios, self._lrs, self._unused, self._theta0_of = [], [], None, None
        self.overwrite, self._rundir = overwrite, None

    @property
    def theta0(self) -> torch.nn.Module | None:
        """The frozen θ₀ copy, from Trainer construction (or train begin) to train end; None otherwise and off
        the main process."""
        return self._theta0.module if self._theta0 is not None else None

    @property
    def theta0_groups(self) -> list[tuple[str, list[torch.Tensor]]] | None:
        """θ₀'s weights by role group, [(name, tensors)] (with ``offload`` the host tensors; the copy's own
        parameters are then meta tensors), while the callback holds θ₀; None otherwise."""
        return self._theta0.groups if self._theta0 is not None else None

    def settings(self) -> dict:
        """What this callback was told, under RunConfig's names where they mean the same
        (``steps`` → measure_at, ``offload`` → theta0_offload, ``batch_size`` → probe_batch_size)."""
        return {"measure_at": ",".join(str(s) for s in self.steps), "pooling": self.pooling,
                "estimator": self.estimator, "theta0_offload": self.offload, "tied_embeddings": self.tied_embeddings,
                "max_length": self.max_length, "probe_batch_size": self.probe_batch_size,
                "mlm_probability": self.mlm_probability, "probe_seed": self.seed, "probe_size": self._probe_texts(),
                "probe": "texts" if self.texts is not None else "batches", "out": self.out}

    def _probe_texts(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)

    def _probe_batches(self, objective: str, tokenizer) -> list[dict]:
        if self.batches is not None:
            return self.batches
        if tokenizer is None or not callable(tokenizer):
            raise DepthfastError("probe texts need a tokenizer: give the Trainer a processing_class, or the "
                                 "callback tokenizer=")
        if getattr(tokenizer, "pad_token", None) is None:
            raise DepthfastError("the tokenizer has no pad token (probe texts are padded into batches); set "
                                 "tokenizer.pad_token, e.g. to its eos_token")
        if objective == "cls" and (self.probe_labels is None or len(self.probe_labels) != len(self.texts)):
            raise DepthfastError("a classification probe needs probe_labels=, one label per probe text")
        return probe_batches(objective, tokenizer, self.texts, self.probe_labels if objective == "cls" else None,
                             self.probe_batch_size, self.max_length, self.mlm_probability, self.seed)

    # ---- Trainer events --------------------------------------------------------------------------

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # θ₀ is the model as given to the Trainer: copied here, before train(resume_from_checkpoint=…)
        # loads a checkpoint's weights into it, so a resumed run is still measured from θ₀.
        if state.is_world_process_zero and model is not None:
            self._snapshot(model)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, optimizer=None, **kwargs):
        self.trajectory, self.results, self._ratios, self._lrs, self._unused = [], None, [], [], None
        self._session = None
        if not state.is_world_process_zero:
            return
        if any(is_sharded(p) or hasattr(p, "ds_id") for p in model.parameters()):  # FSDP2 DTensor, ZeRO-3
            self._theta0 = None
            raise DepthfastError("DepthProfileCallback measures unsharded models (one process or DDP); "
                                 "FSDP and DeepSpeed ZeRO-3 shard the parameters")
        objective = self.objective or objective_of(model)
        if objective is None:
            raise DepthfastError(f"cannot tell the objective of {type(model).__name__}; pass objective= "
                                 "('cls', 'mlm' or 'clm')")
        self._objective = objective
        self._batches = self._probe_batches(objective, self.tokenizer or processing_class)
        self._device = next(model.parameters()).device
        self._out = self.out or os.path.join(args.output_dir, "depthfast")
        if self._rundir is not None:  # a train() of this callback that raised: its lock is this process's
            self._rundir.close()
        self._rundir = RunDir(self._out, overwrite=self.overwrite, what="DepthProfileCallback out").open()
        self._started = time.perf_counter()
        self._first_step = state.global_step
        prepare_for_measurement(model)
        self._layers = discover_layers(model)
        if self._theta0 is None or self._theta0_of is not model:  # added after init, or a model_init's new model
            self._snapshot(model)
        fp16, bf16 = bool(getattr(args, "fp16", False)), bool(getattr(args, "bf16", False))
        # The precision the model trains in, as depthfast.run measures (bf16 autocast under --precision bf16).
        precision = lambda: torch.autocast(self._device.type, dtype=torch.bfloat16 if bf16 else torch.float16,  # noqa: E731
                                           enabled=fp16 or bf16)
        self._session = ProbeSession(self._theta0, model, self._layers, self._batches, self._device, self.pooling,
                                     self.estimator, precision=precision, progress=self.progress)
        if 0 in self.steps and state.global_step == 0:
            self._measure(0)

    def _snapshot(self, model: torch.nn.Module) -> None:
        """θ₀: a frozen copy of ``model`` (requires_grad as the model's, so its role groups match)."""
        if any(is_sharded(p) for p in model.parameters()):
            return  # refused at train begin
        prepare_for_measurement(model)
        base = host_copy(model) if self.offload else copy.deepcopy(model)
        offload_to = next(model.parameters()).device if self.offload else None  # the groups keep the host tensors
        self._theta0 = Theta0(base, self.tied_embeddings, offload_to=offload_to)
        self._theta0_of, self._session = model, None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._theta0 is not None and self._unused is None:  # as depthfast.run: no gradient at the first step
            self._unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]

    def on_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        found = find_equal_step(optimizer)
        if self._theta0 is None or found is None:
            return
        # Kept on their device until written: no host synchronisation per step.
        self._ratios.append((found.ratios_before.detach().clone(), found.ratios_after.detach().clone()))
        self._lrs.append(lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else None)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._session is not None and state.global_step in self.steps and state.global_step < state.max_steps:
            self._measure(state.global_step)

    def on_train_end(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if self._session is None:
            return
        again = bool(self.trajectory) and self.trajectory[-1]["step"] == state.global_step  # stopped early at a step of `steps`
        final, measured = self._session.final(state.global_step)
        if self.steps and not again:
            self._record(final)
        groups = self._session.weight_changes()
        try:
            self.results = self._write(args, state, model, optimizer, train_dataloader, final, measured, groups)
        finally:
            if self._rundir is not None:
                self._rundir.close()
                self._rundir = None
        self._theta0 = self._session = self._theta0_of = None  # θ₀ and its statistics: no longer needed

    # ---- measuring and writing -------------------------------------------------------------------

    def _measure(self, step: int) -> dict:
        """The profile now (the session leaves the model in its mode), recorded in the trajectory."""
        entry = self._session.measure(step)
        self._record(entry)
        return entry

    def _record(self, entry: dict) -> None:
        self.trajectory.append(entry)
        self._write_trajectory()  # rewritten after every measurement: an interrupted run keeps what it measured

    def _write_trajectory(self) -> None:
        rows = [[e["step"], r["layer"], r["depth"], r["cka"], r["change"], e["locality_gradient"], e["probe_loss"]]
                for e in self.trajectory for r in e["layers"]]
        atomic_write_csv(os.path.join(self._out, "trajectory.csv"),
                         ["step", "layer", "depth", "cka", "change", "locality_gradient", "probe_loss"], rows)

    def _config(self, args, state, results: dict) -> dict:
        """config.json: RunConfig's names for what a run's config.json says (depthfast report groups runs by
        them), then the Trainer's own arguments whole."""
        world, accumulation = int(getattr(args, "world_size", 1)), int(getattr(args, "gradient_accumulation_steps", 1))
        return {"source": "trainer", "model": results["model"], "objective": self._objective,
                "control": results["control"], "optimizer": results["optimizer"].lower(), **self.settings(),
                "steps": state.max_steps, "lr": getattr(args, "learning_rate", None),
                "weight_decay": getattr(args, "weight_decay", None), "warmup_steps": getattr(args, "warmup_steps", None),
                "batch_size": getattr(args, "per_device_train_batch_size", 0) * accumulation * world,
                "grad_accum": accumulation, "seed": getattr(args, "seed", None),
                "training_args": json.loads(args.to_json_string()) if hasattr(args, "to_json_string") else None}

    def _write(self, args, state, model, optimizer, train_dataloader, final: dict, measured, groups: dict) -> dict:
        layers, out = self._layers, self._out
        depths = layers.normalized_depths
        changes = measured.change
        rows = [{**row, "weight_change": groups.get(row["layer"])} for row in final["layers"]]
        found = find_equal_step(optimizer)
        control = getattr(getattr(found, "equal_step", found), "control", "none")
        names = getattr(found, "group_names", None) or [f"group.{i}" for i in range(len(getattr(found, "groups", [])))]
        before = torch.stack([b for b, _ in self._ratios]).tolist() if self._ratios else []
        after = torch.stack([a for _, a in self._ratios]).tolist() if self._ratios else []
        num_labels = getattr(model.config, "num_labels", 0)
        metrics = run_metrics(SimpleNamespace(seed=self.seed, estimator=self.estimator, pooling=self.pooling,
                                              objective=self._objective),
                              SimpleNamespace(num_labels=num_labels), model, measured, depths, changes, None)
        losses = [e["loss"] for e in state.log_history if "loss" in e]
        seconds = time.perf_counter() - self._started
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        try:
            train_texts = len(train_dataloader.dataset)
        except (AttributeError, TypeError):
            train_texts = None
        steps = state.global_step - self._first_step
        results = {
            "source": "trainer",
            "depthfast_version": depthfast.__version__,
            "torch_version": torch.__version__,
            "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
            **model_entries(layers),
            "objective": self._objective,
            "control": control,
            "optimizer": type(_innermost(optimizer)).__name__,
            "estimator": self.estimator,
            "pooling": self.pooling,
            **group_entries(layers, self.tied_embeddings),
            "layers": rows,
            "locality_gradient": final["locality_gradient"],
            "metrics": metrics,
            "group_weight_change": groups,
            "mean_update_ratio": {n: sum(r[g] for r in before) / len(before) for g, n in enumerate(names)} if before else {},
            "probe": probe_entry(self._probe_texts(), measured),
            "train": {"steps": steps, "texts": train_texts, "first_loss": losses[0] if losses else None,
                      "final_loss": losses[-1] if losses else None, "tokens": tokens or None, "seconds": seconds,
                      "tokens_per_second": tokens / seconds if tokens and seconds > 0 else None,
                      "unused_parameters": self._unused or []},
            "trajectory": self.trajectory,
            "resumed_from_step": self._first_step or None,
            "num_processes": int(getattr(args, "world_size", 1)),
            "wall_seconds": seconds,
        }
        atomic_write_json(os.path.join(out, "config.json"), self._config(args, state, results))
        if before:
            # The run's columns; loss where the Trainer logged it (every logging_steps), else empty.
            logged = {e.get("step"): e["loss"] for e in state.log_history if "loss" in e}
            write_train_log(out, names, [[self._first_step + i + 1, logged.get(self._first_step + i + 1), self._lrs[i]]
                                         + before[i] + after[i] for i in range(len(before))])
        write_profile(out, rows, f"{results['model']} · {self._objective} · Trainer · control {control} · {steps} steps",
                      final["locality_gradient"])
        return publish_results(out, results)  # last, with the manifest of every artifact
