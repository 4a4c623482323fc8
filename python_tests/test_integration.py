"""earlytom_ext.apply on tiny random Hugging Face LLaVA-OneVision models (transformers 4.57.x / 5.x).

The compressed tokens are checked against the reference pipeline run by hand on the same model
(embeddings, encoder layers one by one, Stage I / score / refined segmentation / pooling /
Stage II from earlytom_ext.reference).
"""

import math
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models as tm  # noqa: E402

pytest.importorskip("transformers")

import earlytom_ext  # noqa: E402
from earlytom_ext import EarlyTomConfig  # noqa: E402
from earlytom_ext import reference as R
from earlytom_ext._ext import has_cuda_kernels  # noqa: E402

# A config that merges on the tiny 6-layer tower (the paper's layers are for 26 layers).
CFG = EarlyTomConfig(retain_ratio=0.2, tau=0.5, max_window=6, ema=0.9, prune_layers=(1, 3, 4))
# Stage I is an identity (every segment has one frame), r = 1 keeps every token.
IDENTITY = EarlyTomConfig(retain_ratio=1.0, tau=-1.0, max_window=2, prune_layers=(1, 3, 4))
T = 8


@pytest.fixture(scope="module")
def model():
    return tm.build_model(seed=0)


@pytest.fixture(scope="module")
def videos():
    return [tm.make_video(T, seed=1, kind="scenes", scene_length=3), tm.make_video(T, seed=2, kind="static")]


@pytest.fixture(autouse=True)
def _no_leftover(model):
    yield
    h = model.__dict__.get("_earlytom_handle")
    if h is not None:
        h.remove()


# --------------------------------------------------------------------------------------------
# The reference pipeline, by hand
# --------------------------------------------------------------------------------------------
_layers = tm.vision_layers
_call_layer = tm.call_layer


@torch.no_grad()
def reference_video(model, video, cfg, feature_layer=-1):
    """Compressed tokens of one video [T, 3, H, W] by the reference: (tokens + newline, index, stats)."""
    vm, layers = _layers(model)
    hidden = vm.embeddings(video.to(model.dtype))
    depth = len(layers)
    fl = (feature_layer % (depth + 1)) - 1
    used = [(lambda h, layer=layer: _call_layer(layer, h)) for layer in layers[: fl + 1]]

    hidden, scores, refined, counts = R.run_encoder(hidden, used, cfg, lambda i, h: tm.layer_qk(layers[i], h))
    proj = model.model.multi_modal_projector(hidden)
    tokens, index, r_adj = R.compress_after_encoder(proj, scores, refined, cfg.retain_ratio, video.shape[0])
    tokens = torch.cat([tokens, model.model.image_newline[None].to(tokens.dtype)])
    return tokens, index, {"segments": refined, "counts": counts, "ratio": r_adj}


def expected_token_count(segments, T_before, r, P=tm.TOKENS_PER_FRAME):
    Tm = segments[-1][1] + 1
    ra = R.adjusted_ratio(r, T_before, Tm, P)
    k, n = R.dynamic_keep(ra, P), R.static_windows(ra, P)
    return sum(n if s else k for s in R.frame_kinds(segments))


def _close(a, b, tol=1e-4):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
def test_kept_tokens_equal_reference(model, videos):
    with earlytom_ext.apply(model, CFG) as h:
        feats = h.encode_videos(torch.stack(videos))
        stats = h.last_stats
    assert len(feats) == 2
    merged_somewhere = False
    for b, v in enumerate(videos):
        ref_tokens, ref_index, ref = reference_video(model, v, CFG)
        st = stats["videos"][b]
        assert st["segments"] == [tuple(s) for s in ref["segments"]]
        assert [st["frames_after"][p] for p in CFG.prune_layers] == ref["counts"]
        assert st["kept"] == [tuple(x) for x in ref_index.tolist()]
        assert math.isclose(st["ratio"], ref["ratio"], rel_tol=0, abs_tol=0)
        _close(feats[b], ref_tokens)
        merged_somewhere |= ref["counts"][-1] < T
    assert merged_somewhere, "the test videos should exercise Stage I merging"
    # Different contents -> different numbers of kept tokens.
    assert feats[0].shape[0] != feats[1].shape[0]


def test_feature_layer_not_last(videos):
    m = tm.build_model(seed=3, vision_feature_layer=-2)
    cfg = CFG.replace(prune_layers=(1, 3))
    with earlytom_ext.apply(m, cfg) as h:
        feats = h.encode_videos(videos[1][None])
    ref_tokens, _, _ = reference_video(m, videos[1], cfg, feature_layer=-2)
    _close(feats[0], ref_tokens)
    # The feature layer is the last prune layer itself (features taken after its merge).
    cfg = CFG.replace(prune_layers=(1, 4))
    with earlytom_ext.apply(m, cfg) as h:
        feats = h.encode_videos(videos[1][None])
    ref_tokens, _, _ = reference_video(m, videos[1], cfg, feature_layer=-2)
    _close(feats[0], ref_tokens)
    # A feature layer before the last prune layer cannot work.
    with pytest.raises(ValueError, match="prune"):
        earlytom_ext.apply(m, CFG.replace(prune_layers=(1, 5)))


def test_generate_deterministic_and_token_count(model, videos):
    inputs = tm.make_inputs(videos, seed=4)
    with earlytom_ext.apply(model, CFG) as h:
        out1 = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        li = h.last_inputs
        stats = h.last_stats
        out2 = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out1, out2)
    L = inputs["input_ids"].shape[1]
    assert out1.shape == (2, L + 4)
    assert torch.equal(out1[:, :L], inputs["input_ids"])  # the original prompt comes back
    for b, st in enumerate(stats["videos"]):
        n = expected_token_count(st["segments"], T, CFG.retain_ratio) + 1
        assert st["tokens_after"] == n
        assert li["video_token_counts"][b] == n
        assert int((li["input_ids"][b] == tm.VIDEO_TOKEN_ID).sum()) == n
        assert st["tokens_before"] == T * 196 + 1
    # Compressed prompts, left padding kept.
    am = li["attention_mask"]
    lengths = am.sum(1).tolist()
    assert lengths[0] != lengths[1]
    for b in range(2):
        assert am[b, -1] == 1 and am[b, : am.shape[1] - lengths[b]].sum() == 0
    assert set(stats["timings_ms"]) >= {
        "vision_tower",
        "stage1_layer1",
        "stage1_layer3",
        "stage1_layer4",
        "attention_score",
        "refine_segments",
        "projector",
        "pooling",
        "stage2",
        "total",
    }


def test_generate_output_object_reexpanded(model, videos):
    inputs = tm.make_inputs(videos[:1], seed=5)
    with earlytom_ext.apply(model, CFG):
        plain = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert torch.equal(out.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_batch_each_video_equals_alone(model, videos):
    inputs = tm.make_inputs(videos, seed=6)
    with earlytom_ext.apply(model, CFG) as h:
        batch_logits = model(**inputs).logits
        li = h.last_inputs
        batch_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        for b in range(2):
            single = {k: v[b : b + 1] for k, v in inputs.items()}
            # Drop this sample's own left padding.
            keep = single["attention_mask"][0].bool()
            single["input_ids"] = single["input_ids"][:, keep]
            single["attention_mask"] = single["attention_mask"][:, keep]
            logits = model(**single).logits
            n = logits.shape[1]
            assert li["attention_mask"][b].sum() == n
            _close(batch_logits[b, -n:], logits[0], tol=2e-4)
            if b == 0:
                gen = model.generate(**single, max_new_tokens=3, do_sample=False)
                assert torch.equal(gen[0, -3:], batch_gen[b, -3:])


def test_right_padding_kept(model, videos):
    inputs = tm.make_inputs(videos, seed=7, padding_side="right")
    with earlytom_ext.apply(model, CFG) as h:
        logits = model(**inputs).logits
        li = h.last_inputs
    am = li["attention_mask"]
    assert logits.shape[:2] == am.shape
    for b in range(2):
        n = int(am[b].sum())
        assert am[b, :n].all() and not am[b, n:].any()
        assert (li["input_ids"][b, n:] == tm.PAD_ID).all()


def test_identity_config_equals_unpatched(model, videos):
    t = 5
    inputs = tm.make_inputs([v[:t] for v in videos], seed=8)
    with torch.no_grad():
        base_logits = model(**inputs).logits
    base_gen = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    with earlytom_ext.apply(model, IDENTITY) as h:
        with torch.no_grad():
            logits = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        st = h.last_stats
    assert all(v["frames_after"] == {1: t, 3: t, 4: t} for v in st["videos"])
    assert all(v["tokens_after"] == v["tokens_before"] for v in st["videos"])
    assert torch.equal(h.last_inputs["input_ids"], inputs["input_ids"])
    _close(logits, base_logits, tol=1e-5)
    assert torch.equal(gen, base_gen)


def test_identity_config_under_autocast(model, videos):
    """fp32 weights under bf16 autocast: the model's features come out in bf16 and its fp32
    image_newline is appended by a promoting cat; EarlyTom's features must be the same values, the
    newline not rounded to bf16 (which moved the logits by ~2e-3)."""
    inputs = tm.make_inputs([v[:3] for v in videos], seed=8)
    pix = inputs["pixel_values_videos"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base = model.model.get_video_features(pix, vision_feature_layer=-1, vision_feature_select_strategy="full")
        base = getattr(base, "pooler_output", base)
        base_logits = model(**inputs).logits
        with earlytom_ext.apply(model, IDENTITY) as h:
            feats = h.encode_videos(pix)
            logits = model(**inputs).logits
    for b in range(2):
        n = feats[b].shape[0] - 1  # the kept tokens, then the newline (4.57's get_video_features has none)
        assert feats[b].dtype == torch.float32
        assert torch.equal(feats[b][:n], base[b][:n].float())  # bf16 values, promoted exactly
        assert torch.equal(feats[b][n], model.model.image_newline)  # not rounded to bf16
    _close(logits, base_logits, tol=1e-5)


def test_remove_restores_exactly(model, videos):
    m = model
    inputs = tm.make_inputs(videos[:1], seed=9)
    vm, layers = _layers(m)
    with torch.no_grad():
        before = m(**inputs).logits
    modules = list(m.modules())
    hooks_before = [(len(x._forward_hooks), len(x._forward_pre_hooks)) for x in modules]
    dict_before = set(m.__dict__)
    h = earlytom_ext.apply(m, CFG)
    assert "forward" in m.__dict__ and "generate" in m.__dict__
    with pytest.raises(RuntimeError, match="already applied"):
        earlytom_ext.apply(m, CFG)
    with torch.no_grad():
        patched = m(**inputs).logits
    assert patched.shape[1] < before.shape[1]
    h.remove()
    h.remove()  # idempotent
    assert set(m.__dict__) == dict_before
    assert [(len(x._forward_hooks), len(x._forward_pre_hooks)) for x in modules] == hooks_before
    with torch.no_grad():
        after = m(**inputs).logits
    assert torch.equal(before, after)
    with pytest.raises(RuntimeError, match="removed"):
        h.encode_videos(inputs["pixel_values_videos"])
    # Applying again after remove works.
    with earlytom_ext.apply(m, CFG):
        with torch.no_grad():
            again = m(**inputs).logits
    _close(again, patched, tol=1e-6)


def test_mixed_image_and_video(model, videos):
    videos = [v[:3] for v in videos]  # short clips keep the unpatched runs cheap
    img = tm.make_image(seed=0)
    n_img = tm.image_token_count(model, img)
    inputs = tm.make_inputs(videos, seed=10, images=[img, None], image_tokens=n_img)
    sizes = inputs["image_sizes"]
    with torch.no_grad():
        base_img = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=sizes,
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
        base_logits = model(**inputs).logits
    base_img = getattr(base_img, "pooler_output", base_img)
    with earlytom_ext.apply(model, CFG) as h:
        with torch.no_grad():
            img_feats = model.model.get_image_features(
                pixel_values=inputs["pixel_values"],
                image_sizes=sizes,
                vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            )
        img_feats = getattr(img_feats, "pooler_output", img_feats)
        for a, b in zip(base_img, img_feats):
            assert torch.equal(a, b)  # images through the same tower are untouched
        with torch.no_grad():
            logits = model(**inputs).logits
        li = h.last_inputs
    assert int((li["input_ids"][0] == tm.IMAGE_TOKEN_ID).sum()) == n_img
    assert logits.shape[1] < base_logits.shape[1]
    # With the identity config, the mixed batch equals the unpatched model.
    with earlytom_ext.apply(model, IDENTITY):
        with torch.no_grad():
            logits_id = model(**inputs).logits
    _close(logits_id, base_logits, tol=1e-5)


def test_sdpa_and_eager_keep_the_same_tokens(videos):
    pix = videos[1][None]  # the static clip: Stage I merges it
    out = {}
    for impl in ("sdpa", "eager"):
        m = tm.build_model(seed=0, attn_implementation=impl)
        with earlytom_ext.apply(m, CFG) as h:
            feats = h.encode_videos(pix)
            out[impl] = (feats, h.last_stats)
    assert out["sdpa"][1]["videos"][0]["frames_after"][4] < T  # merging happened
    assert out["sdpa"][1]["videos"][0]["kept"] == out["eager"][1]["videos"][0]["kept"]
    _close(out["sdpa"][0][0], out["eager"][0][0], tol=1e-4)


def test_labels_follow_the_compression(model, videos):
    inputs = tm.make_inputs(videos, seed=11)
    labels = inputs["input_ids"].clone()
    labels[labels == tm.VIDEO_TOKEN_ID] = -100
    labels[inputs["attention_mask"] == 0] = -100
    with earlytom_ext.apply(model, CFG) as h:
        with torch.no_grad():
            out = model(**inputs, labels=labels)
        li = h.last_inputs
    assert out.loss is not None and torch.isfinite(out.loss)
    # With gradients on, the language model (its input embeddings included) gets them; the
    # compressed video features are constants.
    with earlytom_ext.apply(model, CFG):
        model.zero_grad(set_to_none=True)
        model(**inputs, labels=labels).loss.backward()
    emb = model.get_input_embeddings().weight
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert model.model.multi_modal_projector.linear_1.weight.grad is None
    model.zero_grad(set_to_none=True)
    lab = li["labels"]
    assert lab.shape == li["input_ids"].shape
    text = (li["attention_mask"] == 1) & (li["input_ids"] != tm.VIDEO_TOKEN_ID)
    assert torch.equal(lab[text], li["input_ids"][text])
    assert (lab[~text] == -100).all()


def test_force_decisions_seam(model, videos):
    from earlytom_ext import ops

    calls = []
    with earlytom_ext.apply(model, CFG) as h:
        baseline = h.encode_videos(torch.stack(videos))

        def spy(x, frame_counts, layer_index, extras=None):
            calls.append((layer_index, x.shape[0], extras is not None))
            return ops.merge_frames(x, frame_counts, h.config, extras=extras)

        refine_calls = []

        def spy_refine(x, frame_counts):
            refine_calls.append(x.shape[0])
            return ops.segment_frames(x, frame_counts, h.config)

        assert h.force_decisions(stage1=spy, refine=spy_refine) is h
        forced = h.encode_videos(torch.stack(videos))
        assert all(torch.equal(a, b) for a, b in zip(baseline, forced))
        h.force_decisions()  # back to the default ops
        n = len(calls)
        h.encode_videos(torch.stack(videos))
        assert len(calls) == n
        with pytest.raises(TypeError, match="stage1"):
            h.force_decisions(stage1=1)
    assert [c[0] for c in calls] == list(CFG.prune_layers)
    assert calls[0][1] == 2 * T
    assert [c[2] for c in calls] == [False, False, True]
    assert len(refine_calls) == 1


def test_errors(model, videos):
    with earlytom_ext.apply(model, CFG) as h:
        good = torch.stack(videos)
        with pytest.raises(ValueError, match="5 dimensions"):
            h.encode_videos(good[0])
        with pytest.raises(ValueError, match="at least 1 frame"):
            h.encode_videos(good[:, :0])
        bad = good.clone()
        for value in (float("nan"), float("inf"), -float("inf")):
            bad[0, 1, 0, 5, 5] = value
            with pytest.raises(ValueError, match="pixel_values_videos contains NaN or Inf"):
                h.encode_videos(bad)
        with pytest.raises(TypeError):
            h.encode_videos(good.numpy())
        inputs = tm.make_inputs(videos, seed=12)
        with pytest.raises(ValueError, match="5 dimensions"):
            model(input_ids=inputs["input_ids"], pixel_values_videos=good[0])
        with pytest.raises(ValueError, match=r"mm_encoder_outputs\['video'\] .* cannot be given together with pixel"):
            model(**inputs, mm_encoder_outputs={"video": object()})
        wrong = tm.make_inputs(videos, seed=12, video_tokens=[100, 100])
        stage1_calls = []
        h.force_decisions(stage1=lambda *args, **kwargs: stage1_calls.append(args))
        with pytest.raises(ValueError, match="placeholder"):
            model.generate(**wrong, max_new_tokens=2)
        assert stage1_calls == []  # checked before the vision tower runs
        h.force_decisions()
    with pytest.raises(TypeError):
        earlytom_ext.apply(torch.nn.Linear(2, 2), CFG)
    with pytest.raises(TypeError):
        earlytom_ext.apply(model.model, CFG)
    with pytest.raises(TypeError, match="EarlyTomConfig"):
        earlytom_ext.apply(model, {"retain_ratio": 0.1})
    with pytest.raises(ValueError, match="encoder depth"):
        earlytom_ext.apply(model, EarlyTomConfig(prune_layers=(1, 6)))
    with pytest.raises(ValueError, match="encoder depth"):
        earlytom_ext.apply(model, EarlyTomConfig(prune_layers=(6, 21, 23)))  # needs 24+ encoder layers
    assert "_earlytom_handle" not in model.__dict__


def test_presets_on_llava_onevision_give_no_warning():
    # The presets were tuned on LLaVA-OneVision: their layers are this family's own choice.
    m = tm.build_model(seed=0, vision_layers=26)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("mvbench", "videomme", "longvideobench", "egoschema"):
            earlytom_ext.apply(m, earlytom_ext.preset(name, 0.1)).remove()


def test_other_llava_family_model_rejected():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    ov = tm.tiny_config(vision_layers=2)
    cfg = LlavaConfig(vision_config=ov.vision_config, text_config=ov.text_config, image_token_index=tm.IMAGE_TOKEN_ID)
    m = LlavaForConditionalGeneration._from_config(cfg)
    with pytest.raises(TypeError, match="llava_onevision"):
        earlytom_ext.apply(m, CFG.replace(prune_layers=(0, 1)))


def test_unsupported_vision_tower():
    m = tm.build_model(seed=0)
    _, layers = _layers(m)
    del layers[2].self_attn.q_proj
    with pytest.raises(TypeError, match="q_proj"):
        earlytom_ext.apply(m, CFG)


def test_unpadded_inputs_positional_generate(model, videos):
    # No padding in the inputs (one sample each time), input_ids passed positionally.
    inputs = tm.make_inputs(videos, seed=13, prefix_lengths=[3, 3])
    assert inputs["attention_mask"].all()
    with earlytom_ext.apply(model, CFG) as h:
        ids = inputs.pop("input_ids")
        out = model.generate(ids, **inputs, max_new_tokens=2, do_sample=False)
        am = h.last_inputs["attention_mask"]
        # Without an attention mask: the same (no padding in, left padding added).
        no_mask = model.generate(
            ids, pixel_values_videos=inputs["pixel_values_videos"], max_new_tokens=2, do_sample=False
        )
        assert torch.equal(h.last_inputs["attention_mask"], am)
    assert torch.equal(no_mask, out)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    n = am.sum(1)
    assert n[0] != n[1]
    for b in range(2):  # re-padded on the left (generation-friendly)
        assert am[b, -int(n[b]) :].all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_runs(videos, dtype):
    m = tm.build_model(seed=0, dtype=dtype)
    with earlytom_ext.apply(m, CFG) as h:
        feats = h.encode_videos(torch.stack(videos))  # fp32 pixels: cast to the tower's dtype
        st = h.last_stats
        inputs = tm.make_inputs([v[:2] for v in videos], seed=18)
        out = m.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 2)
    for b, f in enumerate(feats):
        assert f.dtype == dtype and torch.isfinite(f.float()).all()
        assert f.shape[0] == expected_token_count(st["videos"][b]["segments"], T, CFG.retain_ratio) + 1


@pytest.mark.skipif(not (torch.cuda.is_available() and has_cuda_kernels()), reason="needs a GPU and the CUDA kernels")
def test_cuda_matches_cpu(videos):
    pix = torch.stack(videos)
    res = {}
    for dev in ("cpu", "cuda"):
        m = tm.build_model(seed=0, device=dev)
        inputs = {k: v.to(dev) for k, v in tm.make_inputs(videos, seed=14).items()}
        with earlytom_ext.apply(m, CFG) as h:
            feats = h.encode_videos(pix.to(dev))
            st = h.last_stats
            gen = m.generate(**inputs, max_new_tokens=3, do_sample=False)
        res[dev] = (feats, st, gen)
    for b in range(2):
        assert res["cpu"][1]["videos"][b]["kept"] == res["cuda"][1]["videos"][b]["kept"]
        assert res["cpu"][1]["videos"][b]["segments"] == res["cuda"][1]["videos"][b]["segments"]
        _close(res["cpu"][0][b], res["cuda"][0][b].cpu(), tol=1e-3)
    assert res["cuda"][2].shape == res["cpu"][2].shape


def test_text_only_sample_next_to_a_video(model, videos):
    one = tm.make_inputs(videos[1:], seed=15)
    L = one["input_ids"].shape[1]
    text = torch.randint(*tm.TEXT_ID_RANGE, (1, 7))
    ids = torch.full((2, L), tm.PAD_ID)
    am = torch.zeros((2, L), dtype=torch.long)
    ids[0], am[0] = one["input_ids"][0], one["attention_mask"][0]
    ids[1, -7:], am[1, -7:] = text[0], 1
    with earlytom_ext.apply(model, CFG) as h:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=am, pixel_values_videos=one["pixel_values_videos"]).logits
            li = h.last_inputs
            alone = model(input_ids=text, attention_mask=torch.ones_like(text)).logits
    assert torch.equal(li["input_ids"][1, -7:], text[0]) and li["attention_mask"][1].sum() == 7
    _close(logits[1, -7:], alone[0], tol=2e-4)
    assert int((li["input_ids"][0] == tm.VIDEO_TOKEN_ID).sum()) == li["video_token_counts"][0]


# --------------------------------------------------------------------------------------------
# generate / forward arguments
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_inputs(videos):
    # Short clips: the prompt is still much longer than the compressed one.
    return tm.make_inputs([v[:3] for v in videos], seed=16)


def test_generate_max_length_counts_the_original_prompt(model, short_inputs):
    from transformers import GenerationConfig

    inputs = short_inputs
    L = inputs["input_ids"].shape[1]
    with earlytom_ext.apply(model, CFG) as h:
        ref = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert h.last_inputs["input_ids"].shape[1] < L - 100
        by_kwarg = model.generate(**inputs, max_length=L + 3, do_sample=False)
        by_config = model.generate(
            **inputs, generation_config=GenerationConfig(max_length=L + 3, do_sample=False, pad_token_id=tm.PAD_ID)
        )
        with pytest.raises(ValueError, match="max_length"):
            model.generate(**inputs, max_length=L, do_sample=False)
        # min_length also counts the original prompt: the EOS logit is masked for exactly 2 new tokens.
        eos = 7
        out = model.generate(
            **inputs,
            min_length=L + 2,
            max_new_tokens=4,
            eos_token_id=eos,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(by_kwarg, ref) and torch.equal(by_config, ref)
    masked = [bool(torch.isinf(s[:, eos]).all()) for s in out.scores]
    assert masked == [True, True, False, False]


def test_generation_config_lengths_stay_in_the_config(model, short_inputs, monkeypatch):
    """A max_length given in the caller's generation_config is shifted in a copy of that config, not
    passed as a keyword next to it (which Hugging Face warns is deprecated)."""
    from transformers import GenerationConfig

    inputs = short_inputs
    L = inputs["input_ids"].shape[1]
    gc = GenerationConfig(max_length=L + 2, min_length=L + 1, do_sample=False, pad_token_id=tm.PAD_ID)
    seen = []
    orig = type(model).generate

    def spy(self, *args, **kwargs):  # what EarlyTom's wrapper passes on to Hugging Face
        seen.append(kwargs)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", spy)
    with earlytom_ext.apply(model, CFG) as h:
        out = model.generate(**inputs, generation_config=gc)
        L2 = h.last_inputs["input_ids"].shape[1]
    (kwargs,) = seen
    assert "max_length" not in kwargs and "min_length" not in kwargs
    assert kwargs["generation_config"] is not gc
    assert (kwargs["generation_config"].max_length, kwargs["generation_config"].min_length) == (L2 + 2, L2 + 1)
    assert (gc.max_length, gc.min_length) == (L + 2, L + 1)  # the caller's config is unchanged
    assert out.shape == (2, L + 2)


def test_a_model_min_length_met_by_the_prompt_stays_met(model, short_inputs, monkeypatch):
    """The model's min_length, already met by the caller's prompt, shifts to 0; with a
    generation_config in the call it must stay 0 (4.x would refill a default 0 from the model's)."""
    from transformers import GenerationConfig

    inputs = short_inputs
    eos = 7
    with earlytom_ext.apply(model, CFG) as h:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        L2 = h.last_inputs["input_ids"].shape[1]
        assert L2 + 3 < inputs["input_ids"].shape[1]
        monkeypatch.setattr(model.generation_config, "min_length", L2 + 3)  # met by the original prompt
        gc = GenerationConfig(do_sample=False, max_new_tokens=3, min_new_tokens=None, pad_token_id=tm.PAD_ID)
        out = model.generate(
            **inputs, generation_config=gc, eos_token_id=eos, output_scores=True, return_dict_in_generate=True
        )
    assert not any(bool(torch.isinf(s[:, eos]).any()) for s in out.scores)


def test_generate_infers_the_padding_mask_like_hugging_face(model, short_inputs):
    """Without attention_mask, generate masks the pad tokens of a padded prompt (input_ids !=
    pad_token_id), as Hugging Face does."""
    inputs = short_inputs
    assert (inputs["attention_mask"] == 0).any()
    no_mask = {k: v for k, v in inputs.items() if k != "attention_mask"}
    kw = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    base = model.generate(**no_mask, **kw)
    with earlytom_ext.apply(model, IDENTITY):
        same = model.generate(**no_mask, **kw)
    with earlytom_ext.apply(model, CFG) as h:
        masked = model.generate(**inputs, **kw)
        inferred = model.generate(**no_mask, **kw)
        li = h.last_inputs
    assert torch.equal(same.sequences, base.sequences)
    for a, b in zip(same.logits, base.logits):
        _close(a, b, tol=2e-4)
    assert torch.equal(inferred.sequences, masked.sequences)
    for a, b in zip(inferred.logits, masked.logits):
        assert torch.equal(a, b)
    assert not bool(((li["input_ids"] == tm.PAD_ID) & (li["attention_mask"] == 1)).any())
    # A pad id that is also the end-of-sequence id is not inferred (Hugging Face: all ones).
    with earlytom_ext.apply(model, CFG) as h:
        model.generate(**no_mask, max_new_tokens=1, do_sample=False, eos_token_id=tm.PAD_ID)
        assert bool(h.last_inputs["attention_mask"].all())


def test_generate_streamer_sees_the_original_prompt(model, short_inputs):
    one = {k: v[1:] for k, v in short_inputs.items()}

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    rec = Recorder()
    with earlytom_ext.apply(model, CFG):
        out = model.generate(**one, max_new_tokens=3, do_sample=False, streamer=rec)
    L = one["input_ids"].shape[1]
    assert torch.equal(rec.puts[0].reshape(1, -1), one["input_ids"])
    assert torch.equal(torch.cat([p.reshape(-1) for p in rec.puts[1:]]), out[0, L:])
    assert rec.ended
    # Several returned sequences: the prompt is streamed once per sequence, as Hugging Face does.
    rec = Recorder()
    with earlytom_ext.apply(model, CFG):
        model.generate(**one, max_new_tokens=2, do_sample=True, num_return_sequences=3, streamer=rec)
    assert torch.equal(rec.puts[0], one["input_ids"].repeat_interleave(3, dim=0))


def test_generate_beams_and_return_sequences_line_up(model, short_inputs):
    inputs = short_inputs
    L = inputs["input_ids"].shape[1]
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=3, num_return_sequences=2, return_dict_in_generate=True)
    with earlytom_ext.apply(model, CFG) as h:
        out = model.generate(**inputs, **kw)
        prep = h.prepare_inputs(inputs["input_ids"], inputs["pixel_values_videos"], inputs["attention_mask"])
        # The same generation on the compressed inputs, by hand (no pixel_values_videos: passes through).
        direct = model.generate(
            input_ids=prep["input_ids"],
            inputs_embeds=prep["inputs_embeds"],
            attention_mask=prep["attention_mask"],
            **kw,
        )
    L2 = prep["input_ids"].shape[1]
    assert out.sequences.shape == (4, L + 3)
    assert torch.equal(out.sequences[:, :L], inputs["input_ids"].repeat_interleave(2, dim=0))
    assert torch.equal(out.sequences[:, L:], direct.sequences[:, L2:])
    torch.testing.assert_close(out.sequences_scores, direct.sequences_scores)


CACHE_NAMES = tm.cache_names()


@pytest.mark.parametrize("name", CACHE_NAMES)
def test_cache_argument(model, short_inputs, name):
    import contextlib

    from transformers import DynamicCache

    inputs = short_inputs
    legacy = name != CACHE_NAMES[0]

    def renamed():  # transformers' own warning for the old name (the caller's choice here)
        return pytest.warns(FutureWarning, match="past_key_values") if legacy else contextlib.nullcontext()

    with earlytom_ext.apply(model, CFG) as h:
        with torch.no_grad():
            plain = model(**inputs).logits
            cache = DynamicCache()
            with renamed():
                cached = model(**inputs, use_cache=True, **{name: cache}).logits  # an empty cache: prefill
        L2 = h.last_inputs["input_ids"].shape[1]
        assert cache.get_seq_length() == L2
        _close(cached, plain, tol=1e-5)
        # A cache that already holds tokens cannot line up with the compressed prompt, under either name.
        with pytest.raises(ValueError, match=f"^{name} must be empty"):
            model.generate(**inputs, max_new_tokens=2, **{name: cache})
        with pytest.raises(ValueError, match=f"^{name} must be empty"):
            model(**inputs, **{name: cache})
        # Decoding on from the prefill with the compressed attention mask.
        step = torch.full((2, 1), 5)
        am = torch.cat([h.last_inputs["attention_mask"], torch.ones_like(step)], dim=1)
        with torch.no_grad():
            with renamed():
                nxt = model(input_ids=step, attention_mask=am, **{name: cache}).logits
            full = model(
                input_ids=torch.cat([inputs["input_ids"], step], 1),
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(step)], 1),
                pixel_values_videos=inputs["pixel_values_videos"],
            ).logits
    _close(nxt[:, -1], full[:, -1], tol=2e-4)


def test_feature_layer_list(videos):
    m = tm.build_model(seed=5, vision_feature_layer=[-2, -1])
    inputs = tm.make_inputs([videos[1][:2]], seed=17)
    with torch.no_grad():
        base = m(**inputs).logits
    # hidden_states[-2] is the output of layer 4: the last prune layer may be 4, not 5.
    with earlytom_ext.apply(m, IDENTITY):
        with torch.no_grad():
            logits = m(**inputs).logits
    _close(logits, base, tol=1e-5)
    with pytest.raises(ValueError, match="prune"):
        earlytom_ext.apply(m, IDENTITY.replace(prune_layers=(1, 5)))


def test_exception_inside_the_tower_resets_state(model, videos):
    pix = videos[1][None, :3]
    img = tm.make_image(seed=1)[None]
    sizes = torch.tensor([[img.shape[-2], img.shape[-1]]])

    def image_features():
        with torch.no_grad():
            out = model.model.get_image_features(
                pixel_values=img,
                image_sizes=sizes,
                vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            )
        return torch.cat(list(getattr(out, "pooler_output", out)))

    base_img = image_features()
    with earlytom_ext.apply(model, CFG) as h:
        before = h.encode_videos(pix)

        def boom(*args, **kwargs):
            raise RuntimeError("boom")

        h.force_decisions(stage1=boom)
        with pytest.raises(RuntimeError, match="boom"):
            h.encode_videos(pix)
        h.force_decisions()
        assert torch.equal(image_features(), base_img)  # no run left armed
        after = h.encode_videos(pix)
    assert torch.equal(before[0], after[0])


def test_pixel_geometry_checked(model, videos):
    with earlytom_ext.apply(model, CFG) as h:
        good = videos[1][None, :2]
        with pytest.raises(ValueError, match=r"pixel_values_videos.*384"):
            h.encode_videos(good[..., :224, :224])
        with pytest.raises(ValueError, match=r"pixel_values_videos.*3"):
            h.encode_videos(good[:, :, :1])
