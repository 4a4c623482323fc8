"""TTFT of the Qwen2.5-VL-7B architecture (or Qwen2-VL-7B's: ``size="qwen2-vl-7b"``, ``bench.run
--qwen-model qwen2-vl-7b``) with random weights, bf16, SDPA: stock, EarlyTom, and stock +
``earlytom_ext.fast_window_attention`` (the batched window attention EarlyTom's vision path uses,
given to the uncompressed model: the algorithm's gain apart from that fix).

The configuration is written by hand to match ``Qwen/Qwen2.5-VL-7B-Instruct`` (nothing is
downloaded): a 32-block vision transformer (hidden 1280, 16 heads, gated MLP 3420, 14x14
patches, 2 frames per temporal patch, 2x2 spatial merge, window attention over 112x112 pixels
with full attention in blocks 7/15/23/31, merger to 3584) and the Qwen2.5-7B language model
(hidden 3584, 28 layers, 28 heads / 4 KV heads, MLP 18944, vocabulary 152064, M-RoPE sections
16/24/24). The video: 32 frames at 448x448 (the crossfade clip of ``tiny_model.make_video``),
patchified as the Qwen2-VL processor does: 16 x 32 x 32 patches, 4096 video tokens. Qwen2-VL-7B
(``Qwen/Qwen2-VL-7B-Instruct``): the same patching and language model, a 32-block vision
transformer with full attention in every block (hidden 1280, 16 heads, MLP ratio 4, QuickGELU).

Before building the 7B model the section checks, on a tiny model of the same family on the
CPU, that ``earlytom_ext.apply`` accepts it; otherwise the section is skipped with the reason.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch

from bench.common import Budget
from bench.family import apply_accepted, family_benchmark, ready_model
from earlytom_ext import tiny_model as tm
from earlytom_ext.integration.adapters.qwen2_5_vl import QWEN2_5_VL_PRUNE_LAYERS
from earlytom_ext.integration.adapters.qwen2_vl import QWEN2_VL_PRUNE_LAYERS
from earlytom_ext.integration.window_attention import fast_window_attention

__all__ = [
    "FAMILIES",
    "SIZES",
    "TINY",
    "Family",
    "availability",
    "benchmark",
    "build_model",
    "earlytom_config",
    "family",
    "family_label",
    "make_inputs",
    "qwen_config",
]

# Qwen/Qwen2.5-VL-7B-Instruct, written out by hand.
_VISION_7B = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    out_hidden_size=3584,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
    hidden_act="silu",
)
_TEXT_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    hidden_act="silu",
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    use_sliding_window=False,
    sliding_window=32768,
    max_window_layers=28,
    bos_token_id=151643,
    eos_token_id=None,
    pad_token_id=151643,
)
_IDS_7B = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
# Qwen/Qwen2-VL-7B-Instruct's vision transformer (its language model is the one above).
_QWEN2_VL_VISION_7B = dict(
    depth=32,
    embed_dim=1280,
    hidden_size=3584,
    mlp_ratio=4,
    num_heads=16,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    hidden_act="quick_gelu",
)
# The same families with tiny widths (and the full vision depth, so the paper's prune layers apply).
_VISION_TINY = dict(_VISION_7B, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
_QWEN2_VL_VISION_TINY = dict(_QWEN2_VL_VISION_7B, embed_dim=32, hidden_size=64, num_heads=2)
_TEXT_TINY = dict(
    _TEXT_7B,
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16384,
    bos_token_id=None,
    pad_token_id=0,
)
_IDS_TINY = dict(image_token_id=300, video_token_id=301, vision_start_token_id=302, vision_end_token_id=303)

SIZES = {
    # name: (vision, text, ids, rope_theta, mrope_section, text id range, frames, image size, family)
    "qwen2.5-vl-7b": (_VISION_7B, _TEXT_7B, _IDS_7B, 1000000.0, [16, 24, 24], (1000, 150000), 32, 448, "qwen2_5_vl"),
    "qwen2-vl-7b": (
        _QWEN2_VL_VISION_7B,
        dict(_TEXT_7B, max_position_embeddings=32768),
        _IDS_7B,
        1000000.0,
        [16, 24, 24],
        (1000, 150000),
        32,
        448,
        "qwen2_vl",
    ),
    "tiny": (_VISION_TINY, _TEXT_TINY, _IDS_TINY, 1000000.0, [2, 3, 3], (3, 290), 4, 112, "qwen2_5_vl"),
    "tiny-qwen2-vl": (_QWEN2_VL_VISION_TINY, _TEXT_TINY, _IDS_TINY, 1000000.0, [2, 3, 3], (3, 290), 4, 112, "qwen2_vl"),
}
#: The tiny size of each 7B size's family (what --quick runs).
TINY = {"qwen2.5-vl-7b": "tiny", "qwen2-vl-7b": "tiny-qwen2-vl"}


class Family(NamedTuple):
    label: str
    module: str  # transformers.models.<module>
    config: str
    text_config: str
    model: str
    prune_layers: tuple[int, ...]  # the family's own (the presets' are SigLIP's)


FAMILIES = {
    "qwen2_5_vl": Family(
        "Qwen2.5-VL",
        "qwen2_5_vl",
        "Qwen2_5_VLConfig",
        "Qwen2_5_VLTextConfig",
        "Qwen2_5_VLForConditionalGeneration",
        QWEN2_5_VL_PRUNE_LAYERS,
    ),
    "qwen2_vl": Family(
        "Qwen2-VL",
        "qwen2_vl",
        "Qwen2VLConfig",
        "Qwen2VLTextConfig",
        "Qwen2VLForConditionalGeneration",
        QWEN2_VL_PRUNE_LAYERS,
    ),
}


def _size(size: str) -> tuple:
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    return SIZES[size]


def family(size: str) -> Family:
    """The model family of ``size``."""
    return FAMILIES[_size(size)[8]]


def family_label(size: str) -> str:
    """``"Qwen2.5-VL"`` or ``"Qwen2-VL"``: the family of ``size``."""
    return family(size).label


def earlytom_config(size: str, benchmark_preset: str, ratio: float):
    """The paper's settings for ``benchmark_preset`` at ``ratio``, at the family's prune layers."""
    from earlytom_ext.config import preset

    return preset(benchmark_preset, ratio).replace(prune_layers=family(size).prune_layers)


def qwen_config(size: str = "qwen2.5-vl-7b"):
    """A ``Qwen2_5_VLConfig`` / ``Qwen2VLConfig`` (transformers 5.x ``rope_parameters``, 4.x ``rope_scaling``)."""
    import importlib

    import transformers

    vision, text, ids, theta, section = _size(size)[:5]
    fam = family(size)
    conf = importlib.import_module(f"transformers.models.{fam.module}.configuration_{fam.module}")
    text = dict(text)
    if "rope_parameters" in inspect.signature(getattr(conf, fam.text_config).__init__).parameters:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, "mrope_section": list(section)}
    else:
        text.update(rope_theta=theta, rope_scaling={"type": "mrope", "mrope_section": list(section)})
    cfg = getattr(transformers, fam.config)(text_config=text, vision_config=dict(vision), **ids)
    cfg.pad_token_id = text["pad_token_id"]
    return cfg


def build_model(size: str = "qwen2.5-vl-7b", device="cuda", dtype=torch.bfloat16, seed: int = 0):
    """Random-weight ``Qwen2_5_VLForConditionalGeneration`` (``Qwen2VLForConditionalGeneration`` for
    the Qwen2-VL sizes) built directly on ``device``; ``(model, info)``."""
    import transformers

    model_cls = getattr(transformers, family(size).model)
    device = torch.device(device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with device:
        model = tm.from_config(model_cls, qwen_config(size), dtype, "sdpa")
    return ready_model(model, size, device, dtype, t0)


def _patchify(frames: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, list[int]]:
    """``[T, C, H, W]`` -> ``([t*h*w, C*temporal*patch*patch], [t, h, w])`` in the Qwen2-VL
    processor's patch order (2x2 merge groups contiguous)."""
    T, C, H, W = frames.shape
    gt, gh, gw = T // temporal, H // patch, W // patch
    x = frames.reshape(gt, temporal, C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, C * temporal * patch * patch), [gt, gh, gw]


def make_inputs(
    model,
    frames: int,
    image_size: int,
    *,
    batch: int = 1,
    device="cuda",
    dtype=torch.bfloat16,
    seed: int = 0,
    text_id_range=(1000, 150000),
) -> dict:
    """Generate inputs of ``batch`` synthetic videos: ``prefix, <vision_start>, video tokens,
    <vision_end>, suffix`` per sample."""
    vc = model.config.vision_config
    if frames % vc.temporal_patch_size:
        raise ValueError(f"frames must be a multiple of {vc.temporal_patch_size}, got {frames}")
    pix, grids = [], []
    for b in range(batch):
        video = tm.make_video(
            frames,
            seed=seed + 17 * b,
            kind="crossfade",
            scene_length=8,
            noise=0.03,
            image_size=image_size,
            device=device,
            dtype=torch.float32,
        )
        p, g = _patchify(video, vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size)
        pix.append(p)
        grids.append(g)
    n_video = grids[0][0] * grids[0][1] * grids[0][2] // vc.spatial_merge_size**2
    g = torch.Generator().manual_seed(seed)
    lo, hi = text_id_range
    cfg = model.config
    rows = []
    for _ in range(batch):
        rows.append(
            torch.randint(lo, hi, (14,), generator=g).tolist()
            + [cfg.vision_start_token_id]
            + [cfg.video_token_id] * n_video
            + [cfg.vision_end_token_id]
            + torch.randint(lo, hi, (18,), generator=g).tolist()
        )
    ids = torch.tensor(rows, device=device)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": torch.cat(pix).to(dtype),
        "video_grid_thw": torch.tensor(grids, device=device),
    }


def availability(
    benchmark_preset: str = "videomme", ratio: float = 0.10, size: str = "qwen2.5-vl-7b"
) -> tuple[bool, str]:
    """Whether ``earlytom_ext.apply`` accepts a model of ``size``'s family (checked on a tiny one, CPU)."""
    import transformers

    model_name = family(size).model
    if not hasattr(transformers, model_name):
        return False, f"transformers {transformers.__version__} has no {model_name}"
    tiny, _ = build_model(TINY.get(size, size), device="cpu", dtype=torch.float32)
    return apply_accepted(tiny, earlytom_config(size, benchmark_preset, ratio), model_name)


def benchmark(
    device="cuda",
    *,
    size: str = "qwen2.5-vl-7b",
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
    """``{"rows": [...], "model_info": ...}`` or ``{"skipped": reason}``: stock, EarlyTom per ratio,
    stock + ``fast_window_attention`` (baseline ``"fastwin"``)."""
    frames, image_size = SIZES[size][6], SIZES[size][7]
    return family_benchmark(
        device,
        tag=family_label(size).lower(),
        family=family_label(size),
        model_name=size,
        prune_layers=family(size).prune_layers,
        available=lambda: availability(benchmark_preset, ratios[0], size),
        build=lambda: build_model(size, device=device, dtype=dtype, seed=seed),
        make_inputs=lambda model: make_inputs(
            model, frames, image_size, device=device, dtype=dtype, seed=seed, text_id_range=SIZES[size][5]
        ),
        earlytom_config=lambda ratio: earlytom_config(size, benchmark_preset, ratio),
        geometry=dict(frames=frames, image_size=image_size, batch=1),
        ratios=ratios,
        pattern=pattern,
        baselines={"fastwin": fast_window_attention},
        warmup=warmup,
        iters=iters,
        budget=budget,
        log=log,
    )
