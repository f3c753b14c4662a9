"""Operators: public functions over the compiled, Triton and reference backends."""
from . import reference
from .patchwise_conv2d import patchwise_conv2d
from .hmsa_fuse import hmsa_fuse

__all__ = ["reference", "patchwise_conv2d", "hmsa_fuse"]
