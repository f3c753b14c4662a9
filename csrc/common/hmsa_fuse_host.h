// Host-side helpers of the hmsa_fuse op shared by csrc/cpu/hmsa_fuse.cpp and
// csrc/cuda/hmsa_fuse.cu: argument checks, packing into HmsaArgs, adjoint CSR tables.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

#include "common/hmsa_fuse.h"

namespace pyseg {

// Checks the op's contract (the Python front end gives friendlier messages first) and returns
// contiguous copies; `one` is set to the index of scale 1.0. `scale_sizes`: empty (each scale's
// grid is its logits' size) or 2 * n positive ints (h_0, w_0, h_1, w_1, ...), the grid of each scale.
inline void hmsa_check(const std::vector<at::Tensor>& logits,
                       const std::vector<at::Tensor>& attentions,
                       const std::vector<double>& scales, at::IntArrayRef out_size,
                       at::IntArrayRef scale_sizes, int* one,
                       std::vector<at::Tensor>* p, std::vector<at::Tensor>* a) {
  const int64_t n = static_cast<int64_t>(logits.size());
  TORCH_CHECK(n >= 1 && n <= HMSA_MAX_SCALES, "hmsa_fuse: 1 to ", HMSA_MAX_SCALES, " scales, got ", n);
  TORCH_CHECK(static_cast<int64_t>(attentions.size()) == n && static_cast<int64_t>(scales.size()) == n,
              "hmsa_fuse: logits, attentions and scales must have the same length");
  TORCH_CHECK(out_size.size() == 2 && out_size[0] > 0 && out_size[1] > 0, "hmsa_fuse: bad out_size");
  TORCH_CHECK(scale_sizes.empty() || static_cast<int64_t>(scale_sizes.size()) == 2 * n,
              "hmsa_fuse: scale_sizes must hold 2 ints (h, w) per scale, got ", scale_sizes.size(), " for ", n,
              " scales");
  for (const int64_t v : scale_sizes) TORCH_CHECK(v > 0, "hmsa_fuse: scale_sizes entries must be positive");
  *one = -1;
  for (int64_t k = 0; k < n; ++k) {
    if (scales[k] == 1.0) *one = static_cast<int>(k);
    if (k > 0) TORCH_CHECK(scales[k] < scales[k - 1], "hmsa_fuse: scales must be sorted strictly descending");
  }
  TORCH_CHECK(*one >= 0, "hmsa_fuse: scales must contain 1.0");
  const at::Tensor& p0 = logits[0];
  TORCH_CHECK(p0.dim() == 4, "hmsa_fuse: logits must be (B, C, h, w)");
  for (int64_t k = 0; k < n; ++k) {
    const at::Tensor& t = logits[k];
    TORCH_CHECK(t.dim() == 4 && t.size(0) == p0.size(0) && t.size(1) == p0.size(1) && t.size(2) > 0 &&
                    t.size(3) > 0,
                "hmsa_fuse: logits[", k, "] must be (B, C, h, w) with the batch and classes of logits[0]");
    TORCH_CHECK(t.dtype() == p0.dtype() && t.device() == p0.device(),
                "hmsa_fuse: all logits must share dtype and device");
    p->push_back(t.contiguous());
    if (k == 0) {
      a->push_back(at::Tensor());
      continue;
    }
    TORCH_CHECK(attentions[k].defined(), "hmsa_fuse: attentions[", k, "] is undefined");
    const at::Tensor& at_ = attentions[k];
    TORCH_CHECK(at_.dim() == 4 && at_.size(0) == p0.size(0) && at_.size(1) == 1 && at_.size(2) > 0 &&
                    at_.size(3) > 0,
                "hmsa_fuse: attentions[", k, "] must be (B, 1, h, w)");
    TORCH_CHECK(at_.dtype() == p0.dtype() && at_.device() == p0.device(),
                "hmsa_fuse: attentions must share the logits' dtype and device");
    a->push_back(at_.contiguous());
  }
}

// The forward's operands from the op's arguments (hmsa_check), shared by the CPU and CUDA launchers:
// p, a (contiguous logits and attentions), one (the index of scale 1.0) and scale_sizes (empty when
// not given).
struct HmsaOperands {
  std::vector<at::Tensor> p, a;
  int one = -1;
  at::IntArrayRef scale_sizes;
};

inline HmsaOperands hmsa_operands(at::TensorList logits, at::TensorList attentions, at::ArrayRef<double> scales,
                                  at::IntArrayRef out_size, at::OptionalIntArrayRef scale_sizes) {
  HmsaOperands o;
  o.scale_sizes = scale_sizes.has_value() ? *scale_sizes : at::IntArrayRef();
  hmsa_check(std::vector<at::Tensor>(logits.begin(), logits.end()),
             std::vector<at::Tensor>(attentions.begin(), attentions.end()),
             std::vector<double>(scales.begin(), scales.end()), out_size, o.scale_sizes, &o.one, &o.p, &o.a);
  return o;
}

// scale_sizes: empty or (h_0, w_0, h_1, w_1, ...), the grid of each scale (see hmsa_check).
template <typename scalar_t>
inline HmsaArgs<scalar_t> hmsa_pack(const std::vector<at::Tensor>& p, const std::vector<at::Tensor>& a, int one,
                                    int64_t out_h, int64_t out_w, at::IntArrayRef scale_sizes = {}) {
  HmsaArgs<scalar_t> A{};
  A.n = static_cast<int>(p.size());
  A.one = one;
  A.B = p[0].size(0);
  A.C = p[0].size(1);
  A.out_h = out_h;
  A.out_w = out_w;
  for (int k = 0; k < A.n; ++k) {
    A.p[k] = p[k].data_ptr<scalar_t>();
    A.ph[k] = p[k].size(2);
    A.pw[k] = p[k].size(3);
    A.h[k] = scale_sizes.empty() ? A.ph[k] : scale_sizes[2 * k];
    A.w[k] = scale_sizes.empty() ? A.pw[k] : scale_sizes[2 * k + 1];
    if (a[k].defined()) {
      A.a[k] = a[k].data_ptr<scalar_t>();
      A.ha[k] = a[k].size(2);
      A.wa[k] = a[k].size(3);
    } else {
      A.a[k] = nullptr;
      A.ha[k] = A.h[k];
      A.wa[k] = A.w[k];
    }
  }
  return A;
}

// Adjoint of resizing an axis of `in_size` samples to `out_size` as CSR over input indices:
// (ptr int64 [in+1], idx int64 [nnz], wt acc dtype [nnz]) on the CPU; deterministic order.
template <typename acc_t>
inline std::vector<at::Tensor> linear_adjoint_csr(int64_t in_size, int64_t out_size, at::ScalarType acc_type) {
  std::vector<int64_t> count(in_size + 1, 0);
  for (int64_t j = 0; j < out_size; ++j) {
    const LinearTap<acc_t> t = linear_tap<acc_t>(j, in_size, out_size);
    ++count[t.i0 + 1];
    ++count[t.i1 + 1];
  }
  for (int64_t i = 0; i < in_size; ++i) count[i + 1] += count[i];
  at::Tensor ptr = at::empty({in_size + 1}, at::kLong);
  at::Tensor idx = at::empty({2 * out_size}, at::kLong);
  at::Tensor wt = at::empty({2 * out_size}, at::TensorOptions().dtype(acc_type));
  int64_t* P = ptr.data_ptr<int64_t>();
  int64_t* I = idx.data_ptr<int64_t>();
  acc_t* W = wt.data_ptr<acc_t>();
  std::vector<int64_t> fill(count.begin(), count.end() - 1);
  for (int64_t i = 0; i <= in_size; ++i) P[i] = count[i];
  for (int64_t j = 0; j < out_size; ++j) {
    const LinearTap<acc_t> t = linear_tap<acc_t>(j, in_size, out_size);
    I[fill[t.i0]] = j;
    W[fill[t.i0]++] = t.l0;
    I[fill[t.i1]] = j;
    W[fill[t.i1]++] = t.l1;
  }
  return {ptr, idx, wt};
}

template <typename acc_t>
inline AxisCsr<acc_t> axis_csr(const std::vector<at::Tensor>& t) {
  return AxisCsr<acc_t>{t[0].data_ptr<int64_t>(), t[1].data_ptr<int64_t>(), t[2].data_ptr<acc_t>()};
}

inline void hmsa2_check_backward(const at::Tensor& grad_out, const at::Tensor& p1, const at::Tensor& pl,
                                 const at::Tensor& al) {
  TORCH_CHECK(grad_out.dim() == 4 && p1.dim() == 4 && pl.dim() == 4 && al.dim() == 4,
              "hmsa_fuse_backward: 4-D tensors expected");
  TORCH_CHECK(grad_out.size(0) == p1.size(0) && grad_out.size(1) == p1.size(1) && pl.size(0) == p1.size(0) &&
                  pl.size(1) == p1.size(1) && al.size(0) == p1.size(0) && al.size(1) == 1,
              "hmsa_fuse_backward: batch/classes mismatch");
  for (const at::Tensor* t : {&grad_out, &pl, &al})
    TORCH_CHECK(t->dtype() == p1.dtype() && t->device() == p1.device(),
                "hmsa_fuse_backward: dtype/device mismatch");
}

// The two-scale backward's checked inputs (contiguous), sizes and gradient outputs (allocated like
// their inputs), shared by the CPU and CUDA launchers. Scale 1: (h1, w1); the low scale: (hl, wl);
// its attention: (ha, wa); the output: (OH, OW).
struct Hmsa2Backward {
  at::Tensor g;
  std::vector<at::Tensor> p, a;
  int64_t B, C, h1, w1, hl, wl, ha, wa, OH, OW;
  at::Tensor g_p1, g_pl, g_a;

  Hmsa2Backward(const at::Tensor& grad_out, const at::Tensor& logits_one, const at::Tensor& logits_low,
                const at::Tensor& attention_low) {
    hmsa2_check_backward(grad_out, logits_one, logits_low, attention_low);
    g = grad_out.contiguous();
    p = {logits_one.contiguous(), logits_low.contiguous()};
    a = {at::Tensor(), attention_low.contiguous()};
    B = p[0].size(0), C = p[0].size(1), h1 = p[0].size(2), w1 = p[0].size(3);
    hl = p[1].size(2), wl = p[1].size(3), ha = a[1].size(2), wa = a[1].size(3), OH = g.size(2), OW = g.size(3);
    g_p1 = at::empty_like(p[0]), g_pl = at::empty_like(p[1]), g_a = at::empty_like(a[1]);
  }
};

// Per accumulation type: the axis adjoints (CSR, on the inputs' device) of the final resize (fh, fw:
// scale 1 -> output), of the low scale's upsampling (uh, uw: low -> scale 1) and of the attention's
// resize (rh, rw: attention -> low), and the accumulators gP (B, C, h1, w1), g_ua (B, h1, w1) and
// g_al (B, hl, wl).
template <typename acc_t>
struct Hmsa2BackwardWork {
  std::vector<at::Tensor> fh, fw, uh, uw, rh, rw;
  at::Tensor gP, g_ua, g_al;

  explicit Hmsa2BackwardWork(const Hmsa2Backward& S) {
    const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
    auto csr = [&](int64_t in_size, int64_t out_size) {
      std::vector<at::Tensor> v = linear_adjoint_csr<acc_t>(in_size, out_size, acc_type);
      for (at::Tensor& t : v) t = t.to(S.p[0].device(), /*non_blocking=*/false);
      return v;
    };
    fh = csr(S.h1, S.OH), fw = csr(S.w1, S.OW), uh = csr(S.hl, S.h1), uw = csr(S.wl, S.w1);
    rh = csr(S.ha, S.hl), rw = csr(S.wa, S.wl);
    const at::TensorOptions o = S.p[0].options().dtype(acc_type);
    gP = at::empty({S.B, S.C, S.h1, S.w1}, o);
    g_ua = at::empty({S.B, S.h1, S.w1}, o);
    g_al = at::empty({S.B, S.hl, S.wl}, o);
  }
};

}  // namespace pyseg
