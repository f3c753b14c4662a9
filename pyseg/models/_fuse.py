"""Inference-time rewrites of the static trunk, each checked against the unfused output.

* :func:`absorb_zero_padding`: turn explicit (asymmetric) zero padding before a convolution -- the
  static TF-"same" padding of the public EfficientNets -- into the convolution's own symmetric
  padding, with zero taps added to the kernel on the side that had less padding;
* :func:`fold_conv_bn`: fold Conv2d -> BatchNorm pairs (found by tracing one forward pass) and,
  optionally, fuse the activation that follows into the convolution (:class:`ConvAct2d`);
* :func:`fold_se_gates`: fold the squeeze-excitation gate of timm's EfficientNet/MobileNet blocks
  into the 1x1 projection that follows it (:class:`SEGatedConv2d`);
* :func:`band_expansions`: run the 1x1 expansion and the depthwise convolution of timm's inverted
  residual blocks together, in bands of rows, where the expanded map would be large (:class:`PwDwConv2d`).

Both remove whole passes over the largest activations of the network (and, on the CPU, the page
faults of allocating them), without changing the function computed beyond rounding.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.meta_block import bn_affine

__all__ = ["absorb_zero_padding", "fold_conv_bn", "fold_se_gates", "band_expansions", "ConvAct2d", "SEGatedConv2d", "PwDwConv2d"]


# activation module -> (oneDNN post-op name, its scalars)
_ONEDNN_POSTOPS = {nn.SiLU: ("swish", []), nn.ReLU: ("relu", []), nn.ReLU6: ("hardtanh", [0.0, 6.0]),
                   nn.Hardswish: ("hardswish", []), nn.Sigmoid: ("sigmoid", []), nn.Tanh: ("tanh", [])}


def _onednn_conv():
    """``torch.ops.mkldnn._convolution_pointwise`` (the convolution + post-op that inductor's CPU
    fusions call), or None where this torch build has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def _onednn_ok(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    # oneDNN here: float32 CPU inference only (no autograd formula; no float64)
    return (x.device.type == "cpu" and x.dtype == torch.float32 and conv.weight.dtype == torch.float32
            and x.dim() == 4 and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)))


def _plain_conv(m: nn.Module) -> bool:
    """An nn.Conv2d whose forward is F.conv2d with explicit zero padding (no 'same', no other padding mode)."""
    return type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)


class ConvAct2d(nn.Module):
    """``act(conv(x))`` as one convolution where possible.

    Float32 CPU inference runs oneDNN's convolution with the activation as a post-op (one pass over
    the output instead of two); anywhere else -- CUDA, other dtypes, autograd -- it runs ``conv`` and
    then ``act``, so the module stays trainable and device-agnostic. The state dict is the wrapped
    conv's and act's (``conv.weight``, ``conv.bias``).
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module):
        super().__init__()
        if not _plain_conv(conv):
            raise TypeError(f"ConvAct2d needs a plain nn.Conv2d with zero padding, got {conv}")
        self.conv = conv
        self.act = act
        self._postop = _ONEDNN_POSTOPS.get(type(act))
        self._op = _onednn_conv() if self._postop is not None else None

    def onednn_ok(self, x: torch.Tensor) -> bool:
        return self._op is not None and _onednn_ok(x, self.conv)

    def onednn(self, x: torch.Tensor, padding) -> torch.Tensor:
        """The oneDNN convolution + activation with explicit ``padding`` (only when ``onednn_ok(x)``)."""
        c = self.conv
        attr, scalars = self._postop
        return self._op(x, c.weight, c.bias, list(padding), list(c.stride), list(c.dilation), c.groups,
                        attr, scalars, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn_ok(x):
            return self.onednn(x, self.conv.padding)
        return self.act(self.conv(x))


class PwDwConv2d(nn.Module):
    """``dw(pw(x))`` for a 1x1 expansion followed by a depthwise convolution (both :class:`ConvAct2d`),
    the first two layers of an inverted residual block.

    On the CPU in float32 inference with a channels_last input, when the expanded map would take at
    least :attr:`min_bytes`, the pair runs in bands of output rows: each band expands only the input
    rows its depthwise outputs read (the halo rows are expanded twice) and is convolved at once, so
    the expanded map -- e.g. 50 MB for EfficientNet-B1's first stride-4 block at 1024x512 -- never
    exists in full, is never written to memory and read back, and is never page-faulted in. Zero
    padding of the depthwise convolution is added only at the image's top and bottom rows. The result
    is the sequential one (each output value comes from the same operations); anywhere else the
    module simply runs ``dw(pw(x))``.
    """

    #: band only when the full expanded map would take at least this many bytes: glibc's largest
    #: dynamic mmap threshold, above which every allocation is a fresh mapping faulted in again on
    #: every call (smaller maps usually come from the heap, where sequential execution is as fast)
    min_bytes = 32 << 20
    #: target size of one band's expanded rows (cache-sized)
    band_bytes = 3 << 20

    def __init__(self, pw: ConvAct2d, dw: nn.Module):
        super().__init__()
        if not self.accepts(pw, dw):
            raise TypeError(f"PwDwConv2d needs a 1x1 ConvAct2d followed by a depthwise ConvAct2d, got {pw} and {dw}")
        self.pw = pw
        self.dw = dw
        self._dw, self._pads = self._depthwise(dw)

    @staticmethod
    def _depthwise(dw: nn.Module):
        """(the depthwise ConvAct2d, its zero padding (left, right, top, bottom)) of ``dw``: a ConvAct2d, or
        ``nn.Sequential(nn.ZeroPad2d, ConvAct2d)`` (an unpadded conv after explicit, possibly asymmetric,
        padding -- the static "same" padding of TF-style EfficientNets); (None, None) otherwise."""
        if isinstance(dw, ConvAct2d):
            ph, pw = dw.conv.padding
            return dw, (pw, pw, ph, ph)
        if (isinstance(dw, nn.Sequential) and len(dw) == 2 and type(dw[0]) is nn.ZeroPad2d
                and isinstance(dw[1], ConvAct2d) and dw[1].conv.padding == (0, 0)):
            return dw[1], tuple(dw[0].padding)
        return None, None

    @staticmethod
    def accepts(pw: nn.Module, dw: nn.Module) -> bool:
        """True for a 1x1, stride-1, unpadded, ungrouped ConvAct2d followed by a depthwise ConvAct2d (or a
        ZeroPad2d + depthwise ConvAct2d pair)."""
        dw = PwDwConv2d._depthwise(dw)[0]
        if not (isinstance(pw, ConvAct2d) and isinstance(dw, ConvAct2d)):
            return False
        p, d = pw.conv, dw.conv
        return (p.kernel_size == (1, 1) and p.stride == (1, 1) and p.padding == (0, 0) and p.groups == 1
                and d.groups == d.in_channels == d.out_channels == p.out_channels)

    def _banded(self, x: torch.Tensor) -> bool:
        if not (self.pw.onednn_ok(x) and self._dw.onednn_ok(x)
                and x.is_contiguous(memory_format=torch.channels_last)):
            return False
        n, _, h, w = x.shape
        return n * self.pw.conv.out_channels * h * w * x.element_size() >= self.min_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._banded(x):
            return self.dw(self.pw(x))
        d = self._dw.conv
        n, _, h, w = x.shape
        c = d.out_channels
        (kh, kw), (sh, sw), (dh, dw_) = d.kernel_size, d.stride, d.dilation
        left, right, ph, bottom = self._pads
        span_h, span_w = dh * (kh - 1) + 1, dw_ * (kw - 1) + 1
        ho, wo = (h + ph + bottom - span_h) // sh + 1, (w + left + right - span_w) // sw + 1
        out = torch.empty(n, c, ho, wo, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        rows = max(1, self.band_bytes // (sh * w * c * x.element_size()))  # output rows per band
        for b in range(n):
            xb = x[b:b + 1]
            for r0 in range(0, ho, rows):
                r1 = min(ho, r0 + rows)
                first, last = r0 * sh - ph, (r1 - 1) * sh - ph + span_h  # input rows [first, last)
                lo, hi = max(first, 0), min(last, h)
                if lo < hi:
                    e = self.pw.onednn(xb[:, :, lo:hi], (0, 0))
                    if lo != first or hi != last:  # zero padding rows at the image's top / bottom
                        e = F.pad(e, (0, 0, lo - first, last - hi))
                else:  # the band reads padding only
                    e = x.new_zeros(1, last - first, w, c).permute(0, 3, 1, 2)  # channels_last
                if left == right:
                    out[b:b + 1, :, r0:r1].copy_(self._dw.onednn(e, (0, left)))
                else:  # asymmetric: pad this band's columns explicitly
                    out[b:b + 1, :, r0:r1].copy_(self._dw.onednn(F.pad(e, (left, right)), (0, 0)))
        return out


class SEGatedConv2d(nn.Module):
    """``conv(se(x))`` for a squeeze-excitation ``se`` (``x * gate(x)``, one gate value per sample and
    channel) followed by a 1x1 convolution: the gate is folded into the convolution's input channels,
    per sample, instead of materialising ``x * gate`` (a full-size pass and allocation).

    ``se`` must be timm's ``SqueezeExcite`` (mean -> conv_reduce -> act1 -> conv_expand -> gate).
    """

    def __init__(self, se: nn.Module, conv: nn.Conv2d):
        super().__init__()
        if not (_plain_conv(conv) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
                and conv.padding == (0, 0) and conv.groups == 1):
            raise TypeError(f"SEGatedConv2d needs a 1x1, stride 1, ungrouped, unpadded nn.Conv2d, got {conv}")
        self.se = se
        self.conv = conv
        self._op = _onednn_conv()

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        se = self.se
        s = x.mean((2, 3), keepdim=True)
        return se.gate(se.conv_expand(se.act1(se.conv_reduce(s))))  # (B, C, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        g = self.gate(x)
        if x.shape[0] != 1 and x.device.type != "cpu":
            return c(x * g)  # one batched conv beats a per-sample loop on a GPU
        outs = []
        for b in range(x.shape[0]):
            w = c.weight * g[b].view(1, -1, 1, 1).to(c.weight.dtype)
            xb = x[b:b + 1]
            if self._op is not None and _onednn_ok(xb, c):
                outs.append(self._op(xb, w, c.bias, [0, 0], [1, 1], [1, 1], 1, "none", [], None))
            else:
                outs.append(F.conv2d(xb, w, c.bias))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def _zero_padded_conv(m: nn.Module):
    """The conv of ``nn.Sequential(nn.ZeroPad2d, nn.Conv2d)`` whose padding :func:`absorb_zero_padding` can
    absorb (a plain, unpadded, undilated conv after non-negative zero padding), else None."""
    if not (type(m) is nn.Sequential and len(m) == 2 and type(m[0]) is nn.ZeroPad2d and _plain_conv(m[1])):
        return None
    conv, pads = m[1], m[0].padding
    if conv.padding != (0, 0) or conv.dilation != (1, 1) or min(pads) < 0:
        return None
    return conv


def _absorbed(pad: nn.ZeroPad2d, conv: nn.Conv2d) -> nn.Conv2d:
    """``conv(pad(x))`` as one convolution: symmetric padding max(left, right) x max(top, bottom) and the
    kernel extended with zero taps on the side with less padding, so that every output reads the same
    input values with the same weights (the extra taps multiply zero weights)."""
    left, right, top, bottom = pad.padding
    ph, pw = max(top, bottom), max(left, right)
    # a zero tap in front for each row/column of padding added at the top/left, behind for bottom/right
    weight = F.pad(conv.weight, (pw - left, pw - right, ph - top, ph - bottom))
    new = nn.Conv2d(conv.in_channels, conv.out_channels, tuple(weight.shape[2:]), conv.stride, (ph, pw),
                    groups=conv.groups, bias=conv.bias is not None).to(weight.device, weight.dtype)
    new.weight.copy_(weight)
    if conv.bias is not None:
        new.bias.copy_(conv.bias)
    return new


@torch.no_grad()
def absorb_zero_padding(model: nn.Module, example: torch.Tensor, rtol: float = 1e-3) -> int:
    """Replace every ``nn.Sequential(nn.ZeroPad2d, nn.Conv2d)`` (an unpadded, undilated conv after explicit
    zero padding, e.g. the asymmetric static TF-"same" padding of the public EfficientNets) by one conv
    with symmetric padding and a kernel extended with zero taps (:func:`_absorbed`). The padded copy of
    the input is never made, and the conv keeps channels_last; for finite inputs the function is the
    same at every input size (an extra tap adds a product with a zero weight). Checked on ``example``
    like :func:`fold_conv_bn` (restored and RuntimeError on a mismatch). Returns the number replaced."""
    model.eval()
    found = [(name, m) for name, m in model.named_modules() if _zero_padded_conv(m) is not None]
    if not found:
        return 0
    expected = model(example)
    for name, m in found:
        _set(model, name, _absorbed(m[0], m[1]))
    err = _mismatch(model(example), expected, rtol)
    if err is not None:
        for name, m in found:
            _set(model, name, m)
        raise RuntimeError(f"absorbing the zero padding changed the output by {err:.3g}; the model was restored")
    return len(found)


def _bn_replacement(bn: nn.Module) -> nn.Module:
    # timm's BatchNormAct2d = BN -> drop -> act: keep the drop and act
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    if isinstance(drop, nn.Module) and isinstance(act, nn.Module):
        return nn.Sequential(drop, act)
    return nn.Identity()


def _set(model: nn.Module, name: str, new: nn.Module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


@torch.no_grad()
def fold_conv_bn(model: nn.Module, example: torch.Tensor, skip=(), rtol: float = 1e-3,
                 fuse_act: bool = False) -> int:
    """Fold every eval-mode BatchNorm2d whose input is exactly the output of a Conv2d into that conv.

    Pairs are found with forward hooks on one run of ``model(example)``; modules inside ``skip`` are
    left alone. With ``fuse_act``, a folded BN that carried its activation (timm's ``BatchNormAct2d``
    with a ReLU/ReLU6/SiLU/Hardswish/Sigmoid/Tanh and no dropout) turns the pair into one
    :class:`ConvAct2d`. The folded model is checked against the original on ``example``; if the outputs
    differ (e.g. a conv output was also used elsewhere), the model is restored and RuntimeError is
    raised. Returns the number of folded pairs.
    """
    model.eval()
    skipped = {id(m) for s in skip for m in s.modules()}
    produced = {}
    pairs = []
    handles = []
    for name, m in model.named_modules():
        if id(m) in skipped:
            continue
        if type(m) is nn.Conv2d:
            def hook(mod, inp, out, name=name):
                produced[id(out)] = (name, out)
            handles.append(m.register_forward_hook(hook))
        elif isinstance(m, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None:
            def pre(mod, inp, name=name):
                hit = produced.get(id(inp[0]))
                if hit is not None and hit[1] is inp[0]:
                    pairs.append((hit[0], name))
            handles.append(m.register_forward_pre_hook(pre))
    try:
        expected = model(example)
    finally:
        for h in handles:
            h.remove()
        produced.clear()
    convs = [c for c, _ in pairs]
    pairs = [(c, b) for c, b in pairs if convs.count(c) == 1]  # a conv feeding two BNs stays unfolded
    pairs = list(dict.fromkeys(pairs))
    backup = copy.deepcopy(model.state_dict()), {b: model.get_submodule(b) for _, b in pairs}
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        scale, shift = bn_affine(bn)
        w = conv.weight * scale.to(conv.weight.dtype).view(-1, 1, 1, 1)
        b = shift if conv.bias is None else conv.bias * scale + shift
        conv.weight.copy_(w)
        if conv.bias is None:
            conv.bias = nn.Parameter(b.to(conv.weight.dtype))
        else:
            conv.bias.copy_(b)
        act = getattr(bn, "act", None)
        if (fuse_act and type(act) in _ONEDNN_POSTOPS and isinstance(getattr(bn, "drop", None), nn.Identity)
                and _plain_conv(conv)):
            _set(model, conv_name, ConvAct2d(conv, act))
            _set(model, bn_name, nn.Identity())
        else:
            _set(model, bn_name, _bn_replacement(bn))
    got = model(example)
    err = _mismatch(got, expected, rtol)
    if err is not None:
        for conv_name, bn_name in pairs:
            _set(model, bn_name, backup[1][bn_name])
            conv = model.get_submodule(conv_name)
            if isinstance(conv, ConvAct2d):
                conv = conv.conv
                _set(model, conv_name, conv)
            if conv_name + ".bias" not in backup[0]:
                conv.bias = None
        model.load_state_dict(backup[0])
        raise RuntimeError(f"BatchNorm folding changed the output by {err:.3g}; the model was restored unfused")
    return len(pairs)


def _mismatch(got: torch.Tensor, expected: torch.Tensor, rtol: float):
    """None when ``got`` matches ``expected`` (relative to its largest magnitude), else the max error."""
    tol = rtol * max(1.0, float(expected.abs().max()))
    if torch.allclose(got, expected, rtol=rtol, atol=tol):
        return None
    return float((got - expected).abs().max())


def _timm_se_blocks(model: nn.Module):
    """(block, projection attribute) for each timm EfficientNet/MobileNet block whose squeeze-excitation
    feeds a plain 1x1 projection directly (no anti-aliasing between them)."""
    try:
        from timm.models import _efficientnet_blocks as eb
    except ImportError:  # timm missing or reorganised: nothing to fold
        return
    projection = {eb.InvertedResidual: "conv_pwl", eb.DepthwiseSeparableConv: "conv_pw"}
    for m in model.modules():
        attr = projection.get(type(m))
        if (attr is not None and type(getattr(m, "se", None)) is eb.SqueezeExcite
                and isinstance(getattr(m, "aa", None), nn.Identity)):
            conv = getattr(m, attr)
            if _plain_conv(conv) and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1 \
                    and conv.padding == (0, 0):
                yield m, attr


@torch.no_grad()
def fold_se_gates(model: nn.Module, example: torch.Tensor, rtol: float = 1e-3) -> int:
    """Fold the squeeze-excitation gate of every timm ``InvertedResidual`` / ``DepthwiseSeparableConv``
    block into the 1x1 projection that follows it (:class:`SEGatedConv2d`; the block's ``se`` becomes
    an Identity). Checked on ``example`` like :func:`fold_conv_bn` (restored and RuntimeError on a
    mismatch). Returns the number of blocks changed."""
    model.eval()
    blocks = list(_timm_se_blocks(model))
    if not blocks:
        return 0
    expected = model(example)
    for blk, attr in blocks:
        setattr(blk, attr, SEGatedConv2d(blk.se, getattr(blk, attr)))
        blk.se = nn.Identity()
    err = _mismatch(model(example), expected, rtol)
    if err is not None:
        for blk, attr in blocks:
            gated = getattr(blk, attr)
            blk.se, gated.se = gated.se, None
            setattr(blk, attr, gated.conv)
        raise RuntimeError(f"squeeze-excitation folding changed the output by {err:.3g}; the model was restored")
    return len(blocks)


def _timm_expansions(model: nn.Module):
    """timm ``InvertedResidual`` blocks whose expansion and depthwise convolutions are adjacent
    :class:`ConvAct2d` (their BatchNorms folded with the activation) that :class:`PwDwConv2d` takes."""
    try:
        from timm.models import _efficientnet_blocks as eb
    except ImportError:
        return
    for m in model.modules():
        if (type(m) is eb.InvertedResidual and isinstance(m.bn1, nn.Identity)
                and PwDwConv2d.accepts(m.conv_pw, m.conv_dw)):
            yield m


@torch.no_grad()
def band_expansions(model: nn.Module, example: torch.Tensor, rtol: float = 1e-3) -> int:
    """Make the expansion + depthwise pair of every timm ``InvertedResidual`` block (after
    :func:`fold_conv_bn` with ``fuse_act``) one :class:`PwDwConv2d` (``conv_pw`` becomes the pair,
    ``conv_dw`` an Identity). Checked on ``example`` with banding forced on at any size (restored and
    RuntimeError on a mismatch). Returns the number of blocks changed."""
    model.eval()
    blocks = list(_timm_expansions(model))
    if not blocks:
        return 0
    expected = model(example)
    for blk in blocks:
        blk.conv_pw, blk.conv_dw = PwDwConv2d(blk.conv_pw, blk.conv_dw), nn.Identity()
        blk.conv_pw.min_bytes = 0  # verify the banded path itself, in bands of a few rows
        blk.conv_pw.band_bytes = 1
    try:
        err = _mismatch(model(example), expected, rtol)
    finally:
        for blk in blocks:
            del blk.conv_pw.min_bytes, blk.conv_pw.band_bytes  # back to the class defaults
    if err is not None:
        for blk in blocks:
            blk.conv_pw, blk.conv_dw = blk.conv_pw.pw, blk.conv_pw.dw
        raise RuntimeError(f"banding the expansions changed the output by {err:.3g}; the model was restored")
    return len(blocks)
