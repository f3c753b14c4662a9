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

#: What CI compiles: the models that launch every Triton kernel (HyperSeg-M's decoder levels,
#: HMSA with its two-scale training backward; PatchWiseConv2d at HyperSeg-M's decoder shapes),
#: float32 and bfloat16, the first pruned configuration of each autotuned launch. PYSEG_SM90_FULL=1
#: compiles every HyperSeg/HMSA registry model in float32/bfloat16/float16 with every configuration
#: (about a thousand variants: hours on a 2-core machine).
_SCOPE = ([] if os.environ.get("PYSEG_SM90_FULL") == "1" else
          ["--models", "hyperseg-m", "hmsa-deeplabv3p-mobilenetv2", "--first-config",
           "--dtypes", "float32", "bfloat16"])
_MODELS_FULL = ["hyperseg-m", "hyperseg-s", "hyperseg-tiny", "hyperseg-s-camvid", "hyperseg-l-camvid",
                "hyperseg-l-voc", "hmsa-hyperseg-m", "hmsa-deeplabv3p-mobilenetv2"]
if not _SCOPE:
    _SCOPE = ["--models", *_MODELS_FULL]

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


def test_every_kernel_is_launched_at_registry_shapes(results):
    launched = {r["kernel"] for r in results}
    assert _jit_kernels() - launched == set()


def test_sm90_compiles_without_spills_within_shared_memory(results):
    bad = [r for r in results if r["problems"]]
    report = "\n".join(f"{r['kernel']} {r.get('constexprs')} warps={r.get('num_warps')} "
                       f"sig={r.get('signature')}: {'; '.join(r['problems'])} (uses: {r['uses'][:3]})"
                       for r in bad[:20])
    assert not bad, f"{len(bad)} of {len(results)} variants fail on sm_90:\n{report}"
