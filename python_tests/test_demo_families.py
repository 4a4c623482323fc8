"""``earlytom demo --model`` on every family ``earlytom_ext.apply`` supports besides LLaVA-OneVision
(test_cli.py has that one): tiny random checkpoints saved with their real processors
(test_quickstart.py's savers), loaded through the demo's own ``from_pretrained`` path. The summary's
counts are checked against the processor's placeholders and the handle's statistics, the figure's
token grid against the stats (white frames: the bright cells of a panel are its kept tokens)."""

import os
import re
import sys

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))

from test_quickstart import (  # noqa: E402
    save_tiny_next_video_checkpoint,
    save_tiny_qwen_checkpoint,
    save_tiny_video_llava_checkpoint,
)

from earlytom_ext import demo  # noqa: E402

try:
    import matplotlib  # noqa: F401

    HAS_MPL = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_MPL = False

FAMILIES = ["qwen2_5_vl", "qwen2_vl", "llava_next_video", "video_llava"]
# tau = -1 and a long window: one segment, so Stage I merges and drops frames of the random models.
MERGING = dict(tau=-1.0, max_window=8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    saved = {}

    def get(family):
        if family not in saved:
            path = str(tmp_path_factory.mktemp(f"tiny-{family}"))
            if family.startswith("qwen"):
                save_tiny_qwen_checkpoint(path, family)
            elif family == "llava_next_video":
                save_tiny_next_video_checkpoint(path)
            else:
                save_tiny_video_llava_checkpoint(path)
            saved[family] = path
        return saved[family]

    return get


def _run_spied(monkeypatch, path, out, frames, **kwargs):
    """``demo.run`` on a checkpoint; returns its result, the processor's output and plot's arguments."""
    seen, plotted = [], []
    call = demo.processor_inputs

    def spy_inputs(*args, **kw):
        seen.append(call(*args, **kw))
        return seen[-1]

    monkeypatch.setattr(demo, "processor_inputs", spy_inputs)
    monkeypatch.setattr(demo, "plot", lambda *args, **kw: plotted.append((args, kw)))
    res = demo.run(
        model=path,
        frames=frames,
        png=HAS_MPL,
        out=str(out),
        repeats=1,
        max_new_tokens=2,
        device="cpu",
        quiet=True,
        **kwargs,
    )
    assert len(seen) == 1
    return res, seen[0], plotted


def _panels(frames, stats, grid):
    """Per merged-frame panel of the figure on white frames: (title, set of bright token positions)."""
    import matplotlib.pyplot as plt
    import numpy as np

    white = torch.full((frames, 3, 384, 384), 255, dtype=torch.uint8)
    fig = demo._figure(white, stats, grid=grid)
    try:
        out = []
        for a in fig.axes:
            if a.get_gid() != "merged-frame":
                continue
            img = a.images[0].get_array()[..., 0]
            cell_h, cell_w = 384 // grid.rows, 384 // grid.cols
            cells = img[cell_h // 2 :: cell_h, cell_w // 2 :: cell_w][: grid.rows, : grid.cols]
            bright = {int(i) for i in np.flatnonzero(np.asarray(cells) > 0.99)}
            out.append((a.get_title(), bright))
        return out, fig.axes[0].get_title()
    finally:
        plt.close(fig)


def _check_panels(panels, v, class_token=False):
    """Each panel's title counts its merged frame's kept tokens and its bright cells are those tokens
    (with a class token, position 0, counted but not drawn: patch p is position p + 1)."""
    assert len(panels) == len(v["frame_sources"])
    for i, (title, bright) in enumerate(panels):
        kept = [p for f, p in v["kept"] if f == i]
        drawn = {p - 1 for p in kept if p > 0} if class_token else set(kept)
        assert f"{len(kept)} kept" in title and bright == drawn, (title, bright, kept)
        if class_token:
            assert ("incl. class token" in title) == (0 in kept), title


def _check_counts(res, inputs, video_token_id, label):
    v = res["stats"]["videos"][0]
    placeholders = int((inputs["input_ids"] == video_token_id).sum())
    assert v["tokens_before"] == placeholders
    assert v["tokens_after"] == len(v["kept"]) < placeholders  # no token appended per video
    text = res["summary"]
    assert f"| {label} | {placeholders} |" in text, text
    assert f"| EarlyTom (kept) | {v['tokens_after']} |" in text, text
    assert "+ newline" not in text
    # The compressed prompt lost exactly the dropped video tokens.
    prompt = re.search(r"\| unpatched \| (\d+) \|\n\| EarlyTom \| (\d+) \|", text)
    assert prompt, text
    before, after = int(prompt.group(1)), int(prompt.group(2))
    assert before == inputs["input_ids"].shape[1] and after == before - placeholders + v["tokens_after"]
    assert "answer: " in text and "random weights" not in text
    return v


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_demo_on_qwen(family, checkpoints, tmp_path, monkeypatch):
    path = checkpoints(family)
    frames = 11  # odd: the processor repeats the last frame, 6 temporal groups of 2
    res, inputs, plotted = _run_spied(monkeypatch, path, tmp_path / "out", frames, **MERGING)
    grid_t, h, w = inputs["video_grid_thw"][0].tolist()
    assert grid_t == 6 and (h, w) == (8, 8)
    v = _check_counts(res, inputs, 121, "unpatched (temporal groups x 16)")  # test_qwen2_5_vl.VID
    assert v["frames_before"] == grid_t and v["tokens_per_frame"] == h * w // 4
    text = res["summary"]
    assert text.startswith(f"EarlyTom demo: 11 frames = 6 temporal groups (synthetic clip), model: {path},")
    assert "| encoder stage | temporal groups |\n|---|---|\n| input | 6 |" in text
    layers = (7, 21, 23) if family == "qwen2_5_vl" else (8, 26, 28)  # the family's own
    assert f"prune_layers={layers}" in text, text
    if not HAS_MPL:
        return
    (frames_u8, stats, png), kw = plotted[0]
    assert frames_u8.shape[0] == frames and stats is res["stats"]
    assert "temporal groups" in kw["title"]
    grid = kw["grid"]
    assert (grid.rows, grid.cols, grid.class_token, grid.frames_per_group) == (4, 4, False, 2)
    panels, timeline = _panels(frames, stats, grid)
    sources = v["frame_sources"]
    last = stats["prune_layers"][-1]
    assert len(panels) == len(sources) == v["frames_after"][last] < grid_t  # Stage I merged groups
    _check_panels(panels, v)
    for i, (title, _) in enumerate(panels):
        # Group g is decoded frames 2g, 2g + 1 (the last one alone: its pair is the processor's copy).
        first, end = 2 * sources[i][0], min(2 * sources[i][-1] + 1, frames - 1)
        shown = f"frame {first}" if first == end else f"frames {first}..{end}"
        assert f"#{i} <- group" in title and shown in title, title
    assert "decoded frames 0..10" in timeline and "temporal group of 2 frames" in timeline


def test_qwen_frame_rate_comes_from_the_clip(checkpoints, tmp_path, monkeypatch):
    pytest.importorskip("av")
    from test_cli import _write_clip

    clip = _write_clip(str(tmp_path / "clip.mp4"), frames=12)  # 12 frames at 10 fps: 1.2 s
    seen = []
    call = demo.processor_inputs

    def spy(processor, model_type, frames_u8, fps):
        seen.append(fps)
        return call(processor, model_type, frames_u8, fps)

    monkeypatch.setattr(demo, "processor_inputs", spy)
    res = demo.run(
        model=checkpoints("qwen2_5_vl"),
        video=clip,
        frames=6,
        png=False,
        repeats=1,
        generate=False,
        device="cpu",
        quiet=True,
    )
    assert seen == [pytest.approx(6 / demo.clip_seconds(clip))] and demo.clip_seconds(clip) == pytest.approx(1.2)
    assert res["stats"]["videos"][0]["frames_before"] == 3


def test_demo_on_llava_next_video(checkpoints, tmp_path, monkeypatch):
    path = checkpoints("llava_next_video")
    res, inputs, plotted = _run_spied(monkeypatch, path, tmp_path / "out", 7, **MERGING)
    assert inputs["pixel_values_videos"].shape == (1, 7, 3, 16, 16)
    v = _check_counts(res, inputs, 120, "unpatched (T x 16)")  # llava_video_checks.VID; 8x8 patches -> 4x4
    assert v["frames_before"] == 7 and v["tokens_per_frame"] == 16
    assert "| encoder stage | frames |\n|---|---|\n| input | 7 |" in res["summary"]
    assert "prune_layers=(6, 18, 20)" in res["summary"]
    if not HAS_MPL:
        return
    (frames_u8, stats, png), kw = plotted[0]
    grid = kw["grid"]
    assert (grid.rows, grid.cols, grid.class_token, grid.frames_per_group) == (4, 4, False, 1)
    panels, _ = _panels(7, stats, grid)
    assert len(panels) < 7
    _check_panels(panels, v)


def test_demo_on_video_llava(checkpoints, tmp_path, monkeypatch):
    path = checkpoints("video_llava")
    res, inputs, plotted = _run_spied(monkeypatch, path, tmp_path / "out", 7, **MERGING)
    # "USER: <video>\n..." (the Video-LLaVA prompt, no chat template): 7 x 65 placeholders.
    v = _check_counts(res, inputs, 120, "unpatched (T x 65, class token included)")
    assert v["tokens_before"] == 7 * 65 and v["tokens_per_frame"] == 65
    if not HAS_MPL:
        return
    (frames_u8, stats, png), kw = plotted[0]
    grid = kw["grid"]
    assert (grid.rows, grid.cols, grid.class_token, grid.frames_per_group) == (8, 8, True, 1)
    panels, timeline = _panels(7, stats, grid)
    assert len(panels) < 7
    assert "'kept' counts the class token" in timeline
    _check_panels(panels, v, class_token=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_baseline_times_the_models_own_video_encoder(family, checkpoints, monkeypatch):
    calls = {}
    load = demo.load_pretrained

    def hooked(*args, **kwargs):
        model, processor = load(*args, **kwargs)
        names = ("visual",) if family.startswith("qwen") else ("vision_tower", "video_tower", "image_tower")
        for name in names:
            module = getattr(model.model, name, None)
            if module is not None:
                calls[name] = 0
                module.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
        return model, processor

    monkeypatch.setattr(demo, "load_pretrained", hooked)
    res = demo.run(model=checkpoints(family), frames=4, png=False, repeats=2, generate=False, device="cpu", quiet=True)
    assert len(res["baseline_ms"]) == 2
    if family.startswith("qwen"):
        assert calls == {"visual": 1 + 2}  # the patched side runs the blocks itself
    elif family == "video_llava":  # its video tower, unpatched and patched; the image tower never
        assert calls == {"video_tower": 2 * (1 + 2), "image_tower": 0}
    else:
        assert calls == {"vision_tower": 2 * (1 + 2)}


def test_preset_on_another_family_takes_the_familys_own_prune_layers(checkpoints, recwarn):
    # The presets' layers index LLaVA-OneVision's SigLIP: (10, 21, 23) would end after LLaVA-NeXT-Video's
    # feature layer (22) and fail; the demo takes the family's own, as the examples do.
    def config_line(**kw):
        res = demo.run(
            model=checkpoints("llava_next_video"), frames=2, png=False, repeats=1, generate=False, quiet=True, **kw
        )
        return next(line for line in res["summary"].splitlines() if line.startswith("config:"))

    assert (
        config_line(preset="videomme")
        == "config: retain_ratio=0.1 tau=0.3 max_window=6 ema=0.9 prune_layers=(6, 18, 20)"
    )
    assert not [w for w in recwarn if "paper preset" in str(w.message)]
    assert config_line(preset="videomme", prune_layers=(4, 9)).endswith("prune_layers=(4, 9)")  # given: as given


def test_a_processor_that_samples_frames_gets_the_decoded_frames(tmp_path):
    """A checkpoint whose video processor samples 2 frames itself: the demo's frames are already the
    sampled ones (the figure maps them onto the Stage I frames), so the processor keeps all of them."""
    import glob
    import json

    path = save_tiny_next_video_checkpoint(str(tmp_path / "sampling"))

    def sample_two(config):
        if isinstance(config, dict):
            if "video_processor_type" in config:
                config.update(do_sample_frames=True, num_frames=2)
            for value in config.values():
                sample_two(value)

    for name in glob.glob(os.path.join(path, "*.json")):  # 4.57: video_preprocessor_config.json; 5.x: processor_config
        with open(name) as f:
            config = json.load(f)
        sample_two(config)
        with open(name, "w") as f:
            json.dump(config, f)
    res = demo.run(model=path, frames=6, png=False, repeats=1, generate=False, device="cpu", quiet=True)
    assert res["stats"]["videos"][0]["frames_before"] == 6


def test_demo_writes_the_png_of_every_family(checkpoints, tmp_path):
    pytest.importorskip("matplotlib")
    for family in FAMILIES:
        out = tmp_path / family
        res = demo.run(
            model=checkpoints(family), frames=4, out=str(out), repeats=1, generate=False, device="cpu", quiet=True
        )
        with open(res["png"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", family


def test_a_grid_that_does_not_fit_the_model_fails_before_timing(checkpoints, tmp_path, monkeypatch):
    timed = []
    monkeypatch.setattr(demo, "time_ms", lambda *args, **kwargs: timed.append(1) or 1.0)
    monkeypatch.setattr(demo, "token_grid", lambda *args: demo.TokenGrid(3, 3))
    with pytest.raises(ValueError, match="figure's 3 x 3 token grid does not fit the model's 16 tokens per frame"):
        demo.run(model=checkpoints("llava_next_video"), frames=2, out=str(tmp_path / "out"), repeats=1, quiet=True)
    assert timed == [] and not (tmp_path / "out").exists()


def test_figure_refuses_a_grid_that_does_not_fit_the_stats():
    stats = {
        "videos": [
            {
                "frames_before": 2,
                "frames_after": {1: 2},
                "segments": [(0, 1)],
                "frame_sources": [[0], [1]],
                "kept": [(0, 3)],
                "tokens_per_frame": 16,
            }
        ],
        "tokens_per_frame": 16,
    }
    frames = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match=r"token grid 4 x 4 \+ class token does not match the 16 tokens"):
        demo._figure(frames, stats, grid=demo.TokenGrid(4, 4, class_token=True, frames_per_group=2))
    with pytest.raises(ValueError, match="4 decoded frames in groups of 1 do not make the 2 Stage I frames"):
        demo._figure(frames, stats, grid=demo.TokenGrid(4, 4))
    stats["videos"][0]["kept"] = [(0, 16)]
    with pytest.raises(ValueError, match="kept position 16 of merged frame 0 is outside its 16 tokens"):
        demo._figure(frames, stats, grid=demo.TokenGrid(4, 4, frames_per_group=2))


def test_unsupported_family_is_refused_before_weights_load(tmp_path, monkeypatch, capsys):
    import transformers
    from transformers import Qwen2Config

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    for cls in (transformers.PreTrainedModel, transformers.AutoModelForImageTextToText, transformers.AutoModel):
        monkeypatch.setattr(cls, "from_pretrained", no_weights)
    other = tmp_path / "qwen2"
    Qwen2Config(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1).save_pretrained(other)
    with pytest.raises(ValueError) as e:
        demo.run(model=str(other), frames=2, png=False, quiet=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--model: {str(other)!r} is a 'qwen2' checkpoint; the demo runs ")
    for family in ("LLaVA-OneVision", "LLaVA-NeXT-Video", "Video-LLaVA", "Qwen2.5-VL", "Qwen2-VL"):
        assert family in msg, msg
    assert demo.main(["--model", str(other), "--no-png", "--frames", "2"]) == 2
    assert "error: --model: " in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_by_its_own_class(family, checkpoints, monkeypatch):
    """The class comes from the adapter by name (Video-LLaVA has no Auto mapping on 4.57)."""
    import transformers

    from earlytom_ext.demo.families import adapter_class

    model, processor = demo.load_pretrained(checkpoints(family), torch.device("cpu"))
    assert type(model) is getattr(transformers, adapter_class(family).model_class)
    assert model.config.model_type == family and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert callable(processor)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
