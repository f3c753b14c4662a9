// Device code shared by the meta_block and pointwise_block CUDA kernels (included by both .cu
// launchers and by the CUDA emulator through them).
#pragma once

#include "common/patch_index.h"
#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

// Per-(sample, patch) geometry, computed on the device.
struct DevPatch {
  int64_t b, patch, r0, c0, ph, pw;
  __device__ DevPatch(int64_t item, int64_t gh, int64_t gw, int64_t H, int64_t W) {
    const int64_t G = gh * gw;
    patch = item % G;
    b = item / G;
    const int64_t gi = patch / gw, gj = patch % gw;
    r0 = patch_begin(gi, gh, H);
    ph = patch_begin(gi + 1, gh, H) - r0;
    c0 = patch_begin(gj, gw, W);
    pw = patch_begin(gj + 1, gw, W) - c0;
  }
};

// Column sums of partial (rows, 2*A) in row order -> grad_scale (A), grad_shift (A).
template <typename scalar_t>
__global__ void reduce_partials_kernel(const at::opmath_type<scalar_t>* __restrict__ partial, int64_t rows,
                                       int64_t A, scalar_t* __restrict__ gscale, scalar_t* __restrict__ gshift) {
  const int64_t col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= 2 * A) return;
  double acc = 0;
  for (int64_t r = 0; r < rows; ++r) acc += static_cast<double>(partial[r * 2 * A + col]);
  if (col < A)
    gscale[col] = static_cast<scalar_t>(acc);
  else
    gshift[col - A] = static_cast<scalar_t>(acc);
}

// Launch reduce_partials_kernel on the current stream: the per-(sample, patch) affine partials
// (rows, 2*A) of a block's backward -> gscale, gshift (A each).
template <typename scalar_t>
void reduce_partials(const at::Tensor& partial, int64_t A, at::Tensor& gscale, at::Tensor& gshift) {
  PYSEG_LAUNCH(static_cast<unsigned>(div_up(2 * A, 128)), 128, 0, gpu::stream(), reduce_partials_kernel<scalar_t>)(
      partial.const_data_ptr<at::opmath_type<scalar_t>>(), partial.size(0), A, gscale.mutable_data_ptr<scalar_t>(),
      gshift.mutable_data_ptr<scalar_t>());
  PYSEG_LAUNCH_CHECK();
}

}  // namespace
}  // namespace pyseg
