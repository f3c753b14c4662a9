// Hierarchical multi-scale attention fusion, CUDA launchers (device code in hmsa_fuse_kernels.cuh).
// Forward: hmsa_fuse_tile_kernel, one block per (sample, output tile) running the recurrence on the
// ranges of each scale grid the tile reads, in shared memory, class by class (32 x 64 tiles, else
// 16 x 64, else 8 x 32: the largest the output holds whose plan fits 48 KB); the chain scales' stored
// logits are staged as they are (coalesced) and resampled from shared memory, the top one straight to
// the next grid (composite taps). Where even an 8 x 32 tile's ranges exceed 48 KB (an output far
// smaller than the 1.0 grid: a tile then reads most of it) the per-pixel stencil kernel
// (hmsa_fuse_kernel) runs instead. Labels keep a running argmax per pixel, so no per-scale or
// (B, C, out_h, out_w) intermediate exists. Backward (two-scale training form): three gather passes
// over CSR adjoint tables, one thread per pixel, no atomics (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/hmsa_fuse_host.h"
#include "cuda/hmsa_fuse_kernels.cuh"
#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

constexpr int THREADS = 256;
// dynamic shared memory of the tile kernel (no opt-in needed)
constexpr int64_t kHmsaTileSmem = 48 * 1024;

inline int blocks_for(int64_t n) {
  const int64_t b = (n + THREADS - 1) / THREADS;
  return static_cast<int>(b < 65535 * 64 ? (b > 0 ? b : 1) : 65535 * 64);
}

// The tile kernel's shared-memory plan for TH x TW output tiles: the largest range of each scale
// grid over all tiles (hmsa_axis_ranges per axis, the kernel's own computation), then the buffers
// (acc_t) and the tap tables. Returns false when it exceeds kHmsaTileSmem.
template <typename acc_t, typename scalar_t>
bool hmsa_tile_plan(const HmsaArgs<scalar_t>& A, int TH, int TW, HmsaTilePlan* P) {
  const int n = A.n, one = A.one;
  P->tiles_y = (A.out_h + TH - 1) / TH;
  P->tiles_x = (A.out_w + TW - 1) / TW;
  int64_t rh[HMSA_MAX_SCALES] = {0}, rw[HMSA_MAX_SCALES] = {0}, sh[HMSA_MAX_SCALES] = {0}, sw[HMSA_MAX_SCALES] = {0};
  // per axis: the largest grid range (r) and stored range (s, chain scales) of each scale over the tiles
  auto axis = [&](const int64_t* grid, const int64_t* stored, int64_t out, int T, int64_t tiles, int64_t* r,
                  int64_t* s) {
    int64_t lo[HMSA_MAX_SCALES], hi[HMSA_MAX_SCALES], slo, shi;
    for (int64_t t = 0; t < tiles; ++t) {
      hmsa_axis_ranges<acc_t>(grid, n, one, out, t * T, std::min<int64_t>(t * T + T, out) - 1, lo, hi);
      for (int k = 0; k < n; ++k) {
        r[k] = std::max(r[k], hi[k] - lo[k] + 1);
        if (k > one) continue;
        hmsa_storage_range<acc_t>(lo[k], hi[k], stored[k], grid[k], &slo, &shi);
        s[k] = std::max(s[k], shi - slo + 1);
      }
    }
  };
  axis(A.h, A.ph, A.out_h, TH, P->tiles_y, rh, sh);
  axis(A.w, A.pw, A.out_w, TW, P->tiles_x, rw, sw);
  int64_t vals = 0, ntaps = 0, ntaps4 = 0;
  auto take = [](int64_t* used, int64_t count) {
    const int64_t o = *used;
    *used += count;
    return static_cast<int>(std::min<int64_t>(o, 1 << 30));
  };
  auto clamp = [](int64_t v) { return static_cast<int>(std::min<int64_t>(v, 1 << 30)); };
  for (int k = 0; k < HMSA_MAX_SCALES; ++k) {
    P->rh[k] = k < n ? clamp(rh[k]) : 0;
    P->rw[k] = k < n ? clamp(rw[k]) : 0;
    P->sh[k] = k <= one ? clamp(sh[k]) : 0;
    P->sw[k] = k <= one ? clamp(sw[k]) : 0;
    P->stor[k] = P->buf[k] = P->att[k] = P->gate[k] = P->ry[k] = P->rx[k] = P->ty[k] = P->tx[k] = -1;
  }
  for (int k = 0; k < n; ++k) {
    if (k <= one) P->stor[k] = take(&vals, sh[k] * sw[k]);
    if ((k >= 1 && k < one) || k > one) P->buf[k] = take(&vals, rh[k] * rw[k]);  // levels; a_l * p_l
    if (k >= 1) P->att[k] = take(&vals, rh[k] * rw[k]);
    if (k > one) P->gate[k] = take(&vals, rh[one] * rw[one]);
  }
  P->fin = take(&vals, rh[one] * rw[one]);
  P->tap_bytes = (vals * static_cast<int64_t>(sizeof(acc_t)) + 15) / 16 * 16;
  P->fy = take(&ntaps, TH);
  P->fx = take(&ntaps, TW);
  for (int k = (one > 0 ? 1 : 0); k <= one; ++k) {
    P->ry[k] = take(&ntaps, rh[k]);
    P->rx[k] = take(&ntaps, rw[k]);
  }
  for (int k = 1; k < n; ++k) {
    if (k < 2 && k <= one) continue;   // k = 1 under the top: the composite table
    const int d = k <= one ? k : one;  // the table's rows: the destination grid of D (k <= one) or U
    P->ty[k] = take(&ntaps, rh[d]);
    P->tx[k] = take(&ntaps, rw[d]);
  }
  P->tap4_bytes = (P->tap_bytes + ntaps * static_cast<int64_t>(sizeof(HmsaTap<acc_t>)) + 15) / 16 * 16;
  P->cy = P->cx = -1;
  if (one > 0) {
    P->cy = take(&ntaps4, rh[1]);
    P->cx = take(&ntaps4, rw[1]);
  }
  P->range_bytes = (P->tap4_bytes + ntaps4 * static_cast<int64_t>(sizeof(HmsaTap4<acc_t>)) + 15) / 16 * 16;
  P->bytes = P->range_bytes + 8 * HMSA_MAX_SCALES * static_cast<int64_t>(sizeof(int));
  return P->bytes <= kHmsaTileSmem && A.B * P->tiles_y * P->tiles_x <= INT32_MAX;
}

at::Tensor hmsa_fuse_cuda(at::TensorList logits, at::TensorList attentions, at::ArrayRef<double> scales,
                          at::IntArrayRef out_size, bool labels, at::OptionalIntArrayRef scale_sizes_opt) {
  const auto& [p, a, one, scale_sizes] = hmsa_operands(logits, attentions, scales, out_size, scale_sizes_opt);
  TORCH_CHECK(gpu::on_device(p[0]), "hmsa_fuse (CUDA): tensors must be on a CUDA device");
  gpu::DeviceGuard guard(p[0].device());
  const int64_t B = p[0].size(0), C = p[0].size(1), OH = out_size[0], OW = out_size[1];
  at::Tensor out = labels ? at::empty({B, OH, OW}, p[0].options().dtype(at::kLong))
                          : at::empty({B, C, OH, OW}, p[0].options());
  const int64_t need = hmsa_max_terms(static_cast<int>(p.size()), one);
  auto stream = gpu::stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p[0].scalar_type(), "hmsa_fuse_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const HmsaArgs<scalar_t> A = hmsa_pack<scalar_t>(p, a, one, OH, OW, scale_sizes);
    scalar_t* ov = labels ? nullptr : out.data_ptr<scalar_t>();
    int64_t* ol = labels ? out.data_ptr<int64_t>() : nullptr;
    HmsaTilePlan P;
    // the largest of 32 x 64 (8 pixels per thread), 16 x 64 and 8 x 32 tiles that the output holds
    // and whose plan fits
    if (OH >= 32 && OW >= 64 && hmsa_tile_plan<acc_t>(A, 32, 64, &P)) {
      PYSEG_LAUNCH(static_cast<int>(B * P.tiles_y * P.tiles_x), kHmsaTileThreads, P.bytes, stream,
                   hmsa_fuse_tile_kernel<scalar_t, acc_t, 32, 64>)(A, P, ov, ol, labels);
    } else if (OH >= 16 && OW >= 64 && hmsa_tile_plan<acc_t>(A, 16, 64, &P)) {
      PYSEG_LAUNCH(static_cast<int>(B * P.tiles_y * P.tiles_x), kHmsaTileThreads, P.bytes, stream,
                   hmsa_fuse_tile_kernel<scalar_t, acc_t, 16, 64>)(A, P, ov, ol, labels);
    } else if (hmsa_tile_plan<acc_t>(A, 8, 32, &P)) {
      PYSEG_LAUNCH(static_cast<int>(B * P.tiles_y * P.tiles_x), kHmsaTileThreads, P.bytes, stream,
                   hmsa_fuse_tile_kernel<scalar_t, acc_t, 8, 32>)(A, P, ov, ol, labels);
    } else {
      TORCH_CHECK(need <= HMSA_CUDA_MAX_TERMS, "hmsa_fuse (CUDA): this output is too small for the tile kernel's ",
                  "shared memory and the scale set needs a stencil of ", need, " terms per pixel, the per-pixel ",
                  "kernel holds ", HMSA_CUDA_MAX_TERMS, " (at most 2 scales above 1.0 and 4 below); use the ",
                  "reference or CPU backend");
      PYSEG_LAUNCH(blocks_for(B * OH * OW), THREADS, 0, stream, hmsa_fuse_kernel<scalar_t, acc_t>)(A, ov, ol, labels);
    }
    PYSEG_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hmsa_fuse_backward_cuda(const at::Tensor& grad_out,
                                                                       const at::Tensor& logits_one,
                                                                       const at::Tensor& logits_low,
                                                                       const at::Tensor& attention_low) {
  TORCH_CHECK(gpu::on_device(logits_one), "hmsa_fuse_backward (CUDA): tensors must be on a CUDA device");
  gpu::DeviceGuard guard(logits_one.device());
  const Hmsa2Backward S(grad_out, logits_one, logits_low, attention_low);
  auto stream = gpu::stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S.p[0].scalar_type(), "hmsa_fuse_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const HmsaArgs<scalar_t> A = hmsa_pack<scalar_t>(S.p, S.a, 0, S.OH, S.OW);
    const Hmsa2BackwardWork<acc_t> T(S);
    PYSEG_LAUNCH(blocks_for(S.B * S.h1 * S.w1), THREADS, 0, stream, bwd_r1_kernel<scalar_t, acc_t>)(
        A, S.g.data_ptr<scalar_t>(), axis_csr<acc_t>(T.fh), axis_csr<acc_t>(T.fw), T.gP.data_ptr<acc_t>(),
        S.g_p1.data_ptr<scalar_t>(), T.g_ua.data_ptr<acc_t>());
    PYSEG_LAUNCH_CHECK();
    PYSEG_LAUNCH(blocks_for(S.B * S.hl * S.wl), THREADS, 0, stream, bwd_low_kernel<scalar_t, acc_t>)(
        A, T.gP.data_ptr<acc_t>(), T.g_ua.data_ptr<acc_t>(), axis_csr<acc_t>(T.uh), axis_csr<acc_t>(T.uw),
        S.g_pl.data_ptr<scalar_t>(), T.g_al.data_ptr<acc_t>());
    PYSEG_LAUNCH_CHECK();
    PYSEG_LAUNCH(blocks_for(S.B * S.ha * S.wa), THREADS, 0, stream, bwd_att_kernel<scalar_t, acc_t>)(
        A, T.g_al.data_ptr<acc_t>(), axis_csr<acc_t>(T.rh), axis_csr<acc_t>(T.rw), S.g_a.data_ptr<scalar_t>());
    PYSEG_LAUNCH_CHECK();
  });
  return {S.g_p1, S.g_pl, S.g_a};
}

}  // namespace

PYSEG_CUDA_KERNELS(hmsa_fuse, hmsa_fuse_cuda, hmsa_fuse_backward_cuda)

}  // namespace pyseg
