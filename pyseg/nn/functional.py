"""Functional interface (``pyseg.nn.functional``), mirroring ``torch.nn.functional``."""
from ..ops.meta_block import meta_block, pointwise_block
from ..ops.patchwise_conv2d import patchwise_conv2d
from ..ops.hmsa_fuse import hmsa_fuse

__all__ = ["patchwise_conv2d", "meta_block", "pointwise_block", "hmsa_fuse"]
