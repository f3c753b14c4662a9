"""Functional interface (``pyseg.nn.functional``), mirroring ``torch.nn.functional``."""
from ..ops.patchwise_conv2d import patchwise_conv2d
from ..ops.hmsa_fuse import hmsa_fuse

__all__ = ["patchwise_conv2d", "hmsa_fuse"]
