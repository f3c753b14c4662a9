"""HyperSeg's dynamic decoder blocks with their BatchNorm layers: ``MetaBlock`` (v1_0, fused per patch) and
``ChainedMetaBlock`` (v0_1, three chained patch-wise convolutions); ``bn_affine``."""
from __future__ import annotations

__all__ = ["MetaBlock", "ChainedMetaBlock", "bn_affine"]

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.meta_block import implementation as meta_implementation
from ..ops.meta_block import meta_block, meta_weight_numel, normalize_meta_args, pointwise_block
from ..ops.patchwise_conv2d import patchwise_conv2d
from ..ops.reference import meta_block as _ref


def bn_affine(bn: nn.BatchNorm2d):
    """Eval-mode BatchNorm as (scale, shift)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _bn_batch_stats(bn: nn.BatchNorm2d):
    """A norm callable (see pyseg.ops.reference.meta_block.Norm) applying training-mode BatchNorm whose
    statistics are taken over the patch pixels (``center``) and applied to every value (halo included)."""

    def f(t, center, cdim):
        dims = [d for d in range(center.dim()) if d != cdim]
        mean = center.mean(dims)
        var = center.var(dims, unbiased=False)
        if bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                n = center.numel() // center.shape[cdim]
                bn.num_batches_tracked.add_(1)
                m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                unbiased = var.detach() * (n / max(n - 1, 1))
                bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), m)
                bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), m)
        shape = [1] * t.dim()
        shape[cdim] = -1
        y = (t - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + bn.eps)
        if bn.weight is not None:
            y = y * bn.weight.reshape(shape) + bn.bias.reshape(shape)
        return y

    return f


class MetaBlock(nn.Module):
    """HyperSeg decoder block with per-sample, per-patch weights from a hypernetwork.

    ``kernel_size=3``: the v1_0 inverted residual (expansion 1x1 on patch + halo -> BN -> ReLU6 -> depthwise 3x3 ->
    BN -> ReLU6 -> projection 1x1 -> BN), hid = round(expand_ratio * in_channels).
    ``kernel_size=1``: the 1x1 level (patch-wise 1x1 conv -> BN -> ReLU).

    The block owns its BatchNorm layers (shared by every patch); the dynamic weights are the
    ``weight`` argument of :meth:`forward`, flat (B, weight_numel, gh, gw).

    Each BN layer follows ``nn.BatchNorm2d``'s own rule: it normalises with batch statistics when
    *it* is in training mode (or keeps no running statistics), else with its running statistics.

    * No BN layer needs batch statistics (eval mode, or training with frozen BN layers, e.g.
      ``bn.eval()`` after ``model.train()``): BN folds into per-channel affines and the op
      (:func:`pyseg.ops.meta_block` / :func:`pyseg.ops.pointwise_block`) runs with ``backend``, forward
      and fused backward, in training as in eval; gradients reach ``x``, ``weight`` and the BN
      weight and bias (through the folded affine).
    * Some BN layer needs batch statistics: an unfused, differentiable composition (the 1x1 level:
      :func:`pyseg.ops.patchwise_conv2d` with ``backend``, then BN and ReLU). A batch statistic of the
      projection needs every value of the block's unfused output, so the fused kernel could only
      recompute it; ``backend`` is still checked (an unavailable one raises as in eval). Its BN
      statistics are computed over the patch pixels only; the public HyperSeg code computes the first
      BN's statistics over the haloed patches (patch + 1-pixel ring, counting ring pixels once per
      patch that reads them). The running statistics therefore differ slightly from the public code
      for tiny patches; the normalisation arithmetic (affine after each stage, halo included) is the
      eval path's.
    """

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: float = 2, kernel_size: int = 3,
                 backend: str = "auto", eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 1 (pointwise level) or 3 (meta block), got {kernel_size}")
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.expand_ratio = expand_ratio
        self.backend = backend
        if kernel_size == 3:
            self.hidden_channels = int(round(in_channels * expand_ratio))
            self.bn1 = nn.BatchNorm2d(self.hidden_channels, eps=eps, momentum=momentum)
            self.bn2 = nn.BatchNorm2d(self.hidden_channels, eps=eps, momentum=momentum)
            self.bn3 = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        else:
            self.hidden_channels = 0
            self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)

    @property
    def weight_numel(self) -> int:
        """Dynamic weights per patch the hypernetwork must produce."""
        if self.kernel_size == 1:
            return self.out_channels * self.in_channels
        return meta_weight_numel(self.in_channels, self.hidden_channels, self.out_channels)

    @staticmethod
    def _uses_batch_stats(bn):
        """nn.BatchNorm2d's rule: batch statistics in the layer's training mode or without running ones."""
        return bn.training or not bn.track_running_stats or bn.running_mean is None

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        if weight.dim() != 4 or weight.shape[1] != self.weight_numel:
            raise ValueError(f"weight must have shape (B, weight_numel={self.weight_numel}, gh, gw) for {self}, "
                             f"got {tuple(weight.shape)}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape (B, {self.in_channels}, H, W) for {self}, got {tuple(x.shape)}")
        if self.kernel_size == 1:
            if self._uses_batch_stats(self.bn):
                y = patchwise_conv2d(x, weight, None, backend=self.backend, kernel_size=1)
                return torch.relu(self.bn(y))
            return pointwise_block(x, weight, bn_affine(self.bn), backend=self.backend)
        if any(self._uses_batch_stats(bn) for bn in (self.bn1, self.bn2, self.bn3)):
            meta_implementation(self.backend, x.device)  # an unavailable backend raises, as in eval
            w1, w2, w3 = normalize_meta_args(x, weight, self.hidden_channels, self.out_channels)
            norms = [_bn_batch_stats(bn) if self._uses_batch_stats(bn) else _ref.affine_norm(*bn_affine(bn))
                     for bn in (self.bn1, self.bn2, self.bn3)]
            return _ref.meta_block_staged(x, w1, w2, w3, *norms)
        return meta_block(x, weight, self.hidden_channels, self.out_channels, bn_affine(self.bn1),
                          bn_affine(self.bn2), bn_affine(self.bn3), backend=self.backend)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        if self.kernel_size == 3:
            s += f", hidden_channels={self.hidden_channels}"
        return s


class ChainedMetaBlock(nn.Module):
    """The v0_1 (PASCAL VOC) dynamic inverted residual: three chained patch-wise convolutions

    expansion 1x1 (1x1, Cin -> hid) -> BN -> ReLU6 -> depthwise 3x3 (reflect padding at image borders; inside the
    image the halo reads the *neighbouring patches'* expansion 1x1 outputs) -> BN -> ReLU6 -> projection 1x1 (1x1,
    hid -> Cout) -> BN.

    Same flat weight layout as :class:`pyseg.nn.MetaBlock` ([W1 hid x Cin | W2 hid x 3 x 3 |
    W3 Cout x hid]). In eval mode every BN is folded into the per-patch weights (scale) and a per-patch
    bias (shift), so each stage is one patch-wise conv.
    """

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: float = 2, backend: str = "auto"):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.hidden_channels = int(round(in_channels * expand_ratio))
        self.backend = backend
        self.kernel_size = 3
        self.bn1 = nn.BatchNorm2d(self.hidden_channels)
        self.bn2 = nn.BatchNorm2d(self.hidden_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)

    @property
    def weight_numel(self) -> int:
        hid = self.hidden_channels
        return hid * self.in_channels + hid * 9 + self.out_channels * hid

    def _stage(self, x, w, bn, cout, k, groups, act):
        B, _, gh, gw = w.shape
        kw = dict(kernel_size=k, padding=k // 2, groups=groups, backend=self.backend,
                  padding_mode="reflect" if k > 1 else "zeros")
        if self.training or not bn.track_running_stats or bn.running_mean is None:
            y = bn(patchwise_conv2d(x, w, None, **kw))
        else:
            scale, shift = bn_affine(bn)
            per_out = w.shape[1] // cout
            w = w.view(B, cout, per_out, gh, gw) * scale.to(w.dtype).view(1, cout, 1, 1, 1)
            w = w.reshape(B, cout * per_out, gh, gw)
            bias = shift.to(w.dtype).view(1, cout, 1, 1).expand(B, cout, gh, gw)
            y = patchwise_conv2d(x, w, bias, **kw)
        return F.relu6(y) if act else y

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        if weight.dim() != 4 or weight.shape[1] != self.weight_numel:
            raise ValueError(f"weight must have shape (B, weight_numel={self.weight_numel}, gh, gw) for {self}, "
                             f"got {tuple(weight.shape)}")
        hid, cin, cout = self.hidden_channels, self.in_channels, self.out_channels
        w1, w2, w3 = torch.split(weight, [hid * cin, hid * 9, cout * hid], dim=1)
        y = self._stage(x, w1, self.bn1, hid, 1, 1, True)
        y = self._stage(y, w2, self.bn2, hid, 3, hid, True)
        return self._stage(y, w3, self.bn3, cout, 1, 1, False)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, hidden_channels={self.hidden_channels}"
