// Shapes, argument checks and index math of pyseg::patchwise_conv2d shared by the CPU (.cpp)
// and CUDA (.cu) backends. The PYSEG_HD helpers run on host and device; the checks are host-only.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <array>
#include <cstdint>
#include <tuple>

#include "common/patch_index.h"

namespace pyseg {

// Every size the kernels need, all int64 (products such as B*Cout*Hout*Wout may exceed 2^31).
struct PwConvShape {
  int64_t B, Cin, H, W;        // input
  int64_t Cout, Cg, Og, G;     // Cg = Cin/groups (input channels per group), Og = Cout/groups
  int64_t kh, kw, gh, gw;      // kernel and patch grid
  int64_t Hout, Wout;
  int64_t sh, sw, dh, dw;      // stride, dilation
  int64_t pt, pb, pl, pr;      // zero padding (top, bottom, left, right)
  int64_t K;                   // Cg*kh*kw: weights per output channel and patch
};

// Range [lo, hi) of output coordinates o in [o_begin, o_end) whose input coordinate
// o*stride + offset lies in [0, n). offset = tap*dilation - pad_before.
PYSEG_HD void valid_out_range(int64_t o_begin, int64_t o_end, int64_t stride, int64_t offset, int64_t n,
                              int64_t* lo, int64_t* hi) {
  // o*stride + offset >= 0  <=>  o >= ceil(-offset / stride)
  int64_t a = (-offset <= 0) ? 0 : div_up(-offset, stride);
  // o*stride + offset <= n-1  <=>  o <= floor((n-1-offset)/stride)
  int64_t b = floor_div(n - 1 - offset, stride) + 1;
  *lo = a > o_begin ? a : o_begin;
  *hi = b < o_end ? b : o_end;
  if (*hi < *lo) *hi = *lo;
}

// Output coordinate that reads input coordinate `in` through kernel tap `tap`, or -1 if none:
// o*stride - pad_before + tap*dilation == in, 0 <= o < out.
PYSEG_HD int64_t out_from_in(int64_t in, int64_t tap, int64_t stride, int64_t dilation, int64_t pad_before,
                             int64_t out) {
  int64_t t = in + pad_before - tap * dilation;
  if (t < 0 || t % stride != 0) return -1;
  t /= stride;
  return t < out ? t : -1;
}

// ---- host-side argument checks (TORCH_CHECK; the ops can be called directly via torch.ops) ----
inline PwConvShape pw_check_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (B, Cin, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 7, op, ": weight must be 7-D (B, Cout, Cin/groups, kh, kw, gh, gw), got shape ",
              weight.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(), " but x is on ", x.device());
  TORCH_CHECK(stride.size() == 2, op, ": stride must have 2 values, got ", stride.size());
  TORCH_CHECK(dilation.size() == 2, op, ": dilation must have 2 values, got ", dilation.size());
  TORCH_CHECK(padding.size() == 4, op, ": padding must have 4 values (top, bottom, left, right), got ",
              padding.size());
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be >= 1, got ", dilation);
  for (auto p : padding) TORCH_CHECK(p >= 0, op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);

  PwConvShape s;
  s.B = x.size(0);
  s.Cin = x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);
  TORCH_CHECK(s.Cin > 0 && s.H > 0 && s.W > 0, op, ": x must have non-empty channel and spatial dims, got shape ",
              x.sizes());
  TORCH_CHECK(s.Cin % groups == 0, op, ": x has ", s.Cin, " channels, not divisible by groups=", groups);
  s.G = groups;
  s.Cg = s.Cin / groups;
  TORCH_CHECK(weight.size(0) == s.B, op, ": weight has batch ", weight.size(0), " but x has batch ", s.B);
  s.Cout = weight.size(1);
  TORCH_CHECK(weight.size(2) == s.Cg, op, ": weight must have shape (B, Cout, Cin/groups=", s.Cg,
              ", kh, kw, gh, gw), got ", weight.sizes());
  TORCH_CHECK(s.Cout > 0 && s.Cout % groups == 0, op, ": weight has Cout=", s.Cout,
              " output channels; it must be positive and divisible by groups=", groups);
  s.Og = s.Cout / groups;
  s.kh = weight.size(3);
  s.kw = weight.size(4);
  s.gh = weight.size(5);
  s.gw = weight.size(6);
  TORCH_CHECK(s.kh > 0 && s.kw > 0 && s.gh > 0 && s.gw > 0, op, ": weight has an empty dimension: ",
              weight.sizes());
  s.sh = stride[0];
  s.sw = stride[1];
  s.dh = dilation[0];
  s.dw = dilation[1];
  s.pt = padding[0];
  s.pb = padding[1];
  s.pl = padding[2];
  s.pr = padding[3];
  s.Hout = conv_out_size(s.H, s.pt, s.pb, s.kh, s.sh, s.dh);
  s.Wout = conv_out_size(s.W, s.pl, s.pr, s.kw, s.sw, s.dw);
  TORCH_CHECK(s.H + s.pt + s.pb >= s.dh * (s.kh - 1) + 1 && s.W + s.pl + s.pr >= s.dw * (s.kw - 1) + 1, op,
              ": padded input ", s.H + s.pt + s.pb, "x", s.W + s.pl + s.pr, " is smaller than the dilated kernel ",
              s.dh * (s.kh - 1) + 1, "x", s.dw * (s.kw - 1) + 1);
  TORCH_CHECK(s.gh <= s.Hout && s.gw <= s.Wout, op, ": weight grid ", s.gh, "x", s.gw,
              " is larger than the output ", s.Hout, "x", s.Wout, "; every patch needs at least one pixel");
  s.K = s.Cg * s.kh * s.kw;
  return s;
}

inline void pw_check_bias(const char* op, const PwConvShape& s, const at::Tensor& x,
                          const c10::optional<at::Tensor>& bias) {
  if (!bias.has_value() || !bias->defined()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.dim() == 4 && b.size(0) == s.B && b.size(1) == s.Cout && b.size(2) == s.gh && b.size(3) == s.gw,
              op, ": bias must have shape (B, Cout, gh, gw) = (", s.B, ", ", s.Cout, ", ", s.gh, ", ", s.gw,
              "), got ", b.sizes());
  TORCH_CHECK(b.scalar_type() == x.scalar_type(), op, ": bias has dtype ", b.scalar_type(), " but x has dtype ",
              x.scalar_type());
  TORCH_CHECK(b.device() == x.device(), op, ": bias is on ", b.device(), " but x is on ", x.device());
}

inline void pw_check_grad_out(const char* op, const PwConvShape& s, const at::Tensor& x, const at::Tensor& g) {
  TORCH_CHECK(g.dim() == 4 && g.size(0) == s.B && g.size(1) == s.Cout && g.size(2) == s.Hout &&
                  g.size(3) == s.Wout,
              op, ": grad_out must have shape (B, Cout, Hout, Wout) = (", s.B, ", ", s.Cout, ", ", s.Hout, ", ",
              s.Wout, "), got ", g.sizes());
  TORCH_CHECK(g.scalar_type() == x.scalar_type(), op, ": grad_out has dtype ", g.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(g.device() == x.device(), op, ": grad_out is on ", g.device(), " but x is on ", x.device());
}

constexpr const char* kPwConvForward = "pyseg::patchwise_conv2d";
constexpr const char* kPwConvBackward = "pyseg::patchwise_conv2d_backward";

// True when the 7-D weight is stored patch-major: each patch's Cout*Cin/groups*kh*kw weights
// contiguous, patches of a sample contiguous (the memory of a (B, gh, gw, Cout, Cin/groups, kh, kw)
// tensor; a flat (B, N, gh, gw) weight in channels_last viewed as 7-D).
inline bool pw_patch_major(const at::Tensor& w) {
  return w.dim() == 7 && !w.is_contiguous() && w.permute({0, 5, 6, 1, 2, 3, 4}).is_contiguous();
}

// The forward's operands, checked (pw_check_args, pw_check_bias) and contiguous; bias undefined when
// absent. Shared by the CPU and CUDA launchers (each checks the device first). allow_patch_major: a
// patch-major weight (pw_patch_major) is kept as it is (the CUDA kernel reads both layouts through
// the strides w_entry / w_patch); otherwise the weight is made contiguous.
struct PwConvForward {
  PwConvShape s;
  at::Tensor x, weight, bias;
  int64_t w_entry = 0, w_patch = 0;  // element distance between consecutive weight entries / patches
  PwConvForward(const at::Tensor& x_, const at::Tensor& weight_, const c10::optional<at::Tensor>& bias_,
                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                bool allow_patch_major = false)
      : s(pw_check_args(kPwConvForward, x_, weight_, stride, padding, dilation, groups)) {
    pw_check_bias(kPwConvForward, s, x_, bias_);
    x = x_.contiguous();
    const bool pm = allow_patch_major && pw_patch_major(weight_);
    weight = pm ? weight_ : weight_.contiguous();
    w_entry = pm ? 1 : s.gh * s.gw;
    w_patch = pm ? s.Cout * s.K : 1;
    if (bias_.has_value() && bias_->defined()) bias = bias_->contiguous();
  }
  template <typename scalar_t>
  const scalar_t* bias_ptr() const {
    return bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  }
};

// The backward's operands, checked and contiguous (gy: grad_out), and its gradients gx, gw, gb
// (allocated where output_mask asks for them, else empty). Shared by the CPU and CUDA launchers.
struct PwConvBackward {
  PwConvShape s;
  at::Tensor x, weight, gy, gx, gw, gb;
  PwConvBackward(const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& weight_, at::IntArrayRef stride,
                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask)
      : s(pw_check_args(kPwConvBackward, x_, weight_, stride, padding, dilation, groups)) {
    pw_check_grad_out(kPwConvBackward, s, x_, grad_out);
    x = x_.contiguous();
    weight = weight_.contiguous();
    gy = grad_out.contiguous();
    gx = output_mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : x.new_empty({0});
    gw = output_mask[1] ? at::empty_like(weight, at::MemoryFormat::Contiguous) : weight.new_empty({0});
    gb = output_mask[2] ? at::empty({s.B, s.Cout, s.gh, s.gw}, weight.options()) : weight.new_empty({0});
  }
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result() const { return {gx, gw, gb}; }
};

}  // namespace pyseg
