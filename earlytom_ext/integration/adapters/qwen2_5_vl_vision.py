"""The Qwen2-VL / Qwen2.5-VL adapters' own vision forward: per-grid (window) geometry and rotary, the
block loop with Stage I."""

from __future__ import annotations

from typing import Any

import torch

from ..._validation import host_to_device
from ..patches import restore_attr, set_attr
from ..run import VideoRun
from ..window_attention import WindowBatches, batchable, vision_rope, window_attention
from .base import EncodedVideos, VideoInputs


class _Geometry:
    """Per-group tensors of one spatial grid: the window permutation of the merge units, its
    inverse, the window boundaries (also on the host) and the rotary (cos, sin) of one group, in
    window order (Qwen2-VL: the identity and one window, the whole group)."""

    def __init__(
        self,
        perm: torch.Tensor,
        inv: torch.Tensor,
        cu_window: torch.Tensor,
        window_bounds: list[int],
        cos: torch.Tensor,
        sin: torch.Tensor,
        S: int,
    ):
        self.perm, self.inv, self.cu_window, self.window_bounds = perm, inv, cu_window, window_bounds
        self.window_max = max(b - a for a, b in zip(window_bounds, window_bounds[1:]))
        self.cos, self.sin, self.S = cos, sin, S
        self._batches: dict[int, tuple[WindowBatches, WindowBatches]] = {}

    def batches(self, n: int, device: torch.device) -> tuple[WindowBatches, WindowBatches]:
        """(full-attention, windowed) batches of ``n`` groups for the batched SDPA path."""
        b = self._batches.get(n)
        if b is None:
            S = self.S
            full = WindowBatches.tiled([0, S], n, S, device)
            windows = full if self.window_bounds == [0, S] else WindowBatches.tiled(self.window_bounds, n, S, device)
            b = (full, windows)
            self._batches[n] = b
        return b

    def tiles(self, n: int, device: torch.device):
        """(cos, sin, cu_full, cu_window) for ``n`` groups."""
        S = self.S
        steps = torch.arange(n, device=device, dtype=torch.int32)
        cu_full = torch.arange(n + 1, device=device, dtype=torch.int32) * S
        zero = torch.zeros(1, device=device, dtype=torch.int32)
        cu_win = torch.cat([zero, (self.cu_window[1:][None, :] + steps[:, None] * S).reshape(-1)])
        return self.cos.repeat(n, 1), self.sin.repeat(n, 1), cu_full, cu_win


class _VisionForward:
    """The video forward through the model's own vision blocks over temporal patch groups. Mixed into
    ``Qwen2_5_VLAdapter`` (and so ``Qwen2VLAdapter``), whose ``__init__`` sets the encoder attributes read here."""

    # ---------------------------------------------------------------- encoder geometry
    def _geometry(self, H: int, W: int, device: torch.device) -> _Geometry:
        # The rotary tables follow the encoder's inv_freq (model.to(dtype) casts it to a new tensor).
        inv_freq = getattr(self.visual.rotary_pos_emb, "inv_freq", None)
        rotary = (inv_freq.dtype, inv_freq.data_ptr()) if isinstance(inv_freq, torch.Tensor) else None
        key = (H, W, str(device), rotary)
        g = self._geometry_cache.get(key)
        if g is not None:
            return g
        visual, unit = self.visual, self.unit
        S = H * W
        grid1 = torch.tensor([[1, H, W]], dtype=torch.int64)
        if not self.windowed:  # Qwen2-VL: every block attends over the whole group, in raster order
            perm, cu = torch.arange(S // unit), torch.tensor([0, S])
        elif self._legacy_vision:  # transformers 4.57
            perm, cu = visual.get_window_index(grid1)
            cu = torch.unique_consecutive(torch.tensor(cu, dtype=torch.int32))
        else:
            from transformers.vision_utils import get_vision_window_index

            perm, cu = get_vision_window_index(
                grid1, spatial_merge_size=self.merge, window_size=self.window_size, patch_size=self.patch_size
            )
        if self._legacy_vision:  # transformers 4.57
            rot = visual.rot_pos_emb(grid1).to(device)
            rot = rot.reshape(S // unit, unit, -1)[perm.to(device)].reshape(S, -1)
            emb = torch.cat((rot, rot), dim=-1)
            cos, sin = emb.cos(), emb.sin()
        else:  # transformers 5.x
            from transformers.vision_utils import get_vision_position_ids

            pos = get_vision_position_ids(grid1, self.merge).to(device)
            probe = torch.empty(0, device=device)
            cos, sin = visual.rotary_pos_emb(probe, pos)
            cos = cos.reshape(S // unit, unit, -1)[perm.to(device)].reshape(S, -1)
            sin = sin.reshape(S // unit, unit, -1)[perm.to(device)].reshape(S, -1)
        cu = cu.to(torch.int32)
        perm = perm.to(torch.int64)
        inv = torch.argsort(perm)
        g = _Geometry(
            host_to_device(perm, torch.int64, device),
            host_to_device(inv, torch.int64, device),
            host_to_device(cu, torch.int32, device),
            cu.tolist(),
            cos,
            sin,
            S,
        )
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
        # SDPA: the adapter batches the windows itself (one call per window length; see
        # window_attention.py); other implementations run the model's own attention.
        batched = not flash and self.batch_windows and all(batchable(b.attn) for b in self.blocks)
        batches = geo.batches(n, device) if batched else None
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
                x = _run_block(blk, x, kw, batches[0 if full else 1] if batches else None)
                if i == last:
                    q, k = self._rotated_qk(captured[0], cos, sin)
                    captured[0] = None
                    run.score(q.reshape(n, S, -1), k.reshape(n, S, -1), scale=self.scale, num_heads=self.num_heads)
                if i in prune:
                    x = run.stage1(x.view(n, S, D), i)
                    n = int(x.shape[0])  # known on the host after Stage I's own size read
                    x = x.reshape(n * S, D)
                    cos, sin, cu_full, cu_win = geo.tiles(n, device)
                    batches = geo.batches(n, device) if batched else None
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
        return vision_rope(self.blocks[0].attn)(q, k, cos, sin)  # the model's own rotary, [seq, heads, head_dim]


def _run_block(blk, x: torch.Tensor, kw: dict[str, Any], batches: WindowBatches | None) -> torch.Tensor:
    """One vision block; with ``batches``, its attention runs batched over the windows (the block's
    own forward around it, hooks included)."""
    if batches is None:
        return blk(x, **kw)
    attn = blk.attn

    def forward(hidden_states, cu_seqlens=None, position_embeddings=None, **_):
        return window_attention(attn, hidden_states, batches, position_embeddings)

    prev = set_attr(attn, "forward", forward, guard=False)  # for this call only
    try:
        return blk(x, **kw)
    finally:
        restore_attr(attn, "forward", prev, guard=False)
