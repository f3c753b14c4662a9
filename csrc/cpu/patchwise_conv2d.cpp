// CPU kernels of pyseg::patchwise_conv2d and pyseg::patchwise_conv2d_backward.
//
// Layout facts that drive the design: the weight (B, Cout, Cin/groups, kh, kw, gh, gw) is
// contiguous over the patch grid, i.e. for one (sample, out-channel, tap) the weights of a patch
// row are gw consecutive values, while one patch's weights are gh*gw apart. Staging a patch's
// weights therefore costs one cache miss per weight (HyperSeg's 1x1 levels are dominated by the
// weight traffic), so the kernels walk the weight in its own order instead:
//
//  * forward, dW/dBias: one work item = (sample, out-channel o, patch row pi). For every tap
//    (ci, ky, kx) the item expands the gw weights of that patch row to an output-row vector
//    wexp[j] = w[.., pi, patch_of(j)] and accumulates acc[i, j] += wexp[j] * x[ci, ih(i), iw(j)]
//    over the patch row's output rows: a contiguous, vectorisable inner loop over output pixels.
//    dW of patch (pi, pj) is the sum over that patch's pixels, reduced by the one item that owns
//    the patch row in a fixed order -> deterministic, no atomics.
//  * dX: gather, one work item = (sample, in-channel c, block of input rows). Every input pixel
//    visits the outputs that read it, each with *that output's* patch weights (expanded per
//    output row as above). Each item owns its input rows -> race-free and deterministic.
// Accumulation in at::opmath_type (float for half/bfloat16/float, double for double).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "common/patch_index.h"
#include "common/patchwise_conv2d.h"
#include "common/register.h"
#include "cpu/output_alloc.h"

namespace pyseg {
namespace {

// pjmap[j] = patch column of output column j.
std::vector<int64_t> column_patches(const PwConvShape& s) {
  std::vector<int64_t> m(s.Wout);
  for (int64_t j = 0; j < s.Wout; ++j) m[j] = patch_of(j, s.gw, s.Wout);
  return m;
}

// wexp[j] = src[pjmap[j]]: one patch row of weights spread over the output columns.
template <typename scalar_t, typename acc_t>
inline void expand_row(const scalar_t* src, const std::vector<int64_t>& pjmap, acc_t* wexp) {
  const int64_t n = static_cast<int64_t>(pjmap.size());
  for (int64_t j = 0; j < n; ++j) wexp[j] = static_cast<acc_t>(src[pjmap[j]]);
}

// Patch rows per forward/dW work item: the whole grid when the item's accumulator stays small
// (then the item streams its weights, K rows of gh*gw values, in memory order), fewer for large
// outputs; and at least a few items per thread.
int64_t patch_rows_per_item(const PwConvShape& s) {
  const int64_t rows_per_patch = (s.Hout + s.gh - 1) / s.gh;
  int64_t pb = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, rows_per_patch * s.Wout));
  pb = std::min(pb, s.gh);
  const int64_t threads = at::get_num_threads();
  while (pb > 1 && s.B * s.Cout * ((s.gh + pb - 1) / pb) < 4 * threads) pb = (pb + 1) / 2;
  return pb;
}

// The work items of the forward and dW kernels: (sample b, output channel o, block of PB patch rows
// [p0, p1)); g is o's group.
struct RowBlockItems {
  struct Item {
    int64_t b, o, g, p0, p1;
  };
  int64_t PB, nblk, count;
  explicit RowBlockItems(const PwConvShape& s) : PB(patch_rows_per_item(s)) {
    nblk = (s.gh + PB - 1) / PB;
    count = s.B * s.Cout * nblk;
  }
  Item operator()(const PwConvShape& s, int64_t item) const {
    const int64_t blk = item % nblk, o = (item / nblk) % s.Cout;
    return {item / (nblk * s.Cout), o, o / s.Og, blk * PB, std::min(s.gh, (blk + 1) * PB)};
  }
};

// ------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
void forward_kernel(const PwConvShape& s, const scalar_t* x, const scalar_t* w, const scalar_t* bias, scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<int64_t> pjmap = column_patches(s);
  const int64_t GG = s.gh * s.gw;
  const RowBlockItems items(s);

  at::parallel_for(0, items.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> wexp(4 * s.Wout);
    std::vector<acc_t> acc;
    for (int64_t item = begin; item < end; ++item) {
      const auto [b, o, g, p0, p1] = items(s, item);
      const int64_t rbase = patch_begin(p0, s.gh, s.Hout);
      const int64_t nr = patch_begin(p1, s.gh, s.Hout) - rbase;
      acc.resize(nr * s.Wout);
      if (bias) {
        for (int64_t pi = p0; pi < p1; ++pi) {
          expand_row(bias + (b * s.Cout + o) * GG + pi * s.gw, pjmap, wexp.data());
          for (int64_t i = patch_begin(pi, s.gh, s.Hout); i < patch_begin(pi + 1, s.gh, s.Hout); ++i)
            std::copy(wexp.begin(), wexp.begin() + s.Wout, acc.begin() + (i - rbase) * s.Wout);
        }
      } else {
        std::fill(acc.begin(), acc.end(), acc_t(0));
      }
      // Taps (ky, kx) outer, input channels in blocks of 4 inner: a block shares the valid pixel
      // ranges, and one pass over an accumulator row applies 4 taps (fewer loads/stores per MAC).
      // The weights of (b, o) are K rows of gh*gw values; each item reads a band of each row.
      for (int64_t ky = 0; ky < s.kh; ++ky) {
        for (int64_t kx = 0; kx < s.kw; ++kx) {
          const int64_t off = kx * s.dw - s.pl;
          int64_t jlo, jhi;
          valid_out_range(0, s.Wout, s.sw, off, s.W, &jlo, &jhi);
          if (jlo >= jhi) continue;
          for (int64_t c0 = 0; c0 < s.Cg; c0 += 4) {
            const int64_t nc = std::min<int64_t>(4, s.Cg - c0);
            const scalar_t* xc[4];
            const scalar_t* wk[4];
            for (int64_t u = 0; u < nc; ++u) {
              const int64_t ci = c0 + u;
              xc[u] = x + (b * s.Cin + g * s.Cg + ci) * s.H * s.W;
              wk[u] = w + ((b * s.Cout + o) * s.K + (ci * s.kh + ky) * s.kw + kx) * GG;
            }
            for (int64_t pi = p0; pi < p1; ++pi) {
              bool expanded = false;
              for (int64_t i = patch_begin(pi, s.gh, s.Hout); i < patch_begin(pi + 1, s.gh, s.Hout); ++i) {
                const int64_t ih = i * s.sh - s.pt + ky * s.dh;
                if (ih < 0 || ih >= s.H) continue;
                if (!expanded) {
                  for (int64_t u = 0; u < nc; ++u) expand_row(wk[u] + pi * s.gw, pjmap, wexp.data() + u * s.Wout);
                  expanded = true;
                }
                acc_t* a = acc.data() + (i - rbase) * s.Wout;
                if (nc == 4 && s.sw == 1) {
                  const acc_t* w0 = wexp.data();
                  const acc_t* w1 = w0 + s.Wout;
                  const acc_t* w2 = w1 + s.Wout;
                  const acc_t* w3 = w2 + s.Wout;
                  const scalar_t* x0 = xc[0] + ih * s.W + off;
                  const scalar_t* x1 = xc[1] + ih * s.W + off;
                  const scalar_t* x2 = xc[2] + ih * s.W + off;
                  const scalar_t* x3 = xc[3] + ih * s.W + off;
                  for (int64_t j = jlo; j < jhi; ++j)
                    a[j] += w0[j] * static_cast<acc_t>(x0[j]) + w1[j] * static_cast<acc_t>(x1[j]) +
                            w2[j] * static_cast<acc_t>(x2[j]) + w3[j] * static_cast<acc_t>(x3[j]);
                } else {
                  for (int64_t u = 0; u < nc; ++u) {
                    const scalar_t* xrow = xc[u] + ih * s.W;
                    const acc_t* we = wexp.data() + u * s.Wout;
                    if (s.sw == 1) {
                      for (int64_t j = jlo; j < jhi; ++j) a[j] += we[j] * static_cast<acc_t>(xrow[j + off]);
                    } else {
                      for (int64_t j = jlo; j < jhi; ++j)
                        a[j] += we[j] * static_cast<acc_t>(xrow[j * s.sw + off]);
                    }
                  }
                }
              }
            }
          }
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        scalar_t* yrow = y + ((b * s.Cout + o) * s.Hout + rbase + r) * s.Wout;
        const acc_t* a = acc.data() + r * s.Wout;
        for (int64_t j = 0; j < s.Wout; ++j) yrow[j] = static_cast<scalar_t>(a[j]);
      }
    }
  });
}

at::Tensor patchwise_conv2d_cpu(const at::Tensor& x_, const at::Tensor& weight_, const c10::optional<at::Tensor>& bias_,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  TORCH_CHECK(x_.device().is_cpu(), kPwConvForward, ": the CPU kernel needs CPU tensors, got x on ", x_.device());
  const PwConvForward a(x_, weight_, bias_, stride, padding, dilation, groups);
  const PwConvShape& s = a.s;
  at::Tensor y = empty_output({s.B, s.Cout, s.Hout, s.Wout}, a.x.options());
  if (s.B == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "patchwise_conv2d_cpu", [&] {
    forward_kernel<scalar_t>(s, a.x.const_data_ptr<scalar_t>(), a.weight.const_data_ptr<scalar_t>(),
                             a.bias_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

// ------------------------------------------------------------------------------------------
// backward: dW and dBias (per-patch reductions); gw / gb may be null
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
void grad_weight_kernel(const PwConvShape& s, const scalar_t* x, const scalar_t* gy, scalar_t* gw, scalar_t* gb) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t GG = s.gh * s.gw;
  std::vector<int64_t> cbeg(s.gw + 1);
  for (int64_t pj = 0; pj <= s.gw; ++pj) cbeg[pj] = patch_begin(pj, s.gw, s.Wout);
  const RowBlockItems items(s);  // each item owns its (b, o, patch rows) dW/dBias entries

  at::parallel_for(0, items.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> t(s.Wout);
    for (int64_t item = begin; item < end; ++item) {
      const auto [b, o, g, p0, p1] = items(s, item);
      const scalar_t* gyo = gy + (b * s.Cout + o) * s.Hout * s.Wout;
      // Per-patch sums of t over each patch's columns, written contiguously over pj.
      auto reduce_into = [&](scalar_t* dst) {
        for (int64_t pj = 0; pj < s.gw; ++pj) {
          acc_t sum = 0;
          for (int64_t j = cbeg[pj]; j < cbeg[pj + 1]; ++j) sum += t[j];
          dst[pj] = static_cast<scalar_t>(sum);
        }
      };
      if (gb) {
        for (int64_t pi = p0; pi < p1; ++pi) {
          std::fill(t.begin(), t.end(), acc_t(0));
          for (int64_t i = patch_begin(pi, s.gh, s.Hout); i < patch_begin(pi + 1, s.gh, s.Hout); ++i) {
            const scalar_t* row = gyo + i * s.Wout;
            for (int64_t j = 0; j < s.Wout; ++j) t[j] += static_cast<acc_t>(row[j]);
          }
          reduce_into(gb + (b * s.Cout + o) * GG + pi * s.gw);
        }
      }
      if (!gw) continue;
      for (int64_t ci = 0; ci < s.Cg; ++ci) {
        const scalar_t* xc = x + (b * s.Cin + g * s.Cg + ci) * s.H * s.W;
        for (int64_t ky = 0; ky < s.kh; ++ky) {
          for (int64_t kx = 0; kx < s.kw; ++kx) {
            const int64_t k = (ci * s.kh + ky) * s.kw + kx;
            const int64_t off = kx * s.dw - s.pl;
            int64_t jlo, jhi;
            valid_out_range(0, s.Wout, s.sw, off, s.W, &jlo, &jhi);
            scalar_t* gwk = gw + ((b * s.Cout + o) * s.K + k) * GG;
            for (int64_t pi = p0; pi < p1; ++pi) {
              std::fill(t.begin(), t.end(), acc_t(0));
              for (int64_t i = patch_begin(pi, s.gh, s.Hout); i < patch_begin(pi + 1, s.gh, s.Hout) && jlo < jhi;
                   ++i) {
                const int64_t ih = i * s.sh - s.pt + ky * s.dh;
                if (ih < 0 || ih >= s.H) continue;
                const scalar_t* xrow = xc + ih * s.W;
                const scalar_t* grow = gyo + i * s.Wout;
                acc_t* tp = t.data();
                if (s.sw == 1) {
                  for (int64_t j = jlo; j < jhi; ++j)
                    tp[j] += static_cast<acc_t>(grow[j]) * static_cast<acc_t>(xrow[j + off]);
                } else {
                  for (int64_t j = jlo; j < jhi; ++j)
                    tp[j] += static_cast<acc_t>(grow[j]) * static_cast<acc_t>(xrow[j * s.sw + off]);
                }
              }
              reduce_into(gwk + pi * s.gw);
            }
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// backward: dX (gather)
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
void grad_input_kernel(const PwConvShape& s, const scalar_t* w, const scalar_t* gy, scalar_t* gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<int64_t> pjmap = column_patches(s);
  const int64_t GG = s.gh * s.gw;
  // Input rows per item: as many as keep the accumulator small (the item then streams the
  // weights of each (o, tap) over many patch rows), fewer when that leaves too few items.
  int64_t rb = std::min(s.H, std::max<int64_t>(1, (int64_t(1) << 14) / s.W));
  const int64_t threads = at::get_num_threads();
  while (rb > 1 && s.B * s.Cin * ((s.H + rb - 1) / rb) < 8 * threads) rb = (rb + 1) / 2;
  const int64_t nblk = (s.H + rb - 1) / rb;
  const int64_t items = s.B * s.Cin * nblk;

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> wexp(s.Wout);
    std::vector<acc_t> acc;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t blk = item % nblk;
      const int64_t c = (item / nblk) % s.Cin;
      const int64_t b = item / (nblk * s.Cin);
      const int64_t g = c / s.Cg, ci = c % s.Cg;
      const int64_t h0 = blk * rb, h1 = std::min(s.H, h0 + rb);
      acc.assign((h1 - h0) * s.W, acc_t(0));
      for (int64_t og = 0; og < s.Og; ++og) {
        const int64_t o = g * s.Og + og;
        const scalar_t* gyo = gy + (b * s.Cout + o) * s.Hout * s.Wout;
        for (int64_t ky = 0; ky < s.kh; ++ky) {
          for (int64_t kx = 0; kx < s.kw; ++kx) {
            const int64_t k = (ci * s.kh + ky) * s.kw + kx;
            const scalar_t* wk = w + ((b * s.Cout + o) * s.K + k) * GG;
            const int64_t off = kx * s.dw - s.pl;  // input column of output column j: j*sw + off
            int64_t jlo, jhi;
            valid_out_range(0, s.Wout, s.sw, off, s.W, &jlo, &jhi);
            if (jlo >= jhi) continue;
            int64_t cached_pi = -1;
            for (int64_t ih = h0; ih < h1; ++ih) {
              const int64_t i = out_from_in(ih, ky, s.sh, s.dh, s.pt, s.Hout);
              if (i < 0) continue;
              const int64_t pi = patch_of(i, s.gh, s.Hout);
              if (pi != cached_pi) {
                expand_row(wk + pi * s.gw, pjmap, wexp.data());
                cached_pi = pi;
              }
              const scalar_t* grow = gyo + i * s.Wout;
              acc_t* a = acc.data() + (ih - h0) * s.W;
              const acc_t* we = wexp.data();
              if (s.sw == 1) {
                for (int64_t j = jlo; j < jhi; ++j) a[j + off] += we[j] * static_cast<acc_t>(grow[j]);
              } else {
                for (int64_t j = jlo; j < jhi; ++j) a[j * s.sw + off] += we[j] * static_cast<acc_t>(grow[j]);
              }
            }
          }
        }
      }
      for (int64_t ih = h0; ih < h1; ++ih) {
        scalar_t* dst = gx + ((b * s.Cin + c) * s.H + ih) * s.W;
        const acc_t* a = acc.data() + (ih - h0) * s.W;
        for (int64_t iw = 0; iw < s.W; ++iw) dst[iw] = static_cast<scalar_t>(a[iw]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patchwise_conv2d_backward_cpu(
    const at::Tensor& grad_out_, const at::Tensor& x_, const at::Tensor& weight_, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  TORCH_CHECK(x_.device().is_cpu(), kPwConvBackward, ": the CPU kernel needs CPU tensors, got x on ", x_.device());
  const PwConvBackward a(grad_out_, x_, weight_, stride, padding, dilation, groups, output_mask);
  if (a.s.B == 0) return a.result();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "patchwise_conv2d_backward_cpu", [&] {
    if (output_mask[1] || output_mask[2]) {
      grad_weight_kernel<scalar_t>(a.s, a.x.const_data_ptr<scalar_t>(), a.gy.const_data_ptr<scalar_t>(),
                                   output_mask[1] ? a.gw.mutable_data_ptr<scalar_t>() : nullptr,
                                   output_mask[2] ? a.gb.mutable_data_ptr<scalar_t>() : nullptr);
    }
    if (output_mask[0]) {
      grad_input_kernel<scalar_t>(a.s, a.weight.const_data_ptr<scalar_t>(), a.gy.const_data_ptr<scalar_t>(),
                                  a.gx.mutable_data_ptr<scalar_t>());
    }
  });
  return a.result();
}

}  // namespace

PYSEG_KERNELS(CPU, patchwise_conv2d, patchwise_conv2d_cpu, patchwise_conv2d_backward_cpu)

}  // namespace pyseg
