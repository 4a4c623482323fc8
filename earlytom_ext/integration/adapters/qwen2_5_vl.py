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

Limits: the videos of one batch must share one spatial grid (``grid_h, grid_w``); images in the
same call go through the model's own path untouched.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ..._validation import host_to_device
from ...config import EarlyTomConfig
from ..run import VideoRun
from .base import EncodedVideos, ModelAdapter, VideoInputs

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


class _Geometry:
    """Per-group tensors of one spatial grid: the window permutation of the merge units, its
    inverse, the window boundaries and the rotary (cos, sin) of one group, in window order."""

    def __init__(self, perm: torch.Tensor, inv: torch.Tensor, cu_window: torch.Tensor, window_max: int,
                 cos: torch.Tensor, sin: torch.Tensor, S: int):
        self.perm, self.inv, self.cu_window, self.window_max = perm, inv, cu_window, window_max
        self.cos, self.sin, self.S = cos, sin, S

    def tiles(self, n: int, device: torch.device):
        """(cos, sin, cu_full, cu_window) for ``n`` groups."""
        S = self.S
        steps = torch.arange(n, device=device, dtype=torch.int32)
        cu_full = torch.arange(n + 1, device=device, dtype=torch.int32) * S
        zero = torch.zeros(1, device=device, dtype=torch.int32)
        cu_win = torch.cat([zero, (self.cu_window[1:][None, :] + steps[:, None] * S).reshape(-1)])
        return self.cos.repeat(n, 1), self.sin.repeat(n, 1), cu_full, cu_win


class Qwen2_5_VLAdapter(ModelAdapter):
    model_types = ("qwen2_5_vl",)
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
                "model must be a Hugging Face Qwen2_5_VLForConditionalGeneration (with `.model.visual` holding "
                f"the vision encoder), got {name}"
            )
        missing = [a for a in ("patch_embed", "blocks", "merger") if not hasattr(visual, a)]
        if missing or not callable(getattr(model, "generate", None)) or not hasattr(inner, "get_rope_index"):
            raise TypeError(
                "model must be a Qwen2_5_VLForConditionalGeneration-like model (model.model.visual needs "
                f"patch_embed, blocks, merger; model.model needs get_rope_index); {name} lacks "
                f"{missing or ['generate / get_rope_index']}"
            )
        config = getattr(model, "config", None)
        vcfg = getattr(config, "vision_config", None)
        if vcfg is None or getattr(config, "video_token_id", None) is None:
            raise TypeError(f"model.config must have vision_config and video_token_id (Qwen2.5-VL), got {name}")
        blocks = visual.blocks
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise TypeError(f"model.model.visual.blocks must be a non-empty nn.ModuleList, got {type(blocks).__name__}")
        for i, blk in enumerate(blocks):
            attn = getattr(blk, "attn", None)
            if not isinstance(getattr(attn, "qkv", None), nn.Linear) or not hasattr(blk, "norm1"):
                raise TypeError(
                    "unsupported vision block: every block needs `norm1` and `attn.qkv` (a fused nn.Linear) as "
                    f"in Qwen2.5-VL; block {i} is {type(blk).__name__}"
                )
        self.inner = inner
        self.config = config
        self.visual = visual
        self.blocks = blocks
        self.depth = len(blocks)
        self.video_token_id = int(config.video_token_id)
        image_token_id = getattr(config, "image_token_id", None)
        self.image_token_id = int(image_token_id) if image_token_id is not None else None
        self.fullatt = tuple(int(i) for i in getattr(visual, "fullatt_block_indexes", vcfg.fullatt_block_indexes))
        self.merge = int(vcfg.spatial_merge_size)
        self.unit = self.merge * self.merge
        self.patch_size = int(vcfg.patch_size)
        self.temporal_patch_size = int(vcfg.temporal_patch_size)
        self.in_channels = int(getattr(vcfg, "in_channels", 3))
        self.window_size = int(vcfg.window_size)
        self.tokens_per_second = getattr(vcfg, "tokens_per_second", 1)
        attn = blocks[0].attn
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(attn.head_dim)
        self.scale = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        #: P of the last call (the LLM tokens per temporal group; it depends on the video's grid).
        self.tokens_per_frame = 0
        # transformers 5.x: rotary from position ids, vision_utils helpers, the processor's
        # mm_token_type_ids, get_rope_index per modality group; 4.57: rot_pos_emb / get_window_index.
        self._legacy_vision = hasattr(visual, "rot_pos_emb") and hasattr(visual, "get_window_index")
        self._v5_rope = "mm_token_type_ids" in inspect.signature(inner.get_rope_index).parameters
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
                f"EarlyTomConfig.prune_layers must end with a full-attention block of the Qwen2.5-VL vision encoder "
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

            @functools.wraps(orig)
            def get_rope_index(*args, **kwargs):
                hit = self._take_armed(args, kwargs)
                return hit if hit is not None else orig(*args, **kwargs)

            self.inner.__dict__["get_rope_index"] = get_rope_index
            self._installed_rope = True

    def remove(self) -> None:
        if self._installed_rope:
            self.inner.__dict__.pop("get_rope_index", None)
            self._installed_rope = False
            self._orig_get_rope_index = None
        self._armed = None

    def _take_armed(self, args, kwargs):
        armed = self._armed
        if armed is None:
            return None
        mask = kwargs.get("attention_mask")
        ids = args[0] if args else kwargs.get("input_ids")
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
    def video_inputs(self, call: dict[str, Any]) -> VideoInputs:
        pv = call["pixel_values_videos"]
        patch_dim = self.in_channels * self.temporal_patch_size * self.patch_size ** 2
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
        hw = {(h, w) for _, h, w in grid}
        if len(hw) > 1:
            raise ValueError(
                f"EarlyTom needs every video of a call on one spatial grid (Stage I compares groups position by "
                f"position and Stage II selects from one token grid); video_grid_thw holds {sorted(hw)}: resize the "
                f"videos to one size or pass them in separate calls"
            )
        total = sum(t * h * w for t, h, w in grid)
        if pv.shape[0] != total:
            raise ValueError(
                f"pixel_values_videos has {pv.shape[0]} patches but video_grid_thw {grid} needs sum(t*h*w) = {total}"
            )
        spg = call.get("second_per_grid_ts")
        if spg is not None:
            if isinstance(spg, torch.Tensor):
                spg = spg.detach().cpu().reshape(-1) if spg.dim() <= 1 else spg
                if spg.dim() != 1:
                    raise ValueError(
                        f"second_per_grid_ts must be 1-D (one value per video), got shape {tuple(spg.shape)}")
                spg = list(spg)  # 0-d tensors: the model's arithmetic uses them as they are
            elif isinstance(spg, (list, tuple)):
                spg = list(spg)
            else:
                raise TypeError(
                    f"second_per_grid_ts must be a tensor or a list (one value per video), got {type(spg).__name__}")
            if len(spg) != len(grid):
                raise ValueError(f"second_per_grid_ts must have one value per video ({len(grid)}), got {len(spg)}")
        images = call.get("image_grid_thw")
        image_grid = _as_int_rows("image_grid_thw", images, 3) if images is not None else None
        mm = call.get("mm_token_type_ids")
        if mm is not None and not isinstance(mm, torch.Tensor):
            raise TypeError(f"mm_token_type_ids must be a torch.Tensor [batch, seq_len], got {type(mm).__name__}")
        _, H, W = grid[0]
        P = H * W // self.unit
        self.tokens_per_frame = P
        return VideoInputs(
            pixels=pv, frames=[t for t, _, _ in grid], placeholders=[t * P for t, _, _ in grid],
            extra={"grid": grid, "hw": (H, W), "second_per_grid_ts": spg, "image_grid": image_grid,
                   "mm_token_type_ids": mm},
        )

    # ---------------------------------------------------------------- encoder geometry
    def _geometry(self, H: int, W: int, device: torch.device) -> _Geometry:
        key = (H, W, str(device))
        g = self._geometry_cache.get(key)
        if g is not None:
            return g
        visual, unit = self.visual, self.unit
        S = H * W
        grid1 = torch.tensor([[1, H, W]], dtype=torch.int64)
        if self._legacy_vision:  # transformers 4.57
            perm, cu = visual.get_window_index(grid1)
            cu = torch.unique_consecutive(torch.tensor(cu, dtype=torch.int32))
            rot = visual.rot_pos_emb(grid1).to(device)
            rot = rot.reshape(S // unit, unit, -1)[perm.to(device)].reshape(S, -1)
            emb = torch.cat((rot, rot), dim=-1)
            cos, sin = emb.cos(), emb.sin()
        else:  # transformers 5.x
            from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

            perm, cu = get_vision_window_index(grid1, spatial_merge_size=self.merge, window_size=self.window_size,
                                               patch_size=self.patch_size)
            pos = get_vision_position_ids(grid1, self.merge).to(device)
            probe = torch.empty(0, device=device)
            cos, sin = visual.rotary_pos_emb(probe, pos)
            cos = cos.reshape(S // unit, unit, -1)[perm.to(device)].reshape(S, -1)
            sin = sin.reshape(S // unit, unit, -1)[perm.to(device)].reshape(S, -1)
        cu = cu.to(torch.int32)
        window_max = int((cu[1:] - cu[:-1]).max())
        perm = perm.to(torch.int64)
        inv = torch.argsort(perm)
        g = _Geometry(host_to_device(perm, torch.int64, device), host_to_device(inv, torch.int64, device),
                      host_to_device(cu, torch.int32, device), window_max, cos, sin, S)
        self._geometry_cache[key] = g
        return g

    def _flash(self) -> bool:
        impl = getattr(self.visual.config, "_attn_implementation", None) or ""
        return "flash" in str(impl)

    # ---------------------------------------------------------------- the vision forward
    def encode(self, run: VideoRun, videos: VideoInputs) -> EncodedVideos:
        visual = self.visual
        device = self.encoder_device()
        H, W = videos.extra["hw"]
        S, unit = H * W, self.unit
        geo = self._geometry(H, W, device)
        cfg = run.cfg
        prune, last = set(cfg.prune_layers), cfg.prune_layers[-1]
        clock = run.clock
        t0 = clock.now()
        pv = videos.pixels.to(device).type(visual.dtype)  # as the model's get_video_features
        x = visual.patch_embed(pv)
        D = x.shape[-1]
        n = sum(videos.frames)
        x = x.view(n, S // unit, unit, D)[:, geo.perm].reshape(n * S, D)  # window order, per group
        cos, sin, cu_full, cu_win = geo.tiles(n, device)
        flash = self._flash()
        captured: list[torch.Tensor | None] = [None]

        def grab(module, args, output):
            captured[0] = output

        hook = self.blocks[last].attn.qkv.register_forward_hook(grab)
        try:
            for i, blk in enumerate(self.blocks):
                full = i in self.fullatt
                kw: dict[str, Any] = {"cu_seqlens": cu_full if full else cu_win, "position_embeddings": (cos, sin)}
                if not self._legacy_vision:  # 5.x blocks take the max length (used by flash attention only)
                    kw["max_seqlen"] = (S if full else geo.window_max) if flash else None
                x = blk(x, **kw)
                if i == last:
                    q, k = self._rotated_qk(captured[0], cos, sin)
                    captured[0] = None
                    run.score(q.reshape(n, S, -1), k.reshape(n, S, -1), scale=self.scale, num_heads=self.num_heads)
                if i in prune:
                    x = run.stage1(x.view(n, S, D), i)
                    n = int(x.shape[0])  # known on the host after Stage I's own size read
                    x = x.reshape(n * S, D)
                    cos, sin, cu_full, cu_win = geo.tiles(n, device)
        finally:
            hook.remove()
        t1 = clock.now()
        clock.span("vision_tower", t0, t1)
        run.check_complete()
        merged = visual.merger(x)  # [n * S / unit, C], window order
        P = S // unit
        feats = merged.view(n, P, -1)[:, geo.inv]  # raster order of the merged grid
        scores = run.scores.view(n, P, unit).sum(dim=-1)[:, geo.inv]
        clock.span("projector", t1, clock.now())
        return EncodedVideos(feats=feats, scores=scores)

    def _rotated_qk(self, qkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor):
        if qkv is None:
            raise RuntimeError("EarlyTom: Q/K of the score block were not captured")
        seq = qkv.shape[0]
        q, k, _ = qkv.reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        from importlib import import_module

        rope = import_module(type(self.blocks[0].attn).__module__).apply_rotary_pos_emb_vision
        return rope(q, k, cos, sin)  # the model's own rotary, [seq, heads, head_dim]

    # ---------------------------------------------------------------- after Stage II
    def finish(self, tokens: Sequence[torch.Tensor], index: Sequence[torch.Tensor], run: VideoRun,
               videos: VideoInputs, encoded: EncodedVideos) -> list[torch.Tensor]:
        """Features as selected; the (t, h, w) rotary offsets of every kept token are kept for
        :meth:`build_llm_inputs` (those of its place in the uncompressed video; a merged group
        takes those of its first source group)."""
        frames = videos.frames
        grids = videos.extra["grid"]
        layouts = [self._layout("video", tuple(grids[v]), self._spg(videos, v)) for v in range(len(frames))]
        videos.extra["layouts"] = layouts
        if not tokens:
            videos.extra["kept_thw"] = []
            return []
        device = tokens[0].device
        # First source group of every merged group, through every prune layer (on the device).
        first = torch.arange(sum(frames), device=device)
        for _layer, _counts, plan_src, _w in run.merges:
            first = torch.minimum(first[plan_src[:, 0]], first[plan_src[:, 1]])
        kept = []
        offset = 0
        for v, idx in enumerate(index):
            table = host_to_device(layouts[v].rel, torch.int64, device)  # [3, T, P]
            kept.append(table[:, first[idx[:, 0]] - offset, idx[:, 1]])
            offset += frames[v]
        videos.extra["kept_thw"] = kept
        return list(tokens)

    @staticmethod
    def _spg(videos: VideoInputs, v: int):
        spg = videos.extra.get("second_per_grid_ts")
        return None if spg is None else spg[v]

    def _layout(self, kind: str, grid: tuple[int, int, int], spg) -> _Layout:
        """The model's own 3-D positions of one uncompressed image / video (relative to its start),
        the position advance of the block, the padding value and the ``rope_deltas`` length rule:
        read from the model's ``get_rope_index`` on a one-block prompt ``[pad, <vision_start>,
        placeholders, <vision_end>]`` (cached per grid and time step), so that every
        transformers version's own arithmetic is followed."""
        key = (kind, grid, None if spg is None else float(spg))
        hit = self._layout_cache.get(key)
        if hit is not None:
            return hit
        t, h, w = grid
        n = t * (h // self.merge) * (w // self.merge)
        cfg = self.config
        token = self.video_token_id if kind == "video" else self.image_token_id
        start_id = getattr(cfg, "vision_start_token_id", None)
        end_id = getattr(cfg, "vision_end_token_id", None)
        if start_id is None or end_id is None:
            raise TypeError("model.config needs vision_start_token_id and vision_end_token_id (Qwen2.5-VL)")
        ids = torch.tensor([[self.pad_token_id(), start_id] + [token] * n + [end_id]])
        mask = torch.ones_like(ids)
        mask[0, 0] = 0
        kw: dict[str, Any] = {"attention_mask": mask}
        grid_t = torch.tensor([list(grid)])
        if kind == "video":
            kw["video_grid_thw"] = grid_t
            kw["second_per_grid_ts"] = [spg] if spg is not None else None
        else:
            kw["image_grid_thw"] = grid_t
        if self._v5_rope:
            mm = torch.zeros_like(ids)
            mm[0, 2:2 + n] = 2 if kind == "video" else 1
            kw["mm_token_type_ids"] = mm
        rope_index = self._orig_get_rope_index or self.inner.get_rope_index
        pos, delta = rope_index(ids, **kw)
        row = pos[:, 0].to("cpu", torch.int64)
        begin = int(row[0, 1]) + 1  # the block starts right after <vision_start>
        rel = (row[:, 2:2 + n] - begin).reshape(3, t, n // t)
        peak = int(row[:, 1:].max())
        d = int(delta.reshape(-1)[0])
        if d not in (peak + 1 - ids.shape[1], peak + 1 - (ids.shape[1] - 1)):
            raise RuntimeError(f"unexpected rope_deltas {d} from {type(self.inner).__name__}.get_rope_index")
        out = _Layout(rel=rel, advance=int(row[0, 2 + n]) - begin, pad=int(row[0, 0]),
                      padded_delta=d == peak + 1 - ids.shape[1])
        self._layout_cache[key] = out
        return out

    # ---------------------------------------------------------------- LLM inputs
    def build_llm_inputs(self, call: dict[str, Any], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         features: Sequence[torch.Tensor], videos: VideoInputs) -> dict[str, Any]:
        embeds = self.scatter_features(input_ids, features)
        prompt = videos.prompt
        if prompt is not None:
            ids_h, mask_h = prompt.input_ids, prompt.attention_mask
        else:
            ids_h, mask_h = input_ids.cpu(), attention_mask.cpu()
        positions, runs, rules = self._host_positions(ids_h, mask_h, videos)
        device = input_ids.device
        pos = host_to_device(positions, torch.int64, device)
        for b, col, length, start, v in runs:
            pos[:, b, col:col + length] = videos.extra["kept_thw"][v].to(device) + start
        mask = attention_mask.to(device) != 0
        peak = pos.amax(dim=0).masked_fill(~mask, -1).amax(dim=-1, keepdim=True)
        length = pos.shape[-1] if rules.padded_delta else mask.sum(dim=-1, keepdim=True)
        delta = peak + 1 - length
        out: dict[str, Any] = {"inputs_embeds": embeds}
        mm = videos.extra.get("mm_token_type_ids")
        if mm is not None:
            types = torch.zeros_like(ids_h, dtype=mm.dtype)
            if self.image_token_id is not None:
                types[ids_h == self.image_token_id] = 1
            types[ids_h == self.video_token_id] = 2
            out["mm_token_type_ids"] = host_to_device(types, mm.dtype, mm.device)
        if self._v5_rope:
            text = mask.long().cumsum(-1) - 1
            text = text.masked_fill(~mask, 0)
            out["position_ids"] = torch.cat([text[None], pos], dim=0)
            self.inner.rope_deltas = delta
        else:
            self._armed = (pos, delta)
        return out

    def _host_positions(self, ids: torch.Tensor, mask: torch.Tensor, videos: VideoInputs):
        """3-D positions of the text and image tokens (``[3, B, L]``, host), the video runs
        ``(sample, column, length, start position, video)`` whose positions come from the kept
        tokens, and the padding / ``rope_deltas`` rules."""
        B, L = ids.shape
        layouts = videos.extra["layouts"]
        rules = layouts[0]
        positions = torch.full((3, B, L), rules.pad, dtype=torch.int64)
        image_grid = videos.extra["image_grid"]
        counts = [int(k.shape[1]) for k in videos.extra["kept_thw"]]
        m = self.merge
        runs = []
        v = img = 0
        for b in range(B):
            cols = (mask[b] != 0).nonzero().flatten().tolist()
            toks = ids[b].tolist()
            cur = 0
            j = 0
            while j < len(cols):
                tok = toks[cols[j]]
                if tok == self.video_token_id or (self.image_token_id is not None and tok == self.image_token_id):
                    e = j
                    while e < len(cols) and toks[cols[e]] == tok:
                        e += 1
                    n = e - j
                    if tok == self.video_token_id:
                        if v >= len(counts) or n != counts[v]:
                            raise ValueError(
                                f"the compressed prompt's video runs do not match the videos: sample {b} holds a run "
                                f"of "
                                f"{n} video tokens where video {v} has {counts[v] if v < len(counts) else 'none'}"
                            )
                        runs.append((b, cols[j], n, cur, v))
                        cur += layouts[v].advance
                        v += 1
                    else:
                        if image_grid is None or img >= len(image_grid):
                            raise ValueError("image_grid_thw is required for the image placeholders in input_ids "
                                             "(one (t, h, w) row per image)")
                        t, h, w = image_grid[img]
                        if n != t * (h // m) * (w // m):
                            raise ValueError(f"image {img}: {n} placeholders in input_ids, image_grid_thw[{img}] = "
                                             f"{(t, h, w)} needs {t * (h // m) * (w // m)}")
                        lay = self._layout("image", (t, h, w), None)
                        positions[:, b, torch.tensor(cols[j:e])] = lay.rel.reshape(3, -1) + cur
                        cur += lay.advance
                        img += 1
                    j = e
                else:
                    positions[:, b, cols[j]] = cur
                    cur += 1
                    j += 1
        if v != len(counts):
            raise ValueError(
                f"input_ids hold {v} video placeholder runs, video_grid_thw describes {len(counts)} videos")
        return positions, runs, rules


class _Layout:
    """One uncompressed vision block as the model lays it out: ``rel [3, T, P]`` positions relative
    to the block's start, ``advance`` (the first position after the block, relative), ``pad`` (the
    padding positions' value), ``padded_delta`` (``rope_deltas`` counts the padded length)."""

    def __init__(self, rel: torch.Tensor, advance: int, pad: int, padded_delta: bool):
        self.rel, self.advance, self.pad, self.padded_delta = rel, advance, pad, padded_delta
