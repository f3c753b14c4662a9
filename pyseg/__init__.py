"""pyseg: dynamic patch-wise convolution, HyperSeg and hierarchical multi-scale attention.

>>> import pyseg
>>> pyseg.backends()   # which kernel backends this install can run
"""
from .version import __version__
from . import _extension
from ._backends import backends
from . import ops, nn
from . import _onnx_hook

_onnx_hook.install()  # ONNX translations of the ops, registered when torch.onnx's exporter loads

__all__ = ["__version__", "backends", "ops", "nn"]


def __getattr__(name):
    # heavier subpackages load on first use
    if name in ("models", "data", "losses", "metrics", "engine"):
        import importlib

        return importlib.import_module(f"pyseg.{name}")
    raise AttributeError(f"module 'pyseg' has no attribute {name!r}")
