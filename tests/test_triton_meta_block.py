"""Triton-specific checks of the meta block / 1x1 level backward (``kernels/meta_block.py``,
``kernels/pointwise_block.py``).

The launchers' gradients (float32; float64 where gradcheck needs it) are compared with the float64
reference's autograd on seeded small configurations: odd sizes, grids that do not divide the image,
batch 2, hid not a multiple of 8, 1-pixel patches (where the reflect halo and neighbour halos
overlap most), patches larger than one pixel block, channel counts above one tl.dot block, and
output-mask subsets. Every buffer the launchers allocate (outputs and scratch) starts as NaN, so
an element the kernels fail to write shows. The all-backend sweep lives in tests/test_meta_block.py.

Without a GPU this runs under the Triton interpreter (TRITON_INTERPRET=1, set by conftest): about
0.1 s per (sample, patch) program, so every configuration here has at most 8 programs.
"""
import random

import pytest
import torch

from pyseg import _extension
from pyseg.nn import MetaBlock
from pyseg.ops import meta_block, pointwise_block
from pyseg.ops.meta_block import meta_weight_numel
from pyseg.ops.reference import meta_block as R
from pyseg.ops._library import run_triton, triton_opcheck

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not _extension.triton_usable(torch.device(DEV)),
                                reason=f"triton cannot run on {DEV} (no GPU and TRITON_INTERPRET!=1, or no triton)")


def _poison(monkeypatch, name):
    mod = getattr(_extension.triton_kernels(), name)
    monkeypatch.setattr(mod, "_empty", lambda shape, like, dtype=None: torch.full(
        tuple(shape), float("nan"), dtype=dtype or like.dtype, device=like.device))
    return mod


@pytest.fixture
def poisoned(monkeypatch):
    """Every output and scratch buffer the meta block launchers allocate starts as NaN."""
    return _poison(monkeypatch, "meta_block")


@pytest.fixture
def pw_poisoned(monkeypatch):
    """The same for the pointwise_block launchers."""
    return _poison(monkeypatch, "pointwise_block")


def _make(B, Cin, hid, Cout, H, W, gh, gw, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, Cin, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(B, meta_weight_numel(Cin, hid, Cout), gh, gw, generator=g, dtype=torch.float64) * 0.6
    scale = torch.rand(2 * hid + Cout, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(2 * hid + Cout, generator=g, dtype=torch.float64) * 0.5
    gy = torch.randn(B, Cout, H, W, generator=g, dtype=torch.float64)
    return x, w, scale, shift, gy


def _ref_grads(x, w, scale, shift, gy, hid, Cout):
    """float64 gradients of the reference (per-pixel method) w.r.t. x, the flat weight, scale, shift."""
    leaves = [t.clone().requires_grad_() for t in (x, w, scale, shift)]
    xs, ws, ss, ts = leaves
    w1, w2, w3 = R.split_meta_weight(ws, x.shape[1], hid, Cout)
    y = R.meta_block(xs, w1, w2, w3, ss[:hid], ts[:hid], ss[hid:2 * hid], ts[hid:2 * hid], ss[2 * hid:],
                     ts[2 * hid:], method="per_pixel")
    return torch.autograd.grad(y, leaves, gy)


def _check(got, ref, mask, names=("x", "weight", "scale", "shift"), rtol=1e-4, atol=1e-4):
    for n, g, r, m in zip(names, got, ref, mask):
        if not m:
            assert g.numel() == 0, n
            continue
        assert g.shape == r.shape, n
        assert torch.isfinite(g).all(), f"grad {n}: non-finite (unwritten) elements"
        torch.testing.assert_close(g.double().cpu(), r, rtol=rtol, atol=atol * max(r.abs().max().item(), 1.0),
                                   msg=lambda s: f"grad {n}: {s}")


def _random_configs(n, seed):
    """(B, Cin, hid, Cout, H, W, gh, gw): odd sizes, non-dividing grids, 1-px and 2-px patches,
    hid 5 / 7 / 3; at most 8 (sample, patch) programs."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        B = rng.choice([1, 2])
        gh, gw = rng.randint(1, 3), rng.randint(1, 3)
        kind = rng.choice(["tiny", "small", "odd"])
        if kind == "tiny":  # 1-pixel patches along at least one axis; reflect halo matters
            H, W = gh * rng.choice([1, 2]), gw
            H, W = max(H, 2), max(W, 2)
            gh, gw = min(gh, H), min(gw, W)
        else:
            H, W = rng.randint(max(gh, 2), 9), rng.randint(max(gw, 2), 9)
        if B * gh * gw > 8:
            continue
        out.append((B, rng.randint(1, 4), rng.choice([3, 5, 7]), rng.randint(1, 3), H, W, gh, gw))
    return out


CONFIGS = _random_configs(8, seed=2024) + [(2, 3, 5, 2, 7, 5, 3, 2), (1, 2, 7, 3, 4, 3, 4, 3)]


def _cid(c):
    return "B{}_Cin{}_hid{}_Cout{}_{}x{}_g{}x{}".format(*c)


def test_configs_cover_the_cases():
    assert any(c[0] == 2 for c in CONFIGS)
    assert any(c[4] % c[6] or c[5] % c[7] for c in CONFIGS)  # grid does not divide the image
    assert any(c[4] == c[6] or c[5] == c[7] for c in CONFIGS)  # 1-pixel patches along an axis
    assert any(c[2] in (5, 7) for c in CONFIGS)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[_cid(c) for c in CONFIGS])
def test_meta_backward_matches_reference(poisoned, cfg):
    B, Cin, hid, Cout, H, W, gh, gw = cfg
    x, w, scale, shift, gy = _make(*cfg, seed=CONFIGS.index(cfg))
    ref = _ref_grads(x, w, scale, shift, gy, hid, Cout)
    f = lambda t: t.to(DEV, torch.float32)  # noqa: E731
    got = poisoned.backward(f(gy), f(x), f(w), f(scale), f(shift), hid, Cout, [True] * 4)
    for g, t in zip(got, (x, w, scale, shift)):
        assert g.dtype == torch.float32 and g.shape == t.shape
    _check(got, ref, [True] * 4)


@pytest.mark.parametrize("mask", [[True, False, False, False], [False, True, False, False],
                                  [False, False, True, False], [False, True, False, True]], ids=str)
def test_meta_output_mask(poisoned, mask):
    cfg = (2, 3, 5, 2, 5, 7, 2, 2)
    x, w, scale, shift, gy = _make(*cfg, seed=31)
    ref = _ref_grads(x, w, scale, shift, gy, 5, 2)
    f = lambda t: t.to(DEV, torch.float32)  # noqa: E731
    got = poisoned.backward(f(gy), f(x), f(w), f(scale), f(shift), 5, 2, mask)
    _check(got, ref, mask)


def test_meta_nothing_requested():
    x, w, scale, shift, gy = _make(1, 2, 3, 2, 4, 4, 2, 2, seed=1)
    got = _extension.triton_kernels().meta_block.backward(gy.float(), x.float(), w.float(), scale.float(), shift.float(), 3, 2, [False] * 4)
    assert all(g.numel() == 0 for g in got)


def test_meta_wide_channels_and_several_pixel_blocks(poisoned):
    """hid 19 and Cin 17 (channel blocks of 32, padded lanes masked) and a 13x11 patch: more than one
    pixel block (<= 128) in both kernels (143 patch pixels, 195 haloed positions)."""
    cfg = (1, 17, 19, 3, 13, 11, 1, 1)
    x, w, scale, shift, gy = _make(*cfg, seed=5)
    w = w * 0.3
    ref = _ref_grads(x, w, scale, shift, gy, 19, 3)
    f = lambda t: t.to(DEV, torch.float32)  # noqa: E731
    got = poisoned.backward(f(gy), f(x), f(w), f(scale), f(shift), 19, 3, [True] * 4)
    _check(got, ref, [True] * 4, rtol=2e-4, atol=2e-4)


def test_meta_deterministic(poisoned):
    x, w, scale, shift, gy = _make(1, 3, 5, 2, 7, 6, 2, 2, seed=9)
    f = lambda t: t.to(DEV, torch.float32)  # noqa: E731
    a = poisoned.backward(f(gy), f(x), f(w), f(scale), f(shift), 5, 2, [True] * 4)
    b = poisoned.backward(f(gy), f(x), f(w), f(scale), f(shift), 5, 2, [True] * 4)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("cfg", [(2, 3, 5, 2, 7, 5, 3, 2), (1, 2, 7, 3, 4, 3, 4, 3)], ids=_cid)
def test_meta_patch_major_weight_read_in_place(poisoned, cfg):
    """A patch-major (channels_last) weight is read in place (no copy: value n of patch p at p * N + n)
    by the forward and every backward kernel: bitwise the results of the contiguous layout, and the
    weight gradient comes back in the weight's layout."""
    B, Cin, hid, Cout, H, W, gh, gw = cfg
    x, w, scale, shift, gy = (t.float().to(DEV) for t in _make(*cfg, seed=21))
    wcl = w.contiguous(memory_format=torch.channels_last)
    assert not wcl.is_contiguous()
    same, WP, WS = poisoned._weight_strides(wcl)
    assert same is wcl and (WP, WS) == (w.shape[1], 1)
    assert poisoned._weight_strides(w)[1:] == (1, gh * gw)
    assert torch.equal(poisoned.forward(x, wcl, scale, shift, hid, Cout), poisoned.forward(x, w, scale, shift, hid, Cout))
    a = poisoned.backward(gy, x, wcl, scale, shift, hid, Cout, [True] * 4)
    b = poisoned.backward(gy, x, w, scale, shift, hid, Cout, [True] * 4)
    assert a[1].is_contiguous(memory_format=torch.channels_last) and not a[1].is_contiguous()
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    _check(a, _ref_grads(*(t.double().cpu() for t in (x, w, scale, shift, gy)), hid, Cout), [True] * 4)


def test_meta_patch_major_weight_through_autograd(poisoned, monkeypatch):
    """Through pyseg.ops.meta_block(backend="triton") and autograd, the patch-major weight reaches both
    launchers as given (the saved weight is not made contiguous for the Triton backward)."""
    cfg = (1, 3, 5, 2, 6, 7, 2, 3)
    x, w, scale, shift, gy = _make(*cfg, seed=23)
    seen = []
    for name in ("forward", "backward"):
        fn = getattr(poisoned, name)

        def spy(*args, _fn=fn, _name=name):
            weight = args[1] if _name == "forward" else args[2]
            seen.append((_name, weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()))
            return _fn(*args)
        monkeypatch.setattr(poisoned, name, spy)
    ref = _ref_grads(x, w, scale, shift, gy, 5, 2)
    leaves = [x.float().to(DEV), w.float().to(DEV).contiguous(memory_format=torch.channels_last), scale.float().to(DEV),
              shift.float().to(DEV)]
    leaves = [t.requires_grad_() for t in leaves]
    xs, ws, ss, ts = leaves
    y = meta_block(xs, ws, 5, 2, (ss[:5], ts[:5]), (ss[5:10], ts[5:10]), (ss[10:], ts[10:]), backend="triton")
    _check(torch.autograd.grad(y, leaves, gy.float().to(DEV)), ref, [True] * 4)
    assert seen == [("forward", True), ("backward", True)]


def test_halo_gather_index_matches_reflect_semantics():
    """Every haloed position (cell g, offset a) appears exactly once, under the pixel it reads."""
    mod = _extension.triton_kernels().meta_block
    for n, grid in [(2, 1), (2, 2), (5, 5), (7, 3), (9, 2), (13, 4), (3, 2)]:
        idx = mod._halo_gather_index_cpu(n, grid)
        P = -(-n // grid) + 2
        pad = grid * P
        seen = []
        for r in range(n):
            for v in idx[r].tolist():
                if v == pad:
                    continue
                g, a = divmod(v, P)
                beg = -(-g * n // grid)
                q = beg - 1 + a
                q = -q if q < 0 else (2 * (n - 1) - q if q >= n else q)
                assert q == r
                seen.append(v)
        expected = [g * P + a for g in range(grid) for a in range(-(-(g + 1) * n // grid) - (-(-g * n // grid)) + 2)]
        assert sorted(seen) == sorted(expected)


# --------------------------------------------------------------------------------------------
# pointwise_block
# --------------------------------------------------------------------------------------------
# the last: more than 64 output channels (grad_x reduces over two COUT_SUB slices, the second partial)
# and more than one 32-channel input chunk
PW_CONFIGS = [(2, 3, 4, 7, 9, 2, 3), (1, 5, 3, 5, 4, 5, 4), (1, 17, 18, 13, 11, 1, 1), (2, 1, 2, 3, 2, 3, 2),
              (1, 35, 70, 9, 7, 2, 2)]


def _pw_make(B, Cin, Cout, H, W, gh, gw, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, Cin, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(B, Cout * Cin, gh, gw, generator=g, dtype=torch.float64)
    s = torch.rand(Cout, generator=g, dtype=torch.float64) + 0.5
    t = torch.randn(Cout, generator=g, dtype=torch.float64)
    gy = torch.randn(B, Cout, H, W, generator=g, dtype=torch.float64)
    leaves = [u.clone().requires_grad_() for u in (x, w, s, t)]
    y = R.pointwise_block(leaves[0], leaves[1].view(B, Cout, Cin, gh, gw), leaves[2], leaves[3])
    return (x, w, s, t, gy), torch.autograd.grad(y, leaves, gy)


@pytest.mark.parametrize("mask", [[True] * 4, [True, False, False, True], [False, True, True, False]], ids=str)
@pytest.mark.parametrize("cfg", PW_CONFIGS, ids=lambda c: "B{}_Cin{}_Cout{}_{}x{}_g{}x{}".format(*c))
def test_pointwise_backward_matches_reference(pw_poisoned, cfg, mask):
    (x, w, s, t, gy), ref = _pw_make(*cfg, seed=sum(cfg))
    f = lambda u: u.to(DEV, torch.float32)  # noqa: E731
    got = pw_poisoned.backward(f(gy), f(x), f(w), f(s), f(t), mask)
    _check(got, ref, mask)


# --------------------------------------------------------------------------------------------
# through the public ops, autograd, opcheck, gradcheck
# --------------------------------------------------------------------------------------------
def test_public_ops_autograd(poisoned):
    cfg = (2, 3, 5, 4, 5, 6, 2, 1)
    x, w, scale, shift, gy = _make(*cfg, seed=12)
    ref = _ref_grads(x, w, scale, shift, gy, 5, 4)
    leaves = [u.float().to(DEV).requires_grad_() for u in (x, w, scale, shift)]
    xs, ws, ss, ts = leaves
    y = meta_block(xs, ws, 5, 4, (ss[:5], ts[:5]), (ss[5:10], ts[5:10]), (ss[10:], ts[10:]), backend="triton")
    _check(torch.autograd.grad(y, leaves, gy.float().to(DEV)), ref, [True] * 4)
    # only x needs a gradient (sample 0)
    xs = x[:1].float().to(DEV).requires_grad_()
    y = meta_block(xs, w[:1].float().to(DEV), 5, 4, backend="triton")
    (gx,) = torch.autograd.grad(y.sum(), [xs])
    xr = x[:1].clone().requires_grad_()
    (gxr,) = torch.autograd.grad(meta_block(xr, w[:1], 5, 4, backend="reference").sum(), [xr])
    _check([gx], [gxr], [True])


def test_metablock_module_triton_grads():
    """pyseg.nn.MetaBlock(backend="triton") in eval mode: weight and BN-parameter gradients match the
    reference backend's."""
    torch.manual_seed(0)
    grads = {}
    for backend in ("triton", "reference"):
        m = MetaBlock(3, 2, backend=backend)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():  # non-zero BN shifts: no ReLU6 input lands exactly on a kink
            for bn in (m.bn1, m.bn2, m.bn3):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.3)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
        m = m.to(DEV).eval()
        x = torch.randn(1, 3, 6, 5, generator=g).to(DEV)
        w = (torch.randn(1, m.weight_numel, 2, 2, generator=g) * 0.5).to(DEV).requires_grad_()
        m(x, w).square().sum().backward()
        grads[backend] = [w.grad] + [p.grad for p in m.parameters()]
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(b.abs().max().item(), 1.0))


def test_opcheck_triton_backward_ops():
    x, w, scale, shift, gy = (t.float().to(DEV) for t in _make(1, 2, 3, 2, 4, 5, 2, 1, seed=3))
    for mask in ([True] * 4, [False, True, False, True]):
        triton_opcheck(torch.ops.pyseg.meta_block_backward.default,
                       (gy, x, w, scale, shift, 3, 2, mask))
    (px, pw, ps, pt, pgy), _ = _pw_make(1, 2, 3, 3, 4, 1, 2, seed=4)
    f = lambda u: u.float().to(DEV)  # noqa: E731
    for mask in ([True] * 4, [True, False, True, False]):
        triton_opcheck(torch.ops.pyseg.pointwise_block_backward.default,
                       (f(pgy), f(px), f(pw), f(ps), f(pt), mask))


def test_gradcheck_float64():
    """float64 gradcheck (fast mode) of both Triton ops (the kernels accumulate in float64 for
    float64 inputs; the interpreter runs float64 too)."""
    x, w, scale, shift, _ = _make(1, 2, 3, 2, 4, 3, 2, 1, seed=8)
    inputs = tuple(t.to(DEV).requires_grad_() for t in (x, w, scale, shift))
    op = torch.ops.pyseg.meta_block.default
    assert torch.autograd.gradcheck(lambda a, b, c, d: run_triton(op, a, b, c, d, 3, 2), inputs,
                                    fast_mode=True, eps=1e-6, atol=1e-7)
    (px, pw, ps, pt, _), _ = _pw_make(1, 2, 3, 3, 4, 1, 2, seed=6)
    inputs = tuple(t.to(DEV).requires_grad_() for t in (px, pw, ps, pt))
    op = torch.ops.pyseg.pointwise_block.default
    assert torch.autograd.gradcheck(lambda a, b, c, d: run_triton(op, a, b, c, d), inputs,
                                    fast_mode=True, eps=1e-6, atol=1e-7)


@pytest.mark.skipif(DEV != "cuda", reason="half precision needs a GPU (the interpreter runs fp32/fp64 only)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(poisoned, monkeypatch, dtype):
    cfg = (2, 24, 48, 16, 33, 29, 4, 3)
    x, w, scale, shift, gy = _make(*cfg, seed=13)
    w = w / 24 ** 0.5
    # inputs rounded to the half dtype, reference on the rounded values
    x, w, scale, shift, gy = (t.to(dtype).double() for t in (x, w, scale, shift, gy))
    ref = _ref_grads(x, w, scale, shift, gy, 48, 16)
    f = lambda t: t.to(DEV, dtype)  # noqa: E731
    got = poisoned.backward(f(gy), f(x), f(w), f(scale), f(shift), 48, 16, [True] * 4)
    for g in got:
        assert g.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 5e-2
    _check(got, ref, [True] * 4, rtol=tol, atol=tol)
    (px, pw, ps, pt, pgy), pref = _pw_make(2, 20, 24, 33, 29, 4, 3, seed=14)
    rnd = lambda t: t.to(dtype).double()  # noqa: E731
    (px, pw, ps, pt, pgy) = (rnd(t) for t in (px, pw, ps, pt, pgy))
    leaves = [u.clone().requires_grad_() for u in (px, pw, ps, pt)]
    y = R.pointwise_block(leaves[0], leaves[1].view(2, 24, 20, 4, 3), leaves[2], leaves[3])
    pref = torch.autograd.grad(y, leaves, pgy)
    got = _poison(monkeypatch, "pointwise_block").backward(f(pgy), f(px), f(pw), f(ps), f(pt), [True] * 4)
    _check(got, pref, [True] * 4, rtol=tol, atol=tol)
