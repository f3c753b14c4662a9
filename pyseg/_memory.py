"""Large CPU buffers that are written in full right after allocation.

The Python counterpart of ``csrc/cpu/output_alloc.h``: glibc serves large requests with fresh
``mmap``s, so such a buffer is page-faulted in 4 KiB at a time on every call, which costs
microseconds per fault on virtual machines. Where transparent huge pages are available in
``madvise`` mode, the buffer's whole 2 MiB pages are advised with ``MADV_HUGEPAGE`` first (one
fault per 2 MiB). Advice only: contents and semantics are those of ``torch.empty``, and on other
platforms, or when the kernel refuses, nothing changes. ``PYSEG_HUGE_PAGES=0`` in the environment
turns the advice off (here and in the compiled kernels).
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch

__all__ = ["empty_for_write"]

_MADV_HUGEPAGE = 14  # Linux, every architecture
_HUGE_PAGE = 2 << 20
#: smaller buffers are allocated as they are (the advice would not cover a whole huge page)
MIN_BYTES = 4 << 20


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def empty_for_write(*size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(size)``, with large CPU buffers advised to use transparent huge pages."""
    out = torch.empty(size, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if (_madvise is not None and out.device.type == "cpu" and nbytes >= MIN_BYTES
            and os.environ.get("PYSEG_HUGE_PAGES", "1") != "0"):
        begin = out.data_ptr()
        first = -(-begin // _HUGE_PAGE) * _HUGE_PAGE
        last = (begin + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if last > first:
            _madvise(first, last - first, _MADV_HUGEPAGE)  # advice: the result is not needed
    return out
