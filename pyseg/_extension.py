"""Loading of the compiled extension (``pyseg._C``) and the Triton kernels (``pyseg.kernels``).

Both are optional: without them pyseg runs on its pure-PyTorch reference backend.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings

import torch

_C_ERROR: str | None = None
try:
    importlib.import_module("pyseg._C")  # registers torch.ops.pyseg.*

    HAS_C = True
except ImportError as e:  # not built, or built against another torch
    HAS_C = False
    _C_ERROR = str(e)


#: (op, dispatch key) pairs registered from Python (the Triton variant standing in for a missing compiled
#: CUDA kernel, see pyseg/ops/_library.py): not compiled kernels.
PYTHON_KERNELS: set = set()


@torch.compiler.assume_constant_result  # registrations do not change while running; lets dynamo trace it
def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``torch.ops.pyseg.<op>`` has a compiled kernel for ``dispatch_key``."""
    if not HAS_C or (op, dispatch_key) in PYTHON_KERNELS:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"pyseg::{op}", dispatch_key)
    except RuntimeError:
        return False


def _load_kernels_package():
    """Import ``pyseg.kernels``; in a source checkout it lives in the top-level ``kernels/``."""
    try:
        return importlib.import_module("pyseg.kernels")
    except ModuleNotFoundError:
        pass
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(src, "__init__.py")
    if not os.path.isfile(init):
        raise ModuleNotFoundError("pyseg.kernels is not installed")
    spec = importlib.util.spec_from_file_location("pyseg.kernels", init, submodule_search_locations=[src])
    module = importlib.util.module_from_spec(spec)
    sys.modules["pyseg.kernels"] = module
    spec.loader.exec_module(module)
    return module


_TRITON = None
_TRITON_ERROR: str | None = None


def triton_kernels():
    """The ``pyseg.kernels`` package if Triton can run here (a GPU, or TRITON_INTERPRET=1), else None."""
    global _TRITON, _TRITON_ERROR
    if _TRITON is None and _TRITON_ERROR is None:
        try:
            import triton  # noqa: F401

            _TRITON = _load_kernels_package()
        except Exception as e:  # ImportError, or a broken triton install
            _TRITON_ERROR = f"{type(e).__name__}: {e}"
            if not isinstance(e, ImportError):
                warnings.warn(f"pyseg: Triton kernels unavailable: {_TRITON_ERROR}")
    return _TRITON


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if triton_kernels() is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and triton_interpreted()
