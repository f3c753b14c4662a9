"""Benchmark of the fused HyperSeg decoder blocks (meta block and 1x1 level) vs the reference.

For every decoder level of HyperSeg-M (1024x512, grid 16x32) and HyperSeg-S (1536x768, grid 24x48)
it times, side by side in one run, eval mode (BatchNorm folded into per-channel affines):

* ``fused``     pyseg.ops.meta_block / pointwise_block with a fused backend (cpu, cuda, triton);
* ``reference`` the pure-PyTorch reference (the public implementation's unfold + grouped convs);
* ``chain``     a chain of separate ops, each materialising its output: pyseg.ops.patchwise_conv2d
                (compiled backend when built, else its reference) for pw1, dw 3x3 and pw2 with the
                affines/activations in between. For the meta block this is the *chained PatchWiseConv2d*
                semantics (the dw halo reads the neighbour patch's pw1 output), i.e. a cost baseline
                only, not the same function.

Bytes moved = x read + weights read + y written (the floor for a fused kernel); on a GPU the achieved
bandwidth is also given as % of the measured device copy bandwidth (roofline). Prints a table and
writes JSON (--json).

    python benchmarks/bench_meta_block.py --device cpu --threads 2
    python benchmarks/bench_meta_block.py --device cuda --dtype fp32 --json out.json
    python benchmarks/bench_meta_block.py --device cuda --backend triton --backward --json out_bwd.json

``--backward`` times forward + backward (autograd.grad of x, the weights and the affines) for every
column instead of the forward; the bytes/roofline columns still count the forward's traffic only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import copy_bandwidth, time_fn  # noqa: E402

import pyseg  # noqa: E402
from pyseg.ops import meta_block, patchwise_conv2d, pointwise_block  # noqa: E402
from pyseg.ops.meta_block import meta_weight_numel  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

# (model, level, kind, Cin, Cout, H, W, gh, gw). Channels: decoder input = 2 coords + reduced skip +
# previous level (pyseg.models.configs); kernel 3 levels are meta blocks with hid = 2*Cin.
LEVELS = [
    ("hyperseg-m", 0, "1x1", 82, 64, 16, 32, 16, 32),
    ("hyperseg-m", 1, "1x1", 94, 32, 32, 64, 16, 32),
    ("hyperseg-m", 2, "1x1", 44, 16, 64, 128, 16, 32),
    ("hyperseg-m", 3, "meta", 24, 16, 128, 256, 16, 32),
    ("hyperseg-m", 4, "meta", 34, 19, 256, 512, 16, 32),
    # HyperSeg-S channel counts derived from its out_feat_scale/level_channels (pyseg.models.configs).
    ("hyperseg-s", 0, "1x1", 130, 32, 24, 48, 24, 48),
    ("hyperseg-s", 1, "1x1", 62, 16, 48, 96, 24, 48),
    ("hyperseg-s", 2, "1x1", 26, 8, 96, 192, 24, 48),
    ("hyperseg-s", 3, "meta", 14, 8, 192, 384, 24, 48),
    ("hyperseg-s", 4, "meta", 26, 19, 384, 768, 24, 48),
]


def _relu6(t):
    return t.clamp(0, 6)


def chain_meta(x, w, hid, Cout, aff):
    """Separate ops with materialised intermediates (chained PatchWiseConv2d semantics)."""
    B, Cin, H, W = x.shape
    gh, gw = w.shape[-2:]
    n1, n2 = hid * Cin, 9 * hid
    (s1, t1), (s2, t2), (s3, t3) = aff
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    h = patchwise_conv2d(x, w[:, :n1], kernel_size=1)
    h = _relu6(h * v(s1) + v(t1))
    h = patchwise_conv2d(h, w[:, n1:n1 + n2], padding=1, padding_mode="reflect", groups=hid, kernel_size=3)
    h = _relu6(h * v(s2) + v(t2))
    y = patchwise_conv2d(h, w[:, n1 + n2:], kernel_size=1)
    return y * v(s3) + v(t3)


def chain_1x1(x, w, aff):
    s, t = aff
    y = patchwise_conv2d(x, w, kernel_size=1)
    return torch.relu(y * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small maps and few iterations (CI smoke test)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--models", default="hyperseg-m,hyperseg-s")
    p.add_argument("--backend", default=None, help="fused backend (default: cpu on CPU, cuda on GPU)")
    p.add_argument("--no-chain", action="store_true", help="skip the chain-of-ops baseline")
    p.add_argument("--backward", action="store_true",
                   help="time forward + backward (gradients of x, the weights and the affines) instead of the forward")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    backends = pyseg.backends()
    fused = args.backend or ("cuda" if device.type == "cuda" else "cpu")
    if not backends.get(fused, {}).get("available"):
        if device.type == "cuda" and backends["triton"]["available"]:
            fused = "triton"
        else:
            print(f"fused backend {fused!r} unavailable ({backends.get(fused, {}).get('detail')}); "
                  "timing the reference only")
            fused = None
    iters = args.iters or (3 if args.quick else (50 if device.type == "cuda" else 10))
    warmup = 1 if args.quick else (5 if device.type == "cuda" else 2)
    bw = copy_bandwidth(device, nbytes=256 << 20, iters=10) if device.type == "cuda" else None

    models = args.models.split(",")
    rows = []
    g = torch.Generator().manual_seed(0)
    for model, level, kind, Cin, Cout, H, W, gh, gw in LEVELS:
        if model not in models:
            continue
        if args.quick:  # same channels and grid, patch size <= 2
            H, W = min(H, 2 * gh), min(W, 2 * gw)
        B = args.batch
        x = torch.randn(B, Cin, H, W, generator=g).to(device, dtype)
        if kind == "meta":
            hid = 2 * Cin
            N = meta_weight_numel(Cin, hid, Cout)
            w = (torch.randn(B, N, gh, gw, generator=g) / Cin ** 0.5).to(device, dtype)
            aff = [((torch.rand(c, generator=g) + 0.5).to(device, dtype), (torch.randn(c, generator=g) * 0.1)
                    .to(device, dtype)) for c in (hid, hid, Cout)]
            runs = {"reference": lambda: meta_block(x, w, hid, Cout, *aff, backend="reference")}
            if fused:
                runs["fused"] = lambda: meta_block(x, w, hid, Cout, *aff, backend=fused)
            if not args.no_chain:
                runs["chain"] = lambda: chain_meta(x, w, hid, Cout, aff)
            flops = 2 * B * gh * gw * ((H // gh + 2) * (W // gw + 2) * hid * Cin + (H // gh) * (W // gw) *
                                      (9 * hid + Cout * hid))
        else:
            hid = 0
            N = Cout * Cin
            w = (torch.randn(B, N, gh, gw, generator=g) / Cin ** 0.5).to(device, dtype)
            a = ((torch.rand(Cout, generator=g) + 0.5).to(device, dtype),
                 (torch.randn(Cout, generator=g) * 0.1).to(device, dtype))
            runs = {"reference": lambda: pointwise_block(x, w, a, backend="reference")}
            if fused:
                runs["fused"] = lambda: pointwise_block(x, w, a, backend=fused)
            if not args.no_chain:
                runs["chain"] = lambda: chain_1x1(x, w, a)
            flops = 2 * B * H * W * Cin * Cout
        if args.backward:  # forward + autograd.grad w.r.t. every input
            pairs = aff if kind == "meta" else [a]
            leaves = [x.requires_grad_(), w.requires_grad_()] + [t.requires_grad_() for pr in pairs for t in pr]
            gy = torch.randn(B, Cout, H, W, generator=g).to(device, dtype)
            runs = {k: (lambda f=f, leaves=leaves, gy=gy: torch.autograd.grad(f(), leaves, gy))
                    for k, f in runs.items()}
        esize = x.element_size()
        nbytes = (x.numel() + w.numel() + B * Cout * H * W) * esize
        row = {"model": model, "level": level, "kind": kind, "B": B, "Cin": Cin, "hid": hid, "Cout": Cout,
               "H": H, "W": W, "gh": gh, "gw": gw, "bytes": nbytes, "flops": flops}
        with torch.enable_grad() if args.backward else torch.no_grad():
            for name, fn in runs.items():
                try:
                    ms = time_fn(fn, device, warmup, iters)["median_ms"]
                except Exception as e:  # report, keep going
                    row[f"{name}_error"] = f"{type(e).__name__}: {e}"
                    continue
                row[f"{name}_ms"] = ms
                row[f"{name}_GBps"] = nbytes / (ms * 1e-3) / 1e9
                if bw:
                    row[f"{name}_roofline_pct"] = 100 * row[f"{name}_GBps"] / bw
        if "fused_ms" in row:
            for other in ("reference", "chain"):
                if f"{other}_ms" in row:
                    row[f"speedup_vs_{other}"] = row[f"{other}_ms"] / row["fused_ms"]
        rows.append(row)

    hdr = (f"{'model':<11}{'lvl':>4}{'kind':>6}{'Cin>Cout':>10}{'map':>10}{'MB':>8}{'fused ms':>10}"
           f"{'ref ms':>10}{'chain ms':>10}{'x ref':>7}{'x chain':>8}{'GB/s':>8}" + ("  %copy" if bw else ""))
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()}) "
          f"dtype={args.dtype} batch={args.batch} threads={torch.get_num_threads()} fused={fused} "
          f"mode={'forward+backward' if args.backward else 'forward'} "
          f"torch={torch.__version__}" + (f" copy_bw={bw:.0f} GB/s" if bw else ""))
    print(hdr)
    f = lambda r, k, fmt: format(r[k], fmt) if k in r else "-"  # noqa: E731
    for r in rows:
        print(f"{r['model']:<11}{r['level']:>4}{r['kind']:>6}{str(r['Cin']) + '>' + str(r['Cout']):>10}"
              f"{str(r['H']) + 'x' + str(r['W']):>10}{r['bytes'] / 1e6:>8.2f}{f(r, 'fused_ms', '.3f'):>10}"
              f"{f(r, 'reference_ms', '.3f'):>10}{f(r, 'chain_ms', '.3f'):>10}"
              f"{f(r, 'speedup_vs_reference', '.2f'):>7}{f(r, 'speedup_vs_chain', '.2f'):>8}"
              f"{f(r, 'fused_GBps', '.1f'):>8}" + (f"{f(r, 'fused_roofline_pct', '.1f'):>7}" if bw else ""))
        for k in [k for k in r if k.endswith("_error")]:
            print(f"    {k}: {r[k]}")
    result = {
        "benchmark": "meta_block", "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "mode": "forward+backward" if args.backward else "forward", "dtype": args.dtype, "batch": args.batch, "threads": torch.get_num_threads(), "quick": args.quick,
        "iters": iters, "warmup": warmup, "fused_backend": fused, "torch": torch.__version__,
        "pyseg": pyseg.__version__, "copy_bandwidth_GBps": bw, "eval_mode_bn_folded": True, "rows": rows,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
