"""Per-kernel performance model of pyseg's GPU ops: floor (roofline) and the current CUDA design's prediction.

Every ``pyseg::<op>`` call of the registry models is captured on the meta device with the mechanism of
``pyseg.kernels._aot.op_calls`` (one eval forward per model at its registry input size, batch 1; plus the
``PatchWiseConv2d`` shapes it lists); backward calls follow from the forward shapes. For each call and
direction this prints:

* **MB**: the minimum bytes moved: every input tensor read once and every output written once, in the
  dtype of the run (int64 for labels); intermediates of a fused op are not counted (they can stay on chip).
* **GFLOP**: 2 per multiply-accumulate of the op's semantics (``pyseg/ops/reference``), 2 per per-channel
  affine element (mul + add), 7 per bilinear sample (4 mul + 3 add), 1 per other elementwise mul/add;
  clamps (ReLU/ReLU6), comparisons (argmax) and index arithmetic are not counted. The patch-wise conv counts
  every tap, zero padding included (as ``F.unfold`` does); the meta block counts pw1 on the 1-px halo
  (part of its semantics). Backward: gradients of every input; ops whose backward needs a pre-activation
  (meta_block, pointwise_block) recompute their forward (the op saves nothing), which is counted.
* **floor µs** = max(bytes / HBM bandwidth, FLOPs / peak) on the named GPU. Peak: fp32 FFMA (non-tensor)
  for float32 by default (``--fp32-path tf32``: the tf32 tensor-core peak for the GEMM-like ops), the dense
  bf16/fp16 tensor-core peak for bfloat16/float16; hmsa_fuse (bilinear gathers, no GEMM) always uses the
  FFMA peak.
* **pred/lf**: predicted over the floor of a *launched* kernel sequence, max(floor, kernels * LAUNCH_US): a
  floor below the launch latency (pointwise_block levels at 1-3 µs) cannot be approached by any separate
  kernel, only by fusing the op into a neighbour; ``pred/fl`` keeps the pure roofline.
* **predicted µs**: the current CUDA kernels (``csrc/cuda``, ``backend="cuda"``) as written, from a small
  model per kernel (see ``_KernelCost`` and the per-op ``_cuda_*`` functions; every factor is a named
  constant or a count read off the code, with the line/pattern it comes from). The Triton kernels are not
  modelled here.

``--measured FILE...`` merges medians from GPU runs: JSON written by ``bench_meta_block.py`` and
``bench_patchwise_conv2d.py`` (rows of the ``cuda`` backend at a shape in the table), or this script's own
format (``{"results": [{"op", "direction", "shape", "dtype", "median_us"}]}``, ``shape`` as printed).

    python benchmarks/roofline.py --gpu h100 --models hyperseg-m --dtype bfloat16
    python benchmarks/roofline.py --gpu h200 --measured out/suite/bench_meta_block_cuda_float32.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

try:
    import pyseg  # noqa: F401
except ImportError:  # a source checkout run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESOURCES = os.path.join(HERE, "results", "2026-12-01-cpu", "gpu_resources_full.json")

# ------------------------------------------------------------------------------------------------
# GPUs (SPEC.md section 8; the brief of issue 20)
# ------------------------------------------------------------------------------------------------
GPUS = {
    "h100": dict(name="H100 SXM", bw=3.35e12, fp32=67e12, tf32=495e12, bf16=990e12, l2_mb=50, sms=132,
                 smem_per_sm=228 * 1024, clock=1.98e9),  # 67 TFLOP/s = 132 SMs * 128 FMA/clk * 2 * 1.98 GHz
    "h200": dict(name="H200", bw=4.8e12, fp32=67e12, tf32=495e12, bf16=990e12, l2_mb=60, sms=132,
                 smem_per_sm=228 * 1024, clock=1.98e9),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ESIZE = {"float32": 4, "bfloat16": 2, "float16": 2}

# ------------------------------------------------------------------------------------------------
# Design-model constants (the named factors; each used by every kernel the same way)
# ------------------------------------------------------------------------------------------------
#: kernel launch + drain at batch 1 (an empty kernel in a stream costs ~2-3 us on Hopper).
LAUNCH_US = 2.5
#: L2 -> SM bandwidth as a multiple of HBM bandwidth (Hopper microbenchmarks: ~2-3x).
L2_X = 2.5
#: one SM sustains about this many times its 1/132 share of HBM/L2 bandwidth (few active SMs cannot
#: saturate the memory system: grids of 16 blocks run at 16*2/132 of it).
SM_BW_SHARE = 2.0
#: resident warps per SM needed to hide shared/L1 latency (~30 cycles) at one LSU op per cycle;
#: fewer resident warps stretch the SM's time by WARPS_TO_HIDE / resident.
WARPS_TO_HIDE = 16
#: instructions of one int64 division or modulo by a runtime value (a called subroutine in SASS); the
#: CUDA loops split their flat index with ``idx / hq, idx % hq`` (and ``p / ew, p % ew``) per work item.
INT64_DIV = 40
#: a 32-byte sector: a strided read ``src[n * G]`` (``stage_weights``, ``wb[e * GG]``) uses 1 element of it.
SECTOR = 32
#: per-SM pipes per cycle: 4 warp-instructions issued, 1 shared-memory wavefront / L1 load instruction.
ISSUE_PER_CLK, LSU_PER_CLK = 4, 1
#: SM cycles of one dense 16x16x16 fp16/bf16 (8192 FLOP) or 16x16x8 tf32 (4096 FLOP) wmma with all four
#: sub-partitions' tensor cores busy: 990 (495) TFLOP/s / 132 SMs / 1.98 GHz = 3787 (1894) FLOP/clk.
MMA_CLK = 8192 / 3787
#: cycles a block loses at a __syncthreads() (the slowest warp's last loads drain; ~ one L1/smem round trip
#: plus the tail of the loop before it) when no other block on the SM has work.
BARRIER_CLK = 120
#: registers/thread of meta_forward_mma_kernel (ptxas -Xptxas -v, sm_90: 122 (bf16), 124 (fp16), 128 (3xTF32, tf32)
#: under its __launch_bounds__(256, 2), no spills in any (sass_counts_46285b6.txt, gpu_resources_full.txt))
MMA_META_REGS = 128
#: SASS instructions of its tensor-core loops per step (one k-step of one 16x16 accumulator tile), by (operand
#: bytes, kSplit): the loop bodies of ptxas 13.0's sm_90 code (benchmarks/sass_counts.py; raw file
#: results/2026-12-01-cpu/sass_counts_46285b6.txt: loop instructions / steps). float runs on mma::Tf32A/B/C (two
#: mma.sync.m16n8k8 per 16x16x8 product: 2 HMMA.1688; A fragments by one LDSM, B by 4 LDS); fp16/bf16 on wmma
#: fragments (2 HMMA.16816 per product, PTX wmma.load.shared: LDSM). The loops carry their guards (nb, mine, k1),
#: pointer arithmetic and (3xTF32) the hi/lo splits (LOP3 + FADD per element), so a step is 7-40 instructions.
#:   pw1: the stage loop, one copy per block count nb = 1, 2, 3 (a column tile's k-step: 1 X fragment and nb
#:        W1' fragments loaded and split, all unconditional: the lane offsets are computed before the loop); the
#:        larger of the stage-loop and single-stage copies
#:   pw1_kept: the kept-W1' loop (per column tile: its k-steps, ReLU6 and fragment store included, and the
#:        accumulator's start, zero or t1 / the T1 block), the larger of the two copies
#:   pw2: the pw2 loop (per 16-channel block: a warp's <= 4 accumulator tiles, W3' reloaded when m changes);
#:   pw2_uniform: its copies for a warp whose tiles all lie in one row block (_pw2_warps: per > 0), one per
#:        tile count 1..4: W3' loaded once, every H2 fragment load unconditional (the larger of the two copies)
#:   pw1_pair: the paired pw1 loop (MmaGeom::pair1: 2 adjacent column tiles per warp; a k-step loads and splits
#:        2 X fragments and per block 1 W1' fragment used for both), one copy per pass of 1..kPairMax blocks
#:        (the single-stage copy's loops of 4 (2-block pass) and 2 (1-block pass) steps; where two loops of one
#:        step count could be either, the larger); the k-loop a do-while (no zero-trip copy)
#: (4, 1) is the tf32 variant (torch.backends.cuda.matmul.allow_tf32), not the default; (2, 1) the larger of
#: fp16 / bf16
META_MMA_STEP_ISSUE = {
    (4, 3): dict(pw1={1: 43.0, 2: 28.0, 3: 24.3}, pw1_kept=60.5, pw2=40.9,
                 pw2_uniform={1: 37.0, 2: 27.2, 3: 24.2, 4: 22.6}, pw1_pair={1: 30.5, 2: 20.2}),
    (4, 1): dict(pw1={1: 38.0, 2: 25.5, 3: 21.0}, pw1_kept=34.6, pw2=40.9,
                 pw2_uniform={1: 33.0, 2: 23.5, 3: 20.3, 4: 18.8}, pw1_pair={1: 25.5}),
    (2, 1): dict(pw1={1: 16.0, 2: 10.5, 3: 8.7}, pw1_kept=32.0, pw2=35.0,  # the larger of fp16 / bf16
                 pw2_uniform={1: 17.0, 2: 10.5, 3: 8.3, 4: 7.2}, pw1_pair={1: 11.0, 2: 6.5}),
}
#: SASS instructions of the pw1 tile loops outside their k-loops, per 16x16 accumulator tile (column tile x
#: 16-channel block), by (operand bytes, kSplit): the accumulator's start (float: 2 LDS by rows from t1 or zeros,
#: one path, and the register copies into the 8 accumulator registers; 16-bit: zero or the T1 block's wmma.load.c,
#: both paths in the listing: an upper bound), ReLU6 (2 FMNMX.NAN per element), the fragment's store to H1 (float:
#: 4 8-byte STS; 16-bit: wmma's store) and the tile loop's step and test: the `all-loops` body of the tile loop less
#: its k-loop, over the tiles x blocks of a pass (same raw file; single: a warp per tile, by block count, the larger
#: of the two copies; pair: per pass of 1..kPairMax blocks; where a loop of 2 steps could be either, by the source
#: lines of its tile loop). The model before
#: sass_counts_4b9b052 counted 16 + 11 (t1acc) here, against ~57-60 in that era's listing (sass_counts_fb3125a.txt:
#: 180 / 3, 227 / 4)
META_MMA_PW1_TILE = {
    (4, 3): dict(single={1: 39.0, 2: 39.0, 3: 35.0}, pair={1: 33.5, 2: 32.5}),
    (4, 1): dict(single={1: 39.0, 2: 35.5, 3: 34.3}, pair={1: 33.0}),
    (2, 1): dict(single={1: 60.0, 2: 51.0, 3: 49.3}, pair={1: 54.0, 2: 46.2}),
}
#: Warp-instructions of meta_forward_mma_kernel's staging loops, by operand size (4: float, 2: bf16/fp16, the
#: larger of the two), read off the SASS of the patch-major copies (benchmarks/sass_counts.py --all-loops; raw file
#: results/2026-12-01-cpu/sass_counts_2892df9.txt, the `all-loops` lines of <float, kSplit=3> and
#: <BFloat16, kSplit=1>; the loops are not unrolled, so a body's count is what one round executes):
#:   w1v, w3v: one round of W1' / W3''s real elements by 16-byte vectors (a row's 4 floats / 8 bf16: the row and
#:        column by a float reciprocal, one LDG scale, one 16-byte LDG, the multiplies, conversions, one 16-byte
#:        STS, loop); where the row length (Cin, hid) is not a multiple of the vector or the sub-array is not
#:        16-byte aligned, w1, w3: the scalar loop, one element per thread (LDG scale, LDG w, FMUL, convert, STS)
#:   w2v: one round of W2' by vectors (per element idx / 9 by a constant and its scale LDG; one 16-byte LDG, one
#:        or two 16-byte STS); w2 the scalar loop (2 LDG, FMUL, STS); aff: one round of t2, t3
#:   pad: one round of a padding loop (the largest of the four)
#:   t1: one round of the T1 tile (t1acc, 16-bit: LDG t1, one 16-byte STS of 4 copies); t1v: one round of t1
#:        itself (float: t1 where t1acc, else zeros: LDG, STS; sass_counts_4b9b052.txt, lines 439-439)
#:   xrow_px, xrow4: the ones/zero rows of X (once per block): per pixel round, per 4 rows (unrolled x4)
#:   x_px, x_ch8: the x tile (raw file results/2026-12-01-cpu/sass_counts_46285b6.txt, the x tile's all-loops; first
#:        measured on branch xst11, sass_counts_31ccd23.txt: 126 / 90 / 28 and 138 / 128 / 36): a warp round of 128 pixels (4 per lane, 32 apart) outside its channel loops (the 4 pixels'
#:        rows and columns by a float reciprocal, min/max reflects, one IMAD.WIDE address and selects each, the
#:        remainder loop's set-up, the loop tests: the outer body less the two channel loops), per 8 channels
#:        (32 loads, then 32 stores at one shared address per channel: float 32 cp.async (LDGSTS, in the
#:        <float, kSplit=3> copy the model's float32 uses; the tf32 copy's is 125), bf16/fp16 32 LDG + 32 STS (the
#:        larger of the two),
#:        the loads' 64-bit address steps); x_ch1 per remainder channel (Cin % 8: 4 copies), x_rem 0 (its
#:        set-up is in x_px)
META_MMA_STAGE_ISSUE = {
    4: dict(w1=17, w3=22, w1v=22, w3v=29, pad=21, w2=20, w2v=47, aff=11, t1v=10, xrow_px=30, xrow4=22,
            x_px=121, x_ch8=86, x_ch1=28, x_rem=0),
    2: dict(w1=20, w3=25, w1v=43, w3v=50, pad=23, w2=22, w2v=108, aff=12, t1=21, xrow_px=29, xrow4=26,
            x_px=147, x_ch8=116, x_ch1=34, x_rem=0),
}
#: SASS instructions of its depthwise stage (no HMMA: read off the disassembly of the same build as
#: META_MMA_STEP_ISSUE, `sass_counts.py --keep DIR` then nvdisasm; the larger of fp16 / bf16 and of tf32 / 3xTF32),
#: by operand bytes: ``row`` per output row of an item (both channels; by even tile width: 4 LDS.64 window loads,
#: 36 FFMA, 8 ReLU6 (mma::relu6: 2 FMNMX.NAN per output), 2 pair stores, addresses, the row guard; odd: 8 scalar
#: window loads, 4 stores and their guards; 16-bit H2: + the conversions), ``setup`` per item (loop test, the
#: div_small index split, the padding test, 20 tap/t2 loads, the first two window rows of both channels,
#: pointers, the loop-back; odd widths + 8 scalar loads), ``rcp`` per warp and tile (1 / ewp, hoisted out of the
#: stage loop); by (operand bytes, kSplit) as META_MMA_STEP_ISSUE. ``row``: sass_counts_fb3125a.txt's figures
#: (3xTF32, bf16) plus the item loop's change since, per 8 rows (ReLU6 from 3 instructions to 2, ptxas's register
#: allocation; the larger of the two copies, sass_counts_46285b6.txt: 3xTF32 even 808 -> 775, odd 765 -> 739; tf32
#: 807, 789; fp16/bf16 848 -> 847, 787 -> 805)
META_DW_ISSUE = {(4, 3): dict(row={True: 56.9, False: 65.8}, setup={True: 103, False: 111}, rcp=11),
                 (4, 1): dict(row={True: 60.9, False: 72.0}, setup={True: 103, False: 111}, rcp=11),
                 (2, 1): dict(row={True: 63.1, False: 76.1}, setup={True: 102, False: 110}, rcp=11)}
#: SASS instructions of its Y write-out, by operand bytes (raw file sass_counts_46285b6.txt): ``warp`` per warp
#: holding tiles (1 / mt3 and 1 / ew, IEEE divisions kept out of the tile loop by mma::opaque), ``tile`` per
#: accumulator tile (its fragment store to Y and the tile index, ~14, estimated: its instructions carry mma.cuh's
#: lines; the write-out loop's set-up: row block and column tile, the lane's pixel offset by div_small, its Y / t3
#: / y addresses), ``round`` per warp-wide row (LDS Y, LDS t3, FADD, 16-bit: the conversion, the predicated STG
#: (mma::store_if), the row test, per row pair the two 64-bit pointer steps and the loop's break test, ~10 / ~12
#: read off one row pair); tile + 8 round = 14 + the write-out loop of a 16-row tile: 139 instructions for float,
#: 151 for fp16 (bf16 149)
META_MMA_Y = {4: dict(warp=20, tile=73, round=10.0), 2: dict(warp=20, tile=69, round=12.0)}
#: output rows, columns and channels per thread of its depthwise stage (kDwRows, kDwCols; channels r and
#: r + nc/2 of a stage of nc)
DW_ROWS, DW_COLS, DW_CHANS = 8, 2, 2
#: cycles a barrier right after a block's global loads waits for them (first touch from HBM: Hopper's
#: load-to-use latency from DRAM is ~500-700 cycles; hmsa_fuse_tile_kernel's phase A, once per class)
LOAD_LATENCY_CLK = 600


def _bank_conflict(stride_words: int) -> int:
    """Ways of a shared-memory bank conflict when 32 lanes read 32 distinct words ``stride`` apart."""
    return math.gcd(int(stride_words), 32) if stride_words else 1


class _KernelCost:
    """One CUDA kernel launch: grid, resources, bytes (DRAM and L2->SM) and per-block SM cycles.

    time = LAUNCH_US + max(t_dram, t_l2, t_sm), where
      t_dram = dram / (BW * f), t_l2 = l2 / (L2_X * BW * f), f = min(1, active SMs * SM_BW_SHARE / SMs);
      t_sm   = ceil(blocks / SMs / blocks per SM) * cycles_per_block * max(1, WARPS_TO_HIDE / resident warps)
               / clock ... with the blocks resident on one SM sharing its pipes (see time_us);
    cycles_per_block = max(LSU wavefronts / LSU_PER_CLK, instructions / ISSUE_PER_CLK, tensor-core cycles
    ``tc``) + ``barriers`` * BARRIER_CLK + ``stall`` (barriers that wait for global loads); ``loop`` sums
    the first two, the tensor-core kernels add ``tc``.
    """

    def __init__(self, name: str, blocks: int, threads: int, smem: int = 0, regs: Optional[int] = None):
        self.name, self.blocks, self.threads, self.smem = name, max(1, int(blocks)), threads, smem
        self.regs = regs  # None: the committed ptxas table (_regs)
        self.dram = self.l2 = 0.0
        self.lsu = self.issue = 0.0  # per block, in warp-level units
        self.tc = 0.0  # per block: tensor-core cycles of the SM (all four sub-partitions)
        self.barriers = 0  # per block: __syncthreads() executed (each drains the block's pipelines)
        self.stall = 0.0  # per block: further cycles its barriers wait (global loads in flight), like barriers

    def loop(self, items: float, inner: float = 1, lsu: float = 0, issue: float = 1, overhead: float = 0,
             conflict: float = 1):
        """A block-stride loop over ``items`` work items (one per thread at a time), each running ``inner``
        iterations of ``lsu`` shared/L1 ops (times ``conflict`` wavefronts) and ``issue`` instructions,
        plus ``overhead`` instructions per item. Lanes of a partly filled warp still cost a full warp; in the
        last round only the warps holding items run the body (the others leave at the loop test)."""
        items = math.ceil(items)
        warps = items // self.threads * (self.threads // 32) + math.ceil(items % self.threads / 32)
        self.lsu += warps * inner * lsu * conflict
        self.issue += warps * (inner * issue + overhead)
        return self

    def time_us(self, gpu: dict) -> float:
        sms = gpu["sms"]
        bps = _blocks_per_sm(self.name, self.threads, self.smem, gpu, self.regs)
        active = min(sms, self.blocks)
        f = min(1.0, active * SM_BW_SHARE / sms)
        t_dram = self.dram / (gpu["bw"] * f)
        t_l2 = self.l2 / (L2_X * gpu["bw"] * f)
        per_sm = math.ceil(self.blocks / sms)
        resident = min(bps, per_sm) * self.threads / 32
        cycles = max(self.lsu / LSU_PER_CLK, self.issue / ISSUE_PER_CLK, self.tc)
        t_sm = per_sm * cycles * max(1.0, WARPS_TO_HIDE / resident) / gpu["clock"]
        # a barrier stalls its own block; co-resident blocks fill the gap, one block per SM cannot
        t_sm += math.ceil(per_sm / min(bps, per_sm)) * (self.barriers * BARRIER_CLK + self.stall) / gpu["clock"]
        return LAUNCH_US + 1e6 * max(t_dram, t_l2, t_sm)


_REGS: Optional[Dict[str, int]] = None


def _regs(kernel: str) -> int:
    """Registers/thread of a CUDA kernel from the committed resource table (ptxas, sm_90)."""
    global _REGS
    if _REGS is None:
        with open(RESOURCES) as f:
            rows = json.load(f)["rows"]
        _REGS = {r["kernel"]: int(r["regs"]) for r in rows if r["backend"] == "cuda"}
    return _REGS.get(kernel.split("(")[0], 32)  # "name(variant)": the table's kernel name


def _blocks_per_sm(kernel: str, threads: int, smem: int, gpu: dict, regs: Optional[int] = None) -> int:
    """Occupancy limit: registers (64K/SM), threads (2048), shared memory (+1 KB reserved/block), 32 blocks."""
    by_regs = 65536 // max(1, (regs or _regs(kernel)) * threads)
    by_smem = gpu["smem_per_sm"] // (smem + 1024) if smem else 32
    return max(1, min(by_regs, 2048 // threads, by_smem, 32))


# ------------------------------------------------------------------------------------------------
# shapes and helpers
# ------------------------------------------------------------------------------------------------
def _patch_sizes(n: int, g: int) -> List[int]:
    """Sizes of the g patches of n pixels: patch of i is floor(i*g/n) (pyseg/ops/reference patch_index)."""
    sizes = [0] * g
    for i in range(n):
        sizes[i * g // n] += 1
    return sizes


def _numel(shape) -> int:
    return int(math.prod(shape))


def _shape_str(*shapes) -> str:
    return " ".join("x".join(map(str, s)) for s in shapes)


# ------------------------------------------------------------------------------------------------
# op semantics: minimum bytes and FLOPs
# ------------------------------------------------------------------------------------------------
def patchwise_counts(x, w, has_bias, stride, padding, dilation, groups, esize):
    """(fwd bytes, fwd flops, bwd bytes, bwd flops, y shape) of pyseg::patchwise_conv2d."""
    B, Cin, H, W = x
    _, Cout, Cg, kh, kw, gh, gw = w
    Hout = (H + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wout = (W + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = (B, Cout, Hout, Wout)
    nb = B * Cout * gh * gw if has_bias else 0
    macs = _numel(y) * Cg * kh * kw
    t = (_numel(x) + _numel(w) + nb + _numel(y)) * esize
    fwd_flops = 2 * macs + (_numel(y) if has_bias else 0)
    # backward: read grad_y, x, w; write grad_x, grad_w, grad_bias; dX and dW are one MAC each per tap
    bwd_flops = 4 * macs + (_numel(y) if has_bias else 0)
    return t, fwd_flops, t, bwd_flops, y


def pointwise_counts(x, wflat, esize):
    """pyseg::pointwise_block: y = relu(scale * (W_patch x) + shift), weight (B, Cout*Cin, gh, gw)."""
    B, Cin, H, W = x
    Cout = wflat[1] // Cin
    y = B * Cout * H * W
    gemm = 2 * B * H * W * Cin * Cout
    fwd_b = (_numel(x) + _numel(wflat) + 2 * Cout + y) * esize
    fwd_f = gemm + 2 * y
    # backward: recompute z (GEMM + affine), dX (GEMM), dW (GEMM), d(scale) = sum g*z (2), d(shift) = sum g (1),
    # g*scale (1): read grad_y, x, w, scale, shift; write grad_x, grad_w, grad_scale, grad_shift
    bwd_b = (y + 2 * _numel(x) + 2 * _numel(wflat) + 4 * Cout) * esize
    bwd_f = 3 * gemm + 2 * y + 4 * y
    return fwd_b, fwd_f, bwd_b, bwd_f, (B, Cout, H, W)


def meta_counts(x, wflat, hid, Cout, esize):
    """pyseg::meta_block (per patch: pw1 on patch+halo, dw 3x3, pw2; an affine after each stage)."""
    B, Cin, H, W = x
    gh, gw = wflat[2], wflat[3]
    A = 2 * hid + Cout
    halo = sum((a + 2) * (b + 2) for a in _patch_sizes(H, gh) for b in _patch_sizes(W, gw))  # sum of haloed areas
    P = H * W
    fwd_f = B * (2 * hid * Cin * halo + 2 * hid * halo + 2 * 9 * hid * P + 2 * hid * P + 2 * Cout * hid * P
                 + 2 * Cout * P)
    y = B * Cout * H * W
    fwd_b = (_numel(x) + _numel(wflat) + 2 * A + y) * esize
    # backward = recomputed forward + per stage: grad of its input (same MACs) and of its weights (same MACs),
    # affine grads 4 per element (g*z, two sums, g*s); the haloed grad_x is summed into grad_x (Cin*(halo-P) adds)
    bwd_f = fwd_f + 2 * (fwd_f - B * (2 * hid * halo + 2 * hid * P + 2 * Cout * P)) \
        + B * 4 * (hid * halo + hid * P + Cout * P) + B * Cin * (halo - P)
    bwd_b = (y + 2 * _numel(x) + 2 * _numel(wflat) + 4 * A) * esize
    return fwd_b, fwd_f, bwd_b, bwd_f, (B, Cout, H, W)


def hmsa_counts(logits, atts, scales, out_size, labels, scale_sizes, esize):
    """pyseg::hmsa_fuse following the reference's order (pyseg/ops/reference/hmsa_fuse.py): every resize
    is a bilinear sample per output element (7 flops), every gate a*p (1), 1-a (1), (1-a)*q (1), + (1)."""
    B, C = logits[0][:2]
    order = sorted(range(len(scales)), key=lambda i: -float(scales[i]))
    flops = 0
    pred = None
    for i in order:
        size = tuple(logits[i][-2:])
        if scale_sizes is not None and tuple(scale_sizes[i]) != size:
            size = tuple(scale_sizes[i])
            flops += 7 * B * C * _numel(size)
        if pred is None:
            pred = size
            continue
        att = tuple(atts[i][-2:])
        if att != size:
            flops += 7 * B * _numel(size)
        if float(scales[i]) >= 1.0:
            down = 7 * B * C * _numel(size) if pred != size else 0
            flops += down + B * C * _numel(size) * 3 + B * _numel(size)  # a*p, (1-a)*D, +; 1-a per pixel
            pred = size
        else:
            n = _numel(pred)
            flops += B * C * _numel(size) + 7 * B * C * n + 7 * B * n + B * n + 2 * B * C * n
    if pred != tuple(out_size):
        flops += 7 * B * C * _numel(out_size)
    reads = sum(_numel(s) for s in logits) + sum(_numel(a) for i, a in enumerate(atts) if i != order[0])
    out = B * _numel(out_size) * 8 if labels else B * C * _numel(out_size) * esize
    return reads * esize + out, flops


def hmsa_bwd_counts(g, p1, pl, al, esize):
    """Two-scale training form backward (grad of p1, p_low, a_low from grad at out_size): read g, p1, pl, al,
    write their gradients; flops: the adjoint of every forward operation (2x the two-scale forward)."""
    B, C = p1[:2]
    _, fwd_f = hmsa_counts([p1, pl], [(0,), al], [1.0, 0.5], g[-2:], False, None, esize)
    return (_numel(g) + 2 * (_numel(p1) + _numel(pl) + _numel(al))) * esize, 2 * fwd_f


# ------------------------------------------------------------------------------------------------
# the current CUDA design (csrc/cuda), one function per op and direction -> [_KernelCost]
# ------------------------------------------------------------------------------------------------
def _meta_plan(PH, PW, Cin, hid, Cout, N, backward):
    """plan_tiles (csrc/cuda/meta_block.cu:44): largest T in 32..1 whose smem (float accumulators) fits
    100 KB, then 227 KB; weights in smem first."""
    A = 2 * hid + Cout
    for budget in (100 * 1024, 227 * 1024):
        for wsmem in (True, False):
            for T in (32, 16, 8, 4, 2, 1):
                th, tw = min(T, PH), min(T, PW)
                if backward:
                    e = (2 * N if wsmem else 0) + 2 * A + (Cin + 2 * hid) * (th + 2) * (tw + 2) + 2 * (hid + Cout) * th * tw
                else:
                    e = (N if wsmem else 0) + (Cin + hid) * (th + 2) * (tw + 2) + hid * th * tw
                if 4 * e <= budget:
                    return th, tw, wsmem, 4 * e
    raise ValueError("meta_block: channels too large for shared memory")


#: kLdT1 (meta_block_kernels.cuh): the row stride, floats, of the pw1 accumulators' T1 tile (t1acc)
T1_LD = 24


def _mma_geometry(Cin, hid, Cout, th, tw, esize, k, hc=16):
    """mma_geometry (csrc/cuda/meta_block_kernels.cuh): padded MMA extents and shared-memory bytes; hc hidden
    channels per stage (H1 and H2 hold one stage)."""
    up = lambda v, m: -(-v // m) * m  # noqa: E731
    pad, bpad = 16 // esize, 8  # row padding of the A operands (16 bytes) and of the B operands (8 elements)
    # k1: Cin padded to the MMA depth; t1 rides on a ones row of X in that padding, or where there is none
    # (t1acc: Cin a multiple of k) starts the pw1 accumulators from t1 (float: m1 floats, read by rows) or a T1
    # tile (16-bit: m1 rows, stride T1_LD floats)
    k1, m1, m3 = up(Cin, k), up(hid, 16), up(Cout, 16)
    t1acc = k1 == Cin
    nq, np_ = up((th + 2) * (tw + 2), 16), up(th * tw, 16)
    regions = [m1 * (k1 + pad) * esize, m3 * (m1 + pad) * esize, 9 * hid * 4, (hid + Cout) * 4,
               m1 * 4 if esize == 4 else m1 * T1_LD * 4 if t1acc else 0,
               k1 * (nq + bpad) * esize, max(hc * _dw_ldh1(nq, tw), m3 * (np_ + 8)) * 4,
               hc * (np_ + bpad) * esize]
    return dict(k1=k1, t1acc=t1acc, m1=m1, m3=m3, nq=nq, np=np_, hc=hc, ldh2=np_ + bpad,
                bytes=sum(up(r, 128) for r in regions), pair1=False)


def _a1_depth(k, split):
    """kA1Depth<K, kSplit> (meta_block_kernels.cuh): the deepest W1' a warp keeps in registers across its tiles."""
    return 48 if k == 16 else 40 if split == 1 else 0


def _pair_max(k, split, single):
    """kPairMax<K, kSplit, kSingle> (meta_block_kernels.cuh): the most 16-channel blocks of a paired pw1 pass (2
    column tiles per warp) that fit the registers; single: plans of one stage (pw2 accumulators not yet live)."""
    return 0 if not single else 2 if k == 16 or split == 3 else 1


def _mma_plan(PH, PW, Cin, hid, Cout, esize, k, split=1):
    """plan_mma (csrc/cuda/meta_block.cu): the largest tile of T x T or T/2 x T (T = 32..1, clipped to the
    patch) whose pw2 accumulators fit (m3/16 * np/16 <= 8 warps * 4 tiles) and whose smem fits 113 KB
    (two blocks per SM), then 227 KB; per tile the widest stage of hc = 48, 32, 16 hidden channels that
    fits (hc > 16 only where no warp keeps W1' fragments across several column tiles: k1 > kA1Depth or
    nq/16 <= 8 warps); pair1: pw1 over pairs of column tiles wherever W1' is not kept and the tile has 2 or
    more; None: the CUDA-core kernel runs."""
    shapes = ((32, 32), (16, 32), (16, 16), (8, 16), (8, 8), (4, 8), (4, 4), (2, 4), (2, 2), (1, 2), (1, 1))
    m1 = -(-hid // 16) * 16
    for budget in (113 * 1024, 227 * 1024):
        for sh, sw in shapes:
            th, tw = min(sh, PH), min(sw, PW)
            for hc in (48, 32, 16):
                if hc > 16 and hc > m1:
                    continue
                g = _mma_geometry(Cin, hid, Cout, th, tw, esize, k, hc)
                if hc > 16 and g["k1"] <= _a1_depth(k, split) and g["nq"] // 16 > 8:
                    continue
                if (g["m3"] // 16) * (g["np"] // 16) <= 8 * 4 and g["bytes"] <= budget:
                    # pw1 without kept W1' fragments: a warp per pair of adjacent column tiles (MmaGeom::pair1)
                    g["pair1"] = not (hc == 16 and g["k1"] <= _a1_depth(k, split)) and g["nq"] // 16 >= 2
                    return th, tw, g
    return None


def _wavefronts(addrs, width: int = 4) -> int:
    """Shared-memory wavefronts of one warp access of ``width`` bytes per lane at byte addresses ``addrs``
    (lane order): per group of lanes served together (all 32 for 4-byte accesses, half-warps of 16 for
    8-byte ones), the most distinct 4-byte words in one of the 32 banks (lanes reading the same word
    share it); the groups add up."""
    group = 32 if width <= 4 else 16
    total = 0
    for g0 in range(0, len(addrs), group):
        per_bank: Dict[int, set] = {}
        for a in addrs[g0:g0 + group]:
            for w in range(a // 4, (a + max(width, 4) - 1) // 4 + 1):
                per_bank.setdefault(w % 32, set()).add(w)
        total += max(len(v) for v in per_bank.values())
    return total


def _dw_lanes(eh, ew, nc=16):
    """Items of the first warp of meta_forward_mma_kernel's depthwise stage over nc hidden channels: lane ->
    (channel row r, row block rb, first column j) of the item's first channel (its second, r + nc/2, reads
    and writes the same banks): idx = lane, jp = idx % ewp, r = idx / ewp % (nc/2), rb = idx / ewp / (nc/2),
    j = DW_COLS * jp (kernel's ``for (int idx = tid; idx < nh2 * nrb * ewp; ...)``)."""
    nrb, ewp, nh2 = -(-eh // DW_ROWS), -(-ew // DW_COLS), nc // DW_CHANS
    out = []
    for lane in range(min(32, nh2 * nrb * ewp)):
        jp, rest = lane % ewp, lane // ewp
        out.append((rest % nh2, rest // nh2, DW_COLS * jp))
    return out


def _dw_ldh1(nq, tw):
    """H1's row stride (mma_geometry): round_up(nq, 32) + (2 ceil(tw/2) mod 32, rounded up to 4; else 4)."""
    dww = (DW_COLS * -(-tw // DW_COLS)) % 32
    return -(-nq // 32) * 32 + (-(-dww // 4) * 4 if dww else 4)


def _dw_conflict(eh, ew, ldh1, nc=16):
    """Wavefronts of one window-row load of the depthwise stage (float H1): even ew, two 8-byte loads (pair
    j, j+1 and j+2, j+3); odd ew, four 4-byte loads. Lane reads r*ldh1 + rb*DW_ROWS*(ew + 2) + j (+ the
    column offset)."""
    base = [4 * (r * ldh1 + rb * DW_ROWS * (ew + 2) + j) for r, rb, j in _dw_lanes(eh, ew, nc)]
    if ew % 2 == 0:
        return sum(_wavefronts([a + 8 * c for a in base], 8) for c in range(2))
    return sum(_wavefronts([a + 4 * c for a in base]) for c in range(4))


def _dw_store_conflict(eh, ew, ldh2, esize, nc=16):
    """Wavefronts of one row's H2 stores (operand type, row stride ldh2 elements): even ew, one 2-element
    store per lane at element r*ldh2 + rb*DW_ROWS*ew + j; odd ew, two 1-element stores."""
    base = [esize * (r * ldh2 + rb * DW_ROWS * ew + j) for r, rb, j in _dw_lanes(eh, ew, nc)]
    if ew % 2 == 0:
        return _wavefronts(base, 2 * esize)
    return sum(_wavefronts([a + esize * c for a in base], esize) for c in range(2))


def _pw2_warps(mt3, nt3):
    """meta_forward_mma_kernel's pw2 tiles (n * mt3 + m) over its 8 warps: (per, [row blocks m of each warp's
    tiles]). per: the smallest of 2..4 with mt3 * ceil(nt3 / per) <= 8, warp w taking the column tiles
    n = (w // mt3) per + i < nt3 of row block w % mt3; none (per 0): tiles w + 8 i."""
    per = next((p for p in range(max(2, -(-mt3 * nt3 // 8)), 5) if mt3 * -(-nt3 // p) <= 8), 0)
    if per:
        return per, [[w % mt3] * max(0, min(per, nt3 - w // mt3 * per)) for w in range(8)]
    return 0, [[(w + 8 * i) % mt3 for i in range(4) if w + 8 * i < mt3 * nt3] for w in range(8)]


def _cuda_meta_mma(x, wflat, hid, Cout, esize, plan, split):
    """meta_forward_mma_kernel (csrc/cuda/meta_block_kernels.cuh), patch-major weights (what the models
    emit on CUDA): one 256-thread block per (sample, patch), ``__launch_bounds__(256, 2)``. The weights are
    staged once with the first two affines' scales folded in (W1' = s1 W1 with t1 as an extra column
    against a row of ones in X where Cin is not a multiple of the MMA depth, else t1 starting the pw1
    accumulators from a T1 tile; W2' = s2 W2, W3' = s3 W3); per tile the haloed x tile is staged once, then
    per stage of hc = 16, 32 or 48 hidden channels (the plan's widest that fits; 2 barriers each): pw1 on
    the tensor cores (a warp per 16-px column tile; in 16-channel stages the W1' fragments kept in
    registers across a warp's tiles when k1 <= kA1Depth, else the warp computes all of the stage's
    16-channel blocks, loading and splitting each X fragment once per k-step, over pairs of adjacent column
    tiles where the plan pairs them (pair1: each W1' fragment loaded and split once for both tiles, in passes
    of up to kPairMax blocks; an odd last tile alone); ReLU6 on the accumulator fragments), the depthwise
    3x3 with a thread per (2 channels r and r + nc/2, 2 columns, 8 rows) sliding a 3x4 window per channel
    (unrolled: no register moves), pw2 on the tensor cores into per-warp register accumulators (2-4 column
    tiles of one row block per warp where they fit 8 warps, else W3' fragments reloaded only when a warp's
    row block changes); each warp stores its own Y tiles to shared
    memory and writes them out (+ t3, at precomputed pixel offsets) without a barrier: 1 + 2 per stage
    per tile. Each wmma operand load is 4 shared-memory wavefronts (512 B) against
    ~2.2 tensor cycles per step, so the LSU and issue slots, not the tensor cores, bound it; the HBM
    traffic is x + weights + y once (halo re-reads hit L2). Per tile and stage the counts below read off
    the stage loop (``for (int k0 = 0; k0 < g.m1; k0 += g.hc)``)."""
    B, Cin, H, W = x
    N, gh, gw = wflat[1], wflat[2], wflat[3]
    G = gh * gw
    PH, PW = max(_patch_sizes(H, gh)), max(_patch_sizes(W, gw))
    th, tw, g = plan
    K = 16 if esize == 2 else 8
    kfrag = g["k1"] // K                     # pw1 k-steps
    keep_a1 = g["k1"] <= _a1_depth(K, split)  # kA1Depth<K, kSplit>
    k = _KernelCost("meta_forward_mma_kernel", B * G, 256, g["bytes"], regs=MMA_META_REGS)
    # staging (META_MMA_STAGE_ISSUE, from the SASS): the real elements of W1' (hid x Cin) and W3' (Cout x hid) a
    # thread per element in source order (LDG scale, LDG w, STS), then their padding: columns up to k1 / m1 of
    # every row (W1''s t1 column: a predicated LDG), rows up to m1 / m3 (zero); W2' and the shifts a thread per
    # element; t1 (t1acc, float: per channel an LDG and STS) or the T1 tile (16-bit: per 4 copies an LDG and one
    # 16-byte STS, 4 wavefronts); X's rows
    # Cin..k1 - 1 (ones, zeros; !t1acc), once per block: per haloed pixel and row an STS
    st = META_MMA_STAGE_ISSUE[esize]
    # by 16-byte vectors of V elements (kVec) where the kernel's block-uniform test passes: patch-major (what the
    # models emit on CUDA; one patch per sample: always) with the sub-array 16-byte aligned in every block (N * esize
    # and its offset multiples of 16; where only some blocks are aligned all are counted scalar, the worst block)
    # and a row length that is a multiple of V; per vector round an LDG scale, a 16-byte LDG and a 16-byte STS
    # (4 wavefronts each), W2''s a scale LDG per element
    V = 16 // esize

    def vec(off, cols):
        return cols % V == 0 and N * esize % 16 == 0 and off * esize % 16 == 0

    for rows, cols, off, name in ((hid, Cin, 0, "w1"), (Cout, hid, hid * (Cin + 9), "w3")):
        if vec(off, cols):
            k.loop(rows * cols // V, lsu=1 + 4 + 4, issue=st[name + "v"])
        else:
            k.loop(rows * cols, lsu=3, issue=st[name])
    for items in (g["m1"] * (g["k1"] - Cin), (g["m1"] - hid) * Cin, g["m3"] * (g["m1"] - hid), (g["m3"] - Cout) * hid):
        if items:
            k.loop(items, lsu=2, issue=st["pad"])
    if vec(hid * Cin, 9 * hid):
        k.loop(9 * hid // V, lsu=2 * V + 4, issue=st["w2v"])  # V scale LDG, a 16-byte LDG, V / 4 16-byte STS
    else:
        k.loop(9 * hid, lsu=3, issue=st["w2"])
    k.loop(hid + Cout, lsu=2, issue=st["aff"])
    if esize == 4:  # float: the accumulators' start vector (t1 or zeros: an LDG where t1acc, an STS)
        k.loop(g["m1"], lsu=2, issue=st["t1v"])
    elif g["t1acc"]:  # 16-bit: the T1 tile
        k.loop(g["m1"] * 4, lsu=1 + 4, issue=st["t1"])
    xw = math.ceil(g["nq"] / 32)  # warp rounds over the haloed tile's (padded) pixels
    if g["k1"] > Cin:
        k.lsu += xw * (g["k1"] - Cin)
        k.issue += xw * (st["xrow_px"] + math.ceil((g["k1"] - Cin) / 4) * st["xrow4"])
    tiles = [(min(th, PH - i), min(tw, PW - j)) for i in range(0, PH, th) for j in range(0, PW, tw)]
    hc = g["hc"]
    stages = [min(hc, g["m1"] - k0) // 16 for k0 in range(0, g["m1"], hc)]  # 16-channel blocks per stage
    halo_px = 0
    for eh, ew in tiles:
        hq, tp = (eh + 2) * (ew + 2), eh * ew
        halo_px += hq
        k.barriers += 1 + 2 * len(stages)
        # x tile: a warp round per 128 haloed pixels (nq; lane l the pixels l + 32 j, j < 4): the 4 pixels'
        # reflected addresses once, then per image channel 4 copies (8 channels a round, the remainder one by
        # one). LSU per channel and 32-pixel slot: float one cp.async (LDG + STS in one: both its read and its
        # shared write, counted 2) in the slots with a pixel below nq (the others predicated off); bf16/fp16
        # an LDG in every slot (those past nq load the zero word) and an STS in the slots below nq
        xr, xs32 = math.ceil(g["nq"] / 128), math.ceil(g["nq"] / 32)
        k.lsu += Cin * (2 * xs32 if esize == 4 else 4 * xr + xs32)
        k.issue += xr * (st["x_px"] + Cin // 8 * st["x_ch8"] + (st["x_rem"] + Cin % 8 * st["x_ch1"] if Cin % 8 else 0))
        nt1, nt3 = math.ceil(hq / 16), math.ceil(tp / 16)
        mt3 = g["m3"] // 16
        busy1 = min(8, nt1)  # warps with a pw1 column tile
        # pw2 W3' loads: per warp, the row-block changes along its tiles (kernel: m != mprev; once per warp
        # with per > 0)
        per_w, warp_ms = _pw2_warps(mt3, nt3)
        a3_loads = sum(sum(1 for i, m in enumerate(ms) if i == 0 or m != ms[i - 1]) for ms in warp_ms)
        warp_tiles = [len(ms) for ms in warp_ms]  # pw2 tiles per warp (uniform loop copies where per > 0)
        for nb in stages:
            kept = keep_a1 and hc == 16                # kernel: keep_a1 (one-block stages only)
            steps1 = nb * nt1 * kfrag                   # pw1: wmma k-steps (nb blocks x column tiles x k)
            steps3 = nb * mt3 * nt3 * (16 // K)         # pw2 (per 16-channel block of the stage)
            a3 = nb * a3_loads * (16 // K)              # W3' fragment loads
            per = META_MMA_STEP_ISSUE[(esize, split)]
            # instructions per step as the SASS shows them (META_MMA_STEP_ISSUE: loads, lane addressing,
            # 3xTF32 splits, HMMA, guards, loop); the stage loop's ReLU6 and store of each pw1 accumulator
            # fragment (8 elements, 2 instructions each) outside it; the kept loop's count includes them
            if kept:
                a1, b1 = busy1 * kfrag, nt1 * kfrag     # W1' loads once per busy warp; X per tile and k-step
                k.issue += steps1 * per["pw1_kept"]
            else:
                # pairs (g.pair1): npair pairs of column tiles, in passes of <= kPairMax blocks (pw1_pair: per
                # step of the 2-tile loop), each k-step 2 X and per block 1 W1' fragment; the other tiles one
                # per warp over all nb blocks (pw1: 1 X and nb W1' fragments per k-step)
                kp = _pair_max(K, split, len(stages) == 1)
                passes = [p for p in (min(kp, nb), nb - min(kp, nb)) if p]  # kFirst blocks, then the rest
                # kernel: kPays (each pass <= kPairMax blocks, fewer fragment loads than single tiles)
                pays = kp > 0 and passes[-1] <= kp and 2 * len(passes) < 2 + nb
                npair = nt1 // 2 if g["pair1"] and pays else 0
                single = nt1 - 2 * npair
                passes = passes if npair else []
                b1 = (single + 2 * npair * len(passes)) * kfrag
                a1 = (nb * single + nb * npair) * kfrag
                # per accumulator tile outside the k-loop: its start, ReLU6, H1 store, the tile loop
                # (META_MMA_PW1_TILE, from the SASS)
                ep = META_MMA_PW1_TILE[(esize, split)]
                k.issue += nb * single * (kfrag * per["pw1"][nb] + ep["single"][nb])
                k.issue += sum(p * 2 * npair * (kfrag * per["pw1_pair"][p] + ep["pair"][p]) for p in passes)
            k.lsu += (a1 + b1 + a3 + steps3) * 4 + nb * nt1 * 8  # A, B fragment loads (4 each); H1 stores
            if esize == 4:  # each pw1 accumulator starts by rows (2 LDS, 8 distinct words: 2 wavefronts)
                k.lsu += nb * nt1 * 2
            elif g["t1acc"]:  # 16-bit: from its T1 block (1 KB, 8 wavefronts)
                k.lsu += nb * nt1 * 8
            for t in warp_tiles:
                if t:
                    k.issue += nb * t * (16 // K) * (per["pw2_uniform"][t] if per_w else per["pw2"])
            k.tc += (steps1 + steps3) * split * MMA_CLK
            # dw: per (2 columns, 2 channels, DW_ROWS-row block) item its setup and per output row both
            # channels' window rows, FFMA, ReLU6 and stores (META_DW_ISSUE, from the SASS; the zero rows of
            # padded channels, last stage only, left out); wavefronts of the window loads (even ew: 2 8-byte
            # LDS per channel, else 4 scalar) and H2 stores (even: 1 pair, else 2) from the first warp's
            # addresses (_dw_conflict, _dw_store_conflict: the second channel's, nc/2 rows further, the same),
            # per item 2 x 10 broadcast tap/t2 loads and the first two window rows
            rows = min(DW_ROWS, eh)
            even = ew % 2 == 0
            dwi = META_DW_ISSUE[(esize, split)]
            cl = _dw_conflict(eh, ew, _dw_ldh1(g["nq"], tw), 16 * nb)
            cs = _dw_store_conflict(eh, ew, g["ldh2"], esize, 16 * nb)
            items = 16 * nb // DW_CHANS * math.ceil(eh / DW_ROWS) * math.ceil(ew / DW_COLS)
            k.loop(items, rows, lsu=DW_CHANS * (cl + cs), issue=dwi["row"][even], overhead=dwi["setup"][even])
            k.loop(items, lsu=DW_CHANS * (10 + 2 * cl))
        k.issue += 8 * META_DW_ISSUE[(esize, split)]["rcp"]  # every warp: 1 / ewp once per tile
        # Y: per 16x16 accumulator tile its warp's fragment store (8 wavefronts: 1 KB, conflict-free at
        # ldy = np + 8), the lane's pixel offset (div_small), then per pair of rounds (rows 4j, 4j + 1 of either
        # half-warp; the pairs past Cout skipped) per round LDS Y, LDS t3, FADD, convert, a predicated STG, the
        # row test and the stepped address; per warp with tiles two reciprocals (META_MMA_Y, from the SASS)
        for m in range(mt3):
            rounds = 2 * sum(1 for j in range(4) if 16 * m + 4 * j < Cout)
            k.lsu += nt3 * (8 + 2 * rounds)
            k.issue += nt3 * (META_MMA_Y[esize]["tile"] + META_MMA_Y[esize]["round"] * rounds)
        k.issue += sum(1 for w in warp_tiles if w) * META_MMA_Y[esize]["warp"]
    xb, yb, wb = _numel(x) * esize, B * Cout * H * W * esize, _numel(wflat) * esize
    k.dram = xb + wb + yb
    k.l2 = xb * halo_px / (PH * PW) + wb + yb
    return [k]


def _cuda_meta(x, wflat, hid, Cout, esize, backward):
    B, Cin, H, W = x
    N, gh, gw = wflat[1], wflat[2], wflat[3]
    PH, PW = max(_patch_sizes(H, gh)), max(_patch_sizes(W, gw))
    if not backward:
        # float32: 3xTF32 (torch.backends.cuda.matmul.allow_tf32 off, PyTorch's default)
        split = 3 if esize == 4 else 1
        plan = _mma_plan(PH, PW, Cin, hid, Cout, esize, 16 if esize == 2 else 8, split)
        if plan is not None:
            return _cuda_meta_mma(x, wflat, hid, Cout, esize, plan, split)
    th, tw, wsmem, smem = _meta_plan(PH, PW, Cin, hid, Cout, N, backward)
    ntile = math.ceil(PH / th) * math.ceil(PW / tw)
    hq, tp = (th + 2) * (tw + 2), th * tw
    G = gh * gw
    name = "meta_backward_kernel" if backward else "meta_forward_kernel"
    k = _KernelCost(name, B * G, 256, smem)  # meta_block_kernels.cuh: one 256-thread block per (sample, patch)
    # stage_weights: N strided reads src[n * G] -> one 32-B sector per element through L2 (kernels.cuh:47)
    k.loop(N, lsu=1, issue=6)
    k.l2 += B * G * N * SECTOR
    for _ in range(ntile):
        # load_tile: idx / hq, idx % hq, q / hw, q % hw (4 int64 divs) + reflect per element (kernels.cuh:55)
        k.loop(Cin * hq, lsu=2, issue=4, overhead=4 * INT64_DIV)
        if not backward:
            # pw1: 2 LDS per FMA (w1[c] broadcast, xh[c*hq+q] consecutive), no register blocking (:104)
            k.loop(hid * hq, Cin, lsu=2, issue=3, overhead=2 * INT64_DIV + 8)
            # dw: 9 taps, 2 LDS each; 4 int64 divs per item (idx/tp, idx%tp, p/ew, p%ew) (:112)
            k.loop(hid * tp, 9, lsu=2, issue=3, overhead=4 * INT64_DIV + 8)
            # pw2: 2 LDS per FMA, result straight to global y (:121)
            k.loop(Cout * tp, hid, lsu=2, issue=3, overhead=4 * INT64_DIV + 10)
            continue
        # backward (kernels.cuh:180-300): recompute z1, z2, z3 then the gradients per tile
        k.loop(hid * hq, Cin, lsu=2, issue=3, overhead=2 * INT64_DIV)                    # z1
        k.loop(hid * tp, 9, lsu=2, issue=6, overhead=4 * INT64_DIV)                      # z2 (affine+relu6 per tap)
        k.loop(Cout * tp, hid, lsu=4, issue=8, overhead=2 * INT64_DIV)                   # z3: scale/shift LDG per k
        # per-channel partials: one thread per channel walks tp pixels, lanes tp words apart (:218)
        k.loop(Cout, tp, lsu=3, issue=8, conflict=_bank_conflict(tp))
        # grad W3: lanes = consecutive k reading z2[k*tp + p] (stride tp) (:231)
        k.loop(Cout * hid, tp, lsu=1 + _bank_conflict(tp), issue=6, overhead=2 * INT64_DIV)
        k.loop(hid * tp, Cout, lsu=2, issue=3, overhead=2 * INT64_DIV)                   # g2
        k.loop(hid, tp, lsu=3, issue=8, conflict=_bank_conflict(tp))                      # stage-2 partials
        # grad W2: two int64 divs per pixel (p / ew, p % ew) inside the loop, lanes ~4 channels apart (:258)
        k.loop(hid * 9, tp, lsu=2, issue=8 + 2 * INT64_DIV, conflict=4, overhead=2 * INT64_DIV)
        k.loop(hid * hq, 9, lsu=2, issue=6, overhead=4 * INT64_DIV)                      # g1 (bounds per tap)
        k.loop(hid, hq, lsu=3, issue=8, conflict=_bank_conflict(hq))                      # stage-1 partials
        # grad W1: lanes = consecutive c reading xh[c*hq + q] (stride hq) (:290)
        k.loop(hid * Cin, hq, lsu=1 + _bank_conflict(hq), issue=4, overhead=2 * INT64_DIV)
        k.loop(Cin * hq, hid, lsu=2, issue=3, overhead=4 * INT64_DIV + 10)               # haloed grad_x (RMW)
    xb, yb = _numel(x) * esize, B * Cout * H * W * esize
    gxbuf = B * G * Cin * (PH + 2) * (PW + 2) * 4
    if not backward:
        k.dram = xb + _numel(wflat) * esize + yb
        k.l2 += xb * hq / tp + yb  # halo re-read per tile
        return [k]
    # grad_weight stored strided dst[n * G]: one sector per element (:307); gxbuf read-modify-write per tile
    k.dram = 2 * xb + yb + 2 * _numel(wflat) * esize + 2 * gxbuf
    k.l2 += xb * hq / tp + yb + B * G * N * SECTOR + 2 * gxbuf
    zero = _KernelCost("at::zeros(gxbuf)", math.ceil(gxbuf / 4 / 256), 256)  # meta_block.cu: gxbuf = at::zeros
    zero.dram = zero.l2 = gxbuf
    zero.loop(256, issue=4)
    A = 2 * hid + Cout
    red = _KernelCost("reduce_partials_kernel", math.ceil(2 * A / 128), 128)  # sums B*G partials per thread
    red.loop(128, B * G, lsu=1, issue=4)
    red.dram = red.l2 = B * G * 2 * A * 4
    gat = _KernelCost("gather_grad_x_kernel", math.ceil(_numel(x) / 256), 256)  # thread per input element
    gat.loop(256, 4, lsu=1, issue=10, overhead=8 * INT64_DIV + 40)  # halo_readers + index splits
    gat.dram = gxbuf + xb
    gat.l2 = gxbuf + xb
    return [zero, k, red, gat]


#: pointwise_block_kernels.cuh: kPwOC output channels and kPwTP pixels per block at most, (channel, quad)
#: items per thread, input channels per staged chunk (pw_kc: 256 B of a row, 64 floats).
PWB_OC, PWB_TP, PWB_ITEMS, PWB_KC = 64, 64, 4, 64
#: registers/thread of pointwise_forward_kernel (ptxas -Xptxas -v, sm_90, CUDA 13.0, torch's nvcc flags:
#: float/half/bfloat16 under its __launch_bounds__(256, 4), no spills; without the bound ptxas took 125)
PWB_FWD_REGS = 64
#: instructions of one int32 division or modulo by a runtime value (inline: reciprocal + fix-up)
PWB_INT32_DIV = 20
#: warp-instructions of warp 0's block preamble: the patch geometry in int32 (four patch_begin_as<int>
#: divisions, blockIdx / ntiles, patch / gw) and the base pointers; the other warps wait at the barrier
PWB_PREAMBLE = 6 * PWB_INT32_DIV + 40


def _pw_row_bytes(H, W, gh, gw, esize):
    """L2 bytes of reading (or writing) one channel plane of x (y) patch by patch: each patch row is a
    segment of pw elements, at least one 32-B sector."""
    return sum(ph * max(pw * esize, SECTOR) for ph in _patch_sizes(H, gh) for pw in _patch_sizes(W, gw))


def _pw_block_plan(B, G, npx, Cout, sms):
    """launch_pointwise_forward (pointwise_block.cu): pixels per tile (a power of two covering a patch
    of up to PWB_TP px) and output channels per block (up to PWB_OC), halved -- channels first, down to
    16 each -- while the grid has under two blocks per SM."""
    tpb, ocb = 1, min(Cout, PWB_OC)
    while tpb < min(npx, PWB_TP):
        tpb *= 2
    while B * G * math.ceil(npx / tpb) * math.ceil(Cout / ocb) < 2 * sms:
        if ocb > 16 and ocb >= tpb // 2:
            ocb = math.ceil(ocb / 2)
        elif tpb > 16:
            tpb //= 2
        else:
            break
    return tpb, ocb


def _cuda_pointwise(x, wflat, esize, backward):
    """pointwise_forward_kernel (pointwise_block_kernels.cuh) with patch-major weights (what the models emit
    on CUDA): one 256-thread block per (sample, patch, tile of <= PWB_TP pixels, <= PWB_OC output
    channels), __launch_bounds__(256, 4) (_pw_block_plan sizes tiles and channel blocks for >= 2 blocks
    per SM). Warp 0 computes the patch geometry and the tile's offset table (one barrier); per chunk of
    PWB_KC input channels the weights are staged by a warp per row (coalesced, one LDG + STS per
    element) and the x tile through the offset table (two barriers from the second chunk on); then
    PWB_ITEMS (channel, 4-pixel) items per thread, per input channel one LDS of w (lanes on distinct rows:
    odd row stride, one wavefront), one 16-B LDS of 4 pixels and 4 FFMA. Memory-bound at HyperSeg's
    shapes (<= 16 pixels per weight); HBM traffic = x + weights + y once, x re-read from L2 per channel
    block and weights per pixel tile (1x1 grids).

    Backward: the forward kernel writes z and the masked grad_out instead of y, then grad_x (thread per
    pixel, kOC = 8 input channels, weights wp[n * sn] through L1) and grad_w (block per patch)."""
    B, Cin, H, W = x
    Cout, gh, gw = wflat[1] // Cin, wflat[2], wflat[3]
    HW, G = H * W, gh * gw
    ph, pw = max(_patch_sizes(H, gh)), max(_patch_sizes(W, gw))
    npx = ph * pw
    xb, wb, yb = _numel(x) * esize, _numel(wflat) * esize, B * Cout * HW * esize
    tpb, ocb = _pw_block_plan(B, G, npx, Cout, GPUS["h100"]["sms"])  # both GPUs: 132 SMs
    ntiles, nz = math.ceil(npx / tpb), math.ceil(Cout / ocb)

    # the launcher's shared memory (float accumulators): header | ws (odd row stride) | xs (PX per channel)
    kcmax = min(Cin, PWB_KC)
    PX = 4
    while PX < min(npx, tpb):
        PX *= 2
    smem = (PWB_TP + 8) * 4 + (math.ceil(ocb * (kcmax | 1) / 4) * 4 + kcmax * PX) * 4
    f = _KernelCost("pointwise_forward_kernel", B * G * ntiles * nz, 256, smem, regs=PWB_FWD_REGS)
    # per-block work averaged over the largest patch's tiles and the channel blocks
    tiles = [min(tpb, npx - t * tpb) for t in range(ntiles)]
    chans = [min(ocb, Cout - z * ocb) for z in range(nz)]
    for tp in tiles:
        NQ = 1
        while 4 * NQ < tp:  # the tile's pixel quads rounded up to a power of two
            NQ *= 2
        for ocn in chans:
            f.issue += PWB_PREAMBLE + 7 * 10 + math.ceil(tp / 32) * (PWB_INT32_DIV + 10)  # warp 0; the others
            f.lsu += math.ceil(tp / 32)
            f.barriers += 1
            for cc in range(0, Cin, PWB_KC):
                kcn = min(PWB_KC, Cin - cc)
                f.barriers += 2 if cc else 1
                rows = ocn * math.ceil(kcn / 32)  # warp-iterations of the weight staging
                f.lsu += rows * 2
                f.issue += rows * 6
                f.loop(kcn * 4 * NQ, lsu=3, issue=8)  # x: LDS offset, LDG, STS (+ shifts, convert)
                # compute: w LDS (1 wavefront) + 16-B x LDS (NQ distinct quads: NQ*16 B / 128 B)
                f.loop(ocn * NQ, kcn, lsu=1 + max(1, NQ * 16 / 128), issue=7)
            f.loop(ocn * NQ, 4, lsu=1, issue=8, overhead=10)  # affine + ReLU + store, 4 pixels
    nblk = len(tiles) * len(chans)
    f.lsu, f.issue, f.barriers = f.lsu / nblk, f.issue / nblk, math.ceil(f.barriers / nblk)
    # HBM: x, weights, y once; L2: x per channel block and weights per tile, row segments of at least
    # one sector (1-pixel patches read and write one sector per element)
    rowb = _pw_row_bytes(H, W, gh, gw, esize)
    f.dram = xb + wb + yb
    f.l2 = B * Cin * rowb * nz + wb * ntiles + B * Cout * rowb
    if not backward:
        return [f]
    acc_b = B * Cout * HW * 4
    f.name = "pointwise_forward_kernel(z, gu)"
    # reads grad_out where the forward writes y (the same row segments), writes z and gu in float
    f.dram, f.l2 = xb + wb + yb + 2 * acc_b, f.l2 + 2 * acc_b
    gx = _KernelCost("pointwise_grad_x_kernel", math.ceil(HW / 256) * math.ceil(Cin / 8) * B, 256)
    # per output channel: 1 LDG of gu + 8 LDG of weights, 8 FFMA with a guard each
    gx.loop(256, Cout, lsu=9, issue=9 + 8 * 2, overhead=2 * INT64_DIV + 20)
    gx.dram = acc_b + wb + xb
    gx.l2 = acc_b * math.ceil(Cin / 8) + wb * ph + xb
    # grad_w: one block per patch, Cout*Cin entries per thread loop over the patch pixels (:57)
    gw_ = _KernelCost("pointwise_grad_w_kernel", B * G, 256)
    gw_.loop(Cout * Cin, npx, lsu=2, issue=6, overhead=2 * INT64_DIV)
    gw_.loop(Cout, npx, lsu=2, issue=6)
    gw_.dram = acc_b + xb + wb
    gw_.l2 = B * G * Cout * Cin * SECTOR + acc_b + xb * math.ceil(Cout * Cin / 256)
    red = _KernelCost("reduce_partials_kernel", math.ceil(2 * Cout / 128), 128)
    red.loop(128, B * G, lsu=1, issue=4)
    red.dram = red.l2 = B * G * 2 * Cout * 4
    return [f, gx, gw_, red]


#: patchwise_conv2d_kernels.cuh: kPwGroupThreads (threads per output-channel group), kPwRP (pixels per
#: thread), kPwMaxGroups (groups per block); the launcher's shared-memory budget (no opt-in).
PW_GROUP_THREADS, PW_RP, PW_MAX_GROUPS, PW_SMEM = 64, 4, 6, 48 * 1024
#: registers/thread of pw_forward_tiled_kernel (ptxas -v, sm_90, CUDA 13.0; 4-byte accumulators), by
#: (channels per thread, 3x3 path): the 3x3/stride-1 path is held to 85 by __launch_bounds__(384, 2).
PW_TILED_REGS = {(4, True): 80, (1, True): 80, (4, False): 95, (1, False): 168}
#: registers/thread of pw_forward_direct_kernel (same ptxas run), by channels per thread.
PW_DIRECT_REGS = {4: 80, 1: 72}


def _warp_conflict(n, word) -> int:
    """Most distinct 4-byte words one bank serves in a warp's load, over the warps of threads 0..n-1,
    thread t reading word(t)."""
    worst = 1
    for base in range(0, n, 32):
        per_bank: Dict[int, set] = {}
        for t in range(base, min(base + 32, n)):
            wd = word(t)
            per_bank.setdefault(wd % 32, set()).add(wd)
        worst = max(worst, max(len(v) for v in per_bank.values()))
    return worst


def _pw_conflict(TR, TC, IC, sh, sw):
    """pw_tile_conflict (patchwise_conv2d.cu): most distinct words a bank serves in one warp's load of the
    staged input (thread pixel p = lane + 32*warp + 64*q, row-major in the TR x TC tile)."""
    return _warp_conflict(min(PW_GROUP_THREADS * PW_RP, TR * TC), lambda p: (p // TC) * sh * IC + (p % TC) * sw)


def _pw_strip_conflict(nr, nc, IC):
    """The 3x3 strips of pw_forward_tiled_kernel (ceil(nr / PW_RP) strips of nc columns in a group's 64
    threads; thread tp reads word (tp // nc) * PW_RP * IC + tp % nc of a staged row): most distinct words a
    bank serves in one warp's load (1 when nc == 32: a warp is one strip row)."""
    return _warp_conflict(math.ceil(nr / PW_RP) * nc, lambda tp: (tp // nc) * PW_RP * IC + tp % nc)


def _pw_plan(Cin, Cout, groups, kh, kw, stride, dilation, Hout, Wout, gh, gw, acc):
    """pw_channels_per_thread + pw_plan_tiles (patchwise_conv2d.cu): None when one channel's tile does not
    fit (the fallback kernel). ``conflict``: of the thread mapping the full tile runs (strips or row-major)."""
    Og, Cg = Cout // groups, Cin // groups
    RO = 4 if (Cout >= 4 if groups == 1 else Og % 4 == 0) else 1
    ot_max = RO * PW_MAX_GROUPS
    tiles = math.ceil(Cout / ot_max)
    OT = math.ceil(math.ceil(Cout / tiles) / RO) * RO
    ph, pw = math.ceil(Hout / gh), math.ceil(Wout / gw)
    TC = min(pw, 32)
    TR = min(ph, max(1, PW_GROUP_THREADS * PW_RP // TC))
    IR = (TR - 1) * stride[0] + (kh - 1) * dilation[0] + 1
    ICn = (TC - 1) * stride[1] + (kw - 1) * dilation[1] + 1
    budget, KK = PW_SMEM // acc, kh * kw
    if IR * ICn + KK * OT > budget:
        return None
    # the 3x3 strips (RO = 1, the full tile in strips) read the tile column-major per thread
    strips = (RO == 1 and kh == kw == 3 and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
              and math.ceil(TR / PW_RP) * TC <= PW_GROUP_THREADS)

    def conflict(ic):
        return _pw_strip_conflict(TR, TC, ic) if strips else _pw_conflict(TR, TC, ic, stride[0], stride[1])

    IC, best = ICn, conflict(ICn)
    for ic in range(ICn + 1, ICn + 32):
        if best == 1 or IR * ic + KK * OT > budget:
            break
        c = conflict(ic)
        if c < best:
            best, IC = c, ic
    span = Cin if groups == 1 else min(Cin, ((OT - 1) // Og + 2) * Cg)
    cc_max = max(1, budget // (IR * IC + KK * OT))
    chunks = math.ceil(span / cc_max)
    CC = math.ceil(span / chunks)
    return dict(RO=RO, OT=OT, NG=OT // RO, tiles=tiles, TR=TR, TC=TC, IR=IR, IC=IC, CC=CC, chunks=chunks,
                span=span, conflict=best, smem=CC * (IR * IC + KK * OT) * acc)


#: pw_forward_mma_kernel (patchwise_conv2d_kernels.cuh): kPwMmaNT n-tiles per warp, kPwMmaWarps, kPwMmaChunk
#: channels per chunk, __launch_bounds__(128, 4).
PW_MMA_NT, PW_MMA_WARPS, PW_MMA_CHUNK = 4, 4, 16
#: registers/thread of pw_forward_mma_kernel (ptxas -v, sm_90, CUDA 13.0, torch's nvcc flags, under its
#: __launch_bounds__(256, 2); no spills), by MT (m-tiles of 16 output channels), the larger of fp16/bf16:
#: MT=2 127 (both), MT=1 103 (both).
PW_MMA_REGS = {1: 103, 2: 127}
#: SASS instructions of one warp's k-step (MT A fragments, kPwMmaNT B fragments, MT * kPwMmaNT wmma) in
#: pw_forward_mma_kernel's ky/k0 loop, by MT, the larger of fp16 / bf16 (benchmarks/sass_counts.py, raw
#: file results/2026-12-01-cpu/sass_counts_aac30d7.txt; LDSM loads through mma::load_shared): "full", the
#: loop copy of a warp with all its n-tiles (every load unconditional: lane offsets computed once, before
#: the loop); "part", the copy with the n-tile guards (lane offsets rebuilt after the first tile)
PW_MMA_KSTEP_ISSUE = {1: dict(full=30, part=48), 2: dict(full=46, part=65)}
#: shared-memory wavefronts of one 16x16 fragment load (512 B of 16-bit operands; conflict-free rows) and of
#: one float accumulator fragment store (1 KB)
FRAG_WF, ACC_WF = 4, 8


def _pw_odd16(n, esize):
    """pw_odd16 (patchwise_conv2d.cu): the smallest stride >= n that is an odd multiple of 16 bytes."""
    u = 16 // esize
    v = -(-n // u)
    return (v + 1 if v % 2 == 0 else v) * u


def _pw_mma_plan(Cin, Cout, groups, kh, kw, stride, dilation, Hout, Wout, gh, gw, esize, smem_limit=PW_SMEM,
                 patch_major=False):
    """pw_plan_mma (patchwise_conv2d.cu): None where the tensor-core forward does not run (not 16-bit,
    groups > 1, Cin*kh*kw < 16, patches under 64 px, or no tile fits 48 KB per patch); ``smem`` per patch,
    ``PP`` patches per block."""
    ph, pw = math.ceil(Hout / gh), math.ceil(Wout / gw)
    if esize != 2 or groups != 1 or Cin * kh * kw < 16 or ph * pw < PW_GROUP_THREADS:
        return None
    CT = 1 if pw <= 16 else 2 if pw <= 32 else 4
    TCP, MR, k = 16 * CT, 16 if Cout <= 16 else 32, 16
    for cc in (PW_MMA_CHUNK, PW_MMA_CHUNK // 2):
        tr = min(ph, 16 // CT)
        while tr >= 1:
            IR = (tr - 1) * stride[0] + (kh - 1) * dilation[0] + 1
            CC = min(cc, Cin)
            kpad = -(-CC * kw // k) * k
            cstride, ldw, ldy = _pw_odd16(IR * TCP, esize), _pw_odd16(kpad, esize), tr * TCP + 4
            ow = -(-kpad * cstride * esize // 128) * 128
            smem = -(-max(ow + kh * MR * ldw * esize, MR * ldy * 4) // 128) * 128
            if smem <= smem_limit:
                PP = 2 if not patch_major and gw >= 2 else 1  # pairs of patches per block (default layout)
                return dict(CT=CT, TCP=TCP, TR=tr, NW=math.ceil(tr * CT / PW_MMA_NT), CC=CC, IR=IR, kpad=kpad,
                            cstride=cstride, ldw=ldw, ldy=ldy, MT=MR // 16, smem=smem, PP=PP)
            tr //= 2
    return None


def _cuda_patchwise_mma(x, w, has_bias, stride, dilation, esize, plan, Hout, Wout, patch_major):
    """pw_forward_mma_kernel (patchwise_conv2d_kernels.cuh): an implicit GEMM per (sample, patch, pixel tile
    of TR rows x 16*CT columns, 16*MT output channels) on the tensor cores. Per chunk of CC input channels
    the block stages kw column-shifted copies of the haloed input tile (a thread per (channel, row, column
    pair): 1 + kw (stride == dilation) or 2 kw loads, kw 4-byte stores) and the chunk's weights (a warp per
    (ky, channel), lanes along the (channel, kx) entries), then every warp runs, per ky and 16-deep k-step,
    MT A fragment loads + its (up to 4) B fragment loads + 4*MT wmma into register accumulators; Y leaves
    through shared memory (8 wavefronts per float fragment) with coalesced column-pair stores (+bias). With conflict-free
    rows every fragment load is 4 wavefronts (512 B) and each B fragment feeds MT (<= 2) MMAs: the
    shared-memory pipe, not the tensor cores (~2.2 cycles per wmma), bounds the SM side, about 2.7
    wavefronts per wmma at HyperSeg-M's 3x3 level. HBM: x + weights + bias + y once; L2->SM: each tile's
    haloed input, and the weights: contiguous when patch-major; in the default layout (patches gh*gw apart:
    the public ``patchwise_conv2d`` passes a contiguous weight) one 32-byte sector per element and block,
    which is why a block there runs a pair of horizontally neighbouring patches (PP = 2 sub-blocks of NW
    warps, each with its own tile and shared memory) and loads both patches' value of an entry back to back
    (the second from L1): half the sectors (95 -> 48 MB at HyperSeg-M's 3x3 level in bfloat16)."""
    B, Cin, H, W = x
    _, Cout, Cg, kh, kw, gh, gw = w
    G, K = gh * gw, Cin * kh * kw
    xb, wb, yb = _numel(x) * esize, _numel(w) * esize, B * Cout * Hout * Wout * esize
    bb = B * Cout * G * esize if has_bias else 0
    TR, TCP, CT, NW, MT, IR, PP = (plan[k] for k in ("TR", "TCP", "CT", "NW", "MT", "IR", "PP"))
    rows, cols = _patch_sizes(Hout, gh), _patch_sizes(Wout, gw)
    ptiles = math.ceil(max(rows) / TR) * math.ceil(max(cols) / TCP)  # grid.z: the largest patch's tiles
    ctiles = math.ceil(Cout / 32)
    name = f"pw_forward_mma_kernel<MT={MT}>"
    # PP sub-blocks per block: every per-block count below is per sub-block, times PP
    blocks = B * gh * math.ceil(gw / PP) * ptiles * ctiles
    f = _KernelCost(name, blocks, 32 * NW * PP, plan["smem"] * PP, regs=PW_MMA_REGS[MT])
    nO = min(Cout, 16 * MT)
    ntiles = TR * CT
    NP = TCP // 2
    # A zeroed once: 4-byte words, a store each
    f.loop(kh * 16 * MT * plan["ldw"] * esize // 4, lsu=1, issue=3)
    same = stride[1] == dilation[1]
    for cc in range(0, Cin, plan["CC"]):
        ncc = min(plan["CC"], Cin - cc)
        krows = ncc * kw
        kpad = -(-krows // 16) * 16
        # x copies: per (channel, row, pair) item: row setup + first load (~12), per kx a load, a pack and a
        # store (~10), the step to the next item (~5)
        loads = 1 + kw if same else 2 * kw
        f.loop(ncc * IR * NP, lsu=loads + kw, issue=17 + 10 * kw)
        f.loop((kpad - krows) * IR * NP, lsu=1, issue=25)  # zero rows (two int32 divisions per pair)
        # weights: per lane entry q (an int32 division), per ky, a warp per output channel: LDG + STS (~6)
        f.lsu += NW * math.ceil(krows / 32) * kh * math.ceil(nO / NW) * 2
        f.issue += NW * math.ceil(krows / 32) * (20 + kh * math.ceil(nO / NW) * 6)
        f.barriers += 2
        steps = kh * (kpad // 16)
        frags = steps * (NW * MT + ntiles)  # A per warp, B per n-tile
        mmas = steps * ntiles * MT
        f.lsu += frags * FRAG_WF
        # instructions: a warp's k-step as the SASS shows it (PW_MMA_KSTEP_ISSUE): the loop copy of the warps
        # with all kPwMmaNT n-tiles, the guarded copy (pro rata) for a warp with fewer
        full, rest = divmod(ntiles, PW_MMA_NT)
        f.issue += steps * (full * PW_MMA_KSTEP_ISSUE[MT]["full"] + rest / PW_MMA_NT * PW_MMA_KSTEP_ISSUE[MT]["part"])
        f.tc += mmas * MMA_CLK
    f.lsu += ntiles * MT * ACC_WF  # accumulators to shared memory
    f.barriers += 1
    # a thread per (channel, row, column pair): 8-byte LDS + bias (L1) + one 4-byte STG (aligned rows), an
    # int32 division per item
    f.loop(nO * TR * TCP // 2, lsu=3, issue=24)
    f.lsu *= PP
    f.issue *= PP
    f.tc *= PP
    f.dram = xb + wb + bb + yb
    IC = (TCP - 1) * stride[1] + (kw - 1) * dilation[1] + 1
    # weights: contiguous when patch-major; else a sector per element and block (PP patches' values of an
    # entry share it: the second load hits L1)
    f.l2 = (B * G * ptiles * ctiles * Cin * IR * IC * esize + yb + bb
            + (wb if patch_major else B * Cout * K * G * SECTOR / PP))
    return f


def _cuda_patchwise(x, w, has_bias, stride, padding, dilation, groups, esize, backward, patch_major=False):
    """patchwise_conv2d_kernels.cuh. Forward, patches of fewer than 64 pixels: pw_forward_direct_kernel (below).
    Otherwise pw_forward_tiled_kernel, grid (B*G, Cout tiles, pixel tiles per
    patch), NG*64 threads; per block the input tile + halo and the tile's weights are staged in shared memory
    channel chunk by chunk (2 barriers per chunk), then each thread accumulates 4 pixels x RO output channels
    in registers: per tap RO weights as one broadcast vector load (LDS.128) and 4 conflict-free input loads
    for 4*RO FFMA. The 3x3/stride-1 path unrolls the taps (3 immediate-offset loads per pixel and kernel row);
    with RO = 1 it runs in strips where they fit (4 pixels down one column per thread: 9 weight + 18 input
    loads per channel for 36 FFMA, the launcher's row stride conflict-free for that mapping).
    Weights in the default layout are read a sector per element (gh*gw apart) through L2; the DRAM traffic
    stays one pass (neighbouring patches' blocks run at the same time and share the sectors). Backward: the
    gather kernels (dX one thread per input element, dW/dBias per patch)."""
    B, Cin, H, W = x
    _, Cout, Cg, kh, kw, gh, gw = w
    _, _, _, _, y = patchwise_counts(x, w, has_bias, stride, padding, dilation, groups, esize)
    Hout, Wout = y[2], y[3]
    G, K = gh * gw, Cg * kh * kw
    xb, wb, yb = _numel(x) * esize, _numel(w) * esize, _numel(y) * esize
    bb = B * Cout * G * esize if has_bias else 0
    acc = 4  # float accumulators for fp32/bf16/fp16 (smem and registers)
    ph, pw = max(_patch_sizes(Hout, gh)), max(_patch_sizes(Wout, gw))
    if not backward and ph * pw < PW_GROUP_THREADS:
        # pw_forward_direct_kernel: a thread per (sample, RO channels, pixel), pixel fastest, grid-stride over
        # at most 32 blocks per SM; per tap 1 input load + RO weight loads (L1) + RO FFMA + bounds/addressing
        RO = 4 if (Cout >= 4 if groups == 1 else (Cout // groups) % 4 == 0) else 1
        if B * math.ceil(Cout / 4) * Hout * Wout < 2 * 256 * 132:  # the launcher keeps >= 2 blocks per SM
            RO = 1
        name = f"pw_forward_direct_kernel<RO={RO}>"
        _regs(name)
        _REGS.setdefault(name, PW_DIRECT_REGS[RO])
        items = B * math.ceil(Cout / RO) * Hout * Wout
        f = _KernelCost(name, min(math.ceil(items / 256), 132 * 32), 256)
        f.loop(256 * math.ceil(items / (f.blocks * 256)), Cg * kh * kw, lsu=1 + RO, issue=2 * RO + 9,
               overhead=8 * INT64_DIV)  # idx -> (b, channels, pixel), pixel -> (i, j), patch_of twice
        f.dram = xb + wb + bb + yb
        # lanes are consecutive pixels, so consecutive (or equal) patches: weights coalesced, each weight
        # re-read once per pixel row of its patch; x re-read per channel group (taps hit L1)
        f.l2 = xb * math.ceil(Cout / RO) + wb * ph + yb + bb
        return [f]
    mplan = None if backward else _pw_mma_plan(Cin, Cout, groups, kh, kw, stride, dilation, Hout, Wout, gh, gw, esize,
                                               patch_major=patch_major)
    if mplan is not None:
        return [_cuda_patchwise_mma(x, w, has_bias, stride, dilation, esize, mplan, Hout, Wout, patch_major)]
    plan = None if backward else _pw_plan(Cin, Cout, groups, kh, kw, stride, dilation, Hout, Wout, gh, gw, acc)
    if plan is not None:
        RO, OT, NG, TR, TC = plan["RO"], plan["OT"], plan["NG"], plan["TR"], plan["TC"]
        unit = kh == kw == 3 and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
        name = f"pw_forward_tiled_kernel<RO={RO},{'3x3' if unit else 'general'}>"
        _regs(name)  # load the committed table, then add this kernel's ptxas count (not in that table yet)
        _REGS.setdefault(name, PW_TILED_REGS[(RO, unit)])
        rows, cols = _patch_sizes(Hout, gh), _patch_sizes(Wout, gw)
        ptiles = sum(math.ceil(a / TR) for a in rows) * sum(math.ceil(b / TC) for b in cols)
        f = _KernelCost(name, B * ptiles * plan["tiles"], NG * PW_GROUP_THREADS, plan["smem"])
        f.barriers = 2 * plan["chunks"]  # per chunk: staged, then read (the next chunk overwrites it)
        nr, nc = min(TR, max(rows)), min(TC, max(cols))
        irn = (nr - 1) * stride[0] + (kh - 1) * dilation[0] + 1
        icn = (nc - 1) * stride[1] + (kw - 1) * dilation[1] + 1
        span = plan["span"]
        # staging, per chunk: input tile (LDG + bounds + STS; (channel, row, column) stepped by the block size)
        f.loop(span * irn * icn, lsu=2, issue=18)
        # weights: a warp per output channel, lanes along its (channel, tap) entries (LDG + range test + STS)
        f.loop(OT * 32, math.ceil(span * kh * kw / 32), lsu=2, issue=8)
        # compute: every active thread walks its group's Cg channels; conflict-free input loads (plan)
        xl = PW_RP * plan["conflict"]
        if unit and RO == 1 and math.ceil(nr / PW_RP) * nc <= PW_GROUP_THREADS:
            # strips (a thread's PW_RP pixels down one column; RO = 1 only): per channel 9 weights + (PW_RP + 2)
            # input rows x 3 loads (row-guarded: predicates set once per thread) + 9*PW_RP*RO FFMA, an
            # address and the loop (~4)
            sx = 3 * (PW_RP + 2) * _pw_strip_conflict(nr, nc, plan["IC"])
            f.loop(NG * PW_GROUP_THREADS, Cg, lsu=9 + sx, issue=9 + 3 * (PW_RP + 2) + 9 * PW_RP * RO + 4)
        elif unit:  # per channel: 3 kernel rows x (4 address adds + 3 weight vectors + 12 input loads + 12*RO FFMA)
            f.loop(NG * PW_GROUP_THREADS, Cg, lsu=3 * (3 + 3 * xl), issue=3 * (PW_RP + 3 + 3 * PW_RP + 3 * PW_RP * RO) + 3)
        else:  # per tap: 1 weight vector + 4 input loads + 4 address adds + 4*RO FFMA + loop
            f.loop(NG * PW_GROUP_THREADS, Cg * kh * kw, lsu=1 + xl, issue=1 + 2 * PW_RP + PW_RP * RO + 2)
        f.loop(NG * PW_GROUP_THREADS, RO * PW_RP, lsu=1, issue=4)  # stores (+ bias)
        f.dram = xb + wb + bb + yb
        f.l2 = (B * ptiles * plan["tiles"] * span * irn * icn * esize  # each block's tile + halo
                + B * Cout * K * G * SECTOR + yb + bb)  # default layout: one sector per weight element
        if not backward:
            return [f]
    # fallback kernel (a channel's tile over 48 KB), as before: a thread per (channel, pixel)
    use_smem = K * 4 <= 48 * 1024  # patchwise_conv2d.cu: a channel's float weights fit 48 KB (no opt-in)
    OT = max(1, min(Cout, 64, 48 * 1024 // (K * 4))) if use_smem else min(Cout, 64)
    P = max(_patch_sizes(Hout, gh)) * max(_patch_sizes(Wout, gw))
    f = _KernelCost("pw_forward_kernel", B * G * math.ceil(Cout / OT), 256, OT * K * 4 if use_smem else 0)
    if use_smem:
        f.loop(OT * K, lsu=2, issue=6)  # weight staging ws[t] = wb[t * GG]
    f.loop(OT * P, K, lsu=2, issue=12, overhead=4 * INT64_DIV + 12)
    f.dram = xb + wb + bb + yb
    halo_x = B * Cin * sum((a * stride[0] + kh - 1) * (b * stride[1] + kw - 1)
                           for a in _patch_sizes(Hout, gh) for b in _patch_sizes(Wout, gw)) * esize
    f.l2 = halo_x * math.ceil(Cout / OT) + B * Cout * K * G * SECTOR + yb + bb
    if not backward:
        return [f]
    # dX: one thread per input element, per tap a search of the output pixel + Og iterations of two strided
    # global loads (gp[og*HWo], wp[og*K*GG]) (:83-100)
    Og = Cout // groups
    total = _numel(x)
    dx = _KernelCost("pw_grad_input_kernel", min(math.ceil(total / 256), 65535 * 8), 256)
    dx.loop(256 * math.ceil(total / 256 / dx.blocks), kh * kw * Og, lsu=2, issue=8,
            overhead=4 * INT64_DIV + kh * kw * (2 * INT64_DIV + 20))
    dx.dram = yb + wb + xb
    dx.l2 = yb * kh * kw + _numel(x) * kh * kw * Og * SECTOR / 32 + xb
    # dW: block per (patch, 256-entry tile); a warp per entry when P >= 32 (lane-strided pixels + shuffle),
    # else a thread per entry over P pixels; 2 int64 divs per pixel (p / pw, p % pw) (:108-170)
    E = Cout * K + (Cout if has_bias else 0)
    dw = _KernelCost("pw_grad_weight_kernel", B * G * math.ceil(E / 256), 256)
    if P >= 32:
        dw.loop(32 * min(E, 256) / 8, math.ceil(P / 32) * 8, lsu=2, issue=10 + 2 * INT64_DIV)
    else:
        dw.loop(min(E, 256), P, lsu=2, issue=10 + 2 * INT64_DIV)
    dw.dram = xb + yb + wb + bb
    dw.l2 = B * G * E * SECTOR + (xb + yb) * min(E, 256) / 8  # every warp/thread re-reads its channel planes
    return [dx, dw]  # the backward op launches only these two (patchwise_conv2d.cu:95-120)


def _hmsa_terms(n: int, one: int) -> int:
    """hmsa_max_terms (csrc/common/hmsa_fuse.h): stencil length per output pixel."""
    high = 1
    for _ in range(one):
        high = 1 + 4 * high
    return 4 * (high + 4 * (n - 1 - one))


def _tap(dst: int, src_size: int, dst_size: int):
    """linear_tap (csrc/common/bilinear.h): (i0, the last index of nonzero weight: hmsa_tap_last) of output
    coordinate dst."""
    src = max(src_size / dst_size * (dst + 0.5) - 0.5, 0.0)
    i0 = min(int(src), src_size - 1)
    l1 = min(max(src - i0, 0.0), 1.0)
    return i0, i0 + (1 if i0 < src_size - 1 and l1 != 0 else 0)


def _hmsa_ranges(grid, one, out, o0, o1):
    """hmsa_axis_ranges (csrc/common/hmsa_fuse.h): extent of each scale grid's range that outputs o0..o1 read
    (from the first tap of o0 to the last tap of nonzero weight of o1)."""
    n = len(grid)
    lo, hi = [0] * n, [0] * n
    lo[one], hi[one] = _tap(o0, grid[one], out)[0], _tap(o1, grid[one], out)[1]
    for k in range(one - 1, -1, -1):
        lo[k], hi[k] = _tap(lo[k + 1], grid[k], grid[k + 1])[0], _tap(hi[k + 1], grid[k], grid[k + 1])[1]
    for k in range(one + 1, n):
        lo[k], hi[k] = _tap(lo[one], grid[k], grid[one])[0], _tap(hi[one], grid[k], grid[one])[1]
    return [h - l + 1 for l, h in zip(lo, hi)]


#: hmsa_fuse.cu: the tile kernel's dynamic shared memory (kHmsaTileSmem) and its tile shapes, largest first
HMSA_TILE_SMEM = 48 * 1024
HMSA_TILES = ((32, 64), (16, 64), (8, 32))
#: registers/thread of hmsa_fuse_tile_kernel<float|half|bf16, float, TH, TW> (ptxas -Xptxas -v, sm_90, torch's
#: nvcc flags; no spills): 32 x 64 under __launch_bounds__(256, 2), 16 x 64 under (256, 3), 8 x 32 under (256, 4)
HMSA_TILE_REGS = {(32, 64): 104, (16, 64): 80, (8, 32): 64}
#: issue slots per warp-iteration, read off hmsa_fuse_tile_kernel (loop + addressing + the op's arithmetic):
#: staging a stored logit (load, convert, store), a low scale's a_l * p_l (bilinear_sample's size test,
#: int64 plane offset, convert, multiply, store; RESAMPLE more when it samples 4 taps), a chain element
#: (attention, blend, store; each lerp of 4 FMA + 4 addresses: LERP; a composite tap pair: 2 per product),
#: a low scale on the 1.0 range (U lerp + gate), an output pixel (F lerp, convert, int64 offset, store)
HMSA_ISSUE_STAGE, HMSA_ISSUE_LOAD, HMSA_ISSUE_RESAMPLE = 8, 16, 20
HMSA_ISSUE_CHAIN, HMSA_ISSUE_LERP, HMSA_ISSUE_LOW, HMSA_ISSUE_OUT = 8, 8, 14, 24


def _hmsa_store_range(lo, hi, stored, grid):
    """hmsa_storage_range: extent of the stored rows that grid rows lo..hi read."""
    return _tap(hi, stored, grid)[1] - _tap(lo, stored, grid)[0] + 1


def _hmsa_composite_n(dst, stored, g0, g1):
    """hmsa_composite_tap: number of distinct stored indices (nonzero weight) of grid1 coordinate dst."""
    idx = set()
    for r in sorted(set(_tap(dst, g0, g1))):  # the nonzero-weight taps of the downsample
        idx |= set(_tap(r, stored, g0))  # and of the stored -> grid0 resize under each
    return len(idx)


def _hmsa_axis_tiles(grid, stored, one, out, T):
    """Per axis over the tiles of T outputs: the largest grid range and stored range (chain scales) of each
    scale, their sums over tiles, and the sum of the top's composite tap counts over the tiles' grid-1 ranges."""
    n = len(grid)
    mx, tot, smx, stot, comp = [0] * n, [0] * n, [0] * n, [0] * n, 0
    for o0 in range(0, out, T):
        o1 = min(o0 + T, out) - 1
        lo = [0] * n
        r = _hmsa_ranges(grid, one, out, o0, o1)
        lo[one] = _tap(o0, grid[one], out)[0]
        for k in range(one - 1, -1, -1):
            lo[k] = _tap(lo[k + 1], grid[k], grid[k + 1])[0]
        for k in range(n):
            mx[k], tot[k] = max(mx[k], r[k]), tot[k] + r[k]
            if k <= one:
                sr = _hmsa_store_range(lo[k], lo[k] + r[k] - 1, stored[k], grid[k])
                smx[k], stot[k] = max(smx[k], sr), stot[k] + sr
        if one > 0:
            comp += sum(_hmsa_composite_n(lo[1] + i, stored[0], grid[0], grid[1]) for i in range(r[1]))
    return mx, tot, smx, stot, comp


def _cuda_hmsa_pixel(logits, scales, out_size, labels, grids, resampled, fb, esize, one):
    """hmsa_fuse_kernel (the fallback): one thread per output pixel builds its stencil (HMSA_CUDA_MAX_TERMS
    terms in local memory), then per class gathers every term (3 local loads for the term + 1 global load +
    FFMA; a resampled scale's storage sampled per term: 4 loads)."""
    B, C = logits[0][:2]
    nt = _hmsa_terms(len(scales), one) * (4 if resampled else 1)
    pix = B * _numel(out_size)
    k = _KernelCost("hmsa_fuse_kernel", min(math.ceil(pix / 256), 65535 * 64), 256)
    per = math.ceil(pix / (k.blocks * 256))
    k.loop(256 * per, C * nt, lsu=4, issue=7, overhead=nt * 30)
    k.dram = fb
    k.l2 = pix * C * nt * esize + fb  # neighbouring lanes share sectors: ~1 element of traffic per tap
    return [k]


def _cuda_hmsa(logits, atts, scales, out_size, labels, scale_sizes, esize):
    """hmsa_fuse.cu: hmsa_fuse_tile_kernel, one 256-thread block (8 warps) per (sample, output tile: the first of
    HMSA_TILES the output holds whose plan fits HMSA_TILE_SMEM), counted per block off hmsa_fuse_kernels.cuh
    at the average tile's ranges (``_hmsa_ranges``; warp-row loops: a warp per range row, lanes along it, so
    a row of w elements is ceil(w / 32) warp-iterations):

    * setup: 2 threads compute the ranges (barrier); the tap tables (a linear_tap + an 8-byte store per
      entry; the top's composite taps: two linear_taps per grid-1 row/column) and every attention on its
      range; barrier; the low scales' gates on the 1.0 range (2 tap loads, 4 lerp loads, 1 store).
    * per class (C times): phase A, every global read: the chain scales' stored logits on their stored
      ranges (a coalesced load + a store per element), a_l * p_l of the low scales on their grid ranges
      (1 or 4 loads, the attention, a store), then a barrier that waits for the loads (LOAD_LATENCY_CLK);
      per chain scale k = 1..one (k = 0 alone when 1.0 is the top), columns outside and rows inside (each
      warp loads its lanes' column taps once per 32 columns: an 8-byte tap 2 wavefronts, the top's 36-byte
      composite tap 9), per element of its grid range: p_k from its stored range (a broadcast row tap, 4
      lerp loads), the attention, the level above: k = 1 the top's stored range through the composite taps
      (a broadcast row tap, ny x nx loads, counted per row/column), k >= 2 a D lerp (a ratio-r downsample
      makes the lanes' words r apart: ceil(r)-way conflicts); on the 1.0 range per low scale a U lerp + its
      gate; a store; a barrier; then TH x TW / 256 output pixels per thread (a broadcast row tap, 4 lerp
      loads, or 1 load when the 1.0 grid is the output's size; a coalesced store: 1 L1/LSU instruction;
      labels: a compare).
    * barriers: 2 + C * (1 + max(one, 1)).

    DRAM: the op's minimum bytes (each logit/attention element is first read by one tile; the neighbours'
    halo re-reads hit L2). L2: every tile's stored ranges (chain scales) and grid ranges (low scales) x C,
    the attention ranges, plus the output. Over HMSA_TILE_SMEM even for 8 x 32 tiles the per-pixel kernel
    runs (``_cuda_hmsa_pixel``)."""
    B, C = logits[0][:2]
    n = len(scales)
    one = sum(float(s) > 1.0 for s in scales)  # 1.0's index in descending order
    grids = [tuple(scale_sizes[i]) if scale_sizes is not None else tuple(logits[i][-2:]) for i in range(n)]
    stored = [tuple(logits[i][-2:]) for i in range(n)]
    resampled = any(grids[i] != stored[i] for i in range(n))
    fb, _ = hmsa_counts(logits, atts, scales, out_size, labels, scale_sizes, esize)
    OH, OW = out_size
    acc = 8 if esize == 8 else 4
    plan = None
    for TH, TW in HMSA_TILES:
        if OH < TH or OW < TW and TW > 32:
            if (TH, TW) != HMSA_TILES[-1]:
                continue
        ay = _hmsa_axis_tiles([g[0] for g in grids], [p[0] for p in stored], one, OH, TH)
        ax = _hmsa_axis_tiles([g[1] for g in grids], [p[1] for p in stored], one, OW, TW)
        mh, mw, sh, sw = ay[0], ax[0], ay[2], ax[2]
        vals = mh[one] * mw[one]  # fin
        for k in range(n):
            vals += sh[k] * sw[k] if k <= one else 0
            vals += mh[k] * mw[k] * ((1 <= k < one or k > one) + (k >= 1))  # level / a_l p_l buffer, attention
            vals += mh[one] * mw[one] if k > one else 0  # gate
        ntaps = TH + TW + sum(mh[k] + mw[k] for k in range(1 if one > 0 else 0, one + 1))
        ntaps += sum(mh[k if k <= one else one] + mw[k if k <= one else one] for k in range(1, n) if k >= 2 or k > one)
        tap4 = 20 + 4 * acc
        smem = -(-vals * acc // 16) * 16 + -(-ntaps * 2 * acc // 16) * 16  # HmsaTap: {int, acc_t}
        smem += -(-(mh[1] + mw[1]) * tap4 // 16) * 16 if one > 0 else 0
        smem += 8 * 8 * 4
        if smem <= HMSA_TILE_SMEM:
            plan = (TH, TW, smem, ay, ax)
            break
    if plan is None:
        return _cuda_hmsa_pixel(logits, scales, out_size, labels, grids, resampled, fb, esize, one)
    TH, TW, smem, ay, ax = plan
    tiles_y, tiles_x = math.ceil(OH / TH), math.ceil(OW / TW)
    nblk = B * tiles_y * tiles_x
    k = _KernelCost(f"hmsa_fuse_tile_kernel({TH}x{TW})", nblk, 256, smem, regs=HMSA_TILE_REGS[(TH, TW)])
    # the average tile's ranges (sums over tiles / tiles)
    rh, rw = [t / tiles_y for t in ay[1]], [t / tiles_x for t in ax[1]]
    srh, srw = [t / tiles_y for t in ay[3]], [t / tiles_x for t in ax[3]]
    ny, nx = (ay[4] / ay[1][1], ax[4] / ax[1][1]) if one > 0 else (0, 0)  # composite taps per row / column

    def rows(h, w):  # warp-iterations of a warp-row loop over an h x w range
        return h * math.ceil(w / 32)

    def conflict(src, dst):  # lanes of a resize from a src-long axis to a dst-long one read words ratio apart
        return max(1, math.ceil(src / dst)) * acc // 4

    tapw = 2 * acc // 4  # wavefronts of 32 lanes' distinct HmsaTap ({int, acc_t}: 8 bytes for float)
    lsu = issue = 0.0
    # setup: ranges (2 threads: one warp, ~2 linear_taps per scale and axis), tap tables, attentions, gates
    issue += 2 * (n + one + 1) * 30
    ntap = TH + TW + sum(rh[kk] + rw[kk] for kk in range(1 if one > 0 else 0, one + 1))
    ntap += sum(rh[kk if kk <= one else one] + rw[kk if kk <= one else one] for kk in range(1, n) if kk >= 2 or kk > one)
    lsu += math.ceil(ntap / 32) * tapw
    issue += math.ceil(ntap / 32) * 30
    if one > 0:
        lsu += math.ceil((rh[1] + rw[1]) / 32) * 9
        issue += math.ceil((rh[1] + rw[1]) / 32) * 80
    for kk in range(1, n):
        ra = tuple(atts[kk][-2:]) != grids[kk]
        lsu += rows(rh[kk], rw[kk]) * ((4 if ra else 1) + 1)
        issue += rows(rh[kk], rw[kk]) * (HMSA_ISSUE_LOAD + (HMSA_ISSUE_RESAMPLE if ra else 0))
    for kk in range(one + 1, n):
        lsu += rows(rh[one], rw[one]) * (1 + tapw + 4 + 1)
        issue += rows(rh[one], rw[one]) * HMSA_ISSUE_LOW
    # per class
    lsu_c = issue_c = 0.0
    for kk in range(one + 1):  # stage the chain scales' stored ranges
        lsu_c += rows(srh[kk], srw[kk]) * 2
        issue_c += rows(srh[kk], srw[kk]) * HMSA_ISSUE_STAGE
    for kk in range(one + 1, n):  # a_l * p_l
        rs = grids[kk] != stored[kk]
        lsu_c += rows(rh[kk], rw[kk]) * ((4 if rs else 1) + 2)
        issue_c += rows(rh[kk], rw[kk]) * (HMSA_ISSUE_LOAD + (HMSA_ISSUE_RESAMPLE if rs else 0))
    for kk in range(1 if one > 0 else 0, one + 1):
        # columns outside, rows inside: each warp loads its lanes' column taps once per column chunk
        lsu_c += 8 * math.ceil(rw[kk] / 32) * (tapw + (9 if kk == 1 else 0))
        w = 1 + 4 * conflict(stored[kk][1], grids[kk][1]) + 1  # p_k lerp (broadcast row tap), store
        iss = HMSA_ISSUE_CHAIN + HMSA_ISSUE_LERP
        if kk == 1:
            w += 1 + 1 + ny * nx * conflict(stored[0][1], grids[1][1])  # attention, composite
            iss += 2 * ny * nx + 4
        elif kk >= 2:
            w += 1 + 1 + tapw + 4 * conflict(grids[kk - 1][1], grids[kk][1])  # attention, D lerp
            iss += HMSA_ISSUE_LERP
        if kk == one:
            w += sum(1 + tapw + 4 * conflict(grids[l][1], grids[one][1]) + 1 for l in range(one + 1, n))
            iss += HMSA_ISSUE_LOW * (n - 1 - one)
        lsu_c += rows(rh[kk], rw[kk]) * w
        issue_c += rows(rh[kk], rw[kk]) * iss
    out_items = TH * TW // 32  # warp-items of the F phase; the identity (1.0 grid = output size): one load
    same = grids[one] == (OH, OW)
    lsu_c += out_items * ((1 if same else 1 + 4 * conflict(grids[one][1], OW)) + (0 if labels else 1))
    issue_c += out_items * (HMSA_ISSUE_OUT - (8 if labels else 0) - (HMSA_ISSUE_LERP if same else 0))
    k.lsu = lsu + C * lsu_c
    k.issue = issue + C * issue_c
    k.barriers = 2 + C * (1 + max(one, 1))
    k.stall = C * LOAD_LATENCY_CLK
    k.dram = fb
    reads = sum(ay[3][kk] * ax[3][kk] for kk in range(one + 1))  # stored ranges of the chain scales
    reads += sum(ay[1][kk] * ax[1][kk] for kk in range(one + 1, n))  # low scales (grid ranges)
    reads = reads * B * C + sum(ay[1][kk] * ax[1][kk] for kk in range(1, n)) * B  # + attentions
    k.l2 = reads * esize + (B * OH * OW * 8 if labels else B * C * OH * OW * esize)
    return [k]


def _cuda_hmsa_bwd(g, p1, pl, al, esize):
    """Two-scale backward: bwd_r1 / bwd_low / bwd_att, one thread per pixel of their grid, gathering the
    bilinear adjoint over CSR tables (index + coefficient + value loads per tap)."""
    B, C = p1[:2]
    out = []
    for name, grid, src in (("bwd_r1_kernel", p1, g), ("bwd_low_kernel", pl, p1), ("bwd_att_kernel", al, p1)):
        r = max(1, src[-2] // grid[-2]) * max(1, src[-1] // grid[-1])
        taps = 4 * r  # a low-res pixel receives from (2 r_h)(2 r_w) pixels of the finer grid
        pix = B * grid[-2] * grid[-1]
        k = _KernelCost(name, min(math.ceil(pix / 256), 65535 * 64), 256)
        k.loop(256 * math.ceil(pix / (k.blocks * 256)), C * taps, lsu=3, issue=6, overhead=60)
        k.dram = (_numel(src) + _numel(grid) * 2) * esize
        k.l2 = pix * C * taps * esize + k.dram
        out.append(k)
    return out


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------
def _shp(a):
    return tuple(a.shape)


def capture(models: Sequence[str]) -> List[tuple]:
    """(model, op, args) of every pyseg op call of the models (pyseg.kernels._aot.op_calls, meta device)."""
    from pyseg._extension import _load_kernels_package

    _load_kernels_package()
    from pyseg.kernels._aot import op_calls

    calls: List[tuple] = []
    for m in models:
        try:
            got = op_calls([m])
        except Exception as e:  # a model whose forward cannot run on meta tensors: say so, keep the others
            print(f"# {m}: skipped, its meta-device forward failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})",
                  file=sys.stderr)
            continue
        # op_calls also lists pyseg.nn.PatchWiseConv2d at HyperSeg-M's decoder shapes, once per call
        calls += [c for c in got if c[0] != "PatchWiseConv2d" or not any(d[0] == "PatchWiseConv2d" for d in calls)]
    return calls


def _peak(gpu: dict, dtype: str, gemm: bool, fp32_path: str):
    if not gemm:
        return gpu["fp32"], "fp32 FFMA"
    if dtype == "float32":
        return (gpu["tf32"], "tf32 TC") if fp32_path == "tf32" else (gpu["fp32"], "fp32 FFMA")
    return gpu["bf16"], f"{'bf16' if dtype == 'bfloat16' else 'fp16'} TC"


def rows_for(calls, gpu_name: str, dtype: str, fp32_path: str = "fma") -> List[dict]:
    gpu = GPUS[gpu_name]
    es = ESIZE[dtype]
    rows = []
    level: Dict[str, int] = {}
    for model, op, args in calls:
        lvl = level.get(model, 0)
        level[model] = lvl + 1
        items = []  # (direction, bytes, flops, gemm, kernels, shape)
        if op == "patchwise_conv2d":
            x, w, b, stride, padding, dilation, groups = args
            xs, ws = _shp(x), _shp(w)
            fb, ff, bb, bf, y = patchwise_counts(xs, ws, b is not None, stride, padding, dilation, groups, es)
            shape = _shape_str(xs, ws[1:6]) + f" g{groups}"
            for d, by, fl in (("fwd", fb, ff), ("bwd", bb, bf)):
                ks = _cuda_patchwise(xs, ws, b is not None, stride, padding, dilation, groups, es, d == "bwd")
                items.append((d, by, fl, ws[2] * ws[3] * ws[4] >= 16, ks, shape))
        elif op == "pointwise_block":
            xs, ws = _shp(args[0]), _shp(args[1])
            fb, ff, bb, bf, _ = pointwise_counts(xs, ws, es)
            shape = _shape_str(xs) + f" ->{ws[1] // xs[1]} grid {ws[2]}x{ws[3]}"
            for d, by, fl in (("fwd", fb, ff), ("bwd", bb, bf)):
                items.append((d, by, fl, True, _cuda_pointwise(xs, ws, es, d == "bwd"), shape))
        elif op == "meta_block":
            xs, ws, hid, cout = _shp(args[0]), _shp(args[1]), int(args[4]), int(args[5])
            fb, ff, bb, bf, _ = meta_counts(xs, ws, hid, cout, es)
            shape = _shape_str(xs) + f" hid{hid} ->{cout} grid {ws[2]}x{ws[3]}"
            for d, by, fl in (("fwd", fb, ff), ("bwd", bb, bf)):
                items.append((d, by, fl, True, _cuda_meta(xs, ws, hid, cout, es, d == "bwd"), shape))
        elif op == "hmsa_fuse":
            lg, at, sc, osz = [_shp(t) for t in args[0]], [_shp(t) for t in args[1]], list(args[2]), list(args[3])
            lab = bool(args[4]) if len(args) > 4 else False
            flat = args[5] if len(args) > 5 and args[5] is not None else None
            ss = [tuple(flat[2 * i:2 * i + 2]) for i in range(len(sc))] if flat else None
            fb, ff = hmsa_counts(lg, at, sc, osz, lab, ss, es)
            shape = "scales " + ",".join(f"{float(s):g}" for s in sc) + " " + _shape_str(*lg) + f" ->{osz[0]}x{osz[1]}"
            items.append(("fwd", fb, ff, False, _cuda_hmsa(lg, at, sc, osz, lab, ss, es), shape))
            one = [float(s) for s in sc].index(1.0)
            if one + 1 < len(sc):  # the two-scale training form (kernels/_aot.py _replay)
                B, C = lg[one][:2]
                g = (B, C, osz[0], osz[1])
                bb, bf = hmsa_bwd_counts(g, lg[one], lg[one + 1], at[one + 1], es)
                items.append(("bwd", bb, bf, False, _cuda_hmsa_bwd(g, lg[one], lg[one + 1], at[one + 1], es),
                              f"scales 1,{float(sc[one + 1]):g} " + _shape_str(lg[one], lg[one + 1]) +
                              f" ->{osz[0]}x{osz[1]}"))
        else:
            raise ValueError(f"roofline: no model for pyseg::{op}")
        for d, by, fl, gemm, ks, shape in items:
            peak, path = _peak(gpu, dtype, gemm, fp32_path)
            t_mem, t_fl = by / gpu["bw"] * 1e6, fl / peak * 1e6
            floor = max(t_mem, t_fl)
            pred = sum(k.time_us(gpu) for k in ks)
            rows.append(dict(model=model, level=lvl, op=op, direction=d, shape=shape, dtype=dtype, MB=by / 1e6,
                             GFLOP=fl / 1e9, peak=path, floor_us=floor, bound="mem" if t_mem >= t_fl else "compute",
                             predicted_us=pred, pred_over_floor=pred / floor,
                             pred_over_launch_floor=pred / max(floor, len(ks) * LAUNCH_US),
                             kernels={k.name: round(k.time_us(gpu), 2) for k in ks}))
    return rows


# ------------------------------------------------------------------------------------------------
# measured medians
# ------------------------------------------------------------------------------------------------
def _measured_keys(path: str) -> List[tuple]:
    """[(op, direction, key, dtype, median_us)] from a benchmark JSON; key matches ``_row_key``."""
    with open(path) as f:
        d = json.load(f)
    out = []
    if d.get("benchmark") == "meta_block":
        dt = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(d["dtype"], d["dtype"])
        if d.get("fused_backend") != "cuda":
            return out
        for r in d["rows"]:
            if "fused_ms" not in r:
                continue
            op = "meta_block" if r["kind"] == "meta" else "pointwise_block"
            key = (op, r["B"], r["Cin"], r["H"], r["W"], r["Cout"], r["gh"], r["gw"])
            # forward+backward runs are reported on the bwd row as their whole time (see print_table)
            out.append((op, "fwd+bwd" if d["mode"] == "forward+backward" else "fwd", key, dt, r["fused_ms"] * 1e3))
    elif d.get("benchmark") == "patchwise_conv2d":
        dt = d["args"]["dtype"]
        for r in d["results"]:
            if r["backend"] != "cuda":
                continue
            B, Cin, H, W = r["shape"]
            key = ("patchwise_conv2d", B, Cin, H, W, r["Cout"], r["k"], r["groups"], *r["grid"])
            out.append(("patchwise_conv2d", "fwd" if r["mode"] == "fwd" else "fwd+bwd", key, dt, r["median_ms"] * 1e3))
    elif "results" in d:
        for r in d["results"]:
            out.append((r["op"], r["direction"], ("shape", r["op"], r["shape"]), r["dtype"], float(r["median_us"])))
    else:
        raise ValueError(f"{path}: not a benchmark JSON roofline.py knows (meta_block, patchwise_conv2d, results)")
    return out


def _row_keys(row: dict, call_args) -> List[tuple]:
    keys = [("shape", row["op"], row["shape"])]
    op, a = row["op"], call_args
    if op in ("meta_block", "pointwise_block"):
        B, Cin, H, W = a[0].shape
        cout = int(a[5]) if op == "meta_block" else a[1].shape[1] // Cin
        keys.append((op, B, Cin, H, W, cout, a[1].shape[2], a[1].shape[3]))
    elif op == "patchwise_conv2d":
        B, Cin, H, W = a[0].shape
        w = a[1].shape
        if w[3] == w[4] and list(a[3]) == [1, 1] and list(a[4]) == [w[3] // 2] * 4 and a[2] is not None:
            keys.append((op, B, Cin, H, W, w[1], w[3], a[6], w[5], w[6]))
    return keys


def merge_measured(rows: List[dict], calls, paths: Sequence[str]) -> int:
    """Add ``measured_us`` and ``pct_of_floor`` (floor / measured, %) to the rows a measurement matches;
    a forward+backward time lands on the bwd row as measured minus the fwd row's measured time.
    Returns the number of rows given a measurement."""
    meas = {}
    for p in paths:
        for op, d, key, dt, us in _measured_keys(p):
            meas[(d, key, dt)] = us
    n = 0
    by_call = {}
    for r in rows:
        by_call.setdefault((r["model"], r["level"]), []).append(r)
    call_of = {}
    level: Dict[str, int] = {}
    for model, op, args in calls:
        lvl = level.get(model, 0)
        level[model] = lvl + 1
        call_of[(model, lvl)] = args
    for (model, lvl), rs in by_call.items():
        keys = _row_keys(rs[0], call_of[(model, lvl)])
        fwd = next((r for r in rs if r["direction"] == "fwd"), None)
        for r in rs:
            for key in keys:
                us = meas.get((r["direction"], key, r["dtype"]))
                if us is None and r["direction"] == "bwd":
                    both = meas.get(("fwd+bwd", key, r["dtype"]))
                    if both is not None and fwd is not None and "measured_us" in fwd:
                        us = both - fwd["measured_us"]
                if us is not None:
                    r["measured_us"] = us
                    r["pct_of_floor"] = 100 * r["floor_us"] / us
                    n += 1
                    break
    return n


def format_table(rows: List[dict], gpu_name: str) -> str:
    measured = any("measured_us" in r for r in rows)
    hdr = (f"{'kernel':<17}{'dir':<4}{'model/level':<24}{'shape':<46}{'dtype':<9}{'MB':>8}{'GFLOP':>8}"
           f"{'floor us':>9} {'bound':<14}{'pred us':>9}{'pred/fl':>8}{'pred/lf':>8}")
    if measured:
        hdr += f"{'meas us':>9}{'%floor':>7}"
    g = GPUS[gpu_name]
    lines = [f"# roofline on {g['name']}: HBM {g['bw'] / 1e12:.2f} TB/s, fp32 {g['fp32'] / 1e12:.0f}, "
             f"tf32 {g['tf32'] / 1e12:.0f}, bf16/fp16 {g['bf16'] / 1e12:.0f} TFLOP/s, {g['sms']} SMs; "
             "predicted = the current CUDA kernels (model, not a measurement)", hdr]
    for r in rows:
        line = (f"{r['op']:<17}{r['direction']:<4}{(r['model'] + '/' + str(r['level']))[:23]:<24}{r['shape'][:45]:<46}"
                f"{r['dtype']:<9}{r['MB']:>8.2f}{r['GFLOP']:>8.3f}{r['floor_us']:>9.2f} "
                f"{r['bound'] + '(' + r['peak'].split()[0] + ')' if r['bound'] == 'compute' else 'mem':<14}"
                f"{r['predicted_us']:>9.1f}{r['pred_over_floor']:>7.1f}x{r['pred_over_launch_floor']:>7.1f}x")
        if measured:
            line += (f"{r['measured_us']:>9.1f}{r['pct_of_floor']:>6.0f}%" if "measured_us" in r else f"{'-':>9}{'-':>7}")
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    from pyseg.models import list_models

    names = list_models()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)}")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help="registry models (default: every one with a pyseg op); comma or space separated")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--fp32-path", default="fma", choices=["fma", "tf32"],
                   help="peak used for float32 GEMM-like ops: fp32 FFMA (default) or tf32 tensor cores")
    p.add_argument("--measured", nargs="+", default=None, metavar="JSON",
                   help="benchmark JSON files whose medians to merge (bench_meta_block, bench_patchwise_conv2d)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.gpu not in GPUS:
        p.error(f"unknown --gpu {args.gpu!r}; known: {', '.join(GPUS)}")
    models = [m for s in (args.models or []) for m in s.split(",") if m] or names
    bad = [m for m in models if m not in names]
    if bad:
        p.error(f"unknown model(s) {', '.join(bad)}; known: {', '.join(names)}")
    for path in args.measured or []:
        if not os.path.isfile(path):
            p.error(f"--measured {path}: no such file")
    calls = capture(models)
    if args.models:  # op_calls also lists PatchWiseConv2d at HyperSeg-M's shapes; keep it only for hyperseg-m
        calls = [c for c in calls if c[0] in models or (c[0] == "PatchWiseConv2d" and "hyperseg-m" in models)]
    rows = rows_for(calls, args.gpu, args.dtype, args.fp32_path)
    if args.measured:
        n = merge_measured(rows, calls, args.measured)
        print(f"# measured medians merged into {n} of {len(rows)} rows (backend cuda)")
    print(format_table(rows, args.gpu))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(gpu=args.gpu, dtype=args.dtype, fp32_path=args.fp32_path, models=models, rows=rows,
                           constants=dict(LAUNCH_US=LAUNCH_US, L2_X=L2_X, SM_BW_SHARE=SM_BW_SHARE,
                                          WARPS_TO_HIDE=WARPS_TO_HIDE, INT64_DIV=INT64_DIV)), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
