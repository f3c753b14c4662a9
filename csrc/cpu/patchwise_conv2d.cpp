// CPU kernels of pyseg::patchwise_conv2d and pyseg::patchwise_conv2d_backward.
//
// Work decomposition (deterministic, no atomics):
//  * forward and dW/dBias: one work item = (sample, patch row, block of up to PJ patches of that row).
//    The item copies its patches' weights (strided by gh*gw in memory, contiguous over the patch
//    column) into a thread-local buffer, then computes each patch as a small GEMM
//    (Cout x K) @ (K x pixels) with K = Cin/groups*kh*kw, accumulating in at::opmath_type.
//    dW/dBias of a patch are reduced by the one item that owns it, in a fixed order.
//  * dX: gather, one work item = (sample, input row): every input pixel visits the outputs that
//    read it, each with that output's patch weights.
//  Two inner-loop orders: "channel-inner" (vector over the output channels of a group, used when a
//  group has several output channels) and "pixel-inner" (vector over a patch row, for depthwise).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/patch_index.h"
#include "common/patchwise_conv2d.h"

namespace pyseg {
namespace {

constexpr const char* kFwd = "pyseg::patchwise_conv2d";
constexpr const char* kBwd = "pyseg::patchwise_conv2d_backward";

// Channel-inner order pays off once a group has a few output channels.
inline bool channel_inner(const PwConvShape& s) { return s.Og >= 4; }

// Patches per work item along a patch row: enough to read whole cache lines of the weight
// (contiguous over the patch column), few enough to keep the item's buffers small.
inline int64_t patches_per_item(const PwConvShape& s) {
  const int64_t per_patch = s.Cout * s.K;
  int64_t pj = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(per_patch, 1));  // ~256 KiB fp32
  pj = std::min<int64_t>({pj, int64_t(16), s.gw});
  // Keep at least ~4 items per thread when the grid allows it.
  const int64_t threads = at::get_num_threads();
  while (pj > 1 && s.B * s.gh * ((s.gw + pj - 1) / pj) < 4 * threads) pj = (pj + 1) / 2;
  return pj;
}

// Position of weight (o, k) of a patch in an item buffer. Channel-inner: [g][k][og];
// pixel-inner: [o][k] (the natural order).
inline int64_t wbuf_index(const PwConvShape& s, bool ci_order, int64_t o, int64_t k) {
  if (ci_order) {
    const int64_t g = o / s.Og, og = o % s.Og;
    return (g * s.K + k) * s.Og + og;
  }
  return o * s.K + k;
}

// ------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
void forward_kernel(const PwConvShape& s, const scalar_t* x, const scalar_t* w, const scalar_t* bias, scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool ci_order = channel_inner(s);
  const int64_t PJ = patches_per_item(s);
  const int64_t nblk = (s.gw + PJ - 1) / PJ;
  const int64_t P = s.Cout * s.K;  // weights per patch
  const int64_t GG = s.gh * s.gw;
  const int64_t items = s.B * s.gh * nblk;

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> wbuf(PJ * P);
    std::vector<acc_t> acc;
    std::vector<acc_t> bbuf(s.Cout);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t blk = item % nblk;
      const int64_t pi = (item / nblk) % s.gh;
      const int64_t b = item / (nblk * s.gh);
      const int64_t pj0 = blk * PJ;
      const int64_t npj = std::min(PJ, s.gw - pj0);
      // Stage the weights of patches (pi, pj0 .. pj0+npj): contiguous reads over pj.
      for (int64_t o = 0; o < s.Cout; ++o) {
        for (int64_t k = 0; k < s.K; ++k) {
          const scalar_t* src = w + ((b * s.Cout + o) * s.K + k) * GG + pi * s.gw + pj0;
          const int64_t dst = wbuf_index(s, ci_order, o, k);
          for (int64_t q = 0; q < npj; ++q) wbuf[q * P + dst] = static_cast<acc_t>(src[q]);
        }
      }
      const int64_t r0 = patch_begin(pi, s.gh, s.Hout), r1 = patch_begin(pi + 1, s.gh, s.Hout);
      for (int64_t q = 0; q < npj; ++q) {
        const int64_t pj = pj0 + q;
        const int64_t c0 = patch_begin(pj, s.gw, s.Wout), c1 = patch_begin(pj + 1, s.gw, s.Wout);
        const int64_t pw = c1 - c0;
        const acc_t* wp = wbuf.data() + q * P;
        for (int64_t o = 0; o < s.Cout; ++o)
          bbuf[o] = bias ? static_cast<acc_t>(bias[(b * s.Cout + o) * GG + pi * s.gw + pj]) : acc_t(0);
        acc.assign(pw * s.Cout, acc_t(0));
        for (int64_t i = r0; i < r1; ++i) {
          // init
          if (ci_order) {
            for (int64_t j = 0; j < pw; ++j)
              for (int64_t o = 0; o < s.Cout; ++o) acc[j * s.Cout + o] = bbuf[o];
          } else {
            for (int64_t o = 0; o < s.Cout; ++o)
              for (int64_t j = 0; j < pw; ++j) acc[o * pw + j] = bbuf[o];
          }
          for (int64_t g = 0; g < s.G; ++g) {
            for (int64_t ci = 0; ci < s.Cg; ++ci) {
              const int64_t c = g * s.Cg + ci;
              for (int64_t ky = 0; ky < s.kh; ++ky) {
                const int64_t ih = i * s.sh - s.pt + ky * s.dh;
                if (ih < 0 || ih >= s.H) continue;
                const scalar_t* xrow = x + ((b * s.Cin + c) * s.H + ih) * s.W;
                for (int64_t kx = 0; kx < s.kw; ++kx) {
                  const int64_t off = kx * s.dw - s.pl;
                  int64_t jlo, jhi;
                  valid_out_range(c0, c1, s.sw, off, s.W, &jlo, &jhi);
                  const int64_t k = (ci * s.kh + ky) * s.kw + kx;
                  if (ci_order) {
                    const acc_t* wk = wp + (g * s.K + k) * s.Og;
                    for (int64_t j = jlo; j < jhi; ++j) {
                      const acc_t xv = static_cast<acc_t>(xrow[j * s.sw + off]);
                      acc_t* a = acc.data() + (j - c0) * s.Cout + g * s.Og;
                      for (int64_t og = 0; og < s.Og; ++og) a[og] += xv * wk[og];
                    }
                  } else {
                    for (int64_t og = 0; og < s.Og; ++og) {
                      const int64_t o = g * s.Og + og;
                      const acc_t wv = wp[o * s.K + k];
                      acc_t* a = acc.data() + o * pw - c0;
                      if (s.sw == 1) {
                        const scalar_t* xs = xrow + off;
                        for (int64_t j = jlo; j < jhi; ++j) a[j] += wv * static_cast<acc_t>(xs[j]);
                      } else {
                        for (int64_t j = jlo; j < jhi; ++j) a[j] += wv * static_cast<acc_t>(xrow[j * s.sw + off]);
                      }
                    }
                  }
                }
              }
            }
          }
          // store
          for (int64_t o = 0; o < s.Cout; ++o) {
            scalar_t* yrow = y + ((b * s.Cout + o) * s.Hout + i) * s.Wout + c0;
            if (ci_order) {
              for (int64_t j = 0; j < pw; ++j) yrow[j] = static_cast<scalar_t>(acc[j * s.Cout + o]);
            } else {
              for (int64_t j = 0; j < pw; ++j) yrow[j] = static_cast<scalar_t>(acc[o * pw + j]);
            }
          }
        }
      }
    }
  });
}

at::Tensor patchwise_conv2d_cpu(const at::Tensor& x_, const at::Tensor& weight_, const c10::optional<at::Tensor>& bias_,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  const PwConvShape s = pw_check_args(kFwd, x_, weight_, stride, padding, dilation, groups);
  pw_check_bias(kFwd, s, x_, bias_);
  TORCH_CHECK(x_.device().is_cpu(), kFwd, ": the CPU kernel needs CPU tensors, got x on ", x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) bias = bias_->contiguous();
  at::Tensor y = at::empty({s.B, s.Cout, s.Hout, s.Wout}, x.options());
  if (s.B == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patchwise_conv2d_cpu", [&] {
    forward_kernel<scalar_t>(s, x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                             bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                             y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

// ------------------------------------------------------------------------------------------
// backward: dW and dBias (per-patch reductions)
// ------------------------------------------------------------------------------------------
// gy: grad_out (B, Cout, Hout, Wout); gyT: grad_out channels-last (B, Hout, Wout, Cout) in acc_t,
// only for the channel-inner order. gw/gb may be null.
template <typename scalar_t>
void grad_weight_kernel(const PwConvShape& s, const scalar_t* x, const scalar_t* gy,
                        const at::opmath_type<scalar_t>* gyT, scalar_t* gw, scalar_t* gb) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool ci_order = gyT != nullptr;
  const int64_t PJ = patches_per_item(s);
  const int64_t nblk = (s.gw + PJ - 1) / PJ;
  const int64_t P = s.Cout * s.K;
  const int64_t GG = s.gh * s.gw;
  const int64_t items = s.B * s.gh * nblk;

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> wbuf(gw ? PJ * P : 0);
    std::vector<acc_t> bbuf(s.Cout);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t blk = item % nblk;
      const int64_t pi = (item / nblk) % s.gh;
      const int64_t b = item / (nblk * s.gh);
      const int64_t pj0 = blk * PJ;
      const int64_t npj = std::min(PJ, s.gw - pj0);
      const int64_t r0 = patch_begin(pi, s.gh, s.Hout), r1 = patch_begin(pi + 1, s.gh, s.Hout);
      std::fill(wbuf.begin(), wbuf.end(), acc_t(0));
      for (int64_t q = 0; q < npj; ++q) {
        const int64_t pj = pj0 + q;
        const int64_t c0 = patch_begin(pj, s.gw, s.Wout), c1 = patch_begin(pj + 1, s.gw, s.Wout);
        acc_t* wp = gw ? wbuf.data() + q * P : nullptr;
        if (gb) {
          for (int64_t o = 0; o < s.Cout; ++o) {
            acc_t sum = 0;
            for (int64_t i = r0; i < r1; ++i) {
              const scalar_t* row = gy + ((b * s.Cout + o) * s.Hout + i) * s.Wout;
              for (int64_t j = c0; j < c1; ++j) sum += static_cast<acc_t>(row[j]);
            }
            gb[(b * s.Cout + o) * GG + pi * s.gw + pj] = static_cast<scalar_t>(sum);
          }
        }
        if (!gw) continue;
        for (int64_t i = r0; i < r1; ++i) {
          for (int64_t ky = 0; ky < s.kh; ++ky) {
            const int64_t ih = i * s.sh - s.pt + ky * s.dh;
            if (ih < 0 || ih >= s.H) continue;
            for (int64_t kx = 0; kx < s.kw; ++kx) {
              const int64_t off = kx * s.dw - s.pl;
              int64_t jlo, jhi;
              valid_out_range(c0, c1, s.sw, off, s.W, &jlo, &jhi);
              if (jlo >= jhi) continue;
              for (int64_t g = 0; g < s.G; ++g) {
                for (int64_t ci = 0; ci < s.Cg; ++ci) {
                  const int64_t c = g * s.Cg + ci;
                  const int64_t k = (ci * s.kh + ky) * s.kw + kx;
                  const scalar_t* xrow = x + ((b * s.Cin + c) * s.H + ih) * s.W;
                  if (ci_order) {
                    acc_t* a = wp + (g * s.K + k) * s.Og;
                    for (int64_t j = jlo; j < jhi; ++j) {
                      const acc_t xv = static_cast<acc_t>(xrow[j * s.sw + off]);
                      const acc_t* gv = gyT + ((b * s.Hout + i) * s.Wout + j) * s.Cout + g * s.Og;
                      for (int64_t og = 0; og < s.Og; ++og) a[og] += xv * gv[og];
                    }
                  } else {
                    for (int64_t og = 0; og < s.Og; ++og) {
                      const int64_t o = g * s.Og + og;
                      const scalar_t* grow = gy + ((b * s.Cout + o) * s.Hout + i) * s.Wout;
                      acc_t sum = 0;
                      for (int64_t j = jlo; j < jhi; ++j)
                        sum += static_cast<acc_t>(grow[j]) * static_cast<acc_t>(xrow[j * s.sw + off]);
                      wp[o * s.K + k] += sum;
                    }
                  }
                }
              }
            }
          }
        }
      }
      if (!gw) continue;
      // Write back: contiguous over pj.
      for (int64_t o = 0; o < s.Cout; ++o) {
        for (int64_t k = 0; k < s.K; ++k) {
          scalar_t* dst = gw + ((b * s.Cout + o) * s.K + k) * GG + pi * s.gw + pj0;
          const int64_t src = wbuf_index(s, ci_order, o, k);
          for (int64_t q = 0; q < npj; ++q) dst[q] = static_cast<scalar_t>(wbuf[q * P + src]);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// backward: dX (gather)
// ------------------------------------------------------------------------------------------
// wT: weights (B, gh, gw, kh, kw, G, Cg, Og) in acc_t; gyT: grad_out (B, Hout, Wout, Cout) in acc_t.
template <typename scalar_t>
void grad_input_kernel(const PwConvShape& s, const at::opmath_type<scalar_t>* wT,
                       const at::opmath_type<scalar_t>* gyT, scalar_t* gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tap = s.Cin * s.Og;  // weights per (patch, ky, kx)
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> rb(s.W * s.Cin);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t ih = item % s.H;
      const int64_t b = item / s.H;
      std::fill(rb.begin(), rb.end(), acc_t(0));
      for (int64_t ky = 0; ky < s.kh; ++ky) {
        const int64_t i = out_from_in(ih, ky, s.sh, s.dh, s.pt, s.Hout);
        if (i < 0) continue;
        const int64_t pi = patch_of(i, s.gh, s.Hout);
        for (int64_t kx = 0; kx < s.kw; ++kx) {
          for (int64_t iw = 0; iw < s.W; ++iw) {
            const int64_t j = out_from_in(iw, kx, s.sw, s.dw, s.pl, s.Wout);
            if (j < 0) continue;
            const int64_t pj = patch_of(j, s.gw, s.Wout);
            const acc_t* wk = wT + (((b * s.gh + pi) * s.gw + pj) * s.kh * s.kw + ky * s.kw + kx) * tap;
            const acc_t* gv = gyT + ((b * s.Hout + i) * s.Wout + j) * s.Cout;
            acc_t* a = rb.data() + iw * s.Cin;
            if (s.Og == 1) {
              for (int64_t g = 0; g < s.G; ++g) {
                const acc_t gg = gv[g];
                for (int64_t ci = 0; ci < s.Cg; ++ci) a[g * s.Cg + ci] += gg * wk[g * s.Cg + ci];
              }
            } else {
              for (int64_t g = 0; g < s.G; ++g) {
                const acc_t* gg = gv + g * s.Og;
                for (int64_t ci = 0; ci < s.Cg; ++ci) {
                  const acc_t* wc = wk + (g * s.Cg + ci) * s.Og;
                  acc_t sum = 0;
                  for (int64_t og = 0; og < s.Og; ++og) sum += gg[og] * wc[og];
                  a[g * s.Cg + ci] += sum;
                }
              }
            }
          }
        }
      }
      for (int64_t c = 0; c < s.Cin; ++c) {
        scalar_t* dst = gx + ((b * s.Cin + c) * s.H + ih) * s.W;
        for (int64_t iw = 0; iw < s.W; ++iw) dst[iw] = static_cast<scalar_t>(rb[iw * s.Cin + c]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patchwise_conv2d_backward_cpu(
    const at::Tensor& grad_out_, const at::Tensor& x_, const at::Tensor& weight_, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const PwConvShape s = pw_check_args(kBwd, x_, weight_, stride, padding, dilation, groups);
  pw_check_grad_out(kBwd, s, x_, grad_out_);
  TORCH_CHECK(x_.device().is_cpu(), kBwd, ": the CPU kernel needs CPU tensors, got x on ", x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor gy = grad_out_.contiguous();
  at::Tensor gx = output_mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : x.new_empty({0});
  at::Tensor gw = output_mask[1] ? at::empty_like(weight, at::MemoryFormat::Contiguous) : weight.new_empty({0});
  at::Tensor gb = output_mask[2] ? at::empty({s.B, s.Cout, s.gh, s.gw}, weight.options()) : weight.new_empty({0});
  if (s.B == 0) return {gx, gw, gb};
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  // Channels-last grad_out in the accumulation type: used by dX and by the channel-inner dW.
  at::Tensor gyT;
  if (output_mask[0] || (output_mask[1] && channel_inner(s)))
    gyT = gy.permute({0, 2, 3, 1}).to(acc_type).contiguous();
  at::Tensor wT;
  if (output_mask[0])
    wT = weight.view({s.B, s.G, s.Og, s.Cg, s.kh, s.kw, s.gh, s.gw})
             .permute({0, 6, 7, 4, 5, 1, 3, 2})
             .to(acc_type)
             .contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patchwise_conv2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (output_mask[1] || output_mask[2]) {
      grad_weight_kernel<scalar_t>(
          s, x.const_data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(),
          (output_mask[1] && channel_inner(s)) ? gyT.const_data_ptr<acc_t>() : nullptr,
          output_mask[1] ? gw.mutable_data_ptr<scalar_t>() : nullptr,
          output_mask[2] ? gb.mutable_data_ptr<scalar_t>() : nullptr);
    }
    if (output_mask[0]) {
      grad_input_kernel<scalar_t>(s, wT.const_data_ptr<acc_t>(), gyT.const_data_ptr<acc_t>(),
                                  gx.mutable_data_ptr<scalar_t>());
    }
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyseg, CPU, m) {
  m.impl("patchwise_conv2d", &patchwise_conv2d_cpu);
  m.impl("patchwise_conv2d_backward", &patchwise_conv2d_backward_cpu);
}

}  // namespace pyseg
