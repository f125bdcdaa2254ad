"""CKA of every layer of the base model against every layer of the tuned one (all layer pairs).

Minibatch CKA (Nguyen, Raghu & Kornblith 2021) for all (Lb+1)×(Lt+1) pairs at once: per probe
batch b of m samples, with X_i (m, d_i) the pooled activations of base layer i and Y_j (m, e_j)
those of tuned layer j, each centered over the batch (HSIC₁ ignores a constant row shift; centering
first keeps offsets out of the products):

    K_i = X_i X_iᵀ,  L_j = Y_j Y_jᵀ  (m, m);   K̃, L̃ = K, L with zeroed diagonal;
    HSIC₁(K, L) = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((m−1)(m−2)) − (2/(m−2)) 1ᵀK̃L̃1] / (m(m−3))   (Song et al. 2012)
    CKA_ij = Σ_b HSIC₁(K_i, L_j) / sqrt(Σ_b HSIC₁(K_i, K_i) · Σ_b HSIC₁(L_j, L_j)).

All pairs of one batch are GEMMs over the stacked Grams (K̃, L̃ symmetric):
    tr(K̃_i L̃_j)   = vec(K̃_i)·vec(L̃_j)        → (cb, m²) @ (m², ct)
    1ᵀK̃_i L̃_j 1   = (K̃_i 1)·(L̃_j 1)          → (cb, m)  @ (m, ct)
so a batch costs O((Lb+Lt)·m²·d + Lb·Lt·m²) and the memory does not depend on the number of probe
texts. Layers are taken in chunks (cb base, ct tuned) so that the float64 Grams held at once never
exceed ``max_gram_bytes``; when all base Grams do not fit, the tuned Grams are recomputed per base chunk.

The same terms in feature space (cheaper when the batch has more samples than the layers are wide,
e.g. token pooling: m = 4096 tokens, d = 384), with k_a = ‖x_a‖², l_a = ‖y_a‖², sx = X_iᵀ1:
    tr(K̃_i L̃_j) = ‖Y_jᵀ X_i‖²_F − k·l,   K̃_i 1 = X_i sx − k,   1ᵀK̃_i 1 = ‖sx‖² − Σk,
cost O(m·(Σd)(Σe) + m·(Σd² + Σe²)), memory one (Σe_chunk, d) product at a time. ``space="auto"``
takes the cheaper of the two per batch (``last_space`` says which ran).

The diagonal (i = j, same model family) equals ``StreamingCKA(estimator="unbiased")`` on the same
batches: the same estimator, one minibatch per ``update`` call. A diagonal pair of one width is
measured change-relative (depthfast.cka_change): with D = Y_i − X_i (formed in float64 from the
inputs, centered like X) and M = X̃D̃ᵀ + D̃X̃ᵀ + D̃D̃ᵀ (never L − K), it accumulates κ = Σ_b HSIC₁(K, K),
μ = Σ_b HSIC₁(K, M), ν = Σ_b HSIC₁(M, M) (HSIC₁ is bilinear) and finishes
    1 − CKA_ii = (κν − μ²) / (κ(κ + 2μ + ν)) / (1 + CKA_ii),
so a change of 1e-5 … 1e-8 keeps an error relative to itself, under fp32 products too. In sample
space M is one Gram [X̃ D̃]·[D̃ Ỹ]ᵀ (Ỹ = X̃ + D̃); in feature space, with A = X̃ᵀX̃, B = D̃ᵀX̃, C = D̃ᵀD̃,
m_a = M_aa = 2x̃_a·d̃_a + ‖d̃_a‖², sd = D̃ᵀ1:
    tr(K̃M̃) = 2⟨A,B⟩ + ‖B‖² − k·m,   tr(M̃M̃) = 2⟨A,C⟩ + ‖B + Bᵀ + C‖² − 2‖B‖² − m·m,
    M̃1 = X̃ sd + D̃ (sx + sd) − m,   1ᵀM̃1 = 2 sx·sd + ‖sd‖² − Σm.
Off-diagonal pairs (and a diagonal pair of two widths) keep the statistics above.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from typing import Sequence

import torch

from depthfast.artifacts import atomic_write_bytes, atomic_write_csv
from depthfast.cka import POOLINGS, ieee_fp32_matmul, pool_activations
from depthfast.cka.reference import _hsic1_from_moments
from depthfast.cka_change import one_minus_cka_from_moments
from depthfast.errors import DepthfastError

ESTIMATOR_LABEL = "unbiased minibatch HSIC₁ (Nguyen, Raghu & Kornblith 2021; Song et al. 2012)"
SMALL_BATCHES = ("error", "skip")
SPACES = ("auto", "sample", "feature")
DEFAULT_MAX_GRAM_BYTES = 1 << 30  # 1 GiB of float64 Grams: 16 Grams of m = 2896 samples


class AllPairsCKA:
    """Minibatch CKA matrix between every base layer i and every tuned layer j.

    update(base_acts, tuned_acts, attention_mask=None): sequences of num_base / num_tuned tensors
    (batch, seq, d) — or (m, d) samples — of the same inputs; attention_mask (batch, seq), 1 = real
    token. Pooling as in StreamingCKA: "token" (every real token a sample) or "mean" (one sample per
    text, the mean over its real tokens). Each call is one minibatch of m samples.
    compute() → float64 (num_base, num_tuned), CKA_ij as in the module docstring.

    gram_dtype: dtype of the Gram products X Xᵀ. None: float64 on the CPU, float32 on other devices
    (IEEE fp32, never TF32; operands are centered in float64 first). Every sum after the products
    (moments, pair products, accumulation over batches) is float64.
    max_gram_bytes: bound on the float64 Grams (8·m² bytes each) held at once; at least two must fit
    (besides them: one transient fp32 Gram under float32 products, and one layer's centered samples).
    In feature space it bounds the (Σe_chunk, d) cross products instead (besides the centered samples).
    space: "sample" (Grams), "feature" (d×e products) or "auto" (the one with fewer flops per batch).
    small_batches: a batch with m ≤ 3 samples (HSIC₁ undefined) raises a DepthfastError ("error") or is
    skipped with a warning ("skip", what StreamingCKA does, so the diagonal stays its profile).
    """

    def __init__(self, num_base: int, num_tuned: int | None = None, pooling: str = "token",
                 gram_dtype: torch.dtype | None = None, max_gram_bytes: int = DEFAULT_MAX_GRAM_BYTES,
                 small_batches: str = "error", space: str = "auto") -> None:
        num_tuned = num_base if num_tuned is None else num_tuned
        if num_base < 1 or num_tuned < 1:
            raise ValueError(f"need at least one layer per model; got {num_base} base and {num_tuned} tuned")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
        if gram_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"gram_dtype must be None, torch.float32 or torch.float64; got {gram_dtype}")
        if small_batches not in SMALL_BATCHES:
            raise ValueError(f"small_batches must be one of {SMALL_BATCHES}; got {small_batches!r}")
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}; got {space!r}")
        self.num_base, self.num_tuned, self.pooling, self.space = num_base, num_tuned, pooling, space
        self.last_space: str | None = None
        self.gram_dtype, self.max_gram_bytes, self.small_batches = gram_dtype, int(max_gram_bytes), small_batches
        self.kl = torch.zeros(num_base, num_tuned, dtype=torch.float64)
        self.kk = torch.zeros(num_base, dtype=torch.float64)
        self.ll = torch.zeros(num_tuned, dtype=torch.float64)
        diagonal = min(num_base, num_tuned)
        self.km = torch.zeros(diagonal, dtype=torch.float64)  # Σ_b HSIC₁(K_i, M_i), M_i = L_i − K_i
        self.mm = torch.zeros(diagonal, dtype=torch.float64)  # Σ_b HSIC₁(M_i, M_i)
        self.change_batches = torch.zeros(diagonal, dtype=torch.long)  # batches whose pair (i, i) had one width
        self.batches = 0
        self.num_samples = 0

    # --- one minibatch --------------------------------------------------------------------------
    def update(self, base_acts: Sequence[torch.Tensor], tuned_acts: Sequence[torch.Tensor],
               attention_mask: torch.Tensor | None = None) -> None:
        if len(base_acts) != self.num_base or len(tuned_acts) != self.num_tuned:
            raise ValueError(f"expected {self.num_base} base and {self.num_tuned} tuned layers of activations; "
                             f"got {len(base_acts)} and {len(tuned_acts)}")
        xs = [pool_activations(a.detach(), attention_mask, self.pooling) for a in base_acts]
        ys = [pool_activations(a.detach(), attention_mask, self.pooling) for a in tuned_acts]
        sizes = {t.shape[0] for t in (*xs, *ys)}
        if len(sizes) != 1:
            raise ValueError(f"every layer of both models needs the same samples; got sample counts {sorted(sizes)}")
        m = sizes.pop()
        if m <= 3:
            message = f"all-pairs CKA: a probe batch has {m} samples; the unbiased HSIC₁ needs at least 4"
            if self.small_batches == "error":
                raise DepthfastError(message + " (use larger probe batches)")
            warnings.warn(message + "; skipped", stacklevel=2)
            return
        diagonal = [i for i in range(min(self.num_base, self.num_tuned)) if xs[i].shape[1] == ys[i].shape[1]]
        space = self.space
        if space == "auto":  # the change terms of the diagonal: two more products of width d_i each
            db, dt = [x.shape[1] for x in xs], [y.shape[1] for y in ys]
            sample = m * m * (sum(db) + sum(dt) + len(db) * len(dt) + sum(2 * db[i] + 2 for i in diagonal))
            feature = m * (sum(db) * sum(dt) + sum(d * d for d in db) + sum(e * e for e in dt)
                           + sum(2 * db[i] * db[i] for i in diagonal))
            space = "feature" if feature < sample else "sample"
        with ieee_fp32_matmul():
            (self._update_feature if space == "feature" else self._update_sample)(xs, ys, m, diagonal)
        self.change_batches[diagonal] += 1
        self.last_space = space
        self.batches += 1
        self.num_samples += m

    def _dtype(self, device: torch.device) -> torch.dtype:
        return self.gram_dtype or (torch.float64 if device.type == "cpu" else torch.float32)

    def _update_sample(self, xs, ys, m: int, diagonal: list[int]) -> None:
        gram_bytes = 8 * m * m
        capacity = self.max_gram_bytes // gram_bytes
        if capacity < 2:
            raise DepthfastError(
                f"all-pairs CKA: two {m}×{m} float64 Grams ({2 * gram_bytes / 2**20:.0f} MiB) exceed the budget of "
                f"{self.max_gram_bytes / 2**20:.0f} MiB; use smaller probe batches or a larger max_gram_bytes")
        cb = min(self.num_base, capacity - 1)
        ct = min(self.num_tuned, capacity - cb)
        for b0 in range(0, self.num_base, cb):
            k, k_rows, k_sum = self._grams(xs[b0:b0 + cb])
            self.kk[b0:b0 + cb] += self._self_hsic(m, k, k_rows, k_sum)
            for t0 in range(0, self.num_tuned, ct):
                l, l_rows, l_sum = self._grams(ys[t0:t0 + ct])
                if b0 == 0:
                    self.ll[t0:t0 + ct] += self._self_hsic(m, l, l_rows, l_sum)
                trace = k.flatten(1) @ l.flatten(1).T  # (cb, ct) = tr(K̃_i L̃_j), K̃, L̃ symmetric
                cross = k_rows @ l_rows.T  # (cb, ct) = 1ᵀK̃_i L̃_j 1
                hsic = _hsic1_from_moments(m, trace, k_sum[:, None], l_sum[None, :], cross)
                self.kl[b0:b0 + cb, t0:t0 + ct] += hsic.cpu()
                del l
            for i in [i for i in diagonal if b0 <= i < b0 + cb]:  # the tuned chunk is freed: one Gram fits
                change, c_rows, c_sum = self._change_gram(xs[i], ys[i])
                trace = k[i - b0].flatten() @ change.flatten()  # tr(K̃M̃), K̃ symmetric
                self.km[i] += _hsic1_from_moments(m, trace, k_sum[i - b0], c_sum, k_rows[i - b0] @ c_rows).cpu()
                self.mm[i] += self._self_hsic(m, change[None], c_rows[None], c_sum[None])[0]
                del change
            del k

    def _features(self, a: torch.Tensor):
        """Centered samples in the product dtype, k = row norms², K̃1 (m,), 1ᵀK̃1, HSIC₁(K, K) — float64."""
        a64 = a.to(torch.float64)
        a64 = a64 - a64.mean(dim=0, keepdim=True)
        c = a64.to(self._dtype(a.device))
        k = (a64 * a64).sum(dim=1)
        s = a64.sum(dim=0)  # ≈ 0 after centering; kept so the identities hold exactly
        rows, total = a64 @ s - k, s @ s - k.sum()
        gram = (c.T @ c).to(torch.float64)  # (d, d) = XᵀX
        self_hsic = _hsic1_from_moments(a.shape[0], (gram * gram).sum() - k @ k, total, total, rows @ rows)
        return c, k, rows, total, self_hsic, gram

    def _change_features(self, x: torch.Tensor, y: torch.Tensor, a_mat: torch.Tensor):
        """(HSIC₁(K, M), HSIC₁(M, M)) float64 of one diagonal pair in feature space (module docstring),
        a_mat = X̃ᵀX̃ (d, d) float64 as ``_features`` formed it."""
        m = x.shape[0]
        x64, d64 = _centered_change(x, y)
        dtype = self._dtype(x.device)
        xc, dc = x64.to(dtype), d64.to(dtype)
        b_mat = (dc.T @ xc).to(torch.float64)  # D̃ᵀX̃
        c_mat = (dc.T @ dc).to(torch.float64)  # D̃ᵀD̃
        k = (x64 * x64).sum(dim=1)
        diag = 2.0 * (x64 * d64).sum(dim=1) + (d64 * d64).sum(dim=1)  # m_a = M_aa
        sx, sd = x64.sum(dim=0), d64.sum(dim=0)  # ≈ 0 after centering; kept so the identities hold exactly
        k_rows, k_total = x64 @ sx - k, sx @ sx - k.sum()
        m_rows = x64 @ sd + d64 @ (sx + sd) - diag
        m_total = 2.0 * (sx @ sd) + sd @ sd - diag.sum()
        p, q, r = (a_mat * b_mat).sum(), (b_mat * b_mat).sum(), (a_mat * c_mat).sum()
        g = b_mat + b_mat.T + c_mat
        km = _hsic1_from_moments(m, 2.0 * p + q - k @ diag, k_total, m_total, k_rows @ m_rows)
        mm = _hsic1_from_moments(m, 2.0 * r + (g * g).sum() - 2.0 * q - diag @ diag, m_total, m_total, m_rows @ m_rows)
        return km, mm

    def _update_feature(self, xs, ys, m: int, diagonal: list[int]) -> None:
        d_max = max(x.shape[1] for x in xs)
        tuned = [self._features(y) for y in ys]
        self.ll += torch.stack([t[4] for t in tuned]).cpu()
        chunks, start, width = [], 0, 0  # tuned layers grouped so that (Σe, d_max) float64 fits the budget
        for j, y in enumerate(ys):
            e = y.shape[1]
            if 8 * e * d_max > self.max_gram_bytes:
                raise DepthfastError(f"all-pairs CKA: one {e}×{d_max} float64 cross product exceeds the budget of "
                                     f"{self.max_gram_bytes / 2**20:.0f} MiB; raise max_gram_bytes")
            if width and 8 * (width + e) * d_max > self.max_gram_bytes:
                chunks.append((start, j))
                start, width = j, 0
            width += e
        chunks.append((start, len(ys)))
        stacks = [torch.cat([tuned[j][0] for j in range(t0, t1)], dim=1) for t0, t1 in chunks]
        l_norms = torch.stack([t[1] for t in tuned])  # (Lt, m)
        l_rows = torch.stack([t[2] for t in tuned])
        l_sum = torch.stack([t[3] for t in tuned])
        for i, x in enumerate(xs):
            c, k, k_rows, k_sum, self_hsic, a_mat = self._features(x)
            self.kk[i] += self_hsic.cpu()
            if i in diagonal:
                km, mm = self._change_features(x, ys[i], a_mat)
                self.km[i] += km.cpu()
                self.mm[i] += mm.cpu()
            del a_mat
            norms = []
            for (t0, t1), stack in zip(chunks, stacks):
                prod = (stack.T @ c).to(torch.float64)  # (Σe, d): every Y_jᵀ X_i of the chunk
                sq = (prod * prod).sum(dim=1)
                norms += [part.sum() for part in sq.split([tuned[j][0].shape[1] for j in range(t0, t1)])]
            trace = torch.stack(norms) - l_norms @ k  # tr(K̃_i L̃_j) = ‖Y_jᵀX_i‖²_F − k·l
            hsic = _hsic1_from_moments(m, trace, k_sum, l_sum, l_rows @ k_rows)
            self.kl[i] += hsic.cpu()

    def _grams(self, acts: list[torch.Tensor]):
        """(c, m, m) float64 Grams K̃ (zeroed diagonal) of centered acts, their row sums (c, m), totals (c,)."""
        m, device = acts[0].shape[0], acts[0].device
        dtype = self._dtype(device)
        grams = torch.empty(len(acts), m, m, dtype=torch.float64, device=device)
        for g, a in zip(grams, acts):
            a = a.to(torch.float64)
            a = (a - a.mean(dim=0, keepdim=True)).to(dtype)
            if dtype == torch.float64:
                torch.mm(a, a.T, out=g)  # straight into the stack: no transient Gram
            else:
                g.copy_(a @ a.T)  # fp32 product, widened to float64 before any sum
        grams.diagonal(dim1=-2, dim2=-1).zero_()
        rows = grams.sum(dim=-1)
        return grams, rows, rows.sum(dim=-1)

    def _change_gram(self, x: torch.Tensor, y: torch.Tensor):
        """M̃ (m, m) float64 (zeroed diagonal) of one diagonal pair, M = [X̃ D̃]·[D̃ Ỹ]ᵀ = X̃D̃ᵀ + D̃X̃ᵀ + D̃D̃ᵀ
        from the float64-centered X̃ and D̃ (one product of width 2d in the product dtype), its row
        sums (m,) and total. Symmetric up to product roundoff, which is relative to the change."""
        x64, d64 = _centered_change(x, y)
        dtype = self._dtype(x.device)
        left = torch.cat([x64, d64], dim=1).to(dtype)
        right = torch.cat([d64, x64 + d64], dim=1).to(dtype)
        change = (left @ right.T).to(torch.float64)
        del left, right
        change.diagonal().zero_()
        rows = change.sum(dim=-1)
        return change, rows, rows.sum()

    @staticmethod
    def _self_hsic(m: int, grams: torch.Tensor, rows: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        flat = grams.flatten(1)
        trace = torch.stack([f @ f for f in flat])  # ‖K̃‖²_F without a (c, m²) temporary
        return _hsic1_from_moments(m, trace, total, total, (rows * rows).sum(dim=-1)).cpu()

    # --- result ---------------------------------------------------------------------------------
    def compute(self) -> torch.Tensor:
        """float64 (num_base, num_tuned) CKA matrix; a DepthfastError if a layer has no usable statistics.
        Off-diagonal: Σh_kl / sqrt(Σh_kk Σh_ll); the change-relative diagonal: 1 − ``one_minus_cka``'s."""
        self._check()
        matrix = self.kl / torch.sqrt(self.kk[:, None] * self.ll[None, :])
        diagonal = self._change_diagonal()
        matrix[diagonal, diagonal] = 1.0 - self._diagonal_change(diagonal)
        return matrix

    def one_minus_cka(self) -> torch.Tensor:
        """float64 (num_base, num_tuned) 1 − CKA_ij, the diagonal pairs of one width change-relative (no
        subtraction from 1: module docstring), every other pair 1 − ``compute``'s. Errors as ``compute``."""
        self._check()
        change = 1.0 - self.kl / torch.sqrt(self.kk[:, None] * self.ll[None, :])
        diagonal = self._change_diagonal()
        change[diagonal, diagonal] = self._diagonal_change(diagonal)
        return change

    def _change_diagonal(self) -> torch.Tensor:
        """Indices i whose pair (i, i) had one width in every batch (so κ, μ, ν cover every batch)."""
        return torch.nonzero(self.change_batches == self.batches).flatten()

    def _diagonal_change(self, diagonal: torch.Tensor) -> torch.Tensor:
        return one_minus_cka_from_moments(self.kk[diagonal], self.km[diagonal], self.mm[diagonal])

    def _check(self) -> None:
        if self.batches == 0:
            raise DepthfastError("all-pairs CKA: no probe batch with at least 4 samples was seen")
        for name, self_terms in (("base", self.kk), ("tuned", self.ll)):
            bad = [i for i, v in enumerate(self_terms.tolist()) if not (math.isfinite(v) and v > 0)]
            if bad:
                raise DepthfastError(f"all-pairs CKA: {name} layer {bad[0]} has Σ HSIC₁(K, K) = "
                                     f"{float(self_terms[bad[0]]):.3g} ≤ 0 (no variance across samples); "
                                     "use more probe samples per batch")


def _centered_change(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X̃ and D̃ = (Y − X)~ (m, d) in float64, each with its column mean removed (before any product)."""
    x64 = x.to(torch.float64)
    d64 = y.to(torch.float64) - x64
    return x64 - x64.mean(dim=0, keepdim=True), d64 - d64.mean(dim=0, keepdim=True)


def write_all_pairs(out_dir: str, matrix: torch.Tensor, base_names: Sequence[str], tuned_names: Sequence[str],
                    title: str | None = None) -> dict[str, str]:
    """Write ``all_pairs.csv`` (rows: base layers, columns: tuned layers; non-finite cells empty) and
    ``all_pairs.png`` (heatmap, diagonal marked: the depth profile's layer-ℓ-against-ℓ CKA) into
    ``out_dir``, each atomically. Returns {"csv": name, "png": name}."""
    matrix = torch.as_tensor(matrix, dtype=torch.float64).cpu()
    if matrix.shape != (len(base_names), len(tuned_names)):
        raise ValueError(f"matrix shape {tuple(matrix.shape)} does not match {len(base_names)} base × "
                         f"{len(tuned_names)} tuned layer names")
    cell = lambda v: repr(v) if math.isfinite(v) else ""  # noqa: E731
    atomic_write_csv(os.path.join(out_dir, "all_pairs.csv"), ["base \\ tuned", *tuned_names],
                     [[name, *(cell(v) for v in row)] for name, row in zip(base_names, matrix.tolist())])
    atomic_write_bytes(os.path.join(out_dir, "all_pairs.png"), _heatmap_png(matrix, base_names, tuned_names, title))
    return {"csv": "all_pairs.csv", "png": "all_pairs.png"}


def record_all_pairs(out_dir: str, pairs: AllPairsCKA, base_names: Sequence[str], tuned_names: Sequence[str],
                     title: str, pooling: str, profile_estimator: str) -> dict:
    """all_pairs.csv/.png into ``out_dir`` (write_all_pairs); returns results.json's "all_pairs" entry:
    the files, this estimator, the pooling, batch and sample counts, and whether the diagonal is the
    profile (it is when the profile's own estimator is "unbiased")."""
    files = write_all_pairs(out_dir, pairs.compute(), base_names, tuned_names, title=title)
    return {**files, "estimator": ESTIMATOR_LABEL, "pooling": pooling, "batches": pairs.batches,
            "samples": pairs.num_samples, "diagonal_is_profile": profile_estimator == "unbiased"}


def _heatmap_png(matrix: torch.Tensor, base_names, tuned_names, title) -> bytes:
    import matplotlib  # here: figures only (the API layer does not import depthfast.plotting)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nb, nt = matrix.shape
    fig, ax = plt.subplots(figsize=(4.2 + 0.55 * nt, 3.0 + 0.45 * nb), dpi=120)
    finite = matrix[torch.isfinite(matrix)]
    # colour range of the data, not [0, 1]: after fine-tuning most pairs sit within 1e-3 of 1
    low, high = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    image = ax.imshow(matrix.numpy(), origin="lower", cmap="viridis", aspect="auto",
                      vmin=low, vmax=high if high > low else low + 1e-12)
    if nb * nt <= 144:  # small enough to read: every cell's 1 − CKA
        for i in range(nb):
            for j in range(nt):
                v = float(matrix[i, j])
                ax.text(j, i, f"{1 - v:.1e}" if math.isfinite(v) else "n/a", ha="center", va="center",
                        fontsize=6, color="white" if v < (low + high) / 2 else "black")
    diag = min(nb, nt)
    ax.plot(range(diag), range(diag), "s", markersize=14, markerfacecolor="none", markeredgecolor="red",
            markeredgewidth=1.2)
    ax.set_xticks(range(nt), tuned_names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(nb), base_names, fontsize=7)
    ax.set_xlabel("tuned model θ_T layer")
    ax.set_ylabel("base model θ₀ layer")
    fig.colorbar(image, ax=ax, label="CKA (unbiased minibatch)")
    ax.set_title(f"{title or 'CKA of every layer pair'}\ncells: 1 − CKA; red squares: the diagonal = the depth profile",
                 fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
