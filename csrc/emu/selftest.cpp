// Kernels with deliberate faults, for the tests of the CUDA emulator itself (tests/test_cuda_emulated.py):
// each shows that a class of CUDA bug is reported, or that the thread schedule exposes a race.
#ifndef PYSEG_CUDA_EMULATOR
#define PYSEG_CUDA_EMULATOR
#endif
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "cuda/mma.cuh"
#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

__global__ void early_exit_barrier_kernel(int* out) {
  if (threadIdx.x < 33) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void smem_offset_kernel(int* out, int offset, bool write) {
  PYSEG_DYNAMIC_SMEM(raw);
  if (threadIdx.x == 0) {
    if (write)
      raw[offset] = 1;
    else
      out[0] = raw[offset];
  }
}

__global__ void empty_kernel(int*) {}

__global__ void warp_exited_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x == 5) return;
  v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void warp_divergent_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 2)
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  else
    v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// flags[0..7]: shfl idx, up, down, xor, ballot, any, all, atomicAdd (all lanes must agree).
__global__ void warp_ops_kernel(int* flags) {
  __shared__ int counter;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (threadIdx.x == 0) counter = 0;
  __syncthreads();
  const double v = 10.0 * lane;
  const bool ok0 = __shfl_sync(0xffffffffu, v, 7) == 70.0;
  const bool ok1 = __shfl_up_sync(0xffffffffu, v, 3) == (lane >= 3 ? 10.0 * (lane - 3) : v);
  const bool ok2 = __shfl_down_sync(0xffffffffu, lane, 4, 8) == ((lane % 8) + 4 < 8 ? lane + 4 : lane);
  const bool ok3 = __shfl_xor_sync(0xffffffffu, lane, 5) == (lane ^ 5);
  const bool ok4 = __ballot_sync(0xffffffffu, lane % 3 == 0) == 0x49249249u;
  const bool ok5 = __any_sync(0xffffffffu, lane == 17) && !__any_sync(0xffffffffu, lane > 40);
  const bool ok6 = __all_sync(0xffffffffu, lane < 32) && !__all_sync(0xffffffffu, lane < 31);
  __syncwarp();
  atomicAdd(&counter, lane);
  __syncthreads();
  const bool ok7 = counter == 2 * 496;
  const bool ok[8] = {ok0, ok1, ok2, ok3, ok4, ok5, ok6, ok7};
  for (int i = 0; i < 8; ++i)
    if (!ok[i]) flags[i] = 0;
}

// Each thread publishes a value and reads its neighbour's; without the barrier the read races.
template <bool kBarrier>
__global__ void neighbour_kernel(int* out) {
  PYSEG_DYNAMIC_SMEM(raw);
  int* buf = reinterpret_cast<int*>(raw);
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  buf[t] = t + 1;
  if (kBarrier) __syncthreads();
  out[t] = buf[(t + 1) % n];
}

// Tensor cores: D = 2 * (A B) + C, one 16x16 (MxN) output tile per warp, A (M x K) and B (K x N) read in
// row- or column-major memory as the fragment layouts say, C and D in row- or column-major memory; the
// doubling and the addition of C are elementwise on the accumulator fragments (same mapping).
template <class S, int M, int N, class LA, class LB>
__global__ void wmma_gemm_kernel(const S* a, const S* b, const float* c, float* d, int rows, int cols, int depth,
                                 bool c_col) {
  using Op = mma::Operand<S>;
  namespace wmma = mma::wmma;
  constexpr int K = Op::k;
  constexpr bool a_col = std::is_same_v<LA, wmma::col_major>, b_col = std::is_same_v<LB, wmma::col_major>;
  const int warp = static_cast<int>(threadIdx.x / 32), tiles_n = cols / N;
  const int tile = static_cast<int>(blockIdx.x) * static_cast<int>(blockDim.x / 32) + warp;
  if (tile >= (rows / M) * tiles_n) return;  // whole warps only
  const int r0 = (tile / tiles_n) * M, c0 = (tile % tiles_n) * N;
  wmma::fragment<wmma::matrix_a, M, N, K, typename Op::type, LA> fa;
  wmma::fragment<wmma::matrix_b, M, N, K, typename Op::type, LB> fb;
  wmma::fragment<wmma::accumulator, M, N, K, float> acc, fc;
  wmma::fill_fragment(acc, 0.0f);
  for (int k0 = 0; k0 < depth; k0 += K) {
    // A(r, k) at a[r * depth + k] (row-major) or a[k * rows + r] (column-major); B likewise
    wmma::load_matrix_sync(fa, mma::operand_ptr(a) + (a_col ? k0 * rows + r0 : r0 * depth + k0), a_col ? rows : depth);
    wmma::load_matrix_sync(fb, mma::operand_ptr(b) + (b_col ? c0 * depth + k0 : k0 * cols + c0), b_col ? depth : cols);
    mma::round_operand<S>(fa);
    mma::round_operand<S>(fb);
    wmma::mma_sync(acc, fa, fb, acc);
  }
  const auto lay = c_col ? wmma::mem_col_major : wmma::mem_row_major;
  const int off = c_col ? c0 * rows + r0 : r0 * cols + c0, ld = c_col ? rows : cols;
  wmma::load_matrix_sync(fc, c + off, ld, lay);
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] = 2.0f * acc.x[i] + fc.x[i];
  wmma::store_matrix_sync(d + off, acc, ld, lay);
}

// float's explicit tf32 tiles (mma::Tf32A/B/C: ldmatrix.x4, mma.sync.m16n8k8 with PTX's lane layout): per warp
// one 16x16 tile of D = 2 (A B) + R, A (16 x depth) and B (depth x 16 cols) row-major copied to shared memory
// (A's rows with stride lda floats), the accumulator started from r by rows (R[i][j] = r[row0 + i]), stored to
// shared memory with mma::store_shared and copied out.
__global__ void tf32_tile_gemm_kernel(const float* a, const float* b, const float* r, float* d, int rows, int cols,
                                      int depth, int lda) {
  PYSEG_DYNAMIC_SMEM(smem_raw);
  float* as = reinterpret_cast<float*>(smem_raw);
  float* bs = as + rows * lda;
  float* ds = bs + depth * cols;
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  for (int i = tid; i < rows * depth; i += nt) as[(i / depth) * lda + i % depth] = a[i];
  for (int i = tid; i < depth * cols; i += nt) bs[i] = b[i];
  __syncthreads();
  const int warp = tid / 32, tiles_n = cols / 16;
  if (warp < (rows / 16) * tiles_n) {  // whole warps only
    const int r0 = (warp / tiles_n) * 16, c0 = (warp % tiles_n) * 16;
    mma::Tf32C acc;
    mma::fill_rows(acc, r + r0);
    for (int e = 0; e < acc.num_elements; ++e) acc.x[e] *= 0.5f;
    for (int k0 = 0; k0 < depth; k0 += 8) {
      mma::Tf32A fa;
      mma::Tf32B fb;
      mma::load_shared(fa, as + r0 * lda + k0, static_cast<unsigned>(lda));
      mma::load_shared(fb, bs + k0 * cols + c0, static_cast<unsigned>(cols));
      mma::round_operand<float>(fa);
      mma::round_operand<float>(fb);
      mma::mma_tile(acc, fa, fb);
    }
    for (int e = 0; e < acc.num_elements; ++e) acc.x[e] *= 2.0f;
    mma::store_shared(ds + r0 * cols + c0, acc, static_cast<unsigned>(cols));
  }
  __syncthreads();
  for (int i = tid; i < rows * cols; i += nt) d[i] = ds[i];
}

// Faulty uses of the tensor cores (each must be reported): kind 0 a lane exits before mma_sync, 1 lanes
// at different loads, 2 a lane passes another pointer, 3 a misaligned pointer, 4 ldm of 12 bytes.
__global__ void wmma_fault_kernel(const float* a, float* d, int kind) {
  namespace wmma = mma::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
  const int lane = static_cast<int>(threadIdx.x % 32);
  wmma::fill_fragment(acc, 0.0f);
  if (kind == 1 && lane % 2) {
    wmma::load_matrix_sync(fa, a, 16);
  } else {
    wmma::load_matrix_sync(fa, a + (kind == 2 && lane == 7 ? 8 : 0) + (kind == 3 ? 4 : 0), kind == 4 ? 3 : 16);
  }
  wmma::load_matrix_sync(fb, a, 16);
  if (kind == 0 && lane == 3) return;
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

// d = emulated tensor-core result of 2 * (a @ b) + c; a (M x K), b (K x N), c (M x N) as row-major tensors,
// passed to the kernel in the memory order given by the flags; shape "16x16", "32x8" or "8x32" (MxN).
at::Tensor wmma_gemm(at::Tensor a, at::Tensor b, at::Tensor c, bool a_col, bool b_col, bool c_col, std::string shape) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a.size(1) == b.size(0) && c.size(0) == a.size(0) &&
                  c.size(1) == b.size(1) && c.scalar_type() == at::kFloat && a.scalar_type() == b.scalar_type(),
              "wmma_gemm: bad shapes or types");
  const int rows = static_cast<int>(a.size(0)), cols = static_cast<int>(b.size(1)), depth = static_cast<int>(a.size(1));
  at::Tensor am = (a_col ? a.t() : a).contiguous(), bm = (b_col ? b.t() : b).contiguous();
  at::Tensor cm = (c_col ? c.t() : c).contiguous();
  at::Tensor d = at::full_like(cm, std::nanf(""));
  cudaStream_t s = gpu::stream();
  const int m = shape == "32x8" ? 32 : shape == "8x32" ? 8 : 16, n = 256 / m;
  TORCH_CHECK(rows % m == 0 && cols % n == 0, "wmma_gemm: sizes must be multiples of the tile");
  const int tiles = (rows / m) * (cols / n), blocks = (tiles + 1) / 2;
  auto run = [&](auto tag, auto la, auto lb) {
    using S = decltype(tag);
    using LA = decltype(la);
    using LB = decltype(lb);
    const S* ap = am.const_data_ptr<S>();
    const S* bp = bm.const_data_ptr<S>();
    if (m == 32) {
      if constexpr (!std::is_same_v<S, float>)
        PYSEG_LAUNCH(blocks, 64, 0, s, wmma_gemm_kernel<S, 32, 8, LA, LB>)(ap, bp, cm.const_data_ptr<float>(),
                                                                           d.mutable_data_ptr<float>(), rows, cols, depth, c_col);
    } else if (m == 8) {
      if constexpr (!std::is_same_v<S, float>)
        PYSEG_LAUNCH(blocks, 64, 0, s, wmma_gemm_kernel<S, 8, 32, LA, LB>)(ap, bp, cm.const_data_ptr<float>(),
                                                                           d.mutable_data_ptr<float>(), rows, cols, depth, c_col);
    } else {
      PYSEG_LAUNCH(blocks, 64, 0, s, wmma_gemm_kernel<S, 16, 16, LA, LB>)(ap, bp, cm.const_data_ptr<float>(),
                                                                         d.mutable_data_ptr<float>(), rows, cols, depth, c_col);
    }
  };
  TORCH_CHECK(m == 16 || a.scalar_type() != at::kFloat, "wmma_gemm: tf32 has only the 16x16 shape");
  auto with_layouts = [&](auto tag) {
    namespace wmma = mma::wmma;
    if (a_col && b_col) run(tag, wmma::col_major{}, wmma::col_major{});
    else if (a_col) run(tag, wmma::col_major{}, wmma::row_major{});
    else if (b_col) run(tag, wmma::row_major{}, wmma::col_major{});
    else run(tag, wmma::row_major{}, wmma::row_major{});
  };
  if (a.scalar_type() == at::kFloat) with_layouts(float{});
  else if (a.scalar_type() == at::kHalf) with_layouts(c10::Half{});
  else with_layouts(c10::BFloat16{});
  return c_col ? d.t() : d;
}

// d = 2 (a @ b) + r[:, None] on the emulated tensor cores through mma::Tf32A/B/C; a (M x K), b (K x N) float,
// row-major; lda: A's row stride in shared memory (floats; ldmatrix needs rows 16-byte aligned: a multiple of 4)
at::Tensor tf32_tile_gemm(at::Tensor a, at::Tensor b, at::Tensor r, int64_t lda) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && r.dim() == 1 && a.size(1) == b.size(0) && r.size(0) == a.size(0) &&
                  a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && r.scalar_type() == at::kFloat,
              "tf32_tile_gemm: bad shapes or types");
  const int rows = static_cast<int>(a.size(0)), cols = static_cast<int>(b.size(1)), depth = static_cast<int>(a.size(1));
  TORCH_CHECK(rows % 16 == 0 && cols % 16 == 0 && depth % 8 == 0 && lda >= depth, "tf32_tile_gemm: sizes");
  const int warps = (rows / 16) * (cols / 16);
  TORCH_CHECK(warps <= 32, "tf32_tile_gemm: at most 32 tiles");
  at::Tensor ac = a.contiguous(), bc = b.contiguous(), rc = r.contiguous();
  at::Tensor d = at::full({rows, cols}, std::nanf(""), a.options());
  const size_t smem = (static_cast<size_t>(rows) * lda + depth * cols + rows * cols) * sizeof(float);
  PYSEG_LAUNCH(1, 32 * warps, smem, gpu::stream(), tf32_tile_gemm_kernel)(
      ac.const_data_ptr<float>(), bc.const_data_ptr<float>(), rc.const_data_ptr<float>(), d.mutable_data_ptr<float>(),
      rows, cols, depth, static_cast<int>(lda));
  return d;
}

at::Tensor selftest(std::string kind) {
  at::Tensor out = at::zeros({1024}, at::kInt);
  int* o = out.mutable_data_ptr<int>();
  cudaStream_t s = gpu::stream();
  if (kind == "partial_barrier") {
    PYSEG_LAUNCH(1, 64, 0, s, early_exit_barrier_kernel)(o);
  } else if (kind == "divergent_barrier") {
    PYSEG_LAUNCH(1, 64, 0, s, divergent_barrier_kernel)(o);
  } else if (kind == "smem_overflow") {
    PYSEG_LAUNCH(1, 32, 256, s, smem_offset_kernel)(o, 256, false);
  } else if (kind == "smem_underflow") {
    PYSEG_LAUNCH(1, 32, 256, s, smem_offset_kernel)(o, -8, true);
  } else if (kind == "too_many_threads") {
    PYSEG_LAUNCH(1, 1025, 0, s, empty_kernel)(o);
  } else if (kind == "grid_y") {
    PYSEG_LAUNCH(dim3(1, 70000), 32, 0, s, empty_kernel)(o);
  } else if (kind == "smem_without_optin") {
    PYSEG_LAUNCH(1, 32, 64 * 1024, s, smem_offset_kernel)(o, 0, true);
  } else if (kind == "smem_over_optin") {
    gpu::allow_dynamic_smem(smem_offset_kernel, 240 * 1024);
  } else if (kind == "warp_exited_lane") {
    PYSEG_LAUNCH(1, 32, 0, s, warp_exited_kernel)(o);
  } else if (kind == "warp_divergent") {
    PYSEG_LAUNCH(1, 32, 0, s, warp_divergent_kernel)(o);
  } else if (kind.rfind("wmma_", 0) == 0) {
    const char* kinds[] = {"wmma_exited_lane", "wmma_divergent", "wmma_nonuniform", "wmma_misaligned", "wmma_ldm",
                           "wmma_partial_warp"};
    int k = 0;
    while (k < 6 && kind != kinds[k]) ++k;
    TORCH_CHECK(k < 6, "selftest: unknown kind ", kind);
    at::Tensor a = at::ones({1024}, at::kFloat), d = at::zeros({1024}, at::kFloat);
    PYSEG_LAUNCH(1, k == 5 ? 48 : 64, 0, s, wmma_fault_kernel)(a.const_data_ptr<float>(), d.mutable_data_ptr<float>(),
                                                               k == 5 ? 9 : k);
    return d.to(at::kInt);
  } else if (kind == "warp_ops") {
    out.fill_(1);
    PYSEG_LAUNCH(2, 64, 0, s, warp_ops_kernel)(o);
    return out.narrow(0, 0, 8);
  } else if (kind == "race") {
    PYSEG_LAUNCH(1, 64, 64 * sizeof(int), s, neighbour_kernel<false>)(o);
    return out.narrow(0, 0, 64);
  } else if (kind == "race_fixed") {
    PYSEG_LAUNCH(1, 64, 64 * sizeof(int), s, neighbour_kernel<true>)(o);
    return out.narrow(0, 0, 64);
  } else {
    TORCH_CHECK(false, "selftest: unknown kind ", kind);
  }
  return out;
}

}  // namespace
}  // namespace pyseg

TORCH_LIBRARY_FRAGMENT(pyseg_emu, m) {
  m.def("selftest(str kind) -> Tensor", &pyseg::selftest);
  m.def("wmma_gemm(Tensor a, Tensor b, Tensor c, bool a_col, bool b_col, bool c_col, str shape) -> Tensor",
        &pyseg::wmma_gemm);
  m.def("tf32_tile_gemm(Tensor a, Tensor b, Tensor r, int lda) -> Tensor", &pyseg::tf32_tile_gemm);
}
