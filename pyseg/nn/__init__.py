"""Modules (``pyseg.nn``): drop-in layers built on pyseg's ops."""
from . import functional
from .meta_block import MetaBlock
from .patchwise_conv import PatchWiseConv2d
from .hmsa import AttentionHead, MultiScaleAttention, set_training_stage

__all__ = ["functional", "MetaBlock", "PatchWiseConv2d", "AttentionHead", "MultiScaleAttention",
           "set_training_stage"]
