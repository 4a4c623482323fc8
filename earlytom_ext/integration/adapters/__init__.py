"""One adapter per model family; :func:`adapter_for` picks it from ``config.model_type``."""

from __future__ import annotations

import importlib

import torch.nn as nn

from .base import EncodedVideos, ModelAdapter, VideoInputs

__all__ = ["ADAPTERS", "EncodedVideos", "ModelAdapter", "VideoInputs", "adapter_for"]

#: ``config.model_type`` -> ``(module, class)``; imported on use so that a family's imports cost
#: nothing when another family is patched.
ADAPTERS: dict[str, tuple[str, str]] = {
    "llava_onevision": (".llava_onevision", "LlavaOnevisionAdapter"),
    "llava_next_video": (".llava_next_video", "LlavaNextVideoAdapter"),
    "qwen2_5_vl": (".qwen2_5_vl", "Qwen2_5_VLAdapter"),
    "qwen2_vl": (".qwen2_vl", "Qwen2VLAdapter"),
    "video_llava": (".video_llava", "VideoLlavaAdapter"),
}


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter instance for ``model`` (``TypeError`` naming the supported families otherwise)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, nn.Module) or model_type not in ADAPTERS:
        supported = ", ".join(repr(t) for t in ADAPTERS)
        raise TypeError(
            f"earlytom_ext.apply supports Hugging Face models with config.model_type in ({supported}) "
            f"(the ForConditionalGeneration class), got {type(model).__name__} with model_type {model_type!r}"
        )
    module, cls = ADAPTERS[model_type]
    return getattr(importlib.import_module(module, __name__), cls)(model)
