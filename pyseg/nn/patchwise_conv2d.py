"""``PatchWiseConv2d``: a conv layer whose kernels come from a hypernetwork, one per patch."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops._utils import pair
from ..ops.patchwise_conv2d import patchwise_conv2d


class PatchWiseConv2d(nn.Module):
    """Dynamic patch-wise convolution with externally supplied weights.

    The layer owns no parameters: a hypernetwork produces, per sample, one kernel for each cell
    of a gh x gw grid over the output. It needs :attr:`weight_numel` values per patch (and
    :attr:`bias_numel` for an optional bias), in the flat layout
    (B, weight_numel, gh, gw), row-major over (Cout, Cin/groups, kh, kw).

    Example::

        conv = PatchWiseConv2d(16, 32, kernel_size=3, padding=1)
        hyper = nn.Conv2d(64, conv.weight_numel, 1)   # any net producing (B, N, gh, gw)
        w = hyper(features)                            # (B, conv.weight_numel, 8, 16)
        y = conv(x, w)                                 # (B, 32, H, W)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, padding_mode: str = "zeros", backend: str = "auto"):
        super().__init__()
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        if groups <= 0 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        if padding_mode not in ("zeros", "reflect"):
            raise ValueError(f"padding_mode must be 'zeros' or 'reflect', got {padding_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair(kernel_size, "kernel_size", minimum=1)
        self.stride = pair(stride, "stride", minimum=1)
        self.padding = padding if isinstance(padding, str) else pair(padding, "padding", minimum=0)
        self.dilation = pair(dilation, "dilation", minimum=1)
        self.groups = groups
        self.padding_mode = padding_mode
        self.backend = backend

    @property
    def weight_shape(self) -> tuple:
        """Per-patch kernel shape (Cout, Cin/groups, kh, kw)."""
        return (self.out_channels, self.in_channels // self.groups) + self.kernel_size

    @property
    def weight_numel(self) -> int:
        """Number of weights per patch a hypernetwork must produce."""
        return math.prod(self.weight_shape)

    @property
    def bias_numel(self) -> int:
        return self.out_channels

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """x (B, Cin, H, W); weight flat (B, weight_numel, gh, gw) or (B, Cout, Cin/g, kh, kw, gh, gw);
        bias (B, Cout, gh, gw) or None."""
        if weight.dim() == 4 and weight.shape[1] != self.weight_numel:
            raise ValueError(
                f"weight must have shape (B, weight_numel={self.weight_numel}, gh, gw) for {self}, "
                f"got {tuple(weight.shape)}"
            )
        if weight.dim() == 7 and tuple(weight.shape[1:5]) != self.weight_shape:
            raise ValueError(
                f"weight must have shape (B, {', '.join(map(str, self.weight_shape))}, gh, gw) for {self}, "
                f"got {tuple(weight.shape)}"
            )
        if x.dim() == 4 and x.shape[1] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels for {self}, got shape {tuple(x.shape)}")
        return patchwise_conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                                self.padding_mode, self.backend, kernel_size=self.kernel_size)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s
