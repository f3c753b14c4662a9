// Host-side argument checks of the meta_block / pointwise_block ops, shared by the CPU and CUDA
// implementations (the Python front end validates first with friendlier messages; these keep
// direct torch.ops.pyseg.* calls memory-safe).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "common/meta_block.h"

namespace pyseg {
namespace meta {

inline void check_float(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, name,
              " must be float16/bfloat16/float32/float64, got ", s);
}

inline void check_like(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but x is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(),
              " but x has dtype ", ref.scalar_type());
}

// True when weight (B, N, gh, gw) holds each patch's N weights contiguously (channels_last memory
// format; what a 1x1 conv on a channels_last phi emits) rather than the default plane per weight.
inline bool patch_major(const at::Tensor& weight) {
  return weight.dim() == 4 && !weight.is_contiguous() && weight.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Checks x/weight/scale/shift of meta_block and returns the weight layout. allow_patch_major: the
// kernel also reads a patch_major() weight.
inline WeightLayout check_meta_block(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                     const at::Tensor& shift, int64_t hidden, int64_t out_channels,
                                     bool allow_patch_major = false) {
  check_float(x, "x");
  check_like(x, weight, "weight");
  check_like(x, scale, "scale");
  check_like(x, shift, "shift");
  TORCH_CHECK(x.dim() == 4, "x must be (B, Cin, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, "weight must be (B, N, gh, gw), got shape ", weight.sizes());
  TORCH_CHECK(x.is_contiguous() && (weight.is_contiguous() || (allow_patch_major && patch_major(weight))),
              "x and weight must be contiguous", allow_patch_major ? " (weight: or channels_last)" : "");
  TORCH_CHECK(hidden > 0 && out_channels > 0, "hidden and out_channels must be positive, got ", hidden, ", ",
              out_channels);
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(B > 0 && Cin > 0, "x must have a non-empty batch and channels, got shape ", x.sizes());
  TORCH_CHECK(H >= 2 && W >= 2, "meta_block's reflect halo needs H, W >= 2, got ", H, "x", W);
  WeightLayout L{Cin, hidden, out_channels};
  TORCH_CHECK(weight.size(0) == B && weight.size(1) == L.numel(), "weight must have shape (", B, ", ",
              L.numel(), ", gh, gw) (hid*Cin + 9*hid + Cout*hid), got ", weight.sizes());
  const int64_t gh = weight.size(2), gw = weight.size(3);
  TORCH_CHECK(gh >= 1 && gw >= 1 && gh <= H && gw <= W, "weight grid ", gh, "x", gw,
              " must be non-empty and no larger than the input ", H, "x", W);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == L.affine_numel() && scale.is_contiguous(),
              "scale must be a contiguous (", L.affine_numel(), ",) tensor (2*hid + Cout), got ", scale.sizes());
  TORCH_CHECK(shift.dim() == 1 && shift.size(0) == L.affine_numel() && shift.is_contiguous(),
              "shift must be a contiguous (", L.affine_numel(), ",) tensor (2*hid + Cout), got ", shift.sizes());
  return L;
}

inline void check_grad_out(const at::Tensor& x, const at::Tensor& grad_out, int64_t cout) {
  check_like(x, grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) && grad_out.size(1) == cout &&
                  grad_out.size(2) == x.size(2) && grad_out.size(3) == x.size(3) && grad_out.is_contiguous(),
              "grad_out must be a contiguous (B, Cout, H, W) tensor, got ", grad_out.sizes());
}

// Gradient outputs of a meta_block / pointwise_block backward (grad_out checked against x and the
// block's cout first); output_mask = (x, weight, scale, shift). Both affine gradients come out of one
// reduction, so both are allocated when either is needed; result() returns an empty tensor for every
// gradient that was not asked for.
struct BlockGrads {
  std::array<bool, 4> mask;
  bool need_x, need_w, need_affine;
  at::Tensor gx, gw, gs, gt;
  BlockGrads(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
             const at::Tensor& shift, int64_t cout, std::array<bool, 4> output_mask)
      : mask((check_grad_out(x, grad_out, cout), output_mask)),
        need_x(output_mask[0]),
        need_w(output_mask[1]),
        need_affine(output_mask[2] || output_mask[3]),
        gx(need_x ? at::empty_like(x) : x.new_empty({0})),
        gw(need_w ? at::empty_like(weight) : weight.new_empty({0})),
        gs(need_affine ? at::empty_like(scale) : scale.new_empty({0})),
        gt(need_affine ? at::empty_like(shift) : shift.new_empty({0})) {}
  bool any() const { return need_x || need_w || need_affine; }
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result() const {
    return {gx, gw, mask[2] ? gs : gs.new_empty({0}), mask[3] ? gt : gt.new_empty({0})};
  }
};

// Checks of pointwise_block; returns Cout. allow_patch_major: the kernels also read a patch_major() weight.
inline int64_t check_pointwise_block(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                     const at::Tensor& shift, bool allow_patch_major = false) {
  check_float(x, "x");
  check_like(x, weight, "weight");
  check_like(x, scale, "scale");
  check_like(x, shift, "shift");
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "x must be (B, Cin, H, W) and weight (B, Cout*Cin, gh, gw)");
  TORCH_CHECK(x.is_contiguous() && (weight.is_contiguous() || (allow_patch_major && patch_major(weight))),
              "x and weight must be contiguous", allow_patch_major ? " (weight: or channels_last)" : "");
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(B > 0 && Cin > 0 && H > 0 && W > 0, "x must be non-empty, got shape ", x.sizes());
  TORCH_CHECK(weight.size(0) == B && weight.size(1) % Cin == 0 && weight.size(1) > 0,
              "weight must have shape (B, Cout*Cin, gh, gw) with Cin=", Cin, ", got ", weight.sizes());
  const int64_t cout = weight.size(1) / Cin;
  TORCH_CHECK(weight.size(2) >= 1 && weight.size(3) >= 1 && weight.size(2) <= H && weight.size(3) <= W,
              "weight grid must be non-empty and no larger than the input");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == cout && scale.is_contiguous() && shift.dim() == 1 &&
                  shift.size(0) == cout && shift.is_contiguous(),
              "scale and shift must be contiguous (Cout=", cout, ",) tensors, got ", scale.sizes(), ", ",
              shift.sizes());
  return cout;
}

}  // namespace meta
}  // namespace pyseg
