"""Triton kernels of pyseg, installed as ``pyseg.kernels``.

Import this package only where Triton can run: on a CUDA device, or on the CPU with
``TRITON_INTERPRET=1`` set before triton is first imported (fp32, for correctness only).
Each module holds one op's kernels and plain-tensor launchers (``forward``/``backward``);
autograd, fake kernels and validation live in ``pyseg/ops/<op>.py``.
"""
import importlib

__all__ = ["patchwise_conv2d", "meta_block", "pointwise_block", "hmsa_fuse"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
