// CKA engine, CUDA kernels (built only when torch has CUDA; see setup.py).
//
// prepare_kernel   one launch for all layers of a group: op = round((x − c)·[mask]) into the
//                  tensor-core format, or in the change form op = round(((x − b) − c)·[mask]) with b
//                  the base model's activations (the change D formed in fp32 while staging, no second
//                  copy of the activations), plus row norms k_i = ‖op_i‖² and column sums Σ_i op_i
//                  (fp32 partials, fp64 atomics), computed from the rounded values so the
//                  moments match the products exactly.
// offdiag_kernel   fused unbiased-HSIC sample-space reduction: for upper tile pairs I ≤ J of
//                  K = XXᵀ, L = YYᵀ, WMMA tensor-core tiles (16-bit in, fp32 accumulate) stay in
//                  registers/shared memory and only Σ_{i≠j} K∘L, K∘K, L∘L leave the block
//                  (fp64 atomics): the n × n Grams never reach global memory.
// syrk_kernel      upper tile pairs of [X'|Y']ᵀ[X'|Y'] for all layers in one launch; either
//                  stores Sxx, Syy, Syx (exact estimator, opt-in DEPTHFAST_CKA_SYRK=1) or reduces
//                  their squared Frobenius norms in the block (feature-space unbiased HSIC, used
//                  whenever d1 + d2 ≤ n for 16-bit inputs): no d × d workspace either.
//
// Tensor cores: WMMA has fp16 fragments from sm_70 but bf16 ones only from sm_80, so offdiag_kernel
// and syrk_kernel come in two variants, WMMA and a plain SIMT tile (fp32 accumulation too), and the
// host picks by the device's compute capability (tensor_cores_on). A device pass below sm_80 compiles
// the SIMT body into the bf16 WMMA variant as well (use_wmma), so every architecture from sm_70 builds.
//
// The feature-space Gram products of the exact estimator go to cuBLAS by default (cka.cpp, bmm
// with fp32 output on the upper blocks only): it already runs the tensor cores at ~86 % of peak,
// so the engine wins by not doing the lower blocks and by fusing shift/mask/cast/sums in one pass.
// syrk_kernel (DEPTHFAST_CKA_SYRK=1, experimental, not yet timed on a GPU) does all three Grams of
// all layers in one launch with only the upper tile triangle of [X'|Y']ᵀ[X'|Y'].

#include "cka.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

namespace depthfast {
namespace {

constexpr int kMaxLayers = 64;  // layers per launch (pointer table passed by value)

struct LayerPtrs {
  const void* ptr[kMaxLayers];
  int64_t row_stride[kMaxLayers];
};

template <typename T>
__device__ __forceinline__ float to_f32(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Block tile: 64 rows × 256 columns, 8 warps; warp w takes rows w, w+8, …; lane takes columns
// lane + 32·j (coalesced). Column partials stay in registers over the block's rows.
constexpr int kPrepRows = 64, kPrepCols = 256, kPrepThreads = 256, kPrepPerLane = kPrepCols / 32;

template <typename Tin, typename Tout>
__global__ void prepare_kernel(LayerPtrs in, LayerPtrs base, bool has_base, const float* __restrict__ shift,
                               const float* __restrict__ mask,
                               Tout* __restrict__ op, double* __restrict__ rownorm, double* __restrict__ colsum,
                               int64_t n, int64_t d, int layer0) {
  const int g = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kPrepRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kPrepCols;
  const Tin* x = static_cast<const Tin*>(in.ptr[g]);
  const int64_t ld = in.row_stride[g];
  const Tin* b = has_base ? static_cast<const Tin*>(base.ptr[g]) : nullptr;
  const int64_t ldb = has_base ? base.row_stride[g] : 0;
  const float* c = shift + static_cast<int64_t>(layer0 + g) * d;
  Tout* out = op + static_cast<int64_t>(layer0 + g) * n * d;

  float col_part[kPrepPerLane];
#pragma unroll
  for (int j = 0; j < kPrepPerLane; ++j) col_part[j] = 0.f;

  for (int rr = warp; rr < kPrepRows; rr += kPrepThreads / 32) {
    const int64_t r = r0 + rr;
    if (r >= n) break;
    const bool keep = mask == nullptr || mask[r] != 0.f;
    float row_part = 0.f;
#pragma unroll
    for (int j = 0; j < kPrepPerLane; ++j) {
      const int64_t col = c0 + lane + 32 * j;
      if (col < d) {
        // where, not a product: padded rows may hold inf/NaN.
        // change form: the offsets of x and b cancel exactly in the difference, then D's own shift.
        const float xv = keep ? to_f32<Tin>(x[r * ld + col]) : 0.f;
        const float v = !keep ? 0.f : (b != nullptr ? (xv - to_f32<Tin>(b[r * ldb + col])) - c[col] : xv - c[col]);
        const Tout q = from_f32<Tout>(v);
        out[r * d + col] = q;
        const float vq = to_f32<Tout>(q);
        row_part += vq * vq;
        col_part[j] += vq;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) row_part += __shfl_down_sync(0xffffffffu, row_part, off);
    if (lane == 0) atomicAdd(rownorm + static_cast<int64_t>(layer0 + g) * n + r, static_cast<double>(row_part));
  }

  __shared__ float col_smem[kPrepThreads / 32][kPrepCols];
#pragma unroll
  for (int j = 0; j < kPrepPerLane; ++j) col_smem[warp][lane + 32 * j] = col_part[j];
  __syncthreads();
  const int64_t col = c0 + threadIdx.x;
  if (col < d) {
    double s = 0.0;
#pragma unroll
    for (int w = 0; w < kPrepThreads / 32; ++w) s += col_smem[w][threadIdx.x];
    atomicAdd(colsum + static_cast<int64_t>(layer0 + g) * d + col, s);
  }
}

template <typename Tin, typename Tout>
void launch_prepare(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>* base, const at::Tensor& shift,
                    const float* mask, at::Tensor& op, at::Tensor& k, at::Tensor& colsum) {
  const int64_t n = xs[0].size(0), d = xs[0].size(1), g = xs.size();
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t l0 = 0; l0 < g; l0 += kMaxLayers) {
    const int64_t count = std::min<int64_t>(kMaxLayers, g - l0);
    LayerPtrs ptrs{}, bptrs{};
    for (int64_t i = 0; i < count; ++i) {
      ptrs.ptr[i] = xs[l0 + i].data_ptr();
      ptrs.row_stride[i] = xs[l0 + i].stride(0);
      if (base != nullptr) {
        bptrs.ptr[i] = (*base)[l0 + i].data_ptr();
        bptrs.row_stride[i] = (*base)[l0 + i].stride(0);
      }
    }
    dim3 grid((d + kPrepCols - 1) / kPrepCols, (n + kPrepRows - 1) / kPrepRows, count);
    prepare_kernel<Tin, Tout><<<grid, kPrepThreads, 0, stream>>>(
        ptrs, bptrs, base != nullptr, shift.data_ptr<float>(), mask, static_cast<Tout*>(op.data_ptr()), k.data_ptr<double>(),
        colsum.data_ptr<double>(), n, d, static_cast<int>(l0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---- fused sample-space HSIC moments --------------------------------------------------------

constexpr int kTile = 64, kKStep = 32, kOffThreads = 128;

// Block index p → tile pair (I, J), I ≤ J, counting row by row along the upper triangle of a
// tiles × tiles grid: the symmetric products launch one block per pair.
__device__ __forceinline__ void upper_tile_pair(int64_t p, int64_t tiles, int64_t& I, int64_t& J) {
  I = 0;
  while (p >= tiles - I) {
    p -= tiles - I;
    ++I;
  }
  J = I + p;
}

// Sum three per-thread partials over a block of kOffThreads threads (warp shuffles, then one shared
// slot per warp) and add scale × each total to out[0..2]. Every thread of the block must call it.
__device__ __forceinline__ void block_sum3_atomic_add(double a, double b, double c, double* out, double scale) {
  __shared__ double red[3][kOffThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
    c += __shfl_down_sync(0xffffffffu, c, off);
  }
  if (lane == 0) {
    red[0][warp] = a;
    red[1][warp] = b;
    red[2][warp] = c;
  }
  __syncthreads();
  if (threadIdx.x < 3) {
    double total = 0.0;
    for (int w = 0; w < kOffThreads / 32; ++w) total += red[threadIdx.x][w];
    atomicAdd(out + threadIdx.x, scale * total);
  }
}

// One warp's 32 × 32 share of a kTile × kTile block tile (4 warps in a 2 × 2 grid): 2 × 2 fragments.
using WarpAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>[2][2];

__device__ __forceinline__ void zero_warp_tile(WarpAcc& acc) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
}

// Stores this warp's fragments into its corner of the shared block tile s (row-major, kTile + 4 wide).
__device__ __forceinline__ void store_warp_tile(const WarpAcc& acc, float (*s)[kTile + 4]) {
  const int warp = threadIdx.x / 32;
  const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(&s[wr + 16 * i][wc + 16 * j], acc[i][j], kTile + 4, nvcuda::wmma::mem_row_major);
}

// ---- one block's kTile × kTile fp32 product tile, with tensor cores or without ------------------

// Lowest architecture (×10) with WMMA fragments for T: fp16 from Volta, bf16 from Ampere.
template <typename T>
__host__ __device__ constexpr int wmma_min_arch() {
  return std::is_same<T, __nv_bfloat16>::value ? 800 : 700;
}

// Whether a kernel variant asked for tensor cores (kTensorCores) really uses WMMA in the code being
// compiled: not in a device pass for an architecture without T's fragments (that variant is never
// launched there, see tensor_cores_on, but must compile; it gets the SIMT body, correct everywhere).
template <typename T, bool kTensorCores>
__host__ __device__ constexpr bool use_wmma() {
#if defined(__CUDA_ARCH__)
  return kTensorCores && __CUDA_ARCH__ >= wmma_min_arch<T>();
#else
  return kTensorCores;
#endif
}

// C(i, j) += Σ_k A(i, k) B(k, j) over one staged k-slab of kDepth, A and B 16-bit in shared memory,
// C a kTile × kTile fp32 tile spread over the block's kOffThreads threads. kKInner: operands staged
// as s[row][k] (A(i, k) = a[i·ld + k], B(k, j) = b[j·ld + k]); otherwise as s[k][row]
// (A(i, k) = a[k·ld + i], B(k, j) = b[k·ld + j]).
template <typename T, bool kWmma>
struct TileAcc;

// Tensor cores: 4 warps in a 2 × 2 grid, each 32 × 32 of C as 2 × 2 m16n16k16 fragments.
template <typename T>
struct TileAcc<T, true> {
  WarpAcc acc;
  __device__ __forceinline__ void zero() { zero_warp_tile(acc); }
  __device__ __forceinline__ void store(float (*s)[kTile + 4]) const { store_warp_tile(acc, s); }

  template <bool kKInner, int kDepth>
  __device__ __forceinline__ void accumulate(const T* a, const T* b, int ld) {
    using namespace nvcuda;
    using LA = typename std::conditional<kKInner, wmma::row_major, wmma::col_major>::type;
    using LB = typename std::conditional<kKInner, wmma::col_major, wmma::row_major>::type;
    const int warp = threadIdx.x / 32;
    const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;
#pragma unroll
    for (int kk = 0; kk < kDepth; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], kKInner ? a + (wr + 16 * i) * ld + kk : a + kk * ld + wr + 16 * i, ld);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(fb[j], kKInner ? b + (wc + 16 * j) * ld + kk : b + kk * ld + wc + 16 * j, ld);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
};

// SIMT (bf16 before Ampere): thread t holds rows 4·(t / 8) + i (i < 4) and columns t % 8 + 8·j
// (j < 8) of C in registers. Products of 16-bit values are exact in fp32 and sums round in fp32, as
// in the tensor cores; only the summation order differs.
template <typename T>
struct TileAcc<T, false> {
  static constexpr int kRows = 4, kCols = 8;
  static_assert((kTile / kRows) * (kTile / kCols) == kOffThreads, "one 4 × 8 piece of C per thread");
  float acc[kRows][kCols];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) acc[i][j] = 0.f;
  }
  __device__ __forceinline__ void store(float (*s)[kTile + 4]) const {
    const int r0 = (threadIdx.x / 8) * kRows, c0 = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) s[r0 + i][c0 + 8 * j] = acc[i][j];
  }

  template <bool kKInner, int kDepth>
  __device__ __forceinline__ void accumulate(const T* a, const T* b, int ld) {
    const int r0 = (threadIdx.x / 8) * kRows, c0 = threadIdx.x % 8;
#pragma unroll 4
    for (int kk = 0; kk < kDepth; ++kk) {
      float av[kRows], bv[kCols];
#pragma unroll
      for (int i = 0; i < kRows; ++i) av[i] = to_f32<T>(kKInner ? a[(r0 + i) * ld + kk] : a[kk * ld + r0 + i]);
#pragma unroll
      for (int j = 0; j < kCols; ++j)
        bv[j] = to_f32<T>(kKInner ? b[(c0 + 8 * j) * ld + kk] : b[kk * ld + c0 + 8 * j]);
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int j = 0; j < kCols; ++j) acc[i][j] += av[i] * bv[j];
    }
  }
};

// Tile (I, J) of K = a·aᵀ for a (n, d) into acc: k-slabs of kKStep staged as sa[row][k], zero-padded
// past n and d.
template <typename T, typename Acc>
__device__ void accumulate_gram_tile(const T* __restrict__ a, int64_t n, int64_t d, int64_t i0, int64_t j0,
                                     T (*sa)[kKStep + 8], T (*sb)[kKStep + 8], Acc& acc) {
  for (int64_t k0 = 0; k0 < d; k0 += kKStep) {
    // Stage rows i0.. and j0.. of a (n, d), columns k0..k0+31, zero-padded past n and d.
    for (int e = threadIdx.x; e < kTile * kKStep; e += kOffThreads) {
      const int r = e / kKStep, cc = e % kKStep;
      const int64_t col = k0 + cc;
      const int64_t ri = i0 + r, rj = j0 + r;
      sa[r][cc] = (ri < n && col < d) ? a[ri * d + col] : from_f32<T>(0.f);
      sb[r][cc] = (rj < n && col < d) ? a[rj * d + col] : from_f32<T>(0.f);
    }
    __syncthreads();
    acc.template accumulate<true, kKStep>(&sa[0][0], &sb[0][0], kKStep + 8);
    __syncthreads();
  }
}

template <typename T, bool kTensorCores>
__global__ void offdiag_kernel(const T* __restrict__ x, const T* __restrict__ y, double* __restrict__ out, int64_t n,
                               int64_t d1, int64_t d2, int64_t tiles) {
  int64_t I, J;
  upper_tile_pair(blockIdx.x, tiles, I, J);
  const int g = blockIdx.y;
  const T* xg = x + static_cast<int64_t>(g) * n * d1;
  const T* yg = y + static_cast<int64_t>(g) * n * d2;

  __shared__ __align__(32) T sa[kTile][kKStep + 8];
  __shared__ __align__(32) T sb[kTile][kKStep + 8];
  __shared__ __align__(32) float sk[kTile][kTile + 4];
  __shared__ __align__(32) float sl[kTile][kTile + 4];

  TileAcc<T, use_wmma<T, kTensorCores>()> acc;
  acc.zero();
  accumulate_gram_tile(xg, n, d1, I * kTile, J * kTile, sa, sb, acc);
  acc.store(sk);
  acc.zero();
  accumulate_gram_tile(yg, n, d2, I * kTile, J * kTile, sa, sb, acc);
  acc.store(sl);
  __syncthreads();

  // Off-diagonal entries only (K̃, L̃); rows past n are zero and add nothing.
  double s_kl = 0.0, s_kk = 0.0, s_ll = 0.0;
  for (int e = threadIdx.x; e < kTile * kTile; e += kOffThreads) {
    const int r = e / kTile, cc = e % kTile;
    if (I == J && r == cc) continue;
    const double kv = sk[r][cc], lv = sl[r][cc];
    s_kl += kv * lv;
    s_kk += kv * kv;
    s_ll += lv * lv;
  }
  block_sum3_atomic_add(s_kl, s_kk, s_ll, out + static_cast<int64_t>(g) * 3, I == J ? 1.0 : 2.0);
}

// ---- experimental: one-launch symmetric Gram (SYRK-like) for the exact estimator -------------
//
// Z = [X' | Y'] (n, D = d1 + d2) is never formed: tile staging reads X' or Y' by column. Blocks
// compute the upper tile pairs I ≤ J of ZᵀZ only (n·D² multiply-adds instead of 2·n·D²; 2/3 of
// three separate products when d1 = d2) and scatter each entry into Sxx, Syy (both triangles:
// an off-diagonal tile is written twice, transposed) or Syx. Every output entry has exactly one
// owning block, so plain read-modify-write adds are race-free.

// kReduce: instead of storing, reduce ‖Y'ᵀX'‖²_F, ‖X'ᵀX'‖²_F, ‖Y'ᵀY'‖²_F into sq (G, 3) float64 —
// the feature-space unbiased-HSIC moments with no d × d workspace at all.
template <typename T, bool kReduce, bool kTensorCores>
__global__ void syrk_kernel(const T* __restrict__ x, const T* __restrict__ y, float* __restrict__ sxx,
                            float* __restrict__ syy, float* __restrict__ syx, double* __restrict__ sq, int64_t n,
                            int64_t d1, int64_t d2, int64_t tiles, bool skip_xx) {
  int64_t I, J;
  upper_tile_pair(blockIdx.x, tiles, I, J);
  if (skip_xx && (J + 1) * kTile <= d1) return;  // tile entirely in the kept base block
  const int g = blockIdx.y;
  const int64_t D = d1 + d2;
  const T* xg = x + static_cast<int64_t>(g) * n * d1;
  const T* yg = y + static_cast<int64_t>(g) * n * d2;

  __shared__ __align__(32) T sa[kKStep][kTile + 8];
  __shared__ __align__(32) T sb[kKStep][kTile + 8];
  __shared__ __align__(32) float sc[kTile][kTile + 4];
  TileAcc<T, use_wmma<T, kTensorCores>()> acc;
  acc.zero();

  auto z = [&](int64_t row, int64_t col) -> T {
    if (row >= n || col >= D) return from_f32<T>(0.f);
    return col < d1 ? xg[row * d1 + col] : yg[row * d2 + (col - d1)];
  };
  for (int64_t k0 = 0; k0 < n; k0 += kKStep) {
    for (int e = threadIdx.x; e < kKStep * kTile; e += kOffThreads) {
      const int kk = e / kTile, cc = e % kTile;  // consecutive threads: consecutive columns
      sa[kk][cc] = z(k0 + kk, I * kTile + cc);
      sb[kk][cc] = z(k0 + kk, J * kTile + cc);
    }
    __syncthreads();
    acc.template accumulate<false, kKStep>(&sa[0][0], &sb[0][0], kTile + 8);  // A(i, k) = Z(k, i), B(k, j) = Z(k, j)
    __syncthreads();
  }
  acc.store(sc);
  __syncthreads();

  const bool mirror = I != J;
  if constexpr (kReduce) {
    double s_kl = 0.0, s_kk = 0.0, s_ll = 0.0;
    const double w = mirror ? 2.0 : 1.0;  // an off-diagonal tile stands for its transpose too
    for (int e = threadIdx.x; e < kTile * kTile; e += kOffThreads) {
      const int64_t i = I * kTile + e / kTile, j = J * kTile + e % kTile;
      if (i >= D || j >= D) continue;
      const double v = sc[e / kTile][e % kTile];
      if (i < d1 && j < d1) s_kk += w * v * v;
      else if (i >= d1 && j >= d1) s_ll += w * v * v;
      else if (i < d1) s_kl += v * v;
    }
    block_sum3_atomic_add(s_kl, s_kk, s_ll, sq + static_cast<int64_t>(g) * 3, 1.0);
    return;
  } else {
    float* sxx_g = sxx + static_cast<int64_t>(g) * d1 * d1;
    float* syy_g = syy + static_cast<int64_t>(g) * d2 * d2;
    float* syx_g = syx + static_cast<int64_t>(g) * d2 * d1;
    for (int e = threadIdx.x; e < kTile * kTile; e += kOffThreads) {
      const int64_t i = I * kTile + e / kTile, j = J * kTile + e % kTile;
      if (i >= D || j >= D) continue;
      const float v = sc[e / kTile][e % kTile];
      if (i < d1 && j < d1) {
        if (skip_xx) continue;
        sxx_g[i * d1 + j] += v;
        if (mirror) sxx_g[j * d1 + i] += v;
      } else if (i >= d1 && j >= d1) {
        syy_g[(i - d1) * d2 + (j - d1)] += v;
        if (mirror) syy_g[(j - d1) * d2 + (i - d1)] += v;
      } else if (i < d1) {
        syx_g[(j - d1) * d1 + i] += v;
      }  // i ≥ d1 > j: only inside a diagonal tile, the transpose of an entry written above
    }
  }
}

// Whether the device holding t has WMMA fragments for T (compute capability ≥ wmma_min_arch): the
// kernels' tensor-core variant, else the SIMT one. Asked per call: cudaDeviceGetAttribute is a
// cheap host-side lookup, and the emulator (tests/cuda_emu) changes its device between tests.
template <typename T>
bool tensor_cores_on(const at::Tensor& t) {
  const int device = t.device().index() < 0 ? 0 : t.device().index();
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return 100 * major + 10 * minor >= wmma_min_arch<T>();
}

}  // namespace

Prepared prepare_cuda(const std::vector<at::Tensor>& xs, const at::Tensor& shift, const c10::optional<at::Tensor>& mask,
                      const std::vector<at::Tensor>* base) {
  const c10::cuda::CUDAGuard guard(xs[0].device());
  const int64_t g = xs.size(), n = xs[0].size(0), d = xs[0].size(1);
  for (const auto& t : xs)
    TORCH_CHECK(t.stride(1) == 1, "cka (CUDA): activations need unit column stride; call .contiguous()");
  if (base != nullptr) {
    TORCH_CHECK(static_cast<int64_t>(base->size()) == g, "cka (CUDA): one base activation per layer");
    for (const auto& t : *base)
      TORCH_CHECK(t.stride(1) == 1 && t.size(0) == n && t.size(1) == d && t.scalar_type() == xs[0].scalar_type(),
                  "cka (CUDA): base activations need the tuned ones' shape, dtype and unit column stride");
  }
  TORCH_CHECK(shift.is_contiguous() && shift.scalar_type() == at::kFloat, "cka (CUDA): shift must be contiguous fp32");
  const auto in_t = xs[0].scalar_type();
  const auto out_t = (in_t == at::kHalf || in_t == at::kBFloat16) ? in_t : at::kFloat;
  Prepared p;
  p.op = at::empty({g, n, d}, xs[0].options().dtype(out_t));
  p.k = at::zeros({g, n}, xs[0].options().dtype(at::kDouble));
  p.colsum = at::zeros({g, d}, xs[0].options().dtype(at::kDouble));
  at::Tensor m;
  const float* mptr = nullptr;
  if (mask.has_value()) {
    m = mask->to(at::kFloat).contiguous();
    mptr = m.data_ptr<float>();
  }
  if (in_t == at::kBFloat16) {
    launch_prepare<__nv_bfloat16, __nv_bfloat16>(xs, base, shift, mptr, p.op, p.k, p.colsum);
  } else if (in_t == at::kHalf) {
    launch_prepare<__half, __half>(xs, base, shift, mptr, p.op, p.k, p.colsum);
  } else {
    TORCH_CHECK(in_t == at::kFloat, "cka (CUDA): unsupported activation dtype ", in_t);
    launch_prepare<float, float>(xs, base, shift, mptr, p.op, p.k, p.colsum);
  }
  return p;
}

void offdiag_sums_cuda(const at::Tensor& x, const at::Tensor& y, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "offdiag_sums_cuda: prepared operands must be contiguous");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "offdiag_sums_cuda: X and Y operands must share a dtype");
  TORCH_CHECK(out.scalar_type() == at::kDouble && out.is_contiguous(), "offdiag_sums_cuda: out must be contiguous f64");
  const int64_t g = x.size(0), n = x.size(1), d1 = x.size(2), d2 = y.size(2);
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int64_t pairs = tiles * (tiles + 1) / 2;
  TORCH_CHECK(pairs < (1LL << 31) && g < 65536, "offdiag_sums_cuda: minibatch or layer count too large");
  dim3 grid(static_cast<unsigned>(pairs), static_cast<unsigned>(g));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kBFloat16) {
    using T = __nv_bfloat16;
    const auto* xp = static_cast<const T*>(x.data_ptr());
    const auto* yp = static_cast<const T*>(y.data_ptr());
    if (tensor_cores_on<T>(x))
      offdiag_kernel<T, true><<<grid, kOffThreads, 0, stream>>>(xp, yp, out.data_ptr<double>(), n, d1, d2, tiles);
    else
      offdiag_kernel<T, false><<<grid, kOffThreads, 0, stream>>>(xp, yp, out.data_ptr<double>(), n, d1, d2, tiles);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kHalf, "offdiag_sums_cuda: operands must be bf16 or fp16");
    offdiag_kernel<__half, true><<<grid, kOffThreads, 0, stream>>>(static_cast<const __half*>(x.data_ptr()),
                                                                   static_cast<const __half*>(y.data_ptr()),
                                                                   out.data_ptr<double>(), n, d1, d2, tiles);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace depthfast

namespace depthfast {

namespace {

template <bool kReduce>
void launch_syrk(const at::Tensor& x, const at::Tensor& y, float* sxx, float* syy, float* syx, double* sq,
                 bool skip_xx) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "syrk (CUDA): prepared operands must be contiguous");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "syrk (CUDA): X and Y operands must share a dtype");
  const int64_t g = x.size(0), n = x.size(1), d1 = x.size(2), d2 = y.size(2);
  const int64_t tiles = (d1 + d2 + kTile - 1) / kTile;
  const int64_t pairs = tiles * (tiles + 1) / 2;
  TORCH_CHECK(pairs < (1LL << 31) && g < 65536, "syrk (CUDA): widths or layer count too large");
  dim3 grid(static_cast<unsigned>(pairs), static_cast<unsigned>(g));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kBFloat16) {
    using T = __nv_bfloat16;
    const auto* xp = static_cast<const T*>(x.data_ptr());
    const auto* yp = static_cast<const T*>(y.data_ptr());
    if (tensor_cores_on<T>(x))
      syrk_kernel<T, kReduce, true><<<grid, kOffThreads, 0, stream>>>(xp, yp, sxx, syy, syx, sq, n, d1, d2, tiles,
                                                                      skip_xx);
    else
      syrk_kernel<T, kReduce, false><<<grid, kOffThreads, 0, stream>>>(xp, yp, sxx, syy, syx, sq, n, d1, d2, tiles,
                                                                       skip_xx);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kHalf, "syrk (CUDA): operands must be bf16 or fp16");
    // fp16 WMMA exists on every architecture the build accepts (sm_70 and up).
    syrk_kernel<__half, kReduce, true><<<grid, kOffThreads, 0, stream>>>(
        static_cast<const __half*>(x.data_ptr()), static_cast<const __half*>(y.data_ptr()), sxx, syy, syx, sq, n,
        d1, d2, tiles, skip_xx);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void syrk_accumulate_cuda(const at::Tensor& x, const at::Tensor& y, at::Tensor& sxx, at::Tensor& syy, at::Tensor& syx,
                          bool skip_xx) {
  TORCH_CHECK(sxx.is_contiguous() && syy.is_contiguous() && syx.is_contiguous() && sxx.scalar_type() == at::kFloat,
              "syrk_accumulate_cuda: statistics must be contiguous fp32");
  launch_syrk<false>(x, y, sxx.data_ptr<float>(), syy.data_ptr<float>(), syx.data_ptr<float>(), nullptr, skip_xx);
}

void gram_sqnorms_cuda(const at::Tensor& x, const at::Tensor& y, at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kDouble && out.is_contiguous(), "gram_sqnorms_cuda: out must be contiguous f64");
  launch_syrk<true>(x, y, nullptr, nullptr, nullptr, out.data_ptr<double>(), false);
}

}  // namespace depthfast
