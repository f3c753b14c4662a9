"""Comparison against the public HyperSeg code (github YuvalNirkin/hyperseg), run by hand: predictions, then speed.

Not used by the tests (they need only the committed manifests, tests/data/hyperseg_official_*.json). Needs an
export of their repository (``--hyperseg-src``: the folder that holds their ``hyperseg`` package); their code
runs on the CPU as it is, with one stand-in installed here for what inference does not use (``ffmpeg``, imported
by their utilities for video I/O). No ImageNet trunk is downloaded: each configuration is built with
``pretrained=False`` (random init) and every BatchNorm gets random statistics and affine parameters, so that the
comparison is not trivial.

    # 1. the four released configurations, saved as their train.py saves a checkpoint (random weights),
    #    plus the key -> shape manifests (what tests/data/hyperseg_official_*.json hold)
    python benchmarks/compare_hyperseg.py save --hyperseg-src SRC --out ckpt/ [--manifests tests/data]
    # 2. their model vs pyseg.models.from_official(checkpoint), default path and fuse() + to_channels_last()
    python benchmarks/compare_hyperseg.py compare --hyperseg-src SRC --ckpt-dir ckpt/
    # 3. speed, side by side in one run (table + JSON): each model alone in its own processes, alternating
    #    (--mode interleaved: both in one process, calls alternating)
    python benchmarks/compare_hyperseg.py speed --hyperseg-src SRC --ckpt-dir ckpt/ --threads 2 --rounds 12

The configurations (constructor and arguments of each released checkpoint, as its ``arch`` string records them)
are listed in ``RELEASED``; ``--configs`` picks some. Exit status 1 when a comparison misses the tolerance.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a source checkout run as a script
    sys.path.insert(1, ROOT)

#: name -> (public module, num_classes, input (H, W), constructor keyword arguments): the four checkpoints of
#: release v1.0, with the arguments their ``arch`` strings hold (``pretrained`` is overridden when building).
RELEASED = {
    "cityscapes_efficientnet_b1_hyperseg-m": ("hyperseg_v1_0", 19, (512, 1024), dict(
        levels=2, out_feat_scale=[1.0, 0.25, 0.25, 0.25, 0.25], kernel_sizes=[1, 1, 1, 3, 3],
        level_channels=[64, 32, 16, 16, 16], expand_ratio=2, with_out_fc=False, decoder_dropout=None,
        weight_groups=[32, 16, 8, 16, 4], decoder_groups=1, inference_hflip=True,
        coords_res=[(512, 512), (512, 1024)])),
    "cityscapes_efficientnet_b1_hyperseg-s": ("hyperseg_v1_0_unify", 19, (768, 1536), dict(
        levels=2, out_feat_scale=[1.0, 0.166, 0.2, 0.25, 0.4], kernel_sizes=[1, 1, 1, 3, 3],
        level_channels=[32, 16, 8, 8, 8], expand_ratio=2, with_out_fc=False, decoder_dropout=None,
        weight_groups=[32, 16, 8, 16, 4], decoder_groups=1, inference_hflip=True, unify_level=4,
        coords_res=[(768, 768), (768, 1536)])),
    "camvid_efficientnet_b1_hyperseg-s": ("hyperseg_v1_0", 12, (576, 768), dict(
        levels=2, kernel_sizes=(1, 1, 1, 3, 3), level_channels=[64, 32, 16, 16, 16], expand_ratio=2,
        inference_hflip=True, with_out_fc=False, decoder_dropout=None, weight_groups=[64, 32, 32, 16, 8],
        coords_res=[(576, 576), (576, 768)])),
    "vocsbd_efficientnet_b3_hyperseg-l": ("hyperseg_v0_1", 21, (512, 512), dict(
        levels=3, kernel_sizes=(1, 1, 3, 3, 3, 3), expand_ratio=2, inference_hflip=True, with_out_fc=False,
        decoder_dropout=None, weight_groups=16)),
}
_TRUNK = {"hyperseg-m": "efficientnet-b1", "hyperseg-s": "efficientnet-b1", "hyperseg-l": "efficientnet-b3"}


def setup_public(src: str) -> None:
    """Make their ``hyperseg`` package importable from ``src`` (with the ``ffmpeg`` stand-in)."""
    src = os.path.abspath(src)
    if not os.path.isdir(os.path.join(src, "hyperseg", "models")):
        raise SystemExit(f"--hyperseg-src {src!r}: expected the repository's root (holding hyperseg/models)")
    sys.modules.setdefault("ffmpeg", types.ModuleType("ffmpeg"))
    if src not in sys.path:
        sys.path.insert(0, src)


def _trunk(name: str) -> str:
    return _TRUNK[name.rsplit("_", 1)[-1]]


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random BatchNorm statistics and affine parameters (a non-trivial comparison)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


def build_public(name: str, seed: int = 0):
    """(their model in eval mode, its ``arch`` string as their train.py records it, input (H, W))."""
    import functools
    import importlib

    from hyperseg.utils.utils import get_arch

    module, num_classes, size, kwargs = RELEASED[name]
    ctor = importlib.import_module(f"hyperseg.models.{module}").hyperseg_efficientnet
    released = functools.partial(ctor, _trunk(name), pretrained=True, **kwargs)
    arch = get_arch(released, num_classes=num_classes)  # what the released checkpoint's ``arch`` holds
    torch.manual_seed(seed)
    model = ctor(_trunk(name), pretrained=False, num_classes=num_classes, **kwargs)
    randomize(model, seed + 1)
    return model.eval(), arch, size


def _names(args):
    names = args.configs or list(RELEASED)
    bad = [n for n in names if n not in RELEASED]
    if bad:
        raise SystemExit(f"--configs: unknown {bad}; choose from {list(RELEASED)}")
    return names


def cmd_save(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    for i, name in enumerate(_names(args)):
        model, arch, size = build_public(name, seed=args.seed + 10 * i)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.999))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
        state = {"epoch": 1, "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "best_iou": 0.5, "arch": arch}
        path = os.path.join(args.out, name + ".pth")
        torch.save(state, path)
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters -> {path}\n  arch: {arch}")
        if args.manifests:
            man = {"arch": arch, "input_size": list(size),
                   "tensors": {k: list(v.shape) for k, v in model.state_dict().items()}}
            with open(os.path.join(args.manifests, f"hyperseg_official_{name}.json"), "w") as f:
                json.dump(man, f, indent=0)
    return 0


def _load_public(name: str, ckpt_dir: str):
    model, _, size = build_public(name)
    path = os.path.join(ckpt_dir, name + ".pth")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    return model.eval(), path, size


def cmd_compare(args) -> int:
    from pyseg.models import from_official

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, float32, CPU, {args.threads} threads; checkpoints saved as the public "
          f"train.py saves them (random init, random BatchNorm statistics); tolerance {args.tol:g} of max|logit|")
    worst = 0.0
    for name in _names(args):
        public, path, (h, w) = _load_public(name, args.ckpt_dir)
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(123))
        with torch.inference_mode():
            ref = public(x)
            del public
            model = from_official(path)
            got = model(x)
            model.fuse().to_channels_last()
            got_fast = model(x.contiguous(memory_format=torch.channels_last))
        scale = ref.abs().max().item()
        e1, e2 = ((g - ref).abs().max().item() / scale for g in (got, got_fast))
        agree = (got_fast.argmax(1) == ref.argmax(1)).double().mean().item()
        worst = max(worst, e1, e2)
        print(f"{name}: {w}x{h}, logits {tuple(ref.shape)}, max|logit| {scale:.4g}; max|pyseg - public| / max|logit|:"
              f" default {e1:.2e}, fuse() + to_channels_last() {e2:.2e}; argmax equal on {agree:.6f} of pixels"
              f" -- {'PASS' if max(e1, e2) <= args.tol else 'FAIL'}", flush=True)
    print(f"worst {worst:.2e}: {'PASS' if worst <= args.tol else 'FAIL'}")
    return 0 if worst <= args.tol else 1


_PUBLIC, _PYSEG = "public (eager, NCHW)", "pyseg from_official + fuse() + channels_last"


def _speed_models(name: str, ckpt_dir: str, which=(_PUBLIC, _PYSEG)):
    """{label: callable} of the models to time, their input size and the pyseg-vs-public error."""
    from pyseg.models import from_official

    public, path, (h, w) = _load_public(name, ckpt_dir)
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    xcl = x.contiguous(memory_format=torch.channels_last)
    runs, err = {}, None
    with torch.inference_mode():
        if _PYSEG in which:
            model = from_official(path).fuse().to_channels_last()
            ref = public(x)
            err = ((model(xcl) - ref).abs().max() / ref.abs().max()).item()
            runs[_PYSEG] = lambda: model(xcl)
    if _PUBLIC in which:
        runs[_PUBLIC] = lambda: public(x)
    else:
        del public
    return runs, (h, w), err


def _time(runs: dict, rounds: int) -> dict:
    """Latencies (ms) of ``rounds`` calls of each run, interleaved, after 2 warm-up calls each."""
    lat = {k: [] for k in runs}
    with torch.inference_mode():
        for f in runs.values():
            f(), f()
        for _ in range(rounds):
            for k, f in runs.items():
                t = time.perf_counter()
                f()
                lat[k].append((time.perf_counter() - t) * 1e3)
    return lat


def cmd_time_one(args) -> int:  # internal: one model in this process (``speed --mode process``)
    torch.set_num_threads(args.threads)
    runs, _, _ = _speed_models(args.configs[0], args.ckpt_dir, which=(args.which,))
    print("LATENCIES " + json.dumps(_time(runs, args.rounds)[args.which]))
    return 0


def cmd_speed(args) -> int:
    import subprocess

    torch.set_num_threads(args.threads)
    name = _names(args)[0] if args.configs else "cityscapes_efficientnet_b1_hyperseg-m"  # the first one
    runs, (h, w), err = _speed_models(name, args.ckpt_dir)
    if args.mode == "interleaved":
        lat = _time(runs, args.rounds)
        how = f"{args.rounds} interleaved rounds in one process after 2 warm-up calls each"
    else:
        del runs
        lat = {_PUBLIC: [], _PYSEG: []}
        per = max(1, -(-args.rounds // args.processes))
        for _ in range(args.processes):
            for which in (_PUBLIC, _PYSEG):
                cmd = [sys.executable, os.path.abspath(__file__), "_time_one", "--hyperseg-src", args.hyperseg_src,
                       "--configs", name, "--ckpt-dir", args.ckpt_dir, "--threads", str(args.threads),
                       "--rounds", str(per), "--which", which]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                lat[which] += json.loads(out.split("LATENCIES ", 1)[1].splitlines()[0])
        how = (f"{args.processes} processes per model, alternating, each timing {per} calls after 2 warm-up calls "
               f"(each model alone in its process: neither inherits the other's allocator and page-fault state)")
    base = statistics.median(lat[_PUBLIC])
    print(f"{name}, {w}x{h}, batch 1, float32, CPU {platform.machine()}, {args.threads} threads, torch "
          f"{torch.__version__}; {how}; max|pyseg - public| / max|logit| = {err:.2e}")
    print(f"{'model':46s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s} {'speed-up':>9s}")
    rec = {}
    for k, v in lat.items():
        med = statistics.median(v)
        print(f"{k:46s} {med:10.1f} {min(v):8.1f} {max(v):8.1f} {base / med:8.2f}x")
        rec[k] = {"median_ms": med, "min_ms": min(v), "max_ms": max(v), "speedup_vs_public": base / med,
                  "latencies_ms": v}
    out = {"config": name, "threads": args.threads, "mode": args.mode, "calls": len(lat[_PUBLIC]), "size": [h, w],
           "rel_err": err, "torch": torch.__version__, "results": rec}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print("JSON " + json.dumps(out))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    cmds = {"save": cmd_save, "compare": cmd_compare, "speed": cmd_speed, "_time_one": cmd_time_one}
    for name in cmds:
        p = sub.add_parser(name)
        p.add_argument("--hyperseg-src", required=True, help="an export of github.com/YuvalNirkin/hyperseg")
        p.add_argument("--configs", nargs="+", help=f"released configurations (default: all): {list(RELEASED)}")
    s = sub.choices["save"]
    s.add_argument("--out", required=True, help="folder for the checkpoints")
    s.add_argument("--manifests", help="also write key -> shape manifests (hyperseg_official_<name>.json) here")
    s.add_argument("--seed", type=int, default=0)
    for name in ("compare", "speed", "_time_one"):
        p = sub.choices[name]
        p.add_argument("--ckpt-dir", required=True, help="the folder `save` wrote")
        p.add_argument("--threads", type=int, default=2)
    sub.choices["compare"].add_argument("--tol", type=float, default=1e-4)
    sp = sub.choices["speed"]
    sp.add_argument("--rounds", type=int, default=12, help="timed calls per model")
    sp.add_argument("--mode", choices=("process", "interleaved"), default="process",
                    help="process (default): each model timed alone in its own processes, alternating; "
                         "interleaved: both in this process, calls alternating")
    sp.add_argument("--processes", type=int, default=3, help="processes per model (--mode process)")
    sp.add_argument("--json", help="write the result here")
    sub.choices["_time_one"].add_argument("--rounds", type=int, required=True)
    sub.choices["_time_one"].add_argument("--which", choices=(_PUBLIC, _PYSEG), required=True)
    args = ap.parse_args(argv)
    setup_public(args.hyperseg_src)
    return cmds[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
