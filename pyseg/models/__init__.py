"""Segmentation models and their registry (``create_model``, ``list_models``); released checkpoints
(``from_official``)."""
from .official import from_official, load_pretrained
from .registry import create_model, get_config, list_models, register_model

__all__ = ["create_model", "from_official", "get_config", "load_pretrained", "list_models", "register_model"]
