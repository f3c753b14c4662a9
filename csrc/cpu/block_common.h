// Host helpers shared by the CPU block kernels (meta_block.cpp, pointwise_block.cpp): the geometry
// of a (sample, patch) work item, row padding and the fixed-order sum of affine-gradient partials.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "common/patch_index.h"

namespace pyseg {
namespace cpu_block {

// Geometry of one (sample, patch) work item.
struct PatchGeom {
  int64_t b, gi, gj, r0, c0, ph, pw, hh, hw;
  PatchGeom(int64_t item, int64_t gh, int64_t gw, int64_t H, int64_t W) {
    gj = item % gw;
    gi = (item / gw) % gh;
    b = item / (gw * gh);
    r0 = patch_begin(gi, gh, H);
    ph = patch_begin(gi + 1, gh, H) - r0;
    c0 = patch_begin(gj, gw, W);
    pw = patch_begin(gj + 1, gw, W) - c0;
    hh = ph + 2;
    hw = pw + 2;
  }
};

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Affine gradients from per-work-item partials laid out (items, 2, n) = [d scale | d shift],
// summed in a fixed order in double (deterministic).
template <typename scalar_t, typename acc_t>
void sum_affine_partials(const std::vector<acc_t>& partial, int64_t items, int64_t n, at::Tensor& gscale,
                         at::Tensor& gshift) {
  std::vector<double> s(n, 0.0), t(n, 0.0);
  for (int64_t item = 0; item < items; ++item)
    for (int64_t a = 0; a < n; ++a) {
      s[a] += static_cast<double>(partial[item * 2 * n + a]);
      t[a] += static_cast<double>(partial[item * 2 * n + n + a]);
    }
  scalar_t* gs = gscale.mutable_data_ptr<scalar_t>();
  scalar_t* gt = gshift.mutable_data_ptr<scalar_t>();
  for (int64_t a = 0; a < n; ++a) {
    gs[a] = static_cast<scalar_t>(s[a]);
    gt[a] = static_cast<scalar_t>(t[a]);
  }
}

}  // namespace cpu_block
}  // namespace pyseg
