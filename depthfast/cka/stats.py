"""Per-layer CKA statistics that a stream of probe batches is summed into, and their float64 finish.

``_ExactLayerStats``: feature-space sums over the whole probe set (linear, debiased and Procrustes
from the same shifted sums). ``_UnbiasedLayerStats``: minibatch CKA, sums of HSIC₁ per minibatch.
Both are filled either by their own float64 ``update`` (the reference) or by the compiled engine
(depthfast.cka.engine, which lays the exact statistics of a width group out as stacked buffers);
``cka`` / ``debiased`` / ``procrustes`` always finish in float64.
"""

from __future__ import annotations

import torch

from depthfast.cka.reference import (
    _centered_change, _cka_ratio, _debiased_ratio, _hsic1_change_moments, _hsic1_from_moments, hsic1,
    linear_change_moments, one_minus_cka_from_change,
)
from depthfast.errors import DepthfastError

# Whether layers of one width accumulate the statistics of X and the change D = Y − X (the
# change-relative form: 1 − CKA exact relative to the change) instead of those of X and Y. Read when
# a layer's statistics are first filled; False is the old form, kept so benchmarks/bench_cka.py
# --accuracy and the tests can show the difference. Different widths always use the old form.
_CHANGE_FORM = True


def _mirror_upper_blocks(s: torch.Tensor, block: int) -> torch.Tensor:
    """Fill the strictly-lower block triangle of s (d, d) from the upper one (the engine computes
    only blocks i ≤ j of a symmetric XᵀX; ``block`` 0 means s is already full)."""
    if block <= 0 or block >= s.shape[0]:
        return s
    s = s.clone()
    d = s.shape[0]
    for i0 in range(0, d, block):
        for j0 in range(i0 + block, d, block):
            s[j0:j0 + block, i0:i0 + block] = s[i0:i0 + block, j0:j0 + block].T
    return s


def _cka_from_change(kk, km, mm, what: str) -> torch.Tensor:
    """CKA = (κ + μ) / sqrt(κ (κ + 2μ + ν)) from the moments of K and the change M, float64."""
    return _cka_ratio(kk + km, kk.sqrt(), (kk + 2.0 * km + mm).clamp_min(0.0).sqrt(), what=what)


class _ExactLayerStats:
    """Feature-space statistics of one layer, shifted by a reference mean.

    With c the first batch's column means and x' = x − c, k_i = ‖x'_i‖², l_i = ‖y'_i‖²:
        Sxx = Σ x'x'ᵀ,  Syy = Σ y'y'ᵀ,  Syx = Σ y'x'ᵀ,  sx = Σ x',  sy = Σ y',  n,
        vx = [Σ k_i x'_i, Σ l_i x'_i],  vy = [Σ l_i y'_i, Σ k_i y'_i],  sc = [Σk, Σl, Σkl, Σk², Σl²].
    Then Xcᵀ Xc = Sxx − sx sxᵀ / n (likewise for Yc, YcᵀXc). Because c is already close to the
    true mean, the subtracted term is small and the difference does not cancel catastrophically.
    The O(n·d) vectors vx, vy, sc give the debiased (HSIC₁) measure, which needs row norms.

    The reference ``update`` keeps everything in float64. The compiled engine fills the same
    fields (Grams: fp32 products per update summed in ``_GRAM_ACCUM_DTYPE`` = float64, only the upper
    blocks of Sxx/Syy: ``upper_block``); ``finish`` always
    combines them in float64.

    Change form (``change`` True: one width and ``_CHANGE_FORM``): the y-fields hold the change
    d = y − x instead, shifted by its own first-batch mean (d' = d − c_d), and l_i is replaced by the
    change of the Gram's diagonal m_i = 2x'_i·d'_i + ‖d'_i‖²:
        Syy = Σ d'd'ᵀ,  Syx = Σ d'x'ᵀ,  sy = Σ d',  vx = [Σ k x', Σ m x'],  vy = [Σ m d', Σ k d'],
        sc = [Σk, Σm, Σkm, Σk², Σm²].
    Every measure is then finished from X and D (``one_minus_cka_from_change``): the O(1) terms cancel
    algebraically and 1 − CKA carries an error relative to the change, not to 1.
    """

    def __init__(self) -> None:
        self.n = 0
        self.change = None  # set by the first update: whether y-fields hold the change D = Y − X
        self.shift_x = self.shift_y = None
        self.sxx = self.syy = self.syx = self.sx = self.sy = self.vx = self.vy = self.sc = None
        self.upper_block = 0
        self.frozen_n = None  # set by freeze_base(): Sxx is kept and no longer accumulated
        self.frozen_sx = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(torch.float64)
        y = y.to(torch.float64)
        if self.change is None:
            self.change = _CHANGE_FORM and x.shape[1] == y.shape[1]
        if self.change:
            if y.shape != x.shape:
                raise ValueError("activation width changed between updates of the same layer")
            y = y - x  # the change, formed in float64
        if self.shift_x is None:
            self.shift_x = x.mean(dim=0)
        if self.shift_y is None:
            self.shift_y = y.mean(dim=0)
        if self.sx is None:
            d1, d2 = x.shape[1], y.shape[1]
            new = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=x.device)  # noqa: E731
            if self.sxx is None:
                self.sxx = new(d1, d1)
            self.syy, self.syx = new(d2, d2), new(d2, d1)
            self.sx, self.sy, self.vx, self.vy, self.sc = new(d1), new(d2), new(2, d1), new(2, d2), new(5)
        elif x.shape[1] != self.sx.shape[0] or y.shape[1] != self.sy.shape[0]:
            raise ValueError("activation width changed between updates of the same layer")
        x = x - self.shift_x
        y = y - self.shift_y
        if self.frozen_n is None:
            self.sxx += x.T @ x
        self.syy += y.T @ y
        self.syx += y.T @ x
        self.sx += x.sum(dim=0)
        self.sy += y.sum(dim=0)
        k, l = (x * x).sum(dim=1), (y * y).sum(dim=1)
        if self.change:  # m_i = ‖x'_i + d'_i‖² − ‖x'_i‖², without the subtraction
            l = 2.0 * (x * y).sum(dim=1) + l
        self.vx += torch.stack([k, l]) @ x
        self.vy += torch.stack([l, k]) @ y
        self.sc += torch.stack([k.sum(), l.sum(), (k * l).sum(), (k * k).sum(), (l * l).sum()])
        self.n += x.shape[0]

    def freeze_base(self, layer: int) -> None:
        """Keep Sxx (the base model's only expensive statistic) and forget everything tuned."""
        if self.n < 2 and self.frozen_n is None:
            raise DepthfastError(f"layer {layer}: reset_tuned() needs a completed pass over the probe set first")
        if self.frozen_n is None:
            self.frozen_n, self.frozen_sx = self.n, self.sx.clone()
        self.shift_y = None
        for name in ("syy", "syx", "sx", "sy", "vx", "vy", "sc"):
            getattr(self, name).zero_()
        self.n = 0

    # --- float64 finishing --------------------------------------------------------------------
    def _check(self, layer: int, need: int) -> None:
        if self.n < need:
            raise DepthfastError(f"layer {layer}: this measure needs at least {need} probe samples; got {self.n}")
        if self.frozen_n is not None:
            same_n = self.n == self.frozen_n
            sx = self.sx.to(torch.float64)
            fsx = self.frozen_sx.to(torch.float64)
            scale = float(torch.linalg.norm(fsx)) + float(torch.diagonal(self.sxx).to(torch.float64).sum()) ** 0.5
            if not same_n or float(torch.linalg.norm(sx - fsx)) > 1e-4 * scale:
                raise DepthfastError(
                    f"layer {layer}: the base activations differ from those the kept base statistics were computed "
                    f"on ({self.n} samples now, {self.frozen_n} then); after reset_tuned() feed the same probe set"
                )

    def _f64(self):
        f = lambda t: t.to(torch.float64)  # noqa: E731
        return (f(_mirror_upper_blocks(self.sxx, self.upper_block)), f(_mirror_upper_blocks(self.syy, self.upper_block)),
                f(self.syx), f(self.sx), f(self.sy))

    def _centered(self):
        """Centered (XcᵀXc, YcᵀYc, YcᵀXc), float64; in the change form (A, C, B) = (X̃ᵀX̃, D̃ᵀD̃, D̃ᵀX̃)."""
        sxx, syy, syx, sx, sy = self._f64()
        n = float(self.n)
        return sxx - torch.outer(sx, sx) / n, syy - torch.outer(sy, sy) / n, syx - torch.outer(sy, sx) / n

    def _centered_xy(self):
        """Centered (XcᵀXc, YcᵀYc, YcᵀXc) in either form (change: YᵀX = A + B, YᵀY = A + B + Bᵀ + C)."""
        cxx, cyy, cyx = self._centered()
        if not self.change:
            return cxx, cyy, cyx
        yx = cxx + cyx
        return cxx, yx + cyx.T + cyy, yx

    def one_minus_cka(self, layer: int) -> torch.Tensor:
        """1 − linear CKA, float64: from (κ, μ, ν) of A, B, C in the change form (no subtraction from 1)."""
        self._check(layer, 2)
        if not self.change:
            return 1.0 - self.cka(layer)
        a_mat, c_mat, b_mat = self._centered()
        return one_minus_cka_from_change(*linear_change_moments(a_mat, b_mat, c_mat))

    def cka(self, layer: int) -> torch.Tensor:
        self._check(layer, 2)
        if self.change:
            a_mat, c_mat, b_mat = self._centered()
            return _cka_from_change(*linear_change_moments(a_mat, b_mat, c_mat), what=f"layer {layer}")
        cxx, cyy, cyx = self._centered()
        return _cka_ratio(
            torch.linalg.norm(cyx) ** 2, torch.linalg.norm(cxx), torch.linalg.norm(cyy), what=f"layer {layer}"
        )

    def _debiased_change_moments(self):
        """(HSIC₁(K,K), HSIC₁(K,M), HSIC₁(M,M)) from the shifted change-form sums (HSIC₁ ignores the
        shifts; it is bilinear, and M' = X'D'ᵀ + D'X'ᵀ + D'D'ᵀ is the change of the shifted Gram):
            ⟨K,M⟩ = 2⟨Sxx,Sdx⟩ + ‖Sdx‖²,  ‖M‖² = 2⟨Sxx,Sdd⟩ + ‖Sdx + Sdxᵀ + Sdd‖² − 2‖Sdx‖²,
            1ᵀM1 = 2 sx·sd + ‖sd‖²,  (M1)_i = x'_i·sd + d'_i·w (w = sx + sd),  diagonals k_i, m_i:
            1ᵀK̃M̃1 = sxᵀSxx sd + wᵀSdx sx − sd·Σk x' − w·Σk d' − sx·Σm x' + Σkm,
            1ᵀM̃M̃1 = sdᵀSxx sd + 2wᵀSdx sd + wᵀSdd w − 2(sd·Σm x' + w·Σm d') + Σm²."""
        sxx, sdd, sdx, sx, sd = self._f64()
        vx, vd, sc = self.vx.to(torch.float64), self.vy.to(torch.float64), self.sc.to(torch.float64)
        n = float(self.n)
        sum_k, sum_m, s_km, s_kk, s_mm = sc.unbind()
        w = sx + sd
        ksum, msum = sx @ sx - sum_k, 2.0 * (sx @ sd) + sd @ sd - sum_m
        g = sdx + sdx.T + sdd
        tr_kk = (sxx * sxx).sum() - s_kk
        tr_km = 2.0 * (sxx * sdx).sum() + (sdx * sdx).sum() - s_km
        tr_mm = 2.0 * (sxx * sdd).sum() + (g * g).sum() - 2.0 * (sdx * sdx).sum() - s_mm
        cross_kk = sx @ sxx @ sx - 2 * sx @ vx[0] + s_kk
        cross_km = sx @ sxx @ sd + w @ sdx @ sx - sd @ vx[0] - w @ vd[1] - sx @ vx[1] + s_km
        cross_mm = sd @ sxx @ sd + 2.0 * (w @ sdx @ sd) + w @ sdd @ w - 2.0 * (sd @ vx[1] + w @ vd[0]) + s_mm
        return (_hsic1_from_moments(n, tr_kk, ksum, ksum, cross_kk), _hsic1_from_moments(n, tr_km, ksum, msum, cross_km),
                _hsic1_from_moments(n, tr_mm, msum, msum, cross_mm))

    def one_minus_debiased(self, layer: int) -> torch.Tensor:
        """1 − debiased CKA, float64 (change form: from the HSIC₁ moments of K and M, no subtraction)."""
        self._check(layer, 4)
        if not self.change:
            return 1.0 - self.debiased(layer)
        return one_minus_cka_from_change(*self._debiased_change_moments())

    def debiased(self, layer: int) -> torch.Tensor:
        """HSIC₁ terms from shifted statistics (HSIC₁ ignores the shift; the terms do not):
            tr(K̃L̃) = ‖Syx‖²_F − Σk l,   1ᵀK̃1 = ‖sx‖² − Σk,
            1ᵀK̃L̃1 = Σ_i (x'_i·sx − k_i)(y'_i·sy − l_i) = syᵀSyx sx − sx·Σl x' − sy·Σk y' + Σk l."""
        self._check(layer, 4)
        if self.change:
            kk, km, mm = self._debiased_change_moments()
            return _debiased_ratio(kk + km, kk, kk + 2.0 * km + mm, what=f"layer {layer}")
        sxx, syy, syx, sx, sy = self._f64()
        vx, vy, sc = self.vx.to(torch.float64), self.vy.to(torch.float64), self.sc.to(torch.float64)
        n = float(self.n)
        sum_k, sum_l, s_kl, s_kk, s_ll = sc.unbind()
        ksum, lsum = sx @ sx - sum_k, sy @ sy - sum_l
        kl = _hsic1_from_moments(n, (syx * syx).sum() - s_kl, ksum, lsum, sy @ syx @ sx - sx @ vx[1] - sy @ vy[1] + s_kl)
        kk = _hsic1_from_moments(n, (sxx * sxx).sum() - s_kk, ksum, ksum, sx @ sxx @ sx - 2 * sx @ vx[0] + s_kk)
        ll = _hsic1_from_moments(n, (syy * syy).sum() - s_ll, lsum, lsum, sy @ syy @ sy - 2 * sy @ vy[0] + s_ll)
        return _debiased_ratio(kl, kk, ll, what=f"layer {layer}")

    def procrustes(self, layer: int) -> torch.Tensor:
        self._check(layer, 2)
        cxx, cyy, cyx = self._centered_xy()
        tx, ty = torch.trace(cxx), torch.trace(cyy)
        if tx <= 0 or ty <= 0:
            raise DepthfastError(f"layer {layer}: Procrustes distance is undefined (a representation has no variance)")
        return (2.0 - 2.0 * torch.linalg.svdvals(cyx).sum() / (tx * ty).sqrt()).clamp_min(0.0)


class _UnbiasedLayerStats:
    """Minibatch CKA (Nguyen, Raghu & Kornblith 2021): sums of HSIC₁ over minibatches.

        CKA = Σ_b HSIC₁(K_b, L_b) / sqrt(Σ_b HSIC₁(K_b, K_b) · Σ_b HSIC₁(L_b, L_b)),
    K_b = X_b X_bᵀ, L_b = Y_b Y_bᵀ. HSIC₁ is invariant to adding a constant row vector, so each
    minibatch is centered first: free, and it removes the offset before the products.

    Change form (``change`` True: one width and ``_CHANGE_FORM``): ``kl`` and ``ll`` hold
    μ = Σ_b HSIC₁(K_b, M_b) and ν = Σ_b HSIC₁(M_b, M_b) of the change M_b = L_b − K_b (HSIC₁ is
    bilinear) instead, and 1 − CKA is finished by ``one_minus_cka_from_change``.
    """

    def __init__(self) -> None:
        self.kl = self.kk = self.ll = 0.0
        self.change = None  # set by the first update
        self.sizes: list[int] = []  # samples per minibatch summed so far (its length: their count)
        self.frozen_sizes = None  # set by freeze_base(): Σ HSIC₁(K,K) is kept

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.change is None:
            self.change = _CHANGE_FORM and x.shape[1] == y.shape[1]
        if self.change:
            kk, kl, ll = (float(v) for v in _hsic1_change_moments(*_centered_change(x, y, min_samples=4)))
            self.add(kl, kk, ll, x.shape[0])
            return
        x = x.to(torch.float64)
        y = y.to(torch.float64)
        x = x - x.mean(dim=0, keepdim=True)
        y = y - y.mean(dim=0, keepdim=True)
        k, l = x @ x.T, y @ y.T
        self.add(float(hsic1(k, l)), float(hsic1(k, k)), float(hsic1(l, l)), x.shape[0])

    def add(self, kl: float, kk: float, ll: float, n: int) -> None:
        """Add one minibatch: (HSIC₁(K,L), HSIC₁(K,K), HSIC₁(L,L)), or (μ, κ, ν) in the change form."""
        self.kl += kl
        if self.frozen_sizes is None:
            self.kk += kk
        self.ll += ll
        self.sizes.append(n)

    def freeze_base(self, layer: int) -> None:
        if not self.sizes and self.frozen_sizes is None:
            raise DepthfastError(f"layer {layer}: reset_tuned() needs a completed pass over the probe set first")
        if self.frozen_sizes is None:
            self.frozen_sizes = list(self.sizes)
        self.kl = self.ll = 0.0
        self.sizes = []

    def _check(self, layer: int) -> None:
        if not self.sizes:
            raise DepthfastError(f"layer {layer}: no minibatch had more than 3 samples; unbiased CKA is undefined")
        if self.frozen_sizes is not None and self.sizes != self.frozen_sizes:
            raise DepthfastError(
                f"layer {layer}: after reset_tuned() feed the same minibatches as before "
                f"(sizes {self.sizes[:4]}… now, {self.frozen_sizes[:4]}… then)"
            )

    def _undefined(self, layer: int, denom: float) -> DepthfastError:
        return DepthfastError(
            f"layer {layer}: unbiased CKA is undefined (HSIC(K,K)·HSIC(L,L) = {denom:.3g} ≤ 0); "
            "use more probe samples per batch or the exact estimator"
        )

    def cka(self, layer: int) -> torch.Tensor:
        self._check(layer)
        if self.change:
            kk, km, mm = self.kk, self.kl, self.ll
            denom = kk * (kk + 2.0 * km + mm)
            if not denom > 0 or not kk > 0:
                raise self._undefined(layer, denom)
            return torch.tensor((kk + km) / denom**0.5, dtype=torch.float64)
        denom = self.kk * self.ll
        if denom <= 0:
            raise self._undefined(layer, denom)
        return torch.tensor(self.kl / denom**0.5, dtype=torch.float64)

    def one_minus_cka(self, layer: int) -> torch.Tensor:
        """1 − minibatch CKA, float64 (change form: from μ, κ, ν, no subtraction from 1)."""
        self._check(layer)
        if not self.change:
            return 1.0 - self.cka(layer)
        denom = self.kk * (self.kk + 2.0 * self.kl + self.ll)
        if not denom > 0 or not self.kk > 0:
            raise self._undefined(layer, denom)
        return one_minus_cka_from_change(self.kk, self.kl, self.ll)
