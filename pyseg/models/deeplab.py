"""DeepLabV3+ (ASPP + decoder) on timm trunks, with the HMSA protocol.

Built from timm ``features_only`` trunks (``pretrained=False``: weights are never downloaded;
pass ``backbone_weights`` to load a local timm state dict, ``.pth``/``.pt``/``.safetensors``).

Registered names:
    deeplabv3p-mobilenetv2, deeplabv3p-resnet50            plain DeepLabV3+
    hmsa-deeplabv3p-mobilenetv2                            wrapped in pyseg.nn.MultiScaleAttention
    (hmsa-deeplabv3p-resnet50 has NVIDIA's layout: pyseg.models.mscale)

The model implements the multi-scale attention protocol (see :class:`pyseg.nn.MultiScaleAttention`):
``forward_features_and_logits(x) -> (logits, attn_features)``, both at stride 4 (the decoder
resolution), ``attn_channels`` (channels of attn_features) and ``trunk`` (the timm backbone module;
every other parameter belongs to the segmentation head).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import load_model_weights, load_state_dict_file
from .registry import register_model

__all__ = ["ASPP", "DeepLabV3Plus", "deeplabv3p", "hmsa_deeplabv3p", "load_trunk_weights"]


def _conv_bn_relu(cin, cout, k=1, dilation=1):
    pad = dilation * (k - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and an image-pooling branch.

    ``project=False`` leaves out the 1x1 projection (the output has ``(len(rates) + 2) * out_channels``
    channels) and ``pool_first=True`` puts the image-pooling branch first in the concatenation (NVIDIA's
    HMSA layout, :mod:`pyseg.models.mscale`)."""

    def __init__(self, in_channels: int, out_channels: int = 256, rates=(6, 12, 18), dropout: float = 0.1,
                 project: bool = True, pool_first: bool = False):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(in_channels, out_channels, 1)] +
                                      [_conv_bn_relu(in_channels, out_channels, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                  nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.pool_first = pool_first
        self.out_channels = out_channels * (len(rates) + 2)
        self.project = None
        if project:
            self.project = nn.Sequential(_conv_bn_relu(self.out_channels, out_channels, 1), nn.Dropout(dropout))
            self.out_channels = out_channels

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        pooled = self.pool(x).expand(-1, -1, x.shape[-2], x.shape[-1])
        outs.insert(0, pooled) if self.pool_first else outs.append(pooled)
        y = torch.cat(outs, 1)
        return y if self.project is None else self.project(y)


def load_trunk_weights(trunk: nn.Module, path: str) -> None:
    """Load a local timm checkpoint into a features_only trunk (classifier keys are ignored; a
    DataParallel ``module.`` prefix is stripped)."""
    state = load_state_dict_file(path)
    result = trunk.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ValueError(f"backbone_weights {path!r} does not fit the trunk: {len(result.missing_keys)} missing "
                         f"keys, e.g. {result.missing_keys[:5]}")


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ on a timm trunk (low-level features at stride 4, ASPP at ``output_stride``).

    ``forward(x)`` returns logits at the input resolution; ``forward_features_and_logits(x)``
    returns (stride-4 logits, stride-4 decoder features) for multi-scale attention.
    """

    def __init__(self, backbone: str = "mobilenetv2_100", num_classes: int = 19, output_stride: int = 16,
                 aspp_channels: int = 256, aspp_rates=None, low_level_channels: int = 48,
                 decoder_channels: int = 256, dropout: float = 0.1, backbone_weights: str | None = None,
                 in_channels: int = 3):
        super().__init__()
        import timm

        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.trunk = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(1, 4),
                                       output_stride=output_stride, in_chans=in_channels)
        if backbone_weights:
            load_trunk_weights(self.trunk, backbone_weights)
        low_ch, high_ch = self.trunk.feature_info.channels()
        if tuple(self.trunk.feature_info.reduction()) != (4, output_stride):
            raise ValueError(f"{backbone} features_only does not give strides (4, {output_stride})")
        if aspp_rates is None:
            aspp_rates = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}[output_stride]
        self.num_classes = num_classes
        self.aspp = ASPP(high_ch, aspp_channels, tuple(aspp_rates), dropout)
        self.low_proj = _conv_bn_relu(low_ch, low_level_channels, 1)
        self.decoder = nn.Sequential(_conv_bn_relu(aspp_channels + low_level_channels, decoder_channels, 3),
                                     _conv_bn_relu(decoder_channels, decoder_channels, 3))
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        self.attn_channels = decoder_channels

    def forward_features_and_logits(self, x):
        low, high = self.trunk(x)
        y = self.aspp(high)
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        feats = self.decoder(torch.cat([y, self.low_proj(low)], 1))
        return self.classifier(feats), feats

    def forward(self, x):
        logits, _ = self.forward_features_and_logits(x)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def deeplabv3p(num_classes: int = 19, in_channels: int = 3, backbone_weights: str | None = None,
               checkpoint: str | None = None, **cfg) -> DeepLabV3Plus:
    """The registry builder (uniform arguments: :mod:`pyseg.models.registry`)."""
    model = DeepLabV3Plus(num_classes=num_classes, in_channels=in_channels, backbone_weights=backbone_weights, **cfg)
    return load_model_weights(model, checkpoint)


def hmsa_deeplabv3p(train_scales=(0.5, 1.0), infer_scales=(0.5, 1.0, 2.0), attn_mid_channels: int = 256,
                    backend: str = "auto", return_aux: bool = False, num_classes: int = 19, in_channels: int = 3,
                    backbone_weights: str | None = None, checkpoint: str | None = None, **cfg):
    """DeepLabV3+ inside :class:`pyseg.nn.MultiScaleAttention` (uniform arguments:
    :mod:`pyseg.models.registry`)."""
    from ..nn.hmsa import MultiScaleAttention

    base = deeplabv3p(num_classes=num_classes, in_channels=in_channels, backbone_weights=backbone_weights, **cfg)
    model = MultiScaleAttention(base, train_scales=train_scales, infer_scales=infer_scales,
                                attn_mid_channels=attn_mid_channels, backend=backend, return_aux=return_aux)
    return load_model_weights(model, checkpoint)


for _name, _bb in (("mobilenetv2", "mobilenetv2_100"), ("resnet50", "resnet50")):
    register_model(f"deeplabv3p-{_name}", deeplabv3p,
                   {"backbone": _bb, "num_classes": 19, "output_stride": 16},
                   f"DeepLabV3+ on timm {_bb} (output stride 16)")
    if _name == "resnet50":
        continue  # hmsa-deeplabv3p-resnet50 has NVIDIA's layout: pyseg.models.mscale
    register_model(f"hmsa-deeplabv3p-{_name}", hmsa_deeplabv3p,
                   {"backbone": _bb, "num_classes": 19, "output_stride": 16, "train_scales": (0.5, 1.0),
                    "infer_scales": (0.5, 1.0, 2.0), "attn_mid_channels": 256},
                   f"Hierarchical multi-scale attention over DeepLabV3+ / {_bb}")
