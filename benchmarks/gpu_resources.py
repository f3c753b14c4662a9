"""Resource table of every GPU kernel of pyseg for one target (default sm_90, H100/H200), built on
any machine (no GPU needed): registers per thread, spill bytes, shared memory per block, threads per
block and the occupancy they imply on an H100 SM.

* Triton: every variant the launchers launch at the registry models' shapes (kernels/_aot.py:
  autotune configurations, constexpr combinations, float32 / float32+TF32 / bfloat16 / float16),
  compiled with ``triton.compile`` for the target; registers and spills from ``ptxas -v`` on the
  PTX, shared memory from the compiled kernel's metadata. One row per kernel: the worst variant
  (most registers / spill / shared memory, lowest occupancy) and the variant count.
* CUDA: every ``__global__`` of csrc/cuda/*.cu (and the headers they include), compiled by nvcc for
  the target with ``-Xptxas -v`` (the flags of setup.py's CUDA build); one row per kernel, the worst
  template instantiation. Threads per block from the launch sites (``<<<grid, block, ...>>>``);
  dynamic shared memory, sized at run time, is not in ptxas's figure (marked ``+dyn``).

    python benchmarks/gpu_resources.py --out benchmarks/results/<date>-<machine>/gpu_resources
      -> gpu_resources.txt (table) and gpu_resources.json (every variant / instantiation)

Run with TRITON_INTERPRET unset. ``--no-triton`` / ``--no-cuda`` skip a half; ``--triton-from FILE``
takes the Triton half from a previous result (this script's JSON, or the JSON of ``kernels/_aot.py`` /
tests/test_triton_sm90.py) instead of compiling it again, ``--cuda-from FILE`` the CUDA half (this
script's JSON); e.g. to refresh only the CUDA half (nvcc on csrc/cuda, minutes):

    python benchmarks/gpu_resources.py --triton-from benchmarks/results/2026-12-01-cpu/triton_sm90_full.json \
      --out benchmarks/results/2026-12-01-cpu/gpu_resources_full
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _aot():
    from pyseg import _extension

    _extension.triton_kernels()  # maps kernels/ onto pyseg.kernels in a source checkout
    from pyseg.kernels import _aot as aot

    return aot


# ------------------------------------------------------------------------------------------------
# CUDA: nvcc -Xptxas -v
# ------------------------------------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _demangle(names):
    cf = shutil.which("c++filt")
    if not cf or not names:
        return {n: n for n in names}
    out = subprocess.run([cf], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return dict(zip(names, out))


def _base_name(demangled: str) -> str:
    # "void ns::meta_forward_kernel<float, true>(args)" -> "meta_forward_kernel"
    head = demangled.replace("(anonymous namespace)", "anon").split("(")[0]
    head = re.sub(r"<.*", "", head.replace("void ", "", 1)).strip()
    return head.split("::")[-1]


def _constants(text: str) -> dict:
    out = {}
    pat = r"(?:constexpr\s+(?:int|unsigned|int64_t)\s+(\w+)\s*=\s*(\d+))|(?:#define\s+(\w+)\s+(\d+))"
    for m in re.finditer(pat, text):
        name, val = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        out[name] = int(val)
    return out


def cuda_launches(src_dir: str) -> dict:
    """{kernel name: set of block sizes} from the launch sites of csrc (numbers or named constants)."""
    text = ""
    for f in sorted(glob.glob(os.path.join(src_dir, "**", "*.cu"), recursive=True) +
                    glob.glob(os.path.join(src_dir, "**", "*.h"), recursive=True) +
                    glob.glob(os.path.join(src_dir, "**", "*.cuh"), recursive=True)):
        with open(f) as fh:
            text += fh.read() + "\n"
    consts = _constants(text)
    out: dict = {}
    launch = r"(\w+)\s*(?:<[^<>;]*(?:<[^<>;]*>[^<>;]*)*>)?\s*<<<\s*([^,]+?)\s*,\s*([^,>]+?)\s*(?:,|>>>)"
    # PYSEG_LAUNCH(grid, block, smem, stream, kernel<...>) (csrc/cuda/runtime.cuh) is kernel<<<grid, block, smem, stream>>>
    macro = r"PYSEG_LAUNCH\(\s*((?:[^,()]|\([^()]*\))+?)\s*,\s*([^,]+?)\s*,\s*([^,]+?)\s*,\s*([^,]+?)\s*,\s*(\w+)"
    text = re.sub(macro, lambda m: f"{m.group(5)}<<<{m.group(1)}, {m.group(2)}, {m.group(3)}, {m.group(4)}>>>", text)
    for m in re.finditer(launch, text):
        name, block = m.group(1), m.group(3).strip()
        val = int(block) if block.isdigit() else consts.get(block)
        out.setdefault(name, set()).add(val if val is not None else block)
    # launches through a local alias (`auto kernel = f<...>; kernel<<<...>>>`): resolve the alias
    for m in re.finditer(r"(?:auto|const auto)\s+(\w+)\s*=\s*&?(\w+)\s*<", text):
        alias, target = m.group(1), m.group(2)
        if alias in out:
            out.setdefault(target, set()).update(out[alias])
    return out


def nvcc_command(cu: str, out: str, arch: int = 90, src_dir: str = os.path.join(ROOT, "csrc")) -> list:
    """nvcc's command line compiling the csrc/cuda file `cu` to the cubin `out` for sm_`arch`, with the flags of
    setup.py's CUDA build (torch's COMMON_NVCC_FLAGS: no implicit half/bfloat16 conversions) and -Xptxas -v."""
    import sysconfig

    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found on PATH")
    incs = [src_dir] + cpp_extension.include_paths(device_type="cuda") + [sysconfig.get_paths()["include"]]
    sp = os.path.dirname(os.path.dirname(cpp_extension.__file__))
    for sub in ("nvidia/cu13/include", "nvidia/cu12/include", "nvidia/cublas/include", "nvidia/cuda_runtime/include"):
        d = os.path.join(os.path.dirname(sp), sub)
        if os.path.isdir(d):
            incs.append(d)
    return [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++20", *cpp_extension.COMMON_NVCC_FLAGS, "-lineinfo",
            "-Xptxas", "-v", "-DPYSEG_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
            *[f"-I{i}" for i in incs], cu, "-o", out]


def cuda_resources(arch: int = 90, src_dir: str = os.path.join(ROOT, "csrc")) -> list:
    """One dict per (kernel instantiation) of every csrc/cuda/*.cu, from nvcc -Xptxas -v."""
    launches = cuda_launches(src_dir)
    rows = []
    for cu in sorted(glob.glob(os.path.join(src_dir, "cuda", "*.cu"))):
        with tempfile.TemporaryDirectory() as d:
            cmd = nvcc_command(cu, os.path.join(d, "k.cubin"), arch, src_dir)
            r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc failed on {cu}:\n{r.stderr[-3000:]}")
        cur = None
        entries = []
        for line in (r.stdout + r.stderr).splitlines():
            m = _ENTRY.search(line)
            if m:
                cur = dict(mangled=m.group(1), file=os.path.relpath(cu, ROOT), regs=0, shared_static=0, stack=0,
                           spill_stores=0, spill_loads=0)
                entries.append(cur)
                continue
            if cur is None:
                continue
            m = _SPILL.search(line)
            if m:
                cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            m = _USED.search(line)
            if m:
                cur.update(regs=int(m.group(1)), shared_static=int(m.group(2) or 0))
        names = _demangle([e["mangled"] for e in entries])
        for e in entries:
            e["demangled"] = names[e["mangled"]]
            e["kernel"] = _base_name(e["demangled"])
            blocks = launches.get(e["kernel"], set())
            e["threads"] = max([b for b in blocks if isinstance(b, int)], default=None)
            e["dynamic_shared"] = e["kernel"] in _dynamic_smem_kernels(src_dir)
        rows.extend(entries)
    return rows


def _dynamic_smem_kernels(src_dir: str) -> set:
    out = set()
    for f in glob.glob(os.path.join(src_dir, "**", "*.*"), recursive=True):
        if not f.endswith((".cu", ".h", ".cuh")):
            continue
        with open(f) as fh:
            text = fh.read()
        for m in re.finditer(r"PYSEG_LAUNCH\(\s*(?:[^,()]|\([^()]*\))+?,[^,]+,\s*([^,]+?)\s*,[^,]+,\s*(\w+)", text):
            if m.group(1).strip() not in ("0",):
                out.add(m.group(2))
        for m in re.finditer(r"(\w+)\s*(?:<[^<>;]*>)?\s*<<<[^,]+,[^,]+,\s*([^,>]+?)\s*,", text):
            if m.group(2).strip() not in ("0",):
                out.add(m.group(1))
        for m in re.finditer(r"(?:auto|const auto)\s+(\w+)\s*=\s*&?(\w+)\s*<", text):
            if m.group(1) in out:
                out.add(m.group(2))
    return out


# ------------------------------------------------------------------------------------------------
# table
# ------------------------------------------------------------------------------------------------
def _occ(aot, regs, shared, threads):
    if not threads:
        return None
    return aot.occupancy(regs, shared, threads)


def triton_rows(aot, results: list) -> list:
    by: dict = {}
    for r in results:
        if r.get("skipped"):
            continue
        by.setdefault((r["module"], r["kernel"]), []).append(r)
    rows = []
    for (mod, name), rs in sorted(by.items()):
        ok = [r for r in rs if "error" not in r]
        rows.append(dict(
            backend="triton", file=f"kernels/{mod}.py", kernel=name, variants=len(rs),
            errors=len(rs) - len(ok),
            regs=max((r["regs"] for r in ok), default=None),
            spill=max((r["spill_stores"] + r["spill_loads"] for r in ok), default=None),
            shared=max((r["shared"] for r in ok), default=None),
            threads="/".join(str(t) for t in sorted({r["threads"] for r in rs})),
            occupancy=min((r["occupancy"] for r in ok), default=None),
            mma="yes" if any(r.get("mma") for r in ok) else "no",
        ))
    return rows


def cuda_rows(aot, entries: list) -> list:
    by: dict = {}
    for e in entries:
        by.setdefault((e["file"], e["kernel"]), []).append(e)
    rows = []
    for (f, name), es in sorted(by.items()):
        t = es[0]["threads"]
        regs = max(e["regs"] for e in es)
        shared = max(e["shared_static"] for e in es)
        rows.append(dict(backend="cuda", file=f, kernel=name, variants=len(es), errors=0, regs=regs,
                         spill=max(e["spill_stores"] + e["spill_loads"] for e in es),
                         shared=f"{shared}+dyn" if es[0]["dynamic_shared"] else shared,
                         threads=t if t is not None else "?",
                         occupancy=_occ(aot, regs, shared, t) if t else None, mma="-"))
    return rows


def format_table(rows: list, arch: int) -> str:
    head = ["backend", "file", "kernel", "variants", "regs/thread", "spill B", "shared B/block", "threads/block",
            f"occupancy (sm_{arch})", "mma"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        occ = "-" if r["occupancy"] is None else f"{100 * r['occupancy']:.0f}%"
        var = f"{r['variants']}" + (f" ({r['errors']} fail)" if r["errors"] else "")
        lines.append("| " + " | ".join(str(v) for v in (r["backend"], r["file"], f"`{r['kernel']}`", var, r["regs"],
                                                        r["spill"], r["shared"], r["threads"], occ, r["mma"])) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--out", default=None, help="write OUT.txt and OUT.json (default: print the table)")
    p.add_argument("--jobs", type=int, default=None, help="parallel Triton compiles")
    p.add_argument("--models", nargs="*", default=None, help="registry models (default: all)")
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16", "float16"])
    p.add_argument("--first-config", action="store_true",
                   help="only the first pruned configuration of each autotuned launch (PYSEG_TRITON_AUTOTUNE=0)")
    p.add_argument("--no-triton", action="store_true")
    p.add_argument("--triton-from", default=None, metavar="FILE",
                   help="Triton variants from this JSON (kernels/_aot.py's list, or this script's output)")
    p.add_argument("--cuda-from", default=None, metavar="FILE", help="CUDA instantiations from this script's JSON")
    p.add_argument("--no-cuda", action="store_true")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    aot = _aot()
    import torch

    if a.triton_from:
        with open(a.triton_from) as f:
            tri = json.load(f)
        tri = tri["triton"] if isinstance(tri, dict) else tri
    else:
        tri = [] if a.no_triton else aot.run(a.models, dtypes=[getattr(torch, d) for d in a.dtypes], arch=a.arch,
                                             jobs=a.jobs, all_configs=not a.first_config)
    for r in tri:
        r["problems"] = [] if r.get("skipped") else aot.problems(r)
    if a.cuda_from:
        with open(a.cuda_from) as f:
            cu = json.load(f)["cuda"]
    else:
        cu = [] if a.no_cuda else cuda_resources(a.arch)
    rows = triton_rows(aot, tri) + cuda_rows(aot, cu)
    table = format_table(rows, a.arch)
    bad = [r for r in tri if r.get("problems")]
    summary = (f"\n\nTriton variants compiled: {len(tri)}; with a problem (compile error, spill, shared memory > "
               f"{aot.SM90_MAX_SHARED_PER_BLOCK} B): {len(bad)}. CUDA kernel instantiations: {len(cu)}.\n")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".txt", "w") as f:
            f.write(table + summary)
        with open(a.out + ".json", "w") as f:
            json.dump(dict(arch=a.arch, rows=rows, triton=tri, cuda=cu), f, indent=1, default=str)
    print(table + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
