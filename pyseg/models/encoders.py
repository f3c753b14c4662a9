"""Encoders of the HyperSeg ablation variants (ResNet18, PSPNet18, PSPNet50) and the encoder factory.

Every encoder has the interface of :class:`~pyseg.models.backbones.TimmEncoder`: ``forward(x) ->
(features, signal)`` with ``features`` five maps at strides 2, 4, 8, 16, 32 (:attr:`feature_channels`,
reduced by ``out_feat_scale``) and ``signal`` the hypernetwork's signal source at stride 32
(:attr:`signal_channels`), plus ``load_trunk_weights(path)``.

* ``resnet18`` (and any other timm model): :class:`~pyseg.models.backbones.TimmEncoder` (timm
  ``features_only``; the signal source is the last stage, 512 channels for ResNet18).
* ``pspnet18`` / ``pspnet50``: :class:`PSPEncoder`, a dilated ResNet trunk and a pyramid pooling
  module (Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017).
* ``signal_channels=N`` (any encoder): :class:`SignalHead`, a 1x1 conv + BN + ReLU from the signal
  source to N channels -- the counterpart of EfficientNet's head conv (320 -> 1280 channels in B1),
  which the ResNet trunks lack.

:func:`build_encoder` picks one from the ``backbone`` name; an unknown name raises ``ValueError``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import TimmEncoder, _scales, load_state_dict_file

__all__ = ["PyramidPooling", "PSPEncoder", "SignalHead", "build_encoder", "signal_only_modules", "PSP_TRUNKS"]

#: PSPNet encoder name -> timm ResNet trunk
PSP_TRUNKS = {"pspnet18": "resnet18", "pspnet50": "resnet50"}


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _reducers(channels: Sequence[int], out_feat_scale, bn_eps: float = 1e-5) -> Tuple[nn.ModuleList, List[int]]:
    """1x1 conv + BN per stride whose scale is not 1 (as TimmEncoder)."""
    reducers, out_channels = nn.ModuleList(), []
    for c, s in zip(channels, _scales(out_feat_scale, len(channels))):
        if s == 1.0:
            reducers.append(nn.Identity())
            out_channels.append(c)
            continue
        out = int(round(c * s))
        if out < 1:
            raise ValueError(f"out_feat_scale {s} leaves no channels of {c}")
        reducers.append(nn.Sequential(nn.Conv2d(c, out, 1, bias=False), nn.BatchNorm2d(out, eps=bn_eps)))
        out_channels.append(out)
    return reducers, out_channels


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module.

    From the PSPNet paper: the feature map is average-pooled to ``bins`` x ``bins`` cells for each
    bin size (1, 2, 3, 6), each pooled map goes through a 1x1 convolution that reduces it to
    1/len(bins) of the input channels, is upsampled bilinearly to the input size and concatenated
    with the input; a convolution then fuses the concatenation.

    This project's choices (the paper does not give them): BN + ReLU after every convolution, the
    1x1 convolutions without bias, adaptive average pooling (PyTorch's bin boundaries), bilinear
    upsampling with ``align_corners=False``, and the fusion as a 3x3 convolution to ``out_channels``
    (512) + BN + ReLU -- the layer that the public PSPNet implementation puts before its classifier.
    """

    def __init__(self, in_channels: int, out_channels: int = 512, bins: Sequence[int] = (1, 2, 3, 6),
                 fusion_kernel: int = 3):
        super().__init__()
        if in_channels % len(bins):
            raise ValueError(f"in_channels ({in_channels}) must be divisible by the number of bins ({len(bins)})")
        self.bins = tuple(int(b) for b in bins)
        branch = in_channels // len(bins)
        self.branches = nn.ModuleList(_conv_bn_relu(in_channels, branch, 1) for _ in self.bins)
        self.fusion = _conv_bn_relu(in_channels + branch * len(bins), out_channels, fusion_kernel)
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        parts = [x]
        for b, branch in zip(self.bins, self.branches):
            y = branch(F.adaptive_avg_pool2d(x, b))
            parts.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        return self.fusion(torch.cat(parts, 1))


class PSPEncoder(nn.Module):
    """PSPNet18 / PSPNet50 as a HyperSeg encoder: a dilated ResNet and a pyramid pooling module.

    From the PSPNet paper: a ResNet whose last two stages are dilated (stride 1, dilation 2 and 4)
    so that its output is at stride 8, and the pyramid pooling module (:class:`PyramidPooling`,
    bins 1, 2, 3, 6) on that output.

    HyperSeg needs skips at strides 2..32 and a stride-32 signal; how a stride-8 network provides
    them is this project's choice (the HyperSeg paper names the encoder only):

    * strides 2, 4, 8: the stem (after its ReLU), ``layer1``, ``layer2``;
    * stride 16: ``layer3`` (dilated, stride 8) average-pooled 2x2;
    * stride 32: the pyramid pooling output (512 channels) average-pooled 4x4 -- the feature the
      PSPNet classifier reads becomes the first decoder level's input;
    * signal: ``layer4`` (512 channels for ResNet18, 2048 for ResNet50) average-pooled 4x4, i.e. the
      hypernetwork reads the trunk's last stage, as it does with every other encoder.

    Further choices: timm's ResNets (``resnet18`` / ``resnet50``: the plain 7x7 stem, not the
    three-conv "deep base" stem of the public PSPNet code), no auxiliary loss head, and the skip
    reducers (1x1 conv + BN, ``out_feat_scale``) of :class:`~pyseg.models.backbones.TimmEncoder`.
    Inputs must be multiples of 32 (the context head asks for more).
    """

    def __init__(self, name: str = "pspnet18", out_feat_scale: Union[float, Sequence[float]] = 1.0,
                 weights: Optional[str] = None, drop_path_rate: float = 0.0, ppm_channels: int = 512,
                 reducer_bn_eps: float = 1e-5):
        super().__init__()
        import timm

        if name not in PSP_TRUNKS:
            raise ValueError(f"unknown PSPNet encoder {name!r}; expected one of {sorted(PSP_TRUNKS)}")
        self.name = name
        self.trunk = timm.create_model(PSP_TRUNKS[name], pretrained=False, features_only=True, output_stride=8,
                                       drop_path_rate=drop_path_rate)
        reds = self.trunk.feature_info.reduction()
        chs = self.trunk.feature_info.channels()
        if list(reds) != [2, 4, 8, 8, 8]:
            raise RuntimeError(f"unexpected feature strides {reds} of the dilated {PSP_TRUNKS[name]}")
        if weights is not None:
            self.load_trunk_weights(weights)
        self.ppm = PyramidPooling(chs[4], ppm_channels)
        self.trunk_channels = [chs[0], chs[1], chs[2], chs[3], ppm_channels]
        self.signal_channels = chs[4]
        self.reducers, self.feature_channels = _reducers(self.trunk_channels, out_feat_scale, reducer_bn_eps)

    def load_trunk_weights(self, path: str):
        """Load a local timm ResNet checkpoint (ImageNet weights; ``fc.*`` ignored) into the trunk;
        anything else that does not match raises."""
        sd = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith("fc.")}
        result = self.trunk.load_state_dict(sd, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"backbone weights {path!r} do not match timm model {PSP_TRUNKS[self.name]!r}: "
                             f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")

    def forward(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        s2, s4, s8, l3, l4 = self.trunk(x)
        feats = [s2, s4, s8, F.avg_pool2d(l3, 2), F.avg_pool2d(self.ppm(l4), 4)]
        feats = [r(f) for r, f in zip(self.reducers, feats)]
        return feats, F.avg_pool2d(l4, 4)


class SignalHead(nn.Module):
    """Wraps an encoder and maps its signal source to ``channels`` with 1x1 conv + BN + ReLU (the
    counterpart of EfficientNet's head conv for trunks without one, e.g. ResNet18 -> 1280)."""

    def __init__(self, encoder: nn.Module, channels: int):
        super().__init__()
        if int(channels) < 2:
            raise ValueError(f"signal_channels must be an integer >= 2, got {channels!r}")
        self.encoder = encoder
        self.head = _conv_bn_relu(encoder.signal_channels, int(channels), 1)
        self.signal_channels = int(channels)
        self.feature_channels = encoder.feature_channels
        self.trunk_channels = encoder.trunk_channels

    def load_trunk_weights(self, path: str):
        self.encoder.load_trunk_weights(path)

    def forward(self, x: Tensor) -> Tuple[List[Tensor], Tensor]:
        feats, signal = self.encoder(x)
        return feats, self.head(signal)


def build_encoder(backbone: str, out_feat_scale=1.0, weights: Optional[str] = None, drop_path_rate: float = 0.0,
                  signal_channels: Optional[int] = None, static_padding: Optional[int] = None,
                  reducer_bn_eps: float = 1e-5) -> nn.Module:
    """The HyperSeg encoder named ``backbone``: ``pspnet18`` / ``pspnet50`` (:class:`PSPEncoder`) or a
    timm model name (:class:`~pyseg.models.backbones.TimmEncoder`, which also takes ``static_padding``);
    with ``signal_channels`` wrapped in a :class:`SignalHead`. Raises ``ValueError`` for a name that is
    neither."""
    if not isinstance(backbone, str) or not backbone:
        raise ValueError(f"backbone must be a non-empty string, got {backbone!r}")
    if backbone in PSP_TRUNKS:
        if static_padding is not None:
            raise ValueError(f"backbone_padding applies to the public EfficientNet encoders only, not {backbone!r}")
        enc = PSPEncoder(backbone, out_feat_scale, weights=weights, drop_path_rate=drop_path_rate,
                         reducer_bn_eps=reducer_bn_eps)
    else:
        import timm

        if not timm.is_model(backbone):
            raise ValueError(f"unknown encoder backbone {backbone!r}: expected 'pspnet18', 'pspnet50' or a timm "
                             f"model name (e.g. 'efficientnet_b1', 'resnet18'; see timm.list_models())")
        enc = TimmEncoder(backbone, out_feat_scale, weights=weights, drop_path_rate=drop_path_rate,
                          static_padding=static_padding, reducer_bn_eps=reducer_bn_eps)
    if signal_channels is not None:
        enc = SignalHead(enc, signal_channels)
    return enc


def signal_only_modules(encoder: nn.Module) -> List[nn.Module]:
    """Modules of ``encoder`` that only compute the signal source (no skip feature depends on them):
    EfficientNet's head conv and its BN (TimmEncoder), a :class:`SignalHead`'s head. A HyperSeg with a
    static decoder freezes them, since nothing reads the signal there."""
    if isinstance(encoder, SignalHead):
        return [encoder.head] + signal_only_modules(encoder.encoder)
    if isinstance(encoder, TimmEncoder) and encoder.has_head_conv:
        return [encoder.trunk.conv_head, encoder.trunk.bn2]
    return []
