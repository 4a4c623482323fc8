"""Placeholder: Stage I op wrappers (merge_frames, apply_merge_plan, segment_frames)."""
from typing import NamedTuple


class MergeResult(NamedTuple):
    x: object
    extras: object
    frame_counts: object
    segments: object
    segment_counts: object
    plan_src: object
    plan_weight: object


def merge_frames(*a, **k):
    raise NotImplementedError


def apply_merge_plan(*a, **k):
    raise NotImplementedError


def segment_frames(*a, **k):
    raise NotImplementedError
