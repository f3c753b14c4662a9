"""HMSA-wrapped models other than DeepLabV3+ (which registers its own in deeplab.py).

``hmsa-hyperseg-m``: HyperSeg-M (pyseg.models.hyperseg) inside :class:`pyseg.nn.MultiScaleAttention`.
HyperSeg exposes the protocol: ``forward_features_and_logits`` (stride-2 logits, stride-4 decoder
level input as attention features), ``attn_channels``, ``encoder`` (the trunk for staged training)
and ``input_multiple`` (per-scale input sizes are rounded to it).
"""
from __future__ import annotations

from .backbones import load_model_weights
from .registry import create_model, register_model

__all__ = ["hmsa_wrap"]


def hmsa_wrap(base: str, train_scales=(0.5, 1.0), infer_scales=(0.5, 1.0, 2.0), attn_mid_channels: int = 256,
              backend: str = "auto", return_aux: bool = False, num_classes: int | None = None, in_channels: int = 3,
              backbone_weights: str | None = None, checkpoint: str | None = None, **overrides):
    """Build registered model ``base`` (with ``overrides``) wrapped in MultiScaleAttention (uniform
    arguments: :mod:`pyseg.models.registry`; ``checkpoint`` holds the wrapped model's weights)."""
    from ..nn.hmsa import MultiScaleAttention

    model = MultiScaleAttention(create_model(base, num_classes=num_classes, in_channels=in_channels,
                                             backbone_weights=backbone_weights, **overrides),
                                train_scales=train_scales, infer_scales=infer_scales,
                                attn_mid_channels=attn_mid_channels, backend=backend, return_aux=return_aux)
    return load_model_weights(model, checkpoint)


register_model("hmsa-hyperseg-m", hmsa_wrap,
               {"base": "hyperseg-m", "train_scales": (0.5, 1.0), "infer_scales": (0.5, 1.0, 2.0),
                "attn_mid_channels": 256},
               "Hierarchical multi-scale attention over HyperSeg-M")
