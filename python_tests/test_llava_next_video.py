"""earlytom_ext.apply on tiny random Hugging Face LLaVA-NeXT-Video models (transformers 4.57.x / 5.x).

The compressed tokens are checked against the reference pipeline run by hand on the same model:
CLIP embeddings, every encoder layer one at a time, Stage I / score / refined segmentation / Stage
II from earlytom_ext.reference, the model's own resampler and projector, and the scores pooled by
hand (the mean, or the maximum, of each 2x2 window). The identity configuration must give the
unpatched model's logits and generated tokens bit for bit.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "LlavaNextVideoForConditionalGeneration"):
    pytest.skip("this transformers has no LlavaNextVideoForConditionalGeneration", allow_module_level=True)

import llava_video_checks as checks  # noqa: E402
from llava_video_checks import SIZE, TOL, needs_cuda  # noqa: E402
from tiny_models import check_compiled_model, vision_layers  # noqa: E402
from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration  # noqa: E402

import earlytom_ext  # noqa: E402
from earlytom_ext import EarlyTomConfig  # noqa: E402
from earlytom_ext.integration.adapters.llava_next_video import (  # noqa: E402
    LLAVA_NEXT_VIDEO_PRUNE_LAYERS,
    LlavaNextVideoAdapter,
)
from earlytom_ext.tiny_model import make_video  # noqa: E402

# an 8x8 patch grid (+ the class token) -> 4x4 = 16 tokens per frame after the resampler
GRID, P = 8, 16
T = 8
# 6 CLIP layers; the features come from the second-to-last (layer 4), so the last prune layer is 4 at most.
CFG = EarlyTomConfig(retain_ratio=0.3, tau=0.5, max_window=6, ema=0.9, prune_layers=(1, 3, 4))
IDENTITY = EarlyTomConfig(retain_ratio=1.0, tau=-1.0, max_window=2, prune_layers=(1, 2))


def build_model(seed=0, dtype=torch.float32, depth=6, pool_mode="average", attn="sdpa", **config):
    return checks.build_tiny(
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoConfig,
        seed,
        dtype,
        depth,
        attn,
        spatial_pool_mode=pool_mode,
        image_grid_pinpoints=[[SIZE, SIZE]],
        **config,
    )


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


def pool_scores(scores, mode):
    """Each 2x2 window of the 8x8 grid -> its mean ('average', 'conv') or maximum ('max'), raster order."""
    n = scores.shape[0]
    w = scores.float().reshape(n, GRID // 2, 2, GRID // 2, 2)
    out = w.amax(dim=(2, 4)) if mode == "max" else w.mean(dim=(2, 4))
    return out.reshape(n, P)


def reference_video(model, video, cfg):
    def to_llm(hidden, scores):
        feats, scores = hidden[:, 1:], scores[:, 1:]  # 'default': no class token
        tokens = model.model.multi_modal_projector(model.model.vision_resampler(feats))
        return tokens, pool_scores(scores, model.config.spatial_pool_mode)

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


@pytest.mark.parametrize("mode", ["max", "conv"])
def test_other_pooling_modes(videos, mode):
    m = build_model(pool_mode=mode)
    check_against_reference(m, videos)
    x = make_inputs(videos)
    with torch.no_grad():
        want = m(**x).logits
        with earlytom_ext.apply(m, IDENTITY):
            assert torch.equal(m(**x).logits, want)


def test_scores_pooled_by_the_mode_hand_written():
    # One frame of scores on the 8x8 grid: window (0, 0) holds 1, 2, 3, 6; the rest are zeros.
    s = torch.zeros(1, GRID * GRID)
    s[0, [0, 1, GRID, GRID + 1]] = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert pool_scores(s, "average")[0, 0] == 3.0 and pool_scores(s, "max")[0, 0] == 6.0
    from earlytom_ext.integration.run import Clock

    for mode, want in (("average", 3.0), ("max", 6.0), ("conv", 3.0)):
        adapter = earlytom_ext.integration.adapters.adapter_for(build_model(pool_mode=mode))
        feats = torch.zeros(1, GRID * GRID, 32)
        _, pooled = adapter.to_llm(feats, s, Clock(torch.device("cpu")), 0.0)
        assert pooled.shape == (1, P) and pooled.dtype == torch.float32
        assert pooled[0, 0] == want and torch.count_nonzero(pooled) == 1


def test_generate_returns_the_prompt_with_beams(model, videos):
    checks.check_beams(model, CFG, make_inputs(videos), T * P)


def test_cache_continuation(model, videos):
    checks.check_cache_continuation(model, CFG, make_inputs(videos[:1]))


def test_an_image_sample_next_to_a_video_sample(model, videos):
    image = make_video(1, seed=7, kind="static", image_size=SIZE)[0]
    pixel_values = torch.stack([image, image])[None]  # anyres: the base view and one 16x16 tile
    image_sizes = torch.tensor([[SIZE, SIZE]])
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values, image_sizes)
    feats = getattr(feats, "pooler_output", feats)
    n_img = sum(f.shape[0] for f in feats)
    x = make_inputs(videos, image_tokens=[n_img, 0])
    x.update(pixel_values=pixel_values, image_sizes=image_sizes)
    checks.check_image_next_to_video(model, x, IDENTITY, CFG, T * P)


def test_remove_restores_the_model(model, videos):
    x = make_inputs(videos)
    vm, _ = vision_layers(model)
    hooks = lambda: [list(layer._forward_hooks.values()) for layer in vm.encoder.layers]  # noqa: E731
    with torch.no_grad():
        want = model(**x).logits
        before = hooks()  # transformers 5.x adds its own on the first call
        h = earlytom_ext.apply(model, CFG)
        assert model(**x).logits.shape[1] < want.shape[1]
        assert hooks() != before
        h.remove()
        assert hooks() == before
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
    # The paper's (6, 21, 23) of 26 at 25 / 80 / 88 % of the layers that feed the features.
    assert LLAVA_NEXT_VIDEO_PRUNE_LAYERS == (6, 18, 20)
    with earlytom_ext.apply(build_model(depth=24)) as h:
        assert h.config.prune_layers == (6, 18, 20)
    with earlytom_ext.apply(build_model(depth=6)) as h:  # features from layer 4: 5 layers
        assert h.config.prune_layers == (1, 4)
    # A config or preset without prune layers gets the family's; its other settings stay.
    videomme = earlytom_ext.preset("videomme", 0.1).replace(prune_layers=None)
    with earlytom_ext.apply(build_model(depth=24), videomme) as h:
        assert (h.config.prune_layers, h.config.tau, h.config.max_window) == ((6, 18, 20), 0.3, 6)
    with earlytom_ext.apply(build_model(depth=24), EarlyTomConfig(retain_ratio=0.25)) as h:
        assert (h.config.prune_layers, h.config.retain_ratio) == ((6, 18, 20), 0.25)


def test_errors(model, videos):
    x = make_inputs(videos)
    strategy = (dict(x, vision_feature_select_strategy="full"), ValueError, "'full' keeps the encoder's class")
    checks.check_errors(model, build_model, CFG, x, LlavaNextVideoAdapter, {"strategy": strategy})


def test_video_path_reads_no_tensor_values_on_the_host(model, videos, monkeypatch):
    checks.check_no_host_reads(
        model, CFG, make_inputs(videos), videos, monkeypatch, ("llava_onevision.py", "llava_next_video.py")
    )


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_host_syncs_at_most_one_per_prune_layer(tmp_path):
    checks.check_cuda_syncs("test_llava_next_video", CFG, tmp_path)


@needs_cuda
def test_cuda_equals_cpu(videos):
    checks.check_cuda_equals_cpu(build_model(), videos, CFG)
