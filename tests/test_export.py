"""Deployment: ONNX translations of the pyseg ops against eager, registry models in ONNX Runtime,
the automatic registration (plain ``torch.onnx.export``), fp16 and dynamic-batch files, pyseg-export,
torch.export / AOTInductor.

Runtime on 2 cores: the default tier ~2-3 min (every ONNX export traces the model with torch.export);
the ``slow`` tier exports every registry model (~30 s each) and builds an AOTInductor package.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pyseg
from pyseg import _extension


_missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if __import__("importlib").util.find_spec(m) is None]
needs_onnx = pytest.mark.skipif(bool(_missing), reason=f"{', '.join(_missing)} not installed "
                                f"(pip install \"pyseg[export]\")")
needs_c = pytest.mark.skipif(not _extension.HAS_C, reason="compiled extension (pyseg._C) not built")
pytestmark = [needs_c]

# registry model -> (H, W) small legal input (multiples of input_multiple)
SMALL = {"hyperseg-l-voc": (128, 128), "hmsa-deeplabv3p-mobilenetv2": (64, 64), "hmsa-deeplabv3p-resnet50": (64, 64),
         "deeplabv3p-mobilenetv2": (64, 64), "deeplabv3p-resnet50": (64, 64)}
FAST = {"hyperseg-tiny", "deeplabv3p-mobilenetv2"}


#: Where this process imported pyseg from: the installed package in CI (with its compiled extension), the
#: checkout in a development tree. Subprocesses import the same one (and run outside the checkout, since
#: ``python -m`` puts the working directory first on sys.path).
_PYSEG_HOME = str(Path(pyseg.__file__).resolve().parent.parent)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_PYSEG_HOME] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _ort(path, *inputs):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(s.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in s.run(None, feeds)]


def _export(module, args, path, dynamic=None):
    from pyseg.export import register_onnx_translations

    register_onnx_translations()
    torch.onnx.export(module.eval(), args, str(path), dynamo=True, opset_version=18, dynamic_shapes=dynamic)
    return path


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _onnx_op_types(path):
    import onnx

    m = onnx.load(str(path))
    return {n.op_type for n in m.graph.node}, {o.domain for o in m.opset_import}


# ----------------------------------------------------------------------------------------------
# the op translations (one export per op family, several configurations as outputs)
# ----------------------------------------------------------------------------------------------
class _PatchwiseCases(torch.nn.Module):
    # (Cin, Cout, k, stride, padding4, dilation, groups, with bias); input 2 x Cin x 12 x 18, grid 3 x 3
    CASES = [(6, 4, 1, 1, (0, 0, 0, 0), 1, 1, True),      # 1x1, divisible
             (6, 6, 3, 1, (1, 1, 1, 1), 1, 6, True),      # depthwise 3x3 (the v0_1 decoder), divisible
             (6, 4, 3, 2, (1, 0, 2, 1), 2, 2, False),     # grouped, strided, dilated, asymmetric padding
             (6, 4, 3, 1, (1, 1, 1, 1), 1, 1, True)]      # dense 3x3 (general MatMul path)

    def forward(self, x, *ws):
        outs = []
        for (cin, cout, k, s, p, d, g, _), (w, b) in zip(self.CASES, zip(ws[0::2], ws[1::2])):
            outs.append(torch.ops.pyseg.patchwise_conv2d(x, w, b if b.numel() else None, [s, s], list(p), [d, d], g))
        return tuple(outs)


@needs_onnx
def test_patchwise_conv2d_translation(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 12, 18, generator=g)
    ws = []
    for cin, cout, k, s, p, d, grp, bias in _PatchwiseCases.CASES:
        ws.append(torch.randn(2, cout, cin // grp, k, k, 3, 3, generator=g))
        ws.append(torch.randn(2, cout, 3, 3, generator=g) if bias else torch.empty(0))
    m = _PatchwiseCases()
    ref = m(x, *ws)
    outs = _ort(_export(m, (x, *ws), tmp_path / "pw.onnx"), x, *ws)
    assert len(outs) == len(ref)
    for case, o, r in zip(_PatchwiseCases.CASES, outs, ref):
        assert o.shape == r.shape, case
        assert _rel(o, r) < 1e-5, case
    ops, domains = _onnx_op_types(tmp_path / "pw.onnx")
    assert domains <= {"", "ai.onnx"}, domains  # standard ops only
    assert not any(o.startswith("pyseg") for o in ops)


class _BlockCases(torch.nn.Module):
    def forward(self, x, w_meta, sc_meta, sh_meta, w_pw, sc_pw, sh_pw, x_odd, w_meta_odd, w_pw_odd):
        return (torch.ops.pyseg.meta_block(x, w_meta, sc_meta, sh_meta, 12, 5),
                torch.ops.pyseg.pointwise_block(x, w_pw, sc_pw, sh_pw),
                torch.ops.pyseg.meta_block(x_odd, w_meta_odd, sc_meta, sh_meta, 12, 5),  # grid does not divide
                torch.ops.pyseg.pointwise_block(x_odd, w_pw_odd, sc_pw, sh_pw))


@needs_onnx
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-batch-matmul", "static-batch-conv"])
def test_meta_and_pointwise_block_translation(tmp_path, dynamic):
    def inputs(b, seed):
        g = torch.Generator().manual_seed(seed)
        cin, hid, cout = 6, 12, 5
        n = hid * cin + 9 * hid + cout * hid
        return (torch.randn(b, cin, 16, 24, generator=g), 0.3 * torch.randn(b, n, 4, 6, generator=g),
                torch.rand(2 * hid + cout, generator=g) + 0.5, 0.1 * torch.randn(2 * hid + cout, generator=g),
                0.3 * torch.randn(b, cout * cin, 4, 6, generator=g), torch.rand(cout, generator=g) + 0.5,
                0.1 * torch.randn(cout, generator=g), torch.randn(b, cin, 11, 13, generator=g),
                0.3 * torch.randn(b, n, 3, 4, generator=g), 0.3 * torch.randn(b, cout * cin, 3, 4, generator=g))

    m = _BlockCases()
    dyn = None
    if dynamic:
        batched = {0: torch.export.Dim("batch", min=1, max=16)}
        dyn = (batched, batched, None, None, batched, None, None, batched, batched, batched)
    path = tmp_path / "blocks.onnx"
    _export(m, inputs(2, 0), path, dynamic=dyn)
    ops, _ = _onnx_op_types(path)
    assert ("Conv" in ops) == (not dynamic)  # static batch: the meta block as grouped Convs
    for batch in ((1, 3) if dynamic else (2,)):
        args = inputs(batch, 1)
        for o, r in zip(_ort(path, *args), m(*args)):
            assert o.shape == r.shape
            assert _rel(o, r) < 1e-5


class _HmsaCases(torch.nn.Module):
    def forward(self, p2, p1, p05, a1, a05):
        lg, at, sc = [p2, p1, p05], [p2.new_empty(0), a1, a05], [2.0, 1.0, 0.5]
        sizes = [32, 48, 16, 24, 8, 12]
        return (torch.ops.pyseg.hmsa_fuse(lg, at, sc, [20, 30], False, sizes),
                torch.ops.pyseg.hmsa_fuse(lg, at, sc, [20, 30], True, sizes),
                torch.ops.pyseg.hmsa_fuse(lg, at, sc, [16, 24], False),
                torch.ops.pyseg.hmsa_fuse([p1], [p1.new_empty(0)], [1.0], [64, 96], False))  # plain resize


@needs_onnx
def test_hmsa_fuse_translation_logits_and_labels(tmp_path):
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 7, 16, 24, generator=g), torch.randn(2, 7, 8, 12, generator=g),
            torch.randn(2, 7, 4, 6, generator=g), torch.rand(2, 1, 4, 6, generator=g),
            torch.rand(2, 1, 2, 3, generator=g))
    m = _HmsaCases()
    ref = m(*args)
    outs = _ort(_export(m, args, tmp_path / "hmsa.onnx"), *args)
    for i in (0, 2, 3):
        assert outs[i].shape == ref[i].shape and _rel(outs[i], ref[i]) < 1e-5
    assert outs[1].dtype == torch.int64 and outs[1].shape == ref[1].shape
    assert (outs[1] == ref[1]).double().mean() >= 0.999
    # the labels are the argmax of the fused logits
    assert torch.equal(ref[1], ref[0].argmax(1))


# ----------------------------------------------------------------------------------------------
# registration: plain torch.onnx.export after `import pyseg`, in a fresh process
# ----------------------------------------------------------------------------------------------
@needs_onnx
def test_plain_torch_onnx_export_after_import_pyseg(tmp_path):
    """The issue's command, verbatim apart from the model: no pyseg.export import, no translation table."""
    code = f"""
import sys, torch
import pyseg
from pyseg.models import create_model
assert "onnxscript" not in sys.modules, "import pyseg must not import onnxscript"
torch.manual_seed(0)
m = create_model("hyperseg-tiny").eval()
x = torch.randn(2, 3, 128, 256)
torch.onnx.export(m, (x,), {str(tmp_path / 'm.onnx')!r}, dynamo=True)
import onnxruntime as ort
s = ort.InferenceSession({str(tmp_path / 'm.onnx')!r}, providers=["CPUExecutionProvider"])
out = torch.from_numpy(s.run(None, {{s.get_inputs()[0].name: x.numpy()}})[0])
with torch.no_grad():
    ref = m(x)
print("REL", float((out - ref).abs().max() / ref.abs().max()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=900,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rel = float(r.stdout.split("REL")[-1])
    assert rel < 1e-4


# ----------------------------------------------------------------------------------------------
# registry models (fp32, dynamic batch): ONNX Runtime vs eager within 1e-4 of max |logit|
# ----------------------------------------------------------------------------------------------
def _model_names():
    from pyseg.models import list_models

    # the package's models only (other test modules register their own "test-*" models)
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in list_models()
            if not n.startswith("test-")]


def _small_model(name):
    from pyseg.models import create_model

    torch.manual_seed(0)
    m = create_model(name).eval()
    if callable(getattr(m, "set_scales", None)):
        m.set_scales((0.5, 1.0))  # keeps the per-scale inputs small; the third scale adds one more trunk pass
    mult = getattr(getattr(m, "model", m), "input_multiple", 64)
    H, W = SMALL.get(name, (mult, 2 * mult))
    return m, H, W


@needs_onnx
@pytest.mark.parametrize("name", _model_names())
def test_registry_model_onnx_matches_eager(tmp_path, name):
    from pyseg.export import check_export, export_onnx

    m, H, W = _small_model(name)
    path = export_onnx(m, tmp_path / f"{name}.onnx", height=H, width=W)
    for batch in (1, 3):  # dynamic batch
        res = check_export(m, path, height=H, width=W, batch=batch)
        assert res["max_rel_diff"] < 1e-4, (name, batch, res)


@needs_onnx
@pytest.mark.slow
@pytest.mark.parametrize("name", ["hmsa-hyperseg-m", "hmsa-deeplabv3p-mobilenetv2"])
def test_hmsa_labels_onnx(tmp_path, name):
    from pyseg.export import check_export, export_onnx

    m, H, W = _small_model(name)
    m.set_scales((0.5, 1.0, 2.0))
    path = export_onnx(m, tmp_path / "labels.onnx", height=H, width=W, labels=True)
    res = check_export(m, path, height=H, width=W, batch=2, labels=True)
    assert res["label_agreement"] >= 0.999, res


@needs_onnx
def test_hmsa_labels_onnx_fast(tmp_path):
    """HMSA fused labels of a small wrapped HyperSeg (the tiny config), scales (0.5, 1, 2)."""
    from pyseg.export import check_export, export_onnx
    from pyseg.models.hmsa import hmsa_wrap

    torch.manual_seed(0)
    m = hmsa_wrap("hyperseg-tiny", infer_scales=(0.5, 1.0, 2.0), attn_mid_channels=16).eval()
    path = export_onnx(m, tmp_path / "labels.onnx", height=128, width=128, labels=True, dynamic_batch=False)
    ops, _ = _onnx_op_types(path)
    assert "ArgMax" in ops and "Resize" in ops
    res = check_export(m, path, height=128, width=128, batch=1, labels=True)
    assert res["label_agreement"] >= 0.999, res


# ----------------------------------------------------------------------------------------------
# fp16, CLI, bad input
# ----------------------------------------------------------------------------------------------
@needs_onnx
def test_fp16_file(tmp_path):
    import onnx

    from pyseg.export import export_onnx

    m, H, W = _small_model("hyperseg-tiny")
    path = export_onnx(m, tmp_path / "h.onnx", height=H, width=W, dtype="fp16")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    f16 = onnx.TensorProto.FLOAT16
    assert model.graph.input[0].type.tensor_type.elem_type == f16
    assert model.graph.output[0].type.tensor_type.elem_type == f16
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, H, W]
    # ONNX Runtime's CPU provider runs the fp16 file (where it lacks an fp16 kernel it inserts casts)
    x = torch.randn(2, 3, H, W)
    out = _ort(path, x.half())[0].float()
    with torch.no_grad():
        ref = m(x)
    assert _rel(out, ref) < 2e-2


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "pyseg.cli.export", *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout, cwd=tempfile.gettempdir())


@needs_onnx
def test_cli_exports_and_checks(tmp_path):
    out = tmp_path / "tiny.onnx"
    r = _cli("--model", "hyperseg-tiny", "--format", "onnx", "--output", str(out), "--height", "128", "--width",
             "128")
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.is_file() and "max |diff|" in r.stdout and "relative" in r.stdout
    rel = float(r.stdout.split("relative ")[1].split(",")[0])
    assert rel < 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # no temporary left behind


@pytest.mark.parametrize("args,needle", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'; supported: deeplabv3p-mobilenetv2"),
    (["--model", "hyperseg-tiny", "--scales", "0.5,1"], "--scales needs a multi-scale attention model"),
    (["--model", "hmsa-hyperseg-m", "--scales", "0.5,2"], "containing 1.0"),
    (["--model", "hyperseg-tiny", "--height", "100"], "multiples of 64"),
    (["--model", "hyperseg-tiny", "--dtype", "fp16", "--format", "pt2"], "fp16 is supported for --format onnx"),
])
def test_cli_bad_input(tmp_path, args, needle):
    fmt = [] if "--format" in args else ["--format", "onnx"]
    r = _cli(*args, *fmt, "--output", str(tmp_path / "x.onnx"), timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr.strip().splitlines()[-1], r.stderr  # argparse: usage, then one error line
    assert not (tmp_path / "x.onnx").exists()


def test_cli_bad_format_is_a_usage_error(tmp_path):
    r = _cli("--model", "hyperseg-tiny", "--format", "tflite", "--output", str(tmp_path / "x"), timeout=300)
    assert r.returncode == 2 and "invalid choice: 'tflite'" in r.stderr and "pt2" in r.stderr.splitlines()[-1]


def test_api_bad_input(tmp_path):
    from pyseg.export import export_model
    from pyseg.models import create_model

    m = create_model("hyperseg-tiny")
    with pytest.raises(ValueError, match="format must be one of onnx, pt2"):
        export_model(m, tmp_path / "m.onnx", format="tflite")
    with pytest.raises(ValueError, match="cannot tell the format"):
        export_model(m, tmp_path / "m.bin")
    with pytest.raises(ValueError, match="dtype must be one of fp32, fp16"):
        export_model(m, tmp_path / "m.onnx", dtype="int8")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        export_model("hyperseg-tiny", tmp_path / "m.onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_model(m, tmp_path / "missing" / "m.onnx", height=128, width=128)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# torch.export and AOTInductor
# ----------------------------------------------------------------------------------------------
def test_torch_export_keeps_the_pyseg_ops():
    from pyseg.models import create_model

    m = create_model("hyperseg-tiny").eval()
    x = torch.randn(2, 3, 128, 128)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"pyseg.meta_block.default", "pyseg.pointwise_block.default"} <= targets
    x3 = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        assert _rel(ep.module()(x3), m(x3)) < 1e-5


@pytest.mark.slow
def test_pt2_package_runs(tmp_path):
    from pyseg.export import check_export, export_pt2

    m, H, W = _small_model("hyperseg-tiny")
    path = export_pt2(m, tmp_path / "tiny.pt2", height=H, width=W)
    res = check_export(m, path, height=H, width=W, batch=2)
    assert res["max_rel_diff"] < 1e-4, res
