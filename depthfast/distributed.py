"""Sharded parameters (FSDP2, HSDP): sharding a model by blocks, norms over shards, full state dicts.

Trap this module exists for: under FSDP2 a parameter is a DTensor holding one shard per process,
and ``float((p ** 2).sum())`` on it quietly returns the *local* shard's sum, not the global one.
Every norm over parameters therefore goes through ``sum_over_shards``: local sums, then one
all-reduce.
"""

from __future__ import annotations

import os

import torch

from depthfast.errors import DepthfastError


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


def shard_process_groups(tensors) -> list | None:
    """The process groups over which per-process partial sums of these tensors' elements add up to
    the full sums: one per mesh dimension they are sharded on. FSDP2: its 1-D mesh. HSDP, a
    (replicate, shard) mesh: the shard dimension only — the replicas hold copies, and summing over
    them too would count every element once per replica. None for plain tensors.

    Raises ValueError where local sums cannot be combined that way: a mix of DTensor and plain
    tensors, several meshes, tensors sharded on different mesh dimensions, Partial placements.
    """
    dtensor = dtensor_type()
    sharded = [t for t in tensors if dtensor is not None and isinstance(t, dtensor)]
    if not sharded:
        return None
    if len(sharded) != len(tensors):
        raise ValueError("a mix of DTensor and plain parameters: the plain ones would be counted on every rank")
    from torch.distributed.tensor.placement_types import Replicate, Shard

    mesh, dims = sharded[0].device_mesh, None
    for t in sharded:
        if t.device_mesh != mesh:
            raise ValueError("parameters on different device meshes: their sums cannot be combined in one reduction")
        if not all(isinstance(pl, (Shard, Replicate)) for pl in t.placements):
            raise ValueError(f"placements {t.placements}: only Shard and Replicate parameters have norms from local sums")
        t_dims = tuple(i for i, pl in enumerate(t.placements) if isinstance(pl, Shard))
        if dims is not None and t_dims != dims:
            raise ValueError(f"parameters sharded on different mesh dimensions ({dims} and {t_dims})")
        dims = t_dims
    return [mesh.get_group(mesh_dim=i) for i in dims]


def sum_over_shards(values: torch.Tensor, groups: list | None) -> torch.Tensor:
    """All-reduce (sum, in place) a vector of per-process partial sums over ``shard_process_groups``."""
    if groups:
        import torch.distributed as dist

        for group in groups:
            dist.all_reduce(values, group=group)
    return values


def group_sums_of_squares(after, before) -> torch.Tensor:
    """float64 (G, 2) on the CPU: per group g, Σ‖A − B‖² and Σ‖B‖² over its tensors, summed over every
    shard (one all-reduce per sharded mesh dimension: FSDP2 and HSDP, one).

    after[g], before[g]: the group's tensors at two points (a step, or a whole fine-tune). A − B is
    formed in the tensors' own format: exact (Sterbenz) wherever an element moved by less than its
    magnitude, within one rounding elsewhere (≈ 1e-9 relative on a group ratio, measured); only the
    squares are accumulated in float64, so no float64 copy of the weights is made.
    """
    sums = torch.zeros(len(after), 2, dtype=torch.float64)
    for g, (tensors, references) in enumerate(zip(after, before)):
        for a, b in zip(tensors, references):
            a, b = local_shard(a), local_shard(b)
            b = b.to(a.device, non_blocking=True)  # θ₀ kept in host memory (--theta0-offload)
            sums[g, 0] += float(torch.linalg.vector_norm(a - b, dtype=torch.float64)) ** 2
            sums[g, 1] += float(torch.linalg.vector_norm(b, dtype=torch.float64)) ** 2
    groups = shard_process_groups([a for tensors in after for a in tensors])
    if groups:
        device = next(local_shard(a).device for tensors in after for a in tensors)
        sums = sum_over_shards(sums.to(device), groups).cpu()
    return sums


def shard_mesh(parallel: str, shard_size: int, world: int, device: torch.device):
    """The device mesh of a sharded run: FSDP2, 1-D over all ``world`` processes; HSDP, 2-D
    (replicate, shard) with ``shard_size`` processes per shard group (0: the processes of one node,
    LOCAL_WORLD_SIZE), so that parameters are gathered within a node and gradients are all-reduced
    across nodes."""
    from torch.distributed.device_mesh import init_device_mesh

    if parallel == "fsdp":
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    size = shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if size < 1 or world % size:
        raise DepthfastError(f"hsdp: {world} processes do not split into shard groups of {size} (--shard-size)")
    return init_device_mesh(device.type, (world // size, size), mesh_dim_names=("replicate", "shard"))


def shard_model(model: torch.nn.Module, blocks: list[torch.nn.Module], mesh=None) -> None:
    """FSDP2: each block is its own unit (gathered for its forward and backward only), then the rest.
    A 2-D (replicate, shard) ``mesh`` makes it HSDP."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def offload_to_host(model: torch.nn.Module, device: torch.device) -> None:
    """Keep ``model``'s weights in host memory and run it on ``device``: each module's weights move to
    the device for its own forward and are dropped after it (accelerate's cpu_offload hooks). The
    parameters become meta tensors; references taken to them before the call keep the host weights.
    Costs one host → device copy of the model per forward: meant for θ₀, used only to measure."""
    from accelerate import cpu_offload

    cpu_offload(model, execution_device=device)


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
