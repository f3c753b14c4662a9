// C++ CPU kernels of pyseg::pointwise_block, HyperSeg's 1x1 level block: patch-wise 1x1 conv ->
// affine -> ReLU.
//
// Forward: one work item = one (sample, output channel) over the whole image (the patch row's
// weights are reused along the columns). Backward: one work item = one (sample, patch): it
// recomputes z = W x per row, writes its own weight gradient and grad_x pixels (no races) and
// per-item affine partials summed in a fixed order: deterministic, no atomics.
//
// The per-item compute lives in pointwise_block_patch.h, compiled for the baseline ISA and for
// AVX2+FMA (cpu/isa_dispatch.h; cpu_isa.h picks one at run time).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "common/meta_block.h"
#include "common/meta_block_host.h"
#include "common/register.h"
#include "cpu/block_common.h"
#include "cpu/cpu_isa.h"
#include "cpu/output_alloc.h"

namespace pyseg {
namespace {

using cpu_block::PatchGeom;
using cpu_block::round_up;
using cpu_block::sum_affine_partials;

// Arguments and scratch of pointwise_block work items.
struct PwArgs {
  int64_t cin, cout, H, W, gh, gw;
  int64_t pw;           // forward: the patch width when all are equal (W % gw == 0), else 0
  const int64_t* colb;  // forward: (gw + 1,) first image column of every patch column, then W
};

template <typename acc_t>
struct PwScratch {
  std::vector<acc_t> wexp, acc, w, wt, gwacc, xr, z, gz, gxr;
  PwScratch(int64_t cin, int64_t cout, int64_t W, int64_t PW, int64_t nr, bool backward) {
    if (!backward) {
      wexp.resize(cin * W);
      acc.resize(W);
      return;
    }
    const int64_t lp = round_up(PW, nr);
    w.resize(cin * cout);
    wt.resize(cin * cout);
    gwacc.resize(cin * cout);
    xr.resize(cin * lp);
    z.resize(cout * lp);
    gz.resize(cout * lp);
    gxr.resize(cin * lp);
  }
};

// The per-item compute (cpu/pointwise_block_patch.h), compiled per instruction set.
#define PYSEG_ISA_HEADER "cpu/pointwise_block_patch.h"
#include "cpu/isa_dispatch.h"
#undef PYSEG_ISA_HEADER

constexpr int64_t kNR = isa_base::kNR;

template <typename scalar_t>
void pointwise_forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                              const at::Tensor& shift, int64_t Cout, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t gh = weight.size(2), gw = weight.size(3);
  std::vector<int64_t> colb(gw + 1);
  for (int64_t j = 0; j <= gw; ++j) colb[j] = patch_begin(j, gw, W);
  const int64_t pw = W % gw == 0 ? W / gw : 0;
  const PwArgs A{Cin, Cout, H, W, gh, gw, pw, colb.data()};
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  // x as (B, H, Cin, pw, gw) (equal patch widths) or (B, H, Cin, W); weights in acc_t
  const at::Tensor xt = (pw > 0 ? x.view({B, Cin, H, gw, pw}).permute({0, 2, 1, 4, 3}) : x.transpose(1, 2))
                            .to(acc_type)
                            .contiguous();
  const at::Tensor wt = weight.to(acc_type).contiguous();
  const acc_t* xtp = xt.const_data_ptr<acc_t>();
  const acc_t* wp = wt.const_data_ptr<acc_t>();
  const scalar_t* scp = scale.const_data_ptr<scalar_t>();
  const scalar_t* shp = shift.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const bool avx2 = use_avx2();
  at::parallel_for(0, B * Cout, 1, [&](int64_t begin, int64_t end) {
    PwScratch<acc_t> S(Cin, Cout, W, 0, kNR, false);
    for (int64_t item = begin; item < end; ++item)
      PYSEG_ISA_CALL(avx2, pointwise_forward_item, A, xtp, wp, scp, shp, item, S, yp);
  });
}

template <typename scalar_t>
void pointwise_backward_kernel(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& scale, const at::Tensor& shift, int64_t Cout, bool need_x,
                               bool need_w, bool need_affine, at::Tensor& gx, at::Tensor& gwt, at::Tensor& gs,
                               at::Tensor& gt) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t gh = weight.size(2), gw = weight.size(3), G = gh * gw;
  const int64_t PW = meta::max_patch_size(W, gw);
  const PwArgs A{Cin, Cout, H, W, gh, gw, 0, nullptr};
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  const scalar_t* gyp = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* scp = scale.const_data_ptr<scalar_t>();
  const scalar_t* shp = shift.const_data_ptr<scalar_t>();
  scalar_t* gxp = need_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gwp = need_w ? gwt.mutable_data_ptr<scalar_t>() : nullptr;
  std::vector<acc_t> partial(need_affine ? B * G * 2 * Cout : 0);
  const bool avx2 = use_avx2();
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    PwScratch<acc_t> S(Cin, Cout, W, PW, kNR, true);
    for (int64_t item = begin; item < end; ++item) {
      acc_t* ps = need_affine ? partial.data() + item * 2 * Cout : nullptr;
      PYSEG_ISA_CALL(avx2, pointwise_backward_item, A, xp, wp, scp, shp, gyp, item, S, gxp, gwp, ps);
    }
  });
  if (need_affine) sum_affine_partials<scalar_t>(partial, B * G, Cout, gs, gt);
}

at::Tensor pointwise_block_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                               const at::Tensor& shift) {
  const int64_t Cout = meta::check_pointwise_block(x, weight, scale, shift);
  at::Tensor y = empty_output({x.size(0), Cout, x.size(2), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pointwise_block_cpu", [&] {
    pointwise_forward_kernel<scalar_t>(x, weight, scale, shift, Cout, y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pointwise_block_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, std::array<bool, 4> output_mask) {
  const int64_t Cout = meta::check_pointwise_block(x, weight, scale, shift);
  meta::BlockGrads R(grad_out, x, weight, scale, shift, Cout, output_mask);
  if (R.any()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pointwise_block_backward_cpu", [&] {
      pointwise_backward_kernel<scalar_t>(grad_out, x, weight, scale, shift, Cout, R.need_x, R.need_w,
                                          R.need_affine, R.gx, R.gw, R.gs, R.gt);
    });
  }
  return R.result();
}
}  // namespace

PYSEG_KERNELS(CPU, pointwise_block, pointwise_block_cpu, pointwise_block_backward_cpu)

}  // namespace pyseg
