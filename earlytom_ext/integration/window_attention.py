"""Qwen2.5-VL's vision attention with its windows batched, and :func:`fast_window_attention`, the
same fix for an uncompressed model (Qwen2.5-VL and Qwen2-VL).

Without flash attention, every Qwen2.5-VL vision block reads its window lengths on the host
(``lengths.tolist()``, a sync) and calls the attention once per window in a Python loop: at
448 x 448 that is 16 calls per temporal group in each of the 28 windowed blocks. Attention never
crosses a window, so all windows of one length can go through one batched call with the same
per-window result. Qwen2-VL's blocks do the same with one "window" per temporal group (a sync and
one call per group in each of its 32 blocks). Only SDPA is batched: eager attention would hold
every window's (and, in the full-attention blocks, every group's) score matrix at once; flash
attention already makes one variable-length call per block.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import import_module

import torch
import torch.nn as nn

from .._validation import host_to_device
from .patches import InstancePatches

__all__ = ["FastWindowAttentionHandle", "WindowBatches", "batchable", "fast_window_attention", "window_attention"]


class WindowBatches:
    """The windows of a ``cu_seqlens`` layout grouped by length: ``classes`` holds, per length
    ``L``, ``(index, count, L)`` where ``index`` (int64, on the device) lists the tokens of its
    ``count`` windows one window after another, or is ``None`` when one length covers the whole
    sequence in order (then no gather is needed). Built from host boundaries: no device read."""

    def __init__(self, bounds: Sequence[int], device: torch.device | str):
        bounds = [int(b) for b in bounds]
        if not bounds or bounds[0] != 0 or any(nxt < prev for prev, nxt in zip(bounds, bounds[1:])):
            shown = f"{bounds[:8]}"[:-1] + ", ...]" if len(bounds) > 8 else f"{bounds}"
            raise ValueError(f"window bounds must start at 0 and never decrease, got {shown}")
        starts: dict[int, list[int]] = {}
        for a, b in zip(bounds, bounds[1:]):
            if b > a:  # an empty window attends nothing
                starts.setdefault(b - a, []).append(a)
        self.total = bounds[-1]
        if len(starts) == 1:
            ((length, s),) = starts.items()
            self.classes: list[tuple[torch.Tensor | None, int, int]] = [(None, len(s), length)]
            return
        self.classes = []
        for length, s in starts.items():
            index = (torch.tensor(s, dtype=torch.int64)[:, None] + torch.arange(length)).reshape(-1)
            self.classes.append((host_to_device(index, torch.int64, torch.device(device)), len(s), length))

    @classmethod
    def tiled(cls, bounds: Sequence[int], groups: int, group_size: int, device) -> WindowBatches:
        """The windows of ``groups`` consecutive groups of ``group_size`` tokens, each laid out as
        ``bounds`` (one group's boundaries, starting at 0 and ending at ``group_size``)."""
        if not bounds or bounds[0] != 0 or bounds[-1] != group_size:
            raise ValueError(f"one group's window bounds must run from 0 to {group_size}, got {list(bounds)}")
        inner = list(bounds[1:])
        return cls([0] + [g * group_size + b for g in range(groups) for b in inner], device)


def vision_rope(attn: nn.Module):
    """The model's own ``apply_rotary_pos_emb_vision`` for this attention module's version."""
    return import_module(type(attn).__module__).apply_rotary_pos_emb_vision


def batchable(attn: nn.Module) -> bool:
    """Whether ``attn`` runs SDPA in inference (the only case that is batched)."""
    impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
    return impl == "sdpa" and not attn.training


def window_attention(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    batches: WindowBatches,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    **kwargs,
) -> torch.Tensor:
    """The model's vision attention forward (qkv, its rotary, SDPA inside each window, proj) with
    one SDPA call per window length instead of one per window."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seq = hidden_states.shape[0]
    if seq != batches.total:
        raise ValueError(f"the window layout covers {batches.total} tokens, the hidden states hold {seq}")
    heads = attn.num_heads
    q, k, v = attn.qkv(hidden_states).reshape(seq, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = vision_rope(attn)(q, k, cos, sin)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attend(index, count, length):
        q_, k_, v_ = (t if index is None else t.index_select(0, index) for t in (q, k, v))
        q_, k_, v_ = (t.reshape(count, length, heads, -1).transpose(1, 2) for t in (q_, k_, v_))
        out, _ = sdpa(
            attn, q_, k_, v_, attention_mask=None, scaling=attn.scaling, dropout=0.0, is_causal=False, **kwargs
        )
        return out  # [count, length, heads, head_dim]

    if len(batches.classes) == 1 and batches.classes[0][0] is None:
        out = attend(*batches.classes[0]).reshape(seq, -1)
    else:
        out = v.new_empty((seq, heads, v.shape[-1]))
        for index, count, length in batches.classes:
            o = attend(index, count, length)
            out.index_copy_(0, index, o.reshape(count * length, heads, -1))
        out = out.reshape(seq, -1)
    return attn.proj(out)


class _BoundsCache:
    """Window batches of the last few ``cu_seqlens`` tensors seen, by identity: an uncompressed
    forward passes the same two tensors to all 32 blocks, so their lengths are read once each."""

    def __init__(self, size: int = 4):
        self._entries: list[tuple[torch.Tensor, int, WindowBatches]] = []
        self._size = size

    def get(self, cu_seqlens: torch.Tensor) -> WindowBatches:
        # Inference tensors have no version counter: keyed by identity alone, which holds because
        # the model builds new cu_seqlens tensors in every forward.
        version = None if cu_seqlens.is_inference() else cu_seqlens._version
        for t, v, b in self._entries:
            if t is cu_seqlens and v == version:
                return b
        b = WindowBatches(cu_seqlens.tolist(), cu_seqlens.device)
        self._entries = [(cu_seqlens, version, b)] + self._entries[: self._size - 1]
        return b


class FastWindowAttentionHandle(InstancePatches):
    """Returned by :func:`fast_window_attention`; ``remove()`` (or leaving a ``with`` block) restores
    every block's attention."""

    made_by = "fast_window_attention"

    def __init__(self, attns: Sequence[nn.Module]):
        super().__init__()
        cache = _BoundsCache()
        for attn in attns:
            original = attn.forward  # a previous instance patch, else the class's forward

            def forward(hidden_states, cu_seqlens, *args, _attn=attn, _original=original, **kwargs):
                pe = kwargs.get("position_embeddings")
                if args or pe is None or not batchable(_attn):
                    return _original(hidden_states, cu_seqlens, *args, **kwargs)
                rest = {
                    k: v for k, v in kwargs.items() if k not in ("position_embeddings", "rotary_pos_emb", "max_seqlen")
                }
                return window_attention(_attn, hidden_states, cache.get(cu_seqlens), pe, **rest)

            forward._earlytom_fast_window_attention = True
            self._set(attn, "forward", forward)


def vision_attentions(model: nn.Module) -> list[nn.Module]:
    """The attention modules of a Qwen2.5-VL or Qwen2-VL model's vision blocks (``TypeError`` for
    other models)."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    blocks = getattr(visual, "blocks", None)
    if getattr(getattr(model, "config", None), "model_type", None) not in ("qwen2_5_vl", "qwen2_vl") or not isinstance(
        blocks, nn.ModuleList
    ):
        raise TypeError(
            "fast_window_attention supports Hugging Face Qwen2.5-VL and Qwen2-VL models (config.model_type "
            f"'qwen2_5_vl' or 'qwen2_vl' with model.model.visual.blocks), got {type(model).__name__}"
        )
    attns = [getattr(b, "attn", None) for b in blocks]
    if not all(isinstance(getattr(a, "qkv", None), nn.Linear) and hasattr(a, "proj") for a in attns):
        raise TypeError(
            "fast_window_attention: every vision block needs attn.qkv and attn.proj (Qwen2-VL / Qwen2.5-VL)"
        )
    return attns


def fast_window_attention(model: nn.Module) -> FastWindowAttentionHandle:
    """Batch the window attention of a Qwen2.5-VL model's vision encoder, or the per-group attention
    of a Qwen2-VL model's (SDPA only; other attention implementations run as before).

    For an uncompressed model (EarlyTom's :func:`~earlytom_ext.apply` batches the windows of the
    videos it compresses already). Returns a handle whose ``remove()`` restores the model.
    """
    attns = vision_attentions(model)
    if any(getattr(a.__dict__.get("forward"), "_earlytom_fast_window_attention", False) for a in attns):
        raise RuntimeError("fast_window_attention is already applied to this model; call its handle's remove() first")
    return FastWindowAttentionHandle(attns)
