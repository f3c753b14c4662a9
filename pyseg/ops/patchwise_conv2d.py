"""Dynamic patch-wise convolution: public function, validation, backend choice, fake kernels, autograd.

Semantics (HyperSeg, see README): every patch of a gh x gw grid over the output has its own
convolution kernel, per sample. Output pixel (i, j) of an Hout x Wout output belongs to patch
(floor(i*gh/Hout), floor(j*gw/Wout)) and is an ordinary conv2d of ``x`` (stride, padding,
dilation, groups) with that patch's kernel; receptive fields read across patch borders.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _library, reference
from ._utils import check_same, check_tensor, pair

__all__ = ["patchwise_conv2d", "normalize_patchwise_args", "supports"]

OP = "patchwise_conv2d"


# --------------------------------------------------------------------------------------------
# argument handling
# --------------------------------------------------------------------------------------------
def _same_padding(k, d, s, axis):
    if s != 1:
        raise ValueError(f"padding='same' needs stride 1 (like torch.nn.Conv2d), got stride {s} on {axis}")
    total = d * (k - 1)
    return total // 2, total - total // 2


def normalize_patchwise_args(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                             padding_mode="zeros", kernel_size=None):
    """Validate the arguments of :func:`patchwise_conv2d`.

    Returns ``(x, weight7, bias, stride, padding4, dilation, groups)`` where ``weight7`` has the
    layout (B, Cout, Cin/groups, kh, kw, gh, gw), ``padding4`` = (top, bottom, left, right) of
    zeros, and ``x`` is already reflect-padded when ``padding_mode="reflect"``.
    Raises TypeError/ValueError that name the offending argument.
    """
    check_tensor(x, "x", ndim=4)
    check_tensor(weight, "weight", ndim=(4, 7))
    check_same(x, "x", weight, "weight")
    if bias is not None:
        check_tensor(bias, "bias", ndim=4)
        check_same(x, "x", bias, "bias")
    B, Cin, H, W = x.shape
    if min(Cin, H, W) <= 0:
        raise ValueError(f"x must have non-empty channel and spatial dims, got shape {tuple(x.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if Cin % groups != 0:
        raise ValueError(f"x has {Cin} channels, which is not divisible by groups={groups}")
    stride = pair(stride, "stride", minimum=1)
    dilation = pair(dilation, "dilation", minimum=1)
    if padding_mode not in ("zeros", "reflect"):
        raise ValueError(f"padding_mode must be 'zeros' or 'reflect', got {padding_mode!r}")

    Cg = Cin // groups
    if weight.dim() == 7:
        Bw, Cout, Cg_w, kh, kw, gh, gw = weight.shape
        if kernel_size is not None and pair(kernel_size, "kernel_size", 1) != (kh, kw):
            raise ValueError(f"kernel_size={kernel_size!r} does not match weight shape {tuple(weight.shape)}")
        if Cg_w != Cg:
            raise ValueError(
                f"weight must have shape (B, Cout, Cin/groups={Cg}, kh, kw, gh, gw), got {tuple(weight.shape)}"
            )
    else:
        if kernel_size is None:
            raise ValueError(
                "a flat weight (B, Cout*Cin/groups*kh*kw, gh, gw) needs kernel_size=...; "
                "or pass the 7-D layout (B, Cout, Cin/groups, kh, kw, gh, gw)"
            )
        kh, kw = pair(kernel_size, "kernel_size", minimum=1)
        Bw, N, gh, gw = weight.shape
        if N % (Cg * kh * kw) != 0 or N == 0:
            raise ValueError(
                f"flat weight has {N} values per patch, which is not Cout*Cin/groups*kh*kw "
                f"= Cout*{Cg}*{kh}*{kw} for any Cout"
            )
        Cout = N // (Cg * kh * kw)
        weight = weight.view(Bw, Cout, Cg, kh, kw, gh, gw) if weight.is_contiguous() else \
            weight.reshape(Bw, Cout, Cg, kh, kw, gh, gw)
    if Bw != B:
        raise ValueError(f"weight has batch {Bw} but x has batch {B}; one set of patch weights per sample")
    if min(Cout, kh, kw, gh, gw) <= 0:
        raise ValueError(f"weight has an empty dimension: {tuple(weight.shape)}")
    if Cout % groups != 0:
        raise ValueError(f"weight has Cout={Cout} output channels, not divisible by groups={groups}")

    if isinstance(padding, str):
        if padding == "same":
            pt, pb = _same_padding(kh, dilation[0], stride[0], "h")
            pl, pr = _same_padding(kw, dilation[1], stride[1], "w")
        elif padding == "valid":
            pt = pb = pl = pr = 0
        else:
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        pad_h, pad_w = pair(padding, "padding", minimum=0)
        pt = pb = pad_h
        pl = pr = pad_w
    Hout = (H + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wout = (W + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if Hout <= 0 or Wout <= 0:
        raise ValueError(
            f"input {H}x{W} (padded {H + pt + pb}x{W + pl + pr}) is smaller than the dilated kernel "
            f"{dilation[0] * (kh - 1) + 1}x{dilation[1] * (kw - 1) + 1}"
        )
    if gh > Hout or gw > Wout:
        raise ValueError(
            f"weight grid {gh}x{gw} is larger than the output {Hout}x{Wout}; every patch needs at least one pixel"
        )
    if bias is not None and tuple(bias.shape) != (B, Cout, gh, gw):
        raise ValueError(f"bias must have shape (B, Cout, gh, gw) = {(B, Cout, gh, gw)}, got {tuple(bias.shape)}")
    if padding_mode == "reflect" and (pt or pb or pl or pr):
        if max(pt, pb) >= H or max(pl, pr) >= W:
            raise ValueError(f"reflect padding {padding!r} must be smaller than the input size {H}x{W}")
        x = F.pad(x, (pl, pr, pt, pb), mode="reflect")
        pt = pb = pl = pr = 0
    return x, weight, bias, stride, (pt, pb, pl, pr), dilation, groups


# --------------------------------------------------------------------------------------------
# registration: schema, fake kernels, autograd (pyseg/ops/_library.py)
# --------------------------------------------------------------------------------------------
def _fake_forward(x, weight, bias, stride, padding, dilation, groups):
    B, _, H, W = x.shape
    Cout, kh, kw = weight.shape[1], weight.shape[3], weight.shape[4]
    Hout = (H + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wout = (W + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty(B, Cout, Hout, Wout)


def _fake_backward(grad_out, x, weight, stride, padding, dilation, groups, output_mask):
    gx = torch.empty_like(x) if output_mask[0] else x.new_empty(0)
    gw = torch.empty_like(weight) if output_mask[1] else weight.new_empty(0)
    B, Cout, gh, gw_ = weight.shape[0], weight.shape[1], weight.shape[5], weight.shape[6]
    gb = weight.new_empty(B, Cout, gh, gw_) if output_mask[2] else weight.new_empty(0)
    return gx, gw, gb


def supports(backend: str) -> Optional[str]:
    """Why ``backend`` cannot run a call (None: it can). Every backend runs every valid call."""
    return None


_op = _library.register(
    OP,
    schema="patchwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, "
           "int[2] dilation, int groups) -> Tensor",
    backward_schema="patchwise_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, int[2] stride, "
                    "int[4] padding, int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    fake=_fake_forward, fake_backward=_fake_backward,
    differentiable=(0, 1, 2), saved=(0, 1), config=(3, 4, 5, 6), supports=supports,
    reference=reference.patchwise_conv2d)


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------
def patchwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                     groups: int = 1, padding_mode: str = "zeros", backend: str = "auto",
                     kernel_size=None) -> Tensor:
    """Dynamic patch-wise 2-D convolution (HyperSeg).

    Args:
        x: input (B, Cin, H, W), float16/bfloat16/float32/float64, contiguous or channels_last.
        weight: per-sample, per-patch kernels, either (B, Cout, Cin/groups, kh, kw, gh, gw) or the
            flat layout a hypernetwork emits, (B, Cout*Cin/groups*kh*kw, gh, gw) (row-major over
            Cout, Cin/groups, kh, kw), which needs ``kernel_size``. The grid (gh, gw) is read from
            the last two dims.
        bias: optional per-patch bias (B, Cout, gh, gw).
        stride, dilation: int or (h, w).
        padding: int, (h, w), ``"same"`` (stride 1) or ``"valid"``.
        groups: as in ``torch.nn.Conv2d``.
        padding_mode: ``"zeros"`` or ``"reflect"`` (reflect pads ``x`` with ``F.pad`` first).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``
            (see :func:`pyseg.backends`).
        kernel_size: int or (kh, kw); required with a flat weight.

    Returns:
        (B, Cout, Hout, Wout) in x's dtype; output pixel (i, j) uses the kernel of patch
        (floor(i*gh/Hout), floor(j*gw/Wout)). Half-precision inputs accumulate in float32.
    """
    channels_last = _library.channels_last_input(x)  # before a reflect pad
    x, w, bias, stride, padding, dilation, groups = normalize_patchwise_args(
        x, weight, bias, stride, padding, dilation, groups, padding_mode, kernel_size)
    return _op.dispatch(backend, x, w, bias, list(stride), list(padding), list(dilation), groups,
                        channels_last=channels_last)
