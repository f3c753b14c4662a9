"""Triton kernels of the hierarchical multi-scale attention fusion (``pyseg::hmsa_fuse_triton``).

Forward in two kernels: ``_hmsa_fwd_kernel`` evaluates the recurrence once per pixel of the 1.0
grid and class (one program per block of grid pixels of one sample; each class re-samples the
attention maps: simple, and the logits gathers dominate) into a float32 (float64) scratch;
``_hmsa_resize_kernel`` resizes it bilinearly to the output size (logits) or takes the argmax over
classes (labels).
Supported structures: up to 2 scales above 1.0 and up to 3 below (the compiled C++/CUDA kernels
take any set of up to 8 scales). ``backward``: the two-scale training form's gradients
(``pyseg::hmsa_fuse_triton_backward``, the compiled backward's math as deterministic gathers).

Slots: H0 = scale 1.0, H1 = the next scale above it, H2 = the one above H1 (top of chain when
N_HIGH == 2); L0, L1, L2 = the scales below 1.0 in processing order (largest first).

Every slot has a grid (h, w) on which the recurrence runs (``scale_sizes``, by default the
logits' size) and the stored logits' size (ph, pw); a slot whose constexpr ``RS_*`` flag is set
reads its logits through a bilinear sample of the storage at the grid pixel (``_logit``), so the
grid-resolution logits are never stored. Attention maps are sampled from their raw size onto the grid.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import launch

MAX_HIGH = 2
MAX_LOW = 3


@triton.jit
def _tap(dst, in_size, out_size, ACC: tl.constexpr):
    # PyTorch's bilinear source index, align_corners=False (see csrc/common/bilinear.h)
    scale = in_size.to(ACC) / out_size.to(ACC)
    src = scale * (dst.to(ACC) + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    l1 = tl.minimum(tl.maximum(src - i0.to(ACC), 0.0), 1.0)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _pixels(h, w, BLOCK: tl.constexpr):
    """(sample, flat offsets, mask, row, column) of this program's BLOCK pixels of an h x w plane:
    grid (pixel blocks, samples). The sample index is int64 (B * C * H * W may exceed 2**31)."""
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < h * w
    return b, offs, mask, offs // w, offs % w


@triton.jit
def _att(a_ptr, b, y, x, ha, wa, h, w, mask, ACC: tl.constexpr):
    # attention of sample b at pixel (y, x) of the h x w logit grid, resampled from ha x wa
    y0, y1, ly0, ly1 = _tap(y, ha, h, ACC)
    x0, x1, lx0, lx1 = _tap(x, wa, w, ACC)
    base = a_ptr + b * ha * wa
    v00 = tl.load(base + y0 * wa + x0, mask=mask, other=0.0).to(ACC)
    v01 = tl.load(base + y0 * wa + x1, mask=mask, other=0.0).to(ACC)
    v10 = tl.load(base + y1 * wa + x0, mask=mask, other=0.0).to(ACC)
    v11 = tl.load(base + y1 * wa + x1, mask=mask, other=0.0).to(ACC)
    return ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)


@triton.jit
def _load(p_ptr, b, c, C, y, x, ph, pw, mask, ACC: tl.constexpr):
    return tl.load(p_ptr + ((b * C + c) * ph + y) * pw + x, mask=mask, other=0.0).to(ACC)


@triton.jit
def _logit(p_ptr, b, c, C, y, x, h, w, ph, pw, mask, RS: tl.constexpr, ACC: tl.constexpr):
    # logit of class c at pixel (y, x) of the h x w grid; RS: the storage is ph x pw, resampled
    # bilinearly onto the grid on the fly (else ph, pw == h, w)
    if RS:
        y0, y1, ly0, ly1 = _tap(y, ph, h, ACC)
        x0, x1, lx0, lx1 = _tap(x, pw, w, ACC)
        v00 = _load(p_ptr, b, c, C, y0, x0, ph, pw, mask, ACC)
        v01 = _load(p_ptr, b, c, C, y0, x1, ph, pw, mask, ACC)
        v10 = _load(p_ptr, b, c, C, y1, x0, ph, pw, mask, ACC)
        v11 = _load(p_ptr, b, c, C, y1, x1, ph, pw, mask, ACC)
        return ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)
    else:
        return _load(p_ptr, b, c, C, y, x, ph, pw, mask, ACC)


@triton.jit
def _corner(t, y0, y1, ly0, ly1, x0, x1, lx0, lx1):
    # corner t (0..3: (y0, x0), (y0, x1), (y1, x0), (y1, x1)) of a bilinear sample: row, column, weight
    top = t < 2
    left = (t % 2) == 0
    return tl.where(top, y0, y1), tl.where(left, x0, x1), tl.where(top, ly0, ly1) * tl.where(left, lx0, lx1)


@triton.jit
def _down(p_ptr, b, c, C, y, x, h_in, w_in, ph, pw, h, w, mask, RS: tl.constexpr, ACC: tl.constexpr):
    # bilinear sample of a top-of-chain logit map (grid h_in x w_in) at pixel (y, x) of an h x w grid
    y0, y1, ly0, ly1 = _tap(y, h_in, h, ACC)
    x0, x1, lx0, lx1 = _tap(x, w_in, w, ACC)
    acc = tl.zeros(y.shape, dtype=ACC)
    for t in range(4):  # a runtime loop, see _pred_h1
        yy, xx, wt = _corner(t, y0, y1, ly0, ly1, x0, x1, lx0, lx1)
        acc += wt * _logit(p_ptr, b, c, C, yy, xx, h_in, w_in, ph, pw, mask, RS, ACC)
    return acc


@triton.jit
def _blend_h1(b, c, C, y, x, mask,
              PH1, AH1, hh1, wh1, hah1, wah1, phh1, pwh1, PH2, hh2, wh2, phh2, pwh2,
              RS_H1: tl.constexpr, RS_H2: tl.constexpr, ACC: tl.constexpr):
    # pred at the H1 grid when H1 is below the top H2: a p + (1 - a) D(p_H2)
    a = _att(AH1, b, y, x, hah1, wah1, hh1, wh1, mask, ACC)
    return a * _logit(PH1, b, c, C, y, x, hh1, wh1, phh1, pwh1, mask, RS_H1, ACC) + \
        (1.0 - a) * _down(PH2, b, c, C, y, x, hh2, wh2, phh2, pwh2, hh1, wh1, mask, RS_H2, ACC)


# The 4-corner sums of _pred_h1 and _low are runtime loops (not unrolled Python calls): each corner
# nests further gathers (resampled logits, attention), and unrolled the four corners' addresses and
# weights are class-invariant, so the compiler keeps them all live across the class loop (spills on
# sm_90 at 2 scales above 1.0); in a loop only one corner's state is live.
@triton.jit
def _pred_h1(b, c, C, y, x, mask, PH1, AH1, hh1, wh1, hah1, wah1, phh1, pwh1, PH2, hh2, wh2, phh2, pwh2,
             h0, w0, N_HIGH: tl.constexpr, RS_H1: tl.constexpr, RS_H2: tl.constexpr, ACC: tl.constexpr):
    # D(pred_H1) at pixel (y, x) of the H0 (1.0) grid
    y0, y1, ly0, ly1 = _tap(y, hh1, h0, ACC)
    x0, x1, lx0, lx1 = _tap(x, wh1, w0, ACC)
    acc = tl.zeros(y.shape, dtype=ACC)
    for t in range(4):
        yy, xx, wt = _corner(t, y0, y1, ly0, ly1, x0, x1, lx0, lx1)
        if N_HIGH == 1:
            v = _logit(PH1, b, c, C, yy, xx, hh1, wh1, phh1, pwh1, mask, RS_H1, ACC)
        else:
            v = _blend_h1(b, c, C, yy, xx, mask, PH1, AH1, hh1, wh1, hah1, wah1, phh1, pwh1, PH2, hh2, wh2,
                          phh2, pwh2, RS_H1, RS_H2, ACC)
        acc += wt * v
    return acc


@triton.jit
def _low(pred, b, c, C, y, x, mask, PL, AL, hl, wl, hal, wal, phl, pwl, h0, w0, RS: tl.constexpr,
         ACC: tl.constexpr):
    # pred = U(a p) + (1 - U(a)) pred at pixel (y, x) of the 1.0 grid (gate before upsampling)
    y0, y1, ly0, ly1 = _tap(y, hl, h0, ACC)
    x0, x1, lx0, lx1 = _tap(x, wl, w0, ACC)
    um = tl.zeros(y.shape, dtype=ACC)
    ua = tl.zeros(y.shape, dtype=ACC)
    for t in range(4):
        yy, xx, wt = _corner(t, y0, y1, ly0, ly1, x0, x1, lx0, lx1)
        a = _att(AL, b, yy, xx, hal, wal, hl, wl, mask, ACC)
        um += wt * (a * _logit(PL, b, c, C, yy, xx, hl, wl, phl, pwl, mask, RS, ACC))
        ua += wt * a
    return um + (1.0 - ua) * pred


@triton.jit
def _hmsa_fwd_kernel(pred_ptr, C,
                     P0, A0, h0, w0, ha0, wa0, ph0, pw0, PH1, AH1, hh1, wh1, hah1, wah1, phh1, pwh1,
                     PH2, hh2, wh2, phh2, pwh2,
                     PL0, AL0, hl0, wl0, hal0, wal0, phl0, pwl0, PL1, AL1, hl1, wl1, hal1, wal1, phl1, pwl1,
                     PL2, AL2, hl2, wl2, hal2, wal2, phl2, pwl2,
                     N_HIGH: tl.constexpr, N_LOW: tl.constexpr, RS_H0: tl.constexpr, RS_H1: tl.constexpr,
                     RS_H2: tl.constexpr, RS_L0: tl.constexpr, RS_L1: tl.constexpr, RS_L2: tl.constexpr,
                     ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Stage 1 of the forward: the fused prediction on the 1.0 grid (h0 x w0), every class, to the
    accumulation-dtype scratch pred_ptr (B, C, h0, w0). Evaluated once per grid pixel (the resize
    to the output size, _hmsa_resize_kernel, reads it 4 times per output pixel instead of
    re-running the recurrence per output tap: the fused form kept four recurrences' gather
    addresses and weights live across the class loop, 255 registers and 0.6-2.6 KB of spill
    per thread on sm_90).

    Per-slot argument groups: (P, A, h, w, ha, wa, ph, pw) for H0, H1, L0..L2; (P, h, w, ph, pw)
    for H2."""
    b, offs, mask, y, x = _pixels(h0, w0, BLOCK)
    for c in range(0, C):
        pred = _logit(P0, b, c, C, y, x, h0, w0, ph0, pw0, mask, RS_H0, ACC)
        if N_HIGH > 0:
            a = _att(A0, b, y, x, ha0, wa0, h0, w0, mask, ACC)
            d = _pred_h1(b, c, C, y, x, mask, PH1, AH1, hh1, wh1, hah1, wah1, phh1, pwh1, PH2, hh2, wh2, phh2,
                         pwh2, h0, w0, N_HIGH, RS_H1, RS_H2, ACC)
            pred = a * pred + (1.0 - a) * d
        if N_LOW >= 1:
            pred = _low(pred, b, c, C, y, x, mask, PL0, AL0, hl0, wl0, hal0, wal0, phl0, pwl0, h0, w0, RS_L0, ACC)
        if N_LOW >= 2:
            pred = _low(pred, b, c, C, y, x, mask, PL1, AL1, hl1, wl1, hal1, wal1, phl1, pwl1, h0, w0, RS_L1, ACC)
        if N_LOW >= 3:
            pred = _low(pred, b, c, C, y, x, mask, PL2, AL2, hl2, wl2, hal2, wal2, phl2, pwl2, h0, w0, RS_L2, ACC)
        tl.store(pred_ptr + (b * C + c) * h0 * w0 + offs, pred, mask=mask)


@triton.jit
def _hmsa_resize_kernel(pred_ptr, out_ptr, C, h0, w0, OH, OW, LABELS: tl.constexpr, CMP: tl.constexpr,
                        ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Stage 2 of the forward: bilinear resize of the 1.0-grid prediction to OH x OW, stored as
    logits (out dtype) or reduced to labels (argmax over classes, compared in the logits dtype
    CMP; NaN wins, first index on ties, as torch.argmax)."""
    b, offs, mask, oy, ox = _pixels(OH, OW, BLOCK)
    y0, y1, ly0, ly1 = _tap(oy, h0, OH, ACC)
    x0, x1, lx0, lx1 = _tap(ox, w0, OW, ACC)
    best = tl.zeros([BLOCK], dtype=ACC)
    arg = tl.zeros([BLOCK], dtype=tl.int64)
    for c in range(0, C):
        base = pred_ptr + (b * C + c) * h0 * w0
        v = (ly0 * lx0) * tl.load(base + y0 * w0 + x0, mask=mask, other=0.0)
        v += (ly0 * lx1) * tl.load(base + y0 * w0 + x1, mask=mask, other=0.0)
        v += (ly1 * lx0) * tl.load(base + y1 * w0 + x0, mask=mask, other=0.0)
        v += (ly1 * lx1) * tl.load(base + y1 * w0 + x1, mask=mask, other=0.0)
        if LABELS:
            v = v.to(CMP).to(ACC)  # compare in the logits dtype
            take = (v > best) | ((v != v) & (best == best)) | (c == 0)
            best = tl.where(take, v, best)
            arg = tl.where(take, c, arg)
        else:
            tl.store(out_ptr + (b * C + c) * OH * OW + offs, v.to(out_ptr.dtype.element_ty), mask=mask)
    if LABELS:
        tl.store(out_ptr + b * OH * OW + offs, arg, mask=mask)


_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
             torch.bfloat16: tl.bfloat16}


def forward(logits, attentions, scales, out_size, labels: bool, scale_sizes=None):
    """Launcher: ``scales`` sorted strictly descending, containing 1.0 (validated by the caller).

    ``scale_sizes``: None or flat (h_0, w_0, h_1, w_1, ...), the grid of each scale (same order).
    """
    n = len(scales)
    one = [float(s) for s in scales].index(1.0)
    n_high, n_low = one, n - 1 - one
    if n_high > MAX_HIGH or n_low > MAX_LOW:
        raise ValueError(f"the Triton hmsa_fuse kernel supports up to {MAX_HIGH} scales above 1.0 and "
                         f"{MAX_LOW} below, got {n_high} above and {n_low} below")
    p = [t.contiguous() for t in logits]
    a = [None if k == 0 else t.contiguous() for k, t in enumerate(attentions)]
    B, C = p[0].shape[:2]
    OH, OW = int(out_size[0]), int(out_size[1])
    dummy = p[0]
    if scale_sizes is None:
        grid_hw = [tuple(int(v) for v in t.shape[-2:]) for t in p]
    else:
        if len(scale_sizes) != 2 * n or min(scale_sizes) <= 0:
            raise ValueError(f"scale_sizes must hold 2 positive ints per scale, got {list(scale_sizes)}")
        grid_hw = [(int(scale_sizes[2 * k]), int(scale_sizes[2 * k + 1])) for k in range(n)]

    def slot(k, need_att):
        # (P, A, h, w, ha, wa, ph, pw), resampled?
        if k is None:
            return [dummy, dummy, 1, 1, 1, 1, 1, 1], False
        h, w = grid_hw[k]
        ph, pw = p[k].shape[-2:]
        rs = (ph, pw) != (h, w)
        if need_att:
            return [p[k], a[k], h, w, a[k].shape[-2], a[k].shape[-1], ph, pw], rs
        return [p[k], dummy, h, w, h, w, ph, pw], rs

    s0, rs0 = slot(one, n_high >= 1)
    sh1, rsh1 = slot(one - 1 if n_high >= 1 else None, n_high >= 2)
    sh2, rsh2 = slot(one - 2 if n_high >= 2 else None, False)
    lows = [slot(one + 1 + i if i < n_low else None, True) for i in range(MAX_LOW)]
    args = s0 + sh1 + [sh2[0], sh2[2], sh2[3], sh2[6], sh2[7]] + lows[0][0] + lows[1][0] + lows[2][0]
    if labels:
        out = torch.empty(B, OH, OW, device=p[0].device, dtype=torch.int64)
    else:
        out = torch.empty(B, C, OH, OW, device=p[0].device, dtype=p[0].dtype)
    acc_t = torch.float64 if p[0].dtype == torch.float64 else torch.float32
    acc = _TL_DTYPE[acc_t]
    h0, w0 = grid_hw[one]
    pred = _empty(B, C, h0, w0, dtype=acc_t, device=p[0].device)
    # one pixel per thread (BLOCK = 4 warps x 32): the recurrence's gathers are the whole cost
    BLOCK = 128
    launch(_hmsa_fwd_kernel, (triton.cdiv(h0 * w0, BLOCK), B), pred, C, *args, N_HIGH=n_high, N_LOW=n_low,
           RS_H0=rs0, RS_H1=rsh1, RS_H2=rsh2, RS_L0=lows[0][1], RS_L1=lows[1][1], RS_L2=lows[2][1], ACC=acc,
           BLOCK=BLOCK)
    launch(_hmsa_resize_kernel, (triton.cdiv(OH * OW, BLOCK), B), pred, out, C, h0, w0, OH, OW, LABELS=labels,
           CMP=_TL_DTYPE[p[0].dtype], ACC=acc, BLOCK=BLOCK)
    return out


# --------------------------------------------------------------------------------------------
# backward of the two-scale training form (``pyseg::hmsa_fuse_triton_backward``)
# --------------------------------------------------------------------------------------------
# Same math as the compiled op (csrc/common/hmsa_fuse.h, "Backward of the two-scale training form"):
#   Al = R(a), m = Al * pl, UA = U(Al), P = U(m) + (1 - UA) * p1, out = F(P)
#   r1 pass  (1.0 grid):  gP = F^T g;  g_p1 = (1 - UA) gP;  gUA = -sum_c p1 gP
#   low pass (low grid):  gm = U^T gP;  g_pl = Al gm;  gAl = sum_c pl gm + U^T gUA
#   att pass (raw attention grid): g_a = R^T gAl
# Every adjoint X^T is a gather through a per-axis table built on the host (``adjoint_table``):
# input index i receives sum_k wt[i, k] * grad[idx[i, k]] (padding: idx -1, weight 0). No
# atomics, so the result is deterministic; accumulation in fp32 (fp64 for fp64 inputs).


def _empty(*shape, dtype, device):
    # allocation hook (tests poison it with NaN to show unwritten elements)
    return torch.empty(*shape, dtype=dtype, device=device)


def adjoint_table(in_size: int, out_size: int, dtype=torch.float32):
    """Adjoint of a 1-D bilinear resize in_size -> out_size (align_corners=False) as a padded gather.

    Returns ``(idx, wt)``, both (in_size, K): input index i receives
    ``sum_k wt[i, k] * grad[idx[i, k]]`` over output indices; unused entries have idx -1 and weight 0.
    The taps are computed in ``dtype`` exactly as the kernels' ``_tap``; zero weights are dropped.
    Entries of one row are ordered by output index (deterministic).
    """
    j = torch.arange(out_size, dtype=torch.int64)
    scale = torch.tensor(in_size, dtype=dtype) / torch.tensor(out_size, dtype=dtype)
    src = (scale * (j.to(dtype) + 0.5) - 0.5).clamp_min(0.0)
    i0 = src.to(torch.int64).clamp_max(in_size - 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    l1 = (src - i0.to(dtype)).clamp(0.0, 1.0)
    l0 = 1.0 - l1
    rows = torch.cat([i0, i1])
    cols = torch.cat([j, j])
    w = torch.cat([l0, l1])
    keep = w != 0
    rows, cols, w = rows[keep], cols[keep], w[keep]
    order = torch.argsort(rows * out_size + cols, stable=True)
    rows, cols, w = rows[order], cols[order], w[order]
    counts = torch.bincount(rows, minlength=in_size)
    K = max(1, int(counts.max()) if counts.numel() else 1)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(rows.numel()) - start[rows]
    idx = torch.full((in_size, K), -1, dtype=torch.int32)
    wt = torch.zeros(in_size, K, dtype=dtype)
    idx[rows, rank] = cols.to(torch.int32)
    wt[rows, rank] = w
    return idx, wt


@triton.jit
def _gather(g_ptr, gw, y, x, IH, WH, KH, IW, WW, KW, mask, ACC: tl.constexpr):
    # sum_{ky, kx} wh[y, ky] ww[x, kx] g[ih[y, ky], iw[x, kx]] (adjoint of a 2-D bilinear resize)
    acc = tl.zeros(y.shape, dtype=ACC)
    for ky in range(0, KH):
        jy = tl.load(IH + y * KH + ky, mask=mask, other=-1)
        wy = tl.load(WH + y * KH + ky, mask=mask, other=0.0).to(ACC)
        r = tl.zeros(y.shape, dtype=ACC)
        for kx in range(0, KW):
            jx = tl.load(IW + x * KW + kx, mask=mask, other=-1)
            wx = tl.load(WW + x * KW + kx, mask=mask, other=0.0).to(ACC)
            ok = mask & (jy >= 0) & (jx >= 0)
            r += wx * tl.load(g_ptr + jy * gw + jx, mask=ok, other=0.0).to(ACC)
        acc += wy * r
    return acc


@triton.jit
def _bwd_r1_kernel(grad_ptr, p1_ptr, a_ptr, gP_ptr, gp1_ptr, gua_ptr, C, OH, OW, h1, w1, hl, wl, ha, wa,
                   FIH, FWH, KFH, FIW, FWW, KFW, ACC: tl.constexpr, BLOCK: tl.constexpr):
    plane = h1 * w1
    b, offs, mask, y, x = _pixels(h1, w1, BLOCK)
    # UA = U(Al) at (y, x), Al = R(a) sampled at the low-grid taps
    y0, y1, ly0, ly1 = _tap(y, hl, h1, ACC)
    x0, x1, lx0, lx1 = _tap(x, wl, w1, ACC)
    ua = tl.zeros([BLOCK], dtype=ACC)
    for t in range(4):  # as the forward's _low
        yy, xx, wt = _corner(t, y0, y1, ly0, ly1, x0, x1, lx0, lx1)
        ua += wt * _att(a_ptr, b, yy, xx, ha, wa, hl, wl, mask, ACC)
    keep = 1.0 - ua
    gu = tl.zeros([BLOCK], dtype=ACC)
    for c in range(0, C):
        bc = b * C + c
        g = _gather(grad_ptr + bc * OH * OW, OW, y, x, FIH, FWH, KFH, FIW, FWW, KFW, mask, ACC)
        o = bc * plane + offs
        tl.store(gP_ptr + o, g, mask=mask)
        tl.store(gp1_ptr + o, (keep * g).to(gp1_ptr.dtype.element_ty), mask=mask)
        gu -= tl.load(p1_ptr + o, mask=mask, other=0.0).to(ACC) * g
    tl.store(gua_ptr + b * plane + offs, gu, mask=mask)


@triton.jit
def _bwd_low_kernel(gP_ptr, gua_ptr, pl_ptr, a_ptr, gpl_ptr, gal_ptr, C, h1, w1, hl, wl, ha, wa,
                    UIH, UWH, KUH, UIW, UWW, KUW, ACC: tl.constexpr, BLOCK: tl.constexpr):
    plane1 = h1 * w1
    planel = hl * wl
    b, offs, mask, y, x = _pixels(hl, wl, BLOCK)
    al = _att(a_ptr, b, y, x, ha, wa, hl, wl, mask, ACC)
    ga = _gather(gua_ptr + b * plane1, w1, y, x, UIH, UWH, KUH, UIW, UWW, KUW, mask, ACC)
    for c in range(0, C):
        bc = b * C + c
        gm = _gather(gP_ptr + bc * plane1, w1, y, x, UIH, UWH, KUH, UIW, UWW, KUW, mask, ACC)
        o = bc * planel + offs
        tl.store(gpl_ptr + o, (al * gm).to(gpl_ptr.dtype.element_ty), mask=mask)
        ga += tl.load(pl_ptr + o, mask=mask, other=0.0).to(ACC) * gm
    tl.store(gal_ptr + b * planel + offs, ga, mask=mask)


@triton.jit
def _bwd_att_kernel(gal_ptr, ga_ptr, hl, wl, ha, wa, RIH, RWH, KRH, RIW, RWW, KRW, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    plane = ha * wa
    b, offs, mask, y, x = _pixels(ha, wa, BLOCK)
    g = _gather(gal_ptr + b * hl * wl, wl, y, x, RIH, RWH, KRH, RIW, RWW, KRW, mask, ACC)
    tl.store(ga_ptr + b * plane + offs, g.to(ga_ptr.dtype.element_ty), mask=mask)


def backward(grad_out, logits_one, logits_low, attention_low):
    """Launcher: gradients of the two-scale training form (scales (1.0, s), s < 1, output="logits",
    grids equal to the stored sizes), same contract as ``pyseg::hmsa_fuse_backward``.

    grad_out (B, C, H, W), logits_one (B, C, h1, w1), logits_low (B, C, hl, wl), attention_low
    (B, 1, ha, wa) -> (g_logits_one, g_logits_low, g_attention_low) in the inputs' dtypes.
    """
    g = grad_out.contiguous()
    p1 = logits_one.contiguous()
    pl = logits_low.contiguous()
    a = attention_low.contiguous()
    B, C, h1, w1 = p1.shape
    hl, wl = pl.shape[-2:]
    ha, wa = a.shape[-2:]
    OH, OW = g.shape[-2:]
    if g.shape[:2] != p1.shape[:2] or pl.shape[:2] != p1.shape[:2] or a.shape[0] != B or a.shape[1] != 1:
        raise ValueError(f"hmsa_fuse backward: inconsistent shapes grad_out {tuple(g.shape)}, logits_one "
                         f"{tuple(p1.shape)}, logits_low {tuple(pl.shape)}, attention_low {tuple(a.shape)}")
    dev = p1.device
    acc_t = torch.float64 if p1.dtype == torch.float64 else torch.float32
    acc = tl.float64 if acc_t == torch.float64 else tl.float32

    def tables(n_in, n_out):
        idx, wt = adjoint_table(n_in, n_out, acc_t)
        return idx.to(dev), wt.to(dev), idx.shape[1]

    f_h, f_w = tables(h1, OH), tables(w1, OW)     # F: 1.0 grid -> out_size
    u_h, u_w = tables(hl, h1), tables(wl, w1)     # U: low grid -> 1.0 grid
    r_h, r_w = tables(ha, hl), tables(wa, wl)     # R: raw attention -> low grid
    gP = _empty(B, C, h1, w1, dtype=acc_t, device=dev)
    gua = _empty(B, h1, w1, dtype=acc_t, device=dev)
    gal = _empty(B, hl, wl, dtype=acc_t, device=dev)
    g_p1 = _empty(B, C, h1, w1, dtype=p1.dtype, device=dev)
    g_pl = _empty(B, C, hl, wl, dtype=pl.dtype, device=dev)
    g_a = _empty(B, 1, ha, wa, dtype=a.dtype, device=dev)
    BLOCK = 128
    launch(_bwd_r1_kernel, (triton.cdiv(h1 * w1, BLOCK), B), g, p1, a, gP, g_p1, gua, C, OH, OW, h1, w1, hl, wl, ha, wa,
                                                     *f_h, *f_w, ACC=acc, BLOCK=BLOCK)
    launch(_bwd_low_kernel, (triton.cdiv(hl * wl, BLOCK), B), gP, gua, pl, a, g_pl, gal, C, h1, w1, hl, wl, ha, wa,
                                                      *u_h, *u_w, ACC=acc, BLOCK=BLOCK)
    launch(_bwd_att_kernel, (triton.cdiv(ha * wa, BLOCK), B), gal, g_a, hl, wl, ha, wa, *r_h, *r_w, ACC=acc,
           BLOCK=BLOCK)
    return g_p1, g_pl, g_a
