"""The one registration helper of pyseg's operators, and the one dispatch function.

An operator is one schema, ``pyseg::<op>`` (defined in ``csrc/pyseg.cpp``; defined here from the same
text when the compiled extension is absent), with a ``pyseg::<op>_backward`` schema for its gradients.
Its implementations ("backends") are:

* ``cpu`` / ``cuda``: the compiled kernels (``csrc/cpu/<op>.cpp``, ``csrc/cuda/<op>.cu``);
* ``triton``: ``pyseg.kernels.<op>`` (``forward`` / ``backward`` launchers), registered here as one more
  implementation of the *same* op: it is the op's CUDA kernel when the extension has none, and a
  ``backend="triton"`` call runs the op inside :class:`TritonBackend`, a dispatch mode under which
  ``pyseg::<op>`` and ``pyseg::<op>_backward`` run the Triton launchers (so the autograd formula, the fake
  kernel and the traced graph are the same for every backend);
* ``reference``: the pure-PyTorch function in :mod:`pyseg.ops.reference` (autograd through PyTorch).

:func:`register` wires an op (fake kernels, autograd, Triton variant); :meth:`Op.__call__` is the dispatch
function: it chooses the implementation (:meth:`Op.resolve`, which asks the op's ``supports``), puts the
tensors in the layout the kernel reads and gives the result the input's memory format.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

from .. import _extension
from .._backends import resolve_backend

__all__ = ["Op", "register", "TritonBackend", "run_triton", "triton_opcheck", "record_backends",
           "keep_memory_format", "channels_last_input"]

_LIB = torch.library.Library("pyseg", "FRAGMENT")  # schemas defined here only without pyseg._C
_OPS: Dict[str, "Op"] = {}
_RECORD: Optional[list] = None  # see record_backends


@contextlib.contextmanager
def record_backends():
    """Within the block, every :meth:`Op.dispatch` appends ``(op name, implementation)`` to the list it
    yields: how a test proves that a fast path ran (instead of comparing a path with itself)."""
    global _RECORD
    previous, _RECORD = _RECORD, []
    try:
        yield _RECORD
    finally:
        _RECORD = previous


class TritonBackend(TorchDispatchMode):
    """While active, every registered ``pyseg::<op>`` / ``pyseg::<op>_backward`` call runs its Triton
    launcher (rules added by :func:`register`); any other op runs as usual."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _current_variant() -> Optional[str]:
    """"triton" while a :class:`TritonBackend` mode is active (the backward then runs Triton too)."""
    return "triton" if any(isinstance(m, TritonBackend) for m in _get_current_dispatch_mode_stack()) else None


def _triton_launcher(candidates, which: int):
    """The first of ``candidates`` ((module, forward, backward) names in pyseg.kernels) that exists."""
    kernels = _extension.triton_kernels()
    if kernels is None:
        raise RuntimeError(f"Triton kernels unavailable: {_extension._TRITON_ERROR}")
    for cand in candidates:
        try:
            return getattr(getattr(kernels, cand[0]), cand[which])
        except (AttributeError, ImportError):
            continue
    raise RuntimeError(f"pyseg.kernels has none of {[c[0] for c in candidates]}")


class Op:
    """One registered operator: its schema, how autograd saves and calls the backward, which
    configurations each backend supports, and the dispatch into an implementation.

    Fields (keywords of :func:`register`):

    * ``schema`` / ``backward_schema``: the text of ``csrc/pyseg.cpp`` (defined here when pyseg._C is absent);
    * ``fake`` / ``fake_backward``: output shapes for tracing (``torch.library.register_fake``);
    * ``reference``: the pure-PyTorch implementation, taking the schema's arguments;
    * ``differentiable``: indices of the inputs that get gradients (one output of the backward op each);
    * ``saved`` / ``config``: indices of the tensors saved for the backward op and of the non-tensor
      arguments passed after them; the backward op is called as
      ``<op>_backward(grad, *saved, *config, output_mask)``; ``contiguous_weights``: saved tensors it
      reads contiguous;
    * ``setup_context`` / ``backward``: replace the generic autograd wiring (``backward(ctx, backward_op,
      grad)``) for ops whose gradient has another form;
    * ``supports(backend, *config)``: None, or why ``backend`` cannot run a configuration;
    * ``in_place``: ``{backend: indices}`` of arguments that backend reads in channels_last as given;
    * ``triton``: ``((module, forward, backward), ...)`` launcher names in pyseg.kernels (default
      ``((name, "forward", "backward"),)``).
    """

    def __init__(self, name: str, schema: str, backward_schema: str, fake: Callable, fake_backward: Callable,
                 differentiable: Sequence[int], saved: Sequence[int], config: Sequence[int],
                 reference: Callable, in_place: Optional[Dict[str, Sequence[int]]] = None,
                 contiguous_weights: Sequence[int] = (), backward: Optional[Callable] = None,
                 setup_context: Optional[Callable] = None, supports: Optional[Callable] = None,
                 triton: Optional[Sequence[str]] = None):
        self.name = name
        self.schema = schema
        self.backward_schema = backward_schema
        self.differentiable = tuple(differentiable)
        self.saved = tuple(saved)
        self.config = tuple(config)
        self.contiguous_weights = tuple(contiguous_weights)
        self.reference = reference
        self.in_place = dict(in_place or {})
        self.supports = supports or (lambda backend, *args: None)
        self.triton = tuple(triton) if triton else ((name, "forward", "backward"),)
        self._fake, self._fake_backward = fake, fake_backward
        self._custom_backward, self._custom_setup = backward, setup_context

    # ---- the ops ------------------------------------------------------------------------------------
    @property
    def forward_op(self):
        return getattr(torch.ops.pyseg, self.name).default

    @property
    def backward_op(self):
        return getattr(torch.ops.pyseg, f"{self.name}_backward").default

    def compiled(self, dispatch_key: str) -> bool:
        """True when pyseg._C has a compiled kernel of this op for ``dispatch_key`` (CPU, CUDA)."""
        return _extension.has_kernel(self.name, dispatch_key)

    # ---- autograd -----------------------------------------------------------------------------------
    def _setup_context(self, ctx, inputs, output):
        ctx.variant = _current_variant()
        if self._custom_setup is not None:
            return self._custom_setup(ctx, inputs, output)
        ctx.save_for_backward(*(inputs[i] for i in self.saved))
        ctx.config = tuple(inputs[i] for i in self.config)
        ctx.present = tuple(inputs[i] is not None for i in self.differentiable)
        ctx.n_inputs = len(inputs)

    def _backward(self, ctx, *grads):
        with (TritonBackend() if ctx.variant == "triton" else _nullcontext()):
            if self._custom_backward is not None:
                return self._custom_backward(ctx, self.backward_op, *grads)
            mask = [bool(ctx.needs_input_grad[i]) and p for i, p in zip(self.differentiable, ctx.present)]
            out = [None] * ctx.n_inputs
            if not any(mask):
                return tuple(out)
            in_place = self.in_place.get(ctx.variant or "", ())  # the Triton backward reads these as given
            saved = [t.contiguous() if i in self.contiguous_weights and i not in in_place else t
                     for i, t in zip(self.saved, ctx.saved_tensors)]
            result = self.backward_op(grads[0].contiguous(), *saved, *ctx.config, mask)
            for i, g, m in zip(self.differentiable, result, mask):
                out[i] = g if m else None
            return tuple(out)

    # ---- registration -------------------------------------------------------------------------------
    def _register(self):
        for op_name, schema in ((self.name, self.schema), (f"{self.name}_backward", self.backward_schema)):
            if not hasattr(torch.ops.pyseg, op_name):
                _LIB.define(schema)
        torch.library.register_fake(f"pyseg::{self.name}", lib=_LIB)(self._fake)
        torch.library.register_fake(f"pyseg::{self.name}_backward", lib=_LIB)(self._fake_backward)
        torch.library.register_autograd(f"pyseg::{self.name}", self._backward, setup_context=self._setup_context,
                                        lib=_LIB)
        def triton_forward(*args, **kwargs):
            return _triton_launcher(self.triton, 1)(*args, **kwargs)

        def triton_backward(*args, **kwargs):
            return tuple(_triton_launcher(self.triton, 2)(*args, **kwargs))

        for op_name, fn in ((self.name, triton_forward), (f"{self.name}_backward", triton_backward)):
            torch.library.register_torch_dispatch(f"pyseg::{op_name}", TritonBackend, _rule(fn), lib=_LIB)
        if not self.compiled("CUDA"):
            # Triton is the op's CUDA implementation when the extension has no compiled CUDA kernel
            for op_name, fn in ((self.name, triton_forward), (f"{self.name}_backward", triton_backward)):
                _LIB.impl(op_name, fn, "CUDA")
                _extension.PYTHON_KERNELS.add((op_name, "CUDA"))

    # ---- dispatch -----------------------------------------------------------------------------------
    def resolve(self, backend: str, device: torch.device, *config) -> str:
        """The implementation a call with ``backend`` on ``device`` runs: ``reference``, ``cpu``,
        ``cuda`` or ``triton``. A configuration the chosen kernel does not support (``supports``
        returns a reason) falls back to the reference under ``backend="auto"`` and raises a
        ValueError naming the reason when the backend was asked for."""
        be = resolve_backend(backend, device, self.name)
        if be != "reference":
            reason = self.supports(be, *config)
            if reason is not None:
                if backend != "auto":
                    raise ValueError(f"backend={backend!r} cannot run pyseg.ops.{self.name} here: {reason}")
                be = "reference"
        return be

    def _layout(self, backend: str, i: int, t):
        if isinstance(t, (list, tuple)):
            return [self._layout(backend, i, u) for u in t]
        if not isinstance(t, Tensor) or (i in self.in_place.get(backend, ()) and channels_last_input(t)):
            return t
        return t.contiguous()

    def dispatch(self, backend: str, *args, config: Sequence = (), channels_last: Optional[bool] = None):
        """Run the op on ``args`` (the schema's arguments, validated) with the implementation
        :meth:`resolve` chooses for ``backend`` (``config``: extra arguments of ``supports``).

        Tensors are made contiguous, except those the kernel reads in place in channels_last
        (``in_place``); the result is channels_last when ``channels_last`` is true (default: when the
        first argument is). An empty batch gives an empty result of the right shape (attached to autograd
        when an input requires grad), as ``F.conv2d`` does."""
        first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
        be = "empty" if first.shape[0] == 0 else self.resolve(backend, first.device, *config)
        if _RECORD is not None:
            _RECORD.append((self.name, be))
        if be == "empty":
            y = _empty_result(self._fake(*args), args)
        elif be == "reference":
            y = self.reference(*args)
        else:
            args = tuple(self._layout(be, i, a) for i, a in enumerate(args))
            y = _call_triton(self.forward_op, args) if be == "triton" else self.forward_op(*args)
        return keep_memory_format(channels_last_input(first) if channels_last is None else channels_last, y)

def _rule(launcher):
    def rule(mode, func, types, args, kwargs):
        if any(_is_fake(a) for a in args):  # tracing: the fake kernel, as for every backend
            return func(*args, **(kwargs or {}))
        return launcher(*args, **(kwargs or {}))
    return rule


def _is_fake(a) -> bool:
    if isinstance(a, (list, tuple)):
        return any(_is_fake(t) for t in a)
    # fake, functional (tracing) or other subclass tensors hold no data the launchers could read
    return isinstance(a, Tensor) and (a.is_meta or type(a) not in (Tensor, torch.nn.Parameter))


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@torch.compiler.disable  # a dispatch mode cannot be entered inside a traced graph: run it eagerly
def _call_triton(op, args):
    with TritonBackend():
        return op(*args)


def register(name: str, **spec) -> Op:
    """Register ``pyseg::<name>``: its fake kernels, autograd and Triton variant (see :class:`Op` for
    the fields of ``spec``). Returns the :class:`Op`, which is also the op's dispatch function."""
    op = Op(name, **spec)
    op._register()
    _OPS[name] = op
    return op


def channels_last_input(x) -> bool:
    """True for a 4-D tensor stored channels_last (and not also contiguous)."""
    return (isinstance(x, Tensor) and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


def keep_memory_format(channels_last: bool, y: Tensor) -> Tensor:
    """Give ``y`` the memory format of the op's input (channels_last or contiguous)."""
    if channels_last and y.dim() == 4:
        return y.contiguous(memory_format=torch.channels_last)
    return y


def _tensors(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _tensors(a)
        elif isinstance(a, Tensor):
            yield a


def _empty_result(y: Tensor, args) -> Tensor:
    """The (empty) output of an empty batch, with a grad_fn when an input requires grad (the inputs
    then get zero gradients, as from any op on an empty batch)."""
    y = torch.zeros_like(y)
    if y.is_floating_point() and torch.is_grad_enabled():
        for t in _tensors(args):
            if t.requires_grad:
                y = y + t.sum() * 0
    return y


def run_triton(op, *args):
    """Call ``op`` (a ``torch.ops.pyseg`` overload, forward or backward) with its Triton implementation."""
    return _call_triton(op, args)


def triton_opcheck(op, args, **kwargs):
    """``torch.library.opcheck`` of ``op``'s Triton implementation."""
    with TritonBackend():
        return torch.library.opcheck(op, args, **kwargs)
