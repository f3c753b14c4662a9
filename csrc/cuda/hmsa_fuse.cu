// Hierarchical multi-scale attention fusion, CUDA kernels.
// Forward: one thread per output pixel builds the exact per-pixel stencil (common/hmsa.h) in
// local memory, then loops over the classes (gather-dot; scales whose stored logits differ from
// their grid (scale_sizes) are read through a bilinear sample: the stencil is lowered to storage
// taps once per pixel when it fits, else sampled per class); labels keep a running argmax, so no
// per-scale or (B, C, out_h, out_w) intermediate exists. Backward (two-scale training form):
// three gather passes over CSR adjoint tables, one thread per pixel, no atomics (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "common/hmsa_host.h"

namespace pyseg {
namespace {

// Stencil capacity per thread: 4 * (21 + 4 * 4) = 148 covers up to 2 scales above 1.0 and
// 4 below; hmsa_max_terms is checked on the host.
constexpr int HMSA_CUDA_MAX_TERMS = 160;
constexpr int THREADS = 256;

template <typename acc_t>
__device__ __forceinline__ bool better(acc_t v, acc_t best) {
  return v > best || (isnan(v) && !isnan(best));
}

// LOWER: some scale is resampled (scale_sizes) and its lowered stencil fits: lower it to storage
// taps once per pixel (hmsa_lower_stencil) so each class is a plain gather-dot. Otherwise grid
// terms are evaluated directly (hmsa_eval samples resampled storage per class).
template <typename scalar_t, typename acc_t, bool LOWER>
__global__ void hmsa_fuse_kernel(const HmsaArgs<scalar_t> A, scalar_t* __restrict__ out_v,
                                 int64_t* __restrict__ out_l, bool labels) {
  const int64_t total = A.B * A.out_h * A.out_w;
  const int64_t oplane = A.out_h * A.out_w;
  HmsaTerm<acc_t> terms[HMSA_CUDA_MAX_TERMS];
  HmsaTerm<acc_t> lowered[LOWER ? HMSA_CUDA_MAX_TERMS : 1];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = i / oplane, pix = i % oplane;
    const int64_t oy = pix / A.out_w, ox = pix % A.out_w;
    int64_t nt = hmsa_build_stencil<acc_t>(A, b, oy, ox, terms);
    if constexpr (LOWER) nt = hmsa_lower_stencil<acc_t>(A, terms, nt, lowered);
    auto value = [&](int64_t c) -> acc_t {
      if constexpr (LOWER)
        return hmsa_eval_storage<acc_t>(A, b, c, lowered, nt);
      else
        return hmsa_eval<acc_t>(A, b, c, terms, nt);
    };
    if (labels) {
      acc_t best = static_cast<acc_t>(static_cast<scalar_t>(value(0)));
      int64_t arg = 0;
      for (int64_t c = 1; c < A.C; ++c) {
        const acc_t v = static_cast<acc_t>(static_cast<scalar_t>(value(c)));
        if (better(v, best)) {
          best = v;
          arg = c;
        }
      }
      out_l[i] = arg;
    } else {
      for (int64_t c = 0; c < A.C; ++c) out_v[(b * A.C + c) * oplane + pix] = static_cast<scalar_t>(value(c));
    }
  }
}

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
  TORCH_CHECK(p[0].is_cuda(), "hmsa_fuse (CUDA): tensors must be on a CUDA device");
  const int64_t need = hmsa_max_terms(static_cast<int>(p.size()), one);
  TORCH_CHECK(need <= HMSA_CUDA_MAX_TERMS, "hmsa_fuse (CUDA): this scale set needs a stencil of ", need,
              " terms per pixel, the kernel holds ", HMSA_CUDA_MAX_TERMS,
              " (at most 2 scales above 1.0 and 4 below); use the reference or CPU backend");
  c10::cuda::CUDAGuard guard(p[0].device());
  const int64_t B = p[0].size(0), C = p[0].size(1), OH = out_size[0], OW = out_size[1];
  at::Tensor out = labels ? at::empty({B, OH, OW}, p[0].options().dtype(at::kLong))
                          : at::empty({B, C, OH, OW}, p[0].options());
  const int64_t total = B * OH * OW;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p[0].scalar_type(), "hmsa_fuse_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const HmsaArgs<scalar_t> A = hmsa_pack<scalar_t>(p, a, one, OH, OW, scale_sizes);
    bool any_resampled = false;
    for (int k = 0; k < A.n; ++k) any_resampled |= hmsa_resampled(A, k);
    scalar_t* ov = labels ? nullptr : out.data_ptr<scalar_t>();
    int64_t* ol = labels ? out.data_ptr<int64_t>() : nullptr;
    if (any_resampled && 4 * need <= HMSA_CUDA_MAX_TERMS)
      hmsa_fuse_kernel<scalar_t, acc_t, true><<<blocks_for(total), THREADS, 0, stream>>>(A, ov, ol, labels);
    else
      hmsa_fuse_kernel<scalar_t, acc_t, false><<<blocks_for(total), THREADS, 0, stream>>>(A, ov, ol, labels);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename scalar_t, typename acc_t>
__global__ void bwd_r1_kernel(const HmsaArgs<scalar_t> A, const scalar_t* __restrict__ g, const AxisCsr<acc_t> ch,
                              const AxisCsr<acc_t> cw, acc_t* gP, scalar_t* g_p1, acc_t* g_ua) {
  const int64_t h = A.h[0], w = A.w[0], total = A.B * h * w;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    hmsa2_bwd_r1_pixel<acc_t>(A, g, ch, cw, i / (h * w), (i / w) % h, i % w, gP, g_p1, g_ua);
}

template <typename scalar_t, typename acc_t>
__global__ void bwd_low_kernel(const HmsaArgs<scalar_t> A, const acc_t* gP, const acc_t* g_ua,
                               const AxisCsr<acc_t> ch, const AxisCsr<acc_t> cw, scalar_t* g_pl, acc_t* g_al) {
  const int64_t h = A.h[1], w = A.w[1], total = A.B * h * w;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    hmsa2_bwd_low_pixel<acc_t>(A, gP, g_ua, ch, cw, i / (h * w), (i / w) % h, i % w, g_pl, g_al);
}

template <typename scalar_t, typename acc_t>
__global__ void bwd_att_kernel(const HmsaArgs<scalar_t> A, const acc_t* g_al, const AxisCsr<acc_t> ch,
                               const AxisCsr<acc_t> cw, scalar_t* g_a) {
  const int64_t h = A.ha[1], w = A.wa[1], total = A.B * h * w;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    hmsa2_bwd_att_pixel<acc_t>(A, g_al, ch, cw, i / (h * w), (i / w) % h, i % w, g_a);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hmsa_fuse_backward_cuda(const at::Tensor& grad_out_,
                                                                       const at::Tensor& logits_one,
                                                                       const at::Tensor& logits_low,
                                                                       const at::Tensor& attention_low) {
  hmsa2_check_backward(grad_out_, logits_one, logits_low, attention_low);
  TORCH_CHECK(logits_one.is_cuda(), "hmsa_fuse_backward (CUDA): tensors must be on a CUDA device");
  c10::cuda::CUDAGuard guard(logits_one.device());
  const at::Tensor g = grad_out_.contiguous();
  std::vector<at::Tensor> p = {logits_one.contiguous(), logits_low.contiguous()};
  std::vector<at::Tensor> a = {at::Tensor(), attention_low.contiguous()};
  const int64_t B = p[0].size(0), C = p[0].size(1);
  const int64_t h1 = p[0].size(2), w1 = p[0].size(3), hl = p[1].size(2), wl = p[1].size(3);
  const int64_t ha = a[1].size(2), wa = a[1].size(3), OH = g.size(2), OW = g.size(3);
  at::Tensor g_p1 = at::empty_like(p[0]), g_pl = at::empty_like(p[1]), g_a = at::empty_like(a[1]);
  auto stream = at::cuda::getCurrentCUDAStream();
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
    bwd_r1_kernel<scalar_t, acc_t><<<blocks_for(B * h1 * w1), THREADS, 0, stream>>>(
        A, g.data_ptr<scalar_t>(), axis_csr<acc_t>(fh), axis_csr<acc_t>(fw), gP.data_ptr<acc_t>(),
        g_p1.data_ptr<scalar_t>(), g_ua.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bwd_low_kernel<scalar_t, acc_t><<<blocks_for(B * hl * wl), THREADS, 0, stream>>>(
        A, gP.data_ptr<acc_t>(), g_ua.data_ptr<acc_t>(), axis_csr<acc_t>(uh), axis_csr<acc_t>(uw),
        g_pl.data_ptr<scalar_t>(), g_al.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bwd_att_kernel<scalar_t, acc_t><<<blocks_for(B * ha * wa), THREADS, 0, stream>>>(
        A, g_al.data_ptr<acc_t>(), axis_csr<acc_t>(rh), axis_csr<acc_t>(rw), g_a.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_p1, g_pl, g_a};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyseg, CUDA, m) {
  m.impl("hmsa_fuse", &hmsa_fuse_cuda);
  m.impl("hmsa_fuse_backward", &hmsa_fuse_backward_cuda);
}

}  // namespace pyseg
