"""Batched window attention for Qwen2.5-VL's vision encoder (and Qwen2-VL's, one window per temporal
group): the window grouping (expected values written by hand), ``fast_window_attention`` on an
uncompressed model (equal to the model's own per-window loop), its fallbacks and removal, and the
EarlyTom adapter's batched path."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from test_qwen2_5_vl import CFG, FAMILIES, build_model, make_inputs, patchify  # noqa: E402  (skips without Qwen2.5-VL)

import earlytom_ext  # noqa: E402
from earlytom_ext.integration import window_attention as W  # noqa: E402
from earlytom_ext.integration.adapters import qwen2_5_vl_vision as V  # noqa: E402
from earlytom_ext.integration.window_attention import WindowBatches, fast_window_attention  # noqa: E402
from earlytom_ext.tiny_model import make_video  # noqa: E402

CUDA = torch.cuda.is_available()


def _classes(b: WindowBatches):
    return [(None if i is None else i.tolist(), n, length) for i, n, length in b.classes]


# --------------------------------------------------------------------------------------------
# Window grouping
# --------------------------------------------------------------------------------------------
def test_one_length_needs_no_gather():
    assert _classes(WindowBatches([0, 3, 6, 9], "cpu")) == [(None, 3, 3)]
    assert _classes(WindowBatches([0, 7], "cpu")) == [(None, 1, 7)]
    assert _classes(WindowBatches([0, 2, 2, 4], "cpu")) == [(None, 2, 2)]  # an empty window is skipped


def test_lengths_grouped_by_hand():
    b = WindowBatches([0, 4, 8, 10, 12, 13], "cpu")
    assert b.total == 13
    assert _classes(b) == [
        ([0, 1, 2, 3, 4, 5, 6, 7], 2, 4),
        ([8, 9, 10, 11], 2, 2),
        ([12], 1, 1),
    ]


def test_tiled_groups_by_hand():
    # Two groups of 3 tokens, each split into windows of 2 and 1.
    b = WindowBatches.tiled([0, 2, 3], 2, 3, "cpu")
    assert b.total == 6
    assert _classes(b) == [([0, 1, 3, 4], 2, 2), ([2, 5], 2, 1)]
    assert _classes(WindowBatches.tiled([0, 4], 3, 4, "cpu")) == [(None, 3, 4)]


@pytest.mark.parametrize("bounds", [[], [1, 3], [0, 3, 2]])
def test_bad_bounds(bounds):
    with pytest.raises(ValueError, match="window bounds"):
        WindowBatches(bounds, "cpu")
    with pytest.raises(ValueError, match="window bounds must run from 0 to 3"):
        WindowBatches.tiled(bounds, 2, 3, "cpu")


def test_layout_must_cover_the_sequence():
    model = build_model()
    attn = model.model.visual.blocks[0].attn
    h = torch.randn(8, 32)
    pe = (torch.ones(8, 8), torch.zeros(8, 8))
    with pytest.raises(ValueError, match="covers 6 tokens, the hidden states hold 8"):
        W.window_attention(attn, h, WindowBatches([0, 3, 6], "cpu"), pe)


# --------------------------------------------------------------------------------------------
# fast_window_attention on an uncompressed model
# --------------------------------------------------------------------------------------------
def _vision(model, pix, grid):
    out = model.model.visual(pix, grid_thw=grid)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _pixels(sizes, dtype, device="cpu", frames=4):
    """Videos of ``(h, w)`` pixels (one grid per call: the model's visual forward takes several)."""
    pix, grids = [], []
    for i, (h, w) in enumerate(sizes):
        v = make_video(frames, seed=i + 1, kind="scenes", scene_length=2, image_size=max(h, w))[..., :h, :w]
        p, g = patchify(v.contiguous())
        pix.append(p)
        grids.append(g)
    return torch.cat(pix).to(device=device, dtype=dtype), torch.tensor(grids, device=device)


class _Spy:
    def __init__(self, monkeypatch):
        self.calls = 0
        self.built = 0
        attend, init = W.window_attention, WindowBatches.__init__

        def window_attention(*a, **k):
            self.calls += 1
            return attend(*a, **k)

        def built(obj, *a, **k):
            self.built += 1
            init(obj, *a, **k)

        monkeypatch.setattr(W, "window_attention", window_attention)
        monkeypatch.setattr(V, "window_attention", window_attention)  # the adapter's vision forward
        monkeypatch.setattr(WindowBatches, "__init__", built)


# (h, w) in pixels, patch 2, windows of 4x4 patches: 6x6 patches -> windows of 16, 8, 8, 4;
# 8x8 -> four of 16; 10x6 -> uneven rows and columns; 4x4 -> one window per group.
GRIDS = [[(12, 12)], [(16, 16)], [(20, 12)], [(8, 8)], [(12, 12), (16, 8)]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes", GRIDS, ids=lambda s: "+".join(f"{h}x{w}" for h, w in s))
def test_equals_the_models_window_loop(dtype, sizes, family, monkeypatch):
    model = build_model(dtype=dtype, family=family)
    pix, grid = _pixels(sizes, dtype)
    with torch.no_grad():
        expected = _vision(model, pix, grid)
        spy = _Spy(monkeypatch)
        with fast_window_attention(model):
            got = _vision(model, pix, grid)
    assert torch.equal(got, expected)  # CPU SDPA: per window the same arithmetic
    assert spy.calls == len(model.model.visual.blocks)
    # One host read per cu_seqlens tensor (Qwen2.5-VL: full and windowed; Qwen2-VL: one), not per block.
    assert spy.built == (2 if family == "qwen2_5_vl" else 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_inference_mode(family, monkeypatch):
    """Inference tensors have no version counter: the bounds cache keys them by identity."""
    model = build_model(family=family)
    pix, grid = _pixels([(12, 12), (16, 8)], torch.float32)
    with torch.inference_mode():
        expected = _vision(model, pix, grid)
        spy = _Spy(monkeypatch)
        with fast_window_attention(model):
            got = _vision(model, pix, grid)
    assert torch.equal(got, expected)
    assert spy.calls == len(model.model.visual.blocks) and spy.built == (2 if family == "qwen2_5_vl" else 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_falls_back_to_the_model(family, monkeypatch):
    pix, grid = _pixels([(12, 12)], torch.float32)
    for model in (build_model(attn_implementation="eager", family=family), build_model(family=family).train()):
        with torch.no_grad():
            expected = _vision(model, pix, grid)
            spy = _Spy(monkeypatch)
            with fast_window_attention(model):
                got = _vision(model, pix, grid)
        assert spy.calls == 0
        assert torch.equal(got, expected)


def test_handle_removes_and_refuses_twice():
    model = build_model()
    attns = [b.attn for b in model.model.visual.blocks]
    h = fast_window_attention(model)
    assert all("forward" in a.__dict__ for a in attns)
    with pytest.raises(RuntimeError, match="already applied"):
        fast_window_attention(model)
    h.remove()
    h.remove()  # idempotent
    assert not any("forward" in a.__dict__ for a in attns)
    assert "removed" in repr(h)
    with fast_window_attention(model):
        pass
    assert not any("forward" in a.__dict__ for a in attns)


def test_keeps_and_restores_an_earlier_instance_patch():
    model = build_model()
    attn = model.model.visual.blocks[0].attn
    seen = []
    original = attn.forward

    def earlier(*a, **k):
        seen.append(1)
        return original(*a, **k)

    attn.__dict__["forward"] = earlier
    try:
        pix, grid = _pixels([(12, 12)], torch.float32)
        with torch.no_grad(), fast_window_attention(model.eval().train()):  # training: falls back to it
            _vision(model, pix, grid)
        assert seen
        assert attn.__dict__["forward"] is earlier
    finally:
        attn.__dict__.pop("forward", None)
        model.eval()


def test_rejects_other_models():
    from earlytom_ext.tiny_model import build_model as build_llava

    with pytest.raises(TypeError, match="supports Hugging Face Qwen2.5-VL and Qwen2-VL models"):
        fast_window_attention(build_llava())
    with pytest.raises(TypeError, match="supports Hugging Face Qwen2.5-VL and Qwen2-VL models"):
        fast_window_attention(torch.nn.Linear(2, 2))
    assert earlytom_ext.fast_window_attention is fast_window_attention
    model = build_model()
    model.model.visual.blocks[1].attn.qkv = torch.nn.Identity()
    with pytest.raises(TypeError, match="attn.qkv and attn.proj"):
        fast_window_attention(model)
    assert not any("forward" in b.attn.__dict__ for b in model.model.visual.blocks)  # nothing half-patched


# --------------------------------------------------------------------------------------------
# The EarlyTom adapter's batched path
# --------------------------------------------------------------------------------------------
def _encode(model, inputs, batch_windows: bool):
    with earlytom_ext.apply(model, CFG) as h:
        h.adapter.batch_windows = batch_windows
        feats = h.encode_videos(inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"])
        return feats, h.last_stats


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_batches_with_the_same_result(dtype, family, monkeypatch):
    model = build_model(dtype=dtype, family=family)
    videos = [make_video(12, seed=s, kind="scenes", scene_length=4, image_size=12) for s in (1, 2)]
    inputs = make_inputs(model, videos, seed=5)
    expected, st0 = _encode(model, inputs, False)
    spy = _Spy(monkeypatch)
    got, st1 = _encode(model, inputs, True)
    assert spy.calls == len(model.model.visual.blocks)
    assert [v["segments"] for v in st1["videos"]] == [v["segments"] for v in st0["videos"]]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert not any("forward" in b.attn.__dict__ for b in model.model.visual.blocks)  # restored after the call


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_keeps_the_models_attention_without_sdpa(family, monkeypatch):
    model = build_model(attn_implementation="eager", family=family)
    videos = [make_video(12, seed=1, kind="scenes", scene_length=4, image_size=12)]
    inputs = make_inputs(model, videos, seed=5)
    spy = _Spy(monkeypatch)
    _encode(model, inputs, True)
    assert spy.calls == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_combines_with_apply(family, monkeypatch):
    """Images go through the model's own vision forward under EarlyTom: fast_window_attention
    batches them; the videos' compressed features and logits are unchanged by it."""
    model = build_model(family=family)
    videos = [make_video(12, seed=1, kind="scenes", scene_length=4, image_size=12)]
    img = make_video(1, seed=9, image_size=12)[0]
    inputs = make_inputs(model, videos, seed=6, images=[img])
    with earlytom_ext.apply(model, CFG), torch.no_grad():
        expected = model(**inputs).logits
    spy = _Spy(monkeypatch)
    with earlytom_ext.apply(model, CFG) as h, fast_window_attention(model) as fix, torch.no_grad():
        got = model(**inputs).logits
        assert "active" in repr(fix) and h.last_stats["videos"]
    blocks = len(model.model.visual.blocks)
    assert spy.calls == 2 * blocks  # the image's blocks (stock forward, patched) and the video's (adapter)
    assert torch.equal(got, expected)
    assert not any("forward" in b.attn.__dict__ for b in model.model.visual.blocks)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_vision_loop_reads_nothing_on_the_host(family, monkeypatch):
    """After a grid's first call (its geometry is cached), the adapter's vision loop and the
    batched attention read no tensor values (Stage I's size read is inside the op)."""
    from tiny_models import spy_host_reads

    model = build_model(family=family)
    videos = [make_video(12, seed=s, kind="scenes", scene_length=4, image_size=16) for s in (1, 2)]
    inputs = make_inputs(model, videos, seed=5)
    with earlytom_ext.apply(model, CFG) as h, torch.no_grad():
        h.encode_videos(inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"])
        reads = spy_host_reads(monkeypatch, ("qwen2_5_vl_vision.py", "window_attention.py", "run.py", "core.py"))
        h.encode_videos(inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"])
        monkeypatch.undo()
    assert reads == []


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_the_models_window_loop(dtype, family):
    # Same math per window; the GPU kernels may pick another split for another batch size, so
    # rounding can differ (tolerances of the dtype).
    model = build_model(dtype=dtype, family=family).cuda()
    pix, grid = _pixels([(20, 12), (12, 12)], dtype, device="cuda")
    with torch.no_grad():
        expected = _vision(model, pix, grid)
        with fast_window_attention(model):
            got = _vision(model, pix, grid)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
