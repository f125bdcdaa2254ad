"""The fused equal-step path under FSDP2 (fully_shard, DTensor parameters): CPU processes on gloo.

Each rank steps its local shards; the (2G,) partial sums are all-reduced once per step, over the mesh
dimension the parameters are sharded on. FSDP2: 2 processes on a 1-D mesh. HSDP: 4 processes on a
(replicate 2, shard 2) mesh, reduced over its shard dimension only (over all 4, every sum would
count each element twice: the ratios would survive, the traffic would double). The
sharded run must give the same group ratios (rtol 1e-6) and the same full parameters
(|Δ| ≤ 1e-6 + 1e-5 |W|) as the same fused step on an unsharded copy of the model, and the
reference EqualStep (fused=False) on the sharded model must give those ratios too. Layer sizes
are odd so shards are uneven, and one parameter has a single element (one shard of it is empty).
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 1))


OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "sgd-nesterov": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
}


def _worker(rank: int, mesh_shape: tuple, port: int, out: str, optimizer: str) -> None:
    world = math.prod(mesh_shape)
    # CPU tensors on gloo: the kernels run in the Triton interpreter, on a GPU machine too (set before
    # depthfast.kernels is imported in this fresh process).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from depthfast.optim import fused_unsupported_reason

        probe = _model()
        reason = fused_unsupported_reason(torch.optim.AdamW(probe.parameters()), [list(probe.parameters())], forced=True)
        if reason is None:
            result = _sharded_vs_plain(mesh_shape, optimizer)
        else:
            result = reason  # e.g. a GPU image whose older Triton interpreter cannot run the kernels on CPU tensors
        if rank == 0:
            torch.save(result, out)  # a file: queued tensors die with the process
    finally:
        dist.destroy_process_group()
    # Leave without C++ static destructors: with FSDP2 on gloo, about one exit in ten aborted in a
    # native thread after destroy_process_group had returned on both ranks ("terminate called without
    # an active exception"; torch 2.13, 2 CPU cores), after the results were written.
    os._exit(0)


def _sharded_vs_plain(mesh_shape: tuple, optimizer: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from depthfast.optim import EqualStep

    hsdp = len(mesh_shape) == 2
    names = ("replicate", "shard") if hsdp else ("shard",)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    models = {"fused": _model(), "plain": _model(), "reference": _model()}
    for name in ("fused", "reference"):
        m = models[name]
        for layer in (m[0], m[2], m[4]):
            fully_shard(layer, mesh=mesh)  # a 2-D mesh makes it HSDP
        fully_shard(m, mesh=mesh)
    groups = lambda m: [list(m[0].parameters()), list(m[2].parameters()), list(m[4].parameters())]
    make = OPTIMIZERS[optimizer]
    opts = {name: EqualStep(make(m.parameters()), groups(m), fused=name != "reference") for name, m in models.items()}
    assert opts["fused"]._engine is not None
    gen = torch.Generator().manual_seed(1)
    ratios = []
    for _ in range(3):
        x = torch.randn(8, 10, generator=gen)  # same batch on every rank: averaged grads = plain grads
        for name, model in models.items():
            opts[name].zero_grad()
            model(x).pow(2).mean().backward()
            opts[name].step()
        ratios.append({name: (o.ratios_before.clone(), o.ratios_after.clone()) for name, o in opts.items()})
    from depthfast.distributed import shard_process_groups

    try:  # a plain tensor beside DTensors would be counted once per rank
        shard_process_groups([next(models["fused"].parameters()), next(models["plain"].parameters())])
        raise AssertionError("a mix of DTensor and plain parameters was accepted")
    except ValueError as exc:
        assert "mix of DTensor and plain" in str(exc)
    groups = opts["fused"]._engine.process_groups  # built with the first step
    assert len(groups) == 1 and dist.get_world_size(groups[0]) == mesh_shape[-1]  # the shard dimension only
    full = [p.full_tensor().detach().clone() for p in models["fused"].parameters()]
    ref = [p.detach().clone() for p in models["plain"].parameters()]
    return ratios, full, ref


@pytest.mark.parametrize("optimizer,mesh_shape", [("adamw", (2,)), ("sgd-nesterov", (2,)), ("adamw", (2, 2))],
                         ids=["fsdp2-adamw", "fsdp2-sgd-nesterov", "hsdp-adamw"])
def test_fused_equal_step_sharded_matches_unsharded(tmp_path, optimizer, mesh_shape):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(mesh_shape, _free_port(), out, optimizer), nprocs=math.prod(mesh_shape),
                       join=True, start_method="spawn")
    saved = torch.load(out)
    if isinstance(saved, str):
        pytest.skip(f"the fused path cannot run on CPU tensors here: {saved}")
    ratios, full, ref = saved
    for step in ratios:
        for name in ("fused", "reference"):
            for got, want in zip(step[name], step["plain"]):  # before, after
                torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0, msg=f"{name}: {got} vs {want}")
        after = step["fused"][1]
        assert float((after / after.mean() - 1).abs().max()) < 1e-6
    for a, b in zip(full, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
