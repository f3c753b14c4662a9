// Device code of pointwise_block, HyperSeg's 1x1 level block (launchers in pointwise_block.cu):
// y = relu(s * (W_patch x) + t). Thread per pixel, kOC output channels per thread
// in registers; the patch weights are read through the cache (neighbouring threads share a patch).
#pragma once

#include "common/patch_index.h"
#include "cuda/block_kernels.cuh"
#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

constexpr int kOC = 8;

// A thread of the per-pixel kernels (grid: pixel blocks, tiles of kOC channels, samples): its pixel,
// sample, first channel, and wp, the pixel's patch weights in the (B, Cout*Cin, gh, gw) layout
// (entry n at wp[n * gh * gw]; null when pix >= H*W, a thread without a pixel).
template <typename scalar_t>
struct PixelThread {
  int64_t pix, b, c0;
  const scalar_t* wp;
};

template <typename scalar_t>
__device__ PixelThread<scalar_t> pixel_thread(const scalar_t* weight, int64_t Cin, int64_t Cout, int64_t H, int64_t W,
                                              int64_t gh, int64_t gw) {
  const int64_t pix = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, b = blockIdx.z;
  const scalar_t* wp = nullptr;
  if (pix < H * W) wp = weight + b * Cout * Cin * gh * gw + patch_of(pix / W, gh, H) * gw + patch_of(pix % W, gw, W);
  return {pix, b, static_cast<int64_t>(blockIdx.y) * kOC, wp};
}

template <typename scalar_t>
__global__ void pointwise_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
                                         const scalar_t* __restrict__ scale, const scalar_t* __restrict__ shift,
                                         scalar_t* __restrict__ y, at::opmath_type<scalar_t>* __restrict__ zout,
                                         at::opmath_type<scalar_t>* __restrict__ gu,
                                         const scalar_t* __restrict__ grad_out, int64_t B, int64_t Cin, int64_t Cout,
                                         int64_t H, int64_t W, int64_t gh, int64_t gw) {
  // Forward (y != nullptr) or the first backward pass (zout, gu: pre-affine z and the ReLU-masked
  // grad_out, both (B, Cout, H, W) in acc precision).
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W, G = gh * gw;
  const auto [pix, b, o0, wp] = pixel_thread(weight, Cin, Cout, H, W, gh, gw);
  if (pix >= HW) return;
  acc_t acc[kOC] = {};
  for (int64_t c = 0; c < Cin; ++c) {
    const acc_t xv = static_cast<acc_t>(x[(b * Cin + c) * HW + pix]);
#pragma unroll
    for (int u = 0; u < kOC; ++u)
      if (o0 + u < Cout) acc[u] += static_cast<acc_t>(wp[((o0 + u) * Cin + c) * G]) * xv;
  }
#pragma unroll
  for (int u = 0; u < kOC; ++u) {
    const int64_t o = o0 + u;
    if (o >= Cout) break;
    const acc_t v = acc[u] * static_cast<acc_t>(scale[o]) + static_cast<acc_t>(shift[o]);
    const int64_t off = (b * Cout + o) * HW + pix;
    if (y) y[off] = static_cast<scalar_t>(v > acc_t(0) ? v : acc_t(0));
    if (zout) {
      zout[off] = acc[u];
      gu[off] = v > acc_t(0) ? static_cast<acc_t>(grad_out[off]) : acc_t(0);
    }
  }
}

// grad_x[b, c, pix] = sum_o W[o, c] * s[o] * gu[o, pix]; kOC input channels per thread.
template <typename scalar_t>
__global__ void pointwise_grad_x_kernel(const at::opmath_type<scalar_t>* __restrict__ gu,
                                        const scalar_t* __restrict__ weight, const scalar_t* __restrict__ scale,
                                        scalar_t* __restrict__ gx, int64_t B, int64_t Cin, int64_t Cout, int64_t H,
                                        int64_t W, int64_t gh, int64_t gw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W, G = gh * gw;
  const auto [pix, b, c0, wp] = pixel_thread(weight, Cin, Cout, H, W, gh, gw);
  if (pix >= HW) return;
  acc_t acc[kOC] = {};
  for (int64_t o = 0; o < Cout; ++o) {
    const acc_t g = gu[(b * Cout + o) * HW + pix] * static_cast<acc_t>(scale[o]);
#pragma unroll
    for (int u = 0; u < kOC; ++u)
      if (c0 + u < Cin) acc[u] += static_cast<acc_t>(wp[(o * Cin + c0 + u) * G]) * g;
  }
#pragma unroll
  for (int u = 0; u < kOC; ++u)
    if (c0 + u < Cin) gx[(b * Cin + c0 + u) * HW + pix] = static_cast<scalar_t>(acc[u]);
}

// One block per (sample, patch): grad W[o, c] = s[o] * sum_p gu[o, p] x[c, p] and the affine
// partials, each entry owned by one thread looping over the patch pixels in order.
template <typename scalar_t>
__global__ void pointwise_grad_w_kernel(const at::opmath_type<scalar_t>* __restrict__ gu,
                                        const at::opmath_type<scalar_t>* __restrict__ z,
                                        const scalar_t* __restrict__ x, const scalar_t* __restrict__ scale,
                                        scalar_t* __restrict__ gw_out, at::opmath_type<scalar_t>* __restrict__ partial,
                                        int64_t Cin, int64_t Cout, int64_t H, int64_t W, int64_t gh, int64_t gw) {
  using acc_t = at::opmath_type<scalar_t>;
  const DevPatch P(blockIdx.x, gh, gw, H, W);
  const int64_t HW = H * W, G = gh * gw, np = P.ph * P.pw;
  if (gw_out) {
    for (int64_t idx = threadIdx.x; idx < Cout * Cin; idx += blockDim.x) {
      const int64_t o = idx / Cin, c = idx % Cin;
      acc_t acc = 0;
      for (int64_t p = 0; p < np; ++p) {
        const int64_t off = (P.r0 + p / P.pw) * W + P.c0 + p % P.pw;
        acc += gu[(P.b * Cout + o) * HW + off] * static_cast<acc_t>(x[(P.b * Cin + c) * HW + off]);
      }
      gw_out[(P.b * Cout * Cin + idx) * G + P.patch] = static_cast<scalar_t>(acc * static_cast<acc_t>(scale[o]));
    }
  }
  if (partial) {
    for (int64_t o = threadIdx.x; o < Cout; o += blockDim.x) {
      acc_t sg = 0, sgz = 0;
      for (int64_t p = 0; p < np; ++p) {
        const int64_t off = (P.b * Cout + o) * HW + (P.r0 + p / P.pw) * W + P.c0 + p % P.pw;
        sg += gu[off];
        sgz += gu[off] * z[off];
      }
      partial[blockIdx.x * 2 * Cout + o] = sgz;
      partial[blockIdx.x * 2 * Cout + Cout + o] = sg;
    }
  }
}

}  // namespace
}  // namespace pyseg
