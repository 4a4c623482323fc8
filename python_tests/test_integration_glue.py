"""The glue around the ops: pooling (bit-identical to the model's), ``fast_pooling``, host reads of
device values in the video path, ``summary()``, the generate wrapper's refusals and its quick
config check."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models as tm  # noqa: E402

pytest.importorskip("transformers")

import earlytom_ext  # noqa: E402
from earlytom_ext import EarlyTomConfig  # noqa: E402
from earlytom_ext._ext import has_cuda_kernels  # noqa: E402
from earlytom_ext.integration.pooling import bilinear_pool  # noqa: E402

CFG = EarlyTomConfig(retain_ratio=0.2, tau=0.5, max_window=6, ema=0.9, prune_layers=(1, 3, 4))
T = 6
CACHE = tm.cache_names()[0]  # the installed version's name of generate's cache argument


def returned_cache(out):
    """The cache a generate output returns, read by key (5.24's past_key_values property warns)."""
    return out.get("cache") if out.get("cache") is not None else out.get("past_key_values")


@pytest.fixture(scope="module")
def model():
    return tm.build_model(seed=0)


@pytest.fixture(scope="module")
def videos():
    return [tm.make_video(T, seed=1, kind="scenes", scene_length=3), tm.make_video(T, seed=2, kind="static")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("frames", [1, 3, 8])
@pytest.mark.parametrize("channels", [1, 5, 64])
def test_pooling_bit_identical_to_the_models(model, dtype, frames, channels):
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    g = torch.Generator().manual_seed(frames * 100 + channels)
    x = torch.randn(frames, grid * grid, channels, generator=g).to(dtype)
    expected = model.model.apply_pooling(x)
    got = bilinear_pool(x, grid)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)


def test_pooling_of_a_transposed_view(model):
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    x = torch.randn(3, 16, grid * grid).transpose(1, 2)  # non-contiguous
    assert torch.equal(bilinear_pool(x, grid), model.model.apply_pooling(x.contiguous()))


def test_pooling_rejects_a_wrong_grid():
    with pytest.raises(ValueError, match="27x27"):
        bilinear_pool(torch.zeros(2, 700, 4), 27)


def test_fast_pooling_same_outputs_and_removable(model, videos):
    inputs = tm.make_inputs(videos, seed=3)
    with torch.no_grad():
        base_logits = model(**inputs).logits
        base_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    before = dict(model.model.__dict__)
    with earlytom_ext.fast_pooling(model) as fp:
        assert "apply_pooling" in model.model.__dict__
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, base_logits)
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), base_tokens)
        with pytest.raises(RuntimeError, match="already applied"):
            earlytom_ext.fast_pooling(model)
    assert "removed" in repr(fp)
    assert model.model.__dict__.keys() == before.keys()
    fp.remove()  # idempotent
    with pytest.raises(TypeError, match="llava_onevision"):
        earlytom_ext.fast_pooling(torch.nn.Linear(2, 2))


def test_fast_pooling_together_with_apply(model, videos):
    inputs = tm.make_inputs(videos, seed=3)
    with earlytom_ext.apply(model, CFG) as h:
        with torch.no_grad():
            expected = h.encode_videos(torch.stack(videos))
        with earlytom_ext.fast_pooling(model):
            with torch.no_grad():
                got = h.encode_videos(torch.stack(videos))
                model.generate(**inputs, max_new_tokens=2)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


# Files of the video path that must never read a device tensor on the host: the designated reads
# are the prompt rewriting (on host copies) and the one read of the refined segments (ops).
_NO_HOST_READS = ("core.py", "run.py", "wrappers.py", "llava_onevision.py", "base.py", "pooling.py")


def test_video_path_reads_no_tensor_values_outside_the_designated_places(model, videos, monkeypatch):
    reads = tm.spy_host_reads(monkeypatch, _NO_HOST_READS)
    inputs = tm.make_inputs(videos, seed=4)
    with earlytom_ext.apply(model, CFG) as h:
        with torch.no_grad():
            model(**inputs)
        model.generate(**inputs, max_new_tokens=2)
        model.generate(**{k: v for k, v in inputs.items() if k != "attention_mask"}, max_new_tokens=2)
        h.encode_videos(torch.stack(videos))
    monkeypatch.undo()
    assert reads == []


_SYNC_SETUP = """
import tiny_models as tm
import earlytom_ext
from earlytom_ext import EarlyTomConfig

cfg = EarlyTomConfig(retain_ratio=0.2, tau=0.5, max_window=6, ema=0.9, prune_layers=(1, 3, 4))
videos = [tm.make_video(6, seed=1, kind="scenes", scene_length=3), tm.make_video(6, seed=2, kind="static")]
m = tm.build_model(seed=0).cuda()
inputs = {k: v.cuda() for k, v in tm.make_inputs(videos, seed=5).items()}
h = earlytom_ext.apply(m, cfg)
"""
_SYNC_CALL = (
    'h.prepare_inputs(inputs["input_ids"], inputs["pixel_values_videos"], attention_mask=inputs["attention_mask"])'
)


@pytest.mark.skipif(not (torch.cuda.is_available() and has_cuda_kernels()), reason="needs a GPU and the CUDA kernels")
def test_cuda_host_syncs_at_most_one_per_prune_layer(tmp_path):
    syncs = tm.call_syncs(_SYNC_SETUP, _SYNC_CALL, tmp_path)
    # One size read per prune layer (frames after Stage I); the refined segments are read from an
    # asynchronous host copy.
    assert 1 <= len(syncs) <= len(CFG.prune_layers), "\n".join(syncs)


def test_summary(model, videos):
    with earlytom_ext.apply(model, CFG) as h:
        assert "no video" in h.summary()
        h.encode_videos(torch.stack(videos))
        text = h.summary()
        stats = h.last_stats
    lines = text.splitlines()
    assert lines[0].startswith("EarlyTom  r=0.2  tau=0.5  max_window=6")
    assert "after L1" in lines[1] and "tokens before" in lines[1]
    row0 = lines[3].split()
    v0 = stats["videos"][0]
    assert row0[:2] == ["0", str(T)]
    assert row0[-3:-1] == [str(T * 196 + 1), str(v0["tokens_after"])]
    assert any(line.startswith("all") for line in lines)
    assert "vision_tower" in text and "stage2" in text


def test_unknown_or_repeated_video_arguments_raise(model, videos):
    pv = torch.stack(videos)
    with earlytom_ext.apply(model, CFG) as h:
        with pytest.raises(TypeError, match="vision_feature_layers"):
            h.encode_videos(pv, vision_feature_layers=-2)
        with pytest.raises(TypeError, match="both positionally and by keyword"):
            h.encode_videos(pv, -1, vision_feature_layer=-2)
        inputs = tm.make_inputs(videos, seed=6)
        with pytest.raises(TypeError, match="padding_sid"):
            h.prepare_inputs(inputs["input_ids"], pv, padding_sid="right")


def test_generate_refuses_settings_the_compressed_prompt_cannot_serve(model, videos, monkeypatch):
    """The compressed prompt reaches Hugging Face's generate as inputs_embeds: assisted decoding
    would drop its candidates (wrong tokens, or a failure in 4.57), chunked prefill does not split
    it, the prompt penalties would be dropped with a warning. A call with videos refuses them,
    whichever way they are asked for, before the vision tower runs; their off values pass."""
    import transformers
    from transformers import GenerationConfig

    one = tm.make_inputs([videos[0][:3]], seed=16)
    L = one["input_ids"].shape[1]
    assistant = tm.build_model(seed=1)
    asks = [
        ("assisted decoding", "assistant_model", dict(assistant_model=assistant)),
        ("assisted decoding", "prompt_lookup_num_tokens", dict(prompt_lookup_num_tokens=2)),
        ("assisted decoding", "assistant_early_exit", dict(assistant_early_exit=1)),
        (
            "assisted decoding",
            "prompt_lookup_num_tokens",
            dict(generation_config=GenerationConfig(prompt_lookup_num_tokens=2, max_new_tokens=2, pad_token_id=0)),
        ),
        ("chunked prefill", "prefill_chunk_size", dict(prefill_chunk_size=16)),
        ("a prompt penalty", "encoder_repetition_penalty", dict(encoder_repetition_penalty=1.3)),
        ("a prompt n-gram ban", "encoder_no_repeat_ngram_size", dict(encoder_no_repeat_ngram_size=2)),
        ("continuous batching", "cache_implementation='paged'", dict(cache_implementation="paged")),
    ]
    with earlytom_ext.apply(model, CFG) as h:
        stage1_calls = []
        h.force_decisions(stage1=lambda *args, **kwargs: stage1_calls.append(args))
        for what, name, kw in asks:
            with pytest.raises(ValueError, match=rf"{what} \({name}\)"):
                model.generate(**one, max_new_tokens=2, do_sample=False, **kw)
        with monkeypatch.context() as mp:  # set in the model's own generation_config
            mp.setattr(model.generation_config, "prompt_lookup_num_tokens", 2)
            with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
                model.generate(**one, max_new_tokens=2, do_sample=False)
        assert stage1_calls == [] and h.last_stats is None
        h.force_decisions()
        ref = model.generate(**one, max_new_tokens=2, do_sample=False)
        off = model.generate(
            **one, max_new_tokens=2, do_sample=False, encoder_repetition_penalty=1.0, encoder_no_repeat_ngram_size=0
        )
        assert ref.shape == (1, L + 2) and torch.equal(off, ref)
        if not transformers.__version__.startswith("4."):  # 4.57's GenerationConfig does not know "paged"
            # Hugging Face batches continuously on the keyword only; a config's "paged" runs the usual path.
            paged = GenerationConfig(cache_implementation="paged", max_new_tokens=2, do_sample=False, pad_token_id=0)
            assert torch.equal(model.generate(**one, generation_config=paged), ref)
        # Calls without videos pass through: assisted decoding works there as in stock.
        text = {"input_ids": one["input_ids"][:, -6:], "attention_mask": one["attention_mask"][:, -6:]}
        plain = model.generate(**text, max_new_tokens=3, do_sample=False)
        assisted = model.generate(**text, max_new_tokens=3, do_sample=False, assistant_model=assistant)
        assert torch.equal(assisted, plain)


def test_inner_llm_merge_refuses_a_cache_it_cannot_shorten(model, videos):
    from transformers import DynamicCache

    one = tm.make_inputs([videos[0][:3]], seed=16)
    cfg = CFG.replace(llm_merge_layer=1, llm_merge_ratio=0.5)
    with earlytom_ext.apply(model, cfg) as h:
        stage1_calls = []
        h.force_decisions(stage1=lambda *args, **kwargs: stage1_calls.append(args))
        with pytest.raises(ValueError, match="cache_implementation='static'"):
            model.generate(**one, max_new_tokens=2, do_sample=False, cache_implementation="static")
        with pytest.raises(ValueError, match=f"DynamicCache .or none. as {CACHE}, got list"):
            model(**one, **{CACHE: []})
        assert stage1_calls == []
        h.force_decisions()
        out = model.generate(**one, max_new_tokens=2, do_sample=False, cache_implementation="dynamic")
        assert out.shape[1] == one["input_ids"].shape[1] + 2
        with torch.no_grad():
            model(**one, **{CACHE: DynamicCache()})


def test_inner_llm_merge_refuses_before_the_encoder_what_its_prefill_cannot_take(model, videos):
    """Two videos in one sample, right padding (both read from the caller's prompt on the CPU) and,
    before transformers 5.25, gradient checkpointing under grad mode (its backward would recompute the
    layers without the merge; from 5.25 on it gives the gradients of the run without checkpointing)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    two = tm.make_inputs([videos[0][:3], videos[1][:3]], seed=16)
    rows = [two["input_ids"][b][two["attention_mask"][b].bool()] for b in range(2)]
    ids = torch.cat(rows)[None]
    one_sample = dict(two, input_ids=ids, attention_mask=torch.ones_like(ids))
    right = tm.make_inputs([videos[0][:3], videos[1][:3]], seed=16, prefix_lengths=[2, 5], padding_side="right")
    assert not bool(right["attention_mask"][:, -1].all())
    one = tm.make_inputs([videos[0][:3]], seed=16)
    with earlytom_ext.apply(model, CFG.replace(llm_merge_layer=1, llm_merge_ratio=0.5)) as h:
        stage1_calls = []
        h.force_decisions(stage1=lambda *args, **kwargs: stage1_calls.append(args))
        with pytest.raises(ValueError, match="one video per sample; a sample holds several"):
            model.generate(**one_sample, max_new_tokens=2, do_sample=False)
        with pytest.raises(ValueError, match="needs left padding"):
            model.generate(**right, max_new_tokens=2, do_sample=False)
        assert stage1_calls == []
        h.force_decisions()
        model.train()  # dropout 0: the same values as in eval mode
        grads = {}
        try:
            for ckpt in (False, True):
                if ckpt:
                    model.gradient_checkpointing_enable()
                if ckpt and "__call__" in GradientCheckpointingLayer.__dict__:
                    # Before 5.25 the recomputation would run the layers without the merge's hooks.
                    with pytest.raises(ValueError, match="cannot run under gradient checkpointing with gradients on"):
                        model(**one)
                    with torch.no_grad():  # no backward, no recomputation
                        model(**one)
                    continue
                model.zero_grad()
                model(**one).logits[:, -1].pow(2).mean().backward()
                lm = model.model.language_model
                grads[ckpt] = [p.grad.clone() for p in lm.parameters() if p.grad is not None]
        finally:
            model.gradient_checkpointing_disable()
            model.zero_grad()
            model.eval()
        if True in grads:  # 5.25 on: checkpointing keeps module hooks outside the recomputation
            assert len(grads[True]) == len(grads[False]) > 0
            for a, b in zip(grads[True], grads[False]):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("batch", [1, 2])
def test_generate_continues_from_the_cache_it_filled(model, videos, batch):
    """Hugging Face's way to continue a conversation: the returned sequences plus new text, with the
    returned (or passed-in) cache. The cache holds the compressed prompt, so the wrapper puts it in
    place of the caller's prompt: the same tokens and logits as the second turn run from scratch
    with the video given again, over two follow-up turns, and the caller's prompt in the output."""
    from transformers import DynamicCache

    inputs = tm.make_inputs([v[:3] for v in videos[:batch]], seed=16)  # batch 2 is left-padded
    kw = dict(do_sample=False, return_dict_in_generate=True, output_logits=True)

    def follow(out, mask, new_text):
        ids = torch.cat([out.sequences, new_text], dim=1)
        return ids, torch.cat([mask, torch.ones_like(ids[:, mask.shape[1] :])], dim=1)

    text = torch.tensor([[11, 12, 13]]).expand(batch, 3)
    with earlytom_ext.apply(model, CFG) as h:
        for passed_in in (False, True):
            cache = DynamicCache() if passed_in else None
            out = model.generate(**inputs, max_new_tokens=3, **{CACHE: cache}, **kw)
            cache = returned_cache(out)
            assert passed_in is False or cache is not None
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            for turn in range(2):
                ids, mask = follow(out, mask, text + turn)
                out = model.generate(input_ids=ids, attention_mask=mask, **{CACHE: cache}, max_new_tokens=3, **kw)
                scratch = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    pixel_values_videos=inputs["pixel_values_videos"],
                    max_new_tokens=3,
                    **kw,
                )
                assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
                assert torch.equal(out.sequences, scratch.sequences)
                for a, b in zip(out.logits, scratch.logits):
                    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
                assert returned_cache(out) is cache
            # The videos again with that cache (a processor run on the whole conversation): refused,
            # saying how to continue.
            with pytest.raises(ValueError, match="continue it without pixel_values_videos"):
                model.generate(**dict(inputs, input_ids=ids, attention_mask=mask), **{CACHE: cache}, **kw)
        # A prompt that does not start with the caller's (here: the compressed one, by hand) is
        # passed on as it is.
        out = model.generate(**inputs, max_new_tokens=3, **kw)
        L, compressed = inputs["input_ids"].shape[1], h.last_inputs
        ids = torch.cat([compressed["input_ids"], out.sequences[:, L:], text], dim=1)
        mask = torch.cat([compressed["attention_mask"], torch.ones_like(ids[:, compressed["input_ids"].shape[1] :])], 1)
        by_hand = model.generate(input_ids=ids, attention_mask=mask, **{CACHE: returned_cache(out)}, max_new_tokens=3)
        full, full_mask = follow(out, inputs["attention_mask"], text)
    assert torch.equal(by_hand[:, ids.shape[1] :], scratch_tokens(model, full, full_mask, inputs))


def scratch_tokens(model, ids, mask, inputs):
    with earlytom_ext.apply(model, CFG):
        out = model.generate(
            input_ids=ids, attention_mask=mask, pixel_values_videos=inputs["pixel_values_videos"], max_new_tokens=3
        )
    return out[:, ids.shape[1] :]


def test_model_config_lengths_used_where_hugging_face_uses_them(model, videos, monkeypatch):
    """A max_length in the model's generation_config shifts (it counts the caller's prompt) only
    where Hugging Face applies it to a call that brings its own generation_config: always in 5.x;
    in 4.x with use_model_defaults, whose default depends on the version that saved the model's
    config. Expected: the new-token counts of the unpatched model, case by case."""
    import transformers
    from transformers import GenerationConfig

    one = tm.make_inputs([videos[0][:3]], seed=16)
    L = one["input_ids"].shape[1]
    monkeypatch.setattr(model.generation_config, "max_length", L + 5)
    monkeypatch.setattr(model.generation_config, "max_new_tokens", None)
    cases = [({}, None), ({}, "4.45.0")]
    if transformers.__version__.startswith("4."):
        cases += [({"use_model_defaults": False}, None), ({"use_model_defaults": True}, "4.45.0")]
    counts = []
    for extra, saved_by in cases:
        with monkeypatch.context() as mp:
            if saved_by is not None:
                mp.setattr(model.generation_config, "transformers_version", saved_by)
            kw = dict(generation_config=GenerationConfig(do_sample=False, pad_token_id=tm.PAD_ID), **extra)
            stock = model.generate(**one, **kw).shape[1] - L
            with earlytom_ext.apply(model, CFG):
                patched = model.generate(**one, **kw).shape[1] - L
        counts.append((stock, patched))
    assert all(stock == patched for stock, patched in counts), counts
    assert counts[0][0] == 5  # the model's max_length applies in the default case


@pytest.mark.parametrize(
    "mode", [dict(), dict(do_sample=True, num_return_sequences=2), dict(num_beams=2, num_return_sequences=2)]
)
def test_generate_callbacks_see_the_callers_prompt(model, videos, mode):
    """Custom logits processors, stopping criteria and prefix_allowed_tokens_fn get the caller's
    prompt followed by the new tokens, as in an unpatched generate: a criterion counting new tokens
    from the caller's prompt length stops where it would, a constraint on the first new token holds
    for every row, and each row's prompt is its sample's."""
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    inputs = tm.make_inputs([v[:3] for v in videos], seed=16)  # left-padded batch of 2
    prompt = inputs["input_ids"]
    L = prompt.shape[1]
    seen, sents = [], []

    class Record(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(input_ids.clone())
            return scores

    class TwoNewTokens(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - L >= 2, dtype=torch.bool)

    def first_new_token_is_7(batch_id, sent):
        sents.append((batch_id, sent.clone()))
        return [7] if sent.shape[0] == L else list(range(tm.VOCAB))

    torch.manual_seed(0)
    with earlytom_ext.apply(model, CFG) as h:
        out = model.generate(
            **inputs,
            max_new_tokens=5,
            logits_processor=LogitsProcessorList([Record()]),
            stopping_criteria=StoppingCriteriaList([TwoNewTokens()]),
            prefix_allowed_tokens_fn=first_new_token_is_7,
            **mode,
        )
        assert h.last_inputs["input_ids"].shape[1] < L - 100
    rows = out.shape[0]
    per_sample = rows // 2
    assert out.shape[1] == L + 2 and bool((out[:, L] == 7).all())
    assert [s.shape[1] for s in seen] == [L, L + 1]
    for s in seen:
        assert torch.equal(s[:, :L], prompt.repeat_interleave(s.shape[0] // 2, dim=0))
    # prefix_allowed_tokens_fn's batch index: per sample, but per returned sequence without beams
    # before transformers 5.24 (Hugging Face's grouping).
    import transformers
    from packaging.version import Version

    grouped = mode.get("num_beams") or Version(transformers.__version__).release[:2] >= (5, 24)
    per_batch_id = 1 if grouped else per_sample
    assert {b for b, _ in sents} == set(range(2 * per_batch_id))
    for b, sent in sents:
        assert torch.equal(sent[:L], prompt[b // per_batch_id])


def test_a_callers_processor_still_replaces_the_built_in_one_of_its_type(model, videos):
    """Hugging Face uses a caller's processor or criterion in place of the one it builds of the same
    type: a MaxLengthCriteria beyond max_new_tokens, a neutral repetition penalty over a strong one.
    Identity config: the unpatched model's sequences; compressing: the same lengths."""
    from transformers import LogitsProcessorList, StoppingCriteriaList
    from transformers.generation import MaxLengthCriteria, RepetitionPenaltyLogitsProcessor

    identity = EarlyTomConfig(retain_ratio=1.0, tau=-1.0, max_window=2, prune_layers=(1, 3, 4))
    inputs = tm.make_inputs([v[:3] for v in videos], seed=16)
    L = inputs["input_ids"].shape[1]
    cases = [
        dict(max_new_tokens=2, stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(max_length=L + 4)])),
        dict(
            max_new_tokens=4,
            repetition_penalty=0.01,
            logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.0)]),
        ),
    ]
    plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    for kw in cases:
        stock = model.generate(**inputs, do_sample=False, **kw)
        with earlytom_ext.apply(model, identity):
            same = model.generate(**inputs, do_sample=False, **kw)
        with earlytom_ext.apply(model, CFG):
            compressed = model.generate(**inputs, do_sample=False, **kw)
        assert torch.equal(same, stock) and torch.equal(stock, plain)
        assert compressed.shape == stock.shape == (2, L + 4)


def test_caller_position_ids_with_videos(model, videos):
    """Counting-up positions (arange, or the mask's cumulative sum: equal up to a shift per sample,
    which rotary ignores up to rounding) give the logits of no position_ids; packed (restarting)
    or scaled positions raise, before the encoder runs."""
    inputs = tm.make_inputs([v[:3] for v in videos], seed=16)  # left-padded batch of 2
    mask = inputs["attention_mask"]
    B, L = mask.shape
    arange = torch.arange(L).expand(B, L)
    cumsum = (mask.cumsum(-1) - 1).clamp(min=0)
    restart = arange.clone()
    restart[:, L // 2 :] -= L // 2  # a second packed sequence in every row
    with earlytom_ext.apply(model, CFG) as h:
        with torch.no_grad():
            base = model(**inputs).logits
            for pos in (arange, cumsum, arange[:1] + 7):
                torch.testing.assert_close(model(**inputs, position_ids=pos).logits, base, atol=2e-5, rtol=1e-4)
            stage1_calls = []
            h.force_decisions(stage1=lambda *args, **kwargs: stage1_calls.append(args))
            for pos in (restart, arange * 2):
                with pytest.raises(ValueError, match="count up by one"):
                    model(**inputs, position_ids=pos)
            with pytest.raises(ValueError, match="2-D tensor"):
                model(**inputs, position_ids=arange[0])
            with pytest.raises(ValueError, match="shape of attention_mask"):
                model(**inputs, position_ids=arange[:, :-1])
            assert stage1_calls == []
    # Only the attended tokens count: a pad column may hold anything.
    odd = cumsum.clone()
    odd[mask == 0] = 99
    assert (mask == 0).any()
    with earlytom_ext.apply(model, CFG), torch.no_grad():
        torch.testing.assert_close(model(**inputs, position_ids=odd).logits, base, atol=2e-5, rtol=1e-4)


def test_failed_remove_changes_nothing(model, videos):
    cfg = CFG.replace(llm_merge_layer=1)
    lm = model.model.language_model
    h = earlytom_ext.apply(model, cfg)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    inner = lm.forward
    lm.forward = lambda *a, **k: inner(*a, **k)  # someone wraps the language model after apply
    with pytest.raises(RuntimeError, match="replaced"):
        h.remove()
    assert "active" in repr(h)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks  # the encoder hooks are still there
    h.encode_videos(torch.stack(videos))  # still fully working
    del lm.forward
    lm.forward = inner
    h.remove()
    assert "forward" not in lm.__dict__ and "_earlytom_handle" not in model.__dict__


def test_remove_refuses_a_wrapper_that_copied_the_patched_forward(model, videos):
    """A wrapper made with functools.wraps (as accelerate's hooks are) copies the patched forward's
    attributes: remove() must still see that forward was replaced, and change nothing."""
    import functools

    h = earlytom_ext.apply(model, CFG)
    inner = model.forward

    @functools.wraps(inner)
    def outer(*args, **kwargs):
        return inner(*args, **kwargs)

    model.forward = outer
    with pytest.raises(RuntimeError, match=r"model.forward was replaced after earlytom_ext.apply\(\)"):
        h.remove()
    assert model.__dict__["forward"] is outer and "active" in repr(h)
    model.forward = inner  # the caller undoes their wrapper first
    h.remove()
    assert "forward" not in model.__dict__ and "_earlytom_handle" not in model.__dict__


def test_patched_forward_signatures(model):
    """generate reads ``inspect.signature(model.forward)`` for its argument checks: the model's own.
    torch.compile's frame capture binds a call to ``inspect.signature(fn, follow_wrapped=False)`` as
    the function's locals: that must be the wrapper's own ``(*args, **kwargs)``."""
    import inspect

    before = inspect.signature(model.forward)
    with earlytom_ext.apply(model, CFG):
        assert inspect.signature(model.forward) == before
        own = inspect.signature(model.forward, follow_wrapped=False)
        code = model.forward.__code__
        assert list(own.parameters) == list(code.co_varnames[: code.co_argcount + 2]) == ["args", "kwargs"]
    assert inspect.signature(model.forward) == before and "forward" not in model.__dict__


def test_a_removed_handle_refuses_to_be_used_again(model, videos):
    h = earlytom_ext.apply(model, CFG)
    h.remove()
    for use in (lambda: h.__enter__(), lambda: h.force_decisions(), lambda: h.encode_videos(torch.stack(videos))):
        with pytest.raises(RuntimeError, match=r"handle was removed: call earlytom_ext.apply\(model, cfg\) again"):
            use()
    h.remove()  # still idempotent
    assert h.summary() is not None  # the last statistics stay readable
    with earlytom_ext.apply(model, CFG) as h2:
        h2.remove()  # an explicit remove inside the block: leaving it is fine
    p = earlytom_ext.fast_pooling(model)
    p.remove()
    with pytest.raises(RuntimeError, match=r"FastPoolingHandle was removed: call earlytom_ext.fast_pooling\(model\)"):
        p.__enter__()


def test_models_sharing_a_language_model_carry_one_inner_llm_merge(model, videos):
    """Two merges on one decoder stack would clash in their decoding states: the second apply is
    refused before it patches anything; without the merge the second model works."""
    other = tm.build_model(seed=0)
    other.model.language_model = model.model.language_model
    cfg = CFG.replace(llm_merge_layer=1)
    inputs = tm.make_inputs([videos[0][:3]], seed=16)
    with earlytom_ext.apply(model, cfg):
        expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with pytest.raises(RuntimeError, match="already carries the inner-LLM merge of another EarlyTom handle"):
            earlytom_ext.apply(other, cfg)
        assert "_earlytom_handle" not in other.__dict__ and "forward" not in other.__dict__
        with earlytom_ext.apply(other, CFG):
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), expected)
    with earlytom_ext.apply(other, cfg):  # free again once the first handle is removed
        assert torch.equal(other.generate(**inputs, max_new_tokens=3, do_sample=False), expected)


def test_compiled_model_runs_the_video_path_eagerly(videos):
    """model.compile(): the compression (hooks, host reads, data-dependent sizes) runs eagerly and the
    model call after it compiled; results equal the uncompiled patched model, call after call."""
    second = tm.make_inputs([videos[1][:5]], seed=17)
    tm.check_compiled_model(
        tm.build_model(seed=0), CFG, [tm.make_inputs([v[:3] for v in videos], seed=16), second], second
    )


def test_a_hook_on_the_tower_sees_the_pixels_as_the_model_passes_them(model, videos):
    seen = []
    hook = model.model.vision_tower.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    inputs = tm.make_inputs([videos[0][:3]], seed=16)
    try:
        with torch.no_grad():
            model(**inputs)
            with earlytom_ext.apply(model, CFG):
                model(**inputs)
    finally:
        hook.remove()
    assert len(seen) == 2 and seen[0] == seen[1] == (3, *inputs["pixel_values_videos"].shape[2:])


def test_default_prune_layers_are_a_valid_config(model):
    from earlytom_ext.integration.adapters import adapter_for

    adapter = adapter_for(model)
    layers = adapter.default_prune_layers()
    cfg = EarlyTomConfig(prune_layers=layers)  # strictly increasing, inside the encoder
    assert cfg.prune_layers[-1] < adapter.depth


def test_apply_without_a_config_uses_the_encoders_prune_layers(model, videos):
    # The tiny SigLIP has 6 layers: round(6 * 0.25, 6 * 0.8, 6 * 0.88) = (2, 5, 5) -> (2, 5);
    # SigLIP's (6, 21, 23) would not fit.
    with earlytom_ext.apply(model) as h:
        assert h.config == EarlyTomConfig(prune_layers=(2, 5))
        h.encode_videos(torch.stack(videos))
        assert set(h.last_stats["videos"][0]["frames_after"]) == {2, 5}
    with pytest.raises(TypeError, match="EarlyTomConfig"):
        earlytom_ext.apply(model, {"retain_ratio": 0.1})


def test_a_gpu_model_with_a_cpu_only_build_is_a_clear_error(model, videos, monkeypatch):
    from earlytom_ext.integration import core

    with earlytom_ext.apply(model, CFG) as h:
        monkeypatch.setattr(h.adapter, "encoder_device", lambda: torch.device("cuda"))
        monkeypatch.setattr(core, "has_cuda_kernels", lambda: False)
        with pytest.raises(RuntimeError, match="built without its CUDA kernels .* rebuild it from the repository"):
            h.encode_videos(torch.stack(videos))


def test_config_without_prune_layers_gets_the_encoders(model, videos):
    # Only the prune layers are left to the model; explicit ones are kept as given.
    cfg = EarlyTomConfig(retain_ratio=0.25, tau=0.3, max_window=6)
    with earlytom_ext.apply(model, cfg) as h:
        assert h.config == cfg.replace(prune_layers=(2, 5))
        h.encode_videos(torch.stack(videos))
        assert h.last_stats["prune_layers"] == (2, 5)
    with earlytom_ext.apply(model, cfg.replace(prune_layers=(1, 3))) as h:
        assert h.config.prune_layers == (1, 3)


def test_patched_model_refuses_copy_and_pickle_until_removed(videos):
    """A copy of a patched model would run the original model's weights (the patches are closures
    over it): copying and pickling raise a TypeError that says what to do, while any patch is on."""
    import copy
    import io
    import pickle

    model = tm.build_model(seed=0)  # unused so far (a forward may leave unpicklable hooks of its own)

    def refused(shallow=True):
        ops = (copy.deepcopy, pickle.dumps, lambda m: torch.save(m, io.BytesIO())) + ((copy.copy,) if shallow else ())
        for op in ops:
            with pytest.raises(TypeError, match="remove"):
                op(model)

    inner = model.model
    h = earlytom_ext.apply(model, CFG)
    pool = earlytom_ext.fast_pooling(model)
    refused()
    sd = model.state_dict()  # state_dict stays available
    assert set(sd) == set(model.state_dict())
    h.remove()
    refused(shallow=False)  # fast_pooling still patches the inner model (a shallow copy shares it)
    pool.remove()
    assert not any(k in m.__dict__ for m in (model, inner) for k in ("__deepcopy__", "__reduce_ex__"))
    twin = copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))
    with earlytom_ext.apply(twin, CFG):  # a copy is patched on its own
        inputs = tm.make_inputs(videos, seed=3)
        with torch.no_grad():
            a = twin(**inputs).logits
        with earlytom_ext.apply(model, CFG), torch.no_grad():
            b = model(**inputs).logits
    assert torch.equal(a, b)


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _needs_slow_check():
    from earlytom_ext.integration.wrappers import _slow_config_check

    if _slow_config_check() is None:
        pytest.skip("this transformers does not rebuild a config per check")


def _count_default_builds(monkeypatch, cls) -> list:
    built = []
    post_init = cls.__post_init__
    monkeypatch.setattr(cls, "__post_init__", lambda self, *a, **k: (built.append(1), post_init(self, *a, **k))[1])
    return built


def test_quick_check_answers_as_the_original(model, monkeypatch):
    """{} when the config sets no generation key, the key and its value when it sets one, and the
    original's error where the class's default config cannot be built; one default build per class."""
    from earlytom_ext.integration.wrappers import _quick_generation_parameters

    _needs_slow_check()
    config = model.config
    _quick_generation_parameters(config)  # the class's first check may build its default config
    built = _count_default_builds(monkeypatch, type(config))
    assert _quick_generation_parameters(config) == {}
    assert built == []
    monkeypatch.setattr(config, "max_length", 50, raising=False)
    assert _quick_generation_parameters(config) == {"max_length": 50}

    class NoDefault(type(config)):  # a required field: the class cannot be built without arguments
        extra: int

    odd = NoDefault(extra=1)
    with pytest.raises(TypeError) as stock:
        odd._get_generation_parameters()
    for _ in range(2):
        with pytest.raises(TypeError) as quick:
            _quick_generation_parameters(odd)
        assert str(quick.value) == str(stock.value)


def test_quick_check_only_inside_prepare_generation_config(model, monkeypatch):
    """The config carries the quick check only while generate prepares its generation config;
    overlapping calls ending in either order, and errors, leave model and config clean."""
    from earlytom_ext.integration.wrappers import quick_config_check

    _needs_slow_check()
    config, seen = model.config, []
    prepare = type(model)._prepare_generation_config

    def spy(self, *args, **kwargs):
        seen.append("_get_generation_parameters" in self.config.__dict__)
        if kwargs.pop("fail", False):
            raise RuntimeError("inside")
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "_prepare_generation_config", spy)

    def clean():
        return "_get_generation_parameters" not in config.__dict__ and "_prepare_generation_config" not in vars(model)

    with quick_config_check(model):
        assert "_get_generation_parameters" not in config.__dict__
        model._prepare_generation_config(None)
        with pytest.raises(RuntimeError, match="inside"):
            model._prepare_generation_config(None, fail=True)
        assert "_get_generation_parameters" not in config.__dict__
    assert seen == [True, True] and clean()
    for first_ends_first in (True, False):
        a, b = quick_config_check(model), quick_config_check(model)
        a.__enter__()
        b.__enter__()
        model._prepare_generation_config(None)
        for block in (a, b) if first_ends_first else (b, a):
            block.__exit__(None, None, None)
        assert clean()


def test_generate_builds_no_default_config_per_call(model, videos, monkeypatch):
    """transformers 5.0-5.19 build a default config of the model's class in every generate call
    without a generation_config (several ms); the patched generate does not (after the class's
    first check), gives the same tokens, and its logits processors see a clean config."""
    import json

    from transformers import LogitsProcessorList

    _needs_slow_check()
    inputs = tm.make_inputs(videos, seed=6)
    seen = []

    def probe(input_ids, scores):
        seen.append("_get_generation_parameters" in model.config.__dict__)
        json.dumps(model.config.to_dict())  # serialisable while generate runs
        return scores

    with earlytom_ext.apply(model, CFG) as h:
        model.generate(**inputs, max_new_tokens=1)
        built = _count_default_builds(monkeypatch, type(model.config))
        fast = model.generate(**inputs, max_new_tokens=3, logits_processor=LogitsProcessorList([probe]))
        text = {k: v for k, v in inputs.items() if k != "pixel_values_videos"}
        text["input_ids"] = text["input_ids"].masked_fill(text["input_ids"] == tm.VIDEO_TOKEN_ID, 5)
        model.generate(**text, max_new_tokens=1)  # a call without video goes through the same check
        assert built == [] and seen == [False] * 3
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        prep = h.prepare_inputs(ids, inputs["pixel_values_videos"], attention_mask=mask)
    # Hugging Face's generate on the compressed inputs builds one, and gives the same tokens.
    stock = model.generate(
        input_ids=prep["input_ids"],
        attention_mask=prep["attention_mask"],
        inputs_embeds=prep["inputs_embeds"],
        max_new_tokens=3,
    )
    assert built != []
    assert torch.equal(fast[:, inputs["input_ids"].shape[1] :], stock[:, prep["input_ids"].shape[1] :])


def test_generate_keeps_the_legacy_config_check(model, videos, monkeypatch):
    """A generation parameter set on model.config (not on its generation_config) is refused by
    Hugging Face's generate (transformers 5): the patched generate refuses it alike."""
    if _transformers_major() < 5:
        pytest.skip("transformers 4 takes generation parameters from model.config")
    monkeypatch.setattr(model.config, "max_length", 50, raising=False)
    inputs = tm.make_inputs(videos, seed=6)
    with pytest.raises(ValueError, match="modified the pretrained model configuration") as stock:
        model.generate(**{k: v for k, v in inputs.items() if k != "pixel_values_videos"}, max_new_tokens=2)
    with earlytom_ext.apply(model, CFG):
        with pytest.raises(ValueError, match="modified the pretrained model configuration") as ours:
            model.generate(**inputs, max_new_tokens=2)
    assert str(ours.value) == str(stock.value)
    assert "_get_generation_parameters" not in model.config.__dict__
