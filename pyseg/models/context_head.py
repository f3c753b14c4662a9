"""HyperSeg context heads: the stride-32 signal source -> the signal phi that the weight mapper reads.

Both heads run a small U-Net on the stride-32 map: 2x2 stride-2 convolutions downwards, the deepest
map global-average-pooled and broadcast back to its size (image-level context), then upwards with
1x1 convolutions on (skip, upsampled) concatenations and nearest x2 upsampling. Inputs therefore need
the stride-32 map to halve exactly ``levels - 1`` times: image sides must be multiples of
``32 * 2 ** (levels - 1)`` (:attr:`input_multiple`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ContextHead", "ContextHeadV01"]


def _conv_bn_relu(cin, cout, k, stride=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride=stride, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _global_context(t: Tensor) -> Tensor:
    """Global average, broadcast back to t's spatial size."""
    if t.shape[-2:] == (1, 1):
        return t
    return F.adaptive_avg_pool2d(t, 1).expand_as(t)


class ContextHead(nn.Module):
    """The v1_0 head (Cityscapes, CamVid).

    ``in_conv`` (1x1 C -> C/2, BN, ReLU) gives the local half of phi; ``levels - 1`` down blocks
    (2x2 stride-2 conv C/2 -> C/2, BN, ReLU); the deepest map is replaced by its global average; each
    up step concatenates the skip with the running map (C), applies a 1x1 conv to C/2 (BN, ReLU) and
    upsamples x2 (nearest). phi = cat(local C/2, context C/2): C channels at stride 32.
    """

    def __init__(self, in_channels: int, levels: int = 2):
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        if in_channels % 2:
            raise ValueError(f"in_channels must be even, got {in_channels}")
        half = in_channels // 2
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.levels = levels
        self.in_conv = _conv_bn_relu(in_channels, half, 1)
        self.down_blocks = nn.ModuleList(_conv_bn_relu(half, half, 2, stride=2) for _ in range(levels - 1))
        self.up_blocks = nn.ModuleList(_conv_bn_relu(in_channels, half, 1) for _ in range(levels - 1))

    @property
    def input_multiple(self) -> int:
        """Required divisor of the stride-32 map's sides times 32 (the image's)."""
        return 32 * 2 ** (self.levels - 1)

    def forward(self, x: Tensor) -> Tensor:
        local = self.in_conv(x)
        skips = [local]
        for down in self.down_blocks:
            skips.append(down(skips[-1]))
        ctx = _global_context(skips[-1])
        for level in reversed(range(self.levels - 1)):
            ctx = self.up_blocks[level](torch.cat((skips.pop(), ctx), 1))
            ctx = F.interpolate(ctx, scale_factor=2.0, mode="nearest")
        return torch.cat((local, ctx), 1)


class ContextHeadV01(nn.Module):
    """The v0_1 head (PASCAL VOC, HyperSeg-L): full width C, no ``in_conv``.

    ``levels - 1`` down blocks (2x2 stride-2 conv C -> C, BN, ReLU); the deepest map replaced by its
    global average (``avg_pool=True``); each up step upsamples x2 (nearest), concatenates it after the
    skip and applies a 1x1 conv 2C -> C with BN (and ReLU except for the last, stride-32 step).
    phi: C channels at stride 32.
    """

    def __init__(self, in_channels: int, levels: int = 3, avg_pool: bool = True):
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.levels = levels
        self.avg_pool = avg_pool
        C = in_channels
        self.down_blocks = nn.ModuleList(_conv_bn_relu(C, C, 2, stride=2) for _ in range(levels - 1))
        self.flat_blocks = nn.ModuleList(_conv_bn_relu(2 * C, C, 1, relu=level > 0) for level in range(levels - 1))

    @property
    def input_multiple(self) -> int:
        return 32 * 2 ** (self.levels - 1)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for down in self.down_blocks:
            feats.append(down(feats[-1]))
        if self.avg_pool and self.levels > 1:
            feats[-1] = _global_context(feats[-1])
        for level in reversed(range(self.levels - 1)):
            up = F.interpolate(feats.pop(), scale_factor=2.0, mode="nearest")
            feats[-1] = self.flat_blocks[level](torch.cat((feats[-1], up), 1))
        return feats[-1]
