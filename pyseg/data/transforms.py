"""Joint image/mask augmentation built on ``torchvision.transforms.v2``.

Images are ``tv_tensors.Image`` (uint8 until ``ToDtype``), masks ``tv_tensors.Mask``: geometric transforms move
both (masks resized with nearest neighbour), photometric ones touch only the image. The output of both factories
is ``(image float32 3×H×W normalised, mask int64 H×W)``.
"""
from __future__ import annotations

import random
from typing import Any, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .labels import IGNORE_INDEX

__all__ = ["RandomScale", "PadToMultiple", "build_train_transform", "build_eval_transform",
           "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomScale(v2.Transform):
    """With probability ``p`` resize by a factor drawn uniformly from ``scale_range`` (image bilinear with
    antialiasing, mask nearest)."""

    def __init__(self, scale_range: Sequence[float] = (0.5, 2.0), p: float = 1.0):
        super().__init__()
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {scale_range}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.scale_range, self.p = (lo, hi), p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        if torch.rand(()) >= self.p:
            return {"size": None}
        s = self.scale_range[0] + float(torch.rand(())) * (self.scale_range[1] - self.scale_range[0])
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["size"] is None:
            return inpt
        return self._call_kernel(TF.resize, inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR,
                                 antialias=True)


class PadToMultiple(v2.Transform):
    """Pad right/bottom so that height and width are multiples of ``divisor`` (image 0, mask 255)."""

    def __init__(self, divisor: int):
        super().__init__()
        self.divisor = int(divisor)

    def make_params(self, flat_inputs):
        h, w = v2.query_size(flat_inputs)
        d = self.divisor
        return {"padding": [0, 0, (-w) % d, (-h) % d]}

    def transform(self, inpt, params):
        if not any(params["padding"]):
            return inpt
        fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else 0
        return self._call_kernel(TF.pad, inpt, params["padding"], fill=fill)


class _MaskToLong(v2.Transform):
    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            return inpt.to(torch.int64)
        return inpt


class _Joint:
    """Wrap a v2 pipeline as ``f(image, mask) -> (image, mask)`` (picklable for DataLoader workers)."""

    def __init__(self, pipeline: v2.Compose):
        self.pipeline = pipeline

    def __call__(self, image, mask):
        if not isinstance(image, tv_tensors.Image):
            image = tv_tensors.Image(image)
        if not isinstance(mask, tv_tensors.Mask):
            mask = tv_tensors.Mask(mask)
        image, mask = self.pipeline(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)

    def __repr__(self):
        return f"_Joint({self.pipeline})"


def _pair(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def build_train_transform(crop_size=None, scale_range=(0.25, 2.0), scale_p: float = 0.5, hflip: float = 0.5,
                          color_jitter: float = 0.0, noise_std: float = 0.0, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, contrast: float = 0.0):
    """Training pipeline: random resize (``scale_range`` with probability ``scale_p``) → random crop
    ``crop_size`` (H, W) padded where needed with 0 (image) / 255 (mask) → horizontal flip (probability
    ``hflip``) → brightness/contrast/saturation jitter of strength ``color_jitter`` (0 = off) → contrast change
    by a factor drawn from [1 − ``contrast``, 1 + ``contrast``] (0 = off) → float → Gaussian noise of std
    ``noise_std`` in [0, 1] units (0 = off) → normalisation (ImageNet by default). Random crop, contrast,
    Gaussian noise and horizontal flip are the HMSA slides' augmentations."""
    for name, v in (("hflip", hflip), ("scale_p", scale_p)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} is a probability and must be in [0, 1], got {v}")
    for name, v in (("color_jitter", color_jitter), ("contrast", contrast), ("noise_std", noise_std)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if contrast >= 1:
        raise ValueError(f"contrast must be < 1 (factors in [1 - contrast, 1 + contrast]), got {contrast}")
    t: list = []
    if scale_p > 0 and tuple(scale_range) != (1.0, 1.0):
        t.append(RandomScale(scale_range, p=scale_p))
    crop = _pair(crop_size)
    if crop is not None:
        t.append(v2.RandomCrop(crop, pad_if_needed=True,
                               fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}))
    if hflip > 0:
        t.append(v2.RandomHorizontalFlip(p=hflip))
    if color_jitter > 0:
        t.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    if contrast > 0:
        t.append(v2.ColorJitter(contrast=contrast))
    t.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
    if noise_std > 0:
        t.append(v2.GaussianNoise(mean=0.0, sigma=noise_std, clip=True))
    t.append(v2.Normalize(mean=list(mean), std=list(std)))
    t.append(_MaskToLong())
    return _Joint(v2.Compose(t))


def build_eval_transform(size=None, size_divisor: int = 1, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Evaluation pipeline: optional resize to ``size`` (H, W), optional padding to a multiple of
    ``size_divisor`` (ignored label 255 in the padding, so metrics are unaffected), float, normalisation."""
    t: list = []
    if size is not None:
        t.append(v2.Resize(_pair(size), antialias=True))
    if size_divisor > 1:
        t.append(PadToMultiple(size_divisor))
    t.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
    t.append(v2.Normalize(mean=list(mean), std=list(std)))
    t.append(_MaskToLong())
    return _Joint(v2.Compose(t))


def seed_worker(worker_id: int) -> None:  # pragma: no cover - runs in DataLoader workers
    """DataLoader ``worker_init_fn``: seed Python's and NumPy's RNGs from the worker's torch seed."""
    import numpy as np

    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)
