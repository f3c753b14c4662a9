"""Every Triton kernel variant the ops launch at the registry models' shapes, compiled ahead of time
for a GPU target (default sm_90, H100/H200) on any machine, GPU or not.

1. ``op_calls()``: every registry model runs one forward on the meta device with ``backend="triton"``;
   the ``pyseg::<op>`` calls are captured with their arguments (the fake kernels compute
   the shapes, nothing runs).
2. ``launches()``: each captured call is replayed through its launcher (``kernels/<op>.py``) inside
   ``kernels._launch.record()``, in every dtype the GPU ops take (float32, bfloat16, float16; with
   and without TF32 for float32), forward and backward for every gradient mask; the launchers
   record each kernel launch (autotuned kernels: every configuration pruning keeps) instead of
   running it. The list of variants therefore comes from the launchers themselves.
3. ``variants()``: each launch specialised as ``JITFunction.run`` would for the target
   (signature, constexprs, options), deduplicated; integer arguments unspecialised (one variant
   per program), or also on their recorded values (``--specialise-ints``: the divisibility-by-16
   and value-1 variants a launch at the registry shapes compiles).
4. ``compile_variant()``: ``triton.compile`` for the target, registers and spill bytes from the
   ``ptxas -v`` log of its cubin step; shared memory from the compiled kernel's metadata.

Must run with ``TRITON_INTERPRET`` unset (the interpreter replaces ``@triton.jit`` functions), so
the test runs ``python -m pyseg.kernels._aot`` in a subprocess. float64 is excluded: it is the
correctness path of the kernels, not a GPU performance path.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Sequence

import torch

#: Shared memory one block can use on sm_90 (H100/H200): 227 KB (232448 bytes).
SM90_MAX_SHARED_PER_BLOCK = 227 * 1024
#: Per-SM limits of sm_90 used for the occupancy estimate.
SM90 = dict(regs=65536, shared=228 * 1024, reserved_shared_per_block=1024, threads=2048, blocks=32, warps=64)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------
# 1. op calls of the registry models (meta device)
# ------------------------------------------------------------------------------------------------
def _shape_of(a):
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), str(a.dtype))
    if isinstance(a, (list, tuple)):
        return ("L", tuple(_shape_of(v) for v in a))
    return a


@contextlib.contextmanager
def _triton_on_meta():
    """Let ``backend="triton"`` resolve on meta tensors (the ops then run their fake kernels)."""
    from pyseg import _extension

    orig = _extension.triton_usable
    _extension.triton_usable = lambda device: device.type == "meta" or orig(device)
    try:
        yield
    finally:
        _extension.triton_usable = orig


#: The pyseg ops with Triton launchers (``pyseg.kernels.<op>``); their backward ops are replayed from them.
_FORWARD_OPS = ("meta_block", "pointwise_block", "patchwise_conv2d", "hmsa_fuse")


def op_calls(models: Optional[Sequence[str]] = None, batch: int = 1) -> List[tuple]:
    """[(model, op name, args)] of every Triton-backed ``pyseg::<op>`` call of one eval forward per model
    (meta tensors, registry input size; duplicates of a model's calls dropped)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pyseg.models import create_model, get_config, list_models

    calls: List[tuple] = []

    class _Capture(TorchDispatchMode):
        def __init__(self, name):
            super().__init__()
            self.name, self.seen = name, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            op = func._schema.name
            # under backend="triton" the op's Triton rule re-dispatches meta tensors to the fake kernel,
            # which passes through this mode with the launcher's exact arguments
            if op.startswith("pyseg::") and op.split("::")[1] in _FORWARD_OPS:
                key = (op, _shape_of(list(args)))
                if key not in self.seen:
                    self.seen.add(key)
                    calls.append((self.name, op.split("::")[1], list(args)))
            return func(*args, **(kwargs or {}))

    # no registry model uses pyseg.nn.PatchWiseConv2d itself: its kernels are listed at HyperSeg-M's
    # decoder shapes (level 0: 82->64 1x1, level 4: 34->19 3x3 dense and depthwise; 16x32 grid)
    meta = dict(device="meta")
    for cin, cout, k, groups, (h, w) in ((82, 64, 1, 1, (16, 32)), (34, 19, 3, 1, (256, 512)),
                                         (34, 34, 3, 34, (256, 512))):
        x = torch.empty(1, cin, h, w, **meta)
        wt = torch.empty(1, cout, cin // groups, k, k, 16, 32, **meta)
        b = torch.empty(1, cout, 16, 32, **meta)
        p = k // 2
        calls.append(("PatchWiseConv2d", "patchwise_conv2d", [x, wt, b, [1, 1], [p, p, p, p], [1, 1], groups]))
    for name in models or list_models():
        cfg = get_config(name)
        h, w = cfg.get("input_size") or (512, 1024)
        with torch.device("meta"):
            try:
                model = create_model(name, backend="triton").eval()
            except TypeError:  # a model without dynamic ops (no backend argument)
                model = create_model(name).eval()
        x = torch.empty(batch, cfg.get("in_channels", 3), h, w, device="meta")
        with _triton_on_meta(), _Capture(name), torch.no_grad():
            model(x)
    return calls


# ------------------------------------------------------------------------------------------------
# 2. replay through the launchers, recording their launches
# ------------------------------------------------------------------------------------------------
def _cast(a, dtype):
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return torch.empty(a.shape, dtype=dtype, device="meta")
    if isinstance(a, list):
        return [_cast(v, dtype) for v in a]
    return a


def _masks(n: int):
    """Every non-empty gradient mask of n outputs."""
    return [list(m) for m in itertools.product([True, False], repeat=n) if any(m)]


def _replay(op: str, args: list, dtype: torch.dtype):
    """Run the launcher(s) of one captured op call (inside ``record()``): forward, and backward for
    every gradient mask where the op has a Triton backward."""
    from pyseg import _extension

    K = _extension.triton_kernels()
    a = _cast(args, dtype)
    if op == "meta_block":
        y = K.meta_block.forward(*a)
        for m in _masks(3):
            K.meta_block.backward(torch.empty_like(y), *a, [m[0], m[1], m[2], m[2]])
    elif op == "pointwise_block":
        y = K.pointwise_block.forward(*a)
        for m in _masks(3):
            K.pointwise_block.backward(torch.empty_like(y), *a, [m[0], m[1], m[2], m[2]])
    elif op == "patchwise_conv2d":
        x, w, b, stride, padding, dilation, groups = a
        y = K.patchwise_conv2d.forward(x, w, b, stride, padding, dilation, groups)
        for m in _masks(3):
            K.patchwise_conv2d.backward(torch.empty_like(y), x, w, stride, padding, dilation, groups,
                                        [m[0], m[1], m[2] and b is not None])
    elif op == "hmsa_fuse":
        logits, atts, scales, out_size, labels, scale_sizes = (list(a) + [None])[:6]
        for lab in (False, True):  # output="logits" and output="labels"
            K.hmsa_fuse.forward(logits, atts, scales, out_size, lab, scale_sizes)
        # the two-scale training form (1.0 and the scale below it) has a Triton backward
        one = [float(v) for v in scales].index(1.0)
        if one + 1 < len(scales):
            B, C = logits[one].shape[:2]
            g = torch.empty(B, C, *out_size, dtype=logits[one].dtype, device="meta")
            K.hmsa_fuse.backward(g, logits[one], logits[one + 1], atts[one + 1])
    else:
        raise ValueError(f"no launcher replay for pyseg::{op}; add it to kernels/_aot.py")


def launches(calls: Sequence[tuple], dtypes: Sequence[torch.dtype] = DTYPES, all_configs: bool = True) -> List[tuple]:
    """[(model, op, dtype name, jit function, args, meta)] recorded from the launchers
    (``all_configs=False``: only the first pruned configuration of an autotuned kernel)."""
    from ._launch import record

    out = []
    for model, op, args in calls:
        for dtype in dtypes:
            tf32 = (False, True) if dtype == torch.float32 else (False,)
            for allow in tf32:
                old = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = allow
                try:
                    with record(all_configs) as rec:
                        _replay(op, args, dtype)
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = old
                name = str(dtype).replace("torch.", "") + ("+tf32" if allow else "")
                out.extend((model, op, name, fn, a, meta) for fn, a, meta in rec)
    return out


# ------------------------------------------------------------------------------------------------
# 3. specialisation for the target, as JITFunction.run does it
# ------------------------------------------------------------------------------------------------
class _Ptr:
    """A device pointer argument: a dtype and a 16-byte aligned address (what the launchers'
    contiguous allocations give), without memory."""

    def __init__(self, dtype):
        self.dtype = dtype

    def data_ptr(self):
        return 1 << 20


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


_BINDERS: dict = {}


def specialise(fn, args, meta, arch: int = 90, ints: bool = False) -> dict:
    """The compile inputs JITFunction.run would derive for ``fn[grid](*args, **meta)`` on ``arch``.
    Integer arguments are left unspecialised (plain i32: no divisibility-by-16 or value-1
    variants), so that one variant covers every shape with the same constexprs, unless ``ints``:
    then they are specialised on their recorded values, exactly as a launch at these shapes."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    if (fn, arch) not in _BINDERS:
        backend = make_backend(_target(arch))
        _BINDERS[(fn, arch)] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = _BINDERS[(fn, arch)]
    # 1000003: an odd, non-1 int32 (no specialisation); kept wide where the launcher passes a wide value
    args = [_Ptr(a.dtype) if isinstance(a, torch.Tensor) else
            ((1000003 if -2**31 <= a < 2**31 else 2**40 + 3) if isinstance(a, int) and not isinstance(a, bool)
             and p.name not in meta and not p.is_constexpr and not ints else a)
            for a, p in zip(args, fn.params)]
    kw = dict(meta)
    kw.setdefault("debug", False)
    bound, spec, opts = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    return dict(module=fn.fn.__module__, name=fn.fn.__name__, signature=signature,
                constexprs={k: (v.value if hasattr(v, "value") else v) for k, v in constexprs.items()},
                attrs=attrs, options={k: options.__dict__[k] for k in ("num_warps", "num_stages", "num_ctas")})


def _key(v: dict) -> str:
    return json.dumps([v["module"], v["name"], v["signature"], sorted(map(repr, v["constexprs"].items())),
                       sorted(map(repr, v["attrs"].items())), v["options"]], sort_keys=True, default=str)


def variants(recorded, arch: int = 90, specialise_ints: bool = False) -> List[dict]:
    """Unique compile variants of the recorded launches, each with the (model, op, dtype) uses:
    integer arguments unspecialised (one variant per program), and with ``specialise_ints`` also
    every variant Triton's integer specialisation makes of it at the recorded shapes."""
    out: Dict[str, dict] = {}
    for model, op, dtype, fn, args, meta in recorded:
        for ints in (False, True) if specialise_ints else (False,):
            v = specialise(fn, args, meta, arch, ints)
            k = _key(v)
            if k not in out:
                v["uses"] = []
                v["ints_specialised"] = ints
                out[k] = v
            use = f"{model}:{op}:{dtype}"
            if use not in out[k]["uses"]:
                out[k]["uses"].append(use)
    return list(out.values())


# ------------------------------------------------------------------------------------------------
# 4. compile and read the resources
# ------------------------------------------------------------------------------------------------
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def parse_ptxas(log: str) -> Optional[dict]:
    """Registers, spill stores/loads and stack frame from a ``ptxas -v`` log of one kernel (None
    without a report)."""
    used = _PTXAS_USED.search(log)
    if used is None:
        return None
    spill, stack = _PTXAS_SPILL.search(log), _PTXAS_STACK.search(log)
    return dict(regs=int(used.group(1)),
                spill_stores=int(spill.group(1)) if spill else 0,
                spill_loads=int(spill.group(2)) if spill else 0,
                stack=int(stack.group(1)) if stack else 0)


def ptxas_report(ptx: str, arch: int) -> dict:
    """``parse_ptxas`` of a ptxas run on ``ptx`` with the flags of Triton's cubin step (for a kernel
    that came from Triton's cache, whose cubin step did not run)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    arch = sm_arch_from_capability(arch)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o",
                            os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
    return parse_ptxas(r.stdout + r.stderr)


@contextlib.contextmanager
def _ptxas_log():
    """Capture the ``ptxas -v`` log of Triton's cubin step (printed with ``dump_ptxas_log``): one
    ptxas run per variant instead of two. Yields the capture buffer."""
    import io

    from triton import knobs

    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        knobs.nvidia.dump_ptxas_log = old


def occupancy(regs: int, shared: int, threads: int, sm: dict = SM90) -> float:
    """Fraction of an SM's warp slots the kernel can fill (registers, shared memory, threads, blocks)."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    limits = [sm["blocks"], sm["threads"] // threads, sm["regs"] // (regs_per_warp * warps)]
    if shared:
        limits.append(sm["shared"] // (shared + sm["reserved_shared_per_block"]))
    return min(limits) * warps / sm["warps"]


def compile_variant(v: dict, arch: int = 90) -> dict:
    """Compile one variant; returns its resources (or the compile error)."""
    import triton
    from triton.compiler import ASTSource

    from pyseg import _extension

    _extension.triton_kernels()  # pyseg.kernels from a source checkout
    fn = getattr(importlib.import_module(v["module"]), v["name"])
    fn = getattr(fn, "fn", fn) if not hasattr(fn, "params") else fn
    constexprs = {tuple(k) if isinstance(k, list) else k: c for k, c in v["constexprs"].items()}
    attrs = {tuple(k) if isinstance(k, list) else k: a for k, a in v["attrs"].items()}
    res = dict(kernel=v["name"], module=v["module"].rsplit(".", 1)[-1], signature=v["signature"],
               constexprs={str(k[0] if isinstance(k, tuple) and len(k) == 1 else k): c for k, c in constexprs.items()},
               num_warps=v["options"]["num_warps"], num_stages=v["options"]["num_stages"],
               threads=32 * v["options"]["num_warps"], ints_specialised=v.get("ints_specialised", False),
               uses=v.get("uses", []))
    try:
        with _ptxas_log() as log:
            k = triton.compile(ASTSource(fn, v["signature"], constexprs, attrs), target=_target(arch),
                               options=dict(v["options"]))
    except Exception as e:  # noqa: BLE001 - reported per variant
        res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
        return res
    res.update(parse_ptxas(log.getvalue()) or ptxas_report(k.asm["ptx"], arch))
    res["shared"] = int(k.metadata.shared)
    res["mma"] = bool(re.search(r"\b(mma|wgmma)\.", k.asm["ptx"]))
    res["occupancy"] = occupancy(res["regs"], res["shared"], res["threads"])
    return res


def _compile_one(args):
    v, arch = args
    return compile_variant(v, arch)


def problems(r: dict, max_shared: int = SM90_MAX_SHARED_PER_BLOCK) -> List[str]:
    """What makes a compiled variant unacceptable: a compile error, spills, too much shared memory."""
    if "error" in r:
        return [r["error"]]
    out = []
    if r["spill_stores"] or r["spill_loads"]:
        out.append(f"spills {r['spill_stores']} B stores / {r['spill_loads']} B loads per thread")
    if r["shared"] > max_shared:
        out.append(f"shared memory {r['shared']} B > {max_shared} B per block")
    return out


def run(models=None, dtypes=DTYPES, arch: int = 90, jobs: Optional[int] = None, skip=(), only=None,
        all_configs: bool = True, verbose: bool = False, specialise_ints: bool = False) -> List[dict]:
    """Enumerate, deduplicate and compile every launched variant; one result dict per variant.
    Variants of the kernels named in ``skip`` (or not in ``only``) are listed (``"skipped": True``)
    but not compiled."""
    vs = variants(launches(op_calls(models), dtypes, all_configs), arch, specialise_ints)
    drop = [v for v in vs if v["name"] in skip or (only is not None and v["name"] not in only)]
    skipped = [dict(kernel=v["name"], module=v["module"].rsplit(".", 1)[-1], skipped=True, uses=v["uses"])
               for v in drop]
    vs = [v for v in vs if not any(v is d for d in drop)]
    jobs = jobs or min(len(vs), os.cpu_count() or 1)
    if jobs > 1:
        import multiprocessing as mp

        from pyseg import _extension

        # workers load pyseg.kernels first (a source checkout maps kernels/ onto it at runtime)
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_extension.triton_kernels) as ex:
            return list(ex.map(_compile_one, [(v, arch) for v in vs], chunksize=4)) + skipped
    out = []
    for v in vs:
        out.append(compile_variant(v, arch))
        if verbose:
            r = out[-1]
            print(f"{r['kernel']} {r.get('constexprs')} warps={r['num_warps']}: regs={r.get('regs')} "
                  f"spill={r.get('spill_stores')} shared={r.get('shared')} {r.get('error', '')}",
                  file=sys.stderr, flush=True)
    return out + skipped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=None, help="registry models (default: all)")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--json", default="-", help="output file ('-': stdout)")
    p.add_argument("--skip", nargs="*", default=(), help="kernels to list without compiling")
    p.add_argument("--only", nargs="*", default=None, help="compile only these kernels")
    p.add_argument("--verbose", action="store_true", help="one line per compiled variant (with --jobs 1)")
    p.add_argument("--first-config", action="store_true",
                   help="only the first pruned configuration of each autotuned launch (PYSEG_TRITON_AUTOTUNE=0)")
    p.add_argument("--dtypes", nargs="*", default=[str(d).replace("torch.", "") for d in DTYPES])
    p.add_argument("--specialise-ints", action="store_true",
                   help="also compile each variant Triton's integer specialisation (divisibility by 16, "
                        "value 1) makes at the registry shapes")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    res = run(a.models, dtypes=[getattr(torch, d) for d in a.dtypes], arch=a.arch, jobs=a.jobs, skip=set(a.skip),
              only=None if a.only is None else set(a.only), all_configs=not a.first_config, verbose=a.verbose,
              specialise_ints=a.specialise_ints)
    for r in res:
        r["problems"] = [] if r.get("skipped") else problems(r)
    text = json.dumps(res, indent=1, default=str)
    if a.json == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
