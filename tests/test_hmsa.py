"""Hierarchical multi-scale attention: fusion op (every backend), autograd, validation, models."""
import math
import os

import pytest
import torch

import pyseg
from pyseg import _extension
from pyseg.nn.functional import hmsa_fuse
from pyseg.ops import reference
from pyseg.ops._library import run_triton, triton_opcheck

from conftest import CUDA_OK, DEVICES, backends_for

OP = "hmsa_fuse"
HAS_CPU_KERNEL = _extension.has_kernel(OP, "CPU")


# ------------------------------------------------------------------------------------------
# independent oracle: explicit float64 interpolation matrices + the SPEC section 4 recurrence
# ------------------------------------------------------------------------------------------
def interp_matrix(out_size, in_size):
    """(out, in) matrix of 1-D bilinear resampling, align_corners=False, written from the formula."""
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    scale = in_size / out_size
    for j in range(out_size):
        src = max(scale * (j + 0.5) - 0.5, 0.0)
        i0 = min(int(math.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        lam = src - i0
        m[j, i0] += 1.0 - lam
        m[j, i1] += lam
    return m


def resize(x, size):
    x = x.double()
    mh = interp_matrix(size[0], x.shape[-2]).to(x.device)
    mw = interp_matrix(size[1], x.shape[-1]).to(x.device)
    return torch.einsum("oh,bchw,pw->bcop", mh, x, mw)


def oracle(logits, attentions, scales, out_size, scale_sizes=None):
    """SPEC section 4; with scale_sizes, logits and attention are first resized to each scale's grid."""
    if scale_sizes is None:
        scale_sizes = [p.shape[-2:] for p in logits]
    logits = [resize(p, hw) for p, hw in zip(logits, scale_sizes)]
    items = sorted(zip(scales, logits, attentions), key=lambda t: -t[0])
    pred = items[0][1].double()
    for s, p, a in items[1:]:
        p = p.double()
        a = resize(a, p.shape[-2:])  # attention straight from its raw size to the scale's grid
        if s >= 1:
            pred = a * p + (1 - a) * resize(pred, p.shape[-2:])
        else:
            size = pred.shape[-2:]
            pred = resize(a * p, size) + (1 - resize(a, size)) * pred
    return resize(pred, out_size)


SCALE_SETS = [(0.5, 1.0), (1.0, 2.0), (0.5, 1.0, 2.0), (0.25, 0.5, 1.0, 2.0), (1.0, 1.5, 2.0),
              (0.5, 1.0, 1.5, 2.0), (1.0,), (0.75, 1.0)]


def make_inputs(scales, base, C=3, B=2, att_stride=1, dtype=torch.float64, device="cpu", gen=None):
    logits, atts = [], []
    for s in scales:
        h, w = max(1, round(base[0] * s)), max(1, round(base[1] * s))
        logits.append(torch.randn(B, C, h, w, dtype=dtype, device=device, generator=gen))
        ha, wa = max(1, -(-h // att_stride)), max(1, -(-w // att_stride))
        atts.append(torch.rand(B, 1, ha, wa, dtype=dtype, device=device, generator=gen))
    return logits, atts


def _dtype_for(backend):
    # the Triton interpreter runs fp32 only; compiled kernels and the reference take float64
    return torch.float32 if backend == "triton" else torch.float64


@pytest.mark.parametrize("scales", SCALE_SETS, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("device,backend", [
    pytest.param(d, b.values[0] if not isinstance(b, str) else b,
                 marks=(list(b.marks) if not isinstance(b, str) else []) +
                 ([pytest.mark.skipif(not CUDA_OK, reason="no CUDA device visible")] if d == "cuda" else []),
                 id=f"{d}-{b if isinstance(b, str) else b.values[0]}")
    for d in ["cpu", "cuda"] for b in backends_for(d, OP)])
def test_forward_matches_oracle(device, backend, scales):
    gen = torch.Generator().manual_seed(hash(scales) % 1000)
    cases = [((7, 9), 1, (7, 9), 2, 3), ((9, 5), 2, (13, 11), 2, 3), ((6, 11), 3, (4, 5), 1, 4)]
    if backend == "triton" and device == "cpu":
        # the interpreter is slow: one small case (attention at another resolution, upsampled output)
        cases = [((9, 5), 2, (13, 11), 1, 2)]
    for base, att_stride, out_size, B, C in cases:
        dtype = _dtype_for(backend) if device == "cpu" else torch.float32
        lg, at = make_inputs(scales, base, C=C, B=B, att_stride=att_stride, dtype=dtype, gen=gen)
        lg = [t.to(device) for t in lg]
        at = [t.to(device) for t in at]
        # reversed order: the op sorts scales itself
        order = list(range(len(scales)))[::-1]
        args = ([lg[i] for i in order], [at[i] for i in order], [scales[i] for i in order], out_size)
        want = oracle([t.cpu() for t in lg], [t.cpu() for t in at], scales, out_size)
        got = hmsa_fuse(*args, backend=backend)
        assert got.dtype == dtype and got.shape == want.shape
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol, msg=f"{backend} {base} {out_size}")
        lab = hmsa_fuse(*args, output="labels", backend=backend)
        assert lab.dtype == torch.int64 and lab.shape == (want.shape[0],) + tuple(out_size)
        assert torch.equal(lab, got.argmax(1)), backend
        top2 = want.topk(2, dim=1).values
        safe = (top2[:, 0] - top2[:, 1]) > 1e-4
        assert torch.equal(lab.cpu()[safe], want.argmax(1)[safe])


def test_reference_matches_oracle_float32_and_top_attention_ignored():
    lg, at = make_inputs((0.5, 1.0, 2.0), (11, 7), dtype=torch.float32)
    want = oracle(lg, at, (0.5, 1.0, 2.0), (15, 9))
    got = reference.hmsa_fuse(lg, at, (0.5, 1.0, 2.0), (15, 9))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # the top scale's attention is unused: None and garbage give the same result
    for backend in ["reference"] + (["cpu"] if HAS_CPU_KERNEL else []):
        a = hmsa_fuse(lg, at[:2] + [None], (0.5, 1.0, 2.0), (15, 9), backend=backend)
        b = hmsa_fuse(lg, at[:2] + [torch.full_like(at[2], float("nan"))], (0.5, 1.0, 2.0), (15, 9),
                      backend=backend)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="pyseg._C CPU kernel not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_low_precision(dtype):
    lg, at = make_inputs((0.5, 1.0, 2.0), (9, 13), dtype=torch.float32)
    want = oracle(lg, at, (0.5, 1.0, 2.0), (10, 14))
    got = hmsa_fuse([t.to(dtype) for t in lg], [t.to(dtype) for t in at], (0.5, 1.0, 2.0), (10, 14), backend="cpu")
    assert got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    # inputs were rounded to dtype: compare with the oracle of the rounded inputs
    want = oracle([t.to(dtype) for t in lg], [t.to(dtype) for t in at], (0.5, 1.0, 2.0), (10, 14))
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    lab = hmsa_fuse([t.to(dtype) for t in lg], [t.to(dtype) for t in at], (0.5, 1.0, 2.0), (10, 14),
                    output="labels", backend="cpu")
    assert torch.equal(lab, got.argmax(1))


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="pyseg._C CPU kernel not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size,out_size", [((37, 53), (74, 106)), ((50, 41), (129, 17)), ((3, 2), (1, 70))],
                         ids=["2x", "mixed", "tiny"])
@pytest.mark.parametrize("huge_pages", ["1", "0"])
def test_cpu_single_scale_is_a_resize(dtype, size, out_size, huge_pages, monkeypatch):
    """One scale on its stored grid runs the separable resize kernel (HyperSeg's final upsampling on
    the CPU): many bands of output rows per plane, several threads, every dtype, with and without
    the huge-page advice on the output (csrc/cpu/output_alloc.h)."""
    monkeypatch.setenv("PYSEG_HUGE_PAGES", huge_pages)
    gen = torch.Generator().manual_seed(sum(size) + sum(out_size))
    p = torch.randn(2, 5, *size, generator=gen, dtype=torch.float64).to(dtype)
    got = hmsa_fuse([p], [None], [1.0], out_size, backend="cpu")
    assert got.dtype == dtype and got.shape == (2, 5) + tuple(out_size)
    want = resize(p, out_size)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    # scale_sizes equal to the storage take the same path
    same = hmsa_fuse([p], [None], [1.0], out_size, backend="cpu", scale_sizes=[size])
    torch.testing.assert_close(same, got, rtol=0, atol=0)
    lab = hmsa_fuse([p], [None], [1.0], out_size, output="labels", backend="cpu")
    assert torch.equal(lab, got.argmax(1))


# ------------------------------------------------------------------------------------------
# scale_sizes: each scale's prediction formed on its own grid (the public method's input sizes)
# ------------------------------------------------------------------------------------------
def make_native(scales, base, C=3, B=2, stride=4, att_stride=None, dtype=torch.float64, device="cpu", gen=None):
    """Logits (and attention) at ~stride `stride` of each scale's grid; returns them and the grids."""
    att_stride = stride if att_stride is None else att_stride
    logits, atts, grids = [], [], []
    for s in scales:
        h, w = max(1, round(base[0] * s)), max(1, round(base[1] * s))
        grids.append((h, w))
        logits.append(torch.randn(B, C, max(1, -(-h // stride)), max(1, -(-w // stride)), dtype=dtype,
                                  generator=gen).to(device))
        atts.append(torch.rand(B, 1, max(1, -(-h // att_stride)), max(1, -(-w // att_stride)), dtype=dtype,
                               generator=gen).to(device))
    return logits, atts, grids


# (scales, base grid of scale 1.0, logit stride, attention stride, out_size): odd sizes, strides
# that do not divide, a grid smaller than its storage (stride 0.5 -> downsampling), mixed scales
SIZES_CASES = [
    ((0.5, 1.0, 2.0), (13, 9), 4, 4, (13, 9)),
    ((0.5, 1.0), (11, 7), 3, 2, (15, 6)),
    ((1.0, 2.0), (7, 10), 4, 1, (9, 11)),
    ((0.25, 0.5, 1.0, 2.0), (17, 13), 4, 4, (17, 13)),
    ((0.75, 1.0, 1.5), (9, 11), 3, 4, (10, 12)),
]


def _sizes_cases_for(backend, device):
    if backend == "triton" and device == "cpu":
        return [SIZES_CASES[0], SIZES_CASES[4]]  # the interpreter is slow
    return SIZES_CASES


@pytest.mark.parametrize("device,backend", [
    pytest.param(d, b.values[0] if not isinstance(b, str) else b,
                 marks=(list(b.marks) if not isinstance(b, str) else []) +
                 ([pytest.mark.skipif(not CUDA_OK, reason="no CUDA device visible")] if d == "cuda" else []),
                 id=f"{d}-{b if isinstance(b, str) else b.values[0]}")
    for d in ["cpu", "cuda"] for b in backends_for(d, OP)])
def test_scale_sizes_matches_oracle(device, backend):
    gen = torch.Generator().manual_seed(5)
    for scales, base, stride, att_stride, out_size in _sizes_cases_for(backend, device):
        dtype = _dtype_for(backend) if device == "cpu" else torch.float32
        B, C = (1, 2) if backend == "triton" and device == "cpu" else (2, 3)
        lg, at, grids = make_native(scales, base, C=C, B=B, stride=stride, att_stride=att_stride, dtype=dtype,
                                    gen=gen)
        if stride == 3:
            grids[0] = (max(1, lg[0].shape[-2] // 2), lg[0].shape[-1] + 3)  # grid below / above its storage
        want = oracle(lg, at, scales, out_size, scale_sizes=grids)
        lg = [t.to(device) for t in lg]
        at = [t.to(device) for t in at]
        order = list(range(len(scales)))[::-1]  # the op sorts scales (and scale_sizes) itself
        args = ([lg[i] for i in order], [at[i] for i in order], [scales[i] for i in order], out_size)
        kw = dict(backend=backend, scale_sizes=[grids[i] for i in order])
        got = hmsa_fuse(*args, **kw)
        assert got.dtype == dtype and got.shape == want.shape
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol, atol=tol, msg=f"{backend} {scales} {base}")
        lab = hmsa_fuse(*args, output="labels", **kw)
        assert lab.dtype == torch.int64 and lab.shape == (want.shape[0],) + tuple(out_size)
        assert torch.equal(lab, got.argmax(1)), backend
        top2 = want.topk(2, dim=1).values
        safe = (top2[:, 0] - top2[:, 1]) > 1e-4
        assert torch.equal(lab.cpu()[safe], want.argmax(1)[safe])
        # the result really depends on the grids (scale_sizes is not ignored)
        plain = hmsa_fuse(*args, backend=backend)
        assert not torch.allclose(plain.cpu().double(), want, rtol=1e-3, atol=1e-3)


def test_scale_sizes_reference_is_public_method():
    """The reference with scale_sizes == explicit F.interpolate of logits and attention, then fusion."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(11)
    scales = (0.5, 1.0, 2.0)
    lg, at, grids = make_native(scales, (15, 11), stride=4, dtype=torch.float32, gen=gen)
    up = [F.interpolate(t, size=g, mode="bilinear", align_corners=False) for t, g in zip(lg, grids)]
    ua = [F.interpolate(t, size=g, mode="bilinear", align_corners=False) for t, g in zip(at, grids)]
    # the public recurrence, written out (nscale_forward of the public code)
    pred = up[2]
    pred = ua[1] * up[1] + (1 - ua[1]) * F.interpolate(pred, size=grids[1], mode="bilinear", align_corners=False)
    low = F.interpolate(ua[0] * up[0], size=grids[1], mode="bilinear", align_corners=False)
    pred = low + (1 - F.interpolate(ua[0], size=grids[1], mode="bilinear", align_corners=False)) * pred
    want = F.interpolate(pred, size=(15, 11), mode="bilinear", align_corners=False)
    got = reference.hmsa_fuse(lg, at, scales, (15, 11), scale_sizes=grids)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if HAS_CPU_KERNEL else []))
def test_scale_sizes_equal_to_storage_is_default(backend):
    lg, at = make_inputs((0.5, 1.0, 2.0), (9, 7), att_stride=2)
    sizes = [tuple(t.shape[-2:]) for t in lg]
    a = hmsa_fuse(lg, at, (0.5, 1.0, 2.0), (10, 8), backend=backend)
    b = hmsa_fuse(lg, at, (0.5, 1.0, 2.0), (10, 8), backend=backend, scale_sizes=sizes)
    assert torch.equal(a, b)
    if backend == "cpu":  # also through the op with explicit sizes (the kernel's no-resample path)
        c = torch.ops.pyseg.hmsa_fuse(lg[::-1], [lg[0].new_empty(0)] + at[::-1][1:], [2.0, 1.0, 0.5], [10, 8],
                                      False, [v for hw in sizes[::-1] for v in hw])
        assert torch.equal(a, c)


# ------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------
def _train_form(hl, wl, h1, w1, ha, wa, B=2, C=3, device="cpu"):
    g = torch.Generator().manual_seed(h1 * 100 + w1)
    p1 = torch.randn(B, C, h1, w1, dtype=torch.float64, generator=g).to(device).requires_grad_()
    pl = torch.randn(B, C, hl, wl, dtype=torch.float64, generator=g).to(device).requires_grad_()
    al = torch.rand(B, 1, ha, wa, dtype=torch.float64, generator=g).to(device).requires_grad_()
    return p1, pl, al


TRAIN_CASES = [((3, 4), (5, 7), (3, 4), (9, 6)), ((2, 3), (5, 6), (4, 2), (5, 6)), ((3, 3), (6, 5), (2, 2), (4, 11))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", TRAIN_CASES)
def test_gradcheck_two_scale(device, case):
    (hl, wl), (h1, w1), (ha, wa), out = case
    if not _extension.has_kernel(OP, "CUDA" if device == "cuda" else "CPU"):
        pytest.skip("compiled kernel not built")
    p1, pl, al = _train_form(hl, wl, h1, w1, ha, wa, device=device)

    def f(p1, pl, al):
        return hmsa_fuse([pl, p1], [al, None], [0.5, 1.0], out, backend=device)

    assert torch.autograd.gradcheck(f, (p1, pl, al))
    # and the fused gradients equal the reference's autograd gradients
    y = f(p1, pl, al)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (p1, pl, al), gy)
    want = torch.autograd.grad(reference.hmsa_fuse([pl, p1], [al, None], [0.5, 1.0], out), (p1, pl, al), gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_two_scale_scale_sizes(device):
    if not _extension.has_kernel(OP, "CUDA" if device == "cuda" else "CPU"):
        pytest.skip("compiled kernel not built")
    # native-resolution logits (stride ~3) and attention, grids at the scales' input sizes
    p1, pl, al = _train_form(2, 3, 3, 4, 2, 2, C=2, device=device)
    grids = [(4, 5), (7, 9)]
    out = (7, 9)

    def f(p1, pl, al):
        return hmsa_fuse([pl, p1], [al, None], [0.5, 1.0], out, backend=device, scale_sizes=grids)

    assert torch.autograd.gradcheck(f, (p1, pl, al))
    y = f(p1, pl, al)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (p1, pl, al), gy)
    want = torch.autograd.grad(oracle([pl, p1], [al, None], [0.5, 1.0], out, scale_sizes=grids), (p1, pl, al), gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # more scales: the reference fallback, also exact
    lg, at, g3 = make_native((0.5, 1.0, 2.0), (5, 6), C=2, B=1, stride=2)
    ts = [t.requires_grad_() for t in lg + at[:2]]
    assert torch.autograd.gradcheck(
        lambda *ts: hmsa_fuse(list(ts[:3]), list(ts[3:]) + [None], (0.5, 1.0, 2.0), (6, 5), scale_sizes=g3), ts)


def test_gradients_fallback_for_more_scales():
    lg, at = make_inputs((0.5, 1.0, 2.0), (5, 6))
    for t in lg + at:
        t.requires_grad_()
    y = hmsa_fuse(lg, at, (0.5, 1.0, 2.0), (7, 5))
    torch.autograd.gradcheck(lambda *ts: hmsa_fuse(list(ts[:3]), list(ts[3:]), (0.5, 1.0, 2.0), (7, 5)),
                             tuple(lg + at[:2]) + (at[2],))
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, lg + at[:2], gy)
    want = torch.autograd.grad(oracle(lg, at, (0.5, 1.0, 2.0), (7, 5)), lg + at[:2], gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="pyseg._C CPU kernel not built")
@pytest.mark.parametrize("labels", [False, True])
def test_opcheck(labels):
    p1, pl, al = _train_form(3, 4, 5, 7, 2, 3)
    torch.library.opcheck(torch.ops.pyseg.hmsa_fuse.default,
                          ([p1, pl], [p1.new_empty(0), al], [1.0, 0.5], [9, 6], labels))
    lg, at = make_inputs((0.5, 1.0, 2.0), (5, 7), att_stride=2)
    lg, at = lg[::-1], at[::-1]
    torch.library.opcheck(torch.ops.pyseg.hmsa_fuse.default, (lg, at, [2.0, 1.0, 0.5], [6, 8], labels))
    torch.library.opcheck(torch.ops.pyseg.hmsa_fuse.default,
                          (lg, at, [2.0, 1.0, 0.5], [6, 8], labels, [9, 15, 5, 7, 4, 3]))
    # the training form with grids other than the stored sizes (autograd: no fused adjoint)
    torch.library.opcheck(torch.ops.pyseg.hmsa_fuse.default,
                          ([p1.detach(), pl.detach()], [p1.new_empty(0), al.detach()], [1.0, 0.5], [9, 6], labels,
                           [9, 6, 4, 5]))
    g = torch.randn(2, 3, 9, 6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.pyseg.hmsa_fuse_backward.default, (g, p1.detach(), pl.detach(), al.detach()))


@pytest.mark.skipif(not _extension.triton_usable(torch.device("cpu")) and not CUDA_OK, reason="no triton")
def test_opcheck_triton():
    dev = "cuda" if CUDA_OK else "cpu"
    lg, at = make_inputs((0.5, 1.0, 2.0), (5, 7), att_stride=2, dtype=torch.float32, device=dev)
    lg, at = lg[::-1], at[::-1]
    triton_opcheck(torch.ops.pyseg.hmsa_fuse.default, (lg, at, [2.0, 1.0, 0.5], [6, 8], False),
                          test_utils=("test_schema", "test_faketensor"))
    triton_opcheck(torch.ops.pyseg.hmsa_fuse.default,
                   (lg, at, [2.0, 1.0, 0.5], [6, 8], True, [9, 15, 5, 7, 4, 3]),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------
# Triton backward of the training form (pyseg::hmsa_fuse_backward, Triton implementation)
# ------------------------------------------------------------------------------------------
TRITON_OK = _extension.triton_usable(torch.device("cpu")) or CUDA_OK
TRITON_DEV = "cuda" if CUDA_OK else "cpu"
# ((hl, wl), (h1, w1), (ha, wa), out, B, C): odd sizes, attention larger / smaller than the low
# grid, out_size up and down, batch > 1, C not a power of 2
TRITON_BWD_CASES = [((3, 4), (5, 7), (3, 4), (9, 6), 2, 3), ((2, 3), (5, 6), (4, 2), (5, 6), 1, 5),
                    ((3, 3), (7, 5), (2, 5), (4, 11), 2, 1)]


@pytest.fixture
def poisoned_triton_alloc(monkeypatch):
    """Every buffer the Triton backward allocates (outputs and scratch) starts as NaN."""
    mod = _extension.triton_kernels().hmsa_fuse

    def empty(*shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(mod, "_empty", empty)
    return mod


def _train_form32(case, seed):
    (hl, wl), (h1, w1), (ha, wa), out, B, C = case
    g = torch.Generator().manual_seed(seed)
    p1 = torch.randn(B, C, h1, w1, dtype=torch.float64, generator=g)
    pl = torch.randn(B, C, hl, wl, dtype=torch.float64, generator=g)
    al = torch.rand(B, 1, ha, wa, dtype=torch.float64, generator=g)
    return p1, pl, al, out


def _reference_grads(p1, pl, al, out, gy):
    ts = [t.detach().double().cpu().requires_grad_() for t in (p1, pl, al)]
    y = reference.hmsa_fuse([ts[0], ts[1]], [None, ts[2]], [1.0, 0.5], out)
    return torch.autograd.grad(y, ts, gy.detach().double().cpu())


def test_adjoint_table_is_transpose_of_interp_matrix():
    if not TRITON_OK:
        pytest.skip("no triton")
    adjoint_table = _extension.triton_kernels().hmsa_fuse.adjoint_table
    for n_in, n_out in [(3, 7), (7, 3), (5, 5), (1, 4), (4, 1), (6, 13)]:
        idx, wt = adjoint_table(n_in, n_out, torch.float64)
        dense = torch.zeros(n_in, n_out, dtype=torch.float64)
        for i in range(n_in):
            for j, w in zip(idx[i].tolist(), wt[i].tolist()):
                if j >= 0:
                    dense[i, j] += w
                else:
                    assert w == 0
        torch.testing.assert_close(dense, interp_matrix(n_out, n_in).T, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not TRITON_OK, reason="no triton")
@pytest.mark.parametrize("case", TRITON_BWD_CASES,
                         ids=lambda c: f"low{c[0][0]}x{c[0][1]}-att{c[2][0]}x{c[2][1]}-B{c[4]}C{c[5]}")
def test_triton_backward_matches_reference(case, poisoned_triton_alloc):
    p1, pl, al, out = _train_form32(case, seed=sum(case[1]) + case[5])
    gy = torch.randn(p1.shape[0], p1.shape[1], *out, dtype=torch.float64)
    want = _reference_grads(p1, pl, al, out, gy)
    args = [t.float().to(TRITON_DEV) for t in (gy, p1, pl, al)]
    got = run_triton(torch.ops.pyseg.hmsa_fuse_backward.default, *args)
    for name, a, b in zip(("g_p1", "g_pl", "g_a"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert not a.isnan().any(), f"{name}: unwritten (NaN) elements"
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-4, atol=1e-5, msg=name)
    again = run_triton(torch.ops.pyseg.hmsa_fuse_backward.default, *args)
    for a, b in zip(got, again):
        assert torch.equal(a, b)  # gathers, no atomics: bitwise deterministic


@pytest.mark.skipif(not TRITON_OK, reason="no triton")
def test_opcheck_triton_backward():
    p1, pl, al, out = _train_form32(TRITON_BWD_CASES[0], seed=1)
    g = torch.randn(p1.shape[0], p1.shape[1], *out, dtype=torch.float64)
    args = tuple(t.float().to(TRITON_DEV) for t in (g, p1, pl, al))
    triton_opcheck(torch.ops.pyseg.hmsa_fuse_backward.default, args)


@pytest.mark.skipif(not TRITON_OK, reason="no triton")
def test_triton_training_uses_triton_backward(monkeypatch):
    mod = _extension.triton_kernels().hmsa_fuse
    calls = []
    real = mod.backward

    def counting(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(mod, "backward", counting)
    p1, pl, al, out = _train_form32(TRITON_BWD_CASES[1], seed=7)
    ts = [t.float().to(TRITON_DEV).requires_grad_() for t in (p1, pl, al)]
    # scales in any order; the public function sorts them
    y = hmsa_fuse([ts[1], ts[0]], [ts[2], None], [0.5, 1.0], out, backend="triton")
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, ts, gy)
    assert calls == [1]
    want = _reference_grads(p1, pl, al, out, gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-4, atol=1e-5)
    # scale_sizes other than the stored sizes: explicit resize under autograd, then the fused backward
    grids = [(4, 5), (7, 9)]
    y = hmsa_fuse([ts[1], ts[0]], [ts[2], None], [0.5, 1.0], (7, 9), backend="triton", scale_sizes=grids)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, ts, gy)
    assert calls == [1, 1]
    ref = [t.detach().double().cpu().requires_grad_() for t in (p1, pl, al)]
    want = torch.autograd.grad(oracle([ref[1], ref[0]], [ref[2], None], [0.5, 1.0], (7, 9), scale_sizes=grids),
                               ref, gy.double().cpu())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-4, atol=1e-5)


_NO_C_SCRIPT = """
import sys
sys.modules["pyseg._C"] = None  # the compiled extension is missing
import torch
from pyseg import _extension
from pyseg.nn.functional import hmsa_fuse
from pyseg.ops import reference
assert not _extension.HAS_C
torch.manual_seed(0)
ts = [torch.randn(1, 2, 5, 3), torch.randn(1, 2, 3, 2), torch.rand(1, 1, 2, 3)]
ts = [t.requires_grad_() for t in ts]
y = hmsa_fuse([ts[1], ts[0]], [ts[2], None], [0.5, 1.0], (4, 7), backend="triton")
gy = torch.randn_like(y)
got = torch.autograd.grad(y, ts, gy)
ref = [t.detach().double().requires_grad_() for t in ts]
want = torch.autograd.grad(reference.hmsa_fuse([ref[1], ref[0]], [ref[2], None], [0.5, 1.0], (4, 7)), ref,
                           gy.double())
for a, b in zip(got, want):
    torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
print("OK")
"""


@pytest.mark.skipif(CUDA_OK or not TRITON_OK, reason="interpreter check (CPU only)")
def test_triton_trains_without_compiled_extension():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _NO_C_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------
def test_bad_inputs():
    lg, at = make_inputs((0.5, 1.0), (6, 8))
    ok = dict(logits=lg, attentions=at, scales=(0.5, 1.0), out_size=(6, 8))

    def call(**kw):
        return hmsa_fuse(**{**ok, **kw})

    with pytest.raises(ValueError, match="must contain 1.0"):
        call(scales=(0.5, 2.0))
    with pytest.raises(ValueError, match="distinct"):
        call(scales=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"scales\[0\] must be a positive number"):
        call(scales=(-0.5, 1.0))
    with pytest.raises(ValueError, match="one entry per scale"):
        call(scales=(0.5, 1.0, 2.0))
    with pytest.raises(ValueError, match=r"logits\[1\] has 4 classes but logits\[0\] has 3"):
        call(logits=[lg[0], torch.randn(2, 4, 6, 8, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"logits\[1\] has batch 1"):
        call(logits=[lg[0], torch.randn(1, 3, 6, 8, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"attentions\[0\] must have shape \(B, 1, h, w\) \(one channel\)"):
        call(attentions=[torch.rand(2, 2, 3, 4, dtype=torch.float64), None])
    with pytest.raises(ValueError, match=r"attentions\[0\] has batch 3"):
        call(attentions=[torch.rand(3, 1, 3, 4, dtype=torch.float64), None])
    with pytest.raises(ValueError, match=r"attentions\[0\] \(scale 0.5\) is None"):
        call(attentions=[None, at[1]])
    with pytest.raises(TypeError, match=r"attentions\[0\] has dtype torch.float32"):
        call(attentions=[at[0].float(), None])
    with pytest.raises(TypeError, match=r"logits\[1\] has dtype torch.float32"):
        call(logits=[lg[0], lg[1].float()])
    with pytest.raises(ValueError, match=r"logits\[0\] must be \(B, C, h, w\)"):
        call(logits=[lg[0][0], lg[1]])
    with pytest.raises(TypeError, match="logits must be a list"):
        call(logits=lg[0])
    with pytest.raises(ValueError, match="out_size must be >= 1"):
        call(out_size=(0, 4))
    with pytest.raises(ValueError, match="output must be 'logits' or 'labels'"):
        call(output="probs")
    with pytest.raises(ValueError, match="backend must be one of"):
        call(backend="fast")
    with pytest.raises(ValueError, match=r"scale_sizes must have one \(h, w\) entry per scale: got 1 entries for 2"):
        call(scale_sizes=[(6, 8)])
    with pytest.raises(ValueError, match=r"scale_sizes\[1\] must be positive"):
        call(scale_sizes=[(6, 8), (0, 8)])
    with pytest.raises(TypeError, match=r"scale_sizes\[0\] must be a pair of ints \(h, w\), got \(6.0, 8\)"):
        call(scale_sizes=[(6.0, 8), (6, 8)])
    with pytest.raises(TypeError, match=r"scale_sizes\[1\] must be a pair of ints"):
        call(scale_sizes=[(6, 8), (6, 8, 1)])
    with pytest.raises(TypeError, match=r"scale_sizes\[0\] must be a pair of ints"):
        call(scale_sizes=[True, (6, 8)])
    with pytest.raises(TypeError, match="scale_sizes must be a list/tuple"):
        call(scale_sizes=torch.tensor([[6, 8], [6, 8]]))
    if HAS_CPU_KERNEL:  # the op's own checks
        with pytest.raises(RuntimeError, match="scale_sizes must hold 2 ints"):
            torch.ops.pyseg.hmsa_fuse(lg[::-1], [lg[0].new_empty(0), at[0]], [1.0, 0.5], [6, 8], False, [6, 8, 3])
        with pytest.raises(RuntimeError, match="scale_sizes entries must be positive"):
            torch.ops.pyseg.hmsa_fuse(lg[::-1], [lg[0].new_empty(0), at[0]], [1.0, 0.5], [6, 8], False, [6, 8, 3, 0])


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def msa():
    from pyseg.models import create_model

    torch.manual_seed(0)
    return create_model("hmsa-deeplabv3p-mobilenetv2", num_classes=5, attn_mid_channels=16,
                        aspp_channels=32, decoder_channels=32, low_level_channels=8)


def test_registry_names():
    from pyseg.models import list_models

    names = list_models()
    for n in ["hmsa-deeplabv3p-mobilenetv2", "hmsa-deeplabv3p-resnet50", "deeplabv3p-mobilenetv2",
              "deeplabv3p-resnet50"]:
        assert n in names


def test_multiscale_attention_train_eval(msa):
    x = torch.randn(2, 3, 32, 48)
    msa.train()
    assert msa.active_scales == (0.5, 1.0)
    y = msa(x)
    assert y.shape == (2, 5, 32, 48)
    y.square().mean().backward()
    assert msa.attention.body[0].weight.grad is not None and msa.attention.body[0].weight.grad.abs().sum() > 0
    msa.zero_grad()
    msa.eval()
    assert msa.active_scales == (0.5, 1.0, 2.0)
    with torch.no_grad():
        y = msa(x)
        # the wrapper's fused output is the public method on the same per-scale outputs: native
        # stride-4 logits and attention upsampled to each scale's input size, then fused
        logits, attns, sizes = msa._per_scale(x, msa.scales)
        assert sizes == [(16, 24), (32, 48), (64, 96)] and logits[1].shape[-2:] == (8, 12)
        want = oracle(logits, attns, msa.scales, (32, 48), scale_sizes=sizes)
    assert y.shape == (2, 5, 32, 48)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-5)
    lab = msa.predict(x)
    assert lab.shape == (2, 32, 48) and lab.dtype == torch.int64
    assert torch.equal(lab, y.argmax(1))
    # training form with gradients: same values as the eval-mode fusion of the same outputs
    msa.train()
    logits, attns, sizes = msa._per_scale(x, (0.5, 1.0))
    yt = hmsa_fuse(logits, attns, (0.5, 1.0), (32, 48), scale_sizes=sizes)
    torch.testing.assert_close(yt.double(), oracle(logits, attns, (0.5, 1.0), (32, 48), scale_sizes=sizes),
                               rtol=1e-4, atol=1e-5)
    msa.eval()
    msa.set_scales([1.0, 0.5])
    assert msa.scales == (0.5, 1.0)
    assert msa(x).shape == (2, 5, 32, 48)
    with pytest.raises(ValueError, match="containing 1.0"):
        msa.set_scales([0.5, 2.0])
    msa.set_scales((0.5, 1.0, 2.0))


def test_staged_training(msa):
    trunk = {id(p) for p in msa.model.trunk.parameters()}
    attn = {id(p) for p in msa.attention.parameters()}
    head = {id(p) for p in msa.model.parameters()} - trunk
    expected = {1: {"trunk", "seg_head"}, 2: {"attention"}, 3: {"trunk", "seg_head"}}
    for stage in (1, 2, 3, 2):
        groups = msa.set_stage(stage)
        assert {g["name"] for g in groups} == expected[stage]
        trainable = {id(p) for p in msa.parameters() if p.requires_grad}
        want = set()
        for g in groups:
            want |= {id(p) for p in g["params"]}
        assert trainable == want
        assert (trunk <= trainable) == (stage != 2) and (attn <= trainable) == (stage == 2)
        assert (head <= trainable) == (stage != 2)
    # stage 2 trains only the attention head
    msa.train()
    opt = torch.optim.SGD(msa.set_stage(2), lr=0.1)
    before = {n: p.detach().clone() for n, p in msa.named_parameters()}
    msa(torch.randn(2, 3, 32, 32)).square().mean().backward()
    opt.step()
    for n, p in msa.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if n.startswith("attention.body.6") or n.startswith("model."):
            assert changed == n.startswith("attention."), n
    with pytest.raises(ValueError, match="stage must be 1, 2 or 3"):
        msa.set_stage(4)
    msa.set_stage(1)
    msa.zero_grad()


def test_deeplab_backbone_weights(tmp_path):
    from pyseg.models.deeplab import DeepLabV3Plus

    kw = dict(num_classes=3, aspp_channels=16, decoder_channels=16, low_level_channels=8)
    a = DeepLabV3Plus(**kw)
    path = str(tmp_path / "trunk.pth")
    torch.save({"state_dict": dict(a.trunk.state_dict(), **{"classifier.weight": torch.zeros(2)})}, path)
    b = DeepLabV3Plus(backbone_weights=path, **kw)
    for (n, p), (_, q) in zip(a.trunk.state_dict().items(), b.trunk.state_dict().items()):
        assert torch.equal(p, q), n
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        DeepLabV3Plus(backbone_weights=str(tmp_path / "missing.pth"), **kw)
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="does not fit the trunk"):
        DeepLabV3Plus(backbone_weights=path, **kw)
    x = torch.randn(1, 3, 32, 32)
    a.eval()
    assert a(x).shape == (1, 3, 32, 32)
    lg, feats = a.forward_features_and_logits(x)
    assert lg.shape == (1, 3, 8, 8) and feats.shape == (1, a.attn_channels, 8, 8)


def test_wrapper_rejects_models_without_protocol():
    with pytest.raises(TypeError, match="forward_features_and_logits"):
        pyseg.nn.MultiScaleAttention(torch.nn.Conv2d(3, 3, 1))


def test_hmsa_hyperseg_m_wrapper():
    from pyseg.models import create_model, list_models

    assert "hmsa-hyperseg-m" in list_models()
    m = create_model("hmsa-hyperseg-m", attn_mid_channels=8)
    m.eval()
    assert m.scaled_size((64, 128), 0.5) == (64, 64) and m.scaled_size((128, 128), 2.0) == (256, 256)
    m.set_scales((0.5, 1.0))
    with torch.no_grad():
        y = m(torch.randn(1, 3, 128, 128))
    assert y.shape == (1, 19, 128, 128) and torch.isfinite(y).all()
    groups = m.set_stage(2)
    assert [g["name"] for g in groups] == ["attention"]
    assert not any(p.requires_grad for p in m.model.encoder.parameters())
