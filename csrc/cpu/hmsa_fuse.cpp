// Hierarchical multi-scale attention fusion, C++ CPU kernels.
// One pass over the output pixels: each pixel builds its exact stencil (common/hmsa_fuse.h) by
// sampling every scale's attention on the fly (with scale_sizes, lowered to taps of the stored
// logits, hmsa_lower_stencil), then the classes are evaluated with a gather-dot;
// with labels=true only the running argmax is kept, so no (B, C, out_h, out_w) logits exist.
// A single scale on its stored grid is a plain bilinear resize: that case runs separably
// (hmsa_resize_cpu), which is what HyperSeg's final upsampling uses on the CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/hmsa_fuse_host.h"
#include "common/register.h"
#include "cpu/output_alloc.h"

namespace pyseg {
namespace {

template <typename acc_t>
inline bool better(acc_t v, acc_t best) {
  // torch.argmax: NaN is the maximum; ties keep the first index
  return v > best || (std::isnan(static_cast<double>(v)) && !std::isnan(static_cast<double>(best)));
}

// Bilinear taps of every output coordinate of one axis (common/bilinear.h linear_tap).
template <typename acc_t>
struct AxisTaps {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> l0, l1;
  AxisTaps(int64_t in_size, int64_t out_size) : i0(out_size), i1(out_size), l0(out_size), l1(out_size) {
    for (int64_t j = 0; j < out_size; ++j) {
      const LinearTap<acc_t> t = linear_tap<acc_t>(j, in_size, out_size);
      i0[j] = t.i0;
      i1[j] = t.i1;
      l0[j] = t.l0;
      l1[j] = t.l1;
    }
  }
};

// Output rows [y0, y1) of one (h, w) plane resized to (ty.size, tx.size), separably: each source
// row is interpolated along x once into one of two cached rows (consecutive output rows share
// source rows), then emit(y, row_a, row_b, l0, l1) blends the two along y:
// l0 * (l0x * a + l1x * b) + l1 * (...), the order of bilinear_sample.
template <typename scalar_t, typename acc_t, typename Emit>
void resize_rows(const scalar_t* plane, int64_t w, const AxisTaps<acc_t>& ty, const AxisTaps<acc_t>& tx,
                 int64_t y0, int64_t y1, acc_t* cache, const Emit& emit) {
  const int64_t ow = static_cast<int64_t>(tx.i0.size());
  acc_t* rows[2] = {cache, cache + ow};
  int64_t held[2] = {-1, -1};
  auto row = [&](int64_t r, int64_t keep) -> const acc_t* {
    for (int s = 0; s < 2; ++s)
      if (held[s] == r) return rows[s];
    const int s = held[0] == keep ? 1 : 0;  // never evict the other row of this output row
    const scalar_t* src = plane + r * w;
    acc_t* dst = rows[s];
    for (int64_t x = 0; x < ow; ++x)
      dst[x] = tx.l0[x] * static_cast<acc_t>(src[tx.i0[x]]) + tx.l1[x] * static_cast<acc_t>(src[tx.i1[x]]);
    held[s] = r;
    return dst;
  };
  for (int64_t y = y0; y < y1; ++y) {
    const acc_t* a = row(ty.i0[y], -1);
    const acc_t* b = ty.i1[y] == ty.i0[y] ? a : row(ty.i1[y], ty.i0[y]);
    emit(y, a, b, ty.l0[y], ty.l1[y]);
  }
}

// One scale on its stored grid: out = bilinear resize of p (B, C, h, w) to (OH, OW), or its
// argmax over classes (labels), in parallel over bands of output rows.
at::Tensor hmsa_resize_cpu(const at::Tensor& p, int64_t OH, int64_t OW, bool labels) {
  const int64_t B = p.size(0), C = p.size(1), h = p.size(2), w = p.size(3);
  at::Tensor out = labels ? empty_output({B, OH, OW}, p.options().dtype(at::kLong))
                          : empty_output({B, C, OH, OW}, p.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "hmsa_resize_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const AxisTaps<acc_t> ty(h, OH), tx(w, OW);
    const scalar_t* in = p.const_data_ptr<scalar_t>();
    // bands of output rows: a band re-interpolates at most one source row it shares with the previous
    const int64_t band = labels ? 8 : 32, bands = (OH + band - 1) / band;
    if (!labels) {
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, B * C * bands, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> cache(2 * OW);
        for (int64_t u = begin; u < end; ++u) {
          const int64_t plane = u / bands, y0 = (u % bands) * band, y1 = std::min(OH, y0 + band);
          scalar_t* op = o + plane * OH * OW;
          auto emit = [&](int64_t y, const acc_t* a, const acc_t* b, acc_t l0, acc_t l1) {
            scalar_t* dst = op + y * OW;
            for (int64_t x = 0; x < OW; ++x) dst[x] = static_cast<scalar_t>(l0 * a[x] + l1 * b[x]);
          };
          resize_rows<scalar_t, acc_t>(in + plane * h * w, w, ty, tx, y0, y1, cache.data(), emit);
        }
      });
      return;
    }
    int64_t* o = out.data_ptr<int64_t>();
    at::parallel_for(0, B * bands, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> cache(2 * OW), best(band * OW);
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / bands, y0 = (u % bands) * band, y1 = std::min(OH, y0 + band);
        int64_t* ob = o + b * OH * OW;
        for (int64_t c = 0; c < C; ++c) {
          auto emit = [&](int64_t y, const acc_t* ra, const acc_t* rb, acc_t l0, acc_t l1) {
            acc_t* bv = best.data() + (y - y0) * OW;
            int64_t* arg = ob + y * OW;
            for (int64_t x = 0; x < OW; ++x) {
              // compare in the output dtype, as argmax of the materialised logits would
              const acc_t v = static_cast<acc_t>(static_cast<scalar_t>(l0 * ra[x] + l1 * rb[x]));
              if (c == 0 || better(v, bv[x])) {
                bv[x] = v;
                arg[x] = c;
              }
            }
          };
          resize_rows<scalar_t, acc_t>(in + (b * C + c) * h * w, w, ty, tx, y0, y1, cache.data(), emit);
        }
      }
    });
  });
  return out;
}

at::Tensor hmsa_fuse_cpu(at::TensorList logits, at::TensorList attentions,
                         at::ArrayRef<double> scales, at::IntArrayRef out_size, bool labels,
                         at::OptionalIntArrayRef scale_sizes_opt) {
  const auto& [p, a, one, scale_sizes] = hmsa_operands(logits, attentions, scales, out_size, scale_sizes_opt);
  for (const at::Tensor& t : p) TORCH_CHECK(t.device().is_cpu(), "hmsa_fuse (CPU): tensors must be on the CPU");
  const int64_t B = p[0].size(0), C = p[0].size(1), OH = out_size[0], OW = out_size[1];
  if (p.size() == 1 && (scale_sizes.empty() || (scale_sizes[0] == p[0].size(2) && scale_sizes[1] == p[0].size(3))))
    return hmsa_resize_cpu(p[0], OH, OW, labels);
  at::Tensor out = labels ? empty_output({B, OH, OW}, p[0].options().dtype(at::kLong))
                          : empty_output({B, C, OH, OW}, p[0].options());
  const int64_t max_terms = hmsa_max_terms(static_cast<int>(p.size()), one);
  // grid terms of resampled scales expand into up to 4 storage taps each (hmsa_storage_taps)
  bool any_resampled = false;
  for (size_t k = 0; k < p.size() && !scale_sizes.empty(); ++k)
    any_resampled |= scale_sizes[2 * k] != p[k].size(2) || scale_sizes[2 * k + 1] != p[k].size(3);
  const int64_t max_taps = (any_resampled ? 4 : 1) * max_terms;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p[0].scalar_type(), "hmsa_fuse_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const HmsaArgs<scalar_t> A = hmsa_pack<scalar_t>(p, a, one, OH, OW, scale_sizes);
    scalar_t* out_v = labels ? nullptr : out.data_ptr<scalar_t>();
    int64_t* out_l = labels ? out.data_ptr<int64_t>() : nullptr;
    const int64_t oplane = OH * OW;
    // Work unit: a tile of up to TILE pixels of one output row. The stencils of the whole tile
    // are built first (flattened to pointer/stride/coef), then classes are the outer loop and
    // pixels the inner one, so that for a fixed class every scale is read and the output written
    // along rows (streaming access) instead of jumping between C class planes per pixel.
    constexpr int64_t TILE = 64;
    const int64_t tiles_per_row = (OW + TILE - 1) / TILE;
    at::parallel_for(0, B * OH * tiles_per_row, 1, [&](int64_t begin, int64_t end) {
      std::vector<HmsaTerm<acc_t>> terms(static_cast<size_t>(max_terms));
      std::vector<HmsaTerm<acc_t>> lowered(static_cast<size_t>(any_resampled ? max_taps : 0));
      std::vector<const scalar_t*> ptr(static_cast<size_t>(max_taps * TILE));
      std::vector<int64_t> stride(static_cast<size_t>(max_taps * TILE));
      std::vector<acc_t> coef(static_cast<size_t>(max_taps * TILE));
      std::vector<int64_t> first(TILE + 1), arg(TILE);
      std::vector<acc_t> best(TILE);
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t row = unit / tiles_per_row, x0 = (unit % tiles_per_row) * TILE;
        const int64_t b = row / OH, oy = row % OH, nx = std::min<int64_t>(TILE, OW - x0);
        int64_t n = 0;
        for (int64_t i = 0; i < nx; ++i) {
          first[i] = n;
          int64_t nt = hmsa_build_stencil<acc_t>(A, b, oy, x0 + i, terms.data());
          const HmsaTerm<acc_t>* src = terms.data();
          if (any_resampled) {  // storage taps, computed once per pixel for all classes
            nt = hmsa_lower_stencil<acc_t>(A, terms.data(), nt, lowered.data());
            src = lowered.data();
          }
          for (int64_t j = 0; j < nt; ++j, ++n) {
            const int k = src[j].k;
            const int64_t plane = A.ph[k] * A.pw[k];
            ptr[n] = A.p[k] + b * A.C * plane + src[j].off;
            stride[n] = plane;
            coef[n] = src[j].coef;
          }
        }
        first[nx] = n;
        const int64_t obase = b * (labels ? 1 : C) * oplane + oy * OW + x0;
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t i = 0; i < nx; ++i) {
            acc_t acc = 0;
            for (int64_t j = first[i]; j < first[i + 1]; ++j) acc += coef[j] * static_cast<acc_t>(ptr[j][0]);
            if (labels) {
              // compare in the output dtype, as argmax of the materialised logits would
              const acc_t v = static_cast<acc_t>(static_cast<scalar_t>(acc));
              if (c == 0 || better(v, best[i])) {
                best[i] = v;
                arg[i] = c;
              }
            } else {
              out_v[obase + c * oplane + i] = static_cast<scalar_t>(acc);
            }
          }
          for (int64_t j = 0; j < n; ++j) ptr[j] += stride[j];  // next class plane
        }
        if (labels)
          for (int64_t i = 0; i < nx; ++i) out_l[obase + i] = arg[i];
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hmsa_fuse_backward_cpu(const at::Tensor& grad_out,
                                                                      const at::Tensor& logits_one,
                                                                      const at::Tensor& logits_low,
                                                                      const at::Tensor& attention_low) {
  const Hmsa2Backward S(grad_out, logits_one, logits_low, attention_low);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S.p[0].scalar_type(), "hmsa_fuse_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const HmsaArgs<scalar_t> A = hmsa_pack<scalar_t>(S.p, S.a, 0, S.OH, S.OW);
    const Hmsa2BackwardWork<acc_t> T(S);
    const scalar_t* gv = S.g.data_ptr<scalar_t>();
    acc_t* gPv = T.gP.data_ptr<acc_t>();
    acc_t* guav = T.g_ua.data_ptr<acc_t>();
    acc_t* galv = T.g_al.data_ptr<acc_t>();
    scalar_t* gp1v = S.g_p1.data_ptr<scalar_t>();
    scalar_t* gplv = S.g_pl.data_ptr<scalar_t>();
    scalar_t* gav = S.g_a.data_ptr<scalar_t>();
    const AxisCsr<acc_t> Fh = axis_csr<acc_t>(T.fh), Fw = axis_csr<acc_t>(T.fw);
    const AxisCsr<acc_t> Uh = axis_csr<acc_t>(T.uh), Uw = axis_csr<acc_t>(T.uw);
    const AxisCsr<acc_t> Rh = axis_csr<acc_t>(T.rh), Rw = axis_csr<acc_t>(T.rw);
    const int64_t B = S.B, h1 = S.h1, w1 = S.w1, hl = S.hl, wl = S.wl, ha = S.ha, wa = S.wa;
    at::parallel_for(0, B * h1, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t x = 0; x < w1; ++x) hmsa2_bwd_r1_pixel<acc_t>(A, gv, Fh, Fw, r / h1, r % h1, x, gPv, gp1v, guav);
    });
    at::parallel_for(0, B * hl, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t x = 0; x < wl; ++x) hmsa2_bwd_low_pixel<acc_t>(A, gPv, guav, Uh, Uw, r / hl, r % hl, x, gplv, galv);
    });
    at::parallel_for(0, B * ha, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t x = 0; x < wa; ++x) hmsa2_bwd_att_pixel<acc_t>(A, galv, Rh, Rw, r / ha, r % ha, x, gav);
    });
  });
  return {S.g_p1, S.g_pl, S.g_a};
}

}  // namespace

PYSEG_KERNELS(CPU, hmsa_fuse, hmsa_fuse_cpu, hmsa_fuse_backward_cpu)

}  // namespace pyseg
