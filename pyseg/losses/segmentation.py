"""Loss implementations (see the package docstring for the common conventions)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CrossEntropy", "BootstrappedCrossEntropy", "RMILoss", "bootstrapped_cross_entropy", "rmi_loss",
           "build_loss"]


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    if target.dim() != 3 or target.shape[0] != logits.shape[0] or target.shape[1:] != logits.shape[2:]:
        raise ValueError(f"target must be (B, H, W) = ({logits.shape[0]}, {logits.shape[2]}, {logits.shape[3]}) "
                         f"to match logits {tuple(logits.shape)}, got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise TypeError(f"target must be an integer tensor, got {target.dtype}")


class CrossEntropy(nn.Module):
    """Mean pixel cross-entropy over labelled pixels (``ignore_index`` excluded)."""

    def __init__(self, ignore_index: int = 255, weight: torch.Tensor | None = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits, target):
        _check(logits, target)
        target = target.long()
        if not bool((target != self.ignore_index).any()):
            return logits.sum() * 0.0
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return F.cross_entropy(logits, target, weight=self.weight, ignore_index=self.ignore_index)


def bootstrapped_cross_entropy(logits, target, k: int = 4096, thresh: float = 0.3, ignore_index: int = 255):
    """Bootstrapped (online hard-pixel mining) cross-entropy, HyperSeg's training loss.

    Per image, over its labelled pixels with per-pixel loss ``l = -log p_true``: keep every pixel whose
    probability of the true class is below ``thresh`` (``l > -log(thresh)``), and, when fewer than ``k`` pixels
    qualify, the ``k`` pixels with the largest loss instead (all labelled pixels when there are fewer than ``k``).
    The image's loss is the mean over its kept pixels; the batch loss is the mean over images that have
    labelled pixels.
    """
    _check(logits, target)
    if k < 1 or not 0.0 < thresh <= 1.0:
        raise ValueError(f"need k >= 1 and 0 < thresh <= 1, got k={k}, thresh={thresh}")
    b = logits.shape[0]
    target = target.long()
    valid = (target != ignore_index).reshape(b, -1)
    tgt = target.masked_fill(target == ignore_index, 0)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    pix = F.cross_entropy(logits, tgt, reduction="none").reshape(b, -1)
    hard = valid & (pix > -math.log(thresh))
    kk = min(k, pix.shape[1])
    ranked = pix.detach().masked_fill(~valid, float("-inf"))
    top = torch.zeros_like(valid)
    top.scatter_(1, ranked.topk(kk, dim=1).indices, True)
    use_top = hard.sum(1, keepdim=True) < k
    keep = valid & torch.where(use_top, top, hard)
    n = keep.sum(1)
    per_image = (pix * keep).sum(1) / n.clamp_min(1)
    has = n > 0
    if not bool(has.any()):
        return logits.sum() * 0.0
    return per_image[has].mean()


class BootstrappedCrossEntropy(nn.Module):
    """Module form of :func:`bootstrapped_cross_entropy` (defaults: HyperSeg's k=4096, thresh=0.3)."""

    def __init__(self, k: int = 4096, thresh: float = 0.3, ignore_index: int = 255):
        super().__init__()
        self.k, self.thresh, self.ignore_index = k, thresh, ignore_index

    def forward(self, logits, target):
        return bootstrapped_cross_entropy(logits, target, self.k, self.thresh, self.ignore_index)


def _region_vectors(x: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, radius², N): the radius×radius neighbourhood of every position whose window fits
    inside the map, row-major over the window offsets."""
    h, w = x.shape[-2:]
    nh, nw = h - radius + 1, w - radius + 1
    if nh < 1 or nw < 1:
        raise ValueError(f"RMI needs maps of at least {radius}x{radius} after pooling, got {h}x{w}")
    parts = [x[:, :, dy:dy + nh, dx:dx + nw] for dy in range(radius) for dx in range(radius)]
    return torch.stack(parts, dim=2).flatten(3)


def rmi_loss(logits, target, num_classes: int | None = None, radius: int = 3, pool_size: int = 3,
             pool_stride: int = 3, bce_weight: float = 0.5, ignore_index: int = 255, pos_alpha: float = 5e-4,
             clip_min: float = 1e-6):
    """Region Mutual Information loss (Zhao, Wang, Cai, He, 2019: "Region Mutual Information Loss for Semantic
    Segmentation").

    Per class c: Y = one-hot labels, P = sigmoid(logits) (both zeroed at ignored pixels, P + ``clip_min``),
    average-pooled by ``pool_size``/``pool_stride`` (padding pool_size//2). Each position's ``radius``×``radius``
    neighbourhood is a d = radius² vector; with centred vectors over all N positions of an image, the scatter
    matrices are Σ_Y = Y Yᵀ, Σ_P = P Pᵀ, Σ_YP = Y Pᵀ (d×d, not divided by N, as in the paper's code) and the
    posterior variance is V = Σ_Y − Σ_YP (Σ_P + αI)⁻¹ Σ_YPᵀ (α = ``pos_alpha``). The RMI term (minimising it
    maximises a lower bound of the mutual information I(Y; P)) is ½·log det(V + αI) averaged over images, divided by d and summed over classes.
    The returned loss is ``bce_weight`` · BCE + (1 − ``bce_weight``) · RMI, where BCE is the binary
    cross-entropy of the logits against the one-hot labels summed over classes and labelled pixels, divided by
    (labelled pixels + 1). The matrix algebra runs in float64.
    """
    _check(logits, target)
    b, c = logits.shape[:2]
    if num_classes is not None and num_classes != c:
        raise ValueError(f"num_classes={num_classes} but logits have {c} channels")
    target = target.long()
    valid = (target != ignore_index) & (target >= 0) & (target < c)
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(dt)
    onehot = F.one_hot(target.masked_fill(~valid, 0), c).permute(0, 3, 1, 2).to(dt)
    vmask = valid.unsqueeze(1).to(dt)
    onehot = onehot * vmask
    bce = F.binary_cross_entropy_with_logits(logits, onehot, weight=vmask.expand_as(logits), reduction="sum")
    bce = bce / (vmask.sum() + 1.0)

    probs = torch.sigmoid(logits) * vmask + clip_min
    if pool_stride > 1:
        onehot = F.avg_pool2d(onehot, pool_size, pool_stride, padding=pool_size // 2)
        probs = F.avg_pool2d(probs, pool_size, pool_stride, padding=pool_size // 2)
    y = _region_vectors(onehot, radius).double()
    p = _region_vectors(probs, radius).double()
    y = y - y.mean(dim=3, keepdim=True)
    p = p - p.mean(dim=3, keepdim=True)
    d = radius * radius
    eye = torch.eye(d, dtype=torch.float64, device=logits.device)
    cov_y = y @ y.transpose(-1, -2)
    cov_p = p @ p.transpose(-1, -2)
    cov_yp = y @ p.transpose(-1, -2)
    v = cov_y - cov_yp @ torch.linalg.solve(cov_p + pos_alpha * eye, cov_yp.transpose(-1, -2))
    chol = torch.linalg.cholesky(v + pos_alpha * eye)
    half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # = ½ log det
    rmi = (half_logdet.mean(dim=0) / d).sum().to(dt)
    return bce_weight * bce + (1.0 - bce_weight) * rmi


class RMILoss(nn.Module):
    """Module form of :func:`rmi_loss`."""

    def __init__(self, num_classes: int | None = None, radius: int = 3, pool_size: int = 3, pool_stride: int = 3,
                 bce_weight: float = 0.5, ignore_index: int = 255, pos_alpha: float = 5e-4):
        super().__init__()
        self.kw = dict(num_classes=num_classes, radius=radius, pool_size=pool_size, pool_stride=pool_stride,
                       bce_weight=bce_weight, ignore_index=ignore_index, pos_alpha=pos_alpha)

    def forward(self, logits, target):
        return rmi_loss(logits, target, **self.kw)


def build_loss(name: str, ignore_index: int = 255, num_classes: int | None = None, **kwargs) -> nn.Module:
    """``ce`` | ``bootstrap`` (kwargs k, thresh) | ``rmi`` (kwargs radius, pool_size, pool_stride, bce_weight)."""
    name = name.lower()
    if name in ("ce", "cross_entropy"):
        return CrossEntropy(ignore_index=ignore_index)
    if name in ("bootstrap", "bootstrapped_ce", "ohem"):
        return BootstrappedCrossEntropy(ignore_index=ignore_index, **kwargs)
    if name == "rmi":
        return RMILoss(num_classes=num_classes, ignore_index=ignore_index, **kwargs)
    raise ValueError(f"unknown loss {name!r}; expected ce, bootstrap or rmi")
