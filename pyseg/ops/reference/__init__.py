"""Pure-PyTorch reference implementations: the oracle for tests and the benchmark baseline.

They are written the way a user would write them with stock PyTorch ops (F.unfold,
F.conv2d, F.interpolate), are differentiable through autograd, and accept float64.
"""
from .patchwise_conv2d import patchwise_conv2d, patch_index
from .hmsa import hmsa_fuse

__all__ = ["patchwise_conv2d", "patch_index", "hmsa_fuse"]
