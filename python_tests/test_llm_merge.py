"""The inner-LLM token merge (published INNER_k / INNER_r): config, reference, and the Qwen2 step.

The model tests compare against a re-computation that runs the decoder layers by hand, one
sample at a time without padding: eager attention maps of the unpatched model for the scores,
``reference.llm_merge`` for the merge, and a plain causal mask over the kept tokens with their
original position ids. Run under transformers 5.x (.venv) and 4.57.x (PYTHONPATH to a 4.57 install).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math

import pytest
import torch

from earlytom_ext import EarlyTomConfig, preset, reference
from earlytom_ext.config import PAPER_LLM_MERGE, PAPER_PRESETS

transformers = pytest.importorskip("transformers")

from earlytom_ext.integration.llm_merge import LLMMerge, merge_span  # noqa: E402

# transformers 5.24 renamed the KV cache argument (and output field) past_key_values to cache and
# still accepts the old name with a FutureWarning; the tests pass the name the installed version has.
CACHE_KW = "cache" if "cache" in inspect.signature(transformers.Qwen2Model.forward).parameters else "past_key_values"
CACHE_NAMES = ("cache", "past_key_values") if CACHE_KW == "cache" else ("past_key_values",)


def out_cache(out):
    return getattr(out, CACHE_KW)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def test_config_defaults_off():
    c = EarlyTomConfig()
    assert c.llm_merge_layer is None and c.llm_merge_ratio == 0.5
    c.validate(num_layers=26, llm_num_layers=2)  # off: any depth is fine


@pytest.mark.parametrize(
    "kwargs,exc,needle",
    [
        ({"llm_merge_layer": 0}, ValueError, "llm_merge_layer"),
        ({"llm_merge_layer": -3}, ValueError, ">= 1"),
        ({"llm_merge_layer": 2.0}, TypeError, "llm_merge_layer"),
        ({"llm_merge_layer": True}, TypeError, "llm_merge_layer"),
        ({"llm_merge_ratio": 1.0}, ValueError, "[0, 1)"),
        ({"llm_merge_ratio": -0.1}, ValueError, "llm_merge_ratio"),
        ({"llm_merge_ratio": float("nan")}, ValueError, "llm_merge_ratio"),
        ({"llm_merge_ratio": "0.5"}, TypeError, "llm_merge_ratio"),
    ],
)
def test_config_llm_fields_validated(kwargs, exc, needle):
    with pytest.raises(exc) as e:
        EarlyTomConfig(**kwargs)
    assert needle in str(e.value) and "llm_merge" in str(e.value)


def test_config_llm_layer_checked_against_depth():
    c = EarlyTomConfig(prune_layers=(6, 21, 23), llm_merge_layer=18, llm_merge_ratio=0.0)
    assert c.validate(num_layers=26, llm_num_layers=28) is c
    c.validate(llm_num_layers=19)  # k = depth - 1 is the last valid layer
    with pytest.raises(ValueError, match=r"llm_merge_layer must be in \[1, 17\].*18 decoder layers"):
        c.validate(llm_num_layers=18)
    with pytest.raises(ValueError, match="encoder depth 20"):  # the encoder check still works
        c.validate(num_layers=20)


def test_preset_llm_merge_is_explicit():
    base = preset("videomme", 0.2)
    on = preset("videomme", 0.2, llm_merge=True)
    assert base.llm_merge_layer is None
    assert (on.llm_merge_layer, on.llm_merge_ratio) == (18, 0.5)
    assert on.replace(llm_merge_layer=None) == base
    assert dict(PAPER_LLM_MERGE) == {"llm_merge_layer": 18, "llm_merge_ratio": 0.5}
    assert all(c.llm_merge_layer is None for t in PAPER_PRESETS.values() for c in t.values())
    with pytest.raises(TypeError, match="llm_merge"):
        preset("videomme", 0.2, llm_merge=1)


def test_config_dict_round_trip():
    c = EarlyTomConfig(retain_ratio=0.25, prune_layers=(2, 5), llm_merge_layer=3, llm_merge_ratio=0.25)
    d = c.to_dict()
    assert d == {
        "retain_ratio": 0.25,
        "tau": 0.6,
        "max_window": 8,
        "ema": 0.9,
        "prune_layers": [2, 5],
        "keep_last_interior": False,
        "llm_merge_layer": 3,
        "llm_merge_ratio": 0.25,
    }
    assert EarlyTomConfig.from_dict(json.loads(json.dumps(d))) == c
    assert EarlyTomConfig.from_dict({}) == EarlyTomConfig()
    assert EarlyTomConfig.from_dict({"prune_layers": [1, 4]}).prune_layers == (1, 4)
    with pytest.raises(ValueError, match=r"unknown keys \['INNER_k', 'ratio'\]"):
        EarlyTomConfig.from_dict({"ratio": 0.1, "INNER_k": 18, "tau": 0.5})
    with pytest.raises(ValueError, match="llm_merge_ratio"):
        EarlyTomConfig.from_dict({"llm_merge_ratio": 1.5})
    with pytest.raises(TypeError, match="mapping"):
        EarlyTomConfig.from_dict([("tau", 0.5)])


# --------------------------------------------------------------------------------------------
# Reference (hand-written expectations)
# --------------------------------------------------------------------------------------------
def T(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def test_reference_known_topk_and_targets():
    # Span = positions 1..4 of 6. Scores keep local 1, 2 (positions 2, 3). Position 1 ([0, 1]) is
    # closest to [1, .1] (cos .0995 vs 0); position 4 ([0, 2]) too. Both fold into position 2:
    # ((1, .1) + (0, 1)) / 2 = (.5, .55), then ((.5, .55) + (0, 2)) / 2 = (.25, 1.275).
    h = T([[1, 0], [0, 1], [1, 0.1], [0.9, 0], [0, 2], [5, 5]])
    out, kept = reference.llm_merge(h, (1, 4), T([0.1, 0.4, 0.3, 0.2]), 0.5)
    assert kept.tolist() == [2, 3]
    torch.testing.assert_close(out, T([[1, 0], [0.25, 1.275], [0.9, 0], [5, 5]]), rtol=0, atol=1e-7)


def test_reference_absorbs_in_ascending_order_with_halving_weights():
    # Kept: positions 0 ([1, 0]) and 1 ([0, 1]); removed 2 ([4, 0]) and 3 ([8, .5]) both nearest
    # position 0. Sequential: ((1 + 4) / 2 + 8) / 2 = 5.25 -> weights 1/4, 1/4, 1/2.
    h = T([[1, 0], [0, 1], [4, 0], [8, 0.5]])
    out, kept = reference.llm_merge(h, (0, 4), T([0.9, 0.8, 0.1, 0.2]), 0.5)
    assert kept.tolist() == [0, 1]
    torch.testing.assert_close(out, T([[5.25, 0.25], [0, 1]]), rtol=0, atol=0)


def test_reference_score_ties_keep_the_lower_position():
    h = T([[1, 0], [2, 0], [3, 0], [0, 1]])
    _, kept = reference.llm_merge(h, (0, 4), T([0.5, 0.5, 0.5, 0.1]), 0.5)  # round(2.0) = 2 of the three tied
    assert kept.tolist() == [0, 1]


def test_reference_cosine_ties_go_to_the_higher_score_then_the_lower_position():
    # Positions 0 and 1 hold the same direction: the removed token (position 3, same direction)
    # has cosine 1 with both and goes to the higher score (position 1).
    h = T([[1, 0], [2, 0], [0, 1], [3, 0]])
    out, kept = reference.llm_merge(h, (0, 4), T([0.3, 0.4, 0.35, 0.1]), 0.75)
    assert kept.tolist() == [0, 1, 2]
    torch.testing.assert_close(out, T([[1, 0], [2.5, 0], [0, 1]]), rtol=0, atol=0)
    # Equal scores too: the lower position (0) takes it.
    out, _ = reference.llm_merge(h, (0, 4), T([0.4, 0.4, 0.35, 0.1]), 0.75)
    torch.testing.assert_close(out, T([[2, 0], [2, 0], [0, 1]]), rtol=0, atol=0)


def test_reference_round_half_to_even_and_edges():
    h = torch.arange(14.0).view(7, 2) + 1
    # round(2.5) = 2, round(3.5) = 4 (half to even)
    assert reference.llm_merge(h[:5], (0, 5), torch.arange(5.0), 0.5)[1].tolist() == [3, 4]
    assert reference.llm_merge(h, (0, 7), torch.arange(7.0), 0.5)[1].tolist() == [3, 4, 5, 6]
    # L = 1: round(0.5) = 0, but one token is always kept: nothing changes.
    out, kept = reference.llm_merge(h, (3, 1), T([0.7]), 0.5)
    assert torch.equal(out, h) and kept.tolist() == [3]
    # r_in = 0 (keep_ratio 1): nothing removed.
    out, kept = reference.llm_merge(h, (1, 5), torch.rand(5), 1.0)
    assert torch.equal(out, h) and kept.tolist() == [1, 2, 3, 4, 5]
    # Empty span.
    out, kept = reference.llm_merge(h, (2, 0), torch.empty(0), 0.5)
    assert torch.equal(out, h) and kept.numel() == 0


def test_reference_fp32_math_rounded_once():
    # bf16: ((1 + 2^-9) / 2 + 2^-9) / 2 = 0.25 + 2^-11 + 2^-10 in fp32, which rounds to
    # 0.25 + 2^-9 in bf16 (a bf16 step-by-step loop would give 0.25).
    e = 2.0**-9
    h = T([[1, 0], [0, 1], [e, 0], [e, 0]], torch.bfloat16)
    out, kept = reference.llm_merge(h, (0, 4), T([0.9, 0.8, 0.1, 0.2]), 0.5)
    assert out.dtype == torch.bfloat16 and kept.tolist() == [0, 1]
    assert out[0, 0].item() == 0.25 + e


@pytest.mark.parametrize(
    "args,exc,needle",
    [
        ((T([[1.0]]), (0, 2), T([1, 1]), 0.5), ValueError, "span"),
        ((T([[1.0], [2.0]]), (0, 2), T([1.0]), 0.5), ValueError, "scores"),
        ((T([[1.0], [2.0]]), (0, 2), T([1, 1]), 0.0), ValueError, "keep_ratio"),
        ((T([[1.0], [2.0]]), (0, 2), T([1, 1]), 1.5), ValueError, "keep_ratio"),
        ((T([[1.0], [2.0]]), (0.0, 2), T([1, 1]), 0.5), TypeError, "span"),
        ((T([1.0, 2.0]), (0, 2), T([1, 1]), 0.5), ValueError, "hidden"),
        ((T([[1.0], [2.0]]), (0, 2), T([1, float("nan")]), 0.5), ValueError, "finite"),
    ],
)
def test_reference_bad_inputs(args, exc, needle):
    with pytest.raises(exc, match=needle):
        reference.llm_merge(*args)


# --------------------------------------------------------------------------------------------
# merge_span (the model path) == reference, bit for bit
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,D,r", [(1, 8, 0.5), (9, 16, 0.5), (40, 32, 0.75), (64, 48, 0.3), (33, 8, 0.0)])
def test_merge_span_matches_reference(dtype, L, D, r):
    g = torch.Generator().manual_seed(L * 100 + D)
    # Few directions so that kept tokens absorb several tokens each; scores with ties.
    base = torch.randn(4, D, generator=g)
    x = (base[torch.randint(0, 4, (L,), generator=g)] + 0.3 * torch.randn(L, D, generator=g)).to(dtype)
    a = torch.randint(0, 5, (L,), generator=g).float()
    n_keep = max(1, round(L * (1 - r)))
    rows, kept = merge_span(x, a, n_keep)
    ref, ref_kept = reference.llm_merge(x, (0, L), a, 1 - r)
    assert torch.equal(kept, ref_kept)
    assert rows.dtype == dtype and torch.equal(rows, ref)


def test_merge_span_constructed_ties():
    h = T([[1, 0], [2, 0], [0, 1], [3, 0]])
    for scores in (T([0.3, 0.4, 0.35, 0.1]), T([0.4, 0.4, 0.35, 0.1])):
        rows, kept = merge_span(h, scores, 3)
        ref, ref_kept = reference.llm_merge(h, (0, 4), scores, 0.75)
        assert torch.equal(kept, ref_kept) and torch.equal(rows, ref)
    rows, _ = merge_span(T([[1, 0], [0, 1], [4, 0], [8, 0.5]]), T([0.9, 0.8, 0.1, 0.2]), 2)
    assert torch.equal(rows, T([[5.25, 0.25], [0, 1]]))


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------
def _sharpen(model, std=2.0):
    # Larger Q/K weights make the attention rows (the scores) clearly distinct.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("language_model" in name or name.startswith("model.layers")) and (
                name.endswith("q_proj.weight") or name.endswith("k_proj.weight")
            ):
                p.normal_(0.0, std / math.sqrt(p.shape[1]))


def qwen2_lm(attn="sdpa", layers=4, seed=0):
    """A tiny Qwen2ForCausalLM with grouped-query attention (4 query heads, 2 KV heads)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    m = Qwen2ForCausalLM._from_config(cfg, attn_implementation=attn).eval()
    _sharpen(m)
    m.generation_config.pad_token_id = 0
    m.generation_config.eos_token_id = None
    m.generation_config.do_sample = False
    return m


def llava_lm(attn="sdpa"):
    from earlytom_ext.tiny_model import build_model

    m = build_model(seed=1, attn_implementation=attn, text_layers=3, vision_layers=2)
    _sharpen(m)
    return m


class Oracle:
    """Layer-by-layer re-computation of one unpadded sample with the reference merge."""

    def __init__(self, model, k, ratio):
        self.model = model
        self.lm = language_model(model)
        self.k = k
        self.ratio = ratio
        self.eager = copy.deepcopy(self.lm)
        self.eager.set_attn_implementation("eager")

    @torch.no_grad()
    def scores(self, emb):
        att = self.eager(inputs_embeds=emb[None], output_attentions=True).attentions[self.k - 1]
        return att[0, :, -1, :].mean(0)  # last prompt token's row, mean over heads

    @torch.no_grad()
    def _layers(self, h, pos, layers):
        n = h.shape[1]
        cos, sin = self.lm.rotary_emb(h, pos)
        mask = torch.full((n, n), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)[None, None]
        for layer in layers:
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        return h

    @torch.no_grad()
    def hidden(self, emb, span, gen=None):
        """Final (normed) hidden states of [kept prompt tokens, generated tokens] and the kept positions."""
        n = emb.shape[0]
        seq = emb if gen is None else torch.cat([emb, gen])
        h = self._layers(seq[None], torch.arange(seq.shape[0])[None], self.lm.layers[: self.k])[0]
        idx = torch.arange(seq.shape[0])
        kept = None
        if span is not None:
            s, L = span
            a = self.scores(emb)[s : s + L]
            prompt, kept = reference.llm_merge(h[:n], span, a, 1.0 - self.ratio)
            h = torch.cat([prompt, h[n:]])
            idx = torch.cat([torch.arange(s), kept, torch.arange(s + L, seq.shape[0])])
        h = self._layers(h[None], idx[None], self.lm.layers[self.k :])
        return self.lm.norm(h)[0], kept

    @torch.no_grad()
    def logits(self, emb, span, gen_tokens):
        gen = self.model.get_input_embeddings()(gen_tokens[:-1]) if len(gen_tokens) > 1 else None
        h, _ = self.hidden(emb, span, gen)
        return self.model.lm_head(h[-len(gen_tokens) :])


def language_model(model):
    inner = model.model
    return getattr(inner, "language_model", inner)


def batch_inputs(B, N, D, lead, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, N, D, generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    for b, p in enumerate(lead):
        mask[b, :p] = 0
    return emb, mask


def unpad(emb, mask, b, span):
    lead = int((mask[b] == 0).sum())
    return emb[b, lead:], (None if span is None else (span[0] - lead, span[1]))


# --------------------------------------------------------------------------------------------
# LLMMerge: construction and arming
# --------------------------------------------------------------------------------------------
def test_constructor_errors():
    m = qwen2_lm()
    lm = m.model
    for k in (0, 4, 7, -1):
        with pytest.raises(ValueError, match=r"llm_merge_layer.*\[1, 3\]"):
            LLMMerge(lm, k, 0.5)
    for r in (1.0, -0.25, float("inf")):
        with pytest.raises(ValueError, match=r"llm_merge_ratio.*\[0, 1\)"):
            LLMMerge(lm, 2, r)
    with pytest.raises(TypeError, match="llm_merge_layer"):
        LLMMerge(lm, 2.0, 0.5)
    with pytest.raises(TypeError, match="llm_merge_layer"):
        LLMMerge(lm, None, 0.5)
    with pytest.raises(TypeError, match="Qwen2"):
        LLMMerge(torch.nn.Linear(2, 2), 1, 0.5)
    with pytest.raises(TypeError, match="Qwen2"):
        LLMMerge(m, 1, 0.5)  # the causal-LM wrapper, not the decoder stack
    nocache = qwen2_lm().model
    nocache.forward = lambda inputs_embeds=None, attention_mask=None, position_ids=None: None
    with pytest.raises(TypeError, match="cache or past_key_values"):
        LLMMerge(nocache, 1, 0.5)


def test_sliding_window_decoders_are_rejected():
    from transformers import Qwen2Config, Qwen2Model

    cfg = Qwen2Config(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=0,
    )
    with pytest.raises(TypeError, match="full-attention"):
        LLMMerge(Qwen2Model(cfg), 1, 0.5)
    # Mistral (LLaVA-NeXT-Video-32K's decoder) says it with sliding_window alone; None is full attention.
    from transformers import MistralConfig, MistralModel

    small = dict(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises(TypeError, match="full-attention.*sliding_window=8"):
        LLMMerge(MistralModel(MistralConfig(**small, num_key_value_heads=2, sliding_window=8)), 1, 0.5)
    LLMMerge(MistralModel(MistralConfig(**small, num_key_value_heads=2, sliding_window=None)), 1, 0.5)


def test_install_remove_and_arm_errors():
    m = qwen2_lm()
    lm = m.model
    merge = LLMMerge(lm, 2, 0.5)
    with pytest.raises(RuntimeError, match="install"):
        merge.arm([(0, 3)])
    merge.install()
    wrapper = lm.__dict__["forward"]
    merge.install()  # idempotent
    assert lm.__dict__["forward"] is wrapper
    with pytest.raises(TypeError, match=r"spans\[1\]"):
        merge.arm([(0, 3), (1.5, 2)])
    with pytest.raises(ValueError, match=r"spans\[0\]"):
        merge.arm([(-1, 3)])
    with pytest.raises(ValueError, match="non-empty"):
        merge.arm([])
    emb, mask = batch_inputs(2, 12, 64, [0, 0])
    merge.arm([(2, 5)] * 3)
    with pytest.raises(ValueError, match="batch of 2"):
        lm(inputs_embeds=emb, attention_mask=mask)
    merge.arm([(2, 10), None])
    with pytest.raises(ValueError, match="end before the last prompt token"):
        lm(inputs_embeds=emb, attention_mask=mask)
    mask[1, -1] = 0
    merge.arm([(2, 5), None])
    with pytest.raises(ValueError, match="left padding"):
        lm(inputs_embeds=emb, attention_mask=mask)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    merge.arm([(2, 5), None])
    with pytest.raises(ValueError, match="padding"):
        lm(inputs_embeds=emb, attention_mask=mask)
    merge.arm([(2, 5), None])
    merge.disarm()
    with torch.no_grad():
        out = lm(inputs_embeds=emb, attention_mask=mask)
    assert out.last_hidden_state.shape[1] == 12 and merge.last_stats is None
    merge.remove()
    merge.remove()  # idempotent
    assert "forward" not in lm.__dict__


def test_armed_prefill_on_a_filled_cache_is_rejected():
    m = qwen2_lm()
    lm = m.model
    emb, mask = batch_inputs(1, 10, 64, [0])
    with torch.no_grad():
        cache = out_cache(lm(inputs_embeds=emb, attention_mask=mask, use_cache=True))
    merge = LLMMerge(lm, 2, 0.5)
    merge.install()
    merge.arm([(1, 4)])
    with pytest.raises(ValueError, match="empty cache"):
        lm(inputs_embeds=emb[:, :3], attention_mask=torch.ones(1, 13, dtype=torch.long), **{CACHE_KW: cache})
    merge.remove()


# --------------------------------------------------------------------------------------------
# LLMMerge on the model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["qwen2", "llava"])
def test_unarmed_is_bit_identical(kind):
    m = qwen2_lm() if kind == "qwen2" else llava_lm()
    lm = language_model(m)
    D = lm.config.hidden_size
    emb, mask = batch_inputs(2, 11, D, [0, 3])

    @torch.no_grad()
    def run():
        out = lm(inputs_embeds=emb, attention_mask=mask, use_cache=True, output_hidden_states=True)
        step = lm(
            inputs_embeds=emb[:, :1],
            attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
            use_cache=True,
            **{CACHE_KW: out_cache(out)},
        )
        gen = m.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=4, do_sample=False)
        return [out.last_hidden_state, *out.hidden_states, step.last_hidden_state, gen]

    before = run()
    merge = LLMMerge(lm, 1, 0.5)
    merge.install()
    during = run()
    merge.remove()
    after = run()
    assert all(torch.equal(a, b) for a, b in zip(before, during))
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_ratio_zero_changes_nothing():
    m = qwen2_lm()
    lm = m.model
    emb, mask = batch_inputs(2, 14, 64, [0, 2])
    with torch.no_grad():
        ref = lm(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    merge = LLMMerge(lm, 2, 0.0)
    merge.install()
    merge.arm([(1, 8), (3, 6)])
    with torch.no_grad():
        out = lm(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    assert torch.equal(out, ref)
    assert [s["kept"] for s in merge.last_stats] == [list(range(1, 9)), list(range(3, 9))]
    merge.remove()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("k,ratio", [(1, 0.5), (2, 0.7), (3, 0.25)])
def test_prefill_matches_layer_by_layer_recomputation(attn, k, ratio):
    m = qwen2_lm(attn)
    lm = m.model
    oracle = Oracle(m, k, ratio)
    lead = [0, 5, 9, 2]
    spans = [(3, 30), (8, 25), None, (2, 1)]
    emb, mask = batch_inputs(4, 40, 64, lead, seed=k)
    merge = LLMMerge(lm, k, ratio)
    merge.install()
    merge.arm(spans)
    with torch.no_grad():
        hidden = lm(inputs_embeds=emb, attention_mask=mask, use_cache=False).last_hidden_state
    stats = merge.last_stats
    merge.arm(spans)
    with torch.no_grad():  # through the causal LM, with the cache and the recorded hidden states
        out = m(inputs_embeds=emb, attention_mask=mask, use_cache=True, output_hidden_states=True)
    merge.remove()
    removed = [0 if s is None else s[1] - max(1, round(s[1] * (1 - ratio))) for s in spans]
    short = 40 - min(removed)
    assert hidden.shape[1] == short and out.logits.shape[1] == short
    # hidden_states[i] is the input of layer i: full length up to layer k, shortened after.
    assert [h.shape[1] for h in out.hidden_states] == [40] * (k + 1) + [short] * (4 - k)
    assert [out_cache(out).get_seq_length(i) for i in range(4)] == [40] * k + [short] * (4 - k)
    for b, span in enumerate(spans):
        e, sp = unpad(emb, mask, b, span)
        want, kept = oracle.hidden(e, sp)
        torch.testing.assert_close(hidden[b, -want.shape[0] :], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logits[b, -1], m.lm_head(want[-1]), rtol=1e-5, atol=1e-5)
        st = stats[b]
        assert st["span"] == span
        assert st["kept"] == ([] if kept is None else (kept + lead[b]).tolist())
        assert st["prefill_len_before"] == 40 - lead[b]
        assert st["prefill_len_after"] == 40 - lead[b] - removed[b]


def test_one_span_for_an_expanded_batch():
    # generate repeats each sample for beams / returned sequences: one span serves its copies.
    m = qwen2_lm()
    lm = m.model
    oracle = Oracle(m, 2, 0.5)
    emb, mask = batch_inputs(1, 20, 64, [0])
    merge = LLMMerge(lm, 2, 0.5)
    merge.install()
    merge.arm([(4, 11)])
    with torch.no_grad():
        out = lm(inputs_embeds=emb.expand(2, -1, -1), attention_mask=mask.expand(2, -1)).last_hidden_state
    merge.remove()
    want, _ = oracle.hidden(emb[0], (4, 11))
    assert out.shape[1] == want.shape[0]
    for b in range(2):
        torch.testing.assert_close(out[b], want, rtol=1e-5, atol=1e-5)


def _check_generate(m, emb, mask, spans, k, ratio, new=8, device="cpu"):
    """Merged generate (on a copy of ``m`` moved to ``device``) against the CPU re-computation:
    the kept positions and every step's logits."""
    oracle = Oracle(m, k, ratio)
    run = m if device == "cpu" else copy.deepcopy(m).to(device)
    merge = LLMMerge(language_model(run), k, ratio)
    merge.install()
    merge.arm(spans)
    kw = {} if mask is None else {"attention_mask": mask.to(device)}
    with torch.no_grad():
        g = run.generate(
            inputs_embeds=emb.to(device),
            max_new_tokens=new,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **kw,
        )
    stats = merge.last_stats
    merge.remove()
    tokens = g.sequences[:, -new:].cpu()
    for b, span in enumerate(spans):
        if mask is None:
            (e, sp), lead = (emb[b], span), 0
        else:
            (e, sp), lead = unpad(emb, mask, b, span), int((mask[b] == 0).sum())
        _, kept = oracle.hidden(e, sp)
        assert stats[b]["kept"] == ([] if kept is None else (kept + lead).tolist())
        want = oracle.logits(e, sp, tokens[b])
        got = torch.stack([step[b] for step in g.logits]).cpu()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(want.argmax(-1), tokens[b])
    return tokens


@pytest.mark.parametrize("kind", ["qwen2", "llava"])
def test_generate_batch1_matches_recomputation(kind):
    m = qwen2_lm() if kind == "qwen2" else llava_lm()
    k = 2 if kind == "qwen2" else 1
    emb, _ = batch_inputs(1, 30, language_model(m).config.hidden_size, [0], seed=3)
    _check_generate(m, emb, None, [(4, 21)], k, 0.5)


@pytest.mark.parametrize("kind", ["qwen2", "llava"])
def test_generate_left_padded_batch_matches_recomputation(kind):
    m = qwen2_lm() if kind == "qwen2" else llava_lm()
    k = 2 if kind == "qwen2" else 1
    emb, mask = batch_inputs(3, 36, language_model(m).config.hidden_size, [0, 6, 3], seed=4)
    _check_generate(m, emb, mask, [(2, 30), (9, 18), None], k, 0.6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", ["qwen2", "llava"])
def test_cuda_generate_matches_cpu_recomputation(kind):
    m = qwen2_lm() if kind == "qwen2" else llava_lm()
    k = 2 if kind == "qwen2" else 1
    emb, mask = batch_inputs(3, 36, language_model(m).config.hidden_size, [0, 6, 3], seed=5)
    _check_generate(m, emb, mask, [(2, 30), (9, 18), None], k, 0.6, new=6, device="cuda")


def test_merged_logits_differ_from_unmerged():
    # Guards the oracle comparison against a merge that silently does nothing.
    m = qwen2_lm()
    lm = m.model
    emb, mask = batch_inputs(1, 30, 64, [0], seed=3)
    with torch.no_grad():
        plain = m(inputs_embeds=emb, attention_mask=mask).logits[0, -1]
    merge = LLMMerge(lm, 2, 0.5)
    merge.install()
    merge.arm([(4, 21)])
    with torch.no_grad():
        merged = m(inputs_embeds=emb, attention_mask=mask).logits[0, -1]
    merge.remove()
    assert (plain - merged).abs().max() > 1e-3


def test_unarmed_prefill_after_a_merged_generate_is_plain():
    m = qwen2_lm()
    lm = m.model
    emb, mask = batch_inputs(2, 24, 64, [0, 4], seed=5)
    with torch.no_grad():
        plain = m.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=6, do_sample=False)
    merge = LLMMerge(lm, 2, 0.5)
    merge.install()
    merge.arm([(3, 15), (6, 10)])
    with torch.no_grad():
        m.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=6, do_sample=False)
        again = m.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=6, do_sample=False)
    merge.remove()
    assert torch.equal(again, plain)


class _DecodeCase:
    """Two left-padded samples (spans (3, 12) and (6, 10)), a 20-token prompt and one decoding
    step, a merge at layer 2 (r_in 0.5) installed and armed, and the oracle's check of a step."""

    spans = [(3, 12), (6, 10)]

    def __init__(self):
        m = qwen2_lm()
        self.lm = m.model
        self.oracle = Oracle(m, 2, 0.5)
        emb, self.mask = batch_inputs(2, 21, 64, [0, 4], seed=7)
        self.prompt, self.step = emb[:, :20], emb[:, 20:]
        self.merge = LLMMerge(self.lm, 2, 0.5)
        self.merge.install()
        self.merge.arm(self.spans)

    def prefill(self, prompt=None):
        p = self.prompt if prompt is None else prompt
        return out_cache(self.lm(inputs_embeds=p, attention_mask=self.mask[:, :20], use_cache=True))

    def check(self, got):
        for b, span in enumerate(self.spans):
            e, sp = unpad(self.prompt, self.mask[:, :20], b, span)
            want, _ = self.oracle.hidden(e, sp, gen=self.step[b])
            torch.testing.assert_close(got[b, -1], want[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("between", ["merged", "plain"])
def test_a_merged_cache_decodes_after_other_prefills(between):
    """Each merged cache keeps its own decoding state: another merged prefill, or a plain one, in
    between does not change how the first cache decodes."""
    c = _DecodeCase()
    with torch.no_grad():
        first = c.prefill()
        if between == "merged":
            c.merge.arm(c.spans)
        c.prefill(c.prompt.flip(1))  # another prompt
        got = c.lm(inputs_embeds=c.step, attention_mask=c.mask, use_cache=True, **{CACHE_KW: first})
    c.merge.remove()
    c.check(got.last_hidden_state)


def test_a_merged_cache_without_its_merge_is_refused():
    c = _DecodeCase()
    with torch.no_grad():
        cache = c.prefill()
        c.merge.remove()
        c.merge.install()  # a new installation: the earlier one's decoding state is gone
        with pytest.raises(RuntimeError, match="filled by a merged prefill"):
            c.lm(inputs_embeds=c.step, attention_mask=c.mask, **{CACHE_KW: cache})
    c.merge.remove()


def test_modified_cache_is_detected():
    m = qwen2_lm()
    lm = m.model
    emb, mask = batch_inputs(1, 20, 64, [0], seed=6)
    merge = LLMMerge(lm, 2, 0.5)
    merge.install()
    merge.arm([(2, 12)])
    with torch.no_grad():
        cache = out_cache(lm(inputs_embeds=emb, attention_mask=mask, use_cache=True))
        with pytest.raises(RuntimeError, match="batch of 2"):
            lm(
                inputs_embeds=emb[:, :1].expand(2, -1, -1),
                attention_mask=torch.ones(2, 21, dtype=torch.long),
                **{CACHE_KW: cache},
            )
        # Cropping removes the same count from every layer: layers >= k no longer line up.
        cache.crop(-2)  # negative: tokens removed from the end (4.57 and 5.x; a positive value raises from 5.19)
        with pytest.raises(RuntimeError, match="no longer matches"):
            lm(inputs_embeds=emb[:, :1], attention_mask=torch.ones(1, 19, dtype=torch.long), **{CACHE_KW: cache})
    merge.remove()


@pytest.mark.parametrize("name", CACHE_NAMES)
def test_decoding_reads_the_cache_under_each_accepted_name(name):
    # A caller may still pass the cache as past_key_values where cache is the new name: the decoding
    # step must find it and build the shortened mask of layers >= k (left padding makes it matter).
    c = _DecodeCase()
    legacy = name != CACHE_KW
    with torch.no_grad():
        cache = c.prefill()
        with pytest.warns(FutureWarning, match="past_key_values") if legacy else contextlib.nullcontext():
            got = c.lm(inputs_embeds=c.step, attention_mask=c.mask, use_cache=True, **{name: cache})
    c.merge.remove()
    assert cache.get_seq_length(0) == 21 and cache.get_seq_length(2) == 21 - 5  # sample 1 removes 5 of 10
    c.check(got.last_hidden_state)


# --------------------------------------------------------------------------------------------
# End to end: earlytom_ext.apply with llm_merge_layer
# --------------------------------------------------------------------------------------------
def test_apply_with_llm_merge_generates_like_the_recomputation():
    import earlytom_ext
    from earlytom_ext.tiny_model import make_inputs, make_video

    m = llava_lm()
    k, ratio, new = 1, 0.5, 8
    cfg = EarlyTomConfig(retain_ratio=0.25, prune_layers=(0, 1), max_window=4, llm_merge_layer=k, llm_merge_ratio=ratio)
    inputs = make_inputs([make_video(8, seed=0), make_video(8, seed=1, kind="static")], seed=2)
    # The compressed prompt the language model receives (the vision path is deterministic).
    with earlytom_ext.apply(m, cfg.replace(llm_merge_layer=None)) as plain:
        prep = plain.prepare_inputs(
            inputs["input_ids"], inputs["pixel_values_videos"], attention_mask=inputs["attention_mask"]
        )
    with pytest.raises(ValueError, match=r"llm_merge_layer.*\[1, 2\]"):
        earlytom_ext.apply(m, cfg.replace(llm_merge_layer=3))
    assert "forward" not in language_model(m).__dict__
    with earlytom_ext.apply(m, cfg) as handle:
        with torch.no_grad():
            out = m.generate(**inputs, max_new_tokens=new, output_logits=True, return_dict_in_generate=True)
        merge_stats = handle.last_stats["llm_merge"]
        summary = handle.summary()
    assert "forward" not in language_model(m).__dict__
    L0 = inputs["input_ids"].shape[1]
    tokens = out.sequences[:, L0:]
    assert tokens.shape == (2, new)
    oracle = Oracle(m, k, ratio)
    emb, mask = prep["inputs_embeds"], prep["attention_mask"]
    for b in range(2):
        (span,) = prep["video_spans"][b]
        assert merge_stats[b]["span"] == tuple(span)
        e, sp = unpad(emb, mask, b, tuple(span))
        want = oracle.logits(e, sp, tokens[b])
        got = torch.stack([step[b] for step in out.logits])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(want.argmax(-1), tokens[b])
        n_keep = max(1, round(span[1] * (1 - ratio)))
        assert len(merge_stats[b]["kept"]) == n_keep
        # summary(): one row per sample, the kept count (not the positions)
        before, after = merge_stats[b]["prefill_len_before"], merge_stats[b]["prefill_len_after"]
        row = [str(v) for v in (b, span[0], span[1], n_keep, before, after)]
        assert row in [line.split() for line in summary.splitlines()], summary
        assert merge_stats[b]["prefill_len_after"] == merge_stats[b]["prefill_len_before"] - (span[1] - n_keep)
