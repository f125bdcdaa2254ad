// CKA engine, host side (CPU path and CUDA dispatch). Bound as depthfast._C.
//
// Exact feature-space statistics per layer (shift c = first batch's mean, x' = (x − c)·mask):
//     Sxx += X'ᵀX' (upper blocks only: symmetric), Syy += Y'ᵀY' (upper blocks), Syx += Y'ᵀX',
//     sx += Σx', sy += Σy', vx += [Σ k_i x'_i, Σ l_i x'_i], vy += [Σ l_i y'_i, Σ k_i y'_i],
//     sc += [Σk, Σl, Σkl, Σk², Σl²],  k_i = ‖x'_i‖², l_i = ‖y'_i‖².
// Each update's Gram products are computed in float32 (fp32 BLAS, or 16-bit tensor-core operands with
// fp32 accumulation; never TF32) and added into float64 statistics (sxx, syy, syx may also be float32,
// the old layout, kept for measurements of what fp32 accumulation loses); O(n·d) sums are float64; the
// final combination is float64 in Python (depthfast/cka/stats.py).
//
// Failure atomicity: every launch of a custom CUDA kernel (prepare, syrk into temporaries) comes before
// the first in-place change of the statistics, so an exception from a launch (e.g. "no kernel image is
// available for execution on the device") leaves the state exactly as it was; depthfast/cka/streaming.py
// then redoes the batch on the float64 reference.
//
// Unbiased minibatch HSIC₁ (Song et al. 2012) from O(1)-per-layer moments of the centered batch:
//     tr(K̃L̃) = Σ_{i≠j} K_ij L_ij,  1ᵀK̃1 = ‖sx‖² − Σk,  1ᵀK̃L̃1 = Σ_i (x'_i·sx − k_i)(y'_i·sy − l_i),
// where Σ_{i≠j} K_ij L_ij = ‖Y'ᵀX'‖²_F − Σ k_i l_i (feature space, O(n d²)) or is reduced over
// tiles of K, L directly (sample space, O(n² d)): whichever costs less for the shape.

#include <torch/extension.h>

#include "cka.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include <ATen/Parallel.h>

namespace depthfast {
namespace {

void check_group(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& ys,
                 const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(!xs.empty() && xs.size() == ys.size(), "cka: need the same non-zero number of base and tuned layers; got ",
              xs.size(), " and ", ys.size());
  const auto n = xs[0].size(0);
  for (size_t i = 0; i < xs.size(); ++i) {
    for (const auto* t : {&xs[i], &ys[i]}) {
      TORCH_CHECK(t->dim() == 2, "cka: activations must be 2-D (n, d); layer ", i, " has ", t->dim(), " dims");
      TORCH_CHECK(t->size(0) == n, "cka: layer ", i, " has ", t->size(0), " samples, expected ", n);
      auto st = t->scalar_type();
      TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
                  "cka: activations must be float16/bfloat16/float32/float64; got ", st);
      TORCH_CHECK(t->device() == xs[0].device(), "cka: all activations must be on one device");
    }
    TORCH_CHECK(xs[i].size(1) == xs[0].size(1) && ys[i].size(1) == ys[0].size(1),
                "cka: one call takes layers of equal widths (group them); layer ", i, " differs");
    TORCH_CHECK(xs[i].scalar_type() == xs[0].scalar_type() && ys[i].scalar_type() == xs[0].scalar_type(),
                "cka: base and tuned activations of a group must share one dtype");
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == n, "cka: mask must be (n,) with n = ", n, "; got shape ",
                mask->sizes());
    TORCH_CHECK(mask->device() == xs[0].device(), "cka: mask must be on the activations' device");
  }
}

// Tests set this to run the CUDA path's 16-bit operand logic (rounding after the shift, split
// weights) on the CPU, where it is otherwise never taken.
bool g_emulate_tensor_cores = false;

// Whether x's group runs the custom kernels of cka_cuda.cu: CUDA tensors, or, in a build of those
// kernels for the CPU emulator (DEPTHFAST_CUDA_EMULATION, tests/cuda_emu), every tensor.
bool runs_cuda_kernels(const at::Tensor& x) {
#ifdef DEPTHFAST_CUDA_EMULATION
  (void)x;
  return true;
#else
  return x.is_cuda();
#endif
}

bool use_tensor_cores(const at::Tensor& x) {
  return (runs_cuda_kernels(x) || g_emulate_tensor_cores) &&
         (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16);
}

// The CUDA kernels read rows through their own stride but need unit column stride: a 2-D input that
// is transposed or column-sliced is copied here (the CPU path does the same), so both devices accept
// every strided layout.
std::vector<at::Tensor> unit_column_stride(const std::vector<at::Tensor>& xs) {
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (const auto& t : xs) out.push_back(t.stride(1) == 1 || t.size(1) == 1 ? t : t.contiguous());
  return out;
}

// CPU: one pass per layer over the input — shift, mask, fp32 operand, row norms and column sums
// (float64 accumulators; per-chunk column partials, so threads never share a cache line of sums).
// With a base b (change mode) the operand is the change: (x − b − c)·mask, x − b formed in fp32 from the
// two inputs row by row (never a staged copy of either).
template <typename T>
void prepare_cpu_layer(const at::Tensor& x, const at::Tensor* base, const float* c, const float* mask, float* out,
                       double* k, double* colsum) {
  const int64_t n = x.size(0), d = x.size(1), ld = x.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* bp = base != nullptr ? base->data_ptr<T>() : nullptr;
  const int64_t ldb = base != nullptr ? base->stride(0) : 0;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(4 * at::get_num_threads(), (n + 63) / 64));
  std::vector<double> partial(chunks * d, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t ch0, int64_t ch1) {
    for (int64_t ch = ch0; ch < ch1; ++ch) {
      double* cs = partial.data() + ch * d;
      for (int64_t r = ch * n / chunks; r < (ch + 1) * n / chunks; ++r) {
        float* o = out + r * d;
        if (mask != nullptr && mask[r] == 0.f) {  // padding may hold inf/NaN: never read into sums
          std::fill(o, o + d, 0.f);
          k[r] = 0.0;
          continue;
        }
        const T* xr = xp + r * ld;
        double acc = 0.0;
        if (bp != nullptr) {
          const T* br = bp + r * ldb;
          for (int64_t j = 0; j < d; ++j) {
            // the change first (the offsets of x and b cancel exactly), then its own shift
            const float v = (static_cast<float>(xr[j]) - static_cast<float>(br[j])) - c[j];
            o[j] = v;
            acc += static_cast<double>(v) * v;
            cs[j] += v;
          }
          k[r] = acc;
          continue;
        }
        for (int64_t j = 0; j < d; ++j) {
          const float v = static_cast<float>(xr[j]) - c[j];  // exact for massive channels (Sterbenz)
          o[j] = v;
          acc += static_cast<double>(v) * v;
          cs[j] += v;
        }
        k[r] = acc;
      }
    }
  });
  for (int64_t ch = 0; ch < chunks; ++ch)
    for (int64_t j = 0; j < d; ++j) colsum[j] += partial[ch * d + j];
}

// op = (x − base − shift)·mask per layer (base: the base model's activations in change mode, else none).
Prepared prepare(const std::vector<at::Tensor>& xs, const at::Tensor& shift, const c10::optional<at::Tensor>& mask,
                 const std::vector<at::Tensor>* base = nullptr) {
#ifdef DEPTHFAST_WITH_CUDA
  if (runs_cuda_kernels(xs[0]) && xs[0].scalar_type() != at::kDouble) {
    if (base == nullptr) return prepare_cuda(unit_column_stride(xs), shift, mask);
    const std::vector<at::Tensor> base_unit = unit_column_stride(*base);  // D formed while staging
    return prepare_cuda(unit_column_stride(xs), shift, mask, &base_unit);
  }
#endif
  const int64_t g = xs.size(), n = xs[0].size(0), d = xs[0].size(1);
  if (!xs[0].is_cuda() && !use_tensor_cores(xs[0]) && xs[0].scalar_type() != at::kDouble) {
    Prepared p;
    p.op = at::empty({g, n, d}, xs[0].options().dtype(at::kFloat));
    p.k = at::empty({g, n}, xs[0].options().dtype(at::kDouble));
    p.colsum = at::zeros({g, d}, xs[0].options().dtype(at::kDouble));
    at::Tensor m;
    if (mask.has_value()) m = mask->to(at::kFloat).contiguous();
    auto sh = shift.contiguous();
    for (int64_t i = 0; i < g; ++i) {
      auto xi = xs[i].stride(1) == 1 ? xs[i] : xs[i].contiguous();
      at::Tensor bi;
      if (base != nullptr) bi = (*base)[i].stride(1) == 1 ? (*base)[i] : (*base)[i].contiguous();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xi.scalar_type(), "prepare_cpu", [&] {
        prepare_cpu_layer<scalar_t>(xi, bi.defined() ? &bi : nullptr, sh.data_ptr<float>() + i * d,
                                    m.defined() ? m.data_ptr<float>() : nullptr,
                                    p.op.data_ptr<float>() + i * n * d, p.k.data_ptr<double>() + i * n,
                                    p.colsum.data_ptr<double>() + i * d);
      });
    }
    return p;
  }
  // Generic ATen path (float64 inputs, emulated tensor cores, CUDA without the custom kernels).
  at::Tensor op = at::empty({g, n, d}, xs[0].options().dtype(at::kFloat));
  for (int64_t i = 0; i < g; ++i) {
    auto out = op.select(0, i);
    if (base != nullptr) {  // the change in fp32 (float64 for float64 inputs), then its shift
      const auto wide = xs[i].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      out.copy_(at::sub(xs[i].to(wide), (*base)[i].to(wide)).sub_(shift.select(0, i).to(wide)));
    } else if (xs[i].scalar_type() == at::kDouble) {
      out.copy_(xs[i] - shift.select(0, i).to(at::kDouble));
    } else {
      // x and c are both representable in fp32, and for channels whose values lie within 2× of c
      // (massive activations) x − c is exact (Sterbenz), so the spread survives the offset.
      at::sub_out(out, xs[i].scalar_type() == at::kFloat ? xs[i] : xs[i].to(at::kFloat), shift.select(0, i));
    }
  }
  // where, not a product: padding may hold anything (inf/NaN from a masked softmax) and must not count.
  if (mask.has_value()) op.masked_fill_((mask->view({1, -1, 1}) == 0), 0.0);
  Prepared p;
  at::Tensor opf = op;
  if (use_tensor_cores(xs[0])) {  // moments from the rounded operand, so they match the products
    op = op.to(xs[0].scalar_type());
    opf = op.to(at::kFloat);
  }
  // fp32 reductions (pairwise/cascade in ATen) then float64: relative error ~1e-7, far below the
  // Gram products' own.
  p.k = at::linalg_vector_norm(opf, 2, {-1}).square_().to(at::kDouble);
  p.colsum = opf.sum(1).to(at::kDouble);
  p.op = op;
  return p;
}

// A (G, m, n)-by-(G, n, p) product with a float32 result: cuBLAS tensor cores take 16-bit operands
// with fp32 accumulation (bmm out_dtype); everything else is float32 BLAS.
at::Tensor bmm_f32(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) return at::bmm(a, b);
  if (!a.is_cuda()) return at::bmm(a.to(at::kFloat), b.to(at::kFloat));  // exact upcast, fp32 accumulate
  return at::bmm(a, b, at::kFloat);
}

// w (G, a, n) float64 times op (G, n, d) → (G, a, d) float64 without a wide copy of op: w is scaled
// per row by a power of two (fp16 range) and split into hi + lo terms of op's format, so the product
// keeps about twice that format's precision at the cost of two extra GEMV-like rows.
at::Tensor split_bmm_left(const at::Tensor& w, const at::Tensor& op) {
  const auto dt = op.scalar_type();
  const int64_t a = w.size(1);
  auto scale = at::exp2(at::ceil(at::log2(w.abs().amax({-1}, true).clamp_min(1e-300))));
  auto ws = w / scale;
  auto hi = ws.to(dt);
  auto lo = (ws - hi.to(at::kDouble)).to(dt);
  auto r = bmm_f32(at::cat({hi, lo}, 1), op).to(at::kDouble);
  return (r.narrow(1, 0, a) + r.narrow(1, a, a)) * scale;
}

// target += a·b with the product in float32: fused into an fp32 target, or an fp32 temporary added
// into a float64 target (the widened accumulation: one rounding to fp32 per update, none across them).
void add_product(at::Tensor target, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat && target.scalar_type() == at::kFloat) target.baddbmm_(a, b);
  else target.add_(bmm_f32(a, b));
}

// acc (G, d, d) += opᵀop on the blocks i ≤ j of size `block` only (the rest is its transpose):
// (nb + 1) / (2 nb) of the work of a full product.
void sym_gram_accumulate(const at::Tensor& op, at::Tensor& acc, int64_t block) {
  const int64_t d = op.size(2);
  if (block <= 0 || block >= d) {
    add_product(acc, op.transpose(1, 2), op);
    return;
  }
  for (int64_t i0 = 0; i0 < d; i0 += block) {
    const int64_t bi = std::min(block, d - i0);
    auto a = op.narrow(2, i0, bi).transpose(1, 2);
    for (int64_t j0 = i0; j0 < d; j0 += block) {
      const int64_t bj = std::min(block, d - j0);
      auto target = acc.narrow(1, i0, bi).narrow(2, j0, bj);
      add_product(target, a, op.narrow(2, j0, bj));
    }
  }
}

// Σ_ij (opᵀop)²_ij (G,) float64 in blocks i ≤ j (off-diagonal blocks count twice); workspace
// (G, block, block), never d×d.
at::Tensor sym_gram_sqnorm(const at::Tensor& op, int64_t block) {
  const int64_t d = op.size(2);
  if (block <= 0) block = d;
  at::Tensor total = at::zeros({op.size(0)}, op.options().dtype(at::kDouble));
  for (int64_t i0 = 0; i0 < d; i0 += block) {
    const int64_t bi = std::min(block, d - i0);
    auto a = op.narrow(2, i0, bi).transpose(1, 2);
    for (int64_t j0 = i0; j0 < d; j0 += block) {
      const int64_t bj = std::min(block, d - j0);
      auto p = bmm_f32(a, op.narrow(2, j0, bj));
      total.add_(at::sum(p.square(), {1, 2}, false, at::kDouble), j0 == i0 ? 1.0 : 2.0);
    }
  }
  return total;
}

// ‖Yᵀ X‖²_F (G,) float64, in (block × block) pieces.
at::Tensor cross_sqnorm(const at::Tensor& x, const at::Tensor& y, int64_t block) {
  at::Tensor total = at::zeros({x.size(0)}, x.options().dtype(at::kDouble));
  const int64_t d1 = x.size(2), d2 = y.size(2);
  if (block <= 0) block = std::max(d1, d2);
  for (int64_t i0 = 0; i0 < d2; i0 += block) {
    auto a = y.narrow(2, i0, std::min(block, d2 - i0)).transpose(1, 2);
    for (int64_t j0 = 0; j0 < d1; j0 += block) {
      auto p = bmm_f32(a, x.narrow(2, j0, std::min(block, d1 - j0)));
      total.add_(at::sum(p.square(), {1, 2}, false, at::kDouble));
    }
  }
  return total;
}

// Σ_{i≠j} [K∘L, K∘K, L∘L]_ij (G, 3) float64 over row tiles I ≤ J of K = XXᵀ, L = YYᵀ; only one
// (G, t, t) tile pair exists at a time, never the n × n Grams.
at::Tensor offdiag_sums_tiled(const at::Tensor& x, const at::Tensor& y, int64_t tile) {
  const int64_t n = x.size(1);
  at::Tensor out = at::zeros({x.size(0), 3}, x.options().dtype(at::kDouble));
  for (int64_t i0 = 0; i0 < n; i0 += tile) {
    const int64_t ti = std::min(tile, n - i0);
    auto xi = x.narrow(1, i0, ti), yi = y.narrow(1, i0, ti);
    for (int64_t j0 = i0; j0 < n; j0 += tile) {
      const int64_t tj = std::min(tile, n - j0);
      auto k = bmm_f32(xi, x.narrow(1, j0, tj).transpose(1, 2));
      auto l = bmm_f32(yi, y.narrow(1, j0, tj).transpose(1, 2));
      if (i0 == j0) {  // the diagonal is not part of K̃, L̃
        auto off = 1.0 - at::eye(ti, k.options());
        k.mul_(off);
        l.mul_(off);
      }
      auto part = at::stack({at::sum(k * l, {1, 2}, false, at::kDouble), at::sum(k * k, {1, 2}, false, at::kDouble),
                             at::sum(l * l, {1, 2}, false, at::kDouble)}, 1);
      out.add_(part, i0 == j0 ? 1.0 : 2.0);
    }
  }
  return out;
}

// HSIC₁ (Song et al. 2012) from its four moments; all float64 tensors (G,).
at::Tensor hsic1_moments(double n, const at::Tensor& off, const at::Tensor& sum_k, const at::Tensor& sum_l,
                         const at::Tensor& cross) {
  return (off + sum_k * sum_l / ((n - 1) * (n - 2)) - cross * (2.0 / (n - 2))) / (n * (n - 3));
}

// Σ_j a_ij b_ij per row (G, n) float64 of two prepared operands (G, n, d), one layer at a time.
at::Tensor row_dots(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), a.size(1)}, a.options().dtype(at::kDouble));
  for (int64_t i = 0; i < a.size(0); ++i)
    out.select(0, i).copy_(at::sum(a.select(0, i).to(at::kFloat) * b.select(0, i).to(at::kFloat), {-1}, false, at::kDouble));
  return out;
}

// The change of the Gram's diagonal, m_i = ‖x'_i + d'_i‖² − ‖x'_i‖² = 2 x'_i·d'_i + ‖d'_i‖² (G, n) float64.
at::Tensor change_diagonal(const Prepared& px, const Prepared& pd) { return row_dots(px.op, pd.op).mul_(2.0).add_(pd.k); }

}  // namespace

// Σ_{i≠j} [K∘M, K∘K, M∘M]_ij (G, 3) float64 over row tiles I ≤ J of K = XXᵀ and the change of the Gram
// M = XDᵀ + DXᵀ + DDᵀ = [X + D | D]·[D | X]ᵀ (one product of inner width 2d); one tile pair at a time.
at::Tensor offdiag_sums_change_tiled(const at::Tensor& x, const at::Tensor& d, int64_t tile) {
  TORCH_CHECK(x.dim() == 3 && x.sizes() == d.sizes(), "offdiag_sums_change_tiled: x_op and d_op must be (G, n, d) of one shape");
  TORCH_CHECK(tile >= 1, "offdiag_sums_change_tiled: tile must be ≥ 1; got ", tile);
  const int64_t n = x.size(1);
  at::Tensor out = at::zeros({x.size(0), 3}, x.options().dtype(at::kDouble));
  const auto xf = x.to(at::kFloat), df = d.to(at::kFloat);  // no copy for fp32 operands
  for (int64_t i0 = 0; i0 < n; i0 += tile) {
    const int64_t ti = std::min(tile, n - i0);
    auto xi = xf.narrow(1, i0, ti), di = df.narrow(1, i0, ti);
    auto left = at::cat({xi + di, di}, 2);
    for (int64_t j0 = i0; j0 < n; j0 += tile) {
      const int64_t tj = std::min(tile, n - j0);
      auto xj = xf.narrow(1, j0, tj), dj = df.narrow(1, j0, tj);
      auto k = at::bmm(xi, xj.transpose(1, 2));
      auto m = at::bmm(left, at::cat({dj, xj}, 2).transpose(1, 2));
      if (i0 == j0) {  // the diagonal is not part of K̃, M̃
        auto off = 1.0 - at::eye(ti, k.options());
        k.mul_(off);
        m.mul_(off);
      }
      auto part = at::stack({at::sum(k * m, {1, 2}, false, at::kDouble), at::sum(k * k, {1, 2}, false, at::kDouble),
                             at::sum(m * m, {1, 2}, false, at::kDouble)}, 1);
      out.add_(part, i0 == j0 ? 1.0 : 2.0);
    }
  }
  return out;
}

// (a, p, q, r, s) = (‖A‖², ⟨A,B⟩, ‖B‖², ⟨A,C⟩, ‖B + Bᵀ + C‖²) (G, 5) float64 of A = XᵀX, B = DᵀX, C = DᵀD
// (full Frobenius sums, diagonal included), from (block × block) pieces I ≤ J: with the symmetry of A, C
// and B + Bᵀ + C, a pair I < J counts twice and needs B_IJ and B_JI (four products; three on the diagonal).
at::Tensor gram_moments_change(const at::Tensor& x, const at::Tensor& d, int64_t block) {
  TORCH_CHECK(x.dim() == 3 && x.sizes() == d.sizes(), "gram_moments_change: x_op and d_op must be (G, n, d) of one shape");
  const int64_t w = x.size(2);
  if (block <= 0 || block > w) block = w;
  at::Tensor out = at::zeros({x.size(0), 5}, x.options().dtype(at::kDouble));
  auto dot = [](const at::Tensor& a, const at::Tensor& b) { return at::sum(a * b, {1, 2}, false, at::kDouble); };
  for (int64_t i0 = 0; i0 < w; i0 += block) {
    const int64_t bi = std::min(block, w - i0);
    auto xi = x.narrow(2, i0, bi), di = d.narrow(2, i0, bi);
    for (int64_t j0 = i0; j0 < w; j0 += block) {
      const int64_t bj = std::min(block, w - j0);
      auto xj = x.narrow(2, j0, bj), dj = d.narrow(2, j0, bj);
      auto a = bmm_f32(xi.transpose(1, 2), xj);   // A_IJ
      auto b = bmm_f32(di.transpose(1, 2), xj);   // B_IJ
      auto c = bmm_f32(di.transpose(1, 2), dj);   // C_IJ
      at::Tensor part;
      if (i0 == j0) {
        auto gsum = b + b.transpose(1, 2) + c;
        part = at::stack({dot(a, a), dot(a, b), dot(b, b), dot(a, c), dot(gsum, gsum)}, 1);
      } else {
        auto bt = bmm_f32(xi.transpose(1, 2), dj);  // B_JIᵀ = X_Iᵀ D_J
        auto gsum = b + bt + c;
        // ⟨A,B⟩ over both blocks: ⟨A_IJ, B_IJ⟩ + ⟨A_JI, B_JI⟩ = ⟨A_IJ, B_IJ + B_JIᵀ⟩ (counted once here)
        part = at::stack({dot(a, a) * 2.0, dot(a, b + bt), dot(b, b) + dot(bt, bt), dot(a, c) * 2.0, dot(gsum, gsum) * 2.0}, 1);
      }
      out.add_(part);
    }
  }
  return out;
}

// Symmetric-split block size for widths d: one block below 2·min_block, then ~min_block-wide blocks (≤ 8),
// so a block product stays large enough for GEMM efficiency while the saving nears 2×.
// The device flag is part of the binding (Python passes it) but both devices take the same minimum.
int64_t gram_block(int64_t d, bool /*cuda*/) {
  TORCH_CHECK(d >= 1, "gram_block: width must be ≥ 1; got ", d);
  // cuBLAS needs ≥ 512-wide blocks to fill the SMs (24 layers × 16 tiles of 128²); CPU BLAS
  // measured slower with 256-wide blocks (strided views, per-batch GEMMs) than with none at d = 512.
  constexpr int64_t min_block = 512;
  if (d < 2 * min_block) return d;
  const int64_t nb = std::min<int64_t>(8, d / min_block);
  const int64_t b = (d + nb - 1) / nb;
  return (b + 63) / 64 * 64;
}

void exact_update(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& ys,
                  const c10::optional<at::Tensor>& mask, const at::Tensor& shift_x, const at::Tensor& shift_y,
                  at::Tensor sxx, at::Tensor syy, at::Tensor syx, at::Tensor sx, at::Tensor sy, at::Tensor vx,
                  at::Tensor vy, at::Tensor sc, bool skip_xx, int64_t block, bool change) {
  check_group(xs, ys, mask);
  const at::NoTF32Guard no_tf32;  // fp32 products in IEEE fp32, whatever the user's allow_tf32
  const int64_t g = xs.size(), d1 = xs[0].size(1), d2 = ys[0].size(1);
  const auto gram_t = sxx.scalar_type();
  TORCH_CHECK(gram_t == at::kFloat || gram_t == at::kDouble, "exact_update: sxx must be float32 or float64; got ", gram_t);
  auto check_state = [&](const at::Tensor& t, at::IntArrayRef shape, at::ScalarType st, const char* name) {
    TORCH_CHECK(t.sizes() == shape, "exact_update: ", name, " must have shape ", shape, "; got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == st, "exact_update: ", name, " must be ", st, "; got ", t.scalar_type());
    TORCH_CHECK(t.device() == xs[0].device(), "exact_update: ", name, " must be on the activations' device");
  };
  check_state(shift_x, {g, d1}, at::kFloat, "shift_x");
  check_state(shift_y, {g, d2}, at::kFloat, "shift_y");
  check_state(sxx, {g, d1, d1}, gram_t, "sxx");
  check_state(syy, {g, d2, d2}, gram_t, "syy");
  check_state(syx, {g, d2, d1}, gram_t, "syx");
  check_state(sx, {g, d1}, at::kDouble, "sx");
  check_state(sy, {g, d2}, at::kDouble, "sy");
  check_state(vx, {g, 2, d1}, at::kDouble, "vx");
  check_state(vy, {g, 2, d2}, at::kDouble, "vy");
  check_state(sc, {g, 5}, at::kDouble, "sc");

  TORCH_CHECK(!change || d1 == d2, "exact_update: change=True needs base and tuned layers of one width; got ", d1,
              " and ", d2);
  Prepared px = prepare(xs, shift_x, mask);
  // change mode: the tuned side's operand is the change d' = (y − x − c_d)·mask, staged from ys and xs
  Prepared py = prepare(ys, shift_y, mask, change ? &xs : nullptr);
  bool done = false;
#ifdef DEPTHFAST_WITH_CUDA
  const char* syrk = std::getenv("DEPTHFAST_CKA_SYRK");
  if (syrk != nullptr && std::string(syrk) == "1" && runs_cuda_kernels(px.op) && px.op.scalar_type() != at::kFloat &&
      sxx.is_contiguous() && syy.is_contiguous() && syx.is_contiguous()) {
    // full matrices: mirroring is then a no-op. float64 statistics: the kernel adds into fp32
    // temporaries (this update's products), added afterwards, so a failed launch changes nothing.
    if (gram_t == at::kFloat) {
      syrk_accumulate_cuda(px.op, py.op, sxx, syy, syx, skip_xx);
    } else {
      auto f32 = sxx.options().dtype(at::kFloat);
      // skip_xx: the kernel never writes sxx, but it forms pointers into it: a real buffer
      at::Tensor txx = at::zeros({g, d1, d1}, f32);
      at::Tensor tyy = at::zeros({g, d2, d2}, f32), tyx = at::zeros({g, d2, d1}, f32);
      syrk_accumulate_cuda(px.op, py.op, txx, tyy, tyx, skip_xx);
      if (!skip_xx) sxx.add_(txx);
      syy.add_(tyy);
      syx.add_(tyx);
    }
    done = true;
  }
#endif
  if (!done) {
    if (!skip_xx) sym_gram_accumulate(px.op, sxx, block);
    sym_gram_accumulate(py.op, syy, block);
    add_product(syx, py.op.transpose(1, 2), px.op);
  }
  sx.add_(px.colsum);
  sy.add_(py.colsum);
  const auto& k = px.k;
  // change mode: l is the change of the Gram's diagonal m_i = 2x'_i·d'_i + ‖d'_i‖²
  const at::Tensor l = change ? change_diagonal(px, py) : py.k;
  // Σ w_i x'_i for w = k, l: (G, 2, n) × (G, n, d) in the operand's precision, then float64.
  vx.add_(split_bmm_left(at::stack({k, l}, 1), px.op));
  vy.add_(split_bmm_left(at::stack({l, k}, 1), py.op));
  sc.add_(at::stack({k.sum(1), l.sum(1), (k * l).sum(1), (k * k).sum(1), (l * l).sum(1)}, 1));
}

// One minibatch's (HSIC₁(K,M), HSIC₁(K,K), HSIC₁(M,M)) per layer, added into acc (G, 3), from the prepared
// centered X̃ (px) and change D̃ (pd); M = X̃D̃ᵀ + D̃X̃ᵀ + D̃D̃ᵀ is the change of the Gram (HSIC₁ is bilinear):
//   tr(K̃M̃) = 2p + q − Σ k m,  tr(M̃M̃) = 2r + s − 2q − Σ m²,  tr(K̃K̃) = a − Σ k²   (feature space), or
//   the three Σ_{i≠j} directly over tiles (sample space);  1ᵀM̃1 = 2 sx·sd + ‖sd‖² − Σm,
//   (M̃1)_i = x̃_i·sd + d̃_i·(sx + sd) − m_i,  (K̃1)_i = x̃_i·sx − k_i.
void unbiased_change_moments(const Prepared& px, const Prepared& pd, at::Tensor& acc, int64_t n_real, bool skip_xx,
                             bool feature) {
  const int64_t g = px.op.size(0);
  const at::Tensor m = change_diagonal(px, pd);
  const auto& k = px.k;
  at::Tensor off;  // (G, 3): Σ_{i≠j} K∘M, K∘K, M∘M
  if (feature) {
    at::Tensor mom;  // (G, 5): a, p, q, r, s
#if defined(DEPTHFAST_WITH_CUDA) && defined(DEPTHFAST_CUDA_CHANGE_KERNELS)  // not yet in cka_cuda.cu: ATen below
    // --- CUDA dispatch (kernels in cka_cuda.cu), as for gram_sqnorms_cuda below ---
    if (runs_cuda_kernels(px.op) && use_tensor_cores(px.op)) {
      mom = at::zeros({g, 5}, acc.options());
      gram_moments_change_cuda(px.op, pd.op, mom);
    }
#endif
    if (!mom.defined()) mom = gram_moments_change(px.op, pd.op, gram_block(px.op.size(2), px.op.is_cuda()));
    auto a = mom.select(1, 0), p = mom.select(1, 1), q = mom.select(1, 2), r = mom.select(1, 3), s = mom.select(1, 4);
    off = at::stack({2.0 * p + q - (k * m).sum(1), a - (k * k).sum(1), 2.0 * r + s - 2.0 * q - (m * m).sum(1)}, 1);
  } else {
#if defined(DEPTHFAST_WITH_CUDA) && defined(DEPTHFAST_CUDA_CHANGE_KERNELS)  // not yet in cka_cuda.cu: ATen below
    // --- CUDA dispatch (kernels in cka_cuda.cu), as for offdiag_sums_cuda below ---
    if (runs_cuda_kernels(px.op) && use_tensor_cores(px.op)) {
      off = at::zeros({g, 3}, acc.options());
      offdiag_sums_change_cuda(px.op, pd.op, off);
    } else
#endif
      off = offdiag_sums_change_tiled(px.op, pd.op, 256);
  }
  (void)g;
  const double nd = static_cast<double>(n_real);
  auto sx = px.colsum, sd = pd.colsum;
  auto w = sx + sd;
  auto xt = px.op.transpose(1, 2), dt = pd.op.transpose(1, 2);
  auto pk = split_bmm_left(sx.unsqueeze(1), xt).squeeze(1) - k;
  auto pm = split_bmm_left(sd.unsqueeze(1), xt).squeeze(1) + split_bmm_left(w.unsqueeze(1), dt).squeeze(1) - m;
  auto sum_k = (sx * sx).sum(1) - k.sum(1);
  auto sum_m = 2.0 * (sx * sd).sum(1) + (sd * sd).sum(1) - m.sum(1);
  acc.select(1, 0).add_(hsic1_moments(nd, off.select(1, 0), sum_k, sum_m, (pk * pm).sum(1)));
  acc.select(1, 2).add_(hsic1_moments(nd, off.select(1, 2), sum_m, sum_m, (pm * pm).sum(1)));
  if (!skip_xx) acc.select(1, 1).add_(hsic1_moments(nd, off.select(1, 1), sum_k, sum_k, (pk * pk).sum(1)));
}

void unbiased_update(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& ys,
                     const c10::optional<at::Tensor>& mask, at::Tensor acc, int64_t n_real, bool skip_xx,
                     const std::string& space, bool change) {
  check_group(xs, ys, mask);
  const int64_t g = xs.size(), n = xs[0].size(0), d1 = xs[0].size(1), d2 = ys[0].size(1);
  const at::NoTF32Guard no_tf32;  // fp32 products in IEEE fp32, whatever the user's allow_tf32
  TORCH_CHECK(acc.sizes() == at::IntArrayRef({g, 3}) && acc.scalar_type() == at::kDouble,
              "unbiased_update: acc must be float64 of shape (", g, ", 3); got ", acc.scalar_type(), " ", acc.sizes());
  TORCH_CHECK(n_real > 3, "unbiased_update: HSIC₁ needs more than 3 samples; got ", n_real);
  TORCH_CHECK(space == "auto" || space == "feature" || space == "sample",
              "unbiased_update: space must be 'auto', 'feature' or 'sample'; got '", space, "'");

  // Center each minibatch on its own (masked) mean: HSIC₁ ignores the shift, the products do not.
  // The mean only needs to be close (any shift is exact for HSIC₁): fp32 sums, no wide copy.
  auto batch_mean = [&](const std::vector<at::Tensor>& ts) {
    at::Tensor s = at::stack(ts);
    if (mask.has_value()) s = s.masked_fill(mask->view({1, -1, 1}) == 0, 0.0);
    const auto acc_t = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor m = at::sum(s, {1}, false, acc_t).to(at::kDouble) / static_cast<double>(n_real);
    if (use_tensor_cores(ts[0])) m = m.to(ts[0].scalar_type());
    return m.to(at::kFloat);
  };
  Prepared px = prepare(xs, batch_mean(xs), mask);
  if (change) {
    TORCH_CHECK(d1 == d2, "unbiased_update: change=True needs base and tuned layers of one width; got ", d1, " and ", d2);
    // The change's own (masked) batch mean, one layer at a time (a temporary of one layer, never of the
    // group): it must be close to the change's mean, not only to Y's, or D̃ would carry Y's rounding.
    const bool wide = xs[0].scalar_type() == at::kDouble;
    at::Tensor mean_d = at::empty({g, d1}, acc.options());
    for (int64_t i = 0; i < g; ++i) {
      at::Tensor di = wide ? at::sub(ys[i], xs[i]) : at::sub(ys[i].to(at::kFloat), xs[i].to(at::kFloat));
      if (mask.has_value()) di.masked_fill_(mask->view({-1, 1}) == 0, 0.0);
      mean_d.select(0, i).copy_(at::sum(di, {0}, false, at::kDouble) / static_cast<double>(n_real));
    }
    Prepared pd = prepare(ys, mean_d.to(at::kFloat), mask, &xs);
    unbiased_change_moments(px, pd, acc, n_real, skip_xx, space == "feature" || (space == "auto" && d1 + d2 <= n));
    return;
  }
  Prepared py = prepare(ys, batch_mean(ys), mask);

  const bool feature = space == "feature" || (space == "auto" && d1 + d2 <= n);
  at::Tensor off;  // (G, 3): Σ_{i≠j} K∘L, K∘K, L∘L
  if (feature) {
    at::Tensor sq;  // (G, 3): ‖Y'ᵀX'‖², ‖X'ᵀX'‖², ‖Y'ᵀY'‖²
#ifdef DEPTHFAST_WITH_CUDA
    if (runs_cuda_kernels(xs[0]) && use_tensor_cores(xs[0])) {
      sq = at::zeros({g, 3}, acc.options());
      gram_sqnorms_cuda(px.op, py.op, sq);
    }
#endif
    if (!sq.defined()) {
      const int64_t block = gram_block(std::max(d1, d2), xs[0].is_cuda());
      auto kk = skip_xx ? at::zeros({g}, acc.options()) : sym_gram_sqnorm(px.op, block);
      sq = at::stack({cross_sqnorm(px.op, py.op, block), kk, sym_gram_sqnorm(py.op, block)}, 1);
    }
    off = sq - at::stack({(px.k * py.k).sum(1), (px.k * px.k).sum(1), (py.k * py.k).sum(1)}, 1);
  } else {
#ifdef DEPTHFAST_WITH_CUDA
    if (runs_cuda_kernels(xs[0]) && use_tensor_cores(xs[0])) {  // CPU tensors under _set_emulate_tensor_cores stay on ATen
      off = at::zeros({g, 3}, acc.options());
      offdiag_sums_cuda(px.op, py.op, off);
    } else
#endif
      off = offdiag_sums_tiled(px.op, py.op, 256);
  }
  const double nd = static_cast<double>(n_real);
  auto sx = px.colsum, sy = py.colsum;
  // (K̃1)_i = x'_i·sx − k_i, as (sxᵀ X'ᵀ)ᵀ
  auto p = split_bmm_left(sx.unsqueeze(1), px.op.transpose(1, 2)).squeeze(1) - px.k;
  auto q = split_bmm_left(sy.unsqueeze(1), py.op.transpose(1, 2)).squeeze(1) - py.k;
  auto sum_k = (sx * sx).sum(1) - px.k.sum(1);
  auto sum_l = (sy * sy).sum(1) - py.k.sum(1);
  auto h_kl = hsic1_moments(nd, off.select(1, 0), sum_k, sum_l, (p * q).sum(1));
  auto h_ll = hsic1_moments(nd, off.select(1, 2), sum_l, sum_l, (q * q).sum(1));
  acc.select(1, 0).add_(h_kl);
  acc.select(1, 2).add_(h_ll);
  if (!skip_xx) acc.select(1, 1).add_(hsic1_moments(nd, off.select(1, 1), sum_k, sum_k, (p * p).sum(1)));
}

}  // namespace depthfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "depthfast CKA engine: streamed feature-space CKA statistics and fused unbiased HSIC (CPU + CUDA)";
#ifdef DEPTHFAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("_set_emulate_tensor_cores", [](bool on) { depthfast::g_emulate_tensor_cores = on; },
        "testing only: round shifted 16-bit operands to their format on the CPU as the CUDA path does");
  m.def("gram_block", &depthfast::gram_block, "block size of the symmetric split of XᵀX for width d", py::arg("d"),
        py::arg("cuda") = false);
  m.def("exact_update", &depthfast::exact_update,
        "Accumulate shifted feature-space CKA statistics for a group of equal-width layers, in place.\n"
        "xs, ys: lists of G (n, d1) / (n, d2) activations; mask: (n,) or None; shift_x (G, d1), shift_y (G, d2) f32;\n"
        "sxx (G,d1,d1), syy (G,d2,d2) (upper blocks of size `block`), syx (G,d2,d1): all f64 (or all f32);\n"
        "each update's products are fp32, added into them; sx (G,d1), sy (G,d2),\n"
        "vx (G,2,d1), vy (G,2,d2), sc (G,5) f64; skip_xx leaves sxx untouched (kept base statistics).\n"
        "change (d1 = d2): ys are the tuned activations, the engine stages d = y − x; shift_y is d's shift and\n"
        "syy, syx, sy hold Σd'd'ᵀ, Σd'x'ᵀ, Σd'; vx = [Σk x', Σm x'], vy = [Σm d', Σk d'], sc = [Σk, Σm, Σkm, Σk², Σm²],\n"
        "m_i = 2x'_i·d'_i + ‖d'_i‖².",
        py::arg("xs"), py::arg("ys"), py::arg("mask"), py::arg("shift_x"), py::arg("shift_y"), py::arg("sxx"),
        py::arg("syy"), py::arg("syx"), py::arg("sx"), py::arg("sy"), py::arg("vx"), py::arg("vy"), py::arg("sc"),
        py::arg("skip_xx"), py::arg("block"), py::arg("change") = false);
  m.def("offdiag_sums_change_tiled", &depthfast::offdiag_sums_change_tiled,
        "Σ_{i≠j} [K∘M, K∘K, M∘M] (G, 3) f64 of K = XXᵀ and M = XDᵀ + DXᵀ + DDᵀ from prepared x_op, d_op (G, n, d).",
        py::arg("x_op"), py::arg("d_op"), py::arg("tile") = 256);
  m.def("gram_moments_change", &depthfast::gram_moments_change,
        "(‖A‖², ⟨A,B⟩, ‖B‖², ⟨A,C⟩, ‖B+Bᵀ+C‖²) (G, 5) f64 of A = XᵀX, B = DᵀX, C = DᵀD from x_op, d_op (G, n, d).",
        py::arg("x_op"), py::arg("d_op"), py::arg("block") = 0);
  m.def("unbiased_update", &depthfast::unbiased_update,
        "Add one minibatch's HSIC₁(K,L), HSIC₁(K,K), HSIC₁(L,L) per layer into acc (G, 3) f64 without forming\n"
        "n×n Grams. n_real: number of unmasked rows (> 3). space: 'auto' | 'feature' | 'sample'.\n"
        "change (d1 = d2): acc += (HSIC₁(K,M), HSIC₁(K,K), HSIC₁(M,M)) of the change M = L − K instead.",
        py::arg("xs"), py::arg("ys"), py::arg("mask"), py::arg("acc"), py::arg("n_real"), py::arg("skip_xx"),
        py::arg("space") = "auto", py::arg("change") = false);
}
