"""Every Triton kernel variant the ops launch at the registry models' shapes compiles for sm_90
(H100/H200) without register spills and within the 227 KB shared-memory limit per block.

No GPU needed: kernels/_aot.py runs every HyperSeg/HMSA registry model on the meta device with the
Triton backend (plus ``PatchWiseConv2d`` at HyperSeg-M's decoder shapes), replays the captured op
calls through the launchers with launches recorded instead of run (autotuned kernels: every
configuration pruning keeps; float32 with and without TF32, bfloat16, float16; forward and every
gradient mask, HMSA's two-scale training backward included), and compiles each distinct variant
with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, registers and spills from the ``ptxas
-v`` log of its cubin step. It runs in a subprocess because the interpreter (TRITON_INTERPRET=1,
set by conftest) cannot compile.

Deduplication: one variant per program, i.e. per (kernel, constexprs, argument dtypes, num_warps,
num_stages); integer arguments are compiled unspecialised. Triton's integer specialisation
(``tt.divisibility`` = 16 on arguments divisible by 16, arguments equal to 1 turned into
constants) only adds facts about the arguments: tiles, layouts, loops and shared-memory buffers
are fixed by the constexprs, dtypes and warps, so shared memory is the same, but registers are not
(constant strides change ptxas's allocation). ``PYSEG_SM90_FULL=1`` compiles the specialised
variants at the registry shapes as well (the un-deduplicated run: 705 variants, all clean,
benchmarks/results/2026-12-01-cpu/triton_sm90_full_specialised.json). The patch-wise kernels are not
specialised on their integer arguments at all (``do_not_specialize``: specialised, eight 3x3 tl.dot
variants at the ``PatchWiseConv2d`` shape spilled 4-88 B), so for them the deduplicated variant is
exactly the launched one.
Cost with a cold Triton cache (as in CI): 313 s of
CPU time, the compiles in a pool of ``os.cpu_count()`` workers (about 3 minutes on 2 idle cores;
README, Tests).
"""
import ast
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("triton")
pytestmark = pytest.mark.slow

#: Every HyperSeg/HMSA registry model, every dtype and configuration (kernels/_aot.py's defaults);
#: PYSEG_SM90_FULL=1 adds the integer-specialised variants at the registry shapes.
_MODELS = ["hyperseg-m", "hyperseg-s", "hyperseg-tiny", "hyperseg-s-camvid", "hyperseg-l-camvid",
           "hyperseg-l-voc", "hmsa-hyperseg-m", "hmsa-deeplabv3p-mobilenetv2"]
_SCOPE = ["--models", *_MODELS] + (["--specialise-ints"] if os.environ.get("PYSEG_SM90_FULL") == "1" else [])

_CODE = ("import sys; from pyseg import _extension; _extension.triton_kernels(); "
         "from pyseg.kernels import _aot; sys.exit(_aot.main())")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the subprocess imports the pyseg this process imported (the installed one in CI, with its compiled
    # extension; the checkout in a development tree) and runs outside the checkout (``python -c`` puts the
    # working directory first on sys.path)
    import pyseg

    home = os.path.dirname(os.path.dirname(os.path.abspath(pyseg.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([home] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    r = subprocess.run([sys.executable, "-c", _CODE, "--json", str(out), *_SCOPE], env=env, cwd=str(out.parent),
                       capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(out.read_text())


def _kernels_dir():
    from pyseg import _extension

    if os.path.isdir(os.path.join(ROOT, "kernels")):
        return os.path.join(ROOT, "kernels")
    return os.path.dirname(_extension.triton_kernels().__file__)


def _jit_kernels():
    """Every top-level ``@triton.jit`` function named ``*_kernel`` in kernels/*.py."""
    out = set()
    for f in glob.glob(os.path.join(_kernels_dir(), "*.py")):
        with open(f) as fh:
            tree = ast.parse(fh.read())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                out.add(node.name)
    return out


def test_every_kernel_is_compiled_at_registry_shapes(results):
    compiled = {r["kernel"] for r in results if not r.get("skipped")}
    assert _jit_kernels() - compiled == set()


def test_scope_covers_dtypes_tf32_and_backward(results):
    """The variants include float16, bfloat16, float32 with and without TF32, and every backward
    kernel (their names contain "bwd", "dx", "dw" or "grad")."""
    uses = [u for r in results for u in r["uses"]]
    assert {u.rsplit(":", 1)[1] for u in uses} == {"float32", "float32+tf32", "bfloat16", "float16"}
    kernels = {r["kernel"] for r in results}
    assert {"_bwd_r1_kernel", "_bwd_low_kernel", "_bwd_att_kernel", "_dx_kernel", "_dw_kernel",
            "_pw_bwd_grads_kernel", "_meta_bwd_stage1_kernel"} <= kernels


def test_sm90_compiles_without_spills_within_shared_memory(results):
    bad = [r for r in results if r["problems"]]
    report = "\n".join(f"{r['kernel']} {r.get('constexprs')} warps={r.get('num_warps')} "
                       f"sig={r.get('signature')}: {'; '.join(r['problems'])} (uses: {r['uses'][:3]})"
                       for r in bad[:20])
    assert not bad, f"{len(bad)} of {len(results)} variants fail on sm_90:\n{report}"
