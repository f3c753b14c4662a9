"""ONNX translations of the pyseg ops, in standard ONNX operators only (opset 18).

Every function here is an onnxscript *trace-only* function: torch's dynamo ONNX exporter calls it
with the node's tensors (``onnx_ir`` values) and its Python attributes, and it emits plain ONNX
ops (Reshape, Transpose, MatMul, Slice, Mul, Add, Clip, Pad, Gather, Resize, ArgMax). No custom
domain, so ONNX Runtime, TensorRT and OpenVINO run the file without a custom-op library.

Registration (:func:`register`) puts them in onnxscript's torch-lib registry, which
``torch.onnx.export(..., dynamo=True)`` reads for every export; :mod:`pyseg` arranges for that to
happen automatically (see :mod:`pyseg.export`). :func:`translation_table` gives the same functions
as a ``custom_translation_table`` for an explicit call.

Layout choices. Alternatives were timed in ONNX Runtime 1.32 (CPU EP, 2 threads, batch 1) at the
HyperSeg-M decoder shapes at 1024x512 by ``benchmarks/bench_onnx_ops.py`` (raw:
benchmarks/results/2026-12-01-cpu/bench_onnx_ops_cpu_t2.txt; the machine was heavily oversubscribed,
so only the ratios within a row mean anything):

* Batched MatMul over patches, not grouped convolution. The patch weights are per *sample*: a
  grouped Conv needs them as a (B*gh*gw*Cout, Cin, 1, 1) kernel over a (1, B*gh*gw*Cin, ph, pw)
  input with ``group = B*gh*gw`` -- a static attribute, which freezes the batch size -- and ORT
  prepares a non-constant Conv kernel on every run. A MatMul of (B, gh, gw, Cout, Cin) by
  (B, gh, gw, Cin, ph*pw) keeps the batch dynamic. For the 1x1 levels it was ~33x faster than the
  grouped Conv (level 2: 2.9 vs 94.7 ms) and ~240x faster than per-pixel weights, so 1x1 levels and
  general patch-wise convolutions always use it.
* Meta block: with a *static* batch (the exporter passes a fixed batch dim) three grouped Convs over
  the haloed patches (pw1 ``group = B*gh*gw``, depthwise ``group = B*gh*gw*hid``, pw2): the
  public-method form ran ~1.25-1.3x faster than the MatMul form (level 4: 2.95 vs 3.70 s in the
  overloaded run; this Conv form is the same computation on the same gathered patches, not yet
  timed on its own: ``bench_onnx_ops.py`` runs it as ``pyseg_static``). With a dynamic batch the
  MatMul form (the only one that keeps the batch free).
* Meta block, both forms: the 1-pixel halos overlap, so the haloed patches are *gathered* (one
  Gather per axis with static indices on the reflect-padded map) rather than reshaped; in the
  MatMul form the depthwise 3x3 is nine Slice/Mul/Add steps on the haloed hidden map with the
  per-patch taps broadcast.
* Depthwise patch-wise convolution (v0_1 decoder): taps are strided Slices of the padded input
  multiplied by per-patch weights broadcast over (gh, ph, gw, pw) views -- no transposes at all.
* Sizes the grid does not divide (valid for the ops, never produced by the registry models) use a
  per-pixel weight Gather (the nearest-upsampled weight grid): correct for any size, memory-heavy.
* HMSA fusion: the reference recurrence with ONNX Resize (linear, pytorch_half_pixel, i.e.
  bilinear with align_corners=False) and ArgMax for the label output (first index on ties, as
  torch.argmax).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.function_libs.torch_lib.registration import torch_op
from onnxscript.onnx_opset import opset18 as op
from onnxscript.onnx_types import TensorType

__all__ = ["OPS", "register", "translation_table"]


# --------------------------------------------------------------------------------------------
# helpers (trace time: shapes are read from the values, the batch may be symbolic)
# --------------------------------------------------------------------------------------------
def _static(v, what: str, dims) -> list:
    """The static sizes of ``v``'s dims ``dims`` (H, W, channels must be static; the batch may not)."""
    shape = v.shape
    if shape is None:
        raise ValueError(f"pyseg ONNX export: {what} has an unknown shape; export with static channel and "
                         "spatial sizes (only the batch may be dynamic)")
    out = []
    for d in dims:
        s = shape[d]
        if not isinstance(s, int):
            raise ValueError(f"pyseg ONNX export: dim {d} of {what} is dynamic ({s}); only the batch may be "
                             "dynamic (export with a fixed image size)")
        out.append(s)
    return out


def _ints(vals) -> "TensorType":
    return op.Constant(value=ir.tensor(np.asarray(vals, dtype=np.int64)))


def _reshape(x, shape):
    return op.Reshape(x, _ints(shape))


def _like(value: float, x):
    return op.CastLike(op.Constant(value=ir.tensor(np.asarray(value, dtype=np.float32))), x)


def _slice(x, starts, ends, axes, steps=None):
    if steps is None:
        return op.Slice(x, _ints(starts), _ints(ends), _ints(axes))
    return op.Slice(x, _ints(starts), _ints(ends), _ints(axes), _ints(steps))


def _patch_index(n: int, grid: int) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) * grid) // n


def _per_pixel(w, h: int, wd: int, gh: int, gw: int):
    """(B, n, gh, gw) -> (B, n, h, wd): each pixel gets its patch's values (nearest-upsampled grid)."""
    w = op.Gather(w, _ints(_patch_index(h, gh)), axis=2)
    return op.Gather(w, _ints(_patch_index(wd, gw)), axis=3)


def _affine(t, scale, shift, start: int, n: int, axis_shape):
    """t * scale[start:start+n] + shift[start:start+n], the vector reshaped to ``axis_shape``."""
    s = _reshape(_slice(scale, [start], [start + n], [0]), axis_shape)
    b = _reshape(_slice(shift, [start], [start + n], [0]), axis_shape)
    return op.Add(op.Mul(t, s), b)


def _relu6(t):
    return op.Clip(t, _like(0.0, t), _like(6.0, t))


def _to_patches(x, c: int, gh: int, ph: int, gw: int, pw: int):
    """(B, c, gh*ph, gw*pw) -> (B, gh, gw, c, ph*pw)."""
    x = _reshape(x, [-1, c, gh, ph, gw, pw])
    x = op.Transpose(x, perm=[0, 2, 4, 1, 3, 5])
    return _reshape(x, [-1, gh, gw, c, ph * pw])


def _from_patches(y, c: int, gh: int, ph: int, gw: int, pw: int):
    """(B, gh, gw, c, ph*pw) -> (B, c, gh*ph, gw*pw)."""
    y = _reshape(y, [-1, gh, gw, c, ph, pw])
    y = op.Transpose(y, perm=[0, 3, 1, 4, 2, 5])
    return _reshape(y, [-1, c, gh * ph, gw * pw])


def _patch_major(weight):
    """(B, n, gh, gw) -> (B, gh, gw, n): each patch's weight vector contiguous."""
    return op.Transpose(weight, perm=[0, 2, 3, 1])


# --------------------------------------------------------------------------------------------
# pyseg::pointwise_block
# --------------------------------------------------------------------------------------------
def pointwise_block(x: TensorType, weight: TensorType, scale: TensorType, shift: TensorType) -> TensorType:
    """pointwise_block(Tensor x, Tensor weight, Tensor scale, Tensor shift) -> Tensor"""
    cin, h, wd = _static(x, "pointwise_block x", (1, 2, 3))
    n, gh, gw = _static(weight, "pointwise_block weight", (1, 2, 3))
    cout = n // cin
    if h % gh == 0 and wd % gw == 0:
        ph, pw = h // gh, wd // gw
        w = _reshape(_patch_major(weight), [-1, gh, gw, cout, cin])
        y = op.MatMul(w, _to_patches(x, cin, gh, ph, gw, pw))  # (B, gh, gw, Cout, ph*pw)
        y = op.Relu(_affine(y, scale, shift, 0, cout, [cout, 1]))
        return _from_patches(y, cout, gh, ph, gw, pw)
    wpix = _reshape(_per_pixel(weight, h, wd, gh, gw), [-1, cout, cin, h, wd])
    y = op.ReduceSum(op.Mul(wpix, op.Unsqueeze(x, _ints([1]))), _ints([2]), keepdims=0)
    return op.Relu(_affine(y, scale, shift, 0, cout, [cout, 1, 1]))


# --------------------------------------------------------------------------------------------
# pyseg::meta_block
# --------------------------------------------------------------------------------------------
def meta_block(x: TensorType, weight: TensorType, scale: TensorType, shift: TensorType, hidden: int,
               out_channels: int) -> TensorType:
    """meta_block(Tensor x, Tensor weight, Tensor scale, Tensor shift, int hidden, int out_channels) -> Tensor"""
    cin, h, wd = _static(x, "meta_block x", (1, 2, 3))
    n, gh, gw = _static(weight, "meta_block weight", (1, 2, 3))
    hid, cout = int(hidden), int(out_channels)
    n1, n2 = hid * cin, 9 * hid
    xp = op.Pad(x, _ints([0, 0, 1, 1, 0, 0, 1, 1]), mode="reflect")  # (B, Cin, H+2, W+2)
    if h % gh == 0 and wd % gw == 0:
        ph, pw = h // gh, wd // gw
        # haloed patches overlap: gather their rows and columns (static indices), then a free reshape
        rows = (np.arange(gh)[:, None] * ph + np.arange(ph + 2)[None, :]).reshape(-1)
        cols = (np.arange(gw)[:, None] * pw + np.arange(pw + 2)[None, :]).reshape(-1)
        xh = op.Gather(op.Gather(xp, _ints(rows), axis=2), _ints(cols), axis=3)
        xh = _to_patches(xh, cin, gh, ph + 2, gw, pw + 2)  # (B, gh, gw, Cin, (ph+2)*(pw+2))
        wt = _patch_major(weight)  # (B, gh, gw, N)
        batch = x.shape[0] if x.shape is not None else None
        if isinstance(batch, int):  # static batch: grouped convolutions, one group per (sample, patch)
            return _meta_block_grouped(xh, wt, scale, shift, batch, cin, hid, cout, gh, gw, ph, pw)
        w1 = _reshape(_slice(wt, [0], [n1], [3]), [-1, gh, gw, hid, cin])
        w2 = _reshape(_slice(wt, [n1], [n1 + n2], [3]), [-1, gh, gw, hid, 9, 1])
        w3 = _reshape(_slice(wt, [n1 + n2], [n], [3]), [-1, gh, gw, cout, hid])
        t = _relu6(_affine(op.MatMul(w1, xh), scale, shift, 0, hid, [hid, 1]))
        t = _reshape(t, [-1, gh, gw, hid, ph + 2, pw + 2])
        acc = None
        for k in range(9):
            dy, dx = divmod(k, 3)
            tap = _slice(t, [dy, dx], [dy + ph, dx + pw], [4, 5])
            wk = _slice(w2, [k], [k + 1], [4])  # (B, gh, gw, hid, 1, 1)
            acc = op.Mul(tap, wk) if acc is None else op.Add(acc, op.Mul(tap, wk))
        t = _relu6(_affine(acc, scale, shift, hid, hid, [hid, 1, 1]))
        y = op.MatMul(w3, _reshape(t, [-1, gh, gw, hid, ph * pw]))
        y = _affine(y, scale, shift, 2 * hid, cout, [cout, 1])
        return _from_patches(y, cout, gh, ph, gw, pw)
    # any size: per-pixel weights (nearest-upsampled grid), 3x3 taps of the reflect-padded input
    taps = op.Concat(*[op.Unsqueeze(_slice(xp, [dy, dx], [dy + h, dx + wd], [2, 3]), _ints([2]))
                       for dy in range(3) for dx in range(3)], axis=2)  # (B, Cin, 9, H, W)
    w1 = _reshape(_per_pixel(_slice(weight, [0], [n1], [1]), h, wd, gh, gw), [-1, hid, cin, 1, h, wd])
    t = op.ReduceSum(op.Mul(w1, op.Unsqueeze(taps, _ints([1]))), _ints([2]), keepdims=0)  # (B, hid, 9, H, W)
    t = _relu6(_affine(t, scale, shift, 0, hid, [hid, 1, 1, 1]))
    w2 = _reshape(_per_pixel(_slice(weight, [n1], [n1 + n2], [1]), h, wd, gh, gw), [-1, hid, 9, h, wd])
    t = op.ReduceSum(op.Mul(t, w2), _ints([2]), keepdims=0)
    t = _relu6(_affine(t, scale, shift, hid, hid, [hid, 1, 1]))
    w3 = _reshape(_per_pixel(_slice(weight, [n1 + n2], [n], [1]), h, wd, gh, gw), [-1, cout, hid, h, wd])
    y = op.ReduceSum(op.Mul(w3, op.Unsqueeze(t, _ints([1]))), _ints([2]), keepdims=0)
    return _affine(y, scale, shift, 2 * hid, cout, [cout, 1, 1])


def _meta_block_grouped(xh, wt, scale, shift, b, cin, hid, cout, gh, gw, ph, pw):
    """The meta block as three grouped Convs over the haloed patches (a static batch: ``group`` is
    b*gh*gw); xh (b, gh, gw, Cin, (ph+2)*(pw+2)), wt (b, gh, gw, N)."""
    p, n1, n2 = b * gh * gw, hid * cin, 9 * hid
    k1 = _reshape(_slice(wt, [0], [n1], [3]), [p * hid, cin, 1, 1])
    k2 = _reshape(_slice(wt, [n1], [n1 + n2], [3]), [p * hid, 1, 3, 3])
    k3 = _reshape(_slice(wt, [n1 + n2], [n1 + n2 + cout * hid], [3]), [p * cout, hid, 1, 1])
    t = op.Conv(_reshape(xh, [1, p * cin, ph + 2, pw + 2]), k1, group=p)
    t = _relu6(_affine(_reshape(t, [p, hid, (ph + 2) * (pw + 2)]), scale, shift, 0, hid, [hid, 1]))
    t = op.Conv(_reshape(t, [1, p * hid, ph + 2, pw + 2]), k2, group=p * hid)
    t = _relu6(_affine(_reshape(t, [p, hid, ph * pw]), scale, shift, hid, hid, [hid, 1]))
    y = op.Conv(_reshape(t, [1, p * hid, ph, pw]), k3, group=p)
    y = _affine(_reshape(y, [b, gh, gw, cout, ph * pw]), scale, shift, 2 * hid, cout, [cout, 1])
    return _from_patches(y, cout, gh, ph, gw, pw)


# --------------------------------------------------------------------------------------------
# pyseg::patchwise_conv2d
# --------------------------------------------------------------------------------------------
def patchwise_conv2d(x: TensorType, weight: TensorType, bias: Optional[TensorType], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int) -> TensorType:
    """patchwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, int[2] dilation,
    int groups) -> Tensor"""
    cin, h, wd = _static(x, "patchwise_conv2d x", (1, 2, 3))
    cout, cg, kh, kw, gh, gw = _static(weight, "patchwise_conv2d weight", (1, 2, 3, 4, 5, 6))
    sh, sw = (int(v) for v in stride)
    pt, pb, pl, pr = (int(v) for v in padding)
    dh, dw = (int(v) for v in dilation)
    g = int(groups)
    og = cout // g
    ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    xp = op.Pad(x, _ints([0, 0, pt, pl, 0, 0, pb, pr])) if pt or pb or pl or pr else x
    taps = []
    for ky in range(kh):
        for kx in range(kw):
            if kh == kw == 1 and sh == sw == 1 and ho == h and wo == wd:
                taps.append(xp)
                continue
            y0, x0 = ky * dh, kx * dw
            taps.append(_slice(xp, [y0, x0], [y0 + (ho - 1) * sh + 1, x0 + (wo - 1) * sw + 1], [2, 3], [sh, sw]))
    kk = kh * kw
    divisible = ho % gh == 0 and wo % gw == 0
    if divisible:
        ph, pw = ho // gh, wo // gw
    if divisible and cg == 1 and og == 1:
        # depthwise: per tap, the (B, C, gh, 1, gw, 1) weights broadcast over a (B, C, gh, ph, gw, pw) view
        wt = _reshape(weight, [-1, cout, kk, gh, 1, gw, 1])
        acc = None
        for k, tap in enumerate(taps):
            term = op.Mul(_reshape(tap, [-1, cout, gh, ph, gw, pw]), op.Squeeze(_slice(wt, [k], [k + 1], [2]),
                                                                                _ints([2])))
            acc = term if acc is None else op.Add(acc, term)
        if bias is not None:
            acc = op.Add(acc, _reshape(bias, [-1, cout, gh, 1, gw, 1]))
        return _reshape(acc, [-1, cout, ho, wo])
    kdim = cg * kk
    cols = taps[0] if kk == 1 else op.Concat(*[op.Unsqueeze(t, _ints([2])) for t in taps], axis=2)
    # cols: (B, Cin, kk, Hout, Wout) == (B, G, Cg*kk, Hout, Wout) row-major as the weight's (Cg, kh, kw)
    if divisible:
        c = _reshape(cols, [-1, g, kdim, gh, ph, gw, pw])
        c = _reshape(op.Transpose(c, perm=[0, 1, 3, 5, 2, 4, 6]), [-1, g, gh, gw, kdim, ph * pw])
        wm = op.Transpose(_reshape(weight, [-1, g, og, kdim, gh, gw]), perm=[0, 1, 4, 5, 2, 3])
        y = _reshape(op.MatMul(wm, c), [-1, g, gh, gw, og, ph, pw])
        y = op.Transpose(y, perm=[0, 1, 4, 2, 5, 3, 6])  # (B, G, Og, gh, ph, gw, pw)
        if bias is not None:
            y = op.Add(_reshape(y, [-1, cout, gh, ph, gw, pw]), _reshape(bias, [-1, cout, gh, 1, gw, 1]))
        return _reshape(y, [-1, cout, ho, wo])
    wpix = _reshape(_per_pixel(_reshape(weight, [-1, cout * kdim, gh, gw]), ho, wo, gh, gw),
                    [-1, g, og, kdim, ho, wo])
    y = op.ReduceSum(op.Mul(wpix, _reshape(cols, [-1, g, 1, kdim, ho, wo])), _ints([3]), keepdims=0)
    y = _reshape(y, [-1, cout, ho, wo])
    if bias is not None:
        y = op.Add(y, _per_pixel(bias, ho, wo, gh, gw))
    return y


# --------------------------------------------------------------------------------------------
# pyseg::hmsa_fuse
# --------------------------------------------------------------------------------------------
def _resize(x, src, dst):
    """Bilinear (align_corners=False, no antialias) resize of (B, C, *src) to (B, C, *dst)."""
    if tuple(src) == tuple(dst):
        return x
    sizes = op.Concat(op.Shape(x, start=0, end=2), _ints([int(v) for v in dst]), axis=0)
    return op.Resize(x, None, None, sizes, mode="linear", coordinate_transformation_mode="pytorch_half_pixel")


def hmsa_fuse(logits: Sequence[TensorType], attentions: Sequence[TensorType], scales: Sequence[float],
              out_size: Sequence[int], labels: bool, scale_sizes: Optional[Sequence[int]] = None) -> TensorType:
    """hmsa_fuse(Tensor[] logits, Tensor[] attentions, float[] scales, int[2] out_size, bool labels,
    int[]? scale_sizes=None) -> Tensor"""
    logits, attentions, scales = list(logits), list(attentions), [float(s) for s in scales]
    order = sorted(range(len(scales)), key=lambda i: -scales[i])
    stored = [tuple(_static(p, f"hmsa_fuse logits[{i}]", (2, 3))) for i, p in enumerate(logits)]
    grids = list(stored)
    if scale_sizes is not None:
        flat = [int(v) for v in scale_sizes]
        grids = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(scales))]
    pred, pred_grid = None, None
    for i in order:
        p = _resize(logits[i], stored[i], grids[i])
        if pred is None:
            pred, pred_grid = p, grids[i]
            continue
        a = _resize(attentions[i], _static(attentions[i], f"hmsa_fuse attentions[{i}]", (2, 3)), grids[i])
        if scales[i] >= 1.0:
            pred = op.Add(op.Mul(a, p), op.Mul(op.Sub(_like(1.0, a), a), _resize(pred, pred_grid, grids[i])))
            pred_grid = grids[i]
        else:  # gate before upsampling to pred's grid
            pred = op.Add(_resize(op.Mul(a, p), grids[i], pred_grid),
                          op.Mul(op.Sub(_like(1.0, a), _resize(a, grids[i], pred_grid)), pred))
    out = _resize(pred, pred_grid, [int(v) for v in out_size])
    if labels:
        return op.ArgMax(out, axis=1, keepdims=0)
    return out


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
#: op name -> translation
OPS = {
    "pyseg::patchwise_conv2d": patchwise_conv2d,
    "pyseg::meta_block": meta_block,
    "pyseg::pointwise_block": pointwise_block,
    "pyseg::hmsa_fuse": hmsa_fuse,
}

_TRACED: dict = {}
_REGISTERED = False


def _traced() -> dict:
    """op name -> its onnxscript trace-only function (built once; ``private`` = not registered yet)."""
    if not _TRACED:
        for name, fn in OPS.items():
            _TRACED[name] = torch_op(name, trace_only=True, private=True)(fn)
    return _TRACED


def register() -> None:
    """Add the translations to onnxscript's torch-lib registry, which every
    ``torch.onnx.export(..., dynamo=True)`` reads when it builds its op table. Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    from onnxscript.function_libs.torch_lib.registration import default_registry

    for name, fn in _traced().items():
        if name not in default_registry:
            default_registry.register(fn, name)
    _REGISTERED = True


def translation_table() -> dict:
    """``{torch.ops.pyseg.<op>.default: translation}`` for an explicit
    ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``."""
    import torch

    return {getattr(torch.ops.pyseg, name.split("::")[1]).default: fn for name, fn in _traced().items()}
