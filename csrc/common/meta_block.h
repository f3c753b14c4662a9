// Index math of the fused HyperSeg meta block (pw1 -> affine -> ReLU6 -> dw3x3 -> affine -> ReLU6 ->
// pw2 -> affine), shared by the CPU (.cpp) and CUDA (.cu) kernels. Header-only, __host__ __device__.
//
// Layouts (see csrc/pyseg.cpp, section meta_block):
//   weight (B, N, gh, gw) contiguous, N = hid*Cin + 9*hid + Cout*hid, per patch row-major
//          [W1 (hid, Cin) | W2 (hid, 3, 3) | W3 (Cout, hid)];
//   scale, shift (2*hid + Cout,): [stage 1 (hid) | stage 2 (hid) | stage 3 (Cout)].
// Patch (gi, gj) covers rows [patch_begin(gi, gh, H), patch_begin(gi+1, gh, H)) and the same for
// columns; its haloed region adds one pixel on every side. Halo pixels outside the image are read
// reflected (PyTorch "reflect" padding by 1), inside the image they are the real neighbours.
#pragma once

#include <cstdint>

#include "common/patch_index.h"

namespace pyseg {
namespace meta {

// Offsets of the three weight groups inside one patch's weight vector.
struct WeightLayout {
  int64_t cin, hid, cout;
  PYSEG_HD int64_t w1() const { return 0; }
  PYSEG_HD int64_t w2() const { return hid * cin; }
  PYSEG_HD int64_t w3() const { return hid * cin + 9 * hid; }
  PYSEG_HD int64_t numel() const { return hid * cin + 9 * hid + cout * hid; }
  // Offsets of the stage affines inside scale/shift.
  PYSEG_HD int64_t a1() const { return 0; }
  PYSEG_HD int64_t a2() const { return hid; }
  PYSEG_HD int64_t a3() const { return 2 * hid; }
  PYSEG_HD int64_t affine_numel() const { return 2 * hid + cout; }
};

// Largest patch extent along an axis of n pixels cut into `grid` cells.
PYSEG_HD int64_t max_patch_size(int64_t n, int64_t grid) { return div_up(n, grid); }

// Derivative mask of clamp(u, 0, 6) as torch.clamp defines it (gradient flows where lo <= u <= hi).
template <typename T>
PYSEG_HD bool relu6_passes(T u) {
  return u >= T(0) && u <= T(6);
}

template <typename T>
PYSEG_HD T relu6(T u) {
  return u < T(0) ? T(0) : (u > T(6) ? T(6) : u);
}

// Maximum number of (cell, offset) pairs halo_readers can return.
constexpr int kMaxHaloReaders = 9;

// Every (cell g, haloed offset a) along one axis whose haloed region reads image coordinate r:
// reflect_index(patch_begin(g) - 1 + a, n) == r with 0 <= a < size(g) + 2. Used to gather grad_x
// from per-patch haloed gradient buffers deterministically (fixed order, no atomics).
// Needs n >= 2 and 1 <= grid <= n. Returns the count (<= kMaxHaloReaders).
PYSEG_HD int halo_readers(int64_t r, int64_t n, int64_t grid, int64_t* cell, int64_t* off) {
  int64_t qs[3];
  int nq = 0;
  qs[nq++] = r;                      // the pixel itself (interior or a neighbour's halo)
  if (r == 1) qs[nq++] = -1;         // reflect_index(-1, n) == 1
  if (r == n - 2) qs[nq++] = n;      // reflect_index(n, n) == n - 2
  int cnt = 0;
  for (int t = 0; t < nq; ++t) {
    const int64_t q = qs[t];
    const int64_t qc = q < 0 ? 0 : (q >= n ? n - 1 : q);
    const int64_t p = patch_of(qc, grid, n);
    for (int64_t g = p - 1; g <= p + 1; ++g) {
      if (g < 0 || g >= grid) continue;
      const int64_t b = patch_begin(g, grid, n);
      const int64_t e = patch_begin(g + 1, grid, n);
      if (q >= b - 1 && q <= e) {
        cell[cnt] = g;
        off[cnt] = q - (b - 1);
        ++cnt;
      }
    }
  }
  return cnt;
}

}  // namespace meta
}  // namespace pyseg
