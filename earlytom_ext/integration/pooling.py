"""Bilinear 2x pooling of a square token grid, bit-identical to LLaVA-OneVision's
``apply_pooling`` without its NCHW ``.contiguous()`` copy (the channels-last call takes a
GPU kernel that parallelises over channels: ~200x faster on 32 frames of 27x27x3584 bf16),
and :func:`fast_pooling`, the same fix for an uncompressed model."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .patches import InstancePatches

__all__ = ["FastPoolingHandle", "bilinear_pool", "fast_pooling"]


def bilinear_pool(x: torch.Tensor, grid: int) -> torch.Tensor:
    """``x [N, grid*grid, C]`` -> ``[N, ceil(grid/2)**2, C]``, as HF's ``apply_pooling``."""
    n, s, c = x.shape
    if s != grid * grid:
        raise ValueError(f"bilinear_pool needs {grid}x{grid} = {grid * grid} tokens per frame, got {s}")
    out = math.ceil(grid / 2)
    y = F.interpolate(x.view(n, grid, grid, c).permute(0, 3, 1, 2), size=[out, out], mode="bilinear")
    return y.permute(0, 2, 3, 1).reshape(n, out * out, c)


class FastPoolingHandle(InstancePatches):
    """Returned by :func:`fast_pooling`; ``remove()`` (or leaving a ``with`` block) restores the model."""

    made_by = "fast_pooling"

    def __init__(self, inner: nn.Module, grid: int):
        super().__init__()

        def apply_pooling(image_features: torch.Tensor) -> torch.Tensor:
            return bilinear_pool(image_features, grid)

        apply_pooling._earlytom_fast_pooling = True
        self._set(inner, "apply_pooling", apply_pooling)


def fast_pooling(model: nn.Module) -> FastPoolingHandle:
    """Replace a LLaVA-OneVision model's video pooling by the bit-identical channels-last one.

    For an uncompressed model (EarlyTom's :func:`~earlytom_ext.apply` pools this way already).
    Returns a handle whose ``remove()`` restores the model's own ``apply_pooling``.
    """
    inner = getattr(model, "model", None)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llava_onevision" or not callable(getattr(inner, "apply_pooling", None)):
        raise TypeError(
            "fast_pooling supports Hugging Face LLaVA-OneVision models (config.model_type 'llava_onevision' "
            f"with model.model.apply_pooling), got {type(model).__name__}"
        )
    if getattr(inner.__dict__.get("apply_pooling"), "_earlytom_fast_pooling", False):
        raise RuntimeError("fast_pooling is already applied to this model; call its handle's remove() first")
    vcfg = config.vision_config
    grid = vcfg.image_size // vcfg.patch_size
    return FastPoolingHandle(inner, grid)
