"""Qwen2.5-VL (windowed ViT with 2-D rotary, 2x2 patch merger, 3-D multimodal rotary in the LLM).

How EarlyTom maps onto this encoder (docs/qwen2_5_vl.md):

* A Stage I "frame" is one **temporal patch group**: ``temporal_patch_size`` (2) video frames that
  the patch embedding turns into one ``grid_h x grid_w`` grid of patches. A video of ``grid_t``
  groups is a video of ``grid_t`` frames for Stage I.
* The adapter owns the vision forward for videos (a loop over the model's own blocks): after the
  window reordering every group is one contiguous run of ``S = grid_h * grid_w`` patches, in the
  same order for every group, so token ``i`` of two groups is the same spatial patch and Stage I's
  per-position cosine applies unchanged. Attention never crosses a group (full-attention blocks:
  one sequence per group; the other blocks: windows inside a group), so merging or dropping groups
  only removes whole sequences: ``cu_seqlens``, the window boundaries and the (per-group identical)
  rotary embeddings are rebuilt for the remaining groups after every prune layer.
* The last prune layer must be a full-attention block: its score is the attention each patch
  receives from every patch of its group (:func:`earlytom_ext.ops.attention_received` on that
  block's Q and K, rotary applied), pooled to the merger's 2x2 tokens by summing the four patches.
* Stage II runs per merged group on the merger's output tokens (raster order), ``P = grid_h *
  grid_w / 4`` tokens per group; ``retain_ratio`` counts against ``grid_t * P``, the video tokens
  the LLM sees without compression.
* The LLM: every kept token keeps the 3-D rotary position (t, h, w) it has in the uncompressed
  video; a merged group takes the temporal position of its *first* source group. Text and images
  keep the positions the model gives them (the text after a video starts where it starts without
  compression). The layout of an uncompressed block (relative positions, where the text after it
  starts, the padding value, the length ``rope_deltas`` counts) is read from the model's own
  ``get_rope_index`` on a one-block prompt, so every transformers version's arithmetic is followed
  and an uncompressing configuration reproduces the unpatched model exactly.
  5.x: ``position_ids`` ``[4, B, L]`` (text row + t/h/w rows) go into ``forward`` / ``generate``
  and ``model.model.rope_deltas`` is set for later decoding steps. 4.57 (whose ``generate`` cannot
  take 3-D ``position_ids``): the positions are handed to the model's own ``get_rope_index`` call of
  the prefill (an instance override that answers one armed call and otherwise calls the original);
  the model stores ``rope_deltas`` itself.

Videos of different spatial grids in one call are encoded in one pass per grid (each video is
compressed on its own either way); images in the same call go through the model's own path untouched.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ...config import EarlyTomConfig
from ..patches import restore_attr, set_attr
from .base import ModelAdapter, VideoInputs
from .qwen2_5_vl_positions import _Layout, _RopePositions
from .qwen2_5_vl_vision import _Geometry, _VisionForward

__all__ = ["QWEN2_5_VL_PRUNE_LAYERS", "Qwen2_5_VLAdapter", "default_prune_layers"]

#: Prune layers for the 32-block encoder of Qwen2.5-VL (3B / 7B / 32B / 72B, full attention in
#: blocks 7, 15, 23, 31). The paper prunes SigLIP (26 layers) after 6, 21, 23. The last prune
#: layer supplies the score and must be a full-attention block: 23 (31 would leave no block to
#: run on fewer groups). The first merge follows the first full-attention block (7, 25% of the
#: depth as the paper's 6/26), where every patch has seen its whole group; the second keeps the
#: paper's two-block gap before the last (21).
QWEN2_5_VL_PRUNE_LAYERS: tuple[int, ...] = (7, 21, 23)


def default_prune_layers(depth: int, fullatt_block_indexes: Sequence[int]) -> tuple[int, ...]:
    """Prune layers for a Qwen2.5-VL encoder of ``depth`` blocks (:data:`QWEN2_5_VL_PRUNE_LAYERS`
    for the published 32-block encoders). The rule: the last prune layer is the last full-attention
    block before the final block (the final one when there is no other); the first is the first
    full-attention block (a quarter of the depth when that is not before the last); the second is
    two blocks before the last. Layers that would not be below the last one are left out."""
    full = sorted(int(i) for i in fullatt_block_indexes if 0 <= int(i) < depth)
    if not full:
        raise ValueError(
            f"the vision encoder has no full-attention block (fullatt_block_indexes = {list(fullatt_block_indexes)})"
        )
    before_end = [i for i in full if i < depth - 1]
    last = before_end[-1] if before_end else full[-1]
    first = full[0] if full[0] < last else round(depth * 0.25)
    picks = sorted({p for p in (first, last - 2) if 0 <= p < last})
    return tuple(picks) + (last,)


def _as_int_rows(name: str, value, width: int) -> list[list[int]]:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor [n, {width}], got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {value.dtype}")
    if value.dim() != 2 or value.shape[1] != width:
        raise ValueError(f"{name} must have shape [n, {width}] (one (t, h, w) row each), got {tuple(value.shape)}")
    return [[int(v) for v in row] for row in value.tolist()]  # small; normally on the CPU already


class Qwen2_5_VLAdapter(_VisionForward, _RopePositions, ModelAdapter):
    model_types = ("qwen2_5_vl",)
    family = "Qwen2.5-VL"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    #: Window attention in the blocks outside ``fullatt_block_indexes`` (Qwen2-VL: none).
    windowed = True
    video_arg = "pixel_values_videos"
    video_kwargs = ("video_grid_thw", "second_per_grid_ts", "image_grid_thw", "mm_token_type_ids")
    # The compressed call carries the video as features and positions: the grid arguments would
    # describe the uncompressed video.
    consumed_kwargs = ("video_grid_thw", "second_per_grid_ts")
    extra_tokens_per_video = 0

    def __init__(self, model: nn.Module):
        super().__init__(model)
        name = type(model).__name__
        inner = getattr(model, "model", None)
        visual = getattr(inner, "visual", None)
        if not isinstance(inner, nn.Module) or not isinstance(visual, nn.Module):
            raise TypeError(
                f"model must be a Hugging Face {self.model_class} (with `.model.visual` holding "
                f"the vision encoder), got {name}"
            )
        missing = [a for a in ("patch_embed", "blocks", "merger") if not hasattr(visual, a)]
        if missing or not callable(getattr(model, "generate", None)) or not hasattr(inner, "get_rope_index"):
            raise TypeError(
                f"model must be a {self.model_class}-like model (model.model.visual needs "
                f"patch_embed, blocks, merger; model.model needs get_rope_index); {name} lacks "
                f"{missing or ['generate / get_rope_index']}"
            )
        config = getattr(model, "config", None)
        vcfg = getattr(config, "vision_config", None)
        if vcfg is None or getattr(config, "video_token_id", None) is None:
            raise TypeError(f"model.config must have vision_config and video_token_id ({self.family}), got {name}")
        blocks = visual.blocks
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise TypeError(f"model.model.visual.blocks must be a non-empty nn.ModuleList, got {type(blocks).__name__}")
        for i, blk in enumerate(blocks):
            attn = getattr(blk, "attn", None)
            if not isinstance(getattr(attn, "qkv", None), nn.Linear) or not hasattr(blk, "norm1"):
                raise TypeError(
                    "unsupported vision block: every block needs `norm1` and `attn.qkv` (a fused nn.Linear) as "
                    f"in {self.family}; block {i} is {type(blk).__name__}"
                )
        self.inner = inner
        self.config = config
        self.visual = visual
        self.blocks = blocks
        self.depth = len(blocks)
        self.video_token_id = int(config.video_token_id)
        image_token_id = getattr(config, "image_token_id", None)
        self.image_token_id = int(image_token_id) if image_token_id is not None else None
        if self.windowed:
            self.fullatt = tuple(int(i) for i in getattr(visual, "fullatt_block_indexes", vcfg.fullatt_block_indexes))
        else:
            self.fullatt = tuple(range(self.depth))
        self.merge = int(vcfg.spatial_merge_size)
        self.unit = self.merge * self.merge
        self.patch_size = int(vcfg.patch_size)
        self.temporal_patch_size = int(vcfg.temporal_patch_size)
        self.in_channels = int(getattr(vcfg, "in_channels", 3))
        self.window_size = int(vcfg.window_size) if self.windowed else None
        attn = blocks[0].attn
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(attn.head_dim)
        self.scale = float(getattr(attn, "scaling", self.head_dim**-0.5))
        #: P of the last call (the LLM tokens per temporal group; it depends on the video's grid).
        self.tokens_per_frame = 0
        #: With SDPA, run each block's attention as one call per window length (Qwen2-VL: per group
        #: length; the same result as the model's loop); False runs the model's own attention.
        self.batch_windows = True
        # transformers 5.x: rotary from position ids, vision_utils helpers, the processor's
        # mm_token_type_ids, get_rope_index per modality group; 4.57: rot_pos_emb / get_window_index.
        self._legacy_vision = hasattr(visual, "rot_pos_emb") and (
            not self.windowed or hasattr(visual, "get_window_index")
        )
        # The class's method: a wrapper installed on the instance may hide the parameter names.
        self._v5_rope = "mm_token_type_ids" in inspect.signature(type(inner).get_rope_index).parameters
        self._geometry_cache: dict[tuple, _Geometry] = {}
        self._layout_cache: dict[tuple, _Layout] = {}
        self._armed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._installed_rope = False
        self._orig_get_rope_index = None
        self._cfg: EarlyTomConfig | None = None

    # ---------------------------------------------------------------- configuration
    def default_prune_layers(self) -> tuple[int, ...]:
        return default_prune_layers(self.depth, self.fullatt)

    def check_config(self, cfg: EarlyTomConfig) -> None:
        last = cfg.prune_layers[-1]
        if last not in self.fullatt:
            raise ValueError(
                f"EarlyTomConfig.prune_layers must end with a full-attention block of the {self.family} vision encoder "
                f"(fullatt_block_indexes = {list(self.fullatt)}), got {tuple(cfg.prune_layers)}: the last prune layer "
                f"scores every patch by the attention it receives from its whole frame group "
                f"(default for this encoder: {self.default_prune_layers()})"
            )
        self._cfg = cfg

    # ---------------------------------------------------------------- life cycle
    def install(self, core) -> None:
        if not self._v5_rope:
            # 4.57's generate cannot carry 3-D position ids: hand them to the prefill's own call.
            orig = self.inner.get_rope_index
            self._orig_get_rope_index = orig
            positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            params = list(inspect.signature(type(self.inner).get_rope_index).parameters.items())[1:]  # no self
            self._rope_params = tuple(n for n, p in params if p.kind in positional)

            @functools.wraps(orig)
            def get_rope_index(*args, **kwargs):
                hit = self._take_armed(args, kwargs)
                return hit if hit is not None else orig(*args, **kwargs)

            self._prev_rope_attr = set_attr(self.inner, "get_rope_index", get_rope_index)
            self._rope_wrapper = get_rope_index
            self._installed_rope = True

    def remove(self) -> None:
        if self._installed_rope:
            if self.inner.__dict__.get("get_rope_index") is not self._rope_wrapper:
                raise RuntimeError(
                    "model.model.get_rope_index was replaced after earlytom_ext.apply(); remove that wrapper first"
                )
            restore_attr(self.inner, "get_rope_index", self._prev_rope_attr)
            self._installed_rope = False
            self._orig_get_rope_index = None
        self._armed = None

    def end_call(self) -> None:
        # Positions armed for a prefill that never ran (the call failed first) must not reach the next one.
        self._armed = None

    def _take_armed(self, args, kwargs):
        armed = self._armed
        if armed is None:
            return None
        # By name: Qwen2-VL's forward passes the mask positionally, its generate by keyword.
        named = {**dict(zip(self._rope_params, args)), **kwargs}
        mask, ids = named.get("attention_mask"), named.get("input_ids")
        ref = mask if isinstance(mask, torch.Tensor) else ids
        pos, delta = armed
        B, L = pos.shape[1], pos.shape[2]
        if not isinstance(ref, torch.Tensor) or ref.dim() != 2 or ref.shape[1] != L or ref.shape[0] % B:
            return None
        self._armed = None  # one prefill
        rep = ref.shape[0] // B  # generate expands the batch for beams / returned sequences
        if rep > 1:
            pos, delta = pos.repeat_interleave(rep, dim=1), delta.repeat_interleave(rep, dim=0)
        return pos.to(ref.device), delta.to(ref.device)

    def encoder_device(self) -> torch.device:
        return next(self.visual.parameters()).device

    # ---------------------------------------------------------------- the video path
    def check_position_ids(self, position_ids, attention_mask) -> None:
        raise ValueError(
            f"position_ids cannot be given with videos under EarlyTom on {self.family}: the compressed prompt's "
            "3-D positions are computed from it (the kept tokens keep their original positions); leave "
            "position_ids unset"
        )

    def video_inputs(self, call: dict[str, Any]) -> VideoInputs:
        pv = call["pixel_values_videos"]
        patch_dim = self.in_channels * self.temporal_patch_size * self.patch_size**2
        if not isinstance(pv, torch.Tensor):
            raise TypeError(
                f"pixel_values_videos must be a torch.Tensor [patches, {patch_dim}] (the processor's flattened "
                f"patches), got {type(pv).__name__}"
            )
        if not pv.is_floating_point():
            raise TypeError(f"pixel_values_videos must be a floating-point tensor, got {pv.dtype}")
        if pv.dim() != 2 or pv.shape[1] != patch_dim:
            raise ValueError(
                f"pixel_values_videos must have shape [patches, {patch_dim}] (channels x temporal_patch_size x "
                f"patch_size^2 = {self.in_channels} x {self.temporal_patch_size} x {self.patch_size}^2), "
                f"got {tuple(pv.shape)}"
            )
        grid_t = call.get("video_grid_thw")
        if grid_t is None:
            raise ValueError("video_grid_thw is required with pixel_values_videos (one (t, h, w) row per video)")
        grid = _as_int_rows("video_grid_thw", grid_t, 3)
        if not grid:
            raise ValueError("video_grid_thw must hold at least one video, got shape (0, 3)")
        m = self.merge
        for v, (t, h, w) in enumerate(grid):
            if t < 1 or h < m or w < m or h % m or w % m:
                raise ValueError(
                    f"video_grid_thw[{v}] must be (t >= 1, h, w) with h and w positive multiples of spatial_merge_size "
                    f"{m}, got {(t, h, w)}"
                )
        total = sum(t * h * w for t, h, w in grid)
        if pv.shape[0] != total:
            raise ValueError(
                f"pixel_values_videos has {pv.shape[0]} patches but video_grid_thw {grid} needs sum(t*h*w) = {total}"
            )
        spg = call.get("second_per_grid_ts")
        if spg is not None:
            if isinstance(spg, torch.Tensor):
                # [n] or [n, 1] (a column, which the model's arithmetic also accepts)
                if spg.dim() > 2 or (spg.dim() == 2 and spg.shape[1] != 1):
                    raise ValueError(
                        f"second_per_grid_ts must hold one value per video ([n] or [n, 1]), got shape "
                        f"{tuple(spg.shape)}"
                    )
                if spg.dtype == torch.bool or spg.is_complex():
                    raise TypeError(f"second_per_grid_ts must hold real numbers (seconds), got {spg.dtype}")
                spg = spg.detach().cpu().reshape(-1)
                spg = list(spg)  # 0-d tensors: the model's arithmetic uses them as they are
            elif isinstance(spg, (list, tuple)):
                spg = list(spg)
                for x in spg:
                    if isinstance(x, torch.Tensor):
                        real = x.numel() == 1 and x.dtype != torch.bool and not x.is_complex()
                    else:
                        real = isinstance(x, numbers.Real) and not isinstance(x, bool)
                    if not real:
                        raise TypeError(
                            f"second_per_grid_ts must hold one real number per video (seconds per temporal group), "
                            f"got {x!r}"
                        )
            else:
                raise TypeError(
                    f"second_per_grid_ts must be a tensor or a list (one value per video), got {type(spg).__name__}"
                )
            if len(spg) != len(grid):
                raise ValueError(f"second_per_grid_ts must have one value per video ({len(grid)}), got {len(spg)}")
        images = call.get("image_grid_thw")
        image_grid = _as_int_rows("image_grid_thw", images, 3) if images is not None else None
        mm = call.get("mm_token_type_ids")
        if mm is not None and not isinstance(mm, torch.Tensor):
            raise TypeError(f"mm_token_type_ids must be a torch.Tensor [batch, seq_len], got {type(mm).__name__}")
        hws = {(h, w) for _, h, w in grid}
        _, H, W = grid[0]
        P = H * W // self.unit
        self.tokens_per_frame = P if len(hws) == 1 else 0
        return VideoInputs(
            pixels=pv,
            frames=[t for t, _, _ in grid],
            placeholders=[t * h * w // self.unit for t, h, w in grid],
            extra={
                "grid": grid,
                "hw": (H, W) if len(hws) == 1 else None,
                "second_per_grid_ts": spg,
                "image_grid": image_grid,
                "mm_token_type_ids": mm,
            },
            tokens_per_frame=P if len(hws) == 1 else None,
        )

    def split(self, videos: VideoInputs) -> list[tuple[list[int], VideoInputs]] | None:
        """One group per spatial grid (in order of first appearance): Stage I compares the groups of a
        pass position by position, and Stage II selects from one token grid."""
        if videos.extra["hw"] is not None:
            return None
        grid = videos.extra["grid"]
        rows = torch.split(videos.pixels, [t * h * w for t, h, w in grid])
        spg = videos.extra["second_per_grid_ts"]
        by_hw: dict[tuple[int, int], list[int]] = {}
        for v, (_, h, w) in enumerate(grid):
            by_hw.setdefault((h, w), []).append(v)
        parts = []
        for (H, W), where in by_hw.items():
            part = VideoInputs(
                pixels=torch.cat([rows[v] for v in where]),
                frames=[videos.frames[v] for v in where],
                placeholders=[videos.placeholders[v] for v in where],
                extra={
                    **videos.extra,
                    "grid": [grid[v] for v in where],
                    "hw": (H, W),
                    "second_per_grid_ts": None if spg is None else [spg[v] for v in where],
                },
                tokens_per_frame=H * W // self.unit,
            )
            parts.append((where, part))
        return parts

    def join(self, videos: VideoInputs, parts: list[tuple[list[int], VideoInputs]]) -> None:
        for key in ("layouts", "kept_thw"):
            gathered: list = [None] * len(videos.frames)
            for where, part in parts:
                for v, value in zip(where, part.extra[key]):
                    gathered[v] = value
            videos.extra[key] = gathered
