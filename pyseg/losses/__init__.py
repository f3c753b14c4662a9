"""Segmentation losses: cross-entropy, bootstrapped cross-entropy and Region Mutual Information (RMI).

All take ``logits`` (B, C, H, W) and ``target`` (B, H, W) int64 with ``ignore_index`` (255) for unlabelled
pixels, logits and target at the same size (the engine upsamples logits first). They return a scalar that is
0 (with a gradient path) when a batch has no labelled pixel.
"""
from .segmentation import (BootstrappedCrossEntropy, CrossEntropy, RMILoss, bootstrapped_cross_entropy,
                           build_loss, rmi_loss)

__all__ = ["CrossEntropy", "BootstrappedCrossEntropy", "RMILoss", "bootstrapped_cross_entropy", "rmi_loss",
           "build_loss"]
