"""earlytom_ext: EarlyTom video-token compression inside the vision encoder.

Quick use with Hugging Face LLaVA-OneVision::

    import earlytom_ext
    handle = earlytom_ext.apply(model, earlytom_ext.EarlyTomConfig(retain_ratio=0.1))
    out = model.generate(**inputs, max_new_tokens=64)
    handle.remove()
"""

from . import _ext as _ext
from . import reference
from ._logging import set_verbosity
from ._version import __version__
from .config import PAPER_PRESETS, EarlyTomConfig, preset

__all__ = [
    "__version__",
    "EarlyTomConfig",
    "PAPER_PRESETS",
    "preset",
    "reference",
    "ops",
    "apply",
    "fast_pooling",
    "fast_window_attention",
    "set_verbosity",
]


def __getattr__(name):
    # Lazy: importing earlytom_ext must stay cheap. importlib (not `from . import`) so that the
    # submodule import does not come back through this __getattr__.
    import importlib

    if name == "ops":
        return importlib.import_module(f"{__name__}.ops")
    if name in ("apply", "EarlyTomHandle", "fast_pooling", "fast_window_attention"):
        return getattr(importlib.import_module(f"{__name__}.integration"), name)
    raise AttributeError(f"module 'earlytom_ext' has no attribute {name!r}")
