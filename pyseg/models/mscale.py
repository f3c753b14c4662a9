"""Hierarchical multi-scale attention models with the layouts of NVIDIA's reference implementation.

NVIDIA/semantic-segmentation (the HMSA paper's code) ships two families whose checkpoints pyseg reads
(:mod:`pyseg.models.nvidia_official`):

* ``hmsa-deeplabv3p-resnet50`` -- their ``mscale.DeepV3R50`` (``MscaleV3Plus``): ResNet-50 dilated to output
  stride 8 (every block of layer3 dilated 2, of layer4 dilated 4, the first blocks included), ASPP with rates
  (12, 24, 36) and no projection (image pooling first, 5 x 256 channels), a bias-free 1x1 reduction of the
  ASPP output to 256 and of the stride-4 features to 48, a head of two 3x3 conv-BN-ReLU and a bias-free 1x1
  classifier on the 304 concatenated channels; the attention head reads the same 304 channels.
  41,642,560 parameters with 19 classes.
* ``hmsa-ocrnet-hrnet-w48`` -- their ``ocrnet.HRNet_Mscale`` (``MscaleOCR``): HRNetV2-W48 (timm's
  ``hrnet_w48`` modules, run with bilinear branch fusion), the four branches upsampled to stride 4 and
  concatenated (720 channels), OCR: a 3x3 conv-BN-ReLU to 512, an auxiliary head (1x1 conv-BN-ReLU, 1x1 conv)
  whose soft class regions gather object features, the object-context attention (keys 256), a 1x1
  conv-BN-ReLU over [context, features] and a 1x1 classifier; the attention head reads the 512 OCR features.
  72,143,430 parameters with 19 classes.

Both are :class:`NVMultiScaleAttention` models. Inference follows NVIDIA's ``nscale_forward``: each scale s
runs on the image resized (bilinear, align_corners=False) to floor(H*s) x floor(W*s); its stride-4 logits
and attention map are brought to that size and the hierarchy (highest scale first, lower scales gate before
upsampling) runs through :func:`pyseg.nn.functional.hmsa_fuse`, whose fused kernels sample the stride-4 maps
on the fly instead of building every scale's full-resolution logits; ``set_scales`` picks the scale set,
``forward`` returns the fused logits (their ``pred``). Training is NVIDIA's two-scale form: in training mode
``forward`` returns ``{"out": joint logits, "aux_terms": [(weight, logits), ...]}`` -- the attention-joined
OCR auxiliary logits weighted by ``ocr_aux_weight`` (their ``--ocr_alpha``, 0.4) and, with
``supervised_scale_weight`` (their ``--supervised_mscale_loss_wt``), each scale's own logits -- which the
pyseg trainer turns into ``loss(out) + sum(w * loss(t))``.

In eval mode the HRNet-OCR model runs its OCR and attention heads in horizontal bands of the stride-4 map
(``head_band_rows``; 0 for the whole map at once): only the OCR features (512 channels) are held for the
whole map; the 720-channel concatenation, the auxiliary head's hidden map, the object context and the
attention head's hidden maps exist one band at a time. Same values (up to float rounding).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.hmsa import MultiScaleAttention, _check_scales
from ..ops.hmsa_fuse import hmsa_fuse
from .backbones import load_model_weights
from .deeplab import ASPP, load_trunk_weights
from .registry import register_model

__all__ = ["NVMultiScaleAttention", "DeepLabV3PlusMscale", "HRNetOCR", "OCRHead", "ObjectContext",
           "hrnet_stride4_features", "hmsa_deeplabv3p_resnet50", "hmsa_ocrnet_hrnet"]


def _conv_bn_relu(cin, cout, k=1, bias=False, dilation=1):
    return [nn.Conv2d(cin, cout, k, padding=dilation * (k - 1) // 2, dilation=dilation, bias=bias),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _resize(x, size):
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# DeepLabV3+ / ResNet-50 (MscaleV3Plus)
# ---------------------------------------------------------------------------------------------
def _dilate_first_blocks(trunk: nn.Module) -> None:
    """timm dilates a ResNet stage's first block with the previous stage's dilation; NVIDIA dilates every
    block of the stage alike. Give each stage's first 3x3 conv its stage's dilation (no parameter changes)."""
    for name in ("layer3", "layer4"):
        stage = getattr(trunk, name)
        d = stage[1].conv2.dilation
        stage[0].conv2.dilation, stage[0].conv2.padding = d, d


class DeepLabV3PlusMscale(nn.Module):
    """NVIDIA's ``MscaleV3Plus`` segmentation network (without its attention head, which
    :class:`NVMultiScaleAttention` owns) on a timm ResNet trunk at output stride 8."""

    def __init__(self, backbone: str = "resnet50", num_classes: int = 19, aspp_channels: int = 256,
                 aspp_rates=(12, 24, 36), aspp_reduce_channels: int = 256, low_level_channels: int = 48,
                 head_channels: int = 256, backbone_weights: str | None = None, in_channels: int = 3):
        super().__init__()
        import timm

        self.trunk = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(1, 4),
                                       output_stride=8, in_chans=in_channels)
        if backbone_weights:
            load_trunk_weights(self.trunk, backbone_weights)
        _dilate_first_blocks(self.trunk)
        low_ch, high_ch = self.trunk.feature_info.channels()
        self.num_classes = num_classes
        self.aspp = ASPP(high_ch, aspp_channels, tuple(aspp_rates), project=False, pool_first=True)
        self.aspp_reduce = nn.Conv2d(self.aspp.out_channels, aspp_reduce_channels, 1, bias=False)
        self.low_reduce = nn.Conv2d(low_ch, low_level_channels, 1, bias=False)
        cat_ch = aspp_reduce_channels + low_level_channels
        self.head = nn.Sequential(*_conv_bn_relu(cat_ch, head_channels, 3), *_conv_bn_relu(head_channels, head_channels, 3),
                                  nn.Conv2d(head_channels, num_classes, 1, bias=False))
        self.attn_channels = cat_ch

    def forward_heads(self, x):
        low, high = self.trunk(x)
        y = _resize(self.aspp_reduce(self.aspp(high)), low.shape[-2:])
        cat = torch.cat([self.low_reduce(low), y], 1)
        return {"logits": self.head(cat), "attn_features": cat, "aux": None}

    def forward_features_and_logits(self, x):
        out = self.forward_heads(x)
        return out["logits"], out["attn_features"]

    def forward(self, x):
        return _resize(self.forward_heads(x)["logits"], x.shape[-2:])


# ---------------------------------------------------------------------------------------------
# HRNetV2-W48 + OCR (MscaleOCR)
# ---------------------------------------------------------------------------------------------
def _hrnet_stage(stage: nn.Module, xs):
    """Run a timm HRNet stage with bilinear upsampling in its fusion (timm upsamples nearest)."""
    for module in stage:
        xs = [branch(x) for branch, x in zip(module.branches, xs)]
        fused = []
        for i, fuse in enumerate(module.fuse_layers):
            y = None
            for j, f in enumerate(fuse):
                if j > i:  # 1x1 conv + BN at the low resolution, then bilinear to branch i's size
                    z = _resize(f[1](f[0](xs[j])), xs[i].shape[-2:])
                else:
                    z = f(xs[j])
                y = z if y is None else y + z
            fused.append(module.fuse_act(y))
        xs = fused
    return xs


def hrnet_branches(trunk: nn.Module, x):
    """The four branch outputs (strides 4, 8, 16, 32) of a timm HRNet features model."""
    x = trunk.act1(trunk.bn1(trunk.conv1(x)))
    x = trunk.act2(trunk.bn2(trunk.conv2(x)))
    x = trunk.layer1(x)
    ys = _hrnet_stage(trunk.stage2, [t(x) for t in trunk.transition1])
    for transition, stage in ((trunk.transition2, trunk.stage3), (trunk.transition3, trunk.stage4)):
        xs = [ys[i] if isinstance(t, nn.Identity) else t(ys[-1]) for i, t in enumerate(transition)]
        ys = _hrnet_stage(stage, xs)
    return ys


def _resize_rows(x, size, rows: slice):
    """Rows ``rows`` of ``F.interpolate(x, size, bilinear, align_corners=False)`` without the full map: the
    height resize as a product with the matching rows of the interpolation matrix (built by F.interpolate
    itself), then the width resize."""
    hin = x.shape[-2]
    eye = torch.eye(hin, dtype=x.dtype, device=x.device).view(1, 1, hin, hin)
    m = F.interpolate(eye, size=(size[0], hin), mode="bilinear", align_corners=False)[0, 0, rows]
    nz = m.abs().sum(0).nonzero()
    c0, c1 = int(nz[0]), int(nz[-1]) + 1
    y = torch.matmul(m[:, c0:c1], x[:, :, c0:c1])
    return _resize(y, (y.shape[-2], size[1]))


def hrnet_stride4_features(branches, rows: slice | None = None):
    """HRNetV2's representation: every branch upsampled (bilinear) to stride 4 and concatenated.
    ``rows`` selects output rows (a band), computing only those."""
    size = branches[0].shape[-2:]
    if rows is None:
        return torch.cat([branches[0]] + [_resize(b, size) for b in branches[1:]], 1)
    return torch.cat([branches[0][:, :, rows]] + [_resize_rows(b, size, rows) for b in branches[1:]], 1)


class ObjectContext(nn.Module):
    """OCR's object-context module: pixels (queries) attend to the class-region representations
    (keys/values), the context is projected back and fused with the pixel features."""

    def __init__(self, channels: int = 512, key_channels: int = 256, out_channels: int = 512,
                 dropout: float = 0.05):
        super().__init__()
        self.key_channels = key_channels
        self.query = nn.Sequential(*_conv_bn_relu(channels, key_channels), *_conv_bn_relu(key_channels, key_channels))
        self.key = nn.Sequential(*_conv_bn_relu(channels, key_channels), *_conv_bn_relu(key_channels, key_channels))
        self.value = nn.Sequential(*_conv_bn_relu(channels, key_channels))
        self.up = nn.Sequential(*_conv_bn_relu(key_channels, channels))
        self.fuse = nn.Sequential(*_conv_bn_relu(2 * channels, out_channels), nn.Dropout2d(dropout))

    def keys_values(self, regions):
        """regions (B, C, K, 1) -> keys, values (B, 1, K, key_channels)."""
        k = self.key(regions).flatten(2).transpose(1, 2).unsqueeze(1)
        v = self.value(regions).flatten(2).transpose(1, 2).unsqueeze(1)
        return k, v

    def forward(self, feats, regions=None, kv=None):
        b, _, h, w = feats.shape
        k, v = self.keys_values(regions) if kv is None else kv
        q = self.query(feats).flatten(2).transpose(1, 2).unsqueeze(1)
        ctx = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(key_channels)) v
        ctx = ctx.squeeze(1).transpose(1, 2).reshape(b, self.key_channels, h, w)
        return self.fuse(torch.cat([self.up(ctx), feats], 1))


def gather_regions(feats, aux_logits):
    """Soft object regions: per class, the feature average weighted by softmax over pixels of the
    auxiliary logits -> (B, C, K, 1)."""
    probs = F.softmax(aux_logits.flatten(2), dim=2)  # B, K, HW
    return torch.bmm(probs, feats.flatten(2).transpose(1, 2)).transpose(1, 2).unsqueeze(3)


class OCRHead(nn.Module):
    def __init__(self, in_channels: int = 720, num_classes: int = 19, mid_channels: int = 512,
                 key_channels: int = 256, dropout: float = 0.05):
        super().__init__()
        self.reduce = nn.Sequential(*_conv_bn_relu(in_channels, mid_channels, 3, bias=True))
        self.aux = nn.Sequential(*_conv_bn_relu(in_channels, in_channels, 1, bias=True),
                                 nn.Conv2d(in_channels, num_classes, 1))
        self.context = ObjectContext(mid_channels, key_channels, mid_channels, dropout)
        self.classifier = nn.Conv2d(mid_channels, num_classes, 1)

    def forward(self, x):
        feats = self.reduce(x)
        aux = self.aux(x)
        ocr = self.context(feats, gather_regions(feats, aux))
        return self.classifier(ocr), aux, ocr


class HRNetOCR(nn.Module):
    """NVIDIA's ``MscaleOCR`` network (without its attention head) on timm's HRNet modules."""

    def __init__(self, backbone: str = "hrnet_w48", num_classes: int = 19, mid_channels: int = 512,
                 key_channels: int = 256, dropout: float = 0.05, backbone_weights: str | None = None,
                 in_channels: int = 3, head_band_rows: int = 32):
        super().__init__()
        import timm

        self.trunk = timm.create_model(backbone, pretrained=False, features_only=True, feature_location="",
                                       out_indices=(1, 2, 3, 4), in_chans=in_channels)
        if backbone_weights:
            load_trunk_weights(self.trunk, backbone_weights)
        high_ch = sum(self.trunk.feature_info.channels())
        self.num_classes = num_classes
        self.ocr = OCRHead(high_ch, num_classes, mid_channels, key_channels, dropout)
        self.attn_channels = mid_channels
        self.head_band_rows = head_band_rows

    def forward_heads(self, x):
        cls, aux, ocr = self.ocr(hrnet_stride4_features(hrnet_branches(self.trunk, x)))
        return {"logits": cls, "attn_features": ocr, "aux": aux}

    def forward_features_and_logits(self, x):
        out = self.forward_heads(x)
        return out["logits"], out["attn_features"]

    def forward(self, x):
        return _resize(self.forward_heads(x)["logits"], x.shape[-2:])

    @torch.no_grad()
    def logits_and_attention_banded(self, x, attention: nn.Module, band_rows: int):
        """Eval: (stride-4 logits, attention map) with the heads run in bands of ``band_rows`` rows."""
        br = hrnet_branches(self.trunk, x)
        n, _, h, w = br[0].shape
        ocr = self.ocr
        feats = x.new_empty(n, ocr.classifier.in_channels, h, w)
        aux = x.new_empty(n, self.num_classes, h, w)
        for r0 in range(0, h, band_rows):
            r1 = min(r0 + band_rows, h)
            a, b = max(r0 - 1, 0), min(r1 + 1, h)  # the 3x3 reduce conv reads one row each side
            xb = hrnet_stride4_features(br, slice(a, b))
            feats[:, :, r0:r1] = _conv3x3_rows(ocr.reduce, xb, a, b, h)
            aux[:, :, r0:r1] = ocr.aux(xb[:, :, r0 - a:r1 - a])
            del xb
        kv = ocr.context.keys_values(gather_regions(feats, aux))
        del aux
        body = attention.body
        logits = x.new_empty(n, self.num_classes, h, w)
        attn = x.new_empty(n, 1, h, w)
        for r0 in range(0, h, band_rows):
            r1 = min(r0 + band_rows, h)
            a, b = max(r0 - 2, 0), min(r1 + 2, h)  # the attention head's two 3x3 convs: two rows each side
            o = ocr.context(feats[:, :, a:b], kv=kv)
            logits[:, :, r0:r1] = ocr.classifier(o[:, :, r0 - a:r1 - a])
            t = _conv3x3_rows(body[0:3], o, a, b, h)
            a, b = a + (a > 0), b - (b < h)
            t = _conv3x3_rows(body[3:6], t, a, b, h)
            a, b = a + (a > 0), b - (b < h)
            attn[:, :, r0:r1] = torch.sigmoid(body[6](t[:, :, r0 - a:r1 - a]))
            del o, t
        return logits, attn


def _conv3x3_rows(block, xb, a, b, h):
    """conv3x3 (padding 1) + BN + ReLU ``block`` on rows [a, b) of an h-row map: rows [a + (a > 0),
    b - (b < h)) of the full-map result (zero padding only at the map's top/bottom)."""
    conv = block[0]
    xp = F.pad(xb, (0, 0, int(a == 0), int(b == h)))
    return block[2](block[1](F.conv2d(xp, conv.weight, conv.bias, padding=(0, 1))))


# ---------------------------------------------------------------------------------------------
# the multi-scale wrapper
# ---------------------------------------------------------------------------------------------
class NVMultiScaleAttention(MultiScaleAttention):
    """:class:`pyseg.nn.MultiScaleAttention` with NVIDIA's per-scale sizes (floor(H*s), as their
    ``ResizeX``) and training outputs (see the module docstring)."""

    def __init__(self, model: nn.Module, ocr_aux_weight: float = 0.4, supervised_scale_weight: float = 0.0,
                 **kw):
        super().__init__(model, **kw)
        self.ocr_aux_weight = float(ocr_aux_weight)
        self.supervised_scale_weight = float(supervised_scale_weight)

    def scaled_size(self, size, s):
        return tuple(max(1, math.floor(v * s)) for v in size)

    def _per_scale(self, x, scales):
        band = getattr(self.model, "head_band_rows", 0)
        if self.training or not band or not callable(getattr(self.model, "logits_and_attention_banded", None)):
            return super()._per_scale(x, scales)
        top = max(scales)
        logits, attns, sizes = [], [], []
        for s in scales:
            size = self.scaled_size(x.shape[-2:], s)
            lg, at = self.model.logits_and_attention_banded(_resize(x, size), self.attention, band)
            logits.append(lg)
            attns.append(None if s == top else at)
            sizes.append(tuple(size))
        return logits, attns, sizes

    def forward(self, x, scales: Sequence[float] | None = None):
        if not self.training or self.stage == 1:
            return super().forward(x, scales)
        scales = self.train_scales if scales is None else _check_scales(scales, "scales")
        if len(scales) != 2 or scales[1] != 1.0:
            raise ValueError(f"training runs NVIDIA's two-scale form: scales (s, 1.0) with s < 1, got {scales}")
        outs, sizes = [], []
        for s in scales:
            size = self.scaled_size(x.shape[-2:], s)
            outs.append(self.model.forward_heads(_resize(x, size)))
            sizes.append(size)
        attn = [self.attention(outs[0]["attn_features"]), None]
        out_size = x.shape[-2:]
        joint = hmsa_fuse([o["logits"] for o in outs], attn, scales, out_size, backend=self.backend,
                          scale_sizes=sizes)
        terms = []
        if outs[0]["aux"] is not None and self.ocr_aux_weight:
            terms.append((self.ocr_aux_weight, hmsa_fuse([o["aux"] for o in outs], attn, scales, out_size,
                                                         backend=self.backend, scale_sizes=sizes)))
        if self.supervised_scale_weight:
            terms.append((self.supervised_scale_weight,
                          _resize(_resize(outs[0]["logits"], sizes[0]), out_size)))
            terms.append((self.supervised_scale_weight, _resize(outs[1]["logits"], out_size)))
        return {"out": joint, "aux_terms": terms}


def _wrap(model, train_scales, infer_scales, attn_mid_channels, backend, ocr_aux_weight, supervised_scale_weight,
          checkpoint):
    wrapped = NVMultiScaleAttention(model, ocr_aux_weight=ocr_aux_weight,
                                    supervised_scale_weight=supervised_scale_weight, train_scales=train_scales,
                                    infer_scales=infer_scales, attn_mid_channels=attn_mid_channels, backend=backend)
    return load_model_weights(wrapped, checkpoint)


def hmsa_deeplabv3p_resnet50(train_scales=(0.5, 1.0), infer_scales=(0.5, 1.0, 2.0), attn_mid_channels: int = 256,
                             backend: str = "auto", supervised_scale_weight: float = 0.0, num_classes: int = 19,
                             in_channels: int = 3, backbone_weights: str | None = None,
                             checkpoint: str | None = None, **cfg):
    """The registry builder (uniform arguments: :mod:`pyseg.models.registry`)."""
    model = DeepLabV3PlusMscale(num_classes=num_classes, in_channels=in_channels, backbone_weights=backbone_weights,
                                **cfg)
    return _wrap(model, train_scales, infer_scales, attn_mid_channels, backend, 0.0, supervised_scale_weight,
                 checkpoint)


def hmsa_ocrnet_hrnet(train_scales=(0.5, 1.0), infer_scales=(0.5, 1.0, 2.0), attn_mid_channels: int = 256,
                      backend: str = "auto", ocr_aux_weight: float = 0.4, supervised_scale_weight: float = 0.0,
                      num_classes: int = 19, in_channels: int = 3, backbone_weights: str | None = None,
                      checkpoint: str | None = None, **cfg):
    """The registry builder (uniform arguments: :mod:`pyseg.models.registry`)."""
    model = HRNetOCR(num_classes=num_classes, in_channels=in_channels, backbone_weights=backbone_weights, **cfg)
    return _wrap(model, train_scales, infer_scales, attn_mid_channels, backend, ocr_aux_weight,
                 supervised_scale_weight, checkpoint)


register_model("hmsa-deeplabv3p-resnet50", hmsa_deeplabv3p_resnet50,
               {"backbone": "resnet50", "num_classes": 19, "train_scales": (0.5, 1.0),
                "infer_scales": (0.5, 1.0, 2.0), "attn_mid_channels": 256, "supervised_scale_weight": 0.0},
               "HMSA over DeepLabV3+ / ResNet-50 at output stride 8, NVIDIA's mscale.DeepV3R50 layout")
register_model("hmsa-ocrnet-hrnet-w48", hmsa_ocrnet_hrnet,
               {"backbone": "hrnet_w48", "num_classes": 19, "train_scales": (0.5, 1.0),
                "infer_scales": (0.5, 1.0, 2.0), "attn_mid_channels": 256, "ocr_aux_weight": 0.4,
                "supervised_scale_weight": 0.0, "head_band_rows": 32},
               "HMSA over HRNetV2-W48 + OCR, NVIDIA's ocrnet.HRNet_Mscale layout")
