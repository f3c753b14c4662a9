"""Model output handling and test-time augmentation.

Models only return logits: ``forward(x)`` may give a tensor (B, C, H', W'), a dict (``"out"`` or its first
value) or a tuple/list (first element). Logits at a different size are upsampled bilinearly
(``align_corners=False``) to the label/image size.

Multi-scale inference (``scales``) is generic:

1. if the model has a callable ``set_scales(scales)`` (e.g. a hierarchical multi-scale attention model that
   fuses its scales itself), it is called and the model runs once per flip;
2. elif it has a non-callable attribute ``scales``, that attribute is set to the list and the model runs once;
3. otherwise the input is resized by each factor (bilinear, sizes rounded to ``size_divisor``), the model runs
   per scale, and the softmax probabilities, upsampled to the input size, are averaged (with their flips).

With flip TTA the prediction for the horizontally flipped input is flipped back and averaged with the plain one.
``size_divisor`` pads inputs (bottom/right, zeros) to a multiple before the forward pass and crops the output.

Labels (:func:`predict_labels`, what evaluation uses): a model with a ``predict(x, output="labels")`` method
(hierarchical multi-scale attention) gives its argmax labels straight from the fused kernel, so without flip no
full-resolution logits exist at all, for any number of scales (the scales run one after the other; only their
native-resolution outputs are kept). With flip the two fused logit maps are needed (their softmax probabilities
are averaged): a fixed number of full-resolution maps, whatever the number of scales. Other models take the
argmax of :func:`predict_scores`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .checkpoint import unwrap

__all__ = ["extract_logits", "forward_logits", "configure_scales", "predict_scores", "predict_probabilities",
           "predict_labels"]


def extract_logits(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["out"] if "out" in out else next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"model output must be a tensor, dict or tuple of tensors, got {type(out).__name__}")


def _resize(logits: torch.Tensor, size) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def forward_logits(model, x: torch.Tensor, size=None, size_divisor: int = 1) -> torch.Tensor:
    """Run ``model`` on ``x`` (padded to ``size_divisor``), return logits resized to ``size`` (default x's)."""
    h, w = x.shape[-2:]
    size = (h, w) if size is None else size
    pad_h, pad_w = (-h) % size_divisor, (-w) % size_divisor
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    logits = extract_logits(model(x))
    if pad_h or pad_w:
        # crop the part of the output that covers the unpadded input
        oh, ow = logits.shape[-2:]
        logits = logits[..., : max(1, round(oh * h / (h + pad_h))), : max(1, round(ow * w / (w + pad_w)))]
    return _resize(logits, size)


def configure_scales(model, scales: Sequence[float] | None) -> bool:
    """Hand ``scales`` to a model that fuses scales itself; True if it took them (see the module docstring)."""
    if not scales:
        return False
    m = unwrap(model)
    if callable(getattr(m, "set_scales", None)):
        m.set_scales(list(scales))
        return True
    if hasattr(m, "scales") and not callable(getattr(m, "scales")):
        m.scales = list(scales)
        return True
    return False


@torch.no_grad()
def predict_scores(model, x: torch.Tensor, flip: bool = False, scales: Sequence[float] | None = None,
                   size_divisor: int = 1, native_scales: bool | None = None) -> torch.Tensor:
    """Class scores (B, C, H, W) at ``x``'s size; argmax gives the labels. Without TTA these are the logits, with
    flip or generic multi-scale TTA the mean softmax probabilities. ``native_scales``: whether the model already
    took ``scales`` through :func:`configure_scales` (default: ask it now)."""
    h, w = x.shape[-2:]
    if native_scales is None:
        native_scales = configure_scales(model, scales)
    run_scales = [1.0] if (not scales or native_scales) else list(scales)
    if run_scales == [1.0] and not flip:
        return forward_logits(model, x, (h, w), size_divisor)
    acc = None
    for s in run_scales:
        if s == 1.0:
            xs = x
        else:
            sh, sw = max(1, round(h * s)), max(1, round(w * s))
            xs = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False)
        inputs = [(xs, False)] + ([(xs.flip(-1), True)] if flip else [])
        for xi, flipped in inputs:
            p = forward_logits(model, xi, (h, w), size_divisor).float().softmax(1)
            if flipped:
                p = p.flip(-1)
            acc = p if acc is None else acc + p
    return acc / (len(run_scales) * (2 if flip else 1))


@torch.no_grad()
def predict_probabilities(model, x: torch.Tensor, flip: bool = False, scales: Sequence[float] | None = None,
                          size_divisor: int = 1, native_scales: bool | None = None) -> torch.Tensor:
    """Class probabilities (B, C, H, W), float32, at ``x``'s size: the softmax of :func:`predict_scores`'s logits,
    or its mean probabilities under test-time augmentation (flip, generic multi-scale)."""
    if native_scales is None:
        native_scales = configure_scales(model, scales)
    scores = predict_scores(model, x, flip=flip, scales=scales, size_divisor=size_divisor,
                            native_scales=native_scales)
    tta = flip or (bool(scales) and not native_scales and list(scales) != [1.0])
    return scores.float() if tta else scores.float().softmax(1)


@torch.no_grad()
def predict_labels(model, x: torch.Tensor, flip: bool = False, scales: Sequence[float] | None = None,
                   size_divisor: int = 1, native_scales: bool | None = None) -> torch.Tensor:
    """Labels (B, H, W) int64 at ``x``'s size; through the model's fused ``predict(x, output="labels")`` when it
    has one and no flip is asked (see the module docstring), else the argmax of :func:`predict_scores`."""
    if native_scales is None:
        native_scales = configure_scales(model, scales)
    m = unwrap(model)
    if flip or not callable(getattr(m, "predict", None)) or (scales and not native_scales):
        return predict_scores(model, x, flip=flip, scales=scales, size_divisor=size_divisor,
                              native_scales=native_scales).argmax(1)
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % size_divisor, (-w) % size_divisor
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return m.predict(x, output="labels")[..., :h, :w]
