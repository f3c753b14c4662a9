// CUDA launchers of pyseg::patchwise_conv2d and pyseg::patchwise_conv2d_backward (device code in
// patchwise_conv2d_kernels.cuh).
//
//  * forward, fp16/bf16 with groups == 1, Cin*kh*kw >= 16 and patches of >= 64 pixels:
//    pw_forward_mma_kernel, an implicit GEMM on the tensor cores (nvcuda::wmma, float accumulators) per
//    (sample, patch) x 32 (or 16) output channels x pixel tile (at most 16 n-tiles of 16 pixels of one
//    row): per chunk of 16 input channels the block stages kw column-shifted copies of the haloed input
//    tile and the chunk's weights (either layout) in shared memory, warps accumulate 4 n-tiles x 1-2
//    m-tiles, and the result leaves through shared memory (scheme: patchwise_conv2d_kernels.cuh). In the
//    default weight layout a block runs two neighbouring patches (half the L2 sectors of the weights). float
//    and double, grouped and depthwise convolutions and small patches take the CUDA-core kernels below.
//  * forward, patches of >= 64 pixels otherwise: pw_forward_tiled_kernel, one block per (sample, patch) x tile
//    of OT output channels (NG groups of 64 threads, RO = 4 or 1 channels per thread) x pixel tile of
//    the patch (at most 256 pixels, 32 columns). Per chunk of input channels the block stages the
//    input tile + halo (zero-padded; row stride IC picked by pw_plan_tiles for conflict-free warp
//    loads) and the tile's weights (ws[tap][channel], zero outside a channel's group) in shared memory
//    (<= 48 KB), then every thread accumulates 4 pixels x RO channels in registers (RO = 1, 3x3 stride 1:
//    4 pixels down one column, the windows' shared rows loaded once). Weights are read
//    in the default layout (gh*gw apart) or patch-major (contiguous per patch) through two strides.
//  * forward, smaller patches: pw_forward_direct_kernel, a thread per (sample, RO channels, pixel),
//    pixel fastest (coalesced default-layout weights).
//  * forward, a channel's tile over 48 KB: the former kernel (pw_forward_kernel): one thread per
//    (channel, pixel) of the patch, weights staged in shared memory when one channel's fit.
//  * dX: gather, one thread per input element: it visits the outputs that read it, each with
//    that output's patch weights. No atomics; deterministic.
//  * dW/dBias: one block per (sample, patch, tile of weight/bias entries). Each entry is a
//    reduction over the patch's pixels: a warp per entry with a fixed-order shuffle reduction for
//    patches of >= 32 pixels, a thread per entry otherwise. No atomics; deterministic.
// Global offsets are int64; the tiled kernel's in-tile indices (bounded by its shared memory) are int32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common/patch_index.h"
#include "common/patchwise_conv2d.h"
#include "cuda/patchwise_conv2d_kernels.cuh"
#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

// Output channels per thread of the tiled forward: 4 (a vector of weights per tap) when a thread's
// four channels always lie in one group (groups == 1 with Cout >= 4, or Og % 4 == 0), else 1.
inline int pw_channels_per_thread(const PwConvShape& s) {
  return (s.G == 1 ? s.Cout >= 4 : s.Og % 4 == 0) ? 4 : 1;
}

// Most distinct shared-memory words any bank serves in one warp-wide load of the input tile
// (thread pixel p = lane + 32*warp + 64*q, row-major in a TR x TC tile, word (p / TC)*sh*IC +
// (p % TC)*sw): 1 = conflict-free.
inline int pw_tile_conflict(int TR, int TC, int IC, int64_t sh, int64_t sw) {
  int worst = 1;
  for (int base = 0; base < kPwTilePixels && base < TR * TC; base += 32) {
    int64_t words[32];
    int n = 0;
    for (int l = 0; l < 32 && base + l < TR * TC; ++l) {
      const int p = base + l;
      words[n++] = (p / TC) * sh * IC + (p % TC) * sw;
    }
    for (int bank = 0; bank < 32; ++bank) {
      int distinct = 0;
      for (int i = 0; i < n; ++i) {
        if (words[i] % 32 != bank) continue;
        bool seen = false;
        for (int j = 0; j < i; ++j) seen |= words[j] == words[i];
        distinct += seen ? 0 : 1;
      }
      worst = std::max(worst, distinct);
    }
  }
  return worst;
}

// The same for the tiled forward's 3x3 strips (RO == 1; ceil(TR / kPwRP) strips of TC columns in a group's
// 64 threads): thread tp reads word (tp / TC)*kPwRP*IC + tp % TC of a staged row.
inline int pw_strip_conflict(int TR, int TC, int IC) {
  const int n = (TR + kPwRP - 1) / kPwRP * TC;
  int worst = 1;
  for (int base = 0; base < n; base += 32) {
    int count[32] = {};
    for (int tp = base; tp < n && tp < base + 32; ++tp) {
      const int bank = ((tp / TC) * kPwRP * IC + tp % TC) % 32;
      worst = std::max(worst, ++count[bank]);
    }
  }
  return worst;
}

inline int64_t pw_tile_smem_elems(const PwConvShape& s, const PwTilePlan& t) {
  return static_cast<int64_t>(t.CC) * (static_cast<int64_t>(t.IR) * t.IC + s.kh * s.kw * t.OT);
}

// The tiled forward's plan: output-channel tiles of OT = NG*RO (balanced, NG <= 8), a pixel tile of
// at most 256 pixels (up to 32 columns wide), the input row stride IC in [columns, columns + 32)
// with the fewest bank conflicts (when that still fits), and the most channels per chunk that fit
// smem_limit (balanced over the chunks). False when one channel does not fit (the fallback kernel).
inline bool pw_plan_tiles(const PwConvShape& s, int RO, int64_t esize, int64_t smem_limit, int64_t w_entry,
                          int64_t w_patch, PwTilePlan* out) {
  PwTilePlan t;
  const int64_t ot_max = static_cast<int64_t>(RO) * kPwMaxGroups;
  const int64_t tiles = (s.Cout + ot_max - 1) / ot_max;
  const int64_t ot = ((s.Cout + tiles - 1) / tiles + RO - 1) / RO * RO;
  t.OT = static_cast<int>(ot);
  t.NG = t.OT / RO;
  const int64_t ph = (s.Hout + s.gh - 1) / s.gh, pw = (s.Wout + s.gw - 1) / s.gw;
  t.TC = static_cast<int>(std::min<int64_t>(pw, 32));
  t.TR = static_cast<int>(std::min<int64_t>(ph, std::max<int64_t>(1, kPwTilePixels / t.TC)));
  const int64_t ir = (t.TR - 1) * s.sh + (s.kh - 1) * s.dh + 1;
  const int64_t icn = (t.TC - 1) * s.sw + (s.kw - 1) * s.dw + 1;
  const int64_t budget = smem_limit / esize;
  const int64_t KK = s.kh * s.kw;
  if (ir * icn + KK * t.OT > budget || ir * (icn + 31) > std::numeric_limits<int32_t>::max()) return false;
  t.IR = static_cast<int>(ir);
  t.IC = static_cast<int>(icn);
  // the 3x3 strips (RO == 1, the full tile in strips) read the tile column-major per thread
  const bool strips = RO == 1 && s.kh == 3 && s.kw == 3 && s.sh == 1 && s.sw == 1 && s.dh == 1 && s.dw == 1 &&
                      (t.TR + kPwRP - 1) / kPwRP * t.TC <= kPwGroupThreads;
  const auto conflict = [&](int ic) {
    return strips ? pw_strip_conflict(t.TR, t.TC, ic) : pw_tile_conflict(t.TR, t.TC, ic, s.sh, s.sw);
  };
  int best = conflict(t.IC);
  for (int64_t ic = icn + 1; ic < icn + 32 && best > 1; ++ic) {
    if (ir * ic + KK * t.OT > budget) break;
    const int c = conflict(static_cast<int>(ic));
    if (c < best) {
      best = c;
      t.IC = static_cast<int>(ic);
    }
  }
  const int64_t span = s.G == 1 ? s.Cin : std::min<int64_t>(s.Cin, ((t.OT - 1) / s.Og + 2) * s.Cg);
  const int64_t cc_max = std::max<int64_t>(1, budget / (ir * t.IC + KK * t.OT));
  const int64_t chunks = (span + cc_max - 1) / cc_max;
  t.CC = static_cast<int>((span + chunks - 1) / chunks);
  t.w_entry = w_entry;
  t.w_patch = w_patch;
  *out = t;
  return true;
}

// Smallest stride >= n (elements of `esize` bytes) that is an odd multiple of 16 bytes (conflict-free
// tensor-core loads: the 8 rows of a load phase land in 8 distinct 16-byte bank groups).
inline int pw_odd16(int64_t n, int esize) {
  const int64_t u = 16 / esize;
  int64_t v = (n + u - 1) / u;
  if (v % 2 == 0) ++v;
  return static_cast<int>(v * u);
}

// The tensor-core forward's plan (pw_forward_mma_kernel): a pixel tile of TR rows x 16*CT columns
// (CT = 1, 2 or 4 n-tiles across, at most 16 n-tiles), chunks of 16 input channels (8 when that does
// not fit), within `smem_limit` bytes per patch (two patches per block in the default weight layout); false when it does not apply (the caller runs the CUDA-core
// kernels): not fp16/bf16, groups > 1, Cin*kh*kw < 16, patches under 64 pixels, or no tile fits.
template <typename scalar_t>
bool pw_plan_mma(const PwConvShape& s, int64_t smem_limit, int64_t w_entry, int64_t w_patch, PwMmaPlan* out) {
  if constexpr (!std::is_same_v<scalar_t, c10::Half> && !std::is_same_v<scalar_t, c10::BFloat16>) {
    return false;
  } else {
    constexpr int esize = 2, k = mma::Operand<scalar_t>::k;
    const int64_t ph = (s.Hout + s.gh - 1) / s.gh, pw = (s.Wout + s.gw - 1) / s.gw;
    if (s.G != 1 || s.K < 16 || ph * pw < kPwGroupThreads) return false;
    PwMmaPlan t;
    t.CT = pw <= 16 ? 1 : pw <= 32 ? 2 : 4;
    t.TCP = 16 * t.CT;
    const int MR = s.Cout <= 16 ? 16 : 32;
    for (const int cc : {kPwMmaChunk, kPwMmaChunk / 2}) {
      for (int64_t tr = std::min<int64_t>(ph, 16 / t.CT); tr >= 1; tr /= 2) {
        const int64_t ir = (tr - 1) * s.sh + (s.kh - 1) * s.dh + 1;
        if (ir * t.TCP > (1 << 20)) continue;
        t.TR = static_cast<int>(tr);
        t.IR = static_cast<int>(ir);
        t.CC = static_cast<int>(std::min<int64_t>(cc, s.Cin));
        t.kpad = static_cast<int>((t.CC * s.kw + k - 1) / k * k);
        t.cstride = pw_odd16(ir * t.TCP, esize);
        t.ldw = pw_odd16(t.kpad, esize);
        t.ldy = t.TR * t.TCP + 4;
        t.ow = (static_cast<int64_t>(t.kpad) * t.cstride * esize + 127) / 128 * 128;
        t.bytes = (std::max<int64_t>(t.ow + s.kh * MR * t.ldw * esize, int64_t{MR} * t.ldy * 4) + 127) / 128 * 128;
        t.NW = static_cast<int>((t.TR * t.CT + kPwMmaNT - 1) / kPwMmaNT);
        // pairs of patches per block in the default weight layout (half the L2 sectors of the weights)
        t.PP = w_entry != 1 && s.gw >= 2 ? kPwMmaMaxPP : 1;
        t.w_entry = w_entry;
        t.w_patch = w_patch;
        if (t.bytes <= smem_limit) {
          *out = t;
          return true;
        }
      }
    }
    return false;
  }
}

// Launches pw_forward_mma_kernel when its plan applies (pw_plan_mma); false otherwise.
template <typename scalar_t>
bool pw_forward_mma(const PwConvForward& a, at::Tensor& y, int64_t smem_limit, cudaStream_t stream) {
  if constexpr (!std::is_same_v<scalar_t, c10::Half> && !std::is_same_v<scalar_t, c10::BFloat16>) {
    return false;
  } else {
    const PwConvShape& s = a.s;
    PwMmaPlan m;
    if (!pw_plan_mma<scalar_t>(s, smem_limit, a.w_entry, a.w_patch, &m)) return false;
    const int64_t ph = (s.Hout + s.gh - 1) / s.gh, pw = (s.Wout + s.gw - 1) / s.gw;
    const int64_t ctiles = (s.Cout + 31) / 32;
    const int64_t ptiles = ((ph + m.TR - 1) / m.TR) * ((pw + m.TCP - 1) / m.TCP);
    TORCH_CHECK(ctiles <= 65535 && ptiles <= 65535, kPwConvForward, ": grid too large (", ctiles,
                " output-channel tiles x ", ptiles, " pixel tiles per patch)");
    const int64_t blocks = s.B * s.gh * ((s.gw + m.PP - 1) / m.PP);
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), kPwConvForward, ": too many blocks: ", blocks);
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(ctiles), static_cast<unsigned>(ptiles));
    const int threads = 32 * m.NW * m.PP;
    const int64_t smem = m.bytes * m.PP;
    const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
    const scalar_t* wp = a.weight.const_data_ptr<scalar_t>();
    const scalar_t* bptr = a.bias_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (s.Cout <= 16) {
      gpu::allow_dynamic_smem(pw_forward_mma_kernel<scalar_t, 1>, static_cast<size_t>(smem));
      PYSEG_LAUNCH(grid, threads, smem, stream, pw_forward_mma_kernel<scalar_t, 1>)(xp, wp, bptr, yp, s, m);
    } else {
      gpu::allow_dynamic_smem(pw_forward_mma_kernel<scalar_t, 2>, static_cast<size_t>(smem));
      PYSEG_LAUNCH(grid, threads, smem, stream, pw_forward_mma_kernel<scalar_t, 2>)(xp, wp, bptr, yp, s, m);
    }
    PYSEG_LAUNCH_CHECK();
    return true;
  }
}

at::Tensor patchwise_conv2d_cuda(const at::Tensor& x_, const at::Tensor& weight_,
                                 const c10::optional<at::Tensor>& bias_, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(gpu::on_device(x_), kPwConvForward, ": the CUDA kernel needs CUDA tensors, got x on ", x_.device());
  gpu::DeviceGuard guard(x_.device());
  const PwConvForward a(x_, weight_, bias_, stride, padding, dilation, groups, /*allow_patch_major=*/true);
  const PwConvShape& s = a.s;
  const at::Tensor &x = a.x, &weight = a.weight;
  at::Tensor y = at::empty({s.B, s.Cout, s.Hout, s.Wout}, x.options());
  if (s.B == 0) return y;

  const int64_t GG = s.gh * s.gw;
  TORCH_CHECK(s.B * GG <= std::numeric_limits<int32_t>::max(), kPwConvForward, ": too many (sample, patch) pairs: ",
              s.B * GG);
  const cudaDeviceProp* prop = &gpu::props();
  const int64_t smem_limit = static_cast<int64_t>(prop->sharedMemPerBlock);  // without opt-in
  cudaStream_t stream = gpu::stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patchwise_conv2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* bptr = a.bias_ptr<scalar_t>();
    const int64_t ph = (s.Hout + s.gh - 1) / s.gh, pw = (s.Wout + s.gw - 1) / s.gw;
    if (pw_forward_mma<scalar_t>(a, y, smem_limit, stream)) return;  // fp16/bf16 on the tensor cores
    int RO = pw_channels_per_thread(s);
    if (ph * pw < kPwGroupThreads) {  // small patches: a thread per (channels, pixel), weights from global
      // one channel per thread when four would leave fewer than two blocks per SM (batch 1, small maps)
      if (s.B * ((s.Cout + 3) / 4) * s.Hout * s.Wout < 2 * 256 * static_cast<int64_t>(prop->multiProcessorCount)) RO = 1;
      const int64_t work = s.B * ((s.Cout + RO - 1) / RO) * s.Hout * s.Wout;
      const int64_t max_blocks = static_cast<int64_t>(prop->multiProcessorCount) * 32;
      const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + 255) / 256, max_blocks)));
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* wp = weight.const_data_ptr<scalar_t>();
      scalar_t* yp = y.mutable_data_ptr<scalar_t>();
      if (RO == 4) {
        PYSEG_LAUNCH(blocks, 256, 0, stream, pw_forward_direct_kernel<scalar_t, 4>)(xp, wp, bptr, yp, s, a.w_entry,
                                                                                  a.w_patch);
      } else {
        PYSEG_LAUNCH(blocks, 256, 0, stream, pw_forward_direct_kernel<scalar_t, 1>)(xp, wp, bptr, yp, s, a.w_entry,
                                                                                  a.w_patch);
      }
      PYSEG_LAUNCH_CHECK();
      return;
    }
    PwTilePlan t;
    if (pw_plan_tiles(s, RO, static_cast<int64_t>(sizeof(acc_t)), smem_limit, a.w_entry, a.w_patch, &t)) {
      const int64_t tiles = (s.Cout + t.OT - 1) / t.OT;
      const int64_t ptiles = ((ph + t.TR - 1) / t.TR) * ((pw + t.TC - 1) / t.TC);
      TORCH_CHECK(tiles <= 65535 && ptiles <= 65535, kPwConvForward, ": grid too large (", tiles,
                  " output-channel tiles x ", ptiles, " pixel tiles per patch)");
      const dim3 grid(static_cast<unsigned>(s.B * GG), static_cast<unsigned>(tiles), static_cast<unsigned>(ptiles));
      const size_t smem = static_cast<size_t>(pw_tile_smem_elems(s, t) * static_cast<int64_t>(sizeof(acc_t)));
      const int threads = t.NG * kPwGroupThreads;
      const bool unit = s.kh == 3 && s.kw == 3 && s.sh == 1 && s.sw == 1 && s.dh == 1 && s.dw == 1;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* wp = weight.const_data_ptr<scalar_t>();
      scalar_t* yp = y.mutable_data_ptr<scalar_t>();
      if (RO == 4 && unit) {
        PYSEG_LAUNCH(grid, threads, smem, stream, pw_forward_tiled_kernel<scalar_t, 4, true>)(xp, wp, bptr, yp, s, t);
      } else if (RO == 4) {
        PYSEG_LAUNCH(grid, threads, smem, stream, pw_forward_tiled_kernel<scalar_t, 4, false>)(xp, wp, bptr, yp, s, t);
      } else if (unit) {
        PYSEG_LAUNCH(grid, threads, smem, stream, pw_forward_tiled_kernel<scalar_t, 1, true>)(xp, wp, bptr, yp, s, t);
      } else {
        PYSEG_LAUNCH(grid, threads, smem, stream, pw_forward_tiled_kernel<scalar_t, 1, false>)(xp, wp, bptr, yp, s, t);
      }
      PYSEG_LAUNCH_CHECK();
      return;
    }
    // fallback (one channel's input tile does not fit): the simple kernel reads the default layout
    const at::Tensor wc = weight.contiguous();
    const int64_t per_channel = s.K * static_cast<int64_t>(sizeof(acc_t));
    const bool use_smem = per_channel <= smem_limit;
    int64_t OT = std::min<int64_t>(s.Cout, 64);
    if (use_smem) OT = std::max<int64_t>(1, std::min<int64_t>(OT, smem_limit / per_channel));
    const int64_t tiles = (s.Cout + OT - 1) / OT;
    TORCH_CHECK(tiles <= 65535, kPwConvForward, ": too many output-channel tiles: ", tiles);
    const dim3 grid(static_cast<unsigned>(s.B * GG), static_cast<unsigned>(tiles));
    if (use_smem) {
      const size_t smem = static_cast<size_t>(OT * per_channel);
      PYSEG_LAUNCH(grid, kThreads, smem, stream, pw_forward_kernel<scalar_t, true>)(
          x.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(), bptr, y.mutable_data_ptr<scalar_t>(), s,
          OT);
    } else {
      PYSEG_LAUNCH(grid, kThreads, 0, stream, pw_forward_kernel<scalar_t, false>)(
          x.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(), bptr, y.mutable_data_ptr<scalar_t>(), s,
          OT);
    }
    PYSEG_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patchwise_conv2d_backward_cuda(
    const at::Tensor& grad_out_, const at::Tensor& x_, const at::Tensor& weight_, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  TORCH_CHECK(gpu::on_device(x_), kPwConvBackward, ": the CUDA kernel needs CUDA tensors, got x on ", x_.device());
  gpu::DeviceGuard guard(x_.device());
  const PwConvBackward a(grad_out_, x_, weight_, stride, padding, dilation, groups, output_mask);
  const PwConvShape& s = a.s;
  const at::Tensor &x = a.x, &weight = a.weight, &gy = a.gy, &gx = a.gx, &gw = a.gw, &gb = a.gb;
  if (s.B == 0) return a.result();
  const int64_t GG = s.gh * s.gw;
  cudaStream_t stream = gpu::stream();
  const cudaDeviceProp* prop = &gpu::props();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patchwise_conv2d_backward_cuda", [&] {
    if (output_mask[0]) {
      const int64_t total = gx.numel();
      const int64_t max_blocks = static_cast<int64_t>(prop->multiProcessorCount) * 32;
      const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks));
      PYSEG_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, pw_grad_input_kernel<scalar_t>)(
          gy.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), s);
      PYSEG_LAUNCH_CHECK();
    }
    if (output_mask[1] || output_mask[2]) {
      const int64_t CK = s.Cout * s.K;
      const int64_t e_begin = output_mask[1] ? 0 : CK;
      const int64_t e_end = output_mask[2] ? CK + s.Cout : CK;
      const int64_t ET = kThreads;
      const int64_t tiles = (e_end - e_begin + ET - 1) / ET;
      TORCH_CHECK(s.B * GG <= std::numeric_limits<int32_t>::max() && tiles <= 65535, kPwConvBackward,
                  ": grid too large (", s.B * GG, " patches x ", tiles, " entry tiles)");
      const dim3 grid(static_cast<unsigned>(s.B * GG), static_cast<unsigned>(tiles));
      PYSEG_LAUNCH(grid, kThreads, 0, stream, pw_grad_weight_kernel<scalar_t>)(
          x.const_data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(),
          output_mask[1] ? gw.mutable_data_ptr<scalar_t>() : nullptr,
          output_mask[2] ? gb.mutable_data_ptr<scalar_t>() : nullptr, s, e_begin, e_end, ET);
      PYSEG_LAUNCH_CHECK();
    }
  });
  return a.result();
}

}  // namespace

PYSEG_CUDA_KERNELS(patchwise_conv2d, patchwise_conv2d_cuda, patchwise_conv2d_backward_cuda)

}  // namespace pyseg
