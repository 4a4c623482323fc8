"""Checks shared by the tests of the CLIP-based LLaVA video families (LLaVA-NeXT-Video, Video-LLaVA):
prompts built by hand, the kept tokens against a reference pipeline the test module runs by hand, and
the integration behaviours both families share. Each family's test module supplies its model builder,
its reference pipeline and its tokens per frame."""

import pytest
import torch
from test_llm_merge import Oracle, _sharpen, unpad
from tiny_models import cache_names, call_layer, call_syncs, layer_qk, spy_host_reads, vision_layers

import earlytom_ext
from earlytom_ext import reference as R
from earlytom_ext._ext import has_cuda_kernels
from earlytom_ext.tiny_model import make_video

VID, IMG = 120, 121


SIZE, PATCH = 16, 2  # an 8x8 patch grid and CLIP's class token
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not has_cuda_kernels(), reason="needs a CUDA device and the CUDA kernels"
)


def build_tiny(model_class, config_class, seed, dtype, depth, attn, **config):
    """A tiny random ``model_class``: CLIP (``depth`` layers, 16 px frames of 2 px patches, features
    from the second-to-last layer, 'default' select strategy) and a 2-layer Llama; eval mode."""
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=depth,
        num_attention_heads=2,
        image_size=SIZE,
        patch_size=PATCH,
        projection_dim=16,
    )
    text = dict(
        model_type="llama",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg = config_class(
        vision_config=vision,
        text_config=text,
        video_token_index=VID,
        image_token_index=IMG,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **config,
    )
    for c in (cfg, cfg.vision_config, cfg.text_config):
        c._attn_implementation = attn
    torch.manual_seed(seed)
    m = model_class(cfg).to(dtype).eval()
    m.generation_config.pad_token_id = 0
    return m


def sample_videos(frames):
    """A crossfade (merges at the later prune layers) and a static shot (merges at every one)."""
    return [
        make_video(frames, seed=5, kind="crossfade", scene_length=3, image_size=SIZE),
        make_video(frames, seed=2, kind="static", image_size=SIZE),
    ]


@torch.no_grad()
def reference_video(model, video, cfg, to_llm, per_frame):
    """``(tokens, index, segments, frames after each prune layer, r')`` of one video ``[T, 3, H, W]``:
    the CLIP embeddings, every encoder layer up to the feature layer (-2) one at a time with Stage I,
    the score and the refined segmentation from ``earlytom_ext.reference``, then ``to_llm(hidden,
    scores) -> (tokens, scores)`` (the family's step to the LLM's side) and Stage II."""
    vm, layers = vision_layers(model)
    hidden = vm.pre_layrnorm(vm.embeddings(video.to(dtype=model.dtype)))
    last = cfg.prune_layers[-1]
    scores, segs, counts = None, None, []
    for i, layer in enumerate(layers[: len(layers) - 1]):  # vision_feature_layer -2: all but the last
        if i == last:
            scores = R.attention_received(*layer_qk(layer, hidden))
        hidden = call_layer(layer, hidden)
        if i in cfg.prune_layers:
            plan = R.merge_plan(hidden, cfg)[0]
            hidden = R.apply_plan(hidden, plan)
            if i == last:
                scores = R.apply_plan(scores, plan)
                segs = R.segment(hidden, cfg)
            counts.append(hidden.shape[0])
    tokens, scores = to_llm(hidden, scores)
    r_adj = R.adjusted_ratio(cfg.retain_ratio, video.shape[0], tokens.shape[0], P=per_frame)
    kept, index = R.select_tokens(tokens, scores, segs, r_adj)
    return kept, index, [tuple(s) for s in segs], counts, r_adj


def prompt_inputs(videos, per_frame, seed=0, padding_side="left", image_tokens=None):
    """Prompts ``text, video placeholders, text`` (sample b has b extra text tokens; ``per_frame``
    placeholders per frame); where ``image_tokens[b]`` is set, sample b has that many image
    placeholders and no video."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, v in enumerate(videos):
        row = torch.randint(3, 100, (2 + b,), generator=g).tolist()
        if image_tokens is not None and image_tokens[b]:
            row += [IMG] * image_tokens[b]
        else:
            row += [VID] * (v.shape[0] * per_frame)
        rows.append(row + torch.randint(3, 100, (3,), generator=g).tolist())
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    am = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        sl = slice(L - len(r), L) if padding_side == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(r)
        am[b, sl] = 1
    with_video = [v for b, v in enumerate(videos) if image_tokens is None or not image_tokens[b]]
    return dict(input_ids=ids, attention_mask=am, pixel_values_videos=torch.stack(with_video))


def check_against_reference(model, videos, cfg, reference_video, per_frame, tol=1e-4):
    """``apply(model, cfg).encode_videos`` equals ``reference_video(model, video, cfg)`` (``(tokens,
    index, segments, frames after each prune layer, r')``) for every video; returns the statistics."""
    with earlytom_ext.apply(model, cfg) as h:
        feats = h.encode_videos(torch.stack(videos))
        stats = h.last_stats
    for b, v in enumerate(videos):
        tokens, index, segs, counts, r_adj = reference_video(model, v, cfg)
        st = stats["videos"][b]
        assert st["segments"] == segs
        assert [st["frames_after"][p] for p in cfg.prune_layers] == counts
        assert st["kept"] == [tuple(x) for x in index.tolist()]
        assert st["ratio"] == r_adj
        assert (
            st["tokens_before"] == v.shape[0] * per_frame and st["tokens_after"] == tokens.shape[0]
        )  # nothing appended
        assert feats[b].dtype == model.dtype
        torch.testing.assert_close(feats[b].float(), tokens.float(), atol=tol, rtol=tol)
    return stats


def check_identity(model, x, identity, per_video):
    """Under the identity configuration, logits and greedy tokens equal the unpatched model's and every
    video keeps its ``per_video`` tokens."""
    with torch.no_grad():
        logits = model(**x).logits
        seqs = model.generate(**x, max_new_tokens=4, do_sample=False)
        with earlytom_ext.apply(model, identity) as h:
            got = model(**x).logits
            got_seqs = model.generate(**x, max_new_tokens=4, do_sample=False)
        assert [v["tokens_after"] for v in h.last_stats["videos"]] == [per_video] * x["input_ids"].shape[0]
    assert torch.equal(got, logits)
    assert torch.equal(got_seqs, seqs)


def check_beams(model, cfg, x, per_video):
    """``generate`` with beams returns the caller's prompt; the compressed prompt holds the kept counts."""
    L = x["input_ids"].shape[1]
    B = x["input_ids"].shape[0]
    with earlytom_ext.apply(model, cfg) as h, torch.no_grad():
        out = model.generate(**x, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
        videos = h.last_stats["videos"]
        compressed = h.last_inputs["input_ids"]
    assert out.shape == (2 * B, L + 3)
    assert torch.equal(out[:, :L], x["input_ids"].repeat_interleave(2, dim=0))
    assert all(v["tokens_after"] < per_video for v in videos)
    assert [int((row == VID).sum()) for row in compressed] == [v["tokens_after"] for v in videos]


def check_cache_continuation(model, cfg, x):
    """A follow-up ``generate`` on the returned sequences with the returned cache (one sample) continues
    the conversation: the compressed prompt stands in the cache."""
    name = cache_names()[0]
    with earlytom_ext.apply(model, cfg), torch.no_grad():
        out = model.generate(**x, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        follow = torch.cat([out.sequences, torch.tensor([[9, 10]])], dim=1)
        cache = out[name] if name in out else out["past_key_values"]
        more = model.generate(
            input_ids=follow, attention_mask=torch.ones_like(follow), max_new_tokens=2, do_sample=False, **{name: cache}
        )
    assert more.shape == (1, follow.shape[1] + 2) and torch.equal(more[:, : follow.shape[1]], follow)


def check_image_next_to_video(model, x, identity, cfg, per_video):
    """Sample 0 holds an image, sample 1 a video: bit-identical under the identity configuration
    (forward and generate); compressed, sample 0's logits are unchanged."""
    with torch.no_grad():
        want = model(**x).logits
        want_seqs = model.generate(**x, max_new_tokens=3, do_sample=False)
        with earlytom_ext.apply(model, identity) as h:
            assert torch.equal(model(**x).logits, want)
            assert len(h.last_stats["videos"]) == 1
            assert torch.equal(model.generate(**x, max_new_tokens=3, do_sample=False), want_seqs)
        with earlytom_ext.apply(model, cfg) as h:
            got = model(**x).logits
            assert h.last_stats["videos"][0]["tokens_after"] < per_video
    # Sample 0 (the image, left of the shortened video prompt) is unchanged by the compression.
    n0 = int(x["attention_mask"][0].sum())
    torch.testing.assert_close(got[0, -n0:], want[0, -n0:], rtol=1e-5, atol=1e-5)


def check_llm_merge(model, cfg, x, k=1, ratio=0.5, new=4):
    """With the inner-LLM merge at layer ``k``, ``generate``'s logits equal the merge recomputed by
    hand (``test_llm_merge.Oracle``) on the compressed prompt."""
    _sharpen(model)
    merged = cfg.replace(llm_merge_layer=k, llm_merge_ratio=ratio)
    with earlytom_ext.apply(model, cfg) as plain:
        prep = plain.prepare_inputs(x["input_ids"], x["pixel_values_videos"], attention_mask=x["attention_mask"])
    with earlytom_ext.apply(model, merged) as h, torch.no_grad():
        out = model.generate(**x, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
        merge_stats = h.last_stats["llm_merge"]
    oracle = Oracle(model, k, ratio)
    L0 = x["input_ids"].shape[1]
    for b in range(x["input_ids"].shape[0]):
        (span,) = prep["video_spans"][b]
        assert merge_stats[b]["span"] == tuple(span)
        assert len(merge_stats[b]["kept"]) == max(1, round(span[1] * (1 - ratio)))
        e, sp = unpad(prep["inputs_embeds"], prep["attention_mask"], b, tuple(span))
        want = oracle.logits(e, sp, out.sequences[b, L0:])
        torch.testing.assert_close(torch.stack([s[b] for s in out.logits]), want, rtol=1e-4, atol=1e-4)


def check_no_host_reads(model, cfg, x, videos, monkeypatch, adapter_files):
    """The integration's own files (and ``adapter_files``) read nothing from tensors on the video path
    (on a GPU each read syncs)."""
    files = ("core.py", "run.py", "wrappers.py", "base.py", *adapter_files)
    reads = spy_host_reads(monkeypatch, files)
    with earlytom_ext.apply(model, cfg) as h:
        with torch.no_grad():
            model(**x)
        model.generate(**x, max_new_tokens=2)
        h.encode_videos(torch.stack(videos))
    monkeypatch.undo()
    assert reads == []


def check_errors(model, build_model, cfg, x, adapter_class, extra_calls=None):
    """The refusals both families share, each with the message that names the fix: prune layers after
    the feature layer, a preset's SigLIP layers on CLIP's 24, call arguments (before the encoder; plus
    ``extra_calls``), a feature layer at the embeddings, the adapter on the inner model. ``model``:
    6 CLIP layers, features from the second-to-last (layer 4); ``cfg`` prunes at (1, 3, 4)."""
    needle = r"vision_feature_layer -2 selects encoder layer 4, before the last prune layer 5.*e\.g\. to \(1, 4\)"
    with pytest.raises(ValueError, match=needle):
        earlytom_ext.apply(model, cfg.replace(prune_layers=(1, 5)))
    # The paper's presets are SigLIP's (26 layers): on CLIP's 24 the message names the family's layers.
    with pytest.raises(ValueError, match=r"last prune layer 23.*e\.g\. to \(6, 18, 20\)"):
        earlytom_ext.apply(build_model(depth=24), earlytom_ext.preset("videomme", 0.1))
    short = x["input_ids"].clone()
    short[1, int((short[1] == VID).nonzero()[0])] = 5  # one video placeholder fewer in sample 1
    pv = x["pixel_values_videos"]
    vfl = r"vision_feature_layer must be an int or a non-empty list of ints in \[-7, 6\], got "
    calls = {
        "frame size": (dict(x, pixel_values_videos=pv[..., :8, :8]), ValueError, "image_size"),
        "dims": (dict(x, pixel_values_videos=pv[0]), ValueError, "5 dimensions"),
        "integers": (dict(x, pixel_values_videos=pv.long()), TypeError, "floating-point"),
        "placeholders": (dict(x, input_ids=short), ValueError, "placeholder"),
        "layer float": (dict(x, vision_feature_layer=-2.0), ValueError, vfl + "-2.0"),
        "layer list empty": (dict(x, vision_feature_layer=[]), ValueError, vfl + r"\[\]"),
        "layer early": (dict(x, vision_feature_layer=2), ValueError, r"layer 1, .*e\.g\. to \(0, 1\)"),
        "projector": (dict(x, vision_feature_layer=[-2, -1]), ValueError, "64 channels, but the model's projector"),
        **(extra_calls or {}),
    }
    check_refused_before_the_encoder(model, cfg, calls)
    embedding = build_model()
    embedding.config.vision_feature_layer = 0
    with pytest.raises(ValueError, match="config.vision_feature_layer 0 selects the embedding output"):
        earlytom_ext.apply(embedding)
    name = adapter_class.model_class
    with pytest.raises(TypeError, match=f"{name} .*got {name.replace('ForConditionalGeneration', 'Model')}"):
        adapter_class(model.model)


def check_refused_before_the_encoder(model, cfg, calls):
    """Every call of ``calls`` (name -> (call kwargs, exception, message pattern)) raises before the
    vision encoder runs."""
    with earlytom_ext.apply(model, cfg) as h:
        for name, (call, exc, needle) in calls.items():
            with pytest.raises(exc, match=needle), torch.no_grad():
                model(**call)
            assert h.last_stats is None, name


_SYNC_SETUP = """
import earlytom_ext
from {module} import CFG, T, build_model, make_inputs
from llava_video_checks import sample_videos

videos = sample_videos(T)
m = build_model().cuda()
x = {{k: v.cuda() for k, v in make_inputs(videos).items()}}
h = earlytom_ext.apply(m, CFG)
"""


def check_cuda_syncs(module, cfg, tmp_path):
    """``prepare_inputs`` on CUDA (the test module ``module``'s model, two videos and config) syncs at
    most once per prune layer."""
    call = 'h.prepare_inputs(x["input_ids"], x["pixel_values_videos"], attention_mask=x["attention_mask"])'
    syncs = call_syncs(_SYNC_SETUP.format(module=module), call, tmp_path)
    assert 1 <= len(syncs) <= len(cfg.prune_layers), "\n".join(syncs)


def check_cuda_equals_cpu(model, videos, cfg):
    """The model moved to CUDA keeps the CPU run's decisions and (within fp32 tolerance) its tokens."""
    with earlytom_ext.apply(model, cfg) as h:
        want = h.encode_videos(torch.stack(videos))
        want_stats = h.last_stats["videos"]
    model = model.cuda()
    with earlytom_ext.apply(model, cfg) as h:
        got = h.encode_videos(torch.stack(videos).cuda())
        stats = h.last_stats["videos"]
    for b in range(len(videos)):
        assert stats[b]["kept"] == want_stats[b]["kept"] and stats[b]["segments"] == want_stats[b]["segments"]
        torch.testing.assert_close(got[b].cpu(), want[b], rtol=1e-4, atol=1e-4)
