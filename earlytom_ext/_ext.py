"""Loads the compiled extension (which registers ``torch.ops.earlytom``)."""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

_error = None
try:
    from . import _C  # noqa: F401  (registers the ops)
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    _error = e


def available() -> bool:
    """True when the compiled ops are loaded."""
    return _error is None


def require() -> None:
    if _error is not None:
        raise RuntimeError(
            "earlytom_ext's compiled ops are not available (the extension failed to import: "
            f"{_error}). Reinstall with `pip install --no-build-isolation .`."
        )


def has_cuda_kernels() -> bool:
    """True when the extension was built with CUDA kernels."""
    if not available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("earlytom::merge_frames", "CUDA")
    except Exception:
        return False
