// A CPU emulator for exactly the CUDA features csrc/cka_cuda.cu uses, so that its kernels run, as
// written, on a machine without a GPU (built by tests/cuda_emu/__init__.py for test_cka_cuda_emulated.py).
//
// What it models:
//   * a launch <<<grid, block>>> runs every block in turn; the threads of a block are fibers
//     (ucontext) on one OS thread, each with its own threadIdx, switched only at barriers; one
//     warp runs until it waits at __syncthreads before the next one starts (see run_warp);
//   * __syncthreads() releases when every thread of the block waits there; __shfl_down_sync and
//     every wmma::* call are warp-collective: they release when all 32 lanes of the warp arrive.
//     A barrier that some threads of the block (or lanes of the warp) can never reach — divergent
//     control flow, or threads that already exited — is reported as an error, not a hang;
//   * __shared__ variables are static locals: one copy per kernel, shared by the block's threads
//     (blocks run one at a time, so that is the CUDA scoping);
//   * WMMA m16n16k16 with 16-bit inputs and fp32 accumulation, with the documented preconditions
//     checked: 256-bit aligned pointers, ldm a multiple of 16 bytes, both fragments' layouts;
//   * __half / __nv_bfloat16 as c10::Half / c10::BFloat16 (round-to-nearest-even conversions).
//
// What it cannot model: timing, races inside a warp or on global memory (fibers switch only at
// barriers and warp-collective calls; across warps, see run_warp for what is caught),
// the register layout of fragments (only their documented logical contents), the summation order
// inside a tensor-core MMA (fp32 here, sequential), bank conflicts, occupancy, and launch limits.
#pragma once

#include <ATen/ATen.h>  // first: the CUDA keyword macros below must not reach the torch headers
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))  // alignas may not sit between decl-specifiers

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half v) { return static_cast<float>(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }
inline __half __float2half_rn(float v) { return __half(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline dim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0}, blockDim, gridDim;

namespace c10::cuda {
struct CUDAStream {};
inline CUDAStream getCurrentCUDAStream() { return {}; }
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(expr) ((void)(expr))

// The emulated device: compute capability 9.0 unless a test sets another through
// cuda_emu_set_compute_capability (e.g. 75: a Turing GPU, no bf16 WMMA; the host code then picks
// the kernels' SIMT variants).
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76 };
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
namespace emu {
inline int& compute_capability() {
  static int cc = 90;
  return cc;
}
}  // namespace emu
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  *value = attr == cudaDevAttrComputeCapabilityMajor ? emu::compute_capability() / 10 : emu::compute_capability() % 10;
  return cudaSuccess;
}
extern "C" inline __attribute__((used, visibility("default"))) void cuda_emu_set_compute_capability(int cc) {
  emu::compute_capability() = cc;
}

namespace emu {

enum class State { kReady, kBlockBarrier, kWarpBarrier, kDone };
constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;

// One block in flight: its fibers, where each one waits, and the shuffle exchange slots.
struct Block {
  int threads = 0;
  std::vector<ucontext_t> ctx;
  std::vector<State> state;
  std::vector<uint64_t> slot;
  ucontext_t host;
  int current = -1;
  const std::function<void()>* body = nullptr;
  std::string error;
};
inline Block* g_block = nullptr;

inline void fiber_main() {
  (*g_block->body)();
  g_block->state[g_block->current] = State::kDone;  // uc_link returns to the host context
}

// Park the running fiber in state s and return to the scheduler.
inline void park(State s) {
  Block& b = *g_block;
  b.state[b.current] = s;
  swapcontext(&b.ctx[b.current], &b.host);
}

// Report a broken precondition from inside a kernel: the scheduler throws it on the host.
[[noreturn]] inline void fail(const std::string& what) {
  Block& b = *g_block;
  b.error = "thread " + std::to_string(b.current) + " of block (" + std::to_string(blockIdx.x) + "," +
            std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + "): " + what;
  b.state[b.current] = State::kDone;
  setcontext(&b.host);
  __builtin_unreachable();
}

inline void warp_collective() { park(State::kWarpBarrier); }
inline int lane() { return g_block->current % kWarp; }

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
  c10::cuda::CUDAStream stream{};
};

// Runs one warp until each of its lanes waits at __syncthreads or has exited. A warp-collective
// call releases as soon as the warp's own 32 lanes arrive, so warps drift apart exactly as far as
// CUDA allows: a warp runs to the block barrier before the next one starts. A __syncthreads
// missing between one warp's shared-memory writes and another warp's reads therefore shows up as
// wrong data, in one order of warps or the other (run_block alternates the order by block).
inline void run_warp(Block& b, const dim3& block, int w0, int w1) {
  for (;;) {
    for (int i = w0; i < w1; ++i) {
      if (b.state[i] != State::kReady) continue;
      b.current = i;
      threadIdx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
      swapcontext(&b.host, &b.ctx[i]);
      if (!b.error.empty()) throw std::runtime_error("cuda_emu: " + b.error);
    }
    int at_warp = 0;
    for (int i = w0; i < w1; ++i) at_warp += b.state[i] == State::kWarpBarrier;
    if (at_warp == 0) return;
    if (at_warp != w1 - w0)
      throw std::runtime_error("cuda_emu: warp " + std::to_string(w0 / kWarp) + " diverged: " +
                               std::to_string(at_warp) + " of " + std::to_string(w1 - w0) +
                               " lanes wait in a warp-collective call (__shfl_sync / wmma), the others do not");
    for (int i = w0; i < w1; ++i) b.state[i] = State::kReady;
  }
}

inline void run_block(Block& b, std::vector<std::unique_ptr<char[]>>& stacks, const dim3& block, bool reverse) {
  for (int i = 0; i < b.threads; ++i) {
    getcontext(&b.ctx[i]);
    b.ctx[i].uc_stack.ss_sp = stacks[i].get();
    b.ctx[i].uc_stack.ss_size = kStackBytes;
    b.ctx[i].uc_link = &b.host;
    makecontext(&b.ctx[i], fiber_main, 0);
    b.state[i] = State::kReady;
  }
  const int warps = (b.threads + kWarp - 1) / kWarp;
  for (;;) {
    for (int k = 0; k < warps; ++k) {
      const int w = reverse ? warps - 1 - k : k;
      run_warp(b, block, w * kWarp, std::min(b.threads, (w + 1) * kWarp));
    }
    int done = 0, at_block = 0;
    for (int i = 0; i < b.threads; ++i) {
      done += b.state[i] == State::kDone;
      at_block += b.state[i] == State::kBlockBarrier;
    }
    if (done == b.threads) return;
    if (at_block != b.threads)
      throw std::runtime_error("cuda_emu: __syncthreads reached by " + std::to_string(at_block) + " of " +
                               std::to_string(b.threads) + " threads (the others exited): the block would hang");
    for (int i = 0; i < b.threads; ++i) b.state[i] = State::kReady;
  }
}

// Launches per kernel name, so a test can tell which kernels a call really ran (read through
// cuda_emu_launches below); "wmma::mma_sync" counts warp-level tensor-core products.
inline std::map<std::string, int64_t>& launch_counts() {
  static std::map<std::string, int64_t> counts;
  return counts;
}

// kernel<<<cfg.grid, cfg.block>>>(args...): blocks in x-fastest order, one after another.
template <typename... Params, typename... Args>
void launch(const char* name, const LaunchConfig& cfg, void (*kernel)(Params...), Args&&... args) {
  ++launch_counts()[name];
  const int threads = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);
  if (threads <= 0 || threads > 1024) throw std::runtime_error("cuda_emu: block of " + std::to_string(threads) + " threads");
  if (cfg.grid.y > 65535 || cfg.grid.z > 65535) throw std::runtime_error("cuda_emu: grid.y/z above 65535");
  Block b;
  b.threads = threads;
  b.ctx.resize(threads);
  b.state.assign(threads, State::kDone);
  b.slot.assign(threads, 0);
  std::vector<std::unique_ptr<char[]>> stacks(threads);
  for (auto& s : stacks) s.reset(new char[kStackBytes]);
  const std::function<void()> body = [&] { kernel(args...); };
  b.body = &body;
  Block* outer = g_block;
  g_block = &b;
  blockDim = cfg.block;
  gridDim = cfg.grid;
  try {
    for (unsigned z = 0; z < cfg.grid.z; ++z)
      for (unsigned y = 0; y < cfg.grid.y; ++y)
        for (unsigned x = 0; x < cfg.grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          run_block(b, stacks, cfg.block, (x + y + z) % 2 == 1);
        }
  } catch (...) {
    g_block = outer;
    throw;
  }
  g_block = outer;
}

}  // namespace emu

// Plain C symbols of the built module, for ctypes (the module's pybind11 surface is cka.cpp's).
extern "C" inline __attribute__((used, visibility("default"))) int64_t cuda_emu_launches(const char* name) {
  const auto it = emu::launch_counts().find(name);
  return it == emu::launch_counts().end() ? 0 : it->second;
}

inline void __syncthreads() { emu::park(emu::State::kBlockBarrier); }

// Lane l receives lane l + delta's value (its own past the warp's end), as on the hardware.
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a wide type");
  if (mask != 0xffffffffu) emu::fail("__shfl_down_sync with a partial mask is not emulated");
  emu::Block& b = *emu::g_block;
  const int me = b.current;
  std::memcpy(&b.slot[me], &value, sizeof(T));
  emu::warp_collective();
  T out = value;
  if (emu::lane() + static_cast<int>(delta) < emu::kWarp) std::memcpy(&out, &b.slot[me + delta], sizeof(T));
  emu::warp_collective();  // nobody overwrites a slot before every lane has read it
  return out;
}

inline double atomicAdd(double* address, double value) {
  const double old = *address;  // fibers switch only at barriers: a read-modify-write is atomic
  *address = old + value;
  return old;
}
inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// The whole logical tile, held by lane 0 (the other lanes' copies are never read): v[r][c] is
// element (r, c) of the 16 × 16 operand A (m × k), B (k × n) or accumulator C (m × n).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "cuda_emu: only the m16n16k16 shape is emulated");
  float v[16][16];
};

namespace detail {
inline void check_operand(const void* ptr, unsigned ldm, size_t elem_bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) emu::fail(std::string(what) + ": pointer not 256-bit aligned");
  if ((ldm * elem_bytes) % 16 != 0) emu::fail(std::string(what) + ": ldm is not a multiple of 16 bytes");
}
}  // namespace detail

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  emu::warp_collective();
  if (emu::lane() == 0)
    for (auto& row : f.v)
      for (auto& e : row) e = static_cast<float>(static_cast<T>(value));
}

// A (m × k) or B (k × n) from memory: row_major reads element (r, c) at p[r·ldm + c], col_major
// at p[c·ldm + r].
template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>,
                "cuda_emu: an operand fragment needs a layout");
  static_assert(std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>,
                "cuda_emu: only 16-bit operands are emulated");
  emu::warp_collective();
  detail::check_operand(p, ldm, sizeof(T), "load_matrix_sync");
  if (emu::lane() != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = static_cast<float>(std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  emu::warp_collective();
  if (emu::lane() != 0) return;
  ++emu::launch_counts()["wmma::mma_sync"];
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];  // products of 16-bit values are exact in fp32; the sums round in fp32
      for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
      out[i][j] = s;
    }
  std::memcpy(d.v, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  emu::warp_collective();
  detail::check_operand(p, ldm, sizeof(float), "store_matrix_sync");
  if (emu::lane() != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r][c];
}

}  // namespace nvcuda::wmma
