"""Model configurations, fast random-weight construction and synthetic inputs for the benchmarks.

Two model sizes:

* ``"llava-ov-7b"``: the LLaVA-OneVision-7B architecture (SigLIP-so400m with 26 layers, 729
  tokens per 384x384 frame, hidden 1152, 16 heads, MLP 4304; Qwen2-7B with hidden 3584, 28 layers,
  28 heads / 4 KV heads, MLP 18944, vocabulary 152064; projector 1152 -> 3584 -> 3584), random
  weights. Timing on the real architecture is valid at random init; segment statistics are not
  (see ``bench/README.md``, "merge patterns").
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
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

IMAGE_SIZE = 384
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 27
TOKENS_PER_FRAME_ENCODER = GRID * GRID  # 729
POOLED = math.ceil(GRID / 2)  # 14
TOKENS_PER_FRAME = POOLED * POOLED  # 196 (after LLaVA-OneVision's 2x bilinear pooling)


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


SPECS: Dict[str, ModelSpec] = {
    "llava-ov-7b": ModelSpec(
        name="llava-ov-7b", vision_hidden=1152, vision_mlp=4304, vision_layers=26, vision_heads=16,
        text_hidden=3584, text_mlp=18944, text_layers=28, text_heads=28, text_kv_heads=4,
        vocab=152064, image_token_id=151646, video_token_id=151647, pad_token_id=151643,
        text_id_range=(1000, 150000),
    ),
    "tiny": ModelSpec(
        name="tiny", vision_hidden=32, vision_mlp=64, vision_layers=26, vision_heads=2,
        text_hidden=64, text_mlp=128, text_layers=2, text_heads=4, text_kv_heads=2,
        vocab=320, image_token_id=300, video_token_id=301, pad_token_id=0,
        text_id_range=(3, 290),
    ),
    "micro": ModelSpec(
        name="micro", vision_hidden=32, vision_mlp=64, vision_layers=26, vision_heads=2,
        text_hidden=64, text_mlp=128, text_layers=2, text_heads=4, text_kv_heads=2,
        vocab=320, image_token_id=300, video_token_id=301, pad_token_id=0,
        text_id_range=(3, 290), image_size=112,
    ),
}


def get_spec(name: str) -> ModelSpec:
    if name not in SPECS:
        raise ValueError(f"model must be one of {sorted(SPECS)}, got {name!r}")
    return SPECS[name]


def hf_config(spec: ModelSpec):
    """A ``transformers.LlavaOnevisionConfig`` for ``spec``."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_mlp,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=spec.vocab,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_mlp,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        use_sliding_window=False,
        tie_word_embeddings=False,
        pad_token_id=spec.pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
    )
    cfg = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=spec.image_token_id,
        video_token_index=spec.video_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[spec.image_size, spec.image_size]],
        tie_word_embeddings=False,
    )
    cfg.pad_token_id = spec.pad_token_id
    return cfg


def _from_config(cls, cfg, dtype, attn_implementation):
    try:
        return cls._from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    except TypeError as e:  # transformers 4.x spells it torch_dtype (5.x: dtype)
        if "dtype" not in str(e):
            raise
        return cls._from_config(cfg, torch_dtype=dtype, attn_implementation=attn_implementation)


def build_model(spec_name: str = "llava-ov-7b", device="cuda", dtype=torch.bfloat16, seed: int = 0,
                attn_implementation: str = "sdpa"):
    """Random-weight ``LlavaOnevisionForConditionalGeneration`` built directly on ``device``.

    Parameters are allocated on the target device in the target dtype (``with torch.device``), so
    the 8B-parameter model never goes through host memory and Hugging Face's initialisation runs
    on the GPU (a few seconds; no checkpoint, no CPU RNG over billions of values). Returns
    ``(model, info)`` with the build time and parameter count in ``info``.
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    spec = get_spec(spec_name)
    cfg = hf_config(spec)
    device = torch.device(device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    with torch.device(device):
        model = _from_config(LlavaOnevisionForConditionalGeneration, cfg, dtype, attn_implementation)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        gc.pad_token_id = spec.pad_token_id
        gc.eos_token_id = None
        gc.bos_token_id = None
        gc.do_sample = False
        for k in ("temperature", "top_p", "top_k"):
            if hasattr(gc, k):
                setattr(gc, k, None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n_params = sum(p.numel() for p in model.parameters())
    info = {
        "model": spec_name,
        "build_s": time.perf_counter() - t0,
        "params": n_params,
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
def make_video(num_frames: int, *, device="cpu", dtype=torch.float32, seed: int = 0, scene_length: int = 8,
               noise: float = 0.03, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Synthetic video pixels ``[T, 3, H, W]`` in SigLIP's normalised range (about [-1, 1]).

    A new low-frequency random picture every ``scene_length`` frames, the frames in between a
    linear cross-fade to the next picture plus a little per-frame noise: neighbouring frames are
    similar (as in real video), distant ones are not. Deterministic for a given ``seed``; built
    on ``device``.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    n_key = num_frames // scene_length + 2
    coarse = torch.rand(n_key, 3, 12, 12, generator=g) * 2 - 1
    keys = torch.nn.functional.interpolate(coarse.to(device), size=(image_size, image_size),
                                           mode="bilinear", align_corners=False)
    t = torch.arange(num_frames, device=device, dtype=torch.float32) / scene_length
    i0 = t.floor().long()
    a = (t - i0).view(-1, 1, 1, 1)
    frames = (1 - a) * keys[i0] + a * keys[i0 + 1]
    gd = torch.Generator(device=device).manual_seed(seed + 1) if torch.device(device).type == "cuda" else g
    frames = frames + noise * (torch.rand(frames.shape, generator=gd, device=device) * 2 - 1)
    return frames.clamp(-1, 1).to(dtype)


def video_placeholders(num_frames: int, spec: Optional[ModelSpec] = None) -> int:
    """Video placeholders of the uncompressed model for one video: ``T * 196 + 1``."""
    per_frame = spec.tokens_per_frame if spec is not None else TOKENS_PER_FRAME
    return num_frames * per_frame + 1


def make_inputs(spec: ModelSpec, videos: torch.Tensor, *, video_tokens: Optional[Sequence[int]] = None,
                prefix_len: int = 14, suffix_len: int = 18, seed: int = 0) -> dict:
    """Generation inputs for a batch of videos ``[B, T, 3, H, W]`` (one video per sample).

    Each sample is ``prefix text, video placeholders, suffix text`` (about the length of
    LLaVA-OneVision's chat template around a question). ``video_tokens`` gives the placeholder
    count per sample (default: the uncompressed ``T * 196 + 1``); shorter samples are left-padded.
    All tensors are on ``videos.device``.
    """
    B, T = int(videos.shape[0]), int(videos.shape[1])
    device = videos.device
    g = torch.Generator().manual_seed(seed)
    lo, hi = spec.text_id_range
    counts = list(video_tokens) if video_tokens is not None else [video_placeholders(T, spec)] * B
    seqs: List[List[int]] = []
    for b in range(B):
        ids = torch.randint(lo, hi, (prefix_len,), generator=g).tolist()
        ids += [spec.video_token_id] * int(counts[b])
        ids += torch.randint(lo, hi, (suffix_len,), generator=g).tolist()
        seqs.append(ids)
    L = max(len(s) for s in seqs)
    input_ids = torch.full((B, L), spec.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, L - len(s):] = torch.tensor(s)
        attention_mask[b, L - len(s):] = 1
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "pixel_values_videos": videos,
    }


def make_batch(spec: ModelSpec, batch: int, frames: int, *, device="cpu", dtype=torch.float32, seed: int = 0) -> dict:
    """``batch`` different synthetic videos of ``frames`` frames and their uncompressed inputs."""
    videos = torch.stack([make_video(frames, device=device, dtype=dtype, seed=seed + 17 * b, image_size=spec.image_size)
                          for b in range(batch)])
    return make_inputs(spec, videos, seed=seed)


# ---------------------------------------------------------------------------------------------
# Forced ("paper-like") merge patterns
# ---------------------------------------------------------------------------------------------
# With random weights the encoder's frame similarities are not those of a trained SigLIP on real
# video, so the natural segmentation (and with it every frame count) is arbitrary. The forced
# patterns replace the *decisions* of Stage I by a fixed rule while the real kernels still run:
#
# * segments: windows of ``max_window - 1`` consecutive frames (the longest segment the EMA walk
#   allows: what a strongly redundant video gives when the similarity never drops below tau);
# * "forced-merge": inside each window the published fine-merge walk takes every merge it may
#   (the first interior pair of a 5-frame window is averaged, w = 0.5; the last interior frame
#   follows ``keep_last_interior``), so with the paper's max_window = 6 a 5-frame window becomes
#   3 frames and 32 frames go 32 -> 20 -> 12 -> 8 over three prune layers;
# * "forced-nomerge": no interior merge (5 -> 4 frames with the published walk: 32 -> 26 -> 21 -> 17).
# The refined segmentation at the last prune layer uses the same windows on the merged frames.

FORCED_PATTERNS = ("forced-merge", "forced-nomerge")


def forced_segments(num_frames: int, window: int) -> List[tuple]:
    """Consecutive inclusive windows of ``window`` frames over ``num_frames`` (the last shorter)."""
    window = max(1, int(window))
    return [(s, min(s + window, num_frames) - 1) for s in range(0, num_frames, window)]


def _forced_interior(first: int, L: int, merge: bool, keep_last_interior: bool) -> List[tuple]:
    """The published fine-merge walk over ``L`` interior frames with every decision forced."""
    if L == 1:
        return [(first, first, 1.0)]
    plan, j = [], 0
    while j < L - 1:
        a, b = first + j, first + j + 1
        if merge:
            last_pair = j + 1 >= L - 1
            w = (0.5 if keep_last_interior else 1.0) if last_pair else 0.5
            plan.append((a, b, w))
            j += 2
        else:
            plan.append((a, a, 1.0))
            j += 1
    if keep_last_interior and j == L - 1:
        last = first + L - 1
        plan.append((last, last, 1.0))
    return plan


def forced_plan(num_frames: int, window: int, merge: bool = True, keep_last_interior: bool = False):
    """``(plan, segments)`` of one video (local indices; plan entries ``(src0, src1, w)``)."""
    segments = forced_segments(num_frames, window)
    plan: List[tuple] = []
    for s, e in segments:
        if e - s + 1 <= 2:
            plan.extend((i, i, 1.0) for i in range(s, e + 1))
        else:
            plan.append((s, s, 1.0))
            plan.extend(_forced_interior(s + 1, e - s - 1, merge, keep_last_interior))
            plan.append((e, e, 1.0))
    return plan, segments


def forced_counts(num_frames: int, cfg, pattern: str = "forced-merge") -> List[int]:
    """Frames left after each prune layer under a forced pattern."""
    if pattern not in FORCED_PATTERNS:
        raise ValueError(f"pattern must be one of {FORCED_PATTERNS}, got {pattern!r}")
    counts, T = [], int(num_frames)
    for _ in cfg.prune_layers:
        plan, _ = forced_plan(T, cfg.max_window - 1, pattern == "forced-merge", cfg.keep_last_interior)
        T = len(plan)
        counts.append(T)
    return counts


def stage2_token_count(segments: Sequence[tuple], r_adj: float, P: int = TOKENS_PER_FRAME) -> int:
    """Tokens Stage II keeps for one video with refined ``segments`` and adjusted ratio ``r'``."""
    from earlytom_ext import reference as ref

    k, n = ref.dynamic_keep(r_adj, P), ref.static_windows(r_adj, P)
    total = 0
    for s, e in segments:
        length = e - s + 1
        total += length * k if length <= 2 else 2 * k + (length - 2) * n
    return total


def forced_video_tokens(num_frames: int, cfg, pattern: str = "forced-merge", P: int = TOKENS_PER_FRAME) -> int:
    """Video tokens (without the newline) one video keeps under a forced pattern (``P`` LLM
    tokens per frame)."""
    from earlytom_ext import reference as ref

    T_final = forced_counts(num_frames, cfg, pattern)[-1]
    r_adj = ref.adjusted_ratio(cfg.retain_ratio, num_frames, T_final, P)
    return stage2_token_count(forced_segments(T_final, cfg.max_window - 1), r_adj, P)
