// Shared declarations of the CKA engine (depthfast._C): host logic in cka.cpp, CUDA kernels in
// cka_cuda.cu (compiled only when torch has CUDA; DEPTHFAST_WITH_CUDA is then defined).
#pragma once

#include <ATen/ATen.h>  // not torch/extension.h: the .cu needs no pybind11 and compiles 5× faster

#include <vector>

namespace depthfast {

// One group of G layers with equal widths, prepared for the products: op = (x − c)·m in the compute
// dtype (G, n, d); k = row norms ‖op_i‖² (G, n) float64; colsum = Σ_i op_i (G, d) float64.
// cross (G, n) float64: x'_i·d'_i, when a change operand was staged on the CPU beside the base's
// prepared x' (fused into that pass); undefined otherwise (then formed from the operands).
struct Prepared {
  at::Tensor op;
  at::Tensor k;
  at::Tensor colsum;
  at::Tensor cross;
};

#ifdef DEPTHFAST_WITH_CUDA
// One launch for all G layers: reads each layer's (n, d) input (bf16/fp16/fp32), subtracts the fp32
// shift, multiplies by the row mask, writes op in the input's 16-bit dtype (or fp32), and reduces
// row norms and column sums in fp32 → fp64 atomics. With base (the change form) it stages
// D = x − base (fp32 difference, then the shift) in the same pass: no copy of D is made first.
Prepared prepare_cuda(const std::vector<at::Tensor>& xs, const at::Tensor& shift,
                      const c10::optional<at::Tensor>& mask, const std::vector<at::Tensor>* base = nullptr);

// Fused unbiased-HSIC sample-space reduction: for every layer g, with K = XXᵀ, L = YYᵀ of the
// prepared 16-bit operands X (G, n, d1), Y (G, n, d2), adds Σ_{i≠j} [K∘L, K∘K, L∘L]_ij into
// out (G, 3) float64. Tiles of K and L live in registers/shared memory only; upper tile pairs
// only (symmetry); tensor cores via WMMA.
void offdiag_sums_cuda(const at::Tensor& x, const at::Tensor& y, at::Tensor& out);

// Experimental one-launch symmetric accumulation (DEPTHFAST_CKA_SYRK=1): sxx (G,d1,d1), syy (G,d2,d2)
// (both triangles) and syx (G,d2,d1) fp32 += the Grams of the prepared 16-bit operands.
void syrk_accumulate_cuda(const at::Tensor& x, const at::Tensor& y, at::Tensor& sxx, at::Tensor& syy, at::Tensor& syx,
                          bool skip_xx);

// Fused feature-space unbiased-HSIC moments: out (G, 3) f64 += [‖Y'ᵀX'‖²_F, ‖X'ᵀX'‖²_F, ‖Y'ᵀY'‖²_F]
// from upper tiles of [X'|Y']ᵀ[X'|Y'], reduced in the block: no d × d workspace.
void gram_sqnorms_cuda(const at::Tensor& x, const at::Tensor& y, at::Tensor& out);
#endif

}  // namespace depthfast
