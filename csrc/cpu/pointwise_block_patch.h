// Per-item compute of the CPU pointwise_block (patch-wise 1x1 conv -> affine -> ReLU) kernels.
//
// csrc/cpu/pointwise_block.cpp includes this file through cpu/isa_dispatch.h, once per instruction
// set, each time inside its own namespace; no include guard, and everything besides the SIMD blocks
// (PatchGeom, PwArgs, PwScratch, std::fill...) is declared by pointwise_block.cpp first.

#include "cpu/block_simd.h"

// ------------------------------------------------------------------------------------------------
// pointwise_block (patch-wise 1x1 conv -> affine -> ReLU). Forward: one work item = one (sample,
// output channel). The weights of a patch row are expanded along the image columns
// (wexp[c, col] = W[o, c] of col's patch) and reused for every row of the patch row, so the inner
// loops run over contiguous columns with the accumulators in registers.
// ------------------------------------------------------------------------------------------------
// acc[0:n) = sum_c w[c*ws + 0:n) * x[c*xs + 0:n): one output row of a 1x1 conv whose weights vary
// along the row. Column blocks of kNR accumulate in registers over all channels.
template <typename acc_t>
inline void row_dot(const acc_t* w, int64_t ws, const acc_t* x, int64_t xs, int64_t C, int64_t n, acc_t* acc) {
  using V = typename VecN<acc_t>::type;
  constexpr int L = VecN<acc_t>::kLanes, NV = kNR / L;
  int64_t col = 0;
  for (; col + kNR <= n; col += kNR) {
    V s[NV];
    for (int v = 0; v < NV; ++v) s[v] = V{};
    for (int64_t c = 0; c < C; ++c)
      for (int v = 0; v < NV; ++v)
        s[v] += *reinterpret_cast<const V*>(w + c * ws + col + v * L) *
                *reinterpret_cast<const V*>(x + c * xs + col + v * L);
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(acc + col + v * L) = s[v];
  }
  if (col < n) {
    std::fill(acc + col, acc + n, acc_t(0));
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = col; j < n; ++j) acc[j] += w[c * ws + j] * x[c * xs + j];
  }
}

// Forward of one (sample, output channel) work item over the whole image; the weights of output
// channel o (B, Cout*Cin, gh, gw, in acc_t) are read in memory order, one patch row at a time.
// With equal patch widths (A.pw > 0) xt is x as (B, H, Cin, pw, gw): column q of every patch is a
// contiguous "phase" row whose weights are exactly the patch row's weights, so no expansion is
// needed. Otherwise xt is (B, H, Cin, W) and the weights are expanded along the image columns
// (wexp[c, col] = W[o, c] of col's patch), once per patch row.
template <typename scalar_t, typename acc_t>
void pointwise_forward_item(const PwArgs& A, const acc_t* xt, const acc_t* weight, const scalar_t* scale,
                            const scalar_t* shift, int64_t item, PwScratch<acc_t>& S, scalar_t* y) {
  const int64_t Cin = A.cin, Cout = A.cout, H = A.H, W = A.W, gh = A.gh, gw = A.gw, pw = A.pw;
  const int64_t b = item / Cout, o = item % Cout;
  const acc_t s = static_cast<acc_t>(scale[o]), t = static_cast<acc_t>(shift[o]);
  const acc_t* wo = weight + (b * Cout + o) * Cin * gh * gw;
  acc_t* acc = S.acc.data();
  for (int64_t gi = 0; gi < gh; ++gi) {
    const int64_t r0 = patch_begin(gi, gh, H), r1 = patch_begin(gi + 1, gh, H);
    if (pw > 0) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* dst = y + ((b * Cout + o) * H + r) * W;
        for (int64_t q = 0; q < pw; ++q) {
          row_dot(wo + gi * gw, gh * gw, xt + ((b * H + r) * Cin * pw + q) * gw, pw * gw, Cin, gw, acc);
          for (int64_t j = 0; j < gw; ++j) {
            const acc_t u = acc[j] * s + t;
            dst[j * pw + q] = static_cast<scalar_t>(u > acc_t(0) ? u : acc_t(0));
          }
        }
      }
      continue;
    }
    for (int64_t c = 0; c < Cin; ++c) {
      const acc_t* src = wo + (c * gh + gi) * gw;
      acc_t* dst = S.wexp.data() + c * W;
      for (int64_t j = 0; j < gw; ++j)
        for (int64_t col = A.colb[j]; col < A.colb[j + 1]; ++col) dst[col] = src[j];
    }
    for (int64_t r = r0; r < r1; ++r) {
      row_dot(S.wexp.data(), W, xt + (b * H + r) * Cin * W, W, Cin, W, acc);
      scalar_t* dst = y + ((b * Cout + o) * H + r) * W;
      for (int64_t col = 0; col < W; ++col) {
        const acc_t u = acc[col] * s + t;
        dst[col] = static_cast<scalar_t>(u > acc_t(0) ? u : acc_t(0));
      }
    }
  }
}

// Backward of one (sample, patch) work item of pointwise_block (recomputes z = W x per row).
template <typename scalar_t, typename acc_t>
void pointwise_backward_item(const PwArgs& A, const scalar_t* x, const scalar_t* weight, const scalar_t* scale,
                             const scalar_t* shift, const scalar_t* grad_out, int64_t item, PwScratch<acc_t>& S,
                             scalar_t* gx, scalar_t* gw, acc_t* ps) {
  const int64_t Cin = A.cin, Cout = A.cout, H = A.H, W = A.W, G = A.gh * A.gw, N = Cout * Cin;
  const PatchGeom g(item, A.gh, A.gw, H, W);
  const int64_t lp = round_up(g.pw, kNR);
  acc_t *w = S.w.data(), *wt = S.wt.data(), *gwacc = S.gwacc.data();
  acc_t *xr = S.xr.data(), *z = S.z.data(), *gz = S.gz.data(), *gxr = S.gxr.data();
  gather_weights(weight, N, G, g.b, item % G, 1, w);
  for (int64_t o = 0; o < Cout; ++o)
    for (int64_t c = 0; c < Cin; ++c) wt[c * Cout + o] = w[o * Cin + c];
  std::fill(gwacc, gwacc + N, acc_t(0));
  if (ps) std::fill(ps, ps + 2 * Cout, acc_t(0));
  for (int64_t i = 0; i < g.ph; ++i) {
    const int64_t r = g.r0 + i;
    for (int64_t c = 0; c < Cin; ++c) {
      const scalar_t* src = x + ((g.b * Cin + c) * H + r) * W + g.c0;
      for (int64_t j = 0; j < g.pw; ++j) xr[c * lp + j] = static_cast<acc_t>(src[j]);
    }
    gemm(w, Cin, xr, lp, z, Cout, Cin, lp);
    for (int64_t o = 0; o < Cout; ++o) {
      const acc_t s = static_cast<acc_t>(scale[o]), t = static_cast<acc_t>(shift[o]);
      const scalar_t* src = grad_out + ((g.b * Cout + o) * H + r) * W + g.c0;
      acc_t sum_g = 0, sum_gz = 0;
      for (int64_t j = 0; j < g.pw; ++j) {
        const acc_t zz = z[o * lp + j];
        const acc_t gu = (zz * s + t > acc_t(0)) ? static_cast<acc_t>(src[j]) : acc_t(0);
        sum_g += gu;
        sum_gz += gu * zz;
        gz[o * lp + j] = gu * s;
      }
      if (ps) {
        ps[o] += sum_gz;
        ps[Cout + o] += sum_g;
      }
      for (int64_t c = 0; c < Cin; ++c) {
        acc_t acc = 0;
        for (int64_t j = 0; j < g.pw; ++j) acc += gz[o * lp + j] * xr[c * lp + j];
        gwacc[o * Cin + c] += acc;
      }
    }
    if (gx) {
      gemm(wt, Cout, gz, lp, gxr, Cin, Cout, lp);
      for (int64_t c = 0; c < Cin; ++c) {
        scalar_t* dst = gx + ((g.b * Cin + c) * H + r) * W + g.c0;
        for (int64_t j = 0; j < g.pw; ++j) dst[j] = static_cast<scalar_t>(gxr[c * lp + j]);
      }
    }
  }
  if (gw) {
    scalar_t* dst = gw + g.b * N * G + item % G;
    for (int64_t n = 0; n < N; ++n) dst[n * G] = static_cast<scalar_t>(gwacc[n]);
  }
}
