// C++ CPU kernels of the fused HyperSeg meta block and the 1x1 level block.
//
// One work item = one (sample, patch). A work item loads its patch plus a 1-pixel halo of x
// (reflected at image borders only), runs pw1 -> affine -> ReLU6 on every haloed pixel, the
// depthwise 3x3 -> affine -> ReLU6 and pw2 -> affine on the patch pixels, all in small per-thread
// buffers (the working set of one patch stays in cache), and writes only the output.
// Half/bfloat16 compute in float; float64 in double.
//
// Backward recomputes the forward intermediates per patch. Weight gradients are per (sample, patch)
// (no races); the affine gradients are per-work-item partials summed in a fixed order; grad_x is
// written by each work item into its own haloed buffer, then gathered per input pixel in a fixed
// order (halo_readers in csrc/common/meta_block.h): deterministic, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "common/meta_block.h"
#include "common/meta_block_host.h"

namespace pyseg {
namespace {

using meta::WeightLayout;

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

template <typename scalar_t, typename acc_t>
void gather_weights(const scalar_t* weight, int64_t N, int64_t G, int64_t b, int64_t patch, acc_t* w) {
  const scalar_t* src = weight + b * N * G + patch;
  for (int64_t n = 0; n < N; ++n) w[n] = static_cast<acc_t>(src[n * G]);
}

// x's patch + halo of channel-major (Cin, hh, hw); reflect at the image borders.
template <typename scalar_t, typename acc_t>
void load_haloed(const scalar_t* x, int64_t Cin, int64_t H, int64_t W, const PatchGeom& g, acc_t* xh,
                 int64_t* colidx) {
  for (int64_t bb = 0; bb < g.hw; ++bb) colidx[bb] = reflect_index(g.c0 - 1 + bb, W);
  const int64_t hp = g.hh * g.hw;
  for (int64_t c = 0; c < Cin; ++c) {
    const scalar_t* xc = x + (g.b * Cin + c) * H * W;
    for (int64_t a = 0; a < g.hh; ++a) {
      const scalar_t* row = xc + reflect_index(g.r0 - 1 + a, H) * W;
      acc_t* dst = xh + c * hp + a * g.hw;
      dst[0] = static_cast<acc_t>(row[colidx[0]]);
      for (int64_t bb = 1; bb + 1 < g.hw; ++bb) dst[bb] = static_cast<acc_t>(row[g.c0 - 1 + bb]);
      dst[g.hw - 1] = static_cast<acc_t>(row[colidx[g.hw - 1]]);
    }
  }
}

// out (M, P) = A (M, K) @ in (K, P), A row-major with row stride lda; in/out rows contiguous.
// Four output rows at a time so every input row is streamed once per four outputs.
template <typename acc_t>
void small_gemm(const acc_t* A, int64_t lda, const acc_t* in, acc_t* out, int64_t M, int64_t K, int64_t P) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    acc_t* o0 = out + m * P;
    acc_t* o1 = o0 + P;
    acc_t* o2 = o1 + P;
    acc_t* o3 = o2 + P;
    std::fill(o0, o0 + 4 * P, acc_t(0));
    for (int64_t k = 0; k < K; ++k) {
      const acc_t a0 = A[m * lda + k], a1 = A[(m + 1) * lda + k], a2 = A[(m + 2) * lda + k],
                  a3 = A[(m + 3) * lda + k];
      const acc_t* r = in + k * P;
      for (int64_t p = 0; p < P; ++p) {
        const acc_t v = r[p];
        o0[p] += a0 * v;
        o1[p] += a1 * v;
        o2[p] += a2 * v;
        o3[p] += a3 * v;
      }
    }
  }
  for (; m < M; ++m) {
    acc_t* o = out + m * P;
    std::fill(o, o + P, acc_t(0));
    for (int64_t k = 0; k < K; ++k) {
      const acc_t a = A[m * lda + k];
      const acc_t* r = in + k * P;
      for (int64_t p = 0; p < P; ++p) o[p] += a * r[p];
    }
  }
}

// Depthwise 3x3 valid conv of one channel: in (hh, hw) -> out (hh-2, hw-2).
template <typename acc_t>
void dw3x3(const acc_t* w9, const acc_t* in, int64_t hh, int64_t hw, acc_t* out) {
  const int64_t ph = hh - 2, pw = hw - 2;
  std::fill(out, out + ph * pw, acc_t(0));
  for (int64_t i = 0; i < ph; ++i) {
    acc_t* o = out + i * pw;
    for (int64_t di = 0; di < 3; ++di) {
      const acc_t* r = in + (i + di) * hw;
      const acc_t w0 = w9[di * 3], w1 = w9[di * 3 + 1], w2 = w9[di * 3 + 2];
      for (int64_t j = 0; j < pw; ++j) o[j] += w0 * r[j] + w1 * r[j + 1] + w2 * r[j + 2];
    }
  }
}

// Per-thread scratch of one work item, sized for the largest patch.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> w, xh, z1, z2, z3, h1, h2, g3, g2, g1, gx;
  std::vector<int64_t> colidx;
};

template <typename scalar_t>
void meta_forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                         const at::Tensor& shift, const WeightLayout L, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t gh = weight.size(2), gw = weight.size(3), G = gh * gw, N = L.numel();
  const int64_t hid = L.hid, Cout = L.cout;
  const int64_t PH = meta::max_patch_size(H, gh), PW = meta::max_patch_size(W, gw);
  const int64_t HP = (PH + 2) * (PW + 2), NP = PH * PW;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  std::vector<acc_t> sc(L.affine_numel()), sh(L.affine_numel());
  for (int64_t i = 0; i < L.affine_numel(); ++i) {
    sc[i] = static_cast<acc_t>(scale.const_data_ptr<scalar_t>()[i]);
    sh[i] = static_cast<acc_t>(shift.const_data_ptr<scalar_t>()[i]);
  }
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> w(N), xh(Cin * HP), h1(hid * HP), h2(hid * NP), out(Cout * NP);
    std::vector<int64_t> colidx(PW + 2);
    for (int64_t item = begin; item < end; ++item) {
      const PatchGeom g(item, gh, gw, H, W);
      const int64_t hp = g.hh * g.hw, np = g.ph * g.pw;
      gather_weights(wp, N, G, g.b, item % G, w.data());
      load_haloed(xp, Cin, H, W, g, xh.data(), colidx.data());
      // pw1 on patch + halo -> affine -> ReLU6
      small_gemm(w.data() + L.w1(), Cin, xh.data(), h1.data(), hid, Cin, hp);
      for (int64_t k = 0; k < hid; ++k) {
        const acc_t s = sc[L.a1() + k], t = sh[L.a1() + k];
        acc_t* r = h1.data() + k * hp;
        for (int64_t p = 0; p < hp; ++p) r[p] = meta::relu6(r[p] * s + t);
      }
      // depthwise 3x3 -> affine -> ReLU6
      for (int64_t k = 0; k < hid; ++k) {
        acc_t* r = h2.data() + k * np;
        dw3x3(w.data() + L.w2() + 9 * k, h1.data() + k * hp, g.hh, g.hw, r);
        const acc_t s = sc[L.a2() + k], t = sh[L.a2() + k];
        for (int64_t p = 0; p < np; ++p) r[p] = meta::relu6(r[p] * s + t);
      }
      // pw2 -> affine -> store
      small_gemm(w.data() + L.w3(), hid, h2.data(), out.data(), Cout, hid, np);
      for (int64_t o = 0; o < Cout; ++o) {
        const acc_t s = sc[L.a3() + o], t = sh[L.a3() + o];
        const acc_t* r = out.data() + o * np;
        scalar_t* dst = yp + ((g.b * Cout + o) * H + g.r0) * W + g.c0;
        for (int64_t i = 0; i < g.ph; ++i)
          for (int64_t j = 0; j < g.pw; ++j) dst[i * W + j] = static_cast<scalar_t>(r[i * g.pw + j] * s + t);
      }
    }
  });
}

template <typename scalar_t>
void meta_backward_kernel(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& scale, const at::Tensor& shift, const WeightLayout L,
                          bool need_x, bool need_w, bool need_affine, at::Tensor& gx, at::Tensor& gwt,
                          at::Tensor& gscale, at::Tensor& gshift) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t gh = weight.size(2), gw = weight.size(3), G = gh * gw, N = L.numel();
  const int64_t hid = L.hid, Cout = L.cout, A = L.affine_numel();
  const int64_t PH = meta::max_patch_size(H, gh), PW = meta::max_patch_size(W, gw);
  const int64_t HP = (PH + 2) * (PW + 2), NP = PH * PW;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  const scalar_t* gyp = grad_out.const_data_ptr<scalar_t>();
  scalar_t* gwp = need_w ? gwt.mutable_data_ptr<scalar_t>() : nullptr;
  std::vector<acc_t> sc(A), sh(A);
  for (int64_t i = 0; i < A; ++i) {
    sc[i] = static_cast<acc_t>(scale.const_data_ptr<scalar_t>()[i]);
    sh[i] = static_cast<acc_t>(shift.const_data_ptr<scalar_t>()[i]);
  }
  // Per work item: haloed grad_x buffer (Cin, PH+2, PW+2) and affine partials (2, A).
  std::vector<acc_t> gxbuf(need_x ? B * G * Cin * HP : 0);
  std::vector<acc_t> partial(need_affine ? B * G * 2 * A : 0);

  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> w(N), xh(Cin * HP), z1(hid * HP), h1(hid * HP), g1(hid * HP), z2(hid * NP),
        h2(hid * NP), g2(hid * NP), z3(Cout * NP), g3(Cout * NP), gw_(N), gxh(Cin * HP);
    std::vector<int64_t> colidx(PW + 2);
    for (int64_t item = begin; item < end; ++item) {
      const PatchGeom g(item, gh, gw, H, W);
      const int64_t hp = g.hh * g.hw, np = g.ph * g.pw;
      gather_weights(wp, N, G, g.b, item % G, w.data());
      load_haloed(xp, Cin, H, W, g, xh.data(), colidx.data());
      // ---- recompute the forward pass, keeping pre-affine values z1, z2, z3 ----
      small_gemm(w.data() + L.w1(), Cin, xh.data(), z1.data(), hid, Cin, hp);
      for (int64_t k = 0; k < hid; ++k) {
        const acc_t s = sc[L.a1() + k], t = sh[L.a1() + k];
        for (int64_t p = 0; p < hp; ++p) h1[k * hp + p] = meta::relu6(z1[k * hp + p] * s + t);
      }
      for (int64_t k = 0; k < hid; ++k) {
        dw3x3(w.data() + L.w2() + 9 * k, h1.data() + k * hp, g.hh, g.hw, z2.data() + k * np);
        const acc_t s = sc[L.a2() + k], t = sh[L.a2() + k];
        for (int64_t p = 0; p < np; ++p) h2[k * np + p] = meta::relu6(z2[k * np + p] * s + t);
      }
      small_gemm(w.data() + L.w3(), hid, h2.data(), z3.data(), Cout, hid, np);
      acc_t* ps = need_affine ? partial.data() + item * 2 * A : nullptr;
      acc_t* pt = need_affine ? ps + A : nullptr;
      // ---- stage 3: y = s3*z3 + t3 ----
      for (int64_t o = 0; o < Cout; ++o) {
        const scalar_t* src = gyp + ((g.b * Cout + o) * H + g.r0) * W + g.c0;
        const acc_t s = sc[L.a3() + o];
        acc_t sum_g = 0, sum_gz = 0;
        for (int64_t i = 0; i < g.ph; ++i)
          for (int64_t j = 0; j < g.pw; ++j) {
            const acc_t gy = static_cast<acc_t>(src[i * W + j]);
            sum_g += gy;
            sum_gz += gy * z3[o * np + i * g.pw + j];
            g3[o * np + i * g.pw + j] = gy * s;
          }
        if (ps) {
          ps[L.a3() + o] = sum_gz;
          pt[L.a3() + o] = sum_g;
        }
      }
      // grad W3[o, k] = sum_p g3[o, p] h2[k, p]
      for (int64_t o = 0; o < Cout; ++o)
        for (int64_t k = 0; k < hid; ++k) {
          acc_t acc = 0;
          const acc_t* a = g3.data() + o * np;
          const acc_t* b = h2.data() + k * np;
          for (int64_t p = 0; p < np; ++p) acc += a[p] * b[p];
          gw_[L.w3() + o * hid + k] = acc;
        }
      // ---- stage 2: gh2 = W3^T g3; gu2 = gh2 * relu6'(u2); g2 = s2 * gu2 ----
      std::fill(g2.begin(), g2.begin() + hid * np, acc_t(0));
      for (int64_t o = 0; o < Cout; ++o)
        for (int64_t k = 0; k < hid; ++k) {
          const acc_t a = w[L.w3() + o * hid + k];
          acc_t* dst = g2.data() + k * np;
          const acc_t* src = g3.data() + o * np;
          for (int64_t p = 0; p < np; ++p) dst[p] += a * src[p];
        }
      for (int64_t k = 0; k < hid; ++k) {
        const acc_t s = sc[L.a2() + k], t = sh[L.a2() + k];
        acc_t sum_g = 0, sum_gz = 0;
        for (int64_t p = 0; p < np; ++p) {
          const acc_t z = z2[k * np + p];
          const acc_t gu = meta::relu6_passes(z * s + t) ? g2[k * np + p] : acc_t(0);
          sum_g += gu;
          sum_gz += gu * z;
          g2[k * np + p] = gu * s;
        }
        if (ps) {
          ps[L.a2() + k] = sum_gz;
          pt[L.a2() + k] = sum_g;
        }
      }
      // grad W2 and gh1 (full correlation of g2 with W2)
      for (int64_t k = 0; k < hid; ++k) {
        const acc_t* gk = g2.data() + k * np;
        const acc_t* hk = h1.data() + k * hp;
        acc_t* g1k = g1.data() + k * hp;
        std::fill(g1k, g1k + hp, acc_t(0));
        for (int64_t di = 0; di < 3; ++di)
          for (int64_t dj = 0; dj < 3; ++dj) {
            const acc_t wv = w[L.w2() + 9 * k + di * 3 + dj];
            acc_t acc = 0;
            for (int64_t i = 0; i < g.ph; ++i) {
              const acc_t* gr = gk + i * g.pw;
              const acc_t* hr = hk + (i + di) * g.hw + dj;
              acc_t* g1r = g1k + (i + di) * g.hw + dj;
              for (int64_t j = 0; j < g.pw; ++j) {
                acc += gr[j] * hr[j];
                g1r[j] += wv * gr[j];
              }
            }
            gw_[L.w2() + 9 * k + di * 3 + dj] = acc;
          }
      }
      // ---- stage 1: gu1 = gh1 * relu6'(u1); g1 = s1 * gu1 ----
      for (int64_t k = 0; k < hid; ++k) {
        const acc_t s = sc[L.a1() + k], t = sh[L.a1() + k];
        acc_t sum_g = 0, sum_gz = 0;
        for (int64_t p = 0; p < hp; ++p) {
          const acc_t z = z1[k * hp + p];
          const acc_t gu = meta::relu6_passes(z * s + t) ? g1[k * hp + p] : acc_t(0);
          sum_g += gu;
          sum_gz += gu * z;
          g1[k * hp + p] = gu * s;
        }
        if (ps) {
          ps[L.a1() + k] = sum_gz;
          pt[L.a1() + k] = sum_g;
        }
      }
      // grad W1[k, c] = sum_q g1[k, q] xh[c, q]
      for (int64_t k = 0; k < hid; ++k)
        for (int64_t c = 0; c < Cin; ++c) {
          acc_t acc = 0;
          const acc_t* a = g1.data() + k * hp;
          const acc_t* b = xh.data() + c * hp;
          for (int64_t p = 0; p < hp; ++p) acc += a[p] * b[p];
          gw_[L.w1() + k * Cin + c] = acc;
        }
      if (gwp) {
        scalar_t* dst = gwp + g.b * N * G + item % G;
        for (int64_t n = 0; n < N; ++n) dst[n * G] = static_cast<scalar_t>(gw_[n]);
      }
      // haloed grad_x of this patch: gxh[c, q] = sum_k W1[k, c] g1[k, q]
      if (need_x) {
        acc_t* dst = gxbuf.data() + item * Cin * HP;
        for (int64_t c = 0; c < Cin; ++c) std::fill(gxh.data() + c * hp, gxh.data() + (c + 1) * hp, acc_t(0));
        for (int64_t k = 0; k < hid; ++k)
          for (int64_t c = 0; c < Cin; ++c) {
            const acc_t a = w[L.w1() + k * Cin + c];
            const acc_t* src = g1.data() + k * hp;
            acc_t* d = gxh.data() + c * hp;
            for (int64_t p = 0; p < hp; ++p) d[p] += a * src[p];
          }
        // stored with the fixed pitch (PH+2, PW+2) so the gather can address any patch
        for (int64_t c = 0; c < Cin; ++c)
          for (int64_t a = 0; a < g.hh; ++a)
            std::copy(gxh.data() + c * hp + a * g.hw, gxh.data() + c * hp + (a + 1) * g.hw,
                      dst + c * HP + a * (PW + 2));
      }
    }
  });

  if (need_affine) {
    // fixed-order sum of the per-item partials, in double
    std::vector<double> s(A, 0.0), t(A, 0.0);
    for (int64_t item = 0; item < B * G; ++item)
      for (int64_t a = 0; a < A; ++a) {
        s[a] += static_cast<double>(partial[item * 2 * A + a]);
        t[a] += static_cast<double>(partial[item * 2 * A + A + a]);
      }
    scalar_t* gs = gscale.mutable_data_ptr<scalar_t>();
    scalar_t* gt = gshift.mutable_data_ptr<scalar_t>();
    for (int64_t a = 0; a < A; ++a) {
      gs[a] = static_cast<scalar_t>(s[a]);
      gt[a] = static_cast<scalar_t>(t[a]);
    }
  }

  if (need_x) {
    // gather: every x pixel sums the haloed buffers that read it, in a fixed order
    std::vector<int64_t> rcell(H * meta::kMaxHaloReaders), roff(H * meta::kMaxHaloReaders), rcnt(H);
    std::vector<int64_t> ccell(W * meta::kMaxHaloReaders), coff(W * meta::kMaxHaloReaders), ccnt(W);
    for (int64_t r = 0; r < H; ++r)
      rcnt[r] = meta::halo_readers(r, H, gh, &rcell[r * meta::kMaxHaloReaders], &roff[r * meta::kMaxHaloReaders]);
    for (int64_t c = 0; c < W; ++c)
      ccnt[c] = meta::halo_readers(c, W, gw, &ccell[c * meta::kMaxHaloReaders], &coff[c * meta::kMaxHaloReaders]);
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * Cin * H, 16, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t r = idx % H, c = (idx / H) % Cin, b = idx / (H * Cin);
        scalar_t* dst = gxp + idx * W;
        for (int64_t col = 0; col < W; ++col) {
          acc_t acc = 0;
          for (int64_t u = 0; u < rcnt[r]; ++u) {
            const int64_t gi = rcell[r * meta::kMaxHaloReaders + u], a = roff[r * meta::kMaxHaloReaders + u];
            for (int64_t v = 0; v < ccnt[col]; ++v) {
              const int64_t gj = ccell[col * meta::kMaxHaloReaders + v], bb = coff[col * meta::kMaxHaloReaders + v];
              acc += gxbuf[(((b * gh + gi) * gw + gj) * Cin + c) * HP + a * (PW + 2) + bb];
            }
          }
          dst[col] = static_cast<scalar_t>(acc);
        }
      }
    });
  }
}

at::Tensor meta_block_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                          const at::Tensor& shift, int64_t hidden, int64_t out_channels) {
  const WeightLayout L = meta::check_meta_block(x, weight, scale, shift, hidden, out_channels);
  at::Tensor y = at::empty({x.size(0), out_channels, x.size(2), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "meta_block_cpu", [&] {
    meta_forward_kernel<scalar_t>(x, weight, scale, shift, L, y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_block_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, int64_t hidden, int64_t out_channels, std::array<bool, 4> output_mask) {
  const WeightLayout L = meta::check_meta_block(x, weight, scale, shift, hidden, out_channels);
  meta::check_grad_out(x, grad_out, out_channels);
  const bool need_x = output_mask[0], need_w = output_mask[1];
  const bool need_affine = output_mask[2] || output_mask[3];
  at::Tensor gx = need_x ? at::empty_like(x) : x.new_empty({0});
  at::Tensor gw = need_w ? at::empty_like(weight) : weight.new_empty({0});
  at::Tensor gs = need_affine ? at::empty_like(scale) : scale.new_empty({0});
  at::Tensor gt = need_affine ? at::empty_like(shift) : shift.new_empty({0});
  if (need_x || need_w || need_affine) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "meta_block_backward_cpu", [&] {
      meta_backward_kernel<scalar_t>(grad_out, x, weight, scale, shift, L, need_x, need_w, need_affine, gx, gw,
                                     gs, gt);
    });
  }
  if (!output_mask[2]) gs = scale.new_empty({0});
  if (!output_mask[3]) gt = shift.new_empty({0});
  return {gx, gw, gs, gt};
}

// ------------------------------------------------------------------------------------------------
// pointwise_block: patch-wise 1x1 conv -> affine -> ReLU; one work item per (sample, patch).
// ------------------------------------------------------------------------------------------------
template <typename scalar_t>
void pointwise_forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                              const at::Tensor& shift, int64_t Cout, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t gh = weight.size(2), gw = weight.size(3), G = gh * gw, N = Cout * Cin;
  const int64_t PW = meta::max_patch_size(W, gw);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  const scalar_t* scp = scale.const_data_ptr<scalar_t>();
  const scalar_t* shp = shift.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> w(N), xr(Cin * PW), out(Cout * PW);
    for (int64_t item = begin; item < end; ++item) {
      const PatchGeom g(item, gh, gw, H, W);
      gather_weights(wp, N, G, g.b, item % G, w.data());
      for (int64_t i = 0; i < g.ph; ++i) {
        const int64_t r = g.r0 + i;
        for (int64_t c = 0; c < Cin; ++c) {
          const scalar_t* src = xp + ((g.b * Cin + c) * H + r) * W + g.c0;
          for (int64_t j = 0; j < g.pw; ++j) xr[c * g.pw + j] = static_cast<acc_t>(src[j]);
        }
        small_gemm(w.data(), Cin, xr.data(), out.data(), Cout, Cin, g.pw);
        for (int64_t o = 0; o < Cout; ++o) {
          const acc_t s = static_cast<acc_t>(scp[o]), t = static_cast<acc_t>(shp[o]);
          scalar_t* dst = yp + ((g.b * Cout + o) * H + r) * W + g.c0;
          for (int64_t j = 0; j < g.pw; ++j) {
            const acc_t u = out[o * g.pw + j] * s + t;
            dst[j] = static_cast<scalar_t>(u > acc_t(0) ? u : acc_t(0));
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void pointwise_backward_kernel(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& scale, const at::Tensor& shift, int64_t Cout, bool need_x,
                               bool need_w, bool need_affine, at::Tensor& gx, at::Tensor& gwt, at::Tensor& gs,
                               at::Tensor& gt) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t gh = weight.size(2), gw = weight.size(3), G = gh * gw, N = Cout * Cin;
  const int64_t PW = meta::max_patch_size(W, gw);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  const scalar_t* gyp = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* scp = scale.const_data_ptr<scalar_t>();
  const scalar_t* shp = shift.const_data_ptr<scalar_t>();
  scalar_t* gxp = need_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gwp = need_w ? gwt.mutable_data_ptr<scalar_t>() : nullptr;
  std::vector<acc_t> partial(need_affine ? B * G * 2 * Cout : 0);
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> w(N), gwacc(N), xr(Cin * PW), z(Cout * PW), gz(Cout * PW), gxr(Cin * PW), wt(N);
    for (int64_t item = begin; item < end; ++item) {
      const PatchGeom g(item, gh, gw, H, W);
      gather_weights(wp, N, G, g.b, item % G, w.data());
      for (int64_t o = 0; o < Cout; ++o)
        for (int64_t c = 0; c < Cin; ++c) wt[c * Cout + o] = w[o * Cin + c];
      std::fill(gwacc.begin(), gwacc.end(), acc_t(0));
      acc_t* ps = need_affine ? partial.data() + item * 2 * Cout : nullptr;
      if (ps) std::fill(ps, ps + 2 * Cout, acc_t(0));
      for (int64_t i = 0; i < g.ph; ++i) {
        const int64_t r = g.r0 + i;
        for (int64_t c = 0; c < Cin; ++c) {
          const scalar_t* src = xp + ((g.b * Cin + c) * H + r) * W + g.c0;
          for (int64_t j = 0; j < g.pw; ++j) xr[c * g.pw + j] = static_cast<acc_t>(src[j]);
        }
        small_gemm(w.data(), Cin, xr.data(), z.data(), Cout, Cin, g.pw);
        for (int64_t o = 0; o < Cout; ++o) {
          const acc_t s = static_cast<acc_t>(scp[o]), t = static_cast<acc_t>(shp[o]);
          const scalar_t* src = gyp + ((g.b * Cout + o) * H + r) * W + g.c0;
          acc_t sum_g = 0, sum_gz = 0;
          for (int64_t j = 0; j < g.pw; ++j) {
            const acc_t zz = z[o * g.pw + j];
            const acc_t gu = (zz * s + t > acc_t(0)) ? static_cast<acc_t>(src[j]) : acc_t(0);
            sum_g += gu;
            sum_gz += gu * zz;
            gz[o * g.pw + j] = gu * s;
          }
          if (ps) {
            ps[o] += sum_gz;
            ps[Cout + o] += sum_g;
          }
          for (int64_t c = 0; c < Cin; ++c) {
            acc_t acc = 0;
            for (int64_t j = 0; j < g.pw; ++j) acc += gz[o * g.pw + j] * xr[c * g.pw + j];
            gwacc[o * Cin + c] += acc;
          }
        }
        if (gxp) {
          small_gemm(wt.data(), Cout, gz.data(), gxr.data(), Cin, Cout, g.pw);
          for (int64_t c = 0; c < Cin; ++c) {
            scalar_t* dst = gxp + ((g.b * Cin + c) * H + r) * W + g.c0;
            for (int64_t j = 0; j < g.pw; ++j) dst[j] = static_cast<scalar_t>(gxr[c * g.pw + j]);
          }
        }
      }
      if (gwp) {
        scalar_t* dst = gwp + g.b * N * G + item % G;
        for (int64_t n = 0; n < N; ++n) dst[n * G] = static_cast<scalar_t>(gwacc[n]);
      }
    }
  });
  if (need_affine) {
    std::vector<double> s(Cout, 0.0), t(Cout, 0.0);
    for (int64_t item = 0; item < B * G; ++item)
      for (int64_t o = 0; o < Cout; ++o) {
        s[o] += static_cast<double>(partial[item * 2 * Cout + o]);
        t[o] += static_cast<double>(partial[item * 2 * Cout + Cout + o]);
      }
    scalar_t* a = gs.mutable_data_ptr<scalar_t>();
    scalar_t* b = gt.mutable_data_ptr<scalar_t>();
    for (int64_t o = 0; o < Cout; ++o) {
      a[o] = static_cast<scalar_t>(s[o]);
      b[o] = static_cast<scalar_t>(t[o]);
    }
  }
}

at::Tensor pointwise_block_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                               const at::Tensor& shift) {
  const int64_t Cout = meta::check_pointwise_block(x, weight, scale, shift);
  at::Tensor y = at::empty({x.size(0), Cout, x.size(2), x.size(3)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pointwise_block_cpu", [&] {
    pointwise_forward_kernel<scalar_t>(x, weight, scale, shift, Cout, y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pointwise_block_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, std::array<bool, 4> output_mask) {
  const int64_t Cout = meta::check_pointwise_block(x, weight, scale, shift);
  meta::check_grad_out(x, grad_out, Cout);
  const bool need_x = output_mask[0], need_w = output_mask[1];
  const bool need_affine = output_mask[2] || output_mask[3];
  at::Tensor gx = need_x ? at::empty_like(x) : x.new_empty({0});
  at::Tensor gw = need_w ? at::empty_like(weight) : weight.new_empty({0});
  at::Tensor gs = need_affine ? at::empty_like(scale) : scale.new_empty({0});
  at::Tensor gt = need_affine ? at::empty_like(shift) : shift.new_empty({0});
  if (need_x || need_w || need_affine) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pointwise_block_backward_cpu",
                                    [&] {
                                      pointwise_backward_kernel<scalar_t>(grad_out, x, weight, scale, shift, Cout,
                                                                          need_x, need_w, need_affine, gx, gw,
                                                                          gs, gt);
                                    });
  }
  if (!output_mask[2]) gs = scale.new_empty({0});
  if (!output_mask[3]) gt = shift.new_empty({0});
  return {gx, gw, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyseg, CPU, m) {
  m.impl("meta_block", &meta_block_cpu);
  m.impl("meta_block_backward", &meta_block_backward_cpu);
  m.impl("pointwise_block", &pointwise_block_cpu);
  m.impl("pointwise_block_backward", &pointwise_block_backward_cpu);
}

}  // namespace pyseg
