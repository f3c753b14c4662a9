#!/usr/bin/env python
"""The HyperSeg paper's CamVid ablation, side by side in one run: parameters, GMACs and CPU latency of
each variant (encoders, static decoder) and of each weight-grid size with and without the positional
encoding.

    python benchmarks/ablation.py --threads 2 --repeats 3 --json ablation.json

Rows: ``hyperseg-{s,l}-camvid`` (EfficientNet-B1) and their ``-resnet18``, ``-psp18``, ``-psp50``,
``-static`` variants at the config resolution (S 768x576, L 1024x768); then HyperSeg-S with
``grid`` = default (H/32 x W/32 = 18x24), 16x16, 8x8, 4x4, 1x1, each with and without
``positional_encoding`` (``create_model`` keyword overrides).

Parameters: all parameters (what the paper counts) and the trainable ones (a static decoder freezes
its unused context head). GMACs per image: the static layers (encoder, context head, weight mapper)
with ``torch.utils.flop_counter.FlopCounterMode`` around ``HyperSeg.generate_weights`` (so a static
model's context head, which does not run, is not counted), the dynamic decoder analytically
(``HyperSeg.decoder_macs``); element-wise ops, BN, pooling and resampling are not counted.

Latency: batch 1, eval, channels_last trunk (as ``fps.py`` on the CPU; ``--fuse`` also folds the trunk's
BatchNorms with ``model.fuse()``, which costs a few verification forwards per model), no grad,
``--warmup`` untimed forwards per model, then ``--repeats`` rounds in each of which every model runs one
timed forward (models interleaved, so that load changes on a shared machine hit them alike); the median
per model is reported. On a shared CPU absolute times are noisy: compare the ratios within one run.
``--size HxW`` runs every row at one resolution instead (GMACs then at that size too).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

try:
    import pyseg  # noqa: F401
except ImportError:  # running from a source checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import pyseg  # noqa: F401

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import env_info  # noqa: E402

ENCODERS = ["", "-resnet18", "-psp18", "-psp50", "-static"]
GRIDS = [None, (16, 16), (8, 8), (4, 4), (1, 1)]


def rows(grid_model: str = "hyperseg-s-camvid"):
    """(label, registry name, overrides, group) of every row."""
    out = []
    for size in ("s", "l"):
        for enc in ENCODERS:
            name = f"hyperseg-{size}-camvid{enc}"
            out.append((name, name, {}, "variant"))
    for grid in GRIDS:
        for pe in (True, False):
            kw = {}
            if grid is not None:
                kw["grid"] = grid
            if not pe:
                kw["positional_encoding"] = False
            label = f"{grid_model} grid={'default' if grid is None else f'{grid[0]}x{grid[1]}'}" \
                    f"{'' if pe else ' no-PE'}"
            out.append((label, grid_model, kw, "grid"))
    return out


@torch.no_grad()
def count_macs(model, x) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        model.generate_weights(x)
    static = fc.get_total_flops() // 2
    decoder = sum(model.decoder_macs(x.shape[-2], x.shape[-1]).values())
    return {"static_macs": static, "decoder_macs": decoder, "macs": static + decoder}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per model (interleaved rounds)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per model first")
    p.add_argument("--size", default=None, help="HxW for every row (default: each config's input_size)")
    p.add_argument("--only", default=None, help="comma-separated substrings: keep the rows whose label has one")
    p.add_argument("--no-latency", action="store_true",
                   help="parameters and GMACs only, counted on the meta device (no weights, no compute: seconds)")
    p.add_argument("--fuse", action="store_true", help="model.fuse() before timing (as fps.py)")
    p.add_argument("--json", default="ablation.json", help="output JSON path")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from pyseg.models import create_model, get_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = None
    if args.size:
        try:
            size = tuple(int(v) for v in args.size.lower().split("x"))
            assert len(size) == 2
        except (ValueError, AssertionError):
            sys.exit(f"error: --size must be HxW, e.g. 576x768, got {args.size!r}")
    selected = rows()
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        selected = [r for r in selected if any(k in r[0] for k in keys)]
        if not selected:
            sys.exit(f"error: --only {args.only!r} matches no row")

    results, runners = [], {}
    for label, name, kw, group in selected:
        cfg = get_config(name)
        hw = size or tuple(cfg["input_size"])
        device = torch.device("meta" if args.no_latency else "cpu")
        with device:
            model = create_model(name, **kw).eval()
            x = torch.randn(1, 3, *hw)
        n_all = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rec = {"label": label, "model": name, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                                            for k, v in kw.items()},
               "group": group, "input_hw": list(hw), "params": n_all, "trainable_params": n_train,
               "paper_params": cfg.get("paper_params") or (None if kw else _paper_main(name)),
               "grid": list(model.weight_grid(*hw))}
        rec.update(count_macs(model, x))
        if not args.no_latency:
            if args.fuse:
                model.fuse()  # checked on the smallest input the model (and its grid) accepts
            model.to_channels_last()
            xc = x.contiguous(memory_format=torch.channels_last)
            runners[label] = (model, xc)
        results.append(rec)
        print(f"built {label}: {n_all / 1e6:.2f}M params, {rec['macs'] / 1e9:.1f} GMACs", flush=True)

    if runners:
        lat = {label: [] for label in runners}
        with torch.inference_mode():
            for label, (model, x) in runners.items():
                for _ in range(args.warmup):
                    model(x)
            for r in range(args.repeats):
                for label, (model, x) in runners.items():
                    t0 = time.perf_counter()
                    model(x)
                    lat[label].append(time.perf_counter() - t0)
                print(f"round {r + 1}/{args.repeats} done", flush=True)
        for rec in results:
            ts = lat[rec["label"]]
            rec["latency_ms"] = [t * 1e3 for t in ts]
            rec["latency_median_ms"] = statistics.median(ts) * 1e3
            rec["fps"] = 1.0 / statistics.median(ts)

    out = {"benchmark": "ablation", "env": env_info("cpu"), "args": vars(args),
           "notes": [f"batch 1, fp32, eval, {'model.fuse() + ' if args.fuse else 'unfused BN, '}channels_last "
                     "trunk, no grad; models interleaved per "
                     "round; median of the rounds. Absolute CPU latencies are noisy on a shared machine: "
                     "compare ratios within this run.",
                     "params = all parameters (the paper's count); trainable excludes the frozen context head "
                     "and signal head of the static variants.",
                     "GMACs = multiply-accumulates per image (the paper's 'GFLOPs')."],
           "rows": results}
    Path(args.json).write_text(json.dumps(out, indent=1))
    print()
    print(table(results))
    print(f"\nJSON: {args.json}")


def _paper_main(name):
    # the paper's main-table counts of the EfficientNet-B1 CamVid models (SPEC section 3)
    return {"hyperseg-s-camvid": 9_900_000, "hyperseg-l-camvid": 10_200_000}.get(name)


def table(results) -> str:
    lines = ["| row | input | grid | params | paper | Δ | trainable | GMACs | CPU ms (median) | rel. time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = {}
    for rec in results:
        key = (rec["group"], tuple(rec["input_hw"]))
        if "latency_median_ms" in rec:
            base.setdefault(key, rec["latency_median_ms"])
    for rec in results:
        paper = rec["paper_params"]
        dev = f"{100 * (rec['params'] / paper - 1):+.1f}%" if paper else ""
        ms = rec.get("latency_median_ms")
        b = base.get((rec["group"], tuple(rec["input_hw"])))
        lines.append(
            f"| {rec['label']} | {rec['input_hw'][1]}x{rec['input_hw'][0]} | {rec['grid'][0]}x{rec['grid'][1]} | "
            f"{rec['params'] / 1e6:.2f}M | {f'{paper / 1e6:.1f}M' if paper else ''} | {dev} | "
            f"{rec['trainable_params'] / 1e6:.2f}M | {rec['macs'] / 1e9:.2f} | "
            f"{'' if ms is None else f'{ms:.0f}'} | {'' if ms is None or not b else f'{ms / b:.2f}x'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
