"""StreamingCKA: per-layer CKA between a base and a tuned model, accumulated over probe batches.

It keeps one statistics object per layer (depthfast.cka.stats) and feeds each update either to the
compiled engine (depthfast.cka.engine), one call per group of layers of equal width, or to the
float64 reference; ``compute`` finishes every layer in float64.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from depthfast.cka import engine
from depthfast.cka.engine import ieee_fp32_matmul
from depthfast.cka.reference import pool_activations
from depthfast.cka.stats import _ExactLayerStats, _UnbiasedLayerStats
from depthfast.constants import ESTIMATORS, MEASURES, POOLINGS
from depthfast.errors import DepthfastError



class StreamingCKA:
    """Per-layer CKA between a base and a tuned model, accumulated over probe batches.

    update(base_acts, tuned_acts, attention_mask=None): each a sequence of num_layers tensors
    (batch, seq, d_ℓ) — or (n, d_ℓ) samples — of the same inputs; attention_mask (batch, seq).
    compute(measure="linear") → float64 tensor (num_layers,):
        "linear": linear CKA;  "debiased": debiased linear CKA (HSIC₁ over the whole probe set);
        "procrustes": squared Procrustes distance d²_P ∈ [0, 2] (a distance, not a similarity).
    compute_change(measure="linear") → float64 tensor (num_layers,): 1 − CKA (d²_P for "procrustes"),
        formed without subtracting from 1: exact relative to the change at every magnitude.

    Layers whose base and tuned widths agree (d1 = d2) accumulate the statistics of X and of the change
    D = Y − X (XᵀX, DᵀX, DᵀD: the same products and memory as XᵀX, YᵀX, YᵀY) and finish in float64
    from a closed form in which the O(1) terms cancel (``one_minus_cka_from_change``); layers of
    different widths keep the statistics of X and Y.

    estimator "exact": feature-space statistics over the whole probe set; equals ``linear_cka``
    on the concatenated samples and does not depend on how the probe set is split into batches.
    estimator "unbiased": minibatch CKA with HSIC₁, one minibatch per ``update`` call; a minibatch
    with n ≤ 3 samples is skipped with a warning. Only measure "linear".

    backend "auto" uses the compiled engine depthfast._C when it is built (CPU: ATen/BLAS float32
    with shifted sums; CUDA: the kernels in csrc/*.cu) and the float64 reference (depthfast.cka.stats)
    otherwise; "reference" / "extension" force one. ``self.backend`` says which one runs. Under
    "auto", a device failure of the engine (a _C built for another GPU architecture: "no kernel image
    is available", or another CUDA launch error) switches this accumulator to the reference for good,
    with one notice on stderr per process: the statistics accumulated so far are converted to float64
    and the failed batch goes through the reference (launch failures leave the engine's state
    untouched, see csrc/cka.cpp), so the result equals an all-reference run. Under "extension" the
    failure is raised.
    Engine precision (docs/precision.md): each update's Grams in fp32 from operands shifted by the first batch's mean
    (16-bit inputs on CUDA stay 16-bit for the tensor cores, see tests/test_cka.py for the bounds;
    never TF32), added into float64 statistics (``engine._GRAM_ACCUM_DTYPE``); everything else float64.
    DEPTHFAST_CKA_SYRK=1 switches the CUDA exact Grams from cuBLAS upper blocks to the one-launch
    WMMA kernel (experimental, not yet run on a GPU).

    Reusing the base model's statistics along a training trajectory: after one full pass over the
    probe set, ``reset_tuned()`` forgets everything that depends on the tuned model and keeps the
    base model's XᵀX (exact) or Σ_b HSIC₁(K_b, K_b) (unbiased), which later passes no longer
    compute. Each later pass must feed the same probe batches (base activations included: the
    cross term needs them); ``compute`` checks sample counts and Σx and raises if they differ.
    """

    def __init__(self, num_layers: int, pooling: str = "token", estimator: str = "exact", backend: str = "auto") -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be ≥ 1; got {num_layers}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}")
        self.num_layers, self.pooling, self.estimator = num_layers, pooling, estimator
        self._ext = engine._resolve_backend(backend)
        self._forced = backend == "extension"
        self.backend = "reference" if self._ext is None else "extension"
        stats = _ExactLayerStats if estimator == "exact" else _UnbiasedLayerStats
        self._layers = [stats() for _ in range(num_layers)]
        self._groups = None  # engine: {(d1, d2, device): [layer, …]}, one engine call per group
        self.num_samples = 0

    def _check_counts(self, base_acts, tuned_acts) -> None:
        if len(base_acts) != self.num_layers or len(tuned_acts) != self.num_layers:
            raise ValueError(
                f"expected {self.num_layers} layers of activations; got {len(base_acts)} base and {len(tuned_acts)} tuned"
            )

    def update(
        self,
        base_acts: Sequence[torch.Tensor],
        tuned_acts: Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        self._check_counts(base_acts, tuned_acts)
        with ieee_fp32_matmul():
            if self._ext is not None and not self._forced and engine._is_broken(base_acts[0].device):
                self._fall_back()
            if self._ext is not None and all(t.dtype in engine._ENGINE_DTYPES for t in (*base_acts, *tuned_acts)):
                self._update_engine(base_acts, tuned_acts, attention_mask)
            else:
                self._update_reference(base_acts, tuned_acts, attention_mask)

    def _update_reference(self, base_acts, tuned_acts, attention_mask, skip=()) -> None:
        """float64 reference update of every layer not in ``skip`` (layers the engine already did)."""
        n = None
        for layer, (xb, yb) in enumerate(zip(base_acts, tuned_acts)):
            if layer in skip:
                continue
            x = pool_activations(xb, attention_mask, self.pooling)
            y = pool_activations(yb, attention_mask, self.pooling)
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"layer {layer}: base has {x.shape[0]} samples, tuned has {y.shape[0]}")
            n = x.shape[0]
            if self.estimator == "unbiased" and n <= 3:
                if layer == 0:
                    warnings.warn(f"unbiased CKA: skipped a minibatch of {n} ≤ 3 samples", stacklevel=3)
                continue
            if n > 0:
                self._layers[layer].update(x, y)
        self.num_samples += n or 0

    # --- compiled engine ------------------------------------------------------------------------
    def _update_engine(self, base_acts, tuned_acts, attention_mask) -> None:
        xs, ys, n, mask = engine._engine_inputs(base_acts, tuned_acts, attention_mask, self.pooling)
        if self.estimator == "unbiased" and n <= 3:
            warnings.warn(f"unbiased CKA: skipped a minibatch of {n} ≤ 3 samples", stacklevel=3)
            self.num_samples += n
            return
        if n == 0:
            return
        if self._groups is None:
            self._groups = {}
            for layer, (x, y) in enumerate(zip(xs, ys)):
                key = (x.shape[1], y.shape[1], x.device)
                self._groups.setdefault(key, []).append(layer)
        group_update = engine._exact_update if self.estimator == "exact" else engine._unbiased_update
        done: list[int] = []
        for (d1, d2, device), layers in self._groups.items():
            gx = [xs[i] for i in layers]
            gy = [ys[i] for i in layers]
            if any(t.shape[1] != d1 for t in gx) or any(t.shape[1] != d2 for t in gy):
                raise ValueError("activation width changed between updates of the same layer")
            if any(t.device != device for t in (*gx, *gy)):
                raise ValueError("activations moved to another device between updates")
            try:
                group_update(self._ext, [self._layers[i] for i in layers], gx, gy, mask, n)
            except RuntimeError as exc:
                if not engine._is_device_failure(exc):
                    raise
                if self._forced:
                    raise DepthfastError(f"the compiled CKA engine failed on {device} (backend='extension'; "
                                         f"'auto' would fall back to the reference): {exc}") from exc
                engine._mark_broken(device, exc)
                self._fall_back()
                # the groups done so far keep this batch; the failed one and the rest take the reference
                self._update_reference(base_acts, tuned_acts, attention_mask, skip=set(done))
                return
            done.extend(layers)
        self.num_samples += n

    def _fall_back(self) -> None:
        """Switch to the float64 reference for good, keeping the statistics so far (converted by
        ``engine._to_reference``)."""
        engine._to_reference(self._layers)
        self._ext = None
        self._groups = None
        self.backend = "reference"

    # --- results and reuse --------------------------------------------------------------------
    def compute(self, measure: str = "linear") -> torch.Tensor:
        with ieee_fp32_matmul():
            return self._compute(measure)

    def compute_change(self, measure: str = "linear") -> torch.Tensor:
        """The change per layer, float64 (num_layers,): 1 − CKA for "linear" and "debiased", d²_P for
        "procrustes". For layers of one width (d1 = d2) 1 − CKA is formed from the statistics of X and
        the change D = Y − X without subtracting from 1, so it keeps its relative precision at every
        magnitude (docs/precision.md); for different widths it is 1 − ``compute(measure)``."""
        with ieee_fp32_matmul():
            return self._compute(measure, change=True)

    def _compute(self, measure: str, change: bool = False) -> torch.Tensor:
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}; got {measure!r}")
        if self.estimator == "unbiased" and measure != "linear":
            raise ValueError(f"measure {measure!r} needs estimator='exact' (the unbiased estimator is minibatch CKA)")
        if self.estimator == "exact":
            for layer, s in enumerate(self._layers):
                if s.sx is None:
                    raise DepthfastError(f"layer {layer}: no probe samples were seen")
        if change:
            name = {"linear": "one_minus_cka", "debiased": "one_minus_debiased", "procrustes": "procrustes"}[measure]
        else:
            name = {"linear": "cka", "debiased": "debiased", "procrustes": "procrustes"}[measure]
        return torch.stack(
            [getattr(s, name)(layer).to(torch.float64).cpu() for layer, s in enumerate(self._layers)]
        )

    def reset_tuned(self) -> None:
        """Forget the tuned model's statistics; keep the base model's (see the class docstring)."""
        for layer, s in enumerate(self._layers):
            s.freeze_base(layer)
        self.num_samples = 0

