"""Triton-specific checks of the patch-wise convolution (``pyseg::patchwise_conv2d`` run by its Triton implementation).

Both kernel paths (tl.dot and the broadcast-multiply fallback) are forced on a seeded set of
random small configurations and compared with the float64 reference (forward and every
gradient), with every output poisoned with NaN so unwritten elements show. The all-backend sweep
lives in tests/test_patchwise_conv2d.py.

Without a GPU this runs under the Triton interpreter (TRITON_INTERPRET=1, set by conftest), which
is slow: shapes are tiny and the number of programs (batch x groups x patches) is kept small.
"""
import random

import pytest
import torch

import pyseg
from pyseg import _extension
from pyseg.ops import reference
from pyseg.ops._library import run_triton, triton_opcheck

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not _extension.triton_usable(torch.device(DEV)),
                                reason=f"triton cannot run on {DEV} (no GPU and TRITON_INTERPRET!=1, or no triton)")


def _kmod():
    return _extension.triton_kernels().patchwise_conv2d


def _out(n, p0, p1, d, k, s):
    return (n + p0 + p1 - d * (k - 1) - 1) // s + 1


def _random_configs(n=30, seed=1234):
    """Small random configs: odd sizes, non-dividing grids, groups (incl. depthwise), stride 2,
    dilation 2, asymmetric padding, bias / no bias. Programs per launch stay <= 8."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        kind = rng.choice(["dense", "grouped", "depthwise"])
        if kind == "dense":
            G, Cg, Og = 1, rng.randint(1, 5), rng.randint(1, 5)
        elif kind == "grouped":
            G, Cg, Og = 2, rng.randint(1, 3), rng.randint(1, 3)
        else:
            G = rng.randint(2, 3)
            Cg, Og = 1, rng.choice([1, 1, 2])  # depthwise (with channel multiplier 2 sometimes)
        kh, kw = rng.choice([1, 2, 3]), rng.choice([1, 3])
        stride = (rng.choice([1, 1, 2]), rng.choice([1, 2]))
        dil = (rng.choice([1, 2]), rng.choice([1, 1, 2]))
        pad = tuple(rng.randint(0, 2) for _ in range(4))
        H, W = rng.randint(5, 13), rng.randint(5, 13)
        Ho = _out(H, pad[0], pad[1], dil[0], kh, stride[0])
        Wo = _out(W, pad[2], pad[3], dil[1], kw, stride[1])
        if Ho < 1 or Wo < 1:
            continue
        B = rng.choice([1, 1, 2])
        gh, gw = rng.randint(1, min(Ho, 3)), rng.randint(1, min(Wo, 3))
        if rng.random() < 0.1:  # one-pixel patches along an axis
            gh = min(Ho, 4)
        if B * G * gh * gw > 8:
            continue
        out.append(dict(B=B, Cin=G * Cg, Cout=G * Og, H=H, W=W, kh=kh, kw=kw, gh=gh, gw=gw, stride=stride,
                        padding=pad, dilation=dil, groups=G, bias=rng.random() < 0.6))
    return out


CONFIGS = _random_configs()


def _cid(c):
    return (f"B{c['B']}c{c['Cin']}o{c['Cout']}g{c['groups']}_{c['H']}x{c['W']}_k{c['kh']}{c['kw']}"
            f"_grid{c['gh']}x{c['gw']}_s{c['stride'][0]}{c['stride'][1]}_d{c['dilation'][0]}{c['dilation'][1]}"
            f"_p{''.join(map(str, c['padding']))}{'_bias' if c['bias'] else ''}")


def _make(c, gen_seed):
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(c["B"], c["Cin"], c["H"], c["W"], generator=g, dtype=torch.float64)
    w = torch.randn(c["B"], c["Cout"], c["Cin"] // c["groups"], c["kh"], c["kw"], c["gh"], c["gw"], generator=g,
                    dtype=torch.float64)
    b = torch.randn(c["B"], c["Cout"], c["gh"], c["gw"], generator=g, dtype=torch.float64) if c["bias"] else None
    return x, w, b


def _reference(c, x, w, b):
    """float64 output and gradients (for a random grad_out) of the reference."""
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    br = b.clone().requires_grad_() if b is not None else None
    y = reference.patchwise_conv2d(xr, wr, br, c["stride"], c["padding"], c["dilation"], c["groups"])
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y.backward(go)
    return y.detach(), go, xr.grad, wr.grad, (br.grad if b is not None else None)


@pytest.fixture
def poisoned(monkeypatch):
    """Every output the launchers allocate starts as NaN."""
    mod = _kmod()
    monkeypatch.setattr(mod, "_empty", lambda shape, like: torch.full(tuple(shape), float("nan"),
                                                                       dtype=like.dtype, device=like.device))
    return mod


@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "fallback"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[_cid(c) for c in CONFIGS])
def test_paths_match_reference(poisoned, cfg, use_dot):
    mod = poisoned
    x, w, b = _make(cfg, CONFIGS.index(cfg))
    y_ref, go, gx_ref, gw_ref, gb_ref = _reference(cfg, x, w, b)
    dt = torch.float32
    args = (cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"])
    f = lambda t: None if t is None else t.to(DEV, dt)  # noqa: E731
    y = mod.forward(f(x), f(w), f(b), *args, use_dot=use_dot)
    assert y.dtype == dt and y.shape == y_ref.shape
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.double().cpu(), y_ref, **tol)
    gx, gw, gb = mod.backward(f(go), f(x), f(w), *args, [True, True, cfg["bias"]], use_dot=use_dot)
    torch.testing.assert_close(gx.double().cpu(), gx_ref, **tol)
    torch.testing.assert_close(gw.double().cpu(), gw_ref, **tol)
    if cfg["bias"]:
        torch.testing.assert_close(gb.double().cpu(), gb_ref, **tol)
    else:
        assert gb.numel() == 0


def test_configs_cover_the_cases():
    """The seeded sweep contains every feature it claims to test."""
    cs = CONFIGS
    assert any(c["groups"] == c["Cin"] == c["Cout"] > 1 for c in cs)  # depthwise
    assert any(1 < c["groups"] < c["Cin"] for c in cs)  # grouped
    assert any(2 in c["stride"] for c in cs) and any(2 in c["dilation"] for c in cs)
    assert any(c["bias"] for c in cs) and any(not c["bias"] for c in cs)
    nondiv = 0
    for c in cs:
        Ho = _out(c["H"], c["padding"][0], c["padding"][1], c["dilation"][0], c["kh"], c["stride"][0])
        Wo = _out(c["W"], c["padding"][2], c["padding"][3], c["dilation"][1], c["kw"], c["stride"][1])
        nondiv += Ho % c["gh"] != 0 or Wo % c["gw"] != 0
    assert nondiv >= 5


@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "fallback"])
def test_wide_channels_and_tiny_patches(poisoned, use_dot):
    """Channel counts above one block (several co / ci / K blocks) and 1-pixel patches, so the
    dX dot path loops over several patches per tap."""
    mod = poisoned
    c = dict(B=1, Cin=18, Cout=17, H=4, W=5, kh=3, kw=3, gh=4, gw=2, stride=(1, 1), padding=(1, 1, 1, 1),
             dilation=(1, 1), groups=1, bias=True)
    x, w, b = _make(c, 3)
    y_ref, go, gx_ref, gw_ref, gb_ref = _reference(c, x, w, b)
    args = (c["stride"], c["padding"], c["dilation"], c["groups"])
    f = lambda t: t.to(DEV, torch.float32)  # noqa: E731
    y = mod.forward(f(x), f(w), f(b), *args, use_dot=use_dot)
    gx, gw, gb = mod.backward(f(go), f(x), f(w), *args, [True, True, True], use_dot=use_dot)
    tol = dict(rtol=1e-4, atol=2e-4)
    for got, ref in ((y, y_ref), (gx, gx_ref), (gw, gw_ref), (gb, gb_ref)):
        torch.testing.assert_close(got.double().cpu(), ref, **tol)


@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "fallback"])
def test_several_pixel_blocks_per_patch(poisoned, use_dot):
    """Patches larger than one pixel block (interpreter blocks: 128 pixels, 64 in dW)."""
    mod = poisoned
    c = dict(B=1, Cin=2, Cout=3, H=15, W=19, kh=3, kw=3, gh=1, gw=1, stride=(1, 1), padding=(1, 1, 1, 1),
             dilation=(1, 1), groups=1, bias=True)
    x, w, b = _make(c, 17)
    y_ref, go, gx_ref, gw_ref, gb_ref = _reference(c, x, w, b)
    args = (c["stride"], c["padding"], c["dilation"], c["groups"])
    f = lambda t: t.to(DEV, torch.float32)  # noqa: E731
    y = mod.forward(f(x), f(w), f(b), *args, use_dot=use_dot)
    gx, gw, gb = mod.backward(f(go), f(x), f(w), *args, [True, True, True], use_dot=use_dot)
    for got, ref in ((y, y_ref), (gx, gx_ref), (gw, gw_ref), (gb, gb_ref)):
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-4, atol=5e-4)


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True],
                                  [False, True, True]], ids=str)
def test_output_mask(poisoned, mask):
    mod = poisoned
    c = dict(B=1, Cin=4, Cout=3, H=7, W=6, kh=3, kw=3, gh=2, gw=2, stride=(1, 1), padding=(1, 1, 1, 1),
             dilation=(1, 1), groups=1, bias=True)
    x, w, b = _make(c, 5)
    y_ref, go, *refs = _reference(c, x, w, b)
    f = lambda t: t.to(DEV, torch.float32)  # noqa: E731
    outs = mod.backward(f(go), f(x), f(w), c["stride"], c["padding"], c["dilation"], c["groups"], mask)
    for m, got, ref in zip(mask, outs, refs):
        if m:
            torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-4, atol=1e-4)
        else:
            assert got.numel() == 0


def test_auto_path_choice():
    mod = _kmod()
    assert mod.choose_dot(16, 16 * 9, torch.float32)
    assert not mod.choose_dot(1, 9, torch.float32)  # depthwise 3x3
    assert not mod.choose_dot(4, 64, torch.float16)


def test_deterministic(poisoned):
    mod = poisoned
    c = dict(B=1, Cin=3, Cout=4, H=8, W=7, kh=3, kw=3, gh=2, gw=3, stride=(1, 1), padding=(1, 1, 1, 1),
             dilation=(1, 1), groups=1, bias=True)
    x, w, _ = _make(c, 11)
    go = torch.randn(1, 4, 8, 7, dtype=torch.float64)
    f = lambda t: t.to(DEV, torch.float32)  # noqa: E731
    a = mod.backward(f(go), f(x), f(w), (1, 1), (1, 1, 1, 1), (1, 1), 1, [True, True, True])
    b = mod.backward(f(go), f(x), f(w), (1, 1), (1, 1, 1, 1), (1, 1), 1, [True, True, True])
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_public_function_uses_triton(poisoned):
    """pyseg.ops.patchwise_conv2d(backend='triton') with a flat weight, reflect padding, autograd."""
    x = torch.randn(1, 3, 9, 8, device=DEV, requires_grad=True)
    w = torch.randn(1, 2 * 3 * 9, 2, 3, device=DEV, requires_grad=True)
    b = torch.randn(1, 2, 2, 3, device=DEV, requires_grad=True)
    y = pyseg.ops.patchwise_conv2d(x, w, b, padding=1, padding_mode="reflect", backend="triton", kernel_size=3)
    y_ref = pyseg.ops.patchwise_conv2d(x.double(), w.double(), b.double(), padding=1, padding_mode="reflect",
                                       backend="reference", kernel_size=3)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    go = torch.randn_like(y_ref)
    g = torch.autograd.grad(y, (x, w, b), go.float())
    g_ref = torch.autograd.grad(y_ref, (x, w, b), go)
    for u, v in zip(g, g_ref):
        torch.testing.assert_close(u.double(), v.double(), rtol=1e-4, atol=1e-4)


def _op_args(bias, dtype=torch.float32, ch=2):
    x = torch.randn(1, ch, 5, 4, device=DEV, dtype=dtype)
    w = torch.randn(1, ch, ch, 3, 3, 1, 2, device=DEV, dtype=dtype)
    b = torch.randn(1, ch, 1, 2, device=DEV, dtype=dtype) if bias else None
    return x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_forward(bias):
    x, w, b, *rest = _op_args(bias)
    x.requires_grad_()
    w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    triton_opcheck(torch.ops.pyseg.patchwise_conv2d.default, (x, w, b, *rest))


def test_opcheck_backward():
    x, w, _, s, p, d, g = _op_args(False)
    go = torch.randn(1, 2, 5, 4, device=DEV)
    triton_opcheck(torch.ops.pyseg.patchwise_conv2d_backward.default,
                   (go, x, w, s, p, d, g, [True, True, True]))
    triton_opcheck(torch.ops.pyseg.patchwise_conv2d_backward.default,
                   (go, x, w, s, p, d, g, [False, True, False]))


@pytest.mark.parametrize("ch", [2, 8], ids=["fallback", "dot"])
def test_gradcheck_float64(ch):
    """float64 gradcheck (fast mode) of the whole op; the interpreter runs float64 too.
    With 8 channels per group the automatic choice takes the tl.dot path under the interpreter
    (on a GPU float64 always takes the fallback)."""
    x, w, b, *rest = _op_args(True, torch.float64, ch)
    if ch == 8:
        x = x[:, :, :4, :4].contiguous()
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    op = torch.ops.pyseg.patchwise_conv2d.default
    torch.autograd.gradcheck(lambda a, c, e: run_triton(op, a, c, e, *rest), inputs,
                             fast_mode=True, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(DEV != "cuda", reason="half precision needs a GPU (the interpreter runs fp32/fp64 only)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "fallback"])
def test_half_precision(poisoned, dtype, use_dot):
    mod = poisoned
    c = dict(B=2, Cin=32, Cout=24, H=33, W=29, kh=3, kw=3, gh=4, gw=3, stride=(1, 1), padding=(1, 1, 1, 1),
             dilation=(1, 1), groups=2, bias=True)
    x, w, b = _make(c, 13)
    x, w, b = x.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double()  # exactly representable
    y_ref, go, gx_ref, gw_ref, gb_ref = _reference(c, x, w, b)
    args = (c["stride"], c["padding"], c["dilation"], c["groups"])
    f = lambda t: t.to(DEV, dtype)  # noqa: E731
    y = mod.forward(f(x), f(w), f(b), *args, use_dot=use_dot)
    assert y.dtype == dtype
    gx, gw, gb = mod.backward(f(go), f(x), f(w), *args, [True, True, True], use_dot=use_dot)
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.float16 else dict(rtol=5e-2, atol=2e-1)
    for got, ref in ((y, y_ref), (gx, gx_ref), (gb, gb_ref)):
        torch.testing.assert_close(got.double().cpu(), ref, **tol)
    # dW sums over a whole patch: compare relative to its scale
    torch.testing.assert_close(gw.double().cpu(), gw_ref, rtol=5e-2, atol=5e-2 * gw_ref.abs().max().item())


@pytest.mark.slow
@pytest.mark.skipif(DEV != "cuda", reason="needs a GPU with > 20 GB free memory")
def test_int64_offsets():
    """Sample / channel offsets past 2**31 elements."""
    B, C, H, W = 2, 16, 8192, 8200  # 2.1e9 elements per tensor
    x = torch.randn(B, C, H, W, device="cuda", dtype=torch.float16)
    w = torch.randn(B, C, C, 1, 1, 1, 2, device="cuda", dtype=torch.float16)
    y = _kmod().forward(x, w, None, (1, 1), (0, 0, 0, 0), (1, 1), 1)
    sl = x[1, :, -4:, -4:].float()  # right half of the grid: patch (0, 1)
    ref = torch.einsum("oc,chw->ohw", w[1, :, :, 0, 0, 0, 1].float(), sl)
    torch.testing.assert_close(y[1, :, -4:, -4:].float(), ref, rtol=1e-2, atol=1e-2)
