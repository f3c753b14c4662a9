"""Operators: public functions over the compiled, Triton and reference backends."""
from . import reference
from .meta_block import meta_block, pointwise_block
from .patchwise_conv2d import patchwise_conv2d
from .hmsa_fuse import hmsa_fuse
from .resize import resize_bilinear

__all__ = ["reference", "patchwise_conv2d", "meta_block", "pointwise_block", "hmsa_fuse", "resize_bilinear"]
