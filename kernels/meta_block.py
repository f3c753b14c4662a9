"""Triton kernels of the fused HyperSeg meta block, ``pyseg::meta_block_triton`` (forward and backward).
The 1x1 level block (pointwise_block) has its own file, kernels/pointwise_block.py.

Layouts as ``torch.ops.pyseg.meta_block`` (csrc/pyseg.cpp): x (B, Cin, H, W) contiguous; weight
(B, hid*Cin + 9*hid + Cout*hid, gh, gw) contiguous, per patch [W1 (hid, Cin) | W2 (hid, 3, 3) |
W3 (Cout, hid)]; scale/shift (2*hid + Cout,) = [stage 1 | stage 2 | stage 3].

Forward: one program per (sample, patch, chunk of BLOCK_P patch pixels). Triton tiles live in
registers and cannot be shifted, so the depthwise 3x3 is evaluated tap by tap: for each of the 9
taps the program recomputes pw1 -> affine -> ReLU6 of the neighbour pixel (with the current patch's
weights, reflect at the image borders), which is exactly the per-patch halo semantics; the hidden
map never touches memory. The price is 9x the pw1 arithmetic; the CUDA kernel keeps the haloed
hidden map in shared memory instead.

Backward (meta_block): two kernels, one program per (sample, patch) each, looping over pixel chunks;
the forward intermediates are recomputed, nothing is saved by the forward.
  1. stage 3+2 (``_meta_bwd_stage23_kernel``): recompute z2 (tap by tap, as the forward), h2 and
     z3 = W3 h2; gradients of W3, scale3/shift3, scale2/shift2; g2 = dL/dz2 (hid x patch pixels)
     goes to a float32 (float64 for float64 inputs) scratch buffer.
  2. stage 1 (``_meta_bwd_stage1_kernel``): per haloed position q of the patch, recompute
     z1 = W1 x(q) once, gather dL/dh1(q) = sum_d W2[:, d] g2(q - d) over the 9 taps (a gather, so
     no shifted register tiles and no scatter), then the gradients of W2, W1, scale1/shift1 and
     the patch's haloed grad_x W1^T g1, written to a per-patch haloed buffer.
Weight gradients are per (sample, patch): no races. Affine gradients are per-work-item partials
summed in float64 in a fixed order by the launcher, and grad_x sums, per input pixel and in a fixed
order, the haloed-buffer positions that read it (``_halo_gather_index``; reflect included).
Deterministic, no atomics. Per-patch GEMMs use tl.dot (input_precision "ieee", no TF32). float16,
bfloat16 and float32 inputs compute in float32, float64 in float64; outputs are stored in the
input dtype.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._index import patch_rect as _patch_rect
from ._index import reflect as _reflect
from ._launch import acc_dtype as _acc_dtype
from ._launch import dot_block as _blk
from ._launch import empty as _empty
from ._launch import launch as _launch

__all__ = ["forward", "backward"]


@triton.jit
def _tap_rows_cols(r, c, H, W):
    """Row offsets (times W) and columns of the 3x3 neighbourhood of pixels (r, c), reflected at the
    image borders: tap d of pixel (r, c) is at row offset [ro0, ro1, ro2][d // 3] plus column
    [co0, co1, co2][d % 3] (_tap_offset). Shared by the forward and backward kernels."""
    return _reflect(r - 1, H) * W, r * W, _reflect(r + 1, H) * W, _reflect(c - 1, W), c, _reflect(c + 1, W)


@triton.jit
def _tap_offset(ro0, ro1, ro2, co0, co1, co2, d: tl.constexpr):
    """Offset of depthwise tap d (row d // 3 - 1, column d % 3 - 1) from _tap_rows_cols' values."""
    return (ro0 if d // 3 == 0 else (ro1 if d // 3 == 1 else ro2)) + \
        (co0 if d % 3 == 0 else (co1 if d % 3 == 1 else co2))


@triton.jit
def _meta_fwd_kernel(x_ptr, w_ptr, sc_ptr, sh_ptr, y_ptr,
                     Cin, H, W, gh, gw, hid, Cout, N,
                     HID_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, ACC_F64: tl.constexpr):
    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    item = tl.program_id(0)
    chunk = tl.program_id(1)
    G = gh * gw
    patch = item % G
    b = item // G
    r0, ph, c0, pw = _patch_rect(patch, gh, gw, H, W)

    p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < ph * pw
    i = p // pw
    j = p % pw
    k = tl.arange(0, HID_BLOCK)
    kmask = k < hid

    wbase = w_ptr + b * N * G + patch  # element n of this patch's weights: wbase + n * G
    xbase = x_ptr + b * Cin * H * W
    s1 = tl.load(sc_ptr + k, mask=kmask, other=0.0).to(acc_dtype)
    t1 = tl.load(sh_ptr + k, mask=kmask, other=0.0).to(acc_dtype)
    h2 = tl.zeros((HID_BLOCK, BLOCK_P), dtype=acc_dtype)
    ro0, ro1, ro2, co0, co1, co2 = _tap_rows_cols(r0 + i, c0 + j, H, W)
    for d in tl.static_range(9):
        off = _tap_offset(ro0, ro1, ro2, co0, co1, co2, d)
        z1 = tl.zeros((HID_BLOCK, BLOCK_P), dtype=acc_dtype)
        for c in range(0, Cin):
            xv = tl.load(xbase + c * H * W + off, mask=pmask, other=0.0).to(acc_dtype)
            wv = tl.load(wbase + (k * Cin + c) * G, mask=kmask, other=0.0).to(acc_dtype)
            z1 += wv[:, None] * xv[None, :]
        h1 = tl.minimum(tl.maximum(z1 * s1[:, None] + t1[:, None], 0.0), 6.0)
        w2 = tl.load(wbase + (hid * Cin + k * 9 + d) * G, mask=kmask, other=0.0).to(acc_dtype)
        h2 += w2[:, None] * h1
    s2 = tl.load(sc_ptr + hid + k, mask=kmask, other=0.0).to(acc_dtype)
    t2 = tl.load(sh_ptr + hid + k, mask=kmask, other=0.0).to(acc_dtype)
    h2 = tl.minimum(tl.maximum(h2 * s2[:, None] + t2[:, None], 0.0), 6.0)
    h2 = tl.where(kmask[:, None], h2, 0.0)
    out_off = (r0 + i) * W + (c0 + j)
    w3base = wbase + (hid * Cin + 9 * hid) * G
    for o in range(0, Cout):
        w3 = tl.load(w3base + (o * hid + k) * G, mask=kmask, other=0.0).to(acc_dtype)
        yo = tl.sum(w3[:, None] * h2, axis=0)
        s3 = tl.load(sc_ptr + 2 * hid + o).to(acc_dtype)
        t3 = tl.load(sh_ptr + 2 * hid + o).to(acc_dtype)
        yo = yo * s3 + t3
        tl.store(y_ptr + (b * Cout + o) * H * W + out_off, yo.to(y_ptr.dtype.element_ty), mask=pmask)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
# Per-patch GEMMs use tl.dot on acc_dtype operands (float64 for float64 inputs, else float32) with
# input_precision="ieee" (no TF32); every block is >= 16 (tl.dot's minimum), padded lanes are zero.
@triton.jit
def _meta_bwd_stage23_kernel(x_ptr, w_ptr, sc_ptr, sh_ptr, gy_ptr, g2_ptr, gw_ptr, part_ptr,
                             Cin, H, W, gh, gw, hid, Cout, N, A, NP,
                             CIN_BLOCK: tl.constexpr, HID_BLOCK: tl.constexpr, COUT_BLOCK: tl.constexpr,
                             BLOCK_P: tl.constexpr, NEED_W: tl.constexpr, NEED_AFF: tl.constexpr,
                             ACC_F64: tl.constexpr):
    """One program per (sample, patch), looping over chunks of the patch's pixels: recompute the
    forward pass, then the gradients of stage 3 (W3, scale3, shift3) and stage 2 (scale2, shift2);
    writes g2 = dL/dz2 (the depthwise output before its affine), (hid, ph*pw) per work item, to
    the acc_dtype scratch g2_ptr for the stage-1 kernel."""
    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    item = tl.program_id(0)
    G = gh * gw
    patch = item % G
    b = (item // G).to(tl.int64)
    r0, ph, c0, pw = _patch_rect(patch, gh, gw, H, W)
    npx = ph * pw

    k = tl.arange(0, HID_BLOCK)
    kmask = k < hid
    c = tl.arange(0, CIN_BLOCK)
    cmask = c < Cin
    o = tl.arange(0, COUT_BLOCK)
    omask = o < Cout
    wbase = w_ptr + b * N * G + patch  # element n of this patch's weights: wbase + n * G
    w2ptr = wbase + (hid * Cin + k * 9) * G  # (HID,) tap 0 of W2; tap d at + d * G
    xrows = x_ptr + (b * Cin + c[:, None]) * H * W  # (CIN, 1) channel planes of this sample
    gyrows = gy_ptr + (b * Cout + o[:, None]) * H * W  # (COUT, 1)
    w1 = tl.load(wbase + (k[:, None] * Cin + c[None, :]) * G, mask=kmask[:, None] & cmask[None, :],
                 other=0.0).to(acc_dtype)  # (HID, CIN)
    w3off = hid * Cin + 9 * hid
    w3 = tl.load(wbase + (w3off + o[:, None] * hid + k[None, :]) * G, mask=omask[:, None] & kmask[None, :],
                 other=0.0).to(acc_dtype)  # (COUT, HID)
    w3t = tl.load(wbase + (w3off + o[None, :] * hid + k[:, None]) * G, mask=kmask[:, None] & omask[None, :],
                  other=0.0).to(acc_dtype)  # (HID, COUT)
    s1 = tl.load(sc_ptr + k, mask=kmask, other=0.0).to(acc_dtype)
    t1 = tl.load(sh_ptr + k, mask=kmask, other=0.0).to(acc_dtype)
    s2 = tl.load(sc_ptr + hid + k, mask=kmask, other=0.0).to(acc_dtype)
    t2 = tl.load(sh_ptr + hid + k, mask=kmask, other=0.0).to(acc_dtype)
    s3 = tl.load(sc_ptr + 2 * hid + o, mask=omask, other=0.0).to(acc_dtype)
    t3 = tl.load(sh_ptr + 2 * hid + o, mask=omask, other=0.0).to(acc_dtype)

    acc_w3 = tl.zeros((COUT_BLOCK, HID_BLOCK), dtype=acc_dtype)
    acc_s3 = tl.zeros((COUT_BLOCK,), dtype=acc_dtype)
    acc_t3 = tl.zeros((COUT_BLOCK,), dtype=acc_dtype)
    acc_s2 = tl.zeros((HID_BLOCK,), dtype=acc_dtype)
    acc_t2 = tl.zeros((HID_BLOCK,), dtype=acc_dtype)
    for p0 in range(0, npx, BLOCK_P):
        # int64 pixel indices: also keeps the interpreter's per-op int32 overflow checks off this path
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        pmask = p < npx
        i = p // pw
        j = p % pw
        # ---- recompute: z2 = dw3x3(relu6(s1 * W1 x + t1)) on the haloed patch ----
        ro0, ro1, ro2, co0, co1, co2 = _tap_rows_cols(r0 + i, c0 + j, H, W)
        z2 = tl.zeros((HID_BLOCK, BLOCK_P), dtype=acc_dtype)
        for d in tl.static_range(9):
            off = _tap_offset(ro0, ro1, ro2, co0, co1, co2, d)
            xt = tl.load(xrows + off[None, :], mask=cmask[:, None] & pmask[None, :], other=0.0).to(acc_dtype)
            z1 = tl.dot(w1, xt, input_precision="ieee")
            h1 = tl.minimum(tl.maximum(z1 * s1[:, None] + t1[:, None], 0.0), 6.0)
            w2 = tl.load(w2ptr + d * G, mask=kmask, other=0.0).to(acc_dtype)
            z2 += w2[:, None] * h1
        u2 = z2 * s2[:, None] + t2[:, None]
        h2 = tl.where(kmask[:, None], tl.minimum(tl.maximum(u2, 0.0), 6.0), 0.0)
        z3 = tl.dot(w3, h2, input_precision="ieee")  # (COUT, P)
        # ---- stage 3: y = s3 * z3 + t3 ----
        out_off = (r0 + i) * W + (c0 + j)
        gy = tl.load(gyrows + out_off[None, :], mask=omask[:, None] & pmask[None, :],
                     other=0.0).to(acc_dtype)
        acc_s3 += tl.sum(gy * z3, axis=1)
        acc_t3 += tl.sum(gy, axis=1)
        g3 = gy * s3[:, None]
        if NEED_W:
            acc_w3 = tl.dot(g3, tl.trans(h2), acc_w3, input_precision="ieee")
        # ---- stage 2: gu2 = (W3^T g3) * relu6'(u2); g2 = s2 * gu2 ----
        gh2 = tl.dot(w3t, g3, input_precision="ieee")  # (HID, P)
        gu2 = tl.where((u2 >= 0.0) & (u2 <= 6.0), gh2, 0.0)
        acc_s2 += tl.sum(gu2 * z2, axis=1)
        acc_t2 += tl.sum(gu2, axis=1)
        g2 = gu2 * s2[:, None]
        tl.store(g2_ptr + (item * hid + k[:, None]).to(tl.int64) * NP + p[None, :], g2,
                 mask=kmask[:, None] & pmask[None, :])

    if NEED_W:
        gwbase = gw_ptr + b * N * G + patch
        tl.store(gwbase + (w3off + o[:, None] * hid + k[None, :]) * G, acc_w3.to(gw_ptr.dtype.element_ty),
                 mask=omask[:, None] & kmask[None, :])
    if NEED_AFF:
        pbase = part_ptr + item.to(tl.int64) * 2 * A  # [scale partials (A) | shift partials (A)]
        tl.store(pbase + hid + k, acc_s2, mask=kmask)
        tl.store(pbase + A + hid + k, acc_t2, mask=kmask)
        tl.store(pbase + 2 * hid + o, acc_s3, mask=omask)
        tl.store(pbase + A + 2 * hid + o, acc_t3, mask=omask)


@triton.jit
def _meta_bwd_stage1_kernel(x_ptr, w_ptr, sc_ptr, sh_ptr, g2_ptr, gxh_ptr, gw_ptr, part_ptr,
                            Cin, H, W, gh, gw, hid, N, A, NP, PHH, PWH, HB, WB,
                            CIN_BLOCK: tl.constexpr, HID_BLOCK: tl.constexpr, BLOCK_Q: tl.constexpr,
                            NEED_X: tl.constexpr, NEED_W: tl.constexpr, NEED_AFF: tl.constexpr,
                            ACC_F64: tl.constexpr):
    """One program per (sample, patch), looping over chunks of the haloed patch's (ph+2)*(pw+2)
    positions q: recompute z1 = W1 x at q (reflect at image borders), gather dL/dh1 at q from the
    9 depthwise taps of g2 (from the stage-2/3 kernel), then the gradients of W2, W1, scale1,
    shift1 and the haloed grad_x of the patch, W1^T g1, stored at rows gi*PHH + a, columns
    gj*PWH + b of the (B, Cin, HB, WB) buffer gxh (every position written exactly once; the
    launcher sums the positions that read the same pixel)."""
    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    item = tl.program_id(0)
    G = gh * gw
    patch = item % G
    b = (item // G).to(tl.int64)
    gi = patch // gw
    gj = patch % gw
    r0, ph, c0, pw = _patch_rect(patch, gh, gw, H, W)
    hw = pw + 2
    nq = (ph + 2) * hw

    k = tl.arange(0, HID_BLOCK)
    kmask = k < hid
    c = tl.arange(0, CIN_BLOCK)
    cmask = c < Cin
    dcol = tl.arange(0, 16)
    wbase = w_ptr + b * N * G + patch
    w2ptr = wbase + (hid * Cin + k * 9) * G
    xrows = x_ptr + (b * Cin + c[:, None]) * H * W  # (CIN, 1)
    w1 = tl.load(wbase + (k[:, None] * Cin + c[None, :]) * G, mask=kmask[:, None] & cmask[None, :],
                 other=0.0).to(acc_dtype)  # (HID, CIN)
    w1t = tl.load(wbase + (k[None, :] * Cin + c[:, None]) * G, mask=cmask[:, None] & kmask[None, :],
                  other=0.0).to(acc_dtype)  # (CIN, HID)
    s1 = tl.load(sc_ptr + k, mask=kmask, other=0.0).to(acc_dtype)
    t1 = tl.load(sh_ptr + k, mask=kmask, other=0.0).to(acc_dtype)
    g2rows = g2_ptr + (item * hid + k[:, None]).to(tl.int64) * NP  # (HID, 1) rows of this item's g2
    gxh_rows = gxh_ptr + (b * Cin + c[:, None]) * HB * WB  # (CIN, 1)

    acc_w1 = tl.zeros((HID_BLOCK, CIN_BLOCK), dtype=acc_dtype)
    acc_w2 = tl.zeros((HID_BLOCK, 16), dtype=acc_dtype)
    acc_s1 = tl.zeros((HID_BLOCK,), dtype=acc_dtype)
    acc_t1 = tl.zeros((HID_BLOCK,), dtype=acc_dtype)
    for q0 in range(0, nq, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q).to(tl.int64)
        qmask = q < nq
        a = q // hw
        bb = q % hw
        off = _reflect(r0 - 1 + a, H) * W + _reflect(c0 - 1 + bb, W)
        xt = tl.load(xrows + off[None, :], mask=cmask[:, None] & qmask[None, :], other=0.0).to(acc_dtype)
        z1 = tl.dot(w1, xt, input_precision="ieee")  # (HID, Q)
        u1 = z1 * s1[:, None] + t1[:, None]
        h1 = tl.minimum(tl.maximum(u1, 0.0), 6.0)
        # dL/dh1 at q = sum over taps d of W2[:, d] * g2 at the patch pixel q - d (if inside the patch)
        gh1 = tl.zeros((HID_BLOCK, BLOCK_Q), dtype=acc_dtype)
        for d in tl.static_range(9):
            pi = a - d // 3
            pj = bb - d % 3
            valid = qmask & (pi >= 0) & (pi < ph) & (pj >= 0) & (pj < pw)
            g2 = tl.load(g2rows + (pi * pw + pj)[None, :], mask=kmask[:, None] & valid[None, :],
                         other=0.0)
            w2 = tl.load(w2ptr + d * G, mask=kmask, other=0.0).to(acc_dtype)
            gh1 += w2[:, None] * g2
            if NEED_W:
                acc_w2 += tl.where(dcol[None, :] == d, tl.sum(h1 * g2, axis=1)[:, None], 0.0)
        gu1 = tl.where((u1 >= 0.0) & (u1 <= 6.0), gh1, 0.0)
        acc_s1 += tl.sum(gu1 * z1, axis=1)
        acc_t1 += tl.sum(gu1, axis=1)
        g1 = gu1 * s1[:, None]
        if NEED_W:
            acc_w1 = tl.dot(g1, tl.trans(xt), acc_w1, input_precision="ieee")
        if NEED_X:
            gxv = tl.dot(w1t, g1, input_precision="ieee")  # (CIN, Q)
            hoff = (gi * PHH + a) * WB + gj * PWH + bb
            tl.store(gxh_rows + hoff[None, :], gxv,
                     mask=cmask[:, None] & qmask[None, :])

    if NEED_W:
        gwbase = gw_ptr + b * N * G + patch
        tl.store(gwbase + (k[:, None] * Cin + c[None, :]) * G, acc_w1.to(gw_ptr.dtype.element_ty),
                 mask=kmask[:, None] & cmask[None, :])
        tl.store(gwbase + (hid * Cin + k[:, None] * 9 + dcol[None, :]) * G, acc_w2.to(gw_ptr.dtype.element_ty),
                 mask=kmask[:, None] & (dcol[None, :] < 9))
    if NEED_AFF:
        pbase = part_ptr + item.to(tl.int64) * 2 * A
        tl.store(pbase + k, acc_s1, mask=kmask)
        tl.store(pbase + A + k, acc_t1, mask=kmask)


def _block_p(max_pixels: int, rows: int) -> int:
    # keep the (rows x BLOCK_P) register tiles moderate
    cap = max(16, 8192 // triton.next_power_of_2(max(rows, 1)))
    return int(min(triton.next_power_of_2(max_pixels), cap, 256))


def forward(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, hidden: int,
            out_channels: int) -> torch.Tensor:
    """Fused meta block forward (inputs already validated by pyseg.ops.meta_block)."""
    x, weight = x.contiguous(), weight.contiguous()
    B, Cin, H, W = x.shape
    gh, gw = weight.shape[-2:]
    N = weight.shape[1]
    if N != hidden * Cin + 9 * hidden + out_channels * hidden:
        raise ValueError(f"weight has {N} values per patch; expected hid*Cin + 9*hid + Cout*hid for "
                         f"Cin={Cin}, hid={hidden}, Cout={out_channels}")
    y = _empty((B, out_channels, H, W), x)
    max_pix = -(-H // gh) * -(-W // gw)
    hb = triton.next_power_of_2(hidden)
    bp = _block_p(max_pix, hb)
    grid = (B * gh * gw, triton.cdiv(max_pix, bp))
    _launch(_meta_fwd_kernel, grid, x, weight, scale.contiguous(), shift.contiguous(), y, Cin, H, W, gh, gw, hidden,
                           out_channels, N, HID_BLOCK=hb, BLOCK_P=bp, ACC_F64=x.dtype == torch.float64)
    return y


def _bwd_block_p(max_pixels: int, rows: int) -> int:
    cap = max(16, 4096 // rows)
    return int(min(max(16, triton.next_power_of_2(max_pixels)), cap, 128))


def _warps(rows: int) -> int:
    return 8 if rows >= 128 else 4


def _reflect_host(i: int, n: int) -> int:
    return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)


@functools.lru_cache(maxsize=128)
def _halo_gather_index_cpu(n: int, grid: int) -> torch.Tensor:
    """(n, R) int64: for every image coordinate r along an axis of n pixels cut into ``grid`` cells,
    the coordinates g*(P+2) + a (P = ceil(n/grid)) of the haloed positions a of cell g that read r
    (reflect at the image borders), in increasing order, padded with grid*(P+2), the buffer's zero
    slot. Same set as halo_readers in csrc/common/meta_block.h."""
    pitch = -(-n // grid) + 2
    readers = [[] for _ in range(n)]
    for g in range(grid):
        beg, end = -(-g * n // grid), -(-(g + 1) * n // grid)
        for a in range(end - beg + 2):
            readers[_reflect_host(beg - 1 + a, n)].append(g * pitch + a)
    width = max(len(r) for r in readers)
    return torch.tensor([r + [grid * pitch] * (width - len(r)) for r in readers], dtype=torch.int64)


def _halo_gather_index(n: int, grid: int, device: torch.device) -> torch.Tensor:
    return _halo_gather_index_cpu(n, grid).to(device)


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
             shift: torch.Tensor, hidden: int, out_channels: int, output_mask: Sequence[bool]):
    """(grad_x, grad_weight, grad_scale, grad_shift) of the fused meta block; entries whose
    output_mask is false are empty tensors. Deterministic (no atomics): two kernels per
    (sample, patch) (stage 3+2, then stage 1, see the kernels), affine partials per work item
    summed in float64 in a fixed order, grad_x gathered from per-patch haloed buffers."""
    x, weight, grad_out = x.contiguous(), weight.contiguous(), grad_out.contiguous()
    scale, shift = scale.contiguous(), shift.contiguous()
    B, Cin, H, W = x.shape
    gh, gw = weight.shape[-2:]
    N = weight.shape[1]
    hid, Cout = int(hidden), int(out_channels)
    if N != hid * Cin + 9 * hid + Cout * hid:
        raise ValueError(f"weight has {N} values per patch; expected hid*Cin + 9*hid + Cout*hid for "
                         f"Cin={Cin}, hid={hid}, Cout={Cout}")
    if tuple(grad_out.shape) != (B, Cout, H, W):
        raise ValueError(f"grad_out must have shape {(B, Cout, H, W)}, got {tuple(grad_out.shape)}")
    need_x, need_w = bool(output_mask[0]), bool(output_mask[1])
    need_aff = bool(output_mask[2]) or bool(output_mask[3])
    gx, gwt = x.new_empty(0), weight.new_empty(0)
    gs, gt = scale.new_empty(0), shift.new_empty(0)
    if not (need_x or need_w or need_aff):
        return gx, gwt, gs, gt
    G = gh * gw
    PH, PW = -(-H // gh), -(-W // gw)
    NP, A = PH * PW, 2 * hid + Cout
    PHH, PWH = PH + 2, PW + 2
    HB, WB = gh * PHH + 1, gw * PWH + 1  # haloed grad_x buffer + one zero row/column (gather padding)
    f32 = _acc_dtype(x)
    g2 = _empty((B * G, hid, NP), x, f32)
    part = _empty((B * G, 2, A), x, f32) if need_aff else g2
    if need_w:
        gwt = _empty(weight.shape, weight)
    gxh = g2
    if need_x:
        gxh = _empty((B, Cin, HB, WB), x, f32)
        gxh[:, :, HB - 1, :] = 0
        gxh[:, :, :, WB - 1] = 0
    cb, hb, ob = _blk(Cin), _blk(hid), _blk(Cout)
    rows = max(cb, hb, ob)
    f64 = x.dtype == torch.float64
    bp = _bwd_block_p(NP, rows)
    _launch(_meta_bwd_stage23_kernel, (B * G,),
        x, weight, scale, shift, grad_out, g2, gwt if need_w else weight, part,
        Cin, H, W, gh, gw, hid, Cout, N, A, NP,
        CIN_BLOCK=cb, HID_BLOCK=hb, COUT_BLOCK=ob, BLOCK_P=bp, NEED_W=need_w, NEED_AFF=need_aff, ACC_F64=f64,
        num_warps=_warps(rows))
    bq = _bwd_block_p(PHH * PWH, max(cb, hb))
    _launch(_meta_bwd_stage1_kernel, (B * G,),
        x, weight, scale, shift, g2, gxh, gwt if need_w else weight, part,
        Cin, H, W, gh, gw, hid, N, A, NP, PHH, PWH, HB, WB,
        CIN_BLOCK=cb, HID_BLOCK=hb, BLOCK_Q=bq, NEED_X=need_x, NEED_W=need_w, NEED_AFF=need_aff,
        ACC_F64=f64, num_warps=_warps(max(cb, hb)))
    if need_aff:
        tot = part.double().sum(0)  # fixed-order reduction over the work items
        if output_mask[2]:
            gs = tot[0].to(scale.dtype, copy=True)  # no views: outputs must not alias
        if output_mask[3]:
            gt = tot[1].to(shift.dtype, copy=True)
    if need_x:
        ridx = _halo_gather_index(H, gh, x.device)
        cidx = _halo_gather_index(W, gw, x.device)
        rows_sum = gxh.index_select(2, ridx.reshape(-1)).view(B, Cin, H, ridx.shape[1], WB).sum(3)
        gx = rows_sum.index_select(3, cidx.reshape(-1)).view(B, Cin, H, W, cidx.shape[1]).sum(4).to(x.dtype)
    return gx, gwt, gs, gt
