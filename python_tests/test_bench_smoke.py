"""Smoke test of the benchmarks: the CPU quick path of bench/run.py in a temp dir, plus the pieces
that need no model (the analytical FLOPs and the forced merge patterns, checked against the
reference walk)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from earlytom_ext import EarlyTomConfig, preset, reference as R  # noqa: E402

from bench import flops, models  # noqa: E402

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
    counts = models.forced_counts(32, cfg)
    res = flops.compare(spec, [32], [32 * 196 + 1 + 32], [628 + 1 + 32], cfg.prune_layers, [counts])
    # Layers 0..10 on 32 frames, 11..21 on 20, 22..23 on 12, 24..25 on 8.
    per = flops.layer_flops(729, 1152, 4304)
    assert res["encoder_tflops"] * 1e12 == pytest.approx((11 * 32 + 11 * 20 + 2 * 12 + 2 * 8) * per)
    assert 50.0 < res["flops_reduction_pct"] < 95.0


def test_forced_counts_and_tokens():
    for r in (0.10, 0.15, 0.20, 0.25):
        cfg = preset("videomme", r)
        assert models.forced_counts(32, cfg, "forced-merge") == [20, 12, 8]
        assert models.forced_counts(32, cfg, "forced-nomerge") == [26, 21, 17]
        kept = models.forced_video_tokens(32, cfg)
        assert abs(kept - r * 32 * 196) <= 8  # r' keeps the budget
    assert models.forced_video_tokens(32, preset("videomme", 0.10)) == 4 * 79 + 4 * 78
    with pytest.raises(ValueError):
        models.forced_counts(32, preset("videomme", 0.10), "bogus")


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
    for s, e in models.forced_segments(T, window):
        n = e - s + 1
        merge_angles += [0.0, 0.30, 0.32, 0.33, 0.34][:n] if n < 5 else [0.0, 0.30, 0.32, 0.9, 1.2]
        keep_angles += [0.0] * n if n < 3 else [0.0] + [1.0 * k for k in range(1, n - 1)] + [0.1]
    for pattern, angles in (("forced-merge", merge_angles), ("forced-nomerge", keep_angles)):
        x = _unit_frames(angles)
        ref_plan, ref_segs = R.merge_plan(x, cfg)
        plan, segs = models.forced_plan(T, window, pattern == "forced-merge", keep_last)
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
    for name, value in (("nvmlInit", None), ("nvmlShutdown", None), ("nvmlDeviceGetHandleByIndex", object()),
                        ("nvmlDeviceGetName", b"GPU"), ("nvmlSystemGetDriverVersion", "580"),
                        ("nvmlSystemGetCudaDriverVersion", 13000), ("nvmlDeviceGetMemoryInfo", mem),
                        ("nvmlDeviceGetClockInfo", 1980), ("nvmlDeviceGetMaxClockInfo", 1980),
                        ("nvmlDeviceGetPowerManagementLimit", 700000), ("nvmlDeviceGetTemperature", 40),
                        ("nvmlDeviceGetPersistenceMode", 1)):
        setattr(mod, name, call(name, value))
    return mod


@pytest.mark.parametrize("fail_at", [None, "nvmlInit", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetClockInfo"])
def test_nvml_info_never_raises(monkeypatch, fail_at):
    """The GPU run reads NVML before any work: a refused call must not end the run."""
    from bench import run

    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail_at))
    info = run.nvml_info(0)
    if fail_at in ("nvmlInit", "nvmlDeviceGetHandleByIndex"):
        assert set(info) == {"nvml"} and "refused" in info["nvml"]
        return
    assert info["name"] == "GPU" and info["memory_total_gib"] == pytest.approx(80.0)
    assert info["power_limit_w"] == pytest.approx(700.0)
    if fail_at == "nvmlDeviceGetClockInfo":
        assert info["sm_clock_mhz"] is None and info["mem_clock_mhz"] is None
    else:
        assert info["sm_clock_mhz"] == 1980


# ---------------------------------------------------------------------------------------------
# The CPU quick run of bench/run.py
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("transformers")
    from bench import run

    out = tmp_path_factory.mktemp("bench")
    manifest = out / "manifest.txt"
    results = run.main(["--device", "cpu", "--quick", "--all", "--model", "micro", "--out", str(out), "--frames", "4",
                        "--iters", "1", "--warmup", "0", "--ratios", "0.1",
                        "--scaling-frames", "2", "4", "--scaling-batch", "1", "2", "--manifest", str(manifest)])
    return out, manifest, results


def test_quick_run_writes_labelled_outputs(quick_run):
    out, manifest, results = quick_run
    files = [Path(p) for p in manifest.read_text().split()]
    names = {p.name for p in files}
    md = [p for p in files if p.suffix == ".md"]
    js = [p for p in files if p.suffix == ".json"]
    assert len(md) == 1 and len(js) == 1
    assert all(p.exists() and p.parent == out for p in files)
    assert md[0].name.startswith("cpu-smoke-")
    text = md[0].read_text()
    assert "CPU SMOKE RUN" in text and "NOT performance results" in text
    data = json.loads(js[0].read_text())
    assert data["meta"]["label"].startswith("CPU smoke run")
    assert data["meta"]["complete"] is True
    assert data["meta"]["device"] == "cpu" and data["meta"]["model"] == "micro"
    assert data["env"]["torch"] == torch.__version__
    pytest.importorskip("matplotlib")
    for suffix in ("-speedup.png", "-breakdown.png", "-scaling.png"):
        png = [p for p in files if p.name.endswith(suffix)]
        assert len(png) == 1, (suffix, names)
        assert png[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_flops_section(quick_run):
    _, _, results = quick_run
    rows = results["flops"]
    analytical = [r for r in rows if r["source"] == "analytical"]
    assert {r["pattern"] for r in analytical} == set(models.FORCED_PATTERNS)
    for r in rows:
        assert r["total_tflops"] <= r["total_tflops_full"]
        assert math.isfinite(r["flops_reduction_pct"])


def test_quick_run_measured_sections(quick_run):
    """TTFT, encoder and scaling rows: complete once the ops and the integration exist."""
    _, _, results = quick_run
    if not _ops_ready():
        pytest.skip("earlytom ops are not all built yet (CPU kernels missing)")
    errors = [e for e in results["errors"] if "bench_" not in e]  # op microbenchmarks are others' modules
    assert not errors, errors
    ttft = results["ttft"]
    base = [r for r in ttft if r["config"] == "uncompressed"]
    comp = [r for r in ttft if r["config"] == "earlytom"]
    assert len(base) == 2
    assert [r["pattern"] for r in comp] == ["forced-merge", "forced-nomerge", "natural"]
    P = models.get_spec("micro").tokens_per_frame
    assert P == 16
    full_tokens = 4 * P + 1 + 32
    for r in base:
        assert r["prefill_tokens"] == full_tokens and r["ttft_ms"] > 0
    cfg = preset("videomme", 0.10)
    for r in comp:
        assert not r.get("error"), r.get("error")
        assert r["ttft_ms"] > 0 and r["speedup"] > 0
        assert r["prefill_tokens"] < full_tokens
        assert r["ops_ms"] is not None and r["ops_ms"] >= 0
        assert 0 <= r["ops_share_pct"] <= 100
        assert r["ops_kernel_ms"] >= 0
        assert len(r["frames_after_prune"]) == 1 and len(r["frames_after_prune"][0]) == 3
        if r["pattern"] in models.FORCED_PATTERNS:
            assert r["frames_after_prune"][0] == models.forced_counts(4, cfg, r["pattern"])
            kept = models.forced_video_tokens(4, cfg, r["pattern"], P=P)
            assert r["video_tokens"] == [kept + 1]
            assert r["prefill_tokens"] == kept + 1 + 32
    enc = results["encoder"]
    assert [r["config"] for r in enc] == ["uncompressed", "earlytom", "earlytom", "earlytom"]
    assert all(r["features_ms"] > 0 and r["tower_ms"] > 0 for r in enc)
    sc = results["scaling"]
    assert {(r["axis"], r["value"]) for r in sc} == {("frames", 2), ("frames", 4), ("batch", 1), ("batch", 2)}
    for r in sc:
        assert not r.get("error") and not r.get("skipped"), r
        assert r["ttft_ms"] > 0 and r["ttft_full_ms"] > 0
        assert r["prefill_tokens"] < r["prefill_tokens_full"]


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
    handle = bench_ttft.apply_earlytom(model, preset("videomme", 0.25), "forced-nomerge")
    try:
        row = bench_ttft.measure(model, inputs, "cpu", handle=handle, warmup=0, iters=1, profile=True)
    finally:
        handle.remove()
    assert row["ttft_ms"] > 0 and row["ops_ms"] is not None
    assert row["ops_kernel_error"] == "RuntimeError: CUPTI unavailable"
    assert "ops_kernel_ms" not in row and "ops_kernel_share_pct" not in row
