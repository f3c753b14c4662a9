"""Hierarchical multi-scale attention (Tao, Sapra, Catanzaro 2020) as a model wrapper.

Protocol for a wrapped segmentation model (any ``nn.Module``):

* ``forward_features_and_logits(x) -> (logits, attn_features)``: ``logits`` (B, C, h, w) at the
  model's native output stride and the features the attention head reads, ``attn_features``
  (B, F, h', w') (typically both at stride 4; they may differ in resolution);
* ``attn_channels`` (int): F, the channels of ``attn_features``
  (or pass ``attn_in_channels=`` to :class:`MultiScaleAttention`);
* ``trunk`` (or ``encoder``) (nn.Module): the backbone, for the staged training helpers; every
  parameter of the model outside it counts as the segmentation head. A model may instead define
  ``trunk_parameters()`` and ``head_parameters()``;
* optional ``input_multiple`` (int): input height/width must be multiples of it (HyperSeg); the
  per-scale input sizes are then rounded to the nearest multiple (at least one multiple).

Each scale s runs the wrapped model on the input bilinearly resized to (round(H*s), round(W*s))
(or the nearest multiple of ``input_multiple``)
(align_corners=False, no antialias); the attention head gives a_s = sigmoid(head(features)).
As in the public implementation (Tao et al., NVIDIA semantic-segmentation), scale s's prediction
is formed at its input-image size: its native-resolution logits and attention map are upsampled
bilinearly to that size, then the hierarchical recurrence runs on those grids and the result is
resized to the input resolution. The wrapper passes the native-resolution logits and attention
maps with ``scale_sizes`` = each scale's input size to :func:`pyseg.nn.functional.hmsa_fuse`,
whose fused kernels sample them on the fly: the per-scale full-resolution logits of the public
method are never built (in training, with gradients, the front end resizes them explicitly under
autograd and uses the fused two-scale backward).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.hmsa_fuse import hmsa_fuse

__all__ = ["AttentionHead", "MultiScaleAttention", "set_training_stage", "frozen_modules", "STAGES", "STAGE_LR"]


class AttentionHead(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN-ReLU, 1x1 conv to one channel, sigmoid (the HMSA paper's attention head)."""

    def __init__(self, in_channels: int, mid_channels: int = 256, out_channels: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 3, padding=1, bias=False), nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, mid_channels, 3, padding=1, bias=False), nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, 1, bias=False),
        )

    def forward(self, x):
        return torch.sigmoid(self.body(x))


def _check_scales(scales, name):
    if isinstance(scales, (int, float)) or not isinstance(scales, Iterable):
        raise TypeError(f"{name} must be a sequence of positive numbers containing 1.0, got {scales!r}")
    scales = tuple(float(s) for s in scales)
    if not scales or 1.0 not in scales or any(s <= 0 for s in scales) or len(set(scales)) != len(scales):
        raise ValueError(f"{name} must be distinct positive numbers containing 1.0, got {scales!r}")
    return tuple(sorted(scales))


class MultiScaleAttention(nn.Module):
    """Wrap a segmentation model (see the module docstring's protocol) with HMSA.

    Args:
        model: the wrapped model.
        train_scales: scales used in training mode (default the paper's (0.5, 1.0)).
        infer_scales: scales used in eval mode (default (0.5, 1.0, 2.0); change with
            :meth:`set_scales`).
        attn_in_channels: channels of ``attn_features`` (default ``model.attn_channels``).
        attn_mid_channels: width of the attention head (256).
        backend: backend of the fusion op (``"auto"``, ``"reference"``, ``"cpu"``, ...).
        return_aux: in training, also return the per-scale logits (dict scale -> (B, C, h, w)).

    ``forward(x)`` returns fused logits (B, C, H, W) at the input resolution (and the aux dict in
    training when ``return_aux``, with each scale's native-resolution logits); :meth:`predict`
    can return fused argmax labels directly. Each scale's prediction is formed at its input size
    (see the module docstring).
    """

    def __init__(self, model: nn.Module, train_scales: Sequence[float] = (0.5, 1.0),
                 infer_scales: Sequence[float] = (0.5, 1.0, 2.0), attn_in_channels: int | None = None,
                 attn_mid_channels: int = 256, backend: str = "auto", return_aux: bool = False):
        super().__init__()
        if not callable(getattr(model, "forward_features_and_logits", None)):
            raise TypeError(f"{type(model).__name__} does not implement forward_features_and_logits(x) -> "
                            "(logits, attn_features); see pyseg.nn.hmsa")
        if attn_in_channels is None:
            attn_in_channels = getattr(model, "attn_channels", None)
            if not isinstance(attn_in_channels, int):
                raise ValueError("pass attn_in_channels=... or give the wrapped model an int attn_channels")
        self.model = model
        self.attention = AttentionHead(attn_in_channels, attn_mid_channels)
        self.train_scales = _check_scales(train_scales, "train_scales")
        self.scales = _check_scales(infer_scales, "infer_scales")
        self.backend = backend
        self.return_aux = return_aux
        self.stage = None

    def set_scales(self, scales: Sequence[float]) -> None:
        """Set the inference scales (eval mode); must contain 1.0."""
        self.scales = _check_scales(scales, "scales")

    def set_backend(self, backend: str) -> "MultiScaleAttention":
        """Backend of the fusion op and, when the wrapped model has ``set_backend``, of its dynamic
        ops too (e.g. ``"reference"`` for a side-by-side comparison). Returns self."""
        self.backend = backend
        if callable(getattr(self.model, "set_backend", None)):
            self.model.set_backend(backend)
        return self

    @torch.no_grad()
    def fuse(self) -> "MultiScaleAttention":
        """Eval mode, and the wrapped model's inference rewrites (BatchNorm folding...) when it has
        ``fuse()``. Returns self."""
        self.eval()
        if callable(getattr(self.model, "fuse", None)):
            self.model.fuse()
        return self

    def to_channels_last(self) -> "MultiScaleAttention":
        """channels_last for the attention head and the wrapped model (its own ``to_channels_last``
        when it has one, e.g. HyperSeg's trunk-only conversion). Returns self."""
        self.attention.to(memory_format=torch.channels_last)
        if callable(getattr(self.model, "to_channels_last", None)):
            self.model.to_channels_last()
        else:
            self.model.to(memory_format=torch.channels_last)
        return self

    @property
    def active_scales(self):
        return self.train_scales if self.training else self.scales

    def scaled_size(self, size, s):
        """Input size of scale s for an input of ``size`` (H, W)."""
        m = getattr(self.model, "input_multiple", None)
        m = m if isinstance(m, int) and m > 1 else 1
        return tuple(max(m, m * round(v * s / m)) for v in size)

    def _per_scale(self, x, scales):
        """Per scale: native-resolution logits, attention map (None for the top) and input size."""
        top = max(scales)
        logits, attns, sizes = [], [], []
        for s in scales:
            size = self.scaled_size(x.shape[-2:], s)
            xs = x if tuple(x.shape[-2:]) == size else F.interpolate(
                x, size=size, mode="bilinear", align_corners=False)
            lg, feats = self.model.forward_features_and_logits(xs)
            logits.append(lg)
            attns.append(None if s == top else self.attention(feats))  # the top's attention is unused
            sizes.append(tuple(size))
        return logits, attns, sizes

    def per_scale_outputs(self, x, scales: Sequence[float] | None = None) -> dict:
        """Staged training, step 1 (trunk and segmentation head per scale, no attention): each scale's
        logits on its own, upsampled to the input size, as ``{"out": scale 1.0, "aux_terms": [(1.0,
        scale s), ...]}`` (the trainer sums one loss per scale). The attention head is not run."""
        scales = self.active_scales if scales is None else _check_scales(scales, "scales")
        per_scale = {}
        for s in scales:
            size = self.scaled_size(x.shape[-2:], s)
            xs = x if tuple(x.shape[-2:]) == size else F.interpolate(
                x, size=size, mode="bilinear", align_corners=False)
            lg, _ = self.model.forward_features_and_logits(xs)
            per_scale[s] = lg if tuple(lg.shape[-2:]) == tuple(x.shape[-2:]) else F.interpolate(
                lg, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": per_scale.pop(1.0), "aux_terms": [(1.0, lg) for lg in per_scale.values()]}

    @torch.no_grad()
    def attention_maps(self, x, scales: Sequence[float] | None = None) -> dict:
        """Each scale's attention map a_s (B, 1, H, W), resized bilinearly to the input size, for every
        scale below the top one (the top scale's attention is unused by the fusion)."""
        scales = self.scales if scales is None else _check_scales(scales, "scales")
        _, attns, _ = self._per_scale(x, scales)
        return {s: F.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=False)
                for s, a in zip(scales, attns) if a is not None}

    def forward(self, x, scales: Sequence[float] | None = None):
        if self.training and self.stage == 1:
            return self.per_scale_outputs(x, scales)
        scales = self.active_scales if scales is None else _check_scales(scales, "scales")
        logits, attns, sizes = self._per_scale(x, scales)
        out = hmsa_fuse(logits, attns, scales, x.shape[-2:], output="logits", backend=self.backend,
                        scale_sizes=sizes)
        if self.training and self.return_aux:
            return out, dict(zip(scales, logits))
        return out

    @torch.no_grad()
    def predict(self, x, scales: Sequence[float] | None = None, output: str = "labels"):
        """Fused prediction at the input resolution: int64 labels (B, H, W) or logits."""
        scales = self.scales if scales is None else _check_scales(scales, "scales")
        logits, attns, sizes = self._per_scale(x, scales)
        return hmsa_fuse(logits, attns, scales, x.shape[-2:], output=output, backend=self.backend,
                         scale_sizes=sizes)

    # ---- staged training (seed 001) --------------------------------------------------------
    def trunk_parameters(self):
        if callable(getattr(self.model, "trunk_parameters", None)):
            return list(self.model.trunk_parameters())
        trunk = getattr(self.model, "trunk", None)
        if not isinstance(trunk, nn.Module):
            trunk = getattr(self.model, "encoder", None)
        if not isinstance(trunk, nn.Module):
            raise TypeError(f"{type(self.model).__name__} has no `trunk`/`encoder` module nor trunk_parameters(); "
                            "staged training needs one")
        return list(trunk.parameters())

    def head_parameters(self):
        if callable(getattr(self.model, "head_parameters", None)):
            return list(self.model.head_parameters())
        trunk_ids = {id(p) for p in self.trunk_parameters()}
        return [p for p in self.model.parameters() if id(p) not in trunk_ids]

    def set_stage(self, stage: int):
        """See :func:`set_training_stage`."""
        return set_training_stage(self, stage)


#: stage -> (trunk, seg head, attention head) trainable
STAGES = {1: (True, True, False), 2: (False, False, True), 3: (True, True, False)}
#: the slides' learning rate of each stage (Adam; ``pyseg-train --recipe hmsa-staged``)
STAGE_LR = {1: 1e-3, 2: 5e-4, 3: 1e-4}


def set_training_stage(msa: MultiScaleAttention, stage: int) -> list[dict]:
    """Seed 001's staged training; sets ``requires_grad`` and returns the optimiser param groups.

    * stage 1: train trunk + segmentation head per scale (attention head frozen; in training mode
      ``forward`` then returns each scale's own logits, :meth:`MultiScaleAttention.per_scale_outputs`);
    * stage 2: freeze trunk and segmentation head, train the attention head;
    * stage 3: freeze the attention head, fine-tune trunk + segmentation head.

    Returns ``[{"name": ..., "params": [...]}, ...]`` with only the trainable groups (for
    ``torch.optim.SGD(groups, lr=...)``). Frozen modules keep their mode; call ``.eval()`` on them to
    also freeze BatchNorm statistics if wanted (``pyseg-train --stage`` does: :func:`frozen_modules`).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    train_trunk, train_head, train_attn = STAGES[stage]
    groups = [("trunk", msa.trunk_parameters(), train_trunk), ("seg_head", msa.head_parameters(), train_head),
              ("attention", list(msa.attention.parameters()), train_attn)]
    out = []
    for name, params, trainable in groups:
        for p in params:
            p.requires_grad_(trainable)
        if trainable:
            out.append({"name": name, "params": params})
    msa.stage = stage
    return out


def frozen_modules(msa: MultiScaleAttention) -> list[str]:
    """Names of ``msa``'s direct submodules (``model``, ``attention``) whose parameters are all frozen: the
    modules a trainer keeps in eval mode (frozen BatchNorm statistics) after :func:`set_training_stage`."""
    out = []
    for name, mod in msa.named_children():
        params = list(mod.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(name)
    return out
