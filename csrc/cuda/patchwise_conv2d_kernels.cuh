// Device code of pyseg::patchwise_conv2d and its backward (launchers in patchwise_conv2d.cu; the
// scheme is described there).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/patch_index.h"
#include "common/patchwise_conv2d.h"
#include "cuda/mma.cuh"
#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

constexpr int kThreads = 256;

// The (sample, patch) of a block whose blockIdx.x is b * gh*gw + patch, and the patch's output rows
// [r0, r1) and columns [c0, c1).
struct PwBlockPatch {
  int64_t b, pidx, r0, r1, c0, c1;
};
__device__ __forceinline__ PwBlockPatch pw_block_patch(const PwConvShape& s) {
  const int64_t GG = s.gh * s.gw;
  PwBlockPatch q;
  q.pidx = static_cast<int64_t>(blockIdx.x) % GG;
  q.b = static_cast<int64_t>(blockIdx.x) / GG;
  const int64_t pi = q.pidx / s.gw, pj = q.pidx % s.gw;
  q.r0 = patch_begin(pi, s.gh, s.Hout);
  q.r1 = patch_begin(pi + 1, s.gh, s.Hout);
  q.c0 = patch_begin(pj, s.gw, s.Wout);
  q.c1 = patch_begin(pj + 1, s.gw, s.Wout);
  return q;
}

// ------------------------------------------------------------------------------------------
// forward, tiled (the default path; the scheme is described in patchwise_conv2d.cu)
// ------------------------------------------------------------------------------------------
// Threads per output-channel group: a group's 64 threads hold kPwRP pixels each of a tile of at
// most kPwTilePixels output pixels.
constexpr int kPwGroupThreads = 64;
constexpr int kPwRP = 4;
constexpr int kPwTilePixels = kPwGroupThreads * kPwRP;
constexpr int kPwMaxGroups = 6;  // <= 384 threads per block

__device__ __forceinline__ int64_t pw_lo(int64_t a, int64_t b) { return a < b ? a : b; }

// The launcher's plan of the tiled forward (all sizes in elements of the accumulation type).
struct PwTilePlan {
  int OT, NG;         // output channels per block (NG groups of RO) and groups
  int TR, TC;         // pixel tile: TR rows x TC columns of a patch
  int IR, IC;         // staged input tile per channel: IR rows, row stride IC (>= the columns read)
  int CC;             // input channels staged per chunk
  int64_t w_entry, w_patch;  // weight strides (PwConvForward)
};

// RO consecutive accumulation-type values, loaded from shared memory as one vector (LDS.128 for
// four floats: the output-channel slice of a thread, 16-byte aligned by the plan).
template <typename T, int N>
struct alignas(sizeof(T) * N > 16 ? 16 : sizeof(T) * N) PwVec {
  T v[N];
};

// One block per (sample, patch) x output-channel tile (grid.y) x pixel tile of the patch (grid.z).
// Shared memory: ws[(cl*kh*kw + tap) * OT + ol] (weights of the chunk's channels, zero outside the
// channel's group), then xs[cl][IR][IC] (the input tile + halo, zero-padded). Thread (og, tp) owns
// output channels o0 + og*RO + [0, RO) and pixels tp + q*64, q < RP (row-major in the tile), so
// a warp's lanes read consecutive input words (IC is chosen by the launcher to avoid bank
// conflicts) and one broadcast vector of weights per tap. kUnit: 3x3, stride 1, dilation 1 (taps
// unrolled: the three taps of a kernel row are immediate offsets from one address per pixel); with RO == 1
// such a tile runs in strips instead (a thread's pixels down one column: see kStrips below).
// Registers: the 3x3 path of 4-byte accumulators fits 85 (two 384-thread blocks per SM; ptxas -v:
// no spills); the general path and double get up to 168.
template <typename scalar_t, bool kUnit>
constexpr int kPwMinBlocks = kUnit && sizeof(at::opmath_type<scalar_t>) == 4 ? 2 : 1;

template <typename scalar_t, int RO, bool kUnit>
__global__ void __launch_bounds__(kPwGroupThreads * kPwMaxGroups, kPwMinBlocks<scalar_t, kUnit>)
    pw_forward_tiled_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                            const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, const PwConvShape s,
                            const PwTilePlan t) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = PwVec<acc_t, RO>;
  PYSEG_DYNAMIC_SMEM(pw_smem_raw);
  // per-tap sizes as int (every staged index fits: the plan bounds the tile by the shared memory)
  const int kh = kUnit ? 3 : static_cast<int>(s.kh), kw = kUnit ? 3 : static_cast<int>(s.kw);
  const int sh = kUnit ? 1 : static_cast<int>(s.sh), sw = kUnit ? 1 : static_cast<int>(s.sw);
  const int dh = kUnit ? 1 : static_cast<int>(s.dh), dw = kUnit ? 1 : static_cast<int>(s.dw);
  const int KK = kh * kw, OT = t.OT, IC = t.IC, IR = t.IR;
  acc_t* ws = reinterpret_cast<acc_t*>(pw_smem_raw);
  acc_t* xs = ws + t.CC * KK * OT;

  const int64_t GG = s.gh * s.gw;
  const PwBlockPatch bp = pw_block_patch(s);
  const int64_t pidx = bp.pidx, b = bp.b, r0 = bp.r0, r1 = bp.r1, c0 = bp.c0, c1 = bp.c1;
  const int ntc = static_cast<int>((c1 - c0 + t.TC - 1) / t.TC);
  const int tz = static_cast<int>(blockIdx.z);
  // rows, columns and channels fit in int (only products of them may not)
  const int tr0 = static_cast<int>(r0) + (tz / ntc) * t.TR, tc0 = static_cast<int>(c0) + (tz % ntc) * t.TC;
  if (tr0 >= r1) return;  // this patch has fewer tiles than the largest one (whole block, before any barrier)
  const int nr = min(t.TR, static_cast<int>(r1) - tr0), nc = min(t.TC, static_cast<int>(c1) - tc0);
  const int npix = nr * nc;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * OT;
  const int nO = static_cast<int>(pw_lo(OT, s.Cout - o0));
  // input channels the tile's output channels read: whole groups, contiguous
  const int Cg = static_cast<int>(s.Cg), Og = static_cast<int>(s.Og);
  const int c_lo = static_cast<int>(o0 / Og) * Cg, c_hi = static_cast<int>((o0 + nO - 1) / Og + 1) * Cg;

  const int tid = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
  const int og = tid / kPwGroupThreads, tp = tid % kPwGroupThreads;
  const bool active = og * RO < nO;
  // the thread's RO channels lie in one group (the launcher picks RO = 1 unless Og % 4 == 0 or groups == 1)
  const int my_g = static_cast<int>((o0 + min(og * RO, nO - 1)) / Og);
  const int my_lo = active ? my_g * Cg : 0, my_hi = active ? (my_g + 1) * Cg : 0;

  // 3x3 strips (kUnit, RO == 1: depthwise and other one-channel-per-thread shapes): when ceil(nr / kPwRP)
  // strips of nc columns fit the group, thread tp owns the kPwRP vertically consecutive pixels
  // (srow + q, scol) instead of pixels 64 apart, so its 3x3 windows share rows: per channel it loads
  // kPwRP + 2 input rows of 3 words (18 loads, not 36) and its 9 weights once. Lanes are consecutive
  // columns of a strip row (conflict-free when nc == 32). Not for RO == 4: 9 weight vectors + 16
  // accumulators spill under the 3x3 path's 80 registers (ptxas -v).
  constexpr bool kStrips = kUnit && RO == 1;
  const bool strip = kStrips && ((nr + kPwRP - 1) / kPwRP) * nc <= kPwGroupThreads;
  const bool sown = strip && tp < ((nr + kPwRP - 1) / kPwRP) * nc;  // the thread owns pixels of the tile
  const int srow = sown ? tp / nc * kPwRP : 0, scol = sown ? tp % nc : 0;
  const int sbase = srow * IC + scol;
  int off[kPwRP];
#pragma unroll
  for (int q = 0; q < kPwRP; ++q) {
    const int p = min(tp + q * kPwGroupThreads, npix - 1);
    off[q] = (p / nc) * sh * IC + (p % nc) * sw;
  }
  acc_t acc[kPwRP][RO];
#pragma unroll
  for (int q = 0; q < kPwRP; ++q)
#pragma unroll
    for (int r = 0; r < RO; ++r) acc[q][r] = acc_t(0);

  const int icn = (nc - 1) * sw + (kw - 1) * dw + 1;  // input columns this tile reads (<= IC)
  const int irn = (nr - 1) * sh + (kh - 1) * dh + 1;  // input rows (<= IR)
  const int H = static_cast<int>(s.H), W = static_cast<int>(s.W);
  const int ih0 = tr0 * sh - static_cast<int>(s.pt), iw0 = tc0 * sw - static_cast<int>(s.pl);
  const int64_t wb = b * s.Cout * s.K * GG + pidx * t.w_patch;
  const int plane = IR * IC;
  const int warp = tid / 32, lane = tid % 32, nwarps = nthreads / 32;
  const int step_c = nthreads % icn, step_r = nthreads / icn;

  for (int cc = c_lo; cc < c_hi; cc += t.CC) {
    const int ncc = min(t.CC, c_hi - cc);
    const scalar_t* xb = x + (b * s.Cin + cc) * s.H * s.W;
    // stage the input tile: consecutive threads along a row (coalesced global reads, consecutive banks);
    // the element's (channel, row, column) advance by the block size without a division per element
    int c = tid % icn, r = tid / icn, cl = r / irn;
    r -= cl * irn;
#pragma unroll 1
    for (int e = tid; e < ncc * irn * icn; e += nthreads) {
      const int ih = ih0 + r, iw = iw0 + c;
      acc_t v = acc_t(0);
      if (ih >= 0 && ih < H && iw >= 0 && iw < W) v = static_cast<acc_t>(xb[static_cast<int64_t>(cl * H + ih) * W + iw]);
      xs[cl * plane + r * IC + c] = v;
      c += step_c;
      r += step_r;
      if (c >= icn) {
        c -= icn;
        ++r;
      }
      while (r >= irn) {
        r -= irn;
        ++cl;
      }
    }
    // stage the weights: a warp per output channel, lanes along its (channel, tap) entries of the chunk
    // (consecutive in a patch-major weight; gh*gw apart in the default layout)
#pragma unroll 1
    for (int ol = warp; ol < OT; ol += nwarps) {
      const int o = static_cast<int>(o0) + ol;
      const int ci0 = ol < nO ? cc - (o / Og) * Cg : 0;  // the chunk's first channel in o's group
      const scalar_t* wo = w + wb + (static_cast<int64_t>(o) * Cg + ci0) * KK * t.w_entry;
      // entries of channels in o's group: [k_lo, k_hi) (all of them when groups == 1); zero elsewhere
      const int k_lo = ol < nO ? max(0, -ci0) * KK : 0, k_hi = ol < nO ? min(ncc, Cg - ci0) * KK : 0;
#pragma unroll 1
      for (int k = lane; k < ncc * KK; k += 32)
        ws[k * OT + ol] = (k >= k_lo && k < k_hi) ? static_cast<acc_t>(wo[k * t.w_entry]) : acc_t(0);
    }
    __syncthreads();
    const int cl_lo = max(my_lo, cc) - cc, cl_hi = min(my_hi, cc + ncc) - cc;
#pragma unroll 1
    for (int cl = cl_lo; cl < cl_hi; ++cl) {
      const acc_t* xc = xs + cl * plane;
      const acc_t* wc = ws + cl * KK * OT + og * RO;
      if (kStrips && strip) {
        // input rows srow + i, i < kPwRP + 2, of which the first irn - srow are staged (the rest: 0)
        vec_t wv[9];
#pragma unroll
        for (int k = 0; k < 9; ++k) wv[k] = *reinterpret_cast<const vec_t*>(wc + k * OT);
        const acc_t* xp = xc + sbase;
#pragma unroll
        for (int i = 0; i < kPwRP + 2; ++i) {
          acc_t xv[3];
#pragma unroll
          for (int kx = 0; kx < 3; ++kx) xv[kx] = srow + i < irn ? xp[i * IC + kx] : acc_t(0);
#pragma unroll
          for (int q = 0; q < kPwRP; ++q) {
            const int ky = i - q;
            if (ky < 0 || ky > 2) continue;
#pragma unroll
            for (int kx = 0; kx < 3; ++kx)
#pragma unroll
              for (int r = 0; r < RO; ++r) acc[q][r] += wv[ky * 3 + kx].v[r] * xv[kx];
          }
        }
      } else if constexpr (kUnit) {
#pragma unroll
        for (int ky = 0; ky < 3; ++ky) {
          const acc_t* xr = xc + ky * IC;
          vec_t wv[3];
#pragma unroll
          for (int kx = 0; kx < 3; ++kx) wv[kx] = *reinterpret_cast<const vec_t*>(wc + (ky * 3 + kx) * OT);
#pragma unroll
          for (int q = 0; q < kPwRP; ++q) {
            const acc_t* xp = xr + off[q];
#pragma unroll
            for (int kx = 0; kx < 3; ++kx) {
              const acc_t xv = xp[kx];
#pragma unroll
              for (int r = 0; r < RO; ++r) acc[q][r] += wv[kx].v[r] * xv;
            }
          }
        }
      } else {
        for (int ky = 0; ky < kh; ++ky) {
          const acc_t* xr = xc + ky * dh * IC;
          for (int kx = 0; kx < kw; ++kx) {
            const vec_t wv = *reinterpret_cast<const vec_t*>(wc + (ky * kw + kx) * OT);
            const int xo = kx * dw;
#pragma unroll
            for (int q = 0; q < kPwRP; ++q) {
              const acc_t xv = xr[off[q] + xo];
#pragma unroll
              for (int r = 0; r < RO; ++r) acc[q][r] += wv.v[r] * xv;
            }
          }
        }
      }
    }
    __syncthreads();
  }
  if (!active) return;
#pragma unroll
  for (int r = 0; r < RO; ++r) {
    const int ol = og * RO + r;
    if (ol < nO) {
      const int64_t o = o0 + ol;
      const acc_t bv = bias ? static_cast<acc_t>(bias[(b * s.Cout + o) * GG + pidx]) : acc_t(0);
      scalar_t* yo = y + ((b * s.Cout + o) * s.Hout + tr0) * s.Wout + tc0;
#pragma unroll
      for (int q = 0; q < kPwRP; ++q) {
        if (strip) {
          if (sown && srow + q < nr) yo[(srow + q) * s.Wout + scol] = static_cast<scalar_t>(acc[q][r] + bv);
        } else {
          const int p = tp + q * kPwGroupThreads;
          if (p < npix) yo[(p / nc) * s.Wout + p % nc] = static_cast<scalar_t>(acc[q][r] + bv);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// forward, small patches (fewer pixels than a 64-thread group: e.g. a 1x1 level whose grid is its size)
// ------------------------------------------------------------------------------------------
// A thread per (sample, RO output channels, output pixel), pixel fastest: a warp's lanes are
// consecutive pixels, hence consecutive (or equal) patches, so weights in the default layout
// (patch innermost) are read coalesced, and each input value is used for RO channels.
template <typename scalar_t, int RO>
__global__ void __launch_bounds__(256)
    pw_forward_direct_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                             const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, const PwConvShape s,
                             const int64_t w_entry, const int64_t w_patch) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HWo = s.Hout * s.Wout, GG = s.gh * s.gw;
  const int64_t n_ot = (s.Cout + RO - 1) / RO;
  const int64_t total = s.B * n_ot * HWo;
  const int kh = static_cast<int>(s.kh), kw = static_cast<int>(s.kw), Cg = static_cast<int>(s.Cg);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pix = idx % HWo, ot = (idx / HWo) % n_ot, b = idx / (HWo * n_ot);
    const int64_t i = pix / s.Wout, j = pix % s.Wout;
    const int64_t pidx = patch_of(i, s.gh, s.Hout) * s.gw + patch_of(j, s.gw, s.Wout);
    const int64_t o0 = ot * RO;
    const int nO = static_cast<int>(pw_lo(RO, s.Cout - o0));
    const int64_t g = o0 / s.Og;  // the RO channels lie in one group (as for the tiled kernel)
    const scalar_t* xb = x + (b * s.Cin + g * Cg) * s.H * s.W;
    const scalar_t* wb = w + b * s.Cout * s.K * GG + pidx * w_patch + o0 * s.K * w_entry;
    const int64_t ih0 = i * s.sh - s.pt, iw0 = j * s.sw - s.pl;
    acc_t acc[RO];
#pragma unroll
    for (int r = 0; r < RO; ++r) acc[r] = acc_t(0);
    for (int ci = 0; ci < Cg; ++ci) {
      for (int ky = 0; ky < kh; ++ky) {
        const int64_t ih = ih0 + ky * s.dh;
        if (ih < 0 || ih >= s.H) continue;
        for (int kx = 0; kx < kw; ++kx) {
          const int64_t iw = iw0 + kx * s.dw;
          if (iw < 0 || iw >= s.W) continue;
          const acc_t xv = static_cast<acc_t>(xb[(ci * s.H + ih) * s.W + iw]);
          const int64_t k = (ci * kh + ky) * kw + kx;
#pragma unroll
          for (int r = 0; r < RO; ++r)
            if (r < nO) acc[r] += static_cast<acc_t>(wb[(r * s.K + k) * w_entry]) * xv;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < RO; ++r) {
      if (r < nO) {
        const int64_t o = o0 + r;
        const acc_t bv = bias ? static_cast<acc_t>(bias[(b * s.Cout + o) * GG + pidx]) : acc_t(0);
        y[(b * s.Cout + o) * HWo + pix] = static_cast<scalar_t>(acc[r] + bv);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// forward, fallback: shapes whose staged input tile of one channel exceeds the shared-memory budget
// (large dilations); one thread per (channel, pixel) of the patch
// ------------------------------------------------------------------------------------------
template <typename scalar_t, bool kSmem>
__global__ void __launch_bounds__(kThreads)
    pw_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                      const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, const PwConvShape s,
                      const int64_t OT) {
  using acc_t = at::opmath_type<scalar_t>;
  PYSEG_DYNAMIC_SMEM(pw_smem_raw);
  acc_t* ws = reinterpret_cast<acc_t*>(pw_smem_raw);

  const int64_t GG = s.gh * s.gw;
  const int64_t pidx = static_cast<int64_t>(blockIdx.x) % GG;  // patch index pi*gw + pj
  const int64_t b = static_cast<int64_t>(blockIdx.x) / GG;
  const int64_t pi = pidx / s.gw, pj = pidx % s.gw;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * OT;
  const int64_t nO = min(OT, s.Cout - o0);
  const int64_t r0 = patch_begin(pi, s.gh, s.Hout), r1 = patch_begin(pi + 1, s.gh, s.Hout);
  const int64_t c0 = patch_begin(pj, s.gw, s.Wout), c1 = patch_begin(pj + 1, s.gw, s.Wout);
  const int64_t pw = c1 - c0;
  const int64_t P = (r1 - r0) * pw;

  // Weight (o0 + ol, k) of this patch: wb[(ol*K + k) * GG].
  const scalar_t* wb = w + (b * s.Cout + o0) * s.K * GG + pidx;
  if (kSmem) {
    for (int64_t t = threadIdx.x; t < nO * s.K; t += blockDim.x) ws[t] = static_cast<acc_t>(wb[t * GG]);
    __syncthreads();
  }

  for (int64_t t = threadIdx.x; t < nO * P; t += blockDim.x) {
    const int64_t ol = t / P, p = t % P;
    const int64_t i = r0 + p / pw, j = c0 + p % pw;
    const int64_t o = o0 + ol;
    const int64_t g = o / s.Og;
    acc_t acc = bias ? static_cast<acc_t>(bias[(b * s.Cout + o) * GG + pidx]) : acc_t(0);
    const scalar_t* xb = x + (b * s.Cin + g * s.Cg) * s.H * s.W;
    const int64_t ih0 = i * s.sh - s.pt, iw0 = j * s.sw - s.pl;
    for (int64_t ci = 0; ci < s.Cg; ++ci) {
      for (int64_t ky = 0; ky < s.kh; ++ky) {
        const int64_t ih = ih0 + ky * s.dh;
        if (ih < 0 || ih >= s.H) continue;
        const scalar_t* xrow = xb + (ci * s.H + ih) * s.W;
        for (int64_t kx = 0; kx < s.kw; ++kx) {
          const int64_t iw = iw0 + kx * s.dw;
          if (iw < 0 || iw >= s.W) continue;
          const int64_t e = ol * s.K + (ci * s.kh + ky) * s.kw + kx;
          const acc_t wv = kSmem ? ws[e] : static_cast<acc_t>(wb[e * GG]);
          acc += wv * static_cast<acc_t>(xrow[iw]);
        }
      }
    }
    y[((b * s.Cout + o) * s.Hout + i) * s.Wout + j] = static_cast<scalar_t>(acc);
  }
}

// ------------------------------------------------------------------------------------------
// forward on the tensor cores (fp16, bf16; groups == 1, Cin*kh*kw >= 16): an implicit GEMM per
// (sample, patch, pixel tile, tile of 16*MT output channels)
// ------------------------------------------------------------------------------------------
//   Y[o, px] = sum over (ky, c, kx) of W[o, (c, kx)]_ky X_ky[(c, kx), px]
// with px = the tile's pixels in n-tiles of 16 consecutive columns of one output row. Per chunk of
// CC input channels the block stages, in the operand type:
//   xs[(c*kw + kx)][ir][j] = x[c][ih0 + ir][iw0 + j*sw + kx*dw]  (zero outside the image; rows from
//                          CC*kw to the MMA depth zero), one kw-shifted copy of the haloed tile per kx, so
//                          that the B operand of (ky, n-tile) starts at row (r*sh + ky*dh), column 16*ct of
//                          every copy: a 32-byte-aligned wmma pointer for any stride, dilation and padding;
//   ws[ky][o][(c*kw + kx)] = w[o][c][ky][kx]                    (the A operand, read in place from either
//                          weight layout through w_entry / w_patch).
// K of one ky is CC*kw (a multiple of 16 for full chunks of 16 channels), so a 3x3 kernel over 34
// channels takes 3 * 7 k-steps. Each warp owns kPwMmaNT n-tiles x MT m-tiles of float accumulators (A
// fragments loaded once per k-step for kPwMmaNT B fragments); the result leaves through shared memory
// (float, reusing the staging space) for coalesced stores with the bias. Row strides (cstride, ldw) are
// an odd multiple of 16 bytes: the 8 rows of one tensor-core load phase fall in 8 distinct 16-byte bank
// groups (conflict-free). Pad rows of B are zero and every staged element is finite, so pad rows/columns
// of A (zeroed once; later chunks leave stale finite weights there) contribute exactly 0.
// Pairs of patches (PP = 2, default weight layout): a block runs two horizontally neighbouring patches
// as two independent sub-blocks (own warps, own shared memory, own pixel tile), and stages both
// patches' weights in one pass: their values are adjacent in memory (gh*gw apart between entries), so
// the second load hits the 32-byte sector the first brought into L1 -- half the L2 sectors per weight.
constexpr int kPwMmaNT = 4;       // n-tiles (16-pixel row segments) per warp
constexpr int kPwMmaWarps = 4;    // at most 4 warps per sub-block: 16 n-tiles (256 pixels)
constexpr int kPwMmaChunk = 16;   // input channels per chunk (K = 16*kw rows: whole k-steps)
constexpr int kPwMmaMaxPP = 2;    // patches (sub-blocks) per block

// Two consecutive outputs, stored as one 4-byte word (16-bit types).
template <typename T>
struct alignas(2 * sizeof(T)) PwPair {
  T v[2];
};

struct PwMmaPlan {
  int CT, TCP, TR, NW;  // pixel tile: TR output rows x TCP = 16*CT columns; NW warps per sub-block
  int CC, IR;           // channels per chunk, staged input rows
  int cstride, ldw, ldy;  // xs row (copy) stride, ws row stride (operand elements), ys row stride (floats)
  int kpad;             // rows of xs (CC*kw rounded up to the MMA depth)
  int PP;               // patches per block (sub-blocks): 1, or 2 for the default weight layout
  int64_t ow, bytes;    // byte offset of ws in a sub-block's space; bytes per sub-block (128-byte multiple)
  int64_t w_entry, w_patch;
};

// One sub-block's patch and pixel tile.
struct PwMmaTile {
  bool ok;              // the patch exists and has this tile
  int64_t pidx;         // patch index pi*gw + pj
  int tr0, tc0, nr, nc;  // first output row / column, rows / columns in the tile
};

__device__ __forceinline__ PwMmaTile pw_mma_tile(const PwConvShape& s, const PwMmaPlan& t, int64_t pi, int64_t pj) {
  PwMmaTile q{};
  q.ok = pj < s.gw;
  if (!q.ok) return q;
  q.pidx = pi * s.gw + pj;
  const int64_t r0 = patch_begin(pi, s.gh, s.Hout), r1 = patch_begin(pi + 1, s.gh, s.Hout);
  const int64_t c0 = patch_begin(pj, s.gw, s.Wout), c1 = patch_begin(pj + 1, s.gw, s.Wout);
  const int ntc = static_cast<int>((c1 - c0 + t.TCP - 1) / t.TCP);
  const int tz = static_cast<int>(blockIdx.z);
  q.tr0 = static_cast<int>(r0) + (tz / ntc) * t.TR;
  q.tc0 = static_cast<int>(c0) + (tz % ntc) * t.TCP;
  q.ok = q.tr0 < r1;  // this patch may have fewer tiles than the largest one
  q.nr = min(t.TR, static_cast<int>(r1) - q.tr0);
  q.nc = min(t.TCP, static_cast<int>(c1) - q.tc0);
  return q;
}

template <typename scalar_t, int MT>
__global__ void __launch_bounds__(32 * kPwMmaWarps * kPwMmaMaxPP, 2)
    pw_forward_mma_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                          const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, const PwConvShape s,
                          const PwMmaPlan t) {
  using Tiles = mma::Tiles<scalar_t>;
  using T = typename Tiles::T;
  constexpr int K = Tiles::K;
  using FragA = typename Tiles::A;
  using FragB = typename Tiles::B;
  using FragC = typename Tiles::C;
  // staging copies raw bits (same type in and out): two columns per 2x-wide store
  using Bits = std::conditional_t<sizeof(T) == 2, uint16_t, uint32_t>;
  using Pair = std::conditional_t<sizeof(T) == 2, uint32_t, unsigned long long>;
  static_assert(sizeof(T) == sizeof(scalar_t), "operand and tensor element sizes differ");
  PYSEG_DYNAMIC_SMEM(pw_smem_raw);

  const int64_t GG = s.gh * s.gw;
  const int64_t gwp = (s.gw + t.PP - 1) / t.PP;  // blocks per patch row
  const int64_t b = static_cast<int64_t>(blockIdx.x) / (s.gh * gwp);
  const int64_t pi = static_cast<int64_t>(blockIdx.x) / gwp % s.gh, pj0 = static_cast<int64_t>(blockIdx.x) % gwp * t.PP;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int snt = 32 * t.NW;  // threads per sub-block
  const int sb = tid / snt, stid = tid - sb * snt, swarp = warp - sb * t.NW;
  int okmask = 0;  // bit i: sub-block i has a tile
#pragma unroll
  for (int i = 0; i < kPwMmaMaxPP; ++i)
    if (i < t.PP && pw_mma_tile(s, t, pi, pj0 + i).ok) okmask |= 1 << i;
  if (okmask == 0) return;  // whole block, before any barrier
  const PwMmaTile me = pw_mma_tile(s, t, pi, pj0 + sb);  // this thread's sub-block (warp-uniform)
  const int64_t pbase = pi * s.gw + pj0;  // the block's first patch
  unsigned char* sub = pw_smem_raw + sb * t.bytes;
  T* xs = reinterpret_cast<T*>(sub);
  T* ws = reinterpret_cast<T*>(sub + t.ow);
  float* ys = reinterpret_cast<float*>(sub);  // the epilogue reuses the staging space
  const int TCP = t.TCP, TR = t.TR, CT = t.CT;
  constexpr int MR = 16 * MT;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * MR;
  const int nO = static_cast<int>(pw_lo(MR, s.Cout - o0));

  const int kh = static_cast<int>(s.kh), kw = static_cast<int>(s.kw), KK = kh * kw;
  const int sh = static_cast<int>(s.sh), sw = static_cast<int>(s.sw);
  const int dh = static_cast<int>(s.dh), dw = static_cast<int>(s.dw);
  const int H = static_cast<int>(s.H), W = static_cast<int>(s.W), Cin = static_cast<int>(s.Cin);
  const int ih0 = me.tr0 * sh - static_cast<int>(s.pt), iw0 = me.tc0 * sw - static_cast<int>(s.pl);
  const int IR = t.IR, cstride = t.cstride, ldw = t.ldw;
  const int nthreads = static_cast<int>(blockDim.x), nwarps = nthreads / 32;

  // A of every sub-block: zero once (rows past Cout and columns past a chunk stay finite; see above)
  {
    const int per = static_cast<int>(static_cast<int64_t>(kh) * MR * ldw * sizeof(T) / 4);
    for (int i = tid; i < t.PP * per; i += nthreads)
      reinterpret_cast<uint32_t*>(pw_smem_raw + (i / per) * t.bytes + t.ow)[i % per] = 0u;
  }
  FragC acc[MT][kPwMmaNT];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int i = 0; i < kPwMmaNT; ++i) mma::fill(acc[m][i], 0.0f);

  // this warp's n-tiles swarp * kPwMmaNT + i (i < ntw; warp-uniform): the first one's row r0 and column tile
  // ct0, its B operand offset in a staged copy, and the step from a tile row's last n-tile to the next row's first
  const int tile0 = swarp * kPwMmaNT, ntw = min(kPwMmaNT, TR * CT - tile0);
  const int r0 = tile0 / CT, ct0 = tile0 - r0 * CT;
  const int boff0 = r0 * sh * TCP + ct0 * 16, brow = sh * TCP - (CT - 1) * 16;
  const Bits* xbits = reinterpret_cast<const Bits*>(x);
  const int64_t wb = b * s.Cout * s.K * GG;
  const int NP = TCP / 2;  // column pairs per staged row
  const int jp = stid % NP, step_r = snt / NP;  // NP divides the sub-block (8, 16 or 32 | 32*NW)
  const int j = 2 * jp;
  for (int cc = 0; cc < Cin; cc += t.CC) {
    const int ncc = min(t.CC, Cin - cc), rows = ncc * kw;
    const int kpad = (rows + K - 1) / K * K;
    if (me.ok) {
      // x: a thread per (channel, staged row, column pair), all kw copies from one pass over the columns
      const int64_t xoff = (b * s.Cin + cc) * s.H * s.W;
      int cl = 0, ir = stid / NP;
      while (ir >= IR) {
        ir -= IR;
        ++cl;
      }
#pragma unroll 1
      for (; cl < ncc;) {
        const int ih = ih0 + ir;
        const bool row_ok = ih >= 0 && ih < H;
        const Bits* xr = xbits + xoff + (static_cast<int64_t>(cl) * H + (row_ok ? ih : 0)) * W;
        auto ld = [&](int iw) -> Bits { return (row_ok && iw >= 0 && iw < W) ? xr[iw] : Bits(0); };
        int ca = iw0 + j * sw;
        Bits va = ld(ca);
        T* dst = xs + cl * kw * cstride + ir * TCP + j;
#pragma unroll 1
        for (int kx = 0; kx < kw; ++kx) {
          const Bits vb = ld(ca + sw);
          *reinterpret_cast<Pair*>(dst + kx * cstride) =
              static_cast<Pair>(va) | (static_cast<Pair>(vb) << (8 * sizeof(Bits)));
          ca += dw;
          va = dw == sw ? vb : ld(ca);  // stride == dilation: the next copy's first column is this one's second
        }
        ir += step_r;
        while (ir >= IR) {
          ir -= IR;
          ++cl;
        }
      }
      // zero rows [rows, kpad) of B
      for (int e = stid; e < (kpad - rows) * IR * NP; e += snt)
        reinterpret_cast<Pair*>(xs + rows * cstride)[(e / (IR * NP)) * (cstride / 2) + e % (IR * NP)] = Pair(0);
    }
    // A of every sub-block: lanes along the chunk's (channel, kx) entries, a warp of the block per (ky,
    // output channel), the sub-blocks' values of one entry loaded back to back (one sector)
#pragma unroll 1
    for (int q = lane; q < rows; q += 32) {
      const int c = q / kw, kx = q - c * kw;
      const int64_t eq = ((static_cast<int64_t>(cc) + c) * KK + kx) * t.w_entry;
#pragma unroll 1
      for (int ky = 0; ky < kh; ++ky) {
#pragma unroll 1
        for (int ol = warp; ol < nO; ol += nwarps) {
          const int64_t e = wb + eq + ((o0 + ol) * s.K + ky * kw) * t.w_entry;
          const int d = (ky * MR + ol) * ldw + q;
#pragma unroll
          for (int i = 0; i < kPwMmaMaxPP; ++i)
            if (okmask & (1 << i))
              reinterpret_cast<T*>(pw_smem_raw + i * t.bytes + t.ow)[d] =
                  *reinterpret_cast<const T*>(w + e + (pbase + i) * t.w_patch);
        }
      }
    }
    __syncthreads();  // chunk staged
    // the MMAs: one copy of the loops for warps with all kPwMmaNT n-tiles (every fragment load unconditional,
    // so ptxas computes the lanes' fragment offsets once, before the loops: benchmarks/sass_counts.py), one
    // for a warp with fewer (warp-uniform: its first n-tile unconditional)
    auto mmas = [&](auto full) {
#pragma unroll 1
      for (int ky = 0; ky < kh; ++ky) {
#pragma unroll 1
        for (int k0 = 0; k0 < kpad; k0 += K) {
          FragA a[MT];
#pragma unroll
          for (int m = 0; m < MT; ++m) mma::load_shared(a[m], ws + (ky * MR + m * 16) * ldw + k0, ldw);
          // the warp's n-tiles from its first one's offset, stepping along the tile row (no division here)
          const T* bp = xs + k0 * cstride + ky * dh * TCP + boff0;
          int ct = ct0;
#pragma unroll
          for (int i = 0; i < kPwMmaNT; ++i) {
            if (!decltype(full)::value && i > 0 && i >= ntw) break;  // uniform over the warp
            FragB bf;
            mma::load_shared(bf, bp, cstride);
#pragma unroll
            for (int m = 0; m < MT; ++m) mma::multiply_accumulate<scalar_t, 1>(acc[m][i], a[m], bf);
            if (++ct == CT) {
              ct = 0;
              bp += brow;
            } else {
              bp += 16;
            }
          }
        }
      }
    };
    if (me.ok && ntw == kPwMmaNT) {
      mmas(std::true_type{});
    } else if (me.ok && ntw > 0) {
      mmas(std::false_type{});
    }
    __syncthreads();  // the chunk's operands read (the next chunk, or Y, overwrites them)
  }
  // Y through shared memory: ys[o][r*TCP + column]
#pragma unroll
  for (int i = 0; i < kPwMmaNT; ++i) {
    const int tile = swarp * kPwMmaNT + i;
    if (!me.ok || tile >= TR * CT) break;
    const int r = tile / CT, ct = tile - r * CT;
#pragma unroll
    for (int m = 0; m < MT; ++m)
      mma::store_shared(ys + m * 16 * t.ldy + r * TCP + ct * 16, acc[m][i], t.ldy);
  }
  __syncthreads();
  // a thread per (channel, row, column pair) of the tile, pairs fastest (coalesced stores): one 4-byte
  // store where the pair's address is 4-byte aligned (every row when Wout and the patch columns are even)
  const int NQ = TCP / 2;
  const int step_c = snt % NQ, step_rr = snt / NQ;
  int cp = stid % NQ, rr = stid / NQ;
  const int nr = me.nr, nc = me.nc, tr0 = me.tr0, tc0 = me.tc0;
  const int64_t pidx = me.pidx;
#pragma unroll 1
  for (; me.ok && rr < nO * TR;) {
    const int ol = rr / TR, r = rr - ol * TR, c = 2 * cp;
    if (r < nr && c < nc) {
      const int64_t o = o0 + ol;
      const float bv = bias ? static_cast<float>(bias[(b * s.Cout + o) * GG + pidx]) : 0.0f;
      const int64_t gi = ((b * s.Cout + o) * s.Hout + tr0 + r) * s.Wout + tc0 + c;
      const PwPair<float> v = *reinterpret_cast<const PwPair<float>*>(ys + ol * t.ldy + r * TCP + c);
      if (c + 1 < nc && gi % 2 == 0) {
        PwPair<scalar_t> q;
        q.v[0] = static_cast<scalar_t>(v.v[0] + bv);
        q.v[1] = static_cast<scalar_t>(v.v[1] + bv);
        *reinterpret_cast<PwPair<scalar_t>*>(y + gi) = q;
      } else {
        y[gi] = static_cast<scalar_t>(v.v[0] + bv);
        if (c + 1 < nc) y[gi + 1] = static_cast<scalar_t>(v.v[1] + bv);
      }
    }
    cp += step_c;
    rr += step_rr;
    if (cp >= NQ) {
      cp -= NQ;
      ++rr;
    }
  }
}

// ------------------------------------------------------------------------------------------
// backward: dX (gather, one thread per input element)
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pw_grad_input_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ w, scalar_t* __restrict__ gx,
                         const PwConvShape s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = s.B * s.Cin * s.H * s.W;
  const int64_t GG = s.gh * s.gw;
  const int64_t HWo = s.Hout * s.Wout;
  const int64_t KGG = s.K * GG;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t iw = idx % s.W;
    const int64_t ih = (idx / s.W) % s.H;
    const int64_t c = (idx / (s.H * s.W)) % s.Cin;
    const int64_t b = idx / (s.Cin * s.H * s.W);
    const int64_t g = c / s.Cg, ci = c % s.Cg;
    acc_t acc = 0;
    for (int64_t ky = 0; ky < s.kh; ++ky) {
      const int64_t i = out_from_in(ih, ky, s.sh, s.dh, s.pt, s.Hout);
      if (i < 0) continue;
      const int64_t pi = patch_of(i, s.gh, s.Hout);
      for (int64_t kx = 0; kx < s.kw; ++kx) {
        const int64_t j = out_from_in(iw, kx, s.sw, s.dw, s.pl, s.Wout);
        if (j < 0) continue;
        const int64_t pj = patch_of(j, s.gw, s.Wout);
        // grad_out (b, g*Og + og, i, j) and weight (b, g*Og + og, ci, ky, kx, pi, pj).
        const scalar_t* gp = gy + ((b * s.Cout + g * s.Og) * s.Hout + i) * s.Wout + j;
        const scalar_t* wp = w + ((b * s.Cout + g * s.Og) * s.K + (ci * s.kh + ky) * s.kw + kx) * GG + pi * s.gw + pj;
        for (int64_t og = 0; og < s.Og; ++og)
          acc += static_cast<acc_t>(gp[og * HWo]) * static_cast<acc_t>(wp[og * KGG]);
      }
    }
    gx[idx] = static_cast<scalar_t>(acc);
  }
}

// ------------------------------------------------------------------------------------------
// backward: dW and dBias (per-patch reductions)
// ------------------------------------------------------------------------------------------
// Entry e of a patch: e < Cout*K is weight (o = e / K, k = e % K); e >= Cout*K is bias o = e - Cout*K.
// Returns the sum over the patch pixels p = start, start + step, ... of that entry's products.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t pw_entry_partial(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gy,
                                                  const PwConvShape& s, int64_t b, int64_t e, int64_t r0,
                                                  int64_t c0, int64_t pw, int64_t P, int64_t start, int64_t step) {
  acc_t sum = 0;
  const int64_t CK = s.Cout * s.K;
  if (e >= CK) {
    const int64_t o = e - CK;
    const scalar_t* go = gy + (b * s.Cout + o) * s.Hout * s.Wout;
    for (int64_t p = start; p < P; p += step) {
      const int64_t i = r0 + p / pw, j = c0 + p % pw;
      sum += static_cast<acc_t>(go[i * s.Wout + j]);
    }
    return sum;
  }
  const int64_t o = e / s.K, k = e % s.K;
  const int64_t ci = k / (s.kh * s.kw);
  const int64_t ky = (k / s.kw) % s.kh, kx = k % s.kw;
  const int64_t c = (o / s.Og) * s.Cg + ci;
  const scalar_t* go = gy + (b * s.Cout + o) * s.Hout * s.Wout;
  const scalar_t* xc = x + (b * s.Cin + c) * s.H * s.W;
  for (int64_t p = start; p < P; p += step) {
    const int64_t i = r0 + p / pw, j = c0 + p % pw;
    const int64_t ih = i * s.sh - s.pt + ky * s.dh;
    const int64_t iw = j * s.sw - s.pl + kx * s.dw;
    if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
    sum += static_cast<acc_t>(go[i * s.Wout + j]) * static_cast<acc_t>(xc[ih * s.W + iw]);
  }
  return sum;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pw_grad_weight_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gy,
                          scalar_t* __restrict__ gw, scalar_t* __restrict__ gb, const PwConvShape s,
                          const int64_t e_begin, const int64_t e_end, const int64_t ET) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t GG = s.gh * s.gw;
  const PwBlockPatch bp = pw_block_patch(s);
  const int64_t pidx = bp.pidx, b = bp.b, r0 = bp.r0, r1 = bp.r1, c0 = bp.c0, c1 = bp.c1;
  const int64_t pw = c1 - c0;
  const int64_t P = (r1 - r0) * pw;
  const int64_t eb = e_begin + static_cast<int64_t>(blockIdx.y) * ET;
  const int64_t ee = min(eb + ET, e_end);
  const int64_t CK = s.Cout * s.K;

  auto store = [&](int64_t e, acc_t v) {
    if (e < CK) {
      const int64_t o = e / s.K, k = e % s.K;
      gw[((b * s.Cout + o) * s.K + k) * GG + pidx] = static_cast<scalar_t>(v);
    } else {
      gb[(b * s.Cout + (e - CK)) * GG + pidx] = static_cast<scalar_t>(v);
    }
  };

  if (P >= 32) {
    // A warp per entry; lanes stride over the pixels; fixed-order tree reduction.
    const int64_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    for (int64_t e = eb + warp; e < ee; e += nwarps) {
      acc_t v = pw_entry_partial<scalar_t, acc_t>(x, gy, s, b, e, r0, c0, pw, P, lane, 32);
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
      if (lane == 0) store(e, v);
    }
  } else {
    for (int64_t e = eb + threadIdx.x; e < ee; e += blockDim.x)
      store(e, pw_entry_partial<scalar_t, acc_t>(x, gy, s, b, e, r0, c0, pw, P, 0, 1));
  }
}

}  // namespace
}  // namespace pyseg
