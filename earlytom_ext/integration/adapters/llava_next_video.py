"""LLaVA-NeXT-Video (CLIP encoder, the model's 2x2 ``vision_resampler`` before the projector, no
token appended per video).

The encoder side is LLaVA-OneVision's (forward hooks on the prune layers, Q and K of the last one
from its ``q_proj`` / ``k_proj``): a Stage I frame is one CLIP frame, its class token included (it
is merged with its frame, like every other token). After the encoder: the feature layer(s) (the
model's default is the second-to-last layer), the select strategy (``default`` drops the class
token), the model's own ``vision_resampler`` (pooling on the merged frames), then its projector.
The scores are pooled like the features: the mean (``average``, also for ``conv``) or the maximum
(``max``) of each pooling window.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import scaled_prune_layers
from .llava_onevision import LlavaOnevisionAdapter

__all__ = ["LLAVA_NEXT_VIDEO_PRUNE_LAYERS", "LlavaNextVideoAdapter"]

#: Prune layers of LLaVA-NeXT-Video-7B / 34B (CLIP ViT-L/14 at 336 px, 24 layers, features from the
#: second-to-last): the paper's SigLIP layers (6, 21, 23 of 26) scaled to the 23 layers that feed the
#: features, so that two layers run after the last one, as in the paper.
LLAVA_NEXT_VIDEO_PRUNE_LAYERS: tuple[int, ...] = scaled_prune_layers(23)


class LlavaNextVideoAdapter(LlavaOnevisionAdapter):
    model_types = ("llava_next_video",)
    family = "LLaVA-NeXT-Video"
    model_class = "LlavaNextVideoForConditionalGeneration"
    required_modules = ("vision_tower", "multi_modal_projector", "vision_resampler")
    video_kwargs = ("vision_feature_layer", "vision_feature_select_strategy")
    consumed_kwargs = ()
    extra_tokens_per_video = 0
    presets_tuned = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.pool_mode = getattr(self.config, "spatial_pool_mode", "average")
        if self.pool_mode not in ("average", "max", "conv"):
            raise TypeError(f"config.spatial_pool_mode must be 'average', 'max' or 'conv', got {self.pool_mode!r}")

    def pooled_tokens(self) -> int:
        """Tokens per frame after the resampler: a stride x stride pooling without padding."""
        stride = getattr(self.config, "spatial_pool_stride", None)
        if not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride <= self.grid:
            raise TypeError(
                f"config.spatial_pool_stride must be an int in [1, {self.grid}] (the patch grid), got {stride!r}"
            )
        self.stride = stride
        return (self.grid // stride) ** 2

    def projector_input(self, n_layers: int) -> int | None:
        # The 'conv' resampler sets its own channel count.
        return None if self.pool_mode == "conv" else super().projector_input(n_layers)

    def to_llm(self, feats: torch.Tensor, scores: torch.Tensor, clock, t0) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's resampler, then its projector (its order); the scores pooled alike."""
        pooled = self.inner.vision_resampler(feats)
        n, g, s = scores.shape[0], self.grid, self.stride
        grid = scores.to(torch.float32).reshape(n, 1, g, g)
        pool = F.max_pool2d if self.pool_mode == "max" else F.avg_pool2d
        pooled_scores = pool(grid, kernel_size=s, stride=s).reshape(n, -1)
        t1 = clock.now()
        clock.span("pooling", t0, t1)
        proj = self.inner.multi_modal_projector(pooled)
        clock.span("projector", t1, clock.now())
        return proj, pooled_scores
