"""Builds and loads the CUDA emulator: csrc/cuda's launchers and kernels compiled by the host compiler
(csrc/emu) and run on CPU tensors with CUDA's block/warp semantics; registered as ``torch.ops.pyseg_emu``.

The build is cached (``$PYSEG_EMU_BUILD_DIR``, default ``~/.cache/pyseg/cuda_emu``); ninja rebuilds what a
changed source or header touches. Used by tests/test_cuda_emulated.py and benchmarks/emulator_mutations.py.
"""
import contextlib
import functools
import os
import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
SCHEDULES = {"forward": 0, "reverse": 1, "shuffled": 2}


def build_dir() -> str:
    d = os.environ.get("PYSEG_EMU_BUILD_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pyseg", "cuda_emu")
    os.makedirs(d, exist_ok=True)
    return d


@functools.lru_cache(maxsize=None)
def ops():
    """Compile (once, cached) and load the emulator; returns ``torch.ops.pyseg_emu``."""
    from torch.utils.cpp_extension import load

    sources = sorted(str(p) for p in (ROOT / "csrc" / "emu").glob("*.cpp"))
    jobs = os.environ.get("MAX_JOBS")
    if jobs is None:
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, 8)))
    try:
        load(name="pyseg_cuda_emu", sources=sources, extra_include_paths=[str(ROOT / "csrc")],
             extra_cflags=["-O1", "-DPYSEG_CUDA_EMULATOR", "-Wno-unknown-pragmas"], build_directory=build_dir(),
             is_python_module=False, verbose=False)
    finally:
        if jobs is None:
            del os.environ["MAX_JOBS"]
    return torch.ops.pyseg_emu


def global_kernels():
    """Names of every ``__global__`` function defined in csrc/cuda."""
    names = set()
    for p in list(CUDA_DIR.glob("*.cu")) + list(CUDA_DIR.glob("*.cuh")):
        text = re.sub(r"//[^\n]*", "", p.read_text())
        names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", text))
    return names


def launched():
    """(kernel name, instantiation) of every emulated launch since the last ``clear()``."""
    out = []
    for line in ops().launched().splitlines():
        expr, pretty = line.split("|", 1)
        m = re.search(r"Kernel = (.*?)[;\]]", pretty)
        out.append((expr.split("<")[0].strip(), m.group(1) if m else expr))
    return out


def barriers(path):
    """``file:line`` of every ``__syncthreads()`` call in a csrc/cuda source."""
    p = CUDA_DIR / path
    return [f"{p.name}:{i}" for i, line in enumerate(p.read_text().splitlines(), 1)
            if "__syncthreads()" in line.split("//")[0]]


@contextlib.contextmanager
def schedule(name="forward", seed=0):
    """Run the threads of every block between barriers in this order (forward, reverse, shuffled)."""
    o = ops()
    o.set_schedule(SCHEDULES[name], seed)
    try:
        yield
    finally:
        o.set_schedule(0, 0)


@contextlib.contextmanager
def without_barrier(site):
    """Emulate a build with the ``__syncthreads()`` at ``site`` ("file.cuh:LINE") removed."""
    o = ops()
    o.disable_barrier(site)
    try:
        yield
    finally:
        o.disable_barrier("")
