"""``pyseg-convert``: a released checkpoint (e.g. the public HyperSeg ``.pth`` files) -> a pyseg checkpoint.

    pyseg-convert cityscapes_efficientnet_b1_hyperseg-m.pth hyperseg-m-cityscapes.safetensors

Reads the file safely (``torch.load(weights_only=True)``; the ``arch`` string is parsed, never run), builds the
matching pyseg model, loads every tensor (or fails, listing the keys that do not match), and writes its weights as
safetensors with the model's config in the metadata -- the format ``pyseg-train`` writes, so ``pyseg-eval``,
``pyseg-predict``, ``benchmarks/fps.py --checkpoint`` and ``create_model(name, checkpoint=...)`` load it without
``torch.load`` and without the ``.pth``.
"""
from __future__ import annotations

import argparse
import os

from ._common import CommandError, console_main, require_file


def build_parser():
    p = argparse.ArgumentParser(prog="pyseg-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="released checkpoint (.pth)")
    p.add_argument("output", help="pyseg checkpoint to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return p


def run(argv=None) -> dict:
    """``pyseg-convert`` as a function: returns {model, num_classes, tensors, output}; raises on failure."""
    from ..models.official import from_official, parse_arch, save_converted

    args = build_parser().parse_args(argv)
    require_file(args.input, "checkpoint")
    if os.path.exists(args.output) and not args.force:
        raise CommandError(f"output exists: {args.output} (pass --force to overwrite)")
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        raise CommandError("output must differ from the input")
    model = from_official(args.input)
    cfg = model.pyseg_config
    arch = getattr(model, "official_arch", None)
    extra = {"source": os.path.basename(args.input)}
    if arch:
        extra["arch"] = arch
    save_converted(model, args.output, extra)
    n = len(model.state_dict())
    name = cfg["model"] if cfg.get("registered_config", True) else \
        f"a public architecture that is no registered config (rebuilt through {cfg['model']} with its kwargs)"
    print(f"{args.input} -> {args.output}: {name}, {cfg['num_classes']} classes, {n} tensors"
          + (f" (from {parse_arch(arch)[0]})" if arch else ""))
    return {"model": cfg["model"], "num_classes": cfg["num_classes"], "tensors": n, "output": args.output}


main = console_main(run, "pyseg-convert")
