"""Evaluation loop: confusion matrix over a data loader, summed over DDP ranks."""
from __future__ import annotations

import contextlib

import torch

from ..metrics import ConfusionMatrix
from .distributed import is_main
from .inference import configure_scales, predict_labels
from .memory import PeakMemory
from .progress import progress as progress_bar

__all__ = ["evaluate", "autocast_context"]


def autocast_context(device: torch.device, amp: str | None):
    """``torch.autocast`` for ``amp`` in {None, "none", "bf16", "fp16"}; fp16 needs CUDA."""
    if amp in (None, "none", "fp32"):
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        raise ValueError(f"amp must be none, bf16 or fp16, got {amp!r}")
    if dtype is torch.float16 and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use --amp bf16 on the CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, loader, num_classes: int, device, amp: str | None = None, flip: bool = False, scales=None,
             size_divisor: int = 1, ignore_index: int = 255, progress="auto", desc: str = "eval",
             track_memory: bool = False) -> dict:
    """mIoU etc. (see :meth:`ConfusionMatrix.compute`) of ``model`` over ``loader`` (batches of (image, mask)).

    Labels come from :func:`~pyseg.engine.inference.predict_labels`: multi-scale attention models fuse their
    ``scales`` (and argmax) in one kernel, scale after scale, so memory does not grow with full-resolution
    per-scale logits. ``track_memory``: also return ``peak_memory_mb``, the largest tensor memory one batch's
    prediction allocated above its input, and ``memory_method`` (:class:`~pyseg.engine.memory.PeakMemory`).

    Under DDP each rank sees its shard (use :class:`~pyseg.engine.distributed.ShardSampler`) and the matrices
    are all-reduced, so every rank returns the whole set's metrics. ``progress``: a mode of
    :func:`pyseg.engine.progress.progress` (``auto``, ``bar``, ``log``, ``none``) or a bool.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    native = configure_scales(model, scales)
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    peak = PeakMemory(device)
    it = progress_bar(loader, desc=desc, mode=progress, enabled=is_main())
    for image, mask in it:
        image = image.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True)
        with autocast_context(device, amp), (peak if track_memory else contextlib.nullcontext()):
            labels = predict_labels(model, image, flip=flip, scales=scales, size_divisor=size_divisor,
                                    native_scales=native)
        cm.update(labels, mask)
    model.train(was_training)
    res = cm.compute()
    if track_memory:
        res.update(peak_memory_mb=peak.peak_mb, memory_method=peak.method)
    return res
