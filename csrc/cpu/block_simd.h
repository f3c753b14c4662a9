// SIMD building blocks of the CPU block kernels (meta_block, pointwise_block): GEMM micro-kernels
// on GCC/Clang vector extensions and the per-patch weight gather.
//
// Included (through cpu/isa_dispatch.h) once per instruction set, each time inside its own
// namespace, so there is deliberately no include guard; PYSEG_VEC_BYTES is defined by the includer.
//
// Buffers hold one channel per row; rows are padded to a multiple of kNR columns so the GEMM
// micro-kernel needs no column tail. Padding columns hold stale values (zeros at first); every
// column of a GEMM is independent, so they never reach the valid columns, and all reductions stop
// at the valid width.

constexpr int64_t kNR = 16;  // columns of a GEMM micro-tile
constexpr int64_t kCacheLine = 64;  // bytes (prefetch stride)

// Native vector of T (GCC/Clang vector extension) of PYSEG_VEC_BYTES bytes, which the includer
// defines (16 for the baseline ISA, 32 under AVX2); loaded and stored unaligned, and allowed to
// alias the scalar buffers it is read from and written to.
template <typename T>
struct VecN {
  typedef T type __attribute__((vector_size(PYSEG_VEC_BYTES), aligned(sizeof(T)), may_alias));
  static constexpr int kLanes = PYSEG_VEC_BYTES / sizeof(T);
};

// out[i, 0:P) = sum_k A[i*lda + k] * in[k*ld + 0:P) for MR rows; P is a multiple of kNR. The
// MR x kNR accumulator tile stays in registers while k runs over the whole depth.
template <int MR, typename T>
inline void gemm_rows(const T* A, int64_t lda, const T* in, int64_t ld, T* out, int64_t K, int64_t P) {
  using V = typename VecN<T>::type;
  constexpr int NV = kNR / VecN<T>::kLanes;
  for (int64_t p = 0; p < P; p += kNR) {
    V acc[MR][NV];
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) acc[i][v] = V{};
    const T* col = in + p;
    for (int64_t k = 0; k < K; ++k, col += ld) {
      V r[NV];
      for (int v = 0; v < NV; ++v) r[v] = *reinterpret_cast<const V*>(col + v * VecN<T>::kLanes);
      for (int i = 0; i < MR; ++i) {
        const T a = A[i * lda + k];
        for (int v = 0; v < NV; ++v) acc[i][v] += a * r[v];
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(out + i * ld + p + v * VecN<T>::kLanes) = acc[i][v];
  }
}

// out (M, P) = A (M, K) @ in (K, P); A row-major with row stride lda, in/out with row stride ld.
// Row blocks of kMR: an MR x kNR accumulator tile takes MR * kNR / lanes vector registers, 12 of the 16
// that SSE and AVX2 have (one more for the loaded row, one for the broadcast).
template <typename T>
inline void gemm(const T* A, int64_t lda, const T* in, int64_t ld, T* out, int64_t M, int64_t K, int64_t P) {
  constexpr int kMR = 12 / (kNR / VecN<T>::kLanes);
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) gemm_rows<kMR>(A + m * lda, lda, in, ld, out + m * ld, K, P);
  if (M - m >= 4) {
    gemm_rows<4>(A + m * lda, lda, in, ld, out + m * ld, K, P);
    m += 4;
  }
  switch (M - m) {
    case 3: gemm_rows<3>(A + m * lda, lda, in, ld, out + m * ld, K, P); break;
    case 2: gemm_rows<2>(A + m * lda, lda, in, ld, out + m * ld, K, P); break;
    case 1: gemm_rows<1>(A + m * lda, lda, in, ld, out + m * ld, K, P); break;
    default: break;
  }
}

// The weight vectors of `cnt` consecutive patches p0.. of sample b: w[q*N + n] = weight[b, n, p0+q]
// (a blocked transpose: each weight plane is read in contiguous runs of cnt values).
template <typename scalar_t, typename acc_t>
inline void gather_weights(const scalar_t* weight, int64_t N, int64_t G, int64_t b, int64_t p0, int64_t cnt,
                           acc_t* w) {
  const scalar_t* src = weight + b * N * G + p0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t q = 0; q < cnt; ++q) w[q * N + n] = static_cast<acc_t>(src[n * G + q]);
}
