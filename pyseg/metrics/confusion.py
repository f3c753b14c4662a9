"""Confusion matrix, IoU, mIoU and pixel accuracy (Cityscapes protocol: matrix summed over the whole set)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["ConfusionMatrix", "format_iou_table"]


class ConfusionMatrix:
    """``num_classes``² int64 counts, rows = ground truth, columns = prediction, kept on ``device``.

    ``update(pred, target)`` takes label maps (any matching shape; or logits (B, C, H, W) for ``pred``, arg-maxed
    over dim 1); pixels whose target is ``ignore_index`` or outside [0, num_classes) are skipped.
    ``all_reduce()`` sums the matrix over the processes of the default group when ``torch.distributed`` is
    initialised (``compute()`` does it once, unless ``sync=False``).

    IoU_c = TP / (TP + FP + FN); classes with an empty union (never labelled and never predicted) are NaN and left
    out of the mIoU (``nanmean``). Pixel accuracy = trace / sum.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self._reduced = False

    def reset(self) -> None:
        self.mat.zero_()
        self._reduced = False

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.dim() == target.dim() + 1:
            if pred.shape[1] != self.num_classes:
                raise ValueError(f"logits have {pred.shape[1]} channels, expected num_classes={self.num_classes}")
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
        n = self.num_classes
        target = target.to(self.mat.device).reshape(-1).long()
        pred = pred.to(self.mat.device).reshape(-1).long()
        keep = (target >= 0) & (target < n) & (target != self.ignore_index)
        if pred.numel():
            bad = keep & ((pred < 0) | (pred >= n))
            if bool(bad.any()):
                raise ValueError(f"predictions must be in [0, {n}), got values outside")
        idx = target[keep] * n + pred[keep]
        self.mat += torch.bincount(idx, minlength=n * n).reshape(n, n)
        self._reduced = False

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)
        self._reduced = True

    def compute(self, sync: bool = True) -> dict:
        """``{"miou", "pixel_acc", "mean_acc", "iou": [per class, NaN = absent], "acc": [...], "pixels"}``."""
        if sync and not self._reduced:
            self.all_reduce()
        m = self.mat.double()
        tp = m.diag()
        gt = m.sum(1)
        pr = m.sum(0)
        union = gt + pr - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, float("nan")))
        total = m.sum()
        present = ~torch.isnan(iou)
        miou = float(iou[present].mean()) if bool(present.any()) else float("nan")
        macc = float(acc[~torch.isnan(acc)].mean()) if bool((~torch.isnan(acc)).any()) else float("nan")
        return {
            "miou": miou,
            "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
            "mean_acc": macc,
            "iou": iou.tolist(),
            "acc": acc.tolist(),
            "pixels": int(total),
        }


def format_iou_table(result: dict, class_names: Sequence[str] | None = None) -> str:
    """A plain-text per-class table (IoU and accuracy in %) ending with the mIoU and pixel accuracy."""
    iou, acc = result["iou"], result["acc"]
    names = list(class_names) if class_names else [str(i) for i in range(len(iou))]
    if len(names) < len(iou):
        names += [str(i) for i in range(len(names), len(iou))]
    w = max(8, max(len(n) for n in names))

    def pct(v):
        return "   n/a" if v != v else f"{100 * v:6.2f}"

    lines = [f"{'class':<{w}}  {'IoU':>6}  {'Acc':>6}", "-" * (w + 16)]
    for n, i, a in zip(names, iou, acc):
        lines.append(f"{n:<{w}}  {pct(i)}  {pct(a)}")
    lines.append("-" * (w + 16))
    lines.append(f"{'mIoU':<{w}}  {pct(result['miou'])}")
    lines.append(f"{'pixel acc':<{w}}  {pct(result['pixel_acc'])}")
    return "\n".join(lines)
