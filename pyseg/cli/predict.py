"""``pyseg-predict``: segment an image or every image of a folder; write colour masks and overlays (PNG).

    pyseg-predict --checkpoint runs/x/best.safetensors --input street.png --output out/ [--palette cityscapes]

For each input ``<name>.<ext>`` it writes ``<name>_mask.png`` (class colours), ``<name>_overlay.png`` (the image
blended with the colours, ``--alpha``) and, with ``--save-labels``, ``<name>_labels.png`` (class indices).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ._common import (CommandError, add_model_args, add_runtime_args, apply_threads, console_main, float_list,
                      key_values, size_hw)


def build_parser():
    p = argparse.ArgumentParser(prog="pyseg-predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    add_model_args(p, required=False)
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--palette", default="cityscapes", help="cityscapes | camvid | voc | random")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colour mask")
    p.add_argument("--resize", type=size_hw, default=None, metavar="HxW", help="run at this size (output is "
                   "resized back to the input size)")
    p.add_argument("--size-divisor", type=int, default=1)
    p.add_argument("--flip", action="store_true")
    p.add_argument("--scales", type=float_list, default=None)
    p.add_argument("--save-labels", action="store_true")
    add_runtime_args(p)
    return p


def run(argv=None) -> list[Path]:
    """``pyseg-predict`` as a function: returns the paths it wrote; raises on failure."""
    from ..data import get_palette, read_image
    from ..data.datasets import IMAGE_EXTS
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from ..engine.evaluator import autocast_context
    from ..engine.inference import configure_scales, predict_scores
    from ._load import load_model_from_args

    p = build_parser()
    args = p.parse_args(argv)
    apply_threads(args)
    try:
        args.model_kwargs = key_values(args.model_arg)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
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
    num_classes = int(args.num_classes or meta["num_classes"])
    palette = get_palette(args.palette, num_classes)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
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
            scores = predict_scores(model, x, flip=args.flip, scales=args.scales, size_divisor=args.size_divisor,
                                    native_scales=native)
        if scores.shape[-2:] != (h, w):
            scores = torch.nn.functional.interpolate(scores.float(), size=(h, w), mode="bilinear",
                                                     align_corners=False)
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
    print(f"wrote {len(written)} files for {len(files)} image(s) to {out}")
    return written


main = console_main(run, "pyseg-predict")

if __name__ == "__main__":
    raise SystemExit(main())
