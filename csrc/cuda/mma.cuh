// Tensor-core matrix multiply-accumulate for the kernels of csrc/cuda, through nvcuda::wmma: <mma.h> with
// nvcc, the CUDA emulator's csrc/emu/wmma.h with the host compiler (which checks that every call is
// warp-collective and runs it with a lane mapping the code cannot rely on).
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
    wmma::mma_sync(acc, alo, b, acc);
    wmma::mma_sync(acc, a, blo, acc);
  }
  wmma::mma_sync(acc, a, b, acc);
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
template <class S>
struct Tiles {
  using T = typename Operand<S>::mem;
  static constexpr int K = Operand<S>::k;
  using A = wmma::fragment<wmma::matrix_a, 16, 16, K, typename Operand<S>::type, wmma::row_major>;
  using B = wmma::fragment<wmma::matrix_b, 16, 16, K, typename Operand<S>::type, wmma::row_major>;
  using C = wmma::fragment<wmma::accumulator, 16, 16, K, float>;
};

}  // namespace mma
}  // namespace pyseg
