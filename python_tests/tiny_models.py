"""Tiny random LLaVA-OneVision models and hand-built inputs for tests and benchmarks.

The vision tower is a real SigLIP architecture with the real frame geometry (384x384 pixels,
14x14 patches, 27x27 = 729 tokens per frame, pooled to 14x14 = 196 tokens per frame), but few
layers and a small width; the language model is a tiny Qwen2. Nothing is downloaded: weights are
random (seeded), inputs are built by hand (no processor, no torchvision).

Works with transformers 4.57.x and 5.x.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from earlytom_ext.tiny_model import (  # noqa: F401  (re-exported for the tests)
    GRID, IMAGE_SIZE, IMAGE_TOKEN_ID, PAD_ID, PATCH_SIZE, POOLED, TEXT_ID_RANGE, TOKENS_PER_FRAME, VIDEO_TOKEN_ID,
    VOCAB, build_model, tiny_config,
)


def make_video(num_frames: int, seed: int = 0, kind: str = "scenes", scene_length: int = 4,
               noise: float = 0.05, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Pixels ``[T, 3, H, W]`` in SigLIP's normalised range (about [-1, 1]).

    ``kind``: ``"scenes"`` (blocks of ``scene_length`` near-identical frames, a new random image
    per block), ``"static"`` (one image plus small noise), ``"random"`` (every frame different),
    ``"identical"`` (exactly equal frames).
    """
    if kind not in ("scenes", "static", "random", "identical"):
        raise ValueError(f"kind must be one of scenes, static, random, identical; got {kind!r}")
    g = torch.Generator().manual_seed(seed)

    def image():
        # Low-frequency content (like a real picture) plus a little detail.
        coarse = torch.rand(1, 3, 12, 12, generator=g) * 2 - 1
        img = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear",
                                              align_corners=False)[0]
        return img + 0.1 * (torch.rand(3, image_size, image_size, generator=g) * 2 - 1)

    if kind == "identical":
        return image().unsqueeze(0).repeat(num_frames, 1, 1, 1).clamp(-1, 1)
    frames = []
    base = image()
    for t in range(num_frames):
        if kind == "random":
            base = image()
        elif kind == "scenes" and t % scene_length == 0 and t > 0:
            base = image()
        frames.append(base + noise * (torch.rand(base.shape, generator=g) * 2 - 1))
    return torch.stack(frames).clamp(-1, 1)


def make_image(seed: int = 0, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """One image's pixel input for LLaVA-OV anyres with pinpoints [[384, 384]]: ``[2, 3, H, W]``
    (base view + one tile)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    img = torch.rand(3, image_size, image_size, generator=g) * 2 - 1
    return torch.stack([img, img.flip(-1)])


def video_token_count(num_frames: int) -> int:
    """Placeholders the unpatched model expects for one video: ``T * 196 + 1``."""
    return num_frames * TOKENS_PER_FRAME + 1


def image_token_count(model, image_pixels: torch.Tensor) -> int:
    """Placeholders the unpatched model expects for one image (asks the model itself)."""
    sizes = torch.tensor([[image_pixels.shape[-2], image_pixels.shape[-1]]])
    with torch.no_grad():
        out = model.model.get_image_features(
            pixel_values=image_pixels.unsqueeze(0).to(model.dtype), image_sizes=sizes,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        return sum(int(f.shape[0]) for f in feats)
    return int(feats.shape[0])


def _text(g, n):
    lo, hi = TEXT_ID_RANGE
    return torch.randint(lo, hi, (n,), generator=g).tolist()


def make_inputs(videos: Sequence[torch.Tensor], seed: int = 0, prefix_lengths: Optional[Sequence[int]] = None,
                suffix_lengths: Optional[Sequence[int]] = None, padding_side: str = "left",
                images: Optional[Sequence[Optional[torch.Tensor]]] = None, image_tokens: Optional[int] = None,
                video_tokens: Optional[Sequence[int]] = None) -> dict:
    """Model inputs for one video per sample: ``text, [image], video placeholders, text``.

    ``videos``: list of ``[T, 3, H, W]`` with the same ``T`` (stacked into
    ``pixel_values_videos [B, T, 3, H, W]``). ``images``: optional list (one entry per sample,
    ``None`` for no image) of ``[2, 3, H, W]`` image inputs; then ``image_tokens`` (from
    :func:`image_token_count`) is required. Samples are padded to one length on
    ``padding_side`` with ``PAD_ID`` and attention mask 0.
    """
    g = torch.Generator().manual_seed(seed)
    B = len(videos)
    prefix_lengths = list(prefix_lengths) if prefix_lengths is not None else [3 + 2 * b for b in range(B)]
    suffix_lengths = list(suffix_lengths) if suffix_lengths is not None else [4] * B
    seqs: List[List[int]] = []
    image_list = []
    for b, v in enumerate(videos):
        ids = _text(g, prefix_lengths[b])
        if images is not None and images[b] is not None:
            if image_tokens is None:
                raise ValueError("image_tokens is required with images")
            ids += [IMAGE_TOKEN_ID] * image_tokens + _text(g, 2)
            image_list.append(images[b])
        n_vid = video_tokens[b] if video_tokens is not None else video_token_count(int(v.shape[0]))
        ids += [VIDEO_TOKEN_ID] * n_vid
        ids += _text(g, suffix_lengths[b])
        seqs.append(ids)
    L = max(len(s) for s in seqs)
    input_ids = torch.full((B, L), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    for b, s in enumerate(seqs):
        if padding_side == "left":
            input_ids[b, L - len(s):] = torch.tensor(s)
            attention_mask[b, L - len(s):] = 1
        else:
            input_ids[b, :len(s)] = torch.tensor(s)
            attention_mask[b, :len(s)] = 1
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values_videos": torch.stack(list(videos)),
    }
    if image_list:
        out["pixel_values"] = torch.stack(image_list)
        out["image_sizes"] = torch.tensor([[img.shape[-2], img.shape[-1]] for img in image_list])
    return out
