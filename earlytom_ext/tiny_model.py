"""Random LLaVA-OneVision models and synthetic inputs (nothing downloaded): the one home of the
model builder and the synthetic videos used by the demo, the tests and the benchmarks.

The vision tower is a real SigLIP architecture with LLaVA-OneVision's frame geometry (384x384
pixels, 14x14 patches, 27x27 = 729 tokens per frame, pooled to 14x14 = 196); the language model
is a Qwen2. By default both are tiny (few layers, small widths); the keyword-only arguments of
:func:`tiny_config` describe any size (``bench/models.py`` builds the LLaVA-OneVision-7B
architecture through it). Weights are random (seeded). Works with transformers 4.57.x and 5.x.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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

#: kinds of :func:`make_video`.
VIDEO_KINDS = ("scenes", "static", "random", "identical", "crossfade")

__all__ = [
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "GRID",
    "POOLED",
    "TOKENS_PER_FRAME",
    "VOCAB",
    "PAD_ID",
    "IMAGE_TOKEN_ID",
    "VIDEO_TOKEN_ID",
    "TEXT_ID_RANGE",
    "VIDEO_KINDS",
    "tiny_config",
    "from_config",
    "build_model",
    "make_video",
    "make_feature_video",
    "make_image",
    "video_token_count",
    "image_token_count",
    "make_inputs",
]


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
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
    *,
    vision_mlp: int | None = None,
    text_mlp: int | None = None,
    text_kv_heads: int | None = None,
    vocab: int = VOCAB,
    pad_token_id: int = PAD_ID,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
    rope_theta: float | None = None,
):
    """A ``LlavaOnevisionConfig`` of a SigLIP + Qwen2 model.

    The defaults give a tiny model; ``vision_mlp`` / ``text_mlp`` default to twice the hidden
    size, ``text_kv_heads`` to ``text_heads``, ``rope_theta`` to the Qwen2 default.
    """
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_mlp if vision_mlp is not None else 2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    text_kwargs = {}
    if rope_theta is not None:
        text_kwargs["rope_theta"] = rope_theta
    text = Qwen2Config(
        vocab_size=vocab,
        hidden_size=text_hidden,
        intermediate_size=text_mlp if text_mlp is not None else 2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads if text_kv_heads is not None else text_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
        **text_kwargs,
    )
    cfg = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        image_grid_pinpoints=[[image_size, image_size]],
        tie_word_embeddings=False,
    )
    # Make sure every path is set in both transformers versions.
    cfg.pad_token_id = pad_token_id
    return cfg


def from_config(cls, cfg, dtype=None, attn_implementation: str | None = None):
    """``cls._from_config(cfg)`` with random weights, in ``dtype`` when given (transformers 5.x
    spells the argument ``dtype``, 4.x ``torch_dtype``). Allocates on the current default
    device (``with torch.device(...)``)."""
    kwargs = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is None:
        return cls._from_config(cfg, **kwargs)
    try:
        return cls._from_config(cfg, dtype=dtype, **kwargs)
    except TypeError as e:  # transformers 4.x spells it torch_dtype (5.x: dtype)
        if "dtype" not in str(e):
            raise
        return cls._from_config(cfg, torch_dtype=dtype, **kwargs)


def build_model(
    seed: int = 0,
    attn_implementation: str | None = "sdpa",
    dtype=torch.float32,
    device="cpu",
    *,
    init_on_device: bool = False,
    sharpen_attention: bool = True,
    **config_kwargs,
):
    """A random ``LlavaOnevisionForConditionalGeneration`` in eval mode (seeded).

    ``config_kwargs`` go to :func:`tiny_config`. By default the weights are drawn on the CPU and
    then moved (the same weights on every device). ``init_on_device=True`` allocates and
    initialises them directly on ``device`` in ``dtype`` (what a multi-billion-parameter model
    needs: no host copy, Hugging Face's initialisation runs on the GPU). ``sharpen_attention``
    widens the vision tower's Q/K initialisation (see below).
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    cfg = tiny_config(**config_kwargs)
    device = torch.device(device)
    torch.manual_seed(seed)
    if init_on_device:
        if device.type == "cuda":
            torch.cuda.manual_seed_all(seed)
        with device:
            model = from_config(LlavaOnevisionForConditionalGeneration, cfg, dtype, attn_implementation)
    else:
        model = from_config(LlavaOnevisionForConditionalGeneration, cfg, None, attn_implementation)
    if sharpen_attention:
        # Small random weights give near-uniform attention; a larger init makes the attention
        # scores (and so Stage II) depend clearly on the content.
        with torch.no_grad():
            for name, p in model.model.vision_tower.named_parameters():
                if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
                    p.normal_(0.0, 2.0 / math.sqrt(p.shape[1]))
    model = model.to(device=device, dtype=dtype).eval()
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        gc.pad_token_id = cfg.pad_token_id
        gc.eos_token_id = None  # generate always runs to max_new_tokens
        gc.do_sample = False
        for k in ("temperature", "top_p", "top_k"):  # sampling settings unused by greedy search
            if hasattr(gc, k):
                setattr(gc, k, None)
    return model


# --------------------------------------------------------------------------------------------
# Synthetic videos and images
# --------------------------------------------------------------------------------------------
def _check_frames(name: str, n) -> int:
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"{name} must be an int >= 1, got {n!r}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def _crossfade(num_frames: int, seed: int, scene_length: int, noise: float, image_size: int, device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    n_key = num_frames // scene_length + 2
    coarse = torch.rand(n_key, 3, 12, 12, generator=g) * 2 - 1
    keys = torch.nn.functional.interpolate(
        coarse.to(device), size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    t = torch.arange(num_frames, device=device, dtype=torch.float32) / scene_length
    i0 = t.floor().long()
    a = (t - i0).view(-1, 1, 1, 1)
    frames = (1 - a) * keys[i0] + a * keys[i0 + 1]
    # The noise is drawn where the frames are (a 128-frame clip is built on the GPU in a blink).
    gd = torch.Generator(device=device).manual_seed(seed + 1) if torch.device(device).type == "cuda" else g
    return frames + noise * (torch.rand(frames.shape, generator=gd, device=device) * 2 - 1)


def make_video(
    num_frames: int,
    seed: int = 0,
    kind: str = "scenes",
    scene_length: int = 4,
    noise: float = 0.05,
    image_size: int = IMAGE_SIZE,
    *,
    device="cpu",
    dtype=torch.float32,
) -> torch.Tensor:
    """Pixels ``[T, 3, H, W]`` in SigLIP's normalised range (clamped to [-1, 1]), on ``device``.

    ``kind``: ``"scenes"`` (blocks of ``scene_length`` near-identical frames, a new random image
    per block), ``"static"`` (one image plus small noise), ``"random"`` (every frame different),
    ``"identical"`` (exactly equal frames), ``"crossfade"`` (a new low-frequency picture every
    ``scene_length`` frames with linear cross-fades in between plus ``noise``: neighbouring
    frames are similar, distant ones are not; built directly on ``device``). Deterministic for a
    given ``seed``.
    """
    _check_frames("num_frames", num_frames)
    if kind not in VIDEO_KINDS:
        raise ValueError(f"kind must be one of {', '.join(VIDEO_KINDS)}; got {kind!r}")
    if not isinstance(scene_length, int) or isinstance(scene_length, bool) or scene_length < 1:
        raise ValueError(f"scene_length must be an int >= 1, got {scene_length!r}")
    if kind == "crossfade":
        return _crossfade(num_frames, seed, scene_length, noise, image_size, device).clamp(-1, 1).to(dtype)
    g = torch.Generator().manual_seed(seed)

    def image():
        # Low-frequency content (like a real picture) plus a little detail.
        coarse = torch.rand(1, 3, 12, 12, generator=g) * 2 - 1
        img = torch.nn.functional.interpolate(
            coarse, size=(image_size, image_size), mode="bilinear", align_corners=False
        )[0]
        return img + 0.1 * (torch.rand(3, image_size, image_size, generator=g) * 2 - 1)

    if kind == "identical":
        video = image().unsqueeze(0).repeat(num_frames, 1, 1, 1).clamp(-1, 1)
    else:
        frames = []
        base = image()
        for t in range(num_frames):
            if kind == "random":
                base = image()
            elif kind == "scenes" and t % scene_length == 0 and t > 0:
                base = image()
            frames.append(base + noise * (torch.rand(base.shape, generator=g) * 2 - 1))
        video = torch.stack(frames).clamp(-1, 1)
    return video.to(device=device, dtype=dtype)


def make_feature_video(num_frames: int, tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Encoder features ``[T, S, D]`` (float32, CPU) of a synthetic video: scenes of 2-8 frames
    with per-frame noise of random level, so Stage I sees a mix of segment lengths, interior
    merges and pass-through frames (random features would never merge anything)."""
    _check_frames("num_frames", num_frames)
    g = torch.Generator().manual_seed(seed)
    frames, left, cur = [], 0, None
    for _ in range(num_frames):
        if left == 0:
            cur = torch.randn(tokens, dim, generator=g)
            left = int(torch.randint(2, 9, (1,), generator=g))
        frames.append(cur)
        left -= 1
    lvl = 0.1 + 0.6 * torch.rand(num_frames, 1, 1, generator=g)
    return torch.stack(frames) + lvl * torch.randn(num_frames, tokens, dim, generator=g)


def make_image(seed: int = 0, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """One image's pixel input for LLaVA-OV anyres with pinpoints [[384, 384]]: ``[2, 3, H, W]``
    (base view + one tile)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    img = torch.rand(3, image_size, image_size, generator=g) * 2 - 1
    return torch.stack([img, img.flip(-1)])


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------
def video_token_count(num_frames: int, tokens_per_frame: int = TOKENS_PER_FRAME) -> int:
    """Placeholders the unpatched model expects for one video: ``T * tokens_per_frame + 1``
    (196 tokens per frame after pooling, plus one newline)."""
    return num_frames * tokens_per_frame + 1


def image_token_count(model, image_pixels: torch.Tensor) -> int:
    """Placeholders the unpatched model expects for one image (asks the model itself)."""
    sizes = torch.tensor([[image_pixels.shape[-2], image_pixels.shape[-1]]])
    with torch.no_grad():
        out = model.model.get_image_features(
            pixel_values=image_pixels.unsqueeze(0).to(model.dtype),
            image_sizes=sizes,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        return sum(int(f.shape[0]) for f in feats)
    return int(feats.shape[0])


def make_inputs(
    videos: Sequence[torch.Tensor],
    seed: int = 0,
    prefix_lengths: Sequence[int] | None = None,
    suffix_lengths: Sequence[int] | None = None,
    padding_side: str = "left",
    images: Sequence[torch.Tensor | None] | None = None,
    image_tokens: int | None = None,
    video_tokens: Sequence[int] | None = None,
    *,
    video_token_id: int = VIDEO_TOKEN_ID,
    image_token_id: int = IMAGE_TOKEN_ID,
    pad_token_id: int = PAD_ID,
    text_id_range: tuple[int, int] = TEXT_ID_RANGE,
) -> dict:
    """Model inputs for one video per sample: ``text, [image], video placeholders, text``.

    ``videos``: ``[T, 3, H, W]`` tensors with the same ``T`` (stacked into
    ``pixel_values_videos [B, T, 3, H, W]``). ``images``: optional list (one entry per sample,
    ``None`` for no image) of ``[2, 3, H, W]`` image inputs; then ``image_tokens`` (from
    :func:`image_token_count`) is required. ``video_tokens``: placeholders per sample (default
    :func:`video_token_count`). Text ids are drawn from ``text_id_range`` (seeded). Samples are
    padded to one length on ``padding_side`` with ``pad_token_id`` and attention mask 0;
    ``input_ids`` and ``attention_mask`` are on the CPU.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    g = torch.Generator().manual_seed(seed)
    lo, hi = text_id_range

    def text(n: int) -> list[int]:
        return torch.randint(lo, hi, (n,), generator=g).tolist()

    B = len(videos)
    prefix_lengths = list(prefix_lengths) if prefix_lengths is not None else [3 + 2 * b for b in range(B)]
    suffix_lengths = list(suffix_lengths) if suffix_lengths is not None else [4] * B
    seqs: list[list[int]] = []
    image_list = []
    for b, v in enumerate(videos):
        ids = text(prefix_lengths[b])
        if images is not None and images[b] is not None:
            if image_tokens is None:
                raise ValueError("image_tokens is required with images")
            ids += [image_token_id] * image_tokens + text(2)
            image_list.append(images[b])
        n_vid = video_tokens[b] if video_tokens is not None else video_token_count(int(v.shape[0]))
        ids += [video_token_id] * int(n_vid)
        ids += text(suffix_lengths[b])
        seqs.append(ids)
    L = max(len(s) for s in seqs)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    for b, s in enumerate(seqs):
        if padding_side == "left":
            input_ids[b, L - len(s) :] = torch.tensor(s)
            attention_mask[b, L - len(s) :] = 1
        else:
            input_ids[b, : len(s)] = torch.tensor(s)
            attention_mask[b, : len(s)] = 1
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values_videos": torch.stack(list(videos)),
    }
    if image_list:
        out["pixel_values"] = torch.stack(image_list)
        out["image_sizes"] = torch.tensor([[img.shape[-2], img.shape[-1]] for img in image_list])
    return out
