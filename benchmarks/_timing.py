"""Timing utilities shared by pyseg's benchmarks.

* :func:`time_fn` -- median / p90 wall time of a callable on CPU (time.perf_counter) or CUDA
  (CUDA events), after warm-up, synchronising around every timed call on CUDA.
* :func:`copy_bandwidth` -- measured device-to-device copy bandwidth (GB/s) of a large tensor,
  the practical roofline for memory-bound kernels.
* :func:`env_info` -- torch/triton versions, device name, thread count, git commit.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device="cpu", warmup: int = 3, iters: int = 20,
            min_time_s: float = 0.0) -> Dict[str, float]:
    """Time ``fn()``; returns ``{"median_ms", "p90_ms", "min_ms", "iters"}``.

    CPU: time.perf_counter around each call. CUDA: a pair of CUDA events per call, synchronised
    before and after. ``min_time_s`` keeps timing (beyond ``iters``) until that much time is spent.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    t_start = time.perf_counter()
    while len(times) < iters or (time.perf_counter() - t_start) < min_time_s:
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) > 100 * max(iters, 1):
            break
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
        "min_ms": times[0],
        "iters": len(times),
    }


def copy_bandwidth(device="cuda", nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Achieved bandwidth (GB/s, counting read + write) of ``dst.copy_(src)`` for ``nbytes``-byte
    tensors on ``device``."""
    device = torch.device(device)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, iters=iters)
    del src, dst
    return 2 * n * 4 / (t["median_ms"] * 1e-3) / 1e9


def git_commit(path: str | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path or os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info(device="cpu") -> dict:
    device = torch.device(device)
    info = {
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        cap = torch.cuda.get_device_capability(device)
        info["capability"] = f"{cap[0]}.{cap[1]}"
    else:
        info["device_name"] = info["cpu"]
    try:
        import pyseg

        info["pyseg"] = pyseg.__version__
        info["backends"] = {k: v["available"] for k, v in pyseg.backends().items()}
    except Exception:  # pragma: no cover - benchmarks also run without pyseg importable
        pass
    return info
