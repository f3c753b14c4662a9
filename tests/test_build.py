"""The compiled extension: which kernels were built, and what CI requires of the build."""
import os

import pytest
import torch

import pyseg
from pyseg import _extension


def _compiled_ops():
    names = sorted({s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("pyseg::")})
    return [n.split("::")[1] for n in names]


def test_one_schema_per_op():
    """Every registered op is one schema and its backward (the Triton kernels are one more implementation
    of the same op, no ``pyseg::<op>_triton`` schema); the schema text the helper holds for installs
    without pyseg._C is the compiled one (csrc/pyseg.cpp)."""
    import pyseg.ops  # noqa: F401  (registers the ops)
    from pyseg.ops._library import _OPS

    assert set(_OPS) == {"patchwise_conv2d", "meta_block", "pointwise_block", "hmsa_fuse"}
    names = {s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("pyseg::")}
    names |= {f"pyseg::{n}" for n in _OPS} | {f"pyseg::{n}_backward" for n in _OPS}
    assert names == {f"pyseg::{n}" for n in _OPS} | {f"pyseg::{n}_backward" for n in _OPS}
    for name, op in _OPS.items():
        for overload, text in ((op.forward_op, op.schema), (op.backward_op, op.backward_schema)):
            assert str(overload._schema) == str(torch._C.parse_schema("pyseg::" + text)), name


def test_backends_report():
    b = pyseg.backends()
    assert set(b) == {"reference", "cpu", "cuda", "triton"}
    assert b["reference"]["available"]
    for v in b.values():
        assert isinstance(v["available"], bool) and isinstance(v["detail"], str) and v["detail"]


@pytest.mark.skipif(not _extension.HAS_C, reason="pyseg._C not built")
def test_every_op_has_a_cpu_kernel():
    ops = _compiled_ops()
    assert "patchwise_conv2d" in ops
    missing = [op for op in ops if not _extension.has_kernel(op, "CPU")]
    assert not missing, f"ops without a CPU kernel: {missing}"


@pytest.mark.skipif(os.environ.get("PYSEG_EXPECT_CUDA_KERNELS") != "1",
                    reason="set PYSEG_EXPECT_CUDA_KERNELS=1 when the build must include the CUDA kernels (CI)")
def test_every_op_has_a_cuda_kernel():
    assert _extension.HAS_C, f"pyseg._C failed to import: {_extension._C_ERROR}"
    ops = _compiled_ops()
    missing = [op for op in ops if not _extension.has_kernel(op, "CUDA")]
    assert not missing, f"ops without a compiled CUDA kernel: {missing}"
