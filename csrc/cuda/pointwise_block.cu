// CUDA launchers of pointwise_block, HyperSeg's 1x1 level block (patch-wise 1x1 conv -> affine ->
// ReLU); device code in pointwise_block_kernels.cuh. Forward: thread per pixel. Backward: the
// forward kernel also writes z and the ReLU-masked grad_out, then grad_x (thread per pixel) and
// grad W with per-patch affine partials (block per (sample, patch), entries owned by one thread),
// the partials summed in a fixed order: deterministic, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>

#include "common/meta_block.h"
#include "common/meta_block_host.h"
#include "cuda/pointwise_block_kernels.cuh"
#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

at::Tensor pointwise_block_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                const at::Tensor& shift) {
  const int64_t Cout = meta::check_pointwise_block(x, weight, scale, shift);
  TORCH_CHECK(gpu::on_device(x), "pointwise_block (CUDA): x must be a CUDA tensor");
  const gpu::DeviceGuard guard(x.device());
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(B <= 65535, "pointwise_block (CUDA): batch must be <= 65535");
  at::Tensor y = at::empty({B, Cout, H, W}, x.options());
  const dim3 grid(static_cast<unsigned>(div_up(H * W, 256)), static_cast<unsigned>(div_up(Cout, kOC)),
                  static_cast<unsigned>(B));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pointwise_block_cuda", [&] {
    PYSEG_LAUNCH(grid, 256, 0, gpu::stream(), pointwise_forward_kernel<scalar_t>)(
        x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
        shift.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), nullptr, nullptr, nullptr, B, Cin, Cout, H,
        W, weight.size(2), weight.size(3));
    PYSEG_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pointwise_block_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, std::array<bool, 4> output_mask) {
  const int64_t Cout = meta::check_pointwise_block(x, weight, scale, shift);
  TORCH_CHECK(gpu::on_device(x), "pointwise_block_backward (CUDA): x must be a CUDA tensor");
  const gpu::DeviceGuard guard(x.device());
  meta::BlockGrads R(grad_out, x, weight, scale, shift, Cout, output_mask);
  if (!R.any()) return R.result();
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t gh = weight.size(2), gwid = weight.size(3), G = gh * gwid;
  TORCH_CHECK(B <= 65535, "pointwise_block (CUDA): batch must be <= 65535");
  auto stream = gpu::stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pointwise_block_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor z = at::empty({B, Cout, H, W}, acc_opts);
    at::Tensor gu = at::empty({B, Cout, H, W}, acc_opts);
    const dim3 grid1(static_cast<unsigned>(div_up(H * W, 256)), static_cast<unsigned>(div_up(Cout, kOC)),
                     static_cast<unsigned>(B));
    PYSEG_LAUNCH(grid1, 256, 0, stream, pointwise_forward_kernel<scalar_t>)(
        x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
        shift.const_data_ptr<scalar_t>(), nullptr, z.mutable_data_ptr<acc_t>(), gu.mutable_data_ptr<acc_t>(),
        grad_out.const_data_ptr<scalar_t>(), B, Cin, Cout, H, W, gh, gwid);
    PYSEG_LAUNCH_CHECK();
    if (R.need_x) {
      const dim3 grid2(static_cast<unsigned>(div_up(H * W, 256)), static_cast<unsigned>(div_up(Cin, kOC)),
                       static_cast<unsigned>(B));
      PYSEG_LAUNCH(grid2, 256, 0, stream, pointwise_grad_x_kernel<scalar_t>)(
          gu.const_data_ptr<acc_t>(), weight.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
          R.gx.mutable_data_ptr<scalar_t>(), B, Cin, Cout, H, W, gh, gwid);
      PYSEG_LAUNCH_CHECK();
    }
    if (R.need_w || R.need_affine) {
      at::Tensor partial = R.need_affine ? at::empty({B * G, 2 * Cout}, acc_opts) : at::Tensor();
      PYSEG_LAUNCH(static_cast<unsigned>(B * G), 256, 0, stream, pointwise_grad_w_kernel<scalar_t>)(
          gu.const_data_ptr<acc_t>(), z.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(),
          scale.const_data_ptr<scalar_t>(), R.need_w ? R.gw.mutable_data_ptr<scalar_t>() : nullptr,
          R.need_affine ? partial.mutable_data_ptr<acc_t>() : nullptr, Cin, Cout, H, W, gh, gwid);
      PYSEG_LAUNCH_CHECK();
      if (R.need_affine) reduce_partials<scalar_t>(partial, Cout, R.gs, R.gt);
    }
  });
  return R.result();
}

}  // namespace

PYSEG_CUDA_KERNELS(pointwise_block, pointwise_block_cuda, pointwise_block_backward_cuda)

}  // namespace pyseg
