"""Sharded parameters (FSDP2): sharding a model by blocks, norms over shards, full state dicts.

Trap this module exists for: under FSDP2 a parameter is a DTensor holding one shard per process,
and ``float((p ** 2).sum())`` on it quietly returns the *local* shard's sum, not the global one.
Every norm over parameters therefore goes through ``sum_over_shards``: local sums, then one
all-reduce.
"""

from __future__ import annotations

import torch


def dtensor_type():
    """torch's DTensor class, or None where torch has none."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (the tensor itself otherwise); in-place writes reach the DTensor.

    ``_local_tensor`` rather than ``to_local()``: the latter goes through autograd, ~10 µs per tensor.
    """
    if is_sharded(t):
        return t._local_tensor if hasattr(t, "_local_tensor") else t.to_local()
    return t


def sum_over_shards(values: torch.Tensor, sharded: bool) -> torch.Tensor:
    """All-reduce (sum) a vector of per-process partial sums when the parameters are sharded."""
    if sharded:
        import torch.distributed as dist

        dist.all_reduce(values)
    return values


def group_sums_of_squares(after, before) -> torch.Tensor:
    """float64 (G, 2) on the CPU: per group g, Σ‖A − B‖² and Σ‖B‖² over its tensors, summed over every
    process's shards (one all-reduce when the parameters are sharded).

    after[g], before[g]: the group's tensors at two points (a step, or a whole fine-tune). A − B is
    formed in the tensors' own format: exact (Sterbenz) wherever an element moved by less than its
    magnitude, within one rounding elsewhere (≈ 1e-9 relative on a group ratio, measured); only the
    squares are accumulated in float64, so no float64 copy of the weights is made.
    """
    sums = torch.zeros(len(after), 2, dtype=torch.float64)
    for g, (tensors, references) in enumerate(zip(after, before)):
        for a, b in zip(tensors, references):
            a, b = local_shard(a), local_shard(b)
            sums[g, 0] += float(torch.linalg.vector_norm(a - b, dtype=torch.float64)) ** 2
            sums[g, 1] += float(torch.linalg.vector_norm(b, dtype=torch.float64)) ** 2
    sharded = any(is_sharded(a) for tensors in after for a in tensors)
    if sharded:
        device = next(local_shard(a).device for tensors in after for a in tensors)
        sums = sum_over_shards(sums.to(device), sharded).cpu()
    return sums


def shard_model(model: torch.nn.Module, blocks: list[torch.nn.Module]) -> None:
    """FSDP2: each block is its own unit (gathered for its forward and backward only), then the rest."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded state dict on the CPU (collective: every process calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def reshard(*models: torch.nn.Module) -> None:
    """Return FSDP2 models to their sharded state. After a forward without backward the root module
    stays unsharded, and its ``parameters()`` would then be full plain tensors, not shards."""
    for model in models:
        if hasattr(model, "reshard"):
            model.reshard()
