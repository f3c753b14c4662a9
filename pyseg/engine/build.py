"""Model construction for the commands (``pyseg-train``, ``pyseg-eval``, ``pyseg-predict``): extra model
modules, the device, the registry model. Kept apart from the trainer so that evaluation and prediction
do not import it."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

__all__ = ["import_extra", "resolve_device", "build_model"]


def import_extra(specs) -> None:
    """Import modules (dotted names) or files (``*.py``) that register extra models."""
    for spec in specs or ():
        if spec.endswith(".py"):
            name = "pyseg_extra_" + Path(spec).stem
            if name in sys.modules:
                continue
            s = importlib.util.spec_from_file_location(name, spec)
            if s is None or s.loader is None:
                raise ImportError(f"cannot import {spec}")
            mod = importlib.util.module_from_spec(s)
            sys.modules[name] = mod
            s.loader.exec_module(mod)
        else:
            importlib.import_module(spec)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but no CUDA device is available")
    return dev


def build_model(name: str, num_classes: int, model_kwargs: dict | None = None):
    from ..models import create_model

    return create_model(name, num_classes=num_classes, **(model_kwargs or {}))
