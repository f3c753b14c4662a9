// CUDA kernels of pyseg::patchwise_conv2d and pyseg::patchwise_conv2d_backward.
//
//  * forward: one block per (sample, patch, tile of OT output channels). The tile's weights of
//    that patch (OT x Cin/groups*kh*kw, strided by gh*gw in global memory) are staged in dynamic
//    shared memory in the accumulation type; threads then compute (channel, pixel) pairs of the
//    patch, pixel fastest (coalesced x/y), accumulating in float (double for double). When one
//    output channel's weights do not fit the device's shared memory per block, a variant reads
//    the weights from global memory (read-only cache).
//  * dX: gather, one thread per input element: it visits the outputs that read it, each with
//    that output's patch weights. No atomics; deterministic.
//  * dW/dBias: one block per (sample, patch, tile of weight/bias entries). Each entry is a
//    reduction over the patch's pixels: a warp per entry with a fixed-order shuffle reduction for
//    patches of >= 32 pixels, a thread per entry otherwise. No atomics; deterministic.
// All index arithmetic is int64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <array>
#include <tuple>

#include "common/patch_index.h"
#include "common/patchwise_conv2d.h"

namespace pyseg {
namespace {

constexpr const char* kFwd = "pyseg::patchwise_conv2d";
constexpr const char* kBwd = "pyseg::patchwise_conv2d_backward";
constexpr int kThreads = 256;

// ------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------
template <typename scalar_t, bool kSmem>
__global__ void __launch_bounds__(kThreads)
    pw_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                      const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, const PwConvShape s,
                      const int64_t OT) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char pw_smem_raw[];
  acc_t* ws = reinterpret_cast<acc_t*>(pw_smem_raw);

  const int64_t GG = s.gh * s.gw;
  const int64_t pidx = static_cast<int64_t>(blockIdx.x) % GG;  // patch index pi*gw + pj
  const int64_t b = static_cast<int64_t>(blockIdx.x) / GG;
  const int64_t pi = pidx / s.gw, pj = pidx % s.gw;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * OT;
  const int64_t nO = min(OT, s.Cout - o0);
  const int64_t r0 = patch_begin(pi, s.gh, s.Hout), r1 = patch_begin(pi + 1, s.gh, s.Hout);
  const int64_t c0 = patch_begin(pj, s.gw, s.Wout), c1 = patch_begin(pj + 1, s.gw, s.Wout);
  const int64_t pw = c1 - c0;
  const int64_t P = (r1 - r0) * pw;

  // Weight (o0 + ol, k) of this patch: wb[(ol*K + k) * GG].
  const scalar_t* wb = w + (b * s.Cout + o0) * s.K * GG + pidx;
  if (kSmem) {
    for (int64_t t = threadIdx.x; t < nO * s.K; t += blockDim.x) ws[t] = static_cast<acc_t>(wb[t * GG]);
    __syncthreads();
  }

  for (int64_t t = threadIdx.x; t < nO * P; t += blockDim.x) {
    const int64_t ol = t / P, p = t % P;
    const int64_t i = r0 + p / pw, j = c0 + p % pw;
    const int64_t o = o0 + ol;
    const int64_t g = o / s.Og;
    acc_t acc = bias ? static_cast<acc_t>(bias[(b * s.Cout + o) * GG + pidx]) : acc_t(0);
    const scalar_t* xb = x + (b * s.Cin + g * s.Cg) * s.H * s.W;
    const int64_t ih0 = i * s.sh - s.pt, iw0 = j * s.sw - s.pl;
    for (int64_t ci = 0; ci < s.Cg; ++ci) {
      for (int64_t ky = 0; ky < s.kh; ++ky) {
        const int64_t ih = ih0 + ky * s.dh;
        if (ih < 0 || ih >= s.H) continue;
        const scalar_t* xrow = xb + (ci * s.H + ih) * s.W;
        for (int64_t kx = 0; kx < s.kw; ++kx) {
          const int64_t iw = iw0 + kx * s.dw;
          if (iw < 0 || iw >= s.W) continue;
          const int64_t e = ol * s.K + (ci * s.kh + ky) * s.kw + kx;
          const acc_t wv = kSmem ? ws[e] : static_cast<acc_t>(wb[e * GG]);
          acc += wv * static_cast<acc_t>(xrow[iw]);
        }
      }
    }
    y[((b * s.Cout + o) * s.Hout + i) * s.Wout + j] = static_cast<scalar_t>(acc);
  }
}

at::Tensor patchwise_conv2d_cuda(const at::Tensor& x_, const at::Tensor& weight_,
                                 const c10::optional<at::Tensor>& bias_, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const PwConvShape s = pw_check_args(kFwd, x_, weight_, stride, padding, dilation, groups);
  pw_check_bias(kFwd, s, x_, bias_);
  TORCH_CHECK(x_.is_cuda(), kFwd, ": the CUDA kernel needs CUDA tensors, got x on ", x_.device());
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) bias = bias_->contiguous();
  at::Tensor y = at::empty({s.B, s.Cout, s.Hout, s.Wout}, x.options());
  if (s.B == 0) return y;

  const int64_t GG = s.gh * s.gw;
  TORCH_CHECK(s.B * GG <= std::numeric_limits<int32_t>::max(), kFwd, ": too many (sample, patch) pairs: ",
              s.B * GG);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t smem_limit = static_cast<int64_t>(prop->sharedMemPerBlock);  // without opt-in
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patchwise_conv2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t per_channel = s.K * static_cast<int64_t>(sizeof(acc_t));
    const bool use_smem = per_channel <= smem_limit;
    int64_t OT = std::min<int64_t>(s.Cout, 64);
    if (use_smem) OT = std::max<int64_t>(1, std::min<int64_t>(OT, smem_limit / per_channel));
    const int64_t tiles = (s.Cout + OT - 1) / OT;
    TORCH_CHECK(tiles <= 65535, kFwd, ": too many output-channel tiles: ", tiles);
    const dim3 grid(static_cast<unsigned>(s.B * GG), static_cast<unsigned>(tiles));
    const scalar_t* bptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    if (use_smem) {
      const size_t smem = static_cast<size_t>(OT * per_channel);
      pw_forward_kernel<scalar_t, true><<<grid, kThreads, smem, stream>>>(
          x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bptr, y.mutable_data_ptr<scalar_t>(), s,
          OT);
    } else {
      pw_forward_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bptr, y.mutable_data_ptr<scalar_t>(), s,
          OT);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// ------------------------------------------------------------------------------------------
// backward: dX (gather, one thread per input element)
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pw_grad_input_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ w, scalar_t* __restrict__ gx,
                         const PwConvShape s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = s.B * s.Cin * s.H * s.W;
  const int64_t GG = s.gh * s.gw;
  const int64_t HWo = s.Hout * s.Wout;
  const int64_t KGG = s.K * GG;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t iw = idx % s.W;
    const int64_t ih = (idx / s.W) % s.H;
    const int64_t c = (idx / (s.H * s.W)) % s.Cin;
    const int64_t b = idx / (s.Cin * s.H * s.W);
    const int64_t g = c / s.Cg, ci = c % s.Cg;
    acc_t acc = 0;
    for (int64_t ky = 0; ky < s.kh; ++ky) {
      const int64_t i = out_from_in(ih, ky, s.sh, s.dh, s.pt, s.Hout);
      if (i < 0) continue;
      const int64_t pi = patch_of(i, s.gh, s.Hout);
      for (int64_t kx = 0; kx < s.kw; ++kx) {
        const int64_t j = out_from_in(iw, kx, s.sw, s.dw, s.pl, s.Wout);
        if (j < 0) continue;
        const int64_t pj = patch_of(j, s.gw, s.Wout);
        // grad_out (b, g*Og + og, i, j) and weight (b, g*Og + og, ci, ky, kx, pi, pj).
        const scalar_t* gp = gy + ((b * s.Cout + g * s.Og) * s.Hout + i) * s.Wout + j;
        const scalar_t* wp = w + ((b * s.Cout + g * s.Og) * s.K + (ci * s.kh + ky) * s.kw + kx) * GG + pi * s.gw + pj;
        for (int64_t og = 0; og < s.Og; ++og)
          acc += static_cast<acc_t>(gp[og * HWo]) * static_cast<acc_t>(wp[og * KGG]);
      }
    }
    gx[idx] = static_cast<scalar_t>(acc);
  }
}

// ------------------------------------------------------------------------------------------
// backward: dW and dBias (per-patch reductions)
// ------------------------------------------------------------------------------------------
// Entry e of a patch: e < Cout*K is weight (o = e / K, k = e % K); e >= Cout*K is bias o = e - Cout*K.
// Returns the sum over the patch pixels p = start, start + step, ... of that entry's products.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t pw_entry_partial(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gy,
                                                  const PwConvShape& s, int64_t b, int64_t e, int64_t r0,
                                                  int64_t c0, int64_t pw, int64_t P, int64_t start, int64_t step) {
  acc_t sum = 0;
  const int64_t CK = s.Cout * s.K;
  if (e >= CK) {
    const int64_t o = e - CK;
    const scalar_t* go = gy + (b * s.Cout + o) * s.Hout * s.Wout;
    for (int64_t p = start; p < P; p += step) {
      const int64_t i = r0 + p / pw, j = c0 + p % pw;
      sum += static_cast<acc_t>(go[i * s.Wout + j]);
    }
    return sum;
  }
  const int64_t o = e / s.K, k = e % s.K;
  const int64_t ci = k / (s.kh * s.kw);
  const int64_t ky = (k / s.kw) % s.kh, kx = k % s.kw;
  const int64_t c = (o / s.Og) * s.Cg + ci;
  const scalar_t* go = gy + (b * s.Cout + o) * s.Hout * s.Wout;
  const scalar_t* xc = x + (b * s.Cin + c) * s.H * s.W;
  for (int64_t p = start; p < P; p += step) {
    const int64_t i = r0 + p / pw, j = c0 + p % pw;
    const int64_t ih = i * s.sh - s.pt + ky * s.dh;
    const int64_t iw = j * s.sw - s.pl + kx * s.dw;
    if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
    sum += static_cast<acc_t>(go[i * s.Wout + j]) * static_cast<acc_t>(xc[ih * s.W + iw]);
  }
  return sum;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    pw_grad_weight_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gy,
                          scalar_t* __restrict__ gw, scalar_t* __restrict__ gb, const PwConvShape s,
                          const int64_t e_begin, const int64_t e_end, const int64_t ET) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t GG = s.gh * s.gw;
  const int64_t pidx = static_cast<int64_t>(blockIdx.x) % GG;
  const int64_t b = static_cast<int64_t>(blockIdx.x) / GG;
  const int64_t pi = pidx / s.gw, pj = pidx % s.gw;
  const int64_t r0 = patch_begin(pi, s.gh, s.Hout), r1 = patch_begin(pi + 1, s.gh, s.Hout);
  const int64_t c0 = patch_begin(pj, s.gw, s.Wout), c1 = patch_begin(pj + 1, s.gw, s.Wout);
  const int64_t pw = c1 - c0;
  const int64_t P = (r1 - r0) * pw;
  const int64_t eb = e_begin + static_cast<int64_t>(blockIdx.y) * ET;
  const int64_t ee = min(eb + ET, e_end);
  const int64_t CK = s.Cout * s.K;

  auto store = [&](int64_t e, acc_t v) {
    if (e < CK) {
      const int64_t o = e / s.K, k = e % s.K;
      gw[((b * s.Cout + o) * s.K + k) * GG + pidx] = static_cast<scalar_t>(v);
    } else {
      gb[(b * s.Cout + (e - CK)) * GG + pidx] = static_cast<scalar_t>(v);
    }
  };

  if (P >= 32) {
    // A warp per entry; lanes stride over the pixels; fixed-order tree reduction.
    const int64_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    for (int64_t e = eb + warp; e < ee; e += nwarps) {
      acc_t v = pw_entry_partial<scalar_t, acc_t>(x, gy, s, b, e, r0, c0, pw, P, lane, 32);
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
      if (lane == 0) store(e, v);
    }
  } else {
    for (int64_t e = eb + threadIdx.x; e < ee; e += blockDim.x)
      store(e, pw_entry_partial<scalar_t, acc_t>(x, gy, s, b, e, r0, c0, pw, P, 0, 1));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patchwise_conv2d_backward_cuda(
    const at::Tensor& grad_out_, const at::Tensor& x_, const at::Tensor& weight_, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const PwConvShape s = pw_check_args(kBwd, x_, weight_, stride, padding, dilation, groups);
  pw_check_grad_out(kBwd, s, x_, grad_out_);
  TORCH_CHECK(x_.is_cuda(), kBwd, ": the CUDA kernel needs CUDA tensors, got x on ", x_.device());
  c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor gy = grad_out_.contiguous();
  at::Tensor gx = output_mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : x.new_empty({0});
  at::Tensor gw = output_mask[1] ? at::empty_like(weight, at::MemoryFormat::Contiguous) : weight.new_empty({0});
  at::Tensor gb = output_mask[2] ? at::empty({s.B, s.Cout, s.gh, s.gw}, weight.options()) : weight.new_empty({0});
  if (s.B == 0) return {gx, gw, gb};
  const int64_t GG = s.gh * s.gw;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "patchwise_conv2d_backward_cuda", [&] {
    if (output_mask[0]) {
      const int64_t total = gx.numel();
      const int64_t max_blocks = static_cast<int64_t>(prop->multiProcessorCount) * 32;
      const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks));
      pw_grad_input_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          gy.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (output_mask[1] || output_mask[2]) {
      const int64_t CK = s.Cout * s.K;
      const int64_t e_begin = output_mask[1] ? 0 : CK;
      const int64_t e_end = output_mask[2] ? CK + s.Cout : CK;
      const int64_t ET = kThreads;
      const int64_t tiles = (e_end - e_begin + ET - 1) / ET;
      TORCH_CHECK(s.B * GG <= std::numeric_limits<int32_t>::max() && tiles <= 65535, kBwd,
                  ": grid too large (", s.B * GG, " patches x ", tiles, " entry tiles)");
      const dim3 grid(static_cast<unsigned>(s.B * GG), static_cast<unsigned>(tiles));
      pw_grad_weight_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(),
          output_mask[1] ? gw.mutable_data_ptr<scalar_t>() : nullptr,
          output_mask[2] ? gb.mutable_data_ptr<scalar_t>() : nullptr, s, e_begin, e_end, ET);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyseg, CUDA, m) {
  m.impl("patchwise_conv2d", &patchwise_conv2d_cuda);
  m.impl("patchwise_conv2d_backward", &patchwise_conv2d_backward_cuda);
}

}  // namespace pyseg
