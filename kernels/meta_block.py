"""Triton kernels of the fused HyperSeg meta block and the 1x1 level block (forward only).

Layouts as ``torch.ops.pyseg.meta_block`` (csrc/pyseg.cpp): x (B, Cin, H, W) contiguous; weight
(B, hid*Cin + 9*hid + Cout*hid, gh, gw) contiguous, per patch [W1 (hid, Cin) | W2 (hid, 3, 3) |
W3 (Cout, hid)]; scale/shift (2*hid + Cout,) = [stage 1 | stage 2 | stage 3].

One program per (sample, patch, chunk of BLOCK_P patch pixels). Triton tiles live in registers and
cannot be shifted, so the depthwise 3x3 is evaluated tap by tap: for each of the 9 taps the program
recomputes pw1 -> affine -> ReLU6 of the neighbour pixel (with the current patch's weights, reflect
at the image borders), which is exactly the per-patch halo semantics; the hidden map never touches
memory. The price is 9x the pw1 arithmetic; the CUDA kernel keeps the haloed hidden map in shared
memory instead.

Backward is not implemented for Triton: ``backward``/``pointwise_backward`` raise
NotImplementedError (the ops' autograd calls them), use backend="cpu"/"cuda"/"reference" to train.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["forward", "backward", "pointwise_forward", "pointwise_backward"]


@triton.jit
def _reflect(i, n):
    i = tl.where(i < 0, -i, i)
    return tl.where(i >= n, 2 * (n - 1) - i, i)


@triton.jit
def _meta_fwd_kernel(x_ptr, w_ptr, sc_ptr, sh_ptr, y_ptr,
                     Cin, H, W, gh, gw, hid, Cout, N,
                     HID_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    item = tl.program_id(0)
    chunk = tl.program_id(1)
    G = gh * gw
    patch = item % G
    b = item // G
    gi = patch // gw
    gj = patch % gw
    r0 = (gi * H + gh - 1) // gh
    ph = ((gi + 1) * H + gh - 1) // gh - r0
    c0 = (gj * W + gw - 1) // gw
    pw = ((gj + 1) * W + gw - 1) // gw - c0

    p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < ph * pw
    i = p // pw
    j = p % pw
    k = tl.arange(0, HID_BLOCK)
    kmask = k < hid

    wbase = w_ptr + b * N * G + patch  # element n of this patch's weights: wbase + n * G
    xbase = x_ptr + b * Cin * H * W
    s1 = tl.load(sc_ptr + k, mask=kmask, other=0.0).to(tl.float32)
    t1 = tl.load(sh_ptr + k, mask=kmask, other=0.0).to(tl.float32)
    h2 = tl.zeros((HID_BLOCK, BLOCK_P), dtype=tl.float32)
    for d in tl.static_range(9):
        rr = _reflect(r0 + i + (d // 3) - 1, H)
        cc = _reflect(c0 + j + (d % 3) - 1, W)
        off = rr * W + cc
        z1 = tl.zeros((HID_BLOCK, BLOCK_P), dtype=tl.float32)
        for c in range(0, Cin):
            xv = tl.load(xbase + c * H * W + off, mask=pmask, other=0.0).to(tl.float32)
            wv = tl.load(wbase + (k * Cin + c) * G, mask=kmask, other=0.0).to(tl.float32)
            z1 += wv[:, None] * xv[None, :]
        h1 = tl.minimum(tl.maximum(z1 * s1[:, None] + t1[:, None], 0.0), 6.0)
        w2 = tl.load(wbase + (hid * Cin + k * 9 + d) * G, mask=kmask, other=0.0).to(tl.float32)
        h2 += w2[:, None] * h1
    s2 = tl.load(sc_ptr + hid + k, mask=kmask, other=0.0).to(tl.float32)
    t2 = tl.load(sh_ptr + hid + k, mask=kmask, other=0.0).to(tl.float32)
    h2 = tl.minimum(tl.maximum(h2 * s2[:, None] + t2[:, None], 0.0), 6.0)
    h2 = tl.where(kmask[:, None], h2, 0.0)
    out_off = (r0 + i) * W + (c0 + j)
    w3base = wbase + (hid * Cin + 9 * hid) * G
    for o in range(0, Cout):
        w3 = tl.load(w3base + (o * hid + k) * G, mask=kmask, other=0.0).to(tl.float32)
        yo = tl.sum(w3[:, None] * h2, axis=0)
        s3 = tl.load(sc_ptr + 2 * hid + o).to(tl.float32)
        t3 = tl.load(sh_ptr + 2 * hid + o).to(tl.float32)
        yo = yo * s3 + t3
        tl.store(y_ptr + (b * Cout + o) * H * W + out_off, yo.to(y_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _pw_fwd_kernel(x_ptr, w_ptr, sc_ptr, sh_ptr, y_ptr, Cin, H, W, gh, gw, Cout,
                   COUT_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    item = tl.program_id(0)
    chunk = tl.program_id(1)
    G = gh * gw
    patch = item % G
    b = item // G
    gi = patch // gw
    gj = patch % gw
    r0 = (gi * H + gh - 1) // gh
    ph = ((gi + 1) * H + gh - 1) // gh - r0
    c0 = (gj * W + gw - 1) // gw
    pw = ((gj + 1) * W + gw - 1) // gw - c0
    p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < ph * pw
    off = (r0 + p // pw) * W + (c0 + p % pw)
    o = tl.arange(0, COUT_BLOCK)
    omask = o < Cout
    wbase = w_ptr + b * Cout * Cin * G + patch
    acc = tl.zeros((COUT_BLOCK, BLOCK_P), dtype=tl.float32)
    for c in range(0, Cin):
        xv = tl.load(x_ptr + (b * Cin + c) * H * W + off, mask=pmask, other=0.0).to(tl.float32)
        wv = tl.load(wbase + (o * Cin + c) * G, mask=omask, other=0.0).to(tl.float32)
        acc += wv[:, None] * xv[None, :]
    s = tl.load(sc_ptr + o, mask=omask, other=0.0).to(tl.float32)
    t = tl.load(sh_ptr + o, mask=omask, other=0.0).to(tl.float32)
    acc = tl.maximum(acc * s[:, None] + t[:, None], 0.0)
    ptrs = y_ptr + (b * Cout + o[:, None]) * H * W + off[None, :]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=omask[:, None] & pmask[None, :])


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
    y = torch.empty(B, out_channels, H, W, device=x.device, dtype=x.dtype)
    max_pix = -(-H // gh) * -(-W // gw)
    hb = triton.next_power_of_2(hidden)
    bp = _block_p(max_pix, hb)
    grid = (B * gh * gw, triton.cdiv(max_pix, bp))
    _meta_fwd_kernel[grid](x, weight, scale.contiguous(), shift.contiguous(), y, Cin, H, W, gh, gw, hidden,
                           out_channels, N, HID_BLOCK=hb, BLOCK_P=bp)
    return y


def backward(grad_out, x, weight, scale, shift, hidden, out_channels, output_mask):
    raise NotImplementedError(
        "pyseg: the Triton meta_block has no backward pass yet; use backend='cpu', 'cuda' or 'reference' "
        "when gradients are needed")


def pointwise_forward(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      shift: torch.Tensor) -> torch.Tensor:
    """Patch-wise 1x1 conv -> affine -> ReLU forward (inputs validated by pyseg.ops.pointwise_block)."""
    x, weight = x.contiguous(), weight.contiguous()
    B, Cin, H, W = x.shape
    gh, gw = weight.shape[-2:]
    Cout = weight.shape[1] // Cin
    y = torch.empty(B, Cout, H, W, device=x.device, dtype=x.dtype)
    max_pix = -(-H // gh) * -(-W // gw)
    cb = triton.next_power_of_2(Cout)
    bp = _block_p(max_pix, cb)
    grid = (B * gh * gw, triton.cdiv(max_pix, bp))
    _pw_fwd_kernel[grid](x, weight, scale.contiguous(), shift.contiguous(), y, Cin, H, W, gh, gw, Cout,
                         COUT_BLOCK=cb, BLOCK_P=bp)
    return y


def pointwise_backward(grad_out, x, weight, scale, shift, output_mask):
    raise NotImplementedError(
        "pyseg: the Triton pointwise_block has no backward pass yet; use backend='cpu', 'cuda' or 'reference' "
        "when gradients are needed")
