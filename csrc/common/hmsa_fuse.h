// Hierarchical multi-scale attention (HMSA) fusion: per-pixel math shared by the CPU and CUDA
// kernels (all __host__ __device__). See pyseg/ops/hmsa_fuse.py for the semantics.
#pragma once

#include <cstdint>

#include "common/bilinear.h"

namespace pyseg {

// ---------------------------------------------------------------------------------------------
// Hierarchical multi-scale attention: the per-output-pixel stencil.
//
// Bilinear resampling is linear and the HMSA recurrence is linear in the logits with
// coefficients that depend only on the attention maps, so every fused output value is
//   out[b, c, oy, ox] = sum_j coef_j * p_{k_j}[b, c, off_j]
// with (k_j, off_j, coef_j) independent of the class c. hmsa_build_stencil computes this list
// exactly (the composition of the bilinear samplers of the recurrence); the kernels then loop
// over classes with a gather-dot. Taps of weight exactly 0 are skipped (identical for finite
// inputs).
//
// Scale grids vs storage: the recurrence of scale k runs on its *grid* (h[k], w[k]) (the op's
// scale_sizes, by default the logits' own size). When the stored logits have another size
// (ph[k], pw[k]) (e.g. stride-4 network outputs with the grid at the scale's image size), the
// public method first upsamples them to the grid; here that resize is one more bilinear sampler
// composed into the stencil: a stencil term at grid pixel off = y * w[k] + x stands for the
// bilinear sample of the storage at (y, x) (hmsa_storage_taps), so the grid-resolution logits
// are never stored. The attention is sampled from its raw size straight onto the grid.
// ---------------------------------------------------------------------------------------------
constexpr int HMSA_MAX_SCALES = 8;

template <typename scalar_t>
struct HmsaArgs {
  // scales sorted strictly descending; index `one` holds scale 1.0. Pointers are to sample 0.
  const scalar_t* p[HMSA_MAX_SCALES];  // logits (B, C, ph, pw) contiguous
  const scalar_t* a[HMSA_MAX_SCALES];  // attention (B, 1, ha, wa) contiguous; unused for k = 0
  // h, w: the grid the recurrence of scale k runs on; ph, pw: the stored logits' size
  int64_t h[HMSA_MAX_SCALES], w[HMSA_MAX_SCALES], ha[HMSA_MAX_SCALES], wa[HMSA_MAX_SCALES];
  int64_t ph[HMSA_MAX_SCALES], pw[HMSA_MAX_SCALES];
  int n, one;
  int64_t B, C, out_h, out_w;
};

template <typename acc_t>
struct HmsaTerm {
  int k;        // scale index
  int64_t off;  // y * w_k + x within one class plane of sample b
  acc_t coef;
};

// Upper bound on the stencil length for n scales with 1.0 at index `one`.
PYSEG_HD int64_t hmsa_max_terms(int n, int one) {
  int64_t high = 1;  // terms of the chain top..one: t(0) = 1, t(k) = 1 + 4 t(k-1)
  for (int k = 1; k <= one; ++k) high = 1 + 4 * high;
  return 4 * (high + 4 * static_cast<int64_t>(n - 1 - one));
}

// Attention of scale k (sample b) at pixel (y, x) of its logit grid.
template <typename acc_t, typename scalar_t>
PYSEG_HD acc_t hmsa_att(const HmsaArgs<scalar_t>& A, int k, int64_t b, int64_t y, int64_t x) {
  const scalar_t* m = A.a[k] + b * A.ha[k] * A.wa[k];
  return bilinear_sample<acc_t>(m, A.ha[k], A.wa[k], A.h[k], A.w[k], y, x);
}

// Append the terms of the 1.0-resolution prediction at pixel (y, x) times `coef` to t[*n_terms..].
template <typename acc_t, typename scalar_t>
PYSEG_HD void hmsa_add_r1(const HmsaArgs<scalar_t>& A, int64_t b, int64_t y, int64_t x, acc_t coef,
                          HmsaTerm<acc_t>* t, int64_t* n_terms) {
  const int one = A.one;
  const int64_t h1 = A.h[one], w1 = A.w[one];
  // low scales, innermost (applied last) first: pred = U(a p) + (1 - U(a)) pred
  acc_t g = coef;
  for (int l = A.n - 1; l > one; --l) {
    const LinearTap<acc_t> ty = linear_tap<acc_t>(y, A.h[l], h1);
    const LinearTap<acc_t> tx = linear_tap<acc_t>(x, A.w[l], w1);
    const int64_t ys[2] = {ty.i0, ty.i1};
    const int64_t xs[2] = {tx.i0, tx.i1};
    const acc_t wy[2] = {ty.l0, ty.l1};
    const acc_t wx[2] = {tx.l0, tx.l1};
    acc_t ua = 0;
    for (int i = 0; i < 2; ++i) {
      acc_t row = 0;
      for (int j = 0; j < 2; ++j) {
        const acc_t att = hmsa_att<acc_t>(A, l, b, ys[i], xs[j]);
        row += wx[j] * att;
        const acc_t wgt = wy[i] * wx[j];
        if (wgt != static_cast<acc_t>(0)) {
          t[*n_terms].k = l;
          t[*n_terms].off = ys[i] * A.w[l] + xs[j];
          t[*n_terms].coef = g * (wgt * att);
          ++*n_terms;
        }
      }
      ua += wy[i] * row;
    }
    g = g * (static_cast<acc_t>(1) - ua);
  }
  // chain of scales >= 1, breadth first, in place: pred_k = a_k p_k + (1 - a_k) D(pred_{k-1})
  int64_t seg_begin = *n_terms;
  t[*n_terms].k = one;
  t[*n_terms].off = y * w1 + x;
  t[*n_terms].coef = g;
  ++*n_terms;
  for (int k = one; k >= 1; --k) {
    const int64_t seg_end = *n_terms;
    for (int64_t i = seg_begin; i < seg_end; ++i) {
      const int64_t yy = t[i].off / A.w[k], xx = t[i].off % A.w[k];
      const acc_t c = t[i].coef;
      const acc_t att = hmsa_att<acc_t>(A, k, b, yy, xx);
      t[i].coef = c * att;
      const acc_t c2 = c * (static_cast<acc_t>(1) - att);
      const LinearTap<acc_t> ty = linear_tap<acc_t>(yy, A.h[k - 1], A.h[k]);
      const LinearTap<acc_t> tx = linear_tap<acc_t>(xx, A.w[k - 1], A.w[k]);
      const int64_t ys[2] = {ty.i0, ty.i1};
      const int64_t xs[2] = {tx.i0, tx.i1};
      const acc_t wy[2] = {ty.l0, ty.l1};
      const acc_t wx[2] = {tx.l0, tx.l1};
      for (int p = 0; p < 2; ++p)
        for (int q = 0; q < 2; ++q) {
          const acc_t wgt = wy[p] * wx[q];
          if (wgt == static_cast<acc_t>(0)) continue;
          t[*n_terms].k = k - 1;
          t[*n_terms].off = ys[p] * A.w[k - 1] + xs[q];
          t[*n_terms].coef = c2 * wgt;
          ++*n_terms;
        }
    }
    seg_begin = seg_end;
  }
}

// The full stencil of output pixel (oy, ox) of sample b; returns its length.
template <typename acc_t, typename scalar_t>
PYSEG_HD int64_t hmsa_build_stencil(const HmsaArgs<scalar_t>& A, int64_t b, int64_t oy, int64_t ox,
                                    HmsaTerm<acc_t>* t) {
  int64_t ys[4], xs[4];
  acc_t wt[4];
  const int nt = bilinear_taps<acc_t>(oy, ox, A.h[A.one], A.w[A.one], A.out_h, A.out_w, ys, xs, wt);
  int64_t n_terms = 0;
  for (int i = 0; i < nt; ++i) hmsa_add_r1<acc_t>(A, b, ys[i], xs[i], wt[i], t, &n_terms);
  return n_terms;
}

// Whether scale k's stored logits differ in size from its grid (then read through a resize).
template <typename scalar_t>
PYSEG_HD bool hmsa_resampled(const HmsaArgs<scalar_t>& A, int k) {
  return A.ph[k] != A.h[k] || A.pw[k] != A.w[k];
}

// Storage taps of grid pixel off = y * w[k] + x of scale k: the bilinear sample (align_corners
// = False) of the stored (ph, pw) logits at (y, x) of the (h, w) grid is
//   sum_i wt[i] * plane[soff[i]]   (i < returned count <= 4; zero weights skipped).
// Without resampling this is the single tap (off, 1).
template <typename acc_t, typename scalar_t>
PYSEG_HD int hmsa_storage_taps(const HmsaArgs<scalar_t>& A, int k, int64_t off, int64_t* soff, acc_t* wt) {
  if (!hmsa_resampled(A, k)) {
    soff[0] = off;
    wt[0] = static_cast<acc_t>(1);
    return 1;
  }
  int64_t ys[4], xs[4];
  const int n = bilinear_taps<acc_t>(off / A.w[k], off % A.w[k], A.ph[k], A.pw[k], A.h[k], A.w[k], ys, xs, wt);
  for (int i = 0; i < n; ++i) soff[i] = ys[i] * A.pw[k] + xs[i];
  return n;
}

// Lowers a grid stencil t[0..n) to storage taps out[0..returned): out[i].off is an offset in the
// stored (ph, pw) plane of scale out[i].k. Terms of scales that are not resampled are copied
// unchanged; a resampled term expands into its storage taps (hmsa_storage_taps, weights coef *
// wt), and since neighbouring grid pixels of an upsampled scale share storage pixels, repeated
// taps within a run of consecutive terms of one scale are merged (each storage pixel is then read
// once per class). `out` needs room for 4 * n terms.
template <typename acc_t, typename scalar_t>
PYSEG_HD int64_t hmsa_lower_stencil(const HmsaArgs<scalar_t>& A, const HmsaTerm<acc_t>* t, int64_t n,
                                    HmsaTerm<acc_t>* out) {
  int64_t m = 0, run = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int k = t[j].k;
    if (j == 0 || t[j - 1].k != k) run = m;
    if (!hmsa_resampled(A, k)) {
      out[m++] = t[j];
      continue;
    }
    int64_t soff[4];
    acc_t wt[4];
    const int ns = hmsa_storage_taps<acc_t>(A, k, t[j].off, soff, wt);
    for (int s = 0; s < ns; ++s) {
      const acc_t v = t[j].coef * wt[s];
      int64_t i = run;
      while (i < m && out[i].off != soff[s]) ++i;  // same run: same scale k
      if (i < m) {
        out[i].coef += v;
        continue;
      }
      out[m].k = k;
      out[m].off = soff[s];
      out[m].coef = v;
      ++m;
    }
  }
  return m;
}

// Value of class c for a grid stencil of sample b (terms on the scale grids): the storage of a
// resampled scale is read through hmsa_storage_taps, per class.
template <typename acc_t, typename scalar_t>
PYSEG_HD acc_t hmsa_eval(const HmsaArgs<scalar_t>& A, int64_t b, int64_t c, const HmsaTerm<acc_t>* t,
                         int64_t n_terms) {
  acc_t acc = 0;
  for (int64_t j = 0; j < n_terms; ++j) {
    const int k = t[j].k;
    const scalar_t* plane = A.p[k] + (b * A.C + c) * (A.ph[k] * A.pw[k]);
    if (!hmsa_resampled(A, k)) {
      acc += t[j].coef * static_cast<acc_t>(plane[t[j].off]);
      continue;
    }
    int64_t soff[4];
    acc_t wt[4];
    const int nt = hmsa_storage_taps<acc_t>(A, k, t[j].off, soff, wt);
    for (int i = 0; i < nt; ++i) acc += (t[j].coef * wt[i]) * static_cast<acc_t>(plane[soff[i]]);
  }
  return acc;
}

// ---------------------------------------------------------------------------------------------
// Tiled forward (the CUDA tile kernel): the recurrence itself, level by level, on the part of each
// scale grid that one output tile reads. Resampling is monotone along each axis, so output rows
// o0..o1 read rows lo..hi of each grid, found from the first and last output row alone:
//   1.0 grid:       the final resize's taps of o0 and o1;
//   scale k > 1.0:  the taps (D: grid k -> grid k + 1) of level k + 1's first and last row;
//   scale l < 1.0:  the taps (U: grid l -> 1.0 grid) of the 1.0 grid's first and last row.
// Columns alike. A range ends at the last tap of nonzero weight (hmsa_tap_last): a tap of weight 0
// is never read (HmsaTap repeats the first index there), so an identity resize (the output at the 1.0
// grid's size) reads exactly the tile.
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
PYSEG_HD int64_t hmsa_tap_last(int64_t dst, int64_t in_size, int64_t out_size) {
  const LinearTap<acc_t> t = linear_tap<acc_t>(dst, in_size, out_size);
  return t.l1 != static_cast<acc_t>(0) ? t.i1 : t.i0;
}

template <typename acc_t>
PYSEG_HD void hmsa_axis_ranges(const int64_t* grid, int n, int one, int64_t out, int64_t o0, int64_t o1,
                               int64_t* lo, int64_t* hi) {
  lo[one] = linear_tap<acc_t>(o0, grid[one], out).i0;
  hi[one] = hmsa_tap_last<acc_t>(o1, grid[one], out);
  for (int k = one - 1; k >= 0; --k) {
    lo[k] = linear_tap<acc_t>(lo[k + 1], grid[k], grid[k + 1]).i0;
    hi[k] = hmsa_tap_last<acc_t>(hi[k + 1], grid[k], grid[k + 1]);
  }
  for (int l = one + 1; l < n; ++l) {
    lo[l] = linear_tap<acc_t>(lo[one], grid[l], grid[one]).i0;
    hi[l] = hmsa_tap_last<acc_t>(hi[one], grid[l], grid[one]);
  }
}

// One axis tap, 8 bytes for float (a warp's 32 column taps: 2 shared-memory wavefronts): i = 2 * i0 +
// (i1 - i0), indices relative to the source range's first coordinate, i1 = i0 where l1 = 0; l0 = 1 - l1
// as linear_tap computes it.
template <typename acc_t>
struct HmsaTap {
  int i;
  acc_t l1;
};

template <typename acc_t>
PYSEG_HD HmsaTap<acc_t> hmsa_local_tap(int64_t dst, int64_t src_size, int64_t dst_size, int64_t src_lo) {
  const LinearTap<acc_t> t = linear_tap<acc_t>(dst, src_size, dst_size);
  const int step = t.l1 != static_cast<acc_t>(0) ? static_cast<int>(t.i1 - t.i0) : 0;
  return HmsaTap<acc_t>{2 * static_cast<int>(t.i0 - src_lo) + step, t.l1};
}

// Stored rows (or columns) that grid rows lo..hi of a scale read when its logits are stored at another
// size (a resize stored -> grid; the identity's range is lo..hi).
template <typename acc_t>
PYSEG_HD void hmsa_storage_range(int64_t lo, int64_t hi, int64_t stored, int64_t grid, int64_t* slo, int64_t* shi) {
  *slo = linear_tap<acc_t>(lo, stored, grid).i0;
  *shi = hmsa_tap_last<acc_t>(hi, stored, grid);
}

// A resize stored -> grid0 followed by grid0 -> grid1, along one axis at grid1 coordinate dst: up to 4
// stored indices (relative to s_lo) with their weights, equal indices merged, zero weights dropped.
template <typename acc_t>
struct HmsaTap4 {
  int n;
  int i[4];
  acc_t w[4];
};

template <typename acc_t>
PYSEG_HD HmsaTap4<acc_t> hmsa_composite_tap(int64_t dst, int64_t stored, int64_t grid0, int64_t grid1,
                                            int64_t s_lo) {
  HmsaTap4<acc_t> t;
  t.n = 0;
  const LinearTap<acc_t> d = linear_tap<acc_t>(dst, grid0, grid1);
  const int64_t rows[2] = {d.i0, d.i1};
  const acc_t rw[2] = {d.l0, d.l1};
  for (int a = 0; a < 2; ++a) {
    const LinearTap<acc_t> u = linear_tap<acc_t>(rows[a], stored, grid0);
    const int64_t src[2] = {u.i0, u.i1};
    const acc_t uw[2] = {u.l0, u.l1};
    for (int q = 0; q < 2; ++q) {
      const acc_t w = rw[a] * uw[q];
      if (w == static_cast<acc_t>(0)) continue;
      const int i = static_cast<int>(src[q] - s_lo);
      int j = 0;
      while (j < t.n && t.i[j] != i) ++j;
      if (j < t.n) {
        t.w[j] += w;
      } else {
        t.i[t.n] = i;
        t.w[t.n] = w;
        ++t.n;
      }
    }
  }
  return t;
}

// sum_a sum_b ty.w[a] tx.w[b] tile[ty.i[a] * ld + tx.i[b]]: a grid1 value straight from the stored tile.
template <typename acc_t>
PYSEG_HD acc_t hmsa_tile_composite(const acc_t* tile, int ld, const HmsaTap4<acc_t>& ty, const HmsaTap4<acc_t>& tx) {
  acc_t acc = 0;
#pragma unroll
  for (int a = 0; a < 4; ++a) {  // fixed trip counts: the taps stay in registers
    if (a >= ty.n) continue;
    const acc_t* row = tile + ty.i[a] * ld;
    acc_t r = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q)
      if (q < tx.n) r += tx.w[q] * row[tx.i[q]];
    acc += ty.w[a] * r;
  }
  return acc;
}

// Bilinear sample of a row-major tile (row stride `ld`) through a row tap and a column tap: the
// arithmetic of bilinear_sample.
template <typename acc_t>
PYSEG_HD acc_t hmsa_tile_lerp(const acc_t* tile, int ld, const HmsaTap<acc_t>& ty, const HmsaTap<acc_t>& tx) {
  const int y0 = ty.i >> 1, x0 = tx.i >> 1, x1 = x0 + (tx.i & 1);
  const acc_t* r0 = tile + y0 * ld;
  const acc_t* r1 = tile + (y0 + (ty.i & 1)) * ld;
  const acc_t ly0 = static_cast<acc_t>(1) - ty.l1, lx0 = static_cast<acc_t>(1) - tx.l1;
  return ly0 * (lx0 * r0[x0] + tx.l1 * r0[x1]) + ty.l1 * (lx0 * r1[x0] + tx.l1 * r1[x1]);
}

// ---------------------------------------------------------------------------------------------
// Backward of the two-scale training form, scales (s, 1.0) with s < 1 (HmsaArgs with n = 2,
// one = 0, index 1 = the low scale):
//   Al = R(a) (attention at the low logit grid), m = Al * pl, UA = U(Al),
//   P = U(m) + (1 - UA) * p1,  out = F(P)  (F: 1.0 grid -> out_size).
// Adjoints are gathers (CSR per axis, see linear_adjoint_csr), so there are no atomics and the
// result is deterministic. Three pixel passes:
//   r1 pass  (1.0 grid):  gP = F^T g;  g_p1 = (1 - UA) gP;  gUA = -sum_c p1 gP
//   low pass (low grid):  gm = U^T gP;  g_pl = Al gm;  gAl = sum_c pl gm + U^T gUA
//   att pass (raw attention grid): g_a = R^T gAl
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct AxisCsr {
  const int64_t* ptr;  // (in + 1)
  const int64_t* idx;  // output coordinates
  const acc_t* wt;
};

template <typename acc_t, typename src_t>
PYSEG_HD acc_t csr_gather_2d(const src_t* grad, int64_t grad_w, const AxisCsr<acc_t>& ch,
                             const AxisCsr<acc_t>& cw, int64_t y, int64_t x) {
  return adjoint_gather_2d<acc_t>(grad, grad_w, ch.ptr, ch.idx, ch.wt, cw.ptr, cw.idx, cw.wt, y, x);
}

// UA = U(Al) at 1.0-grid pixel (y, x) of sample b.
template <typename acc_t, typename scalar_t>
PYSEG_HD acc_t hmsa2_ua(const HmsaArgs<scalar_t>& A, int64_t b, int64_t y, int64_t x) {
  const LinearTap<acc_t> ty = linear_tap<acc_t>(y, A.h[1], A.h[0]);
  const LinearTap<acc_t> tx = linear_tap<acc_t>(x, A.w[1], A.w[0]);
  const acc_t r0 = tx.l0 * hmsa_att<acc_t>(A, 1, b, ty.i0, tx.i0) + tx.l1 * hmsa_att<acc_t>(A, 1, b, ty.i0, tx.i1);
  const acc_t r1 = tx.l0 * hmsa_att<acc_t>(A, 1, b, ty.i1, tx.i0) + tx.l1 * hmsa_att<acc_t>(A, 1, b, ty.i1, tx.i1);
  return ty.l0 * r0 + ty.l1 * r1;
}

// r1 pass for 1.0-grid pixel (y, x) of sample b. gP: (B, C, h1, w1) acc scratch; g_p1 like p1;
// g_ua: (B, h1, w1) acc scratch. csr_h / csr_w: adjoint of the 1.0 grid -> out_size resize.
template <typename acc_t, typename scalar_t>
PYSEG_HD void hmsa2_bwd_r1_pixel(const HmsaArgs<scalar_t>& A, const scalar_t* grad_out,
                                 const AxisCsr<acc_t>& csr_h, const AxisCsr<acc_t>& csr_w, int64_t b,
                                 int64_t y, int64_t x, acc_t* gP, scalar_t* g_p1, acc_t* g_ua) {
  const int64_t h1 = A.h[0], w1 = A.w[0], plane = h1 * w1, oplane = A.out_h * A.out_w;
  const acc_t keep = static_cast<acc_t>(1) - hmsa2_ua<acc_t>(A, b, y, x);
  acc_t gu = 0;
  for (int64_t c = 0; c < A.C; ++c) {
    const int64_t bc = b * A.C + c;
    const acc_t g = csr_gather_2d<acc_t>(grad_out + bc * oplane, A.out_w, csr_h, csr_w, y, x);
    const int64_t o = bc * plane + y * w1 + x;
    gP[o] = g;
    g_p1[o] = static_cast<scalar_t>(keep * g);
    gu -= static_cast<acc_t>(A.p[0][o]) * g;
  }
  g_ua[b * plane + y * w1 + x] = gu;
}

// low pass for low-grid pixel (y, x) of sample b. csr_h / csr_w: adjoint of low -> 1.0 grid.
// g_al_grid: (B, hl, wl) acc scratch (gradient of Al).
template <typename acc_t, typename scalar_t>
PYSEG_HD void hmsa2_bwd_low_pixel(const HmsaArgs<scalar_t>& A, const acc_t* gP, const acc_t* g_ua,
                                  const AxisCsr<acc_t>& csr_h, const AxisCsr<acc_t>& csr_w, int64_t b,
                                  int64_t y, int64_t x, scalar_t* g_pl, acc_t* g_al_grid) {
  const int64_t h1 = A.h[0], w1 = A.w[0], plane1 = h1 * w1;
  const int64_t wl = A.w[1], planel = A.h[1] * wl;
  const acc_t al = hmsa_att<acc_t>(A, 1, b, y, x);
  acc_t ga = csr_gather_2d<acc_t>(g_ua + b * plane1, w1, csr_h, csr_w, y, x);
  for (int64_t c = 0; c < A.C; ++c) {
    const int64_t bc = b * A.C + c;
    const acc_t gm = csr_gather_2d<acc_t>(gP + bc * plane1, w1, csr_h, csr_w, y, x);
    const int64_t o = bc * planel + y * wl + x;
    g_pl[o] = static_cast<scalar_t>(al * gm);
    ga += static_cast<acc_t>(A.p[1][o]) * gm;
  }
  g_al_grid[b * planel + y * wl + x] = ga;
}

// att pass for raw attention pixel (y, x) of sample b. csr_h / csr_w: adjoint of the raw
// attention -> low logit grid resize (identity when the sizes agree).
template <typename acc_t, typename scalar_t>
PYSEG_HD void hmsa2_bwd_att_pixel(const HmsaArgs<scalar_t>& A, const acc_t* g_al_grid,
                                  const AxisCsr<acc_t>& csr_h, const AxisCsr<acc_t>& csr_w, int64_t b,
                                  int64_t y, int64_t x, scalar_t* g_a) {
  const int64_t hl = A.h[1], wl = A.w[1], ha = A.ha[1], wa = A.wa[1];
  acc_t v;
  if (ha == hl && wa == wl)
    v = g_al_grid[b * hl * wl + y * wl + x];
  else
    v = csr_gather_2d<acc_t>(g_al_grid + b * hl * wl, wl, csr_h, csr_w, y, x);
  g_a[b * ha * wa + y * wa + x] = static_cast<scalar_t>(v);
}

}  // namespace pyseg
