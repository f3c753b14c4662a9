"""The CUDA kernels of csrc/cuda, run without a GPU by the CUDA emulator (tests/cuda_emulator.py,
csrc/emu), against the float64 references; and the same cases on a real GPU whenever one is visible.

Each case runs on two targets: ``emulated`` (the kernels compiled by the host compiler, launched on
CPU tensors with CUDA's block/warp semantics; marker ``cuda_emulated``) and ``cuda`` (the nvcc build on
CUDA tensors through ``torch.ops.pyseg``; marker ``cuda``, skipped without a GPU). Sizes are small
(odd sizes, edge patches, every launch path: shared-memory and global-memory weights, > 48 KB of
dynamic shared memory, multi-tile patches, warp and thread reductions). The emulator's own checks
(divergent barriers, shared-memory bounds, launch limits, schedules) are tested at the end, with a
mutation (one ``__syncthreads()`` removed) that must fail; benchmarks/emulator_mutations.py does it
for every barrier.
"""
import contextlib

import pytest
import torch

import cuda_emulator as ce
import pyseg
from pyseg import _extension
from pyseg.ops import hmsa_fuse, meta_block, patchwise_conv2d, pointwise_block
from pyseg.ops.meta_block import meta_weight_numel

CUDA_OK = torch.cuda.is_available()
TARGETS = [
    pytest.param("emulated", marks=pytest.mark.cuda_emulated),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not (CUDA_OK and _extension.has_kernel("meta_block", "CUDA")), reason="no CUDA device or CUDA kernels")]),
]
# "tf32": float32 tensors through tf32 tensor-core products (10-bit mantissas, torch.backends.cuda.matmul.allow_tf32)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, "tf32": 1e-3}


@pytest.fixture(params=TARGETS)
def target(request):
    return request.param


class Target:
    """Calls an op's compiled CUDA implementation: emulated on CPU tensors or on the GPU."""

    def __init__(self, name):
        self.name = name
        self.device = "cuda" if name == "cuda" else "cpu"
        self.ops = ce.ops() if name == "emulated" else torch.ops.pyseg

    def __call__(self, op, *args):
        args = [self._to(a) for a in args]
        out = getattr(self.ops, op)(*args)
        return tuple(t.cpu() for t in out) if isinstance(out, (tuple, list)) else out.cpu()

    def _to(self, a):
        if isinstance(a, torch.Tensor):
            return a.to(self.device)
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            return [t.to(self.device) for t in a]
        return a


def close(got, want, dtype, what):
    """max |got - want| <= tol * (1 + max |want|), got computed in `dtype`, want in float64."""
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    scale = 1.0 + want.abs().max().item() if want.numel() else 1.0
    assert err <= TOL[dtype] * scale * 8, f"{what}: max error {err:.3g} (scale {scale:.3g}, dtype {dtype})"


def grads(fn, inputs, grad_out):
    """Gradients of sum(fn(*inputs) * grad_out) w.r.t. inputs (float64 autograd)."""
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    g = torch.autograd.grad(out, leaves, grad_out.double(), allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if gi is None else gi for t, gi in zip(leaves, g)]


# --------------------------------------------------------------------------------------------
# patchwise_conv2d
# --------------------------------------------------------------------------------------------
# (B, Cin, Cout, H, W, k, stride, padding, dilation, groups, grid, bias)
PW_CASES = {
    # patches under 64 pixels: pw_forward_direct_kernel
    "odd-3x3": (2, 3, 5, 9, 11, 3, 1, 1, 1, 1, (2, 3), True),        # uneven patches, edge taps
    "stride-dil-groups": (1, 4, 6, 13, 10, 3, 2, 2, 2, 2, (3, 2), True),
    "1x1": (2, 5, 4, 7, 9, 1, 1, 0, 1, 1, (7, 3), True),
    "direct-vec": (1, 2, 8, 184, 184, 1, 1, 0, 1, 1, (30, 30), True),  # enough pixels for 4 channels per thread
    # pw_forward_tiled_kernel: 3x3 stride-1 path (RO = 4 / 1 channels per thread) and the general path
    "warp-reduce": (1, 2, 3, 16, 16, 3, 1, 1, 1, 1, (2, 2), False),  # 64-px patches: warp shuffle dW
    "global-weights": (1, 700, 2, 8, 8, 3, 1, 1, 1, 1, (1, 1), False),  # 700 channels staged in 15 chunks
    "groups-vec": (1, 4, 8, 17, 18, 3, 1, 1, 1, 2, (2, 2), True),     # Og = 4: 4 channels per thread, 2 groups
    "depthwise": (1, 6, 6, 19, 21, 3, 1, 1, 1, 6, (2, 2), True),     # one channel per thread
    # 3x3 strips (4 rows of a column per thread): 8x32 tiles, partial tiles of 3 rows / 3 columns
    "depthwise-strips": (1, 5, 5, 19, 70, 3, 1, 1, 1, 5, (1, 2), True),
    "rowmajor-3x3": (1, 3, 3, 21, 24, 3, 1, 1, 1, 1, (1, 1), True),  # RO = 1: 10x24 tiles row-major, 1x24 strips
    "odd-tiled": (2, 3, 5, 33, 35, 3, 2, 2, 2, 1, (2, 1), True),     # general path, 4 channels, uneven patches
    "stride-groups-tiled": (1, 4, 6, 26, 20, 3, 2, 2, 2, 2, (1, 1), True),  # general path, 1 channel (Og = 3)
    "tiles": (1, 3, 37, 40, 70, 3, 1, 1, 1, 1, (1, 2), True),       # 2 channel tiles, 5x2 pixel tiles per patch
    # pw_forward_kernel (fallback): one channel's input tile over 48 KB
    "fallback-smem": (1, 2, 3, 128, 128, 3, 1, 0, 60, 1, (1, 1), True),
    "fallback-global": (1, 2, 2, 86, 86, 79, 1, 0, 1, 1, (1, 1), False),  # ... and K*4 B > 48 KB
}
PW_ONE_DTYPE = ("direct-vec", "global-weights", "tiles", "fallback-smem", "fallback-global", "stride-groups-tiled")


def _pw_inputs(case, dtype, seed=0):
    B, Cin, Cout, H, W, k, s, p, d, groups, (gh, gw), bias = PW_CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, Cin, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(B, Cout, Cin // groups, k, k, gh, gw, generator=g, dtype=torch.float64) / (Cin * k) ** 0.5
    b = torch.randn(B, Cout, gh, gw, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), (s, s), (p, p), (d, d), groups


def _pw_reference(x, w, b, s, p, d, groups):
    return patchwise_conv2d(x, w, b, stride=s, padding=p, dilation=d, groups=groups, backend="reference")


def _pw_args(s, p, d, groups):
    return [list(s), [p[0], p[0], p[1], p[1]], list(d), groups]


@pytest.mark.parametrize("case", list(PW_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_patchwise_conv2d(target, case, dtype):
    if case in PW_ONE_DTYPE and dtype != torch.float32:
        pytest.skip("one dtype is enough for this path")
    run = Target(target)
    x, w, b, s, p, d, groups = _pw_inputs(case, dtype)
    y = run("patchwise_conv2d", x, w, b, *_pw_args(s, p, d, groups))
    gy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    inputs = [x, w] + ([b] if b is not None else [])
    ref, (gx_r, gw_r, *gb_r) = grads(lambda xx, ww, *bb: _pw_reference(xx, ww, bb[0] if bb else None, s, p, d,
                                                                      groups), inputs, gy)
    close(y, ref, dtype, "y")
    gx, gw, gb = run("patchwise_conv2d_backward", gy, x, w, *_pw_args(s, p, d, groups), [True, True, b is not None])
    close(gx, gx_r, dtype, "grad_x")
    close(gw, gw_r, dtype, "grad_weight")
    if b is not None:
        close(gb, gb_r[0], dtype, "grad_bias")


@pytest.mark.parametrize("case", ["odd-3x3", "groups-vec", "depthwise"])
def test_patchwise_conv2d_float64_patch_major(target, case):
    """float64 (two 16-byte weight vectors per tap) and a patch-major weight (each patch's weights
    contiguous: read in place by the forward, made contiguous by the backward)."""
    run = Target(target)
    x, w, b, s, p, d, groups = _pw_inputs(case, torch.float64, seed=1)
    pm = w.permute(0, 5, 6, 1, 2, 3, 4).contiguous().permute(0, 3, 4, 5, 6, 1, 2)
    assert not pm.is_contiguous() and torch.equal(pm, w)
    ref = _pw_reference(x, w, b, s, p, d, groups)
    for weight in (w, pm):
        close(run("patchwise_conv2d", x, weight, b, *_pw_args(s, p, d, groups)), ref, torch.float64, "y")
    pm32 = pm.float()  # patch-major float32: the layout survives .float() (preserve_format)
    assert not pm32.is_contiguous()
    y32 = run("patchwise_conv2d", x.float(), pm32, b.float(), *_pw_args(s, p, d, groups))
    close(y32, ref, torch.float32, "y (float32, patch-major)")
    gy = torch.randn(ref.shape, dtype=torch.float64)
    got = run("patchwise_conv2d_backward", gy, x, pm, *_pw_args(s, p, d, groups), [True, True, True])
    want = run("patchwise_conv2d_backward", gy, x, w, *_pw_args(s, p, d, groups), [True, True, True])
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


# pw_forward_mma_kernel (fp16/bf16, groups 1, Cin*k*k >= 16, patches of >= 64 px): the implicit GEMM on the
# tensor cores. (B, Cin, Cout, H, W, k, stride, padding, dilation, grid, bias)
PW_MMA_CASES = {
    # Cout 19 (two m-tiles, 13 pad rows), K 45, 2-wide pixel tiles over 10/11 x 18/19 patches (2 row tiles each)
    "mma-odd": (2, 5, 19, 21, 37, 3, 1, 1, 1, (2, 2), True),
    # 18 channels: a full chunk of 16 and one of 2 (K rows 6 -> 16), stride 2, Cout 7 (one m-tile)
    "mma-stride": (1, 18, 7, 30, 40, 3, 2, 2, 1, (1, 1), False),
    # 1x1: 4-wide tiles (64 columns, 6 unused), 2 output-channel tiles (Cout 33), 3 x 2 pixel tiles
    "mma-1x1-wide": (1, 20, 33, 12, 70, 1, 1, 0, 1, (1, 1), True),
    # 5x5, dilation 2, padding 2 on 8 x 8/9 patches (K = 3*25 = 75; B rows 15 -> 16), three uneven patch columns
    "mma-5x5-dil": (1, 3, 4, 20, 30, 5, 1, 2, 2, (2, 3), True),
    # a pair of patches 64 and 65 columns wide in one block (default layout): 1 and 2 column tiles, so
    # the pixel tiles 3-5 exist for the second patch only
    "mma-pair-uneven": (1, 4, 5, 10, 129, 3, 1, 1, 1, (1, 2), False),
    # HyperSeg-M's plan: 16x16-px patches (one 16-row tile, 4 warps per patch), 17 channels (chunks of 16 and
    # 1), two patches per block with 2 x 39 KB of shared memory (over 48 KB: the opt-in)
    "mma-16x16-pairs": (1, 17, 19, 32, 32, 3, 1, 1, 1, (2, 2), True),
}


@pytest.mark.parametrize("case", list(PW_MMA_CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_patchwise_conv2d_mma(target, case, dtype):
    """The tensor-core forward against the float64 reference, default and patch-major weights, with the
    output's memory poisoned first (a NaN-filled tensor of its size freed just before the call: the
    allocator usually hands its block to the op's output, so a pixel the kernel skips stays NaN)."""
    B, Cin, Cout, H, W, k, s, p, d, (gh, gw), bias = PW_MMA_CASES[case]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, Cin, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(B, Cout, Cin, k, k, gh, gw, generator=g, dtype=torch.float64) / (Cin * k) ** 0.5
    b = torch.randn(B, Cout, gh, gw, generator=g, dtype=torch.float64) if bias else None
    args = _pw_args((s, s), (p, p), (d, d), 1)
    ref = _pw_reference(x, w, b, (s, s), (p, p), (d, d), 1)
    run = Target(target)
    xd, wd, bd = x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
    pm = wd.permute(0, 5, 6, 1, 2, 3, 4).contiguous().permute(0, 3, 4, 5, 6, 1, 2)
    # the reference on the rounded inputs: only the kernel's float accumulation differs
    want = _pw_reference(xd.double(), wd.double(), None if bd is None else bd.double(), (s, s), (p, p), (d, d), 1)
    before = len(ce.launched()) if target == "emulated" else 0
    for weight in (wd, pm):
        poison = torch.full(ref.shape, float("nan"), dtype=dtype)
        del poison
        y = run("patchwise_conv2d", xd, weight, bd, *args)
        assert y.dtype == dtype and not y.isnan().any()
        close(y, ref, dtype, "y")
        assert (y.double() - want).abs().max().item() <= 4 * torch.finfo(dtype).eps * (1 + want.abs().max().item())
    if target == "emulated":
        name = {torch.float16: "c10::Half", torch.bfloat16: "c10::BFloat16"}[dtype]
        mine = ce.launched()[before:]
        mt = 1 if Cout <= 16 else 2
        assert len(mine) == 2 and all(f"pw_forward_mma_kernel<{name}, {mt}>" in v for _, v in mine), mine


# --------------------------------------------------------------------------------------------
# meta_block and pointwise_block
# --------------------------------------------------------------------------------------------
# (B, Cin, hid, Cout, H, W, gh, gw)
META_CASES = {
    "odd": (2, 3, 6, 5, 9, 11, 2, 3),          # uneven patches, reflect halo at every border
    "multi-tile": (1, 2, 4, 3, 37, 35, 1, 1),  # a 37x35 patch walked in 32x32 tiles (+ edge tiles)
    "smem-weights-large": (1, 64, 128, 16, 8, 8, 2, 2),   # weights in smem, ~81 KB (opt-in > 48 KB)
    "global-weights": (1, 128, 256, 16, 8, 8, 2, 2),      # hid 256: weights in global memory, > 48 KB smem
    "deep-tile": (1, 3, 20, 5, 20, 18, 1, 1),  # tensor cores: 2 hidden chunks, warps with unequal pw1 work
    # tensor cores: float32 plans 8x16 tiles (16x16 exceed 113 KB; edge tiles 7 rows / 1 column: odd-width
    # depthwise path), k1 = 56 past the registers' W1 depth; fp16/bf16 one odd-width 15x17 tile
    "half-tile": (1, 48, 16, 3, 15, 17, 1, 1),
    # tensor cores: 48-channel stages (m1 = 64: a stage of 3 blocks, then a partial one of 1; a warp per
    # (block, column tile)); unequal 11/12 x 5/6 patches of 12-row tiles (two depthwise row blocks), batch 2
    "wide-stage": (2, 5, 50, 7, 23, 11, 2, 2),
    # tensor cores: Cout 19 = two pw2 row blocks, the second of 3 rows (each warp writes its own Y tiles,
    # rounds past Cout skipped); hid 24: one stage of 2 blocks in every dtype (a warp per column tile
    # computes both); 10x6 and 10x7 patches in 10x7 tiles (even and odd widths, two depthwise row blocks)
    "two-row-blocks": (1, 6, 24, 19, 10, 13, 1, 2),
    # tensor cores: Cout 40 = three pw2 row blocks over 9 column tiles of one 12x12 tile (27 tiles: no split
    # of a row block's column tiles over <= 8 warps, the pw2 loop that reloads W3' per row block)
    "three-row-blocks": (1, 3, 8, 40, 12, 12, 1, 1),
    # tensor cores: Cin 8, a multiple of tf32's depth (float: no ones row, pw1's accumulators start from the T1
    # tile, k1 = 8), not of fp16/bf16's (ones row at row 8); hid 40: T1's rows 40..47 zero, 16-channel blocks
    # 0..2 of one stage (each accumulator from its own T1 block); 12x5 patches, one tile
    "t1-tile": (1, 8, 40, 5, 12, 10, 1, 2),
    # tensor cores: HyperSeg-M level 3's pw1 in little: 8x8 patches (7 column tiles of 100 haloed px), one stage
    # of 3 blocks (hid 40: rows 40..47 zero), Cin 8; 3xTF32, fp16 and bf16 over pairs of column tiles (3 pairs
    # on warps 0-2 in passes of 2 + 1 blocks) and the odd 7th tile on warp 3 (tf32: a warp per tile)
    "paired-tiles": (2, 8, 40, 3, 16, 8, 2, 1),
    # tensor cores, patch-major staging: Cin 8 (16-byte vectors of W1' rows in every dtype) but N = 6 * 19 = 114
    # elements per patch: patch 0's weights 16-byte aligned (W1' by vectors), patch 1's not (the scalar loop);
    # hid 6: W3' and W2' scalar
    "vec-stage": (1, 8, 6, 2, 9, 14, 1, 2),
    # tensor cores, patch-major staging: N = 16 * 20 = 320 elements per patch, every patch's W1', W2', W3'
    # 16-byte aligned with rows of a multiple of 8 elements: all by vectors in every dtype
    "vec-all": (1, 8, 16, 3, 9, 14, 1, 2),
}
MMA_ONLY = {"half-tile", "wide-stage", "two-row-blocks", "three-row-blocks", "t1-tile", "paired-tiles",
            "vec-stage", "vec-all"}  # tensor-core forward tests only


def _meta_inputs(case, dtype, seed=0):
    B, Cin, hid, Cout, H, W, gh, gw = META_CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, Cin, H, W, generator=g, dtype=torch.float64)
    N = meta_weight_numel(Cin, hid, Cout)
    w = torch.randn(B, N, gh, gw, generator=g, dtype=torch.float64)
    # per-stage fan-in scaling keeps activations O(1) (ReLU6 active, not saturated)
    w[:, : hid * Cin] /= Cin ** 0.5
    w[:, hid * Cin: hid * Cin + 9 * hid] /= 3.0
    w[:, hid * Cin + 9 * hid:] /= hid ** 0.5
    scale = torch.rand(2 * hid + Cout, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(2 * hid + Cout, generator=g, dtype=torch.float64) * 0.5 + 0.5
    return x.to(dtype), w.to(dtype), scale.to(dtype), shift.to(dtype), hid, Cout


def _meta_reference(x, w, scale, shift, hid, Cout):
    aff = [(scale[:hid], shift[:hid]), (scale[hid:2 * hid], shift[hid:2 * hid]), (scale[2 * hid:], shift[2 * hid:])]
    return meta_block(x, w, hid, Cout, *aff, backend="reference")


def check_meta(run, case, dtype, backward=True):
    x, w, scale, shift, hid, Cout = _meta_inputs(case, dtype)
    y = run("meta_block", x, w, scale, shift, hid, Cout)
    gy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    ref, grads_r = grads(lambda *t: _meta_reference(*t, hid, Cout), [x, w, scale, shift], gy)
    close(y, ref, dtype, "y")
    if backward:
        got = run("meta_block_backward", gy, x, w, scale, shift, hid, Cout, [True] * 4)
        for name, a, b in zip(("grad_x", "grad_weight", "grad_scale", "grad_shift"), got, grads_r):
            close(a, b, dtype, name)


@pytest.mark.parametrize("case", [c for c in META_CASES if c not in MMA_ONLY])
def test_meta_block(target, case):
    check_meta(Target(target), case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_meta_block_dtypes(target, dtype):
    check_meta(Target(target), "odd", dtype)


def test_meta_block_partial_grads(target):
    run = Target(target)
    x, w, scale, shift, hid, Cout = _meta_inputs("odd", torch.float32)
    gy = torch.randn(x.shape[0], Cout, *x.shape[2:])
    full = run("meta_block_backward", gy, x, w, scale, shift, hid, Cout, [True] * 4)
    for i in range(4):
        mask = [j == i for j in range(4)]
        part = run("meta_block_backward", gy, x, w, scale, shift, hid, Cout, mask)
        torch.testing.assert_close(part[i], full[i], rtol=0, atol=0)


@pytest.fixture
def tf32_matmul(request):
    """Sets torch.backends.cuda.matmul.allow_tf32 for the test (the CUDA kernels read it at launch)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param
    yield request.param
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("case", ["odd", "multi-tile", "smem-weights-large", "deep-tile", "half-tile", "wide-stage",
                                  "two-row-blocks", "three-row-blocks", "t1-tile", "paired-tiles", "vec-stage"])
@pytest.mark.parametrize("dtype, tf32_matmul", [(torch.float32, False), (torch.float32, True),
                                                (torch.float16, False), (torch.bfloat16, False)],
                         indirect=["tf32_matmul"], ids=["fp32-3xtf32", "fp32-tf32", "fp16", "bf16"])
def test_meta_block_forward_mma(target, case, dtype, tf32_matmul):
    """The tensor-core forward: contiguous and patch-major (channels_last) weights give the same bits,
    within the dtype's tolerance of float64 (float32: 3xTF32 unless TF32 is allowed)."""
    run = Target(target)
    x, w, scale, shift, hid, Cout = _meta_inputs(case, dtype)
    ref = _meta_reference(x.double(), w.double(), scale.double(), shift.double(), hid, Cout)
    before = len(ce.launched()) if target == "emulated" else 0
    y = run("meta_block", x, w, scale, shift, hid, Cout)
    y_pm = run("meta_block", x, w.contiguous(memory_format=torch.channels_last), scale, shift, hid, Cout)
    assert torch.equal(y, y_pm)
    close(y, ref, "tf32" if tf32_matmul else dtype, "y")
    if target == "emulated":
        split = 1 if dtype != torch.float32 or tf32_matmul else 3
        name = {torch.float32: "float", torch.float16: "c10::Half", torch.bfloat16: "c10::BFloat16"}[dtype]
        mine = ce.launched()[before:]
        assert len(mine) == 2 and all(f"meta_forward_mma_kernel<{name}, {split}>" in v for _, v in mine), mine


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_meta_block_forward_mma_misaligned_patch_major(target, dtype):
    """Patch-major weights 16-byte aligned (W1', W3', W2' staged by 16-byte vectors) and the same weights one
    element off (every sub-array misaligned: the scalar staging) give the same bits."""
    run = Target(target)
    x, w, scale, shift, hid, Cout = _meta_inputs("vec-all", dtype)
    pm = w.contiguous(memory_format=torch.channels_last)
    buf = torch.empty(pm.numel() + 1, dtype=dtype)
    off = buf[1:].as_strided(pm.shape, pm.stride())
    off.copy_(pm)
    assert pm.data_ptr() % 16 == 0 and off.data_ptr() % 16 != 0 and off.is_contiguous(memory_format=torch.channels_last)
    y = run("meta_block", x, pm, scale, shift, hid, Cout)
    assert torch.equal(run("meta_block", x, off, scale, shift, hid, Cout), y)
    ref = _meta_reference(x.double(), w.double(), scale.double(), shift.double(), hid, Cout)
    close(y, ref, dtype, "y")


@pytest.fixture
def poisoned_empty():
    """Uninitialised tensors (the ops' outputs, at::empty) filled with NaN for the test."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_block_forward_mma_poisoned(target, dtype, poisoned_empty):
    """The tensor-core forward writes every output element (y starts as NaN): multi-tile, odd patches,
    wide stages and a partial second row block of output channels."""
    run = Target(target)
    for case in ("odd", "half-tile", "wide-stage", "two-row-blocks", "paired-tiles"):
        x, w, scale, shift, hid, Cout = _meta_inputs(case, dtype, seed=1)
        ref = _meta_reference(x.double(), w.double(), scale.double(), shift.double(), hid, Cout)
        y = run("meta_block", x, w, scale, shift, hid, Cout)
        assert torch.isnan(torch.empty(3, dtype=dtype)).all()  # the poisoning is on
        close(y, ref, dtype, f"y ({case})")


def test_meta_block_forward_mma_infinite_input(target):
    """An infinite input pixel: the reference's ReLU6 clamps the hidden activations it reaches to 0 or 6, so
    y stays finite; the tensor-core forward's padded hidden rows (zero W1' rows: 0 * inf = NaN) must reach pw2
    as zeros (its H2 rows past hid are stored as zeros, also where a depthwise item pairs a real channel with
    a padded one). bfloat16 (3xTF32 would split inf into inf + NaN)."""
    run = Target(target)
    for case in ("odd", "two-row-blocks"):  # hid 6: items of padded channels only; hid 24: mixed items
        x, w, scale, shift, hid, Cout = _meta_inputs(case, torch.bfloat16, seed=2)
        x[0, 0, 4, 5] = float("inf")
        ref = _meta_reference(x.double(), w.double(), scale.double(), shift.double(), hid, Cout)
        assert torch.isfinite(ref).all()
        y = run("meta_block", x, w, scale, shift, hid, Cout)
        close(y, ref, torch.bfloat16, f"y ({case})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patchwise_conv2d_strips_poisoned(target, dtype, poisoned_empty):
    """The tiled forward's 3x3 strips (and the row-major tiles beside them) write every output element
    (y starts as NaN): partial strips of 3 rows, 3-column tiles, depthwise and groups == 1 (3 channels)."""
    run = Target(target)
    for case in ("depthwise-strips", "rowmajor-3x3"):
        x, w, b, s, p, d, groups = _pw_inputs(case, dtype, seed=1)
        ref = _pw_reference(x.double(), w.double(), b.double(), s, p, d, groups)
        y = run("patchwise_conv2d", x, w, b, *_pw_args(s, p, d, groups))
        assert torch.isnan(torch.empty(3, dtype=dtype)).all()  # the poisoning is on
        close(y, ref, dtype, f"y ({case})")


# (B, Cin, Cout, H, W, gh, gw)
# The launcher halves tiles and channel blocks (to 16 px / 16 channels) while the grid has under 264
# blocks (2 per emulated H100 SM), so the small cases run small tiles; "full" has 272 patches and
# runs 64-px tiles x 64 channels (4 items per thread).
POINTWISE_CASES = {
    "odd": (2, 5, 11, 9, 13, 2, 3),      # unequal patches (16-25 px): 16-px tiles, a 9-px and a 4-px tail
    "one-pixel": (1, 7, 9, 4, 6, 4, 6),  # 1-pixel patches: one item per output channel, ws rows in 32 banks
    "wide": (1, 20, 260, 17, 19, 3, 2),  # 260 output channels: 17 channel blocks of 16 (the last of 4)
    "tiled": (1, 3, 5, 11, 13, 1, 1),    # a 1x1 grid: the 143-px image patch in 9 tiles of 16 px
    "chunked": (1, 70, 3, 5, 3, 2, 1),   # 70 input channels: chunks of 64 + 6 (float64: 32 + 32 + 6)
    "full": (1, 3, 64, 128, 136, 16, 17),  # 8x8-px patches: 64-px tiles x 64 channels, 1024 items
}
POINTWISE_ONE_DTYPE = ("wide", "tiled", "chunked", "full")


def _pointwise_inputs(case, dtype, seed=0):
    B, Cin, Cout, H, W, gh, gw = POINTWISE_CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, Cin, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(B, Cout * Cin, gh, gw, generator=g, dtype=torch.float64) / Cin ** 0.5
    scale = torch.rand(Cout, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(Cout, generator=g, dtype=torch.float64) * 0.5
    return x.to(dtype), w.to(dtype), scale.to(dtype), shift.to(dtype)


def _patch_major(w):
    """The same weights with each patch's Cout*Cin entries contiguous (channels_last), read in place."""
    pm = w.contiguous(memory_format=torch.channels_last)
    if w.shape[-2:] != (1, 1):
        assert not pm.is_contiguous()
    return pm


@pytest.mark.parametrize("case", list(POINTWISE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_pointwise_block(target, case, dtype):
    """Forward and backward vs float64, default and patch-major weights (same bits). Outputs and the
    backward's z / gu buffers start as NaN (deterministic mode fills torch.empty), so an element a
    kernel leaves unwritten shows."""
    if case in POINTWISE_ONE_DTYPE and dtype not in (torch.float32, torch.float64):
        pytest.skip("one dtype is enough for this case")
    with _poisoned_empty():
        _check_pointwise(Target(target), case, dtype)


@contextlib.contextmanager
def _poisoned_empty():
    """torch.empty (and at::empty in the kernels' launchers) fills floating memory with NaN."""
    import torch.utils.deterministic as det
    old = (torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0])
        det.fill_uninitialized_memory = old[1]


def _check_pointwise(run, case, dtype):
    x, w, scale, shift = _pointwise_inputs(case, dtype)
    y = run("pointwise_block", x, w, scale, shift)
    y_pm = run("pointwise_block", x, _patch_major(w), scale, shift)
    assert torch.equal(y, y_pm)
    gy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    ref, grads_r = grads(lambda xx, ww, s, t: pointwise_block(xx, ww, (s, t), backend="reference"),
                         [x, w, scale, shift], gy)
    close(y, ref, dtype, "y")
    got = run("pointwise_block_backward", gy, x, w, scale, shift, [True] * 4)
    got_pm = run("pointwise_block_backward", gy, x, _patch_major(w), scale, shift, [True] * 4)
    for name, a, a_pm, b in zip(("grad_x", "grad_weight", "grad_scale", "grad_shift"), got, got_pm, grads_r):
        close(a, b, dtype, name)
        assert torch.equal(a, a_pm), name
    assert got_pm[1].is_contiguous()  # grad W in the default layout, as the fake kernel says


# --------------------------------------------------------------------------------------------
# hmsa_fuse
# --------------------------------------------------------------------------------------------
# scales, logits sizes, out size, scale_sizes (None: the logits' own)
HMSA_CASES = {
    "train-pair": ((1.0, 0.5), [(9, 11), (5, 6)], (19, 23), None),
    "three": ((2.0, 1.0, 0.5), [(14, 18), (7, 9), (4, 5)], (15, 17), None),
    "resampled": ((1.0, 0.5), [(5, 6), (3, 3)], (17, 21), [(9, 11), (5, 6)]),  # lowered stencil
    "five": ((2.0, 1.5, 1.0, 0.5, 0.25), [(12, 14), (9, 11), (6, 7), (3, 4), (2, 2)], (11, 13), None),
}


# the tile kernel's 32 x 64 and 16 x 64 tiles (outputs of at least one tile) with partial tiles on both axes, and the
# per-pixel fallback (an 8 x 32 tile would read most of a 1.0 grid far larger than the output: > 48 KB);
# the cases above run 8 x 32 tiles. Last entry: the kernel the launcher must pick.
HMSA_TILE_CASES = {
    "tiles-three": ((2.0, 1.0, 0.5), [(40, 70), (20, 35), (10, 18)], (70, 131), None, "tile_kernel<{}, {}, 32, 64>"),
    "tiles-down": ((1.0, 0.5), [(44, 110), (22, 55)], (40, 100), None, "tile_kernel<{}, {}, 32, 64>"),
    "tiles-resampled": ((1.5, 1.0, 0.5), [(12, 20), (8, 14), (5, 7)], (33, 70), [(30, 51), (20, 34), (10, 17)],
                        "tile_kernel<{}, {}, 32, 64>"),
    # the registry's structure: stored logits at half the scale grids, the 1.0 grid at the output's size
    "tiles-registry": ((2.0, 1.0, 0.5), [(40, 70), (20, 35), (10, 18)], (40, 70), [(80, 140), (40, 70), (20, 35)],
                       "tile_kernel<{}, {}, 32, 64>"),
    "tiles-mid": ((1.0, 0.5), [(10, 35), (5, 18)], (20, 70), None, "tile_kernel<{}, {}, 16, 64>"),
    "fallback": ((1.0, 0.5), [(30, 300), (15, 150)], (3, 4), None, "hmsa_fuse_kernel<{}, {}>"),
}


def _hmsa_inputs(case, dtype, seed=0):
    scales, sizes, out, ssz = (HMSA_CASES[case] if case in HMSA_CASES else HMSA_TILE_CASES[case])[:4]
    g = torch.Generator().manual_seed(seed)
    C, B = 5, 2
    logits = [torch.randn(B, C, h, w, generator=g, dtype=torch.float64).to(dtype) for h, w in sizes]
    att_sizes = ssz or sizes
    atts = [None] + [torch.rand(B, 1, h, w, generator=g, dtype=torch.float64).to(dtype) for h, w in att_sizes[1:]]
    return list(scales), logits, atts, list(out), ssz


def _hmsa_args(scales, logits, atts, out, ssz, labels):
    return [logits, [logits[0].new_empty(0) if a is None else a for a in atts], scales, out, labels,
            None if ssz is None else [v for hw in ssz for v in hw]]


@pytest.mark.parametrize("case", list(HMSA_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hmsa_fuse(target, case, dtype):
    if case in ("five", "resampled") and dtype != torch.float32:
        pytest.skip("one dtype is enough for this scale set")
    run = Target(target)
    scales, logits, atts, out, ssz = _hmsa_inputs(case, dtype)
    ref = hmsa_fuse([p.double() for p in logits], [a if a is None else a.double() for a in atts], scales, out,
                    backend="reference", scale_sizes=ssz)
    y = run("hmsa_fuse", *_hmsa_args(scales, logits, atts, out, ssz, False))
    close(y, ref, dtype, "fused logits")
    labels = run("hmsa_fuse", *_hmsa_args(scales, logits, atts, out, ssz, True))
    # argmax where the two best classes are further apart than the kernel's rounding error
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (y.double() - ref).abs().max() + 1e-9
    assert clear.float().mean() > 0.3
    assert torch.equal(labels[clear], ref.argmax(1)[clear])


@pytest.mark.parametrize("case, dtype", [(c, torch.float32) for c in HMSA_TILE_CASES] + [("tiles-three", torch.float64)])
def test_hmsa_fuse_tiles(target, case, dtype, poisoned_empty):
    """The tile kernel on several 32 x 64 or 16 x 64 tiles (partial on both axes, B = 2, non-integer ratios, a
    downsampling final resize, resampled scale grids) and the per-pixel fallback: logits and labels
    against the float64 reference, every output element written (outputs start poisoned)."""
    run = Target(target)
    scales, logits, atts, out, ssz = _hmsa_inputs(case, dtype, seed=3)
    ref = hmsa_fuse([p.double() for p in logits], [a if a is None else a.double() for a in atts], scales, out,
                    backend="reference", scale_sizes=ssz)
    before = len(ce.launched()) if target == "emulated" else 0
    y = run("hmsa_fuse", *_hmsa_args(scales, logits, atts, out, ssz, False))
    assert torch.isnan(torch.empty(3, dtype=dtype)).all()  # the poisoning is on
    assert not y.isnan().any()
    close(y, ref, dtype, "fused logits")
    labels = run("hmsa_fuse", *_hmsa_args(scales, logits, atts, out, ssz, True))
    assert ((labels >= 0) & (labels < ref.shape[1])).all()
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (y.double() - ref).abs().max() + 1e-9
    assert clear.float().mean() > 0.3
    assert torch.equal(labels[clear], ref.argmax(1)[clear])
    if target == "emulated":
        name = {torch.float32: "float", torch.float64: "double"}[dtype]
        want = HMSA_TILE_CASES[case][4].format(name, name)
        mine = ce.launched()[before:]
        assert len(mine) == 2 and all(want in v for _, v in mine), mine


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hmsa_fuse_backward(target, dtype):
    run = Target(target)
    scales, logits, atts, out, _ = _hmsa_inputs("train-pair", dtype)
    gy = torch.randn(logits[0].shape[0], logits[0].shape[1], *out, dtype=torch.float64).to(dtype)
    ref, (g1, gl, ga) = grads(lambda p1, pl, al: hmsa_fuse([p1, pl], [None, al], scales, out, backend="reference"),
                              [logits[0], logits[1], atts[1]], gy)
    got = run("hmsa_fuse_backward", gy, logits[0], logits[1], atts[1])
    for name, a, b in zip(("grad_logits_one", "grad_logits_low", "grad_attention_low"), got, (g1, gl, ga)):
        close(a, b, dtype, name)


# --------------------------------------------------------------------------------------------
# the emulator itself
# --------------------------------------------------------------------------------------------
@pytest.mark.cuda_emulated
@pytest.mark.parametrize("order", ["reverse", "shuffled"])
def test_schedules(order):
    """Every block's threads in another order between barriers: same results (no hidden races)."""
    run = Target("emulated")
    with ce.schedule(order, seed=3):
        check_meta(run, "odd", torch.float32)
        x, w, b, s, p, d, groups = _pw_inputs("warp-reduce", torch.float32)
        y = run("patchwise_conv2d", x, w, b, *_pw_args(s, p, d, groups))
        x16, w16, b16 = x.bfloat16(), w.bfloat16(), None  # pw_forward_mma_kernel
        y16 = run("patchwise_conv2d", x16, w16, b16, *_pw_args(s, p, d, groups))
    close(y, _pw_reference(x.double(), w.double(), None, s, p, d, groups), torch.float32, "y")
    assert torch.equal(y16, run("patchwise_conv2d", x16, w16, b16, *_pw_args(s, p, d, groups)))


def _barrier_after(path, marker, n=0):
    """The n-th ``__syncthreads()`` site of a csrc/cuda source after the first line containing ``marker``."""
    start = next(i for i, line in enumerate((ce.CUDA_DIR / path).read_text().splitlines(), 1) if marker in line)
    return [s for s in ce.barriers(path) if int(s.rsplit(":", 1)[1]) > start][n]


@pytest.mark.cuda_emulated
@pytest.mark.parametrize("site", [_barrier_after("meta_block_kernels.cuh", "meta_forward_mma_kernel(", 1),
                                  ce.barriers("patchwise_conv2d_kernels.cuh")[0]])
def test_missing_barrier_fails(site):
    """A build with this __syncthreads() removed gives wrong results (the emulator exposes the race);
    benchmarks/emulator_mutations.py shows it for every barrier of meta_block and patchwise_conv2d."""
    run = Target("emulated")
    with ce.without_barrier(site):
        with pytest.raises(AssertionError, match="max error"):
            if site.startswith("meta"):
                check_meta(run, "deep-tile", torch.float32, backward=False)  # warps with unequal pw1 work
            else:
                test_patchwise_conv2d("emulated", "warp-reduce", torch.float32)


@pytest.mark.cuda_emulated
@pytest.mark.parametrize("kind, message", [
    ("partial_barrier", "is reached by 31 of the 64 threads"),
    ("divergent_barrier", "divergent __syncthreads"),
    ("smem_overflow", "out-of-bounds dynamic shared memory access at byte 256 of a 256-byte"),
    ("smem_underflow", "bytes before its start"),
    ("too_many_threads", "at most 1024 threads per block"),
    ("grid_y", "grid.y and grid.z in"),
    ("smem_without_optin", "more needs cudaFuncSetAttribute"),
    ("smem_over_optin", "exceeds the opt-in limit"),
    ("warp_exited_lane", "which has exited"),
    ("warp_divergent", "different warp operations"),
])
def test_emulator_reports(kind, message):
    with pytest.raises(RuntimeError, match=message):
        ce.ops().selftest(kind)


@pytest.mark.cuda_emulated
def test_emulator_warp_ops_and_race():
    o = ce.ops()
    # shuffles, votes and atomics against their definitions (computed in the self-test kernel)
    assert o.selftest("warp_ops").tolist() == [1] * 8
    # a kernel that reads a neighbour's shared-memory slot without a barrier: the schedule decides
    with ce.schedule("forward"):
        fwd = o.selftest("race")
    with ce.schedule("reverse"):
        rev = o.selftest("race")
    assert not torch.equal(fwd, rev)
    with ce.schedule("shuffled", seed=1):
        o.selftest("race_fixed")
        fixed = o.selftest("race_fixed")
    assert torch.equal(fixed, o.selftest("race_fixed"))


@pytest.mark.cuda_emulated
def test_every_kernel_launched(request):
    """The emulated tests above launched every __global__ function of csrc/cuda (and both variants of
    the templated launch paths)."""
    selected = {i.originalname for i in request.session.items if i.module is request.module and
                ("emulated" in i.nodeid or "[" not in i.nodeid)}
    tests = {n for n in dir(request.module) if n.startswith("test_")}
    if tests - selected:
        pytest.skip(f"the record covers the whole file; deselected: {sorted(tests - selected)}")
    kernels = ce.global_kernels()
    assert len(kernels) >= 14
    launched = ce.launched()
    names = {n for n, _ in launched}
    assert kernels - names == set(), f"never launched: {sorted(kernels - names)}"
    variants = {v for _, v in launched}
    for want in ("pw_forward_kernel<float, true>", "pw_forward_kernel<float, false>",
                 "pw_forward_tiled_kernel<float, 4, true>", "pw_forward_tiled_kernel<float, 4, false>",
                 "pw_forward_tiled_kernel<float, 1, true>", "pw_forward_tiled_kernel<float, 1, false>",
                 "pw_forward_tiled_kernel<c10::BFloat16, 4, true>", "pw_forward_tiled_kernel<double, 4, true>",
                 "pw_forward_direct_kernel<float, 4>", "pw_forward_direct_kernel<float, 1>",
                 "pw_forward_direct_kernel<double, 1>", "pw_forward_mma_kernel<c10::Half, 1>",
                 "pw_forward_mma_kernel<c10::Half, 2>", "pw_forward_mma_kernel<c10::BFloat16, 1>",
                 "pw_forward_mma_kernel<c10::BFloat16, 2>",
                 "hmsa_fuse_kernel<float, float>", "hmsa_fuse_tile_kernel<float, float, 32, 64>", "hmsa_fuse_tile_kernel<float, float, 16, 64>",
                 "hmsa_fuse_tile_kernel<float, float, 8, 32>", "hmsa_fuse_tile_kernel<c10::BFloat16, float, 8, 32>",
                 "meta_forward_kernel<double>", "meta_backward_kernel<c10::BFloat16>",
                 "meta_forward_mma_kernel<float, 3>", "meta_forward_mma_kernel<float, 1>",
                 "meta_forward_mma_kernel<c10::Half, 1>", "meta_forward_mma_kernel<c10::BFloat16, 1>"):
        assert any(want in v for v in variants), f"{want} never launched"


# --------------------------------------------------------------------------------------------
# the emulator's tensor cores (nvcuda::wmma, csrc/emu/wmma.h)
# --------------------------------------------------------------------------------------------
def _tf32(t, rounding):
    """float32 -> tf32 (10 mantissa bits): "nearest" (ties away, cvt.rna) or "truncate"."""
    bits = t.float().contiguous().view(torch.int32)
    if rounding == "nearest":
        bits = bits + 0x1000
    return (bits & ~0x1FFF).view(torch.float32)


@pytest.mark.cuda_emulated
@pytest.mark.parametrize("dtype, shape", [(torch.float32, "16x16"), (torch.float16, "16x16"),
                                          (torch.bfloat16, "16x16"), (torch.bfloat16, "32x8"),
                                          (torch.float16, "8x32")])
@pytest.mark.parametrize("layouts", [(False, False, False), (True, False, True), (False, True, False),
                                     (True, True, True)], ids=["rrr", "crc", "rcr", "ccc"])
def test_emulator_wmma_gemm(dtype, shape, layouts):
    """2 (A B) + C on the emulated tensor cores, several warps and tiles, every operand layout, against
    float64: exact products of the rounded operands (tf32 for float32), float accumulation."""
    g = torch.Generator().manual_seed(1)
    M, N, K = 32, 64, 48
    a = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(K, N, generator=g).to(dtype)
    c = torch.randn(M, N, generator=g)
    if (shape == "32x8" and not layouts[1]) or (shape == "8x32" and layouts[0]):
        # the 8-wide tiles start 16 bytes into a 16-bit row: not 256-bit aligned, refused as on a GPU
        with pytest.raises(RuntimeError, match="not 256-bit"):
            ce.ops().wmma_gemm(a, b, c, *layouts, shape)
        return
    d = ce.ops().wmma_gemm(a, b, c, *layouts, shape)
    assert not d.isnan().any()
    if dtype == torch.float32:
        ra, rb = _tf32(a, "nearest"), _tf32(b, "nearest")
    else:
        ra, rb = a, b
    want = 2 * (ra.double() @ rb.double()) + c.double()
    assert (d.double() - want).abs().max() < 1e-4
    if dtype == torch.float32:  # tf32 is really emulated: fp32 products differ by far more
        assert (d.double() - (2 * (a.double() @ b.double()) + c.double())).abs().max() > 1e-3


@pytest.mark.cuda_emulated
@pytest.mark.parametrize("rows, cols, depth, lda", [(16, 16, 8, 12), (32, 48, 24, 28), (48, 16, 40, 40)])
def test_emulator_tf32_tiles(rows, cols, depth, lda):
    """csrc/cuda/mma.cuh's explicit tf32 tiles (ldmatrix.x4 A, 4-load B, two mma.sync.m16n8k8 per product with
    PTX's lane layout, accumulators started by rows, 8-byte pair stores): 2 (A B) + r against float64 of the
    tf32-rounded operands, several warps; an A row stride that breaks ldmatrix's 16-byte rows is refused."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(rows, depth, generator=g), torch.randn(depth, cols, generator=g)
    r = torch.randn(rows, generator=g)
    d = ce.ops().tf32_tile_gemm(a, b, r, lda)
    assert not d.isnan().any()
    want = 2 * (_tf32(a, "nearest").double() @ _tf32(b, "nearest").double()) + r.double()[:, None]
    assert (d.double() - want).abs().max() < 1e-4
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        ce.ops().tf32_tile_gemm(a, b, r, lda + 1)


@pytest.mark.cuda_emulated
def test_emulator_tf32_rounding():
    """tf32 operands as the GPU converts them (cvt.rna: nearest, ties away from zero): A times the identity."""
    vals = [1.0 + 2 ** -11, 1.0 + 2 ** -12, -(1.0 + 3 * 2 ** -11), 1.0 + 2 ** -10 + 2 ** -13, 0.1]
    want = [1.0 + 2 ** -10, 1.0, -(1.0 + 2 * 2 ** -10), 1.0 + 2 ** -10, 0.0999755859375]
    a = torch.zeros(16, 8)
    a[0, :5] = torch.tensor(vals)
    d = ce.ops().wmma_gemm(a, torch.eye(8, 16), torch.zeros(16, 16), False, False, False, "16x16")
    assert (d[0, :5] / 2).tolist() == want
    assert _tf32(torch.tensor(vals), "nearest").tolist() == want


@pytest.mark.cuda_emulated
@pytest.mark.parametrize("kind, message", [
    ("wmma_exited_lane", "which has exited"),
    ("wmma_divergent", "different warp operations"),
    ("wmma_nonuniform", "pass a different pointer"),
    ("wmma_misaligned", "not 256-bit"),
    ("wmma_ldm", "not a multiple of 16 bytes"),
    ("wmma_partial_warp", "which does not exist"),
])
def test_emulator_wmma_reports(kind, message):
    """A wmma call that a lane misses, that lanes reach at different places or with different arguments,
    or that breaks the alignment rules, is an error (undefined behaviour on a GPU)."""
    with pytest.raises(RuntimeError, match=message):
        ce.ops().selftest(kind)
