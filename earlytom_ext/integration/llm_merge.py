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
import weakref
from typing import Any

import torch.nn as nn

from ..config import check_llm_merge
from .llm_merge_paths import _MergePaths
from .llm_merge_support import _is_merged, _seq_len, _supported_decoder, cache_arg, call_cache, merge_span
from .patches import MISSING, restore_attr, set_attr

__all__ = ["LLMMerge", "merge_span"]

_NAMES = ("layer (EarlyTomConfig.llm_merge_layer)", "ratio (EarlyTomConfig.llm_merge_ratio)")

# The installed merge of each decoder stack: models that share one (the same language_model object)
# cannot carry two merges, whose decoding states would clash.
_INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------
# The merge
# --------------------------------------------------------------------------------------------
class LLMMerge(_MergePaths):
    """Inner-LLM token merge on one Hugging Face decoder stack (``model.model.language_model``).

    Args:
        language_model: a Qwen2- or Llama-style decoder stack (``Qwen2Model``, ``LlamaModel``;
            transformers 4.57.x or 5.x), full attention.
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
        _check_not_merged(language_model)
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
        self._mask_cache_kw = cache_arg(self._create_mask)
        self._mask_wants_cache_position = "cache_position" in params
        self._wrapper = None
        self._prev_forward: Any = MISSING
        self._armed: list | None = None
        # Decoding state per merged cache (several merged caches may be decoded in turn).
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
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

    def checkpointed(self) -> bool:
        """Whether the backward pass would recompute a decoder layer the merge changes (k on) without
        the merge: Hugging Face checkpoints a layer in training mode, and before transformers 5.25 it
        checkpoints the layer's whole ``__call__``, hooks included, which are gone by then."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        wraps_call = "__call__" in GradientCheckpointingLayer.__dict__
        return any(
            m.training
            and getattr(m, "gradient_checkpointing", False) is True
            and (wraps_call or not isinstance(m, GradientCheckpointingLayer))
            for m in self._lm.layers[self._k :]
        )

    def install(self) -> None:
        """Replace the language model's ``forward`` on the instance (idempotent)."""
        if self._wrapper is not None:
            return
        lm = self._lm
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

        _check_not_merged(lm)
        self._wrapper = forward
        self._prev_forward = set_attr(lm, "forward", forward)
        _INSTALLED[lm] = self

    def remove(self) -> None:
        """Restore the language model's ``forward`` and forget any armed or decoding state (idempotent)."""
        if self._wrapper is None:
            return
        lm = self._lm
        if lm.__dict__.get("forward") is not self._wrapper:
            raise RuntimeError("the language model's forward was replaced after LLMMerge.install(); remove that first")
        restore_attr(lm, "forward", self._prev_forward)
        _INSTALLED.pop(lm, None)
        self._prev_forward = MISSING
        self._wrapper = None
        self._armed = None
        self._states.clear()

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
            if (
                not isinstance(sp, (tuple, list))
                or len(sp) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in sp)
            ):
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
                {
                    "span": plan.span,
                    "kept": [int(v) for v in kept.tolist()] if kept is not None else [],
                    "prefill_len_before": plan.real_len,
                    "prefill_len_after": plan.real_len - plan.removed,
                }
                for plan, kept in self._stats_raw
            ]
        return self._stats

    def __repr__(self) -> str:
        return f"LLMMerge(layer={self._k}, ratio={self._ratio:g}, {'installed' if self.installed else 'not installed'})"

    # ---------------------------------------------------------------- dispatch
    def _forward(self, orig, args, kwargs, call: dict):
        shape = _seq_len(call)
        if shape is None:
            return orig(*args, **kwargs)  # let the model report the bad call
        batch, q_len = shape
        cache = call_cache(call)
        cached = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        try:
            state = self._states.get(cache) if cache is not None else None
        except TypeError:  # a legacy tuple cache (no weak references): never merged
            state = None
        if state is not None:
            if cached > 0:
                return self._decode(orig, call, state, batch, q_len)
            del self._states[cache]  # the cache was reset: a fresh prefill follows
        if self._armed is not None and q_len > 1:
            spans, self._armed = self._armed, None
            if cached > 0 or (cache is not None and not hasattr(cache, "get_seq_length")):
                raise ValueError(
                    "the inner-LLM merge runs on a prefill from an empty cache; the cache already holds "
                    f"{cached} tokens"
                )
            return self._prefill(orig, call, spans, batch, q_len)
        if cached > 0 and _is_merged(cache, self._k):
            raise RuntimeError(
                "LLMMerge: this cache was filled by a merged prefill (layers >= "
                f"{self._k} hold fewer tokens) whose decoding state is gone (the merge was removed since); "
                "decode it with the merge installed, or start from a new cache"
            )
        return orig(*args, **kwargs)


def _check_not_merged(language_model: nn.Module) -> None:
    if language_model in _INSTALLED:
        raise RuntimeError(
            "this language model already carries the inner-LLM merge of another EarlyTom handle (models sharing "
            "one language_model): remove that handle first, or use llm_merge_layer=None for this model"
        )
