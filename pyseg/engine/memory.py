"""Peak memory of a region of code, as ``pyseg-eval`` reports it.

``with PeakMemory(device) as pm: ...`` then ``pm.peak_bytes`` is the largest amount of tensor memory that was
allocated inside the region and alive at one time (memory that existed before the region, such as the model and
its input, is not counted):

* CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocated memory at entry (the caching allocator's exact
  figure, every allocation on that device included);
* CPU (torch has no CPU allocator statistics): every tensor storage an operator returns inside the region is
  counted from its creation until it is freed (a ``TorchDispatchMode``; views share their storage's count). This
  is deterministic and independent of the process' history — unlike the resident set size, which depends on what
  the allocator kept from earlier work — but it does not see scratch buffers a kernel allocates and frees
  internally. ``method`` names which of the two was used.

Regions may be entered repeatedly (``pm.peak_bytes`` is the maximum over them), not nested.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["PeakMemory"]


class _StorageTracker(TorchDispatchMode):
    """Counts the bytes of the CPU storages operators return while active, until each is freed."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int, nbytes: int) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self.live:
                continue
            nbytes = storage.nbytes()
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


class PeakMemory:
    """Context manager measuring the peak tensor memory a region allocates on ``device`` (module docstring)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._tracker = None
        self._base = 0

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return "tensor storages allocated by operators (CPU)"

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker = _StorageTracker()
            self._tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._tracker.__exit__(*exc)
            peak = self._tracker.peak
            self._tracker = None
        self.peak_bytes = max(self.peak_bytes, int(peak))
