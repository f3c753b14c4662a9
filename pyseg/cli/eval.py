"""``pyseg-eval``: mIoU of a checkpoint on a dataset split, with a per-class table.

    pyseg-eval --checkpoint runs/x/best.safetensors --dataset cityscapes --data-root /data/cityscapes \\
        --split val [--flip] [--scales 0.5,1.0,2.0] [--size-divisor 64] [--json result.json]

The model name, class count and model keywords come from the checkpoint's metadata (override with --model,
--num-classes, --model-arg). ``--scales``: models with ``set_scales()`` or a ``scales`` attribute get the list and
fuse the scales themselves (hierarchical multi-scale attention: scale after scale, argmax labels from the fused
kernel, so no full-resolution per-scale logits); other models are run per scale and their softmax outputs
averaged (see :mod:`pyseg.engine.inference`). The summary ends with the peak memory one image's prediction
allocated (:mod:`pyseg.engine.memory`). Works under ``torchrun`` (each rank evaluates a shard; matrices are
summed).
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.utils.data import DataLoader

from ._common import (add_data_args, add_model_args, add_runtime_args, apply_threads, console_main, float_list,
                      key_values, require_dir)


def build_parser():
    p = argparse.ArgumentParser(prog="pyseg-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help=".safetensors written by pyseg-train")
    add_model_args(p, required=False)
    add_data_args(p)
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--flip", action="store_true", help="horizontal flip test-time augmentation")
    p.add_argument("--scales", type=float_list, default=None, metavar="S1,S2,...", help="multi-scale inference")
    p.add_argument("--json", default=None, help="write the metrics here")
    add_runtime_args(p)
    return p


def run(argv=None) -> dict:
    """``pyseg-eval`` as a function: ``run(["--checkpoint", ..., ...])`` returns the metrics dict (``miou``,
    ``iou``, ``acc``, ``pixel_acc``, ...; see :meth:`pyseg.metrics.ConfusionMatrix.compute`) and raises on failure."""
    from ..data import build_dataset, build_eval_transform
    from ..engine.distributed import ShardSampler, cleanup_distributed, init_distributed, is_main
    from ..engine.evaluator import evaluate
    from ..metrics import format_iou_table
    from ._load import load_model_from_args

    p = build_parser()
    args = p.parse_args(argv)
    apply_threads(args)
    try:
        args.model_kwargs = key_values(args.model_arg)
        dataset_kwargs = key_values(args.dataset_arg)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    require_dir(args.data_root, "dataset root")
    model, meta, device = load_model_from_args(args)
    _, world, local = init_distributed(device)
    try:
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", local)
            model.to(device)
        ds = build_dataset(args.dataset, args.data_root, args.split,
                           build_eval_transform(size_divisor=args.size_divisor), **dataset_kwargs)
        num_classes = args.num_classes or int(meta.get("num_classes") or ds.num_classes)
        loader = DataLoader(ds, batch_size=args.batch_size, sampler=ShardSampler(len(ds)), num_workers=args.workers,
                            pin_memory=device.type == "cuda")
        res = evaluate(model, loader, num_classes, device, amp=args.amp, flip=args.flip, scales=args.scales,
                       size_divisor=args.size_divisor, progress=args.progress, track_memory=True)
        names = meta.get("classes") or list(ds.classes)
        if is_main():
            print(f"{args.checkpoint} on {args.dataset}:{args.split} ({len(ds)} images, flip={args.flip}, "
                  f"scales={args.scales or [1.0]})")
            print(format_iou_table(res, names))
            print(f"peak memory per image: {res['peak_memory_mb']:.1f} MB ({res['memory_method']})")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({**res, "iou": [None if v != v else v for v in res["iou"]],
                               "acc": [None if v != v else v for v in res["acc"]], "classes": names}, f, indent=1)
        return res
    finally:
        cleanup_distributed()


main = console_main(run, "pyseg-eval")

if __name__ == "__main__":
    raise SystemExit(main())
