"""One armed pass of a video batch through a vision encoder: the model-independent Stage I /
score / refined-segmentation orchestration that every adapter calls at its prune layers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import ops
from ..config import EarlyTomConfig

__all__ = ["AsyncHostCopy", "Clock", "Decisions", "VideoRun"]

Stage1Fn = Callable[[torch.Tensor, torch.Tensor, int, Optional[torch.Tensor]], "ops.MergeResult"]
RefineFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class AsyncHostCopy:
    """Host copies of tensors started now (pinned, non-blocking) and read after :meth:`wait`.

    Started right after the op that produced them, the copy is complete long before the host needs
    it (the encoder's later layers are queued behind it), so reading it stalls nothing; CPU tensors
    are used as they are.
    """

    def __init__(self, *tensors: torch.Tensor | None):
        self._event = None
        out = []
        for t in tensors:
            if t is not None and t.device.type == "cuda":
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                buf.copy_(t, non_blocking=True)
                t = buf
                if self._event is None:
                    self._event = torch.cuda.Event()
            out.append(t)
        if self._event is not None:
            self._event.record()
        self._tensors = tuple(out)

    def wait(self) -> tuple[torch.Tensor | None, ...]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._tensors


class Clock:
    """Named spans; CUDA events on a GPU (resolved lazily, no sync while running), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple] = []

    def now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def span(self, name: str, start, end) -> None:
        self.spans.append((name, start, end))

    def resolve(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, a, b in self.spans:
            if self.cuda:
                b.synchronize()
                ms = float(a.elapsed_time(b))
            else:
                ms = (b - a) * 1000.0
            out[name] = out.get(name, 0.0) + ms
        return out


@dataclass
class Decisions:
    """The two data-dependent decisions of the vision path; ``None`` means the default op.

    ``stage1(x, frame_counts, layer_index, extras) -> ops.MergeResult`` replaces
    ``ops.merge_frames(x, frame_counts, cfg, extras=extras)`` at each prune layer;
    ``refine(x, frame_counts) -> (segments [K, 2] int64 global, segment_counts [B])`` replaces
    the refined segmentation (``ops.segment_frames_deferred(x, frame_counts, cfg)``) at the last
    prune layer.
    """

    stage1: Stage1Fn | None = None
    refine: RefineFn | None = None


@dataclass
class VideoRun:
    """Per-call state of a batch of videos going through the encoder.

    Adapters call :meth:`score` (at the last prune layer, on that layer's Q and K) and
    :meth:`stage1` after every prune layer; the run keeps the frame counts, the merge plans
    (frame provenance), the merged scores and the refined segmentation.
    """

    cfg: EarlyTomConfig
    frame_counts: torch.Tensor  # int64 [B], frames per video now (device)
    clock: Clock
    decisions: Decisions = field(default_factory=Decisions)
    merges: list[tuple] = field(default_factory=list)  # (layer, frame_counts, plan_src, plan_weight)
    scores: torch.Tensor | None = None  # [N', S] fp32 after the last prune layer's merge
    refined: tuple[torch.Tensor, torch.Tensor] | None = None  # on the device; see refined_segments()
    refined_host: AsyncHostCopy | None = None  # (segments, segment_counts, frame_counts, status) on the host
    _pending_scores: torch.Tensor | None = None

    @property
    def last_layer(self) -> int:
        return self.cfg.prune_layers[-1]

    def score(self, q: torch.Tensor, k: torch.Tensor, *, scale: float, num_heads: int | None = None) -> torch.Tensor:
        """Attention received per token from the score layer's Q and K (``[N, S]`` fp32); the
        result travels with the frames through that layer's merge."""
        t0 = self.clock.now()
        # Non-finite pixels are caught by Stage I's own flags (read with its size sync).
        a = ops.attention_received(q, k, scale=scale, num_heads=num_heads, check_finite=False)
        self.clock.span("attention_score", t0, self.clock.now())
        self._pending_scores = a
        return a

    def stage1(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Stage I after prune layer ``layer`` on ``x [N, S, D]`` (frames of all videos); returns
        the merged frames. At the last prune layer the scores of :meth:`score` are merged alike and
        the refined segmentation runs on the merged frames."""
        last = layer == self.last_layer
        extras = None
        if last:
            if self._pending_scores is None:
                raise RuntimeError("EarlyTom: the score layer's attention was not captured before its Stage I")
            extras, self._pending_scores = self._pending_scores, None
        clock = self.clock
        t0 = clock.now()
        if self.decisions.stage1 is not None:
            res = self.decisions.stage1(x, self.frame_counts, layer, extras)
        else:
            res = ops.merge_frames(x, self.frame_counts, self.cfg, extras=extras)
        clock.span(f"stage1_layer{layer}", t0, clock.now())
        self.frame_counts = res.frame_counts
        self.merges.append((layer, res.frame_counts, res.plan_src, res.plan_weight))
        if last:
            if res.extras is None:
                raise RuntimeError("EarlyTom: Stage I at the score layer must return the merged scores")
            self.scores = res.extras
            t0 = clock.now()
            status = None
            if self.decisions.refine is not None:
                self.refined = self.decisions.refine(res.x, self.frame_counts)
            else:
                # No sync here: Stage II's plan reads the segmentation from the host copy below.
                segments, counts, status = ops.segment_frames_deferred(res.x, self.frame_counts, self.cfg)
                self.refined = (segments, counts)
            self.refined_host = AsyncHostCopy(*self.refined, self.frame_counts, status)
            clock.span("refine_segments", t0, clock.now())
        return res.x

    def refined_segments(self) -> list[list[tuple[int, int]]]:
        """Per video, the refined segments (local merged-frame indices) from the host copy started
        at the last prune layer; device-flagged input errors raise here."""
        segments, counts, frames, status = self.refined_host.wait()
        if status is not None:
            segments, counts = ops.resolve_deferred_segments(segments, counts, status)
        return ops.segments_per_video(segments, counts, frames)

    def check_complete(self) -> None:
        if self.refined is None or self.scores is None:
            raise RuntimeError("EarlyTom: the vision encoder did not run through the patched prune layers")
