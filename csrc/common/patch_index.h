// Index math shared by the CPU (.cpp) and CUDA (.cu) kernels of every pyseg op.
// Everything here is __host__ __device__ and header-only.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PYSEG_HD __host__ __device__ __forceinline__
#else
#define PYSEG_HD inline
#endif

namespace pyseg {

// Patch (grid cell) of output coordinate i along an axis of `out` pixels cut into `grid`
// cells: floor(i * grid / out), i.e. the weight grid nearest-upsampled to the output size.
PYSEG_HD int64_t patch_of(int64_t i, int64_t grid, int64_t out) {
  return (i * grid) / out;
}

// First output coordinate that belongs to cell g: smallest i with floor(i*grid/out) >= g,
// i.e. ceil(g*out/grid). Cell g covers [patch_begin(g), patch_begin(g+1)). patch_begin_as<I>
// computes it in the integer type I (int for kernels whose launcher checks grid * out < 2^31).
template <typename I>
PYSEG_HD I patch_begin_as(I g, I grid, I out) {
  return (g * out + grid - 1) / grid;
}
PYSEG_HD int64_t patch_begin(int64_t g, int64_t grid, int64_t out) { return patch_begin_as<int64_t>(g, grid, out); }

// Output size of a convolution along one axis.
PYSEG_HD int64_t conv_out_size(int64_t in, int64_t pad_before, int64_t pad_after, int64_t k,
                               int64_t stride, int64_t dilation) {
  return (in + pad_before + pad_after - dilation * (k - 1) - 1) / stride + 1;
}

// Reflect an index into [0, n) without repeating the edge (PyTorch's "reflect" mode).
// Valid for -n < i < 2n - 1 (pads smaller than the size), n >= 2; n == 1 maps to 0. I: the integer type
// (reflect_index: int64_t; the GPU kernels' 32-bit tile loops use reflect_index_as<int>).
template <class I>
PYSEG_HD I reflect_index_as(I i, I n) {
  if (n == 1) return 0;
  if (i < 0) i = -i;
  if (i >= n) i = 2 * (n - 1) - i;
  return i;
}
PYSEG_HD int64_t reflect_index(int64_t i, int64_t n) { return reflect_index_as<int64_t>(i, n); }

// Ceil division for non-negative numerators, floor division that rounds towards -inf.
PYSEG_HD int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
PYSEG_HD int64_t floor_div(int64_t a, int64_t b) {
  return (a >= 0) ? a / b : -((-a + b - 1) / b);
}

}  // namespace pyseg
