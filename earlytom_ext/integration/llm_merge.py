"""The inner-LLM token merge (the published ``INNER_k`` / ``INNER_r`` option) for Hugging Face decoders.

Before decoder layer ``k`` of the prefill, each armed sample's video span is shortened: the span
tokens the last prompt token attends to least (layer ``k - 1``, mean over heads) are merged into
their most similar kept token (sequential halving) and dropped; layers ``k ..`` run on the shorter
sequence with the kept tokens' original position ids, and their KV cache holds only the kept
tokens. The semantics (reference: :func:`earlytom_ext.reference.llm_merge`):

* keep set: the ``max(1, round(L * (1 - r_in)))`` highest-scored span positions (ties: lower
  position); target of a removed token: the kept token of highest cosine (ties: higher score, then
  lower position), cosines computed once before any update; removed tokens are folded into their
  target in ascending position order, ``h = (h + h_i) / 2`` in fp32, rounded once.
* scores: one softmax row per head from layer ``k - 1``'s query of the last prompt token and its
  keys (rotary applied with the model's own ``apply_rotary_pos_emb``, GQA heads mapped as
  ``repeat_kv`` does, padded keys masked), fp32; no attention map is materialised and every layer
  keeps its attention implementation.

Mechanics: :meth:`LLMMerge.install` replaces the language model's ``forward`` on the instance.
An un-armed call goes straight to the original ``forward`` (bit-identical). An armed prefill, or a
decoding step on a cache that an armed prefill filled, runs the original ``forward`` with hooks
present for that call only: forward hooks on layer ``k - 1``'s ``q_proj`` / ``k_proj`` capture the
score inputs, a forward pre-hook on layer ``k`` merges and re-pads the hidden states, and forward
pre-hooks on layers ``>= k`` swap in the shortened sequence's mask, rotary embeddings and cache
positions. The model's own mask builder makes the masks of layers ``>= k`` (so sdpa, eager and
flash keep their own mask formats). Masks, norm, output recording and caching stay the model's.
"""
from __future__ import annotations

import functools
import inspect
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import check_llm_merge

__all__ = ["LLMMerge", "merge_span"]

_MISSING = object()
_NAMES = ("layer (EarlyTomConfig.llm_merge_layer)", "ratio (EarlyTomConfig.llm_merge_ratio)")


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
def _supported_decoder(lm: nn.Module) -> tuple[Callable, int, int, int]:
    """``(apply_rotary_pos_emb, heads, kv_heads, head_dim)`` of a Qwen2-style decoder, else TypeError."""
    name = type(lm).__name__
    layers = getattr(lm, "layers", None)
    config = getattr(lm, "config", None)
    if (not isinstance(lm, nn.Module) or not isinstance(layers, nn.ModuleList) or len(layers) == 0
            or not isinstance(getattr(lm, "rotary_emb", None), nn.Module) or config is None):
        raise TypeError(
            "LLMMerge supports Hugging Face Qwen2-style decoder stacks (a Qwen2Model with `layers`, `rotary_emb` "
            f"and `config`, e.g. LLaVA-OneVision's model.model.language_model), got {name}"
        )
    sig = inspect.signature(lm.forward).parameters
    missing = [p for p in ("inputs_embeds", "attention_mask", "position_ids", "past_key_values") if p not in sig]
    if missing:
        raise TypeError(f"LLMMerge: {name}.forward lacks the arguments {missing}")
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads % kv_heads:
        raise TypeError(f"LLMMerge: cannot read num_attention_heads / num_key_value_heads of {name}'s config")
    types = getattr(config, "layer_types", None) or ["full_attention"] * len(layers)
    if any(t != "full_attention" for t in types) or getattr(config, "use_sliding_window", False):
        raise TypeError(f"LLMMerge supports full-attention decoders only; {name} has layer types {sorted(set(types))} "
                        f"(use_sliding_window={getattr(config, 'use_sliding_window', False)})")
    head_dim = None
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if not all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj")) or not isinstance(
                getattr(attn, "scaling", None), float) or not isinstance(getattr(attn, "head_dim", None), int):
            raise TypeError(
                "LLMMerge: every decoder layer needs `self_attn` with `q_proj` and `k_proj` linears, `head_dim` and "
                f"`scaling` (Qwen2Attention); layer {i} of {name} is {type(layer).__name__}"
            )
        head_dim = attn.head_dim
    rope = getattr(sys.modules.get(type(layers[0].self_attn).__module__), "apply_rotary_pos_emb", None)
    if not callable(rope):
        raise TypeError(f"LLMMerge: no apply_rotary_pos_emb next to {type(layers[0].self_attn).__name__}")
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
    """What decoding after a merged prefill needs (kept per cache: one merged prefill at a time)."""

    cache_ref: Any  # weakref to the cache the prefill filled
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


# --------------------------------------------------------------------------------------------
# The merge
# --------------------------------------------------------------------------------------------
class LLMMerge:
    """Inner-LLM token merge on one Hugging Face decoder stack (``model.model.language_model``).

    Args:
        language_model: a Qwen2-style ``Qwen2Model`` (transformers 4.57.x or 5.x), full attention.
        layer: k, the 0-based decoder layer before which the merge runs, in ``[1, depth - 1]``.
        ratio: r_in, the fraction of each video span removed, in [0, 1).

    Raises ``TypeError`` for an unsupported decoder and ``ValueError`` for ``layer`` / ``ratio``
    out of range.

    Use: :meth:`install` (idempotent), then :meth:`arm` with one span per sample before each
    prefill that should be merged; :meth:`remove` restores the module exactly.

    Output length: a merged prefill's output (``last_hidden_state``, the recorded hidden states of
    layers ``>= k``, and so the logits) is over the *shortened* sequence ``[B, N', D]`` with
    ``N' = max_b (N - removed_b)``: per sample, the tokens before the span, the kept span tokens
    (ascending), the tokens after it, left-padded to ``N'``. The last column is still every
    sample's last prompt token. Layers ``< k`` keep ``N`` tokens in the cache, layers ``>= k``
    ``N'``; decoding steps return ``[B, q, D]`` as usual. The caller's ``attention_mask`` and
    ``position_ids`` keep their full-length meaning (``N`` prompt columns, original positions):
    the merge maps them for layers ``>= k`` itself.

    Requirements of an armed prefill: an empty (or no) cache, a ``DynamicCache`` when one is
    used, a 2D (or no) attention mask, left padding (every sample's last column is a real token),
    each span inside its sample's real tokens and ending before the last one. Decoding after it
    needs the same cache object (beam reordering is fine; cropping is not); generation without a
    cache (``use_cache=False``) merges only the armed forward.
    """

    def __init__(self, language_model: nn.Module, layer: int, ratio: float):
        self._rope, self._heads, self._kv_heads, self._head_dim = _supported_decoder(language_model)
        depth = len(language_model.layers)
        check_llm_merge(layer, ratio, depth, names=_NAMES)
        if layer is None:
            raise TypeError(f"{_NAMES[0]} must be an int in [1, {depth - 1}], got None")
        self._lm = language_model
        self._k = layer
        self._ratio = float(ratio)
        self._depth = depth
        self._attn_prev = language_model.layers[layer - 1].self_attn
        self._scaling = float(self._attn_prev.scaling)
        from transformers import masking_utils

        self._create_mask = masking_utils.create_causal_mask
        params = inspect.signature(self._create_mask).parameters
        self._embeds_kw = "inputs_embeds" if "inputs_embeds" in params else "input_embeds"
        self._mask_wants_cache_position = "cache_position" in params
        self._wrapper = None
        self._prev_forward: Any = _MISSING
        self._armed: list | None = None
        self._state: _State | None = None
        self._stats_raw: list | None = None
        self._stats: list | None = None

    # ---------------------------------------------------------------- public
    @property
    def layer(self) -> int:
        return self._k

    @property
    def ratio(self) -> float:
        return self._ratio

    @property
    def installed(self) -> bool:
        return self._wrapper is not None

    def install(self) -> None:
        """Replace the language model's ``forward`` on the instance (idempotent)."""
        if self._wrapper is not None:
            return
        lm = self._lm
        self._prev_forward = lm.__dict__.get("forward", _MISSING)
        orig = lm.forward  # bound method (or a previous instance wrapper)
        sig = inspect.signature(orig)
        varkw = next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), None)
        merge = self

        @functools.wraps(orig)
        def forward(*args, **kwargs):
            call = dict(sig.bind_partial(*args, **kwargs).arguments)
            if varkw is not None:
                call.update(call.pop(varkw, {}))
            return merge._forward(orig, args, kwargs, call)

        forward._earlytom_llm_merge = self
        self._wrapper = forward
        lm.__dict__["forward"] = forward

    def remove(self) -> None:
        """Restore the language model's ``forward`` and forget any armed or decoding state (idempotent)."""
        if self._wrapper is None:
            return
        lm = self._lm
        if lm.__dict__.get("forward") is not self._wrapper:
            raise RuntimeError("the language model's forward was replaced after LLMMerge.install(); remove that first")
        if self._prev_forward is _MISSING:
            lm.__dict__.pop("forward", None)
        else:
            lm.__dict__["forward"] = self._prev_forward
        self._prev_forward = _MISSING
        self._wrapper = None
        self._armed = None
        self._state = None

    def arm(self, spans: list[tuple[int, int] | None]) -> None:
        """Arm the merge for the next prefill (the next forward whose query length is > 1).

        ``spans``: one entry per sample of that forward (positions in the sequence as given to
        the language model, after padding): ``(start, length)`` of the video span (Stage II tokens
        and the newline), or ``None`` to leave the sample untouched. When the forward's batch is a
        multiple of ``len(spans)`` (``generate`` with beams or several returned sequences expands
        each sample in place), each entry is repeated for its copies.
        """
        if self._wrapper is None:
            raise RuntimeError("LLMMerge.arm: install() the merge first")
        if not isinstance(spans, (list, tuple)) or len(spans) == 0:
            raise ValueError(f"spans must be a non-empty list with one entry per sample, got {spans!r}")
        out = []
        for i, sp in enumerate(spans):
            if sp is None:
                out.append(None)
                continue
            if (not isinstance(sp, (tuple, list)) or len(sp) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in sp)):
                raise TypeError(f"spans[{i}] must be None or a (start, length) pair of ints, got {sp!r}")
            if sp[0] < 0 or sp[1] < 0:
                raise ValueError(f"spans[{i}] = {tuple(sp)}: start and length must be >= 0")
            out.append((sp[0], sp[1]))
        self._armed = out

    def disarm(self) -> None:
        """Drop an armed plan that no forward consumed. Callers that arm before a call should disarm
        when the call fails before its prefill, or the plan would apply to the next prefill."""
        self._armed = None

    @property
    def last_stats(self) -> list[dict] | None:
        """Per sample of the last armed prefill: ``{"span": (start, length) | None, "kept": [original
        positions of the kept span tokens], "prefill_len_before": real (unpadded) tokens entering
        layer k, "prefill_len_after": real tokens leaving the merge}``; ``None`` before the first."""
        if self._stats_raw is None:
            return None
        if self._stats is None:
            self._stats = [
                {"span": plan.span, "kept": [int(v) for v in kept.tolist()] if kept is not None else [],
                 "prefill_len_before": plan.real_len, "prefill_len_after": plan.real_len - plan.removed}
                for plan, kept in self._stats_raw
            ]
        return self._stats

    def __repr__(self) -> str:
        return (f"LLMMerge(layer={self._k}, ratio={self._ratio:g}, "
                f"{'installed' if self.installed else 'not installed'})")

    # ---------------------------------------------------------------- dispatch
    def _forward(self, orig, args, kwargs, call: dict):
        shape = _seq_len(call)
        if shape is None:
            return orig(*args, **kwargs)  # let the model report the bad call
        batch, q_len = shape
        cache = call.get("past_key_values")
        cached = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        state = self._state
        if state is not None and cache is not None and cache is state.cache_ref():
            if cached > 0:
                return self._decode(orig, call, state, batch, q_len)
            self._state = None  # the cache was reset: a fresh prefill follows
        if self._armed is not None and q_len > 1:
            spans, self._armed = self._armed, None
            if cached > 0 or (cache is not None and not hasattr(cache, "get_seq_length")):
                raise ValueError(
                    "the inner-LLM merge runs on a prefill from an empty cache; past_key_values already holds "
                    f"{cached} tokens"
                )
            return self._prefill(orig, call, spans, batch, q_len)
        if q_len > 1 and cached == 0:
            self._state = None  # an un-armed prefill starts a new sequence
        return orig(*args, **kwargs)

    def _with_hooks(self, orig, call: dict, hooks: list):
        handles = []
        try:
            for module, fn, pre in hooks:
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True) if pre
                               else module.register_forward_hook(fn))
            return orig(**call)
        finally:
            for h in handles:
                h.remove()

    # ---------------------------------------------------------------- prefill
    def _plan(self, spans: list, batch: int, n: int, mask: torch.Tensor | None) -> list[_Plan]:
        if batch % len(spans):
            raise ValueError(
                f"the inner-LLM merge was armed with {len(spans)} span(s) but the prefill has a batch of {batch}"
            )
        rep = batch // len(spans)
        spans = [sp for sp in spans for _ in range(rep)]
        rows = mask.tolist() if mask is not None else None
        if rows is not None and not all(r[-1] for r in rows):
            raise ValueError("the inner-LLM merge needs left padding: every sample's last column must be a real token")
        plans = []
        for b, sp in enumerate(spans):
            real = int(sum(1 for v in rows[b] if v)) if rows is not None else n
            if sp is None or sp[1] == 0:
                plans.append(_Plan(sp, 0, real))
                continue
            s, length = sp
            if s + length > n - 1:
                raise ValueError(
                    f"sample {b}: the video span {sp} must end before the last prompt token (sequence length {n})"
                )
            if rows is not None and not all(rows[b][s:s + length]):
                raise ValueError(f"sample {b}: the video span {sp} covers padding positions")
            plans.append(_Plan(sp, max(1, round(length * (1.0 - self._ratio))), real))
        return plans

    def _prefill(self, orig, call: dict, spans: list, batch: int, n: int):
        mask = _mask_2d(call, "the armed prefill")
        cache = call.get("past_key_values")
        if cache is not None:
            from transformers.cache_utils import DynamicCache

            if not isinstance(cache, DynamicCache):
                raise ValueError(f"the inner-LLM merge needs a DynamicCache (or none), got {type(cache).__name__}")
        plans = self._plan(spans, batch, n, mask)
        self._stats = None
        if all(p.removed == 0 for p in plans):
            self._stats_raw = [(p, self._kept_all(p)) for p in plans]
            self._state = None
            return orig(**call)
        short_len = max(n - p.removed for p in plans)
        ctx = _Call()
        k = self._k
        layers = self._lm.layers

        def on_q(module, inputs, output):
            ctx.q_last = output[:, -1].detach().clone()  # only the last prompt token's query is needed

        def on_k(module, inputs, output):
            ctx.k = output

        def pre_merge(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            new_hidden = self._merge_batch(ctx, plans, hidden, kwargs, mask, short_len)
            if args:
                args = (new_hidden,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = new_hidden
            kwargs.update({key: v for key, v in ctx.layer_kwargs.items() if key in kwargs})
            return args, kwargs

        def pre_later(module, args, kwargs):
            kwargs.update({key: v for key, v in ctx.layer_kwargs.items() if key in kwargs})
            return args, kwargs

        hooks = [(self._attn_prev.q_proj, on_q, False), (self._attn_prev.k_proj, on_k, False),
                 (layers[k], pre_merge, True)] + [(layers[i], pre_later, True) for i in range(k + 1, self._depth)]
        out = self._with_hooks(orig, call, hooks)
        self._stats_raw = list(zip(plans, ctx.kept))
        cache = ctx.cache
        self._state = None if cache is None else _State(weakref.ref(cache), batch, n, short_len, ctx.short_mask)
        return out

    def _kept_all(self, plan: _Plan) -> torch.Tensor | None:
        if plan.span is None:
            return None
        s, length = plan.span
        return torch.arange(s, s + length)

    def _scores(self, ctx: _Call, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``[B, N]`` fp32: layer k-1's attention row of the last query, mean over heads."""
        if ctx.q_last is None or ctx.k is None:
            raise RuntimeError("LLMMerge: the query/key projections of the score layer were not captured")
        B, N = ctx.k.shape[0], ctx.k.shape[1]
        H, Hkv, d = self._heads, self._kv_heads, self._head_dim
        q = ctx.q_last.view(B, H, 1, d)
        key = ctx.k.view(B, N, Hkv, d).transpose(1, 2)
        cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)
        q = self._rope(q, q, cos[:, -1:], sin[:, -1:])[0]
        key = self._rope(key, key, cos, sin)[0]
        ctx.q_last = ctx.k = None
        # Query head h reads key head h // (H / Hkv), as repeat_kv lays them out.
        logits = torch.einsum("bgrd,bgnd->bgrn", q.float().view(B, Hkv, H // Hkv, d), key.float()) * self._scaling
        if mask is not None:
            logits = logits.masked_fill(~mask.to(device=logits.device, dtype=torch.bool)[:, None, None, :],
                                        float("-inf"))
        return torch.softmax(logits, dim=-1).mean(dim=(1, 2))

    def _merge_batch(self, ctx: _Call, plans: list[_Plan], hidden: torch.Tensor, kwargs: dict,
                     mask: torch.Tensor | None, short_len: int) -> torch.Tensor:
        B, N, D = hidden.shape
        dev = hidden.device
        cos, sin = kwargs["position_embeddings"]
        scores = self._scores(ctx, cos, sin, mask)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(N, device=dev)[None]
        pos = pos.to(dev).expand(B, -1)
        mask_dtype = mask.dtype if mask is not None else torch.long
        out = hidden.new_zeros(B, short_len, D)
        pos_short = torch.zeros(B, short_len, dtype=pos.dtype, device=dev)
        mask_short = torch.zeros(B, short_len, dtype=mask_dtype, device=dev)
        full_mask = mask.to(dev) if mask is not None else torch.ones(B, N, dtype=mask_dtype, device=dev)
        for b, plan in enumerate(plans):
            if plan.removed == 0:
                rows, idx, kept = hidden[b], torch.arange(N, device=dev), self._kept_all(plan)
            else:
                s, length = plan.span
                kept_rows, kept_local = merge_span(hidden[b, s:s + length], scores[b, s:s + length], plan.n_keep)
                kept = kept_local + s
                idx = torch.cat([torch.arange(s, device=dev), kept, torch.arange(s + length, N, device=dev)])
                rows = torch.cat([hidden[b, :s], kept_rows, hidden[b, s + length:]])
            ctx.kept.append(kept)
            pad = short_len - idx.shape[0]
            out[b, pad:] = rows
            pos_short[b, pad:] = pos[b, idx]
            mask_short[b, pad:] = full_mask[b, idx]
        cache = kwargs.get("past_key_values")
        ctx.cache = cache
        ctx.short_mask = mask_short
        ctx.layer_kwargs = {
            "attention_mask": self._mask(out, mask_short, cache),
            "position_embeddings": self._lm.rotary_emb(out, pos_short),
            # Rotary comes from position_embeddings; no position ids below layer k, so that flash
            # attention does not read the gaps as packed sequences.
            "position_ids": None,
            "cache_position": torch.arange(short_len, device=dev),
        }
        return out

    def _mask(self, hidden: torch.Tensor, mask_2d: torch.Tensor, cache):
        """The model's own causal mask for layers >= k (sized by layer k's cache)."""
        view = _ShortCacheView(cache, self._k) if cache is not None else None
        q = hidden.shape[1]
        kw = {"config": self._lm.config, self._embeds_kw: hidden, "attention_mask": mask_2d,
              "past_key_values": view, "position_ids": None}
        if self._mask_wants_cache_position:
            offset = view.get_query_offset() if view is not None else 0
            kw["cache_position"] = torch.arange(offset, offset + q, device=hidden.device)
        return self._create_mask(**kw)

    # ---------------------------------------------------------------- decoding
    def _decode(self, orig, call: dict, state: _State, batch: int, q_len: int):
        cache = call["past_key_values"]
        if batch != state.batch:
            raise RuntimeError(
                f"LLMMerge: decoding a batch of {batch} on a cache merged for a batch of {state.batch}"
            )
        full_past = int(cache.get_seq_length(0))
        short_past = int(cache.get_seq_length(self._k))
        decoded = full_past - state.full_len
        if decoded < 0 or short_past - state.short_len != decoded:
            raise RuntimeError(
                "LLMMerge: the cache no longer matches the merged prefill (layers < k hold "
                f"{full_past}, layers >= k {short_past} tokens for prefills of {state.full_len} / {state.short_len}); "
                "it was cropped or modified"
            )
        mask = _mask_2d(call, "a decoding step after a merged prefill")
        short_prefill = state.short_mask
        if mask is not None:
            if mask.shape[1] != full_past + q_len:
                raise ValueError(
                    f"attention_mask must cover the {full_past} cached and {q_len} new tokens, got {tuple(mask.shape)}"
                )
            tail = mask[:, state.full_len:]
            short = torch.cat([short_prefill.to(device=tail.device, dtype=tail.dtype), tail], dim=1)
        else:
            tail = torch.ones(batch, decoded + q_len, dtype=short_prefill.dtype, device=short_prefill.device)
            short = torch.cat([short_prefill, tail], dim=1)
        ctx = _Call()

        def pre_first(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            ctx.layer_kwargs = {
                "attention_mask": self._mask(hidden, short.to(hidden.device), cache),
                "cache_position": torch.arange(short_past, short_past + q_len, device=hidden.device),
            }
            kwargs.update({key: v for key, v in ctx.layer_kwargs.items() if key in kwargs})
            return args, kwargs

        def pre_later(module, args, kwargs):
            kwargs.update({key: v for key, v in ctx.layer_kwargs.items() if key in kwargs})
            return args, kwargs

        layers = self._lm.layers
        hooks = [(layers[self._k], pre_first, True)] + [(layers[i], pre_later, True)
                                                         for i in range(self._k + 1, self._depth)]
        return self._with_hooks(orig, call, hooks)
