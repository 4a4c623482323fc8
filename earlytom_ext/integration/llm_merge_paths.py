"""The hooked prefill and decoding paths of :class:`~earlytom_ext.integration.llm_merge.LLMMerge` (a mixin)."""

from __future__ import annotations

import torch

from .llm_merge_support import (
    MERGE_LEFT_PADDING,
    _Call,
    _mask_2d,
    _Plan,
    _ShortCacheView,
    _State,
    call_cache,
    check_merge_cache,
    merge_span,
)


class _MergePaths:
    """The armed prefill and the decoding steps after it. Mixed into ``LLMMerge``, whose ``__init__``
    sets the attributes read here (the decoder, ``k``, the ratio, the score layer and the mask builder)."""

    def _with_hooks(self, orig, call: dict, hooks: list):
        handles = []
        try:
            for module, fn, pre in hooks:
                handles.append(
                    module.register_forward_pre_hook(fn, with_kwargs=True) if pre else module.register_forward_hook(fn)
                )
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
            raise ValueError(MERGE_LEFT_PADDING)
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
            if rows is not None and not all(rows[b][s : s + length]):
                raise ValueError(f"sample {b}: the video span {sp} covers padding positions")
            plans.append(_Plan(sp, max(1, round(length * (1.0 - self._ratio))), real))
        return plans

    def _prefill(self, orig, call: dict, spans: list, batch: int, n: int):
        cache = call_cache(call)
        check_merge_cache(cache)  # first: a static cache also makes the mask a dict
        mask = _mask_2d(call, "the armed prefill")
        plans = self._plan(spans, batch, n, mask)
        self._stats = None
        if all(p.removed == 0 for p in plans):
            self._stats_raw = [(p, self._kept_all(p)) for p in plans]
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

        hooks = [
            (self._attn_prev.q_proj, on_q, False),
            (self._attn_prev.k_proj, on_k, False),
            (layers[k], pre_merge, True),
        ] + [(layers[i], pre_later, True) for i in range(k + 1, self._depth)]
        out = self._with_hooks(orig, call, hooks)
        self._stats_raw = list(zip(plans, ctx.kept))
        cache = ctx.cache
        if cache is not None:
            self._states[cache] = _State(batch, n, short_len, ctx.short_mask)
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
            logits = logits.masked_fill(
                ~mask.to(device=logits.device, dtype=torch.bool)[:, None, None, :], float("-inf")
            )
        return torch.softmax(logits, dim=-1).mean(dim=(1, 2))

    def _merge_batch(
        self,
        ctx: _Call,
        plans: list[_Plan],
        hidden: torch.Tensor,
        kwargs: dict,
        mask: torch.Tensor | None,
        short_len: int,
    ) -> torch.Tensor:
        B, N, D = hidden.shape
        dev = hidden.device
        cos, sin = kwargs["position_embeddings"]
        scores = self._scores(ctx, cos, sin, mask)
        # The kept tokens keep their rotary angles: the layer's own tables gathered at the kept
        # positions (any position scheme, the 3-D one of Qwen2.5-VL included); padding gets angle 0.
        cos, sin = (t.to(dev).expand(B, N, t.shape[-1]) for t in (cos, sin))
        cos_short = cos.new_ones(B, short_len, cos.shape[-1])
        sin_short = sin.new_zeros(B, short_len, sin.shape[-1])
        mask_dtype = mask.dtype if mask is not None else torch.long
        out = hidden.new_zeros(B, short_len, D)
        mask_short = torch.zeros(B, short_len, dtype=mask_dtype, device=dev)
        full_mask = mask.to(dev) if mask is not None else torch.ones(B, N, dtype=mask_dtype, device=dev)
        for b, plan in enumerate(plans):
            if plan.removed == 0:
                rows, idx, kept = hidden[b], torch.arange(N, device=dev), self._kept_all(plan)
            else:
                s, length = plan.span
                kept_rows, kept_local = merge_span(hidden[b, s : s + length], scores[b, s : s + length], plan.n_keep)
                kept = kept_local + s
                idx = torch.cat([torch.arange(s, device=dev), kept, torch.arange(s + length, N, device=dev)])
                rows = torch.cat([hidden[b, :s], kept_rows, hidden[b, s + length :]])
            ctx.kept.append(kept)
            pad = short_len - idx.shape[0]
            out[b, pad:] = rows
            cos_short[b, pad:] = cos[b, idx]
            sin_short[b, pad:] = sin[b, idx]
            mask_short[b, pad:] = full_mask[b, idx]
        cache = call_cache(kwargs)  # what the model passes its decoder layers
        ctx.cache = cache
        ctx.short_mask = mask_short
        ctx.layer_kwargs = {
            "attention_mask": self._mask(out, mask_short, cache),
            "position_embeddings": (cos_short, sin_short),
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
        kw = {
            "config": self._lm.config,
            self._embeds_kw: hidden,
            "attention_mask": mask_2d,
            self._mask_cache_kw: view,
            "position_ids": None,
        }
        if self._mask_wants_cache_position:
            offset = view.get_query_offset() if view is not None else 0
            kw["cache_position"] = torch.arange(offset, offset + q, device=hidden.device)
        return self._create_mask(**kw)

    # ---------------------------------------------------------------- decoding
    def _decode(self, orig, call: dict, state: _State, batch: int, q_len: int):
        cache = call_cache(call)
        if batch != state.batch:
            raise RuntimeError(f"LLMMerge: decoding a batch of {batch} on a cache merged for a batch of {state.batch}")
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
            tail = mask[:, state.full_len :]
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
        hooks = [(layers[self._k], pre_first, True)] + [
            (layers[i], pre_later, True) for i in range(self._k + 1, self._depth)
        ]
        return self._with_hooks(orig, call, hooks)
