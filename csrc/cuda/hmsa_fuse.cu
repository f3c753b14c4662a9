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
  const at::IntArrayRef scale_sizes = scale_sizes_opt.has_value() ? *scale_sizes_opt : at::IntArrayRef();
  std::vector<at::Tensor> lg(logits.begin(), logits.end());
  std::vector<at::Tensor> att(attentions.begin(), attentions.end());
  std::vector<double> sc(scales.begin(), scales.end());
  int one = -1;
  std::vector<at::Tensor> p, a;
  hmsa_check(lg, att, sc, out_size, scale_sizes, &one, &p, &a);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> hmsa_fuse_backward_cuda(const at::Tensor& grad_out_,
                                                                       const at::Tensor& logits_one,
                                                                       const at::Tensor& logits_low,
                                                                       const at::Tensor& attention_low) {
  hmsa2_check_backward(grad_out_, logits_one, logits_low, attention_low);
  TORCH_CHECK(gpu::on_device(logits_one), "hmsa_fuse_backward (CUDA): tensors must be on a CUDA device");
  gpu::DeviceGuard guard(logits_one.device());
  const at::Tensor g = grad_out_.contiguous();
  std::vector<at::Tensor> p = {logits_one.contiguous(), logits_low.contiguous()};
  std::vector<at::Tensor> a = {at::Tensor(), attention_low.contiguous()};
  const int64_t B = p[0].size(0), C = p[0].size(1);
  const int64_t h1 = p[0].size(2), w1 = p[0].size(3), hl = p[1].size(2), wl = p[1].size(3);
  const int64_t ha = a[1].size(2), wa = a[1].size(3), OH = g.size(2), OW = g.size(3);
  at::Tensor g_p1 = at::empty_like(p[0]), g_pl = at::empty_like(p[1]), g_a = at::empty_like(a[1]);
  auto stream = gpu::stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p[0].scalar_type(), "hmsa_fuse_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const HmsaArgs<scalar_t> A = hmsa_pack<scalar_t>(p, a, 0, OH, OW);
    auto dev = [&](std::vector<at::Tensor> v) {
      for (at::Tensor& t : v) t = t.to(p[0].device(), /*non_blocking=*/false);
      return v;
    };
    const auto fh = dev(linear_adjoint_csr<acc_t>(h1, OH, acc_type)), fw = dev(linear_adjoint_csr<acc_t>(w1, OW, acc_type));
    const auto uh = dev(linear_adjoint_csr<acc_t>(hl, h1, acc_type)), uw = dev(linear_adjoint_csr<acc_t>(wl, w1, acc_type));
    const auto rh = dev(linear_adjoint_csr<acc_t>(ha, hl, acc_type)), rw = dev(linear_adjoint_csr<acc_t>(wa, wl, acc_type));
    at::Tensor gP = at::empty({B, C, h1, w1}, p[0].options().dtype(acc_type));
    at::Tensor g_ua = at::empty({B, h1, w1}, p[0].options().dtype(acc_type));
    at::Tensor g_al = at::empty({B, hl, wl}, p[0].options().dtype(acc_type));
    PYSEG_LAUNCH(blocks_for(B * h1 * w1), THREADS, 0, stream, bwd_r1_kernel<scalar_t, acc_t>)(
        A, g.data_ptr<scalar_t>(), axis_csr<acc_t>(fh), axis_csr<acc_t>(fw), gP.data_ptr<acc_t>(),
        g_p1.data_ptr<scalar_t>(), g_ua.data_ptr<acc_t>());
    PYSEG_LAUNCH_CHECK();
    PYSEG_LAUNCH(blocks_for(B * hl * wl), THREADS, 0, stream, bwd_low_kernel<scalar_t, acc_t>)(
        A, gP.data_ptr<acc_t>(), g_ua.data_ptr<acc_t>(), axis_csr<acc_t>(uh), axis_csr<acc_t>(uw),
        g_pl.data_ptr<scalar_t>(), g_al.data_ptr<acc_t>());
    PYSEG_LAUNCH_CHECK();
    PYSEG_LAUNCH(blocks_for(B * ha * wa), THREADS, 0, stream, bwd_att_kernel<scalar_t, acc_t>)(
        A, g_al.data_ptr<acc_t>(), axis_csr<acc_t>(rh), axis_csr<acc_t>(rw), g_a.data_ptr<scalar_t>());
    PYSEG_LAUNCH_CHECK();
  });
  return {g_p1, g_pl, g_a};
}

}  // namespace

PYSEG_CUDA_OPS(m) {
  PYSEG_CUDA_OP(m, "hmsa_fuse", &hmsa_fuse_cuda);
  PYSEG_CUDA_OP(m, "hmsa_fuse_backward", &hmsa_fuse_backward_cuda);
}

}  // namespace pyseg
