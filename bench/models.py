"""Benchmark models and inputs: the LLaVA-OneVision architectures the benchmarks run, built with
random weights through ``earlytom_ext.tiny_model`` (the one home of the model builder and the
synthetic videos), and the prompts around the videos.

Three model sizes:

* ``"llava-ov-7b"``: the LLaVA-OneVision-7B architecture (SigLIP-so400m with 26 layers, 729
  tokens per 384x384 frame, hidden 1152, 16 heads, MLP 4304; Qwen2-7B with hidden 3584, 28 layers,
  28 heads / 4 KV heads, MLP 18944, vocabulary 152064; projector 1152 -> 3584 -> 3584), random
  weights. Timing on the real architecture is valid at random init; segment statistics are not
  (see ``bench/README.md``, "Merge patterns").
* ``"tiny"``: the same frame geometry (384x384 pixels, 14x14 patches, 27x27 tokens pooled to
  14x14) and the same encoder depth (26 layers, so the paper's prune-layer presets apply
  unchanged), but tiny widths. Used for the CPU quick run.
* ``"micro"``: like ``"tiny"`` with 112x112 frames (8x8 encoder tokens pooled to 4x4), for the
  unit-test smoke run where every second counts.

Nothing is downloaded: weights are random, inputs are built by hand (no processor).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from earlytom_ext import tiny_model as tm

IMAGE_SIZE = tm.IMAGE_SIZE
PATCH_SIZE = tm.PATCH_SIZE
TOKENS_PER_FRAME = tm.TOKENS_PER_FRAME  # 196 (after LLaVA-OneVision's 2x bilinear pooling)
PREFIX_TOKENS = 14  # text before the video (about LLaVA-OneVision's chat template)
SUFFIX_TOKENS = 18  # text after it (a question)
TEXT_TOKENS = PREFIX_TOKENS + SUFFIX_TOKENS


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers of one benchmark model (also used by the FLOPs count)."""

    name: str
    vision_hidden: int
    vision_mlp: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_mlp: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vocab: int
    image_token_id: int
    video_token_id: int
    pad_token_id: int
    text_id_range: tuple  # [lo, hi) of ordinary text ids used for prompts
    image_size: int = IMAGE_SIZE
    patch_size: int = PATCH_SIZE

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def encoder_tokens(self) -> int:
        """Encoder tokens per frame (729 for LLaVA-OneVision's SigLIP)."""
        return self.grid * self.grid

    @property
    def tokens_per_frame(self) -> int:
        """LLM tokens per frame after the 2x bilinear pooling (196)."""
        return math.ceil(self.grid / 2) ** 2

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["text_id_range"] = list(self.text_id_range)
        d["encoder_tokens_per_frame"] = self.encoder_tokens
        d["llm_tokens_per_frame"] = self.tokens_per_frame
        return d


SPECS: dict[str, ModelSpec] = {
    "llava-ov-7b": ModelSpec(
        name="llava-ov-7b",
        vision_hidden=1152,
        vision_mlp=4304,
        vision_layers=26,
        vision_heads=16,
        text_hidden=3584,
        text_mlp=18944,
        text_layers=28,
        text_heads=28,
        text_kv_heads=4,
        vocab=152064,
        image_token_id=151646,
        video_token_id=151647,
        pad_token_id=151643,
        text_id_range=(1000, 150000),
    ),
    "tiny": ModelSpec(
        name="tiny",
        vision_hidden=32,
        vision_mlp=64,
        vision_layers=26,
        vision_heads=2,
        text_hidden=64,
        text_mlp=128,
        text_layers=2,
        text_heads=4,
        text_kv_heads=2,
        vocab=320,
        image_token_id=300,
        video_token_id=301,
        pad_token_id=0,
        text_id_range=(3, 290),
    ),
}
SPECS["micro"] = replace(SPECS["tiny"], name="micro", image_size=112)


def get_spec(name: str) -> ModelSpec:
    if name not in SPECS:
        raise ValueError(f"model must be one of {sorted(SPECS)}, got {name!r}")
    return SPECS[name]


def config_kwargs(spec: ModelSpec) -> dict:
    """Keyword arguments of ``earlytom_ext.tiny_model.tiny_config`` / ``build_model`` for ``spec``."""
    return dict(
        vision_layers=spec.vision_layers,
        vision_hidden=spec.vision_hidden,
        vision_heads=spec.vision_heads,
        vision_mlp=spec.vision_mlp,
        text_layers=spec.text_layers,
        text_hidden=spec.text_hidden,
        text_heads=spec.text_heads,
        text_kv_heads=spec.text_kv_heads,
        text_mlp=spec.text_mlp,
        vocab=spec.vocab,
        image_token_id=spec.image_token_id,
        video_token_id=spec.video_token_id,
        pad_token_id=spec.pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )


def hf_config(spec: ModelSpec):
    """A ``transformers.LlavaOnevisionConfig`` for ``spec``."""
    return tm.tiny_config(**config_kwargs(spec))


def build_model(
    spec_name: str = "llava-ov-7b",
    device="cuda",
    dtype=torch.bfloat16,
    seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """Random-weight ``LlavaOnevisionForConditionalGeneration`` built directly on ``device``.

    Parameters are allocated on the target device in the target dtype, so the 8B-parameter
    model never goes through host memory and Hugging Face's initialisation runs on the GPU (a
    few seconds). Returns ``(model, info)`` with the build time and parameter count in ``info``.
    """
    spec = get_spec(spec_name)
    device = torch.device(device)
    t0 = time.perf_counter()
    model = tm.build_model(
        seed=seed,
        attn_implementation=attn_implementation,
        dtype=dtype,
        device=device,
        init_on_device=True,
        sharpen_attention=False,
        **config_kwargs(spec),
    )
    model.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    info = {
        "model": spec_name,
        "build_s": time.perf_counter() - t0,
        "params": sum(p.numel() for p in model.parameters()),
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "dtype": str(dtype).replace("torch.", ""),
        "attn_implementation": attn_implementation,
    }
    return model, info


def check_weights_finite(model) -> bool:
    """True when every parameter is finite (one reduction per tensor)."""
    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def make_video(
    num_frames: int, *, device="cpu", dtype=torch.float32, seed: int = 0, image_size: int = IMAGE_SIZE
) -> torch.Tensor:
    """The benchmark clip ``[T, 3, H, W]``: ``tiny_model.make_video(kind="crossfade")`` with a new
    picture every 8 frames and a little noise (neighbouring frames are similar)."""
    return tm.make_video(
        num_frames,
        seed=seed,
        kind="crossfade",
        scene_length=8,
        noise=0.03,
        image_size=image_size,
        device=device,
        dtype=dtype,
    )


def video_placeholders(num_frames: int, spec: ModelSpec | None = None) -> int:
    """Video placeholders of the uncompressed model for one video: ``T * 196 + 1``."""
    return tm.video_token_count(num_frames, spec.tokens_per_frame if spec is not None else TOKENS_PER_FRAME)


def make_inputs(
    spec: ModelSpec, videos: torch.Tensor, *, video_tokens: Sequence[int] | None = None, seed: int = 0
) -> dict:
    """Generation inputs for a batch of videos ``[B, T, 3, H, W]`` (one video per sample).

    Each sample is ``PREFIX_TOKENS`` text tokens, the video placeholders (``video_tokens`` per
    sample, default the uncompressed ``T * 196 + 1``), ``SUFFIX_TOKENS`` text tokens; shorter
    samples are left-padded. All tensors are on ``videos.device``.
    """
    B, T = int(videos.shape[0]), int(videos.shape[1])
    counts = list(video_tokens) if video_tokens is not None else [video_placeholders(T, spec)] * B
    inputs = tm.make_inputs(
        list(videos),
        seed=seed,
        prefix_lengths=[PREFIX_TOKENS] * B,
        suffix_lengths=[SUFFIX_TOKENS] * B,
        video_tokens=counts,
        video_token_id=spec.video_token_id,
        image_token_id=spec.image_token_id,
        pad_token_id=spec.pad_token_id,
        text_id_range=spec.text_id_range,
    )
    return {
        "input_ids": inputs["input_ids"].to(videos.device),
        "attention_mask": inputs["attention_mask"].to(videos.device),
        "pixel_values_videos": videos,
    }


def make_batch(spec: ModelSpec, batch: int, frames: int, *, device="cpu", dtype=torch.float32, seed: int = 0) -> dict:
    """``batch`` different synthetic videos of ``frames`` frames and their uncompressed inputs."""
    videos = torch.stack(
        [
            make_video(frames, device=device, dtype=dtype, seed=seed + 17 * b, image_size=spec.image_size)
            for b in range(batch)
        ]
    )
    return make_inputs(spec, videos, seed=seed)
