// Device code of pointwise_block, HyperSeg's 1x1 level block (launchers in pointwise_block.cu):
// y = relu(s * (W_patch x) + t), weight (B, Cout*Cin, gh, gw) in the default layout (entry n of a
// patch at n*G + patch) or patch-major (channels_last: at patch*N + n); every kernel takes the element
// stride of n (sn) and of the patch (sp), so both layouts are read in place.
//
// Forward (pointwise_forward_kernel): one 256-thread block per (sample, patch, tile of <= kPwTP pixels,
// block of <= kPwOC output channels). Why this shape (HyperSeg-M's pointwise levels, batch 1: Cin
// 82/94/44 -> Cout 64/32/16 on a 16x32 grid of 1x1 / 2x2 / 4x4-pixel patches): each patch weight is used
// by <= 16 pixels, i.e. <= 32 FLOP per weight element read (8 FLOP/B in fp32, 16 in bf16) against the
// H100's 67e12/3.35e12 = 20 FLOP/B FFMA ridge: the op is memory-bound, so plain FFMA in float suffices and
// the design goal is to stream the weights (94-98% of the bytes) once, coalesced, with enough blocks:
// G = 512 blocks at batch 1 (3.9 per SM, full waves), each reading its patch's Cout*Cin weights as
// contiguous rows (patch-major, what the models emit on CUDA: a warp per row, lanes over c, no integer
// division per element). The launcher halves the channel block, then the tile (to 16 each), while the
// grid has under 2 blocks per SM (few large patches: a 1x1 grid on a small image, the *-static models).
// Warp 0 computes the patch geometry and the tile's pixel offsets (one barrier); per chunk of <= KC input
// channels the block stages
//   ws[o][c] (float, row stride ldw odd: the 32 lanes of a 1-pixel patch read 32 rows -> 32 banks)
//   xs[c][s] (float, the tile's pixels through the offset table, zero past the tile; rows of PX = 4 * NQ
//             slots, NQ = the tile's pixel quads rounded up to a power of two)
// then each thread accumulates (1 channel x 4 pixels q + j*NQ) items in registers: one broadcast-or-
// distinct LDS of w, one 16-B LDS of 4 pixels, 4 FFMA per input channel (1 useful FFMA on 1-pixel patches,
// where the 64 busy threads still finish a patch's 82 channels in ~250 cycles, hidden behind the
// 21 KB weight stream). Smem <= 288 B + (64*65 + 64*64) * 4 B = 33 KB (float); 64 registers: 4 blocks/SM.
// Unequal patches: tiles past a smaller patch exit after the first barrier. int32 index math within a
// sample (the launcher checks every per-sample extent < 2^31).
#pragma once

#include "common/patch_index.h"
#include "cuda/block_kernels.cuh"
#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

constexpr int kOC = 8;  // channels per thread of the backward grad_x kernel

constexpr int kPwThreads = 256;
constexpr int kPwOC = 64;                                 // output channels per block (at most)
constexpr int kPwTP = 64;                                 // pixels per tile (at most)
constexpr int kPwItems = kPwOC * (kPwTP / 4) / kPwThreads;  // (channel, pixel quad) items per thread: 4
// input channels per chunk: 64 floats (32 doubles) keep ws + xs at ~33 KB, under the 48 KB default
template <typename acc_t>
constexpr int pw_kc() { return 256 / static_cast<int>(sizeof(acc_t)); }

// blocks per SM the forward kernel is compiled for: 4 caps ptxas at 64 registers (no spills in float;
// 125 unbounded); float64 accumulators take 3 (80 registers), where 4 spills 16 B
template <typename scalar_t>
constexpr int kPwMinBlocks = sizeof(at::opmath_type<scalar_t>) == 8 ? 3 : 4;

// 16 bytes of four consecutive accumulators (one LDS.128 of xs)
template <typename acc_t>
struct alignas(4 * sizeof(acc_t)) Quad {
  acc_t v[4];
};

// Geometry of a forward launch (computed by the launcher, read by every block).
struct PwFwdGeom {
  int Cin, Cout, H, W, gh, gw;
  int sn, sp;       // element stride of weight entry n / of the patch within a sample
  int tpb, ntiles;  // pixels per tile (<= kPwTP), tiles per patch (of the largest patch)
  int ocb;          // output channels per block (<= kPwOC; grid.z = ceil(Cout / ocb))
  int ldw, oxs;     // ws row stride (odd), xs offset from ws (in acc_t elements, 32-B aligned)
  int64_t wsample;  // weight elements per sample (N * G)
};

// bytes before ws in shared memory: kPwTP pixel offsets and the tile's pixel count (32-B aligned)
constexpr int kPwHeader = (kPwTP + 8) * static_cast<int>(sizeof(int));

template <typename scalar_t>
__global__ void __launch_bounds__(kPwThreads, kPwMinBlocks<scalar_t>) pointwise_forward_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight, const scalar_t* __restrict__ scale,
    const scalar_t* __restrict__ shift, scalar_t* __restrict__ y, at::opmath_type<scalar_t>* __restrict__ zout,
    at::opmath_type<scalar_t>* __restrict__ gu, const scalar_t* __restrict__ grad_out, PwFwdGeom g) {
  // Forward (y != nullptr) or the first backward pass (zout, gu: pre-affine z and the ReLU-masked
  // grad_out, both (B, Cout, H, W) in acc precision).
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int KC = pw_kc<acc_t>();
  PYSEG_DYNAMIC_SMEM(smem_raw);
  int* off = reinterpret_cast<int*>(smem_raw);  // the tile's pixel offsets in the image; off[kPwTP]: tp
  acc_t* ws = reinterpret_cast<acc_t*>(smem_raw + kPwHeader);
  acc_t* xs = ws + g.oxs;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int patch = static_cast<int>(blockIdx.x) / g.ntiles;
  const int64_t b = blockIdx.y;
  const int oc0 = static_cast<int>(blockIdx.z) * g.ocb, ocn = min(g.ocb, g.Cout - oc0);
  if (warp == 0) {  // the patch geometry (int32 divisions) once per block, not once per warp
    const int tile = static_cast<int>(blockIdx.x) - patch * g.ntiles;
    const int gi = patch / g.gw, gj = patch - gi * g.gw;
    const int r0 = patch_begin_as<int>(gi, g.gh, g.H), ph = patch_begin_as<int>(gi + 1, g.gh, g.H) - r0;
    const int c0 = patch_begin_as<int>(gj, g.gw, g.W), pw = patch_begin_as<int>(gj + 1, g.gw, g.W) - c0;
    const int p0 = tile * g.tpb, tpw = min(g.tpb, ph * pw - p0);  // <= 0: a tile past a smaller patch
    for (int i = lane; i < tpw; i += 32) {
      const int p = p0 + i, pr = p / pw;
      off[i] = (r0 + pr) * g.W + c0 + (p - pr * pw);
    }
    if (lane == 0) off[kPwTP] = tpw;
  }
  __syncthreads();
  const int tp = off[kPwTP];
  if (tp <= 0) return;  // block-uniform; no barrier follows for these blocks
  // pixel quads rounded up to a power of two: item -> (o = item >> lq, quad = item & (NQ - 1))
  int lq = 0;
  while ((4 << lq) < tp) ++lq;
  const int NQ = 1 << lq, PX = 4 * NQ, lpx = lq + 2, items = ocn << lq;
  const int HW = g.H * g.W;
  const scalar_t* wq = weight + b * g.wsample + static_cast<int64_t>(patch) * g.sp;
  const scalar_t* xb = x + b * g.Cin * HW;
  acc_t acc[kPwItems][4] = {};
  for (int cc = 0; cc < g.Cin; cc += KC) {
    const int kcn = min(KC, g.Cin - cc);
    if (cc > 0) __syncthreads();  // the previous chunk's reads are done
    for (int o = warp; o < ocn; o += kPwThreads / 32) {  // a warp per weight row, lanes along c
      const scalar_t* src = wq + ((oc0 + o) * g.Cin + cc) * g.sn;
      for (int c = lane; c < kcn; c += 32) ws[o * g.ldw + c] = static_cast<acc_t>(src[c * g.sn]);
    }
    // x: thread -> (channel c = i >> lpx, slot i & (PX - 1)); slot 4q + j holds pixel q + j*NQ, so a
    // thread's 16-B load gives pixels q, q + NQ, q + 2NQ, q + 3NQ and the stores of lanes q, q + 1, ...
    // are consecutive; zero past the tile
    for (int i = tid; i < (kcn << lpx); i += kPwThreads) {
      const int c = i >> lpx, px = ((i & (PX - 1)) >> 2) + (i & 3) * NQ;
      xs[i] = px < tp ? static_cast<acc_t>(xb[(cc + c) * HW + off[px]]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kPwItems; ++k) {
      const int item = tid + k * kPwThreads;
      if (item >= items) break;
      const acc_t* wr = ws + (item >> lq) * g.ldw;
      const acc_t* xr = xs + 4 * (item & (NQ - 1));
      for (int c = 0; c < kcn; ++c) {
        const acc_t w = wr[c];
        const Quad<acc_t> xv = *reinterpret_cast<const Quad<acc_t>*>(xr + c * PX);
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[k][i] += w * xv.v[i];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kPwItems; ++k) {
    const int item = tid + k * kPwThreads;
    if (item >= items) break;
    const int o = oc0 + (item >> lq), q = item & (NQ - 1);
    const acc_t s = static_cast<acc_t>(scale[o]), t = static_cast<acc_t>(shift[o]);
    const int64_t obase = (b * g.Cout + o) * HW;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (q + i * NQ >= tp) break;
      const int64_t at = obase + off[q + i * NQ];
      const acc_t v = acc[k][i] * s + t;
      if (y) y[at] = static_cast<scalar_t>(v > acc_t(0) ? v : acc_t(0));
      if (zout) {
        zout[at] = acc[k][i];
        gu[at] = v > acc_t(0) ? static_cast<acc_t>(grad_out[at]) : acc_t(0);
      }
    }
  }
}

// A thread of the backward grad_x kernel (grid: pixel blocks, tiles of kOC channels, samples): its
// pixel, sample, first channel, and wp, the pixel's patch weights (entry n at wp[n * sn]; null when
// pix >= H*W, a thread without a pixel).
template <typename scalar_t>
struct PixelThread {
  int64_t pix, b, c0;
  const scalar_t* wp;
};

template <typename scalar_t>
__device__ PixelThread<scalar_t> pixel_thread(const scalar_t* weight, int64_t Cin, int64_t Cout, int64_t H, int64_t W,
                                              int64_t gh, int64_t gw, int64_t sp) {
  const int64_t pix = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, b = blockIdx.z;
  const scalar_t* wp = nullptr;
  if (pix < H * W)
    wp = weight + b * Cout * Cin * gh * gw + (patch_of(pix / W, gh, H) * gw + patch_of(pix % W, gw, W)) * sp;
  return {pix, b, static_cast<int64_t>(blockIdx.y) * kOC, wp};
}

// grad_x[b, c, pix] = sum_o W[o, c] * s[o] * gu[o, pix]; thread per pixel, kOC input channels per thread.
template <typename scalar_t>
__global__ void pointwise_grad_x_kernel(const at::opmath_type<scalar_t>* __restrict__ gu,
                                        const scalar_t* __restrict__ weight, const scalar_t* __restrict__ scale,
                                        scalar_t* __restrict__ gx, int64_t B, int64_t Cin, int64_t Cout, int64_t H,
                                        int64_t W, int64_t gh, int64_t gw, int64_t sn, int64_t sp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = H * W;
  const auto [pix, b, c0, wp] = pixel_thread(weight, Cin, Cout, H, W, gh, gw, sp);
  if (pix >= HW) return;
  acc_t acc[kOC] = {};
  for (int64_t o = 0; o < Cout; ++o) {
    const acc_t g = gu[(b * Cout + o) * HW + pix] * static_cast<acc_t>(scale[o]);
#pragma unroll
    for (int u = 0; u < kOC; ++u)
      if (c0 + u < Cin) acc[u] += static_cast<acc_t>(wp[(o * Cin + c0 + u) * sn]) * g;
  }
#pragma unroll
  for (int u = 0; u < kOC; ++u)
    if (c0 + u < Cin) gx[(b * Cin + c0 + u) * HW + pix] = static_cast<scalar_t>(acc[u]);
}

// One block per (sample, patch): grad W[o, c] = s[o] * sum_p gu[o, p] x[c, p] and the affine
// partials, each entry owned by one thread looping over the patch pixels in order; grad W is
// written in the default (contiguous) layout whatever the layout of W.
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
