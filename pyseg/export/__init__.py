"""Deployment: ONNX (standard ops, ONNX Runtime / TensorRT / OpenVINO) and ``torch.export`` / AOTInductor.

The pyseg ops have ONNX translations in standard ONNX operators (:mod:`pyseg.export.onnx_ops`). After
``import pyseg`` a plain ``torch.onnx.export(model, (x,), "m.onnx", dynamo=True)`` uses them: they are
registered the moment torch's dynamo exporter loads (``import pyseg`` itself does not import onnxscript,
which is slow to import); importing this module registers them at once. For an explicit call use
``torch.onnx.export(..., dynamo=True, custom_translation_table=pyseg.export.onnx_translation_table())``.

>>> from pyseg.models import create_model
>>> from pyseg.export import export_model, check_export
>>> m = create_model("hyperseg-m").eval()
>>> export_model(m, "hyperseg-m.onnx", height=512, width=1024)          # dynamic batch, fp32
>>> check_export(m, "hyperseg-m.onnx", height=512, width=1024)          # max |ONNX Runtime - eager|

Requirements: ``pip install "pyseg[export]"`` (onnx, onnxscript, onnxruntime) for ONNX; ``pt2`` needs
only torch and a C++ compiler (AOTInductor). A ``.pt2`` package calls pyseg's C++ CPU kernels through
torch's op registry: ``import pyseg`` before ``torch._inductor.aoti_load_package(path)``.
"""
from __future__ import annotations

import copy
import os
import tempfile
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["FORMATS", "DTYPES", "register_onnx_translations", "onnx_translation_table", "example_input",
           "export_model", "export_onnx", "export_pt2", "onnx_session", "run_exported", "check_export",
           "LabelsOutput"]

FORMATS = ("onnx", "pt2")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
#: smallest ONNX opset the translations are written for
OPSET = 18


def _require_onnx():
    missing = []
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install \"pyseg[export]\" "
                          "(onnx, onnxscript, onnxruntime)")


def register_onnx_translations() -> None:
    """Register the ONNX translations of the pyseg ops with torch's dynamo exporter (idempotent;
    done automatically, see the module docstring)."""
    _require_onnx()
    from . import onnx_ops

    onnx_ops.register()


def onnx_translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: {pyseg op: translation}."""
    _require_onnx()
    from . import onnx_ops

    return onnx_ops.translation_table()


class LabelsOutput(nn.Module):
    """Wraps a segmentation model so that it returns int64 labels (B, H, W): the fused argmax of an
    HMSA model (``predict(x, output="labels")``), else the argmax of the logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        if callable(getattr(self.model, "predict", None)) and hasattr(self.model, "scales"):
            return self.model.predict(x, output="labels")
        return self.model(x).argmax(1)


def _check_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def example_input(model: nn.Module, height: Optional[int] = None, width: Optional[int] = None, batch: int = 1,
                  dtype="fp32", seed: Optional[int] = None) -> torch.Tensor:
    """A random (batch, 3, H, W) input for ``model``; H, W default to the model's ``input_size`` (or the
    smallest legal size), and are checked against what it accepts (``check_input``)."""
    inner = getattr(model, "model", model)  # HMSA / LabelsOutput wrappers
    inner = getattr(inner, "model", inner)
    size = getattr(inner, "input_size", None) or (getattr(inner, "input_multiple", 64),) * 2
    H, W = height or size[0], width or size[1]
    if not (isinstance(H, int) and isinstance(W, int)) or H <= 0 or W <= 0:
        raise ValueError(f"height and width must be positive ints, got {H!r} x {W!r}")
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    x = torch.randn(batch, getattr(inner, "in_channels", 3), H, W, generator=g).to(device, _check_dtype(dtype))
    if callable(getattr(inner, "check_input", None)):
        inner.check_input(x)
    return x


def _atomic(path: str, write) -> str:
    """Write through a temporary file in the destination folder, renamed into place on success only."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _prepare(model: nn.Module, dtype, labels: bool):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dtype = _check_dtype(dtype)
    p = next(iter(model.parameters()), None)
    if p is not None and p.dtype != dtype:
        model = copy.deepcopy(model)  # leave the caller's model in its dtype
    model = model.eval().to(dtype)
    return LabelsOutput(model).eval() if labels else model


def _dynamic_shapes(dynamic_batch: bool):
    if not dynamic_batch:
        return None
    return ({0: torch.export.Dim("batch", min=1, max=1024)},)


def _trace_input(model, height, width, dtype, dynamic_batch):
    # batch 2 when dynamic: torch.export specialises a size-1 example dimension
    return example_input(model, height, width, batch=2 if dynamic_batch else 1, dtype=dtype, seed=0)


def export_onnx(model: nn.Module, path, height: Optional[int] = None, width: Optional[int] = None, dtype="fp32",
                dynamic_batch: bool = True, labels: bool = False, opset_version: int = OPSET,
                verbose: bool = False) -> str:
    """Export ``model`` (eval mode, ``dtype``) to an ONNX file of standard opset-``opset_version`` ops
    with input ``image`` (B, 3, H, W) and output ``logits`` (B, C, H, W) -- or ``labels`` (B, H, W) int64
    with ``labels=True``. Only the batch is dynamic. Returns ``path``."""
    _require_onnx()
    if not isinstance(opset_version, int) or opset_version < OPSET:
        raise ValueError(f"opset_version must be an int >= {OPSET}, got {opset_version!r}")
    register_onnx_translations()
    m = _prepare(model, dtype, labels)
    x = _trace_input(m, height, width, dtype, dynamic_batch)

    def write(tmp):
        with torch.no_grad():
            torch.onnx.export(m, (x,), tmp, dynamo=True, opset_version=opset_version,
                              dynamic_shapes=_dynamic_shapes(dynamic_batch), input_names=["image"],
                              output_names=["labels" if labels else "logits"], optimize=True, verbose=verbose,
                              external_data=False)

    return _atomic(path, write)


def export_pt2(model: nn.Module, path, height: Optional[int] = None, width: Optional[int] = None, dtype="fp32",
               dynamic_batch: bool = True, labels: bool = False) -> str:
    """``torch.export`` + AOTInductor package (``.pt2``) of ``model`` for the CPU. The package calls the
    pyseg ops through torch's op registry: ``import pyseg`` before loading it. Returns ``path``."""
    m = _prepare(model, dtype, labels)
    x = _trace_input(m, height, width, dtype, dynamic_batch)
    if x.device.type != "cpu":
        raise ValueError(f"export_pt2 packages for the CPU; move the model to the CPU (it is on {x.device})")
    with torch.no_grad():
        ep = torch.export.export(m, (x,), dynamic_shapes=_dynamic_shapes(dynamic_batch))

    def write(tmp):
        from torch._inductor import aoti_compile_and_package

        os.remove(tmp)  # the packager wants to create the file itself
        aoti_compile_and_package(ep, package_path=tmp)

    return _atomic(path, write)


def export_model(model: nn.Module, path, format: Optional[str] = None, **kwargs) -> str:
    """Export to ``format`` (``"onnx"`` or ``"pt2"``; default from the file extension). See
    :func:`export_onnx` / :func:`export_pt2` for the keyword arguments."""
    if format is None:
        ext = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
        if ext not in FORMATS:
            raise ValueError(f"cannot tell the format from {os.fspath(path)!r}: pass format= one of "
                             f"{', '.join(FORMATS)} or use a .onnx / .pt2 file name")
        format = ext
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    return (export_onnx if format == "onnx" else export_pt2)(model, path, **kwargs)


def onnx_session(path, threads: Optional[int] = None):
    """An ONNX Runtime CPU session (``threads`` intra-op threads; default ORT's choice)."""
    _require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])


def run_exported(path, x: torch.Tensor, threads: Optional[int] = None) -> torch.Tensor:
    """Run an exported ``.onnx`` (ONNX Runtime, CPU) or ``.pt2`` (AOTInductor) file on ``x``."""
    if not isinstance(path, (str, os.PathLike)):  # an onnxruntime.InferenceSession
        sess = path
    elif os.fspath(path).endswith(".pt2"):
        from torch._inductor import aoti_load_package

        with torch.no_grad():
            return aoti_load_package(os.fspath(path))(x)
    else:
        sess = onnx_session(path, threads)
    name = sess.get_inputs()[0].name
    return torch.from_numpy(sess.run(None, {name: x.detach().cpu().numpy()})[0])


def check_export(model: nn.Module, path, height: Optional[int] = None, width: Optional[int] = None, dtype="fp32",
                 batch: int = 1, labels: bool = False, seed: int = 1) -> dict:
    """Run the exported file and eager ``model`` on one random input; returns ``max_abs_diff``,
    ``max_abs_eager`` and ``max_rel_diff`` (relative to the largest |eager output|) -- or, for
    ``labels``, ``label_agreement`` (fraction of equal pixels)."""
    m = _prepare(model, dtype, labels)
    x = example_input(m, height, width, batch=batch, dtype=dtype, seed=seed)
    with torch.no_grad():
        ref = m(x).cpu()
    out = run_exported(path, x)
    if tuple(out.shape) != tuple(ref.shape):
        raise RuntimeError(f"{path}: output shape {tuple(out.shape)} differs from eager {tuple(ref.shape)}")
    if labels:
        agree = float((out == ref).double().mean())
        return {"label_agreement": agree, "pixels": ref.numel(), "batch": batch}
    diff = float((out.float() - ref.float()).abs().max())
    peak = float(ref.float().abs().max())
    return {"max_abs_diff": diff, "max_abs_eager": peak, "max_rel_diff": diff / max(peak, 1e-30), "batch": batch}
