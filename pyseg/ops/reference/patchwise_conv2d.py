"""Reference dynamic patch-wise convolution (F.unfold + batched contraction)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_index(out_size: int, grid: int, device=None) -> torch.Tensor:
    """Patch (grid cell) of every output coordinate: floor(i * grid / out_size)."""
    return torch.div(torch.arange(out_size, device=device) * grid, out_size, rounding_mode="floor")


def patchwise_conv2d(x, weight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """Reference of ``torch.ops.pyseg.patchwise_conv2d``.

    x (B, Cin, H, W); weight (B, Cout, Cin/groups, kh, kw, gh, gw); bias (B, Cout, gh, gw) or None;
    padding (top, bottom, left, right) of zeros. Output pixel (i, j) is the convolution of x with
    the kernel of patch (floor(i*gh/Hout), floor(j*gw/Wout)).
    """
    B, Cin, H, W = x.shape
    _, Cout, Cg, kh, kw, gh, gw = weight.shape
    G = groups
    pt, pb, pl, pr = padding
    xp = F.pad(x, (pl, pr, pt, pb)) if any(padding) else x
    cols = F.unfold(xp, (kh, kw), dilation=dilation, stride=stride)  # (B, Cin*kh*kw, L)
    Hout = (H + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wout = (W + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    K = Cg * kh * kw
    Og = Cout // G
    cols = cols.view(B, G, K, Hout, Wout)
    w = weight.reshape(B, G, Og, K, gh, gw)
    if Hout % gh == 0 and Wout % gw == 0:
        # Equal patches: one batched GEMM per (sample, group, patch).
        patch_h, patch_w = Hout // gh, Wout // gw
        c = cols.view(B, G, K, gh, patch_h, gw, patch_w).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, G, gh, gw, K, patch_h * patch_w)
        wm = w.permute(0, 1, 4, 5, 2, 3)  # (B, G, gh, gw, Og, K)
        y = torch.matmul(wm, c)  # (B, G, gh, gw, Og, patch_h*patch_w)
        y = y.view(B, G, gh, gw, Og, patch_h, patch_w).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Cout, Hout, Wout)
    else:
        # Uneven patches: expand the weight grid to every output pixel (nearest upsampling).
        ri = patch_index(Hout, gh, x.device)
        ci = patch_index(Wout, gw, x.device)
        wpix = w[:, :, :, :, ri][..., ci]  # (B, G, Og, K, Hout, Wout)
        y = torch.einsum("bgokhw,bgkhw->bgohw", wpix, cols).reshape(B, Cout, Hout, Wout)
    if bias is not None:
        ri = patch_index(Hout, gh, x.device)
        ci = patch_index(Wout, gw, x.device)
        y = y + bias[:, :, ri][..., ci]
    return y
