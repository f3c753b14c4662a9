"""Training samplers: mixing datasets at set weights (labelled + pseudo-labelled data) and class-uniform sampling.

:class:`WeightedEpochSampler` draws each epoch's indices (with replacement) from per-sample weights, with a
generator seeded by ``(seed, epoch)`` only — so a resumed run draws the same epochs — and hands every process
of a distributed run its own share of the draws. :func:`mixing_weights` builds the weights:

* **sources** (``ConcatDataset`` parts, e.g. the labelled set and ``--extra-data``) get the share of the draws
  given by ``source_weights`` (normalised), uniformly over each source's samples;
* **class-uniform sampling** (``class_uniform=p``, as HMSA's training uses it): within each source, a share
  ``p`` of its draws picks a class uniformly among the classes present in the source, then an image containing
  that class uniformly; the other ``1 − p`` are uniform over the source's images. Rare classes are then seen as
  often as common ones. :func:`class_presence` reads which classes each image contains (the masks only).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .datasets import read_mask

__all__ = ["WeightedEpochSampler", "mixing_weights", "class_presence"]


def class_presence(dataset, num_classes: int) -> np.ndarray:
    """(len(dataset), num_classes) bool: which train ids each sample's mask holds (masks read from
    ``dataset.samples``, mapped with ``dataset.map_labels``; images are not read)."""
    out = np.zeros((len(dataset), num_classes), dtype=bool)
    for i, (_, mask_path) in enumerate(dataset.samples):
        ids = np.unique(dataset.map_labels(read_mask(mask_path)))
        ids = ids[(ids >= 0) & (ids < num_classes)]
        out[i, ids] = True
    return out


def mixing_weights(sizes: Sequence[int], source_weights: Sequence[float] | None = None,
                   class_uniform: float = 0.0, presence: Sequence[np.ndarray] | None = None) -> torch.Tensor:
    """Per-sample draw probabilities (float64, summing to 1) over the concatenation of sources of ``sizes``.

    ``source_weights``: relative share of each source (default: in proportion to its size, i.e. uniform over
    all samples). ``class_uniform``: share of each source's draws made class-uniformly, which needs
    ``presence`` (one :func:`class_presence` array per source).
    """
    sizes = [int(n) for n in sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"every source needs at least one sample, got sizes {sizes}")
    if source_weights is None:
        source_weights = sizes
    if len(source_weights) != len(sizes):
        raise ValueError(f"{len(source_weights)} source weights for {len(sizes)} sources")
    if min(source_weights) < 0 or sum(source_weights) <= 0:
        raise ValueError(f"source weights must be >= 0 and not all 0, got {list(source_weights)}")
    if not 0.0 <= class_uniform <= 1.0:
        raise ValueError(f"class_uniform must be in [0, 1], got {class_uniform}")
    if class_uniform > 0 and (presence is None or len(presence) != len(sizes)):
        raise ValueError("class_uniform > 0 needs the class presence of every source")
    total = float(sum(source_weights))
    parts = []
    for k, n in enumerate(sizes):
        w = np.full(n, (1.0 - class_uniform) / n)
        if class_uniform > 0:
            pres = np.asarray(presence[k], dtype=np.float64)
            if pres.shape[0] != n:
                raise ValueError(f"presence of source {k} has {pres.shape[0]} rows, the source {n} samples")
            per_class = pres.sum(0)
            present = per_class > 0
            if not present.any():  # no labelled pixel at all: uniform
                w += class_uniform / n
            else:
                w += class_uniform / present.sum() * (pres[:, present] / per_class[present]).sum(1)
        parts.append(w * (source_weights[k] / total))
    p = np.concatenate(parts)
    return torch.from_numpy(p / p.sum())


class WeightedEpochSampler(torch.utils.data.Sampler):
    """``num_samples`` draws per epoch (with replacement) from ``weights``, split among ``num_replicas``
    processes (this one takes every ``num_replicas``-th draw from ``rank``); call :meth:`set_epoch` each epoch,
    as with ``DistributedSampler``. The draws depend only on ``seed`` and the epoch."""

    def __init__(self, weights: torch.Tensor, num_samples: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.dim() != 1 or weights.numel() == 0 or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("weights must be a non-empty 1-D tensor of non-negative numbers, not all 0")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.weights, self.seed, self.epoch = weights, int(seed), 0
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.per_replica = math.ceil(num_samples / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.per_replica

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        draws = torch.multinomial(self.weights, self.per_replica * self.num_replicas, replacement=True, generator=g)
        return iter(draws[self.rank::self.num_replicas].tolist())
