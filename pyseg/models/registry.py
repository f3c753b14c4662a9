"""Model registry: names such as ``hyperseg-m`` map to a builder and a config (plain data).

The registry imports no model module: each model module registers its names when imported, and
``pyseg.models`` (the package, always imported before this module) imports the built-in ones. Every
builder takes the same arguments -- ``num_classes``, ``in_channels``, ``backbone_weights`` (a local
backbone checkpoint, never downloaded), ``checkpoint`` (weights of the whole model) -- plus its config's
keys."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["register_model", "create_model", "list_models", "get_config"]


@dataclass
class _Entry:
    builder: Callable[..., Any]
    config: dict = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, _Entry] = {}
#: ``create_model(name, checkpoint=path)``: pyseg.models.official.load_pretrained, set when that module is
#: imported (by ``pyseg.models``), so that the registry imports no model module
_CHECKPOINT_LOADER: Callable[..., Any] | None = None


def set_checkpoint_loader(loader: Callable[..., Any]) -> None:
    """Install ``loader(path, name, num_classes, **overrides)`` as what ``checkpoint=`` calls."""
    global _CHECKPOINT_LOADER
    _CHECKPOINT_LOADER = loader


def register_model(name: str, builder: Callable[..., Any], config: dict | None = None, description: str = ""):
    """Register ``name``; ``create_model(name, **overrides)`` calls ``builder(**{**config, **overrides})``."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = _Entry(builder, dict(config or {}), description)


def _load_builtin():
    """Nothing to do: importing ``pyseg.models`` registered the built-in models (kept for callers)."""


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_config(name: str) -> dict:
    """A copy of the registered config of ``name``."""
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return copy.deepcopy(_REGISTRY[name].config)


def create_model(name: str, num_classes: int | None = None, backbone_weights: str | None = None,
                 checkpoint: str | None = None, **overrides):
    """Build the registered model ``name``; keyword arguments override its config.

    ``num_classes=None`` keeps the config's; ``backbone_weights`` is a local checkpoint of the backbone
    (never downloaded). ``checkpoint``: load the whole model from a pyseg ``.safetensors`` file or a
    released ``.pth`` (:func:`pyseg.models.official.load_pretrained`; the file's architecture must be
    ``name``'s), in eval mode."""
    if checkpoint is not None:
        if backbone_weights is not None:
            raise ValueError("pass either checkpoint or backbone_weights, not both")
        return _CHECKPOINT_LOADER(checkpoint, name, num_classes, **overrides)
    cfg = get_config(name)
    cfg.update(overrides)
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    if backbone_weights is not None:
        cfg["backbone_weights"] = backbone_weights
    return _REGISTRY[name].builder(**cfg)
