"""TTFT of the LLaVA-NeXT-Video-7B architecture (or Video-LLaVA-7B's: ``size="video-llava-7b"``,
``bench.run --next-video --next-video-model video-llava-7b``) with random weights, bf16, SDPA: stock
and EarlyTom.

The configuration is written by hand to match ``llava-hf/LLaVA-NeXT-Video-7B-hf`` (nothing is
downloaded): CLIP ViT-L/14 at 336 px (24 layers, hidden 1024, 16 heads, MLP 4096; features from
the second-to-last layer without the class token), the 2x2 average resampler (144 tokens per
frame), the projector 1024 -> 4096 -> 4096, and the Vicuna-7B language model (Llama: hidden 4096,
32 layers, 32 heads, MLP 11008, vocabulary 32064; its linear rope scaling is left out, it costs
no time). The video: 32 frames at 336x336 (the crossfade clip of ``tiny_model.make_video``), 4608
video tokens. EarlyTom runs at ``LLAVA_NEXT_VIDEO_PRUNE_LAYERS`` with the preset's other settings.
Video-LLaVA-7B (``LanguageBind/Video-LLaVA-7B-hf``): CLIP ViT-L/14 at 224 px as its video tower (and
another as its image tower), every token of a frame with the class token (257 per frame), the same
projector shape and Vicuna-7B; 8 frames at 224x224, 2056 video tokens; ``VIDEO_LLAVA_PRUNE_LAYERS``.

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

__all__ = [
    "SIZES",
    "TINY",
    "availability",
    "benchmark",
    "build_model",
    "earlytom_config",
    "make_inputs",
    "next_video_config",
    "prune_layers",
    "tokens_per_frame",
]

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

# LanguageBind/Video-LLaVA-7B-hf: the same CLIP-L/14 at 224 px and the same language model.
_VIDEO_LLAVA_VISION_7B = dict(_VISION_7B, image_size=224)
_VIDEO_LLAVA_IDS_7B = dict(image_token_index=32000, video_token_index=32001)
_VIDEO_LLAVA_VISION_TINY = dict(_VISION_TINY, image_size=224)

SIZES = {
    # name: (vision, text, ids, text id range, frames, model_type)
    "llava-next-video-7b": (_VISION_7B, _TEXT_7B, _IDS_7B, (1000, 31000), 32, "llava_next_video"),
    "tiny": (_VISION_TINY, _TEXT_TINY, _IDS_TINY, (3, 290), 4, "llava_next_video"),
    "video-llava-7b": (_VIDEO_LLAVA_VISION_7B, _TEXT_7B, _VIDEO_LLAVA_IDS_7B, (1000, 31000), 8, "video_llava"),
    "tiny-video-llava": (_VIDEO_LLAVA_VISION_TINY, _TEXT_TINY, _IDS_TINY, (3, 290), 4, "video_llava"),
}
#: The 7B sizes and their tiny versions (``bench.run --quick``).
TINY = {"llava-next-video-7b": "tiny", "video-llava-7b": "tiny-video-llava"}
# model_type -> (family, model class, config class, result tag)
_FAMILIES = {
    "llava_next_video": (
        "LLaVA-NeXT-Video",
        "LlavaNextVideoForConditionalGeneration",
        "LlavaNextVideoConfig",
        "llava-next-video",
    ),
    "video_llava": ("Video-LLaVA", "VideoLlavaForConditionalGeneration", "VideoLlavaConfig", "video-llava"),
}


def _size(size: str) -> tuple:
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    return SIZES[size]


def _family(size: str) -> tuple[str, str, str, str]:
    return _FAMILIES[_size(size)[5]]


def prune_layers(size: str = "llava-next-video-7b") -> tuple[int, ...]:
    """The family's prune layers (both: the paper's scaled to the 23 CLIP layers that feed the features)."""
    if _size(size)[5] == "video_llava":
        from earlytom_ext.integration.adapters.video_llava import VIDEO_LLAVA_PRUNE_LAYERS

        return VIDEO_LLAVA_PRUNE_LAYERS
    from earlytom_ext.integration.adapters.llava_next_video import LLAVA_NEXT_VIDEO_PRUNE_LAYERS

    return LLAVA_NEXT_VIDEO_PRUNE_LAYERS


def earlytom_config(benchmark_preset: str, ratio: float, size: str = "llava-next-video-7b"):
    """The paper's settings for ``benchmark_preset`` at ``ratio``, at the family's prune layers."""
    from earlytom_ext.config import preset

    return preset(benchmark_preset, ratio).replace(prune_layers=prune_layers(size))


def next_video_config(size: str = "llava-next-video-7b"):
    """A ``LlavaNextVideoConfig`` (or ``VideoLlavaConfig``) of ``size``."""
    import transformers

    vision, text, ids = _size(size)[:3]
    family_args = (
        dict(spatial_pool_mode="average", spatial_pool_stride=2) if _size(size)[5] == "llava_next_video" else {}
    )
    cfg = getattr(transformers, _family(size)[2])(
        vision_config=dict(vision),
        text_config=dict(text),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        **family_args,
        **ids,
    )
    cfg.pad_token_id = text["pad_token_id"]
    return cfg


def tokens_per_frame(config) -> int:
    """Video placeholders per frame: the resampler's 2x2 pooling (LLaVA-NeXT-Video), or every patch
    and the class token (Video-LLaVA)."""
    vc = config.vision_config
    grid = vc.image_size // vc.patch_size
    if config.model_type == "video_llava":
        return grid * grid + 1
    return (grid // config.spatial_pool_stride) ** 2


def build_model(size: str = "llava-next-video-7b", device="cuda", dtype=torch.bfloat16, seed: int = 0):
    """Random-weight ``LlavaNextVideoForConditionalGeneration`` (or ``VideoLlavaForConditionalGeneration``)
    built directly on ``device``; ``(model, info)``."""
    import transformers

    device = torch.device(device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with device:
        model = tm.from_config(getattr(transformers, _family(size)[1]), next_video_config(size), dtype, "sdpa")
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
    per_frame = tokens_per_frame(model.config)
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


def availability(
    benchmark_preset: str = "videomme", ratio: float = 0.10, size: str = "llava-next-video-7b"
) -> tuple[bool, str]:
    """Whether ``earlytom_ext.apply`` accepts the family of ``size`` (checked on its tiny size, CPU)."""
    import transformers

    model_class = _family(size)[1]
    if not hasattr(transformers, model_class):
        return False, f"transformers {transformers.__version__} has no {model_class}"
    tiny_size = TINY.get(size, size)
    tiny, _ = build_model(tiny_size, device="cpu", dtype=torch.float32)
    return apply_accepted(tiny, earlytom_config(benchmark_preset, ratio, size), model_class)


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
    frames, image_size = _size(size)[4], _size(size)[0]["image_size"]
    family, _, _, tag = _family(size)
    return family_benchmark(
        device,
        tag=tag,
        family=family,
        model_name=size,
        prune_layers=prune_layers(size),
        available=lambda: availability(benchmark_preset, ratios[0], size),
        build=lambda: build_model(size, device=device, dtype=dtype, seed=seed),
        make_inputs=lambda model: make_inputs(
            model, frames, device=device, dtype=dtype, seed=seed, text_id_range=SIZES[size][3]
        ),
        earlytom_config=lambda ratio: earlytom_config(benchmark_preset, ratio, size),
        geometry=dict(frames=frames, image_size=image_size, batch=1),
        ratios=ratios,
        pattern=pattern,
        warmup=warmup,
        iters=iters,
        budget=budget,
        log=log,
    )
