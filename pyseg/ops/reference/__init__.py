"""Pure-PyTorch reference implementations: the oracle for tests and the benchmark baseline.

They are written the way a user would write them with stock PyTorch ops (F.unfold,
F.conv2d, F.interpolate), are differentiable through autograd, and accept float64.
"""
from . import meta_block
from .hmsa_fuse import hmsa_fuse
from .patchwise_conv2d import patch_index, patchwise_conv2d

__all__ = ["patchwise_conv2d", "patch_index", "meta_block", "hmsa_fuse"]
