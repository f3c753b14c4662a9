"""Triton kernels of the dynamic patch-wise convolution (``pyseg::patchwise_conv2d_triton``).

Semantics (see ``pyseg/ops/patchwise_conv2d.py``): x (B, Cin, H, W); weight
(B, Cout, Cin/groups, kh, kw, gh, gw); bias (B, Cout, gh, gw) or None; padding
(top, bottom, left, right) of zeros. Output pixel (i, j) uses the kernel of patch
(floor(i*gh/Hout), floor(j*gw/Wout)); patch p along an axis of ``out`` pixels covers
[ceil(p*out/grid), ceil((p+1)*out/grid)). Sizes need not divide.

Kernels (all deterministic, no atomics; every output element is written by exactly one program):

* forward: one program per (sample, group, out-channel block, patch) x (pixel block of that patch)
  computes a small GEMM (Cout/groups x K) @ (K x pixels), K = Cin/groups*kh*kw, gathering the
  im2col tile with masks. ``USE_DOT`` picks ``tl.dot`` (tensor cores; blocks >= 16) or a
  broadcast multiply + ``tl.sum`` fallback for depthwise / tiny channel counts and float64.
* dX: a gather. Input pixels are grouped into one region per output patch (the patch's output
  rect mapped back to the input, shifted by half the dilated kernel) and tiled; for every tap the
  program gathers the output gradients that read its pixels. The dot path loops over the (few)
  output patches a tile's taps reach and does one masked GEMM per patch; the fallback gathers a
  per-pixel weight (any patch size).
* dW / dBias: one program per (sample, group, out-channel block, K block, patch) looping over the
  patch's pixels: (Cout/groups x pixels) @ (pixels x K) reduction.

Accumulation is float32 (float64 for float64 inputs); outputs are stored in the input dtype.
Element offsets that can exceed 2**31 (sample/channel bases) are computed in int64.
Under ``TRITON_INTERPRET=1`` fixed block sizes are used; on a GPU the kernels are autotuned,
keyed on the channel counts, K and the patch size rounded up to a power of two (``PIX_BUCKET``);
``PYSEG_TRITON_AUTOTUNE=0`` takes the first pruned configuration instead (kernels/_launch.py).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ._index import patch_rect as _patch_rect
from ._index import unflatten as _unflatten
from ._launch import empty, launch, pow2_bucket

__all__ = ["forward", "backward", "choose_dot"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# shared index helpers
# --------------------------------------------------------------------------------------------
def _region_starts(out, grid, S, P, halo, size) -> List[int]:
    """Start of the dX region of every patch p = 0..grid along one axis (host copy of the
    computation in ``_dx_kernel``, used to size its launch grid)."""
    res = []
    for p in range(grid + 1):
        s = ((p * out + grid - 1) // grid) * S - P + halo
        s = min(max(s, 0), size)
        if p == 0:
            s = 0
        if p == grid:
            s = size
        res.append(s)
    return res


#: the kernels' integer arguments are not specialised by value (==1, divisible by 16): at the
#: PatchWiseConv2d shapes (stride/padding/dilation/groups 1, sizes divisible by 16) Triton's value-specialised
#: variants of the 3x3 tl.dot configurations spilled 4-88 B per thread on sm_90 (kernels/_aot.py
#: --specialise-ints), the unspecialised ones none; so what launches is what tests/test_triton_sm90.py checks.
_INT_ARGS = ["Cin", "H", "W", "Cout", "Hout", "Wout", "GH", "GW", "G", "Cg", "Og", "K", "SH", "SW", "PT", "PL", "DH",
             "DW", "HALO_H", "HALO_W", "NPIX", "PIX_BUCKET"]


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=[n for n in _INT_ARGS if n not in ("HALO_H", "HALO_W")])
def _fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    Cin, H, W, Cout, Hout, Wout, GH, GW, G, Cg, Og, K,
    SH, SW, PT, PL, DH, DW,
    NPIX, PIX_BUCKET,  # largest patch pixel count (sizes the grid); its next power of two (autotune key only)
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
    ACC_F64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    npatch = GH * GW
    # 1-D grid (axis 0 allows 2**31 - 1 programs): pixel block fastest, then patch, out-channel block, ...
    pid_p, patch, cob, g, b = _unflatten(tl.program_id(0).to(tl.int64), tl.cdiv(NPIX, BLOCK_P), npatch,
                                         tl.cdiv(Og, BLOCK_CO), G)

    r0, ph, c0, pw = _patch_rect(patch, GH, GW, Hout, Wout)  # the patch's output rect
    npx = ph * pw

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < npx
    oi = r0 + offs_p // pw
    oj = c0 + offs_p % pw
    iy0 = oi * SH - PT
    ix0 = oj * SW - PL

    co = cob * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < Og
    co_glob = g * Og + co  # int64
    w_row = (b * Cout + co_glob) * K  # int64, (BLOCK_CO,)
    x_base = x_ptr + (b * Cin + g * Cg) * H * W

    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=acc_dtype)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        ci = kk // (KH * KW)
        tap = kk % (KH * KW)
        ky = tap // KW
        kx = tap % KW
        iy = iy0[None, :] + (ky * DH)[:, None]
        ix = ix0[None, :] + (kx * DW)[:, None]
        xm = kmask[:, None] & pmask[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        xoff = ci.to(tl.int64)[:, None] * H * W + (iy * W + ix)
        xt = tl.load(x_base + xoff, mask=xm, other=0.0)
        woff = (w_row[:, None] + kk[None, :]) * npatch + patch
        wt = tl.load(w_ptr + woff, mask=comask[:, None] & kmask[None, :], other=0.0)
        if USE_DOT:
            acc = tl.dot(wt, xt, acc, input_precision=PRECISION, out_dtype=acc_dtype)
        else:
            acc += tl.sum(wt.to(acc_dtype)[:, :, None] * xt.to(acc_dtype)[None, :, :], axis=1)

    if HAS_BIAS:
        bv = tl.load(b_ptr + (b * Cout + co_glob) * npatch + patch, mask=comask, other=0.0)
        acc += bv.to(acc_dtype)[:, None]
    yoff = (b * Cout + co_glob)[:, None] * Hout * Wout + (oi * Wout + oj)[None, :]
    tl.store(y_ptr + yoff, acc.to(y_ptr.dtype.element_ty), mask=comask[:, None] & pmask[None, :])


# --------------------------------------------------------------------------------------------
# backward: dX (gather)
# --------------------------------------------------------------------------------------------
@triton.jit
def _tap_output(i, P, k, D, S, n_out, n_grid):
    """Along one axis: the output index o that reads input coordinate i through kernel tap k
    (o * S = i + P - k * D), whether it exists (divisible, inside the output), and its patch."""
    t = i + P - k * D
    tc = tl.maximum(t, 0)
    o = tc // S
    valid = (t >= 0) & (tc % S == 0) & (o < n_out)
    return o, valid, tl.minimum(o, n_out - 1) * n_grid // n_out


@triton.jit
def _tap_patch_span(lo, hi, P, k, D, S, n_out, n_grid):
    """Along one axis: the first and last patch of the outputs that read input coordinates lo..hi
    through kernel tap k (last < first when there is none); scalars."""
    a = tl.maximum(lo + P - k * D, 0)
    o_lo = (a + S - 1) // S
    e = hi + P - k * D
    o_hi = tl.where(e >= 0, tl.minimum(tl.maximum(e, 0) // S, n_out - 1), -1)
    first = tl.minimum(o_lo, n_out - 1) * n_grid // n_out
    return first, tl.where(o_hi >= o_lo, tl.maximum(o_hi, 0) * n_grid // n_out, first - 1)


@triton.jit(do_not_specialize=[n for n in _INT_ARGS if n != "K"])
def _dx_kernel(
    go_ptr, w_ptr, gx_ptr,
    Cin, H, W, Cout, Hout, Wout, GH, GW, G, Cg, Og,
    SH, SW, PT, PL, DH, DW, HALO_H, HALO_W,
    NPIX, PIX_BUCKET,  # largest region pixel count (sizes the grid); its next power of two (autotune key only)
    KH: tl.constexpr, KW: tl.constexpr, USE_DOT: tl.constexpr,
    ACC_F64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr,
):
    npatch = GH * GW
    # pixel block fastest, then region (one per output patch), in-channel block, ...
    pid_p, region, cib, g, b = _unflatten(tl.program_id(0).to(tl.int64), tl.cdiv(NPIX, BLOCK_P), npatch,
                                          tl.cdiv(Cg, BLOCK_CI), G)

    rr = region // GW
    rc = region % GW
    # dX region of patch p along an axis: starts at its first output's input position plus half
    # the dilated kernel, clamped; region 0 starts at 0 and the last ends at the input size, so the
    # regions partition the input (host copy: _region_starts).
    y0 = tl.minimum(tl.maximum((rr * Hout + GH - 1) // GH * SH - PT + HALO_H, 0), H)
    y0 = tl.where(rr == 0, 0, y0)
    y1 = tl.minimum(tl.maximum(((rr + 1) * Hout + GH - 1) // GH * SH - PT + HALO_H, 0), H)
    y1 = tl.where(rr + 1 == GH, H, y1)
    x0 = tl.minimum(tl.maximum((rc * Wout + GW - 1) // GW * SW - PL + HALO_W, 0), W)
    x0 = tl.where(rc == 0, 0, x0)
    x1 = tl.minimum(tl.maximum(((rc + 1) * Wout + GW - 1) // GW * SW - PL + HALO_W, 0), W)
    x1 = tl.where(rc + 1 == GW, W, x1)
    rw = tl.maximum(x1 - x0, 1)
    npx = (y1 - y0) * (x1 - x0)

    p_first = pid_p * BLOCK_P
    offs_p = p_first + tl.arange(0, BLOCK_P)
    pmask = offs_p < npx
    iy = y0 + offs_p // rw
    ix = x0 + offs_p % rw
    # rows / cols this block can touch (scalar bounds, for the dot path's patch loops)
    p_last = tl.minimum(p_first + BLOCK_P, npx) - 1
    row_lo = y0 + p_first // rw
    row_hi = y0 + p_last // rw
    col_lo = x0
    col_hi = x1 - 1

    ci = cib * BLOCK_CI + tl.arange(0, BLOCK_CI)
    cimask = ci < Cg
    go_base = (b * Cout + g * Og) * Hout * Wout  # int64
    # weight row of (out channel co, in channel ci): ((b*Cout + g*Og + co)*Cg + ci) * KH*KW
    wb = (b * Cout + g * Og) * Cg  # int64

    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    acc = tl.zeros((BLOCK_CI, BLOCK_P), dtype=acc_dtype)
    for ky in tl.static_range(KH):
        oi, vy, opr = _tap_output(iy, PT, ky, DH, SH, Hout, GH)
        for kx in tl.static_range(KW):
            oj, vx, opc = _tap_output(ix, PL, kx, DW, SW, Wout, GW)
            valid = pmask & vy & vx
            o_off = oi * Wout + oj
            tapoff = ky * KW + kx
            if USE_DOT:
                # output rows/cols reachable from this block for this tap, then their patches
                pr_lo, pr_hi = _tap_patch_span(row_lo, row_hi, PT, ky, DH, SH, Hout, GH)
                pc_lo, pc_hi = _tap_patch_span(col_lo, col_hi, PL, kx, DW, SW, Wout, GW)
                for co0 in range(0, Og, BLOCK_CO):
                    co = co0 + tl.arange(0, BLOCK_CO)
                    com = co < Og
                    got = tl.load(go_ptr + go_base + co.to(tl.int64)[:, None] * Hout * Wout + o_off[None, :],
                                  mask=com[:, None] & valid[None, :], other=0.0)
                    wrow = ((wb + co.to(tl.int64)[None, :] * Cg + ci[:, None]) * (KH * KW) + tapoff) * npatch
                    wmask = cimask[:, None] & com[None, :]
                    # one masked GEMM per output patch this tap reaches (usually one, two at borders)
                    # (one flat loop over the (rows x cols) patch span: nested runtime loops inside the
                    # unrolled taps made ptxas spill the accumulator in bfloat16)
                    npc = pc_hi + 1 - pc_lo
                    for pp in range(0, (pr_hi + 1 - pr_lo) * npc):
                        ppr = pr_lo + pp // npc
                        ppc = pc_lo + pp % npc
                        m = (opr == ppr) & (opc == ppc)
                        gm = tl.where(m[None, :], got, tl.zeros_like(got))
                        wt = tl.load(w_ptr + wrow + (ppr * GW + ppc), mask=wmask, other=0.0)
                        acc = tl.dot(wt, gm, acc, input_precision=PRECISION, out_dtype=acc_dtype)
            else:
                pp = opr * GW + opc
                for co0 in range(0, Og, BLOCK_CO):
                    co = co0 + tl.arange(0, BLOCK_CO)
                    com = co < Og
                    got = tl.load(go_ptr + go_base + co.to(tl.int64)[:, None] * Hout * Wout + o_off[None, :],
                                  mask=com[:, None] & valid[None, :], other=0.0)
                    wrow = (wb + co.to(tl.int64)[None, :] * Cg + ci[:, None]) * (KH * KW) + tapoff  # (CI, CO)
                    woff = wrow[:, :, None] * npatch + pp[None, None, :]
                    wmask = (cimask[:, None] & com[None, :])[:, :, None] & valid[None, None, :]
                    w3 = tl.load(w_ptr + woff, mask=wmask, other=0.0)
                    acc += tl.sum(w3.to(acc_dtype) * got.to(acc_dtype)[None, :, :], axis=1)

    gxoff = (b * Cin + g * Cg + ci.to(tl.int64))[:, None] * H * W + (iy * W + ix)[None, :]
    tl.store(gx_ptr + gxoff, acc.to(gx_ptr.dtype.element_ty), mask=cimask[:, None] & pmask[None, :])


# --------------------------------------------------------------------------------------------
# backward: dW and dBias (per-patch reductions)
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=[n for n in _INT_ARGS if n not in ("HALO_H", "HALO_W")])
def _dw_kernel(
    go_ptr, x_ptr, gw_ptr, gb_ptr,
    Cin, H, W, Cout, Hout, Wout, GH, GW, G, Cg, Og, K,
    SH, SW, PT, PL, DH, DW,
    NPIX,  # largest patch pixel count (unused)
    PIX_BUCKET,  # next power of two of NPIX (autotune key and pruning only)
    KH: tl.constexpr, KW: tl.constexpr, COMPUTE_W: tl.constexpr, COMPUTE_B: tl.constexpr,
    USE_DOT: tl.constexpr, ACC_F64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    npatch = GH * GW
    if COMPUTE_W:
        n_k_blocks = tl.cdiv(K, BLOCK_K)
    else:
        n_k_blocks = 1
    # patch fastest, then K block, out-channel block, ...
    patch, kb, cob, g, b = _unflatten(tl.program_id(0).to(tl.int64), npatch, n_k_blocks, tl.cdiv(Og, BLOCK_CO), G)

    r0, ph, c0, pw = _patch_rect(patch, GH, GW, Hout, Wout)  # the patch's output rect
    npx = ph * pw

    co = cob * BLOCK_CO + tl.arange(0, BLOCK_CO)
    comask = co < Og
    co_glob = g * Og + co  # int64
    go_rows = (b * Cout + co_glob) * Hout * Wout  # int64 (BLOCK_CO,)
    kk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = kk < K
    ci = kk // (KH * KW)
    tap = kk % (KH * KW)
    ky = tap // KW
    kx = tap % KW
    x_base = x_ptr + (b * Cin + g * Cg) * H * W
    xch = ci.to(tl.int64) * H * W

    acc = tl.zeros((BLOCK_CO, BLOCK_K), dtype=acc_dtype)
    bacc = tl.zeros((BLOCK_CO,), dtype=acc_dtype)
    for p0 in range(0, npx, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < npx
        oi = r0 + offs_p // pw
        oj = c0 + offs_p % pw
        got = tl.load(go_ptr + go_rows[:, None] + (oi * Wout + oj)[None, :],
                      mask=comask[:, None] & pmask[None, :], other=0.0)
        if COMPUTE_B:
            bacc += tl.sum(got.to(acc_dtype), axis=1)
        if COMPUTE_W:
            iy = (oi * SH - PT)[:, None] + (ky * DH)[None, :]
            ix = (oj * SW - PL)[:, None] + (kx * DW)[None, :]
            xm = pmask[:, None] & kmask[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            xt = tl.load(x_base + xch[None, :] + (iy * W + ix), mask=xm, other=0.0)  # (P, K)
            if USE_DOT:
                acc = tl.dot(got, xt, acc, input_precision=PRECISION, out_dtype=acc_dtype)
            else:
                acc += tl.sum(got.to(acc_dtype)[:, :, None] * xt.to(acc_dtype)[None, :, :], axis=1)

    if COMPUTE_W:
        woff = ((b * Cout + co_glob) * K)[:, None] * npatch + kk[None, :] * npatch + patch
        tl.store(gw_ptr + woff, acc.to(gw_ptr.dtype.element_ty), mask=comask[:, None] & kmask[None, :])
    if COMPUTE_B:
        boff = (b * Cout + co_glob) * npatch + patch
        tl.store(gb_ptr + boff, bacc.to(gb_ptr.dtype.element_ty), mask=comask & (kb == 0))


# --------------------------------------------------------------------------------------------
# configurations: fixed under the interpreter, autotuned on a GPU
# --------------------------------------------------------------------------------------------
def _np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def choose_dot(m: int, n: int, dtype: torch.dtype) -> bool:
    """Whether the ``tl.dot`` path is the default for a per-patch GEMM with m output rows and a
    reduction of n terms (forward / dW: m = Cout/groups, n = Cin/groups*kh*kw; dX: m = Cin/groups,
    n = Cout/groups).

    tl.dot needs blocks >= 16; with >= 8 rows and terms the padding waste is at most 2x on the
    tensor cores, which still beats the CUDA-core fallback. float64 takes the fallback on a GPU.
    """
    if dtype == torch.float64 and not _interpreting():
        return False
    return m >= 8 and n >= 8


# Under the interpreter every program costs Python time per op, so blocks are as large as the
# problem (numpy handles big tiles cheaply), capped at 16 channels to keep several-block loops
# exercised by modest tests.
def _fwd_meta_interp(use_dot, Og, K, npix):
    lo = 16 if use_dot else 1
    return dict(BLOCK_CO=max(lo, min(_np2(Og), 16)), BLOCK_K=max(lo, min(_np2(K), 32)),
                BLOCK_P=max(lo, min(_np2(npix), 128)))


def _dx_meta_interp(use_dot, Cg, Og, npix):
    lo = 16 if use_dot else 1
    return dict(BLOCK_CI=max(lo, min(_np2(Cg), 16)), BLOCK_CO=max(lo, min(_np2(Og), 16)),
                BLOCK_P=max(lo, min(_np2(npix), 128)))


def _dw_meta_interp(use_dot, Og, K, npix):
    lo = 16 if use_dot else 1
    return dict(BLOCK_CO=max(lo, min(_np2(Og), 16)), BLOCK_K=max(lo, min(_np2(K), 32)),
                BLOCK_P=max(lo, min(_np2(npix), 64)))


def _cfgs(dicts, stages=(2, 3), warps=(4,)):
    return [triton.Config(d, num_warps=nw, num_stages=ns) for d in dicts for nw in warps for ns in stages]


def _prune(dims, floor):
    """Keep the configs whose blocks do not exceed the problem dims (rounded up to a power of
    two, and never below ``floor``, the tl.dot minimum); else the smallest config. A dW launch
    for the bias only (``COMPUTE_W`` false) has one K block: only the smallest ``BLOCK_K`` is kept
    (the others would compile the same reduction again)."""

    def prune(configs, nargs, **kwargs):
        a = dict(nargs)
        a.update(kwargs)
        lim = {name: max(_np2(a[arg]), floor) for name, arg in dims.items()}
        out = [c for c in configs if all(c.kwargs[n] <= v for n, v in lim.items())]
        if not out:
            out = [min(configs, key=lambda c: sum(c.kwargs[n] for n in dims))]
        if "BLOCK_K" in dims and a.get("COMPUTE_W", True) is False:
            k = min(c.kwargs["BLOCK_K"] for c in out)
            out = [c for c in out if c.kwargs["BLOCK_K"] == k]
        return out

    return prune


# (kernel, dot?) -> (block dicts, autotune key, {block name: kernel arg it must not exceed}).
# Small spaces (a few configurations per problem after pruning), sized to HyperSeg's patches
# (4x4 .. 32x32 pixels: pixel blocks of 16..64 on the tensor cores, up to 256 on the CUDA-core
# fallback, whose tiles are a few channels wide) and kept within the register file: every
# configuration the registry models' shapes keep compiles for sm_90 without spills
# (tests/test_triton_sm90.py). Left out because they spilled there: 128-pixel tl.dot tiles of the
# forward (float32 "ieee" holds whole K rows per thread: up to 1.1 KB), dW tl.dot tiles that reduce
# over more than 16 pixels or are 32 channels wide (4-812 B), dX tl.dot tiles over more than 16
# input or output channels (8-108 B), and fallback tiles of more than 2048 products (8 B).
def _gpu_space(name, dot):
    if name == "fwd" or name == "dw":
        if dot and name == "fwd":
            blocks = [dict(BLOCK_CO=co, BLOCK_K=k, BLOCK_P=p) for co in (16, 32, 64) for k in (32, 64)
                      for p in (16, 64) if co * p <= 2048 and co * k <= 1024]
        elif dot:  # dW: BLOCK_P is the reduction dimension of its tl.dot
            blocks = [dict(BLOCK_CO=16, BLOCK_K=k, BLOCK_P=16) for k in (32, 64)]
        else:
            blocks = [dict(BLOCK_CO=co, BLOCK_K=k, BLOCK_P=p) for co in (1, 4, 8) for k in (4, 16)
                      for p in (16, 64, 256) if co * k * p <= 2048 and (k == 16 or co == 1)]
        key = ["Og", "K", "PIX_BUCKET", "KH", "KW"] + (["COMPUTE_W"] if name == "dw" else [])
        return blocks, key, {"BLOCK_CO": "Og", "BLOCK_K": "K", "BLOCK_P": "PIX_BUCKET"}
    if dot:
        blocks = [dict(BLOCK_CI=16, BLOCK_CO=16, BLOCK_P=p) for p in (16, 64)]
    else:
        blocks = [dict(BLOCK_CI=ci, BLOCK_CO=co, BLOCK_P=p) for ci in (1, 8) for co in (1, 8)
                  for p in (16, 64, 256) if ci * co * p <= 2048]
    return blocks, ["Cg", "Og", "PIX_BUCKET", "KH", "KW"], {"BLOCK_CI": "Cg", "BLOCK_CO": "Og", "BLOCK_P": "PIX_BUCKET"}


_KERNELS = {"fwd": _fwd_kernel, "dx": _dx_kernel, "dw": _dw_kernel}
_TUNED = {}


def _tuned(name, dot):
    """The autotuned GPU launcher of kernel ``name`` for the tl.dot (``dot``) or fallback path."""
    if (name, dot) not in _TUNED:
        blocks, key, dims = _gpu_space(name, dot)
        _TUNED[(name, dot)] = triton.autotune(
            configs=_cfgs(blocks, stages=(3,) if dot else (2,)), key=key,
            prune_configs_by={"early_config_prune": _prune(dims, 16 if dot else 1)})(_KERNELS[name])
    return _TUNED[(name, dot)]


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _interpreting():
        return "tf32"
    return "ieee"


def _empty(shape, like: torch.Tensor) -> torch.Tensor:
    """Allocation of every kernel output (tests replace it to poison outputs with NaN)."""
    return empty(shape, like)


def _out_size(n, p0, p1, d, k, s):
    return (n + p0 + p1 - d * (k - 1) - 1) // s + 1


def _check(x, weight, stride, padding, dilation, groups):
    if x.dim() != 4 or weight.dim() != 7:
        raise ValueError(f"expected x (B,Cin,H,W) and weight (B,Cout,Cin/groups,kh,kw,gh,gw), "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if len(stride) != 2 or len(dilation) != 2 or len(padding) != 4:
        raise ValueError("stride and dilation need 2 values, padding 4 (top, bottom, left, right)")


def _geometry(x, weight, stride, padding, dilation, groups):
    """Validated contiguous x and weight, and the convolution's geometry (B, Cin, H, W, Cout, Cg,
    KH, KW, GH, GW, sh, sw, pt, pl, dh, dw, G, Og, K, Hout, Wout)."""
    _check(x, weight, stride, padding, dilation, groups)
    x = x.contiguous()
    weight = weight.contiguous()
    B, Cin, H, W = x.shape
    _, Cout, Cg, KH, KW, GH, GW = weight.shape
    sh, sw = int(stride[0]), int(stride[1])
    pt, pb, pl, pr = (int(p) for p in padding)
    dh, dw = int(dilation[0]), int(dilation[1])
    G = int(groups)
    K = Cg * KH * KW
    Hout = _out_size(H, pt, pb, dh, KH, sh)
    Wout = _out_size(W, pl, pr, dw, KW, sw)
    return x, weight, (B, Cin, H, W, Cout, Cg, KH, KW, GH, GW, sh, sw, pt, pl, dh, dw, G, Cout // G, K, Hout, Wout)


def _run(name, dot, interp_meta, n_programs, args, common):
    """Launch kernel ``name`` on a 1-D grid of ``n_programs(blocks)`` programs: with the fixed
    blocks ``interp_meta`` under the interpreter, autotuned (tl.dot path ``dot`` or fallback) on a GPU."""
    if _interpreting():
        launch(_KERNELS[name], (n_programs(interp_meta),), *args, **common, **interp_meta)
    else:
        launch(_tuned(name, bool(dot)), lambda meta: (n_programs(meta),), *args, **common)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
            padding: Sequence[int], dilation: Sequence[int], groups: int, *,
            use_dot: Optional[bool] = None) -> torch.Tensor:
    """y = patch-wise conv2d(x, weight) + bias. ``use_dot`` forces the tl.dot / fallback path."""
    x, weight, geom = _geometry(x, weight, stride, padding, dilation, groups)
    B, Cin, H, W, Cout, Cg, KH, KW, GH, GW, sh, sw, pt, pl, dh, dw, G, Og, K, Hout, Wout = geom
    y = _empty((B, Cout, Hout, Wout), x)
    if y.numel() == 0:
        return y
    if bias is not None:
        bias = bias.contiguous()
    npix = -(-Hout // GH) * -(-Wout // GW)
    if use_dot is None:
        use_dot = choose_dot(Og, K, x.dtype)
    acc64 = x.dtype == torch.float64
    args = (x, weight, bias if bias is not None else x, y,
            Cin, H, W, Cout, Hout, Wout, GH, GW, G, Cg, Og, K, sh, sw, pt, pl, dh, dw, npix, pow2_bucket(npix))
    common = dict(KH=KH, KW=KW, HAS_BIAS=bias is not None, USE_DOT=bool(use_dot), ACC_F64=acc64,
                  PRECISION=_precision(x.dtype) if use_dot else "ieee")
    _run("fwd", use_dot, _fwd_meta_interp(use_dot, Og, K, npix),
         lambda m: B * G * triton.cdiv(Og, m["BLOCK_CO"]) * GH * GW * triton.cdiv(npix, m["BLOCK_P"]), args, common)
    return y


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
             padding: Sequence[int], dilation: Sequence[int], groups: int, output_mask: Sequence[bool], *,
             use_dot: Optional[bool] = None):
    """(grad_x, grad_weight, grad_bias); masked-out entries are empty tensors."""
    x, weight, geom = _geometry(x, weight, stride, padding, dilation, groups)
    B, Cin, H, W, Cout, Cg, KH, KW, GH, GW, sh, sw, pt, pl, dh, dw, G, Og, K, Hout, Wout = geom
    grad_out = grad_out.contiguous()
    if tuple(grad_out.shape) != (B, Cout, Hout, Wout):
        raise ValueError(f"grad_out must have shape {(B, Cout, Hout, Wout)}, got {tuple(grad_out.shape)}")
    if grad_out.dtype != x.dtype:
        grad_out = grad_out.to(x.dtype)
    acc64 = x.dtype == torch.float64
    prec = _precision(x.dtype)
    npatch = GH * GW
    npix = -(-Hout // GH) * -(-Wout // GW)

    gx = x.new_empty(0)
    gw = weight.new_empty(0)
    gb = weight.new_empty(0)

    if output_mask[0]:
        gx = _empty(x.shape, x)
        halo_h, halo_w = (dh * (KH - 1)) // 2, (dw * (KW - 1)) // 2
        ys = _region_starts(Hout, GH, sh, pt, halo_h, H)
        xs = _region_starts(Wout, GW, sw, pl, halo_w, W)
        rpix = max(max(b - a for a, b in zip(ys, ys[1:])) * max(b - a for a, b in zip(xs, xs[1:])), 1)
        dot = use_dot if use_dot is not None else choose_dot(Cg, Og, x.dtype)
        args = (grad_out, weight, gx, Cin, H, W, Cout, Hout, Wout, GH, GW, G, Cg, Og,
                sh, sw, pt, pl, dh, dw, halo_h, halo_w, rpix, pow2_bucket(rpix))
        common = dict(KH=KH, KW=KW, USE_DOT=bool(dot), ACC_F64=acc64, PRECISION=prec if dot else "ieee")
        _run("dx", dot, _dx_meta_interp(dot, Cg, Og, rpix),
             lambda m: B * G * triton.cdiv(Cg, m["BLOCK_CI"]) * npatch * triton.cdiv(rpix, m["BLOCK_P"]), args, common)

    if output_mask[1] or output_mask[2]:
        cw, cb = bool(output_mask[1]), bool(output_mask[2])
        if cw:
            gw = _empty(weight.shape, weight)
        if cb:
            gb = _empty((B, Cout, GH, GW), weight)
        # the bias alone is a plain sum over the patch: no GEMM, so no tl.dot variant
        dot = cw and (use_dot if use_dot is not None else choose_dot(Og, K, x.dtype))
        args = (grad_out, x, gw if cw else weight, gb if cb else weight,
                Cin, H, W, Cout, Hout, Wout, GH, GW, G, Cg, Og, K, sh, sw, pt, pl, dh, dw, npix, pow2_bucket(npix))
        common = dict(KH=KH, KW=KW, COMPUTE_W=cw, COMPUTE_B=cb, USE_DOT=bool(dot), ACC_F64=acc64,
                      PRECISION=prec if dot else "ieee")

        _run("dw", dot, _dw_meta_interp(dot, Og, K, npix),
             lambda m: B * G * triton.cdiv(Og, m["BLOCK_CO"]) * (triton.cdiv(K, m["BLOCK_K"]) if cw else 1) * npatch,
             args, common)
    return gx, gw, gb

