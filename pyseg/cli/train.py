"""``pyseg-train`` / ``python -m pyseg.train``: train a registered model on a segmentation dataset.

Single process::

    pyseg-train --model hyperseg-m --dataset cityscapes --data-root /data/cityscapes --crop-size 512x1024 \\
        --epochs 360 --batch-size 8 --loss bootstrap --amp bf16 --output-dir runs/hyperseg-m

Several GPUs (or CPU processes with gloo)::

    torchrun --nproc_per_node 4 -m pyseg.train --model hyperseg-m ... --sync-bn

``--batch-size`` is per process. See :mod:`pyseg.engine.trainer` for the checkpoint/resume/freeze semantics.
"""
from __future__ import annotations

import argparse
import json

from ._common import (add_data_args, add_model_args, add_runtime_args, apply_threads, console_main, key_values,
                      require_dir, require_file, size_hw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyseg-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("splits and augmentation")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val", help="'' to skip validation")
    g.add_argument("--crop-size", type=size_hw, default=None, metavar="HxW",
                   help="random crop (padded with ignore where the image is smaller); default: no crop")
    g.add_argument("--scale-range", type=float, nargs=2, default=(0.25, 2.0), metavar=("MIN", "MAX"))
    g.add_argument("--scale-p", type=float, default=0.5, help="probability of the random resize (0 = off)")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--color-jitter", type=float, default=0.0, help="brightness/contrast/saturation strength")
    g.add_argument("--noise-std", type=float, default=0.0, help="Gaussian noise std (image in [0, 1])")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--batch-size", type=int, default=8, help="per process")
    g.add_argument("--val-batch-size", type=int, default=1)
    g.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--betas", type=float, nargs=2, default=(0.5, 0.999), help="Adam betas")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--poly-power", type=float, default=0.9, help="poly LR decay, stepped every iteration")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0 = off)")
    g.add_argument("--loss", choices=("ce", "bootstrap", "rmi"), default="bootstrap")
    g.add_argument("--bootstrap-k", type=int, default=4096)
    g.add_argument("--bootstrap-thresh", type=float, default=0.3)
    g.add_argument("--freeze", nargs="+", default=[], metavar="PREFIX",
                   help="freeze parameters/modules under these name prefixes (e.g. trunk)")
    g.add_argument("--init", default=None, help="initial weights (.safetensors), e.g. a previous stage")
    g.add_argument("--init-non-strict", action="store_true", help="allow missing/unexpected keys in --init")
    g.add_argument("--sync-bn", action="store_true", help="convert BatchNorm to SyncBatchNorm under DDP")
    g.add_argument("--find-unused-parameters", action="store_true", help="DDP option for partly used models")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", required=True)
    g.add_argument("--resume", default=None, metavar="auto|DIR|FILE",
                   help="continue from a checkpoint; 'auto' = OUTPUT_DIR/last.* if present (else start fresh)")
    g.add_argument("--val-every", type=int, default=1, help="validate every N epochs (0 = never) and at the end")
    g.add_argument("--ckpt-every", type=int, default=1, help="write last.* every N epochs (and at the end)")
    g.add_argument("--stop-after-epochs", type=int, default=None,
                   help="stop after N epochs of this invocation (time-limited jobs; continue with --resume)")
    g.add_argument("--log-every", type=int, default=20, help="steps between metrics.jsonl step records")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    add_runtime_args(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        a.model_kwargs = key_values(a.model_arg)
        a.dataset_kwargs = key_values(a.dataset_arg)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if a.epochs < 1 or a.batch_size < 1:
        p.error("--epochs and --batch-size must be >= 1")
    return a


def run(argv=None) -> dict:
    """``pyseg-train`` as a function: ``run([...])`` returns the summary of :func:`pyseg.engine.trainer.train`
    (``best_miou``, ``last_val``, ``epochs_done``, ``step``, ``output_dir``, ...); raises on failure."""
    from ..engine.trainer import train

    args = parse_args(argv)
    apply_threads(args)
    require_dir(args.data_root, "dataset root")
    if args.init:
        require_file(args.init, "--init checkpoint")
    summary = train(args)
    if summary.get("rank", 0) == 0 and summary.get("best_miou") is not None:
        print(json.dumps({"best_miou": summary["best_miou"], "epochs_done": summary["epochs_done"]}))
    return summary


main = console_main(run, "pyseg-train")

if __name__ == "__main__":
    raise SystemExit(main())
