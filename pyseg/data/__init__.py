"""Datasets, joint transforms and a synthetic dataset generator."""
from .datasets import (DATASETS, CamVidDataset, CityscapesDataset, DatasetError, FolderDataset,
                       SegmentationDataset, VOCDataset, build_dataset, read_image, read_mask)
from .labels import IGNORE_INDEX, get_palette
from .transforms import PadToMultiple, RandomScale, build_eval_transform, build_train_transform

__all__ = [
    "DATASETS", "CamVidDataset", "CityscapesDataset", "DatasetError", "FolderDataset", "SegmentationDataset",
    "VOCDataset", "build_dataset", "read_image", "read_mask", "IGNORE_INDEX", "get_palette",
    "build_eval_transform", "build_train_transform", "RandomScale", "PadToMultiple",
]
