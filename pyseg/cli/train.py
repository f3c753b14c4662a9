"""``pyseg-train`` / ``python -m pyseg.train``: train a registered model on a segmentation dataset.

Single process::

    pyseg-train --model hyperseg-m --dataset cityscapes --data-root /data/cityscapes --crop-size 512x1024 \\
        --epochs 360 --batch-size 8 --loss bootstrap --amp bf16 --output-dir runs/hyperseg-m

Several GPUs (or CPU processes with gloo)::

    torchrun --nproc_per_node 4 -m pyseg.train --model hyperseg-m ... --sync-bn

``--batch-size`` is per process. See :mod:`pyseg.engine.trainer` for the checkpoint/resume/freeze semantics.

The hierarchical multi-scale attention recipe (three staged runs in one output folder, :mod:`pyseg.engine.recipe`),
with pseudo-labelled data (``pyseg-predict --pseudo-labels``) mixed in::

    pyseg-train --model hmsa-deeplabv3p-mobilenetv2 --recipe hmsa-staged --step-epochs 60 20 20 ... \
        --extra-data folder:pseudo/ --extra-weight 0.5 --output-dir runs/hmsa
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import (add_data_args, add_model_args, add_runtime_args, apply_threads, console_main, float_list,
                      key_values, open_unit_float, positive_int, require_dir, require_file, size_hw)

RECIPE_NAMES = ("hmsa-staged",)  # pyseg.engine.recipe.RECIPES (not imported here: the parser stays light)


def extra_data_spec(s: str) -> tuple[str, str]:
    """'folder:PATH' -> ('folder', 'PATH'); the kind must be a dataset type."""
    from ..data import DATASETS

    kind, sep, path = s.partition(":")
    if not sep or not path or kind not in DATASETS:
        raise argparse.ArgumentTypeError(f"expected KIND:PATH with KIND one of {', '.join(sorted(DATASETS))} "
                                         f"(e.g. folder:pseudo/), got {s!r}")
    return kind, path


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
    g.add_argument("--contrast", type=float, default=0.0,
                   help="random contrast factor in [1-C, 1+C] (0 = off; the HMSA slides' contrast change)")
    g.add_argument("--extra-data", type=extra_data_spec, default=None, metavar="KIND:PATH",
                   help="a second training set mixed in, e.g. folder:pseudo/ (pseudo-labels from pyseg-predict "
                   "--pseudo-labels; folder sets are read without a split folder)")
    g.add_argument("--extra-weight", type=open_unit_float, default=None, metavar="W",
                   help="share of the training samples drawn from --extra-data, in (0, 1) (default 0.5); an epoch "
                   "is len(train) + len(extra) draws")
    g.add_argument("--class-uniform", type=float, default=0.0, metavar="P",
                   help="share of each set's samples drawn class-uniformly (a class, then an image holding it)")
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
    g.add_argument("--poly-power", type=float, default=None,
                   help="poly LR decay, stepped every iteration (default 0.9; --recipe hmsa-staged: 0.8)")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0 = off)")
    g.add_argument("--loss", choices=("ce", "bootstrap", "rmi"), default="bootstrap")
    g.add_argument("--bootstrap-k", type=int, default=4096)
    g.add_argument("--bootstrap-thresh", type=float, default=0.3)
    g.add_argument("--freeze", nargs="+", default=[], metavar="PREFIX",
                   help="freeze parameters/modules under these name prefixes (e.g. trunk)")
    g.add_argument("--stage", type=int, choices=(1, 2, 3), default=None,
                   help="HMSA staged training step: 1 trunk+head per scale, 2 attention only, 3 trunk+head with "
                   "attention frozen (the model's set_stage)")
    g.add_argument("--recipe", choices=sorted(RECIPE_NAMES), default=None,
                   help="hmsa-staged: stages 1, 2, 3 in a row (lr 1e-3, 5e-4, 1e-4, poly 0.8), each from the "
                   "previous best, in OUTPUT_DIR/step1..3 (pyseg.engine.recipe)")
    g.add_argument("--step-epochs", type=positive_int, nargs="+", default=None, metavar="E",
                   help="--recipe: epochs of each step (default --epochs for each)")
    g.add_argument("--step-lr", type=float, nargs="+", default=None, metavar="LR",
                   help="--recipe: learning rate of each step (default the recipe's)")
    g.add_argument("--val-scales", type=float_list, default=None, metavar="S1,S2,...",
                   help="validation scales (multi-scale models; default the model's own, stage 1: 1.0)")
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
    if a.extra_weight is not None and a.extra_data is None:
        p.error("--extra-weight needs --extra-data")
    if a.extra_data is not None and a.extra_weight is None:
        a.extra_weight = 0.5
    if not 0.0 <= a.class_uniform <= 1.0:
        p.error(f"--class-uniform must be in [0, 1], got {a.class_uniform}")
    if a.recipe is None and (a.step_epochs or a.step_lr):
        p.error("--step-epochs and --step-lr need --recipe")
    if a.recipe is not None:
        if a.stage is not None:
            p.error("--stage and --recipe exclude each other (the recipe sets each step's stage)")
        for opt, vals in (("--step-epochs", a.step_epochs), ("--step-lr", a.step_lr)):
            if vals is not None and len(vals) != 3:
                p.error(f"{opt}: --recipe {a.recipe} has 3 steps, got {len(vals)} values")
        if a.resume not in (None, "auto"):
            p.error("--recipe resumes with --resume auto")
    return a


def run(argv=None) -> dict:
    """``pyseg-train`` as a function: ``run([...])`` returns the summary of :func:`pyseg.engine.trainer.train`
    (``best_miou``, ``last_val``, ``epochs_done``, ``step``, ``output_dir``, ...), with ``--recipe`` the record of
    :func:`pyseg.engine.recipe.run_recipe`; raises on failure."""
    from ..engine.trainer import train

    args = parse_args(argv)
    apply_threads(args)
    require_dir(args.data_root, "dataset root")
    if args.init:
        require_file(args.init, "--init checkpoint")
    if args.extra_data:
        require_dir(args.extra_data[1], "--extra-data folder")
    if args.recipe:
        from ..engine.recipe import run_recipe

        record = run_recipe(args)
        print(json.dumps({"recipe": args.recipe, "finished": record["finished"],
                          "best_miou": [s.get("best_miou") for s in record["steps"]],
                          "output": str(Path(args.output_dir) / "best.safetensors") if record["finished"] else None}))
        return record
    summary = train(args)
    if summary.get("rank", 0) == 0 and summary.get("best_miou") is not None:
        print(json.dumps({"best_miou": summary["best_miou"], "epochs_done": summary["epochs_done"]}))
    return summary


main = console_main(run, "pyseg-train")

if __name__ == "__main__":
    raise SystemExit(main())
