"""HyperSeg meta block (fused 1x1-depthwise-1x1 per patch) and the 1x1 level block: public functions.

See :mod:`pyseg.ops.reference.meta_block` for the exact semantics.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _library, reference
from ._utils import check_same, check_tensor

__all__ = ["meta_block", "pointwise_block", "normalize_meta_args", "meta_weight_numel", "supports",
           "implementation", "weight_memory_format"]

OP = "meta_block"

Affine = Optional[Tuple[Optional[Tensor], Optional[Tensor]]]


def meta_weight_numel(in_channels: int, hidden_channels: int, out_channels: int) -> int:
    """Weights per patch of a 3x3 meta block: hid*Cin + 9*hid + Cout*hid."""
    return hidden_channels * in_channels + 9 * hidden_channels + out_channels * hidden_channels


def _check_affine(affine, name, channels, x):
    if affine is None:
        return None, None
    if not isinstance(affine, (tuple, list)) or len(affine) != 2:
        raise TypeError(f"{name} must be a (scale, shift) pair of ({channels},) tensors or None")
    out = []
    for t, part in zip(affine, ("scale", "shift")):
        if t is None:
            out.append(None)
            continue
        check_tensor(t, f"{name} {part}", ndim=1)
        check_same(x, "x", t, f"{name} {part}")
        if t.shape[0] != channels:
            raise ValueError(f"{name} {part} must have shape ({channels},), got {tuple(t.shape)}")
        out.append(t)
    return tuple(out)


def normalize_meta_args(x, weight, hidden_channels=None, out_channels=None):
    """Validate x and the weights; returns (w1, w2, w3) views of shapes
    (B, hid, Cin, gh, gw), (B, hid, 3, 3, gh, gw), (B, Cout, hid, gh, gw)."""
    check_tensor(x, "x", ndim=4)
    B, Cin, H, W = x.shape
    if min(Cin, H, W) <= 0:
        raise ValueError(f"x must have non-empty channel and spatial dims, got shape {tuple(x.shape)}")
    if isinstance(weight, (tuple, list)):
        if len(weight) != 3:
            raise ValueError("weight as a sequence must be (w1, w2, w3)")
        w1, w2, w3 = weight
        for t, n, nd in ((w1, "w1", 5), (w2, "w2", 6), (w3, "w3", 5)):
            check_tensor(t, n, ndim=nd)
            check_same(x, "x", t, n)
        hid, Cout = w1.shape[1], w3.shape[1]
        gh, gw = w1.shape[-2:]
        if tuple(w1.shape) != (B, hid, Cin, gh, gw):
            raise ValueError(f"w1 must have shape (B={B}, hid, Cin={Cin}, gh, gw), got {tuple(w1.shape)}")
        if tuple(w2.shape) != (B, hid, 3, 3, gh, gw):
            raise ValueError(f"w2 must have shape {(B, hid, 3, 3, gh, gw)}, got {tuple(w2.shape)}")
        if tuple(w3.shape) != (B, Cout, hid, gh, gw):
            raise ValueError(f"w3 must have shape (B={B}, Cout, hid={hid}, gh={gh}, gw={gw}), got {tuple(w3.shape)}")
    else:
        check_tensor(weight, "weight", ndim=4)
        check_same(x, "x", weight, "weight")
        Bw, N, gh, gw = weight.shape
        if Bw != B:
            raise ValueError(f"weight has batch {Bw} but x has batch {B}")
        if hidden_channels is None and out_channels is None:
            hidden_channels = int(round(2 * Cin))
        if hidden_channels is None:
            hidden_channels, rem = divmod(N, Cin + 9 + out_channels)
            if rem:
                raise ValueError(f"flat weight has {N} values per patch; not hid*(Cin+9+Cout) for Cin={Cin}, "
                                 f"Cout={out_channels}")
        hid = hidden_channels
        if out_channels is None:
            out_channels, rem = divmod(N - hid * (Cin + 9), hid)
            if rem or out_channels <= 0:
                raise ValueError(f"flat weight has {N} values per patch; expected hid*Cin + 9*hid + Cout*hid "
                                 f"with Cin={Cin}, hid={hid}")
        Cout = out_channels
        if N != meta_weight_numel(Cin, hid, Cout):
            raise ValueError(f"weight must have shape (B, {meta_weight_numel(Cin, hid, Cout)}, gh, gw) for "
                             f"Cin={Cin}, hid={hid}, Cout={Cout}, got {tuple(weight.shape)}")
        w1, w2, w3 = reference.meta_block.split_meta_weight(weight, Cin, hid, Cout)
    if gh > H or gw > W:
        raise ValueError(f"weight grid {gh}x{gw} is larger than the input {H}x{W}")
    if H < 2 or W < 2:
        raise ValueError(f"the meta block's reflect padding needs H, W >= 2, got {H}x{W}")
    return w1, w2, w3


# --------------------------------------------------------------------------------------------
# registration: schemas, fake kernels, autograd (pyseg/ops/_library.py)
# --------------------------------------------------------------------------------------------
def _fake_meta_forward(x, weight, scale, shift, hidden, out_channels):
    B, _, H, W = x.shape
    return x.new_empty(B, out_channels, H, W)


def _fake_backward(grad_out, x, weight, scale, shift, *config_and_mask):
    output_mask = config_and_mask[-1]
    return (torch.empty_like(x) if output_mask[0] else x.new_empty(0),
            weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty(0),  # contiguous
            torch.empty_like(scale) if output_mask[2] else scale.new_empty(0),
            torch.empty_like(shift) if output_mask[3] else shift.new_empty(0))


def _fake_pointwise_forward(x, weight, scale, shift):
    B, Cin, H, W = x.shape
    return x.new_empty(B, weight.shape[1] // Cin, H, W)


def _reference_meta_block(x, weight, scale, shift, hidden, out_channels):
    w1, w2, w3 = reference.meta_block.split_meta_weight(weight, x.shape[1], hidden, out_channels)
    s1, s2, s3 = torch.split(scale, [hidden, hidden, out_channels])
    t1, t2, t3 = torch.split(shift, [hidden, hidden, out_channels])
    return reference.meta_block.meta_block(x, w1, w2, w3, s1, t1, s2, t2, s3, t3)


def _reference_pointwise_block(x, weight, scale, shift):
    B, Cin = x.shape[:2]
    gh, gw = weight.shape[-2:]
    return reference.meta_block.pointwise_block(x, weight.reshape(B, weight.shape[1] // Cin, Cin, gh, gw), scale, shift)


def supports(backend: str) -> Optional[str]:
    """Why ``backend`` cannot run a call (None: it can). Every backend runs every valid call."""
    return None


_meta_op = _library.register(
    OP,
    schema="meta_block(Tensor x, Tensor weight, Tensor scale, Tensor shift, int hidden, int out_channels) -> Tensor",
    backward_schema="meta_block_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor scale, Tensor shift, "
                    "int hidden, int out_channels, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
    fake=_fake_meta_forward, fake_backward=_fake_backward, reference=_reference_meta_block, supports=supports,
    differentiable=(0, 1, 2, 3), saved=(0, 1, 2, 3), config=(4, 5),
    # the CPU and CUDA forwards and the Triton forward and backward read patch-major (channels_last)
    # weights in place; the CPU and CUDA backward kernels read the default layout
    in_place={"cpu": (1,), "cuda": (1,), "triton": (1,)}, contiguous_weights=(1,))

_pointwise_op = _library.register(
    "pointwise_block",
    schema="pointwise_block(Tensor x, Tensor weight, Tensor scale, Tensor shift) -> Tensor",
    backward_schema="pointwise_block_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor scale, "
                    "Tensor shift, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
    fake=_fake_pointwise_forward, fake_backward=_fake_backward, reference=_reference_pointwise_block,
    supports=supports, differentiable=(0, 1, 2, 3), saved=(0, 1, 2, 3), config=(),
    # every CUDA kernel (forward, grad_x, grad_w) reads patch-major (channels_last) weights in place
    # (the backward writes grad_weight contiguous); the CPU and Triton kernels read the default layout
    in_place={"cuda": (1,)})


def implementation(backend: str, device: torch.device) -> str:
    """The implementation (reference, cpu, cuda, triton) :func:`meta_block` runs for ``backend`` on
    ``device``; an unknown or unavailable backend raises."""
    return _meta_op.resolve(backend, torch.device(device))


def weight_memory_format(device: torch.device, backend: str = "auto",
                         op: str = "meta_block") -> torch.memory_format:
    """The layout of the flat (B, N, gh, gw) weight :func:`meta_block` (``op="pointwise_block"``:
    :func:`pointwise_block`) reads fastest with ``backend`` on ``device``: ``torch.channels_last``
    (patch-major: each patch's N weights contiguous) where the implementation that runs reads it in place
    (meta_block: the compiled CPU and CUDA kernels and the Triton kernels; pointwise_block: the CUDA
    kernels), else ``torch.contiguous_format`` (any layout still works: the op then makes it contiguous).
    A backend that cannot run on ``device`` gives ``torch.contiguous_format`` (the op itself raises the
    error)."""
    ops = {"meta_block": _meta_op, "pointwise_block": _pointwise_op}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    try:
        impl = ops[op].resolve(backend, torch.device(device))
    except (ValueError, RuntimeError):
        return torch.contiguous_format
    return torch.channels_last if 1 in ops[op].in_place.get(impl, ()) else torch.contiguous_format


def _affine_vector(affines, channels, x):
    """(scale, shift) of every stage concatenated; None entries become identity (ones / zeros)."""
    scales, shifts = [], []
    for (s, t), c in zip(affines, channels):
        scales.append(s if s is not None else x.new_ones(c))
        shifts.append(t if t is not None else x.new_zeros(c))
    return torch.cat(scales).contiguous(), torch.cat(shifts).contiguous()


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------
def meta_block(x: Tensor, weight: Union[Tensor, Sequence[Tensor]], hidden_channels: Optional[int] = None,
               out_channels: Optional[int] = None, affine1: Affine = None, affine2: Affine = None,
               affine3: Affine = None, backend: str = "auto") -> Tensor:
    """HyperSeg meta block: per patch expansion 1x1 (on patch + 1-px halo) -> affine -> ReLU6 -> depthwise 3x3 ->
    affine -> ReLU6 -> projection 1x1 -> affine.

    Args:
        x: (B, Cin, H, W), float16/bfloat16/float32/float64; H, W >= 2.
        weight: flat (B, hid*Cin + 9*hid + Cout*hid, gh, gw) laid out [W1 hid x Cin | W2 hid x 3 x 3 |
            W3 Cout x hid] (what a hypernetwork emits), or a tuple (w1, w2, w3) of shapes
            (B, hid, Cin, gh, gw), (B, hid, 3, 3, gh, gw), (B, Cout, hid, gh, gw).
        hidden_channels, out_channels: needed to split a flat weight (hid defaults to round(2*Cin)).
        affine1, affine2, affine3: (scale, shift) per channel after each stage (folded eval BatchNorm),
            shapes (hid,), (hid,), (Cout,); None (or a None entry) = identity.
        backend: "auto", "reference", "cpu", "cuda" or "triton". The fused backends run the whole block
            per patch on chip and are differentiable (deterministic backward that recomputes the
            forward intermediates per patch).
    Returns:
        (B, Cout, H, W). Pixel (i, j) belongs to patch (floor(i*gh/H), floor(j*gw/W)).
    """
    w1, w2, w3 = normalize_meta_args(x, weight, hidden_channels, out_channels)
    hid, Cout = w1.shape[1], w3.shape[1]
    a1 = _check_affine(affine1, "affine1", hid, x)
    a2 = _check_affine(affine2, "affine2", hid, x)
    a3 = _check_affine(affine3, "affine3", Cout, x)
    B, gh, gw = x.shape[0], w1.shape[-2], w1.shape[-1]
    if isinstance(weight, (tuple, list)):
        weight = torch.cat([w1.reshape(B, -1, gh, gw), w2.reshape(B, -1, gh, gw), w3.reshape(B, -1, gh, gw)], 1)
    scale, shift = _affine_vector((a1, a2, a3), (hid, hid, Cout), x)
    return _meta_op.dispatch(backend, x, weight, scale, shift, int(hid), int(Cout))


def pointwise_block(x: Tensor, weight: Tensor, affine: Affine = None, backend: str = "auto") -> Tensor:
    """HyperSeg's 1x1 level: patch-wise 1x1 conv -> per-channel affine -> ReLU.

    Args:
        x: (B, Cin, H, W).
        weight: flat (B, Cout*Cin, gh, gw) (row-major over Cout, Cin) or (B, Cout, Cin, gh, gw).
        affine: (scale, shift) of (Cout,) (folded eval BatchNorm); None = identity.
        backend: "auto", "reference", "cpu", "cuda" or "triton".
    Returns:
        (B, Cout, H, W).
    """
    check_tensor(x, "x", ndim=4)
    check_tensor(weight, "weight", ndim=(4, 5))
    check_same(x, "x", weight, "weight")
    B, Cin, H, W = x.shape
    if min(Cin, H, W) <= 0:
        raise ValueError(f"x must have non-empty channel and spatial dims, got shape {tuple(x.shape)}")
    if weight.dim() == 5:
        if weight.shape[2] != Cin:
            raise ValueError(f"weight must have shape (B, Cout, Cin={Cin}, gh, gw), got {tuple(weight.shape)}")
        weight = weight.reshape(weight.shape[0], -1, *weight.shape[-2:])
    if weight.shape[0] != B:
        raise ValueError(f"weight has batch {weight.shape[0]} but x has batch {B}")
    if weight.shape[1] % Cin or weight.shape[1] == 0:
        raise ValueError(f"weight must have shape (B, Cout*Cin, gh, gw) with Cin={Cin}, got {tuple(weight.shape)}")
    gh, gw = weight.shape[-2:]
    if gh > H or gw > W:
        raise ValueError(f"weight grid {gh}x{gw} is larger than the input {H}x{W}")
    Cout = weight.shape[1] // Cin
    scale, shift = _check_affine(affine, "affine", Cout, x)
    scale, shift = _affine_vector(((scale, shift),), (Cout,), x)
    return _pointwise_op.dispatch(backend, x, weight, scale, shift)
