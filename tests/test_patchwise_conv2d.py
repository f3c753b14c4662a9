"""Tests of pyseg.ops.patchwise_conv2d / pyseg.nn.PatchWiseConv2d over every backend.

* an independent oracle written from the definition (one F.conv2d per patch, keep the patch's
  output pixels), checked against the float64 reference;
* a seeded sweep of random configurations per backend and dtype (forward and all gradients vs the
  float64 reference on the same, already rounded, inputs);
* layouts (channels_last, flat vs 7-D weight), the module, gradcheck, opcheck, torch.compile;
* bad input raising clear errors, direct torch.ops calls raising RuntimeError.
"""
from __future__ import annotations

import importlib
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import CUDA_OK, backends_for
from pyseg import _extension
from pyseg.nn import PatchWiseConv2d
from pyseg.nn import functional as PF
from pyseg.ops import patchwise_conv2d, reference
from pyseg.ops.patchwise_conv2d import normalize_patchwise_args
from pyseg.ops._library import run_triton, triton_opcheck

HAS_CPU_KERNEL = _extension.has_kernel("patchwise_conv2d", "CPU")


def _triton_op_available(device="cpu") -> bool:
    if not _extension.triton_usable(torch.device(device)):
        return False
    try:
        importlib.import_module("pyseg.kernels.patchwise_conv2d")
    except ImportError:
        return False
    return True


def _skip_unavailable(backend, device="cpu"):
    if backend == "triton" and not _triton_op_available(device):
        pytest.skip("pyseg.kernels.patchwise_conv2d (Triton) is not available")


# ----------------------------------------------------------------------------------------------
# independent oracle, written from the definition
# ----------------------------------------------------------------------------------------------
def oracle(x, w7, bias, stride, padding4, dilation, groups):
    """For each patch: F.conv2d of the zero-padded input with that patch's kernel; keep the output
    pixels (i, j) with floor(i*gh/Hout) == pi and floor(j*gw/Wout) == pj."""
    B = x.shape[0]
    gh, gw = w7.shape[-2:]
    pt, pb, pl, pr = padding4
    xp = F.pad(x, (pl, pr, pt, pb))
    out = []
    for b in range(B):
        y = None
        for pi in range(gh):
            for pj in range(gw):
                bb = None if bias is None else bias[b, :, pi, pj]
                full = F.conv2d(xp[b:b + 1], w7[b, ..., pi, pj], bb, stride, 0, dilation, groups)
                Hout, Wout = full.shape[-2:]
                if y is None:
                    y = torch.full_like(full, float("nan"))
                rows = torch.tensor([i * gh // Hout == pi for i in range(Hout)])
                cols = torch.tensor([j * gw // Wout == pj for j in range(Wout)])
                mask = rows[:, None] & cols[None, :]
                y = torch.where(mask, full, y)
        out.append(y)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# random configurations
# ----------------------------------------------------------------------------------------------
def random_config(rng: random.Random) -> dict:
    """A valid random configuration of the public function (tiny sizes)."""
    while True:
        G = rng.choice([1, 1, 2, 3, "dw"])
        if G == "dw":
            Cin = rng.randint(1, 5)
            G = Cin
            Cout = Cin * rng.choice([1, 1, 2])
        else:
            Cin = G * rng.randint(1, 3)
            Cout = G * rng.randint(1, 3)
        kh, kw = rng.randint(1, 7), rng.randint(1, 7)
        if rng.random() < 0.3:
            kw = kh
        stride = (rng.randint(1, 2), rng.randint(1, 2))
        dilation = (rng.randint(1, 2), rng.randint(1, 2))
        H, W = rng.randint(3, 12), rng.randint(3, 12)
        if rng.random() < 0.5:  # odd sizes
            H |= 1
            W |= 1
        mode = rng.choice(["int", "pair", "same", "valid", "reflect"])
        padding_mode = "zeros"
        if mode == "int":
            padding = rng.randint(0, 3)
        elif mode == "pair":
            padding = (rng.randint(0, 3), rng.randint(0, 3))
        elif mode == "same":
            padding = "same"
            stride = (1, 1)
        elif mode == "valid":
            padding = "valid"
        else:
            padding = (rng.randint(0, 3), rng.randint(0, 3))
            padding_mode = "reflect"
            if padding[0] >= H or padding[1] >= W:
                continue
        if padding == "same":
            ph = dilation[0] * (kh - 1)
            pw = dilation[1] * (kw - 1)
        elif padding == "valid":
            ph = pw = 0
        else:
            p = padding if isinstance(padding, tuple) else (padding, padding)
            ph, pw = 2 * p[0], 2 * p[1]
        Hout = (H + ph - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        Wout = (W + pw - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        if Hout < 1 or Wout < 1:
            continue
        grid = (rng.randint(1, min(Hout, 5)), rng.randint(1, min(Wout, 5)))
        return dict(B=rng.randint(1, 3), Cin=Cin, Cout=Cout, groups=G, k=(kh, kw), stride=stride,
                    dilation=dilation, padding=padding, padding_mode=padding_mode, H=H, W=W, grid=grid,
                    bias=rng.random() < 0.6, flat=rng.random() < 0.3)


def make_inputs(cfg, dtype, device="cpu", generator=None):
    B, Cin, Cout, G = cfg["B"], cfg["Cin"], cfg["Cout"], cfg["groups"]
    kh, kw = cfg["k"]
    gh, gw = cfg["grid"]
    x = torch.randn(B, Cin, cfg["H"], cfg["W"], generator=generator, dtype=torch.float64)
    w = torch.randn(B, Cout, Cin // G, kh, kw, gh, gw, generator=generator, dtype=torch.float64)
    w = w / (Cin // G * kh * kw) ** 0.5
    b = torch.randn(B, Cout, gh, gw, generator=generator, dtype=torch.float64) if cfg["bias"] else None
    conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return conv(x), conv(w), conv(b)


def call(cfg, x, w, b, backend):
    if cfg.get("flat"):
        w = w.reshape(w.shape[0], -1, *w.shape[-2:])
    return patchwise_conv2d(x, w, b, stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"],
                            groups=cfg["groups"], padding_mode=cfg["padding_mode"], backend=backend,
                            kernel_size=cfg["k"])


def forward_and_grads(cfg, x, w, b, backend, gy_seed):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    inputs = [x, w] + ([b.detach().requires_grad_()] if b is not None else [])
    y = call(cfg, *inputs[:2], inputs[2] if b is not None else None, backend)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(gy_seed), dtype=torch.float64)
    grads = torch.autograd.grad(y, inputs, g.to(y.dtype))
    return y.detach(), grads


# relative (to the largest magnitude of the expected tensor) tolerance per dtype
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close_rel(actual, expected, dtype, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() + 1e-3
    err = (actual - expected).abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"{what}: max abs error {err:.3g} > {REL_TOL[dtype]:.1g} * {scale:.3g}"


def run_sweep(backend, dtype, n, seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for t in range(n):
        cfg = random_config(rng)
        x, w, b = make_inputs(cfg, dtype, generator=gen)
        # float64 reference on the same (already rounded) values
        y64, g64 = forward_and_grads(cfg, x.double(), w.double(), None if b is None else b.double(),
                                     "reference", 1000 + t)
        y, g = forward_and_grads(cfg, x, w, b, backend, 1000 + t)
        assert y.dtype == dtype
        for name, a, e in zip(["y", "grad_x", "grad_weight", "grad_bias"], (y,) + tuple(g), (y64,) + tuple(g64)):
            assert_close_rel(a, e, dtype, f"config {t} {cfg}: {name}")


# ----------------------------------------------------------------------------------------------
# oracle vs reference
# ----------------------------------------------------------------------------------------------
def test_oracle_matches_reference_float64():
    rng = random.Random(123)
    gen = torch.Generator().manual_seed(123)
    for t in range(40):
        cfg = random_config(rng)
        x, w, b = make_inputs(cfg, torch.float64, generator=gen)
        xn, w7, bn, stride, pad4, dil, groups = normalize_patchwise_args(
            x, w, b, cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"], cfg["padding_mode"])
        expected = oracle(xn, w7, bn, stride, pad4, dil, groups)
        assert not torch.isnan(expected).any(), "oracle left pixels unassigned"
        got = reference.patchwise_conv2d(xn, w7, bn, stride, pad4, dil, groups)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"config {cfg}: {m}")


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="pyseg._C CPU kernel not built")
def test_oracle_matches_cpu_kernel_direct():
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    for _ in range(20):
        cfg = random_config(rng)
        x, w, b = make_inputs(cfg, torch.float64, generator=gen)
        xn, w7, bn, stride, pad4, dil, groups = normalize_patchwise_args(
            x, w, b, cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"], cfg["padding_mode"])
        got = torch.ops.pyseg.patchwise_conv2d(xn, w7, bn, list(stride), list(pad4), list(dil), groups)
        torch.testing.assert_close(got, oracle(xn, w7, bn, stride, pad4, dil, groups), rtol=1e-12, atol=1e-12)


def test_hyperseg_like_divisible_shape_matches_oracle():
    # the reference's equal-patch (batched GEMM) path
    x = torch.randn(2, 6, 16, 32, dtype=torch.float64)
    w = torch.randn(2, 4, 3, 3, 3, 4, 8, dtype=torch.float64)
    b = torch.randn(2, 4, 4, 8, dtype=torch.float64)
    expected = oracle(x, w, b, (1, 1), (1, 1, 1, 1), (1, 1), 2)
    for be in ["reference"] + (["cpu"] if HAS_CPU_KERNEL else []):
        torch.testing.assert_close(patchwise_conv2d(x, w, b, padding=1, groups=2, backend=be), expected)


# ----------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------
SWEEP_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", SWEEP_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_sweep_cpu(backend, dtype):
    _skip_unavailable(backend)
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("the Triton interpreter is fp32-only")
    if backend == "reference" and dtype == torch.float64:
        pytest.skip("the float64 reference is the sweep's oracle itself (test_oracle_matches_reference_float64 "
                    "checks it against the definition)")
    full = dtype in (torch.float32, torch.float64)
    if backend == "triton":
        n = 40
    elif backend == "reference":
        n = 200 if dtype == torch.float32 else 40
    else:
        n = 200 if full else 80
    run_sweep(backend, dtype, n, seed=2024 + SWEEP_DTYPES.index(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", backends_for("cuda"))
@pytest.mark.skipif(not CUDA_OK, reason="no CUDA device visible")
def test_sweep_cuda(backend, dtype):
    _skip_unavailable(backend, "cuda")
    rng = random.Random(77)
    gen = torch.Generator().manual_seed(77)
    for t in range(200):
        cfg = random_config(rng)
        x, w, b = make_inputs(cfg, dtype, generator=gen)
        y64, g64 = forward_and_grads(cfg, x.double(), w.double(), None if b is None else b.double(),
                                     "reference", t)
        y, g = forward_and_grads(cfg, x.cuda(), w.cuda(), None if b is None else b.cuda(), backend, t)
        for name, a, e in zip(["y", "grad_x", "grad_weight", "grad_bias"], (y,) + tuple(g), (y64,) + tuple(g64)):
            assert_close_rel(a.cpu(), e, dtype, f"config {t} {cfg}: {name}")


# ----------------------------------------------------------------------------------------------
# layouts, masks, determinism
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_channels_last_and_noncontiguous(backend):
    _skip_unavailable(backend)
    x = torch.randn(2, 4, 9, 11)
    w = torch.randn(2, 6, 2, 3, 3, 3, 4)
    b = torch.randn(2, 6, 3, 4)
    expected = patchwise_conv2d(x.double(), w.double(), b.double(), padding=1, groups=2, backend="reference")
    xcl = x.contiguous(memory_format=torch.channels_last)
    y = patchwise_conv2d(xcl, w, b, padding=1, groups=2, backend=backend)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    # a non-contiguous (permuted) 7-D weight
    wnc = w.permute(0, 1, 2, 3, 4, 6, 5).contiguous().permute(0, 1, 2, 3, 4, 6, 5)
    assert not wnc.is_contiguous()
    y2 = patchwise_conv2d(x, wnc, b, padding=1, groups=2, backend=backend)
    torch.testing.assert_close(y2.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_flat_and_7d_weight_agree(backend):
    _skip_unavailable(backend)
    x = torch.randn(1, 6, 10, 12)
    w7 = torch.randn(1, 4, 3, 3, 1, 5, 3)
    flat = w7.reshape(1, 4 * 3 * 3 * 1, 5, 3)
    y7 = patchwise_conv2d(x, w7, None, padding=(1, 0), groups=2, backend=backend)
    yf = patchwise_conv2d(x, flat, None, padding=(1, 0), groups=2, backend=backend, kernel_size=(3, 1))
    torch.testing.assert_close(y7, yf, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="pyseg._C CPU kernel not built")
def test_backward_output_mask_and_determinism():
    x = torch.randn(2, 4, 13, 9, dtype=torch.float64)
    w = torch.randn(2, 6, 2, 3, 2, 3, 2, dtype=torch.float64)
    y = torch.ops.pyseg.patchwise_conv2d(x, w, None, [2, 1], [1, 0, 2, 1], [1, 2], 2)
    gy = torch.randn_like(y)
    args = (gy, x, w, [2, 1], [1, 0, 2, 1], [1, 2], 2)
    full = torch.ops.pyseg.patchwise_conv2d_backward(*args, [True, True, True])
    again = torch.ops.pyseg.patchwise_conv2d_backward(*args, [True, True, True])
    for a, b in zip(full, again):
        assert torch.equal(a, b), "backward is not deterministic"
    assert full[2].shape == (2, 6, 3, 2)
    for mask in itertools_masks():
        part = torch.ops.pyseg.patchwise_conv2d_backward(*args, mask)
        for m, p, f in zip(mask, part, full):
            if m:
                assert torch.equal(p, f)
            else:
                assert p.numel() == 0


def itertools_masks():
    import itertools
    return [list(m) for m in itertools.product([False, True], repeat=3)]


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="pyseg._C CPU kernel not built")
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernel_thread_count_invariant(threads):
    # work items own disjoint outputs: results must not depend on the thread count
    x = torch.randn(2, 8, 24, 20)
    w = torch.randn(2, 8, 4, 3, 3, 5, 4)
    b = torch.randn(2, 8, 5, 4)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = torch.ops.pyseg.patchwise_conv2d(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 2)
        g1 = torch.ops.pyseg.patchwise_conv2d_backward(y1, x, w, [1, 1], [1, 1, 1, 1], [1, 1], 2, [True] * 3)
        torch.set_num_threads(threads)
        y2 = torch.ops.pyseg.patchwise_conv2d(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 2)
        g2 = torch.ops.pyseg.patchwise_conv2d_backward(y1, x, w, [1, 1], [1, 1, 1, 1], [1, 1], 2, [True] * 3)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


# ----------------------------------------------------------------------------------------------
# module
# ----------------------------------------------------------------------------------------------
def test_module_weight_numel_flat_weights_and_repr():
    conv = PatchWiseConv2d(6, 4, kernel_size=3, padding=1, groups=2, dilation=(1, 2))
    assert conv.weight_shape == (4, 3, 3, 3)
    assert conv.weight_numel == 4 * 3 * 9
    assert conv.bias_numel == 4
    r = repr(conv)
    assert "6, 4, kernel_size=(3, 3)" in r and "groups=2" in r and "dilation=(1, 2)" in r
    x = torch.randn(2, 6, 10, 14, dtype=torch.float64)
    w = torch.randn(2, conv.weight_numel, 2, 3, dtype=torch.float64)
    b = torch.randn(2, 4, 2, 3, dtype=torch.float64)
    y = conv(x, w, b)
    expected = oracle(x, w.view(2, 4, 3, 3, 3, 2, 3), b, (1, 1), (1, 1, 1, 1), (1, 2), 2)
    torch.testing.assert_close(y, expected)
    with pytest.raises(ValueError, match="weight_numel=108"):
        conv(x, w[:, :-1])
    with pytest.raises(ValueError, match="must have 6 channels"):
        conv(x[:, :4], w)
    with pytest.raises(ValueError, match="divisible by groups"):
        PatchWiseConv2d(5, 4, 3, groups=2)
    assert "padding_mode='reflect'" in repr(PatchWiseConv2d(2, 2, 3, padding=1, padding_mode="reflect"))


def test_functional_alias():
    assert PF.patchwise_conv2d is patchwise_conv2d


# ----------------------------------------------------------------------------------------------
# gradcheck / opcheck / compile
# ----------------------------------------------------------------------------------------------
GRADCHECK_CASES = [
    dict(stride=1, padding=1, dilation=1, groups=1, k=(3, 3), grid=(2, 3), bias=True),
    dict(stride=2, padding=(0, 2), dilation=(2, 1), groups=2, k=(2, 3), grid=(2, 2), bias=False),
    dict(stride=1, padding="same", dilation=1, groups=4, k=(3, 3), grid=(3, 2), bias=True),  # depthwise
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=["plain", "strided", "depthwise"])
@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_gradcheck(backend, case):
    _skip_unavailable(backend)
    if backend == "triton":
        pytest.skip("the Triton interpreter is fp32-only; gradcheck needs float64")
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64, requires_grad=True)
    kh, kw = case["k"]
    w = torch.randn(2, 4, 4 // case["groups"], kh, kw, *case["grid"], dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, *case["grid"], dtype=torch.float64, requires_grad=True) if case["bias"] else None

    def f(x, w, *b):
        return patchwise_conv2d(x, w, b[0] if b else None, case["stride"], case["padding"], case["dilation"],
                                case["groups"], backend=backend)

    inputs = (x, w) + ((b,) if b is not None else ())
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_gradcheck_exhaustive_tiny(backend):
    """Slow-mode (every input element) gradcheck on a tiny case with a grid that does not divide."""
    _skip_unavailable(backend)
    if backend == "triton":
        pytest.skip("covered by tests/test_triton_patchwise_conv2d.py")
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 2, 2, 2, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: patchwise_conv2d(x, w, b, 1, 1, 1, 1, backend=backend), (x, w, b))


def _opcheck_args(requires_grad=True, dtype=torch.float64):
    x = torch.randn(2, 4, 7, 9, dtype=dtype, requires_grad=requires_grad)
    w = torch.randn(2, 6, 2, 3, 3, 2, 3, dtype=dtype, requires_grad=requires_grad)
    b = torch.randn(2, 6, 2, 3, dtype=dtype, requires_grad=requires_grad)
    return x, w, b, [1, 2], [1, 1, 0, 2], [1, 1], 2


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="pyseg._C CPU kernel not built")
def test_opcheck_compiled_ops():
    x, w, b, *conf = _opcheck_args()
    torch.library.opcheck(torch.ops.pyseg.patchwise_conv2d.default, (x, w, b, *conf))
    torch.library.opcheck(torch.ops.pyseg.patchwise_conv2d.default, (x, w, None, *conf))
    x, w, b, *conf = _opcheck_args(requires_grad=False)
    y = torch.ops.pyseg.patchwise_conv2d(x, w, b, *conf)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(torch.ops.pyseg.patchwise_conv2d_backward.default,
                              (torch.randn_like(y), x, w, *conf, mask))


def test_opcheck_triton_ops():
    if not _triton_op_available("cpu"):
        pytest.skip("pyseg.kernels.patchwise_conv2d (Triton) is not available")
    x, w, b, *conf = _opcheck_args(dtype=torch.float32)
    triton_opcheck(torch.ops.pyseg.patchwise_conv2d.default, (x, w, b, *conf))
    x, w, b, *conf = _opcheck_args(requires_grad=False, dtype=torch.float32)
    y = run_triton(torch.ops.pyseg.patchwise_conv2d.default, x, w, b, *conf)
    triton_opcheck(torch.ops.pyseg.patchwise_conv2d_backward.default,
                   (torch.randn_like(y), x, w, *conf, [True, True, True]))


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="pyseg._C CPU kernel not built")
def test_torch_compile_fullgraph():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = PatchWiseConv2d(4, 6, 3, padding=1, groups=2, backend="cpu")
            self.hyper = torch.nn.Conv2d(4, self.conv.weight_numel, 1)

        def forward(self, x):
            feats = F.adaptive_avg_pool2d(x, (2, 3))
            return torch.relu(self.conv(x, self.hyper(feats)))

    torch._dynamo.reset()
    net = Net()
    x = torch.randn(2, 4, 9, 12, requires_grad=True)
    eager = net(x)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    gx_c, = torch.autograd.grad(out.sum(), x)
    gx_e, = torch.autograd.grad(eager.sum(), x)
    torch.testing.assert_close(gx_c, gx_e)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _ok():
    return torch.randn(1, 4, 8, 8), torch.randn(1, 6, 2, 3, 3, 2, 2)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_input_messages(backend):
    x, w = _ok()
    run = lambda *a, **k: patchwise_conv2d(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match="x must be a 4-D tensor"):
        run(x[0], w, groups=2)
    with pytest.raises(ValueError, match="weight must be a"):
        run(x, w[0], groups=2)
    with pytest.raises(ValueError, match="not divisible by groups=3"):
        run(x, w, groups=3)
    with pytest.raises(ValueError, match=r"Cin/groups=4"):
        run(x, w, groups=1)
    with pytest.raises(ValueError, match="weight has batch 2 but x has batch 1"):
        run(x, torch.randn(2, 6, 2, 3, 3, 2, 2), groups=2)
    with pytest.raises(ValueError, match="grid 8x8 is larger than the output 6x6"):
        run(x, torch.randn(1, 6, 2, 3, 3, 8, 8), groups=2)
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has dtype torch.float32"):
        run(x, w.double(), groups=2)
    with pytest.raises(TypeError, match="floating dtype"):
        run(x.long(), w, groups=2)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        run(x, w.to("meta"), groups=2)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        run(x, w, groups=2, stride=0)
    with pytest.raises(TypeError, match="stride must be an int or a pair"):
        run(x, w, groups=2, stride=(1, 2, 3))
    with pytest.raises(ValueError, match="padding must be >= 0"):
        run(x, w, groups=2, padding=-1)
    with pytest.raises(ValueError, match="padding must be an int, a pair, 'same' or 'valid'"):
        run(x, w, groups=2, padding="full")
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        run(x, w, groups=2, padding="same", stride=2)
    with pytest.raises(ValueError, match="needs kernel_size"):
        run(x, w.reshape(1, -1, 2, 2), groups=2)
    with pytest.raises(ValueError, match="not Cout\\*Cin/groups\\*kh\\*kw"):
        run(x, w.reshape(1, -1, 2, 2)[:, :-1], groups=2, kernel_size=3)
    with pytest.raises(ValueError, match="reflect padding"):
        run(x, w, groups=2, padding=8, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode must be"):
        run(x, w, groups=2, padding=1, padding_mode="circular")
    with pytest.raises(ValueError, match=r"bias must have shape \(B, Cout, gh, gw\) = \(1, 6, 2, 2\)"):
        run(x, w, torch.randn(1, 6, 2, 3), groups=2)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        run(x, w, groups=2, dilation=5)
    with pytest.raises(ValueError, match="backend must be one of"):
        patchwise_conv2d(x, w, groups=2, backend="opencl")


def test_backend_device_mismatch():
    x, w = _ok()
    with pytest.raises(ValueError, match="backend='cuda' needs cuda tensors"):
        patchwise_conv2d(x, w, groups=2, backend="cuda")


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="pyseg._C CPU kernel not built")
def test_direct_op_calls_raise_runtime_error():
    x, w = _ok()
    op = torch.ops.pyseg.patchwise_conv2d
    conf = ([1, 1], [0, 0, 0, 0], [1, 1], 2)
    cases = [
        ((x[0], w, None, *conf), "x must be 4-D"),
        ((x, w.reshape(1, -1, 2, 2), None, *conf), "weight must be 7-D"),
        ((x, w, None, [1, 1], [0, 0, 0, 0], [1, 1], 3), "not divisible by groups=3"),
        ((x, w, None, [1, 1], [0, 0, 0, 0], [1, 1], 1), "Cin/groups=4"),
        ((x, w.double(), None, *conf), "weight has dtype"),
        ((x, torch.randn(1, 6, 2, 3, 3, 7, 7), None, *conf), "larger than the output 6x6"),
        ((x, w, torch.randn(1, 6, 3, 2), *conf), "bias must have shape"),
        ((x, w, None, [0, 1], [0, 0, 0, 0], [1, 1], 2), "stride must be >= 1"),
        ((x, w, None, [1, 1], [0, -1, 0, 0], [1, 1], 2), "padding must be >= 0"),
        ((x, w, None, [1, 1], [0, 0, 0], [1, 1], 2), "padding must have 4 values"),
        ((x, w, None, [1, 1], [0, 0, 0, 0], [0, 1], 2), "dilation must be >= 1"),
        ((x, w, None, [1, 1], [0, 0, 0, 0], [9, 9], 2), "smaller than the dilated kernel"),
        ((x, w, None, [1, 1], [0, 0, 0, 0], [1, 1], 0), "groups must be >= 1"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)
    y = op(x, w, None, *conf)
    bwd = torch.ops.pyseg.patchwise_conv2d_backward
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        bwd(y[:, :3], x, w, *conf, [True, True, True])
    with pytest.raises(RuntimeError, match="grad_out has dtype"):
        bwd(y.double(), x, w, *conf, [True, True, True])
