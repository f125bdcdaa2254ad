"""Centered kernel alignment (CKA): plain-PyTorch references and the streaming accumulator.

Linear CKA between activations X (n, d1) and Y (n, d2) of the same n probe samples:

    CKA(X, Y) = ‖Ycᵀ Xc‖²_F / (‖Xcᵀ Xc‖_F · ‖Ycᵀ Yc‖_F),    Xc = X − 1 μₓᵀ,  Yc = Y − 1 μᵧᵀ.

Representational change of a layer is 1 − CKA(H(θ₀), H(θ_T)).

Other measures from the same centered statistics (float64 references):
    debiased linear CKA (Kornblith et al. 2019): HSIC₁(K,L) / sqrt(HSIC₁(K,K)·HSIC₁(L,L)), K = XcXcᵀ;
    orthogonal Procrustes distance: d²_P = 2 − 2‖ŶᵀX̂‖_*, X̂ = Xc/‖Xc‖_F, Ŷ = Yc/‖Yc‖_F.

Public API (import from ``depthfast.cka``):
    linear_cka(x, y), debiased_cka(x, y), procrustes_distance(x, y)   float64 scalars (ground truth)
    linear_cka_change(x, y), debiased_cka_change(x, y), minibatch_cka_change(x_batches, y_batches)
                                 1 − CKA (float64) from X and D = Y − X, exact at every magnitude
    one_minus_cka_from_change(kk, km, mm)   1 − CKA from the moments of K and the change M
    hsic1(k, l)                  unbiased HSIC₁ of Gram stacks (..., n, n) → (...)
    pool_activations(acts, attention_mask, pooling)   (batch, seq, d) → samples (n, d)
    StreamingCKA(num_layers, pooling, estimator, backend)   per-layer CKA over probe batches
    ieee_fp32_matmul()           context manager: IEEE fp32 matmuls (no TF32) inside
    POOLINGS, ESTIMATORS, MEASURES, BACKENDS   the accepted option values

Modules, one concern each:
    reference   the float64 ground truth of every measure, and pooling activations into samples
    stats       the per-layer statistics a stream of batches is summed into, finished in float64
    engine      the compiled engine (csrc/): backend choice, its inputs and stacked state, the
                fall-back to the reference on a device failure, the TF32 guard
    streaming   StreamingCKA, which dispatches each update to the engine or the reference

The reference is computed in float64, with centering that stays exact when activations carry
offsets of 1e3–1e5 ("massive activations"). ``StreamingCKA`` runs on the engine when it is built
(backend "auto") and on the reference otherwise; both give the same numbers to the tolerances
stated in tests/test_cka.py.
"""

from depthfast.cka.engine import BACKENDS, ieee_fp32_matmul
from depthfast.cka.reference import (
    debiased_cka, debiased_cka_change, hsic1, linear_cka, linear_cka_change, minibatch_cka_change,
    one_minus_cka_from_change, pool_activations, procrustes_distance,
)
from depthfast.cka.streaming import StreamingCKA
from depthfast.constants import ESTIMATORS, MEASURES, POOLINGS  # the option values, in the leaf (re-exported)

__all__ = [
    "BACKENDS", "ESTIMATORS", "MEASURES", "POOLINGS", "StreamingCKA", "debiased_cka", "debiased_cka_change",
    "hsic1", "ieee_fp32_matmul", "linear_cka", "linear_cka_change", "minibatch_cka_change",
    "one_minus_cka_from_change", "pool_activations", "procrustes_distance",
]
