// Device code of the fused HyperSeg meta block (launchers in meta_block.cu).
//
// meta_block forward: one thread block per (sample, patch). The block stages the patch's weights in
// shared memory once (gathered from the (B, N, gh, gw) layout), then walks the patch in tiles of
// th x tw output pixels: the tile's x + 1-px halo (reflect at image borders only), pw1 -> affine ->
// ReLU6 of every haloed pixel, and the depthwise 3x3 -> affine -> ReLU6 all live in shared memory;
// pw2 -> affine is computed straight into the output. Only y is written. The tile is the whole
// patch when it fits; smaller tiles recompute pw1 on their own 1-px ring (same values: the ring is
// inside the patch or its halo and uses the patch's weights). When even the weights do not fit in
// shared memory they are read from a transposed (B*G, N) copy in global memory instead.
//
// meta_block backward: one block per (sample, patch), same tiling; forward intermediates are
// recomputed per tile. Weight gradients accumulate in shared memory (each entry owned by one thread
// for the block's life), affine partials per block are summed by a second kernel in a fixed order,
// and grad_x goes through a per-patch haloed buffer (sequential tiles of one block, separated by
// __syncthreads) gathered per input pixel in a fixed order by a third kernel: deterministic, no
// atomics anywhere. Accumulation in float (double for float64).
#pragma once

#include "common/meta_block.h"
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/block_kernels.cuh"
#include "cuda/mma.cuh"
#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

using meta::WeightLayout;

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Shared-memory carve-out helper (each region keeps acc_t alignment).
template <typename acc_t>
struct Carve {
  acc_t* p;
  __device__ acc_t* take(int64_t n) {
    acc_t* r = p;
    p += n;
    return r;
  }
};

// Tile t (row-major) of patch P walked in tiles of th x tw: its size eh x ew and first pixel (tr0,
// tc0); the haloed tile's row length hw and pixel count hq; its pixel count tp.
struct PatchTile {
  int64_t eh, ew, tr0, tc0, hw, hq, tp;
};

__device__ __forceinline__ PatchTile patch_tile(const DevPatch& P, int64_t th, int64_t tw, int64_t t) {
  const int64_t ntj = div_up(P.pw, tw), ti = t / ntj, tj = t % ntj;
  const int64_t eh = imin(th, P.ph - ti * th), ew = imin(tw, P.pw - tj * tw);
  return {eh, ew, P.r0 + ti * th, P.c0 + tj * tw, ew + 2, (eh + 2) * (ew + 2), eh * ew};
}

// One stage's affine partials of a patch tile: per channel c (one thread each, fixed order) adds
// sum(g * z) to the scale partial and sum(g) to the shift partial at offset a + c (shift at A + a + c),
// then multiplies the stage's gradient g by the scale: g becomes the gradient of the pre-affine value z.
// g, z: channels x n.
template <typename scalar_t, typename acc_t>
__device__ void affine_partials(acc_t* g, const acc_t* z, int64_t channels, int64_t n,
                                const scalar_t* __restrict__ scale, int64_t a, int64_t A, acc_t* part) {
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    acc_t sg = 0, sgz = 0;
    const acc_t s = static_cast<acc_t>(scale[a + c]);
    for (int64_t p = 0; p < n; ++p) {
      sg += g[c * n + p];
      sgz += g[c * n + p] * z[c * n + p];
      g[c * n + p] *= s;
    }
    part[a + c] += sgz;
    part[A + a + c] += sg;
  }
}

// Stage this patch's weights (strided by G in the (B, N, gh, gw) layout) into shared memory.
template <typename scalar_t, typename acc_t>
__device__ void stage_weights(const scalar_t* __restrict__ weight, int64_t N, int64_t G, int64_t b, int64_t patch,
                              acc_t* dst) {
  const scalar_t* src = weight + b * N * G + patch;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) dst[n] = static_cast<acc_t>(src[n * G]);
}

// x's tile + halo: rows [tr0 - 1, tr0 + eh], cols [tc0 - 1, tc0 + ew], reflected at image borders.
template <typename scalar_t, typename acc_t>
__device__ void load_tile(const scalar_t* __restrict__ x, int64_t b, int64_t Cin, int64_t H, int64_t W,
                          int64_t tr0, int64_t tc0, int64_t eh, int64_t ew, acc_t* xh) {
  const int64_t hw = ew + 2, hq = (eh + 2) * hw;
  for (int64_t idx = threadIdx.x; idx < Cin * hq; idx += blockDim.x) {
    const int64_t c = idx / hq, q = idx % hq;
    const int64_t row = reflect_index(tr0 - 1 + q / hw, H), col = reflect_index(tc0 - 1 + q % hw, W);
    xh[idx] = static_cast<acc_t>(x[((b * Cin + c) * H + row) * W + col]);
  }
}

// ------------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) meta_forward_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
    const at::opmath_type<scalar_t>* __restrict__ wglobal, const scalar_t* __restrict__ scale,
    const scalar_t* __restrict__ shift, scalar_t* __restrict__ y, int64_t Cin, int64_t hid, int64_t Cout, int64_t H,
    int64_t W, int64_t gh, int64_t gw, int64_t th, int64_t tw, bool weights_in_smem) {
  using acc_t = at::opmath_type<scalar_t>;
  PYSEG_DYNAMIC_SMEM(smem_raw);
  const WeightLayout L{Cin, hid, Cout};
  const int64_t N = L.numel(), G = gh * gw;
  const DevPatch P(blockIdx.x, gh, gw, H, W);
  Carve<acc_t> cv{reinterpret_cast<acc_t*>(smem_raw)};
  const acc_t* w;
  if (weights_in_smem) {
    acc_t* ws = cv.take(N);
    stage_weights(weight, N, G, P.b, P.patch, ws);
    w = ws;
  } else {
    w = wglobal + (P.b * G + P.patch) * N;
  }
  const int64_t HQ = (th + 2) * (tw + 2), TP = th * tw;
  acc_t* xh = cv.take(Cin * HQ);
  acc_t* h1 = cv.take(hid * HQ);
  acc_t* h2 = cv.take(hid * TP);
  for (int64_t t = 0; t < div_up(P.ph, th) * div_up(P.pw, tw); ++t) {
    const auto [eh, ew, tr0, tc0, hw, hq, tp] = patch_tile(P, th, tw, t);
    // No barrier before the load: xh is last read (pw1) before the previous tile's second barrier,
    // and the previous tile's pw2 reads only h2 and w (a barrier here is redundant: the CUDA
    // emulator's mutation run shows no test can observe its removal).
    load_tile(x, P.b, Cin, H, W, tr0, tc0, eh, ew, xh);
    __syncthreads();  // weights staged, xh loaded; all threads done with the previous tile's h1/h2
    for (int64_t idx = threadIdx.x; idx < hid * hq; idx += blockDim.x) {
      const int64_t k = idx / hq, q = idx % hq;
      const acc_t* w1 = w + L.w1() + k * Cin;
      acc_t acc = 0;
      for (int64_t c = 0; c < Cin; ++c) acc += w1[c] * xh[c * hq + q];
      h1[idx] = meta::relu6(acc * static_cast<acc_t>(scale[L.a1() + k]) + static_cast<acc_t>(shift[L.a1() + k]));
    }
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < hid * tp; idx += blockDim.x) {
      const int64_t k = idx / tp, p = idx % tp, i = p / ew, j = p % ew;
      const acc_t* w2 = w + L.w2() + 9 * k;
      const acc_t* hk = h1 + k * hq + i * hw + j;
      acc_t acc = 0;
#pragma unroll
      for (int d = 0; d < 9; ++d) acc += w2[d] * hk[(d / 3) * hw + d % 3];
      h2[idx] = meta::relu6(acc * static_cast<acc_t>(scale[L.a2() + k]) + static_cast<acc_t>(shift[L.a2() + k]));
    }
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < Cout * tp; idx += blockDim.x) {
      const int64_t o = idx / tp, p = idx % tp;
      const acc_t* w3 = w + L.w3() + o * hid;
      acc_t acc = 0;
      for (int64_t k = 0; k < hid; ++k) acc += w3[k] * h2[k * tp + p];
      acc = acc * static_cast<acc_t>(scale[L.a3() + o]) + static_cast<acc_t>(shift[L.a3() + o]);
      y[((P.b * Cout + o) * H + tr0 + p / ew) * W + tc0 + p % ew] = static_cast<scalar_t>(acc);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// forward on the tensor cores (float as tf32 or 3xTF32, fp16, bf16)
// ------------------------------------------------------------------------------------------------
// One block of 8 warps per (sample, patch), tiles of th x tw output pixels as above. The block stages
// the patch's weights with the first two affines' scales folded in (W1' = s1 W1, W2' = s2 W2, W3' = s3 W3;
// t1 as an extra column of W1' against a row of ones in X where Cin is not a multiple of the MMA depth k, else
// as the pw1 accumulators' start, a T1 tile), then per tile loads x's haloed tile once (operand type, rows =
// channels; the row of ones and the zero rows up to the MMA depth are written once per block) and walks the
// hidden channels in stages of hc = 16, 32 or 48 (the plan's widest that fits; two barriers each, plus one per
// tile):
//   pw1   H1[hc, haloed px] = relu6(W1'[stage] [X; 1])             wmma (ReLU6 on the fragments), a warp per
//                                                                  16-px column tile: W1' fragments in registers
//                                                                  (hc 16) or all hc/16 blocks, each X fragment
//                                                                  loaded and split once per k-step (pairs of
//                                                                  column tiles per warp where g.pair1)
//   dw    H2[hc, px] = relu6(dw3x3'(H1) + t2)                      CUDA cores, 2 columns x 2 channels x
//                                                                  kDwRows rows per thread
//   pw2   Y[Cout, px] += W3'[:, stage] H2[stage, px]               wmma, accumulators stay in registers
// and finally each warp stores its Y tiles (through shared memory, no barrier) as y = Y + t3. Padded
// rows/columns of the MMA operands are zero (a NaN there would reach real outputs through 0 * NaN); row
// strides are padded (A operands by 16 bytes, B operands and Y by 8 elements: see mma_geometry) so that
// the rows a tensor-core load or store touches at once fall in different banks. Folding the scales rounds
// the products s*w once to the operand type (16-bit types: one rounding of the weight, as before).
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 16;      // hidden channels per block of a stage (one MMA depth of fp16/bf16, two of tf32)
constexpr int kMaxStage = 48;   // hidden channels per stage at most (3 blocks of kChunk)
constexpr int kMaxAccTiles = 4;  // 16x16 pw2 accumulator tiles per warp (8 floats per lane each)
constexpr int kXPix = 4;        // x tile staging: pixels per lane (32 apart)
constexpr int kXCh = 8;         // x tile staging: channels per round
// the x tile's zero columns: their lanes load this word in every channel (a device global: zero-initialized)
__device__ unsigned kXZero;
constexpr int kDwRows = 8;       // output rows per thread of the depthwise stage
constexpr int kDwCols = 2;       // output columns per thread of the depthwise stage
// pw1: the W1' fragments of a 16-channel stage (k1 <= this depth) stay in registers across a warp's column
// tiles: 3 bf16/fp16 fragments (24 registers) or 5 tf32 ones (20), within the 128 of __launch_bounds__(256, 2)
// next to the pw2 accumulators; none for 3xTF32 (ptxas: kept split fragments, hi + lo, spill next to the
// stage loop; HyperSeg-M's float levels have k1 = 24 and 40, past 2 of them anyway: there a warp computes
// all blocks of a wider stage instead, up to 3 accumulators, reusing each split X fragment)
template <int K, int kSplit>
constexpr int kA1Depth = K == 16 ? 48 : kSplit == 1 ? 40 : 0;
// pw1 over pairs of column tiles (MmaGeom::pair1): 2 x kBlocks accumulator fragments (8 registers each), in
// passes of at most this many 16-channel blocks of a stage (ptxas -Xptxas -v: more spill; 0: no pairs). kSingle:
// plans of one stage, where the pw2 accumulators are zeroed after pw1 (no registers during it); else the stage
// loop, where they are live (kMaxAccTiles x 8 registers): no pairs there. tf32: 1 (its kernel spilled 12 bytes
// at main b889632 before any pairs; 4 with these, 12 again with 2-block passes)
template <int K, int kSplit, bool kSingle>
constexpr int kPairMax = !kSingle ? 0 : K == 16 || kSplit == 3 ? 2 : 1;

// pw1's T1 tile (t1acc): row stride, floats. 24 = 8 mod 32 words (rows 0..3 of a half-warp's 8-byte accumulator
// loads in different banks); 96 bytes, a multiple of 16 as wmma needs
constexpr int kLdT1 = 24;

// Four floats moved by one 16-byte shared-memory store.
struct alignas(16) Quad {
  float a, b, c, d;
};

// Two adjacent elements moved by one 2-element (4- or 8-byte) shared-memory access.
template <class E>
struct alignas(2 * sizeof(E)) Pair {
  E a, b;
};

// v, u stored as an adjacent pair of E (one 8-byte store for float, 4-byte for 16-bit types) at p, aligned
// to the pair (a Pair<E> assignment compiles to two stores)
template <class E>
__device__ __forceinline__ void store_pair(E* p, float v, float u) {
  const Pair<E> q{mma::from_float<E>(v), mma::from_float<E>(u)};
  using Word = std::conditional_t<sizeof(E) == 4, unsigned long long, unsigned int>;
  static_assert(sizeof(Word) == sizeof(q), "a pair is one word");
  Word w;
  memcpy(&w, &q, sizeof(w));
  *reinterpret_cast<Word*>(p) = w;
}

// n / d for 0 <= n < 2^22 and d >= 1, given inv = 1.0f / d (correctly rounded): (n + 0.5) inv is within
// (n + 0.5) / d * 2^-23 < 0.5 / d of (n + 0.5) / d, whose distance to an integer is at least 0.5 / d, so the
// truncation is exact. 4 instructions (I2F, FADD, FMUL, F2I) instead of the ~30 of an int32 division.
__host__ __device__ __forceinline__ int div_small(int n, float inv) {
  return static_cast<int>((static_cast<float>(n) + 0.5f) * inv);
}

// i reflected into [0, n) as reflect_index_as<int> does for -n < i < 2n - 1, given r = 2n - 2: |i|, or r - |i|
// past the last index, by min/max, no branch (IABS and 2 IMNMX, the n == 1 test included: r = 0 gives 0); the
// result is in [0, n) for every i (so any q's pointer is valid)
__device__ __forceinline__ int reflect1(int i, int r) {
  const int a = abs(i);
  return max(min(a, r - a), 0);
}

struct MmaGeom {
  int th, tw;                      // tile, output pixels
  int k1, m1, ldw1;                // pw1: depth (Cin padded to the MMA k), rows (hid padded to 16), W1 stride
  bool t1acc;                      // k1 == Cin: t1 starts the pw1 accumulators (tile at ot1), else a ones row of X
  int m3, ldw3;                    // pw2: rows (Cout padded to 16), W3 stride (depth: m1)
  int nq, ldx, ldh1;               // haloed tile pixels padded to 16; X and H1 strides
  int np, ldh2, ldy;               // tile pixels padded to 16; H2 and Y strides
  int hc;                          // hidden channels per stage (a multiple of kChunk, <= kMaxStage)
  bool pair1;                      // pw1 without kept W1' fragments: a warp computes 2 adjacent column tiles
  int64_t ow1, ow3, ow2, oaff, ot1, ox, oh1, oh2, bytes;  // shared-memory byte offsets, total
};

__host__ __device__ constexpr int round_up(int v, int m) { return (v + m - 1) / m * m; }

// Geometry of a th x tw tile for operand size `esize` (bytes), MMA depth k and hc hidden channels per stage
// (H1 and H2 hold one stage).
inline MmaGeom mma_geometry(int64_t Cin, int64_t hid, int64_t Cout, int th, int tw, int esize, int k, int hc) {
  MmaGeom g{};
  g.hc = hc;
  // row padding of the A operands (W1', W3'): 16 bytes (tf32 A fragments: lanes read rows g, g + 8 at columns
  // t, t + 4, a stride of 4 mod 32 words is conflict-free; 16-bit: ldmatrix rows in distinct banks); of the B
  // operands (X, H2): 8 elements (tf32 B fragments: lanes read rows t, t + 4 at columns g, conflict-free at
  // 8 mod 32 words; 16-bit: 16 bytes as for A)
  const int pad = 16 / esize, bpad = 8;
  g.th = th;
  g.tw = tw;
  // t1 (pw1's shift): where Cin is not a multiple of k, a row of ones in X (row Cin, inside the padding: free)
  // against a t1 column of W1'; else (no padding row) the accumulators start from a tile of t1 (ot1)
  g.k1 = round_up(static_cast<int>(Cin), k);
  g.t1acc = g.k1 == Cin;
  g.m1 = round_up(static_cast<int>(hid), kChunk);
  g.ldw1 = g.k1 + pad;
  g.m3 = round_up(static_cast<int>(Cout), 16);
  g.ldw3 = g.m1 + pad;
  g.nq = round_up((th + 2) * (tw + 2), 16);
  g.ldx = g.nq + bpad;
  // H1 (float) row stride: channels r and r + 1 of the depthwise stage's half-warp (pairs fastest, 2 ceil(tw/2)
  // words per channel row) in different banks: stride = that width mod 32 words, else 4 (wmma: 16-byte multiple)
  const int dww = (kDwCols * ((tw + kDwCols - 1) / kDwCols)) % 32;
  g.ldh1 = round_up(g.nq, 32) + (dww ? round_up(dww, 4) : 4);
  g.np = round_up(th * tw, 16);
  g.ldh2 = g.np + bpad;
  g.ldy = g.np + 8;  // 8 mod 32 words: Y's fragment stores (rows g, columns 2t) and epilogue reads conflict-free
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t o = off;
    off += (bytes + 127) / 128 * 128;
    return o;
  };
  g.ow1 = take(int64_t{g.m1} * g.ldw1 * esize);
  g.ow3 = take(int64_t{g.m3} * g.ldw3 * esize);
  g.ow2 = take(9 * hid * 4);
  g.oaff = take((hid + Cout) * 4);  // t2, t3
  // float (explicit tf32 tiles, mma::fill_rows): the pw1 accumulators' start by rows, m1 floats (t1 where t1acc,
  // else zeros; zero past hid); 16-bit types (wmma's opaque accumulator mapping), t1acc: the T1 tile, per hidden
  // channel r 16 copies of t1[r]
  g.ot1 = take(esize == 4 ? int64_t{g.m1} * 4 : g.t1acc ? int64_t{g.m1} * kLdT1 * 4 : 0);
  g.ox = take(int64_t{g.k1} * g.ldx * esize);
  g.oh1 = take(std::max<int64_t>(int64_t{hc} * g.ldh1, int64_t{g.m3} * g.ldy) * 4);  // H1, then Y
  g.oh2 = take(int64_t{hc} * g.ldh2 * esize);
  g.bytes = off;
  return g;
}

template <typename scalar_t, int kSplit>
__global__ void __launch_bounds__(kThreads, 2) meta_forward_mma_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight, const scalar_t* __restrict__ scale,
    const scalar_t* __restrict__ shift, scalar_t* __restrict__ y, int64_t Cin, int64_t hid, int64_t Cout, int64_t H,
    int64_t W, int64_t gh, int64_t gw, bool patch_major, MmaGeom g) {
  using Op = mma::Operand<scalar_t>;
  using T = typename Op::mem;
  constexpr int K = Op::k;
  constexpr int kA1 = kA1Depth<K, kSplit> / K > 0 ? kA1Depth<K, kSplit> / K : 1;  // W1' fragments a warp keeps
  // float: the explicit tf32 tiles (2 HMMA.1688 per product, documented lane layout); 16-bit: wmma fragments
  using FragA = typename mma::Tiles<scalar_t>::A;
  using FragB = typename mma::Tiles<scalar_t>::B;
  using FragC = typename mma::Tiles<scalar_t>::C;
  constexpr bool kRowsInit = std::is_same_v<FragC, mma::Tf32C>;  // accumulators start from t1 by rows
  PYSEG_DYNAMIC_SMEM(smem_raw);
  T* w1s = reinterpret_cast<T*>(smem_raw + g.ow1);
  T* w3s = reinterpret_cast<T*>(smem_raw + g.ow3);
  float* w2s = reinterpret_cast<float*>(smem_raw + g.ow2);
  float* aff = reinterpret_cast<float*>(smem_raw + g.oaff);  // [t2 (hid) | t3 (Cout)]
  float* t1s = reinterpret_cast<float*>(smem_raw + g.ot1);   // t1acc: t1 (float) or T1 (m1 x 16, stride kLdT1)
  T* xs = reinterpret_cast<T*>(smem_raw + g.ox);
  float* h1 = reinterpret_cast<float*>(smem_raw + g.oh1);
  float* ys = h1;  // Y reuses H1's space after the last stage
  T* h2 = reinterpret_cast<T*>(smem_raw + g.oh2);
  const WeightLayout L{Cin, hid, Cout};
  const int64_t N = L.numel(), G = gh * gw;
  const DevPatch P(blockIdx.x, gh, gw, H, W);
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int cin = static_cast<int>(Cin), nh = static_cast<int>(hid), co = static_cast<int>(Cout);
  // weights of this patch, read through the read-only path: contiguous (patch-major, what the models emit on
  // CUDA: 32-bit element offsets) or strided by G (64-bit offsets); one copy of the staging per layout (ws: the
  // element stride, a compile-time 1 when contiguous). W1' and W3' a thread per real element, flat in source
  // order (36 warp rounds for HyperSeg-M's 48 x 24 W1', not 48 half-empty rows), the row r = e / width by a float
  // reciprocal (div_small; every index here is far below its 2^22: W1', W3' fit in shared memory), times the
  // row's scale; their padding after (pad); loops not unrolled
  const int ow1 = static_cast<int>(L.w1()), ow2 = static_cast<int>(L.w2()), ow3 = static_cast<int>(L.w3());
  const int oa1 = static_cast<int>(L.a1()), oa2 = static_cast<int>(L.a2()), oa3 = static_cast<int>(L.a3());
  constexpr int kV = mma::kVec<scalar_t>;  // elements per 16-byte vector
  auto stage = [&](const scalar_t* __restrict__ src, auto ws) {
    // the rows x cols real elements of W1' or W3' (row-major from woff in the source), row r scaled by scale[soff + r]
    auto real = [&](T* dst, int ld, int rows, int cols, int woff, int soff) {
      const float inv = 1.0f / static_cast<float>(cols);
#pragma unroll 1
      for (int e = tid; e < rows * cols; e += kThreads) {
        const int r = div_small(e, inv), c = e - r * cols;
        dst[r * ld + c] = mma::from_float<T>(mma::ldg_float(scale + soff + r) * mma::ldg_float(src + (woff + e) * ws));
      }
    };
    // patch-major (ws = 1) with a 16-byte aligned sub-array and rows of a multiple of kV elements (block-uniform
    // test): a thread per vector of kV elements of one row (one 16-byte LDG, one scale, one 16-byte STS: the
    // rows' strides ld are multiples of 16 bytes); else the scalar loop
    auto vec_ok = [&](int woff, int cols) {  // decltype(ws){} == 1: the contiguous copy only (the strided one's 0)
      return decltype(ws){} == 1 && cols % kV == 0 && reinterpret_cast<uintptr_t>(src + woff) % 16 == 0;
    };
    auto real_vec = [&](T* dst, int ld, int rows, int cols, int woff, int soff) {
      const int vr = cols / kV;  // vectors per row
      const float inv = 1.0f / static_cast<float>(vr);
#pragma unroll 1
      for (int v = tid; v < rows * vr; v += kThreads) {
        const int r = div_small(v, inv), c = (v - r * vr) * kV;
        float f[kV];
        mma::ldg_vec(src + woff + v * kV, f);
        const float sc = mma::ldg_float(scale + soff + r);
#pragma unroll
        for (int i = 0; i < kV; ++i) f[i] *= sc;
        mma::store_vec(dst + r * ld + c, f);
      }
    };
    if (vec_ok(ow1, cin)) {
      real_vec(w1s, g.ldw1, nh, cin, ow1, oa1);
    } else {
      real(w1s, g.ldw1, nh, cin, ow1, oa1);
    }
    if (vec_ok(ow3, nh)) {
      real_vec(w3s, g.ldw3, co, nh, ow3, oa3);
    } else {
      real(w3s, g.ldw3, co, nh, ow3, oa3);
    }
    // W2' (float in shared memory): by vectors of kV elements alike (their rows idx / 9 one by one)
    if (vec_ok(ow2, 9 * nh)) {
#pragma unroll 1
      for (int v = tid; v < 9 * nh / kV; v += kThreads) {
        float f[kV];
        mma::ldg_vec(src + ow2 + v * kV, f);
#pragma unroll
        for (int i = 0; i < kV; ++i) f[i] *= mma::ldg_float(scale + oa2 + (v * kV + i) / 9);
#pragma unroll
        for (int i = 0; i < kV; i += 4)
          *reinterpret_cast<Quad*>(w2s + v * kV + i) = Quad{f[i], f[i + 1], f[i + 2], f[i + 3]};
      }
    } else {
#pragma unroll 1
      for (int idx = tid; idx < 9 * nh; idx += kThreads)
        w2s[idx] = mma::ldg_float(scale + oa2 + idx / 9) * mma::ldg_float(src + (ow2 + idx) * ws);
    }
  };
  if (patch_major || G == 1) {  // one patch: the (B, N, 1, 1) layout is patch-major too
    stage(weight + (P.b * G + P.patch) * N, std::integral_constant<int, 1>{});
  } else {
    stage(weight + P.b * N * G + P.patch, G);
  }
  // the padding of W1' (m1 x k1) and W3' (m3 x m1): columns cols..k - 1 of all m rows (W1': t1 at column Cin,
  // which exists only where !t1acc), then rows rows..m - 1 of the real columns, zero (a NaN left there would
  // reach real outputs through 0 * NaN)
  auto pad = [&](T* dst, int ld, int rows, int cols, int m, int k, bool t1col) {
    const int kp = k - cols;
    if (kp > 0) {
      const float inv = 1.0f / static_cast<float>(kp);
#pragma unroll 1
      for (int e = tid; e < m * kp; e += kThreads) {
        const int r = div_small(e, inv), c = e - r * kp;
        dst[r * ld + cols + c] = mma::from_float<T>(t1col && c == 0 && r < rows ? mma::ldg_float(shift + oa1 + r) : 0.0f);
      }
    }
    const float inv = 1.0f / static_cast<float>(cols);
#pragma unroll 1
    for (int e = tid; e < (m - rows) * cols; e += kThreads) {
      const int r = div_small(e, inv), c = e - r * cols;
      dst[(rows + r) * ld + c] = mma::from_float<T>(0.0f);
    }
  };
  pad(w1s, g.ldw1, nh, cin, g.m1, g.k1, true);
  pad(w3s, g.ldw3, co, nh, g.m3, g.m1, false);
#pragma unroll 1
  for (int idx = tid; idx < nh + co; idx += kThreads) aff[idx] = mma::ldg_float(shift + oa2 + idx);
  // pw1's accumulators of channels r0.. start, float: as rows r0..r0 + 15 of a vector (mma::fill_rows: 2 LDS per
  // tile, one path whether t1acc or not), t1 where t1acc (zero past hid), else zeros (t1 rides on X's ones row);
  // 16-bit, t1acc (wmma's opaque mapping): as the 16x16 block at row r0 of T1 = hid rows of t1[r] (zero rows up
  // to m1), 16 columns (stride kLdT1), 4 per thread (one 16-byte store): exact, t1 + sum, no assumption on the
  // fragment layout
  if constexpr (kRowsInit) {
#pragma unroll 1
    for (int r = tid; r < g.m1; r += kThreads) t1s[r] = g.t1acc && r < nh ? mma::ldg_float(shift + oa1 + r) : 0.0f;
  } else if (g.t1acc) {
#pragma unroll 1
    for (int idx = tid; idx < g.m1 * 4; idx += kThreads) {
      const int r = idx / 4;
      const float v = r < nh ? mma::ldg_float(shift + oa1 + r) : 0.0f;
      *reinterpret_cast<Quad*>(t1s + r * kLdT1 + 4 * (idx % 4)) = Quad{v, v, v, v};
    }
  }
  const int mt3 = g.m3 / 16;
  // X's rows past the image channels (!t1acc), the same in every tile: row Cin ones (against W1's t1 column),
  // then zeros up to k1 (visible to the first tile's pw1 after its first barrier; never overwritten)
  if (cin < g.k1) {
    for (int q = tid; q < g.nq; q += kThreads)
      for (int c = cin; c < g.k1; ++c) xs[c * g.ldx + q] = mma::from_float<T>(c == cin ? 1.0f : 0.0f);
  }
  // pw1's accumulator of hidden channels r0..r0 + 15: from t1 / T1 (t1acc) or zero (t1 rides on X's ones row)
  auto init_c1 = [&](FragC& c, int r0) {
    if constexpr (kRowsInit) {
      mma::fill_rows(c, t1s + r0);
    } else if (g.t1acc) {
      mma::load_shared_acc(c, t1s + r0 * kLdT1, kLdT1);
    } else {
      mma::fill(c, 0.0f);
    }
  };
  // the tile loop keeps its geometry in 32 bits (fewer long-lived registers next to the pw2 accumulators:
  // ptxas fits the kernel in the 128 registers of __launch_bounds__(256, 2) without spills)
  const int pc0 = static_cast<int>(P.c0), rend = static_cast<int>(P.r0 + P.ph), cend = static_cast<int>(P.c0 + P.pw);
  const int hi = static_cast<int>(H), wi = static_cast<int>(W), plane = static_cast<int>(H * W);
  const scalar_t* xb = x + P.b * Cin * H * W;
  scalar_t* yb = y + P.b * Cout * H * W;
  // tiles in row-major order: (tr0, tc0) their first pixel
  for (int tr0 = static_cast<int>(P.r0), tc0 = pc0; tr0 < rend;
       tc0 = tc0 + g.tw < cend ? tc0 + g.tw : pc0, tr0 = tc0 == pc0 ? tr0 + g.th : tr0) {
    const int ehi = min(g.th, rend - tr0), ewi = min(g.tw, cend - tc0);
    const int hwi = ewi + 2, hqi = (ehi + 2) * hwi, tpi = ehi * ewi;
    // x's haloed tile, rows = channels (zero columns from hq to nq; rows Cin.. staged once, above). A warp
    // copies kXPix x 32 pixels, lane l the pixels q0 + l + 32 j (j < kXPix): the kXPix stores of a channel share
    // one shared address (STS [R + 32 j elements]: ldx, the channel stride, is no constant, so one add per
    // channel rather than per element), kXCh channels a round with their kXPix x kXCh loads issued before their
    // stores; 4-byte elements go global -> shared by cp.async (LDGSTS: one instruction, no register, instead of
    // LDG + STS), 16-bit ones as raw bits (scalar_t and its operand type are the same: no conversions). The
    // zero columns (hqi <= q < nq) take the same instructions, no divergent branch: their lanes load the zero
    // word kXZero in every channel (step 0); pixels past nq store nothing (predicated). A pixel's row and
    // column by a float reciprocal, its reflects by min/max (reflect1), its address from the sample's base
    // pointer by one IMAD.WIDE, selects rather than branches. sm_90 SASS (results/2026-12-01-cpu/
    // sass_counts_46285b6.txt, all-loops): per round of 8 channels x 128 pixels 86 instructions
    // (<float, kSplit=3>: 32 LDGSTS; 125 in the tf32 copy, whose load addresses ptxas steps by IADD3 + IADD3.X)
    // and 114-116 (bf16, fp16: 32 LDG, 32 STS); ~121-147 per 128-pixel round outside the channel loops;
    // the thread-per-pixel copy before took 26-33 per 4 channels x 32 pixels and 64-79 per 32-pixel round
    // (HyperSeg-M level 3, Cin 24, nq 112: 892 -> 379 warp-instructions a tile in float, 1048 -> 495 in
    // bf16/fp16). No barrier before it: xs was last read by the previous tile's pw1, before that tile's
    // later barriers; the cp.async copies are waited for (per thread) right before the next barrier
    {
      using Raw = mma::Bits<scalar_t>;
      const float inv_hw = 1.0f / static_cast<float>(hwi);
      const int rh = 2 * hi - 2, rw = 2 * wi - 2, cinr = cin / kXCh * kXCh, ld = g.ldx, nhw = -hwi;
      const scalar_t* const xz = reinterpret_cast<const scalar_t*>(&kXZero);
      for (int q0 = warp * 32 * kXPix; q0 < g.nq; q0 += kThreads * kXPix) {  // warp-uniform
        // the lane index read here (S2R), not the kernel's: nothing derived from it is hoisted out of the tile
        // loop to stay live through the pw2 epilogue (registers)
        const int ln = mma::lane_id();
        // the sample's base as one pointer (a register pair per round: each pixel's address is then one
        // IMAD.WIDE, not four instructions from the base and the sample offset apart)
        const scalar_t* const xr = mma::opaque(xb);
        const scalar_t* xp[kXPix];
        int st[kXPix];
        bool ok[kXPix];
#pragma unroll
        for (int j = 0; j < kXPix; ++j) {
          const int q = q0 + ln + 32 * j, qi = div_small(q, inv_hw), qj = q + qi * nhw;
          const bool in = q < hqi;
          ok[j] = q < g.nq;
          const scalar_t* p = xr + (reflect1(tr0 - 1 + qi, rh) * wi + reflect1(tc0 - 1 + qj, rw));
          xp[j] = in ? p : xz;  // computed for every q (reflect1 stays in range): selects, not a branch
          st[j] = in ? plane : 0;
        }
        Raw v[kXPix][kXCh];
        Raw* dst = reinterpret_cast<Raw*>(xs) + q0 + ln;
        int c = 0;
        if constexpr (sizeof(scalar_t) == 4) {
          // 4-byte elements: global to shared by cp.async, one instruction each (no LDG + STS, no registers)
#pragma unroll 1
          for (; c < cinr; c += kXCh) {
#pragma unroll
            for (int k = 0; k < kXCh; ++k) {
#pragma unroll
              for (int j = 0; j < kXPix; ++j) mma::cp_async4_if(dst + k * ld + 32 * j, xp[j] + k * st[j], ok[j]);
            }
#pragma unroll
            for (int j = 0; j < kXPix; ++j) xp[j] += kXCh * st[j];
            dst += kXCh * ld;
          }
#pragma unroll 1
          for (; c < cin; ++c, dst += ld) {
#pragma unroll
            for (int j = 0; j < kXPix; ++j) mma::cp_async4_if(dst + 32 * j, xp[j], ok[j]), xp[j] += st[j];
          }
        } else {
#pragma unroll 1
          for (; c < cinr; c += kXCh) {
#pragma unroll
            for (int k = 0; k < kXCh; ++k) {
#pragma unroll
              for (int j = 0; j < kXPix; ++j) v[j][k] = mma::ldg_bits(xp[j] + k * st[j]);
            }
#pragma unroll
            for (int j = 0; j < kXPix; ++j) xp[j] += kXCh * st[j];
#pragma unroll
            for (int k = 0; k < kXCh; ++k, dst += ld) {
#pragma unroll
              for (int j = 0; j < kXPix; ++j)
                if (ok[j]) dst[32 * j] = v[j][k];
            }
          }
          // the remainder channels (Cin % kXCh) one by one
#pragma unroll 1
          for (; c < cin; ++c, dst += ld) {
#pragma unroll
            for (int j = 0; j < kXPix; ++j) v[j][0] = mma::ldg_bits(xp[j]), xp[j] += st[j];
#pragma unroll
            for (int j = 0; j < kXPix; ++j)
              if (ok[j]) dst[32 * j] = v[j][0];
          }
        }
      }
    }
    if constexpr (sizeof(scalar_t) == 4) mma::cp_async_wait_all();  // this thread's x copies landed
    __syncthreads();  // weights and x staged (and the previous tile's epilogue done with Y)
    const int nt1 = (hqi + 15) / 16, nt3 = (tpi + 15) / 16;
    // the pw2 tiles n * mt3 + m (16 output channels x 16 pixels each) over the warps: where it fits, a warp
    // takes `per` consecutive column tiles of one row block (warp w: m = w % mt3, n = (w / mt3) per + i),
    // per the smallest of 2..kMaxAccTiles that covers the tiles with kWarps warps, so that 2 or more tiles
    // share each W3' fragment a warp loads and splits (with fewer warps busy); else (per = 0) the tiles
    // warp + kWarps * i. Block-uniform
    int per = 0;
    for (int p = max(2, (mt3 * nt3 + kWarps - 1) / kWarps); p <= kMaxAccTiles && per == 0; ++p)
      if (mt3 * ((nt3 + p - 1) / p) <= kWarps) per = p;
    const int mine = per ? max(0, min(per, nt3 - warp / mt3 * per))  // pw2 tiles of this warp
                         : (mt3 * nt3 - warp + kWarps - 1) / kWarps;
    // W1' fragments kept across a warp's column tiles: one-block stages only (the plan widens a stage only
    // where no warp would keep them across several tiles); block-uniform
    const bool keep_a1 = g.hc == kChunk && g.k1 <= kA1Depth<K, kSplit>;
    FragC acc[kMaxAccTiles];  // zeroed here for the stage loop, in the stage for a single stage
#pragma unroll
    for (int i = 0; i < kMaxAccTiles; ++i)
      if (i < mine && g.m1 > g.hc) mma::fill(acc[i], 0.0f);
    // the stages, kSingle: the copy for plans of one stage (m1 <= hc), where the pw2 accumulators are still
    // zero during pw1 (no registers: room for pw1's paired column tiles over 3 blocks), else the stage loop
    auto stage = [&](const int k0, auto single) {
      constexpr bool kSingle = decltype(single)::value;
      const int nc = min(g.hc, g.m1 - k0), nb = nc / kChunk;  // the stage's channels, 16-channel blocks
      // pw1 of the stage: H1 = relu6(W1' [X; 1]) (t1 rides on the ones row, or starts the accumulators:
      // init_c1). keep_a1 (one-block stages): a
      // warp per 16-px column tile with the stage's W1' fragments loaded (and split) once per stage. Else a
      // warp per 16-px column tile computes all nb <= 3 16-channel blocks of the stage: per k-step its X
      // fragment is loaded (and split) once and used for the nb W1' fragments (loaded per block and k-step),
      // or (g.pair1) a warp per pair of column tiles, each W1' fragment used for both (see run below)
      if (keep_a1) {
        FragA a1[kA1], a1lo[kA1];
        if (warp < nt1) {
#pragma unroll
          for (int f = 0; f < kA1; ++f) {
            if (f * K < g.k1) {
              mma::load_shared(a1[f], w1s + k0 * g.ldw1 + f * K, g.ldw1);
              mma::split_operand<scalar_t, kSplit>(a1[f], a1lo[f]);
            }
          }
        }
        for (int n = warp; n < nt1; n += kWarps) {
          FragC c1;
          init_c1(c1, k0);
#pragma unroll
          for (int f = 0; f < kA1; ++f) {
            if (f * K < g.k1) {
              FragB b, blo;
              mma::load_shared(b, xs + f * K * g.ldx + n * 16, g.ldx);
              mma::split_operand<scalar_t, kSplit>(b, blo);
              mma::multiply_accumulate_split<scalar_t, kSplit>(c1, a1[f], a1lo[f], b, blo);
            }
          }
#pragma unroll
          for (int e = 0; e < c1.num_elements; ++e) c1.x[e] = mma::relu6(c1.x[e]);
          mma::store_shared(h1 + n * 16, c1, g.ldh1);
        }
      } else {
        // the pass's block count and the warp's column tiles (kTiles: 1, or 2 adjacent tiles n, n + 1 where the
        // plan pairs them, g.pair1) as compile-time constants (one copy of the loop each): every fragment load
        // of the k-loop unconditional, so ptxas computes the lanes' fragment offsets once, before the loop,
        // instead of per guarded load (benchmarks/sass_counts.py). A pass computes blocks mb0 .. mb0 + kBlocks
        // - 1 of the stage; paired, a k-step loads and splits its 2 X fragments once and each W1' fragment
        // (one block at a time) once for both tiles: half the W1' loads and splits per product
        static_assert(kMaxStage / kChunk == 3, "pw1 is instantiated for 1..3 blocks per stage");
        auto pw1 = [&](auto blocks, auto tiles, int n, int nend, int mb0) {
          constexpr int kBlocks = decltype(blocks)::value, kTiles = decltype(tiles)::value;
          const T* w1b = w1s + (k0 + mb0 * kChunk) * g.ldw1;
          float* h1b = h1 + mb0 * kChunk * g.ldh1;
          for (; n < nend; n += kTiles * kWarps) {
            FragC c1[kTiles][kBlocks];
#pragma unroll
            for (int t = 0; t < kTiles; ++t)
#pragma unroll
              for (int mb = 0; mb < kBlocks; ++mb) init_c1(c1[t][mb], k0 + (mb0 + mb) * kChunk);
            // k-steps as a do-while (k1 >= K): no zero-trip path, whose copy of the accumulators' start
            // (register moves) ptxas otherwise emits next to the loop's
            int kk = 0;
#pragma unroll 1
            do {
              FragB b[kTiles], blo[kTiles];
#pragma unroll
              for (int t = 0; t < kTiles; ++t) {
                mma::load_shared(b[t], xs + kk * g.ldx + (n + t) * 16, g.ldx);
                mma::split_operand<scalar_t, kSplit>(b[t], blo[t]);
              }
#pragma unroll
              for (int mb = 0; mb < kBlocks; ++mb) {
                FragA a, alo;
                mma::load_shared(a, w1b + mb * kChunk * g.ldw1 + kk, g.ldw1);
                mma::split_operand<scalar_t, kSplit>(a, alo);
#pragma unroll
                for (int t = 0; t < kTiles; ++t)
                  mma::multiply_accumulate_split<scalar_t, kSplit>(c1[t][mb], a, alo, b[t], blo[t]);
              }
              kk += K;
            } while (kk < g.k1);
#pragma unroll
            for (int t = 0; t < kTiles; ++t) {
#pragma unroll
              for (int mb = 0; mb < kBlocks; ++mb) {
#pragma unroll
                for (int e = 0; e < c1[t][mb].num_elements; ++e) c1[t][mb].x[e] = mma::relu6(c1[t][mb].x[e]);
                mma::store_shared(h1b + mb * kChunk * g.ldh1 + (n + t) * 16, c1[t][mb], g.ldh1);
              }
            }
          }
        };
        // g.pair1: pair p = warp + kWarps i (p < nt1 / 2) takes tiles 2p, 2p + 1, in a pass of up to kPair
        // blocks (kPairMax: what fits the 128 registers without spills) and one of the rest, if any, and an
        // odd last tile goes to the warp
        // after the last pair's (warp npair % kWarps), all blocks at once; else a warp per tile (n = warp +
        // kWarps i), all blocks at once
        auto run = [&](auto blocks) {
          constexpr int kBlocks = decltype(blocks)::value, kPair = kPairMax<K, kSplit, kSingle>;
          // passes: kFirst blocks, then the rest (at most kPair too); pairs only where they need fewer fragment
          // loads per pair and k-step than two single tiles (2 X per pass + kBlocks W1' against 2 + 2 kBlocks)
          constexpr int kFirst = kBlocks < kPair ? kBlocks : kPair, kPasses = kBlocks > kFirst ? 2 : 1;
          constexpr bool kPays = kPair > 0 && kBlocks - kFirst <= kPair && 2 * kPasses < 2 + kBlocks;
          const int npair = kPays && g.pair1 ? nt1 / 2 : 0;
          pw1(blocks, std::integral_constant<int, 1>{}, 2 * npair + (warp - npair % kWarps + kWarps) % kWarps, nt1, 0);
          if constexpr (kPays) {
            if (npair > 0) {
              pw1(std::integral_constant<int, kFirst>{}, std::integral_constant<int, 2>{}, 2 * warp, 2 * npair, 0);
              if constexpr (kBlocks > kFirst)
                pw1(std::integral_constant<int, kBlocks - kFirst>{}, std::integral_constant<int, 2>{}, 2 * warp,
                    2 * npair, kFirst);
            }
          }
        };
        if (nb == 3) {
          run(std::integral_constant<int, 3>{});
        } else if (nb == 2) {
          run(std::integral_constant<int, 2>{});
        } else {
          run(std::integral_constant<int, 1>{});
        }
      }
      __syncthreads();
      // dw3x3 of the stage; rows past hid are zero (pw2 reads them against W3's zero columns). A thread
      // per (pair of columns, 2 channels r and r + nc/2, block of kDwRows output rows), pairs fastest: the
      // 2 x 9 taps in registers, per channel a 3-row x 4-column window sliding down (unrolled), for even tile
      // widths read as two 8-byte loads per row (ldh1 spaces the channels of a half-warp over the banks; the
      // second channel's loads are the first's moved by nc/2 rows, the same banks) and the pair stored at
      // once. Two channels per item halve the items' setup (index divisions, loop) against 4 columns of
      // one channel, whose 3 8-byte window loads per row would all start at words 0 mod 4 (ldh1 and the
      // column a multiple of 4): 2-way conflicts in every load (benchmarks/roofline.py, _cuda_meta_mma)
      const int nh2 = nc / 2;  // nc: a multiple of kChunk
      const int nrb = (ehi + kDwRows - 1) / kDwRows, ewp = (ewi + kDwCols - 1) / kDwCols;
      // one copy of the item loop per parity of the tile width (block-uniform): no branch per window load
      // or store. Even: pairs aligned to 8 bytes (H1) / 2 elements (H2)
      // item index -> (jp, r, rb) by div_small (item counts < 2^22: nh2 <= 24, nrb <= 4, ewp <= 16); 1 / ewp
      // once per tile (ptxas hoists it), 1 / nh2 (nh2 = 8 nb) a constant
      static_assert(kMaxStage / 2 == 24, "1 / nh2 for nb = 1, 2, 3");
      const float inv_ewp = 1.0f / static_cast<float>(ewp), inv_nh2 = nb == 1 ? 0.125f : nb == 2 ? 0.0625f : 0.125f / 3;
      auto dw = [&](auto even_width) {
        constexpr bool even = decltype(even_width)::value;
        for (int idx = tid; idx < nh2 * nrb * ewp; idx += kThreads) {
          const int rest = div_small(idx, inv_ewp), jp = idx - rest * ewp, rb = div_small(rest, inv_nh2);
          const int r = rest - rb * nh2;
          const int k = k0 + r, j = kDwCols * jp;
          const bool two = j + 1 < ewi;  // the pair's second column is in the tile
          const int i0 = rb * kDwRows, i1 = min(i0 + kDwRows, ehi);
          T* out = h2 + r * g.ldh2 + j;
          T* out2 = out + nh2 * g.ldh2;
          auto put = [&](T* o, int i, float v, float u) {
            if constexpr (even) {
              store_pair(o + i * ewi, v, u);
            } else {
              o[i * ewi] = mma::from_float<T>(v);
              if (two) o[i * ewi + 1] = mma::from_float<T>(u);
            }
          };
          if (k >= nh) {  // both channels past hid
            for (int i = i0; i < i1; ++i) put(out, i, 0.0f, 0.0f), put(out2, i, 0.0f, 0.0f);
            continue;
          }
          // the second channel k + nh2 may be past hid (last stage): computed with channel k's taps and t2,
          // then overwritten with zeros (H1's rows there are pw1's of zero W1' rows: NaN where x is not finite)
          const bool real2 = k + nh2 < nh;
          const int kl = real2 ? k + nh2 : k;
          float wk[9], wl[9];
#pragma unroll
          for (int d = 0; d < 9; ++d) wk[d] = w2s[9 * k + d], wl[d] = w2s[9 * kl + d];
          const float t2 = aff[k], t2b = aff[kl];
          const float* hk = h1 + r * g.ldh1 + j;
          const float* hl = hk + nh2 * g.ldh1;
          // window columns j .. j + 3 (column j + 3 exists only for a full pair)
          auto ld = [&](const float* row, float& v0, float& v1, float& v2, float& v3) {
            if constexpr (even) {
              const Pair<float> p = *reinterpret_cast<const Pair<float>*>(row);
              const Pair<float> q = *reinterpret_cast<const Pair<float>*>(row + 2);
              v0 = p.a, v1 = p.b, v2 = q.a, v3 = q.b;
            } else {
              v0 = row[0], v1 = row[1], v2 = row[2];
              v3 = two ? row[3] : 0.0f;
            }
          };
          float a0, a1, a2, a3, b0, b1, b2, b3;  // channel k's window rows i, i + 1
          float e0, e1, e2, e3, f0, f1, f2, f3;  // channel k + nh2's
          ld(hk + i0 * hwi, a0, a1, a2, a3);
          ld(hk + (i0 + 1) * hwi, b0, b1, b2, b3);
          ld(hl + i0 * hwi, e0, e1, e2, e3);
          ld(hl + (i0 + 1) * hwi, f0, f1, f2, f3);
          // window row i + 2 and output row i of both channels, stepped per row (one add each)
          const float *rk = hk + (i0 + 2) * hwi, *rl = hl + (i0 + 2) * hwi;
          T *ok = out + i0 * ewi, *ol = out2 + i0 * ewi;
#pragma unroll
          for (int ii = 0; ii < kDwRows; ++ii) {  // unrolled: the window moves are register renames
            if (i0 + ii >= i1) break;
            float c0, c1, c2, c3, g0, g1, g2, g3;
            ld(rk, c0, c1, c2, c3);
            ld(rl, g0, g1, g2, g3);
            // t2 first: 9 FFMA per output, no separate add
            const float v = t2 + wk[0] * a0 + wk[1] * a1 + wk[2] * a2 + wk[3] * b0 + wk[4] * b1 + wk[5] * b2 +
                            wk[6] * c0 + wk[7] * c1 + wk[8] * c2;
            const float u = t2 + wk[0] * a1 + wk[1] * a2 + wk[2] * a3 + wk[3] * b1 + wk[4] * b2 + wk[5] * b3 +
                            wk[6] * c1 + wk[7] * c2 + wk[8] * c3;
            const float v2 = t2b + wl[0] * e0 + wl[1] * e1 + wl[2] * e2 + wl[3] * f0 + wl[4] * f1 + wl[5] * f2 +
                             wl[6] * g0 + wl[7] * g1 + wl[8] * g2;
            const float u2 = t2b + wl[0] * e1 + wl[1] * e2 + wl[2] * e3 + wl[3] * f1 + wl[4] * f2 + wl[5] * f3 +
                             wl[6] * g1 + wl[7] * g2 + wl[8] * g3;
            put(ok, 0, mma::relu6(v), mma::relu6(u));
            put(ol, 0, mma::relu6(v2), mma::relu6(u2));
            rk += hwi, rl += hwi, ok += ewi, ol += ewi;
            a0 = b0, a1 = b1, a2 = b2, a3 = b3;
            b0 = c0, b1 = c1, b2 = c2, b3 = c3;
            e0 = f0, e1 = f1, e2 = f2, e3 = f3;
            f0 = g0, f1 = g1, f2 = g2, f3 = g3;
          }
          if (!real2)
            for (int i = i0; i < i1; ++i) put(out2, i, 0.0f, 0.0f);
        }
      };
      if (ewi % 2 == 0) {
        dw(std::true_type{});
      } else {
        dw(std::false_type{});
      }
      __syncthreads();  // H2 complete (and H1 free for the next stage's pw1)
      // pw2, per 16-channel block s of the stage: this warp's accumulator tiles += W3'[:, block] H2[block];
      // the W3' fragments are loaded (and split) again only when the tile's row block m changes (never
      // with per > 0)
      // this warp's tiles (per > 0: m0 = warp % mt3, n = n0 + i; else warp + kWarps * i = n * mt3 + m): the
      // first one's (m0, n0) and the step (dm, dn), divisions once per stage, not per tile (here rather than
      // before the tile loop: no registers held across the stages, which spilled). Warps without tiles skip
      // it (warp-uniform), so the first tile's loads are unconditional (ptxas then computes the lanes'
      // fragment offsets once). Copies of the loop: with per > 0 (a warp's tiles all in one row block) one
      // per tile count kTiles = mine, which loads W3' once and every H2 fragment unconditionally; else
      // (kTiles = 0) one that guards the tiles and reloads W3' when the row block changes
      if constexpr (kSingle) {  // one stage: the accumulators zeroed only now (no registers during pw1)
#pragma unroll
        for (int i = 0; i < kMaxAccTiles; ++i)
          if (i < mine) mma::fill(acc[i], 0.0f);
      }
      const int m0 = warp % mt3, n0 = per ? warp / mt3 * per : warp / mt3;
      const int dm = per ? 0 : kWarps % mt3, dn = per ? 1 : kWarps / mt3;
      auto pw2 = [&](auto tiles) {
        constexpr int kTiles = decltype(tiles)::value;
        constexpr bool kUniform = kTiles > 0;
#pragma unroll 1
        for (int s = 0; s < nb; ++s) {
          const int ks = k0 + s * kChunk;
          const T* h2s = h2 + s * kChunk * g.ldh2;
          FragA a3[kChunk / K], a3lo[kChunk / K];
          int mprev = -1;
          int m = m0, n = n0;  // the warp's tile i, stepped without a division
#pragma unroll
          for (int i = 0; i < kMaxAccTiles; ++i) {
            if (i > 0) {
              if (kUniform ? i >= kTiles : i >= mine) continue;
              n += dn;
              if (!kUniform) {
                m += dm;
                if (m >= mt3) m -= mt3, ++n;
              }
            }
            if (i == 0 || (!kUniform && m != mprev)) {
#pragma unroll
              for (int f = 0; f < kChunk / K; ++f) {
                mma::load_shared(a3[f], w3s + m * 16 * g.ldw3 + ks + f * K, g.ldw3);
                mma::split_operand<scalar_t, kSplit>(a3[f], a3lo[f]);
              }
              mprev = m;
            }
#pragma unroll
            for (int f = 0; f < kChunk / K; ++f) {
              FragB b, blo;
              mma::load_shared(b, h2s + f * K * g.ldh2 + n * 16, g.ldh2);
              mma::split_operand<scalar_t, kSplit>(b, blo);
              mma::multiply_accumulate_split<scalar_t, kSplit>(acc[i], a3[f], a3lo[f], b, blo);
            }
          }
        }
      };
      static_assert(kMaxAccTiles == 4, "pw2 is instantiated for 1..4 tiles per warp");
      if (per == 0) {
        if (mine > 0) pw2(std::integral_constant<int, 0>{});
      } else if (mine == 4) {
        pw2(std::integral_constant<int, 4>{});
      } else if (mine == 3) {
        pw2(std::integral_constant<int, 3>{});
      } else if (mine == 2) {
        pw2(std::integral_constant<int, 2>{});
      } else if (mine == 1) {
        pw2(std::integral_constant<int, 1>{});
      }
      // the next stage's pw1 writes H1 (not read here) and its dw writes H2 only after a barrier
    };
    if (g.m1 <= g.hc) {
      stage(0, std::true_type{});
    } else {
      for (int k0 = 0; k0 < g.m1; k0 += g.hc) stage(k0, std::false_type{});
    }
    // Y through shared memory (H1's space: its last reader, the dw, finished before the last stage's second
    // barrier), no barrier: each warp stores its own accumulator tiles (disjoint 16x16 blocks of Y) and
    // writes them out itself, y = Y + t3: lanes along the tile's 16 pixels, the two
    // half-warps on rows r and r + 2 of the tile, rounds past Cout skipped (warp-uniform). ldy = 8 mod 32
    // words makes both the fragment stores and these reads conflict-free. The tile's row block and column
    // tile, and a lane's pixel p of the tile (row p / ewi, column p % ewi: image offset (tr0 + i) W + tc0 + j),
    // by float-reciprocal divisions (div_small; the reciprocals computed here through mma::opaque, not hoisted
    // out of the tile loop: a register held across the stages spilled); per round (rows 4j and 4j + 1 of the
    // half-warp's base row 2 hr) the output address stepped by a 64-bit pointer add per row pair, Y's and t3's
    // offsets from a compile-time row: an LDS pair, FADD, a predicated STG and the row test, ~10 instructions
    // (results/2026-12-01-cpu/sass_counts_46285b6.txt; 23 with a branch around each store before)
    const float inv_mt3 = 1.0f / mma::opaque(static_cast<float>(mt3));
    const float inv_ew = 1.0f / mma::opaque(static_cast<float>(ewi));
    // the warp's tile i: its row block m and column tile n
    auto tile_mn = [&](int i, int& m, int& n) {
      const int tile = per ? warp : warp + kWarps * i, tq = div_small(tile, inv_mt3);  // (per = 0: tile / mt3)
      m = tile - tq * mt3, n = per ? tq * per + i : tq;
    };
    // every accumulator tile to Y first (their registers free for the write-out, which then needs no spills)
#pragma unroll
    for (int i = 0; i < kMaxAccTiles; ++i) {
      if (i >= mine) continue;
      int m, n;
      tile_mn(i, m, n);
      mma::store_shared(ys + m * 16 * g.ldy + n * 16, acc[i], g.ldy);
    }
    __syncwarp();
    const int64_t hw = plane;  // H * W (the tile loop's 32-bit copy)
#pragma unroll 1
    for (int i = 0; i < mine; ++i) {
      int m, n;
      tile_mn(i, m, n);
      const int px = lane % 16, p = n * 16 + px, hr = lane / 16;
      const bool pin = p < tpi;
      const int rows = co - m * 16 - 2 * hr;  // this half-warp's rows r0 < rows exist
      const float* yr = ys + (m * 16 + 2 * hr) * g.ldy + n * 16 + px;
      const float* t3 = aff + nh + m * 16 + 2 * hr;
      // rows 4j and 4j + 1 of this half-warp at q0 and q1, both stepped by 4 rows; Y and t3 read for rows up to
      // m3 (inside Y's and the shared layout's space; values past Cout are never stored)
      const int pi = div_small(p, inv_ew), yo = pin ? (tr0 + pi) * wi + tc0 + (p - pi * ewi) : 0;
      scalar_t* q0 = yb + int64_t{m * 16 + 2 * hr} * hw + yo;
      scalar_t* q1 = q0 + hw;
#pragma unroll
      for (int j = 0; j < 4; ++j, q0 += 4 * hw, q1 += 4 * hw) {
        if (m * 16 + 4 * j >= co) break;  // warp-uniform: no row of this pair or the next in either half
        mma::store_if(pin && 4 * j < rows, q0, yr[4 * j * g.ldy] + t3[4 * j]);
        mma::store_if(pin && 4 * j + 1 < rows, q1, yr[(4 * j + 1) * g.ldy] + t3[4 * j + 1]);
      }
    }
    // the next tile's first barrier keeps its pw1 (which overwrites Y) behind every warp's reads of Y
  }
}

// ------------------------------------------------------------------------------------------------
// backward
// ------------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) meta_backward_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x, const scalar_t* __restrict__ weight,
    const at::opmath_type<scalar_t>* __restrict__ wglobal, at::opmath_type<scalar_t>* __restrict__ gwglobal,
    const scalar_t* __restrict__ scale, const scalar_t* __restrict__ shift, scalar_t* __restrict__ grad_weight,
    at::opmath_type<scalar_t>* __restrict__ partial, at::opmath_type<scalar_t>* __restrict__ gxbuf, int64_t Cin,
    int64_t hid, int64_t Cout, int64_t H, int64_t W, int64_t gh, int64_t gw, int64_t th, int64_t tw,
    bool weights_in_smem) {
  using acc_t = at::opmath_type<scalar_t>;
  PYSEG_DYNAMIC_SMEM(smem_raw);
  const WeightLayout L{Cin, hid, Cout};
  const int64_t N = L.numel(), G = gh * gw, A = L.affine_numel();
  const int64_t item = blockIdx.x;
  const DevPatch P(item, gh, gw, H, W);
  const int64_t PH = meta::max_patch_size(H, gh), PW = meta::max_patch_size(W, gw);
  Carve<acc_t> cv{reinterpret_cast<acc_t*>(smem_raw)};
  const acc_t* w;
  acc_t* gwacc;
  if (weights_in_smem) {
    acc_t* ws = cv.take(N);
    stage_weights(weight, N, G, P.b, P.patch, ws);
    w = ws;
    gwacc = cv.take(N);
  } else {
    w = wglobal + item * N;
    gwacc = gwglobal + item * N;
  }
  acc_t* part = cv.take(2 * A);  // [sum g*z (A) | sum g (A)]
  const int64_t HQ = (th + 2) * (tw + 2), TP = th * tw;
  acc_t* xh = cv.take(Cin * HQ);
  acc_t* z1 = cv.take(hid * HQ);
  acc_t* g1 = cv.take(hid * HQ);
  acc_t* z2 = cv.take(hid * TP);
  acc_t* g2 = cv.take(hid * TP);
  acc_t* z3 = cv.take(Cout * TP);
  acc_t* g3 = cv.take(Cout * TP);
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) gwacc[n] = acc_t(0);
  for (int64_t n = threadIdx.x; n < 2 * A; n += blockDim.x) part[n] = acc_t(0);
  acc_t* gxb = gxbuf ? gxbuf + item * Cin * (PH + 2) * (PW + 2) : nullptr;

  for (int64_t t = 0; t < div_up(P.ph, th) * div_up(P.pw, tw); ++t) {
    const auto [eh, ew, tr0, tc0, hw, hq, tp] = patch_tile(P, th, tw, t);
    __syncthreads();
    load_tile(x, P.b, Cin, H, W, tr0, tc0, eh, ew, xh);
    __syncthreads();
    // z1 = W1 xh (pre-affine)
    for (int64_t idx = threadIdx.x; idx < hid * hq; idx += blockDim.x) {
      const int64_t k = idx / hq, q = idx % hq;
      const acc_t* w1 = w + L.w1() + k * Cin;
      acc_t acc = 0;
      for (int64_t c = 0; c < Cin; ++c) acc += w1[c] * xh[c * hq + q];
      z1[idx] = acc;
    }
    __syncthreads();
    // z2 = dw(relu6(affine1(z1)))
    for (int64_t idx = threadIdx.x; idx < hid * tp; idx += blockDim.x) {
      const int64_t k = idx / tp, p = idx % tp, i = p / ew, j = p % ew;
      const acc_t s = static_cast<acc_t>(scale[L.a1() + k]), sh = static_cast<acc_t>(shift[L.a1() + k]);
      const acc_t* w2 = w + L.w2() + 9 * k;
      const acc_t* zk = z1 + k * hq + i * hw + j;
      acc_t acc = 0;
#pragma unroll
      for (int d = 0; d < 9; ++d) acc += w2[d] * meta::relu6(zk[(d / 3) * hw + d % 3] * s + sh);
      z2[idx] = acc;
    }
    __syncthreads();
    // z3 = W3 relu6(affine2(z2)); g3 = grad_out
    for (int64_t idx = threadIdx.x; idx < Cout * tp; idx += blockDim.x) {
      const int64_t o = idx / tp, p = idx % tp;
      const acc_t* w3 = w + L.w3() + o * hid;
      acc_t acc = 0;
      for (int64_t k = 0; k < hid; ++k)
        acc += w3[k] * meta::relu6(z2[k * tp + p] * static_cast<acc_t>(scale[L.a2() + k]) +
                                   static_cast<acc_t>(shift[L.a2() + k]));
      z3[idx] = acc;
      g3[idx] = static_cast<acc_t>(grad_out[((P.b * Cout + o) * H + tr0 + p / ew) * W + tc0 + p % ew]);
    }
    __syncthreads();
    // stage-3 affine partials (one thread per channel, fixed order), then g3 <- s3 * g3
    affine_partials(g3, z3, Cout, tp, scale, L.a3(), A, part);
    __syncthreads();
    // grad W3 (owned entries) and g2 = relu6'(u2) * W3^T g3
    for (int64_t idx = threadIdx.x; idx < Cout * hid; idx += blockDim.x) {
      const int64_t o = idx / hid, k = idx % hid;
      const acc_t s = static_cast<acc_t>(scale[L.a2() + k]), sh = static_cast<acc_t>(shift[L.a2() + k]);
      acc_t acc = 0;
      for (int64_t p = 0; p < tp; ++p) acc += g3[o * tp + p] * meta::relu6(z2[k * tp + p] * s + sh);
      gwacc[L.w3() + idx] += acc;
    }
    for (int64_t idx = threadIdx.x; idx < hid * tp; idx += blockDim.x) {
      const int64_t k = idx / tp, p = idx % tp;
      acc_t acc = 0;
      for (int64_t o = 0; o < Cout; ++o) acc += w[L.w3() + o * hid + k] * g3[o * tp + p];
      const acc_t u = z2[idx] * static_cast<acc_t>(scale[L.a2() + k]) + static_cast<acc_t>(shift[L.a2() + k]);
      g2[idx] = meta::relu6_passes(u) ? acc : acc_t(0);
    }
    __syncthreads();
    affine_partials(g2, z2, hid, tp, scale, L.a2(), A, part);
    __syncthreads();
    // grad W2 (owned entries) and g1 = relu6'(u1) * (full correlation of g2 with W2)
    for (int64_t idx = threadIdx.x; idx < hid * 9; idx += blockDim.x) {
      const int64_t k = idx / 9, d = idx % 9, di = d / 3, dj = d % 3;
      const acc_t s = static_cast<acc_t>(scale[L.a1() + k]), sh = static_cast<acc_t>(shift[L.a1() + k]);
      acc_t acc = 0;
      for (int64_t p = 0; p < tp; ++p) {
        const int64_t i = p / ew, j = p % ew;
        acc += g2[k * tp + p] * meta::relu6(z1[k * hq + (i + di) * hw + j + dj] * s + sh);
      }
      gwacc[L.w2() + idx] += acc;
    }
    for (int64_t idx = threadIdx.x; idx < hid * hq; idx += blockDim.x) {
      const int64_t k = idx / hq, q = idx % hq, a = q / hw, bb = q % hw;
      const acc_t* w2 = w + L.w2() + 9 * k;
      acc_t acc = 0;
#pragma unroll
      for (int d = 0; d < 9; ++d) {
        const int64_t i = a - d / 3, j = bb - d % 3;
        if (i >= 0 && i < eh && j >= 0 && j < ew) acc += w2[d] * g2[k * tp + i * ew + j];
      }
      const acc_t u = z1[idx] * static_cast<acc_t>(scale[L.a1() + k]) + static_cast<acc_t>(shift[L.a1() + k]);
      g1[idx] = meta::relu6_passes(u) ? acc : acc_t(0);
    }
    __syncthreads();
    affine_partials(g1, z1, hid, hq, scale, L.a1(), A, part);
    __syncthreads();
    // grad W1 (owned entries) and the haloed grad_x of this tile, added into the patch buffer
    for (int64_t idx = threadIdx.x; idx < hid * Cin; idx += blockDim.x) {
      const int64_t k = idx / Cin, c = idx % Cin;
      acc_t acc = 0;
      for (int64_t q = 0; q < hq; ++q) acc += g1[k * hq + q] * xh[c * hq + q];
      gwacc[L.w1() + idx] += acc;
    }
    if (gxb) {
      for (int64_t idx = threadIdx.x; idx < Cin * hq; idx += blockDim.x) {
        const int64_t c = idx / hq, q = idx % hq, a = q / hw, bb = q % hw;
        acc_t acc = 0;
        for (int64_t k = 0; k < hid; ++k) acc += w[L.w1() + k * Cin + c] * g1[k * hq + q];
        gxb[(c * (PH + 2) + tr0 - P.r0 + a) * (PW + 2) + tc0 - P.c0 + bb] += acc;
      }
    }
  }
  // No barrier needed: every gwacc/part entry but the W1 block was final before the last barrier in
  // the loop, and W1 entry n (L.w1() == 0) is accumulated and stored by the same thread n % blockDim.
  if (grad_weight) {
    scalar_t* dst = grad_weight + P.b * N * G + P.patch;
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) dst[n * G] = static_cast<scalar_t>(gwacc[n]);
  }
  if (partial) {
    for (int64_t n = threadIdx.x; n < 2 * A; n += blockDim.x) partial[item * 2 * A + n] = part[n];
  }
}

// grad_x[b, c, r, col] = sum of the haloed buffers of every patch that read (r, col), fixed order.
template <typename scalar_t>
__global__ void gather_grad_x_kernel(const at::opmath_type<scalar_t>* __restrict__ gxbuf,
                                     scalar_t* __restrict__ gx, int64_t B, int64_t Cin, int64_t H, int64_t W,
                                     int64_t gh, int64_t gw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = B * Cin * H * W;
  const int64_t PH = meta::max_patch_size(H, gh), PW = meta::max_patch_size(W, gw);
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t col = idx % W, r = (idx / W) % H, c = (idx / (W * H)) % Cin, b = idx / (W * H * Cin);
    int64_t rc[meta::kMaxHaloReaders], ro[meta::kMaxHaloReaders], cc[meta::kMaxHaloReaders],
        co[meta::kMaxHaloReaders];
    const int nr = meta::halo_readers(r, H, gh, rc, ro);
    const int nc = meta::halo_readers(col, W, gw, cc, co);
    acc_t acc = 0;
    for (int u = 0; u < nr; ++u)
      for (int v = 0; v < nc; ++v)
        acc += gxbuf[((((b * gh + rc[u]) * gw + cc[v]) * Cin + c) * (PH + 2) + ro[u]) * (PW + 2) + co[v]];
    gx[idx] = static_cast<scalar_t>(acc);
  }
}

}  // namespace
}  // namespace pyseg
