"""Centered kernel alignment (CKA): plain-PyTorch references and the streaming accumulator.

Linear CKA between activations X (n, d1) and Y (n, d2) of the same n probe samples:

    CKA(X, Y) = ‖Ycᵀ Xc‖²_F / (‖Xcᵀ Xc‖_F · ‖Ycᵀ Yc‖_F),    Xc = X − 1 μₓᵀ,  Yc = Y − 1 μᵧᵀ.

Representational change of a layer is 1 − CKA(H(θ₀), H(θ_T)).

Everything here is ground truth for the compiled engine (``csrc/``): computed in float64, with
centering that stays exact when activations carry offsets of 1e3–1e5 ("massive activations").
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from depthfast.errors import DepthfastError

POOLINGS = ("token", "mean")
ESTIMATORS = ("exact", "unbiased")


def _as_float64_2d(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (n, d); got shape {tuple(t.shape)}")
    return t.detach().to(torch.float64)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA of x (n, d1) and y (n, d2), as a float64 scalar tensor.

    Columns are centered in float64 before any product, so offsets do not cancel. Works in
    feature space (d×d products) or sample space (n×n Grams), whichever is smaller; the two
    are the same quantity since ‖YcᵀXc‖²_F = tr(Xc Xcᵀ Yc Ycᵀ).
    """
    x = _as_float64_2d("x", x)
    y = _as_float64_2d("y", y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of samples; got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < 2:
        raise ValueError(f"CKA needs at least 2 samples; got {x.shape[0]}")
    xc = x - x.mean(dim=0, keepdim=True)
    yc = y - y.mean(dim=0, keepdim=True)
    n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
    if n < max(d1, d2):
        k, l = xc @ xc.T, yc @ yc.T
        cross, xx, yy = (k * l).sum(), torch.linalg.norm(k), torch.linalg.norm(l)
    else:
        cross = torch.linalg.norm(yc.T @ xc) ** 2
        xx, yy = torch.linalg.norm(xc.T @ xc), torch.linalg.norm(yc.T @ yc)
    return _cka_ratio(cross, xx, yy, what="linear_cka")


def _cka_ratio(cross: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor, what: str) -> torch.Tensor:
    denom = xx * yy
    if not torch.isfinite(denom) or denom <= 0:
        raise DepthfastError(
            f"{what}: CKA is undefined because one representation has no variance across samples"
        )
    return cross / denom


def hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator of Song et al. (2012) for Gram matrices k, l (n, n), n > 3.

    With K̃, L̃ = K, L with zeroed diagonal:
        HSIC₁ = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − (2/(n−2)) 1ᵀK̃L̃1] / (n(n−3)).
    Computed in float64. It can be slightly negative.
    """
    n = k.shape[0]
    if k.shape != (n, n) or l.shape != (n, n):
        raise ValueError(f"hsic1 needs two (n, n) matrices; got {tuple(k.shape)} and {tuple(l.shape)}")
    if n <= 3:
        raise ValueError(f"hsic1 is undefined for n ≤ 3 samples; got n = {n}")
    k = k.to(torch.float64).clone()
    l = l.to(torch.float64).clone()
    k.fill_diagonal_(0.0)
    l.fill_diagonal_(0.0)
    trace = (k * l.T).sum()
    sum_k, sum_l = k.sum(), l.sum()
    cross = (k.sum(dim=0) * l.sum(dim=1)).sum()  # 1ᵀ K̃ L̃ 1
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (n * (n - 3))


def pool_activations(acts: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Turn one layer's activations into samples (n, d).

    acts: (batch, seq, d), or already (n, d) samples. attention_mask: (batch, seq), 1 = real token.
    "token": every real token is a sample. "mean": the mean over each sequence's real tokens.
    Padding never counts as a sample.
    """
    if acts.dim() == 2:
        return acts
    if acts.dim() != 3:
        raise ValueError(f"activations must be (batch, seq, d) or (n, d); got shape {tuple(acts.shape)}")
    if attention_mask is None:
        mask = torch.ones(acts.shape[:2], dtype=torch.bool, device=acts.device)
    else:
        if attention_mask.shape != acts.shape[:2]:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match activations {tuple(acts.shape[:2])}"
            )
        mask = attention_mask.to(device=acts.device).bool()
    if pooling == "token":
        return acts[mask]
    counts = mask.sum(dim=1)
    keep = counts > 0
    weights = mask.to(torch.float64).unsqueeze(-1)
    summed = (acts.to(torch.float64) * weights).sum(dim=1)
    return (summed[keep] / counts[keep].unsqueeze(-1).to(torch.float64))


class _ExactLayerStats:
    """Feature-space statistics of one layer, shifted by a reference mean and kept in float64.

    With c the first batch's column means and x' = x − c:
        Sxx = Σ x'x'ᵀ,  Syy = Σ y'y'ᵀ,  Syx = Σ y'x'ᵀ,  sx = Σ x',  sy = Σ y',  n.
    Then Xcᵀ Xc = Sxx − sx sxᵀ / n (likewise for Yc, YcᵀXc). Because c is already close to the
    true mean, the subtracted term is small and the difference does not cancel catastrophically.
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift_x = self.shift_y = None
        self.sxx = self.syy = self.syx = self.sx = self.sy = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(torch.float64)
        y = y.to(torch.float64)
        if self.shift_x is None:
            self.shift_x, self.shift_y = x.mean(dim=0), y.mean(dim=0)
            d1, d2 = x.shape[1], y.shape[1]
            new = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=x.device)  # noqa: E731
            self.sxx, self.syy, self.syx = new(d1, d1), new(d2, d2), new(d2, d1)
            self.sx, self.sy = new(d1), new(d2)
        elif x.shape[1] != self.sx.shape[0] or y.shape[1] != self.sy.shape[0]:
            raise ValueError("activation width changed between updates of the same layer")
        x = x - self.shift_x
        y = y - self.shift_y
        self.sxx += x.T @ x
        self.syy += y.T @ y
        self.syx += y.T @ x
        self.sx += x.sum(dim=0)
        self.sy += y.sum(dim=0)
        self.n += x.shape[0]

    def cka(self, layer: int) -> torch.Tensor:
        if self.n < 2:
            raise DepthfastError(f"layer {layer}: CKA needs at least 2 probe samples; got {self.n}")
        n = float(self.n)
        cxx = self.sxx - torch.outer(self.sx, self.sx) / n
        cyy = self.syy - torch.outer(self.sy, self.sy) / n
        cyx = self.syx - torch.outer(self.sy, self.sx) / n
        return _cka_ratio(
            torch.linalg.norm(cyx) ** 2, torch.linalg.norm(cxx), torch.linalg.norm(cyy), what=f"layer {layer}"
        )


class _UnbiasedLayerStats:
    """Minibatch CKA (Nguyen, Raghu & Kornblith 2021): sums of HSIC₁ over minibatches.

        CKA = Σ_b HSIC₁(K_b, L_b) / sqrt(Σ_b HSIC₁(K_b, K_b) · Σ_b HSIC₁(L_b, L_b)),
    K_b = X_b X_bᵀ, L_b = Y_b Y_bᵀ. HSIC₁ is invariant to adding a constant row vector, so each
    minibatch is centered first: free, and it removes the offset before the products.
    """

    def __init__(self) -> None:
        self.kl = self.kk = self.ll = 0.0
        self.batches = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(torch.float64)
        y = y.to(torch.float64)
        x = x - x.mean(dim=0, keepdim=True)
        y = y - y.mean(dim=0, keepdim=True)
        k, l = x @ x.T, y @ y.T
        self.kl += float(hsic1(k, l))
        self.kk += float(hsic1(k, k))
        self.ll += float(hsic1(l, l))
        self.batches += 1

    def cka(self, layer: int) -> torch.Tensor:
        if self.batches == 0:
            raise DepthfastError(f"layer {layer}: no minibatch had more than 3 samples; unbiased CKA is undefined")
        denom = self.kk * self.ll
        if denom <= 0:
            raise DepthfastError(
                f"layer {layer}: unbiased CKA is undefined (HSIC(K,K)·HSIC(L,L) = {denom:.3g} ≤ 0); "
                "use more probe samples per batch or the exact estimator"
            )
        return torch.tensor(self.kl / denom**0.5, dtype=torch.float64)


class StreamingCKA:
    """Per-layer CKA between a base and a tuned model, accumulated over probe batches.

    update(base_acts, tuned_acts, attention_mask=None): each a sequence of num_layers tensors
    (batch, seq, d_ℓ) — or (n, d_ℓ) samples — of the same inputs; attention_mask (batch, seq).
    compute() → float64 tensor (num_layers,) of CKA.

    estimator "exact": feature-space statistics over the whole probe set; equals ``linear_cka``
    on the concatenated samples and does not depend on how the probe set is split into batches.
    estimator "unbiased": minibatch CKA with HSIC₁, one minibatch per ``update`` call; a minibatch
    with n ≤ 3 samples is skipped with a warning.
    """

    def __init__(self, num_layers: int, pooling: str = "token", estimator: str = "exact") -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be ≥ 1; got {num_layers}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}")
        self.num_layers, self.pooling, self.estimator = num_layers, pooling, estimator
        stats = _ExactLayerStats if estimator == "exact" else _UnbiasedLayerStats
        self._layers = [stats() for _ in range(num_layers)]
        self.num_samples = 0

    def update(
        self,
        base_acts: Sequence[torch.Tensor],
        tuned_acts: Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        if len(base_acts) != self.num_layers or len(tuned_acts) != self.num_layers:
            raise ValueError(
                f"expected {self.num_layers} layers of activations; got {len(base_acts)} base and {len(tuned_acts)} tuned"
            )
        n = None
        for layer, (xb, yb) in enumerate(zip(base_acts, tuned_acts)):
            x = pool_activations(xb, attention_mask, self.pooling)
            y = pool_activations(yb, attention_mask, self.pooling)
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"layer {layer}: base has {x.shape[0]} samples, tuned has {y.shape[0]}")
            n = x.shape[0]
            if self.estimator == "unbiased" and n <= 3:
                if layer == 0:
                    warnings.warn(f"unbiased CKA: skipped a minibatch of {n} ≤ 3 samples", stacklevel=2)
                continue
            if n > 0:
                self._layers[layer].update(x, y)
        self.num_samples += n or 0

    def compute(self) -> torch.Tensor:
        return torch.stack([stats.cka(layer) for layer, stats in enumerate(self._layers)]).to(torch.float64)
