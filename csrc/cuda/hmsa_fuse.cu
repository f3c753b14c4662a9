// Hierarchical multi-scale attention fusion, CUDA launchers (device code in hmsa_fuse_kernels.cuh).
// Forward: one thread per output pixel builds the exact per-pixel stencil (common/hmsa_fuse.h) in
// local memory sized to the scale set, then loops over the classes (gather-dot; scales whose stored
// logits differ from their grid (scale_sizes) are read through a bilinear sample: the stencil is
// lowered to storage taps once per pixel when it fits, else sampled per class); labels keep a
// running argmax, so no per-scale or (B, C, out_h, out_w) intermediate exists. Backward (two-scale
// training form): three gather passes over CSR adjoint tables, one thread per pixel, no atomics
// (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "common/hmsa_fuse_host.h"
#include "cuda/hmsa_fuse_kernels.cuh"
#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

constexpr int THREADS = 256;

inline int blocks_for(int64_t n) {
  const int64_t b = (n + THREADS - 1) / THREADS;
  return static_cast<int>(b < 65535 * 64 ? (b > 0 ? b : 1) : 65535 * 64);
}

at::Tensor hmsa_fuse_cuda(at::TensorList logits, at::TensorList attentions, at::ArrayRef<double> scales,
                          at::IntArrayRef out_size, bool labels, at::OptionalIntArrayRef scale_sizes_opt) {
  const auto& [p, a, one, scale_sizes] = hmsa_operands(logits, attentions, scales, out_size, scale_sizes_opt);
  TORCH_CHECK(gpu::on_device(p[0]), "hmsa_fuse (CUDA): tensors must be on a CUDA device");
  const int64_t need = hmsa_max_terms(static_cast<int>(p.size()), one);
  TORCH_CHECK(need <= HMSA_CUDA_MAX_TERMS, "hmsa_fuse (CUDA): this scale set needs a stencil of ", need,
              " terms per pixel, the kernel holds ", HMSA_CUDA_MAX_TERMS,
              " (at most 2 scales above 1.0 and 4 below); use the reference or CPU backend");
  gpu::DeviceGuard guard(p[0].device());
  const int64_t B = p[0].size(0), C = p[0].size(1), OH = out_size[0], OW = out_size[1];
  at::Tensor out = labels ? at::empty({B, OH, OW}, p[0].options().dtype(at::kLong))
                          : at::empty({B, C, OH, OW}, p[0].options());
  const int64_t total = B * OH * OW;
  auto stream = gpu::stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p[0].scalar_type(), "hmsa_fuse_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const HmsaArgs<scalar_t> A = hmsa_pack<scalar_t>(p, a, one, OH, OW, scale_sizes);
    bool any_resampled = false;
    for (int k = 0; k < A.n; ++k) any_resampled |= hmsa_resampled(A, k);
    scalar_t* ov = labels ? nullptr : out.data_ptr<scalar_t>();
    int64_t* ol = labels ? out.data_ptr<int64_t>() : nullptr;
    const bool lower = any_resampled && 4 * need <= HMSA_CUDA_MAX_TERMS;
    auto run = [&](auto capacity) {
      constexpr int kTerms = decltype(capacity)::value;
      if constexpr (4 * kTerms <= HMSA_CUDA_MAX_TERMS) {
        if (lower) {
          PYSEG_LAUNCH(blocks_for(total), THREADS, 0, stream, hmsa_fuse_kernel<scalar_t, acc_t, kTerms, true>)(
              A, ov, ol, labels);
          return;
        }
      }
      PYSEG_LAUNCH(blocks_for(total), THREADS, 0, stream, hmsa_fuse_kernel<scalar_t, acc_t, kTerms, false>)(
          A, ov, ol, labels);
    };
    if (need <= kHmsaCapacities[0])
      run(std::integral_constant<int, kHmsaCapacities[0]>());
    else if (need <= kHmsaCapacities[1])
      run(std::integral_constant<int, kHmsaCapacities[1]>());
    else
      run(std::integral_constant<int, kHmsaCapacities[2]>());
    PYSEG_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hmsa_fuse_backward_cuda(const at::Tensor& grad_out,
                                                                       const at::Tensor& logits_one,
                                                                       const at::Tensor& logits_low,
                                                                       const at::Tensor& attention_low) {
  TORCH_CHECK(gpu::on_device(logits_one), "hmsa_fuse_backward (CUDA): tensors must be on a CUDA device");
  gpu::DeviceGuard guard(logits_one.device());
  const Hmsa2Backward S(grad_out, logits_one, logits_low, attention_low);
  auto stream = gpu::stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S.p[0].scalar_type(), "hmsa_fuse_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const HmsaArgs<scalar_t> A = hmsa_pack<scalar_t>(S.p, S.a, 0, S.OH, S.OW);
    const Hmsa2BackwardWork<acc_t> T(S);
    PYSEG_LAUNCH(blocks_for(S.B * S.h1 * S.w1), THREADS, 0, stream, bwd_r1_kernel<scalar_t, acc_t>)(
        A, S.g.data_ptr<scalar_t>(), axis_csr<acc_t>(T.fh), axis_csr<acc_t>(T.fw), T.gP.data_ptr<acc_t>(),
        S.g_p1.data_ptr<scalar_t>(), T.g_ua.data_ptr<acc_t>());
    PYSEG_LAUNCH_CHECK();
    PYSEG_LAUNCH(blocks_for(S.B * S.hl * S.wl), THREADS, 0, stream, bwd_low_kernel<scalar_t, acc_t>)(
        A, T.gP.data_ptr<acc_t>(), T.g_ua.data_ptr<acc_t>(), axis_csr<acc_t>(T.uh), axis_csr<acc_t>(T.uw),
        S.g_pl.data_ptr<scalar_t>(), T.g_al.data_ptr<acc_t>());
    PYSEG_LAUNCH_CHECK();
    PYSEG_LAUNCH(blocks_for(S.B * S.ha * S.wa), THREADS, 0, stream, bwd_att_kernel<scalar_t, acc_t>)(
        A, T.g_al.data_ptr<acc_t>(), axis_csr<acc_t>(T.rh), axis_csr<acc_t>(T.rw), S.g_a.data_ptr<scalar_t>());
    PYSEG_LAUNCH_CHECK();
  });
  return {S.g_p1, S.g_pl, S.g_a};
}

}  // namespace

PYSEG_CUDA_KERNELS(hmsa_fuse, hmsa_fuse_cuda, hmsa_fuse_backward_cuda)

}  // namespace pyseg
