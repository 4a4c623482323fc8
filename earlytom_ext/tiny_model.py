"""Small random LLaVA-OneVision models (nothing downloaded), used by the demo and the tests.

The vision tower is a real SigLIP architecture with LLaVA-OneVision's frame geometry (384x384
pixels, 14x14 patches, 27x27 = 729 tokens per frame, pooled to 14x14 = 196), with few layers
and a small width unless told otherwise; the language model is a tiny Qwen2. Weights are random
(seeded). Works with transformers 4.57.x and 5.x.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

IMAGE_SIZE = 384
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 27
POOLED = math.ceil(GRID / 2)  # 14
TOKENS_PER_FRAME = POOLED * POOLED  # 196

VOCAB = 320
PAD_ID = 0
IMAGE_TOKEN_ID = 300
VIDEO_TOKEN_ID = 301
TEXT_ID_RANGE = (1, 290)


def tiny_config(
    vision_layers: int = 6,
    vision_hidden: int = 64,
    vision_heads: int = 4,
    text_layers: int = 2,
    text_hidden: int = 64,
    text_heads: int = 4,
    vision_feature_layer=-1,
    vision_feature_select_strategy: str = "full",
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
    max_position_embeddings: int = 16384,
):
    """A ``LlavaOnevisionConfig`` for a tiny SigLIP + Qwen2 model."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    cfg = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        image_grid_pinpoints=[[image_size, image_size]],
        tie_word_embeddings=False,
    )
    # Make sure every path is set in both transformers versions.
    cfg.pad_token_id = PAD_ID
    return cfg


def build_model(seed: int = 0, attn_implementation: Optional[str] = "sdpa", dtype=torch.float32,
                device="cpu", **config_kwargs):
    """A tiny random ``LlavaOnevisionForConditionalGeneration`` in eval mode (seeded)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    cfg = tiny_config(**config_kwargs)
    torch.manual_seed(seed)
    kwargs = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg, **kwargs)
    # Small random weights give near-uniform attention; a larger init makes the attention
    # scores (and so Stage II) depend clearly on the content.
    with torch.no_grad():
        for name, p in model.model.vision_tower.named_parameters():
            if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
                p.normal_(0.0, 2.0 / math.sqrt(p.shape[1]))
    model = model.to(device=device, dtype=dtype).eval()
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        gc.pad_token_id = PAD_ID
        gc.eos_token_id = None
        gc.do_sample = False
    return model
