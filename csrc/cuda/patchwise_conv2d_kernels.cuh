// Device code of pyseg::patchwise_conv2d and its backward (launchers in patchwise_conv2d.cu; the
// scheme is described there).
#pragma once

#include "common/patch_index.h"
#include "common/patchwise_conv2d.h"
#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

constexpr int kThreads = 256;

// ------------------------------------------------------------------------------------------
// forward
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
  const int64_t pidx = static_cast<int64_t>(blockIdx.x) % GG;
  const int64_t b = static_cast<int64_t>(blockIdx.x) / GG;
  const int64_t pi = pidx / s.gw, pj = pidx % s.gw;
  const int64_t r0 = patch_begin(pi, s.gh, s.Hout), r1 = patch_begin(pi + 1, s.gh, s.Hout);
  const int64_t c0 = patch_begin(pj, s.gw, s.Wout), c1 = patch_begin(pj + 1, s.gw, s.Wout);
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
