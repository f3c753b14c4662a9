"""Imports every built-in model module so that their ``register_model`` calls run."""
from . import hyperseg  # noqa: F401,E402
from . import deeplab  # noqa: F401,E402
from . import hmsa  # noqa: F401,E402
from . import mscale  # noqa: F401,E402
