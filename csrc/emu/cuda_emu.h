// A small CUDA-semantics emulator: the device code of csrc/cuda compiled by the host compiler and
// run on the CPU (tests only; never part of pyseg._C).
//
// A launch runs the grid's blocks one after another. The threads of a block are cooperatively
// scheduled fibers (ucontext): a thread runs until it reaches __syncthreads(), a warp operation or
// its end, then the next thread runs. When every live thread is blocked, the warps whose lanes all
// met at the same warp operation complete it; when every thread waits at the same
// __syncthreads() the barrier opens. Anything else (a barrier that part of the block reaches, lanes
// of a warp at different calls, an exited lane named in a mask) is a clear error. Between barriers
// the threads run in a configurable order (forward, reverse or shuffled), so a missing barrier
// changes the result. Dynamic shared memory is poisoned (NaN bytes) at block start, starts 128-byte
// aligned, and is fenced by a guard page after its end (a read or write past the end is reported; a
// size that is not a multiple of 128 leaves a tail checked as a canary) and by a canary before its
// start (a write before it is reported). Tensor-core calls (nvcuda::wmma, emu/wmma.h) are warp
// collectives like the shuffles. Launches are checked against an H100's limits (threads
// per block, grid, dynamic shared memory up to 48 KB, or 227 KB after the opt-in
// cudaFuncSetAttribute) and recorded by kernel name.
//
// The compat part of this header defines what the kernels use of CUDA (__global__, threadIdx,
// __syncthreads, __shfl_*_sync, votes, atomics, dim3...) for the host compiler; csrc/cuda/runtime.cuh
// includes it instead of the CUDA headers when PYSEG_CUDA_EMULATOR is defined.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace pyseg {
namespace emu {

struct uint3_t {
  unsigned int x, y, z;
};

}  // namespace emu
}  // namespace pyseg

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = pyseg::emu::uint3_t;
using cudaStream_t = void*;

// Emulated device properties (an H100 SXM; the fields the launchers read).
struct cudaDeviceProp {
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  int multiProcessorCount;
  int maxThreadsPerBlock;
  int warpSize;
};

namespace pyseg {
namespace emu {

constexpr int kWarp = 32;

enum class Schedule : int { kForward = 0, kReverse = 1, kShuffled = 2 };

// The thread being run (set by the scheduler before it switches to a thread's fiber).
struct ThreadCtx {
  uint3 tid, bid;
  dim3 bdim, gdim;
  unsigned char* dyn_smem;
};
extern thread_local ThreadCtx* tls_thread;

const cudaDeviceProp& device_props();

// Block barrier (site: the source line, so that divergent barriers and disabled ones are known).
void syncthreads(const char* file, int line);

// Warp collectives. kind: 0 shfl idx, 1 up, 2 down, 3 xor, 4 all, 5 any, 6 ballot, 7 syncwarp, 8 wmma.
// `value` is in/out (up to 8 bytes); returns the vote result for kinds 4..6.
unsigned long long warp_op(int kind, unsigned mask, void* value, int nbytes, int arg, int width, int pred,
                           const char* file, int line);

// Warp-collective call with a hook (the tensor-core calls of emu/wmma.h): all 32 lanes of the warp must
// reach it at one call site; then hook(payloads of lanes 0..31) runs once and the lanes go on.
void warp_collective(void (*hook)(void* const* lanes), void* payload, const char* file, int line);

// Host side of the launcher.
struct LaunchInfo {
  const char* expr;    // the kernel expression as written at the launch site
  const char* pretty;  // __PRETTY_FUNCTION__ of the launch template (names the instantiation)
  const void* fn;      // the kernel function (for the shared-memory opt-in)
  dim3 grid, block;
  size_t smem;
};
// Runs body(thread) for every thread of the grid with CUDA's block semantics; throws c10::Error.
void run_grid(const LaunchInfo& info, void (*body)(void*), void* arg);
void set_max_dynamic_smem(const void* fn, int bytes);

template <auto Kernel, typename... P>
struct Launcher;

template <auto Kernel, typename... P>
struct Launcher<Kernel, void (*)(P...)> {
  LaunchInfo info;
  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "wrong number of kernel arguments");
    struct Pack {
      std::tuple<std::decay_t<P>...> params;
    } pack{std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    run_grid(
        info,
        [](void* p) { std::apply(Kernel, static_cast<Pack*>(p)->params); }, &pack);
  }
};

template <auto Kernel>
auto launch(const char* expr, dim3 grid, dim3 block, size_t smem) {
  return Launcher<Kernel, decltype(Kernel)>{LaunchInfo{expr, __PRETTY_FUNCTION__,
                                                       reinterpret_cast<const void*>(Kernel), grid, block, smem}};
}

template <typename T>
T shfl(int kind, unsigned mask, T v, int arg, int width, const char* file, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffle of a type over 8 bytes");
  warp_op(kind, mask, &v, sizeof(T), arg, width, 0, file, line);
  return v;
}

// Emulator control (tests): schedule, disabled barriers, launch record, counters.
void set_schedule(int schedule, int64_t seed);
void disable_barrier(const std::string& site);  // "file.cuh:LINE"; "" clears
std::string launched();                           // one "expr|instantiation" per line
void clear_launched();
std::string barrier_sites();                      // every barrier site executed so far, one per line
int64_t barrier_count();

}  // namespace emu
}  // namespace pyseg

// ---------------------------------------------------------------------------------------------
// CUDA surface for the host compiler
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

#define threadIdx (::pyseg::emu::tls_thread->tid)
#define blockIdx (::pyseg::emu::tls_thread->bid)
#define blockDim (::pyseg::emu::tls_thread->bdim)
#define gridDim (::pyseg::emu::tls_thread->gdim)
#define warpSize 32

#define __syncthreads() ::pyseg::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::pyseg::emu::warp_op(7, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 0xffffffffu, nullptr, 0, 0, 32, 0, __FILE__, __LINE__)
#define __shfl_sync(mask, v, lane, ...) ::pyseg::emu::shfl(0, mask, v, lane, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) ::pyseg::emu::shfl(1, mask, v, d, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) ::pyseg::emu::shfl(2, mask, v, d, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, m, ...) ::pyseg::emu::shfl(3, mask, v, m, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32, __FILE__, __LINE__)
#define __all_sync(mask, p) static_cast<int>(::pyseg::emu::warp_op(4, mask, nullptr, 0, 0, 32, (p) ? 1 : 0, __FILE__, __LINE__))
#define __any_sync(mask, p) static_cast<int>(::pyseg::emu::warp_op(5, mask, nullptr, 0, 0, 32, (p) ? 1 : 0, __FILE__, __LINE__))
#define __ballot_sync(mask, p) static_cast<unsigned>(::pyseg::emu::warp_op(6, mask, nullptr, 0, 0, 32, (p) ? 1 : 0, __FILE__, __LINE__))

// Atomics: the threads of the emulator never run at the same time, so a plain read-modify-write is atomic.
template <typename T, typename U>
T atomicAdd(T* a, U v) { T o = *a; *a = static_cast<T>(o + static_cast<T>(v)); return o; }
template <typename T, typename U>
T atomicSub(T* a, U v) { T o = *a; *a = static_cast<T>(o - static_cast<T>(v)); return o; }
template <typename T, typename U>
T atomicMax(T* a, U v) { T o = *a; if (static_cast<T>(v) > o) *a = static_cast<T>(v); return o; }
template <typename T, typename U>
T atomicMin(T* a, U v) { T o = *a; if (static_cast<T>(v) < o) *a = static_cast<T>(v); return o; }
template <typename T, typename U>
T atomicExch(T* a, U v) { T o = *a; *a = static_cast<T>(v); return o; }
template <typename T, typename U>
T atomicCAS(T* a, U cmp, U v) { T o = *a; if (o == static_cast<T>(cmp)) *a = static_cast<T>(v); return o; }
template <typename T, typename U>
T atomicOr(T* a, U v) { T o = *a; *a = o | static_cast<T>(v); return o; }
template <typename T, typename U>
T atomicAnd(T* a, U v) { T o = *a; *a = o & static_cast<T>(v); return o; }

using std::isnan;
using std::isinf;

namespace pyseg {
// CUDA's integer/float min and max overloads (device code calls them unqualified).
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }
}  // namespace pyseg
