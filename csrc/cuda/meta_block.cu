// CUDA launchers of the fused HyperSeg meta block (device code in meta_block_kernels.cuh).
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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <ATen/Context.h>

#include <algorithm>
#include <array>
#include <limits>
#include <type_traits>

#include "common/meta_block.h"
#include "common/meta_block_host.h"
#include "cuda/meta_block_kernels.cuh"
#include "cuda/runtime.cuh"

namespace pyseg {
namespace {

// ------------------------------------------------------------------------------------------------
// tile choice
// ------------------------------------------------------------------------------------------------
struct TilePlan {
  int64_t th, tw;
  bool weights_in_smem;
  size_t bytes;
};

// Largest square-ish tile whose shared memory fits; prefers <= ~100 KB (two blocks per SM on
// Hopper), then anything up to the opt-in limit, then weights in global memory.
template <typename F>
TilePlan plan_tiles(int64_t PH, int64_t PW, size_t elem, F&& elems_of) {
  const cudaDeviceProp* prop = &gpu::props();
  const size_t limit = prop->sharedMemPerBlockOptin > 0 ? prop->sharedMemPerBlockOptin : prop->sharedMemPerBlock;
  const size_t preferred = std::min<size_t>(limit, 100 * 1024);
  const int64_t sizes[] = {32, 16, 8, 4, 2, 1};
  for (size_t budget : {preferred, limit}) {
    for (bool wsmem : {true, false}) {
      for (int64_t T : sizes) {
        const int64_t th = std::min(T, PH), tw = std::min(T, PW);
        const size_t bytes = elem * static_cast<size_t>(elems_of(th, tw, wsmem));
        if (bytes <= budget) return {th, tw, wsmem, bytes};
      }
    }
  }
  TORCH_CHECK(false, "meta_block (CUDA): the channel counts are too large for shared memory even with 1x1 tiles ",
              "(limit ", limit, " bytes); use backend='reference'");
  return {};
}

// Tensor-core forward: the largest tile (whole patch, else T x T or T/2 x T, T = 32/16/8/...) whose pw2 accumulators
// fit the warps' registers (kMaxAccTiles 16x16 tiles per warp) and whose shared memory fits, preferring
// <= 113 KB (two blocks per SM); per tile the widest stage of hc = 48, 32 or 16 hidden channels that fits
// (fewer barriers, each X fragment used for hc/16 W1' blocks), wider than 16 only where no warp would keep
// W1' fragments across several column tiles (k1 > a1_depth, the kernel's kA1Depth, or nq/16 <= kWarps);
// ok false when nothing fits (the CUDA-core kernel runs instead).
struct MmaPlan {
  MmaGeom g;
  bool ok;
};

MmaPlan plan_mma(int64_t Cin, int64_t hid, int64_t Cout, int64_t PH, int64_t PW, int esize, int k, int a1_depth) {
  const cudaDeviceProp* prop = &gpu::props();
  const size_t limit = prop->sharedMemPerBlockOptin > 0 ? prop->sharedMemPerBlockOptin : prop->sharedMemPerBlock;
  // tile shapes by decreasing area: squares and half squares (T/2 x T: fewer halo pixels per output
  // pixel and fewer tiles than the next square when T x T does not fit, e.g. float at 16 x 16 patches)
  const int64_t shapes[][2] = {{32, 32}, {16, 32}, {16, 16}, {8, 16}, {8, 8}, {4, 8}, {4, 4}, {2, 4}, {2, 2}, {1, 2}, {1, 1}};
  const int m1 = round_up(static_cast<int>(hid), kChunk);
  for (size_t budget : {std::min<size_t>(limit, 113 * 1024), limit}) {
    for (const auto& s : shapes) {
      const int th = static_cast<int>(std::min(s[0], PH)), tw = static_cast<int>(std::min(s[1], PW));
      for (int hc = kMaxStage; hc >= kChunk; hc -= kChunk) {
        if (hc > kChunk && hc > m1) continue;
        MmaGeom g = mma_geometry(Cin, hid, Cout, th, tw, esize, k, hc);
        if (hc > kChunk && g.k1 <= a1_depth && g.nq / 16 > kWarps) continue;
        const int tiles = (g.m3 / 16) * (g.np / 16);
        if (tiles <= kWarps * kMaxAccTiles && static_cast<size_t>(g.bytes) <= budget) {
          // pw1 without kept W1' fragments: a warp per pair of adjacent column tiles wherever the full tile has
          // two or more (half the W1' fragment loads and splits; the SASS per k-step in roofline.py's model)
          g.pair1 = !(hc == kChunk && g.k1 <= a1_depth) && g.nq / 16 >= 2;
          return {g, true};
        }
      }
    }
  }
  return {MmaGeom{}, false};
}

template <typename scalar_t, int kSplit>
void launch_meta_mma(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& shift,
                     at::Tensor& y, int64_t hidden, int64_t out_channels, const MmaGeom& g) {
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t gh = weight.size(2), gw = weight.size(3);
  gpu::allow_dynamic_smem(meta_forward_mma_kernel<scalar_t, kSplit>, static_cast<size_t>(g.bytes));
  PYSEG_LAUNCH(static_cast<unsigned>(B * gh * gw), kThreads, g.bytes, gpu::stream(),
               meta_forward_mma_kernel<scalar_t, kSplit>)(
      x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
      shift.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), Cin, hidden, out_channels, H, W, gh, gw,
      meta::patch_major(weight), g);
  PYSEG_LAUNCH_CHECK();
}

// Launches the tensor-core forward; false when its plan does not fit (then the caller runs the
// CUDA-core kernel). float: tf32 products when torch.backends.cuda.matmul.allow_tf32 is set, else
// 3xTF32 (about float32 accuracy).
template <typename scalar_t>
bool meta_forward_mma(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& shift,
                      at::Tensor& y, int64_t hidden, int64_t out_channels) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return false;
  } else {
    using Op = mma::Operand<scalar_t>;
    const int64_t Cin = x.size(1), H = x.size(2), W = x.size(3);
    const int64_t gh = weight.size(2), gw = weight.size(3);
    // the kernel keeps in-plane offsets and the x tile's channel steps (kXCh planes) in 32 bits
    if (kXCh * H * W > std::numeric_limits<int32_t>::max()) return false;
    const bool split3 = std::is_same_v<scalar_t, float> && !at::globalContext().allowTF32CuBLAS();
    const MmaPlan plan = plan_mma(Cin, hidden, out_channels, meta::max_patch_size(H, gh),
                                  meta::max_patch_size(W, gw), sizeof(typename Op::mem), Op::k,
                                  split3 ? kA1Depth<Op::k, 3> : kA1Depth<Op::k, 1>);
    if (!plan.ok) return false;
    if (split3)
      launch_meta_mma<scalar_t, std::is_same_v<scalar_t, float> ? 3 : 1>(x, weight, scale, shift, y, hidden,
                                                                        out_channels, plan.g);
    else
      launch_meta_mma<scalar_t, 1>(x, weight, scale, shift, y, hidden, out_channels, plan.g);
    return true;
  }
}

at::Tensor meta_block_cuda(const at::Tensor& x, const at::Tensor& weight_in, const at::Tensor& scale,
                           const at::Tensor& shift, int64_t hidden, int64_t out_channels) {
  const WeightLayout L = meta::check_meta_block(x, weight_in, scale, shift, hidden, out_channels, true);
  TORCH_CHECK(gpu::on_device(x), "meta_block (CUDA): x must be a CUDA tensor");
  const gpu::DeviceGuard guard(x.device());
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t gh = weight_in.size(2), gw = weight_in.size(3), G = gh * gw;
  at::Tensor y = at::empty({B, out_channels, H, W}, x.options());
  const int64_t PH = meta::max_patch_size(H, gh), PW = meta::max_patch_size(W, gw);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "meta_block_cuda", [&] {
    if (meta_forward_mma<scalar_t>(x, weight_in, scale, shift, y, hidden, out_channels)) return;
    const at::Tensor weight = weight_in.contiguous();  // the CUDA-core kernel reads the default layout
    using acc_t = at::opmath_type<scalar_t>;
    const TilePlan plan = plan_tiles(PH, PW, sizeof(acc_t), [&](int64_t th, int64_t tw, bool wsmem) {
      return (wsmem ? L.numel() : 0) + (Cin + hidden) * (th + 2) * (tw + 2) + hidden * th * tw;
    });
    at::Tensor wglobal;
    if (!plan.weights_in_smem)
      wglobal = weight.view({B, L.numel(), G}).transpose(1, 2).to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    gpu::allow_dynamic_smem(meta_forward_kernel<scalar_t>, plan.bytes);
    PYSEG_LAUNCH(static_cast<unsigned>(B * G), kThreads, plan.bytes, gpu::stream(), meta_forward_kernel<scalar_t>)(
        x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
        plan.weights_in_smem ? nullptr : wglobal.const_data_ptr<acc_t>(), scale.const_data_ptr<scalar_t>(),
        shift.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), Cin, hidden, out_channels, H, W, gh, gw,
        plan.th, plan.tw, plan.weights_in_smem);
    PYSEG_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> meta_block_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
    const at::Tensor& shift, int64_t hidden, int64_t out_channels, std::array<bool, 4> output_mask) {
  const WeightLayout L = meta::check_meta_block(x, weight, scale, shift, hidden, out_channels);
  TORCH_CHECK(gpu::on_device(x), "meta_block_backward (CUDA): x must be a CUDA tensor");
  const gpu::DeviceGuard guard(x.device());
  meta::BlockGrads R(grad_out, x, weight, scale, shift, out_channels, output_mask);
  if (!R.any()) return R.result();
  const int64_t B = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t gh = weight.size(2), gwid = weight.size(3), G = gh * gwid, A = L.affine_numel();
  const int64_t PH = meta::max_patch_size(H, gh), PW = meta::max_patch_size(W, gwid);
  auto stream = gpu::stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "meta_block_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const TilePlan plan = plan_tiles(PH, PW, sizeof(acc_t), [&](int64_t th, int64_t tw, bool wsmem) {
      return (wsmem ? 2 * L.numel() : 0) + 2 * A + (Cin + 2 * hidden) * (th + 2) * (tw + 2) +
             2 * (hidden + out_channels) * th * tw;
    });
    at::Tensor wglobal, gwglobal;
    if (!plan.weights_in_smem) {
      wglobal = weight.view({B, L.numel(), G}).transpose(1, 2).to(acc_opts.dtype()).contiguous();
      gwglobal = at::empty({B * G, L.numel()}, acc_opts);
    }
    at::Tensor partial = R.need_affine ? at::empty({B * G, 2 * A}, acc_opts) : at::Tensor();
    at::Tensor gxbuf = R.need_x ? at::zeros({B * G, Cin, PH + 2, PW + 2}, acc_opts) : at::Tensor();
    gpu::allow_dynamic_smem(meta_backward_kernel<scalar_t>, plan.bytes);
    PYSEG_LAUNCH(static_cast<unsigned>(B * G), kThreads, plan.bytes, stream, meta_backward_kernel<scalar_t>)(
        grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
        plan.weights_in_smem ? nullptr : wglobal.const_data_ptr<acc_t>(),
        plan.weights_in_smem ? nullptr : gwglobal.mutable_data_ptr<acc_t>(), scale.const_data_ptr<scalar_t>(),
        shift.const_data_ptr<scalar_t>(), R.need_w ? R.gw.mutable_data_ptr<scalar_t>() : nullptr,
        R.need_affine ? partial.mutable_data_ptr<acc_t>() : nullptr,
        R.need_x ? gxbuf.mutable_data_ptr<acc_t>() : nullptr, Cin, hidden, out_channels, H, W, gh, gwid, plan.th,
        plan.tw, plan.weights_in_smem);
    PYSEG_LAUNCH_CHECK();
    if (R.need_affine) reduce_partials<scalar_t>(partial, A, R.gs, R.gt);
    if (R.need_x) {
      const int64_t total = B * Cin * H * W;
      const int blocks = static_cast<int>(std::min<int64_t>(div_up(total, 256), 65535 * 8));
      PYSEG_LAUNCH(blocks, 256, 0, stream, gather_grad_x_kernel<scalar_t>)(
          gxbuf.const_data_ptr<acc_t>(), R.gx.mutable_data_ptr<scalar_t>(), B, Cin, H, W, gh, gwid);
      PYSEG_LAUNCH_CHECK();
    }
  });
  return R.result();
}

}  // namespace

PYSEG_CUDA_KERNELS(meta_block, meta_block_cuda, meta_block_backward_cuda)

}  // namespace pyseg
