// CUDA launchers of pointwise_block, HyperSeg's 1x1 level block (patch-wise 1x1 conv -> affine ->
// ReLU); device code in pointwise_block_kernels.cuh. Weights in the default layout or patch-major
// (channels_last), both read in place. Forward: a block per (sample, patch, pixel tile) with the
// patch's weights staged in shared memory. Backward: the
// forward kernel also writes z and the ReLU-masked grad_out, then grad_x (thread per pixel) and
// grad W with per-patch affine partials (block per (sample, patch), entries owned by one thread),
// the partials summed in a fixed order: deterministic, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>

#include "common/meta_block.h"
#include "common/meta_block_host.h"
#include "cuda/pointwise_block_kernels.cuh"
#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

// Launch pointwise_forward_kernel: y (forward) or z and gu (backward's first pass; grad_out read).
template <typename scalar_t>
void launch_pointwise_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                              const at::Tensor& shift, int64_t Cout, scalar_t* y, at::opmath_type<scalar_t>* z,
                              at::opmath_type<scalar_t>* gu, const scalar_t* grad_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t gh = weight.size(2), gw = weight.size(3), G = gh * gw, N = weight.size(1);
  constexpr int64_t lim = std::numeric_limits<int>::max();
  TORCH_CHECK(B <= 65535, "pointwise_block (CUDA): batch must be <= 65535");
  TORCH_CHECK(N * G <= lim && Cin * H * W <= lim && Cout * H * W <= lim && H * gh <= lim && W * gw <= lim,
              "pointwise_block (CUDA): each sample's x, weight and output must have < 2^31 elements");
  const bool pm = meta::patch_major(weight);
  const int64_t np = meta::max_patch_size(H, gh) * meta::max_patch_size(W, gw);
  // tile pixels and output channels per block: a whole small patch (up to kPwTP px) and up to kPwOC
  // channels, halved (channels first, down to 16 each) while the grid has under two blocks per SM --
  // few large patches (a 1x1 grid on a small image) would otherwise leave SMs idle
  int64_t tpb = 1, ocb = std::min<int64_t>(Cout, kPwOC);
  while (tpb < std::min<int64_t>(np, kPwTP)) tpb *= 2;
  const int64_t want = 2 * gpu::props().multiProcessorCount;
  auto blocks = [&] { return B * G * div_up(np, tpb) * div_up(Cout, ocb); };
  while (blocks() < want) {
    if (ocb > 16 && ocb >= tpb / 2)
      ocb = div_up(ocb, 2);
    else if (tpb > 16)
      tpb /= 2;
    else
      break;
  }
  const int64_t ntiles = div_up(np, tpb);
  TORCH_CHECK(G * ntiles <= lim && div_up(Cout, ocb) <= 65535, "pointwise_block (CUDA): too many pixel tiles");
  // shared memory: header | ws (ocb rows of ldw) | xs (kcmax rows of PX), in acc_t
  const int64_t kcmax = std::min<int64_t>(Cin, pw_kc<acc_t>());
  int64_t px = 4;
  while (px < std::min(np, tpb)) px *= 2;
  const int64_t ldw = kcmax | 1, oxs = div_up(ocb * ldw, 4) * 4;
  const size_t smem = kPwHeader + static_cast<size_t>(oxs + kcmax * px) * sizeof(acc_t);
  const PwFwdGeom g{static_cast<int>(Cin), static_cast<int>(Cout), static_cast<int>(H), static_cast<int>(W),
                    static_cast<int>(gh), static_cast<int>(gw), static_cast<int>(pm ? 1 : G),
                    static_cast<int>(pm ? N : 1), static_cast<int>(tpb), static_cast<int>(ntiles),
                    static_cast<int>(ocb), static_cast<int>(ldw), static_cast<int>(oxs), N * G};
  gpu::allow_dynamic_smem(pointwise_forward_kernel<scalar_t>, smem);
  const dim3 grid(static_cast<unsigned>(G * ntiles), static_cast<unsigned>(B), static_cast<unsigned>(div_up(Cout, ocb)));
  PYSEG_LAUNCH(grid, kPwThreads, smem, gpu::stream(), pointwise_forward_kernel<scalar_t>)(
      x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
      shift.const_data_ptr<scalar_t>(), y, z, gu, grad_out, g);
  PYSEG_LAUNCH_CHECK();
}

at::Tensor pointwise_block_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                const at::Tensor& shift) {
  const int64_t Cout = meta::check_pointwise_block(x, weight, scale, shift, /*allow_patch_major=*/true);
  TORCH_CHECK(gpu::on_device(x), "pointwise_block (CUDA): x must be a CUDA tensor");
  const gpu::DeviceGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), Cout, x.size(2), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pointwise_block_cuda", [&] {
    launch_pointwise_forward<scalar_t>(x, weight, scale, shift, Cout, y.mutable_data_ptr<scalar_t>(), nullptr,
                                       nullptr, nullptr);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pointwise_block_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, std::array<bool, 4> output_mask) {
  const int64_t Cout = meta::check_pointwise_block(x, weight, scale, shift, /*allow_patch_major=*/true);
  TORCH_CHECK(gpu::on_device(x), "pointwise_block_backward (CUDA): x must be a CUDA tensor");
  const gpu::DeviceGuard guard(x.device());
  meta::BlockGrads R(grad_out, x, weight, scale, shift, Cout, output_mask);
  const bool pm = meta::patch_major(weight);
  if (pm && R.need_w) R.gw = at::empty(weight.sizes(), weight.options());  // grad W: the default layout
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
    launch_pointwise_forward<scalar_t>(x, weight, scale, shift, Cout, nullptr, z.mutable_data_ptr<acc_t>(),
                                       gu.mutable_data_ptr<acc_t>(), grad_out.const_data_ptr<scalar_t>());
    if (R.need_x) {
      const dim3 grid2(static_cast<unsigned>(div_up(H * W, 256)), static_cast<unsigned>(div_up(Cin, kOC)),
                       static_cast<unsigned>(B));
      PYSEG_LAUNCH(grid2, 256, 0, stream, pointwise_grad_x_kernel<scalar_t>)(
          gu.const_data_ptr<acc_t>(), weight.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
          R.gx.mutable_data_ptr<scalar_t>(), B, Cin, Cout, H, W, gh, gwid, pm ? 1 : G,
          pm ? weight.size(1) : 1);
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
