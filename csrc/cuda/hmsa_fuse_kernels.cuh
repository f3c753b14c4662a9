// Device code of the hierarchical multi-scale attention fusion (launchers and the scheme in
// hmsa_fuse.cu).
#pragma once

#include "common/hmsa_fuse.h"
#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

// Largest stencil a thread of the per-pixel kernel holds: 4 * (21 + 4 * 4) = 148 covers up to 2
// scales above 1.0 and 4 below; hmsa_max_terms is checked on the host.
constexpr int HMSA_CUDA_MAX_TERMS = 160;

template <typename acc_t>
__device__ __forceinline__ bool better(acc_t v, acc_t best) {
  return v > best || (isnan(v) && !isnan(best));
}

// Per-pixel forward (the fallback for tiles whose ranges do not fit the tile kernel's shared memory,
// e.g. an output far smaller than the 1.0 grid): one thread per output pixel builds its whole
// stencil (hmsa_build_stencil, HMSA_CUDA_MAX_TERMS terms of local memory), then per class gathers
// every term (hmsa_eval; a resampled scale's storage is sampled per class).
template <typename scalar_t, typename acc_t>
__global__ void hmsa_fuse_kernel(const HmsaArgs<scalar_t> A, scalar_t* __restrict__ out_v,
                                 int64_t* __restrict__ out_l, bool labels) {
  const int64_t total = A.B * A.out_h * A.out_w;
  const int64_t oplane = A.out_h * A.out_w;
  HmsaTerm<acc_t> terms[HMSA_CUDA_MAX_TERMS];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = i / oplane, pix = i % oplane;
    const int64_t oy = pix / A.out_w, ox = pix % A.out_w;
    const int64_t nt = hmsa_build_stencil<acc_t>(A, b, oy, ox, terms);
    auto value = [&](int64_t c) -> acc_t { return hmsa_eval<acc_t>(A, b, c, terms, nt); };
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

// ---------------------------------------------------------------------------------------------
// Tile forward: one 256-thread block per (sample, TH x TW output tile) runs the recurrence itself on
// the ranges of each scale grid the tile reads (hmsa_axis_ranges), in shared memory, class by class:
//   setup (once per block): per-row / per-column tap tables of every resize (D: grid k-1 -> k, U:
//     grid l -> 1.0, F: 1.0 -> out) and the attention of every scale on its range; then the low
//     scales' gates 1 - U(a_l) on the 1.0 range.
//   per class: phase A reads every logit the class needs (the chain scales' p_k and a_l * p_l of the low
//     scales, on their ranges; a warp per row, lanes along it: coalesced), so one global round trip
//     per class; then per chain scale k = 1..one (k = 0 alone when 1.0 is the top), in place,
//     buf_k = a_k p_k + (1 - a_k) D(buf_{k-1}), and on the 1.0 range the low scales in order,
//     fin = U(a_l p_l) + gate_l v; then F: each thread bilinearly samples fin at its kPix output pixels
//     (a warp = consecutive columns of one row: coalesced stores) and writes the value or updates its
//     running argmax (registers).
// Barriers per class: 1 + max(one, 1). Resampled storage (scale_sizes) is read through
// bilinear_sample while loading. Same arithmetic order as the reference (hmsa_fuse.py), in acc_t.
// ---------------------------------------------------------------------------------------------
constexpr int kHmsaTileThreads = 256;

// The shared-memory plan of the tile kernel (one for the launch: extents are the maxima over tiles).
struct HmsaTilePlan {
  int64_t tiles_y, tiles_x;
  int rh[HMSA_MAX_SCALES], rw[HMSA_MAX_SCALES];  // largest range of each scale grid over the tiles
  int sh[HMSA_MAX_SCALES], sw[HMSA_MAX_SCALES];  // largest stored range of each chain scale (k <= one)
  // acc_t offsets (-1: unused): stor = the stored logits of chain scale k on its stored range; buf = the
  // level values of chain scales 1..one-1 on their grid range, or a_l * p_l of a low scale l; att =
  // attention on the range (k >= 1); gate = 1 - U(a_l) on the 1.0 range (low l); fin = the fused 1.0
  // range.
  int stor[HMSA_MAX_SCALES], buf[HMSA_MAX_SCALES], att[HMSA_MAX_SCALES], gate[HMSA_MAX_SCALES], fin;
  // HmsaTap offsets (-1: unused): ry/rx of chain scale k = stored -> grid k (k >= 1, or 0 when 1.0 is
  // the top); ty/tx of scale k = D (2 <= k <= one) or U (k > one); fy/fx = F
  int ry[HMSA_MAX_SCALES], rx[HMSA_MAX_SCALES], ty[HMSA_MAX_SCALES], tx[HMSA_MAX_SCALES];
  int fy, fx;
  int cy, cx;           // HmsaTap4 offsets: top stored -> grid 0 -> grid 1 (when 1.0 is not the top)
  int64_t tap_bytes;    // byte offset of the HmsaTap tables
  int64_t tap4_bytes;   // byte offset of the HmsaTap4 tables
  int64_t range_bytes;  // byte offset of the tile's ranges (8 x HMSA_MAX_SCALES ints)
  int64_t bytes;        // dynamic shared memory
};

template <typename acc_t>
__device__ __forceinline__ void hmsa_fill_taps(HmsaTap<acc_t>* t, int64_t count, int64_t d0, int64_t src_size,
                                               int64_t dst_size, int64_t src_lo) {
  for (int64_t i = threadIdx.x; i < count; i += kHmsaTileThreads)
    t[i] = hmsa_local_tap<acc_t>(d0 + i, src_size, dst_size, src_lo);
}

template <typename acc_t>
__device__ __forceinline__ void hmsa_fill_taps4(HmsaTap4<acc_t>* t, int64_t count, int64_t d0, int64_t stored,
                                                int64_t grid0, int64_t grid1, int64_t s_lo) {
  for (int64_t i = threadIdx.x; i < count; i += kHmsaTileThreads)
    t[i] = hmsa_composite_tap<acc_t>(d0 + i, stored, grid0, grid1, s_lo);
}

// resident blocks per SM the tile kernel is compiled for (its register budget): 8, 4 or 1 pixels per thread
template <int TH, int TW>
constexpr int kHmsaTileMinBlocks = TH * TW >= 8 * kHmsaTileThreads ? 2 : (TH * TW >= 4 * kHmsaTileThreads ? 3 : 4);

template <typename scalar_t, typename acc_t, int TH, int TW>
__global__ void __launch_bounds__(kHmsaTileThreads, kHmsaTileMinBlocks<TH, TW>)
    hmsa_fuse_tile_kernel(const HmsaArgs<scalar_t> A, const HmsaTilePlan P, scalar_t* __restrict__ out_v,
                          int64_t* __restrict__ out_l, bool labels) {
  static_assert((TH * TW) % kHmsaTileThreads == 0 && kHmsaTileThreads % TW == 0, "tile shape");
  constexpr int kPix = TH * TW / kHmsaTileThreads;  // output pixels per thread
  constexpr int kWarps = kHmsaTileThreads / 32;
  PYSEG_DYNAMIC_SMEM(smem_raw);
  acc_t* const sm = reinterpret_cast<acc_t*>(smem_raw);
  HmsaTap<acc_t>* const taps = reinterpret_cast<HmsaTap<acc_t>*>(smem_raw + P.tap_bytes);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int n = A.n, one = A.one;
  int64_t blk = blockIdx.x;
  const int64_t tcol = blk % P.tiles_x;
  blk /= P.tiles_x;
  const int64_t trow = blk % P.tiles_y, b = blk / P.tiles_y;
  const int64_t oy0 = trow * TH, ox0 = tcol * TW;
  const int oh = static_cast<int>((oy0 + TH <= A.out_h ? oy0 + TH : A.out_h) - oy0);  // rows of this tile
  const int ow = static_cast<int>((ox0 + TW <= A.out_w ? ox0 + TW : A.out_w) - ox0);
  // this tile's ranges (first coordinate and extent per scale grid; the stored range of each chain
  // scale), shared: thread 0 rows, 1 columns
  HmsaTap4<acc_t>* const taps4 = reinterpret_cast<HmsaTap4<acc_t>*>(smem_raw + P.tap4_bytes);
  int* const ylo = reinterpret_cast<int*>(smem_raw + P.range_bytes);
  int* const xlo = ylo + HMSA_MAX_SCALES;
  int* const rh = xlo + HMSA_MAX_SCALES;
  int* const rw = rh + HMSA_MAX_SCALES;
  int* const sylo = rw + HMSA_MAX_SCALES;
  int* const sxlo = sylo + HMSA_MAX_SCALES;
  int* const srh = sxlo + HMSA_MAX_SCALES;
  int* const srw = srh + HMSA_MAX_SCALES;
  if (tid < 2) {
    int64_t lo[HMSA_MAX_SCALES], hi[HMSA_MAX_SCALES];
    const int64_t* grid = tid == 0 ? A.h : A.w;
    const int64_t* stored = tid == 0 ? A.ph : A.pw;
    if (tid == 0)
      hmsa_axis_ranges<acc_t>(A.h, n, one, A.out_h, oy0, oy0 + oh - 1, lo, hi);
    else
      hmsa_axis_ranges<acc_t>(A.w, n, one, A.out_w, ox0, ox0 + ow - 1, lo, hi);
    for (int k = 0; k < n; ++k) {
      (tid == 0 ? ylo : xlo)[k] = static_cast<int>(lo[k]);
      (tid == 0 ? rh : rw)[k] = static_cast<int>(hi[k] - lo[k] + 1);
      if (k > one) continue;
      int64_t slo, shi;
      hmsa_storage_range<acc_t>(lo[k], hi[k], stored[k], grid[k], &slo, &shi);
      (tid == 0 ? sylo : sxlo)[k] = static_cast<int>(slo);
      (tid == 0 ? srh : srw)[k] = static_cast<int>(shi - slo + 1);
    }
  }
  __syncthreads();
  // ---- setup: tap tables and attentions ----
  hmsa_fill_taps<acc_t>(taps + P.fy, oh, oy0, A.h[one], A.out_h, ylo[one]);
  hmsa_fill_taps<acc_t>(taps + P.fx, ow, ox0, A.w[one], A.out_w, xlo[one]);
  for (int k = (one > 0 ? 1 : 0); k <= one; ++k) {  // stored -> grid k
    hmsa_fill_taps<acc_t>(taps + P.ry[k], rh[k], ylo[k], A.ph[k], A.h[k], sylo[k]);
    hmsa_fill_taps<acc_t>(taps + P.rx[k], rw[k], xlo[k], A.pw[k], A.w[k], sxlo[k]);
  }
  if (one > 0) {  // the top's stored logits straight to grid 1
    hmsa_fill_taps4<acc_t>(taps4 + P.cy, rh[1], ylo[1], A.ph[0], A.h[0], A.h[1], sylo[0]);
    hmsa_fill_taps4<acc_t>(taps4 + P.cx, rw[1], xlo[1], A.pw[0], A.w[0], A.w[1], sxlo[0]);
  }
  for (int k = 1; k < n; ++k) {
    if (k >= 2 || k > one) {
      const int s = k <= one ? k - 1 : k;  // source grid of the resize into the table's rows
      const int d = k <= one ? k : one;    // its destination grid
      hmsa_fill_taps<acc_t>(taps + P.ty[k], rh[d], ylo[d], A.h[s], A.h[d], ylo[s]);
      hmsa_fill_taps<acc_t>(taps + P.tx[k], rw[d], xlo[d], A.w[s], A.w[d], xlo[s]);
    }
    acc_t* att = sm + P.att[k];
    for (int ly = warp; ly < rh[k]; ly += kWarps)
      for (int lx = lane; lx < rw[k]; lx += 32)
        att[ly * rw[k] + lx] = hmsa_att<acc_t>(A, k, b, ylo[k] + ly, xlo[k] + lx);
  }
  __syncthreads();
  for (int l = one + 1; l < n; ++l) {
    const acc_t* att = sm + P.att[l];
    acc_t* gate = sm + P.gate[l];
    const HmsaTap<acc_t>* ty = taps + P.ty[l];
    const HmsaTap<acc_t>* tx = taps + P.tx[l];
    for (int ly = warp; ly < rh[one]; ly += kWarps)
      for (int lx = lane; lx < rw[one]; lx += 32)
        gate[ly * rw[one] + lx] = static_cast<acc_t>(1) - hmsa_tile_lerp<acc_t>(att, rw[l], ty[ly], tx[lx]);
  }
  // (the gates are first read after phase A's barrier)
  const HmsaTap<acc_t> fx = taps[P.fx + tid % TW];  // every output pixel of this thread is in column tid % TW
  // the output at the 1.0 grid's size: F is the identity (its range is the tile), a copy of fin
  const bool same = A.h[one] == A.out_h && A.w[one] == A.out_w;
  const int64_t oplane = A.out_h * A.out_w;
  acc_t best[kPix];
  int arg[kPix];
  for (int j = 0; j < kPix; ++j) {
    best[j] = 0;
    arg[j] = 0;
  }
  auto plane = [&](int k, int64_t c) { return A.p[k] + (b * A.C + c) * (A.ph[k] * A.pw[k]); };
  auto logit = [&](const scalar_t* pl, int k, int64_t y, int64_t x) {
    return bilinear_sample<acc_t>(pl, A.ph[k], A.pw[k], A.h[k], A.w[k], y, x);
  };
  for (int64_t c = 0; c < A.C; ++c) {
    // ---- phase A, every global read of the class: the stored logits of the chain scales (top .. 1.0)
    // on their stored ranges, and a_l * p_l of the low scales on their grid ranges ----
    for (int k = 0; k <= one; ++k) {
      const scalar_t* pl = plane(k, c);
      acc_t* dst = sm + P.stor[k];
      for (int ly = warp; ly < srh[k]; ly += kWarps) {
        const scalar_t* row = pl + (sylo[k] + ly) * A.pw[k] + sxlo[k];
        for (int lx = lane; lx < srw[k]; lx += 32) dst[ly * srw[k] + lx] = static_cast<acc_t>(row[lx]);
      }
    }
    for (int k = one + 1; k < n; ++k) {
      const scalar_t* pl = plane(k, c);
      acc_t* dst = sm + P.buf[k];
      const acc_t* att = sm + P.att[k];
      for (int ly = warp; ly < rh[k]; ly += kWarps)
        for (int lx = lane; lx < rw[k]; lx += 32) {
          const int e = ly * rw[k] + lx;
          dst[e] = att[e] * logit(pl, k, ylo[k] + ly, xlo[k] + lx);
        }
    }
    __syncthreads();
    // ---- the chain down to 1.0: p_k at grid k from its stored range, blended with D of the level above
    // (the top: its stored range through the composite taps), then the low scales on the 1.0 range into
    // fin ----
    for (int k = (one > 0 ? 1 : 0); k <= one; ++k) {
      const acc_t* st = sm + P.stor[k];
      acc_t* dst = sm + (k == one ? P.fin : P.buf[k]);
      // columns outside, rows inside: a lane's column taps are loaded once per column, not per element
      for (int lx = lane; lx < rw[k]; lx += 32) {
        const HmsaTap<acc_t> rx = taps[P.rx[k] + lx];
        const HmsaTap4<acc_t> cx = k == 1 ? taps4[P.cx + lx] : HmsaTap4<acc_t>{};
        for (int ly = warp; ly < rh[k]; ly += kWarps) {
          const int e = ly * rw[k] + lx;
          acc_t v = hmsa_tile_lerp<acc_t>(st, srw[k], taps[P.ry[k] + ly], rx);
          if (k > 0) {
            const acc_t a = sm[P.att[k] + e];
            const acc_t dn = k == 1 ? hmsa_tile_composite<acc_t>(sm + P.stor[0], srw[0], taps4[P.cy + ly], cx)
                                    : hmsa_tile_lerp<acc_t>(sm + P.buf[k - 1], rw[k - 1], taps[P.ty[k] + ly],
                                                            taps[P.tx[k] + lx]);
            v = a * v + (static_cast<acc_t>(1) - a) * dn;
          }
          if (k == one)
            for (int l = one + 1; l < n; ++l) {
              const acc_t up = hmsa_tile_lerp<acc_t>(sm + P.buf[l], rw[l], taps[P.ty[l] + ly], taps[P.tx[l] + lx]);
              v = up + sm[P.gate[l] + e] * v;
            }
          dst[e] = v;
        }
      }
      __syncthreads();
    }
    // (the next class's phase A writes only stor and the low scales' buf: fin is read below until every
    // thread has passed the next phase A's barrier)
    // ---- F: the tile's outputs ----
    const acc_t* top = sm + P.fin;
    for (int j = 0; j < kPix; ++j) {
      const int i = tid + j * kHmsaTileThreads, oy = i / TW, ox = i % TW;
      if (oy >= oh || ox >= ow) continue;
      const acc_t v = same ? top[oy * rw[one] + ox] : hmsa_tile_lerp<acc_t>(top, rw[one], taps[P.fy + oy], fx);
      if (labels) {
        const acc_t r = static_cast<acc_t>(static_cast<scalar_t>(v));
        if (c == 0 || better(r, best[j])) {
          best[j] = r;
          arg[j] = static_cast<int>(c);
        }
      } else {
        out_v[(b * A.C + c) * oplane + (oy0 + oy) * A.out_w + ox0 + ox] = static_cast<scalar_t>(v);
      }
    }
  }
  if (labels)
    for (int j = 0; j < kPix; ++j) {
      const int i = tid + j * kHmsaTileThreads, oy = i / TW, ox = i % TW;
      if (oy < oh && ox < ow) out_l[b * oplane + (oy0 + oy) * A.out_w + ox0 + ox] = arg[j];
    }
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

}  // namespace
}  // namespace pyseg
