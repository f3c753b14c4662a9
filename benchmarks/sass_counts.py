"""SASS instruction counts of the tensor-core loops of pyseg's CUDA MMA kernels, built on any machine (no GPU):
csrc/cuda/meta_block.cu and csrc/cuda/patchwise_conv2d.cu compiled by nvcc for sm_90 with the flags of setup.py's
CUDA build (gpu_resources.nvcc_command), disassembled by nvdisasm (Triton's copy when the CUDA toolkit has none).

For every instantiation of ``meta_forward_mma_kernel`` and ``pw_forward_mma_kernel``, every innermost loop of
the SASS (a backward branch) that holds HMMA instructions: its instruction count, HMMA, shared-memory (LDS/LDSM)
and generic/global (LD/LDG) loads, S2R, integer address arithmetic (IMAD/IADD3/LEA/SHF/LOP3 on integers is not
told apart from the hi/lo split's LOP3, so the split's FADD/LOP3 are shown separately as `fadd`), and the source
lines of the loop (-lineinfo); `steps` = 16x16 tile products / products per step: one k-step of one 16x16
accumulator tile (3xTF32: 3 products; tf32, bf16/fp16: 1), a product being 2 HMMA.16816 (fp16/bf16 m16n16k16),
2 HMMA.1688 (tf32 by mma.sync.m16n8k8: mma::Tf32A/B/C) or 4 HMMA.1684 (tf32 by wmma's m16n16k8), and
`per step` = instructions / steps, the figure benchmarks/roofline.py's models use.

    python benchmarks/sass_counts.py [--arch 90] [--keep DIR] > benchmarks/results/2026-12-01-cpu/sass_counts.txt
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_resources  # noqa: E402

ROOT = gpu_resources.ROOT
KERNELS = {"meta_block.cu": "meta_forward_mma_kernel", "patchwise_conv2d.cu": "pw_forward_mma_kernel"}


def _tool(name: str) -> str:
    p = shutil.which(name)
    if p:
        return p
    try:
        import triton

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    raise RuntimeError(f"{name} not found (CUDA toolkit or triton)")


_FUNC = re.compile(r"^\s*\.text\.(\S+):")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L\w+):")
_LINE = re.compile(r'File "([^"]+)", line (\d+)')


def disassemble(cubin: str) -> dict:
    """{mangled function: [[address, opcode, operands, source line or None, labels]]} from nvdisasm -g."""
    return parse(subprocess.run([_tool("nvdisasm"), "-g", "-c", cubin], capture_output=True, text=True,
                                check=True).stdout)


def parse(out: str) -> dict:
    """disassemble()'s result from nvdisasm -g -c text (line info: the *_kernels.cuh lines only)."""
    funcs, cur, line, labels = {}, None, None, {}
    pending = []
    for raw in out.splitlines():
        m = _FUNC.match(raw)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            labels = {}
            continue
        if cur is None:
            continue
        m = _LABEL.match(raw)
        if m:
            pending.append(m.group(1))
            continue
        if "//##" in raw:
            m = _LINE.search(raw)
            if m:  # lines of the kernel headers only (not mma.h / cuda headers inlined there)
                line = int(m.group(2)) if m.group(1).endswith("_kernels.cuh") else None
            continue
        m = _INSTR.search(raw)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            cur.append([addr, m.group(3), m.group(4), line, labels])
    return funcs


def _target(ins):
    m = re.search(r"`\((\.L\w+)\)", ins[2])
    if m:
        return ins[4].get(m.group(1))
    m = re.search(r"0x([0-9a-f]+)", ins[2])
    return int(m.group(1), 16) if m else None


def all_loops(code: list) -> list:
    """Every loop: (first index, last index) of the body (branch target .. backward BRA), one per backward
    branch, in address order of the branch."""
    idx = {ins[0]: i for i, ins in enumerate(code)}
    found = []
    for i, ins in enumerate(code):
        if ins[1].startswith("BRA"):
            t = _target(ins)
            if t is not None and t <= ins[0] and t in idx:
                found.append((idx[t], i))
    return found


def loops(code: list) -> list:
    """Innermost loops holding HMMA: (first index, last index) of the body (branch target .. backward BRA)."""
    found = all_loops(code)
    with_mma = [(a, b) for a, b in found if any(code[k][1].startswith("HMMA") for k in range(a, b + 1))]
    return [(a, b) for a, b in with_mma if not any((c, d) != (a, b) and a <= c and d <= b for c, d in with_mma)]


def classify(body: list) -> dict:
    c = dict(instr=len(body), hmma=0, products=0.0, lds=0, ld_generic=0, s2r=0, int_addr=0, fadd=0, lop3=0, other=0)
    for ins in body:
        op = ins[1]
        if op.startswith("HMMA"):
            c["hmma"] += 1
            c["products"] += 1 / HMMA_PER_PRODUCT.get(op.split(".")[1] if "." in op else "", 2)
        elif op.startswith(("LDS", "LDSM")):
            c["lds"] += 1
        elif op.startswith(("LD.", "LDG")) or op == "LD":
            c["ld_generic"] += 1
        elif op.startswith("S2R") or op.startswith("S2UR"):
            c["s2r"] += 1
        elif op.startswith(("IMAD", "IADD", "LEA", "SHF", "ISETP", "SEL", "MOV", "IABS", "I2F", "F2I")):
            c["int_addr"] += 1
        elif op.startswith("FADD"):
            c["fadd"] += 1
        elif op.startswith("LOP3"):
            c["lop3"] += 1
        else:
            c["other"] += 1
    return c


#: HMMA instructions per 16x16 tile product, by the HMMA's shape: m16n8k4 (wmma's tf32 m16n16k8: 4), m16n8k8 (tf32
#: mma.sync: 2), m16n8k16 (fp16/bf16: 2)
HMMA_PER_PRODUCT = {"1684": 4, "1688": 2, "16816": 2}


def variant(demangled: str) -> tuple:
    """(dtype, split / MT, 16x16 tile products per step) of an instantiation."""
    args = re.search(r"<(.*?)>\(", demangled).group(1).split(",")
    t, n = args[0].strip(), int(args[1].strip())
    if "pw_forward" in demangled:
        return (t.split("::")[-1], f"MT={n}", 1)
    if t == "float":
        return ("float", f"kSplit={n}", n)
    return (t.split("::")[-1], f"kSplit={n}", 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--keep", default=None, help="keep the cubins in this folder")
    p.add_argument("--reuse", action="store_true", help="disassemble the cubins already in --keep (no nvcc)")
    p.add_argument("--all-loops", default=None, metavar="LINES",
                   help="also list every loop (HMMA or not) of meta_forward_mma_kernel whose source lines start "
                        "in LINES (A-B, lines of meta_block_kernels.cuh), nested ones too, with LDG and LD counts")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        d = a.keep or tmp
        os.makedirs(d, exist_ok=True)
        print(f"# SASS of the tensor-core loops, sm_{a.arch} (nvcc {_nvcc_version()}); "
              "per loop: instructions, HMMA, LDS/LDSM, generic LD, S2R, integer/move, FADD, LOP3, other")
        for cu, kernel in KERNELS.items():
            cubin = os.path.join(d, cu.replace(".cu", ".cubin"))
            if a.reuse:
                with open(cubin + ".log") as f:
                    log = f.read()
            else:
                r = subprocess.run(gpu_resources.nvcc_command(os.path.join(ROOT, "csrc", "cuda", cu), cubin, a.arch),
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"nvcc failed on {cu}:\n{r.stderr[-3000:]}")
                log = r.stdout + r.stderr
                with open(cubin + ".log", "w") as f:
                    f.write(log)
            funcs = disassemble(cubin)
            names = gpu_resources._demangle(sorted(funcs))
            for mangled in sorted(funcs, key=lambda f: names[f]):
                dem = names[mangled]
                if kernel not in dem:
                    continue
                dtype, var, per = variant(dem)
                ptx = _ptxas_line(log, mangled)
                print(f"\n## {kernel} <{dtype}, {var}>  ({ptx})")
                for lo, hi in loops(funcs[mangled]):
                    body = funcs[mangled][lo:hi + 1]
                    c = classify(body)
                    lines = sorted({ins[3] for ins in body if ins[3] is not None})
                    steps = c["products"] / per
                    span = f"{lines[0]}-{lines[-1]}" if lines else "?"
                    print(f"loop @0x{body[0][0]:x} lines {span}: {c['instr']} instr, {c['hmma']} HMMA "
                          f"({steps:g} steps) -> {c['instr'] / steps:.1f} per step; LDS {c['lds']}, "
                          f"LD {c['ld_generic']}, S2R {c['s2r']}, int/move {c['int_addr']}, FADD {c['fadd']}, "
                          f"LOP3 {c['lop3']}, other {c['other']}")
                if a.all_loops and kernel == "meta_forward_mma_kernel":
                    lo_l, hi_l = (int(v) for v in a.all_loops.split("-"))
                    for line in loop_listing(funcs[mangled], lo_l, hi_l):
                        print(line)
    return 0


def loop_listing(code: list, first: int, last: int) -> list:
    """One line per loop of ``code`` (all_loops) whose first source line is in [first, last]: address, source
    lines, instructions, LDG (global, incl. the read-only path), generic LD, LDS, STS, and the loops nested in
    it (their instructions are counted in the enclosing loop's too)."""
    out = []
    spans = all_loops(code)
    for a, b in spans:
        body = code[a:b + 1]
        lines = sorted({ins[3] for ins in body if ins[3] is not None})
        if not lines or not first <= lines[0] <= last:
            continue
        ops = [ins[1] for ins in body]
        ldg = sum(op.startswith("LDG") for op in ops)
        ld = sum(op == "LD" or op.startswith("LD.") for op in ops)
        lds = sum(op.startswith("LDS") for op in ops)
        sts = sum(op.startswith("STS") for op in ops)
        inner = [f"@0x{code[c][0]:x}" for c, d in spans if (c, d) != (a, b) and a <= c and d <= b]
        out.append(f"  all-loops @0x{body[0][0]:x} lines {lines[0]}-{lines[-1]}: {len(body)} instr; LDG {ldg}, "
                   f"LD {ld}, LDS {lds}, STS {sts}" + (f"; contains {' '.join(inner)}" if inner else ""))
    return out


def _nvcc_version() -> str:
    out = subprocess.run([shutil.which("nvcc") or "nvcc", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "?"


def _ptxas_line(log: str, mangled: str) -> str:
    on = False
    for line in log.splitlines():
        if f"'{mangled}'" in line:
            on = True
        elif on and "Used" in line:
            return line.split("info    :")[-1].strip()
    return "ptxas: ?"


if __name__ == "__main__":
    sys.exit(main())
