"""Modules (``pyseg.nn``): drop-in layers built on pyseg's ops."""
from . import functional
from .meta_block import ChainedMetaBlock, MetaBlock, bn_affine
from .patchwise_conv2d import PatchWiseConv2d
from .hmsa import AttentionHead, MultiScaleAttention, set_training_stage

__all__ = ["functional", "MetaBlock", "ChainedMetaBlock", "bn_affine", "PatchWiseConv2d", "AttentionHead",
           "MultiScaleAttention", "set_training_stage"]
