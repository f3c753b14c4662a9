"""Benchmark of the HMSA fusion stage: fused kernels vs the eager PyTorch reference.

Per-scale inputs for an H x W image with C classes, scale s's image being (H*s, W*s); two layouts:

* ``full``: logits p_s already at (H*s, W*s) (the public method's per-scale full-resolution
  logits, handed over as inputs), attention maps at stride 4 of each scale; no ``scale_sizes``
  (each scale's grid is its logits' size).
* ``native``: the public pipeline from the network outputs: logits AND attention maps at stride 4
  of each scale's image (what the network produces), ``scale_sizes`` = each scale's image size.
  The fusion resizes both to the scale's resolution first: the reference materialises those
  per-scale full-resolution logits (as the public implementation does: 19x2048x4096 fp32 = 638 MB
  at scale 2 of a 1024x2048 image), the fused kernels sample the stride-4 logits on the fly.

Either way the result is (H, W) logits or labels. Reported per variant:
median time and the peak memory the call adds above its inputs (CPU: the process' peak RSS, reset
via /proc/self/clear_refs, each variant in its own subprocess; GPU: torch.cuda.max_memory_allocated
minus memory_allocated before the call). Ratios are fused / reference, measured in the same run.

    python benchmarks/bench_hmsa.py                 # CPU, 1024x2048, 19 classes, both layouts
    python benchmarks/bench_hmsa.py --device cuda --json out.json
    python benchmarks/bench_hmsa.py --quick         # small smoke run (CI)
    python benchmarks/bench_hmsa.py --layout native --threads 2 --json native.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SCALE_SETS = {"0.5,1,2": (0.5, 1.0, 2.0), "0.25,0.5,1,2": (0.25, 0.5, 1.0, 2.0)}


LAYOUTS = {"full": "inputs already at each scale's resolution (s*H, s*W)",
           "native": "stride-4 network outputs, resized to each scale's resolution inside the fusion"}


def make_inputs(scales, H, W, C, B, layout, device, dtype):
    """Per-scale logits, attention maps and scale_sizes (None for the full layout)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    logits, atts, sizes = [], [], []
    for s in scales:
        hs, ws = max(1, round(H * s)), max(1, round(W * s))
        sizes.append((hs, ws))
        lh, lw = (hs, ws) if layout == "full" else (max(1, -(-hs // 4)), max(1, -(-ws // 4)))
        logits.append(torch.randn(B, C, lh, lw, generator=g, dtype=dtype).to(device))
        atts.append(torch.rand(B, 1, max(1, -(-hs // 4)), max(1, -(-ws // 4)), generator=g, dtype=dtype).to(device))
    return logits, atts, (sizes if layout == "native" else None)


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_variant(cfg):
    """Time one (backend, output) variant in this process; returns a result dict."""
    import torch

    from pyseg.nn.functional import hmsa_fuse

    device = cfg["device"]
    torch.set_num_threads(cfg["threads"]) if cfg.get("threads") else None
    scales = tuple(cfg["scales"])
    logits, atts, sizes = make_inputs(scales, cfg["H"], cfg["W"], cfg["C"], cfg["B"], cfg["layout"], device,
                                      torch.float32)
    input_mb = sum(t.numel() * t.element_size() for t in logits + atts) / 2**20

    def call():
        with torch.no_grad():
            return hmsa_fuse(logits, atts, scales, (cfg["H"], cfg["W"]), output=cfg["output"],
                             backend=cfg["backend"], scale_sizes=sizes)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    # peak memory of one call above the inputs
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = call()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
        method = "torch.cuda.max_memory_allocated"
    else:
        exact = _reset_peak_rss()
        base = _status_kb("VmRSS") * 1024
        out = call()
        peak = (_status_kb("VmHWM") * 1024 if exact else _ru_maxrss()) - base
        method = "VmHWM after clear_refs" if exact else "ru_maxrss"
    out_mb = out.numel() * out.element_size() / 2**20
    del out
    times = []
    for i in range(cfg["warmup"] + cfg["repeat"]):
        sync()
        t0 = time.perf_counter()
        o = call()
        sync()
        dt = time.perf_counter() - t0
        del o
        if i >= cfg["warmup"]:
            times.append(dt)
    return {**cfg, "time_ms": 1e3 * statistics.median(times), "times_ms": [1e3 * t for t in times],
            "peak_extra_mb": peak / 2**20, "inputs_mb": input_mb, "output_mb": out_mb, "memory_method": method}


def _ru_maxrss():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_isolated(cfg):
    """CPU: one subprocess per variant so that peak RSS belongs to that variant alone."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(cfg)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    if proc.returncode != 0:
        raise RuntimeError(f"variant {cfg['backend']}/{cfg['output']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat (CI smoke run)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    ap.add_argument("--size", default="1024x2048", help="H x W of the image / output")
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--scales", default="all", help="'all' or one of " + ", ".join(SCALE_SETS))
    ap.add_argument("--layout", default="both", choices=["full", "native", "both", "stride4"],
                    help="full: inputs already at each scale's resolution; native: stride-4 network outputs "
                         "resized to each scale's resolution inside the fusion (the public pipeline); both "
                         "(default); stride4: alias of native")
    ap.add_argument("--backends", default=None, help="comma list; default: fused backends of the device")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs (default: 3 on the CPU, 50 on the GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 1 on the CPU, 10 on the GPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print(json.dumps(run_variant(json.loads(args._child))))
        return 0

    import torch

    import pyseg

    H, W = (int(v) for v in args.size.lower().split("x"))
    gpu = args.device == "cuda"
    repeat = args.repeat if args.repeat is not None else (50 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    if args.quick:
        H, W, repeat, warmup = 64, 128, 1, 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 2
    avail = pyseg.backends()
    if args.backends:
        fused = args.backends.split(",")
    else:
        fused = [b for b in (["cpu"] if args.device == "cpu" else ["cuda", "triton"]) if avail[b]["available"]]
    sets = SCALE_SETS if args.scales == "all" else {args.scales: SCALE_SETS[args.scales]}
    layouts = ["full", "native"] if args.layout == "both" else ["native" if args.layout == "stride4" else args.layout]
    results = []
    print(f"HMSA fusion {H}x{W}, {args.classes} classes, batch {args.batch}, device {args.device}; "
          f"fused backends {fused}")
    for lay in layouts:
        print(f"  layout {lay}: {LAYOUTS[lay]}")
    head = f"{'scales':<14}{'layout':<9}{'output':<8}{'backend':<10}{'time ms':>10}{'peak+ MB':>10}" \
           f"{'t/ref':>8}{'mem/ref':>9}"
    print(head)
    print("-" * len(head))
    for layout in layouts:
        for name, scales in sets.items():
            for output in ("logits", "labels"):
                ref = None
                for backend in ["reference"] + fused:
                    cfg = dict(device=args.device, scales=list(scales), H=H, W=W, C=args.classes, B=args.batch,
                               layout=layout, output=output, backend=backend, repeat=repeat, warmup=warmup,
                               threads=args.threads)
                    r = run_isolated(cfg) if args.device == "cpu" else run_variant(cfg)
                    if backend == "reference":
                        ref = r
                    r["time_ratio_vs_reference"] = r["time_ms"] / ref["time_ms"]
                    r["memory_ratio_vs_reference"] = r["peak_extra_mb"] / max(ref["peak_extra_mb"], 1e-9)
                    results.append(r)
                    print(f"{name:<14}{layout:<9}{output:<8}{backend:<10}{r['time_ms']:>10.1f}"
                          f"{r['peak_extra_mb']:>10.1f}{r['time_ratio_vs_reference']:>8.2f}"
                          f"{r['memory_ratio_vs_reference']:>9.3f}", flush=True)
    meta = {"torch": torch.__version__, "pyseg": pyseg.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "quick": args.quick, "threads": args.threads, "layouts": {k: LAYOUTS[k] for k in layouts}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "hmsa_fuse", "meta": meta, "results": results}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
