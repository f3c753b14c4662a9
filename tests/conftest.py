"""Shared test configuration.

* Triton runs under its interpreter when there is no GPU: TRITON_INTERPRET=1 must be set before
  triton is imported, so it is set here, first. On a GPU the tests run fixed configurations
  (PYSEG_TRITON_AUTOTUNE=0: the first configuration autotune pruning keeps, no benchmarking).
* ``devices`` / ``DEVICES``: tests parametrised over cpu and cuda; cuda is skipped centrally (with a
  reason, never a silent pass) when no GPU is visible.
* ``backends_for(device)``: every backend that can run on that device, for op tests.
"""
import os

import pytest

try:
    import torch

    _HAS_GPU = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_GPU = False
if not _HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PYSEG_TRITON_AUTOTUNE", "0")

import torch  # noqa: E402

import pyseg  # noqa: E402

CUDA_OK = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_OK, reason="no CUDA device visible")),
]


def backends_for(device: str, op: str = "patchwise_conv2d"):
    """Backends to test on ``device``: compiled (cpu/cuda), triton, reference; unavailable ones skip."""
    from pyseg import _extension

    out = []
    if device == "cpu":
        out.append(pytest.param("cpu", marks=pytest.mark.skipif(
            not _extension.has_kernel(op, "CPU"), reason="pyseg._C CPU kernel not built")))
    else:
        out.append(pytest.param("cuda", marks=pytest.mark.skipif(
            not (CUDA_OK and _extension.has_kernel(op, "CUDA")), reason="CUDA kernel not built or no GPU")))
    out.append(pytest.param("triton", marks=pytest.mark.skipif(
        not _extension.triton_usable(torch.device(device)), reason="triton cannot run here")))
    out.append("reference")
    return out


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    b = pyseg.backends()
    return "pyseg backends: " + ", ".join(f"{k}={'yes' if v['available'] else 'no'}" for k, v in b.items())
