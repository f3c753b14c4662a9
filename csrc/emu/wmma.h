// The CUDA emulator's nvcuda::wmma (tensor-core matrix multiply-accumulate), for the host compiler.
// csrc/cuda/mma.cuh includes it instead of <mma.h> when PYSEG_CUDA_EMULATOR is defined.
//
// What it emulates, and checks:
//  - Every call (fill_fragment, load_matrix_sync, store_matrix_sync, mma_sync) is warp-collective: all 32
//    lanes of the warp must reach the same call site (a lane that has exited, a partial warp or lanes at
//    different calls are errors, as for the shuffles), and load/store must get the same pointer, ldm and
//    layout in every lane. The memory accesses and the product happen once all lanes have arrived.
//  - The pointer must be 256-bit aligned and ldm a multiple of 16 bytes, as the CUDA guide requires.
//  - Which lane holds which element is a fixed permutation, different for matrix_a, matrix_b and the
//    accumulator and for row- and column-major operands, so code that assumes a mapping (or combines
//    x[] of fragments of different kinds) gives wrong results here. x[i] of fragments of one type share
//    the mapping, so elementwise operations between them work as on the GPU.
//  - Products are exact and accumulated in float in k order. tf32 operands: the tensor core reads
//    only the 10 high mantissa bits (the low 13 bits are dropped here); __float_to_tf32 rounds to nearest
//    (ties away from zero, cvt.rna.tf32.f32), so a kernel that converts its fragments gets the GPU's result.
// Shapes: m16n16k16, m32n8k16 and m8n32k16 for __half/__nv_bfloat16 with float accumulators, m16n16k8
// for precision::tf32.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emu/cuda_emu.h"

// CUDA's 16-bit types are the tensors' c10 types here (same bits; kernels reinterpret_cast between them).
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

namespace detail {

template <class Use, int M, int N, int K>
struct Dims;
template <int M, int N, int K>
struct Dims<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K, salt = 5;
};
template <int M, int N, int K>
struct Dims<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N, salt = 11;
};
template <int M, int N, int K>
struct Dims<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N, salt = 23;
};

template <class T>
struct Storage {
  using type = T;
};
template <>
struct Storage<precision::tf32> {
  using type = float;
};

template <class L>
constexpr int layout_salt() {
  return std::is_same_v<L, col_major> ? 13 : 0;
}

template <class Use, int M, int N, int K, class T>
constexpr bool valid() {
  constexpr bool mnk16 = (M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) ||
                         (M == 8 && N == 32 && K == 16);
  if constexpr (std::is_same_v<Use, accumulator>)
    return std::is_same_v<T, float> && (mnk16 || (M == 16 && N == 16 && K == 8));
  else if constexpr (std::is_same_v<T, precision::tf32>)
    return M == 16 && N == 16 && K == 8;
  else
    return (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) && mnk16;
}

// Tensor-core view of an operand element: 16-bit types exactly, tf32 with the low 13 bits dropped.
inline float operand(float v, bool tf32) {
  if (!tf32) return v;
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u &= 0xffffe000u;  // finite: keep 10 mantissa bits
  std::memcpy(&v, &u, 4);
  return v;
}

[[noreturn]] void fail(const char* what, const char* file, int line, const std::string& why);
void collective(void (*hook)(void* const* lanes), void* payload, const char* file, int line);

}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
  static_assert(detail::valid<Use, M, N, K, T>(), "CUDA emulator: unsupported wmma fragment (shape or type)");
  static_assert(std::is_same_v<Use, accumulator> == std::is_same_v<Layout, void>,
                "wmma: matrix_a/matrix_b fragments take row_major or col_major; accumulators no layout");

 public:
  using element_type = typename detail::Storage<T>::type;
  using D = detail::Dims<Use, M, N, K>;
  static constexpr int rows = D::rows, cols = D::cols;
  static constexpr int num_elements = rows * cols / 32;
  static constexpr bool tf32 = std::is_same_v<T, precision::tf32>;
  element_type x[num_elements];

  // Emulator: the (row, col) of element e of lane `lane` (a fixed permutation of the matrix).
  static void where(int lane, int e, int& r, int& c) {
    const int idx = e * 32 + ((7 * lane + 3 * e + D::salt + detail::layout_salt<Layout>()) & 31);
    r = idx / cols;
    c = idx % cols;
  }
};

inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) {  // finite: round to nearest, ties away from zero
    u += 0x1000u;
    u &= 0xffffe000u;
  }
  std::memcpy(&v, &u, 4);
  return v;
}

namespace detail {

template <class Frag, class V>
struct FillCall {
  Frag* frag;
  V value;
  static void hook(void* const* lanes) {
    for (int l = 0; l < 32; ++l) {
      auto* c = static_cast<FillCall*>(lanes[l]);
      for (int e = 0; e < Frag::num_elements; ++e) c->frag->x[e] = static_cast<typename Frag::element_type>(c->value);
    }
  }
};

// load (kStore false) or store of a fragment; `col` whether the memory is column-major.
template <class Frag, class P, bool kStore>
struct MoveCall {
  Frag* frag;
  P* ptr;
  unsigned ldm;
  bool col;
  const char* file;
  int line;
  static void hook(void* const* lanes) {
    const auto* c0 = static_cast<MoveCall*>(lanes[0]);
    const char* what = kStore ? "wmma::store_matrix_sync" : "wmma::load_matrix_sync";
    for (int l = 1; l < 32; ++l) {
      const auto* c = static_cast<MoveCall*>(lanes[l]);
      if (c->ptr != c0->ptr || c->ldm != c0->ldm || c->col != c0->col)
        fail(what, c0->file, c0->line, "lanes 0 and " + std::to_string(l) + " pass a different pointer, ldm or layout");
    }
    if (reinterpret_cast<uintptr_t>(c0->ptr) % 32 != 0)
      fail(what, c0->file, c0->line, "the pointer is not 256-bit (32-byte) aligned");
    if ((c0->ldm * sizeof(P)) % 16 != 0)
      fail(what, c0->file, c0->line, "ldm " + std::to_string(c0->ldm) + " is not a multiple of 16 bytes");
    const unsigned extent = c0->col ? Frag::rows : Frag::cols;
    if (c0->ldm < extent)
      fail(what, c0->file, c0->line, "ldm " + std::to_string(c0->ldm) + " is below the matrix's " +
                                         std::to_string(extent) + (c0->col ? " rows" : " columns"));
    for (int l = 0; l < 32; ++l) {
      auto* c = static_cast<MoveCall*>(lanes[l]);
      for (int e = 0; e < Frag::num_elements; ++e) {
        int r, k;
        Frag::where(l, e, r, k);
        const size_t off = c->col ? static_cast<size_t>(k) * c->ldm + r : static_cast<size_t>(r) * c->ldm + k;
        if constexpr (kStore)
          c->ptr[off] = static_cast<P>(c->frag->x[e]);
        else
          c->frag->x[e] = static_cast<typename Frag::element_type>(c->ptr[off]);
      }
    }
  }
};

template <class FD, class FA, class FB, class FC>
struct MmaCall {
  FD* d;
  const FA* a;
  const FB* b;
  const FC* c;
  static void hook(void* const* lanes) {
    constexpr int M = FA::rows, K = FA::cols, N = FB::cols;
    float A[M][K], B[K][N], C[M][N];
    for (int l = 0; l < 32; ++l) {
      const auto* call = static_cast<MmaCall*>(lanes[l]);
      int r, k;
      for (int e = 0; e < FA::num_elements; ++e) {
        FA::where(l, e, r, k);
        A[r][k] = operand(static_cast<float>(call->a->x[e]), FA::tf32);
      }
      for (int e = 0; e < FB::num_elements; ++e) {
        FB::where(l, e, r, k);
        B[r][k] = operand(static_cast<float>(call->b->x[e]), FB::tf32);
      }
      for (int e = 0; e < FC::num_elements; ++e) {
        FC::where(l, e, r, k);
        C[r][k] = call->c->x[e];
      }
    }
    float Dm[M][N];
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        float acc = C[i][j];
        for (int k = 0; k < K; ++k) acc = std::fma(A[i][k], B[k][j], acc);
        Dm[i][j] = acc;
      }
    for (int l = 0; l < 32; ++l) {
      auto* call = static_cast<MmaCall*>(lanes[l]);
      for (int e = 0; e < FD::num_elements; ++e) {
        int r, k;
        FD::where(l, e, r, k);
        call->d->x[e] = Dm[r][k];
      }
    }
  }
};

}  // namespace detail

template <class Use, int M, int N, int K, class T, class L, class V>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  using F = fragment<Use, M, N, K, T, L>;
  detail::FillCall<F, V> call{&f, v};
  detail::collective(&detail::FillCall<F, V>::hook, &call, file, line);
}

// matrix_a / matrix_b: the memory layout is the fragment's.
template <class Use, int M, int N, int K, class T, class L, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  static_assert(!std::is_same_v<Use, accumulator>, "wmma: an accumulator load needs a layout_t");
  static_assert(std::is_same_v<P, typename fragment<Use, M, N, K, T, L>::element_type>,
                "wmma: the pointer's type must be the fragment's element type");
  using F = fragment<Use, M, N, K, T, L>;
  detail::MoveCall<F, const P, false> call{&f, p, ldm, std::is_same_v<L, col_major>, file, line};
  detail::collective(&detail::MoveCall<F, const P, false>::hook, &call, file, line);
}

template <int M, int N, int K, class P>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const P* p, unsigned ldm, layout_t layout,
                      const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(std::is_same_v<P, float>, "wmma: float accumulators load from float");
  using F = fragment<accumulator, M, N, K, float>;
  detail::MoveCall<F, const P, false> call{&f, p, ldm, layout == mem_col_major, file, line};
  detail::collective(&detail::MoveCall<F, const P, false>::hook, &call, file, line);
}

template <int M, int N, int K, class P>
void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout,
                       const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(std::is_same_v<P, float>, "wmma: float accumulators store to float");
  using F = fragment<accumulator, M, N, K, float>;
  detail::MoveCall<const F, P, true> call{&f, p, ldm, layout == mem_col_major, file, line};
  detail::collective(&detail::MoveCall<const F, P, true>::hook, &call, file, line);
}

template <int M, int N, int K, class TA, class LA, class TB, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(std::is_same_v<TA, TB>, "wmma::mma_sync: matrix_a and matrix_b of different types");
  using FD = fragment<accumulator, M, N, K, float>;
  using Call = detail::MmaCall<FD, fragment<matrix_a, M, N, K, TA, LA>, fragment<matrix_b, M, N, K, TB, LB>, FD>;
  Call call{&d, &a, &b, &c};
  detail::collective(&Call::hook, &call, file, line);
}

}  // namespace wmma
}  // namespace nvcuda

// ---------------------------------------------------------------------------------------------
// PTX tensor-core instructions with a documented lane layout (csrc/cuda/mma.cuh's explicit tf32 tiles), for
// the host compiler. Both are warp-collective here as on the GPU (all 32 lanes at one call site).
//   ldmatrix_x4(r, row): ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8x8 matrices of 16-byte rows; lane
//     8 m + i names row i of matrix m (its address `row`, 16-byte aligned); lane l receives in r[m] the 32-bit
//     word l % 4 of row l / 4 of matrix m.
//   mma_m16n8k8_tf32(d, a, b, c): mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, d = A B + C with
//     g = lane / 4, t = lane % 4: a = {A[g][t], A[g + 8][t], A[g][t + 4], A[g + 8][t + 4]}, b = {B[t][g],
//     B[t + 4][g]}, c and d = {C[g][2t], C[g][2t + 1], C[g + 8][2t], C[g + 8][2t + 1]}; operands read as tf32
//     (the low 13 bits dropped), products exact, accumulated in float in k order.
// ---------------------------------------------------------------------------------------------
namespace pyseg {
namespace emu {
namespace ptx {

struct LdmatrixCall {
  uint32_t* r;
  const void* row;
  const char* file;
  int line;
  static void hook(void* const* lanes) {
    for (int l = 0; l < 32; ++l) {
      const auto* c = static_cast<const LdmatrixCall*>(lanes[l]);
      if (reinterpret_cast<uintptr_t>(c->row) % 16 != 0)
        nvcuda::wmma::detail::fail("ldmatrix", c->file, c->line,
                                   "lane " + std::to_string(l) + "'s row address is not 16-byte aligned");
    }
    for (int l = 0; l < 32; ++l) {
      auto* c = static_cast<LdmatrixCall*>(lanes[l]);
      for (int m = 0; m < 4; ++m) {
        const auto* src = static_cast<const LdmatrixCall*>(lanes[8 * m + l / 4]);
        std::memcpy(&c->r[m], static_cast<const unsigned char*>(src->row) + 4 * (l % 4), 4);
      }
    }
  }
};

inline void ldmatrix_x4(uint32_t* r, const void* row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  LdmatrixCall call{r, row, file, line};
  warp_collective(&LdmatrixCall::hook, &call, file, line);
}

struct MmaTf32Call {
  float* d;
  const float* a;
  const float* b;
  const float* c;
  static void hook(void* const* lanes) {
    float A[16][8], B[8][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const auto* k = static_cast<const MmaTf32Call*>(lanes[l]);
      const int g = l / 4, t = l % 4;
      for (int i = 0; i < 4; ++i) A[g + 8 * (i % 2)][t + 4 * (i / 2)] = nvcuda::wmma::detail::operand(k->a[i], true);
      for (int i = 0; i < 2; ++i) B[t + 4 * i][g] = nvcuda::wmma::detail::operand(k->b[i], true);
      for (int i = 0; i < 4; ++i) C[g + 8 * (i / 2)][2 * t + i % 2] = k->c[i];
    }
    for (int l = 0; l < 32; ++l) {
      auto* k = static_cast<MmaTf32Call*>(lanes[l]);
      const int g = l / 4, t = l % 4;
      for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float acc = C[row][col];
        for (int q = 0; q < 8; ++q) acc = std::fma(A[row][q], B[q][col], acc);
        k->d[i] = acc;
      }
    }
  }
};

// d may alias c (the call reads every lane's c before it writes any d)
inline void mma_m16n8k8_tf32(float* d, const float* a, const float* b, const float* c,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  MmaTf32Call call{d, a, b, c};
  warp_collective(&MmaTf32Call::hook, &call, file, line);
}

}  // namespace ptx
}  // namespace emu
}  // namespace pyseg
