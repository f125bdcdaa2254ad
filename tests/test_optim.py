"""Tests of depthfast.optim: the reference EqualStep and the fused Triton path (CPU: TRITON_INTERPRET=1).

The fused path is checked against the reference run on float64 copies of the same parameters and
gradients. Tolerances per dtype:
    fp32 params and states, several steps: params and states |Δ| ≤ 1e-6 + 2e-5 |ref| (fp32 rounding of
        values ~1 that accumulates over steps); group ratios and scales rtol 1e-6
    bf16 params, fp32 states (each step from a common start): params within half a bf16 ulp,
        |Δ| ≤ 2^-8 |ref|; states rtol 1e-5; ratios rtol 1e-5 (ratios of the exact update)
    bf16 params and states against torch's own bf16 AdamW: one bf16 ulp (torch rounds intermediates)
    reference on a real model: group ratios after the rescale equal to 1e-6 relative; against a float64
        brute force, ratios rtol 1e-8 (ΔW formed in fp32), scales from those ratios rtol 1e-12 and
        parameters bit-exact
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from depthfast.optim import EqualStep, EqualStepAdamW, equal_step_scales, group_update_ratio



@pytest.fixture(autouse=True)
def production_launch_config(monkeypatch):
    """Block and chunk are production's (depthfast.optim.launch_config): on a GPU BLOCK 1024 (BLOCK
    4096 takes 243 registers per thread on sm_90), in the interpreter BLOCK 4096 (~2 ms per program).
    Tests that need multi-chunk tensors set a small chunk, a multiple of either block."""
    monkeypatch.delenv("DEPTHFAST_OPTIM_BLOCK", raising=False)
    monkeypatch.delenv("DEPTHFAST_OPTIM_CHUNK", raising=False)

ODD_SHAPES = [(7, 5), (13,), (3, 4, 5), (1,), (9000,), (33, 17)]
# On a GPU the kernels run for real on CUDA tensors; on a CPU, in the interpreter (tests/conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params(shapes, dtype=torch.float32, seed=0, zero=(), device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(shapes):
        w = torch.zeros(s, dtype=torch.float64) if i in zero else torch.randn(s, generator=gen, dtype=torch.float64)
        out.append(torch.nn.Parameter(w.to(device=device, dtype=dtype)))
    return out


def _f64_copy(params):
    """float64 copies on the CPU: the reference every fused result is checked against."""
    return [torch.nn.Parameter(p.detach().to("cpu", torch.float64).clone()) for p in params]


def _set_grads(params, refs, seed, zero=()):
    gen = torch.Generator().manual_seed(seed)
    for i, (p, r) in enumerate(zip(params, refs)):
        g = torch.zeros(p.shape, dtype=torch.float64) if i in zero else torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p.grad = g.to(device=p.device, dtype=p.dtype)
        r.grad = p.grad.to("cpu", torch.float64)


def _same_grads(ps, qs, seed):
    gen = torch.Generator().manual_seed(seed)
    for p, q in zip(ps, qs):
        p.grad = torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
        q.grad = p.grad.to(q.device).clone()


def _split(params, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(params[i:i + s])
        i += s
    return out


def _assert_close(a, b, rtol, atol, what):
    a, b = a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu()
    err = (a - b).abs() - (atol + rtol * b.abs())
    assert float(err.max()) <= 0, f"{what}: max |a - b| = {float((a - b).abs().max()):.3e}"


def _run_pair(shapes, group_sizes, *, steps=3, opt_cls=torch.optim.AdamW, opt_kw=None, control="equal-step",
              target="mean", zero_w=(), zero_g=(), lrs=None, monkeypatch=None, chunk=None, free=()):
    """Fused fp32 EqualStep vs the float64 reference on the same gradients; compares after every step."""
    if chunk is not None:
        monkeypatch.setenv("DEPTHFAST_OPTIM_CHUNK", str(chunk))
    opt_kw = dict(lr=1e-2, weight_decay=0.1) if opt_kw is None else opt_kw
    ps = _params(shapes, zero=zero_w)
    rs = _f64_copy(ps)
    fused = EqualStep(opt_cls(ps, **opt_kw), _split(ps, group_sizes), target=target, control=control, fused=True,
                      free=free)
    ref = EqualStep(opt_cls(rs, **opt_kw), _split(rs, group_sizes), target=target, control=control, fused=False,
                    free=free)
    assert fused.fused and not ref.fused
    for t in range(steps):
        if lrs is not None:
            for e in (fused, ref):
                for pg in e.param_groups:
                    pg["lr"] = lrs[t]
        _set_grads(ps, rs, seed=100 + t, zero=zero_g)
        fused.step()
        ref.step()
        for name in ("ratios_before", "ratios_after", "scales"):
            a, b = getattr(fused, name), getattr(ref, name)
            assert torch.equal(torch.isinf(a), torch.isinf(b)), name
            assert not torch.isnan(a).any()
            fin = torch.isfinite(b)
            _assert_close(a[fin], b[fin], 1e-6, 0.0, f"step {t} {name}")
        assert math.isclose(fused.target_ratio, ref.target_ratio, rel_tol=1e-6)
        for p, r in zip(ps, rs):
            _assert_close(p, r, 2e-5, 1e-6, f"step {t} params")
            # The same state as the wrapped optimizer keeps it (Adam: step, exp_avg, exp_avg_sq; SGD with
            # momentum: momentum_buffer; SGD without: nothing).
            fs, rstate = fused.state.get(p, {}), ref.state.get(r, {})
            assert set(fs) == set(rstate), f"step {t} state keys {set(fs)} vs {set(rstate)}"
            for k, v in rstate.items():
                if k == "step":
                    assert float(fs[k]) == float(v) == t + 1
                else:
                    _assert_close(fs[k], v, 2e-5, 1e-6, f"step {t} {k}")
    return fused, ref


# -- fused path vs reference ----------------------------------------------------------------------------

@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.Adam])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_matches_reference_odd_shapes(opt_cls, weight_decay, monkeypatch):
    # chunk 4096 < 9000 elements: one tensor spans three programs.
    _run_pair(ODD_SHAPES, [2, 3, 1], opt_cls=opt_cls, opt_kw=dict(lr=1e-2, weight_decay=weight_decay),
              monkeypatch=monkeypatch, chunk=4096)


def test_fused_one_group_and_betas_eps():
    _run_pair([(5, 3), (11,)], [2], opt_kw=dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05))


def test_fused_hundreds_of_small_tensors():
    gen = torch.Generator().manual_seed(1)
    shapes = [(int(n),) for n in torch.randint(1, 40, (300,), generator=gen)]
    fused, _ = _run_pair(shapes, [30] * 10, steps=2)
    # One program per tensor; two launches per phase: sizes that are multiples of 8 take 16-byte accesses.
    assert sum(t.num_chunks for t, _ in fused._engine.buckets) == 300
    assert sorted(t.vec for t, _ in fused._engine.buckets) == [0, 4]


def test_vector_alignment_is_promised_only_where_it_holds():
    # Views at odd offsets (4 bytes into a buffer) and sizes that are not multiples of 8 go to a bucket
    # without 16-byte accesses; on a GPU a wrong promise would read and write out of bounds. The fused
    # step must still match the reference for all of them, and a gradient that loses the alignment
    # later moves its tensor (the tables are rebuilt).
    flat = torch.randn(1 + 64 + 24 + 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    flat = flat.to(device=DEVICE, dtype=torch.float32)
    ps = [torch.nn.Parameter(flat[1:65].view(8, 8)), torch.nn.Parameter(torch.randn(24, device=DEVICE)),
          torch.nn.Parameter(torch.randn(7, device=DEVICE)), torch.nn.Parameter(torch.randn(4, 8, device=DEVICE))]
    assert ps[0].data_ptr() % 16 == 4
    rs = _f64_copy(ps)
    fused = EqualStep(torch.optim.AdamW(ps, lr=1e-2), [ps[:2], ps[2:]], fused=True)
    ref = EqualStep(torch.optim.AdamW(rs, lr=1e-2), [rs[:2], rs[2:]], fused=False)
    for t in range(3):
        _set_grads(ps, rs, seed=t)
        if t == 2:  # p3's gradient now a view 4 bytes into a buffer
            g = torch.zeros(33, device=DEVICE)
            g[1:].copy_(ps[3].grad.flatten())
            ps[3].grad = g[1:].view(4, 8)
        fused.step()
        ref.step()
        by_vec = {tuple(sorted(p.data_ptr() for p, *_ in t.entries)): t.vec for t, _ in fused._engine.buckets}
        aligned = {ps[1].data_ptr(), ps[3].data_ptr()} if t < 2 else {ps[1].data_ptr()}
        assert by_vec[tuple(sorted(aligned))] == 4
        assert all(v == 0 for k, v in by_vec.items() if set(k) != aligned)
        for p, r in zip(ps, rs):
            _assert_close(p, r, 2e-5, 1e-6, f"step {t} params")


SGD_SETTINGS = {
    "plain": dict(lr=0.05, weight_decay=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "dampening+wd": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.1),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
    "maximize": dict(lr=0.05, momentum=0.8, weight_decay=0.1, maximize=True),
}


@pytest.mark.parametrize("setting", list(SGD_SETTINGS))
def test_fused_sgd_matches_reference(setting, monkeypatch):
    # Three steps: the first creates the momentum buffers (a copy of the gradient, as torch does), the
    # later ones update them. One tensor spans three programs (chunk 4096 < 9000).
    _run_pair(ODD_SHAPES, [2, 3, 1], opt_cls=torch.optim.SGD, opt_kw=SGD_SETTINGS[setting],
              monkeypatch=monkeypatch, chunk=4096)


def test_fused_sgd_control_none_and_new_parameters_midway():
    # control "none" leaves torch's SGD update as it is; a parameter whose first gradient arrives at
    # step 2 gets its buffer then (torch's rule), while the others keep theirs.
    ps = _params(ODD_SHAPES[:4])
    rs = _f64_copy(ps)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.1)
    fused = EqualStep(torch.optim.SGD(ps, **kw), [ps[:2], ps[2:]], control="none", fused=True)
    plain = torch.optim.SGD(rs, **kw)
    for t in range(3):
        active = slice(0, 4) if t else slice(0, 3)
        for p in ps + rs:
            p.grad = None
        _set_grads(ps[active], rs[active], seed=t)
        fused.step()
        plain.step()
        for p, r in zip(ps, rs):
            _assert_close(p, r, 2e-5, 1e-6, f"step {t} params")
            if p.grad is not None:
                _assert_close(fused.state[p]["momentum_buffer"], plain.state[r]["momentum_buffer"], 2e-5, 1e-6, "buf")
    assert torch.equal(fused.ratios_before, fused.ratios_after)
    assert float(fused.ratios_before[1]) > 0


def test_fused_zero_norm_and_zero_update_groups():
    # group 1 is zero-initialised (r = +inf, scale 1), group 2 gets zero grads and no weight decay (r = 0).
    fused, ref = _run_pair([(6, 4), (5,), (8,), (3, 3)], [1, 1, 1, 1], opt_kw=dict(lr=1e-2, weight_decay=0.0),
                           zero_w=(1,), zero_g=(2,), steps=1)
    assert math.isinf(float(fused.ratios_before[1])) and float(fused.ratios_before[2]) == 0.0
    assert fused.scales[1].item() == fused.scales[2].item() == 1.0


def test_fused_lr_changes_between_steps():
    _run_pair(ODD_SHAPES[:4], [2, 2], steps=3, lrs=[1e-2, 3e-3, 2e-2])


def test_fused_param_groups_with_different_hyperparameters():
    ps = _params(ODD_SHAPES[:4])
    rs = _f64_copy(ps)
    mk = lambda q: torch.optim.AdamW([{"params": q[:2], "weight_decay": 0.0}, {"params": q[2:], "lr": 3e-3}],
                                     lr=1e-2, weight_decay=0.1)
    fused = EqualStep(mk(ps), [ps[:1], ps[1:3], ps[3:]], fused=True)
    ref = EqualStep(mk(rs), [rs[:1], rs[1:3], rs[3:]], fused=False)
    for t in range(2):
        _set_grads(ps, rs, seed=t)
        fused.step()
        ref.step()
    for p, r in zip(ps, rs):
        _assert_close(p, r, 2e-5, 1e-6, "params")
    _assert_close(fused.ratios_after, ref.ratios_after, 1e-5, 0.0, "ratios")


def test_fused_control_none_records_ratios_and_steps_like_adamw():
    fused, ref = _run_pair(ODD_SHAPES, [3, 3], control="none", steps=2)
    assert torch.equal(fused.ratios_before, fused.ratios_after)  # scales: reported, not applied


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_free_group_keeps_its_update_and_stays_out_of_the_target(opt_cls):
    # Group 2 (a stand-in for a fresh task head, lr-wise the fastest mover) is free: scale 1, its ratio
    # reported, the target the mean of groups 0 and 1 only; fused and reference agree.
    kw = dict(lr=0.05, momentum=0.9) if opt_cls is torch.optim.SGD else dict(lr=1e-2)
    fused, ref = _run_pair(ODD_SHAPES, [2, 3, 1], opt_cls=opt_cls, opt_kw=kw, free=(2,))
    for e in (fused, ref):
        before, after = e.ratios_before.cpu(), e.ratios_after.cpu()
        assert float(e.scales[2]) == 1.0 and float(after[2]) == pytest.approx(float(before[2]), rel=1e-9)
        assert e.target_ratio == pytest.approx(float(before[:2].mean()), rel=1e-9)
        _assert_close(after[:2], torch.full((2,), e.target_ratio, dtype=torch.float64), 1e-6, 0.0, "equalized")
    with pytest.raises(ValueError, match="free"):
        EqualStep(opt_cls(_params([(2,)]), **kw), [_params([(2,)])], free=(1,))


def test_fused_fixed_target():
    fused, _ = _run_pair(ODD_SHAPES[:4], [1, 3], target=0.003, steps=2)
    assert fused.target_ratio == pytest.approx(0.003)
    _assert_close(fused.ratios_after, torch.full((2,), 0.003, dtype=torch.float64), 1e-6, 0.0, "ratios_after")


def test_fused_params_outside_groups_and_without_grads():
    # p0 is stepped but in no group (scale 1, not counted); p3 is in a group but has no gradient (ΔW = 0,
    # its ‖W‖ counts).
    ps = _params([(4, 4), (6,), (5,), (7,)])
    rs = _f64_copy(ps)
    fused = EqualStep(torch.optim.AdamW(ps[:3], lr=1e-2), [ps[1:2], ps[2:]], fused=True)
    ref = EqualStep(torch.optim.AdamW(rs[:3], lr=1e-2), [rs[1:2], rs[2:]], fused=False)
    for t in range(2):
        _set_grads(ps[:3], rs[:3], seed=t)
        fused.step()
        ref.step()
    for p, r in zip(ps, rs):
        _assert_close(p, r, 2e-5, 1e-6, "params")
    _assert_close(fused.ratios_before, ref.ratios_before, 1e-5, 0.0, "ratios")


def test_fused_bf16_params_fp32_states():
    shapes = [(7, 5), (13,), (64, 3)]
    ps = _params(shapes, dtype=torch.bfloat16)
    fused = EqualStepAdamW(ps, [ps[:1], ps[1:]], lr=1e-2, weight_decay=0.1, fused=True, state_dtype=torch.float32)
    rs = _f64_copy(ps)
    ref = EqualStep(torch.optim.AdamW(rs, lr=1e-2, weight_decay=0.1), [rs[:1], rs[1:]], fused=False)
    for t in range(3):
        # Restart the reference from the fused state: bf16 rounding of W is not the thing under test.
        for p, r in zip(ps, rs):
            r.data.copy_(p.data)
            if t:
                for k in ("exp_avg", "exp_avg_sq"):
                    ref.state[r][k].copy_(fused.state[p][k])
        _set_grads(ps, rs, seed=t)
        fused.step()
        ref.step()
        for p, r in zip(ps, rs):
            assert p.dtype == torch.bfloat16 and fused.state[p]["exp_avg"].dtype == torch.float32
            _assert_close(p, r, 2.0**-8, 1e-30, f"step {t} bf16 params")
            for k in ("exp_avg", "exp_avg_sq"):
                _assert_close(fused.state[p][k], ref.state[r][k], 1e-5, 1e-12, f"step {t} {k}")
        # The reference measures the rounded bf16 difference; the fused path the exact update: compare
        # the fused ratios with the float64 ones from the reference's optimizer on the same start.
        _assert_close(fused.ratios_before, ref.ratios_before, 1e-5, 0.0, f"step {t} ratios")


@pytest.mark.parametrize("make,state_key", [
    (lambda ps: torch.optim.AdamW(ps, lr=1e-2), "exp_avg"),
    (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), "momentum_buffer"),
], ids=["adamw", "sgd"])
def test_fused_bf16_states_like_torch(make, state_key):
    # Default state dtype follows the parameter (as torch does), so torch can take over the state.
    ps = _params([(9, 4), (17,)], dtype=torch.bfloat16)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    fused = EqualStep(make(ps), [ps], control="none", fused=True)
    plain = make(qs)
    for t in range(3):
        _same_grads(ps, qs, seed=t)
        fused.step()
        plain.step()
    for p, q in zip(ps, qs):
        assert fused.state[p][state_key].dtype == torch.bfloat16
        # torch rounds every intermediate to bf16: allow one bf16 ulp (2^-7 relative, up to 2^-6 near 2^k).
        _assert_close(p, q, 2.0**-6, 1e-30, "bf16 params vs torch")


def test_recorded_ratios_are_those_of_the_applied_update_with_bf16_states():
    """fp32 params, bf16 states: phase 1 must measure Σu² from the moments as stored (rounded to bf16),
    because phase 2 recomputes u from them; then the recorded ratios are the applied ones. The applied
    ‖ΔW‖ carries the fp32 rounding of W + s·u (≲ 2^-24 |W| per element, ~6e-6 of an update of 1e-2)."""
    ps = _params([(33, 17), (40,), (9, 5)], seed=3)
    groups = [ps[:1], ps[1:]]
    opt = EqualStepAdamW(ps, groups, lr=1e-2, weight_decay=0.1, fused=True, state_dtype=torch.bfloat16)
    for t in range(3):
        _same_grads(ps, [torch.empty_like(p) for p in ps], seed=t)
        before = [p.detach().clone() for p in ps]
        opt.step()
        assert opt.state[ps[0]]["exp_avg"].dtype == torch.bfloat16
        after = [[p.detach() for p in g] for g in groups]
        applied = torch.tensor([group_update_ratio(a, b) for a, b in zip(after, _split(before, [1, 2]))],
                               dtype=torch.float64)
        _assert_close(opt.ratios_after, applied, 1e-5, 0.0, f"step {t} recorded vs applied ratios")


def test_interpreter_bf16_stores_round_to_nearest_even():
    """The by-hand fp32 → bf16 rounding the kernel uses under the interpreter (whose own cast truncates)
    is bit-identical to torch's round-to-nearest-even, ties and specials included."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("compiled Triton rounds natively; the by-hand path serves the interpreter")
    from bf16_cast_kernel import cast_kernel
    one = 1.0 + 2.0**-8  # halfway between two bf16 values: ties go to the even one (1.0)
    specials = [one, 1.0 + 3 * 2.0**-8, -one, 2.0**-133, 3.0e38, float("inf"), float("-inf"), float("nan"), 0.0, -0.0]
    x = torch.cat([torch.tensor(specials), torch.randn(1000, generator=torch.Generator().manual_seed(5))])
    x[10:510] = (x[10:510].bfloat16().float() * (1 + 2.0**-8))  # many ties and near-ties
    out = torch.empty(x.numel(), dtype=torch.bfloat16)
    cast_kernel[(1,)](x, out, x.numel(), BF16_BY_HAND=True, BLOCK=2048)
    want = x.to(torch.bfloat16)
    assert torch.equal(out.view(torch.int16)[~x.isnan()], want.view(torch.int16)[~x.isnan()])
    assert out[x.isnan()].isnan().all()


def test_single_pass_uses_previous_scales():
    ps = _params(ODD_SHAPES[:4])
    rs = _f64_copy(ps)
    groups = lambda q: [q[:1], q[1:3], q[3:]]
    sp = EqualStep(torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), groups(ps), fused=True, mode="single-pass")
    plain = torch.optim.AdamW(rs, lr=1e-2, weight_decay=0.1)  # float64 AdamW, rescaled by hand below
    prev = None
    for t in range(3):
        _set_grads(ps, rs, seed=t)
        before = [r.detach().clone() for r in rs]
        plain.step()
        with torch.no_grad():
            r_g = torch.tensor([group_update_ratio(g, b) for g, b in zip(groups(rs), groups(before))], dtype=torch.float64)
        scales = equal_step_scales(r_g) if prev is None else equal_step_scales(prev)  # step 1 is exact
        with torch.no_grad():
            for g, b, s in zip(groups(rs), groups(before), scales.tolist()):
                for r, r0 in zip(g, b):
                    r.copy_(r0 + s * (r - r0))
        sp.step()
        _assert_close(sp.ratios_before, r_g, 1e-5, 0.0, f"step {t} ratios")
        _assert_close(sp.scales, scales, 1e-5, 0.0, f"step {t} scales")
        _assert_close(sp.ratios_after, scales * r_g, 1e-5, 0.0, f"step {t} ratios_after")
        for p, r in zip(ps, rs):
            _assert_close(p, r, 2e-5, 1e-6, f"step {t} params")
        prev = r_g


@pytest.mark.parametrize("make", [lambda ps: torch.optim.AdamW(ps, lr=1e-2),
                                  lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True)],
                         ids=["adamw", "sgd"])
def test_state_dict_round_trip_and_switching_paths(make):
    ps = _params(ODD_SHAPES[:3])
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a = EqualStep(make(ps), [ps[:1], ps[1:]], fused=True)
    b = EqualStep(make(qs), [qs[:1], qs[1:]], fused=False)
    adam = isinstance(a.optimizer, torch.optim.AdamW)
    for t in range(4):
        if t == 2:  # continue a's run on the reference path, b's on the fused one, through state dicts
            sa, sb = a.state_dict(), b.state_dict()
            a = EqualStep(make(ps), [ps[:1], ps[1:]], fused=False)
            b = EqualStep(make(qs), [qs[:1], qs[1:]], fused=True)
            a.load_state_dict(sa)
            b.load_state_dict(sb)
        _same_grads(ps, qs, seed=t)
        a.step()
        b.step()
        for p, q in zip(ps, qs):
            _assert_close(p, q, 1e-5, 1e-6, f"step {t}")
            if adam:
                assert float(a.state[p]["step"]) == float(b.state[q]["step"]) == t + 1
    # Reloading a state dict into the same fused wrapper is noticed: stale tables would step the old
    # state tensors. (A copy: torch's state_dict holds a's own tensors, which load_state_dict would share.)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    _same_grads(ps, qs, seed=9)
    a.step()
    b.step()
    for p, q in zip(ps, qs):
        _assert_close(p, q, 1e-5, 1e-6, "after reloading")
        for k, v in a.state[p].items():  # the reloaded tensors are the ones stepped
            _assert_close(b.state[q][k], v, 1e-5, 1e-6, f"state {k} after reloading")
    if adam:
        assert float(b.state[qs[0]]["step"]) == 5


@pytest.mark.parametrize("make", [lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
                                  lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1)],
                         ids=["adamw", "sgd"])
def test_tables_follow_replaced_parameter_and_state_storage(make):
    """Storage the tables point at can move between steps: ``p.data = new`` (what ``model.to(dtype)``
    and many loaders do) and a state tensor replaced in ``optimizer.state``. The fused step must then
    update the new tensors, exactly as the reference does (stale tables would step the orphaned ones:
    the parameter would not move, the new state would not be read)."""
    ps = _params(ODD_SHAPES[:4])
    rs = _f64_copy(ps)
    fused = EqualStep(make(ps), [ps[:2], ps[2:]], fused=True)
    ref = EqualStep(make(rs), [rs[:2], rs[2:]], fused=False)
    state_key = "exp_avg" if isinstance(fused.optimizer, torch.optim.AdamW) else "momentum_buffer"
    for t in range(4):
        if t == 1:  # new parameter storage (new values too), for a grouped and a second tensor
            for i in (0, 3):
                ps[i].data = ps[i].data * 1.5
                rs[i].data = rs[i].data * 1.5
        if t == 2:  # a new state tensor in place of the old one
            for opt, q in ((fused, ps[1]), (ref, rs[1])):
                opt.state[q][state_key] = opt.state[q][state_key] * 0.5
        if t == 3:  # both at once, on the tensor of group 2 that was left alone so far
            ps[2].data = ps[2].data.clone()
            rs[2].data = rs[2].data.clone()
            for opt, q in ((fused, ps[2]), (ref, rs[2])):
                opt.state[q][state_key] = opt.state[q][state_key].clone()
        _set_grads(ps, rs, seed=20 + t)
        fused.step()
        ref.step()
        _assert_close(fused.ratios_before, ref.ratios_before, 1e-6, 0.0, f"step {t} ratios")
        for p, r in zip(ps, rs):
            _assert_close(p, r, 2e-5, 1e-6, f"step {t} params")
            _assert_close(fused.state[p][state_key], ref.state[r][state_key], 2e-5, 1e-6, f"step {t} {state_key}")


def test_device_guard_selects_the_tensors_device():
    """The launch context for CUDA tensors makes *their* device current (Triton launches on the current
    device), whatever device is current when the step is called; CPU tensors get no guard."""
    from depthfast.kernels import optim as kernels

    guard = kernels.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert kernels.device_guard(torch.device("cuda", 0)).idx == 0
    assert not isinstance(kernels.device_guard(torch.device("cpu")), torch.cuda.device)


def test_every_launch_enters_the_parameters_device(monkeypatch):
    """kernels.launch runs each kernel inside device_guard(the tables' device), and the tables live on
    the parameters' device: a launch outside the guard, or under another device, fails here. Both
    phases (exact mode) of both dtype buckets are counted."""
    import contextlib

    from depthfast.kernels import optim as kernels

    real_guard, real_launch = kernels.device_guard, kernels._launch
    inside, launched_under = [], []

    @contextlib.contextmanager
    def recording_guard(device):
        inside.append(device)
        with real_guard(device):
            yield
        inside.pop()

    def recording_launch(tables, *args):
        launched_under.append((tables.device, tuple(inside)))
        real_launch(tables, *args)

    monkeypatch.setattr(kernels, "device_guard", recording_guard)
    monkeypatch.setattr(kernels, "_launch", recording_launch)
    ps = _params([(8, 8), (7,), (5, 3)])  # two buckets: vector-aligned and not
    e = EqualStep(torch.optim.AdamW(ps, lr=1e-2), [ps[:1], ps[1:]], fused=True)
    _same_grads(ps, [torch.empty_like(p) for p in ps], seed=0)
    e.step()
    want = ps[0].device
    assert len(e._engine.buckets) == 2
    assert launched_under == [(want, (want,))] * 4, launched_under


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_parameters_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    ps = _params(ODD_SHAPES, device="cuda:1")
    rs = _f64_copy(ps)
    fused = EqualStep(torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), [ps[:3], ps[3:]], fused=True)
    ref = EqualStep(torch.optim.AdamW(rs, lr=1e-2, weight_decay=0.1), [rs[:3], rs[3:]], fused=False)
    for t in range(2):
        _set_grads(ps, rs, seed=t)
        fused.step()
        ref.step()
        assert torch.cuda.current_device() == 0  # the guard restores the caller's device
        assert fused.ratios_before.device == torch.device("cuda", 1)
        _assert_close(fused.ratios_after, ref.ratios_after, 1e-6, 0.0, f"step {t} ratios")
        for p, r in zip(ps, rs):
            _assert_close(p, r, 2e-5, 1e-6, f"step {t} params")


def test_production_chunking_of_large_tensors():
    """Production's block and chunk (no overrides) on tensors of several chunks each: 262 144 elements
    (16-byte accesses) and 153 900 (an odd size, 4-byte accesses) against the reference."""
    from depthfast.optim import launch_config

    block, chunk = launch_config(torch.device(DEVICE))
    assert (block, chunk) == ((1024, 65536) if DEVICE == "cuda" else (4096, 65536))
    fused, _ = _run_pair([(256, 1024), (300, 513), (64,)], [1, 2], steps=2)
    assert fused._engine.block == block and fused._engine.chunk == chunk
    assert sum(t.num_chunks for t, _ in fused._engine.buckets) == 4 + 3 + 1
    assert sorted(t.vec for t, _ in fused._engine.buckets) == [0, 4]


def test_state_works_with_torch_fused_adamw():
    # torch's fused=True AdamW wants its step counters on the parameters' device; the fused path
    # creates them there, so the wrapped optimizer can take over directly.
    ps = _params([(5, 3), (4,)])
    opt = torch.optim.AdamW(ps, lr=1e-2, fused=True)
    e = EqualStep(opt, [ps], fused=True)
    _same_grads(ps, ps, seed=0)
    e.step()
    opt.step()
    assert float(opt.state[ps[0]]["step"]) == 2


def test_closure_and_fused_default_off_on_cpu():
    ps = _params([(3, 3)], device="cpu")
    auto = EqualStep(torch.optim.AdamW(ps), [ps])
    assert auto.fused is False  # CPU parameters: the reference unless forced
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("forcing the fused path on CPU tensors needs the Triton interpreter")
    e = EqualStep(torch.optim.AdamW(ps, lr=1e-2), [ps], fused=True)

    def closure():
        ps[0].grad = torch.ones_like(ps[0])
        return torch.tensor(1.5)

    assert float(e.step(closure)) == 1.5
    assert float(e.state[ps[0]]["step"]) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real")
def test_kernel_compiles_for_sm90():
    # The interpreter accepts code that compiled Triton rejects (e.g. non-constexpr globals): compile
    # for an H100 in a fresh process without TRITON_INTERPRET. ptxas ships with triton.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import depthfast.kernels.optim as K\n"
            "for p, s, mode, sgd, vec in [('fp32', 'fp32', K.PHASE1, False, 4), ('bf16', 'fp32', K.PHASE2, False, 8),\n"
            "                             ('bf16', 'bf16', K.SINGLE, False, 0), ('fp32', 'fp32', K.PHASE1, True, 0),\n"
            "                             ('bf16', 'bf16', K.PHASE2, True, 8)]:\n"
            "    c = K.compile_for(90, p, s, mode, sgd=sgd, vec=vec)\n"
            "    assert 'atom.global' in c.asm['ptx'] or mode == K.PHASE2\n"
            "    # The alignment hints must turn the data accesses into 16-byte ones (a bandwidth-bound step).\n"
            "    assert ('ld.global.v4' in c.asm['ptx'] and 'st.global.v4' in c.asm['ptx']) == (vec > 0), (p, s, mode, vec)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if "No module named 'triton.backends.nvidia'" in out.stderr:
        pytest.skip("triton without the CUDA backend")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_fused_bad_arguments():
    ps = _params([(3, 3)])
    with pytest.raises(ValueError, match="RMSprop"):
        EqualStep(torch.optim.RMSprop(ps, lr=0.1), [ps], fused=True)
    with pytest.raises(ValueError, match="differentiable"):
        EqualStep(torch.optim.SGD(ps, lr=0.1, momentum=0.9, differentiable=True), [ps], fused=True)
    with pytest.raises(ValueError, match="amsgrad"):
        EqualStep(torch.optim.AdamW(ps, amsgrad=True), [ps], fused=True)
    with pytest.raises(ValueError, match="single-pass"):
        EqualStep(torch.optim.AdamW(ps), [ps], fused=False, mode="single-pass")
    with pytest.raises(ValueError, match="mode"):
        EqualStep(torch.optim.AdamW(ps), [ps], fused=True, mode="twice")
    with pytest.raises(ValueError, match="fused"):
        EqualStep(torch.optim.AdamW(ps), [ps], fused="yes")
    with pytest.raises(ValueError, match="state_dtype"):
        EqualStep(torch.optim.AdamW(ps), [ps], fused=False, state_dtype=torch.float32)
    assert EqualStep(torch.optim.AdamW(ps, amsgrad=True), [ps]).fused is False  # auto: falls back


# -- reference ------------------------------------------------------------------------------------------

def _tiny_gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).to(DEVICE)
    blocks = [list(b.parameters()) for b in model.transformer.h]
    emb = list(model.transformer.wte.parameters()) + list(model.transformer.wpe.parameters())
    seen = {id(p) for g in blocks + [emb] for p in g}
    rest = [p for p in model.parameters() if id(p) not in seen]
    return model, [emb] + blocks + [rest]


def _train_steps(model, eq, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 16), generator=gen).to(DEVICE)
        eq.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        eq.step()


@pytest.mark.parametrize("fused", [False, True])
def test_equal_step_on_tiny_gpt2(fused):
    model, groups = _tiny_gpt2()
    eq = EqualStep(torch.optim.AdamW(model.parameters(), lr=1e-3), groups, fused=fused)
    _train_steps(model, eq, steps=3)
    r = eq.ratios_after
    assert r.shape == (len(groups),) and bool((r > 0).all())
    assert float((r / r.mean() - 1).abs().max()) < 1e-6
    assert float(eq.ratios_before.max() / eq.ratios_before.min()) > 1.01  # the control did something


def test_reference_against_float64_brute_force():
    model, groups = _tiny_gpt2()
    params = [p for g in groups for p in g]
    w0 = [p.detach().to(torch.float64).clone() for p in params]
    eq = EqualStep(torch.optim.AdamW(model.parameters(), lr=1e-3), groups, fused=False)
    # Same step without the control, on a copy, gives the optimizer's ΔW.
    twin, twin_groups = _tiny_gpt2()
    twin.load_state_dict(model.state_dict())
    plain = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    model(input_ids=ids, labels=ids).loss.backward()
    twin(input_ids=ids, labels=ids).loss.backward()
    eq.step()
    plain.step()
    it = iter(w0)
    w0_groups = [[next(it) for _ in g] for g in groups]
    dw = [[q.detach().to(torch.float64) - w for q, w in zip(tg, wg)] for tg, wg in zip(twin_groups, w0_groups)]
    r = torch.tensor([math.sqrt(sum(float((d * d).sum()) for d in dg) / sum(float((w * w).sum()) for w in wg))
                      for dg, wg in zip(dw, w0_groups)], dtype=torch.float64)
    # ΔW in fp32 is exact wherever |ΔW| < |W| (Sterbenz) and within one rounding elsewhere: 1e-8 relative
    _assert_close(eq.ratios_before, r, 1e-8, 0.0, "ratios_before")
    s = eq.ratios_before.mean() / eq.ratios_before
    _assert_close(eq.scales, s, 1e-12, 0.0, "scales")
    for pg, wg, dg, sg in zip(groups, w0_groups, dw, s.tolist()):
        for p, w, d in zip(pg, wg, dg):
            _assert_close(p, (w + sg * d).to(torch.float32), 0.0, 0.0, "rescaled params")


def test_reference_leaves_state_untouched():
    model, groups = _tiny_gpt2()
    twin, _ = _tiny_gpt2()
    twin.load_state_dict(model.state_dict())
    eq = EqualStep(torch.optim.AdamW(model.parameters(), lr=1e-3), groups, control="none", fused=False)
    plain = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    _train_steps(model, eq, 2)
    _train_steps(twin, plain, 2)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(eq.state[p][k], plain.state[q][k]), (n, k)


def _benchmark_baselines():
    """benchmarks/optim_baselines.py, loaded by path: the benchmarks are scripts, not a package, and
    the baseline lives with the benchmark that times it."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "optim_baselines.py")
    spec = importlib.util.spec_from_file_location("optim_baselines", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_by_hand_baseline_matches_reference():
    # The benchmark's by-hand baseline (fp32 foreach norms): same ratios and params to fp32 accuracy.
    ForeachEqualStep = _benchmark_baselines().ForeachEqualStep
    ps = _params(ODD_SHAPES[:4])
    rs = _f64_copy(ps)
    a = ForeachEqualStep(torch.optim.AdamW(ps, lr=1e-2), [ps[:1], ps[1:3], ps[3:]])
    b = EqualStep(torch.optim.AdamW(rs, lr=1e-2), [rs[:1], rs[1:3], rs[3:]], fused=False)
    for t in range(2):
        _set_grads(ps, rs, seed=t)
        a.step()
        b.step()
        _assert_close(a.ratios_before, b.ratios_before, 1e-4, 0.0, "ratios")
    for p, r in zip(ps, rs):
        _assert_close(p, r, 2e-5, 1e-6, "params")


def test_reference_zero_norm_group_no_nan():
    ps = _params([(4,), (3,)], zero=(1,))
    for p in ps:
        p.grad = torch.ones_like(p)
    eq = EqualStep(torch.optim.SGD(ps, lr=0.1), [ps[:1], ps[1:]])
    eq.step()
    assert math.isinf(float(eq.ratios_before[1])) and float(eq.scales[1]) == 1.0
    assert not torch.isnan(eq.ratios_after).any()
    assert eq.target_ratio == pytest.approx(float(eq.ratios_before[0]))


def test_reference_bad_arguments():
    ps = _params([(3,), (2,)])
    opt = torch.optim.SGD(ps, lr=0.1)
    for kw, msg in [(dict(control="equal"), "control"), (dict(target=-1.0), "target"), (dict(target="median"), "target"),
                    (dict(target=float("nan")), "target")]:
        with pytest.raises(ValueError, match=msg):
            EqualStep(opt, [ps], **kw)
    with pytest.raises(ValueError, match="more than one group"):
        EqualStep(opt, [ps, ps[:1]])
    with pytest.raises(ValueError, match="non-empty"):
        EqualStep(opt, [])
    with pytest.raises(ValueError, match="non-empty"):
        EqualStep(opt, [ps, []])
