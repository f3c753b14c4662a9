"""Reference hierarchical multi-scale attention fusion (Tao et al. 2020), eager PyTorch.

This is the public method written with ``F.interpolate`` (bilinear, align_corners=False, no
antialias); it materialises every intermediate at the 1.0-scale resolution and the final
``out_size`` logits. It is the oracle of the fused kernels and the benchmark baseline, and it is
differentiable through autograd (the fallback for configurations the fused backward does not cover).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _resize(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=False)


def hmsa_fuse(logits: Sequence[Tensor], attentions: Sequence[Optional[Tensor]], scales: Sequence[float],
              out_size, output: str = "logits", scale_sizes: Optional[Sequence] = None) -> Tensor:
    """Reference of :func:`pyseg.nn.functional.hmsa_fuse` (no validation; see there).

    With ``scale_sizes`` (one (h, w) per entry of ``scales``), every scale's logits and attention
    map are first resized bilinearly to ``scale_sizes[s]`` (no-op when equal) and materialised, as
    the public implementation does (its per-scale full-resolution logits).
    Scales are processed from the highest down. ``pred = p_top``; for a scale s >= 1 below the top,
    ``pred = a_s*p_s + (1-a_s)*D(pred)`` at s's logit resolution; for s < 1,
    ``pred = U(a_s*p_s) + (1-U(a_s))*pred`` at pred's resolution (gate before upsampling). Each
    attention map is first resized bilinearly to its own scale's logit resolution (no-op when equal).
    The result is resized to ``out_size``; ``output="labels"`` returns its argmax over classes (int64).
    """
    order = sorted(range(len(scales)), key=lambda i: -float(scales[i]))
    pred = None
    for i in order:
        p = logits[i]
        if scale_sizes is not None and tuple(p.shape[-2:]) != tuple(scale_sizes[i]):
            p = _resize(p, scale_sizes[i])
        if pred is None:
            pred = p
            continue
        a = attentions[i]
        if tuple(a.shape[-2:]) != tuple(p.shape[-2:]):
            a = _resize(a, p.shape[-2:])
        if float(scales[i]) >= 1.0:
            pred = a * p + (1 - a) * _resize(pred, p.shape[-2:])
        else:
            size = pred.shape[-2:]
            pred = _resize(a * p, size) + (1 - _resize(a, size)) * pred
    out = _resize(pred, out_size)
    if output == "labels":
        return out.argmax(1)
    return out
