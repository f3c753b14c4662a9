// C++ CPU kernels of the fused HyperSeg meta block (the 1x1 level block is in pointwise_block.cpp).
//
// Meta block: one work item = one (sample, patch). A work item loads its patch plus a 1-pixel halo
// of x (reflected at image borders only), runs pw1 -> affine -> ReLU6 on every haloed pixel, the
// depthwise 3x3 -> affine -> ReLU6 and pw2 -> affine on the patch pixels, all in small per-thread
// buffers (the working set of one patch stays in cache), and writes only the output. The two
// pointwise convolutions are register-tiled GEMMs. Half/bfloat16 compute in float; float64 in double.
//
// Backward recomputes the forward intermediates per patch (the same meta_stages as the forward).
// Weight gradients are per (sample, patch) (no races); the affine gradients are per-work-item
// partials summed in a fixed order; grad_x is written by each work item into its own haloed buffer,
// then gathered per input pixel in a fixed order (halo_readers in csrc/common/meta_block.h):
// deterministic, no atomics.
//
// The per-item compute lives in meta_block_patch.h, compiled for the baseline ISA and for AVX2+FMA
// (cpu/isa_dispatch.h; cpu_isa.h picks one at run time). This file holds the work split, scratch and reductions.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "common/meta_block.h"
#include "common/meta_block_host.h"
#include "common/register.h"
#include "cpu/block_common.h"
#include "cpu/cpu_isa.h"
#include "cpu/output_alloc.h"

namespace pyseg {
namespace {

using meta::WeightLayout;

using cpu_block::PatchGeom;
using cpu_block::round_up;
using cpu_block::sum_affine_partials;

// Meta block work items gather the weights of up to this many consecutive patches at once.
constexpr int64_t kWeightBlock = 16;

// Runs fn(item, w) for every item of [begin, end) in blocks of consecutive patches of one sample,
// w being the item's weight vector (gathered in acc_t by `gather(b, p0, cnt, wblock)`).
template <typename acc_t, typename Gather, typename Fn>
void for_each_item_blocked(int64_t begin, int64_t end, int64_t G, int64_t N, acc_t* wblock, Gather&& gather,
                           Fn&& fn) {
  for (int64_t item = begin; item < end;) {
    const int64_t p0 = item % G;
    const int64_t cnt = std::min({kWeightBlock, end - item, G - p0});
    gather(item / G, p0, cnt, wblock);
    for (int64_t q = 0; q < cnt; ++q) fn(item + q, wblock + q * N);
    item += cnt;
  }
}

// Read-only arguments of a meta block work item.
template <typename acc_t>
struct ItemArgs {
  WeightLayout L;
  int64_t H, W, gh, gw, PH, PW;  // PH, PW: largest patch
  const acc_t* sc;               // scale, shift (2*hid + Cout,) in acc_t
  const acc_t* sh;
};

// Per-thread scratch of meta block work items, sized for the largest patch (rows padded).
template <typename acc_t>
struct ItemScratch {
  std::vector<acc_t> w, xh, z1, h1, g1, z2, h2, g2, z3, g3, gw, gx;
  ItemScratch(const WeightLayout& L, int64_t PH, int64_t PW, int64_t nr, bool backward) {
    const int64_t lh = round_up((PH + 2) * (PW + 2), nr), ln = round_up(PH * PW, nr);
    w.resize(kWeightBlock * L.numel());
    xh.resize(L.cin * lh);
    h1.resize(L.hid * lh);
    h2.resize(L.hid * ln);
    z3.resize(L.cout * ln);
    if (backward) {
      z1.resize(L.hid * lh);
      g1.resize(L.hid * lh);
      z2.resize(L.hid * ln);
      g2.resize(L.hid * ln);
      g3.resize(L.cout * ln);
      gw.resize(L.numel());
      gx.resize(L.cin * lh);
    }
  }
};

// The per-item compute (cpu/meta_block_patch.h), compiled per instruction set.
#define PYSEG_ISA_HEADER "cpu/meta_block_patch.h"
#include "cpu/isa_dispatch.h"
#undef PYSEG_ISA_HEADER

constexpr int64_t kNR = isa_base::kNR;

template <typename scalar_t, typename acc_t>
std::vector<acc_t> to_acc(const at::Tensor& t) {
  std::vector<acc_t> v(t.numel());
  const scalar_t* p = t.const_data_ptr<scalar_t>();
  for (int64_t i = 0; i < t.numel(); ++i) v[i] = static_cast<acc_t>(p[i]);
  return v;
}

template <typename scalar_t>
void meta_forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                         const at::Tensor& shift, const WeightLayout L, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t gh = weight.size(2), gw = weight.size(3);
  const std::vector<acc_t> sc = to_acc<scalar_t, acc_t>(scale), sh = to_acc<scalar_t, acc_t>(shift);
  const ItemArgs<acc_t> A{L, H, W, gh, gw, meta::max_patch_size(H, gh), meta::max_patch_size(W, gw), sc.data(),
                          sh.data()};
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const bool avx2 = use_avx2();
  const int64_t N = L.numel(), G = gh * gw;
  // patch-major weights (channels_last): item i's vector is wp[i*N, (i+1)*N), read in place when no
  // conversion to acc_t is needed; otherwise the blocked gather transposes (and converts) them
  const bool in_place = meta::patch_major(weight) && std::is_same_v<scalar_t, acc_t>;
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    ItemScratch<acc_t> S(L, A.PH, A.PW, kNR, false);
    auto item_fn = [&](int64_t item, const acc_t* w) {
      PYSEG_ISA_CALL(avx2, meta_forward_item, A, xp, w, item, S, yp);
    };
    if (in_place) {
      for (int64_t item = begin; item < end; ++item) item_fn(item, reinterpret_cast<const acc_t*>(wp) + item * N);
    } else if (meta::patch_major(weight)) {
      for_each_item_blocked(
          begin, end, G, N, S.w.data(),
          [&](int64_t b, int64_t p0, int64_t cnt, acc_t* w) {
            const scalar_t* src = wp + (b * G + p0) * N;
            for (int64_t i = 0; i < cnt * N; ++i) w[i] = static_cast<acc_t>(src[i]);
          },
          item_fn);
    } else {
      for_each_item_blocked(
          begin, end, G, N, S.w.data(),
          [&](int64_t b, int64_t p0, int64_t cnt, acc_t* w) {
            PYSEG_ISA_CALL(avx2, gather_weights, wp, N, G, b, p0, cnt, w);
          },
          item_fn);
    }
  });
}

template <typename scalar_t>
void meta_backward_kernel(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& scale, const at::Tensor& shift, const WeightLayout L,
                          bool need_x, bool need_w, bool need_affine, at::Tensor& gx, at::Tensor& gwt,
                          at::Tensor& gscale, at::Tensor& gshift) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t gh = weight.size(2), gw = weight.size(3), G = gh * gw;
  const int64_t A_n = L.affine_numel();
  const int64_t PH = meta::max_patch_size(H, gh), PW = meta::max_patch_size(W, gw);
  const int64_t HP = (PH + 2) * (PW + 2);
  const std::vector<acc_t> sc = to_acc<scalar_t, acc_t>(scale), sh = to_acc<scalar_t, acc_t>(shift);
  const ItemArgs<acc_t> A{L, H, W, gh, gw, PH, PW, sc.data(), sh.data()};
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  const scalar_t* gyp = grad_out.const_data_ptr<scalar_t>();
  scalar_t* gwp = need_w ? gwt.mutable_data_ptr<scalar_t>() : nullptr;
  // Per work item: haloed grad_x buffer (Cin, PH+2, PW+2) and affine partials (2, A).
  std::vector<acc_t> gxbuf(need_x ? B * G * Cin * HP : 0);
  std::vector<acc_t> partial(need_affine ? B * G * 2 * A_n : 0);
  const bool avx2 = use_avx2();
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    ItemScratch<acc_t> S(L, PH, PW, kNR, true);
    for_each_item_blocked(
        begin, end, G, L.numel(), S.w.data(),
        [&](int64_t b, int64_t p0, int64_t cnt, acc_t* w) {
          PYSEG_ISA_CALL(avx2, gather_weights, wp, L.numel(), G, b, p0, cnt, w);
        },
        [&](int64_t item, const acc_t* w) {
          acc_t* ps = need_affine ? partial.data() + item * 2 * A_n : nullptr;
          acc_t* pt = need_affine ? ps + A_n : nullptr;
          acc_t* gxh = need_x ? gxbuf.data() + item * Cin * HP : nullptr;
          PYSEG_ISA_CALL(avx2, meta_backward_item, A, xp, w, gyp, item, S, gwp, ps, pt, gxh);
        });
  });

  if (need_affine) sum_affine_partials<scalar_t>(partial, B * G, A_n, gscale, gshift);

  if (need_x) {
    // gather: every x pixel sums the haloed buffers that read it, in a fixed order
    std::vector<int64_t> rcell(H * meta::kMaxHaloReaders), roff(H * meta::kMaxHaloReaders), rcnt(H);
    std::vector<int64_t> ccell(W * meta::kMaxHaloReaders), coff(W * meta::kMaxHaloReaders), ccnt(W);
    for (int64_t r = 0; r < H; ++r)
      rcnt[r] = meta::halo_readers(r, H, gh, &rcell[r * meta::kMaxHaloReaders], &roff[r * meta::kMaxHaloReaders]);
    for (int64_t c = 0; c < W; ++c)
      ccnt[c] = meta::halo_readers(c, W, gw, &ccell[c * meta::kMaxHaloReaders], &coff[c * meta::kMaxHaloReaders]);
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * Cin * H, 16, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t r = idx % H, c = (idx / H) % Cin, b = idx / (H * Cin);
        scalar_t* dst = gxp + idx * W;
        for (int64_t col = 0; col < W; ++col) {
          acc_t acc = 0;
          for (int64_t u = 0; u < rcnt[r]; ++u) {
            const int64_t gi = rcell[r * meta::kMaxHaloReaders + u], a = roff[r * meta::kMaxHaloReaders + u];
            for (int64_t v = 0; v < ccnt[col]; ++v) {
              const int64_t gj = ccell[col * meta::kMaxHaloReaders + v], bb = coff[col * meta::kMaxHaloReaders + v];
              acc += gxbuf[(((b * gh + gi) * gw + gj) * Cin + c) * HP + a * (PW + 2) + bb];
            }
          }
          dst[col] = static_cast<scalar_t>(acc);
        }
      }
    });
  }
}

at::Tensor meta_block_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                          const at::Tensor& shift, int64_t hidden, int64_t out_channels) {
  const WeightLayout L = meta::check_meta_block(x, weight, scale, shift, hidden, out_channels, true);
  at::Tensor y = empty_output({x.size(0), out_channels, x.size(2), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "meta_block_cpu", [&] {
    meta_forward_kernel<scalar_t>(x, weight, scale, shift, L, y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_block_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, int64_t hidden, int64_t out_channels, std::array<bool, 4> output_mask) {
  const WeightLayout L = meta::check_meta_block(x, weight, scale, shift, hidden, out_channels);
  // (the backward reads the default layout only; the Python front end passes weight.contiguous())
  meta::BlockGrads R(grad_out, x, weight, scale, shift, out_channels, output_mask);
  if (R.any()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "meta_block_backward_cpu", [&] {
      meta_backward_kernel<scalar_t>(grad_out, x, weight, scale, shift, L, R.need_x, R.need_w, R.need_affine, R.gx,
                                     R.gw, R.gs, R.gt);
    });
  }
  return R.result();
}

}  // namespace

PYSEG_KERNELS(CPU, meta_block, meta_block_cpu, meta_block_backward_cpu)

}  // namespace pyseg
