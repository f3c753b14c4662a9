#!/usr/bin/env python
"""ONNX decompositions of the dynamic decoder ops, timed in ONNX Runtime (CPU EP) side by side.

    python benchmarks/bench_onnx_ops.py --threads 2 --json bench_onnx_ops.json

For each HyperSeg-M decoder level at 1024x512 (batch 1), three ONNX files of the same op are exported
and timed in one process, iterations interleaved:

* ``pyseg_dynamic``: pyseg's translation (pyseg/export/onnx_ops.py) exported with a dynamic batch:
  batched MatMul over patches (haloed patches gathered for the meta block), depthwise taps as
  Slice/Mul/Add;
* ``pyseg_static``: the same exported with a static batch: the meta block as grouped Convs over the
  gathered haloed patches (the 1x1 level stays a MatMul);
* ``grouped_conv``: the public HyperSeg method written in PyTorch (reflect pad, unfold haloed patches,
  Conv with one group per (sample, patch); pyseg.ops.reference.meta_block ``method="grouped"``),
  exported by torch's exporter: its ``group`` attribute is B*gh*gw, so the file has a fixed batch;
* ``per_pixel`` (the 1x1 level only; for the meta blocks its (hid, Cin, 9, H, W) product would need
  gigabytes): the weight grid nearest-upsampled to every pixel and a broadcast multiply-reduce (the
  translation's fallback for sizes the grid does not divide).

plus eager pyseg (the compiled CPU kernel) for scale. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import pyseg  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import pyseg  # noqa: F401

import torch
from torch import nn

from pyseg.ops import reference

# HyperSeg-M at 1024x512: (name, Cin, hid, Cout, H, W, kernel) with a 16x32 patch grid
LEVELS = [("level 2 (1x1, stride 8)", 44, 0, 16, 64, 128, 1),
          ("level 3 (meta block, stride 4)", 24, 48, 16, 128, 256, 3),
          ("level 4 (meta block, stride 2)", 34, 68, 19, 256, 512, 3)]
GRID = (16, 32)


class _Op(nn.Module):
    def __init__(self, method, hid, cout, scale, shift):
        super().__init__()
        self.method, self.hid, self.cout = method, hid, cout
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x, weight):
        hid, cout = self.hid, self.cout
        if hid == 0:  # pointwise level
            if self.method.startswith("pyseg"):
                return torch.ops.pyseg.pointwise_block(x, weight, self.scale, self.shift)
            B, _, gh, gw = weight.shape
            w = weight.reshape(B, cout, -1, 1, 1, gh, gw)
            if self.method == "grouped_conv":
                return torch.relu(_grouped_pointwise(x, w) * self.scale.view(-1, 1, 1) + self.shift.view(-1, 1, 1))
            y = _per_pixel_pw(x, w)
            return torch.relu(y * self.scale.view(-1, 1, 1) + self.shift.view(-1, 1, 1))
        if self.method.startswith("pyseg"):
            return torch.ops.pyseg.meta_block(x, weight, self.scale, self.shift, hid, cout)
        w1, w2, w3 = reference.meta_block.split_meta_weight(weight, x.shape[1], hid, cout)
        s, t = self.scale, self.shift
        return reference.meta_block.meta_block(x, w1, w2, w3, s[:hid], t[:hid], s[hid:2 * hid], t[hid:2 * hid],
                                               s[2 * hid:], t[2 * hid:],
                                               method="grouped" if self.method == "grouped_conv" else "per_pixel")


def _grouped_pointwise(x, w):
    B, Cin, H, W = x.shape
    _, Cout, _, _, _, gh, gw = w.shape
    ph, pw = H // gh, W // gw
    P = B * gh * gw
    xp = x.reshape(B, Cin, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(1, P * Cin, ph, pw)
    k = w.reshape(B, Cout, Cin, gh, gw).permute(0, 3, 4, 1, 2).reshape(P * Cout, Cin, 1, 1)
    y = torch.nn.functional.conv2d(xp, k, groups=P)
    return y.reshape(B, gh, gw, Cout, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(B, Cout, H, W)


def _per_pixel_pw(x, w):
    B, Cin, H, W = x.shape
    _, Cout, _, _, _, gh, gw = w.shape
    wp = w.reshape(B, Cout, Cin, gh, gw).repeat_interleave(H // gh, 3).repeat_interleave(W // gw, 4)
    return (wp * x.unsqueeze(1)).sum(2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--json", default="bench_onnx_ops.json")
    p.add_argument("--methods", default="pyseg_dynamic,pyseg_static,grouped_conv,per_pixel")
    args = p.parse_args(argv)
    import onnxruntime as ort

    import pyseg.export  # noqa: F401  (registers the translations)

    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cin, hid, cout, H, W, k in LEVELS:
            g = torch.Generator().manual_seed(0)
            n = cout * cin if hid == 0 else hid * cin + 9 * hid + cout * hid
            c = cout if hid == 0 else 2 * hid + cout
            x = torch.randn(1, cin, H, W, generator=g)
            w = torch.randn(1, n, *GRID, generator=g) * 0.2
            scale, shift = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.1
            runners, outs = {}, {}
            eager = _Op("pyseg", hid, cout, scale, shift).eval()
            with torch.no_grad():
                ref = eager(x, w)
            runners["eager pyseg (C++ kernel)"] = lambda e=eager: e(x, w)
            for m in methods:
                if m == "per_pixel" and hid:
                    continue
                path = os.path.join(tmp, f"{m}.onnx")
                t0 = time.perf_counter()
                dyn = None
                if m == "pyseg_dynamic":  # exported from a batch-2 example (a size-1 dim would specialise)
                    b = {0: torch.export.Dim("batch", min=1, max=64)}
                    dyn = (b, b)
                ex = (x, w) if dyn is None else (x.repeat(2, 1, 1, 1), w.repeat(2, 1, 1, 1))
                torch.onnx.export(_Op(m, hid, cout, scale, shift).eval(), ex, path, dynamo=True,
                                  opset_version=18, optimize=True, dynamic_shapes=dyn)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
                sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
                feeds = {sess.get_inputs()[0].name: x.numpy(), sess.get_inputs()[1].name: w.numpy()}
                outs[m] = torch.from_numpy(sess.run(None, feeds)[0])
                runners[f"ORT {m}"] = lambda s=sess, f=feeds: s.run(None, f)
                print(f"{name}: exported {m} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            lat = {r: [] for r in runners}
            with torch.no_grad():
                for r in runners.values():
                    r()
                for _ in range(args.iters):
                    for key, r in runners.items():
                        t0 = time.perf_counter()
                        r()
                        lat[key].append(time.perf_counter() - t0)
            peak = float(ref.abs().max())
            for key, v in lat.items():
                m = key.replace("ORT ", "")
                diff = float((outs[m] - ref).abs().max()) / peak if m in outs else 0.0
                rows.append({"level": name, "variant": key, "median_ms": statistics.median(v) * 1e3,
                             "iters": len(v), "max_rel_diff_vs_eager": diff})
    print(f"ONNX Runtime {ort.__version__}, CPU EP, {args.threads} threads; torch {torch.__version__}; batch 1; "
          f"HyperSeg-M decoder shapes at 1024x512, grid {GRID[0]}x{GRID[1]}")
    print(f"{'level':<32}{'variant':<28}{'median ms':>10}{'rel diff':>10}")
    for r in rows:
        print(f"{r['level']:<32}{r['variant']:<28}{r['median_ms']:>10.2f}{r['max_rel_diff_vs_eager']:>10.1e}")
    with open(args.json, "w") as f:
        json.dump({"threads": args.threads, "onnxruntime": ort.__version__, "torch": torch.__version__,
                   "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
