"""Input checks shared by the op wrappers: clear Python errors instead of kernel failures."""
from __future__ import annotations

from typing import Iterable, Optional

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
        if frame_counts.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"frame_counts must be an int32/int64 tensor, got {frame_counts.dtype}")
        if frame_counts.dim() != 1:
            raise ValueError(f"frame_counts must be 1-D [B], got shape {tuple(frame_counts.shape)}")
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
