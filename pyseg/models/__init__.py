"""Segmentation models and their registry (``create_model``, ``list_models``)."""
from .registry import create_model, get_config, list_models, register_model

__all__ = ["create_model", "get_config", "list_models", "register_model"]
