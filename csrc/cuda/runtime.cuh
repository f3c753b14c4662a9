// The CUDA runtime surface of csrc/cuda in one place, so that the same kernels and launchers compile
// with nvcc for the GPU and with the host compiler for the CUDA emulator (csrc/emu, which defines
// PYSEG_CUDA_EMULATOR and runs them on CPU tensors).
//
//   PYSEG_LAUNCH(grid, block, smem, stream, kernel)(args...)   kernel<<<grid, block, smem, stream>>>(args...)
//   PYSEG_LAUNCH_CHECK()                                       C10_CUDA_KERNEL_LAUNCH_CHECK()
//   PYSEG_DYNAMIC_SMEM(name)                                   extern __shared__ unsigned char name[] (128-byte aligned)
//   PYSEG_CUDA_KERNELS(op, forward, backward)                 PYSEG_KERNELS(CUDA, op, forward, backward)
//   gpu::props(), gpu::stream(), gpu::DeviceGuard, gpu::on_device(t), gpu::allow_dynamic_smem(kernel, bytes)
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstddef>

#include "common/register.h"

#ifdef PYSEG_CUDA_EMULATOR
#include "emu/cuda_emu.h"

#define PYSEG_LAUNCH(grid, block, smem, stream, ...) \
  ::pyseg::emu::launch<__VA_ARGS__>(#__VA_ARGS__, dim3(grid), dim3(block), static_cast<size_t>(smem))
#define PYSEG_LAUNCH_CHECK() ((void)0)
#define PYSEG_DYNAMIC_SMEM(name) unsigned char* const name = ::pyseg::emu::tls_thread->dyn_smem
#define PYSEG_CUDA_KERNELS(op, forward, backward) \
  TORCH_LIBRARY_FRAGMENT(pyseg_emu, m) {          \
    m.def(#op, &forward);                         \
    m.def(#op "_backward", &backward);            \
  }

namespace pyseg {
namespace gpu {
inline const cudaDeviceProp& props() { return emu::device_props(); }
inline cudaStream_t stream() { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
// The emulator runs the CUDA kernels on CPU tensors.
inline bool on_device(const at::Tensor& t) { return t.device().is_cpu(); }
template <typename K>
void allow_dynamic_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024) emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), static_cast<int>(bytes));
}
}  // namespace gpu
}  // namespace pyseg

#else  // nvcc
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#define PYSEG_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define PYSEG_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define PYSEG_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define PYSEG_CUDA_KERNELS(op, forward, backward) PYSEG_KERNELS(CUDA, op, forward, backward)

namespace pyseg {
namespace gpu {
inline const cudaDeviceProp& props() { return *at::cuda::getCurrentDeviceProperties(); }
inline cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
// Dynamic shared memory above 48 KB needs a per-kernel opt-in.
template <typename K>
void allow_dynamic_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}
}  // namespace gpu
}  // namespace pyseg
#endif
