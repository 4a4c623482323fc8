"""User-facing wrappers of the compiled ops (``torch.ops.earlytom.*``), with validation and
``register_fake`` implementations for torch.compile / opcheck."""

from .._ext import available, has_cuda_kernels
from .attention import attention_received
from .merge import (
    DeferredSegments,
    MergeResult,
    apply_merge_plan,
    merge_frames,
    resolve_deferred_segments,
    segment_frames,
    segment_frames_deferred,
    segments_per_video,
)
from .select import Stage2Plan, select_tokens, stage2_plan

__all__ = [
    "available",
    "has_cuda_kernels",
    "MergeResult",
    "merge_frames",
    "apply_merge_plan",
    "segment_frames",
    "DeferredSegments",
    "segment_frames_deferred",
    "resolve_deferred_segments",
    "segments_per_video",
    "attention_received",
    "Stage2Plan",
    "select_tokens",
    "stage2_plan",
]
