"""Benchmark of pyseg.ops.patchwise_conv2d on HyperSeg-M decoder shapes (pyseg.models.configs).

Every available backend vs the pure-PyTorch reference (measured side by side in one run), and vs
F.conv2d with one static weight of the same shape ("price of dynamism"); forward and
forward+backward. GPU: CUDA-event medians, achieved GB/s (bytes = read x + weights (+bias) +
write y) and % of a copy bandwidth measured in the same run. CPU: perf_counter medians.

    python benchmarks/bench_patchwise_conv2d.py --device cuda --dtype float16 --json out.json
    python benchmarks/bench_patchwise_conv2d.py --device cpu --threads 1 --quick
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import copy_bandwidth, env_info, time_fn  # noqa: E402

import pyseg  # noqa: E402
from pyseg.ops import patchwise_conv2d  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

# HyperSeg-M, 1024x512 input, grid 16x32 (32 px patches at the input resolution).
# (name, Cin, Cout, H, W, k, groups, grid)
HYPERSEG_M = [
    ("L0 82->64 k1 32x64", 82, 64, 32, 64, 1, 1, (16, 32)),
    ("L1 94->32 k1 64x128", 94, 32, 64, 128, 1, 1, (16, 32)),
    ("L2 44->16 k1 128x256", 44, 16, 128, 256, 1, 1, (16, 32)),
    ("L3 pw1 24->48 k1 256x512", 24, 48, 256, 512, 1, 1, (16, 32)),
    ("L3 dw 48 k3 256x512", 48, 48, 256, 512, 3, 48, (16, 32)),
    ("L3 pw2 48->16 k1 256x512", 48, 16, 256, 512, 1, 1, (16, 32)),
]
# pyseg.nn.PatchWiseConv2d at the HyperSeg-M decoder shapes kernels/_aot.py lists (and benchmarks/roofline.py
# models): level 0 at its real 16x32 map, level 4 as a dense and a depthwise 3x3 layer.
MODEL_SHAPES = [
    ("M L0 82->64 k1 16x32", 82, 64, 16, 32, 1, 1, (16, 32)),
    ("M L4 34->19 k3 256x512", 34, 19, 256, 512, 3, 1, (16, 32)),
    ("M L4 dw 34 k3 256x512", 34, 34, 256, 512, 3, 34, (16, 32)),
]
SWEEP = [
    ("sweep 32->32 k3 64x64 g8x8", 32, 32, 64, 64, 3, 1, (8, 8)),
    ("sweep 64->64 k3 dw 128x128 g8x8", 64, 64, 128, 128, 3, 64, (8, 8)),
    ("sweep 16->16 k5 g4 96x96 g6x6", 16, 16, 96, 96, 5, 4, (6, 6)),
    ("sweep 128->128 k1 16x32 g16x32", 128, 128, 16, 32, 1, 1, (16, 32)),
]


def available_backends(device: torch.device):
    info = pyseg.backends()
    out = ["reference"]
    if device.type == "cpu" and info["cpu"]["available"]:
        out.append("cpu")
    if device.type == "cuda" and info["cuda"]["available"]:
        out.append("cuda")
    if device.type == "cuda" and info["triton"]["available"]:
        try:
            importlib.import_module("pyseg.kernels.patchwise_conv2d")
            out.append("triton")
        except ImportError:
            pass
    return out


def run_case(case, device, dtype, quick, iters):
    name, Cin, Cout, H, W, k, groups, grid = case
    if quick:  # 1/4 of the resolution, same grid where possible
        H, W = max(H // 4, grid[0]), max(W // 4, grid[1])
    gh, gw = grid
    B = 1
    x = torch.randn(B, Cin, H, W, device=device, dtype=dtype)
    w = torch.randn(B, Cout, Cin // groups, k, k, gh, gw, device=device, dtype=dtype) / (Cin // groups * k * k) ** 0.5
    b = torch.randn(B, Cout, gh, gw, device=device, dtype=dtype)
    w_static = w[0, ..., 0, 0].contiguous()
    b_static = b[0, :, 0, 0].contiguous()
    pad = k // 2
    nbytes = (x.numel() + w.numel() + b.numel() + B * Cout * H * W) * x.element_size()
    rows = []

    def fwd_fn(backend):
        if backend == "static conv2d":
            return lambda: F.conv2d(x, w_static, b_static, 1, pad, 1, groups)
        return lambda: patchwise_conv2d(x, w, b, 1, pad, 1, groups, backend=backend)

    def fwdbwd_fn(backend):
        xr = x.detach().clone().requires_grad_()
        if backend == "static conv2d":
            wr = w_static.detach().clone().requires_grad_()
            br = b_static.detach().clone().requires_grad_()
            f = lambda: F.conv2d(xr, wr, br, 1, pad, 1, groups)  # noqa: E731
        else:
            wr = w.detach().clone().requires_grad_()
            br = b.detach().clone().requires_grad_()
            f = lambda: patchwise_conv2d(xr, wr, br, 1, pad, 1, groups, backend=backend)  # noqa: E731
        gy = torch.randn(B, Cout, H, W, device=device, dtype=dtype)

        def run():
            y = f()
            torch.autograd.grad(y, (xr, wr, br), gy)
        return run

    backends = available_backends(device) + ["static conv2d"]
    for mode, maker in (("fwd", fwd_fn), ("fwd+bwd", fwdbwd_fn)):
        res = {}
        for be in backends:
            fn = maker(be)
            it = max(3, iters // 4) if be == "reference" and device.type == "cpu" else iters
            res[be] = time_fn(fn, device, warmup=2 if device.type == "cpu" else 10, iters=it)
        ref = res["reference"]["median_ms"]
        static = res["static conv2d"]["median_ms"]
        for be in backends:
            t = res[be]
            row = {"case": name, "shape": [B, Cin, H, W], "Cout": Cout, "k": k, "groups": groups, "grid": list(grid),
                   "mode": mode, "backend": be, "median_ms": t["median_ms"], "p90_ms": t["p90_ms"],
                   "speedup_vs_reference": ref / t["median_ms"], "vs_static_conv2d": t["median_ms"] / static,
                   "bytes_fwd": nbytes}
            if device.type == "cuda" and mode == "fwd":
                row["GBps"] = nbytes / (t["median_ms"] * 1e-3) / 1e9
            rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="small shapes, few iterations (CI smoke test)")
    p.add_argument("--json", default=None, help="write results + environment to this JSON file")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--iters", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    iters = args.iters or (3 if args.quick else (50 if device.type == "cuda" else 10))
    torch.manual_seed(0)

    env = env_info(device)
    copy_gbps = None
    if device.type == "cuda":
        copy_gbps = copy_bandwidth(device, nbytes=(1 << 28) if args.quick else (1 << 30))
        env["copy_GBps"] = copy_gbps
    cases = HYPERSEG_M[:3] if args.quick else HYPERSEG_M + MODEL_SHAPES + SWEEP
    rows = []
    for case in cases:
        rows += run_case(case, device, dtype, args.quick, iters)
    for r in rows:
        if "GBps" in r and copy_gbps:
            r["pct_copy_bw"] = 100.0 * r["GBps"] / copy_gbps

    print(f"# patchwise_conv2d on {env['device_name']} ({args.device}, {args.dtype}, threads={env['threads']}, "
          f"torch {env['torch']}){'  copy bw %.0f GB/s' % copy_gbps if copy_gbps else ''}")
    hdr = f"{'case':34s} {'mode':8s} {'backend':14s} {'median ms':>10s} {'p90 ms':>9s} {'vs ref':>8s} {'vs static':>9s}"
    if device.type == "cuda":
        hdr += f" {'GB/s':>8s} {'%copy':>6s}"
    print(hdr)
    for r in rows:
        line = (f"{r['case']:34s} {r['mode']:8s} {r['backend']:14s} {r['median_ms']:10.3f} {r['p90_ms']:9.3f} "
                f"{r['speedup_vs_reference']:7.2f}x {r['vs_static_conv2d']:8.2f}x")
        if "GBps" in r:
            line += f" {r['GBps']:8.1f} {r.get('pct_copy_bw', float('nan')):5.1f}%"
        print(line)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"benchmark": "patchwise_conv2d", "args": vars(args), "env": env, "results": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
