"""Memory and time of multi-scale inference of a whole HMSA model: pyseg's path against the eager computation.

Model: ``hmsa-ocrnet-hrnet-w48`` (NVIDIA's ``ocrnet.HRNet_Mscale`` layout; random weights, or ``--checkpoint``
of NVIDIA's read with ``pyseg.models.from_official``), eval, fp32, batch 1. Variants, each in its own
subprocess (CPU peak = the process' peak RSS, VmHWM after /proc/self/clear_refs, above the RSS with the model
and input in memory):

* ``eager``: NVIDIA's ``nscale_forward`` way -- per scale (highest first) the network on the resized image,
  its stride-4 logits and attention map upsampled to the scale's input size (full-resolution per-scale
  logits), the recurrence with explicit resizes (``F.interpolate``). Leaner than their code, which also
  fuses the upsampled auxiliary logits and keeps every scale's outputs in a dict.
* ``pyseg``: ``model(x)``: OCR and attention heads in row bands (``head_band_rows``), stride-4 outputs fused by
  ``hmsa_fuse`` without full-resolution per-scale logits.
* ``pyseg-wholemap`` (``--variants``): the same with the heads on the whole map (``head_band_rows=0``), which
  separates the two savings.

    python benchmarks/bench_hmsa_models.py --json out.json               # 512x1024, scales 0.5,1,2
    python benchmarks/bench_hmsa_models.py --quick                       # small smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

VARIANTS = ("eager", "pyseg", "pyseg-wholemap")


def eager_nscale(msa, x, scales):
    """NVIDIA's multi-scale inference, eagerly: full-resolution per-scale logits and attention maps."""
    import torch.nn.functional as F

    def up(t, size):
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

    pred = None
    for s in sorted(scales, reverse=True):
        size = msa.scaled_size(x.shape[-2:], s)
        xs = up(x, size)
        lg, feats = msa.model.forward_features_and_logits(xs)
        p = up(lg, size)
        attn = up(msa.attention(feats), size)
        del lg, feats, xs
        if pred is None:
            pred = p
        elif s >= 1.0:
            pred = attn * p + (1 - attn) * up(pred, p.shape[-2:])
        else:
            pred = up(attn * p, pred.shape[-2:]) + (1 - up(attn, pred.shape[-2:])) * pred
        del p, attn
    return up(pred, x.shape[-2:])


def run_variant(cfg):
    import torch

    from bench_hmsa import _reset_peak_rss, _ru_maxrss, _status_kb
    from pyseg.models import create_model

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    if cfg.get("checkpoint"):
        from pyseg.models.official import from_official

        model = from_official(cfg["checkpoint"])
    else:
        model = create_model(cfg["model"], num_classes=cfg["classes"])
    model.eval()
    if cfg["variant"] == "pyseg-wholemap":
        model.model.head_band_rows = 0
    scales = tuple(cfg["scales"])
    model.set_scales(scales)
    x = torch.randn(1, 3, cfg["H"], cfg["W"], generator=torch.Generator().manual_seed(123))

    def call():
        with torch.no_grad():
            if cfg["variant"] == "eager":
                return eager_nscale(model, x, scales)
            return model(x)

    exact = _reset_peak_rss()
    base = _status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    out = call()
    dt = time.perf_counter() - t0
    peak = (_status_kb("VmHWM") * 1024 if exact else _ru_maxrss()) - base
    torch.save(out, cfg["out_path"])
    return {**cfg, "time_s": dt, "peak_extra_mb": peak / 2**20, "base_rss_mb": base / 2**20,
            "memory_method": "VmHWM after clear_refs" if exact else "ru_maxrss"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hmsa-ocrnet-hrnet-w48")
    ap.add_argument("--checkpoint", default=None, help="an NVIDIA checkpoint (read with from_official)")
    ap.add_argument("--size", default="512x1024", help="H x W of the input")
    ap.add_argument("--scales", default="0.5,1,2")
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="eager,pyseg", help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="64x128 input (smoke run)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print(json.dumps(run_variant(json.loads(args._child))))
        return 0
    import platform

    import torch

    H, W = (64, 128) if args.quick else (int(v) for v in args.size.lower().split("x"))
    scales = [float(s) for s in args.scales.split(",")]
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; expected {', '.join(VARIANTS)}")
    results, outs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            cfg = {"variant": v, "model": args.model, "checkpoint": args.checkpoint, "H": H, "W": W,
                   "scales": scales, "classes": args.classes, "threads": args.threads,
                   "out_path": os.path.join(tmp, f"{v}.pt")}
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(cfg)],
                                  capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
            if proc.returncode != 0:
                sys.exit(f"variant {v} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r.pop("out_path")
            outs[v] = torch.load(cfg["out_path"], weights_only=True)
            results.append(r)
            print(f"{v}: {r['time_s']:.1f} s, peak +{r['peak_extra_mb']:.0f} MB", file=sys.stderr, flush=True)
    ref = results[0]
    print(f"# {args.model}{' (' + args.checkpoint + ')' if args.checkpoint else ''}, input 1x3x{H}x{W} fp32, "
          f"eval, scales {scales}, CPU {args.threads} threads, torch {torch.__version__}, "
          f"peak memory = {ref['memory_method']} above the RSS with model and input loaded "
          f"({ref['base_rss_mb']:.0f} MB), one run per variant, each in its own process")
    print(f"{'variant':<16}{'time s':>9}{'peak+ MB':>10}{'mem ratio':>11}{'time ratio':>11}{'max|diff|/max|ref|':>20}")
    scale_ref = outs[ref["variant"]].abs().max().item()
    for r in results:
        r["memory_ratio_vs_" + ref["variant"]] = r["peak_extra_mb"] / ref["peak_extra_mb"]
        r["time_ratio_vs_" + ref["variant"]] = r["time_s"] / ref["time_s"]
        r["max_rel_diff_vs_" + ref["variant"]] = (outs[r["variant"]] - outs[ref["variant"]]).abs().max().item() / scale_ref
        print(f"{r['variant']:<16}{r['time_s']:>9.1f}{r['peak_extra_mb']:>10.0f}"
              f"{r['memory_ratio_vs_' + ref['variant']]:>11.3f}{r['time_ratio_vs_' + ref['variant']]:>11.2f}"
              f"{r['max_rel_diff_vs_' + ref['variant']]:>20.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.machine(), "torch": torch.__version__, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
