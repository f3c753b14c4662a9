// CUDA launchers of pyseg::patchwise_conv2d and pyseg::patchwise_conv2d_backward (device code in
// patchwise_conv2d_kernels.cuh).
//
//  * forward: one block per (sample, patch, tile of OT output channels). The tile's weights of
//    that patch (OT x Cin/groups*kh*kw, strided by gh*gw in global memory) are staged in dynamic
//    shared memory in the accumulation type; threads then compute (channel, pixel) pairs of the
//    patch, pixel fastest (coalesced x/y), accumulating in float (double for double). When one
//    output channel's weights do not fit the device's shared memory per block, a variant reads
//    the weights from global memory (read-only cache).
//  * dX: gather, one thread per input element: it visits the outputs that read it, each with
//    that output's patch weights. No atomics; deterministic.
//  * dW/dBias: one block per (sample, patch, tile of weight/bias entries). Each entry is a
//    reduction over the patch's pixels: a warp per entry with a fixed-order shuffle reduction for
//    patches of >= 32 pixels, a thread per entry otherwise. No atomics; deterministic.
// All index arithmetic is int64.#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <tuple>

#include "common/patch_index.h"
#include "common/patchwise_conv2d.h"
#include "cuda/patchwise_conv2d_kernels.cuh"
#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

at::Tensor patchwise_conv2d_cuda(const at::Tensor& x_, const at::Tensor& weight_,
                                 const c10::optional<at::Tensor>& bias_, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(gpu::on_device(x_), kPwConvForward, ": the CUDA kernel needs CUDA tensors, got x on ", x_.device());
  gpu::DeviceGuard guard(x_.device());
  const PwConvForward a(x_, weight_, bias_, stride, padding, dilation, groups);
  const PwConvShape& s = a.s;
  const at::Tensor &x = a.x, &weight = a.weight;
  at::Tensor y = at::empty({s.B, s.Cout, s.Hout, s.Wout}, x.options());
  if (s.B == 0) return y;

  const int64_t GG = s.gh * s.gw;
  TORCH_CHECK(s.B * GG <= std::numeric_limits<int32_t>::max(), kPwConvForward, ": too many (sample, patch) pairs: ",
              s.B * GG);
  const cudaDeviceProp* prop = &gpu::props();
  const int64_t smem_limit = static_cast<int64_t>(prop->sharedMemPerBlock);  // without opt-in
  cudaStream_t stream = gpu::stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patchwise_conv2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t per_channel = s.K * static_cast<int64_t>(sizeof(acc_t));
    const bool use_smem = per_channel <= smem_limit;
    int64_t OT = std::min<int64_t>(s.Cout, 64);
    if (use_smem) OT = std::max<int64_t>(1, std::min<int64_t>(OT, smem_limit / per_channel));
    const int64_t tiles = (s.Cout + OT - 1) / OT;
    TORCH_CHECK(tiles <= 65535, kPwConvForward, ": too many output-channel tiles: ", tiles);
    const dim3 grid(static_cast<unsigned>(s.B * GG), static_cast<unsigned>(tiles));
    const scalar_t* bptr = a.bias_ptr<scalar_t>();
    if (use_smem) {
      const size_t smem = static_cast<size_t>(OT * per_channel);
      PYSEG_LAUNCH(grid, kThreads, smem, stream, pw_forward_kernel<scalar_t, true>)(
          x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bptr, y.mutable_data_ptr<scalar_t>(), s,
          OT);
    } else {
      PYSEG_LAUNCH(grid, kThreads, 0, stream, pw_forward_kernel<scalar_t, false>)(
          x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bptr, y.mutable_data_ptr<scalar_t>(), s,
          OT);
    }
    PYSEG_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patchwise_conv2d_backward_cuda(
    const at::Tensor& grad_out_, const at::Tensor& x_, const at::Tensor& weight_, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  TORCH_CHECK(gpu::on_device(x_), kPwConvBackward, ": the CUDA kernel needs CUDA tensors, got x on ", x_.device());
  gpu::DeviceGuard guard(x_.device());
  const PwConvBackward a(grad_out_, x_, weight_, stride, padding, dilation, groups, output_mask);
  const PwConvShape& s = a.s;
  const at::Tensor &x = a.x, &weight = a.weight, &gy = a.gy, &gx = a.gx, &gw = a.gw, &gb = a.gb;
  if (s.B == 0) return a.result();
  const int64_t GG = s.gh * s.gw;
  cudaStream_t stream = gpu::stream();
  const cudaDeviceProp* prop = &gpu::props();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patchwise_conv2d_backward_cuda", [&] {
    if (output_mask[0]) {
      const int64_t total = gx.numel();
      const int64_t max_blocks = static_cast<int64_t>(prop->multiProcessorCount) * 32;
      const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks));
      PYSEG_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, pw_grad_input_kernel<scalar_t>)(
          gy.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), s);
      PYSEG_LAUNCH_CHECK();
    }
    if (output_mask[1] || output_mask[2]) {
      const int64_t CK = s.Cout * s.K;
      const int64_t e_begin = output_mask[1] ? 0 : CK;
      const int64_t e_end = output_mask[2] ? CK + s.Cout : CK;
      const int64_t ET = kThreads;
      const int64_t tiles = (e_end - e_begin + ET - 1) / ET;
      TORCH_CHECK(s.B * GG <= std::numeric_limits<int32_t>::max() && tiles <= 65535, kPwConvBackward,
                  ": grid too large (", s.B * GG, " patches x ", tiles, " entry tiles)");
      const dim3 grid(static_cast<unsigned>(s.B * GG), static_cast<unsigned>(tiles));
      PYSEG_LAUNCH(grid, kThreads, 0, stream, pw_grad_weight_kernel<scalar_t>)(
          x.const_data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(),
          output_mask[1] ? gw.mutable_data_ptr<scalar_t>() : nullptr,
          output_mask[2] ? gb.mutable_data_ptr<scalar_t>() : nullptr, s, e_begin, e_end, ET);
      PYSEG_LAUNCH_CHECK();
    }
  });
  return a.result();
}

}  // namespace

PYSEG_CUDA_KERNELS(patchwise_conv2d, patchwise_conv2d_cuda, patchwise_conv2d_backward_cuda)

}  // namespace pyseg
