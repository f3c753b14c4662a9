"""Segmentation models and their registry (``create_model``, ``list_models``); released checkpoints
(``from_official``)."""
from .official import from_official, load_pretrained
from .registry import create_model, get_config, list_models, register_model


# the built-in models register themselves (the registry imports no model module)
from . import hyperseg  # noqa: F401,E402
from . import deeplab  # noqa: F401,E402
from . import hmsa  # noqa: F401,E402
from . import mscale  # noqa: F401,E402

__all__ = ["create_model", "from_official", "get_config", "load_pretrained", "list_models", "register_model"]
