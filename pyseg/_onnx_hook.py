"""Registers pyseg's ONNX translations when torch's dynamo ONNX exporter loads, so that a plain
``torch.onnx.export(model, (x,), path, dynamo=True)`` works after ``import pyseg`` without pyseg importing
onnxscript (slow) itself.

The exporter builds its op table from onnxscript's torch-lib registry inside
``torch.onnx._internal.exporter._registration``; a one-shot import hook runs
:func:`pyseg.export.onnx_ops.register` right after that module has loaded (or at once, when it already
has). Without onnx/onnxscript installed nothing happens (the exporter itself needs them).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

TRIGGER = "torch.onnx._internal.exporter._registration"


def register_now() -> bool:
    """Register the translations; False (with a warning) when that fails."""
    try:
        from .export import onnx_ops

        onnx_ops.register()
        return True
    except ImportError:
        return False
    except Exception as e:  # never break torch.onnx itself
        warnings.warn(f"pyseg: could not register the ONNX translations of its ops: {e}", stacklevel=2)
        return False


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register_now()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TRIGGER:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if TRIGGER in sys.modules:
        register_now()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
