// Kernels with deliberate faults, for the tests of the CUDA emulator itself (tests/test_cuda_emulated.py):
// each shows that a class of CUDA bug is reported, or that the thread schedule exposes a race.
#ifndef PYSEG_CUDA_EMULATOR
#define PYSEG_CUDA_EMULATOR
#endif
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

__global__ void early_exit_barrier_kernel(int* out) {
  if (threadIdx.x < 33) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void smem_offset_kernel(int* out, int offset, bool write) {
  PYSEG_DYNAMIC_SMEM(raw);
  if (threadIdx.x == 0) {
    if (write)
      raw[offset] = 1;
    else
      out[0] = raw[offset];
  }
}

__global__ void empty_kernel(int*) {}

__global__ void warp_exited_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x == 5) return;
  v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void warp_divergent_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 2)
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  else
    v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// flags[0..7]: shfl idx, up, down, xor, ballot, any, all, atomicAdd (all lanes must agree).
__global__ void warp_ops_kernel(int* flags) {
  __shared__ int counter;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (threadIdx.x == 0) counter = 0;
  __syncthreads();
  const double v = 10.0 * lane;
  const bool ok0 = __shfl_sync(0xffffffffu, v, 7) == 70.0;
  const bool ok1 = __shfl_up_sync(0xffffffffu, v, 3) == (lane >= 3 ? 10.0 * (lane - 3) : v);
  const bool ok2 = __shfl_down_sync(0xffffffffu, lane, 4, 8) == ((lane % 8) + 4 < 8 ? lane + 4 : lane);
  const bool ok3 = __shfl_xor_sync(0xffffffffu, lane, 5) == (lane ^ 5);
  const bool ok4 = __ballot_sync(0xffffffffu, lane % 3 == 0) == 0x49249249u;
  const bool ok5 = __any_sync(0xffffffffu, lane == 17) && !__any_sync(0xffffffffu, lane > 40);
  const bool ok6 = __all_sync(0xffffffffu, lane < 32) && !__all_sync(0xffffffffu, lane < 31);
  __syncwarp();
  atomicAdd(&counter, lane);
  __syncthreads();
  const bool ok7 = counter == 2 * 496;
  const bool ok[8] = {ok0, ok1, ok2, ok3, ok4, ok5, ok6, ok7};
  for (int i = 0; i < 8; ++i)
    if (!ok[i]) flags[i] = 0;
}

// Each thread publishes a value and reads its neighbour's; without the barrier the read races.
template <bool kBarrier>
__global__ void neighbour_kernel(int* out) {
  PYSEG_DYNAMIC_SMEM(raw);
  int* buf = reinterpret_cast<int*>(raw);
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  buf[t] = t + 1;
  if (kBarrier) __syncthreads();
  out[t] = buf[(t + 1) % n];
}

at::Tensor selftest(std::string kind) {
  at::Tensor out = at::zeros({1024}, at::kInt);
  int* o = out.mutable_data_ptr<int>();
  cudaStream_t s = gpu::stream();
  if (kind == "partial_barrier") {
    PYSEG_LAUNCH(1, 64, 0, s, early_exit_barrier_kernel)(o);
  } else if (kind == "divergent_barrier") {
    PYSEG_LAUNCH(1, 64, 0, s, divergent_barrier_kernel)(o);
  } else if (kind == "smem_overflow") {
    PYSEG_LAUNCH(1, 32, 256, s, smem_offset_kernel)(o, 256, false);
  } else if (kind == "smem_underflow") {
    PYSEG_LAUNCH(1, 32, 256, s, smem_offset_kernel)(o, -8, true);
  } else if (kind == "too_many_threads") {
    PYSEG_LAUNCH(1, 1025, 0, s, empty_kernel)(o);
  } else if (kind == "grid_y") {
    PYSEG_LAUNCH(dim3(1, 70000), 32, 0, s, empty_kernel)(o);
  } else if (kind == "smem_without_optin") {
    PYSEG_LAUNCH(1, 32, 64 * 1024, s, smem_offset_kernel)(o, 0, true);
  } else if (kind == "smem_over_optin") {
    gpu::allow_dynamic_smem(smem_offset_kernel, 240 * 1024);
  } else if (kind == "warp_exited_lane") {
    PYSEG_LAUNCH(1, 32, 0, s, warp_exited_kernel)(o);
  } else if (kind == "warp_divergent") {
    PYSEG_LAUNCH(1, 32, 0, s, warp_divergent_kernel)(o);
  } else if (kind == "warp_ops") {
    out.fill_(1);
    PYSEG_LAUNCH(2, 64, 0, s, warp_ops_kernel)(o);
    return out.narrow(0, 0, 8);
  } else if (kind == "race") {
    PYSEG_LAUNCH(1, 64, 64 * sizeof(int), s, neighbour_kernel<false>)(o);
    return out.narrow(0, 0, 64);
  } else if (kind == "race_fixed") {
    PYSEG_LAUNCH(1, 64, 64 * sizeof(int), s, neighbour_kernel<true>)(o);
    return out.narrow(0, 0, 64);
  } else {
    TORCH_CHECK(false, "selftest: unknown kind ", kind);
  }
  return out;
}

}  // namespace
}  // namespace pyseg

TORCH_LIBRARY_FRAGMENT(pyseg_emu, m) { m.def("selftest(str kind) -> Tensor", &pyseg::selftest); }
