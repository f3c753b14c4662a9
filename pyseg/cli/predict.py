"""``pyseg-predict``: segment an image or every image of a folder; write colour masks and overlays (PNG).

    pyseg-predict --checkpoint runs/x/best.safetensors --input street.png --output out/ [--palette cityscapes]

For each input ``<name>.<ext>`` it writes ``<name>_mask.png`` (class colours), ``<name>_overlay.png`` (the image
blended with the colours, ``--alpha``) and, with ``--save-labels``, ``<name>_labels.png`` (class indices).
``--scales 0.5,1,2`` and ``--flip``: test-time augmentation (multi-scale attention models fuse the scales).
``--dump-attention`` (multi-scale attention models) also writes ``<name>_attention_<s>.png``: scale s's attention
map a_s at the input size, 0..255 for 0..1, for every scale below the top (whose attention the fusion never uses).

Auto-labelling (``--pseudo-labels OUT``, with or without ``--output``)::

    pyseg-predict --checkpoint best.safetensors --input unlabelled/ --pseudo-labels pseudo/ --threshold 0.9 \
        --scales 0.5,1,2 --flip

writes a dataset in the generic folder layout that ``pyseg-train --extra-data folder:pseudo/`` reads:
``OUT/images/<name>`` (a copy of the input), ``OUT/masks/<stem>.png`` (the predicted class where the top softmax
probability is at least ``--threshold``, 255 = ignore elsewhere), ``OUT/classes.txt`` and ``OUT/pseudo_labels.json``
(per image the labelled fraction and the share of each class; per class the predicted pixels, the labelled ones
and their fraction). The probability is the model's softmax (with flip or generic multi-scale averaging: the mean
of the softmax outputs).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ._common import (CommandError, add_model_args, add_runtime_args, apply_threads, console_main, float_list,
                      key_values, probability_threshold, size_hw)


def build_parser():
    p = argparse.ArgumentParser(prog="pyseg-predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    add_model_args(p, required=False)
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", default=None, help="output folder of the masks and overlays (required unless "
                   "--pseudo-labels is given)")
    p.add_argument("--palette", default="cityscapes", help="cityscapes | camvid | voc | random")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colour mask")
    p.add_argument("--resize", type=size_hw, default=None, metavar="HxW", help="run at this size (output is "
                   "resized back to the input size)")
    p.add_argument("--size-divisor", type=int, default=1)
    p.add_argument("--flip", action="store_true")
    p.add_argument("--scales", type=float_list, default=None)
    p.add_argument("--save-labels", action="store_true")
    p.add_argument("--dump-attention", action="store_true",
                   help="multi-scale attention models: write each scale's attention map as <name>_attention_<s>.png")
    g = p.add_argument_group("auto-labelling")
    g.add_argument("--pseudo-labels", default=None, metavar="OUT",
                   help="write a pseudo-labelled dataset (images/, masks/, classes.txt, pseudo_labels.json) here")
    g.add_argument("--threshold", type=probability_threshold, default=0.9,
                   help="keep a pixel's label where its top softmax probability is at least this, in (0, 1]; "
                   "others get 255 (ignore)")
    add_runtime_args(p)
    return p


class PseudoLabelWriter:
    """Writes the pseudo-labelled dataset of ``--pseudo-labels`` (module docstring) and its summary."""

    def __init__(self, out, threshold: float, class_names, settings: dict):
        self.out, self.threshold, self.class_names = Path(out), float(threshold), list(class_names)
        self.settings = settings
        for sub in ("images", "masks"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        (self.out / "classes.txt").write_text("".join(f"{n}\n" for n in self.class_names))
        n = len(self.class_names)
        self.predicted, self.labelled = np.zeros(n, np.int64), np.zeros(n, np.int64)
        self.images = []

    def add(self, image_path: Path, probs: torch.Tensor) -> list[Path]:
        """``probs`` (C, H, W): write the image copy and its label PNG; returns both paths."""
        conf, labels = probs.max(0)
        keep = conf >= self.threshold
        labels = labels.to(torch.uint8)
        out = torch.where(keep, labels, torch.full_like(labels, 255)).cpu().numpy()
        labels, keep = labels.cpu().numpy(), keep.cpu().numpy()
        n = len(self.class_names)
        pred = np.bincount(labels.ravel(), minlength=n)[:n]
        kept = np.bincount(labels[keep], minlength=n)[:n]
        self.predicted += pred
        self.labelled += kept
        total = labels.size
        self.images.append({"image": image_path.name, "labelled_fraction": float(keep.mean()),
                            "class_fraction": {c: float(kept[i] / total) for i, c in enumerate(self.class_names)}})
        paths = [self.out / "images" / image_path.name, self.out / "masks" / f"{image_path.stem}.png"]
        shutil.copyfile(image_path, paths[0])
        Image.fromarray(out).save(paths[1])
        return paths

    def finish(self) -> Path:
        pixels = int(self.predicted.sum())
        summary = {**self.settings, "threshold": self.threshold, "ignore_index": 255, "num_images": len(self.images),
                   "labelled_fraction": float(self.labelled.sum() / max(pixels, 1)),
                   "classes": [{"name": c, "predicted_pixels": int(self.predicted[i]),
                                "labelled_pixels": int(self.labelled[i]),
                                "labelled_fraction": (float(self.labelled[i] / self.predicted[i])
                                                      if self.predicted[i] else None)}
                               for i, c in enumerate(self.class_names)],
                   "images": self.images}
        path = self.out / "pseudo_labels.json"
        path.write_text(json.dumps(summary, indent=1))
        return path


def _save_attention(model, x, scales, size, out: Path, stem: str) -> list[Path]:
    """``<stem>_attention_<s>.png`` for every scale's attention map (8-bit, at the input size ``size``)."""
    from ..engine.checkpoint import unwrap

    m = unwrap(model)
    maps = m.attention_maps(x, scales)
    paths = []
    for s, a in maps.items():
        a = torch.nn.functional.interpolate(a.float(), size=size, mode="bilinear", align_corners=False)
        img = (a[0, 0].clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
        paths.append(out / f"{stem}_attention_{s:g}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def run(argv=None) -> list[Path]:
    """``pyseg-predict`` as a function: returns the paths it wrote; raises on failure."""
    from ..data import get_palette, read_image
    from ..data.datasets import IMAGE_EXTS
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from ..engine.checkpoint import unwrap
    from ..engine.evaluator import autocast_context
    from ..engine.inference import configure_scales, predict_probabilities, predict_scores
    from ._load import load_model_from_args

    p = build_parser()
    args = p.parse_args(argv)
    apply_threads(args)
    try:
        args.model_kwargs = key_values(args.model_arg)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.output is None and args.pseudo_labels is None:
        p.error("give --output (masks and overlays), --pseudo-labels (a pseudo-labelled dataset) or both")
    if args.dump_attention and args.output is None:
        p.error("--dump-attention writes into --output")
    src = Path(args.input)
    if src.is_dir():
        files = sorted(f for f in src.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise CommandError(f"no images in {src}")
    elif src.is_file():
        files = [src]
    else:
        raise CommandError(f"input not found: {src}")
    model, meta, device = load_model_from_args(args)
    if args.dump_attention and not callable(getattr(unwrap(model), "attention_maps", None)):
        raise CommandError(f"--dump-attention needs a multi-scale attention model; {meta.get('model')} has no "
                           "attention maps")
    num_classes = int(args.num_classes or meta["num_classes"])
    palette = get_palette(args.palette, num_classes)
    out = Path(args.output) if args.output else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    pseudo = None
    if args.pseudo_labels:
        names = list(meta.get("classes") or [])[:num_classes]
        names += [str(i) for i in range(len(names), num_classes)]
        pseudo = PseudoLabelWriter(args.pseudo_labels, args.threshold, names,
                                   {"checkpoint": str(args.checkpoint), "scales": args.scales or [1.0],
                                    "flip": args.flip})
    native = configure_scales(model, args.scales)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    written = []
    for f in files:
        img = read_image(f)
        h, w = img.shape[:2]
        x = torch.from_numpy(img).to(device).permute(2, 0, 1).unsqueeze(0).float().div_(255)
        if args.resize:
            x = torch.nn.functional.interpolate(x, size=args.resize, mode="bilinear", align_corners=False,
                                                antialias=True)
        x = (x - mean) / std
        with torch.no_grad(), autocast_context(device, args.amp):
            if pseudo is not None:
                scores = predict_probabilities(model, x, flip=args.flip, scales=args.scales,
                                               size_divisor=args.size_divisor, native_scales=native)
            else:
                scores = predict_scores(model, x, flip=args.flip, scales=args.scales, size_divisor=args.size_divisor,
                                        native_scales=native)
            if args.dump_attention:
                written += _save_attention(model, x, args.scales, (h, w), out, f.stem)
        if scores.shape[-2:] != (h, w):
            scores = torch.nn.functional.interpolate(scores.float(), size=(h, w), mode="bilinear",
                                                     align_corners=False)
        if pseudo is not None:
            written += pseudo.add(f, scores[0].float())
        if out is None:
            continue
        labels = scores.argmax(1)[0].to(torch.uint8).cpu().numpy()
        colour = palette[labels]
        overlay = (img.astype(np.float32) * (1 - args.alpha) + colour.astype(np.float32) * args.alpha)
        paths = [out / f"{f.stem}_mask.png", out / f"{f.stem}_overlay.png"]
        Image.fromarray(colour).save(paths[0])
        Image.fromarray(np.clip(overlay + 0.5, 0, 255).astype(np.uint8)).save(paths[1])
        if args.save_labels:
            paths.append(out / f"{f.stem}_labels.png")
            Image.fromarray(labels).save(paths[-1])
        written += paths
    if pseudo is not None:
        summary = pseudo.finish()
        written.append(summary)
        fraction = json.loads(summary.read_text())["labelled_fraction"]
        print(f"pseudo-labels for {len(files)} image(s) in {pseudo.out}: {fraction:.1%} of the pixels labelled "
              f"(threshold {args.threshold:g})")
    if out is not None:
        print(f"wrote {len(written)} files for {len(files)} image(s) to {out}")
    return written


main = console_main(run, "pyseg-predict")

if __name__ == "__main__":
    raise SystemExit(main())
