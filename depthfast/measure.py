"""The measurement core shared by ``depthfast.run``, ``depthfast compare`` and the Trainer callback.

    Theta0        θ₀, the frozen pretrained copy measured against: its module (on the device, sharded
                  with FSDP2, or in host memory streamed to the device while measuring), its layers and
                  its role groups' weights, taken once
    ProbeSession  θ₀ against the model being measured, on one probe set: ``measure(step)`` gives a
                  trajectory entry, ``final(step)`` the entry and the whole ProbeResult, and
                  ``weight_changes()`` ‖ΔW_g‖/‖W_g‖ per role group (of the merged weights under LoRA)

One session holds the StreamingCKA accumulator of its first pass: θ₀'s probe statistics (its XᵀX)
do not change during training, so every later measurement reuses them.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, ContextManager

import torch

from depthfast import distributed
from depthfast import lora as lora_lib
from depthfast.cka import StreamingCKA
from depthfast.layers import ModelLayers, discover_layers
from depthfast.metrics import locality_gradient
from depthfast.probe import ProbeResult, measure_probe, weight_changes
from depthfast.results import profile_rows

Groups = list[tuple[str, list[torch.Tensor]]]


def detached_groups(layers: ModelLayers, tied_embeddings: str) -> Groups:
    """The role groups' parameters as detached tensors (the weight change reads values, never gradients)."""
    return [(name, [p.detach() for p in ps]) for name, ps in layers.param_groups(tied_embeddings)]


def host_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` with every parameter and buffer in host memory, never a second device copy
    (deepcopy's memo is filled with host clones first)."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    return copy.deepcopy(model, memo)


class Theta0:
    """θ₀: the pretrained model that every measurement compares against, frozen.

    ``module`` is the copy itself (the caller makes it: a deepcopy, ``host_copy``, or a loaded
    checkpoint). ``mesh`` shards its blocks with FSDP2 (depthfast.distributed.shard_model), before its
    groups are taken, so the groups hold the shards; ``offload_to`` (a device) keeps its weights in
    host memory and streams them to that device module by module while measuring, after the groups
    are taken, so the groups keep the host tensors. ``layers`` is given where the caller discovered
    them already (compare checks both sides together)."""

    def __init__(self, module: torch.nn.Module, tied_embeddings: str, *, layers: ModelLayers | None = None,
                 mesh=None, offload_to: torch.device | None = None) -> None:
        self.module = module.eval()
        self.tied_embeddings = tied_embeddings
        self.layers = layers if layers is not None else discover_layers(module)
        if mesh is not None:
            distributed.shard_model(module, self.layers.blocks, mesh)
        self.groups = detached_groups(self.layers, tied_embeddings)
        if offload_to is not None:
            distributed.offload_to_host(module, offload_to)


class ProbeSession:
    """θ₀ against ``model`` on the probe ``batches``: the profile at any step, and the weight changes.

    ``precision`` makes the context each pass runs in (the autocast the model trains in). ``progress``
    shows the probe's bar on every pass unless a call says otherwise. ``lora``: the model carries
    LoRA adapters (depthfast.lora), so the weight change is of the merged weights W₀ + (α/r)·B·A.
    Every pass leaves ``model`` in the mode (train/eval) it found it in, and FSDP2 models resharded.
    """

    def __init__(self, theta0: Theta0, model: torch.nn.Module, layers: ModelLayers, batches: list[dict],
                 device: torch.device, pooling: str, estimator: str, *,
                 precision: Callable[[], ContextManager] = contextlib.nullcontext, progress: bool = False,
                 lora: bool = False) -> None:
        self.theta0, self.model, self.layers, self.batches, self.device = theta0, model, layers, batches, device
        self.pooling, self.estimator, self.precision, self.progress, self.lora = (pooling, estimator, precision,
                                                                                  progress, lora)
        self.accumulator: StreamingCKA | None = None  # from the first pass on: θ₀'s statistics, reused

    def probe(self, show: bool | None = None, all_pairs=None) -> ProbeResult:
        """One pass over the probe set (``all_pairs``, a depthfast.all_pairs.AllPairsCKA, fed alongside)."""
        was_training = self.model.training
        with self.precision():
            result = measure_probe(self.theta0.module, self.model, self.theta0.layers, self.layers, self.batches,
                                   self.device, self.pooling, self.estimator,
                                   self.progress if show is None else show, cka=self.accumulator, all_pairs=all_pairs)
        self.model.train(was_training)
        self.accumulator = result.accumulator
        distributed.reshard(self.theta0.module, self.model)
        return result

    def entry(self, step: int, result: ProbeResult) -> dict:
        """A trajectory entry: the step, the profile's rows, the locality gradient, the probe loss."""
        depths, changes = self.layers.normalized_depths, result.change
        return {"step": step, "layers": profile_rows(self.layers.layer_names, depths, changes),
                "locality_gradient": locality_gradient(depths[1:], changes[1:]), "probe_loss": result.loss_tuned}

    def measure(self, step: int, show: bool | None = None) -> dict:
        """The profile now, as a trajectory entry."""
        return self.entry(step, self.probe(show))

    def final(self, step: int, *, all_pairs=None, show: bool | None = None) -> tuple[dict, ProbeResult]:
        """The last measurement: its trajectory entry and the whole ProbeResult (results.json reads both)."""
        result = self.probe(show, all_pairs)
        return self.entry(step, result), result

    def weight_changes(self) -> dict[str, float | None]:
        """‖W_g(θ_t) − W_g(θ₀)‖_F / ‖W_g(θ₀)‖_F per role group (depthfast.probe.weight_changes); under LoRA
        of the merged weights, per role group of the model's own weights (depthfast.lora)."""
        tied = self.theta0.tied_embeddings
        if self.lora:
            return lora_lib.lora_weight_changes(self.theta0.module, self.model, tied)
        return weight_changes(self.theta0.groups, detached_groups(self.layers, tied))
