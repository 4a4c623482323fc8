"""Video-LLaVA (a CLIP video tower of its own, every frame's tokens with the class token, no pooling).

The encoder side is LLaVA-OneVision's (forward hooks on the prune layers of ``model.model.video_tower``,
Q and K of the last one from its ``q_proj`` / ``k_proj``); the image tower is another module and is
never touched. A Stage I frame is one CLIP frame, its class token included (it is merged with its
frame like every other token). After the encoder: the feature layer(s) (the model's default is the
second-to-last layer), then the model's projector. The model keeps the class token of video frames
(its ``vision_feature_select_strategy`` applies to images only), so the LLM sees ``grid * grid + 1``
tokens per frame (257 at 224 px) and Stage II selects from all of them, the class token being the
first position of a frame.
"""

from __future__ import annotations

import torch

from .base import scaled_prune_layers
from .llava_onevision import LlavaOnevisionAdapter

__all__ = ["VIDEO_LLAVA_PRUNE_LAYERS", "VideoLlavaAdapter"]

#: Prune layers of Video-LLaVA-7B (CLIP ViT-L/14 at 224 px, 24 layers, features from the
#: second-to-last): the paper's SigLIP layers (6, 21, 23 of 26) scaled to the 23 layers that feed the
#: features, so that two layers run after the last one, as in the paper.
VIDEO_LLAVA_PRUNE_LAYERS: tuple[int, ...] = scaled_prune_layers(23)


class VideoLlavaAdapter(LlavaOnevisionAdapter):
    model_types = ("video_llava",)
    family = "Video-LLaVA"
    model_class = "VideoLlavaForConditionalGeneration"
    required_modules = ("video_tower", "multi_modal_projector")
    tower_name = "video_tower"
    # The model's select strategy is for images: a call's value stays with the call.
    video_kwargs = ("vision_feature_layer",)
    consumed_kwargs = ()
    extra_tokens_per_video = 0
    presets_tuned = False

    def pooled_tokens(self) -> int:
        """Tokens per frame the LLM sees: every patch and the class token (CLIP), no pooling."""
        return self.grid * self.grid + int(self.class_token)

    def select_strategy(self, vision_feature_select_strategy) -> str:
        # Video features keep every token, as the model's get_video_features.
        return "full"

    def to_llm(self, feats: torch.Tensor, scores: torch.Tensor, clock, t0) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's projector; the scores as they are (fp32)."""
        proj = self.inner.multi_modal_projector(feats)
        clock.span("projector", t0, clock.now())
        return proj, scores.to(torch.float32)
