// Kernels that break the rules on purpose, and two that follow them, so the tests can show that the
// emulator (cuda_emu.h) reports what it claims to check and computes what CUDA defines.
// Entry point for ctypes: cuda_emu_selfcheck(case, out, err, err_len) → 0 ok, 1 error (message in err).
#include "cuda_emu.h"

#include <cstdio>

namespace {

__global__ void syncthreads_in_divergent_branch() {
  if (threadIdx.x < 64) __syncthreads();
}

__global__ void shuffle_in_divergent_branch(float* out) {
  float v = 1.f;
  if (threadIdx.x % 32 < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void misaligned_wmma_load() {
  __shared__ __align__(32) c10::Half tile[16 * 24];
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, c10::Half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, tile + 8, 24);  // 16 bytes past a 32-byte boundary
}

// Block sum of 0, 1, …, 127 by warp shuffles, one shared slot per warp and an atomic: out[0] = 8128.
__global__ void shuffle_block_sum(double* out) {
  __shared__ double per_warp[4];
  double v = threadIdx.x;
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) per_warp[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(out, per_warp[0] + per_warp[1] + per_warp[2] + per_warp[3]);
}

// out (16 × 16, row-major) = A·B + 1 for A row-major (16 × 16, ldm 24) and B column-major
// (element (k, j) at b[j·24 + k]), from 16-bit operands.
__global__ void wmma_product(const c10::Half* a, const c10::Half* b, float* out) {
  using namespace nvcuda;
  __shared__ __align__(32) c10::Half sa[16 * 24], sb[16 * 24];
  __shared__ __align__(32) float sc[16 * 20];
  for (int e = threadIdx.x; e < 16 * 24; e += 32) {
    sa[e] = a[e];
    sb[e] = b[e];
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, c10::Half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, c10::Half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 1.f);
  wmma::load_matrix_sync(fa, sa, 24);
  wmma::load_matrix_sync(fb, sb, 24);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(sc, acc, 20, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < 256; e += 32) out[e] = sc[(e / 16) * 20 + e % 16];
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int cuda_emu_selfcheck(const char* which, void* a, void* b,
                                                                         void* out, char* err, int err_len) {
  try {
    const std::string w = which;
    if (w == "syncthreads_in_divergent_branch")
      emu::launch(which, emu::LaunchConfig{dim3(2), dim3(128)}, syncthreads_in_divergent_branch);
    else if (w == "shuffle_in_divergent_branch")
      emu::launch(which, emu::LaunchConfig{dim3(1), dim3(64)}, shuffle_in_divergent_branch, static_cast<float*>(out));
    else if (w == "misaligned_wmma_load")
      emu::launch(which, emu::LaunchConfig{dim3(1), dim3(32)}, misaligned_wmma_load);
    else if (w == "shuffle_block_sum")
      emu::launch(which, emu::LaunchConfig{dim3(3), dim3(128)}, shuffle_block_sum, static_cast<double*>(out));
    else if (w == "wmma_product")
      emu::launch(which, emu::LaunchConfig{dim3(1), dim3(32)}, wmma_product, static_cast<const c10::Half*>(a),
                  static_cast<const c10::Half*>(b), static_cast<float*>(out));
    else
      throw std::runtime_error("unknown self-check " + w);
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s", e.what());
    return 1;
  }
  return 0;
}
