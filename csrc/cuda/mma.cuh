// Tensor-core matrix multiply-accumulate for the kernels of csrc/cuda, through nvcuda::wmma (fp16/bf16) and, for
// float's tf32 tiles, PTX ldmatrix / mma.sync with their documented lane layout: <mma.h> and inline PTX with
// nvcc, the CUDA emulator's csrc/emu/wmma.h with the host compiler (which checks that every call is
// warp-collective and runs wmma with a lane mapping the code cannot rely on, the PTX instructions with theirs).
//
//   mma::Operand<scalar_t>   the tensor-core operand of a tensor's scalar type: c10::Half -> __half and
//                            c10::BFloat16 -> __nv_bfloat16 (k = 16), float -> precision::tf32 (k = 8)
//   mma::operand_ptr(p)      a scalar_t pointer as a pointer to Operand's memory type (same bits)
//   mma::round_operand<S>(f) rounds a loaded tf32 operand fragment to nearest (cvt.rna); no-op for 16-bit S
//   mma::multiply_accumulate<S, kSplit>(acc, a, b)   acc += a b: one product, or 3xTF32 (kSplit 3, float)
//   mma::load_shared(f, p, ldm)  wmma::load_matrix_sync of an operand in shared memory (PTX .shared loads)
//   mma::load_shared_acc(c, p, ldm)  the same for a row-major float accumulator
//   mma::ldg_float(p)        a read-only global element as float through the read-only path (__ldg)
//   mma::ldg_bits(p)         its raw bits (mma::Bits<S>: 16 or 32 bits) through the same path
//   mma::split_operand<S, kSplit>(f, lo), mma::multiply_accumulate_split<S, kSplit>(acc, a, alo, b, blo):
//                            the same with the split done once per fragment (reused fragments)
//   mma::fill(c, v), mma::store_shared(p, c, ldm), mma::mma_tile(acc, a, b): wmma's fill_fragment,
//                            store_matrix_sync (row-major, shared memory) and mma_sync (acc += a b) for either
//                            kind of tile
//   mma::Tf32A / Tf32B / Tf32C  float's 16x16x8 tiles with PTX's documented lane layout (below): a product is two
//                            mma.sync.m16n8k8 (2 HMMA.1688, where wmma's tf32 m16n16k8 compiles to 4 HMMA.1684)
//   mma::fill_rows(c, v)     an explicit accumulator tile whose row r holds v[r] (Tf32C only: wmma's mapping is opaque)
//   mma::relu6(v)            min(max(v, 0), 6), NaN kept, in 2 instructions
//   mma::opaque(v)           v (a float or a pointer) through an asm the optimiser cannot see through: what is
//                            computed from it stays where it is written (not hoisted, not re-derived)
//   mma::lane_id()           the lane, read (%laneid) where it is called
//   mma::cp_async4_if(s, g, on), mma::cp_async_wait_all(): 4 bytes global -> shared by cp.async, and the wait
//   mma::store_if(p, q, v)   if (p) *q = v for a global tensor element, one predicated store
//
// Every call must be reached by all 32 lanes of a warp; pointers 256-bit aligned, ldm a multiple of 16 bytes.
// bf16 and tf32 tensor-core operations need sm_80 or newer (setup.py's default TORCH_CUDA_ARCH_LIST).
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <type_traits>

#include "cuda/runtime.cuh"

#ifdef PYSEG_CUDA_EMULATOR
#include "emu/wmma.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "pyseg's tensor-core kernels (bf16, tf32 wmma) need sm_80 or newer: set TORCH_CUDA_ARCH_LIST to 8.0+"
#endif
#endif

namespace pyseg {
namespace mma {

namespace wmma = nvcuda::wmma;

template <class S>
struct Operand;
template <>
struct Operand<c10::Half> {
  using type = __half;  // fragment type parameter
  using mem = __half;   // what load_matrix_sync reads
  static constexpr int k = 16;
};
template <>
struct Operand<c10::BFloat16> {
  using type = __nv_bfloat16;
  using mem = __nv_bfloat16;
  static constexpr int k = 16;
};
template <>
struct Operand<float> {
  using type = wmma::precision::tf32;
  using mem = float;
  static constexpr int k = 8;
};

template <class S>
__device__ __forceinline__ typename Operand<S>::mem* operand_ptr(S* p) {
  return reinterpret_cast<typename Operand<S>::mem*>(p);
}
template <class S>
__device__ __forceinline__ const typename Operand<S>::mem* operand_ptr(const S* p) {
  return reinterpret_cast<const typename Operand<S>::mem*>(p);
}

// v converted to a tensor-core operand's memory type M (float, __half, __nv_bfloat16). torch's CUDA builds
// define __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__, so the conversion intrinsics,
// not constructors, do it under nvcc; the emulator's types (c10::Half / c10::BFloat16) convert directly.
template <class M>
__device__ __forceinline__ M from_float(float v) {
#ifndef PYSEG_CUDA_EMULATOR
  if constexpr (std::is_same_v<M, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<M, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<M>(v);
  }
#else
  return static_cast<M>(v);
#endif
}

// ---- float's tensor-core tiles: 16x16x8 products with PTX's documented lane layout ----
// wmma's tf32 m16n16k8 product compiles (ptxas 13.0, sm_80+) to 4 HMMA.1684 (m16n8k4) and its fragments' lane
// mapping is unspecified; two mma.sync.m16n8k8 (HMMA.1688) do the same product in half the instructions, and
// their documented layout (PTX ISA, "Matrix fragments for mma.m16n8k8", .tf32) lets a kernel load operands with
// ldmatrix, start accumulators from per-row values and store accumulator pairs as 8-byte words. With
// g = lane / 4 and t = lane % 4 (the emulator, emu/wmma.h, implements the same layout):
//   Tf32A, 16 x 8 (rows m, depth k): x = {A[g][t], A[g + 8][t], A[g][t + 4], A[g + 8][t + 4]}
//   Tf32B, 8 x 16 (depth k, columns n), two 8-column halves h: x[2h + i] = B[t + 4i][8h + g]
//   Tf32C, 16 x 16 float accumulator: x[4h + 2i + j] = C[g + 8i][8h + 2t + j]
// Operands hold float bits; the tensor core reads them as tf32 (their low 13 mantissa bits ignored), so
// split_operand / round_operand prepare them as for wmma's fragments.
struct Tf32A {
  static constexpr int num_elements = 4;
  float x[4];
};
struct Tf32B {
  static constexpr int num_elements = 4;
  float x[4];
};
struct Tf32C {
  static constexpr int num_elements = 8;
  float x[8];
};

namespace detail {
struct alignas(8) F2 {
  float a, b;
};
// the lane from threadIdx (ptxas computes it once and reuses it: the tiles' lane offsets are hoisted out of
// their loops); mma::lane_id() below reads %laneid where it is called instead
__device__ __forceinline__ unsigned lane() { return static_cast<unsigned>(threadIdx.x) % 32u; }
}  // namespace detail

// acc += a b (one 16x16 tile product): wmma::mma_sync for wmma fragments, two mma.sync.m16n8k8 for Tf32 tiles
template <class FC, class FA, class FB>
__device__ __forceinline__ void mma_tile(FC& acc, const FA& a, const FB& b) {
  wmma::mma_sync(acc, a, b, acc);
}
__device__ __forceinline__ void mma_tile(Tf32C& acc, const Tf32A& a, const Tf32B& b) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#ifdef PYSEG_CUDA_EMULATOR
    emu::ptx::mma_m16n8k8_tf32(acc.x + 4 * h, a.x, b.x + 2 * h, acc.x + 4 * h);
#else
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(acc.x[4 * h]), "+f"(acc.x[4 * h + 1]), "+f"(acc.x[4 * h + 2]), "+f"(acc.x[4 * h + 3])
        : "r"(__float_as_uint(a.x[0])), "r"(__float_as_uint(a.x[1])), "r"(__float_as_uint(a.x[2])),
          "r"(__float_as_uint(a.x[3])), "r"(__float_as_uint(b.x[2 * h])), "r"(__float_as_uint(b.x[2 * h + 1])));
#endif
  }
}

// every element of an accumulator tile = v
template <class FC>
__device__ __forceinline__ void fill(FC& c, float v) {
  wmma::fill_fragment(c, v);
}
__device__ __forceinline__ void fill(Tf32C& c, float v) {
#pragma unroll
  for (int e = 0; e < Tf32C::num_elements; ++e) c.x[e] = v;
}

// row r of the tile = v[r] (v: 16 floats; two loads per lane)
__device__ __forceinline__ void fill_rows(Tf32C& c, const float* v) {
  const unsigned g = detail::lane() / 4;
  const float v0 = v[g], v1 = v[g + 8];
#pragma unroll
  for (int h = 0; h < 2; ++h) c.x[4 * h] = c.x[4 * h + 1] = v0, c.x[4 * h + 2] = c.x[4 * h + 3] = v1;
}

// the accumulator tile stored row-major at p (shared memory; ldm in floats): wmma::store_matrix_sync, or for
// Tf32C four 8-byte stores per lane (p 8-byte aligned, ldm even)
template <class FC>
__device__ __forceinline__ void store_shared(float* p, const FC& c, unsigned ldm) {
  wmma::store_matrix_sync(p, c, ldm, wmma::mem_row_major);
}
__device__ __forceinline__ void store_shared(float* p, const Tf32C& c, unsigned ldm) {
  const unsigned lane = detail::lane();
  float* q = p + (lane / 4) * ldm + 2 * (lane % 4);
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int i = 0; i < 2; ++i)
      *reinterpret_cast<detail::F2*>(q + 8 * i * ldm + 8 * h) = detail::F2{c.x[4 * h + 2 * i], c.x[4 * h + 2 * i + 1]};
}

// A (16 x 8, row-major at p in shared memory, ldm floats: rows 16-byte aligned) by one ldmatrix.x4: lane l
// names row l % 16 at column 4 (l / 16), i.e. the 8x4-float blocks (rows 0-7 | 8-15) x (columns 0-3 | 4-7)
// as its four 8x8 b16 matrices, whose word t of row g are exactly A's x[0..3]
__device__ __forceinline__ void load_shared(Tf32A& f, const float* p, unsigned ldm) {
  const unsigned lane = detail::lane();
  const float* row = p + (lane % 16) * ldm + 4 * (lane / 16);
  uint32_t* r = reinterpret_cast<uint32_t*>(f.x);
#ifdef PYSEG_CUDA_EMULATOR
  emu::ptx::ldmatrix_x4(r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(static_cast<unsigned>(__cvta_generic_to_shared(row))));
#endif
}

// B (8 x 16, row-major at p in shared memory, ldm floats) by four 4-byte loads per lane
__device__ __forceinline__ void load_shared(Tf32B& f, const float* p, unsigned ldm) {
  const unsigned lane = detail::lane();
  const float* q = p + (lane % 4) * ldm + lane / 4;
  f.x[0] = q[0];
  f.x[1] = q[4 * ldm];
  f.x[2] = q[8];
  f.x[3] = q[4 * ldm + 8];
}

// min(max(v, 0), 6) with NaN kept (as meta::relu6; the sign of a zero result may differ: max(-0, 0) = +0) in
// two instructions (PTX max.NaN / min.NaN, sm_80+: FMNMX.NAN) where the comparison form compiles to three
// (FSETP, FMNMX.NAN, FSEL)
__device__ __forceinline__ float relu6(float v) {
#ifdef PYSEG_CUDA_EMULATOR
  return v != v ? v : v < 0.0f ? 0.0f : v > 6.0f ? 6.0f : v;
#else
  float r;
  asm("max.NaN.f32 %0, %1, 0f00000000;\n\tmin.NaN.f32 %0, %0, 0f40C00000;" : "=f"(r) : "f"(v));
  return r;
#endif
}

// v, opaque to the optimiser: what is computed from it stays where it is written (ptxas would hoist a
// loop-invariant division out of a tile loop, holding its result in a register across the loop)
__device__ __forceinline__ float opaque(float v) {
#ifndef PYSEG_CUDA_EMULATOR
  asm volatile("" : "+f"(v));
#endif
  return v;
}

// if (p) *q = v (q: global memory, a tensor of scalar type S), as one predicated store (st.global under a
// predicate: no branch around it, which ptxas otherwise builds per guarded store: BSSY / BRA / BSYNC)
template <class S>
__device__ __forceinline__ void store_if(bool p, S* q, float v) {
#ifdef PYSEG_CUDA_EMULATOR
  if (p) *q = static_cast<S>(v);
#else
  if constexpr (std::is_same_v<S, float>) {
    asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %0, 0;\n\t@p st.global.f32 [%1], %2;\n\t}"
                 :
                 : "r"(static_cast<int>(p)), "l"(q), "f"(v)
                 : "memory");
  } else {
    using M = std::conditional_t<std::is_same_v<S, c10::Half>, __half, __nv_bfloat16>;
    const M h = from_float<M>(v);
    unsigned short b;
    memcpy(&b, &h, 2);
    asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %0, 0;\n\t@p st.global.b16 [%1], %2;\n\t}"
                 :
                 : "r"(static_cast<int>(p)), "l"(q), "h"(b)
                 : "memory");
  }
#endif
}

// A loaded matrix_a/matrix_b fragment of scalar type S: for float (tf32) its values rounded to nearest
// (the tensor core would drop the low 13 bits); 16-bit types unchanged.
template <class S, class Frag>
__device__ __forceinline__ void round_operand(Frag& f) {
  if constexpr (std::is_same_v<S, float>) {
#pragma unroll
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
  }
}

// v with its low 13 mantissa bits cleared: the tf32 value the tensor core reads from v's bits (one LOP3).
__device__ __forceinline__ float tf32_truncate(float v) {
#ifdef PYSEG_CUDA_EMULATOR
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u &= 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
#else
  return __uint_as_float(__float_as_uint(v) & 0xffffe000u);
#endif
}

// A loaded (unrounded) operand fragment of scalar type S prepared for multiply_accumulate_split: kSplit 1
// rounds f to its tensor-core type (tf32 for float, no-op for 16-bit S) and leaves lo untouched; kSplit 3
// (float only, "3xTF32"): hi = f truncated to tf32 (bit mask), lo = f - hi (exact in float, |lo| < 2^-10 |f|),
// lo left as a float: the tensor core reads only its top 10 mantissa bits (tf32 operands' low 13 bits are
// ignored; ptxas's own cvt.rna.tf32 on sm_80+ is "add half an ulp" without the mask for the same reason, and
// the emulator drops them too), i.e. lo truncated: 2 instructions per element (LOP3, FADD) instead of the
// ~7 of two cvt.rna.tf32 (each IADD + FSETP + SEL in SASS) and the mask that the subtraction needs.
// A split fragment can be reused for any number of products (the pw kernels keep one in registers across
// the column tiles of a warp).
template <class S, int kSplit, class F>
__device__ __forceinline__ void split_operand(F& f, F& lo) {
  static_assert(kSplit == 1 || (kSplit == 3 && std::is_same_v<S, float>), "3xTF32 is for float operands");
  if constexpr (kSplit == 3) {
#pragma unroll
    for (int i = 0; i < f.num_elements; ++i) {
      const float hi = tf32_truncate(f.x[i]);
      lo.x[i] = f.x[i] - hi;
      f.x[i] = hi;
    }
  } else {
    round_operand<S>(f);
  }
}

// acc += a b for split fragments (split_operand). kSplit 1: one tensor-core product (fp16/bf16 exact
// products; float as tf32, 10-bit mantissas; alo/blo unused). kSplit 3: acc += a_lo b_hi + a_hi b_lo +
// a_hi b_hi: per product a relative error below 3 * 2^-20 (~2.9e-6: the dropped a_lo b_lo term and the
// truncation of each lo, each < 2^-20; typically far less, the errors being of either sign across a sum),
// summed in float: close to float32 accuracy at three products.
template <class S, int kSplit, class FC, class FA, class FB>
__device__ __forceinline__ void multiply_accumulate_split(FC& acc, const FA& a, const FA& alo, const FB& b,
                                                          const FB& blo) {
  if constexpr (kSplit == 3) {
    mma_tile(acc, alo, b);
    mma_tile(acc, a, blo);
  }
  mma_tile(acc, a, b);
}

// acc += a b for loaded (unrounded) operand fragments of scalar type S (split, then multiplied; a and b
// are left split).
template <class S, int kSplit, class FC, class FA, class FB>
__device__ __forceinline__ void multiply_accumulate(FC& acc, FA& a, FB& b) {
  FA al;
  FB bl;
  split_operand<S, kSplit>(a, al);
  split_operand<S, kSplit>(b, bl);
  multiply_accumulate_split<S, kSplit>(acc, a, al, b, bl);
}

// load_shared(f, p, ldm): wmma::load_matrix_sync(f, p, ldm) for a row-major matrix_a / matrix_b fragment whose
// operand p points into shared memory. Under nvcc the load is PTX wmma.load with the .shared state space and a
// 32-bit shared address (__cvta_generic_to_shared): nvcuda::wmma's bf16 and tf32 loads take a generic address
// (ptxas 13.0 emits 4 generic LD.E per fragment with the lane's address rebuilt per load, S2R laneid included:
// benchmarks/sass_counts.py); this is LDS with the lane offset computed once. The fragment stays an opaque
// wmma fragment (its registers in load order, as wmma::load_matrix_sync leaves them). The emulator calls
// load_matrix_sync itself. p: 256-bit aligned, ldm (elements) a multiple of 16 bytes, as for load_matrix_sync.
// load_shared_acc(c, p, ldm): wmma::load_matrix_sync(c, p, ldm, wmma::mem_row_major) of a float accumulator
// fragment from shared memory, the same way (PTX wmma.load.c with .shared: LDS, no generic loads).
#ifdef PYSEG_CUDA_EMULATOR
template <class Frag, class M>
__device__ __forceinline__ void load_shared(Frag& f, const M* p, unsigned ldm) {
  wmma::load_matrix_sync(f, p, ldm);
}
template <class Frag>
__device__ __forceinline__ void load_shared_acc(Frag& f, const float* p, unsigned ldm) {
  wmma::load_matrix_sync(f, p, ldm, wmma::mem_row_major);
}
#else
namespace detail {
// the PTX load of one fragment type into its 32-bit registers r
template <class Frag>
struct LoadPtx;
#define PYSEG_MMA_REGS4 "{%0, %1, %2, %3}, [%4], %5;"
#define PYSEG_MMA_REGS8 "{%0, %1, %2, %3, %4, %5, %6, %7}, [%8], %9;"
#define PYSEG_MMA_OUT4(r) "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
#define PYSEG_MMA_OUT8(r) PYSEG_MMA_OUT4(r), "=r"(r[4]), "=r"(r[5]), "=r"(r[6]), "=r"(r[7])
#define PYSEG_MMA_LOAD_PTX(USE, AB, KD, TYPE, PTXTYPE, NREG)                                                  \
  template <>                                                                                                 \
  struct LoadPtx<wmma::fragment<wmma::USE, 16, 16, KD, TYPE, wmma::row_major>> {                              \
    static constexpr int regs = NREG;                                                                         \
    static __device__ __forceinline__ void load(uint32_t* r, unsigned a, unsigned ldm) {                      \
      asm volatile("wmma.load." AB ".sync.aligned.row.m16n16k" #KD ".shared." PTXTYPE " " PYSEG_MMA_REGS##NREG \
                   : PYSEG_MMA_OUT##NREG(r)                                                                   \
                   : "r"(a), "r"(ldm));                                                                       \
    }                                                                                                         \
  };
PYSEG_MMA_LOAD_PTX(matrix_a, "a", 8, wmma::precision::tf32, "tf32", 4)
PYSEG_MMA_LOAD_PTX(matrix_b, "b", 8, wmma::precision::tf32, "tf32", 4)
PYSEG_MMA_LOAD_PTX(matrix_a, "a", 16, __nv_bfloat16, "bf16", 4)
PYSEG_MMA_LOAD_PTX(matrix_b, "b", 16, __nv_bfloat16, "bf16", 4)
PYSEG_MMA_LOAD_PTX(matrix_a, "a", 16, __half, "f16", 8)
PYSEG_MMA_LOAD_PTX(matrix_b, "b", 16, __half, "f16", 8)
#define PYSEG_MMA_LOAD_C_PTX(KD)                                                                               \
  template <>                                                                                                 \
  struct LoadPtx<wmma::fragment<wmma::accumulator, 16, 16, KD, float>> {                                      \
    static constexpr int regs = 8;                                                                            \
    static __device__ __forceinline__ void load(uint32_t* r, unsigned a, unsigned ldm) {                      \
      asm volatile("wmma.load.c.sync.aligned.row.m16n16k" #KD ".shared.f32 " PYSEG_MMA_REGS8                  \
                   : PYSEG_MMA_OUT8(r)                                                                        \
                   : "r"(a), "r"(ldm));                                                                       \
    }                                                                                                         \
  };
PYSEG_MMA_LOAD_C_PTX(8)
PYSEG_MMA_LOAD_C_PTX(16)
#undef PYSEG_MMA_LOAD_C_PTX
#undef PYSEG_MMA_LOAD_PTX
#undef PYSEG_MMA_OUT8
#undef PYSEG_MMA_OUT4
#undef PYSEG_MMA_REGS8
#undef PYSEG_MMA_REGS4
}  // namespace detail

// volatile asm: ordered with the barriers that publish the operand (as CUTLASS's ldmatrix wrappers)
template <class Frag, class M>
__device__ __forceinline__ void load_shared(Frag& f, const M* p, unsigned ldm) {
  using L = detail::LoadPtx<Frag>;
  static_assert(sizeof(f.x) == 4 * L::regs, "fragment storage is not the PTX fragment's registers");
  L::load(reinterpret_cast<uint32_t*>(&f.x[0]), static_cast<unsigned>(__cvta_generic_to_shared(p)), ldm);
}
template <class Frag>
__device__ __forceinline__ void load_shared_acc(Frag& f, const float* p, unsigned ldm) {
  load_shared(f, p, ldm);
}
#endif

// *p, an element of a global tensor the kernel only reads, as float, through the read-only data path
// (__ldg: LDG.E.CONSTANT); the emulator reads it directly.
template <class S>
__device__ __forceinline__ float ldg_float(const S* p) {
#ifdef PYSEG_CUDA_EMULATOR
  return static_cast<float>(*p);
#else
  if constexpr (std::is_same_v<S, c10::Half>) {
    return __half2float(__ldg(reinterpret_cast<const __half*>(p)));
  } else if constexpr (std::is_same_v<S, c10::BFloat16>) {
    return __bfloat162float(__ldg(reinterpret_cast<const __nv_bfloat16*>(p)));
  } else {
    return static_cast<float>(__ldg(p));
  }
#endif
}

// The raw bits of an element of S (16 or 32 bits): copies of a tensor's elements that keep their type (the x
// tile: scalar_t in global memory, Operand<scalar_t>::mem, the same bits, in shared memory) need no conversion.
template <class S>
using Bits = std::conditional_t<sizeof(S) == 2, unsigned short, unsigned int>;

// The bits of *p (a global tensor the kernel only reads), through the read-only data path (LDG.E(.U16).CONSTANT)
template <class S>
__device__ __forceinline__ Bits<S> ldg_bits(const S* p) {
#ifdef PYSEG_CUDA_EMULATOR
  Bits<S> v;
  memcpy(&v, p, sizeof(v));
  return v;
#else
  return __ldg(reinterpret_cast<const Bits<S>*>(p));
#endif
}

// The calling thread's lane (%laneid: S2R, read where called; the emulator: threadIdx.x % 32)
__device__ __forceinline__ int lane_id() {
#ifdef PYSEG_CUDA_EMULATOR
  return static_cast<int>(threadIdx.x % 32);
#else
  int l;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(l));
  return l;
#endif
}

// p itself, through a PTX move the compiler cannot see through: a pointer computed once where it is called (a
// register pair), not re-derived from its parts at every use
template <class S>
__device__ __forceinline__ const S* opaque(const S* p) {
#ifndef PYSEG_CUDA_EMULATOR
  asm volatile("mov.b64 %0, %0;" : "+l"(p));
#endif
  return p;
}

// 4 bytes from global memory (a tensor the kernel only reads) to shared memory without a register, where `on`:
// one cp.async (LDGSTS) instead of an LDG and an STS; complete (for the calling thread) after cp_async_wait_all,
// for the block after a barrier behind that. The emulator copies at once.
__device__ __forceinline__ void cp_async4_if(void* smem, const void* gmem, bool on) {
#ifdef PYSEG_CUDA_EMULATOR
  if (on) memcpy(smem, gmem, 4);
#else
  const unsigned sa = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %2, 0;\n\t@p cp.async.ca.shared.global [%0], [%1], 4;\n\t}"
               :: "r"(sa), "l"(gmem), "r"(static_cast<int>(on)));
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#ifndef PYSEG_CUDA_EMULATOR
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// Elements of S in 16 bytes (one vector load / store).
template <class S>
constexpr int kVec = static_cast<int>(16 / sizeof(S));

// The kVec<S> elements at p (16-byte aligned, a global tensor the kernel only reads) as floats, by one 16-byte
// load through the read-only data path (LDG.E.128.CONSTANT); the emulator reads them directly.
template <class S>
__device__ __forceinline__ void ldg_vec(const S* p, float (&out)[kVec<S>]) {
#ifdef PYSEG_CUDA_EMULATOR
  for (int i = 0; i < kVec<S>; ++i) out[i] = static_cast<float>(p[i]);
#else
  if constexpr (std::is_same_v<S, float>) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 f;
      if constexpr (std::is_same_v<S, c10::Half>) {
        __half2 h;
        memcpy(&h, &w[i], 4);
        f = __half22float2(h);
      } else {
        __nv_bfloat162 h;
        memcpy(&h, &w[i], 4);
        f = __bfloat1622float2(h);
      }
      out[2 * i] = f.x, out[2 * i + 1] = f.y;
    }
  }
#endif
}

// v converted to M and stored at dst (16-byte aligned) by one 16-byte store.
template <class M, int N>
__device__ __forceinline__ void store_vec(M* dst, const float (&v)[N]) {
  static_assert(N * sizeof(M) == 16, "store_vec moves 16 bytes");
  struct alignas(16) Vec {
    M e[N];
  } t;
#pragma unroll
  for (int i = 0; i < N; ++i) t.e[i] = from_float<M>(v[i]);
  *reinterpret_cast<Vec*>(dst) = t;
}

// The 16x16 tiles of scalar type S with row-major operands: Tiles<S>::A / B / C (matrix_a, matrix_b, float
// accumulator), Tiles<S>::T the operands' memory type, Tiles<S>::K the depth of one product.
// float: the explicit tf32 tiles (Tf32A, Tf32B, Tf32C).
template <class S>
struct Tiles {
  using T = typename Operand<S>::mem;
  static constexpr int K = Operand<S>::k;
  using A = wmma::fragment<wmma::matrix_a, 16, 16, K, typename Operand<S>::type, wmma::row_major>;
  using B = wmma::fragment<wmma::matrix_b, 16, 16, K, typename Operand<S>::type, wmma::row_major>;
  using C = wmma::fragment<wmma::accumulator, 16, 16, K, float>;
};
template <>
struct Tiles<float> {
  using T = float;
  static constexpr int K = 8;
  using A = Tf32A;
  using B = Tf32B;
  using C = Tf32C;
};

}  // namespace mma
}  // namespace pyseg
