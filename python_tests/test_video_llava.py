"""earlytom_ext.apply on tiny random Hugging Face Video-LLaVA models (transformers 4.57.x / 5.x).

The compressed tokens are checked against the reference pipeline run by hand on the same model:
the video tower's CLIP embeddings, every encoder layer one at a time, Stage I / score / refined
segmentation / Stage II from earlytom_ext.reference, the model's own projector; a frame keeps its
class token (first position) and the scores are the attention each token receives, unpooled. The
identity configuration must give the unpatched model's logits and generated tokens bit for bit.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "VideoLlavaForConditionalGeneration"):
    pytest.skip("this transformers has no VideoLlavaForConditionalGeneration", allow_module_level=True)

from test_llm_merge import Oracle, _sharpen, unpad  # noqa: E402
from tiny_models import (  # noqa: E402
    call_layer,
    call_syncs,
    check_compiled_model,
    layer_qk,
    spy_host_reads,
    vision_layers,
)
from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration  # noqa: E402

import earlytom_ext  # noqa: E402
from earlytom_ext import EarlyTomConfig  # noqa: E402
from earlytom_ext import reference as R  # noqa: E402
from earlytom_ext._ext import has_cuda_kernels  # noqa: E402
from earlytom_ext.integration.adapters.video_llava import VIDEO_LLAVA_PRUNE_LAYERS  # noqa: E402
from earlytom_ext.tiny_model import make_video  # noqa: E402

VID, IMG = 120, 121
SIZE, PATCH = 16, 2  # an 8x8 patch grid and the class token: 65 tokens per frame, all of them to the LLM
P = 65
T = 8
# 6 CLIP layers; the features come from the second-to-last (layer 4), so the last prune layer is 4 at most.
CFG = EarlyTomConfig(retain_ratio=0.3, tau=0.5, max_window=6, ema=0.9, prune_layers=(1, 3, 4))
IDENTITY = EarlyTomConfig(retain_ratio=1.0, tau=-1.0, max_window=2, prune_layers=(1, 2))
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not has_cuda_kernels(), reason="needs a CUDA device and the CUDA kernels"
)


def build_model(seed=0, dtype=torch.float32, depth=6, attn="sdpa", **config):
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
    cfg = VideoLlavaConfig(
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
    m = VideoLlavaForConditionalGeneration(cfg).to(dtype).eval()
    m.generation_config.pad_token_id = 0
    return m


def make_inputs(videos, seed=0, padding_side="left", image_tokens=None):
    """Prompts ``text, video placeholders, text`` (sample b has b extra text tokens); where
    ``image_tokens[b]`` is set, sample b has that many image placeholders and no video."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, v in enumerate(videos):
        row = torch.randint(3, 100, (2 + b,), generator=g).tolist()
        if image_tokens is not None and image_tokens[b]:
            row += [IMG] * image_tokens[b]
        else:
            row += [VID] * (v.shape[0] * P)
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


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def videos():
    # A crossfade (merges at the later prune layers) and a static shot (merges at every one).
    return [
        make_video(T, seed=5, kind="crossfade", scene_length=3, image_size=SIZE),
        make_video(T, seed=2, kind="static", image_size=SIZE),
    ]


@pytest.fixture(autouse=True)
def _no_leftover(model):
    yield
    h = model.__dict__.get("_earlytom_handle")
    if h is not None:
        h.remove()


@torch.no_grad()
def reference_video(model, video, cfg):
    """``(tokens, index, segments, frames after each prune layer, r')`` of one video ``[T, 3, H, W]``."""
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
    tokens = model.model.multi_modal_projector(hidden)  # every token, the class token first
    r_adj = R.adjusted_ratio(cfg.retain_ratio, video.shape[0], tokens.shape[0], P=P)
    kept, index = R.select_tokens(tokens, scores.float(), segs, r_adj)
    return kept, index, [tuple(s) for s in segs], counts, r_adj


def check_against_reference(model, videos, cfg=CFG, tol=1e-4):
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
        assert st["tokens_before"] == v.shape[0] * P and st["tokens_after"] == tokens.shape[0]  # nothing appended
        assert feats[b].dtype == model.dtype
        torch.testing.assert_close(feats[b].float(), tokens.float(), atol=tol, rtol=tol)
    return stats


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_identity_config_equals_the_unpatched_model(model, videos, padding_side):
    x = make_inputs(videos, padding_side=padding_side)
    with torch.no_grad():
        logits = model(**x).logits
        seqs = model.generate(**x, max_new_tokens=4, do_sample=False)
        with earlytom_ext.apply(model, IDENTITY) as h:
            got = model(**x).logits
            got_seqs = model.generate(**x, max_new_tokens=4, do_sample=False)
        assert [v["tokens_after"] for v in h.last_stats["videos"]] == [T * P] * 2
    assert torch.equal(got, logits)
    assert torch.equal(got_seqs, seqs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kept_tokens_equal_the_reference(videos, dtype):
    m = build_model(dtype=dtype)
    stats = check_against_reference(m, videos, tol=TOL[dtype])
    frames = [[v["frames_after"][p] for p in CFG.prune_layers] for v in stats["videos"]]
    assert any(f[-1] < f[0] for f in frames), f"the videos should merge after the first prune layer too: {frames}"
    assert stats["videos"][1]["frames_after"][4] < T


def test_eager_attention(videos):
    # Q and K come from the projections, whatever attention implementation the tower runs.
    m = build_model(attn="eager")
    check_against_reference(m, videos)
    x = make_inputs(videos)
    with torch.no_grad():
        want = m(**x).logits
        with earlytom_ext.apply(m, IDENTITY):
            assert torch.equal(m(**x).logits, want)


def test_odd_frame_counts_and_one_frame(model):
    for frames in (1, 3):
        clip = [make_video(frames, seed=11, kind="crossfade", scene_length=2, image_size=SIZE)]
        stats = check_against_reference(model, clip * 2)
        assert all(v["frames_after"][4] <= frames for v in stats["videos"])


def test_the_class_token_is_a_position_of_its_frame(model, videos):
    # One frame, r = 1/65: Stage II keeps exactly one token, the one with the highest score. A
    # class token made to receive all attention (scores by hand) must be that token: position 0.
    adapter = earlytom_ext.integration.adapters.adapter_for(model)
    assert adapter.tokens_per_frame == P and adapter.pooled_tokens() == 8 * 8 + 1
    from earlytom_ext.integration.run import Clock

    feats = torch.randn(1, P, 32)
    scores = torch.zeros(1, P, dtype=torch.float16)
    scores[0, 0] = 1.0
    proj, got = adapter.to_llm(feats, scores, Clock(torch.device("cpu")), 0.0)
    assert got.dtype == torch.float32 and torch.equal(got, scores.float())  # no pooling, no rescaling
    torch.testing.assert_close(proj, model.model.multi_modal_projector(feats))
    kept, index = R.select_tokens(proj, got, [(0, 0)], 1 / P)
    assert index.tolist() == [[0, 0]]


def test_the_call_select_strategy_is_for_images(model, videos):
    # The model keeps the class token of video frames whatever the strategy; so does the adapter.
    x = make_inputs(videos)
    with torch.no_grad(), earlytom_ext.apply(model, CFG):
        want = model(**x).logits
        for strategy in ("full", "default"):
            assert torch.equal(model(**x, vision_feature_select_strategy=strategy).logits, want)
    with torch.no_grad():
        unpatched = model.model.get_video_features(x["pixel_values_videos"], vision_feature_layer=-2)
    assert getattr(unpatched, "pooler_output", unpatched[0]).shape[1] == P


def test_generate_returns_the_prompt_with_beams(model, videos):
    x = make_inputs(videos)
    L = x["input_ids"].shape[1]
    with earlytom_ext.apply(model, CFG) as h, torch.no_grad():
        out = model.generate(**x, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2)
        n_after = [v["tokens_after"] for v in h.last_stats["videos"]]
        compressed = h.last_inputs["input_ids"]
    assert out.shape == (4, L + 3)
    assert torch.equal(out[:, :L], x["input_ids"].repeat_interleave(2, dim=0))
    assert all(n < T * P for n in n_after)
    assert [int((row == VID).sum()) for row in compressed] == n_after


def test_an_image_sample_next_to_a_video_sample(model, videos):
    # Images go through the model's image tower, which EarlyTom never touches.
    image = make_video(1, seed=7, kind="static", image_size=SIZE)
    with torch.no_grad():
        feats = model.model.get_image_features(image, vision_feature_layer=-2, vision_feature_select_strategy="default")
    feats = getattr(feats, "pooler_output", feats)
    feats = feats[0] if isinstance(feats, (tuple, list)) else feats
    n_img = feats.reshape(-1, feats.shape[-1]).shape[0]
    x = make_inputs(videos, image_tokens=[n_img, 0])
    x.update(pixel_values_images=image)
    with torch.no_grad():
        want = model(**x).logits
        want_seqs = model.generate(**x, max_new_tokens=3, do_sample=False)
        with earlytom_ext.apply(model, IDENTITY) as h:
            assert torch.equal(model(**x).logits, want)
            assert len(h.last_stats["videos"]) == 1
            assert torch.equal(model.generate(**x, max_new_tokens=3, do_sample=False), want_seqs)
        with earlytom_ext.apply(model, CFG) as h:
            got = model(**x).logits
            assert h.last_stats["videos"][0]["tokens_after"] < T * P
    # Sample 0 (the image, left of the shortened video prompt) is unchanged by the compression.
    n0 = int(x["attention_mask"][0].sum())
    torch.testing.assert_close(got[0, -n0:], want[0, -n0:], rtol=1e-5, atol=1e-5)


def test_remove_restores_the_model(model, videos):
    x = make_inputs(videos)
    vm, _ = vision_layers(model)
    image_tower = model.model.image_tower
    image_vm = getattr(image_tower, "vision_model", image_tower)
    hooks = lambda m: [list(layer._forward_hooks.values()) for layer in m.encoder.layers]  # noqa: E731
    with torch.no_grad():
        want = model(**x).logits
        before, image_before = hooks(vm), hooks(image_vm)  # transformers 5.x adds its own on the first call
        h = earlytom_ext.apply(model, CFG)
        assert model(**x).logits.shape[1] < want.shape[1]
        assert hooks(vm) != before and hooks(image_vm) == image_before
        h.remove()
        assert hooks(vm) == before
        assert torch.equal(model(**x).logits, want)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__


def test_compiled_model(model, videos):
    calls = [make_inputs(videos), make_inputs(videos[:1], seed=3)]
    check_compiled_model(model, CFG, calls, calls[0])


def test_llm_merge_generates_like_the_recomputation(videos):
    m = build_model(seed=1)
    _sharpen(m)
    k, ratio, new = 1, 0.5, 4
    cfg = CFG.replace(llm_merge_layer=k, llm_merge_ratio=ratio)
    x = make_inputs(videos, seed=2)
    with earlytom_ext.apply(m, CFG) as plain:
        prep = plain.prepare_inputs(x["input_ids"], x["pixel_values_videos"], attention_mask=x["attention_mask"])
    with earlytom_ext.apply(m, cfg) as h, torch.no_grad():
        out = m.generate(**x, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
        merge_stats = h.last_stats["llm_merge"]
    oracle = Oracle(m, k, ratio)
    L0 = x["input_ids"].shape[1]
    for b in range(2):
        (span,) = prep["video_spans"][b]
        assert merge_stats[b]["span"] == tuple(span)
        assert len(merge_stats[b]["kept"]) == max(1, round(span[1] * (1 - ratio)))
        e, sp = unpad(prep["inputs_embeds"], prep["attention_mask"], b, tuple(span))
        want = oracle.logits(e, sp, out.sequences[b, L0:])
        torch.testing.assert_close(torch.stack([s[b] for s in out.logits]), want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Configuration and errors
# --------------------------------------------------------------------------------------------
def test_default_prune_layers():
    # The paper's (6, 21, 23) of 26 at 25 / 80 / 88 % of the 23 layers that feed the features.
    assert VIDEO_LLAVA_PRUNE_LAYERS == (6, 18, 20)
    with earlytom_ext.apply(build_model(depth=24)) as h:
        assert h.config.prune_layers == (6, 18, 20)
        assert h.adapter.family == "Video-LLaVA"
    with earlytom_ext.apply(build_model(depth=6)) as h:  # features from layer 4: 5 layers
        assert h.config.prune_layers == (1, 4)
    videomme = earlytom_ext.preset("videomme", 0.1).replace(prune_layers=None)
    with earlytom_ext.apply(build_model(depth=24), videomme) as h:
        assert (h.config.prune_layers, h.config.tau, h.config.max_window) == ((6, 18, 20), 0.3, 6)


def test_errors(model, videos):
    needle = r"vision_feature_layer -2 selects encoder layer 4, before the last prune layer 5.*e\.g\. to \(1, 4\)"
    with pytest.raises(ValueError, match=needle):
        earlytom_ext.apply(model, CFG.replace(prune_layers=(1, 5)))
    with pytest.raises(ValueError, match=r"last prune layer 23.*e\.g\. to \(6, 18, 20\)"):
        earlytom_ext.apply(build_model(depth=24), earlytom_ext.preset("videomme", 0.1))
    x = make_inputs(videos)
    short = x["input_ids"].clone()
    short[1, int((short[1] == VID).nonzero()[0])] = 5  # one video placeholder fewer in sample 1
    vfl = r"vision_feature_layer must be an int or a non-empty list of ints in \[-7, 6\], got "
    calls = {
        "frame size": (dict(x, pixel_values_videos=x["pixel_values_videos"][..., :8, :8]), ValueError, "image_size"),
        "dims": (dict(x, pixel_values_videos=x["pixel_values_videos"][0]), ValueError, "5 dimensions"),
        "integers": (dict(x, pixel_values_videos=x["pixel_values_videos"].long()), TypeError, "floating-point"),
        "placeholders": (dict(x, input_ids=short), ValueError, "placeholder"),
        "layer float": (dict(x, vision_feature_layer=-2.0), ValueError, vfl + "-2.0"),
        "layer early": (dict(x, vision_feature_layer=2), ValueError, r"layer 1, .*e\.g\. to \(0, 1\)"),
        "projector": (dict(x, vision_feature_layer=[-2, -1]), ValueError, "64 channels, but the model's projector"),
    }
    with earlytom_ext.apply(model, CFG) as h:
        for name, (call, exc, needle) in calls.items():
            with pytest.raises(exc, match=needle), torch.no_grad():
                model(**call)
            assert h.last_stats is None, name  # refused before the vision encoder ran
    embedding = build_model()
    embedding.config.vision_feature_layer = 0
    with pytest.raises(ValueError, match="config.vision_feature_layer 0 selects the embedding output"):
        earlytom_ext.apply(embedding)
    with pytest.raises(TypeError, match="VideoLlavaForConditionalGeneration .*got VideoLlavaModel"):
        earlytom_ext.integration.adapters.video_llava.VideoLlavaAdapter(model.model)


def test_video_path_reads_no_tensor_values_on_the_host(model, videos, monkeypatch):
    # The integration's own files read nothing from tensors on this path (on a GPU each read syncs).
    files = ("core.py", "run.py", "wrappers.py", "base.py", "llava_onevision.py", "video_llava.py")
    reads = spy_host_reads(monkeypatch, files)
    x = make_inputs(videos)
    with earlytom_ext.apply(model, CFG) as h:
        with torch.no_grad():
            model(**x)
        model.generate(**x, max_new_tokens=2)
        h.encode_videos(torch.stack(videos))
    monkeypatch.undo()
    assert reads == []


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------
_SYNC_SETUP = """
import earlytom_ext
from test_video_llava import CFG, SIZE, T, build_model, make_inputs
from earlytom_ext.tiny_model import make_video

videos = [make_video(T, seed=5, kind="crossfade", scene_length=3, image_size=SIZE),
          make_video(T, seed=2, kind="static", image_size=SIZE)]
m = build_model().cuda()
x = {k: v.cuda() for k, v in make_inputs(videos).items()}
h = earlytom_ext.apply(m, CFG)
"""


@needs_cuda
def test_cuda_host_syncs_at_most_one_per_prune_layer(tmp_path):
    call = 'h.prepare_inputs(x["input_ids"], x["pixel_values_videos"], attention_mask=x["attention_mask"])'
    syncs = call_syncs(_SYNC_SETUP, call, tmp_path)
    assert 1 <= len(syncs) <= len(CFG.prune_layers), "\n".join(syncs)


@needs_cuda
def test_cuda_equals_cpu(videos):
    m = build_model()
    with earlytom_ext.apply(m, CFG) as h:
        want = h.encode_videos(torch.stack(videos))
        want_stats = h.last_stats["videos"]
    m = m.cuda()
    with earlytom_ext.apply(m, CFG) as h:
        got = h.encode_videos(torch.stack(videos).cuda())
        stats = h.last_stats["videos"]
    for b in range(2):
        assert stats[b]["kept"] == want_stats[b]["kept"] and stats[b]["segments"] == want_stats[b]["segments"]
        torch.testing.assert_close(got[b].cpu(), want[b], rtol=1e-4, atol=1e-4)
