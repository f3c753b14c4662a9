// Bilinear resampling index math (align_corners=False, no antialias), shared by the CPU and
// CUDA kernels. Mirrors PyTorch's upsample_bilinear2d with an explicit output size:
//   scale = in / out;  src = max(scale * (dst + 0.5) - 0.5, 0)
//   i0 = min(floor(src), in - 1);  i1 = i0 + (i0 < in - 1);  l1 = clamp(src - i0, 0, 1);  l0 = 1 - l1
// and the output is l0*x[i0] + l1*x[i1] along each axis (separable).
#pragma once

#include <cstdint>

#include "common/patch_index.h"  // PYSEG_HD

namespace pyseg {

template <typename acc_t>
struct LinearTap {
  int64_t i0, i1;
  acc_t l0, l1;
};

// Tap of output coordinate `dst` when resizing an axis of `in_size` samples to `out_size`.
template <typename acc_t>
PYSEG_HD LinearTap<acc_t> linear_tap(int64_t dst, int64_t in_size, int64_t out_size) {
  const acc_t scale = static_cast<acc_t>(in_size) / static_cast<acc_t>(out_size);
  acc_t src = scale * (static_cast<acc_t>(dst) + static_cast<acc_t>(0.5)) - static_cast<acc_t>(0.5);
  if (src < static_cast<acc_t>(0)) src = static_cast<acc_t>(0);
  int64_t i0 = static_cast<int64_t>(src);
  if (i0 > in_size - 1) i0 = in_size - 1;
  LinearTap<acc_t> t;
  t.i0 = i0;
  t.i1 = i0 + ((i0 < in_size - 1) ? 1 : 0);
  acc_t l1 = src - static_cast<acc_t>(i0);
  if (l1 < static_cast<acc_t>(0)) l1 = static_cast<acc_t>(0);
  if (l1 > static_cast<acc_t>(1)) l1 = static_cast<acc_t>(1);
  t.l1 = l1;
  t.l0 = static_cast<acc_t>(1) - l1;
  return t;
}

// The nonzero taps of the bilinear sample (align_corners = False) at pixel (y, x) of the out_h x out_w
// resize of an in_h x in_w map, row-major: row ys[i], column xs[i], weight wt[i] (the product of the
// row and column weights), i < the returned count <= 4.
template <typename acc_t>
PYSEG_HD int bilinear_taps(int64_t y, int64_t x, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w,
                           int64_t* ys, int64_t* xs, acc_t* wt) {
  const LinearTap<acc_t> ty = linear_tap<acc_t>(y, in_h, out_h);
  const LinearTap<acc_t> tx = linear_tap<acc_t>(x, in_w, out_w);
  const int64_t rows[2] = {ty.i0, ty.i1}, cols[2] = {tx.i0, tx.i1};
  const acc_t wr[2] = {ty.l0, ty.l1}, wc[2] = {tx.l0, tx.l1};
  int n = 0;
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      const acc_t v = wr[i] * wc[j];
      if (v == static_cast<acc_t>(0)) continue;
      ys[n] = rows[i];
      xs[n] = cols[j];
      wt[n] = v;
      ++n;
    }
  return n;
}

// Bilinear sample of a single-channel map x (in_h x in_w, row-major) at pixel (y, x) of the
// out_h x out_w resized grid. When the sizes agree this is exactly x[y, x].
template <typename acc_t, typename scalar_t>
PYSEG_HD acc_t bilinear_sample(const scalar_t* map, int64_t in_h, int64_t in_w, int64_t out_h,
                               int64_t out_w, int64_t y, int64_t x) {
  if (in_h == out_h && in_w == out_w) return static_cast<acc_t>(map[y * in_w + x]);
  const LinearTap<acc_t> ty = linear_tap<acc_t>(y, in_h, out_h);
  const LinearTap<acc_t> tx = linear_tap<acc_t>(x, in_w, out_w);
  const scalar_t* r0 = map + ty.i0 * in_w;
  const scalar_t* r1 = map + ty.i1 * in_w;
  return ty.l0 * (tx.l0 * static_cast<acc_t>(r0[tx.i0]) + tx.l1 * static_cast<acc_t>(r0[tx.i1])) +
         ty.l1 * (tx.l0 * static_cast<acc_t>(r1[tx.i0]) + tx.l1 * static_cast<acc_t>(r1[tx.i1]));
}

// Adjoint of a bilinear resize along one axis as a gather: input index i receives
// sum over entries e in [ptr[i], ptr[i+1]) of wt[e] * grad[idx[e]] (idx = output coordinates).
// The CSR arrays are built on the host by linear_adjoint_csr (cpu/cuda share it).
template <typename acc_t, typename scalar_t>
PYSEG_HD acc_t adjoint_gather_2d(const scalar_t* grad, int64_t out_w, const int64_t* ptr_h,
                                 const int64_t* idx_h, const acc_t* wt_h, const int64_t* ptr_w,
                                 const int64_t* idx_w, const acc_t* wt_w, int64_t y, int64_t x) {
  acc_t acc = 0;
  for (int64_t eh = ptr_h[y]; eh < ptr_h[y + 1]; ++eh) {
    const scalar_t* row = grad + idx_h[eh] * out_w;
    acc_t r = 0;
    for (int64_t ew = ptr_w[x]; ew < ptr_w[x + 1]; ++ew) r += wt_w[ew] * static_cast<acc_t>(row[idx_w[ew]]);
    acc += wt_h[eh] * r;
  }
  return acc;
}

}  // namespace pyseg
