"""Stage I wrappers: ``merge_frames``, ``apply_merge_plan``, ``segment_frames`` /
``segment_frames_deferred`` (fused ops ``torch.ops.earlytom.*``) and ``segments_per_video`` (host
lists).

Semantics: docs/algorithm.md "Stage I", applied to every video of the batch independently;
contract: docs/design.md "merge_frames". The frames of all videos are concatenated along dim 0
(``x [N, S, D]``) and ``frame_counts`` gives the frames per video.

Host syncs: ``merge_frames`` and ``segment_frames`` wait on the device once (to learn the number
of merged frames / segments); ``segment_frames_deferred`` never does (its outputs are read later,
from a host copy, by :func:`resolve_deferred_segments`). The op checks ``frame_counts`` itself: on
the host on a CPU, on the device within that same sync on a GPU (so passing the previous call's
``MergeResult.frame_counts`` costs nothing extra). NaN/Inf in ``x`` are detected inside the
similarity pass, also without an extra sync. ``apply_merge_plan`` never syncs on a GPU (an
out-of-range plan index gives a NaN row there; on the CPU it raises).

Shapes, dtypes and devices are checked by the compiled ops (``csrc/ops/merge_frames.cpp``); the
wrappers check what the ops cannot name (``t``, ``extras``) and coerce ``frame_counts``.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import torch

from .. import _ext
from .._validation import (
    FLOAT_DTYPES,
    check_bool,
    check_finite,
    check_int_list,
    check_int_pairs,
    check_int_tensor,
    check_meta_tensor,
    check_partition,
    check_same_device,
    check_tensor,
    host_to_device,
    to_host,
)
from ..config import EarlyTomConfig

__all__ = [
    "MergeResult",
    "DeferredSegments",
    "merge_frames",
    "apply_merge_plan",
    "segment_frames",
    "segment_frames_deferred",
    "resolve_deferred_segments",
    "segments_per_video",
]

#: dtypes accepted by ``apply_merge_plan`` and for ``extras`` (fp32 math; fp64 math for fp64).
APPLY_DTYPES = FLOAT_DTYPES + (torch.float64,)

Extras = Union[None, torch.Tensor, tuple[torch.Tensor, ...], list[torch.Tensor]]


class MergeResult(NamedTuple):
    """Output of :func:`merge_frames`.

    Attributes:
        x: merged frames ``[N', S, D]`` (dtype of the input).
        extras: the extras merged with the same plan, in the structure they were given
            (``None``, a tensor, or a tuple/list of tensors).
        frame_counts: merged frames per video, int64 ``[B]`` on ``x.device``.
        segments: the Stage-I segmentation before merging, int64 ``[K, 2]``, inclusive
            ``(start, end)`` global input-frame indices.
        segment_counts: segments per video, int64 ``[B]``.
        plan_src: int64 ``[N', 2]``, global input-frame indices of the two frames merged into
            each output frame (equal for a frame passed unchanged).
        plan_weight: float32 ``[N']``: output ``o = w*x[src0] + (1-w)*x[src1]``.
    """

    x: torch.Tensor
    extras: Extras
    frame_counts: torch.Tensor
    segments: torch.Tensor
    segment_counts: torch.Tensor
    plan_src: torch.Tensor
    plan_weight: torch.Tensor


# ------------------------------------------------------------------------------------------
# Fake (meta) implementations: the output sizes N' and K are data dependent.
# ------------------------------------------------------------------------------------------
def _check_frames_fake(op: str, x, frame_counts) -> None:
    check_meta_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=3)
    check_meta_tensor(op, "frame_counts", frame_counts, dtypes=(torch.int64,), dim=1)
    check_same_device(op, "x", x, frame_counts=frame_counts)


def _merge_frames_fake(x, frame_counts, tau, max_window, ema, keep_last_interior):
    _check_frames_fake("merge_frames", x, frame_counts)
    ctx = torch.library.get_ctx()
    n_out = ctx.new_dynamic_size()
    k = ctx.new_dynamic_size()
    B = frame_counts.shape[0]
    out = x.new_empty((n_out, x.shape[1], x.shape[2]))
    out_counts = frame_counts.new_empty((B,), dtype=torch.int64)
    plan_src = frame_counts.new_empty((n_out, 2), dtype=torch.int64)
    plan_weight = x.new_empty((n_out,), dtype=torch.float32)
    segments = frame_counts.new_empty((k, 2), dtype=torch.int64)
    segment_counts = frame_counts.new_empty((B,), dtype=torch.int64)
    return out, out_counts, plan_src, plan_weight, segments, segment_counts


def _segment_frames_fake(x, frame_counts, tau, max_window, ema):
    _check_frames_fake("segment_frames", x, frame_counts)
    ctx = torch.library.get_ctx()
    k = ctx.new_dynamic_size()
    B = frame_counts.shape[0]
    return frame_counts.new_empty((k, 2), dtype=torch.int64), frame_counts.new_empty((B,), dtype=torch.int64)


def _segment_frames_deferred_fake(x, frame_counts, tau, max_window, ema):
    _check_frames_fake("segment_frames", x, frame_counts)
    i64 = dict(dtype=torch.int64)
    return (
        frame_counts.new_empty((x.shape[0], 2), **i64),
        frame_counts.new_empty((frame_counts.shape[0],), **i64),
        frame_counts.new_empty((2,), **i64),
    )


def _apply_merge_plan_fake(x, plan_src, plan_weight):
    op = "apply_merge_plan"
    check_meta_tensor(op, "x", x, dtypes=FLOAT_DTYPES + (torch.float64,))
    torch._check_value(x.dim() >= 1, lambda: f"{op}: x must have a leading frame dimension, got a 0-d tensor")
    check_meta_tensor(op, "plan_src", plan_src, dtypes=(torch.int64,), dim=2)
    torch._check_value(plan_src.shape[1] == 2, lambda: f"{op}: plan_src must have shape [N', 2], got {plan_src.shape}")
    check_meta_tensor(op, "plan_weight", plan_weight, dtypes=(torch.float32,), dim=1)
    torch._check_value(
        plan_weight.shape[0] == plan_src.shape[0],
        lambda: f"{op}: plan_weight must have one weight per row of plan_src, got shape {tuple(plan_weight.shape)}",
    )
    check_same_device(op, "x", x, plan_src=plan_src, plan_weight=plan_weight)
    return x.new_empty((plan_src.shape[0], *x.shape[1:]))


if _ext.available():  # the schemas live in the compiled library
    torch.library.register_fake("earlytom::merge_frames")(_merge_frames_fake)
    torch.library.register_fake("earlytom::segment_frames")(_segment_frames_fake)
    torch.library.register_fake("earlytom::segment_frames_deferred")(_segment_frames_deferred_fake)
    torch.library.register_fake("earlytom::apply_merge_plan")(_apply_merge_plan_fake)


# ------------------------------------------------------------------------------------------
# Argument coercion
# ------------------------------------------------------------------------------------------
def _check_cfg(cfg) -> EarlyTomConfig:
    if not isinstance(cfg, EarlyTomConfig):
        raise TypeError(f"cfg must be an earlytom_ext.EarlyTomConfig, got {type(cfg).__name__}")
    return cfg  # validated when it was built (frozen)


def _counts(frame_counts, device: torch.device) -> torch.Tensor:
    """``frame_counts`` as the op's int64 tensor; its values are checked by the op.

    A list of ints is copied to ``device`` (without waiting on the stream); a tensor is passed as
    it is (int32 widened on its device), so a GPU tensor is never read on the host here.
    """
    if isinstance(frame_counts, torch.Tensor):
        if frame_counts.dtype == torch.int32:
            return frame_counts.long()
        if frame_counts.dtype != torch.int64:
            raise TypeError(f"frame_counts must be an int32/int64 tensor, got {frame_counts.dtype}")
        return frame_counts
    # A list: every entry an int (a float, bool or nested list is rejected, never truncated).
    return host_to_device(check_int_list("frame_counts", frame_counts, int64=True), torch.int64, device)


def _check_frames_tensor(name: str, t, n_frames: int, device: torch.device) -> torch.Tensor:
    """A tensor merged with the plan of ``n_frames`` frames: named here, since the op calls it x."""
    check_tensor(name, t, dtypes=APPLY_DTYPES, device=device)
    if t.dim() < 1 or t.shape[0] != n_frames:
        raise ValueError(
            f"{name} must have leading dim N = {n_frames} (one entry per frame of x), got shape {tuple(t.shape)}"
        )
    return t


def _merge_extras(extras, n_frames: int, device: torch.device, plan_src: torch.Tensor, plan_weight: torch.Tensor):
    """``extras`` (None, a tensor or a tuple/list of tensors) merged with the plan, same structure."""
    if extras is None:
        return None
    if isinstance(extras, torch.Tensor):
        return _apply(_check_frames_tensor("extras", extras, n_frames, device), plan_src, plan_weight)
    if not isinstance(extras, (tuple, list)):
        raise TypeError(f"extras must be None, a tensor or a tuple/list of tensors, got {type(extras).__name__}")
    for i, t in enumerate(extras):
        _check_frames_tensor(f"extras[{i}]", t, n_frames, device)
    merged = [_apply(t, plan_src, plan_weight) for t in extras]
    return type(extras)(*merged) if hasattr(extras, "_fields") else type(extras)(merged)  # a NamedTuple too


def _apply(t: torch.Tensor, plan_src: torch.Tensor, plan_weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.earlytom.apply_merge_plan(t, plan_src, plan_weight)


# ------------------------------------------------------------------------------------------
# Public wrappers
# ------------------------------------------------------------------------------------------
def merge_frames(x: torch.Tensor, frame_counts, cfg: EarlyTomConfig, extras: Extras = None) -> MergeResult:
    """Stage I of one prune layer on a batch of videos (each video independently).

    Args:
        x: ``[N, S, D]`` float32/float16/bfloat16, the frames of all videos concatenated (any
            strides).
        frame_counts: frames per video, int32/int64 tensor or list of ints ``[B]`` summing to N,
            every count >= 1 (floats and bools are rejected, never truncated).
        cfg: :class:`earlytom_ext.EarlyTomConfig` (uses ``tau``, ``max_window``, ``ema``,
            ``keep_last_interior``).
        extras: ``None``, a float tensor with leading dim N (any trailing shape), or a tuple/list
            of such tensors: merged with the same plan (e.g. per-token scores).

    Returns:
        :class:`MergeResult`. Equal to ``reference.merge_frames_batched`` (similarities in fp32,
        merges in fp32 math).

    The token norms are computed in fp32: every token of ``x`` must have a squared norm below the
    fp32 maximum (``|x|`` below about ``1.8e19 / sqrt(D)``; any activation of a working model).
    Larger finite values give NaN similarities (no segment cut, no merge; the reference gives 0).
    """
    _ext.require()
    cfg = _check_cfg(cfg)
    check_tensor("x", x)
    counts = _counts(frame_counts, x.device)
    with torch.no_grad():
        out, out_counts, plan_src, plan_weight, segments, segment_counts = torch.ops.earlytom.merge_frames(
            x, counts, float(cfg.tau), int(cfg.max_window), float(cfg.ema), bool(cfg.keep_last_interior)
        )
        # extras are checked once x is known good (their leading dim must be x's N).
        merged = _merge_extras(extras, x.shape[0], x.device, plan_src, plan_weight)
    return MergeResult(out, merged, out_counts, segments, segment_counts, plan_src, plan_weight)


def apply_merge_plan(
    t: torch.Tensor, plan_src: torch.Tensor, plan_weight: torch.Tensor, *, check_weights: bool = True
) -> torch.Tensor:
    """Merge any per-frame tensor ``t`` (leading dim N, float dtype) with a Stage-I plan.

    Output row ``o`` is ``w*t[src0] + (1-w)*t[src1]`` with ``(src0, src1) = plan_src[o]`` and
    ``w = plan_weight[o]``, computed in float32 (float64 for float64 tensors), in ``t``'s dtype.
    On the CPU, out-of-range indices and (with ``check_weights``, the default) NaN/Inf weights
    raise ``ValueError``; on a GPU they are not checked (that would cost a host sync): an
    out-of-range index gives a NaN row. ``check_weights=False`` skips the weights' host read, so
    that ``torch.compile(fullgraph=True)`` can trace the call (a plan from :func:`merge_frames` has
    finite weights).
    """
    _ext.require()
    check_bool("check_weights", check_weights)
    check_tensor("t", t, dtypes=APPLY_DTYPES)  # the op would call it x
    if t.dim() < 1:
        raise ValueError("t must have a leading frame dimension, got a 0-d tensor")
    check_tensor("plan_src", plan_src)
    check_tensor("plan_weight", plan_weight)
    with torch.no_grad():
        out = _apply(t, plan_src, plan_weight)  # checks the plan (and its indices on the CPU)
    if check_weights and t.device.type == "cpu":  # free on the CPU; a GPU would have to sync
        check_finite("plan_weight", plan_weight)
    return out


def segment_frames(x: torch.Tensor, frame_counts, cfg: EarlyTomConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """EMA segmentation (Stage I step 1) of every video: ``(segments [K, 2], segment_counts [B])``,
    int64 on ``x.device``, inclusive global frame indices."""
    _ext.require()
    cfg = _check_cfg(cfg)
    check_tensor("x", x)
    counts = _counts(frame_counts, x.device)
    with torch.no_grad():
        return torch.ops.earlytom.segment_frames(x, counts, float(cfg.tau), int(cfg.max_window), float(cfg.ema))


class DeferredSegments(NamedTuple):
    """Output of :func:`segment_frames_deferred` (device tensors, nothing read yet).

    Attributes:
        segments: int64 ``[N, 2]``; the first ``K`` rows are the segments (as
            :func:`segment_frames` returns them), the rest zeros.
        segment_counts: segments per video, int64 ``[B]``.
        status: int64 ``[2]``: ``K`` and the error flags found on the device (1, 2: bad
            ``frame_counts``; 4: NaN/Inf in ``x``). :func:`resolve_deferred_segments` reads them.
    """

    segments: torch.Tensor
    segment_counts: torch.Tensor
    status: torch.Tensor


#: status flags of the device walk (csrc/kernels/merge_frames.h).
_FLAG_COUNTS_BAD = 1 | 2
_FLAG_NON_FINITE = 4


def segment_frames_deferred(x: torch.Tensor, frame_counts, cfg: EarlyTomConfig) -> DeferredSegments:
    """:func:`segment_frames` without the host sync: the segmentation stays on the device until
    the caller copies it to the host (e.g. asynchronously, while later work runs) and passes the
    copy to :func:`resolve_deferred_segments`. Bad ``frame_counts`` or NaN/Inf in ``x`` raise
    here on the CPU; on a GPU they are flagged in ``status`` and raised by the resolve step."""
    _ext.require()
    cfg = _check_cfg(cfg)
    check_tensor("x", x)
    counts = _counts(frame_counts, x.device)
    with torch.no_grad():
        return DeferredSegments(
            *torch.ops.earlytom.segment_frames_deferred(x, counts, float(cfg.tau), int(cfg.max_window), float(cfg.ema))
        )


def resolve_deferred_segments(
    segments: torch.Tensor, segment_counts: torch.Tensor, status: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(segments [K, 2], segment_counts)`` of a :func:`segment_frames_deferred` result (reads
    ``status``: give host copies to avoid a sync). Raises ``ValueError`` naming what the device
    flagged (bad ``frame_counts``, NaN/Inf in ``x``)."""
    check_tensor("segments", segments)
    check_int_tensor("segments", segments)
    if segments.dim() != 2 or segments.shape[1] != 2:
        raise ValueError(f"segments must be [K, 2] (start, end) pairs, got shape {tuple(segments.shape)}")
    check_tensor("status", status)
    if status.numel() != 2:
        raise ValueError(f"status must hold 2 entries (K, flags), got shape {tuple(status.shape)}")
    check_int_tensor("status", status)
    k, flags = (int(v) for v in status.reshape(-1).tolist())
    known = _FLAG_COUNTS_BAD | _FLAG_NON_FINITE
    if not flags & ~known:
        if flags & _FLAG_COUNTS_BAD:
            raise ValueError("segment_frames: frame_counts are not valid (each >= 1, summing to the N of x)")
        if flags & _FLAG_NON_FINITE:
            raise ValueError("segment_frames: x contains NaN or Inf values")
    if flags & ~known or not 0 <= k <= segments.shape[0]:
        raise ValueError(
            f"status must be (K, flags) as segment_frames_deferred returns it (0 <= K <= {segments.shape[0]}, "
            f"flags within {known}), got ({k}, {flags})"
        )
    check_tensor("segment_counts", segment_counts)
    check_int_tensor("segment_counts", segment_counts)
    if segment_counts.dim() != 1:
        raise ValueError(f"segment_counts must be 1-D [B], got shape {tuple(segment_counts.shape)}")
    if segment_counts.device.type == "cpu" and int(segment_counts.sum()) != k:  # free on a host copy
        raise ValueError(f"segment_counts must sum to K = {k} (status[0]), got {int(segment_counts.sum())}")
    return segments[:k], segment_counts


def segments_per_video(segments: torch.Tensor, segment_counts, frame_counts) -> list[list[tuple[int, int]]]:
    """Split ``segments [K, 2]`` (global indices) into per-video lists of LOCAL ``(start, end)``.

    ``segments`` is an integer ``[K, 2]`` tensor or a list of ``(start, end)`` int pairs;
    ``segment_counts`` and ``frame_counts`` are ``[B]`` (int tensors or lists of ints), every
    count >= 1. One host copy (of the GPU tensors among the three, together).
    """
    segments, segment_counts, frame_counts = to_host(segments, segment_counts, frame_counts)
    segs = check_int_pairs("segments", segments)
    sc = check_int_list("segment_counts", segment_counts)
    fc = check_int_list("frame_counts", frame_counts)
    if any(c < 1 for c in fc):
        raise ValueError(f"frame_counts must all be >= 1 (no empty videos), got {fc}")
    if any(c < 1 for c in sc):
        raise ValueError(f"segment_counts must all be >= 1 (every video has a segment), got {sc}")
    if len(sc) != len(fc):
        raise ValueError(
            f"segment_counts and frame_counts must both have one entry per video, got {len(sc)} and {len(fc)}"
        )
    if sum(sc) != len(segs):
        raise ValueError(f"segment_counts must sum to the number of segments {len(segs)}, got {sum(sc)}")
    out: list[list[tuple[int, int]]] = []
    k = offset = 0
    for v, (n, T) in enumerate(zip(sc, fc)):
        video = []
        for s, e in segs[k : k + n]:
            s, e = s - offset, e - offset
            if not (0 <= s <= e < T):
                raise ValueError(
                    f"segment ({s + offset}, {e + offset}) lies outside its video's frames [{offset}, {offset + T})"
                )
            video.append((s, e))
        check_partition(f"the segments of video {v} (local: {video})", video, T)
        out.append(video)
        k += n
        offset += T
    return out
