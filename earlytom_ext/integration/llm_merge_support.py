"""Parts of the inner-LLM merge: one span's merge (``merge_span``), the decoder check, cache view and call state."""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["merge_span"]


# --------------------------------------------------------------------------------------------
# The merge of one span (the reference's steps 3-5, vectorised where it pays)
# --------------------------------------------------------------------------------------------
def merge_span(x: torch.Tensor, scores: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one video span: ``(kept_rows [n_keep, D] in x.dtype, kept [n_keep] span-local, ascending)``.

    ``x [L, D]`` the span's hidden states entering layer k, ``scores [L]``, ``1 <= n_keep <= L``.
    Same arithmetic as :func:`earlytom_ext.reference.llm_merge`: the sequential halving runs in
    rounds (round r folds, into every kept token at once, the r-th token it absorbs in ascending
    order), so each kept row sees exactly the reference's fp32 operations in the same order.
    One host sync (the targets, to plan the rounds).
    """
    L = x.shape[0]
    order = torch.sort(scores.float(), descending=True, stable=True).indices  # ties: lower position first
    kept_by_score = order[:n_keep]
    back = torch.argsort(kept_by_score)  # score order -> ascending position order
    kept = kept_by_score[back]
    if n_keep == L:
        return x[kept], kept
    # One gather into score order: rows [:n_keep] are the kept tokens (columns of the argmax, so its
    # first maximum is the higher score, then the lower position), rows [n_keep:] the removed ones.
    xs = x[order].float()
    xn = F.normalize(xs, dim=-1, eps=1e-12)
    col = (xn[n_keep:] @ xn[:n_keep].T).argmax(dim=1)
    asc = torch.argsort(order[n_keep:])  # the removed tokens in ascending position order
    asc_h, col_h = torch.stack([asc, col[asc]]).tolist()
    groups: list[list[int]] = [[] for _ in range(n_keep)]
    for i, c in zip(asc_h, col_h):
        groups[c].append(n_keep + i)  # row of xs; each group ascending in position
    # Removed rows are never written, so the kept rows can be updated in place.
    for r in range(max(len(g) for g in groups)):
        dst = [c for c in range(n_keep) if len(groups[c]) > r]
        dst_t = torch.tensor(dst, dtype=torch.long, device=x.device)
        src_t = torch.tensor([groups[c][r] for c in dst], dtype=torch.long, device=x.device)
        xs[dst_t] = (xs[dst_t] + xs[src_t]) / 2
    return xs[:n_keep][back].to(x.dtype), kept


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
# The KV cache argument: transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name is
# still accepted there, with a FutureWarning); 4.57 - 5.23 know only ``past_key_values``.
MERGE_ONE_VIDEO = "the inner-LLM merge supports one video per sample; a sample holds several"
MERGE_LEFT_PADDING = (
    "the inner-LLM merge needs left padding: every sample's last column must be a real token "
    "(tokenizer.padding_side = 'left')"
)
CACHE_ARGS = ("cache", "past_key_values")


def cache_arg(fn: Callable) -> str:
    """The name under which ``fn`` (a forward or the mask builder) takes the KV cache."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def call_cache(call: dict) -> Any:
    """The KV cache a call carries under either name (``cache`` first), else ``None``."""
    cache = call.get("cache")
    return call.get("past_key_values") if cache is None else cache


def _supported_decoder(lm: nn.Module) -> tuple[Callable, int, int, int]:
    """``(apply_rotary_pos_emb, heads, kv_heads, head_dim)`` of a Qwen2- or Llama-style decoder, else TypeError."""
    name = type(lm).__name__
    layers = getattr(lm, "layers", None)
    config = getattr(lm, "config", None)
    if (
        not isinstance(lm, nn.Module)
        or not isinstance(layers, nn.ModuleList)
        or len(layers) == 0
        or not isinstance(getattr(lm, "rotary_emb", None), nn.Module)
        or config is None
    ):
        raise TypeError(
            "LLMMerge supports Hugging Face Qwen2- or Llama-style decoder stacks (a Qwen2Model or LlamaModel with "
            "`layers`, `rotary_emb` "
            f"and `config`, e.g. LLaVA-OneVision's model.model.language_model), got {name}"
        )
    sig = inspect.signature(lm.forward).parameters
    missing = [p for p in ("inputs_embeds", "attention_mask", "position_ids") if p not in sig]
    if not any(p in sig for p in CACHE_ARGS):
        missing.append(" or ".join(CACHE_ARGS))
    if missing:
        raise TypeError(f"LLMMerge: {name}.forward lacks the arguments {missing}")
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads % kv_heads:
        raise TypeError(f"LLMMerge: cannot read num_attention_heads / num_key_value_heads of {name}'s config")
    types = getattr(config, "layer_types", None) or ["full_attention"] * len(layers)
    # Qwen2 says use_sliding_window; Mistral has only sliding_window (None: full attention).
    sliding = getattr(config, "use_sliding_window", None)
    if sliding is None:
        sliding = getattr(config, "sliding_window", None) is not None
    if any(t != "full_attention" for t in types) or sliding:
        raise TypeError(
            f"LLMMerge supports full-attention decoders only; {name} has layer types {sorted(set(types))} "
            f"(use_sliding_window={getattr(config, 'use_sliding_window', None)}, "
            f"sliding_window={getattr(config, 'sliding_window', None)})"
        )
    head_dim = None
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if (
            not all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj"))
            or not isinstance(getattr(attn, "scaling", None), float)
            or not isinstance(getattr(attn, "head_dim", None), int)
        ):
            raise TypeError(
                "LLMMerge: every decoder layer needs `self_attn` with `q_proj` and `k_proj` linears, `head_dim` and "
                f"`scaling` (Qwen2Attention); layer {i} of {name} is {type(layer).__name__}"
            )
        head_dim = attn.head_dim
    module = sys.modules.get(type(layers[0].self_attn).__module__)
    rope = getattr(module, "apply_rotary_pos_emb", None)
    if not callable(rope):
        attn_name = type(layers[0].self_attn).__name__
        if callable(getattr(module, "apply_multimodal_rotary_pos_emb", None)):
            raise TypeError(
                f"LLMMerge: {attn_name} applies its multimodal (3-D) rotary embedding inside the attention, as "
                "transformers 4.x does for Qwen2.5-VL and Qwen2-VL; the inner-LLM merge on these models needs "
                "transformers 5.x"
            )
        raise TypeError(f"LLMMerge: no apply_rotary_pos_emb next to {attn_name}")
    return rope, heads, kv_heads, head_dim


class _ShortCacheView:
    """What the model's mask builder reads from a cache, sized by layer ``k`` (the first layer that
    holds only the kept tokens): query offset = cached length of layer k, kv length = that + query."""

    is_compileable = False

    def __init__(self, cache, layer: int):
        self._cache = cache
        self._layer = layer

    def _len(self) -> int:
        return int(self._cache.get_seq_length(self._layer))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._len()

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._len()

    def get_mask_sizes(self, query, layer_idx: int = 0) -> tuple[int, int]:
        q = query if isinstance(query, int) else int(query.shape[0])  # 5.x: length; 4.57: cache_position
        return self._len() + q, 0


def _seq_len(call: dict) -> tuple[int, int] | None:
    t = call.get("inputs_embeds")
    if t is None:
        t = call.get("input_ids")
    if not isinstance(t, torch.Tensor) or t.dim() < 2:
        return None
    return int(t.shape[0]), int(t.shape[1])


def _mask_2d(call: dict, what: str) -> torch.Tensor | None:
    m = call.get("attention_mask")
    if m is not None and (not isinstance(m, torch.Tensor) or m.dim() != 2):
        raise ValueError(
            f"the inner-LLM merge needs a 2D attention_mask [batch, length] (or None) in {what}, got "
            f"{type(m).__name__ if not isinstance(m, torch.Tensor) else tuple(m.shape)}"
        )
    return m


@dataclass
class _Plan:
    """One sample of an armed prefill."""

    span: tuple[int, int] | None
    n_keep: int  # kept span tokens (== length when nothing is removed)
    real_len: int  # non-padding tokens before the merge

    @property
    def removed(self) -> int:
        return 0 if self.span is None else self.span[1] - self.n_keep


@dataclass
class _State:
    """What decoding after a merged prefill needs (kept per cache, by the merge)."""

    batch: int
    full_len: int  # prefill length of layers < k
    short_len: int  # prefill length of layers >= k
    short_mask: torch.Tensor  # [batch, short_len] the prefill's mask for layers >= k


class _Call:
    """Hook state of one patched forward."""

    def __init__(self):
        self.q_last = None
        self.k = None
        self.layer_kwargs: dict = {}
        self.cache = None
        self.short_mask = None
        self.kept: list = []


def check_merge_cache(cache, name: str = "cache") -> None:
    """The inner-LLM merge shortens the cache of the layers after it: a ``DynamicCache`` or none."""
    if cache is None:
        return
    from transformers.cache_utils import DynamicCache

    if not isinstance(cache, DynamicCache):
        raise ValueError(f"the inner-LLM merge needs a DynamicCache (or none) as {name}, got {type(cache).__name__}")


def _is_merged(cache, k: int) -> bool:
    """A cache whose layers >= k hold fewer tokens than layer 0: filled by a merged prefill (always a
    DynamicCache, whose lengths are host values; other caches are not read: no sync)."""
    from transformers.cache_utils import DynamicCache

    if not isinstance(cache, DynamicCache):
        return False
    length = cache.get_seq_length
    try:
        return int(length(k)) != int(length(0))
    except (IndexError, TypeError, ValueError):  # fewer cached layers, or no per-layer lengths
        return False
