// Device code of the hierarchical multi-scale attention fusion (launchers and the scheme in
// hmsa_fuse.cu).
#pragma once

#include "common/hmsa_fuse.h"
#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

// Largest stencil a thread holds: 4 * (21 + 4 * 4) = 148 covers up to 2 scales above 1.0 and
// 4 below; hmsa_max_terms is checked on the host.
constexpr int HMSA_CUDA_MAX_TERMS = 160;
// Stencil capacities the forward kernel is compiled for: 20 holds {1.0} and {1.0, 0.5} (the
// training pair), 40 any three scales with one above 1.0 or two below (4 * 40 = 160 also bounds the
// lowered stencil), 160 the rest.
constexpr int kHmsaCapacities[] = {20, 40, HMSA_CUDA_MAX_TERMS};

template <typename acc_t>
__device__ __forceinline__ bool better(acc_t v, acc_t best) {
  return v > best || (isnan(v) && !isnan(best));
}

// kTerms: the per-thread stencil capacity, the smallest of kHmsaCapacities that holds the scale
// set's hmsa_max_terms (local memory per thread stays proportional to the scale set).
// LOWER: some scale is resampled (scale_sizes) and its lowered stencil (4 storage taps per term)
// fits: lower it to storage taps once per pixel (hmsa_lower_stencil) so each class is a plain
// gather-dot. Otherwise grid terms are evaluated directly (hmsa_eval samples resampled storage per
// class).
template <typename scalar_t, typename acc_t, int kTerms, bool LOWER>
__global__ void hmsa_fuse_kernel(const HmsaArgs<scalar_t> A, scalar_t* __restrict__ out_v,
                                 int64_t* __restrict__ out_l, bool labels) {
  static_assert(!LOWER || 4 * kTerms <= HMSA_CUDA_MAX_TERMS, "lowered stencil over the capacity");
  const int64_t total = A.B * A.out_h * A.out_w;
  const int64_t oplane = A.out_h * A.out_w;
  HmsaTerm<acc_t> terms[kTerms];
  HmsaTerm<acc_t> lowered[LOWER ? 4 * kTerms : 1];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = i / oplane, pix = i % oplane;
    const int64_t oy = pix / A.out_w, ox = pix % A.out_w;
    int64_t nt = hmsa_build_stencil<acc_t>(A, b, oy, ox, terms);
    if constexpr (LOWER) nt = hmsa_lower_stencil<acc_t>(A, terms, nt, lowered);
    auto value = [&](int64_t c) -> acc_t { return hmsa_eval<LOWER, acc_t>(A, b, c, LOWER ? lowered : terms, nt); };
    if (labels) {
      acc_t best = static_cast<acc_t>(static_cast<scalar_t>(value(0)));
      int64_t arg = 0;
      for (int64_t c = 1; c < A.C; ++c) {
        const acc_t v = static_cast<acc_t>(static_cast<scalar_t>(value(c)));
        if (better(v, best)) {
          best = v;
          arg = c;
        }
      }
      out_l[i] = arg;
    } else {
      for (int64_t c = 0; c < A.C; ++c) out_v[(b * A.C + c) * oplane + pix] = static_cast<scalar_t>(value(c));
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bwd_r1_kernel(const HmsaArgs<scalar_t> A, const scalar_t* __restrict__ g, const AxisCsr<acc_t> ch,
                              const AxisCsr<acc_t> cw, acc_t* gP, scalar_t* g_p1, acc_t* g_ua) {
  const int64_t h = A.h[0], w = A.w[0], total = A.B * h * w;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    hmsa2_bwd_r1_pixel<acc_t>(A, g, ch, cw, i / (h * w), (i / w) % h, i % w, gP, g_p1, g_ua);
}

template <typename scalar_t, typename acc_t>
__global__ void bwd_low_kernel(const HmsaArgs<scalar_t> A, const acc_t* gP, const acc_t* g_ua,
                               const AxisCsr<acc_t> ch, const AxisCsr<acc_t> cw, scalar_t* g_pl, acc_t* g_al) {
  const int64_t h = A.h[1], w = A.w[1], total = A.B * h * w;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    hmsa2_bwd_low_pixel<acc_t>(A, gP, g_ua, ch, cw, i / (h * w), (i / w) % h, i % w, g_pl, g_al);
}

template <typename scalar_t, typename acc_t>
__global__ void bwd_att_kernel(const HmsaArgs<scalar_t> A, const acc_t* g_al, const AxisCsr<acc_t> ch,
                               const AxisCsr<acc_t> cw, scalar_t* g_a) {
  const int64_t h = A.ha[1], w = A.wa[1], total = A.B * h * w;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    hmsa2_bwd_att_pixel<acc_t>(A, g_al, ch, cw, i / (h * w), (i / w) % h, i % w, g_a);
}

}  // namespace
}  // namespace pyseg
