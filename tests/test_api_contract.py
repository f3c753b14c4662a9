"""What every op and every registered model promises at its boundary: empty batches, argument types,
memory format, uniform builder arguments (each check here failed before the change that fixed it)."""
import ast
import pathlib

import pytest
import torch

import pyseg
from pyseg import _extension
from pyseg.models import create_model, list_models
from pyseg.ops import hmsa_fuse, meta_block, patchwise_conv2d, pointwise_block, resize_bilinear
from pyseg.ops._library import record_backends

BACKENDS = ["auto", "reference"]


def _op_calls(B=2, channels_last=False):
    """One small valid call of every public op: name -> (x, call(x, backend))."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 4, 8, 6, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    hid, cout = 8, 3
    w_conv = torch.randn(B, 3 * 4 * 9, 2, 3, generator=g)
    w_meta = torch.randn(B, hid * 4 + 9 * hid + cout * hid, 2, 3, generator=g)
    w_point = torch.randn(B, 5 * 4, 2, 3, generator=g)
    low = torch.randn(B, 4, 4, 3, generator=g)
    att = torch.rand(B, 1, 4, 3, generator=g)
    return {
        "patchwise_conv2d": (x, lambda x, be: patchwise_conv2d(x, w_conv, kernel_size=3, padding=1, backend=be)),
        "meta_block": (x, lambda x, be: meta_block(x, w_meta, hid, cout, backend=be)),
        "pointwise_block": (x, lambda x, be: pointwise_block(x, w_point, backend=be)),
        "hmsa_fuse": (x, lambda x, be: hmsa_fuse([x, low], [None, att], [1.0, 0.5], (8, 6), backend=be)),
        "resize_bilinear": (x, lambda x, be: resize_bilinear(x, (16, 12), backend=be)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(_op_calls()))
def test_empty_batch_gives_empty_output(op, backend):
    """B = 0 returns an empty (0, C, H, W) result, as F.conv2d does, and backward runs."""
    full_x, full_call = _op_calls(B=2)[op]
    want = full_call(full_x, backend).shape
    x, call = _op_calls(B=0)[op]
    x = x.requires_grad_()
    y = call(x, backend)
    assert tuple(y.shape) == (0,) + tuple(want[1:])
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("name", [n for n in list_models() if not n.endswith("resnet50")])
def test_empty_batch_every_model(name):
    """Every registered model (eval) maps an empty batch to empty logits (the resnet50 variants share
    their code with the mobilenetv2 ones and are skipped for time)."""
    m = create_model(name, num_classes=5).eval()
    base = getattr(m, "model", m)
    side = getattr(base, "input_multiple", 64)
    with torch.no_grad():
        y = m(torch.randn(0, 3, side, side))
    assert tuple(y.shape) == (0, 5, side, side)


@pytest.mark.parametrize("op", list(_op_calls()))
def test_non_tensor_x_is_a_type_error(op):
    _, call = _op_calls()[op]
    with pytest.raises(TypeError, match="must be"):
        call([[1.0, 2.0]], "auto")
    with pytest.raises(TypeError, match="must be"):
        call(None, "auto")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(_op_calls()))
def test_channels_last_input_gives_channels_last_output(op, backend):
    x, call = _op_calls(channels_last=True)[op]
    y = call(x, backend)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, call(x.contiguous(), backend))


# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------
def _tiny_mobilenet_weights(tmp_path):
    import timm

    trunk = timm.create_model("mobilenetv2_100", pretrained=False, features_only=True, out_indices=(1, 4))
    sd = {k: v.clone() for k, v in trunk.state_dict().items()}
    return trunk, sd


def test_deeplab_builder_takes_backbone_weights(tmp_path):
    """create_model(..., backbone_weights=p) loads the trunk (it raised TypeError: the builder took
    ``pretrained_path``); a DataParallel ``module.`` prefix is stripped."""
    from safetensors.torch import save_file

    trunk, sd = _tiny_mobilenet_weights(tmp_path)
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}
    path = str(tmp_path / "trunk.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    m = create_model("deeplabv3p-mobilenetv2", num_classes=4, backbone_weights=path)
    for k, v in m.trunk.state_dict().items():
        torch.testing.assert_close(v, sd[k], msg=k)
    path2 = str(tmp_path / "trunk.safetensors")
    save_file(sd, path2)
    m = create_model("hmsa-deeplabv3p-mobilenetv2", num_classes=4, backbone_weights=path2)
    torch.testing.assert_close(m.model.trunk.state_dict()[next(iter(sd))], sd[next(iter(sd))])


def test_hmsa_deeplab_builder_takes_return_aux():
    m = create_model("hmsa-deeplabv3p-mobilenetv2", num_classes=3, return_aux=True)
    assert m.return_aux


@pytest.mark.parametrize("name", list_models())
def test_every_builder_takes_the_uniform_arguments(name):
    """num_classes, in_channels, backbone_weights, checkpoint: every registered builder accepts them."""
    import inspect

    from pyseg.models.registry import _REGISTRY

    params = inspect.signature(_REGISTRY[name].builder).parameters
    for arg in ("num_classes", "in_channels", "backbone_weights", "checkpoint"):
        assert arg in params, f"{name}: builder has no {arg!r} argument"


def test_in_channels_reaches_the_model():
    m = create_model("deeplabv3p-mobilenetv2", num_classes=3, in_channels=1).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)


# ---------------------------------------------------------------------------------------------
# layering
# ---------------------------------------------------------------------------------------------
def _imports(path: pathlib.Path, package: str):
    """Absolute names of what ``path`` (a module of ``package``) imports, module level and inside functions."""
    parts = package.split(".")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(parts[:len(parts) - node.level + 1]) if node.level else ""
            target = ".".join(x for x in (base, node.module) if x)
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_import_cycle_in_models():
    """The registry imports no model module; no module of pyseg.models imports one that imports it back."""
    root = pathlib.Path(pyseg.__file__).parent / "models"
    mods = {p.stem: p for p in root.glob("*.py") if p.stem != "__init__"}
    graph = {name: {t.split(".")[2] for t in _imports(p, "pyseg.models")
                    if t.startswith("pyseg.models.") and t.split(".")[2] in mods}
             for name, p in mods.items()}
    assert not graph["registry"], f"pyseg.models.registry imports {graph['registry']}"
    for start in graph:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph[stack.pop()]:
                assert nxt != start, f"import cycle through pyseg.models.{start}"
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)


def test_eval_and_predict_do_not_import_the_trainer():
    import subprocess
    import sys

    code = ("import sys, pyseg.cli.eval, pyseg.cli.predict, pyseg.cli._load; "
            "sys.exit(int('pyseg.engine.trainer' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_models_reach_no_lower_than_ops():
    """Model modules use pyseg.ops / pyseg.nn, not the extension loader or the backends."""
    root = pathlib.Path(pyseg.__file__).parent / "models"
    for p in root.glob("*.py"):
        imported = _imports(p, "pyseg.models")
        bad = {t for t in imported if t.startswith(("pyseg._extension", "pyseg._backends", "pyseg.ops._library"))}
        assert not bad, f"{p.name} imports {bad}"


@pytest.mark.skipif(not _extension.HAS_C, reason="no compiled kernels")
def test_meta_block_weight_layout_is_stated_by_the_op():
    from pyseg.ops.meta_block import weight_memory_format

    assert weight_memory_format(torch.device("cpu")) == torch.channels_last
    assert weight_memory_format(torch.device("cpu"), "reference") == torch.contiguous_format
    if _extension.triton_usable(torch.device("cpu")):  # the Triton kernels read it in place too
        assert weight_memory_format(torch.device("cpu"), "triton") == torch.channels_last
    with record_backends() as ran:
        m = create_model("hyperseg-tiny", num_classes=3).eval()
        with torch.no_grad():
            m(torch.randn(1, 3, 64, 64))
    assert ("meta_block", "cpu") in ran


@pytest.mark.skipif(not _extension.HAS_C, reason="no compiled kernels")
def test_pointwise_block_weight_layout_is_stated_by_the_op(monkeypatch):
    """pointwise_block reads patch-major weights in place only on CUDA (the CPU kernel reads the default
    layout); HyperSeg's generators of the 1x1 levels follow what weight_memory_format says for that op."""
    import pyseg.models.hyperseg as hs
    from pyseg.ops.meta_block import weight_memory_format

    assert weight_memory_format(torch.device("cpu"), op="pointwise_block") == torch.contiguous_format
    with pytest.raises(ValueError, match="op must be one of"):
        weight_memory_format(torch.device("cpu"), op="conv")
    m = create_model("hyperseg-tiny", num_classes=3).eval()
    kinds = [b.kernel_size for b in m.decoder]
    assert 1 in kinds and 3 in kinds
    # as on a GPU with the CUDA kernels: patch-major for the 1x1 levels only
    monkeypatch.setattr(hs, "weight_memory_format",
                        lambda device, backend="auto", op="meta_block":
                        torch.channels_last if op == "pointwise_block" else torch.contiguous_format)
    with torch.no_grad():
        _, weights, _ = m.generate_weights(torch.randn(1, 3, 64, 64))
    for k, w in zip(kinds, weights):
        patch_major = w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        assert patch_major == (k == 1), (k, w.shape, w.stride())
