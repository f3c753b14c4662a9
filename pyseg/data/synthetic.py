"""A procedurally generated segmentation dataset: circles, squares and triangles on textured backgrounds.

Classes (train ids): 0 background, 1 circle, 2 square, 3 triangle. Each image has a smooth random colour
field plus pixel noise as background, and 1–5 shapes of random size, rotation (squares, triangles) and colour
(each class has a base hue, jittered), each filled with its own noisy texture; later shapes occlude earlier ones.

Layouts (``--layout``):

* ``cityscapes`` (default): ``leftImg8bit/<split>/synth/synth_<seq>_<idx>_leftImg8bit.png`` and
  ``gtFine/<split>/synth/..._gtFine_labelIds.png`` with Cityscapes labelIds 7, 8, 11, 12 (road, sidewalk,
  building, wall), which the Cityscapes lookup table maps to trainIds 0..3 — so the data reads with
  ``--dataset cityscapes`` (19-class models; the 15 absent classes are NaN in the IoU table and left out
  of the mIoU).
* ``folder``: ``classes.txt`` + ``images/<split>/*.png`` + ``masks/<split>/*.png`` (train ids), read with
  ``--dataset folder`` (4 classes).

CLI: ``python -m pyseg.data.synthetic OUT_DIR --num-train 200 --num-val 50 --size 256x512 [--seed 0]``.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

from .labels import CITYSCAPES_LABEL_IDS

__all__ = ["SYNTHETIC_CLASSES", "render_sample", "generate"]

SYNTHETIC_CLASSES = ("background", "circle", "square", "triangle")
_BASE_RGB = np.array([[0, 0, 0], [220, 60, 60], [60, 200, 60], [70, 90, 230]], dtype=np.float32)


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly, (h, w, 3)."""
    gh, gw = cells + 1, max(2, round(cells * w / max(h, 1))) + 1
    grid = rng.random((gh, gw, 3)).astype(np.float32)
    ys = np.linspace(0, gh - 1, h, dtype=np.float32)
    xs = np.linspace(0, gw - 1, w, dtype=np.float32)
    y0 = np.clip(np.floor(ys).astype(int), 0, gh - 2)
    x0 = np.clip(np.floor(xs).astype(int), 0, gw - 2)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    a = grid[y0][:, x0]
    b = grid[y0][:, x0 + 1]
    c = grid[y0 + 1][:, x0]
    d = grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _shape_mask(kind: int, yy, xx, cy, cx, r, angle) -> np.ndarray:
    if kind == 1:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    # rotate pixel coordinates into the shape frame
    ca, sa = math.cos(angle), math.sin(angle)
    u = (xx - cx) * ca + (yy - cy) * sa
    v = -(xx - cx) * sa + (yy - cy) * ca
    if kind == 2:
        half = r * 0.85
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # equilateral triangle with circumradius r: inside all three half-planes
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        t = angle * 0 + 2 * math.pi * k / 3 + math.pi / 2
        nx, ny = math.cos(t), math.sin(t)
        inside &= (u * nx + v * ny) <= r * 0.5
    return inside


def render_sample(rng: np.random.Generator, height: int, width: int, max_shapes: int = 5):
    """One (image uint8 (H, W, 3), label uint8 (H, W) with train ids 0..3) pair."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bg = _smooth_field(rng, height, width, cells=int(rng.integers(2, 6))) * 255
    img = 0.7 * bg + 0.3 * rng.random(3).astype(np.float32) * 255
    label = np.zeros((height, width), dtype=np.uint8)
    short = min(height, width)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind = int(rng.integers(1, 4))
        r = float(rng.uniform(0.08, 0.22)) * short
        cy = float(rng.uniform(0, height))
        cx = float(rng.uniform(0, width))
        m = _shape_mask(kind, yy, xx, cy, cx, r, float(rng.uniform(0, 2 * math.pi)))
        colour = np.clip(_BASE_RGB[kind] + rng.normal(0, 35, 3), 0, 255).astype(np.float32)
        tex = _smooth_field(rng, height, width, cells=8) * 60 - 30
        img[m] = colour + tex[m]
        label[m] = kind
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), label


def generate(out_dir, num_train: int = 200, num_val: int = 50, size=(256, 512), seed: int = 0,
             layout: str = "cityscapes", num_test: int = 0) -> Path:
    """Write the dataset under ``out_dir`` (see the module docstring); returns ``out_dir``."""
    if layout not in ("cityscapes", "folder"):
        raise ValueError(f"layout must be 'cityscapes' or 'folder', got {layout!r}")
    h, w = size
    out = Path(out_dir)
    lut = np.array(CITYSCAPES_LABEL_IDS[: len(SYNTHETIC_CLASSES)], dtype=np.uint8)  # trainId -> labelId
    if layout == "folder":
        out.mkdir(parents=True, exist_ok=True)
        (out / "classes.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n")
    for split_idx, (split, n) in enumerate((("train", num_train), ("val", num_val), ("test", num_test))):
        if n <= 0:
            continue
        rng = np.random.default_rng([seed, split_idx])
        if layout == "cityscapes":
            img_dir = out / "leftImg8bit" / split / "synth"
            msk_dir = out / "gtFine" / split / "synth"
        else:
            img_dir, msk_dir = out / "images" / split, out / "masks" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        msk_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, label = render_sample(rng, h, w)
            if layout == "cityscapes":
                stem = f"synth_{split_idx:06d}_{i:06d}"
                Image.fromarray(img).save(img_dir / f"{stem}_leftImg8bit.png")
                Image.fromarray(lut[label]).save(msk_dir / f"{stem}_gtFine_labelIds.png")
            else:
                Image.fromarray(img).save(img_dir / f"{i:06d}.png")
                Image.fromarray(label).save(msk_dir / f"{i:06d}.png")
    return out


def _parse_size(s: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HxW (e.g. 256x512), got {s!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {s!r}")
    return h, w


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pyseg.data.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--num-train", type=int, default=200)
    p.add_argument("--num-val", type=int, default=50)
    p.add_argument("--num-test", type=int, default=0)
    p.add_argument("--size", type=_parse_size, default=(256, 512), help="HxW (default 256x512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("cityscapes", "folder"), default="cityscapes")
    a = p.parse_args(argv)
    out = generate(a.out_dir, a.num_train, a.num_val, a.size, a.seed, a.layout, a.num_test)
    print(f"wrote {a.num_train} train / {a.num_val} val / {a.num_test} test images ({a.size[0]}x{a.size[1]}, "
          f"layout {a.layout}) to {out}")


if __name__ == "__main__":
    main()
