"""What the demo does differently per model family: the prompt and the processor call, the unpatched
encoder it times, the video arguments of ``encode_videos``, the token grid of the figure and the
words of the summary. The families are those of ``earlytom_ext.apply`` (its adapters)."""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch

QUESTION = "Describe the video briefly."
QWEN = ("qwen2_5_vl", "qwen2_vl")
#: processor outputs that describe the videos (passed to ``encode_videos`` where the adapter reads them)
_VIDEO_SHAPE_ARGS = ("video_grid_thw", "second_per_grid_ts", "image_sizes_videos")


def adapter_class(model_type: str) -> type:
    """The adapter class of a family (its ``model_class``, ``family``, ``tower_name``); KeyError when unsupported."""
    from ..integration.adapters import ADAPTERS

    module, cls = ADAPTERS[model_type]
    return getattr(importlib.import_module(module, "earlytom_ext.integration.adapters"), cls)


def supported_families() -> str:
    """``"LLaVA-OneVision, ... and Qwen2-VL"``: the families the demo runs."""
    from ..integration.adapters import ADAPTERS

    names = [adapter_class(t).family for t in ADAPTERS]
    return ", ".join(names[:-1]) + " and " + names[-1]


def frame_word(model_type: str) -> str:
    """What a Stage I frame is called: a temporal patch group on Qwen."""
    return "temporal group" if model_type in QWEN else "frame"


def processor_inputs(processor, model_type: str, frames_u8: torch.Tensor, fps: float) -> dict:
    """The family's processor on the decoded frames (``[T, 3, H, W]`` uint8) with a one-question prompt."""
    frames = [f.permute(1, 2, 0).numpy() for f in frames_u8]  # a video: a list of [H, W, 3] frames
    if model_type == "video_llava":  # the prompt format of the Video-LLaVA checkpoints (no chat template)
        text = f"USER: <video>\n{QUESTION} ASSISTANT:"
    else:
        content = [{"type": "video"}, {"type": "text", "text": QUESTION}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    # The frames are the sampled ones (the figure maps them onto the Stage I frames): a checkpoint's
    # processor config must not sample again (4.57's Video-LLaVA processor takes no such argument).
    params = inspect.signature(processor.__call__).parameters.values()
    takes_kwargs = any(p.kind is p.VAR_KEYWORD or p.name == "do_sample_frames" for p in params)
    kwargs = {"do_sample_frames": False} if takes_kwargs else {}
    if model_type in QWEN:
        # The frame rate reaches the processor as `fps` (transformers 4.57) and as `video_metadata` (5.x).
        kwargs.update(fps=fps, video_metadata=[{"fps": fps, "total_num_frames": len(frames)}])
    return dict(processor(text=text, videos=[frames], return_tensors="pt", **kwargs))


def to_model(inputs: dict, model_type: str, device: torch.device, dtype: torch.dtype) -> dict:
    """The processor's tensors on ``device``; the LLaVA families' pixels in the model's dtype (Qwen's
    encoder casts its pixels itself, and its seconds per temporal group stay float32)."""
    out = {}
    for k, t in inputs.items():
        cast = t.is_floating_point() and model_type not in QWEN
        out[k] = t.to(device, dtype) if cast else t.to(device)
    return out


def encode_kwargs(adapter, inputs: dict) -> dict:
    """The video arguments of ``handle.encode_videos`` besides the pixels (Qwen: ``video_grid_thw``,
    Qwen2.5-VL also ``second_per_grid_ts``)."""
    return {k: inputs[k] for k in _VIDEO_SHAPE_ARGS if k in inputs and k in adapter.video_kwargs}


def unpatched_encoder(model, model_type: str, inputs: dict) -> Callable[[], object]:
    """The model's own vision encoder on the video, for the timing baseline."""
    pix = inputs["pixel_values_videos"]
    if model_type in QWEN:
        visual = model.model.visual
        grid = inputs["video_grid_thw"]
        return lambda: visual(pix, grid_thw=grid)
    tower = getattr(model.model, adapter_class(model_type).tower_name)  # Video-LLaVA: its video tower
    return lambda: tower(pixel_values=pix[0])


@dataclass(frozen=True)
class TokenGrid:
    """Where a frame's P LLM tokens lie on the picture: ``rows x cols`` tokens over the whole frame,
    after ``class_token`` (position 0, not on the picture: Video-LLaVA); a Stage I frame is
    ``frames_per_group`` consecutive decoded frames (Qwen's ``temporal_patch_size``)."""

    rows: int
    cols: int
    class_token: bool = False
    frames_per_group: int = 1

    @property
    def tokens(self) -> int:
        return self.rows * self.cols + int(self.class_token)


def token_grid(config, model_type: str, inputs: dict | None = None) -> TokenGrid:
    """The token grid of the first video from the model config (and, on Qwen, its ``video_grid_thw``)."""
    vcfg = config.vision_config
    if model_type in QWEN:
        _, h, w = (int(x) for x in inputs["video_grid_thw"][0].tolist())
        m = int(vcfg.spatial_merge_size)
        return TokenGrid(h // m, w // m, frames_per_group=int(vcfg.temporal_patch_size))
    grid = vcfg.image_size // vcfg.patch_size
    if model_type == "llava_onevision":  # 2x2 bilinear pooling, 27 -> 14
        side = math.ceil(grid / 2)
        return TokenGrid(side, side)
    if model_type == "llava_next_video":  # the resampler: stride x stride pooling without padding, 24 -> 12
        side = grid // config.spatial_pool_stride
        return TokenGrid(side, side)
    if model_type == "video_llava":  # every CLIP patch and the class token
        return TokenGrid(grid, grid, class_token=True)
    raise ValueError(f"no token grid for model_type {model_type!r}")


def tokens_label(model_type: str, per_frame: int) -> tuple[str, str]:
    """The summary's labels of the unpatched and the EarlyTom token counts."""
    if model_type == "llava_onevision":
        return f"unpatched (T x {per_frame} + newline)", "EarlyTom (kept + newline)"
    if model_type in QWEN:
        return f"unpatched (temporal groups x {per_frame})", "EarlyTom (kept)"
    if model_type == "video_llava":
        return f"unpatched (T x {per_frame}, class token included)", "EarlyTom (kept)"
    return f"unpatched (T x {per_frame})", "EarlyTom (kept)"
