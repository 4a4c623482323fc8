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

import llava_video_checks as checks  # noqa: E402
from llava_video_checks import SIZE, TOL, needs_cuda  # noqa: E402
from tiny_models import check_compiled_model, vision_layers  # noqa: E402
from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration  # noqa: E402

import earlytom_ext  # noqa: E402
from earlytom_ext import EarlyTomConfig  # noqa: E402
from earlytom_ext import reference as R  # noqa: E402
from earlytom_ext.integration.adapters.video_llava import VIDEO_LLAVA_PRUNE_LAYERS, VideoLlavaAdapter  # noqa: E402
from earlytom_ext.tiny_model import make_video  # noqa: E402

# the 8x8 patch grid and the class token: 65 tokens per frame, all of them to the LLM
P = 65
T = 8
# 6 CLIP layers; the features come from the second-to-last (layer 4), so the last prune layer is 4 at most.
CFG = EarlyTomConfig(retain_ratio=0.3, tau=0.5, max_window=6, ema=0.9, prune_layers=(1, 3, 4))
IDENTITY = EarlyTomConfig(retain_ratio=1.0, tau=-1.0, max_window=2, prune_layers=(1, 2))


def build_model(seed=0, dtype=torch.float32, depth=6, attn="sdpa", **config):
    return checks.build_tiny(VideoLlavaForConditionalGeneration, VideoLlavaConfig, seed, dtype, depth, attn, **config)


def make_inputs(videos, seed=0, padding_side="left", image_tokens=None):
    return checks.prompt_inputs(videos, P, seed, padding_side, image_tokens)


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def videos():
    return checks.sample_videos(T)


@pytest.fixture(autouse=True)
def _no_leftover(model):
    yield
    h = model.__dict__.get("_earlytom_handle")
    if h is not None:
        h.remove()


def reference_video(model, video, cfg):
    def to_llm(hidden, scores):  # every token, the class token first; the scores as they are
        return model.model.multi_modal_projector(hidden), scores.float()

    return checks.reference_video(model, video, cfg, to_llm, P)


def check_against_reference(model, videos, cfg=CFG, tol=1e-4):
    return checks.check_against_reference(model, videos, cfg, reference_video, P, tol)


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_identity_config_equals_the_unpatched_model(model, videos, padding_side):
    checks.check_identity(model, make_inputs(videos, padding_side=padding_side), IDENTITY, T * P)


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
    checks.check_beams(model, CFG, make_inputs(videos), T * P)


def test_cache_continuation(model, videos):
    checks.check_cache_continuation(model, CFG, make_inputs(videos[:1]))


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
    checks.check_image_next_to_video(model, x, IDENTITY, CFG, T * P)


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
    checks.check_llm_merge(build_model(seed=1), CFG, make_inputs(videos, seed=2))


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
    # MVBench's (8, 14, 20) fit CLIP's 23 feature layers: accepted, with a warning naming the family's.
    with pytest.warns(UserWarning, match=r"\(8, 14, 20\) are a paper preset's.*Video-LLaVA's own are \(6, 18, 20\)"):
        earlytom_ext.apply(build_model(depth=24), earlytom_ext.preset("mvbench", 0.1)).remove()


def test_errors(model, videos):
    checks.check_errors(model, build_model, CFG, make_inputs(videos), VideoLlavaAdapter)


def test_video_path_reads_no_tensor_values_on_the_host(model, videos, monkeypatch):
    checks.check_no_host_reads(
        model, CFG, make_inputs(videos), videos, monkeypatch, ("llava_onevision.py", "video_llava.py")
    )


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_host_syncs_at_most_one_per_prune_layer(tmp_path):
    checks.check_cuda_syncs("test_video_llava", CFG, tmp_path)


@needs_cuda
def test_cuda_equals_cpu(videos):
    checks.check_cuda_equals_cpu(build_model(), videos, CFG)
