"""Input checks shared by the op wrappers: clear Python errors instead of kernel failures."""
from __future__ import annotations

import math
import numbers
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, ndim: Optional[int] = None, dtypes: Optional[Iterable[torch.dtype]] = None,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """Type, rank, dtype and device of one tensor argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of the other inputs), got {t.device}")
    return t


def check_finite(name: str, t: torch.Tensor) -> None:
    """Reject NaN/Inf (one reduction; a host sync on CUDA)."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_frame_counts(frame_counts, n_frames: int, device: torch.device) -> torch.Tensor:
    """``frame_counts``: int tensor/list [B], every count >= 1, summing to ``n_frames``.

    Returns an int64 tensor on ``device``. Host-side values are checked before any copy.
    """
    if isinstance(frame_counts, torch.Tensor):
        check_frame_counts_tensor(frame_counts)
        host = frame_counts.tolist()
    else:
        try:
            host = [int(c) for c in frame_counts]
        except TypeError:
            raise TypeError(f"frame_counts must be a 1-D int tensor or a list of ints, got {type(frame_counts).__name__}")
    if len(host) == 0:
        raise ValueError("frame_counts must hold at least one video, got an empty list")
    if any(c < 1 for c in host):
        raise ValueError(f"frame_counts must all be >= 1 (no empty videos), got {host}")
    if sum(host) != n_frames:
        raise ValueError(f"frame_counts must sum to the number of frames {n_frames}, got sum {sum(host)} ({host})")
    return torch.tensor(host, dtype=torch.int64, device=device)


# ------------------------------------------------------------------------------------------
# Scalars, host lists and host-to-device copies
# ------------------------------------------------------------------------------------------
def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32`` (the form used in error messages)."""
    return str(dtype).replace("torch.", "")


def _is_int_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_frame_counts_tensor(frame_counts: torch.Tensor) -> torch.Tensor:
    """dtype (int32/int64) and rank (1-D) of a ``frame_counts`` tensor; its values are not read."""
    if frame_counts.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"frame_counts must be an int32/int64 tensor, got {frame_counts.dtype}")
    if frame_counts.dim() != 1:
        raise ValueError(f"frame_counts must be 1-D [B], got shape {tuple(frame_counts.shape)}")
    return frame_counts


def check_int(name: str, v) -> int:
    """A Python/NumPy integer or a 0-d integer tensor (never a bool, a float or a string)."""
    if isinstance(v, torch.Tensor) and v.dim() == 0 and _is_int_dtype(v.dtype):
        return int(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} ({v!r})")
    return int(v)


def check_int_list(name: str, v, shape: str = "[B]") -> List[int]:
    """A 1-D integer tensor (any integer dtype and device: one host copy) or a flat sequence of
    ints, as a list of Python ints. Floats, bools, strings and nested lists are rejected."""
    if isinstance(v, torch.Tensor):
        if not _is_int_dtype(v.dtype):
            raise TypeError(f"{name} must hold integers, got dtype {v.dtype}")
        if v.dim() != 1:
            raise ValueError(f"{name} must be 1-D {shape}, got shape {tuple(v.shape)}")
        return [int(c) for c in v.tolist()]
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise TypeError(f"{name} must be a 1-D int tensor or a list of ints, got {type(v).__name__}")
    return [check_int(f"{name}[{i}]", c) for i, c in enumerate(v)]


def check_int_pairs(name: str, v) -> List[Tuple[int, int]]:
    """An integer ``[K, 2]`` tensor or a sequence of ``(a, b)`` int pairs, as a list of tuples."""
    if isinstance(v, torch.Tensor):
        if v.dim() != 2 or v.shape[-1] != 2:
            raise ValueError(f"{name} must be a list of (start, end) pairs or a [K, 2] tensor, got shape {tuple(v.shape)}")
        if not _is_int_dtype(v.dtype):
            raise TypeError(f"{name} must hold integer frame indices, got dtype {v.dtype}")
        return [(int(a), int(b)) for a, b in v.tolist()]
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise TypeError(f"{name} must be a list of (start, end) pairs, got {type(v).__name__}")
    out: List[Tuple[int, int]] = []
    for j, pair in enumerate(v):
        try:
            a, b = pair
        except (TypeError, ValueError):
            raise TypeError(f"{name}[{j}] must be a (start, end) pair, got {pair!r}") from None
        out.append((check_int(f"{name}[{j}][0]", a), check_int(f"{name}[{j}][1]", b)))
    return out


def check_real(name: str, v, expected: str = "a finite real number") -> float:
    """A finite Python/NumPy real number (not a bool, a string or a tensor), as a float.

    ``TypeError`` for a wrong type, ``ValueError`` for NaN/Inf; ``expected`` completes both
    messages ("{name} must be {expected}").
    """
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(v).__name__} ({v!r})")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{name} must be {expected}, got {v!r}")
    return f


def check_ratio(name: str, v) -> float:
    """A real number in (0, 1] (``TypeError`` for a wrong type, ``ValueError`` outside the range)."""
    r = check_real(name, v, "a float in (0, 1]")
    if not 0.0 < r <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {v!r}")
    return r


def host_to_device(values: Union[Sequence, torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values (a list or a CPU tensor) as a ``dtype`` tensor on ``device`` without a host
    sync: on CUDA through pinned staging memory and a ``non_blocking`` copy."""
    device = torch.device(device)
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
