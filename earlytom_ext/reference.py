"""Pure-torch reference of EarlyTom: the executable form of docs/algorithm.md.

Readable, float32 math, no kernels. Every fused op and the model integration are tested against
these functions. Functions work on ONE video (frames ``[T, S, D]``, local frame indices) unless
their name ends in ``_batched``; batched entry points take the frames of several videos
concatenated along dim 0 plus per-video frame counts and compress each video independently.
:func:`llm_merge` (the inner-LLM token merge) is defined in ``earlytom_ext/_reference_llm.py``.

Conventions shared with the ops (docs/design.md):

* cosine of two token vectors as ``torch.nn.functional.normalize`` (eps = 1e-12); the similarity
  of two frames is the mean over the S positions of the per-position cosines;
* the EMA walk and the merge weights use these similarities as Python floats;
* a merge plan lists, for every output frame, ``(src0, src1, w)``: the frame is
  ``w * X[src0] + (1 - w) * X[src1]`` (computed in float32, cast back to the input dtype);
  a frame passed unchanged is ``(i, i, 1.0)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._reference_llm import llm_merge
from .config import EarlyTomConfig

__all__ = [
    "TOKENS_PER_FRAME",
    "frame_similarity",
    "segment",
    "merge_plan",
    "apply_plan",
    "merge_frames",
    "merge_frames_batched",
    "segment_batched",
    "attention_received",
    "pool_grid",
    "pooled_hw",
    "adjusted_ratio",
    "dynamic_keep",
    "static_windows",
    "window_bounds",
    "frame_kinds",
    "select_tokens",
    "select_tokens_batched",
    "compress_after_encoder",
    "run_encoder",
    "llm_merge",
]

#: Tokens per frame after LLaVA-OneVision's 27x27 -> 14x14 pooling (the paper's P).
TOKENS_PER_FRAME = 196

Segment = tuple[int, int]
PlanEntry = tuple[int, int, float]


# --------------------------------------------------------------------------------------------
# Stage I
# --------------------------------------------------------------------------------------------
def _normalized(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1, eps=1e-12)


def _sim(xn: torch.Tensor, a: int, b: int) -> float:
    """Mean over positions of the cosine between (already normalised) frames a and b."""
    return float((xn[a] * xn[b]).sum(-1).mean())


def frame_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Similarity of two frames ``[S, D]``: mean over the S positions of the token cosines."""
    return float((_normalized(a) * _normalized(b)).sum(-1).mean())


def _check_video(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a [T, S, D] tensor, got {getattr(x, 'shape', type(x))}")
    if x.shape[0] < 1:
        raise ValueError("x must hold at least one frame (T >= 1)")


def _segment_normalized(xn: torch.Tensor, cfg: EarlyTomConfig) -> list[Segment]:
    T = xn.shape[0]
    segments: list[Segment] = []
    start, s_hat = 0, 1.0
    for i in range(1, T):
        c = _sim(xn, start, i)  # the reference frame is the first frame of the segment
        s_hat = cfg.ema * c + (1.0 - cfg.ema) * s_hat
        if s_hat < cfg.tau or (i - start + 1) >= cfg.max_window:
            segments.append((start, i - 1))
            start, s_hat = i, 1.0
    segments.append((start, T - 1))
    return segments


def segment(x: torch.Tensor, cfg: EarlyTomConfig) -> list[Segment]:
    """EMA segmentation of one video ``[T, S, D]`` (Stage I step 1): inclusive (start, end)."""
    _check_video(x)
    return _segment_normalized(_normalized(x), cfg)


def _interior_plan(xn: torch.Tensor, s: int, e: int, keep_last_interior: bool) -> list[PlanEntry]:
    """Fine-merge of the interior frames s+1..e-1 of a segment [s, e] (length >= 3)."""
    first = s + 1
    L = e - s - 1
    if L == 1:
        return [(first, first, 1.0)]
    tau_m = _sim(xn, s, e)
    sigma = [_sim(xn, first + j, first + j + 1) for j in range(L - 1)]
    plan: list[PlanEntry] = []
    j = 0
    while j < L - 1:
        a, b = first + j, first + j + 1
        if j + 1 < L - 1:  # not the last pair: merge into the more similar neighbour pair
            if sigma[j] > tau_m and sigma[j] > sigma[j + 1]:
                den = sigma[j] + sigma[j + 1]
                w = sigma[j] / den if den != 0.0 else 0.5
                plan.append((a, b, w))
                j += 2
            else:
                plan.append((a, a, 1.0))
                j += 1
        else:  # the last pair
            if sigma[j] > tau_m:
                # Published: weight 1 (the second frame is dropped); corrected: plain average.
                plan.append((a, b, 0.5 if keep_last_interior else 1.0))
                j += 2
            else:
                plan.append((a, a, 1.0))
                j += 1
    if keep_last_interior and j == L - 1:
        # The published walk stops at j < L - 1 and never emits the last interior frame.
        last = first + L - 1
        plan.append((last, last, 1.0))
    return plan


def merge_plan(x: torch.Tensor, cfg: EarlyTomConfig) -> tuple[list[PlanEntry], list[Segment]]:
    """Stage I plan of one video: ``(plan, segments)`` (local frame indices).

    Segments of one or two frames pass unchanged; longer segments keep both endpoints and
    fine-merge their interior (docs/algorithm.md, Stage I step 3).
    """
    _check_video(x)
    xn = _normalized(x)
    segments = _segment_normalized(xn, cfg)
    plan: list[PlanEntry] = []
    for s, e in segments:
        if e - s + 1 <= 2:
            plan.extend((i, i, 1.0) for i in range(s, e + 1))
        else:
            plan.append((s, s, 1.0))
            plan.extend(_interior_plan(xn, s, e, cfg.keep_last_interior))
            plan.append((e, e, 1.0))
    return plan, segments


def apply_plan(t: torch.Tensor, plan: Sequence[PlanEntry]) -> torch.Tensor:
    """Merge any per-frame tensor ``[T, ...]`` with a plan (float32 math, input dtype out)."""
    src0 = torch.tensor([p[0] for p in plan], dtype=torch.long, device=t.device)
    src1 = torch.tensor([p[1] for p in plan], dtype=torch.long, device=t.device)
    w = torch.tensor([p[2] for p in plan], dtype=torch.float32, device=t.device)
    w = w.view(-1, *([1] * (t.dim() - 1)))
    tf = t.float()
    merged = w * tf[src0] + (1.0 - w) * tf[src1]
    # w == 1 is a plain copy of src0 (never reads src1), so a non-finite src1 does not leak in.
    return torch.where(w == 1.0, tf[src0], merged).to(t.dtype)


def merge_frames(x: torch.Tensor, cfg: EarlyTomConfig, extras: torch.Tensor | None = None):
    """One prune layer's Stage I on one video: ``(x_merged, extras_merged, segments)``.

    ``extras`` is any tensor with leading dim T (e.g. per-frame token scores), merged with the
    same weights as the frames (or ``None``).
    """
    plan, segments = merge_plan(x, cfg)
    if extras is not None and extras.shape[0] != x.shape[0]:
        raise ValueError(f"extras must have leading dim T={x.shape[0]}, got {tuple(extras.shape)}")
    merged_extras = apply_plan(extras, plan) if extras is not None else None
    return apply_plan(x, plan), merged_extras, segments


def _split(x: torch.Tensor, frame_counts) -> list[torch.Tensor]:
    counts = [int(c) for c in (frame_counts.tolist() if isinstance(frame_counts, torch.Tensor) else frame_counts)]
    if any(c < 1 for c in counts) or sum(counts) != x.shape[0]:
        raise ValueError(f"frame_counts must be >= 1 and sum to {x.shape[0]}, got {counts}")
    return list(torch.split(x, counts, dim=0))


def merge_frames_batched(x: torch.Tensor, frame_counts, cfg: EarlyTomConfig, extras: torch.Tensor | None = None):
    """Stage I on several videos (frames concatenated, ``frame_counts`` per video).

    Returns ``(x_merged, extras_merged, counts, segments, plans)``; ``segments`` and ``plans``
    are per video with local frame indices.
    """
    xs = _split(x, frame_counts)
    es = _split(extras, frame_counts) if extras is not None else [None] * len(xs)
    out, out_e, counts, segs, plans = [], [], [], [], []
    for xv, ev in zip(xs, es):
        plan, s = merge_plan(xv, cfg)
        out.append(apply_plan(xv, plan))
        if ev is not None:
            out_e.append(apply_plan(ev, plan))
        counts.append(len(plan))
        segs.append(s)
        plans.append(plan)
    merged_extras = torch.cat(out_e) if extras is not None else None
    return torch.cat(out), merged_extras, counts, segs, plans


def segment_batched(x: torch.Tensor, frame_counts, cfg: EarlyTomConfig) -> list[list[Segment]]:
    """EMA segmentation of each video of a batch (local indices per video)."""
    return [segment(xv, cfg) for xv in _split(x, frame_counts)]


# --------------------------------------------------------------------------------------------
# Attention received per token
# --------------------------------------------------------------------------------------------
def attention_received(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``a[n, s] = mean_h mean_q softmax(q kᵀ·scale)[n, h, q, s]`` for q, k ``[N, H, S, d]``.

    Explicit softmax maps, one frame at a time, in float32. Returns ``[N, S]`` float32.
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [N, H, S, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    out = []
    for n in range(q.shape[0]):
        logits = torch.matmul(q[n].float(), k[n].float().transpose(-1, -2)) * scale
        out.append(torch.softmax(logits, dim=-1).mean(dim=(0, 1)))
    return torch.stack(out)


# --------------------------------------------------------------------------------------------
# After the encoder
# --------------------------------------------------------------------------------------------
def pooled_hw(h: int, w: int) -> tuple[int, int]:
    """LLaVA-OneVision's pooled grid: ``(ceil(h / 2), ceil(w / 2))`` (27x27 -> 14x14)."""
    return math.ceil(h / 2), math.ceil(w / 2)


def pool_grid(x: torch.Tensor, out_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of per-frame token grids.

    ``x``: ``[T, h*w, C]`` (square grid) or ``[T, h*w]`` (scores). ``out_hw`` defaults to the
    LLaVA-OneVision pooled size. Keeps the dtype (as the model does).
    """
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    T, S, C = x.shape
    side = math.isqrt(S)
    if side * side != S:
        raise ValueError(f"pool_grid expects a square token grid, got {S} tokens per frame")
    out_hw = pooled_hw(side, side) if out_hw is None else tuple(out_hw)
    grid = x.view(T, side, side, C).permute(0, 3, 1, 2)
    pooled = F.interpolate(grid, size=out_hw, mode="bilinear")
    pooled = pooled.permute(0, 2, 3, 1).reshape(T, out_hw[0] * out_hw[1], C)
    return pooled.squeeze(-1) if squeeze else pooled


def adjusted_ratio(r: float, T: int, T_merged: int, P: int = TOKENS_PER_FRAME) -> float:
    """``r' = min(r / ((T·P - (T - T')·P) / (T·P)), 1)`` in double precision, as published."""
    return min(r / ((T * P - (T - T_merged) * P) / (T * P)), 1.0)


def dynamic_keep(r_adj: float, P: int = TOKENS_PER_FRAME) -> int:
    """Tokens kept in a dynamic frame: ``ceil(P·r')``."""
    return math.ceil(P * r_adj)


def static_windows(r_adj: float, P: int = TOKENS_PER_FRAME) -> int:
    """Windows (= tokens kept) in a static frame: ``max(1, round(P·r'))`` (half to even)."""
    return max(1, round(P * r_adj))


def window_bounds(P: int, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous windows over ``P`` positions, the first ``P mod n`` one longer."""
    if not 1 <= n <= P:
        raise ValueError(f"the number of windows must be in [1, {P}], got {n}")
    base, extra = divmod(P, n)
    bounds, start = [], 0
    for i in range(n):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def frame_kinds(segments: Sequence[Segment]) -> list[bool]:
    """Per frame: True for a static frame (interior of a segment of length >= 3)."""
    kinds: list[bool] = []
    for s, e in segments:
        kinds.extend((e - s + 1 >= 3) and s < f < e for f in range(s, e + 1))
    return kinds


def _topk_raster(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k highest scores (ties: lowest index first), in raster order."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def select_tokens(feats: torch.Tensor, scores: torch.Tensor, segments: Sequence[Segment], ratio: float):
    """Stage II on one video: ``(tokens [n, C], index [n, 2])``.

    ``feats [T', P, C]`` pooled features, ``scores [T', P]``, ``segments`` the refined segments
    covering the T' frames, ``ratio`` = r' (already adjusted). ``index`` holds (frame, position)
    of every kept token in output order: frames in time order (per segment: first dynamic
    frame, static frames, last dynamic frame), each frame's tokens in raster order.
    """
    Tm, P = scores.shape
    if feats.shape[:2] != scores.shape:
        raise ValueError(f"feats [T', P, C] and scores [T', P] disagree: {tuple(feats.shape)} vs {tuple(scores.shape)}")
    kinds = frame_kinds(segments)
    if len(kinds) != Tm:
        raise ValueError(f"segments cover {len(kinds)} frames, scores have {Tm}")
    k = dynamic_keep(ratio, P)
    windows = window_bounds(P, static_windows(ratio, P))
    index = []
    for f in range(Tm):
        s = scores[f].float()
        if kinds[f]:
            pos = [a + int(torch.argmax(s[a:b])) for a, b in windows]  # argmax: first maximum
        else:
            pos = _topk_raster(s, k).tolist()
        index.extend((f, p) for p in pos)
    index_t = torch.tensor(index, dtype=torch.long, device=feats.device).view(-1, 2)
    return feats[index_t[:, 0], index_t[:, 1]], index_t


def select_tokens_batched(feats, scores, frame_counts, segments_per_video, ratios):
    """Stage II on several videos (merged frames concatenated, ``frame_counts`` T' per video,
    one r' per video). ``index`` uses global frame indices."""
    fs, ss = _split(feats, frame_counts), _split(scores, frame_counts)
    tokens, index, offset = [], [], 0
    for f, s, segs, r in zip(fs, ss, segments_per_video, ratios):
        t, i = select_tokens(f, s, segs, r)
        tokens.append(t)
        index.append(i + torch.tensor([offset, 0], device=i.device))
        offset += f.shape[0]
    return torch.cat(tokens), torch.cat(index)


def compress_after_encoder(
    feats: torch.Tensor, scores: torch.Tensor, segments: Sequence[Segment], retain_ratio: float, frames_before: int
):
    """Pooling + r' + Stage II for one video: ``(tokens, index, r')``.

    ``feats [T', h*w, C]`` projected features on the encoder grid, ``scores [T', h*w]``; both
    are pooled to the LLaVA-OneVision grid, then selected. No newline is appended.
    """
    pf, ps = pool_grid(feats), pool_grid(scores.float())
    r_adj = adjusted_ratio(retain_ratio, frames_before, feats.shape[0], P=ps.shape[1])
    tokens, index = select_tokens(pf, ps, segments, r_adj)
    return tokens, index, r_adj


def run_encoder(hidden: torch.Tensor, layers, cfg: EarlyTomConfig, qk_fn):
    """Encoder with Stage I for one video, layer by layer.

    ``hidden [T, S, D]`` the encoder input; ``layers`` callables ``hidden -> hidden``;
    ``qk_fn(i, hidden) -> (q, k, scale)`` gives the attention inputs of layer ``i`` (``[T, H, S,
    d]``), called for the last prune layer only. Returns ``(hidden, scores, refined_segments,
    frames_after_each_prune_layer)``.
    """
    if cfg.prune_layers is None:
        raise ValueError("run_encoder needs EarlyTomConfig.prune_layers (None is resolved per model by apply)")
    cfg.validate(num_layers=len(layers))
    last = cfg.prune_layers[-1]
    scores, refined, counts = None, None, []
    for i, layer in enumerate(layers):
        if i == last:
            q, k, scale = qk_fn(i, hidden)
            scores = attention_received(q, k, scale)
        hidden = layer(hidden)
        if i in cfg.prune_layers:
            hidden, merged, _ = merge_frames(hidden, cfg, extras=scores if i == last else None)
            if i == last:
                scores = merged
                refined = segment(hidden, cfg)
            counts.append(hidden.shape[0])
    return hidden, scores, refined, counts
