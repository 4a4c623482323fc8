"""Stage II wrappers: the host-side plan (``stage2_plan``) and the fused per-frame token
selection (``select_tokens``, ``torch.ops.earlytom.select_tokens``).

``stage2_plan`` turns the refined segments of every video into per-frame token counts on the host
(double precision, ``math.ceil`` and Python's half-to-even ``round``, through the reference's
``adjusted_ratio`` / ``dynamic_keep`` / ``static_windows``). ``select_tokens`` then runs one fused
op over all frames of all videos; the output size is known on the host, so the op never waits on
the device.

Shapes, dtypes and devices are checked by the compiled op (``csrc/ops/select_tokens.cpp``); the
wrapper turns the plan into the op's tensors. The values of ``frame_keep`` are checked by the CPU
op; on a GPU the op trusts them (checking there would cost a host sync), so the wrapper checks
host-side values itself (a list, or a CPU tensor) and leaves GPU tensors unread.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .. import _ext
from .. import reference as _ref
from .._validation import (
    FLOAT_DTYPES,
    check_bool,
    check_int,
    check_int_list,
    check_int_pairs,
    check_int_tensor,
    check_meta_tensor,
    check_partition,
    check_ratio,
    check_same_device,
    check_tensor,
    host_to_device,
)

__all__ = ["Stage2Plan", "stage2_plan", "select_tokens"]


class Stage2Plan(NamedTuple):
    """Per-frame Stage II counts of a batch of videos (merged frames concatenated).

    Attributes:
        frame_keep: tokens kept per merged frame (``k`` for a dynamic frame, ``n`` windows for a
            static one), all videos concatenated.
        frame_static: per merged frame, True for a static frame (interior of a refined segment of
            length >= 3).
        num_out: ``sum(frame_keep)``.
        ratios: the adjusted ratio r' of every video.
        tokens_per_video: selected tokens per video (no newline token).
    """

    frame_keep: list[int]
    frame_static: list[bool]
    num_out: int
    ratios: list[float]
    tokens_per_video: list[int]


def _check_segments(v: int, segs) -> list[tuple[int, int]]:
    """Segments of video ``v``: inclusive (start, end) pairs covering 0..T'-1 contiguously, in order."""
    name = f"segments_per_video[{v}]"
    out = check_int_pairs(name, segs)
    check_partition(name, out)
    return out


def _check_ratios(retain_ratio, B: int) -> list[float]:
    """``retain_ratio``: one real in (0, 1] for all videos (a 0-d tensor too) or one per video."""
    if isinstance(retain_ratio, torch.Tensor):
        if retain_ratio.dim() > 1:
            raise ValueError(
                f"retain_ratio must be a float or a 1-D tensor (one ratio per video), "
                f"got shape {tuple(retain_ratio.shape)}"
            )
        retain_ratio = retain_ratio.tolist()
    elif getattr(retain_ratio, "ndim", None) == 0 and hasattr(retain_ratio, "item"):
        retain_ratio = retain_ratio.item()  # a 0-d NumPy array
    if isinstance(retain_ratio, numbers.Real) and not isinstance(retain_ratio, bool):
        return [check_ratio("retain_ratio", retain_ratio)] * B
    if isinstance(retain_ratio, (str, bytes, bool)) or not hasattr(retain_ratio, "__len__"):
        raise TypeError(f"retain_ratio must be a float in (0, 1] or one float per video, got {retain_ratio!r}")
    ratios = list(retain_ratio)
    if len(ratios) != B:
        raise ValueError(f"retain_ratio must have one value per video ({B}), got {len(ratios)}")
    return [check_ratio(f"retain_ratio[{v}]", r) for v, r in enumerate(ratios)]


def stage2_plan(
    segments_per_video: Sequence,
    frames_before: Sequence[int],
    retain_ratio: float | Sequence[float],
    tokens_per_frame: int = _ref.TOKENS_PER_FRAME,
) -> Stage2Plan:
    """Per-frame token counts of Stage II, computed on the host.

    Args:
        segments_per_video: per video, the refined segments as inclusive ``(start, end)`` LOCAL
            frame indices covering its merged frames ``0..T'-1`` contiguously, in order.
        frames_before: per video, the frame count T before Stage I (ints, or a 1-D int tensor).
        retain_ratio: r in (0, 1]: one value for all videos (a float or a 0-d tensor), or one per
            video (a sequence or a 1-D tensor).
        tokens_per_frame: P (196 for LLaVA-OneVision).

    Wrong types raise ``TypeError`` (floats where ints are expected are never truncated), values
    out of range ``ValueError``, both naming the argument.

    Per video: ``r' = min(r / ((T·P - (T - T')·P) / (T·P)), 1)`` (double precision), a dynamic
    frame keeps ``k = ceil(P·r')`` tokens, a static frame ``n = max(1, round(P·r'))`` (half to even).
    """
    if isinstance(segments_per_video, (str, bytes, torch.Tensor)) or not isinstance(segments_per_video, Sequence):
        raise TypeError(
            f"segments_per_video must be a list (per video) of lists of (start, end) pairs, "
            f"got {type(segments_per_video).__name__}"
        )
    frames_before = check_int_list("frames_before", frames_before)
    B = len(segments_per_video)
    if B == 0:
        raise ValueError("segments_per_video must hold at least one video, got an empty list")
    if len(frames_before) != B:
        raise ValueError(f"frames_before must have one entry per video ({B}), got {len(frames_before)}")
    P = check_int("tokens_per_frame", tokens_per_frame)
    if not 1 <= P < 2**31:  # a frame's positions are int32 in the op
        raise ValueError(f"tokens_per_frame must be in [1, 2**31), got {P}")
    ratios_in = _check_ratios(retain_ratio, B)

    frame_keep: list[int] = []
    frame_static: list[bool] = []
    ratios: list[float] = []
    tokens_per_video: list[int] = []
    for v in range(B):
        segs = _check_segments(v, segments_per_video[v])
        T = frames_before[v]
        T_merged = segs[-1][1] + 1
        if T < T_merged:
            raise ValueError(
                f"frames_before[{v}] must be >= the merged frame count T' = {T_merged} "
                f"(segments cover 0..{T_merged - 1}), got {T}"
            )
        if T >= 2**63:  # beyond int64 frame counts; T'/T would underflow the double formula
            raise ValueError(f"frames_before[{v}] must be < 2**63, got {T}")
        r_adj = _ref.adjusted_ratio(ratios_in[v], T, T_merged, P)
        k = _ref.dynamic_keep(r_adj, P)
        n = _ref.static_windows(r_adj, P)
        if not (1 <= k <= P and 1 <= n <= P):  # guaranteed by 0 < r' <= 1; kept as a guard
            raise ValueError(f"video {v}: token counts out of range (k = {k}, n = {n}, P = {P}, r' = {r_adj})")
        count = 0
        for s, e in segs:
            length = e - s + 1
            for f in range(s, e + 1):
                static = length >= 3 and s < f < e
                frame_static.append(static)
                frame_keep.append(n if static else k)
                count += n if static else k
        ratios.append(r_adj)
        tokens_per_video.append(count)
    return Stage2Plan(frame_keep, frame_static, sum(tokens_per_video), ratios, tokens_per_video)


def _plan_tensors(plan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, list[int] | None]:
    """``(frame_keep int64, frame_static bool, num_out, host frame_keep or None)`` for the op.

    Lists and CPU tensors are read on the host and copied to ``device`` without waiting on the
    stream; tensors on a GPU are passed on (dtype converted on their device), never read here.
    """
    for field in ("frame_keep", "frame_static", "num_out"):
        if not hasattr(plan, field):
            raise TypeError(f"plan must be a Stage2Plan (from stage2_plan), got {type(plan).__name__} without .{field}")
    keep, static = plan.frame_keep, plan.frame_static
    host_keep = None
    if isinstance(keep, torch.Tensor) and keep.device.type != "cpu":
        keep = check_int_tensor("plan.frame_keep", keep).to(torch.int64)
    else:
        host_keep = check_int_list("plan.frame_keep", keep, shape="[N']", int64=True)
        keep = host_to_device(host_keep, torch.int64, device)
    if isinstance(static, torch.Tensor) and static.device.type != "cpu":
        if static.dtype != torch.bool:
            raise TypeError(f"plan.frame_static must hold bools, got dtype {static.dtype}")
    else:
        static = host_to_device(_check_bools("plan.frame_static", static), torch.bool, device)
    num_out = check_int("plan.num_out", plan.num_out)
    if not -(2**63) <= num_out < 2**63:  # the op's int is int64; the op itself names negative counts
        raise ValueError(f"select_tokens: num_out must equal sum(frame_keep), got {num_out} (beyond int64)")
    return keep, static, num_out, host_keep


def _check_keep_values(keep: list[int], P: int, num_out: int) -> None:
    """The CPU op's checks of frame_keep's values, for the GPU op, which cannot read them for free."""
    for f, k in enumerate(keep):
        if not 1 <= k <= P:
            raise ValueError(f"select_tokens: frame_keep[{f}] must be in [1, {P}] (P positions per frame), got {k}")
    if num_out != sum(keep):
        raise ValueError(f"select_tokens: num_out must equal sum(frame_keep) = {sum(keep)}, got {num_out}")


def _check_bools(name: str, v) -> list[bool]:
    """A 1-D bool tensor or a sequence of bools (Python, NumPy or 0-d tensor); ints are rejected."""
    if isinstance(v, torch.Tensor):
        if v.dtype != torch.bool:
            raise TypeError(f"{name} must hold bools, got dtype {v.dtype}")
        if v.dim() != 1:
            raise ValueError(f"{name} must be 1-D [N'], got shape {tuple(v.shape)}")
        return v.tolist()
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise TypeError(f"{name} must be a 1-D bool tensor or a list of bools, got {type(v).__name__}")
    out = []
    for i, b in enumerate(v):
        if isinstance(b, bool):
            out.append(b)
        elif isinstance(b, torch.Tensor) and b.dim() == 0 and b.dtype == torch.bool:
            out.append(bool(b))
        elif type(b).__module__ == "numpy" and getattr(getattr(b, "dtype", None), "kind", None) == "b":
            out.append(bool(b))
        else:
            raise TypeError(f"{name}[{i}] must be a bool, got {type(b).__name__} ({b!r})")
    return out


def select_tokens(
    feats: torch.Tensor, scores: torch.Tensor, plan: Stage2Plan, *, check_nan: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage II selection over all merged frames of all videos, one fused op.

    Args:
        feats: ``[N', P, C]`` pooled features (float32/float16/bfloat16, any strides).
        scores: ``[N', P]`` token scores (float32; float16/bfloat16 are upcast).
        plan: ``stage2_plan(...)`` for these frames (``len(plan.frame_keep) == N'``); its
            ``frame_keep`` must hold ints in ``[1, P]`` summing to ``num_out`` and
            ``frame_static`` bools (lists, NumPy arrays or 1-D tensors). Host values are checked;
            a ``frame_keep`` tensor already on the GPU is not (that would cost a host sync): the
            kernels stay in bounds whatever it holds, but the result is then unspecified.
        check_nan: reject NaN scores with a ValueError. Default: on CPU tensors only, because on
            a GPU the check costs a host sync (the kernel itself ranks NaN above every number,
            as ``torch.sort`` does).

    Returns:
        ``tokens [num_out, C]`` (dtype of feats, bit-exact copies) and ``index [num_out, 2]`` int64
        (global merged-frame row, position): frames in order, each frame's tokens in raster order
        (dynamic frames: the k best scores, ties to the lowest position; static frames: the
        top-1 of each of the n windows).
    """
    _ext.require()
    check_tensor("feats", feats)
    check_tensor("scores", scores, dtypes=FLOAT_DTYPES)  # the op takes float32 only: 16-bit upcast here
    check_bool("check_nan", check_nan, allow_none=True)
    if scores.dtype != torch.float32:
        scores = scores.float()
    frame_keep, frame_static, num_out, host_keep = _plan_tensors(plan, feats.device)
    if check_nan is None:
        check_nan = scores.device.type == "cpu"
    if check_nan and scores.numel() and bool(torch.isnan(scores).any()):
        raise ValueError("scores contains NaN values")
    if host_keep is not None and feats.device.type != "cpu" and len(host_keep) == feats.shape[0]:
        # Host values, checked before the GPU op allocates num_out rows (a wrong num_out must give
        # this ValueError, not an allocation failure); the CPU op checks them itself. A length
        # mismatch is left to the op's shape message.
        _check_keep_values(host_keep, feats.shape[1], num_out)
    with torch.no_grad():  # constants, as the merge ops return (no autograd formula)
        return torch.ops.earlytom.select_tokens(feats, scores, frame_keep, frame_static, num_out)


if _ext.available():

    @torch.library.register_fake("earlytom::select_tokens")
    def _select_tokens_fake(feats, scores, frame_keep, frame_static, num_out):
        op = "select_tokens"
        check_meta_tensor(op, "feats", feats, dtypes=FLOAT_DTYPES, dim=3)
        check_meta_tensor(op, "scores", scores, dtypes=(torch.float32,), dim=2)
        check_meta_tensor(op, "frame_keep", frame_keep, dtypes=(torch.int64,), dim=1)
        check_meta_tensor(op, "frame_static", frame_static, dtypes=(torch.bool,), dim=1)
        N, P = feats.shape[0], feats.shape[1]
        torch._check_value(
            scores.shape[0] == N and scores.shape[1] == P,
            lambda: f"{op}: scores must have shape [{N}, {P}] (feats' first two dims), got {tuple(scores.shape)}",
        )
        for name, t in (("frame_keep", frame_keep), ("frame_static", frame_static)):
            torch._check_value(
                t.shape[0] == N,
                lambda name=name, t=t: (
                    f"{op}: {name} must have shape [{N}] (one entry per frame of feats), got {tuple(t.shape)}"
                ),
            )
        torch._check_value(num_out >= 0, lambda: f"{op}: num_out must be >= 0, got {num_out}")
        check_same_device(op, "feats", feats, scores=scores, frame_keep=frame_keep, frame_static=frame_static)
        tokens = feats.new_empty((num_out, feats.shape[2]))
        index = feats.new_empty((num_out, 2), dtype=torch.int64)
        return tokens, index
