"""Numerical comparison against NVIDIA's own HMSA code (github NVIDIA/semantic-segmentation), run by hand.

Not used by the tests (they need only the committed manifests, tests/data/nvidia_*.json). Needs a checkout of
their repository (``--nvidia-src``); their code runs on the CPU with small stand-ins installed here for what
inference does not use: ``apex`` (``amp.float_function`` as identity, ``parallel.SyncBatchNorm`` as torch's),
``runx.logx``, their ``utils.misc`` (only ``fmt_scale`` is used by the networks), ``np.int``; no ImageNet
trunk is downloaded (random init).

    # 1. their model, random init + random BatchNorm statistics, saved as their training code saves it,
    #    plus the key -> shape manifest (what tests/data/nvidia_*.json hold)
    python benchmarks/compare_nvidia.py save --nvidia-src SRC --arch ocrnet.HRNet_Mscale --out hrnet.pth
    # 2. their `pred` (cfg.MODEL.N_SCALES, nscale_forward) vs pyseg.models.from_official(checkpoint)
    python benchmarks/compare_nvidia.py compare --nvidia-src SRC --arch ocrnet.HRNet_Mscale --ckpt hrnet.pth \\
        --size 512x1024 --scales 0.5,1.0 0.5,1.0,2.0
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_nvidia(src: str):
    """Import their config and network package from ``src`` with the stand-ins; returns their cfg."""
    import numpy as np

    sys.path.insert(0, os.path.abspath(src))
    if not hasattr(np, "int"):
        np.int = int
    apex = types.ModuleType("apex")
    apex.__path__ = []
    apex.amp = types.SimpleNamespace(float_function=lambda f: f)
    apex.parallel = types.ModuleType("apex.parallel")
    apex.parallel.SyncBatchNorm = torch.nn.SyncBatchNorm
    runx = types.ModuleType("runx")
    runx.logx = types.ModuleType("runx.logx")
    runx.logx.logx = types.SimpleNamespace(msg=lambda *a, **k: None)
    misc = types.ModuleType("utils.misc")
    misc.fmt_scale = lambda prefix, scale: f"{prefix}_{float(scale)}x"
    sys.modules.update({"apex": apex, "apex.parallel": apex.parallel, "runx": runx, "runx.logx": runx.logx})
    import utils  # noqa: F401  (their package; its misc module is replaced)

    sys.modules["utils.misc"] = misc
    from config import cfg

    cfg.MODEL.BNFUNC = torch.nn.BatchNorm2d
    cfg.OPTIONS.TORCH_VERSION = float(".".join(torch.__version__.split(".")[:2]))
    import network.hrnetv2 as hrnet
    import network.Resnet as resnet
    import network.utils as nutils

    nutils.resnet50 = functools.partial(resnet.resnet50, pretrained=False)  # no ImageNet download
    hrnet.HighResolutionNet.init_weights.__defaults__ = ("",)  # no HRNet ImageNet file
    return cfg


def build(cfg, arch: str, num_classes: int = 19):
    from network import get_model

    cfg.DATASET.NUM_CLASSES = num_classes
    return get_model("network." + arch, num_classes=num_classes, criterion=None)


@torch.no_grad()
def randomize(net, seed: int):
    """Random BatchNorm affine; statistics of one train-mode pass over random images (so activations keep a
    sensible scale), then perturbed."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.momentum = None
        m.reset_running_stats()
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    net.train()
    x = torch.randn(2, 3, 128, 256, generator=g)
    net._fwd(x) if hasattr(net, "ocr") else net._fwd(x, scale_float=torch.ones(2))
    for m in bns:
        m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 0.4 + 0.8)
        m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.1 * m.running_var.sqrt())
        m.momentum = 0.1
    return net.eval()


def cmd_save(args):
    cfg = setup_nvidia(args.nvidia_src)
    torch.manual_seed(args.seed)
    net = randomize(build(cfg, args.arch, args.num_classes), args.seed)
    wrapped = torch.nn.DataParallel(net)  # their net is wrapped: keys carry `module.`
    optim = torch.optim.SGD(wrapped.parameters(), lr=0.002, momentum=0.9, weight_decay=1e-4)
    # the dict their utils/misc.py hands to runx's save_model (a torch.save of it)
    torch.save({"epoch": 3, "arch": args.arch, "num_classes": args.num_classes, "state_dict": wrapped.state_dict(),
                "optimizer": optim.state_dict(), "mean_iu": 0.123, "command": f"--arch {args.arch}"}, args.out)
    man = {"arch": args.arch, "num_classes": args.num_classes, "parameters": sum(p.numel() for p in net.parameters()),
           "state_dict": {k: list(v.shape) for k, v in wrapped.state_dict().items()}}
    with open(os.path.splitext(args.out)[0] + "_manifest.json", "w") as f:
        json.dump(man, f)
    print(f"{args.arch}: {man['parameters']:,} parameters, {len(man['state_dict'])} tensors -> {args.out}")


def cmd_compare(args):
    cfg = setup_nvidia(args.nvidia_src)
    sys.path.insert(0, ROOT)
    from pyseg.models.official import from_official

    torch.set_num_threads(args.threads)
    H, W = (int(v) for v in args.size.lower().split("x"))
    ck = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    theirs = build(cfg, args.arch, ck["num_classes"])
    theirs.load_state_dict({k[len("module."):]: v for k, v in ck["state_dict"].items()}, strict=True)
    theirs.eval()
    ours = from_official(args.ckpt)
    print(f"arch {args.arch}  checkpoint {os.path.basename(args.ckpt)}  pyseg {type(ours.model).__name__}  "
          f"params theirs {sum(p.numel() for p in theirs.parameters()):,} ours {sum(p.numel() for p in ours.parameters()):,}")
    print(f"torch {torch.__version__}  threads {torch.get_num_threads()}  input 1x3x{H}x{W} fp32 eval CPU")
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(123))
    worst = 0.0
    for sc in args.scales:
        scales = [float(s) for s in sc.split(",")]
        cfg.MODEL.N_SCALES = scales
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = theirs({"images": x})["pred"]
        t1 = time.perf_counter()
        ours.set_scales(scales)
        with torch.no_grad():
            got = ours(x)
        t2 = time.perf_counter()
        diff, mx = (got - ref).abs().max().item(), ref.abs().max().item()
        agree = (got.argmax(1) == ref.argmax(1)).float().mean().item()
        worst = max(worst, diff / mx)
        print(f"scales {scales}: pred {tuple(ref.shape)} max|theirs| {mx:.4f} max|diff| {diff:.3e} rel {diff / mx:.3e} "
              f"argmax agreement {agree * 100:.4f}%  time theirs {t1 - t0:.1f}s ours {t2 - t1:.1f}s", flush=True)
    print("PASS" if worst <= args.tol else "FAIL", f"(worst max|diff|/max|logit| {worst:.3e}, tolerance {args.tol})")
    return 0 if worst <= args.tol else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("save", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--nvidia-src", required=True, help="a checkout of NVIDIA/semantic-segmentation")
        p.add_argument("--arch", required=True, choices=["mscale.DeepV3R50", "ocrnet.HRNet_Mscale"])
    s = sub.choices["save"]
    s.add_argument("--out", required=True)
    s.add_argument("--num-classes", type=int, default=19)
    s.add_argument("--seed", type=int, default=1)
    c = sub.choices["compare"]
    c.add_argument("--ckpt", required=True)
    c.add_argument("--size", default="512x1024")
    c.add_argument("--scales", nargs="+", default=["0.5,1.0", "0.5,1.0,2.0"])
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args(argv)
    return cmd_save(args) if args.cmd == "save" else cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
