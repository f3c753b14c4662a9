#!/usr/bin/env python
"""Frames per second of a pyseg segmentation model (protocol below).

    python benchmarks/fps.py --model hyperseg-m                       # CPU or GPU, config resolution
    python benchmarks/fps.py --model hyperseg-m --device cuda --dtype bf16 --cuda-graph --compare-reference
    python benchmarks/fps.py --model hyperseg-m --quick               # CI smoke: tiny input, few iterations

Protocol: model in eval mode under ``torch.inference_mode``, random input created outside the timed
region, warm-up iterations excluded, the device synchronized before and after every timed call, no
``empty_cache``. Reports images/s (batch / latency, not batches/s), median and p90 latency.
BatchNorm is kept and folded (the decoder's meta blocks fold theirs in eval mode; ``model.fuse()``
folds the encoder's and context head's into their convolutions); the HyperSeg paper removed BN.

Compute: the static layers (encoder, context head, weight generators) are counted with
``torch.utils.flop_counter.FlopCounterMode``; the dynamic decoder layers (custom pyseg ops, invisible to
it) analytically (``HyperSeg.decoder_macs``). Element-wise ops, BN and resampling are not counted.
GMACs are what the HyperSeg paper calls "GFLOPs"; GFLOPs = 2 x GMACs.

``--compare-reference`` times the same weights with ``backend="reference"`` (the pure-PyTorch ops)
in the same run (iterations interleaved with the pyseg ones) and prints the speed-up and the maximum
output difference.

``--runtime onnxruntime`` (CPU) also exports the same weights to ONNX (pyseg.export: standard ops,
the unfused eval model -- ONNX Runtime folds BatchNorm itself) and times the file in ONNX Runtime's CPU
execution provider with ``--threads`` intra-op threads, interleaved with eager pyseg (and the reference
with ``--compare-reference``) in one table.

    python benchmarks/fps.py --model hyperseg-m --device cpu --threads 2 --runtime onnxruntime --compare-reference
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
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

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="registry name (pyseg.models.list_models()); default hyperseg-m, "
                   "or the checkpoint's model")
    p.add_argument("--checkpoint", default=None, help="weights to load: a pyseg .safetensors (pyseg-train, "
                   "pyseg-convert) or a released .pth (pyseg.models.from_official)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--height", type=int, default=None, help="default: the model's config resolution")
    p.add_argument("--width", type=int, default=None, help="default: the model's config resolution")
    p.add_argument("--backend", default="auto", help="backend of the dynamic ops (auto/cpu/cuda/triton/reference)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed iterations (default: 200 on GPU; on CPU chosen to fit --budget)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 5; 2 on CPU)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="CPU default: seconds the whole timing (all variants) should take")
    p.add_argument("--cuda-graph", action="store_true", help="capture the forward in a CUDA graph (cuda only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format for the model and input (default: on for the CPU, where "
                        "oneDNN's convolutions are faster in it; off for CUDA)")
    p.add_argument("--no-fuse", action="store_true", help="do not fold the static BatchNorms (model.fuse())")
    p.add_argument("--compare-reference", action="store_true",
                   help="also time backend='reference' with the same weights; print speed-up and max diff")
    p.add_argument("--scales", default=None,
                   help="HMSA models (hmsa-*): inference scales, comma separated, containing 1 (default: the "
                        "model's, e.g. 0.5,1,2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (CPU); also ONNX Runtime's intra-op threads")
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                   help="onnxruntime: also time the exported ONNX file in ONNX Runtime (CPU EP), side by side")
    p.add_argument("--tune-malloc", action="store_true",
                   help="glibc only: keep freed large blocks in the process (mallopt M_MMAP_THRESHOLD and "
                        "M_TRIM_THRESHOLD), as tcmalloc/jemalloc do, so that large tensors are not page-faulted "
                        "in again on every forward. Off by default (what a plain process gets); it speeds up "
                        "allocation-heavy code, the reference ops most")
    p.add_argument("--quick", action="store_true", help="smoke mode: smallest legal input, 3 iterations")
    p.add_argument("--json", default=None, help="output JSON path (default: fps_<model>.json in the cwd)")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _runner(model, x, device, cuda_graph):
    """A zero-argument callable running one forward on the fixed input."""
    if not cuda_graph:
        return lambda: model(x)
    static_x = x.clone()
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):  # warm up allocations on a side stream before capture
            model(static_x)
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_x)

    def run():
        graph.replay()
        return static_out

    return run


def _time(runners, device, iters, warmup):
    """Latencies per runner. Variants are interleaved iteration by iteration, so that a change in
    machine load (shared CPUs, GPU clocks) affects them alike and their ratio stays fair."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    _sync(device)
    lat = {name: [] for name in runners}
    for _ in range(iters):
        for name, run in runners.items():
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            lat[name].append(time.perf_counter() - t0)
    return lat


def _stats(lat, batch):
    lat_sorted = sorted(lat)
    med = statistics.median(lat)
    p90 = lat_sorted[min(len(lat) - 1, int(round(0.9 * (len(lat) - 1))))]
    return {"iters": len(lat), "latency_median_ms": med * 1e3, "latency_p90_ms": p90 * 1e3,
            "latency_mean_ms": statistics.fmean(lat) * 1e3, "fps": batch / med,
            "fps_mean": batch * len(lat) / sum(lat)}


@torch.no_grad()
def count_macs(model, x):
    """(total MACs per image, breakdown, method) for a HyperSeg-like model at x's resolution."""
    from torch.utils.flop_counter import FlopCounterMode

    x = x[:1]
    breakdown = {}
    if hasattr(model, "generate_weights") and hasattr(model, "decoder_macs"):
        with FlopCounterMode(display=False) as fc:
            feats, signal = model.encoder(x)
        breakdown["encoder"] = fc.get_total_flops() // 2
        with FlopCounterMode(display=False) as fc:
            phi = model.context_head(signal)
        breakdown["context_head"] = fc.get_total_flops() // 2
        with FlopCounterMode(display=False) as fc:
            model.weight_mapper(phi)
        breakdown["weight_mapper"] = fc.get_total_flops() // 2
        dec = model.decoder_macs(x.shape[-2], x.shape[-1])
        breakdown["decoder (analytic)"] = sum(dec.values())
        method = ("static layers: torch.utils.flop_counter.FlopCounterMode (conv/matmul); dynamic decoder: "
                  "analytic MACs (HyperSeg.decoder_macs); element-wise/BN/resampling not counted")
    else:
        with FlopCounterMode(display=False) as fc:
            model(x)
        breakdown["model"] = fc.get_total_flops() // 2
        method = "torch.utils.flop_counter.FlopCounterMode"
    return sum(breakdown.values()), breakdown, method


def tune_malloc():
    """glibc: serve large allocations from the heap and never trim it (returns False elsewhere)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))


def _ort_version():
    import onnxruntime

    return onnxruntime.__version__


def _onnx_session(model, args, H, W, notes):
    """ONNX Runtime CPU session of ``model``, exported now (unfused, fp32, dynamic batch)."""
    import shutil
    import tempfile

    from pyseg.export import export_onnx, onnx_session

    tmp = tempfile.mkdtemp(prefix="pyseg-fps-")
    try:
        path = os.path.join(tmp, f"{args.model}.onnx")
        t0 = time.perf_counter()
        export_onnx(copy.deepcopy(model), path, height=H, width=W)
        notes.append(f"onnxruntime: exported the unfused eval model (fp32, dynamic batch) in "
                     f"{time.perf_counter() - t0:.0f} s")
        sess = onnx_session(path, threads=args.threads)  # holds the model in memory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    notes.append(f"onnxruntime {_ort_version()}: CPUExecutionProvider, intra-op threads "
                 f"{args.threads or 'default'}, inter-op 1, graph optimisations: all (ORT default)")
    return sess, None


def main(argv=None):
    args = parse_args(argv)
    from pyseg.models import create_model, get_config

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda requested but no CUDA device is visible")
    dtype = DTYPES[args.dtype]
    notes = []
    malloc_tuned = False
    if args.tune_malloc:
        malloc_tuned = tune_malloc()
        notes.append("malloc tuned (mallopt M_MMAP_THRESHOLD=1 GiB, M_TRIM_THRESHOLD=2 GiB)" if malloc_tuned
                     else "--tune-malloc: mallopt is not available (not glibc); allocator left as is")
    cuda_graph = args.cuda_graph
    if cuda_graph and device.type != "cuda":
        notes.append("--cuda-graph ignored on the CPU")
        cuda_graph = False

    if args.runtime == "onnxruntime" and (device.type != "cpu" or args.dtype != "fp32"):
        sys.exit("error: --runtime onnxruntime times the CPU execution provider in fp32: use --device cpu "
                 "--dtype fp32")
    if args.checkpoint:
        from pyseg.models import load_pretrained

        model = load_pretrained(args.checkpoint, args.model, backend=args.backend).eval()
        args.model = args.model or model.pyseg_config["model"]
        cfg = {"input_size": getattr(model, "input_size", None) or get_config(args.model).get("input_size")}
    else:
        args.model = args.model or "hyperseg-m"
        cfg = get_config(args.model)
        model = create_model(args.model, backend=args.backend).eval()
    scales = None
    if args.scales is not None or callable(getattr(model, "set_scales", None)):
        if not callable(getattr(model, "set_scales", None)):
            sys.exit(f"error: --scales needs a multi-scale attention model (hmsa-*), not {args.model!r}")
        if args.scales is not None:
            try:
                model.set_scales(tuple(float(v) for v in args.scales.split(",")))
            except ValueError as e:
                sys.exit(f"error: --scales {args.scales!r}: {e}")
        scales = list(model.scales)
    mult = getattr(model, "input_multiple", 32)
    if args.quick:
        H, W = args.height or mult, args.width or 2 * mult
    else:
        H, W = cfg.get("input_size", (512, 1024))
        H, W = args.height or H, args.width or W
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x = torch.randn(args.batch, 3, H, W, device=device, dtype=dtype)
    if hasattr(model, "check_input"):
        model.check_input(x)  # clear error for sizes the model cannot take

    macs, breakdown, mac_method = count_macs(model, torch.randn(1, 3, H, W))

    ort_session = None
    if args.runtime == "onnxruntime":
        ort_session, _ = _onnx_session(model, args, H, W, notes)

    fused = False
    if not args.no_fuse and hasattr(model, "fuse"):
        model.fuse()
        fused = True
    model = model.to(device=device, dtype=dtype)
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cpu"
    if args.channels_last is None and channels_last:
        notes.append("channels_last on (the CPU default; --no-channels-last to turn it off)")
    if channels_last:
        if hasattr(model, "to_channels_last"):  # HyperSeg: the trunk only (see its docstring)
            model = model.to_channels_last()
        else:
            model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    variants = [("pyseg", model)]
    if args.compare_reference:
        ref = copy.deepcopy(model)
        ref.set_backend("reference") if hasattr(ref, "set_backend") else None
        variants.append(("reference", ref))

    results = {}
    outputs = {}
    with torch.inference_mode():
        runners = {}
        for name, m in variants:
            fwd = torch.compile(m) if args.compile else m
            runners[name] = _runner(fwd, x, device, cuda_graph)
        if ort_session is not None:
            feeds = {ort_session.get_inputs()[0].name: x.contiguous().numpy()}
            runners["onnxruntime"] = lambda: torch.from_numpy(ort_session.run(None, feeds)[0])
        # iteration counts
        warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 2)
        if args.quick:
            iters, warmup = args.iters or 3, min(warmup, 1)
        elif args.iters:
            iters = args.iters
        elif device.type == "cuda":
            iters = 200
        else:
            # time one iteration of each variant (after one warm-up call), then fit the budget
            per = 0.0
            for name, run in runners.items():
                run()
                t0 = time.perf_counter()
                run()
                per += time.perf_counter() - t0
            warmup = max(0, warmup - 2)  # the two calls above were warm-up calls already
            iters = int(max(3, min(200, (args.budget - warmup * per) / max(per, 1e-6))))
            notes.append(f"CPU: {iters} timed iterations chosen for a ~{args.budget:.0f} s budget "
                         f"(one iteration of all variants took {per:.2f} s)")
        lats = _time(runners, device, iters, warmup)
        for name, run in runners.items():
            results[name] = _stats(lats[name], args.batch)
            outputs[name] = run().float().clone()

    max_diff = rel_diff = None
    if args.compare_reference:
        # relative to the reference's largest |logit|: randomly initialised models emit tiny logits
        max_diff = float((outputs["pyseg"] - outputs["reference"]).abs().max())
        rel_diff = max_diff / max(float(outputs["reference"].abs().max()), 1e-30)
        speedup = results["pyseg"]["fps"] / results["reference"]["fps"]
    else:
        speedup = None
    ort_vs_pyseg = ort_diff = None
    if ort_session is not None:
        ort_vs_pyseg = results["onnxruntime"]["fps"] / results["pyseg"]["fps"]
        ort_diff = float((outputs["onnxruntime"] - outputs["pyseg"]).abs().max()) / max(
            float(outputs["pyseg"].abs().max()), 1e-30)

    backend_used = args.backend
    try:
        from pyseg._backends import resolve_backend

        backend_used = resolve_backend(args.backend, device, "meta_block")
    except Exception:  # noqa: BLE001 - informational only
        pass
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                                  platform.machine())
    record = {
        "model": args.model, "checkpoint": args.checkpoint, "device": str(device), "device_name": dev_name,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "dtype": args.dtype, "batch": args.batch, "height": H, "width": W,
        "backend": args.backend, "backend_resolved": backend_used,
        "cuda_graph": cuda_graph, "compile": args.compile, "channels_last": channels_last,
        "malloc_tuned": malloc_tuned, "scales": scales,
        "bn": "kept, folded" if fused else "kept, folded in the decoder only (--no-fuse)",
        "params": params, "gmacs_per_image": macs / 1e9, "gflops_per_image": 2 * macs / 1e9,
        "macs_breakdown": breakdown, "mac_method": mac_method,
        "warmup": warmup, "torch": torch.__version__, "pyseg": getattr(pyseg, "__version__", "?"),
        "results": results, "speedup_vs_reference": speedup, "max_abs_diff_vs_reference": max_diff,
        "max_rel_diff_vs_reference": rel_diff,
        "runtime": args.runtime,
        "onnxruntime": _ort_version() if ort_session is not None else None,
        "onnxruntime_fps_over_pyseg": ort_vs_pyseg, "max_rel_diff_onnxruntime_vs_pyseg": ort_diff,
        "notes": notes, "protocol": "images/s = batch / median latency; synchronized; warm-up excluded",
    }

    # ---- table
    rows = [("model", args.model), ("device", f"{device} ({dev_name})"
                                    + (f", {record['threads']} threads" if record["threads"] else "")),
            ("dtype / batch", f"{args.dtype} / {args.batch}"), ("resolution (HxW)", f"{H}x{W}"),
            *([("HMSA scales", ", ".join(f"{v:g}" for v in scales))] if scales else []),
            ("backend", f"{args.backend} -> {backend_used}"),
            ("cuda graph / compile / channels_last", f"{cuda_graph} / {args.compile} / {channels_last}"),
            ("BatchNorm", record["bn"]), ("params (trainable)", f"{params:,}"),
            ("GMACs / image (paper's 'GFLOPs')", f"{macs / 1e9:.2f}"),
            ("GFLOPs / image (2 x MACs)", f"{2 * macs / 1e9:.2f}"),
            ("MAC breakdown (G)", ", ".join(f"{k} {v / 1e9:.2f}" for k, v in breakdown.items())),
            ("torch", torch.__version__)]
    w = max(len(r[0]) for r in rows)
    print("=" * 78)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print("-" * 78)
    print(f"{'variant':<12}{'images/s':>12}{'median ms':>12}{'p90 ms':>12}{'iters':>8}")
    for name, r in results.items():
        print(f"{name:<12}{r['fps']:>12.2f}{r['latency_median_ms']:>12.2f}{r['latency_p90_ms']:>12.2f}{r['iters']:>8}")
    if speedup is not None:
        print(f"speed-up vs reference: {speedup:.2f}x   max |pyseg - reference| / max |reference| = "
              f"{rel_diff:.3g} (absolute {max_diff:.3g})")
    if ort_vs_pyseg is not None:
        print(f"onnxruntime images/s / pyseg images/s: {ort_vs_pyseg:.2f}   max |onnxruntime - pyseg| / "
              f"max |pyseg| = {ort_diff:.3g}")
    print("-" * 78)
    print("MAC counting:", mac_method)
    for n in notes:
        print("note:", n)
    print("=" * 78)
    path = args.json or f"fps_{args.model}.json"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")
    return record


if __name__ == "__main__":
    main()
