"""TTFT of the LLaVA-NeXT-Video-7B architecture with random weights, bf16, SDPA: stock and EarlyTom.

The configuration is written by hand to match ``llava-hf/LLaVA-NeXT-Video-7B-hf`` (nothing is
downloaded): CLIP ViT-L/14 at 336 px (24 layers, hidden 1024, 16 heads, MLP 4096; features from
the second-to-last layer without the class token), the 2x2 average resampler (144 tokens per
frame), the projector 1024 -> 4096 -> 4096, and the Vicuna-7B language model (Llama: hidden 4096,
32 layers, 32 heads, MLP 11008, vocabulary 32064; its linear rope scaling is left out, it costs
no time). The video: 32 frames at 336x336 (the crossfade clip of ``tiny_model.make_video``), 4608
video tokens. EarlyTom runs at ``LLAVA_NEXT_VIDEO_PRUNE_LAYERS`` with the preset's other settings.

Before building the 7B model the section checks, on a tiny model of the family on the CPU, that
``earlytom_ext.apply`` accepts it; otherwise the section is skipped with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from bench.common import Budget
from bench.family import apply_accepted, family_benchmark, ready_model
from earlytom_ext import tiny_model as tm

__all__ = ["SIZES", "availability", "benchmark", "build_model", "earlytom_config", "make_inputs", "next_video_config"]

# llava-hf/LLaVA-NeXT-Video-7B-hf, written out by hand.
_VISION_7B = dict(
    model_type="clip_vision_model",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)
_TEXT_7B = dict(
    model_type="llama",
    vocab_size=32064,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_IDS_7B = dict(image_token_index=32001, video_token_index=32000)
# The same geometry (24 layers, 336 px, 14 px patches) with tiny widths.
_VISION_TINY = dict(_VISION_7B, hidden_size=32, intermediate_size=64, num_attention_heads=2, projection_dim=16)
_TEXT_TINY = dict(
    _TEXT_7B,
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
_IDS_TINY = dict(image_token_index=301, video_token_index=300)

SIZES = {
    # name: (vision, text, ids, text id range, frames)
    "llava-next-video-7b": (_VISION_7B, _TEXT_7B, _IDS_7B, (1000, 31000), 32),
    "tiny": (_VISION_TINY, _TEXT_TINY, _IDS_TINY, (3, 290), 4),
}


def _size(size: str) -> tuple:
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    return SIZES[size]


def earlytom_config(benchmark_preset: str, ratio: float):
    """The paper's settings for ``benchmark_preset`` at ``ratio``, at the family's prune layers."""
    from earlytom_ext.config import preset
    from earlytom_ext.integration.adapters.llava_next_video import LLAVA_NEXT_VIDEO_PRUNE_LAYERS

    return preset(benchmark_preset, ratio).replace(prune_layers=LLAVA_NEXT_VIDEO_PRUNE_LAYERS)


def next_video_config(size: str = "llava-next-video-7b"):
    """A ``LlavaNextVideoConfig`` of ``size``."""
    import transformers

    vision, text, ids = _size(size)[:3]
    cfg = transformers.LlavaNextVideoConfig(
        vision_config=dict(vision),
        text_config=dict(text),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        spatial_pool_mode="average",
        spatial_pool_stride=2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        **ids,
    )
    cfg.pad_token_id = text["pad_token_id"]
    return cfg


def build_model(size: str = "llava-next-video-7b", device="cuda", dtype=torch.bfloat16, seed: int = 0):
    """Random-weight ``LlavaNextVideoForConditionalGeneration`` built directly on ``device``; ``(model, info)``."""
    import transformers

    device = torch.device(device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with device:
        model = tm.from_config(
            transformers.LlavaNextVideoForConditionalGeneration, next_video_config(size), dtype, "sdpa"
        )
    return ready_model(model, size, device, dtype, t0)


def make_inputs(
    model,
    frames: int,
    *,
    batch: int = 1,
    device="cuda",
    dtype=torch.bfloat16,
    seed: int = 0,
    text_id_range=(1000, 31000),
) -> dict:
    """Generate inputs of ``batch`` synthetic videos: ``prefix, video tokens, suffix`` per sample."""
    vc = model.config.vision_config
    grid = vc.image_size // vc.patch_size
    per_frame = (grid // model.config.spatial_pool_stride) ** 2
    videos = [
        tm.make_video(
            frames,
            seed=seed + 17 * b,
            kind="crossfade",
            scene_length=8,
            noise=0.03,
            image_size=vc.image_size,
            device=device,
            dtype=dtype,
        )
        for b in range(batch)
    ]
    g = torch.Generator().manual_seed(seed)
    lo, hi = text_id_range
    rows = [
        torch.randint(lo, hi, (14,), generator=g).tolist()
        + [model.config.video_token_index] * (frames * per_frame)
        + torch.randint(lo, hi, (18,), generator=g).tolist()
        for _ in range(batch)
    ]
    ids = torch.tensor(rows, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": torch.stack(videos)}


def availability(benchmark_preset: str = "videomme", ratio: float = 0.10) -> tuple[bool, str]:
    """Whether ``earlytom_ext.apply`` accepts LLaVA-NeXT-Video (checked on the tiny size, CPU)."""
    import transformers

    if not hasattr(transformers, "LlavaNextVideoForConditionalGeneration"):
        return False, f"transformers {transformers.__version__} has no LlavaNextVideoForConditionalGeneration"
    tiny, _ = build_model("tiny", device="cpu", dtype=torch.float32)
    return apply_accepted(tiny, earlytom_config(benchmark_preset, ratio), "LlavaNextVideoForConditionalGeneration")


def benchmark(
    device="cuda",
    *,
    size: str = "llava-next-video-7b",
    ratios: Sequence[float] = (0.10, 0.25),
    pattern: str = "forced-merge",
    benchmark_preset: str = "videomme",
    warmup: int = 2,
    iters: int = 7,
    dtype=torch.bfloat16,
    seed: int = 0,
    budget: Budget | None = None,
    log=print,
) -> dict:
    """``{"rows": [...], "model_info": ...}`` or ``{"skipped": reason}``: stock and EarlyTom per ratio."""
    from earlytom_ext.integration.adapters.llava_next_video import LLAVA_NEXT_VIDEO_PRUNE_LAYERS

    frames, image_size = _size(size)[4], _size(size)[0]["image_size"]
    return family_benchmark(
        device,
        tag="llava-next-video",
        family="LLaVA-NeXT-Video",
        model_name=size,
        prune_layers=LLAVA_NEXT_VIDEO_PRUNE_LAYERS,
        available=lambda: availability(benchmark_preset, ratios[0]),
        build=lambda: build_model(size, device=device, dtype=dtype, seed=seed),
        make_inputs=lambda model: make_inputs(
            model, frames, device=device, dtype=dtype, seed=seed, text_id_range=SIZES[size][3]
        ),
        earlytom_config=lambda ratio: earlytom_config(benchmark_preset, ratio),
        geometry=dict(frames=frames, image_size=image_size, batch=1),
        ratios=ratios,
        pattern=pattern,
        warmup=warmup,
        iters=iters,
        budget=budget,
        log=log,
    )
