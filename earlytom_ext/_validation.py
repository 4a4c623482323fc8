"""Argument checks and coercions shared by the op wrappers.

The compiled ops check the shapes, dtypes and devices of the tensors they receive themselves
(``csrc/ops/<op>.cpp``, ValueError/TypeError naming the argument). The wrappers add only what the
ops cannot say: that an argument is not a tensor at all, lists/configs turned into tensors (ints
never truncated), and names the op does not know (``t``, ``extras[i]``, ``plan.frame_keep``).
On a GPU none of these read device values on the host, except where a docstring says so.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import torch

from .config import finite_number

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str, t, *, dtypes: Iterable[torch.dtype] | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """That ``t`` is a tensor (the op's dispatcher would only say it is not), and optionally its
    dtype and device, for arguments the op does not see under this name."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of the other inputs), got {t.device}")
    return t


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """The compiled ops' device check, for the fake (meta) kernels: a device mix that involves a
    meta tensor is dispatched to the fake kernel, which must reject it as the op would."""
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def check_meta_tensor(
    op: str, name: str, t: torch.Tensor, *, dtypes: tuple[torch.dtype, ...] | None = None, dim: int | None = None
) -> None:
    """The compiled ops' dtype and rank checks, for the fake (meta) kernels: under torch.compile or on
    meta tensors they run instead of the op and must reject what it rejects, with its error types."""
    if dtypes is not None and t.dtype not in dtypes:
        if len(dtypes) == 1:
            raise TypeError(f"{op}: {name} must have dtype {_dtype_name(dtypes[0])}, got {_dtype_name(t.dtype)}")
        allowed = ", ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({allowed}), got {_dtype_name(t.dtype)}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor on ``t``'s device: ``t`` holds no NaN/Inf (``True`` when empty). One fused
    min/max reduction, which propagates NaN and sees +-Inf at the ends, without the boolean copy of
    ``isfinite(t).all()`` (an order of magnitude faster on a CPU)."""
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return torch.ones((), dtype=torch.bool, device=t.device)
    if t.is_complex():
        return torch.isfinite(t).all()
    lo, hi = torch.aminmax(t)
    return lo.isfinite() & hi.isfinite()


def check_finite(name: str, t: torch.Tensor) -> None:
    """Reject NaN/Inf (one reduction; a host sync on CUDA)."""
    if not bool(all_finite(t)):
        raise ValueError(f"{name} contains NaN or Inf values")


# ------------------------------------------------------------------------------------------
# Scalars, host lists and host-to-device copies
# ------------------------------------------------------------------------------------------
def _is_int_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_int(name: str, v) -> int:
    """A Python/NumPy integer or a 0-d integer tensor (never a bool, a float or a string); a 0-d
    tensor on a GPU is read on the host (one sync)."""
    if isinstance(v, torch.Tensor) and v.dim() == 0 and _is_int_dtype(v.dtype):
        return int(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} ({v!r})")
    return int(v)


def check_int_tensor(name: str, v: torch.Tensor) -> torch.Tensor:
    """An integer tensor (any integer dtype; its values are not read)."""
    if not _is_int_dtype(v.dtype):
        raise TypeError(f"{name} must hold integers, got dtype {v.dtype}")
    return v


def check_int_list(name: str, v, shape: str = "[B]", int64: bool = False) -> list[int]:
    """A 1-D integer tensor (any integer dtype; on a GPU this is a host copy) or a flat sequence of
    ints, as a list of Python ints. Floats, bools, strings and nested lists are rejected; with
    ``int64`` every value must fit in int64 (it is headed for an int64 tensor)."""
    if isinstance(v, torch.Tensor):
        check_int_tensor(name, v)
        if v.dim() != 1:
            raise ValueError(f"{name} must be 1-D {shape}, got shape {tuple(v.shape)}")
        return [int(c) for c in v.tolist()]
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise TypeError(f"{name} must be a 1-D int tensor or a list of ints, got {type(v).__name__}")
    out = [check_int(f"{name}[{i}]", c) for i, c in enumerate(v)]
    if int64:
        for i, c in enumerate(out):
            if not -(2**63) <= c < 2**63:
                raise ValueError(f"{name}[{i}] must fit in int64, got {c}")
    return out


def check_int_pairs(name: str, v) -> list[tuple[int, int]]:
    """An integer ``[K, 2]`` tensor or a sequence of ``(a, b)`` int pairs, as a list of tuples."""
    if isinstance(v, torch.Tensor):
        if v.dim() != 2 or v.shape[-1] != 2:
            raise ValueError(
                f"{name} must be a list of (start, end) pairs or a [K, 2] tensor, got shape {tuple(v.shape)}"
            )
        if not _is_int_dtype(v.dtype):
            raise TypeError(f"{name} must hold integer frame indices, got dtype {v.dtype}")
        return [(int(a), int(b)) for a, b in v.tolist()]
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise TypeError(f"{name} must be a list of (start, end) pairs, got {type(v).__name__}")
    out: list[tuple[int, int]] = []
    for j, pair in enumerate(v):
        try:
            a, b = pair
        except (TypeError, ValueError):
            raise TypeError(f"{name}[{j}] must be a (start, end) pair, got {pair!r}") from None
        out.append((check_int(f"{name}[{j}][0]", a), check_int(f"{name}[{j}][1]", b)))
    return out


def check_partition(name: str, segs: Sequence[tuple[int, int]], frames: int | None = None) -> None:
    """Inclusive ``(start, end)`` segments that cover frames ``0..frames-1`` (``0..`` the last end
    when ``frames`` is None) in order, without gaps or overlaps: a segmentation of one video."""
    if not segs:
        raise ValueError(f"{name} must hold at least one segment (every video has >= 1 frame), got none")
    upto = "T-1" if frames is None else str(frames - 1)
    expected = 0
    for j, (s, e) in enumerate(segs):
        if s != expected:
            raise ValueError(
                f"{name} must cover the frames 0..{upto} in order without gaps or overlaps: segment {j} "
                f"should start at frame {expected}, got ({s}, {e})"
            )
        if e < s:
            raise ValueError(f"{name}[{j}] must satisfy start <= end, got ({s}, {e})")
        expected = e + 1
    if frames is not None and expected != frames:
        raise ValueError(
            f"{name} must cover the frames 0..{upto} in order without gaps or overlaps: the last segment "
            f"ends at frame {expected - 1}"
        )


def check_bool(name: str, v, allow_none: bool = False) -> None:
    """A flag: ``True`` / ``False`` (or ``None`` where it means "the default")."""
    if not (isinstance(v, bool) or (allow_none and v is None)):
        raise TypeError(f"{name} must be a bool{' or None' if allow_none else ''}, got {v!r}")


def check_real(name: str, v, expected: str = "a finite real number") -> float:
    """A finite Python/NumPy real number (not a bool, a string or a tensor), as a float.

    ``TypeError`` for a wrong type, ``ValueError`` for NaN/Inf; ``expected`` completes both
    messages ("{name} must be {expected}").
    """
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(v).__name__} ({v!r})")
    if not finite_number(v):  # NaN, Inf, or an int beyond the float range
        raise ValueError(f"{name} must be {expected}, got {v!r}")
    return float(v)


def check_ratio(name: str, v) -> float:
    """A real number in (0, 1] (``TypeError`` for a wrong type, ``ValueError`` outside the range)."""
    r = check_real(name, v, "a float in (0, 1]")
    if not 0.0 < r <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {v!r}")
    return r


def to_host(*values):
    """``values`` with their integer tensors that live on a GPU copied to the host, all in one
    copy (one sync) when they share a device; other values are returned as they are."""
    on_gpu = [
        i
        for i, v in enumerate(values)
        if isinstance(v, torch.Tensor) and v.device.type != "cpu" and _is_int_dtype(v.dtype)
    ]
    if not on_gpu:
        return values
    out = list(values)
    if len({values[i].device for i in on_gpu}) > 1:  # no single copy across devices
        for i in on_gpu:
            out[i] = values[i].cpu()
        return tuple(out)
    flat = torch.cat([values[i].reshape(-1).to(torch.int64) for i in on_gpu]).cpu()
    offset = 0
    for i in on_gpu:
        n = values[i].numel()
        out[i] = flat[offset : offset + n].view(values[i].shape)
        offset += n
    return tuple(out)


def host_to_device(values: Sequence | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values (a list or a CPU tensor) as a ``dtype`` tensor on ``device`` without a host
    sync: on CUDA through pinned staging memory and a ``non_blocking`` copy."""
    device = torch.device(device)
    # device="cpu": not the caller's torch.set_default_device / `with torch.device(...)`.
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype, device="cpu")
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
