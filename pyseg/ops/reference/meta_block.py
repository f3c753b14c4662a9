"""Reference HyperSeg meta block (v1_0 ``HyperPatchInvertedResidual`` semantics).

Per patch of the gh x gw grid, with a 1-pixel halo:
  1. the whole map is reflect-padded by 1 (image borders only; inside, the halo holds real pixels);
  2. expansion 1x1: 1x1 conv Cin->hid on the patch *and its halo* with the patch's own weights -> affine -> ReLU6;
  3. dw: depthwise 3x3, valid, on the haloed hidden map -> affine -> ReLU6;
  4. projection 1x1: 1x1 conv hid->Cout -> affine.
Output pixel (i, j) belongs to patch (floor(i*gh/H), floor(j*gw/W)), so sizes need not divide.

Two equivalent evaluations are provided: the public implementation's method (pad, unfold into
haloed patches, grouped convolutions with one group per patch) for sizes the grid divides, and a
per-pixel gather (weights nearest-upsampled to every pixel, 3x3 taps unfolded) for any size.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .patchwise_conv2d import patch_index

# A norm callable gets (t, center) where t holds the values of a stage and ``center`` a view/selection
# of t restricted to patch pixels (no halo); it returns normalised t. Used by MetaBlock in training to
# compute BatchNorm statistics over patch pixels.
Norm = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def affine_norm(scale: Optional[torch.Tensor], shift: Optional[torch.Tensor]) -> Norm:
    """A per-channel affine (eval-mode BatchNorm folded) as a norm callable."""

    def f(t, center, channel_dim):
        shape = [1] * t.dim()
        shape[channel_dim] = -1
        if scale is not None:
            t = t * scale.reshape(shape)
        if shift is not None:
            t = t + shift.reshape(shape)
        return t

    return f


def split_meta_weight(weight: torch.Tensor, in_channels: int, hidden: int, out_channels: int):
    """Split the flat (B, hid*Cin + 9*hid + Cout*hid, gh, gw) layout into w1, w2, w3 (views)."""
    B, N, gh, gw = weight.shape
    n1, n2 = hidden * in_channels, 9 * hidden
    w1 = weight[:, :n1].reshape(B, hidden, in_channels, gh, gw)
    w2 = weight[:, n1:n1 + n2].reshape(B, hidden, 3, 3, gh, gw)
    w3 = weight[:, n1 + n2:].reshape(B, out_channels, hidden, gh, gw)
    return w1, w2, w3


def _relu6(t):
    return t.clamp(0.0, 6.0)


def _grouped_patches(x, w1, w2, w3, norm1, norm2, norm3):
    """Public method: unfold haloed patches, one conv group per (sample, patch)."""
    B, Cin, H, W = x.shape
    hid, Cout = w1.shape[1], w3.shape[1]
    gh, gw = w1.shape[-2:]
    patch_h, patch_w = H // gh, W // gw
    xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
    # (B, Cin*(patch_h+2)*(patch_w+2), gh*gw) -> (B, gh, gw, Cin, patch_h+2, patch_w+2)
    cols = F.unfold(xp, (patch_h + 2, patch_w + 2), stride=(patch_h, patch_w))
    patches = cols.view(B, Cin, patch_h + 2, patch_w + 2, gh, gw).permute(0, 4, 5, 1, 2, 3)
    P = B * gh * gw
    patches = patches.reshape(1, P * Cin, patch_h + 2, patch_w + 2)
    k1 = w1.permute(0, 3, 4, 1, 2).reshape(P * hid, Cin, 1, 1)
    k2 = w2.permute(0, 4, 5, 1, 2, 3).reshape(P * hid, 1, 3, 3)
    k3 = w3.permute(0, 3, 4, 1, 2).reshape(P * Cout, hid, 1, 1)
    h = F.conv2d(patches, k1, groups=P).view(P, hid, patch_h + 2, patch_w + 2)
    h = _relu6(norm1(h, h[:, :, 1:-1, 1:-1], 1))
    h = F.conv2d(h.reshape(1, P * hid, patch_h + 2, patch_w + 2), k2, groups=P * hid).view(P, hid, patch_h, patch_w)
    h = _relu6(norm2(h, h, 1))
    y = F.conv2d(h.reshape(1, P * hid, patch_h, patch_w), k3, groups=P).view(P, Cout, patch_h, patch_w)
    y = norm3(y, y, 1)
    return y.view(B, gh, gw, Cout, patch_h, patch_w).permute(0, 3, 1, 4, 2, 5).reshape(B, Cout, H, W)


def _per_pixel(x, w1, w2, w3, norm1, norm2, norm3):
    """Any size: every pixel gathers its patch's weights and its 3x3 reflect-padded neighbourhood."""
    B, Cin, H, W = x.shape
    hid, Cout = w1.shape[1], w3.shape[1]
    gh, gw = w1.shape[-2:]
    ri, ci = patch_index(H, gh, x.device), patch_index(W, gw, x.device)
    taps = F.unfold(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3).view(B, Cin, 9, H, W)
    w1p = w1[..., ri, :][..., ci]  # (B, hid, Cin, H, W)
    h = torch.einsum("bocHW,bckHW->bokHW", w1p, taps)  # (B, hid, 9, H, W)
    h = _relu6(norm1(h, h[:, :, 4], 1))
    w2p = w2.reshape(B, hid, 9, gh, gw)[..., ri, :][..., ci]
    h = (h * w2p).sum(2)
    h = _relu6(norm2(h, h, 1))
    w3p = w3[..., ri, :][..., ci]
    y = torch.einsum("bohHW,bhHW->boHW", w3p, h)
    return norm3(y, y, 1)


def meta_block_staged(x, w1, w2, w3, norm1: Norm, norm2: Norm, norm3: Norm, method: str = "auto"):
    """The meta block with arbitrary per-stage norms (see :data:`Norm`)."""
    H, W = x.shape[-2:]
    gh, gw = w1.shape[-2:]
    if method == "auto":
        method = "grouped" if H % gh == 0 and W % gw == 0 else "per_pixel"
    if method == "grouped":
        return _grouped_patches(x, w1, w2, w3, norm1, norm2, norm3)
    return _per_pixel(x, w1, w2, w3, norm1, norm2, norm3)


def meta_block(x, w1, w2, w3, scale1=None, shift1=None, scale2=None, shift2=None, scale3=None, shift3=None,
               method: str = "auto"):
    """Reference meta block with per-channel affines (eval-mode BN) after each stage.

    x (B, Cin, H, W); w1 (B, hid, Cin, gh, gw); w2 (B, hid, 3, 3, gh, gw); w3 (B, Cout, hid, gh, gw);
    scale1/shift1, scale2/shift2: (hid,); scale3/shift3: (Cout,); None means identity.
    ``method``: "grouped" (the public implementation's way; needs H % gh == 0 and W % gw == 0),
    "per_pixel" (any size) or "auto".
    """
    return meta_block_staged(x, w1, w2, w3, affine_norm(scale1, shift1), affine_norm(scale2, shift2),
                             affine_norm(scale3, shift3), method)


def pointwise_block(x, weight, scale=None, shift=None, bias=None):
    """Reference of HyperSeg's 1x1 level: patch-wise 1x1 conv -> affine -> ReLU.

    weight (B, Cout, Cin, gh, gw); scale/shift (Cout,) or None.
    """
    from .patchwise_conv2d import patchwise_conv2d

    B, Cout, Cin, gh, gw = weight.shape
    y = patchwise_conv2d(x, weight.reshape(B, Cout, Cin, 1, 1, gh, gw), bias)
    y = affine_norm(scale, shift)(y, y, 1)
    return torch.relu(y)
