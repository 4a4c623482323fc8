"""Qwen2-VL (ViT with 2-D rotary and full attention in every block, 2x2 patch merger, 3-D multimodal
rotary in the LLM).

The Qwen2.5-VL adapter without windows: a Stage I frame is one temporal patch group, every block
attends over the whole group (the model runs one attention per group), the last prune layer's score
is the attention each patch receives from its group, Stage II runs on the merger's tokens, and the
kept tokens keep their original 3-D rotary positions (read from the model's own ``get_rope_index``;
Qwen2-VL's temporal positions count groups, with no time step). See docs/qwen2_5_vl.md.
"""

from __future__ import annotations

from .base import scaled_prune_layers
from .qwen2_5_vl import Qwen2_5_VLAdapter

__all__ = ["QWEN2_VL_PRUNE_LAYERS", "Qwen2VLAdapter"]

#: Prune layers for the 32-block encoder of Qwen2-VL (2B / 7B / 72B): the paper's SigLIP layers
#: (6, 21, 23 of 26) at about the same depths (25 / 80 / 88 %); every block is a full-attention block.
QWEN2_VL_PRUNE_LAYERS: tuple[int, ...] = scaled_prune_layers(32)


class Qwen2VLAdapter(Qwen2_5_VLAdapter):
    model_types = ("qwen2_vl",)
    family = "Qwen2-VL"
    model_class = "Qwen2VLForConditionalGeneration"
    windowed = False
    video_kwargs = ("video_grid_thw", "image_grid_thw", "mm_token_type_ids")
    consumed_kwargs = ("video_grid_thw",)

    def default_prune_layers(self) -> tuple[int, ...]:
        return scaled_prune_layers(self.depth)
