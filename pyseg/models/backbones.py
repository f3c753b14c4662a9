"""Encoders (the hypernetwork's trunk) built from timm models.

:class:`TimmEncoder` returns the features at strides 2, 4, 8, 16, 32 (optionally reduced by 1x1
conv + BN "reducers") and the signal source at stride 32. For EfficientNet-family models (timm's
``EfficientNet`` class: ``efficientnet_b*``, ``tf_efficientnet_b*``, ``mobilenetv2_*``...) the signal
source is the backbone's head conv (``conv_head`` + ``bn2``: 1280 ch for B1, 1536 for B3), which timm's
``features_only`` mode drops, so the full model is built (without classifier) and walked stage by stage.
Other models (``resnet18``...) use ``features_only`` and their last feature map is the signal source.

Weights are never downloaded: ``weights=path`` loads a local ImageNet checkpoint (safetensors or a
torch file holding a timm state dict; classifier entries are ignored).

``static_padding=S`` (:func:`static_same_padding`) fixes every convolution's zero padding to TensorFlow's
"same" padding computed once for an S x S image and its stride chain, then used at any input size: the
padding of the public HyperSeg EfficientNet (S = 240 for B1, 300 for B3), which differs from timm's
dynamic "same" padding at stride-2 convolutions that meet an odd size in that chain.
"""
from __future__ import annotations

import math
import os
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["TimmEncoder", "load_state_dict_file", "load_model_weights", "static_same_padding"]

_CLASSIFIER_PREFIXES = ("classifier.", "fc.", "head.", "last_linear.")


def load_state_dict_file(path: str) -> dict:
    """A state dict from a ``.safetensors`` file or a torch checkpoint (optionally wrapped in
    ``state_dict`` / ``model``; a ``module.`` prefix is stripped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path!r} (weights are never downloaded)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path, device="cpu")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path!r} does not hold a state dict")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def _same_pads(size: int, k: int, stride: int, dilation: int):
    """(total padding, output size) of TF "same" for a ``size`` input."""
    out = math.ceil(size / stride)
    return max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0), out


@torch.no_grad()
def static_same_padding(trunk: nn.Module, image_size: int) -> List[Tuple[str, Tuple[int, int, int, int]]]:
    """Replace every Conv2d of ``trunk`` by one with fixed zero padding: TF "same" padding computed for a
    square ``image_size`` input, the size following the convolutions' strides in module order (the
    order timm's EfficientNet runs them). Symmetric paddings become the conv's own ``padding`` (a plain
    ``nn.Conv2d``); an asymmetric one (left/top = total // 2) becomes ``nn.Sequential(nn.ZeroPad2d,
    nn.Conv2d)``. Weights are kept. Returns (name, (left, right, top, bottom)) per spatial conv."""
    size = image_size
    table = []
    for name, m in list(trunk.named_modules()):
        if not isinstance(m, nn.Conv2d):
            continue
        (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
        if m.padding_mode != "zeros" or kh != kw or sh != sw or dh != dw:
            raise ValueError(f"static_padding: {name} ({m}) is not a square zero-padded convolution")
        total, out = _same_pads(size, kh, sh, dh)
        lo, hi = total // 2, total - total // 2
        conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, lo if lo == hi else 0, m.dilation,
                         m.groups, bias=m.bias is not None).to(m.weight.device, m.weight.dtype)
        conv.weight.copy_(m.weight)
        if m.bias is not None:
            conv.bias.copy_(m.bias)
        new = conv if lo == hi else nn.Sequential(nn.ZeroPad2d((lo, hi, lo, hi)), conv)
        parent, _, attr = name.rpartition(".")
        setattr(trunk.get_submodule(parent) if parent else trunk, attr, new)
        if kh > 1 or sh > 1:
            table.append((name, (lo, hi, lo, hi)))
        size = out
    return table


def load_model_weights(model: nn.Module, checkpoint: str | None) -> nn.Module:
    """The builders' ``checkpoint=``: load a whole-model state dict (a pyseg ``.safetensors`` file, or a
    torch file holding the model's own state dict) strictly into ``model``, all or nothing. A released
    checkpoint of a public implementation goes through ``create_model(name, checkpoint=...)`` /
    :mod:`pyseg.models.official`. Returns ``model``."""
    if checkpoint is None:
        return model
    sd = load_state_dict_file(checkpoint)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise ValueError(f"checkpoint {checkpoint!r} does not fit {type(model).__name__} (nothing was loaded): "
                         f"{len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. "
                         f"{unexpected[:3]}; {len(mismatched)} with another shape, e.g. {mismatched[:3]}")
    model.load_state_dict(sd, strict=True)
    return model


def _scales(out_feat_scale, n) -> List[float]:
    if isinstance(out_feat_scale, (list, tuple)):
        if len(out_feat_scale) != n:
            raise ValueError(f"out_feat_scale must have {n} entries (one per stride), got {list(out_feat_scale)}")
        return [float(s) for s in out_feat_scale]
    return [float(out_feat_scale)] * n


class TimmEncoder(nn.Module):
    """Features at strides 2..32 + the stride-32 signal source, from a timm model.

    Args:
        name: timm model name.
        out_feat_scale: per-stride (or one) channel scale of the skip features; a stride whose scale is
            not 1 gets a 1x1 conv + BN reducer to ``round(channels * scale)`` channels.
        weights: optional local checkpoint of the timm model (ImageNet weights).
        drop_path_rate: stochastic depth of the trunk (training only).
        static_padding: image size for :func:`static_same_padding` (None: the timm model's padding).
        reducer_bn_eps: BatchNorm eps of the reducers (the public HyperSeg EfficientNet: 1e-3).

    ``forward(x) -> (features, signal)``: ``features`` a list of 5 maps (strides 2, 4, 8, 16, 32) with
    :attr:`feature_channels`, ``signal`` (B, :attr:`signal_channels`, H/32, W/32).
    """

    def __init__(self, name: str = "efficientnet_b1", out_feat_scale: Union[float, Sequence[float]] = 1.0,
                 weights: str = None, drop_path_rate: float = 0.0, static_padding: int = None,
                 reducer_bn_eps: float = 1e-5):
        super().__init__()
        import timm

        self.name = name
        probe = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)
        info = [f for f in probe.feature_info if f["reduction"] in (2, 4, 8, 16, 32)]
        # the last stage of each stride
        by_red = {}
        for f in info:
            by_red[f["reduction"]] = f
        if sorted(by_red) != [2, 4, 8, 16, 32]:
            raise ValueError(f"timm model {name!r} does not expose features at strides 2, 4, 8, 16, 32")
        info = [by_red[r] for r in (2, 4, 8, 16, 32)]
        self.has_head_conv = hasattr(probe, "conv_head") and hasattr(probe, "blocks")
        if self.has_head_conv:
            self.trunk = probe
            self._stage_taps = [int(f["module"].split(".")[1]) for f in info]
            self.signal_channels = probe.conv_head.out_channels
        else:
            del probe
            self.trunk = timm.create_model(name, pretrained=False, features_only=True,
                                           drop_path_rate=drop_path_rate)
            reds = self.trunk.feature_info.reduction()
            self._feature_indices = [reds.index(r) for r in (2, 4, 8, 16, 32)]
            self.signal_channels = info[-1]["num_chs"]
        trunk_channels = [f["num_chs"] for f in info]
        if weights is not None:
            self.load_trunk_weights(weights)
        self.static_padding = static_padding
        if static_padding is not None:
            static_same_padding(self.trunk, int(static_padding))
        scales = _scales(out_feat_scale, 5)
        self.reducers = nn.ModuleList()
        self.feature_channels = []
        for c, s in zip(trunk_channels, scales):
            if s == 1.0:
                self.reducers.append(nn.Identity())
                self.feature_channels.append(c)
            else:
                # Python's round(), as the public implementation (round(24 * 0.166) = 4)
                out = int(round(c * s))
                if out < 1:
                    raise ValueError(f"out_feat_scale {s} leaves no channels of {c}")
                self.reducers.append(nn.Sequential(nn.Conv2d(c, out, 1, bias=False), nn.BatchNorm2d(out, eps=reducer_bn_eps)))
                self.feature_channels.append(out)
        self.trunk_channels = trunk_channels

    def load_trunk_weights(self, path: str):
        """Load a local timm checkpoint into the trunk (classifier entries ignored; anything else that
        does not match raises)."""
        sd = load_state_dict_file(path)
        own = self.trunk.state_dict()
        sd = {k: v for k, v in sd.items() if not (k.startswith(_CLASSIFIER_PREFIXES) and k not in own)}
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(f"backbone weights {path!r} do not match timm model {self.name!r}: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
        if bad:
            raise ValueError(f"backbone weights {path!r}: shape mismatch for {bad[:5]} "
                             f"(e.g. {bad[0]}: file {tuple(sd[bad[0]].shape)}, model {tuple(own[bad[0]].shape)})")
        self.trunk.load_state_dict(sd, strict=True)

    def forward(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        if self.has_head_conv:
            t = self.trunk
            y = t.bn1(t.conv_stem(x))
            feats = []
            taps = self._stage_taps
            for i, stage in enumerate(t.blocks):
                y = stage(y)
                if i in taps:
                    feats.append(y)
            signal = t.bn2(t.conv_head(y))
        else:
            outs = self.trunk(x)
            feats = [outs[i] for i in self._feature_indices]
            signal = feats[-1]
        feats = [r(f) for r, f in zip(self.reducers, feats)]
        return feats, signal
