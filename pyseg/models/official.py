"""Checkpoints released with the public implementations: :func:`from_official` and the shared reader helpers.

A released checkpoint is a ``torch.save``d dict holding a ``state_dict`` and an ``arch`` -- the public model's
constructor as text (``hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet('efficientnet-b1',...)`` for
HyperSeg). :func:`from_official` loads it without running any code from it (``torch.load(weights_only=True)``;
``arch`` parsed with :mod:`ast`, literal arguments only), picks the reader registered for the constructor,
and returns the matching pyseg model in eval mode with every tensor loaded -- or raises one error.

Readers are looked up in :data:`READERS`, a small table of (constructor names or dotted prefixes ending in
``"."``) -> ``"module:function"``, imported only when a checkpoint needs it. A reader is called as
``function(checkpoint, source=path)`` with the loaded dict (``state_dict`` already without a ``module.``
prefix) and returns the loaded model with a ``pyseg_config`` attribute -- ``{"model": registry name,
"num_classes": int, "model_kwargs": dict}``, what ``create_model`` needs to rebuild it -- which
:func:`save_converted` stores (``pyseg-convert``) and :func:`load_pretrained` reads back without ``torch.load``.
Readers build on the helpers here:

* :func:`load_checkpoint` -- safe loading, a clear error for a file that is not a (complete) checkpoint;
* :func:`strip_prefix` -- DataParallel's ``module.``;
* :func:`parse_arch` -- (callable name, positional args, keyword args) from the ``arch`` text;
* :func:`load_mapped` -- copy the checkpoint's tensors into the model through a one-to-one key map, after
  checking all of them: missing, unexpected and mis-shaped keys are reported together in one
  :class:`CheckpointMismatchError` and nothing is loaded.
"""
from __future__ import annotations

import ast
import importlib
import os
import pickle
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .registry import set_checkpoint_loader

__all__ = ["from_official", "load_pretrained", "save_converted", "is_safetensors", "load_checkpoint", "strip_prefix", "parse_arch", "load_mapped", "register_reader",
           "find_reader", "supported_archs", "READERS", "CheckpointMismatchError", "UnsupportedArchError"]

#: (constructor names, or dotted prefixes ending in ".") -> "module:function" of the reader.
READERS: List[Tuple[Tuple[str, ...], str]] = [
    (("hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet",
      "hyperseg.models.hyperseg_v1_0_unify.hyperseg_efficientnet",
      "hyperseg.models.hyperseg_v0_1.hyperseg_efficientnet"), "pyseg.models.hyperseg_official:from_checkpoint"),
    (("ocrnet.HRNet_Mscale", "mscale.DeepV3R50"), "pyseg.models.nvidia_official:from_checkpoint"),
]


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not map one-to-one, with equal shapes, onto the model (nothing was loaded).

    ``missing``: model keys no checkpoint tensor maps to; ``unexpected``: checkpoint keys that map to nothing;
    ``mismatched``: (checkpoint key, model key, checkpoint shape, model shape)."""

    def __init__(self, source: str, missing: Sequence[str], unexpected: Sequence[str],
                 mismatched: Sequence[Tuple[str, str, tuple, tuple]], what: str = ""):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)} (model tensors with no checkpoint entry): "
                         + ", ".join(self.missing))
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} (checkpoint entries the model has no place for): "
                         + ", ".join(self.unexpected))
        if self.mismatched:
            parts.append(f"mis-shaped {len(self.mismatched)}: " + ", ".join(
                f"{k} {tuple(a)} -> {m} {tuple(b)}" for k, m, a, b in self.mismatched))
        super().__init__(f"{source}: the checkpoint does not match {what or 'the model'}; nothing was loaded. "
                         + "; ".join(parts))


class UnsupportedArchError(ValueError):
    """The checkpoint's ``arch`` names a constructor no reader supports."""


def supported_archs() -> List[str]:
    """Every constructor name (or prefix) of :data:`READERS`."""
    return [name for names, _ in READERS for name in names]


def register_reader(names: Iterable[str], target: str) -> None:
    """Add a reader: ``names`` are constructor names (or dotted prefixes ending in ``"."``) of ``arch``,
    ``target`` is ``"module:function"`` (imported when first needed)."""
    names = tuple(names)
    if not names or ":" not in target:
        raise ValueError(f"register_reader needs constructor names and a 'module:function' target, got "
                         f"{names!r}, {target!r}")
    READERS.append((names, target))


def find_reader(callable_name: str) -> Callable[..., nn.Module]:
    """The reader function for ``callable_name`` (imported lazily), or UnsupportedArchError."""
    for names, target in READERS:
        if any(callable_name == n or (n.endswith(".") and callable_name.startswith(n)) for n in names):
            module, _, func = target.partition(":")
            return getattr(importlib.import_module(module), func)
    raise UnsupportedArchError(f"unsupported arch {callable_name!r}: pyseg reads checkpoints of "
                               + ", ".join(supported_archs()))


def load_checkpoint(path, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)`` of a dict checkpoint. Anything else -- a missing file, a
    file that is not a torch checkpoint, a truncated one, one that would need to run code to unpickle,
    or one whose top level is not a dict -- raises an error that says which."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path!r} is not a readable torch checkpoint, or it holds more than tensors and plain "
                         f"containers (loading it would run code from it: refused, weights_only=True): "
                         f"{first[:200]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"{path!r} is not a readable torch checkpoint (truncated or another format?): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path!r} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> Dict[str, Any]:
    """``state_dict`` with ``prefix`` removed from the keys that carry it (DataParallel's ``module.``)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def _dotted(node: ast.AST) -> Optional[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def parse_arch(arch: str) -> Tuple[str, list, dict]:
    """``"pkg.mod.fn(1,'a',k=[2,3])"`` -> ``("pkg.mod.fn", [1, 'a'], {"k": [2, 3]})``; a bare dotted name
    (``"ocrnet.HRNet_Mscale"``) -> (name, [], {}). Only literal arguments (numbers, strings, None,
    booleans, lists/tuples/dicts/sets of them) are accepted: nothing is evaluated, and anything else
    raises ValueError."""
    if not isinstance(arch, str):
        raise ValueError(f"arch must be a string, got {type(arch).__name__}")
    try:
        tree = ast.parse(arch.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"arch is not a constructor call: {arch!r} ({e.msg})") from None
    if isinstance(tree, ast.Call):
        name = _dotted(tree.func)
        if name is None:
            raise ValueError(f"arch must call a dotted name, got {arch!r}")
        args, kwargs = [], {}
        for node in tree.args:
            if isinstance(node, ast.Starred):
                raise ValueError(f"arch must not unpack arguments (*args): {arch!r}")
            args.append(_literal(node, arch))
        for kw in tree.keywords:
            if kw.arg is None:
                raise ValueError(f"arch must not unpack keyword arguments (**kwargs): {arch!r}")
            kwargs[kw.arg] = _literal(kw.value, arch)
        return name, args, kwargs
    name = _dotted(tree)
    if name is None:
        raise ValueError(f"arch must be a constructor call or a dotted name, got {arch!r}")
    return name, [], {}


def _literal(node: ast.AST, arch: str):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"arch arguments must be literals (numbers, strings, None, True/False, lists, tuples, "
                         f"dicts); {ast.unparse(node)!r} is not, in {arch!r}") from None


@torch.no_grad()
def load_mapped(model: nn.Module, state_dict: Mapping[str, Any], key_map: Mapping[str, Optional[str]],
                source: str = "checkpoint", what: str = "") -> nn.Module:
    """Copy ``state_dict[src]`` into ``model``'s ``key_map[src]`` for every entry, all or nothing.

    ``key_map`` maps each checkpoint key the reader understands to a model key of ``model.state_dict()``
    (``None``: consumed by the reader, e.g. checked and recomputed, not stored). Before anything is
    copied, every checkpoint key must be in ``key_map`` (else *unexpected*), every model key must be
    the target of exactly one entry (else *missing*), and shapes must agree (else *mis-shaped*); any of
    these raises one :class:`CheckpointMismatchError` listing them all. Then ``load_state_dict(strict=True)``.
    Returns ``model``."""
    own = model.state_dict()
    missing_src = sorted(k for k in key_map if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in key_map)
    targets: Dict[str, str] = {}
    dup = []
    for src, dst in key_map.items():
        if dst is None or src not in state_dict:
            continue
        if dst in targets:
            dup.append(dst)
        targets[dst] = src
    missing = sorted(set(own) - set(targets)) + [f"{k} (checkpoint key)" for k in missing_src]
    unexpected += sorted(f"{targets[d]} -> {d} (not in the model)" for d in targets if d not in own)
    unexpected += [f"{d} (mapped twice)" for d in sorted(set(dup))]
    mismatched = []
    for dst, src in targets.items():
        v = state_dict[src]
        if not isinstance(v, Tensor):
            unexpected.append(f"{src} (a {type(v).__name__}, not a tensor)")
        elif dst in own and tuple(v.shape) != tuple(own[dst].shape):
            mismatched.append((src, dst, tuple(v.shape), tuple(own[dst].shape)))
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(source, missing, unexpected, mismatched, what)
    model.load_state_dict({dst: state_dict[src] for dst, src in targets.items()}, strict=True)
    return model


def from_official(path, map_location="cpu") -> nn.Module:
    """The pyseg model of a checkpoint released with a public implementation, every tensor loaded, in eval
    mode.

    Supported constructors (the checkpoint's ``arch``): see :func:`supported_archs` -- the public HyperSeg
    ``hyperseg_v1_0``, ``hyperseg_v1_0_unify`` and ``hyperseg_v0_1`` ``hyperseg_efficientnet`` with any
    argument values they accept (see :mod:`pyseg.models.hyperseg_official` for the few structural options
    pyseg does not implement); NVIDIA's HMSA ``ocrnet.HRNet_Mscale`` and ``mscale.DeepV3R50``
    (:mod:`pyseg.models.nvidia_official`). ``map_location`` as for ``torch.load``. Raises FileNotFoundError,
    ValueError (not a checkpoint, truncated, no ``state_dict``/``arch``, code in ``arch``),
    UnsupportedArchError or CheckpointMismatchError; never returns a partially loaded model."""
    source = os.fspath(path)
    ckpt = load_checkpoint(source, map_location)
    sd, arch = ckpt.get("state_dict"), ckpt.get("arch")
    if not isinstance(sd, dict) or not isinstance(arch, str):
        keys = ", ".join(map(str, list(ckpt)[:8])) or "none"
        raise ValueError(f"{source!r} is not a released-model checkpoint: it needs a 'state_dict' dict and an "
                         f"'arch' string (the public constructor call); its top-level keys: {keys}")
    name, _, _ = parse_arch(arch)
    reader = find_reader(name)
    ckpt = dict(ckpt, state_dict=strip_prefix(sd))
    return reader(ckpt, source=source).eval()


# ----------------------------------------------------------------------------------------------
def is_safetensors(path) -> bool:
    """True when ``path`` starts like a safetensors file (8-byte header length, then a JSON header)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def save_converted(model: nn.Module, path, extra: Optional[dict] = None) -> None:
    """Write ``model`` (returned by :func:`from_official`) as a pyseg checkpoint: safetensors weights with
    its config in the metadata (``model``, ``num_classes``, ``model_kwargs``; the format ``pyseg-train``
    writes), atomically. ``extra``: more metadata (e.g. the source and its ``arch``)."""
    from ..engine.checkpoint import save_weights

    cfg = getattr(model, "pyseg_config", None)
    if not cfg:
        raise ValueError("save_converted needs a model returned by from_official (it carries pyseg_config)")
    meta = {k: cfg[k] for k in ("model", "num_classes", "model_kwargs", "registered_config") if k in cfg}
    meta.update(extra or {})
    save_weights(model, path, meta)


def load_pretrained(path, name: Optional[str] = None, num_classes: Optional[int] = None,
                    map_location="cpu", **overrides) -> nn.Module:
    """A model with the weights of ``path`` (eval mode): a pyseg safetensors checkpoint (``pyseg-train``,
    ``pyseg-convert``: built from its metadata, no ``torch.load``) or a released checkpoint
    (:func:`from_official`). The file decides the architecture; ``name`` (optional) must be the registry
    model it holds -- or, for a released architecture that is no registered config, a model of the same
    family; ``num_classes`` must agree with the file; ``overrides`` are further ``create_model`` keywords
    that do not change the tensors (e.g. ``backend``). The result carries ``pyseg_config``."""
    from .registry import _REGISTRY, _load_builtin, create_model
    from ..engine.checkpoint import load_weights, read_metadata

    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"checkpoint file not found: {source!r}")
    model = None
    if is_safetensors(source):
        meta = read_metadata(source)
        cfg = {"model": meta.get("model"), "num_classes": meta.get("num_classes"),
               "model_kwargs": dict(meta.get("model_kwargs") or {}),
               "registered_config": meta.get("registered_config", True) is not False}
        if not cfg["model"] and not name:
            raise ValueError(f"{source!r} does not name its model (no 'model' metadata); pass the model name")
    else:
        model = from_official(source, map_location)
        cfg = model.pyseg_config
    _load_builtin()
    file_name = cfg["model"] or name
    if name is not None and name != file_name:
        if name not in _REGISTRY:
            raise KeyError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
        if cfg.get("registered_config", True) or _REGISTRY[name].builder is not _REGISTRY[file_name].builder:
            raise ValueError(f"{source!r} holds {file_name!r}, not {name!r}: use that name, or "
                             f"pyseg.models.load_pretrained({source!r}) which takes the model from the file")
    if num_classes is not None and cfg["num_classes"] is not None and int(num_classes) != int(cfg["num_classes"]):
        raise ValueError(f"{source!r} holds a {cfg['num_classes']}-class model, not num_classes={num_classes}")
    if model is not None and not overrides:
        return model
    kwargs = dict(cfg["model_kwargs"], **overrides)
    n = cfg["num_classes"] if cfg["num_classes"] is not None else num_classes
    fresh = create_model(file_name, num_classes=n, **kwargs)  # noqa: the file's kwargs override the config
    if model is not None:
        fresh.load_state_dict(model.state_dict(), strict=True)
    else:
        load_weights(fresh, source)
    fresh.pyseg_config = dict(cfg, model_kwargs=kwargs)
    return fresh.eval()


set_checkpoint_loader(load_pretrained)  # create_model(name, checkpoint=path)
