"""Imports every built-in model module so that their ``register_model`` calls run."""
from . import deeplab  # noqa: F401
