"""Smoke test of the benchmarks: the CPU quick run of ``python -m bench.run`` in a temp dir, plus
the pieces that need no model (the analytical FLOPs, the forced merge patterns checked against
the reference walk, the timers, the time budget, the device names, the Qwen2.5-VL patch order)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import flops, models, patterns, report  # noqa: E402
from earlytom_ext import EarlyTomConfig, preset  # noqa: E402
from earlytom_ext import reference as R  # noqa: E402

OPS = ("merge_frames", "apply_merge_plan", "segment_frames", "attention_received", "select_tokens")


def _ops_ready() -> bool:
    from earlytom_ext import _ext

    if not _ext.available():
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"earlytom::{op}", "CPU") for op in OPS)


# ---------------------------------------------------------------------------------------------
# No model needed
# ---------------------------------------------------------------------------------------------
def test_layer_flops_formula():
    n, d, m = 729, 1152, 4304
    assert flops.layer_flops(n, d, m) == 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    # Frames per layer: Stage I runs after the prune layer.
    assert flops.frames_per_layer(32, 6, (1, 3), (20, 12)) == [32, 32, 20, 20, 12, 12]
    with pytest.raises(ValueError):
        flops.frames_per_layer(32, 6, (1, 3), (20,))


def test_flops_compare_uncompressed_is_zero_reduction():
    spec = models.get_spec("llava-ov-7b")
    res = flops.compare(spec, [32], [6305], [6305])
    assert res["flops_reduction_pct"] == pytest.approx(0.0)
    # Encoder: 26 layers x 32 frames of the 729-token layer.
    assert res["encoder_tflops_full"] * 1e12 == pytest.approx(26 * 32 * flops.layer_flops(729, 1152, 4304))


def test_flops_compressed_paper_setting():
    spec = models.get_spec("llava-ov-7b")
    cfg = preset("videomme", 0.10)
    counts = patterns.forced_counts(32, cfg)
    res = flops.compare(spec, [32], [32 * 196 + 1 + 32], [628 + 1 + 32], cfg.prune_layers, [counts])
    # Layers 0..10 on 32 frames, 11..21 on 20, 22..23 on 12, 24..25 on 8.
    per = flops.layer_flops(729, 1152, 4304)
    assert res["encoder_tflops"] * 1e12 == pytest.approx((11 * 32 + 11 * 20 + 2 * 12 + 2 * 8) * per)
    assert 50.0 < res["flops_reduction_pct"] < 95.0


def test_forced_counts_and_tokens():
    for r in (0.10, 0.15, 0.20, 0.25):
        cfg = preset("videomme", r)
        assert patterns.forced_counts(32, cfg, "forced-merge") == [20, 12, 8]
        assert patterns.forced_counts(32, cfg, "forced-nomerge") == [26, 21, 17]
        kept = patterns.forced_video_tokens(32, cfg)
        assert abs(kept - r * 32 * 196) <= 8  # r' keeps the budget
    assert patterns.forced_video_tokens(32, preset("videomme", 0.10)) == 4 * 79 + 4 * 78
    with pytest.raises(ValueError):
        patterns.forced_counts(32, preset("videomme", 0.10), "bogus")


def _unit_frames(angles):
    """Frames [T, 1, 2] of unit vectors at the given angles: frame similarity = cos(difference)."""
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], dim=-1).view(-1, 1, 2).float()


def _effective(plan):
    """Output frames of a plan as (src0, src1) with weight-1 entries reduced to their source."""
    return [(a, a) if w == 1.0 else (a, b) for a, b, w in plan]


@pytest.mark.parametrize("keep_last", [False, True])
@pytest.mark.parametrize("T", [32, 17, 9, 5, 4, 3, 1])
def test_forced_plan_matches_reference_walk(T, keep_last):
    """The forced patterns are the reference walk's outcomes on inputs that force its decisions."""
    cfg = EarlyTomConfig(tau=-1.0, max_window=6, ema=0.9, prune_layers=(0,), keep_last_interior=keep_last)
    window = cfg.max_window - 1
    # tau = -1 never cuts on similarity: segments are the max_window windows.
    # "merge" windows: endpoints far apart, a small gap then a larger one inside the interior
    # (sigma_0 > sigma_1 > tau_m): every merge the walk may take is taken.
    # "nomerge" windows: endpoints nearly equal, interior neighbours far apart (sigma < tau_m).
    merge_angles, keep_angles = [], []
    for s, e in patterns.forced_segments(T, window):
        n = e - s + 1
        merge_angles += [0.0, 0.30, 0.32, 0.33, 0.34][:n] if n < 5 else [0.0, 0.30, 0.32, 0.9, 1.2]
        keep_angles += [0.0] * n if n < 3 else [0.0] + [1.0 * k for k in range(1, n - 1)] + [0.1]
    for pattern, angles in (("forced-merge", merge_angles), ("forced-nomerge", keep_angles)):
        x = _unit_frames(angles)
        ref_plan, ref_segs = R.merge_plan(x, cfg)
        plan, segs = patterns.forced_plan(T, window, pattern == "forced-merge", keep_last)
        assert segs == ref_segs
        assert _effective(plan) == _effective(ref_plan), pattern


class _FakeNVMLError(Exception):
    pass


def _fake_pynvml(fail_at=None):
    """A stand-in for nvidia-ml-py: every call answers, except ``fail_at`` which raises."""
    import types

    def call(name, value):
        def fn(*args):
            if name == fail_at:
                raise _FakeNVMLError(f"{name} refused")
            return value

        return fn

    mod = types.ModuleType("pynvml")
    mod.NVML_CLOCK_SM, mod.NVML_CLOCK_MEM, mod.NVML_TEMPERATURE_GPU = 0, 1, 0
    mem = types.SimpleNamespace(total=80 * 2**30, used=2**30)
    for name, value in (
        ("nvmlInit", None),
        ("nvmlShutdown", None),
        ("nvmlDeviceGetHandleByIndex", object()),
        ("nvmlDeviceGetName", b"GPU"),
        ("nvmlSystemGetDriverVersion", "580"),
        ("nvmlSystemGetCudaDriverVersion", 13000),
        ("nvmlDeviceGetMemoryInfo", mem),
        ("nvmlDeviceGetClockInfo", 1980),
        ("nvmlDeviceGetMaxClockInfo", 1980),
        ("nvmlDeviceGetPowerManagementLimit", 700000),
        ("nvmlDeviceGetTemperature", 40),
        ("nvmlDeviceGetPersistenceMode", 1),
    ):
        setattr(mod, name, call(name, value))
    return mod


@pytest.mark.parametrize("fail_at", [None, "nvmlInit", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetClockInfo"])
def test_nvml_info_never_raises(monkeypatch, fail_at):
    """The GPU run reads NVML before any work: a refused call must not end the run."""
    from bench import env

    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail_at))
    info = env.nvml_info(0)
    if fail_at in ("nvmlInit", "nvmlDeviceGetHandleByIndex"):
        assert set(info) == {"nvml"} and "refused" in info["nvml"]
        return
    assert info["name"] == "GPU" and info["memory_total_gib"] == pytest.approx(80.0)
    assert info["power_limit_w"] == pytest.approx(700.0)
    if fail_at == "nvmlDeviceGetClockInfo":
        assert info["sm_clock_mhz"] is None and info["mem_clock_mhz"] is None
    else:
        assert info["sm_clock_mhz"] == 1980


def test_llm_flops_with_inner_merge():
    """Layers from the merge layer on count the sequence without the removed tokens."""
    d, m = 64, 128
    full = flops.llm_flops([100, 80], 4, d, m)
    assert full == 4 * (flops.layer_flops(100, d, m) + flops.layer_flops(80, d, m))
    merged = flops.llm_flops([100, 80], 4, d, m, merge_layer=1, removed=[30, 0])
    assert merged == (flops.layer_flops(100, d, m) + 3 * flops.layer_flops(70, d, m) + 4 * flops.layer_flops(80, d, m))
    with pytest.raises(ValueError, match="removed"):
        flops.llm_flops([100], 4, d, m, merge_layer=1, removed=None)
    with pytest.raises(ValueError, match="merge_layer"):
        flops.llm_flops([100], 4, d, m, merge_layer=5, removed=[1])


@pytest.mark.parametrize(
    "n, text",
    [
        (8.03e9, "8.03 B parameters"),
        (1_420_000, "1.42 M parameters"),
        (2500, "2.50 K parameters"),
        (12, "12 parameters"),
    ],
)
def test_params_text(n, text):
    from bench.common import params_text

    assert params_text(n) == text


@pytest.mark.parametrize(
    "name, slug",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ],
)
def test_device_slug(name, slug):
    from bench import env

    assert env.device_slug("cuda", name) == slug
    assert env.device_slug("cpu") == "cpu-smoke"


def test_budget_shares_and_run_points():
    from bench.common import Budget, run_points

    assert Budget().left() is None and not Budget().expired() and Budget().share(1, 3).left() is None
    b = Budget(100.0)
    assert 33.0 < b.share(1.0, 3.0).left() <= 100.0 / 3 + 1e-6
    assert 99.0 < b.share(2.0, 2.0).left() <= 100.0
    with pytest.raises(ValueError, match="time budget"):
        Budget(0)

    def measure(row):
        if row["i"] == 1:
            raise ZeroDivisionError("boom")
        if row["i"] == 2:
            row["skipped"] = "not in this version"
            return
        row["value"] = 10 * row["i"]

    logs = []
    rows = run_points([{"i": i} for i in range(4)], measure, budget=Budget(), device="cpu", log=logs.append)
    assert [r.get("value") for r in rows] == [0, None, None, 30]
    assert rows[1]["error"] == "ZeroDivisionError: boom" and rows[2]["skipped"] == "not in this version"
    spent = Budget(1e-3)
    time.sleep(0.01)
    rows = run_points([{"i": 0}, {"i": 3}], measure, budget=spent, device="cpu", log=logs.append)
    assert [r.get("skipped") for r in rows] == ["time budget", "time budget"]


def test_hook_timers_restore_methods():
    """The method wrapper times whatever is in place and puts back exactly what was there."""
    from bench.common import HookTimers

    class Inner(torch.nn.Module):
        def pool(self, x):
            return x + 1

    inner = Inner()
    lin = torch.nn.Linear(2, 2)
    t = HookTimers("cpu", {"lin": lin}, first_only=("lin",), methods={"pool": (inner, "pool")})
    assert "pool" in inner.__dict__
    lin(torch.zeros(1, 3, 2))
    lin(torch.zeros(1, 5, 2))
    assert inner.pool(1) == 2
    parts = t.collect()
    assert parts["lin"] >= 0 and parts["pool"] >= 0 and t.prefill_len == 3
    assert len(t.spans["lin"]) == 2  # both calls recorded, only the first counted (first_only)
    t.remove()
    assert "pool" not in inner.__dict__ and not lin._forward_hooks and not lin._forward_pre_hooks
    # An instance attribute already in place (another patch) is timed, then restored.
    patched = lambda x: x * 10  # noqa: E731
    inner.pool = patched
    t = HookTimers("cpu", {}, methods={"pool": (inner, "pool")})
    assert inner.pool(2) == 20 and len(t.spans["pool"]) == 1
    t.remove()
    assert inner.__dict__["pool"] is patched


def test_hook_timers_ended_before():
    """Which timed parts ran before a later mark (the setup split of bench_ttft.measure)."""
    from bench.common import HookTimers, Stamp

    lin, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    t = HookTimers("cpu", {"lin": lin, "other": other})
    lin(torch.zeros(1, 2))
    mark = Stamp(False)
    assert t.ended_before("lin", mark)
    assert not t.ended_before("other", mark)  # never ran
    lin(torch.zeros(1, 2))  # a second call after the mark
    other(torch.zeros(1, 2))
    assert not t.ended_before("lin", mark) and not t.ended_before("other", mark)
    t.remove()


def test_qwen_patch_order():
    """Patches in the Qwen2-VL processor's order: 2x2 merge groups contiguous, each patch
    flattened as (channel, time, row, column); checked against explicit loops."""
    from bench.bench_qwen25vl import _patchify

    T, C, H, W, p, tp, mg = 4, 2, 8, 8, 2, 2, 2
    frames = torch.arange(T * C * H * W, dtype=torch.float32).view(T, C, H, W)
    out, grid = _patchify(frames, p, tp, mg)
    assert grid == [2, 4, 4] and out.shape == (2 * 4 * 4, C * tp * p * p)
    expected = []
    for t in range(2):
        for bh in range(2):
            for bw in range(2):
                for ih in range(mg):
                    for iw in range(mg):
                        h, w = bh * mg + ih, bw * mg + iw
                        expected.append(
                            [
                                float(frames[t * tp + dt, c, h * p + y, w * p + x])
                                for c in range(C)
                                for dt in range(tp)
                                for y in range(p)
                                for x in range(p)
                            ]
                        )
    assert out.tolist() == expected


def test_qwen2_vl_section_on_a_tiny_model():
    """The --qwen section on Qwen2-VL (--qwen-model qwen2-vl-7b; its tiny version on the CPU): stock,
    EarlyTom and stock + fast_window_attention rows, and the report names the family."""
    pytest.importorskip("transformers")
    if not _ops_ready():
        pytest.skip("earlytom ops are not all built yet (CPU kernels missing)")
    from bench import bench_qwen25vl
    from bench.run import parse_args

    assert parse_args(["--qwen", "--qwen-model", "qwen2-vl-7b"]).qwen_model == "qwen2-vl-7b"
    assert bench_qwen25vl.qwen_config("qwen2-vl-7b").vision_config.embed_dim == 1280
    q = bench_qwen25vl.benchmark("cpu", size="tiny-qwen2-vl", ratios=(0.25,), warmup=0, iters=1, log=lambda *a: None)
    assert q["model_info"]["family"] == "Qwen2-VL"
    rows = q["rows"]
    assert [(r["config"], r.get("baseline")) for r in rows] == [
        ("uncompressed", "stock"),
        ("earlytom", None),
        ("uncompressed", "fastwin"),
    ]
    assert all(not r.get("error") and r["ttft_ms"] > 0 for r in rows), rows
    assert rows[1]["prefill_tokens"] < rows[0]["prefill_tokens"]
    results = {"qwen25vl": q, "meta": {"headline_pattern": "forced-merge", "device": "cpu", "sections": ["qwen"]}}
    results["env"] = {}
    text = "\n".join(report._qwen_section(results) + report.goals_section(results))
    assert "## Qwen2-VL at tiny widths" in text and "- Qwen2-VL TTFT: r=0.25: " in text
    # EarlyTom ran at the family's prune layers, not the preset's (SigLIP's).
    assert q["model_info"]["prune_layers"] == [8, 26, 28] and "prune layers (8, 26, 28)" in text


def test_next_video_section_on_a_tiny_model():
    """The --next-video section (its tiny version on the CPU): stock and EarlyTom rows at the family's
    prune layers, the architecture written as the checkpoint's, and the report's table and goal line."""
    pytest.importorskip("transformers")
    if not _ops_ready():
        pytest.skip("earlytom ops are not all built yet (CPU kernels missing)")
    from bench import bench_next_video
    from bench.run import parse_args

    assert parse_args(["--next-video"]).next_video and parse_args(["--all"]).next_video
    cfg = bench_next_video.next_video_config()
    vc, tc = cfg.vision_config, cfg.text_config
    assert (vc.num_hidden_layers, vc.hidden_size, vc.image_size, vc.patch_size) == (24, 1024, 336, 14)
    assert (tc.num_hidden_layers, tc.hidden_size, tc.vocab_size, cfg.video_token_index) == (32, 4096, 32064, 32000)
    q = bench_next_video.benchmark("cpu", size="tiny", ratios=(0.25,), warmup=0, iters=1, log=lambda *a: None)
    assert q["model_info"]["family"] == "LLaVA-NeXT-Video" and q["model_info"]["prune_layers"] == [6, 18, 20]
    rows = q["rows"]
    assert [(r["config"], r.get("baseline")) for r in rows] == [("uncompressed", "stock"), ("earlytom", None)]
    assert all(not r.get("error") and r["ttft_ms"] > 0 for r in rows), rows
    # 4 frames x 144 tokens of 336 px frames (+ 32 text tokens) before compression.
    assert rows[0]["prefill_tokens"] == 4 * 144 + 32 and rows[1]["prefill_tokens"] < rows[0]["prefill_tokens"]
    assert rows[1]["speedup"] == pytest.approx(rows[0]["ttft_ms"] / rows[1]["ttft_ms"])
    results = {"llava_next_video": q, "meta": {"headline_pattern": "forced-merge", "device": "cpu"}, "env": {}}
    text = "\n".join(report._next_video_section(results) + report.goals_section(results))
    assert "## LLaVA-NeXT-Video at tiny widths (random weights, 4 frames at 336x336)" in text, text
    assert "prune layers (6, 18, 20)" in text and "- LLaVA-NeXT-Video TTFT: r=0.25: " in text
    assert "fast window attention" not in text
    # A skipped section still names the geometry it would have run.
    from bench.family import family_benchmark

    skipped = family_benchmark(
        "cpu", tag="t", family="LLaVA-NeXT-Video", model_name="llava-next-video-7b", prune_layers=(6, 18, 20),
        available=lambda: (False, "not here"), build=None, make_inputs=None, earlytom_config=None,
        geometry=dict(frames=32, image_size=336, batch=1), ratios=(0.1,), pattern="forced-merge", warmup=0, iters=1,
        log=lambda *a: None,
    )  # fmt: skip
    text = "\n".join(report._next_video_section({"llava_next_video": skipped}))
    assert "## LLaVA-NeXT-Video-7B architecture (random weights, 32 frames at 336x336)" in text, text
    assert "_skipped: not here_" in text


def test_next_video_section_on_video_llava():
    """--next-video --next-video-model video-llava-7b (its tiny version on the CPU): the Video-LLaVA
    architecture written as the checkpoint's, every frame token with the class token (257 at 224 px),
    the family named in the rows, the report and the goal line."""
    pytest.importorskip("transformers")
    if not _ops_ready():
        pytest.skip("earlytom ops are not all built yet (CPU kernels missing)")
    from bench import bench_next_video
    from bench.run import parse_args

    assert parse_args(["--next-video"]).next_video_model == "llava-next-video-7b"
    assert parse_args(["--next-video", "--next-video-model", "video-llava-7b"]).next_video_model == "video-llava-7b"
    cfg = bench_next_video.next_video_config("video-llava-7b")
    vc, tc = cfg.vision_config, cfg.text_config
    assert cfg.model_type == "video_llava" and bench_next_video.tokens_per_frame(cfg) == 16 * 16 + 1
    assert (vc.num_hidden_layers, vc.hidden_size, vc.image_size, vc.patch_size) == (24, 1024, 224, 14)
    assert (tc.num_hidden_layers, tc.hidden_size, cfg.video_token_index) == (32, 4096, 32001)
    q = bench_next_video.benchmark(
        "cpu", size="tiny-video-llava", ratios=(0.25,), warmup=0, iters=1, log=lambda *a: None
    )
    assert q["model_info"]["family"] == "Video-LLaVA" and q["model_info"]["prune_layers"] == [6, 18, 20]
    rows = q["rows"]
    assert all(not r.get("error") and r["ttft_ms"] > 0 for r in rows), rows
    # 4 frames x 257 tokens of 224 px frames (+ 32 text tokens) before compression.
    assert rows[0]["prefill_tokens"] == 4 * 257 + 32 and rows[1]["prefill_tokens"] < rows[0]["prefill_tokens"]
    results = {"llava_next_video": q, "meta": {"headline_pattern": "forced-merge", "device": "cpu"}, "env": {}}
    text = "\n".join(report._next_video_section(results) + report.goals_section(results))
    assert "## Video-LLaVA at tiny widths (random weights, 4 frames at 224x224)" in text, text
    assert "- Video-LLaVA TTFT: r=0.25: " in text and "LLaVA-NeXT-Video" not in text


def test_profile_op_time_counts_earlytom_ops():
    if not _ops_ready():
        pytest.skip("earlytom ops are not all built yet (CPU kernels missing)")
    from bench.bench_ttft import profile_op_time
    from earlytom_ext import ops

    x = torch.randn(6, 4, 8)
    res = profile_op_time(lambda: ops.merge_frames(x, [6], preset("videomme", 0.1)), "cpu")
    assert res["ops_kernel_kind"] == "cpu" and res["ops_kernel_ms"] >= 0
    assert any(k.startswith("earlytom::merge_frames") for k in res["ops_kernel_by_op"])


# ---------------------------------------------------------------------------------------------
# The CPU quick run of python -m bench.run (a subprocess: what a user runs, output included)
# ---------------------------------------------------------------------------------------------
ERROR_LOOKING = re.compile(r"error|traceback|exception|fail|warn", re.IGNORECASE)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("bench")
    manifest = out / "manifest.txt"
    cmd = [
        sys.executable,
        "-m",
        "bench.run",
        "--device",
        "cpu",
        "--quick",
        "--all",
        "--model",
        "micro",
        "--out",
        str(out),
        "--frames",
        "4",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--ratios",
        "0.1",
        "--llm-merge-ratios",
        "0.1",
        "--scaling-frames",
        "2",
        "4",
        "--scaling-batch",
        "1",
        "2",
        "--throughput-batch",
        "1",
        "2",
        "--new-tokens",
        "3",
        "--manifest",
        str(manifest),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    js = [Path(p) for p in manifest.read_text().split() if p.endswith(".json")] if manifest.exists() else []
    assert js, f"no results written (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads(js[0].read_text())
    return out, manifest, results, proc


def test_quick_run_writes_labelled_outputs(quick_run):
    out, manifest, results, proc = quick_run
    files = [Path(p) for p in manifest.read_text().split()]
    md = [p for p in files if p.suffix == ".md"]
    js = [p for p in files if p.suffix == ".json"]
    assert len(md) == 1 and len(js) == 1
    assert all(p.exists() and p.parent == out for p in files)
    assert md[0].name.startswith("cpu-smoke-") and md[0].stem == js[0].stem
    text = md[0].read_text()
    assert "CPU SMOKE RUN" in text and "NOT performance results" in text
    assert " M parameters, random weights" in text or " K parameters, random weights" in text, text[:2000]
    assert "CUDA-event" not in text and "host-clock spans" in text
    assert results["meta"]["label"].startswith("CPU smoke run")
    assert results["meta"]["complete"] is True
    assert results["meta"]["device"] == "cpu" and results["meta"]["model"] == "micro"
    assert results["meta"]["profile"] is False  # torch.profiler stays off on the CPU
    assert results["env"]["torch"] == torch.__version__
    assert proc.returncode == (1 if results["errors"] else 0)


def test_quick_run_output_is_quiet(quick_run):
    """A run where nothing failed prints nothing that looks like an error."""
    _, _, results, proc = quick_run
    if results["errors"]:
        pytest.skip(f"the run reported errors (checked elsewhere): {results['errors'][:2]}")
    noisy = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ERROR_LOOKING.search(ln)]
    assert not noisy, noisy


def test_quick_run_plot(quick_run):
    out, manifest, results, _ = quick_run
    pngs = [Path(p) for p in manifest.read_text().split() if p.endswith(".png")]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not pngs and any(s.startswith("plot: matplotlib unavailable") for s in results["skipped"])
        pytest.skip("matplotlib is not installed: the run skips its figure (checked above)")
    assert len(pngs) == 1 and pngs[0].name == Path(results["meta"]["files"][0]).stem + ".png"
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_flops_section(quick_run):
    _, _, results, _ = quick_run
    rows = results["flops"]
    analytical = [r for r in rows if r["source"] == "analytical"]
    assert {r["pattern"] for r in analytical} == set(patterns.FORCED_PATTERNS)
    for r in rows:
        assert r["total_tflops"] <= r["total_tflops_full"]
        assert math.isfinite(r["flops_reduction_pct"])


def test_quick_run_measured_sections(quick_run):
    """TTFT, throughput, encoder and scaling rows: complete once the ops and the integration exist."""
    _, _, results, _ = quick_run
    if not _ops_ready():
        pytest.skip("earlytom ops are not all built yet (CPU kernels missing)")
    errors = [e for e in results["errors"] if not e.startswith("kernels ")]  # op microbenchmarks: others' modules
    assert not errors, errors
    P = models.get_spec("micro").tokens_per_frame
    assert P == 16
    full_tokens = 4 * P + 1 + models.TEXT_TOKENS

    ttft = results["ttft"]
    base = [r for r in ttft if r["config"] == "uncompressed"]
    assert [(r["baseline"], r["when"]) for r in base] == [
        ("stock", "before"),
        ("fastpool", "before"),
        ("stock", "after"),
        ("fastpool", "after"),
    ]
    for r in base:
        assert r["prefill_tokens"] == full_tokens and r["ttft_ms"] > 0
        assert r["vision_ms"] > 0 and r["llm_ms"] > 0 and r["pooling_ms"] > 0 and r["projector_ms"] > 0
        assert r["setup_ms"] is not None and r["setup_ms"] >= 0
    comp = [r for r in ttft if r["config"] == "earlytom"]
    assert [(r["pattern"], r["llm_merge"]) for r in comp] == [
        ("forced-merge", False),
        ("forced-merge", True),
        ("forced-nomerge", False),
        ("natural", False),
    ]
    cfg = preset("videomme", 0.10)
    fast_before = base[1]["ttft_ms"]
    for r in comp:
        assert not r.get("error") and not r.get("skipped"), r
        assert r["ttft_ms"] > 0
        assert r["speedup"] == pytest.approx(base[0]["ttft_ms"] / r["ttft_ms"])
        assert r["speedup_vs_fastpool"] == pytest.approx(fast_before / r["ttft_ms"])
        assert r["prefill_tokens"] < full_tokens
        assert r["ops_ms"] is not None and r["ops_ms"] >= 0 and 0 <= r["ops_share_pct"] <= 100
        # Every part of the split was measured, and the parts plus the overhead make up TTFT.
        for key in ("vision_ms", "projector_ms", "pooling_ms", "stage2_ms", "prompt_rewrite_ms", "setup_ms", "llm_ms"):
            assert r[key] is not None and r[key] >= 0, key
        assert len(r["frames_after_prune"]) == 1 and len(r["frames_after_prune"][0]) == 3
        if r["pattern"] in patterns.FORCED_PATTERNS:
            assert r["frames_after_prune"][0] == patterns.forced_counts(4, cfg, r["pattern"])
            kept = patterns.forced_video_tokens(4, cfg, r["pattern"], P=P)
            assert r["video_tokens"] == [kept + 1]
            assert r["prefill_tokens"] == kept + 1 + models.TEXT_TOKENS
    # The micro model's 2-layer LLM merges at its middle layer; the FLOPs count the shorter tail.
    lm = next(r for r in comp if r["llm_merge"])
    assert lm["llm_merge_layer"] == 1 and lm["llm_tflops"] < comp[0]["llm_tflops"]

    tp = results["throughput"]
    assert {(r["batch"], r["config"]) for r in tp} == {
        (b, c) for b in (1, 2) for c in ("stock", "earlytom", "fastpool")
    }
    for r in tp:
        assert not r.get("error") and not r.get("skipped"), r
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 3 / r["seconds"])
        assert r["videos_per_s"] == pytest.approx(r["batch"] / r["seconds"])
        assert 0 < r["first_token_s"] and r["decode_ms_per_step"] == pytest.approx(
            (r["seconds"] - r["first_token_s"]) * 1e3 / 2
        )
        if r["config"] == "earlytom":
            stock = next(s for s in tp if s["batch"] == r["batch"] and s["config"] == "stock")
            assert r["speedup"] == pytest.approx(r["tokens_per_s"] / stock["tokens_per_s"])

    enc = results["encoder"]
    assert [r["config"] for r in enc] == ["uncompressed"] * 2 + ["earlytom"] * 3
    assert all(r["features_ms"] > 0 and r["tower_ms"] > 0 for r in enc)
    sc = results["scaling"]
    assert {(r["axis"], r["value"]) for r in sc} == {("frames", 2), ("frames", 4), ("batch", 1), ("batch", 2)}
    for r in sc:
        assert not r.get("error") and not r.get("skipped"), r
        assert r["ttft_ms"] > 0 and r["ttft_full_ms"] > 0 and r["ttft_fastpool_ms"] > 0
        assert r["prefill_tokens"] < r["prefill_tokens_full"]
    q = results["qwen25vl"]
    assert q.get("skipped") or all(not r.get("error") for r in q["rows"]), q
    if not q.get("skipped"):
        assert "- Qwen2.5-VL TTFT: r=0.10: " in "\n".join(report.goals_section(results))
        assert {r.get("baseline") for r in q["rows"] if r["config"] == "uncompressed"} == {"stock", "fastwin"}
        for r in q["rows"]:
            if r["config"] == "earlytom":
                assert r["speedup_vs_fastwin"] > 0 and r["speedup"] > 0, r
    nv = results["llava_next_video"]
    assert nv.get("skipped") or all(not r.get("error") and r.get("ttft_ms") for r in nv["rows"]), nv
    if not nv.get("skipped"):
        assert "- LLaVA-NeXT-Video TTFT: r=0.10: " in "\n".join(report.goals_section(results))


def test_measure_keeps_timings_when_the_profiler_fails(monkeypatch):
    """A profiler failure (CUPTI on a GPU) costs the kernel-time columns only."""
    pytest.importorskip("transformers")
    if not _ops_ready():
        pytest.skip("earlytom ops are not all built yet (CPU kernels missing)")
    from bench import bench_ttft

    def broken(fn, device):
        raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr(bench_ttft, "profile_op_time", broken)
    spec = models.get_spec("micro")
    model, _ = models.build_model("micro", device="cpu", dtype=torch.float32)
    inputs = models.make_batch(spec, 1, 3)
    handle = patterns.apply_earlytom(model, preset("videomme", 0.25), "forced-nomerge")
    try:
        row = bench_ttft.measure(model, inputs, "cpu", handle=handle, warmup=0, iters=1, profile=True)
    finally:
        handle.remove()
    assert row["ttft_ms"] > 0 and row["ops_ms"] is not None
    assert row["ops_kernel_error"] == "RuntimeError: CUPTI unavailable"
    assert "ops_kernel_ms" not in row and "ops_kernel_share_pct" not in row
    # The handle's forced decisions are gone with it; the model is the stock one again.
    assert "generate" not in model.__dict__ and "apply_pooling" not in model.model.__dict__


def test_bench_glue_quick():
    from bench import bench_glue

    rows = bench_glue.benchmark(quick=True)
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        # 8 frames x 196 placeholders + the newline, 32 text tokens (+ b for sample b, left padded)
        assert r["prompt_tokens"] == 8 * 196 + 1 + 32 + r["batch"] - 1
        assert 32 < r["compressed_tokens"] < r["prompt_tokens"]
        assert r["runs_us"] > 0 and r["rewrite_us"] > 0 and r["plan_us"] > 0
        # generate's model-config check: transformers 5 only (4.x has none).
        checks = (r["config_check_hf_us"], r["config_check_us"])
        assert checks == (None, None) or min(checks) > 0


def _x(cat, name, ts, dur, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}


def test_profile_gaps_from_a_hand_written_trace():
    from bench.profile_ttft import analyse

    trace = {
        "traceEvents": [
            _x("user_annotation", "ttft", 1000, 1000),
            _x("user_annotation", "earlytom.encode", 1005, 400),
            _x("user_annotation", "vision_tower", 1010, 300),
            _x("user_annotation", "language_model", 1500, 400),
            _x("cpu_op", "aten::mm", 1020, 5),
            _x("cpu_op", "earlytom::merge_frames", 1200, 50),
            _x("cpu_op", "aten::linear", 1510, 5),
            _x("cuda_runtime", "cudaLaunchKernel", 1021, 2, correlation=1),
            _x("cuda_runtime", "cudaLaunchKernel", 1210, 2, correlation=2),
            _x("cuda_runtime", "cudaLaunchKernel", 1512, 2, correlation=3),
            _x("cuda_runtime", "cudaLaunchKernel", 1600, 2, correlation=4),
            _x("kernel", "k1", 1050, 100, correlation=1),
            _x("kernel", "k2", 1250, 50, correlation=2),
            _x("kernel", "k3", 1520, 200, correlation=3),
            _x("gpu_memcpy", "copy", 1700, 50, correlation=4),  # overlaps k3: no gap
        ]
    }
    a = analyse(trace)
    assert a["device_events"] == 4
    assert a["wall_ms"] == pytest.approx(1.0)
    assert a["device_busy_ms"] == pytest.approx(0.38)  # 100 + 50 + 200 + 30
    assert a["device_idle_ms"] == pytest.approx(0.62)
    assert a["idle_in_gaps_ms"] == pytest.approx(0.37) and a["idle_after_last_ms"] == pytest.approx(0.25)
    assert a["idle_by_phase_ms"] == pytest.approx({"language_model": 0.22, "vision_tower": 0.15})
    assert list(a["idle_by_phase_ms"]) == ["language_model", "vision_tower"]  # largest first
    assert [(g["ms"], g["phase"], g["op"], g["after"], g["before"]) for g in a["top_gaps"]] == [
        (pytest.approx(0.22), "language_model", "aten::linear", "k2", "k3"),
        (pytest.approx(0.10), "vision_tower", "earlytom::merge_frames", "k1", "k2"),
        (pytest.approx(0.05), "vision_tower", "aten::mm", "(call start)", "k1"),  # innermost phase
    ]
    assert a["phases_seen"] == ["earlytom.encode", "language_model", "vision_tower"]
    a = analyse(trace, min_gap_us=60)
    assert [g["before"] for g in a["top_gaps"]] == ["k3", "k2"] and a["idle_in_gaps_ms"] == pytest.approx(0.32)
    with pytest.raises(ValueError, match="no 'ttft' annotation"):
        analyse({"traceEvents": trace["traceEvents"][1:]})
    # Two device events with the same start and length (e.g. a copy and a kernel) are one busy span.
    twin = trace["traceEvents"] + [_x("gpu_memset", "memset", 1050, 100, correlation=1)]
    assert analyse({"traceEvents": twin})["device_busy_ms"] == pytest.approx(0.38)


def test_profile_call_annotates_and_restores():
    from bench.profile_ttft import profile_call
    from earlytom_ext.integration import core

    spec = models.get_spec("micro")
    model, _ = models.build_model("micro", device="cpu", dtype=torch.float32)
    inputs = models.make_batch(spec, 1, 4, device="cpu", dtype=torch.float32, seed=0)
    tower = model.model.vision_tower
    hooks_before = (len(tower._forward_hooks), len(tower._forward_pre_hooks))
    rewrite = core.rewrite_placeholders
    a = profile_call(model, inputs, "cpu", warmup=0)
    assert {"vision_tower", "multi_modal_projector", "language_model", "prepare_inputs_for_generation"} <= set(
        a["phases_seen"]
    )
    assert a["device_events"] == 0 and a["top_gaps"] == []  # no device on the CPU
    import earlytom_ext

    cfg = EarlyTomConfig(retain_ratio=0.5, tau=0.5, max_window=4, ema=0.9, prune_layers=(0, 1))
    with earlytom_ext.apply(model, cfg) as h:
        a = profile_call(model, inputs, "cpu", handle=h, warmup=0)
        assert "_encode" not in h.__dict__ and "build_llm_inputs" not in h.adapter.__dict__
    assert {"earlytom.encode", "earlytom.prompt_rewrite", "earlytom.llm_inputs", "vision_tower"} <= set(
        a["phases_seen"]
    )
    assert "prepare_inputs_for_generation" not in model.__dict__ and core.rewrite_placeholders is rewrite
    assert (len(tower._forward_hooks), len(tower._forward_pre_hooks)) == hooks_before


def test_forced_pattern_reads_no_device_values(monkeypatch):
    """A forced pattern knows its frame counts on the host: it must not add device reads (host
    syncs on a GPU) to the path it measures."""
    if not _ops_ready():
        pytest.skip("earlytom ops are not all built yet (CPU kernels missing)")
    import os

    spec = models.get_spec("micro")
    model, _ = models.build_model("micro", device="cpu", dtype=torch.float32)
    inputs = models.make_batch(spec, 2, 6)
    reads = []
    here = os.path.join("bench", "patterns.py")

    def spy(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.endswith(here):
                reads.append(name)
            return orig(self, *args, **kwargs)

        return wrapper

    handle = patterns.apply_earlytom(model, preset("videomme", 0.1), "forced-merge")
    try:
        for name in ("tolist", "item", "__int__", "__bool__", "__index__", "cpu", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, spy(name))
        with torch.no_grad():
            handle.prepare_inputs(inputs["input_ids"], inputs["pixel_values_videos"], inputs["attention_mask"])
        monkeypatch.undo()
        frames = [f for v in handle.last_stats["videos"] for f in v["frames_after"].values()]
    finally:
        handle.remove()
    assert reads == []
    assert frames == patterns.forced_counts(6, preset("videomme", 0.1)) * 2


def test_forced_counts_of_without_device_reads():
    cfg = preset("videomme", 0.1)
    plans = patterns.ForcedPlans(cfg, "forced-merge")
    assert plans.counts_of(torch.tensor([7, 7]), 14) == (7, 7)  # the product's first counts: even split
    assert plans.counts_of([5, 3], 8) == (5, 3)
    p = plans.get((7, 7), "cpu")
    assert plans.counts_of(p["frame_counts"], int(p["frame_counts"].sum())) == tuple(p["frame_counts"].tolist())
    with pytest.raises(ValueError, match="videos of equal length: 15 frames in 2 videos"):
        plans.counts_of(torch.tensor([8, 7]), 15)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--frames", "0"], "--frames: must be >= 1, got 0"),
        (["--batch", "0"], "--batch: must be >= 1, got 0"),
        (["--iters", "0"], "--iters: must be >= 1, got 0"),
        (["--warmup", "-1"], "--warmup: must be >= 0, got -1"),
        (["--ratios", "1.5"], "--ratios: must be in (0, 1], got 1.5"),
        (["--device", "tpu"], "--device: must be cpu or cuda (cuda:N), got 'tpu'"),
        (["--out", __file__], "--out must be a folder, got the file"),
        (["--manifest", "/nonexistent/earlytom/m.txt"], "--manifest: the folder of /nonexistent/earlytom/m.txt"),
    ],
)
def test_bench_arguments_are_checked_by_the_parser(argv, needle, capsys):
    from bench import run

    with pytest.raises(SystemExit) as e:
        run.parse_args(["--flops", *argv])
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_goals_without_a_ttft_section():
    """A FLOPs-only run states its analytical FLOPs goal line; a run that asked for TTFT and got no
    headline row says so (hand-written results)."""
    from bench import report

    row = {"source": "analytical", "pattern": "forced-merge", "ratio": 0.1, "llm_merge": False}
    results = {
        "meta": {"headline_pattern": "forced-merge", "device": "cpu", "sections": ["flops"]},
        "env": {},
        "flops": [
            dict(row, ratio=0.2, flops_reduction_pct=50.0),
            dict(row, llm_merge=True, flops_reduction_pct=80.0),
            dict(row, flops_reduction_pct=61.25),
        ],
    }
    text = "\n".join(report.goals_section(results))
    assert "- FLOPs at r = 0.10 (forced-merge, analytical; no TTFT section in this run): **-61.2%**" in text
    assert "no result" not in text
    natural = dict(results, meta=dict(results["meta"], headline_pattern="natural"))
    text = "\n".join(report.goals_section(natural))
    assert "- No TTFT section in this run, and no analytical FLOPs row at r = 0.10 for natural." in text
    results["meta"]["sections"] = ["ttft", "flops"]
    text = "\n".join(report.goals_section(results))
    assert "- TTFT speed-up at r = 0.10: no result (see Errors / Skipped)." in text
    assert "analytical" not in text
