"""Backend names, availability and the ``backend="auto"`` choice shared by every op."""
from __future__ import annotations

import torch

from . import _extension

#: Every backend name an op accepts.
BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


def backends() -> dict:
    """Which backends this install can run, with the reason when one cannot.

    Returns a dict ``{name: {"available": bool, "detail": str}}`` for
    ``reference`` (pure PyTorch, always), ``cpu`` (C++ kernels), ``cuda`` (CUDA kernels,
    compiled and a device visible) and ``triton``.
    """
    out = {"reference": {"available": True, "detail": f"PyTorch {torch.__version__}"}}
    if _extension.HAS_C:
        out["cpu"] = {"available": True, "detail": "pyseg._C C++ kernels"}
    else:
        out["cpu"] = {"available": False, "detail": f"pyseg._C not importable: {_extension._C_ERROR}"}
    cuda_compiled = _extension.has_kernel("patchwise_conv2d", "CUDA")
    if not cuda_compiled:
        detail = "pyseg._C was built without CUDA kernels" if _extension.HAS_C else "pyseg._C not built"
        out["cuda"] = {"available": False, "detail": detail}
    elif not torch.cuda.is_available():
        out["cuda"] = {"available": False, "detail": "CUDA kernels compiled, but no CUDA device visible"}
    else:
        out["cuda"] = {"available": True, "detail": torch.cuda.get_device_name()}
    if _extension.triton_kernels() is None:
        out["triton"] = {"available": False, "detail": f"triton not importable: {_extension._TRITON_ERROR}"}
    elif torch.cuda.is_available():
        out["triton"] = {"available": True, "detail": "GPU"}
    elif _extension.triton_interpreted():
        out["triton"] = {"available": True, "detail": "interpreter (TRITON_INTERPRET=1), CPU tensors, slow"}
    else:
        out["triton"] = {"available": False,
                         "detail": "no GPU; set TRITON_INTERPRET=1 before importing triton to interpret"}
    return out


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Turn a user's ``backend`` into one of reference/cpu/cuda/triton for tensors on ``device``.

    ``auto`` picks the compiled kernel for the device when there is one (C++ on CPU, CUDA on GPU),
    then Triton on GPU, then the reference. Asking for a backend that cannot run raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu" and _extension.has_kernel(op, "CPU"):
            return "cpu"
        if device.type == "cuda" and _extension.has_kernel(op, "CUDA"):
            return "cuda"
        if device.type == "cuda" and _extension.triton_usable(device):
            return "triton"
        return "reference"
    if backend == "reference":
        return backend
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise ValueError(f"backend={backend!r} needs {backend} tensors, got tensors on {device}")
        if not _extension.has_kernel(op, backend.upper()):
            raise RuntimeError(
                f"backend={backend!r} is not available for pyseg op {op!r}: "
                f"{backends()[backend]['detail']}"
            )
        return backend
    # triton
    if not _extension.triton_usable(device):
        raise RuntimeError(
            f"backend='triton' cannot run on {device}: {backends()['triton']['detail']}"
        )
    return backend
