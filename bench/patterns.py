"""Forced ("paper-like") merge patterns, installed through the handle's public forcing seam.

With random weights the encoder's frame similarities are not those of a trained SigLIP on real
video, so the natural segmentation (and with it every frame count) is arbitrary. The forced
patterns replace the *decisions* of Stage I by a fixed rule while the real ops still run:

* segments: windows of ``max_window - 1`` consecutive frames (the longest segment the EMA walk
  allows: what a strongly redundant video gives when the similarity never drops below tau);
* ``forced-merge``: inside each window the published fine-merge walk takes every merge it may
  (the first interior pair of a 5-frame window is averaged, w = 0.5; the last interior frame
  follows ``keep_last_interior``), so with the paper's max_window = 6 a 5-frame window becomes
  3 frames and 32 frames go 32 -> 20 -> 12 -> 8 over three prune layers;
* ``forced-nomerge``: no interior merge (5 -> 4 frames with the published walk: 32 -> 26 -> 21 -> 17);
* ``natural``: the ops' own decisions.

The refined segmentation at the last prune layer uses the same windows on the merged frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch

from earlytom_ext.tiny_model import TOKENS_PER_FRAME

FORCED_PATTERNS = ("forced-merge", "forced-nomerge")
PATTERNS = FORCED_PATTERNS + ("natural",)

__all__ = [
    "FORCED_PATTERNS",
    "PATTERNS",
    "forced_segments",
    "forced_plan",
    "forced_counts",
    "stage2_token_count",
    "forced_video_tokens",
    "ForcedPlans",
    "install_pattern",
    "apply_earlytom",
]


# ---------------------------------------------------------------------------------------------
# The patterns (host side, no model)
# ---------------------------------------------------------------------------------------------
def forced_segments(num_frames: int, window: int) -> list[tuple[int, int]]:
    """Consecutive inclusive windows of ``window`` frames over ``num_frames`` (the last shorter)."""
    window = max(1, int(window))
    return [(s, min(s + window, num_frames) - 1) for s in range(0, num_frames, window)]


def _forced_interior(first: int, L: int, merge: bool, keep_last_interior: bool) -> list[tuple]:
    """The published fine-merge walk over ``L`` interior frames with every decision forced."""
    if L == 1:
        return [(first, first, 1.0)]
    plan, j = [], 0
    while j < L - 1:
        a, b = first + j, first + j + 1
        if merge:
            last_pair = j + 1 >= L - 1
            w = (0.5 if keep_last_interior else 1.0) if last_pair else 0.5
            plan.append((a, b, w))
            j += 2
        else:
            plan.append((a, a, 1.0))
            j += 1
    if keep_last_interior and j == L - 1:
        last = first + L - 1
        plan.append((last, last, 1.0))
    return plan


def forced_plan(num_frames: int, window: int, merge: bool = True, keep_last_interior: bool = False):
    """``(plan, segments)`` of one video (local indices; plan entries ``(src0, src1, w)``)."""
    segments = forced_segments(num_frames, window)
    plan: list[tuple] = []
    for s, e in segments:
        if e - s + 1 <= 2:
            plan.extend((i, i, 1.0) for i in range(s, e + 1))
        else:
            plan.append((s, s, 1.0))
            plan.extend(_forced_interior(s + 1, e - s - 1, merge, keep_last_interior))
            plan.append((e, e, 1.0))
    return plan, segments


def forced_counts(num_frames: int, cfg, pattern: str = "forced-merge") -> list[int]:
    """Frames left after each prune layer under a forced pattern."""
    if pattern not in FORCED_PATTERNS:
        raise ValueError(f"pattern must be one of {FORCED_PATTERNS}, got {pattern!r}")
    counts, T = [], int(num_frames)
    for _ in cfg.prune_layers:
        plan, _ = forced_plan(T, cfg.max_window - 1, pattern == "forced-merge", cfg.keep_last_interior)
        T = len(plan)
        counts.append(T)
    return counts


def stage2_token_count(segments: Sequence[tuple], r_adj: float, P: int = TOKENS_PER_FRAME) -> int:
    """Tokens Stage II keeps for one video with refined ``segments`` and adjusted ratio ``r'``."""
    from earlytom_ext import reference as ref

    k, n = ref.dynamic_keep(r_adj, P), ref.static_windows(r_adj, P)
    total = 0
    for s, e in segments:
        length = e - s + 1
        total += length * k if length <= 2 else 2 * k + (length - 2) * n
    return total


def forced_video_tokens(num_frames: int, cfg, pattern: str = "forced-merge", P: int = TOKENS_PER_FRAME) -> int:
    """Video tokens (without the newline) one video keeps under a forced pattern (``P`` LLM
    tokens per frame)."""
    from earlytom_ext import reference as ref

    T_final = forced_counts(num_frames, cfg, pattern)[-1]
    r_adj = ref.adjusted_ratio(cfg.retain_ratio, num_frames, T_final, P)
    return stage2_token_count(forced_segments(T_final, cfg.max_window - 1), r_adj, P)


# ---------------------------------------------------------------------------------------------
# Installing a pattern on a handle
# ---------------------------------------------------------------------------------------------
class ForcedPlans:
    """Device tensors of the forced plan / segments for a tuple of per-video frame counts (cached)."""

    def __init__(self, cfg, pattern: str):
        if pattern not in FORCED_PATTERNS:
            raise ValueError(f"pattern must be one of {FORCED_PATTERNS}, got {pattern!r}")
        self.window = cfg.max_window - 1
        self.merge = pattern == "forced-merge"
        self.keep_last = cfg.keep_last_interior
        self.cache: dict[tuple, dict] = {}
        self.host: dict[int, tuple[int, ...]] = {}  # id of a cached frame_counts tensor -> its values

    def counts_of(self, frame_counts, n_frames: int) -> tuple[int, ...]:
        """The values of ``frame_counts`` without reading the device: a tensor this cache made
        (the frame counts after a forced layer), else the product's first counts, which the
        benchmark's videos of equal length split evenly."""
        if not isinstance(frame_counts, torch.Tensor):
            return tuple(int(c) for c in frame_counts)
        known = self.host.get(id(frame_counts))
        if known is not None:
            return known
        B = int(frame_counts.shape[0])
        if n_frames % B:
            raise ValueError(f"forced patterns need videos of equal length: {n_frames} frames in {B} videos")
        return (n_frames // B,) * B

    def get(self, counts: tuple[int, ...], device) -> dict:
        key = (counts, str(device))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        src, w, new_counts, segs, seg_counts, ref_segs, ref_counts = [], [], [], [], [], [], []
        offset = 0
        for T in counts:
            plan, s = forced_plan(T, self.window, self.merge, self.keep_last)
            src.extend((offset + a, offset + b) for a, b, _ in plan)
            w.extend(float(x) for _, _, x in plan)
            new_counts.append(len(plan))
            # Segments of the merge: global input-frame indices.
            segs.extend((offset + a, offset + b) for a, b in s)
            seg_counts.append(len(s))
            # The refined segmentation of the *current* frames: the same windows.
            ref_segs.extend((offset + a, offset + b) for a, b in s)
            ref_counts.append(len(s))
            offset += T
        i64 = dict(dtype=torch.int64, device=device)
        hit = {
            "plan_src": torch.tensor(src, **i64).view(-1, 2),
            "plan_weight": torch.tensor(w, dtype=torch.float32, device=device),
            "frame_counts": torch.tensor(new_counts, **i64),
            "segments": torch.tensor(segs, **i64).view(-1, 2),
            "segment_counts": torch.tensor(seg_counts, **i64),
            "refined": (torch.tensor(ref_segs, **i64).view(-1, 2), torch.tensor(ref_counts, **i64)),
        }
        self.cache[key] = hit
        self.host[id(hit["frame_counts"])] = tuple(new_counts)  # alive as long as the cache
        return hit


def install_pattern(handle, pattern: str) -> Callable[[], None]:
    """Force a merge pattern on an EarlyTom handle through ``handle.force_decisions``; returns a
    function that restores the handle's own decisions.

    ``"natural"``: nothing changes. ``"forced-merge"`` / ``"forced-nomerge"``: at each prune
    layer the real decision walk runs (``ops.segment_frames``: the kernels and the one host sync
    ``merge_frames`` spends before applying its plan), then the forced plan is applied once to the
    frames and to the scores travelling with them (``ops.apply_merge_plan``), as ``merge_frames``
    applies its own; the refined segmentation runs the real op (``ops.segment_frames_deferred``,
    no sync) and returns the forced windows. So a forced call launches the product's kernels and
    syncs, sized by the forced frame counts; the frame counts are known on the host without a
    device read (the benchmark's videos have equal lengths).
    """
    if pattern == "natural":
        return lambda: None
    if pattern not in FORCED_PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    import earlytom_ext.ops as ops

    cfg = handle.config
    plans = ForcedPlans(cfg, pattern)

    def merge_like(t, p):
        if t is None:
            return None
        if isinstance(t, torch.Tensor):
            return ops.apply_merge_plan(t, p["plan_src"], p["plan_weight"])
        merged = [ops.apply_merge_plan(e, p["plan_src"], p["plan_weight"]) for e in t]
        return type(t)(*merged) if hasattr(t, "_fields") else type(t)(merged)  # a NamedTuple too

    def stage1(x, frame_counts, layer_index, extras=None):
        ops.segment_frames(x, frame_counts, cfg)  # the real walk and its sync: their cost counts
        p = plans.get(plans.counts_of(frame_counts, x.shape[0]), x.device)
        return ops.MergeResult(
            x=merge_like(x, p),
            extras=merge_like(extras, p),
            frame_counts=p["frame_counts"],
            segments=p["segments"],
            segment_counts=p["segment_counts"],
            plan_src=p["plan_src"],
            plan_weight=p["plan_weight"],
        )

    def refine(x, frame_counts):
        ops.segment_frames_deferred(x, frame_counts, cfg)  # the real op, as the product runs it
        return plans.get(plans.counts_of(frame_counts, x.shape[0]), x.device)["refined"]

    handle.force_decisions(stage1=stage1, refine=refine)
    return lambda: handle.force_decisions()


def apply_earlytom(model, cfg, pattern: str):
    """``earlytom_ext.apply(model, cfg)`` plus the merge pattern; returns the handle
    (``handle.remove()`` undoes both)."""
    import earlytom_ext

    handle = earlytom_ext.apply(model, cfg)
    try:
        install_pattern(handle, pattern)
    except Exception:
        handle.remove()
        raise
    return handle
