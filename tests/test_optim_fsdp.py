"""The fused equal-step path under FSDP2 (fully_shard, DTensor parameters): 2 CPU processes on gloo.

Each rank steps its local shards; the (2G,) partial sums are all-reduced once per step. The sharded run
must give the same group ratios (rtol 1e-6) and the same full parameters (|Δ| ≤ 1e-6 + 1e-5 |W|) as
the same fused step on an unsharded copy of the model. Layer sizes are odd so shards are uneven, and
one parameter has a single element (rank 1 holds an empty shard of it).
"""

from __future__ import annotations

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


def _worker(rank: int, world: int, port: int, out: str, optimizer: str) -> None:
    # CPU tensors on gloo: the kernels run in the Triton interpreter, on a GPU machine too (set before
    # depthfast.kernels is imported in this fresh process).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from depthfast.optim import fused_unsupported_reason

        probe = _model()
        reason = fused_unsupported_reason(torch.optim.AdamW(probe.parameters()), [list(probe.parameters())], forced=True)
        if reason is None:
            result = _sharded_vs_plain(world, optimizer)
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


def _sharded_vs_plain(world: int, optimizer: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from depthfast.optim import EqualStep

    sharded, plain = _model(), _model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in (sharded[0], sharded[2], sharded[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    groups = lambda m: [list(m[0].parameters()), list(m[2].parameters()), list(m[4].parameters())]
    make = OPTIMIZERS[optimizer]
    opt_s = EqualStep(make(sharded.parameters()), groups(sharded), fused=True)
    opt_p = EqualStep(make(plain.parameters()), groups(plain), fused=True)
    assert opt_s._engine is not None
    gen = torch.Generator().manual_seed(1)
    ratios = []
    for _ in range(3):
        x = torch.randn(8, 10, generator=gen)  # same batch on every rank: averaged grads = plain grads
        for model, opt in ((sharded, opt_s), (plain, opt_p)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        ratios.append((opt_s.ratios_after.clone(), opt_p.ratios_after.clone(),
                       opt_s.ratios_before.clone(), opt_p.ratios_before.clone()))
    assert opt_s._engine.process_group is not None
    full = [p.full_tensor().detach().clone() for p in sharded.parameters()]
    ref = [p.detach().clone() for p in plain.parameters()]
    return ratios, full, ref


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_fused_equal_step_under_fsdp2_matches_unsharded(tmp_path, optimizer):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(2, _free_port(), out, optimizer), nprocs=2, join=True, start_method="spawn")
    saved = torch.load(out)
    if isinstance(saved, str):
        pytest.skip(f"the fused path cannot run on CPU tensors here: {saved}")
    ratios, full, ref = saved
    for after_s, after_p, before_s, before_p in ratios:
        torch.testing.assert_close(before_s, before_p, rtol=1e-6, atol=0.0)
        torch.testing.assert_close(after_s, after_p, rtol=1e-6, atol=0.0)
        assert float((after_s / after_s.mean() - 1).abs().max()) < 1e-6
    for a, b in zip(full, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
