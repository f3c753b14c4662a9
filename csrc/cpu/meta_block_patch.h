// Per-(sample, patch) compute of the CPU meta block kernels.
//
// csrc/cpu/meta_block.cpp includes this file through cpu/isa_dispatch.h, once per instruction set,
// each time inside its own namespace (the baseline ISA and AVX2+FMA, picked at run time by
// cpu_isa.h). There is deliberately no include guard, and no #include besides the SIMD blocks:
// everything else it uses (PatchGeom, ItemArgs, meta::relu6, std::fill...) is declared by
// meta_block.cpp before the includes. Rows of the haloed maps are padded to ItemArgs::lh and of
// the patch maps to ::ln (multiples of kNR), see cpu/block_simd.h.

#include "cpu/block_simd.h"

// x's patch + halo, channel rows of pitch lh, (hh, hw) each; reflected at the image borders.
// The rows of one patch are Cin * hh short runs far apart (a channel plane apart), which the
// hardware prefetchers do not follow: the same rows of the next patch along the image row (the next
// work item of this thread) are prefetched into L2 while this one is copied (L1 is too small to
// hold them through the item's compute).
template <typename scalar_t, typename acc_t>
inline void load_haloed(const scalar_t* x, int64_t Cin, int64_t H, int64_t W, const PatchGeom& g, int64_t lh,
                        acc_t* xh) {
  const int64_t cl = reflect_index(g.c0 - 1, W), cr = reflect_index(g.c0 + g.pw, W);
  const int64_t next = g.c0 + g.pw + 1;  // first column of the next patch's interior + its halo
  const int64_t next_end = std::min(W, next + g.pw + 1);
  constexpr int64_t kLine = kCacheLine / static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t c = 0; c < Cin; ++c) {
    const scalar_t* xc = x + (g.b * Cin + c) * H * W;
    for (int64_t a = 0; a < g.hh; ++a) {
      const scalar_t* row = xc + reflect_index(g.r0 - 1 + a, H) * W;
      for (int64_t j = next; j < next_end; j += kLine) __builtin_prefetch(row + j, 0, 2);  // to L2
      acc_t* dst = xh + c * lh + a * g.hw;
      dst[0] = static_cast<acc_t>(row[cl]);
      const scalar_t* src = row + g.c0;
      int64_t j = 0;
      if constexpr (std::is_same<scalar_t, acc_t>::value) {  // whole vectors, inline (rows are short)
        using V = typename VecN<acc_t>::type;
        for (; j + VecN<acc_t>::kLanes <= g.pw; j += VecN<acc_t>::kLanes)
          *reinterpret_cast<V*>(dst + 1 + j) = *reinterpret_cast<const V*>(src + j);
      }
      for (; j < g.pw; ++j) dst[1 + j] = static_cast<acc_t>(src[j]);
      dst[g.hw - 1] = static_cast<acc_t>(row[cr]);
    }
  }
}

// Depthwise 3x3 valid conv of one channel: in (hh, hw) -> out (hh-2, hw-2), both tight. One partial
// sum per kernel row, added at the end: three independent multiply-add chains of 3 instead of one of
// 9 (patch rows are short, so the chain latency, not the arithmetic, bounds a single chain).
template <typename acc_t>
inline void dw3x3(const acc_t* w9, const acc_t* in, int64_t hh, int64_t hw, acc_t* __restrict__ out) {
  const int64_t ph = hh - 2, pw = hw - 2;
  const acc_t w0 = w9[0], w1 = w9[1], w2 = w9[2], w3 = w9[3], w4 = w9[4], w5 = w9[5], w6 = w9[6], w7 = w9[7],
              w8 = w9[8];
  for (int64_t i = 0; i < ph; ++i) {
    acc_t* __restrict__ o = out + i * pw;
    const acc_t* r0 = in + i * hw;
    const acc_t* r1 = r0 + hw;
    const acc_t* r2 = r1 + hw;
    for (int64_t j = 0; j < pw; ++j) {
      const acc_t a = w0 * r0[j] + w1 * r0[j + 1] + w2 * r0[j + 2];
      const acc_t b = w3 * r1[j] + w4 * r1[j + 1] + w5 * r1[j + 2];
      const acc_t c = w6 * r2[j] + w7 * r2[j + 1] + w8 * r2[j + 2];
      o[j] = (a + b) + c;
    }
  }
}

// dst[0:n) = relu6(src[0:n) * s + t); dst may equal src.
template <typename acc_t>
inline void affine_relu6(const acc_t* src, acc_t s, acc_t t, int64_t n, acc_t* dst) {
  for (int64_t p = 0; p < n; ++p) dst[p] = meta::relu6(src[p] * s + t);
}

// out[i*ldo + j] = sum_p a[i*la + p] * b[j*lb + p] over p < P (A B^T: weight gradients).
template <typename acc_t>
inline void gemm_nt(const acc_t* a, int64_t la, const acc_t* b, int64_t lb, int64_t M, int64_t N, int64_t P,
                    acc_t* out, int64_t ldo) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      acc_t acc = 0;
      for (int64_t p = 0; p < P; ++p) acc += a[i * la + p] * b[j * lb + p];
      out[i * ldo + j] = acc;
    }
}

// Backward through h = relu6(s*z + t) for the channels [a, a + channels) of one stage (channel k's n
// values at z + k*ld and g + k*ld; s, t: A.sc[a + k], A.sh[a + k]), in place: g <- s * g * relu6'(s*z + t).
// The channel's gradients of s (sum g*z) and t (sum g), before the scaling by s, go to ps[a + k] and
// pt[a + k] when ps is non-null.
template <typename acc_t, typename Args>
inline void affine_relu6_backward(const Args& A, int64_t a, int64_t channels, const acc_t* z, int64_t ld, int64_t n,
                                  acc_t* g, acc_t* ps, acc_t* pt) {
  for (int64_t k = 0; k < channels; ++k) {
    const acc_t s = A.sc[a + k], t = A.sh[a + k];
    const acc_t* zk = z + k * ld;
    acc_t* gk = g + k * ld;
    acc_t sum_g = 0, sum_gz = 0;
    for (int64_t p = 0; p < n; ++p) {
      const acc_t gu = meta::relu6_passes(zk[p] * s + t) ? gk[p] : acc_t(0);
      sum_g += gu;
      sum_gz += gu * zk[p];
      gk[p] = gu * s;
    }
    if (ps) {
      ps[a + k] = sum_gz;
      pt[a + k] = sum_g;
    }
  }
}

// The meta block's forward on one work item, from xh and w (already loaded):
//   z1 = W1 xh, h1 = relu6(s1 z1 + t1) on the haloed map; z2 = dw3x3(h1), h2 = relu6(s2 z2 + t2);
//   z3 = W3 h2 (pre-affine output).
// With keep_pre = false the activations overwrite the pre-activations (h1 == z1, h2 == z2 may be
// the same buffers); backward passes separate buffers to keep both.
template <typename acc_t>
inline void meta_stages(const ItemArgs<acc_t>& A, const PatchGeom& g, const acc_t* w, const acc_t* xh, acc_t* z1,
                        acc_t* h1, acc_t* z2, acc_t* h2, acc_t* z3) {
  const meta::WeightLayout& L = A.L;
  const int64_t hp = g.hh * g.hw, np = g.ph * g.pw;
  const int64_t lh = round_up(hp, kNR), ln = round_up(np, kNR);
  gemm(w + L.w1(), L.cin, xh, lh, z1, L.hid, L.cin, lh);
  for (int64_t k = 0; k < L.hid; ++k)
    affine_relu6(z1 + k * lh, A.sc[L.a1() + k], A.sh[L.a1() + k], hp, h1 + k * lh);
  for (int64_t k = 0; k < L.hid; ++k) {
    dw3x3(w + L.w2() + 9 * k, h1 + k * lh, g.hh, g.hw, z2 + k * ln);
    affine_relu6(z2 + k * ln, A.sc[L.a2() + k], A.sh[L.a2() + k], np, h2 + k * ln);
  }
  gemm(w + L.w3(), L.hid, h2, ln, z3, L.cout, L.hid, ln);
}

// Forward of one work item: y's patch = s3 * z3 + t3.
// Forward of one work item whose weight vector (gather_weights) is w.
template <typename scalar_t, typename acc_t>
void meta_forward_item(const ItemArgs<acc_t>& A, const scalar_t* x, const acc_t* w, int64_t item,
                       ItemScratch<acc_t>& S, scalar_t* y) {
  const meta::WeightLayout& L = A.L;
  const PatchGeom g(item, A.gh, A.gw, A.H, A.W);
  const int64_t ln = round_up(g.ph * g.pw, kNR);
  // the output rows are written at the end of the item: fetch their lines for writing now
  constexpr int64_t kLine = kCacheLine / static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t o = 0; o < L.cout; ++o) {
    scalar_t* dst = y + ((g.b * L.cout + o) * A.H + g.r0) * A.W + g.c0;
    for (int64_t i = 0; i < g.ph; ++i)
      for (int64_t j = 0; j < g.pw; j += kLine) __builtin_prefetch(dst + i * A.W + j, 1, 2);
  }
  load_haloed(x, L.cin, A.H, A.W, g, round_up(g.hh * g.hw, kNR), S.xh.data());
  meta_stages(A, g, w, S.xh.data(), S.h1.data(), S.h1.data(), S.h2.data(), S.h2.data(), S.z3.data());
  for (int64_t o = 0; o < L.cout; ++o) {
    const acc_t s = A.sc[L.a3() + o], t = A.sh[L.a3() + o];
    const acc_t* r = S.z3.data() + o * ln;
    scalar_t* dst = y + ((g.b * L.cout + o) * A.H + g.r0) * A.W + g.c0;
    for (int64_t i = 0; i < g.ph; ++i)
      for (int64_t j = 0; j < g.pw; ++j) dst[i * A.W + j] = static_cast<scalar_t>(r[i * g.pw + j] * s + t);
  }
}

// Backward of one work item with weight vector w (recomputes the forward). Writes the item's weight gradient (when
// gw != nullptr), its affine partials ps/pt (when non-null, (A,) each) and its haloed grad_x with
// the fixed pitch (PH+2, PW+2) into gxh_out (when non-null).
template <typename scalar_t, typename acc_t>
void meta_backward_item(const ItemArgs<acc_t>& A, const scalar_t* x, const acc_t* w, const scalar_t* grad_out,
                        int64_t item, ItemScratch<acc_t>& S, scalar_t* gw, acc_t* ps, acc_t* pt, acc_t* gxh_out) {
  const meta::WeightLayout& L = A.L;
  const int64_t hid = L.hid, Cin = L.cin, Cout = L.cout, G = A.gh * A.gw, N = L.numel();
  const PatchGeom g(item, A.gh, A.gw, A.H, A.W);
  const int64_t hp = g.hh * g.hw, np = g.ph * g.pw;
  const int64_t lh = round_up(hp, kNR), ln = round_up(np, kNR);
  acc_t *xh = S.xh.data(), *z1 = S.z1.data(), *h1 = S.h1.data(), *g1 = S.g1.data();
  acc_t *z2 = S.z2.data(), *h2 = S.h2.data(), *g2 = S.g2.data(), *z3 = S.z3.data(), *g3 = S.g3.data();
  acc_t* gwa = S.gw.data();
  load_haloed(x, Cin, A.H, A.W, g, lh, xh);
  meta_stages(A, g, w, xh, z1, h1, z2, h2, z3);
  // ---- stage 3: y = s3*z3 + t3 ----
  for (int64_t o = 0; o < Cout; ++o) {
    const scalar_t* src = grad_out + ((g.b * Cout + o) * A.H + g.r0) * A.W + g.c0;
    const acc_t s = A.sc[L.a3() + o];
    acc_t sum_g = 0, sum_gz = 0;
    for (int64_t i = 0; i < g.ph; ++i)
      for (int64_t j = 0; j < g.pw; ++j) {
        const acc_t gy = static_cast<acc_t>(src[i * A.W + j]);
        sum_g += gy;
        sum_gz += gy * z3[o * ln + i * g.pw + j];
        g3[o * ln + i * g.pw + j] = gy * s;
      }
    if (ps) {
      ps[L.a3() + o] = sum_gz;
      pt[L.a3() + o] = sum_g;
    }
  }
  // grad W3[o, k] = sum_p g3[o, p] h2[k, p]
  gemm_nt(g3, ln, h2, ln, Cout, hid, np, gwa + L.w3(), hid);
  // ---- stage 2: gh2 = W3^T g3; gu2 = gh2 * relu6'(u2); g2 = s2 * gu2 ----
  std::fill(g2, g2 + hid * ln, acc_t(0));
  for (int64_t o = 0; o < Cout; ++o)
    for (int64_t k = 0; k < hid; ++k) {
      const acc_t a = w[L.w3() + o * hid + k];
      acc_t* dst = g2 + k * ln;
      const acc_t* src = g3 + o * ln;
      for (int64_t p = 0; p < np; ++p) dst[p] += a * src[p];
    }
  affine_relu6_backward(A, L.a2(), hid, z2, ln, np, g2, ps, pt);
  // grad W2 and gh1 (full correlation of g2 with W2)
  for (int64_t k = 0; k < hid; ++k) {
    const acc_t* gk = g2 + k * ln;
    const acc_t* hk = h1 + k * lh;
    acc_t* g1k = g1 + k * lh;
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
        gwa[L.w2() + 9 * k + di * 3 + dj] = acc;
      }
  }
  // ---- stage 1: gu1 = gh1 * relu6'(u1); g1 = s1 * gu1 ----
  affine_relu6_backward(A, L.a1(), hid, z1, lh, hp, g1, ps, pt);
  // grad W1[k, c] = sum_q g1[k, q] xh[c, q]
  gemm_nt(g1, lh, xh, lh, hid, Cin, hp, gwa + L.w1(), Cin);
  if (gw) {
    scalar_t* dst = gw + g.b * N * G + item % G;
    for (int64_t n = 0; n < N; ++n) dst[n * G] = static_cast<scalar_t>(gwa[n]);
  }
  // haloed grad_x of this patch: gxh[c, q] = sum_k W1[k, c] g1[k, q]
  if (gxh_out) {
    acc_t* gxh = S.gx.data();
    for (int64_t c = 0; c < Cin; ++c) std::fill(gxh + c * lh, gxh + c * lh + hp, acc_t(0));
    for (int64_t k = 0; k < hid; ++k)
      for (int64_t c = 0; c < Cin; ++c) {
        const acc_t a = w[L.w1() + k * Cin + c];
        const acc_t* src = g1 + k * lh;
        acc_t* d = gxh + c * lh;
        for (int64_t p = 0; p < hp; ++p) d[p] += a * src[p];
      }
    // stored with the fixed pitch (PH+2, PW+2) so the gather can address any patch
    const int64_t HP = (A.PH + 2) * (A.PW + 2);
    for (int64_t c = 0; c < Cin; ++c)
      for (int64_t a = 0; a < g.hh; ++a)
        std::copy(gxh + c * lh + a * g.hw, gxh + c * lh + (a + 1) * g.hw, gxh_out + c * HP + a * (A.PW + 2));
  }
}
