"""Checkpoints: model weights as safetensors (+ metadata) and the training state via ``torch.save``.

Files for a tag ``<tag>`` (``last``, ``best``) in the output directory:

* ``<tag>.safetensors`` — the unwrapped model's ``state_dict`` (parameters and buffers); metadata holds
  ``model`` (registry name), ``num_classes``, ``model_kwargs`` (JSON), ``step``, ``epoch`` and ``classes`` (JSON).
* ``<tag>.state.pt`` — {optimizer, scheduler, scaler, epoch, step, best_metric, rng (one entry per rank),
  args, world_size}.

Both are written to a temporary file in the same directory and moved into place with ``os.replace``, so a crash
never leaves a truncated file; the weights and state carry the same ``step``, checked when resuming.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

__all__ = ["save_weights", "load_weights", "read_metadata", "save_state", "load_state", "rng_state",
           "set_rng_state", "unwrap"]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(
        model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else model


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_weights(model: torch.nn.Module, path, metadata: dict | None = None) -> None:
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    _atomic(Path(path), lambda tmp: save_model(unwrap(model), tmp, metadata=meta))


def read_metadata(path) -> dict:
    """The safetensors metadata, JSON values decoded."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out


def load_weights(model: torch.nn.Module, path, strict: bool = True):
    """Load ``path`` into the (unwrapped) model; returns (missing, unexpected) key lists."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return load_model(unwrap(model), str(path), strict=strict, device="cpu")


def save_state(state: dict, path) -> None:
    _atomic(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training state file not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
