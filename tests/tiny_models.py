"""Test-only models, registered under ``test-*`` names (import this module, or pass
``--import tests/tiny_models.py`` to the commands)."""
import torch
from torch import nn

from pyseg.models import list_models, register_model


class TinySegNet(nn.Module):
    """conv3x3(stride 2) → conv3x3 (dilated) → conv3x3 → 1×1 classifier; logits at half resolution, so the engine's
    upsampling path is exercised. ``norm``: "bn" or "none"."""

    def __init__(self, num_classes: int, width: int = 16, norm: str = "bn"):
        super().__init__()

        def block(cin, cout, stride=1, dil=1):
            layers = [nn.Conv2d(cin, cout, 3, stride, dil, dilation=dil, bias=norm == "none")]
            if norm == "bn":
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
            return nn.Sequential(*layers)

        self.trunk = nn.Sequential(block(3, width, 2), block(width, width, 1, 2), block(width, width, 1, 4))
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        return self.head(self.trunk(x))


class ScalesAwareNet(TinySegNet):
    """Exposes ``set_scales`` like a multi-scale attention model; records the scales it got."""

    def __init__(self, num_classes: int, **kw):
        super().__init__(num_classes, **kw)
        self.received_scales = None

    def set_scales(self, scales):
        self.received_scales = list(scales)


if "test-tiny" not in list_models():
    register_model("test-tiny", TinySegNet, {"width": 16, "norm": "bn"}, "tiny test-only conv net")
    register_model("test-tiny-scales", ScalesAwareNet, {"width": 8}, "tiny net with set_scales")


class TinyHMSABase(nn.Module):
    """The multi-scale attention protocol (``forward_features_and_logits``, ``attn_channels``, ``trunk``) on a
    two-layer stride-4 trunk: logits and attention features at stride 4, as DeepLabV3+."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Conv2d(width, num_classes, 1)
        self.attn_channels = width

    def forward_features_and_logits(self, x):
        feats = self.trunk(x)
        return self.head(feats), feats

    def forward(self, x):
        return nn.functional.interpolate(self.head(self.trunk(x)), size=x.shape[-2:], mode="bilinear",
                                         align_corners=False)


def tiny_hmsa(num_classes: int = 4, width: int = 8, attn_mid_channels: int = 8, infer_scales=(0.5, 1.0, 2.0),
              **_):
    from pyseg.nn import MultiScaleAttention

    return MultiScaleAttention(TinyHMSABase(num_classes, width), train_scales=(0.5, 1.0), infer_scales=infer_scales,
                               attn_mid_channels=attn_mid_channels)


if "test-tiny-hmsa" not in list_models():
    register_model("test-tiny-hmsa", tiny_hmsa, {"width": 8, "attn_mid_channels": 8},
                   "tiny multi-scale attention net (stride-4 logits)")
