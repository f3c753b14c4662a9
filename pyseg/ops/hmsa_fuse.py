"""Hierarchical multi-scale attention (HMSA) fusion: public function, validation, backends, autograd.

Semantics (Tao, Sapra, Catanzaro 2020; README "Hierarchical multi-scale attention"). Inputs per scale s: logits p_s
(B, C, h_s, w_s) and an attention map a_s (B, 1, h'_s, w'_s) in [0, 1]. Resampling is bilinear,
align_corners=False, no antialias, always to an explicit size.

0. Each scale s has a *grid* G_s on which its prediction is formed: ``scale_sizes[s]`` when given
   (typically scale s's input-image size, as in the public implementation, which upsamples every
   scale's stride-4 network output and attention to it), else the logits' own size (h_s, w_s).
   Scale s's logits are resized bilinearly to G_s (a no-op when the sizes agree).
1. Each attention map is resized bilinearly from its raw size straight to G_s (a no-op when the
   sizes agree), e.g. a stride-4 attention for full-resolution logits.
2. Scales are processed from the highest down: ``pred = p_top``; for s >= 1 below the top,
   ``pred = a_s * p_s + (1 - a_s) * D(pred)`` on G_s (D resizes pred to it); for s < 1,
   ``pred = U(a_s * p_s) + (1 - U(a_s)) * pred`` on pred's grid (which is G_1.0; gate before
   upsampling). The top scale's attention is unused (may be None).
3. ``pred`` (on G_1.0) is resized to ``out_size``; ``output="labels"`` gives its argmax over
   classes (int64, first index on ties).

Fused kernels (C++ CPU, CUDA, Triton) never materialise per-scale or full-resolution logits: the
recurrence is linear in the logits with attention-only coefficients, so each output value is an
exact weighted sum over a few pixels of every scale (a per-pixel stencil built from the composed
bilinear samplers, csrc/common/hmsa_fuse.h), evaluated class by class; labels keep a running argmax.
With ``scale_sizes`` the resize of the stored logits to G_s is one more bilinear sampler composed
into the stencil: the stored (e.g. stride-4) logits are sampled on the fly, so the per-scale
full-resolution logits of the public method (638 MB for 19 classes at scale 2 of a 1024x2048
image) never exist. The reference materialises them (it is the public method).

Autograd: the op has a fused backward (``pyseg::hmsa_fuse_backward``: compiled on CPU and CUDA, and
a Triton implementation, same math, that needs no compiled extension), for the two-scale training
form, scales (s, 1.0) with s < 1, output="logits", grids equal to the
stored sizes. With ``scale_sizes`` that differ from the stored sizes and inputs that require
grad, the front end resizes logits and attention maps explicitly with ``F.interpolate`` (under
autograd; exact, and the memory autograd needs anyway) and calls the fused op on the resized
tensors, so the fused backward still applies to the training form. Any other configuration that
needs gradients runs the reference (autograd through F.interpolate) instead.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _library, reference
from ._utils import FLOAT_DTYPES, pair

__all__ = ["hmsa_fuse", "normalize_hmsa_args", "supports"]

OP = "hmsa_fuse"


# --------------------------------------------------------------------------------------------
# argument handling
# --------------------------------------------------------------------------------------------
def _check_scale_sizes(scale_sizes, n):
    if isinstance(scale_sizes, (str, bytes, Tensor)) or not isinstance(scale_sizes, (list, tuple)):
        raise TypeError(f"scale_sizes must be a list/tuple of (h, w) pairs (one per scale) or None, "
                        f"got {type(scale_sizes).__name__}")
    if len(scale_sizes) != n:
        raise ValueError(f"scale_sizes must have one (h, w) entry per scale: got {len(scale_sizes)} entries "
                         f"for {n} scales")
    out = []
    for i, hw in enumerate(scale_sizes):
        if not isinstance(hw, (list, tuple, torch.Size)) or len(hw) != 2 or not all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in hw):
            raise TypeError(f"scale_sizes[{i}] must be a pair of ints (h, w), got {hw!r}")
        if min(int(v) for v in hw) <= 0:
            raise ValueError(f"scale_sizes[{i}] must be positive (h, w), got {tuple(hw)!r}")
        out.append((int(hw[0]), int(hw[1])))
    return out


def normalize_hmsa_args(logits, attentions, scales, out_size, output="logits", scale_sizes=None):
    """Validate and sort by scale, highest first.

    Returns ``(logits, attentions, scales, out_size, scale_sizes)`` as lists sorted strictly
    descending by scale (attention of the top scale set to None; scale_sizes None or a list of
    (h, w) tuples). Raises TypeError/ValueError naming the argument.
    """
    if isinstance(logits, Tensor) or not isinstance(logits, (list, tuple)):
        raise TypeError(f"logits must be a list/tuple of tensors (one per scale), got {type(logits).__name__}")
    if isinstance(attentions, Tensor) or not isinstance(attentions, (list, tuple)):
        raise TypeError(f"attentions must be a list/tuple of tensors or None (one per scale), "
                        f"got {type(attentions).__name__}")
    if isinstance(scales, (str, bytes)) or not isinstance(scales, (list, tuple)):
        raise TypeError(f"scales must be a sequence of numbers, got {scales!r}")
    n = len(scales)
    if n == 0:
        raise ValueError("scales is empty; it must contain 1.0")
    if len(logits) != n or len(attentions) != n:
        raise ValueError(f"logits ({len(logits)}), attentions ({len(attentions)}) and scales ({n}) "
                         "must have one entry per scale")
    for i, s in enumerate(scales):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not s > 0:
            raise ValueError(f"scales[{i}] must be a positive number, got {s!r}")
    fs = [float(s) for s in scales]
    if 1.0 not in fs:
        raise ValueError(f"scales must contain 1.0 (the scale whose logit grid the fusion runs on), got {list(scales)}")
    if len(set(fs)) != n:
        raise ValueError(f"scales must be distinct, got {list(scales)}")
    if output not in ("logits", "labels"):
        raise ValueError(f"output must be 'logits' or 'labels', got {output!r}")
    out_size = pair(out_size, "out_size", minimum=1)
    sizes = None if scale_sizes is None else _check_scale_sizes(scale_sizes, n)

    ref = None
    for i, p in enumerate(logits):
        if not isinstance(p, Tensor):
            raise TypeError(f"logits[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if p.dim() != 4:
            raise ValueError(f"logits[{i}] must be (B, C, h, w), got shape {tuple(p.shape)}")
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"logits[{i}] must have a floating dtype, got {p.dtype}")
        if min(p.shape[1:]) <= 0:
            raise ValueError(f"logits[{i}] has an empty class or spatial dimension: {tuple(p.shape)}")
        if ref is None:
            ref = p
            continue
        if p.shape[0] != ref.shape[0]:
            raise ValueError(f"logits[{i}] has batch {p.shape[0]} but logits[0] has batch {ref.shape[0]}")
        if p.shape[1] != ref.shape[1]:
            raise ValueError(f"logits[{i}] has {p.shape[1]} classes but logits[0] has {ref.shape[1]}; "
                             "every scale must predict the same classes")
        if p.device != ref.device:
            raise ValueError(f"logits[{i}] is on {p.device} but logits[0] is on {ref.device}")
        if p.dtype != ref.dtype:
            raise TypeError(f"logits[{i}] has dtype {p.dtype} but logits[0] has {ref.dtype}; they must match")
    order = sorted(range(n), key=lambda i: -fs[i])
    top = order[0]
    for i, a in enumerate(attentions):
        if a is None:
            if i != top:
                raise ValueError(f"attentions[{i}] (scale {fs[i]}) is None; only the top scale's attention "
                                 "(unused) may be None")
            continue
        if not isinstance(a, Tensor):
            raise TypeError(f"attentions[{i}] must be a torch.Tensor or None, got {type(a).__name__}")
        if i == top:
            continue  # unused
        if a.dim() != 4 or a.shape[1] != 1:
            raise ValueError(f"attentions[{i}] must have shape (B, 1, h, w) (one channel), got {tuple(a.shape)}")
        if a.shape[0] != ref.shape[0]:
            raise ValueError(f"attentions[{i}] has batch {a.shape[0]} but the logits have batch {ref.shape[0]}")
        if min(a.shape[1:]) <= 0:
            raise ValueError(f"attentions[{i}] has an empty spatial dimension: {tuple(a.shape)}")
        if a.device != ref.device:
            raise ValueError(f"attentions[{i}] is on {a.device} but the logits are on {ref.device}")
        if a.dtype != ref.dtype:
            raise TypeError(f"attentions[{i}] has dtype {a.dtype} but the logits have {ref.dtype}; they must match")
    lg = [logits[i] for i in order]
    at = [None if i == top else attentions[i] for i in order]
    return lg, at, [fs[i] for i in order], out_size, None if sizes is None else [sizes[i] for i in order]


def _is_training_form(scales):
    return len(scales) == 2 and scales[0] == 1.0 and scales[1] < 1.0


def _stored_sizes(logits):
    return [tuple(int(v) for v in p.shape[-2:]) for p in logits]


def _flat_sizes(sizes):
    return None if sizes is None else [int(v) for hw in sizes for v in hw]


def _resize(x, size):
    return torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False,
                                           antialias=False)


# --------------------------------------------------------------------------------------------
# registration: schemas, fake kernels, autograd (pyseg/ops/_library.py)
# --------------------------------------------------------------------------------------------
def _fake_forward(logits, attentions, scales, out_size, labels, scale_sizes=None):
    B, C = logits[0].shape[:2]
    if labels:
        return logits[0].new_empty(B, out_size[0], out_size[1], dtype=torch.int64)
    return logits[0].new_empty(B, C, out_size[0], out_size[1])


def _fake_backward(grad_out, logits_one, logits_low, attention_low):
    return torch.empty_like(logits_one), torch.empty_like(logits_low), torch.empty_like(attention_low)


def _setup_context(ctx, inputs, output):
    logits, attentions, scales, out_size, labels = inputs[:5]
    scale_sizes = inputs[5] if len(inputs) > 5 else None
    ctx.n_inputs = len(inputs)
    # the fused backward has no adjoint of the storage -> grid resize: grids must equal the storage
    same_grid = scale_sizes is None or _flat_sizes(_stored_sizes(logits)) == list(scale_sizes)
    ctx.form_ok = _is_training_form(scales) and not labels and same_grid
    if ctx.form_ok:
        ctx.save_for_backward(logits[0], logits[1], attentions[1])


def _backward(ctx, backward_op, grad):
    if not ctx.form_ok:
        raise RuntimeError("pyseg::hmsa_fuse has a fused backward only for scales (s, 1.0) with s < 1, labels=False "
                           "and scale_sizes equal to the logits' sizes; use pyseg.ops.hmsa_fuse, which resizes "
                           "explicitly or falls back to the reference")
    p1, pl, al = ctx.saved_tensors
    g1, gl, ga = backward_op(grad.contiguous(), p1, pl, al)
    return ([g1, gl], [None, ga], None, None, None) + (None,) * (ctx.n_inputs - 5)


def _reference(logits, attentions, scales, out_size, labels, scale_sizes=None):
    sizes = None if scale_sizes is None else list(zip(scale_sizes[0::2], scale_sizes[1::2]))
    attentions = [None] + list(attentions[1:])  # the top scale's entry is a placeholder
    return reference.hmsa_fuse(logits, attentions, scales, out_size, "labels" if labels else "logits",
                               scale_sizes=sizes)


#: Most scales the compiled kernels take (csrc/common/hmsa_fuse.h HMSA_MAX_SCALES).
_COMPILED_MAX_SCALES = 8
#: per-thread stencil capacity of the CUDA kernel (csrc/cuda/hmsa_fuse_kernels.cuh HMSA_CUDA_MAX_TERMS)
_CUDA_MAX_TERMS = 160


def stencil_terms(scales) -> int:
    """Upper bound on the per-output-pixel stencil length (csrc/common/hmsa_fuse.h hmsa_max_terms)."""
    one = list(scales).index(1.0)
    high = 1
    for _ in range(one):
        high = 1 + 4 * high
    return 4 * (high + 4 * (len(scales) - 1 - one))


def supports(backend: str, scales: Sequence[float]) -> Optional[str]:
    """Why the fused ``backend`` cannot fuse ``scales`` (sorted descending), or None when it can."""
    one = list(scales).index(1.0)
    above, below = one, len(scales) - 1 - one
    if backend == "triton" and (above > 2 or below > 3):
        return f"the Triton kernel supports up to 2 scales above 1.0 and 3 below, got scales {list(scales)}"
    if backend in ("cpu", "cuda") and len(scales) > _COMPILED_MAX_SCALES:
        return f"the compiled kernels take at most {_COMPILED_MAX_SCALES} scales, got {len(scales)}"
    if backend == "cuda" and stencil_terms(scales) > _CUDA_MAX_TERMS:
        return f"the CUDA kernel supports up to 2 scales above 1.0 and 4 below, got scales {list(scales)}"
    return None


_op = _library.register(
    OP,
    schema="hmsa_fuse(Tensor[] logits, Tensor[] attentions, float[] scales, int[2] out_size, bool labels, "
           "int[]? scale_sizes=None) -> Tensor",
    backward_schema="hmsa_fuse_backward(Tensor grad_out, Tensor logits_one, Tensor logits_low, "
                    "Tensor attention_low) -> (Tensor, Tensor, Tensor)",
    fake=_fake_forward, fake_backward=_fake_backward, reference=_reference, supports=supports,
    differentiable=(0, 1), saved=(), config=(), setup_context=_setup_context, backward=_backward)


# --------------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------------
def hmsa_fuse(logits: Sequence[Tensor], attentions: Sequence[Optional[Tensor]], scales: Sequence[float],
              out_size, output: str = "logits", backend: str = "auto",
              scale_sizes: Optional[Sequence] = None) -> Tensor:
    """Fuse per-scale logits with hierarchical multi-scale attention (see the module docstring).

    Args:
        logits: one (B, C, h_s, w_s) tensor per scale (any resolutions; same B, C, dtype, device).
        attentions: one (B, 1, h'_s, w'_s) map per scale, values in [0, 1] (e.g. after a sigmoid);
            each is bilinearly resized to its scale's grid first. The top scale's is unused and
            may be None.
        scales: the scale of each entry (any order, distinct, must contain 1.0).
        out_size: (H, W) of the result (e.g. the input image size).
        output: ``"logits"`` -> (B, C, H, W) in the logits' dtype; ``"labels"`` -> (B, H, W) int64
            argmax, fused (no full-resolution logits are materialised by the fused backends).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        scale_sizes: optional per-scale (h, w) grid (same order as ``scales``) on which scale s's
            prediction is formed, typically its input-image size (the public method, which
            upsamples the stride-4 network outputs to it). Logits and attention are resized to it
            first; the fused backends sample the stored logits on the fly instead. ``None``: each
            scale's grid is its logits' own size.

    Gradients: fused for scales (s, 1.0), s < 1 (the training form; with ``scale_sizes`` other
    than the stored sizes the inputs are first resized explicitly under autograd); other
    configurations with ``requires_grad`` inputs use the reference path (autograd through
    ``F.interpolate``).
    """
    lg, at, sc, out_size, sizes = normalize_hmsa_args(logits, attentions, scales, out_size, output, scale_sizes)
    if sizes is not None and sizes == _stored_sizes(lg):
        sizes = None  # every grid is the stored size: today's path, bit for bit
    labels = output == "labels"
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in list(lg) + list(at))
    if needs_grad and not labels and not _is_training_form(sc):
        backend = "reference"  # documented fallback: fused backward only for the 2-scale training form
    be = _op.resolve(backend, lg[0].device, sc)
    if be != "reference" and needs_grad and sizes is not None:
        # the fused backward has no adjoint of the storage -> grid sampler: resize explicitly
        # under autograd (exact; what autograd would keep anyway) and fuse on the grids
        lg = [p if tuple(p.shape[-2:]) == hw else _resize(p, hw) for p, hw in zip(lg, sizes)]
        at = [a if a is None or tuple(a.shape[-2:]) == hw else _resize(a, hw) for a, hw in zip(at, sizes)]
        sizes = None
    # the op takes a plain Tensor[] (the top's entry is ignored): a list holding None would hide
    # the attention tensors from autograd
    placeholder = lg[0].new_empty(0)
    return _op.dispatch(be, lg, [placeholder if t is None else t for t in at], sc, list(out_size), labels,
                        _flat_sizes(sizes), config=(sc,))
