"""EarlyTom efficiency benchmarks: the paper's efficiency table for this implementation, side by
side with the uncompressed model, in one process on one GPU.

    python bench/run.py --all                      # GPU: LLaVA-OV-7B architecture, bf16, 32 frames
    python bench/run.py --device cpu --quick --all # smoke test: tiny model, few frames (CPU)

Sections (``--all`` runs every one): ``--ttft`` (headline: TTFT, speed-up, op share, peak memory,
prefill tokens), ``--encoder`` (video features: time, memory), ``--flops`` (the paper's
analytical count), ``--scaling`` (vs frames and vs batch), ``--kernels`` (the op
microbenchmarks in bench/bench_*.py).

Writes ``<out>/<device>-<date>.md`` (tables), ``.json`` (raw numbers) and three PNG plots
(``-speedup``, ``-breakdown``, ``-scaling``). GPU runs default to ``bench/results/``; CPU runs are
labelled as smoke runs and default to a fresh temporary folder. See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import bench_encoder, bench_ttft, flops as flops_mod, models  # noqa: E402
from bench.common import markdown_table  # noqa: E402

KERNEL_MODULES = ("bench_merge_frames", "bench_attention_received", "bench_select_tokens")
GOALS = {"ttft_speedup_r010_h100": 3.0, "ops_share_pct_max": 2.0}
PAPER = {"ttft_reduction_r010": 2.65, "flops_reduction_pct_r010": 61.0, "hardware": "A100", "dtype": "fp16",
         "model": "LLaVA-OneVision-7B"}


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------
def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


def nvml_info(index: int = 0) -> Dict[str, object]:
    """GPU name, clocks, memory, driver, power limit, temperature via nvidia-ml-py (read only)."""
    try:
        import pynvml
    except Exception as e:
        return {"nvml": f"unavailable ({type(e).__name__}: {e})"}
    info: Dict[str, object] = {}
    try:
        pynvml.nvmlInit()
    except Exception as e:
        return {"nvml": f"init failed ({e})"}
    try:
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:  # e.g. NVML's numbering differs from CUDA's, or a sandbox refuses it
            return {"nvml": f"no handle for device {index} ({type(e).__name__}: {e})"}

        def q(key, fn):
            try:
                v = fn()
                info[key] = v.decode() if isinstance(v, bytes) else v
            except Exception:
                info[key] = None

        q("name", lambda: pynvml.nvmlDeviceGetName(h))
        q("driver", pynvml.nvmlSystemGetDriverVersion)
        q("cuda_driver_version", pynvml.nvmlSystemGetCudaDriverVersion)
        q("memory_total_gib", lambda: pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30)
        q("memory_used_gib", lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**30)
        q("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))
        q("mem_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM))
        q("sm_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM))
        q("mem_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM))
        q("power_limit_w", lambda: pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000.0)
        q("temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
        q("persistence_mode", lambda: pynvml.nvmlDeviceGetPersistenceMode(h))
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return info


def environment(device: str) -> Dict[str, object]:
    env: Dict[str, object] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git_commit": _git_commit(),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except Exception as e:
        env["transformers"] = f"unavailable ({e})"
    try:
        import earlytom_ext
        from earlytom_ext import _ext

        env["earlytom_ext"] = earlytom_ext.__version__
        env["earlytom_ops_compiled"] = _ext.available()
        env["earlytom_cuda_kernels"] = _ext.has_cuda_kernels()
    except Exception as e:
        env["earlytom_ext"] = f"unavailable ({e})"
    if bench_ttft.is_cuda(device):
        idx = torch.device(device).index or 0
        p = torch.cuda.get_device_properties(idx)
        env["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                      "memory_gib": p.total_memory / 2**30}
        env["nvml"] = nvml_info(idx)
    return env


def device_slug(device: str) -> str:
    if not bench_ttft.is_cuda(device):
        return "cpu-smoke"
    name = torch.cuda.get_device_name(torch.device(device).index or 0)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
def run_kernels(device: str, quick: bool, log) -> Dict[str, object]:
    """The op microbenchmarks (bench/bench_<op>.py ``benchmark(device, quick)``), each optional."""
    out: Dict[str, object] = {}
    for name in KERNEL_MODULES:
        try:
            mod = importlib.import_module(f"bench.{name}")
        except ImportError as e:
            msg = f"bench/{name}.py is not available ({e}); skipped"
            log(f"  {msg}")
            out[name] = {"skipped": msg}
            continue
        try:
            t0 = time.perf_counter()
            rows = mod.benchmark(device=device, quick=quick)
            out[name] = {"rows": list(rows), "seconds": time.perf_counter() - t0}
            log(f"  {name}: {len(rows)} rows in {out[name]['seconds']:.1f} s")
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            log(f"  {name}: ERROR {type(e).__name__}: {e}")
    return out


def flops_rows(spec, ttft_rows: List[dict], frames: int, text_tokens: int, preset_name: str) -> List[dict]:
    """Analytical FLOPs: from the measured TTFT runs (actual frame and token counts) when there
    are any, plus the forced patterns computed without a model."""
    from earlytom_ext.config import preset

    rows = []
    for r in ttft_rows:
        if r.get("config") != "earlytom" or "total_tflops" not in r:
            continue
        rows.append({
            "source": "measured run", "pattern": r["pattern"], "ratio": r["ratio"],
            "frames_after_prune": _fmt_counts(r.get("frames_after_prune")),
            "prefill_tokens": r.get("prefill_tokens"),
            **{k: r[k] for k in ("encoder_tflops_full", "encoder_tflops", "llm_tflops_full", "llm_tflops",
                                 "total_tflops_full", "total_tflops", "encoder_reduction_pct",
                                 "llm_reduction_pct", "flops_reduction_pct")},
        })
    for pattern in models.FORCED_PATTERNS:
        for ratio in (0.10, 0.15, 0.20, 0.25):
            cfg = preset(preset_name, ratio)
            counts = models.forced_counts(frames, cfg, pattern)
            kept = models.forced_video_tokens(frames, cfg, pattern, spec.tokens_per_frame)
            full_len = models.video_placeholders(frames, spec) + text_tokens
            comp_len = kept + 1 + text_tokens
            row = {"source": "analytical", "pattern": pattern, "ratio": ratio,
                   "frames_after_prune": "/".join(map(str, counts)), "prefill_tokens": comp_len}
            row.update(flops_mod.compare(spec, [frames], [full_len], [comp_len], cfg.prune_layers, [counts]))
            rows.append(row)
    return rows


def _fmt_counts(c) -> str:
    if not c:
        return ""
    return "; ".join("/".join(str(x) for x in v) for v in c)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _ttft_table(rows: List[dict]) -> str:
    view = []
    for r in rows:
        v = dict(r)
        v["frames_after_prune"] = _fmt_counts(r.get("frames_after_prune"))
        v["config"] = r["config"] if r["config"] != "uncompressed" else f"uncompressed ({r['pattern']})"
        view.append(v)
    return markdown_table(view, ["config", "pattern", "ratio", "frames_after_prune", "prefill_tokens", "ttft_ms",
                                 "speedup", "vision_ms", "llm_ms", "other_ms", "ops_ms", "ops_share_pct",
                                 "ops_kernel_ms", "ops_kernel_share_pct", "peak_mem_gib", "flops_reduction_pct",
                                 "error"])


def _breakdown(r: dict) -> Dict[str, float]:
    """Vision encoder (without EarlyTom's steps) / EarlyTom ops / LLM prefill / other, in ms."""
    spans = r.get("op_spans_ms") or {}
    in_tower = sum(v for k, v in spans.items() if not k.startswith("stage2") and v is not None)
    after = sum(v for k, v in spans.items() if k.startswith("stage2") and v is not None)
    vision = (r.get("vision_ms") or 0.0) - in_tower
    other = (r.get("other_ms") or 0.0) - after
    return {"vision encoder": max(vision, 0.0), "EarlyTom ops": in_tower + after, "LLM prefill": r.get("llm_ms") or 0.0,
            "other": max(other, 0.0)}


def goals_section(results: dict, device: str) -> List[str]:
    lines = ["## Goals (reported, not asserted)", ""]
    head = [r for r in results.get("ttft", []) if r.get("config") == "earlytom" and r.get("pattern") == results["meta"]["headline_pattern"]
            and not r.get("error")]
    r010 = next((r for r in head if abs(r["ratio"] - 0.10) < 1e-9), None)
    gpu = results["env"].get("gpu", {}).get("name", "CPU")
    if r010 is not None:
        sp = r010.get("speedup")
        met = "met" if sp is not None and sp >= GOALS["ttft_speedup_r010_h100"] else "NOT met"
        sp_txt = f"{sp:.2f}x" if sp is not None else "n/a"
        lines.append(f"- TTFT speed-up at r = 0.10 ({results['meta']['headline_pattern']}): **{sp_txt}** on {gpu} "
                     f"(goal >= {GOALS['ttft_speedup_r010_h100']:.1f}x on H100: {met}; "
                     f"paper: {PAPER['ttft_reduction_r010']}x on {PAPER['hardware']}, {PAPER['dtype']}).")
        if r010.get("flops_reduction_pct") is not None:
            lines.append(f"- FLOPs at r = 0.10: **-{r010['flops_reduction_pct']:.1f}%** (paper: "
                         f"-{PAPER['flops_reduction_pct_r010']:.0f}%).")
    else:
        lines.append("- TTFT speed-up at r = 0.10: no result (see errors).")
    others = [r for r in results.get("ttft", []) if r.get("config") == "earlytom" and not r.get("error")
              and r.get("pattern") != results["meta"]["headline_pattern"] and abs(r["ratio"] - 0.10) < 1e-9
              and r.get("speedup") is not None]
    if others:
        lines.append("- Other merge patterns at r = 0.10: "
                     + ", ".join(f"{r['pattern']} {r['speedup']:.2f}x" for r in others) + ".")
    shares = [(r["ratio"], r.get("ops_share_pct")) for r in head if r.get("ops_share_pct") is not None]
    if shares:
        worst = max(s for _, s in shares)
        met = "met" if worst < GOALS["ops_share_pct_max"] else "NOT met"
        lines.append(f"- EarlyTom ops' share of compressed TTFT (CUDA-event spans): "
                     + ", ".join(f"r={a:.2f}: {s:.2f}%" for a, s in shares)
                     + f" (goal < {GOALS['ops_share_pct_max']:.0f}%: {met} at the worst ratio).")
    kshares = [(r["ratio"], r.get("ops_kernel_share_pct")) for r in head if r.get("ops_kernel_share_pct") is not None]
    if kshares:
        lines.append("- Kernel time only (torch.profiler, earlytom:: ops): "
                     + ", ".join(f"r={a:.2f}: {s:.2f}%" for a, s in kshares) + ".")
    if not bench_ttft.is_cuda(device):
        lines.append("- CPU smoke run: these numbers say nothing about GPU performance.")
    lines.append("")
    return lines


def write_markdown(path: Path, results: dict) -> None:
    meta, env = results["meta"], results["env"]
    cpu = not bench_ttft.is_cuda(meta["device"])
    L: List[str] = []
    title = env.get("gpu", {}).get("name", "CPU")
    L.append(f"# EarlyTom benchmark: {title}, {env['date_utc']}")
    L.append("")
    if cpu:
        L += ["> **CPU SMOKE RUN: tiny random model, few frames. Checks that the benchmark code runs;",
              "> the numbers are NOT performance results.**", ""]
    L += ["## Setup", ""]
    L.append(f"- model: `{meta['model']}` ({meta.get('model_info', {}).get('params', 0) / 1e9:.2f} B parameters, "
             f"random weights, {meta['dtype']}, attention `{meta.get('model_info', {}).get('attn_implementation')}`); "
             f"built in {meta.get('model_info', {}).get('build_s', 0):.1f} s")
    L.append(f"- input: batch {meta['batch']}, {meta['frames']} frames of {meta['spec']['image_size']}x"
             f"{meta['spec']['image_size']} (synthetic video), "
             f"{meta['text_tokens']} text tokens; `generate(max_new_tokens=1)`")
    L.append(f"- EarlyTom settings: `preset(\"{meta['preset']}\", r)` (max_window 6, ema 0.9; tau and prune layers per r)")
    L.append(f"- timing: CUDA events around each call, {meta['warmup']} warm-ups, median of {meta['iters']}"
             if not cpu else f"- timing: perf_counter, {meta['warmup']} warm-ups, median of {meta['iters']}")
    L.append(f"- headline merge pattern: `{meta['headline_pattern']}` (see \"Merge patterns\" in bench/README.md)")
    L.append(f"- run time: {meta.get('elapsed_s', 0):.0f} s")
    L.append("")
    env_rows = [{"key": k, "value": v} for k, v in env.items() if k not in ("gpu", "nvml")]
    for k, v in (env.get("gpu") or {}).items():
        env_rows.append({"key": f"gpu.{k}", "value": v})
    for k, v in (env.get("nvml") or {}).items():
        env_rows.append({"key": f"nvml.{k}", "value": v})
    L += ["<details><summary>environment</summary>", "", markdown_table(env_rows, ["key", "value"]), "", "</details>", ""]

    L += goals_section(results, meta["device"])

    ttft = results.get("ttft") or []
    if ttft:
        hp = meta["headline_pattern"]
        L += [f"## TTFT, pattern `{hp}` (headline)", ""]
        L.append(_ttft_table([r for r in ttft if r["config"] == "uncompressed" or r["pattern"] == hp]))
        L.append("")
        for pat in meta["patterns"]:
            if pat == hp:
                continue
            L += [f"## TTFT, pattern `{pat}`", ""]
            if pat == "natural":
                L += ["Random weights and a synthetic video: the segmentation is whatever these weights give, "
                      "not what a trained encoder gives on real video.", ""]
            L.append(_ttft_table([r for r in ttft if r["config"] == "earlytom" and r["pattern"] == pat]))
            L.append("")
        L += ["Columns: `vision_ms` / `llm_ms`: CUDA events at entry and exit of the vision tower and of the "
              "LLM forward; `other_ms` = TTFT minus both. `ops_ms`: EarlyTom's own CUDA-event spans "
              "(Stage I at each prune layer, attention score, refined segmentation, Stage II), stream time "
              "including host work and syncs (median); `ops_kernel_ms`: kernel time of top-level "
              "`earlytom::` operators from one torch.profiler run. `peak_mem_gib`: "
              "`torch.cuda.max_memory_allocated` over one call (weights included).", ""]
        bd = [dict(config=("uncompressed" if r["config"] == "uncompressed" else f"r={r['ratio']:.2f}"),
                   **{k: v for k, v in _breakdown(r).items()}) for r in ttft
              if (r["config"] == "uncompressed" and r["pattern"] == "before") or
              (r["config"] == "earlytom" and r["pattern"] == hp and not r.get("error"))]
        if bd:
            L += [f"### Time breakdown (ms, pattern `{hp}`)", "",
                  markdown_table(bd, ["config", "vision encoder", "EarlyTom ops", "LLM prefill", "other"]), ""]
        spans = [dict(ratio=r["ratio"], **(r.get("op_spans_ms") or {})) for r in ttft
                 if r["config"] == "earlytom" and r["pattern"] == hp and not r.get("error")]
        if spans:
            keys = sorted({k for s in spans for k in s if k != "ratio"})
            L += [f"### EarlyTom step spans (ms, pattern `{hp}`)", "", markdown_table(spans, ["ratio"] + keys), ""]

    enc = results.get("encoder") or []
    if enc:
        L += ["## Vision side: pixels to LLM-ready video tokens", "",
              "Uncompressed: `get_video_features` (stock path). EarlyTom: `handle.encode_videos` (the path the "
              "patched `generate` uses). `tower_ms`: the SigLIP forward alone (forward-hook events).", ""]
        view = []
        for r in enc:
            v = dict(r)
            v["frames_after_prune"] = _fmt_counts(r.get("frames_after_prune"))
            view.append(v)
        L.append(markdown_table(view, ["config", "pattern", "ratio", "frames_after_prune", "video_tokens", "features_ms",
                                       "features_speedup", "tower_ms", "tower_speedup", "ops_ms", "peak_mem_gib",
                                       "peak_over_weights_gib", "error"]))
        L.append("")

    fl = results.get("flops") or []
    if fl:
        L += ["## FLOPs (the paper's analytical count, `4nd² + 2n²d + 2ndm` per layer)", "",
              f"Encoder: each frame is a sequence of {meta['spec']['encoder_tokens_per_frame']} tokens; each "
              "layer counts the frames it runs on. LLM: the prefill sequence. TFLOPs per batch.", ""]
        L.append(markdown_table(fl, ["source", "pattern", "ratio", "frames_after_prune", "prefill_tokens",
                                     "encoder_tflops_full", "encoder_tflops", "llm_tflops_full", "llm_tflops",
                                     "total_tflops_full", "total_tflops", "flops_reduction_pct"]))
        L.append("")

    sc = results.get("scaling") or []
    if sc:
        L += [f"## Scaling (r = {sc[0].get('ratio')}, pattern `{sc[0].get('pattern')}`)", ""]
        for axis in ("frames", "batch"):
            rows = [r for r in sc if r["axis"] == axis]
            if rows:
                L += [f"### vs {axis}", "",
                      markdown_table(rows, ["batch", "frames", "prefill_tokens_full", "prefill_tokens", "ttft_full_ms",
                                            "ttft_ms", "speedup", "ops_ms", "ops_share_pct", "peak_mem_full_gib",
                                            "peak_mem_gib", "skipped", "error"]), ""]

    kr = results.get("kernels") or {}
    if kr:
        L += ["## Kernel microbenchmarks", ""]
        for name, res in kr.items():
            L.append(f"### {name}")
            L.append("")
            if "rows" in res and res["rows"]:
                cols = []
                for row in res["rows"]:
                    for k in row:
                        if k not in cols:
                            cols.append(k)
                L.append(markdown_table(res["rows"], cols))
            else:
                L.append(f"_{res.get('skipped') or res.get('error') or 'no rows'}_")
            L.append("")

    errs = results.get("errors") or []
    if errs:
        L += ["## Errors", ""] + [f"- {e}" for e in errs] + [""]
    skipped = results.get("skipped") or []
    if skipped:
        L += ["## Skipped", ""] + [f"- {e}" for e in skipped] + [""]
    path.write_text("\n".join(L))


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def write_plots(stem: Path, results: dict) -> List[Path]:
    """speed-up vs ratio, time breakdown, scaling (PNG, matplotlib Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        results.setdefault("errors", []).append(f"plots skipped: matplotlib unavailable ({e})")
        return []
    meta = results["meta"]
    label = results["env"].get("gpu", {}).get("name", "CPU smoke run (not a performance result)")
    files: List[Path] = []
    ttft = [r for r in results.get("ttft") or [] if not r.get("error")]
    enc = [r for r in results.get("encoder") or [] if not r.get("error")]

    # 1. speed-up vs ratio
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = ["o-", "v-.", "s--", "x:"]
    for pat, style in zip(meta["patterns"], styles):
        pts = sorted((r["ratio"], r["speedup"]) for r in ttft if r["config"] == "earlytom" and r["pattern"] == pat
                     and r.get("speedup"))
        if pts:
            ax.plot(*zip(*pts), style, label=f"TTFT ({pat})")
    pts = sorted((r["ratio"], r["features_speedup"]) for r in enc if r["config"] == "earlytom"
                 and r["pattern"] == meta["headline_pattern"] and r.get("features_speedup"))
    if pts:
        ax.plot(*zip(*pts), "^-", label=f"vision features ({meta['headline_pattern']})")
    pts = sorted((r["ratio"], r["total_tflops_full"] / r["total_tflops"]) for r in ttft if r["config"] == "earlytom"
                 and r["pattern"] == meta["headline_pattern"] and r.get("total_tflops"))
    if pts:
        ax.plot(*zip(*pts), "d:", label="FLOPs reduction (x)")
    ax.axhline(GOALS["ttft_speedup_r010_h100"], color="gray", lw=0.8, ls="--", label="goal 3.0x (r=0.1, H100)")
    ax.scatter([0.10], [PAPER["ttft_reduction_r010"]], marker="*", s=120, color="k", zorder=5,
               label="paper TTFT 2.65x (A100)")
    ax.set_xlabel("retain ratio r")
    ax.set_ylabel("speed-up vs uncompressed (x)")
    ax.set_title(f"EarlyTom speed-up, {label}", fontsize=9)
    ax.grid(alpha=0.3)
    _legend(ax)
    fig.tight_layout()
    p = Path(f"{stem}-speedup.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    files.append(p)

    # 2. time breakdown
    bars = [("uncompressed", _breakdown(r)) for r in ttft if r["config"] == "uncompressed" and r["pattern"] == "before"]
    bars += [(f"r={r['ratio']:.2f}", _breakdown(r)) for r in ttft
             if r["config"] == "earlytom" and r["pattern"] == meta["headline_pattern"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if bars:
        names = [b[0] for b in bars]
        bottoms = [0.0] * len(bars)
        for part, color in (("vision encoder", "#4C72B0"), ("EarlyTom ops", "#C44E52"), ("LLM prefill", "#55A868"),
                            ("other", "#8C8C8C")):
            vals = [b[1][part] for b in bars]
            ax.bar(names, vals, bottom=bottoms, label=part, color=color)
            bottoms = [a + b for a, b in zip(bottoms, vals)]
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(f"TTFT breakdown ({meta['headline_pattern']}), {label}", fontsize=9)
    _legend(ax)
    fig.tight_layout()
    p = Path(f"{stem}-breakdown.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    files.append(p)

    # 3. scaling
    sc = [r for r in results.get("scaling") or [] if r.get("ttft_ms")]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, axis, xlabel in ((axes[0], "frames", "frames (batch 1)"), (axes[1], "batch", "videos per batch")):
        rows = sorted((r for r in sc if r["axis"] == axis), key=lambda r: r["value"])
        if rows:
            xs = [r["value"] for r in rows]
            ax.plot(xs, [r["ttft_full_ms"] for r in rows], "o-", label="TTFT uncompressed")
            ax.plot(xs, [r["ttft_ms"] for r in rows], "s-", label="TTFT EarlyTom")
            ax.plot(xs, [r.get("ops_ms") or 0.0 for r in rows], "^--", label="EarlyTom ops")
            if axis == "frames":
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3, which="both")
        _legend(ax)
    fig.suptitle(f"Scaling (r = {sc[0]['ratio'] if sc else '-'}), {label}", fontsize=9)
    fig.tight_layout()
    p = Path(f"{stem}-scaling.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    files.append(p)
    return files


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="EarlyTom efficiency benchmarks (see bench/README.md)")
    ap.add_argument("--all", action="store_true", help="every section")
    ap.add_argument("--ttft", action="store_true")
    ap.add_argument("--encoder", action="store_true")
    ap.add_argument("--flops", action="store_true")
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke run)")
    ap.add_argument("--quick", action="store_true", help="tiny model, few frames, few iterations")
    ap.add_argument("--model", choices=sorted(models.SPECS), default=None,
                    help="default: llava-ov-7b on CUDA without --quick, tiny otherwise")
    ap.add_argument("--frames", type=int, default=None, help="default 32 (8 with --quick)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ratios", type=float, nargs="+", default=None)
    ap.add_argument("--patterns", nargs="+", default=None, choices=bench_ttft.PATTERNS,
                    help="merge patterns; the first is the headline (default: forced-merge forced-nomerge "
                         "natural)")
    ap.add_argument("--preset", default="videomme", help="benchmark preset of the paper's settings")
    ap.add_argument("--warmup", type=int, default=None, help="default 2 (1 with --quick)")
    ap.add_argument("--iters", type=int, default=None, help="default 7 (3 with --quick)")
    ap.add_argument("--scaling-frames", type=int, nargs="+", default=None)
    ap.add_argument("--scaling-batch", type=int, nargs="+", default=None)
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler op-time run")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--out", default=None, help="output folder (GPU default bench/results, CPU default a temp dir)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds after which remaining sections / configurations / scaling points are skipped "
                         "(default: 540 for full GPU runs, none otherwise)")
    ap.add_argument("--manifest", default=None, help="write the list of output files to this path")
    ap.add_argument("--cpu-threads", type=int, default=1,
                    help="torch threads for CPU runs (default 1: steady smoke runs on a shared machine)")
    args = ap.parse_args(argv)
    if not (args.all or args.ttft or args.encoder or args.flops or args.scaling or args.kernels):
        ap.error("choose --all or at least one of --ttft --encoder --flops --scaling --kernels")
    if args.all:
        args.ttft = args.encoder = args.flops = args.scaling = args.kernels = True
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.monotonic()
    device = args.device
    cuda = bench_ttft.is_cuda(device)
    if args.time_budget is None and cuda and not args.quick:
        args.time_budget = 540.0
    deadline = t_start + args.time_budget if args.time_budget else None
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU; use --device cpu --quick for a smoke run")
    quick = args.quick or not cuda
    model_name = args.model or ("tiny" if quick else "llava-ov-7b")
    dtype = torch.bfloat16 if cuda else torch.float32
    frames = args.frames or (8 if quick else 32)
    ratios = tuple(args.ratios) if args.ratios else ((0.10, 0.25) if quick else (0.10, 0.15, 0.20, 0.25))
    # Every pattern in quick runs too: the CPU smoke run goes through the same configurations.
    patterns = tuple(args.patterns) if args.patterns else ("forced-merge", "forced-nomerge", "natural")
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    iters = args.iters if args.iters is not None else (3 if quick else 7)
    sc_frames = tuple(args.scaling_frames) if args.scaling_frames else ((4, 8) if quick else (8, 16, 32, 64, 128))
    sc_batch = tuple(args.scaling_batch) if args.scaling_batch else ((1, 2) if quick else (1, 2, 4))
    text_tokens = 32  # models.make_inputs: 14 prefix + 18 suffix

    if args.out:
        out_dir = Path(args.out)
    elif cuda:
        out_dir = ROOT / "bench" / "results"
    else:
        out_dir = Path(tempfile.mkdtemp(prefix="earlytom-bench-cpu-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    stem = out_dir / f"{device_slug(device)}-{date}"
    if any(Path(f"{stem}{s}").exists() for s in (".md", ".json")):
        stem = out_dir / f"{device_slug(device)}-{date}-{_dt.datetime.now(_dt.timezone.utc).strftime('%H%M%S')}"

    def log(msg: str) -> None:
        print(f"[bench {time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    spec = models.get_spec(model_name)
    results: dict = {
        "meta": {"device": device, "quick": quick, "model": model_name, "dtype": str(dtype).replace("torch.", ""),
                 "frames": frames, "batch": args.batch, "ratios": list(ratios), "patterns": list(patterns),
                 "headline_pattern": patterns[0], "preset": args.preset, "warmup": warmup, "iters": iters,
                 "text_tokens": text_tokens, "spec": spec.to_dict(), "goals": GOALS, "paper": PAPER,
                 "label": "CPU smoke run, not a performance result" if not cuda else "GPU run"},
        "env": environment(device),
        "errors": [],
        "skipped": [],
    }
    log(f"device {device} ({results['env'].get('gpu', {}).get('name', 'CPU')}), model {model_name}, {frames} frames, "
        f"batch {args.batch}, output {stem}.*")

    need_model = args.ttft or args.encoder or args.scaling
    model = None
    if need_model:
        try:
            model, info = models.build_model(model_name, device=device, dtype=dtype)
            info["weights_finite"] = models.check_weights_finite(model)
            results["meta"]["model_info"] = info
            if not info["weights_finite"]:
                results["errors"].append("the random weights contain NaN/Inf")
            log(f"model built in {info['build_s']:.1f} s ({info['params'] / 1e9:.2f} B parameters)")
        except Exception as e:
            results["errors"].append(f"model build failed: {type(e).__name__}: {e}")
            log(f"model build FAILED: {e}")
            traceback.print_exc()

    files: List[Path] = []
    md, js = Path(f"{stem}.md"), Path(f"{stem}.json")

    def write_outputs(final: bool) -> None:
        """md + json (+ plots when final) and the manifest; called after every section so a run
        stopped by a time limit still leaves its finished sections behind."""
        nonlocal files
        results["meta"]["elapsed_s"] = time.monotonic() - t_start
        results["meta"]["complete"] = final
        plots: List[Path] = []
        if final and not args.no_plots:
            try:
                plots = write_plots(stem, results)
            except Exception as e:
                results["errors"].append(f"plots failed: {type(e).__name__}: {e}")
                traceback.print_exc()
        files = [md, js] + plots
        results["meta"]["files"] = [str(p) for p in files]
        write_markdown(md, results)
        js.write_text(json.dumps(results, indent=1, default=str))
        if args.manifest:
            Path(args.manifest).write_text("\n".join(str(p.resolve()) for p in files) + "\n")

    def section(name, fn):
        if deadline is not None and time.monotonic() > deadline and name != "flops":
            results["skipped"].append(f"{name}: time budget of {args.time_budget:.0f} s used up")
            log(f"section {name} skipped (time budget)")
            return
        log(f"section {name}")
        try:
            results[name] = fn()
        except Exception as e:
            results["errors"].append(f"{name}: {type(e).__name__}: {e}")
            log(f"section {name} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
        if cuda:
            torch.cuda.empty_cache()
        write_outputs(final=False)

    # A time limit (SIGTERM from `timeout`) ends the run through KeyboardInterrupt, so the
    # finished sections are still written.
    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    prev_term = signal.signal(signal.SIGTERM, on_term)
    prev_threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(max(1, args.cpu_threads))
    try:
        if args.ttft and model is not None:
            section("ttft", lambda: bench_ttft.benchmark(
                model, spec, device, frames=frames, batch=args.batch, ratios=ratios, patterns=patterns,
                benchmark_preset=args.preset, warmup=warmup, iters=iters, profile=not args.no_profile,
                dtype=dtype, deadline=deadline, log=log))
        if args.encoder and model is not None:
            section("encoder", lambda: bench_encoder.benchmark(
                model, spec, device, frames=frames, batch=args.batch, ratios=ratios, patterns=patterns,
                benchmark_preset=args.preset, warmup=warmup, iters=iters, dtype=dtype, deadline=deadline,
                log=log))
        if args.flops:
            section("flops", lambda: flops_rows(spec, results.get("ttft") or [], frames, text_tokens, args.preset))
        if args.kernels:
            section("kernels", lambda: run_kernels(device, quick, log))
        if args.scaling and model is not None:
            section("scaling", lambda: bench_ttft.scaling(
                model, spec, device, frames_list=sc_frames, batch_list=sc_batch, base_frames=frames,
                ratio=ratios[0], pattern=patterns[0], benchmark_preset=args.preset, warmup=warmup,
                iters=max(5, iters - 2) if not quick else iters, dtype=dtype, deadline=deadline, log=log))
    except KeyboardInterrupt as e:
        results["errors"].append(f"run interrupted ({e}); the sections above are complete")
        log(f"interrupted: {e}")
    finally:
        signal.signal(signal.SIGTERM, prev_term)
        torch.set_num_threads(prev_threads)
        for r in results.get("scaling") or []:
            if r.get("skipped"):
                results["skipped"].append(f"scaling B={r['batch']} T={r['frames']}: {r['skipped']}")
            if r.get("error"):
                results["errors"].append(f"scaling B={r['batch']} T={r['frames']}: {r['error']}")
        for name in ("ttft", "encoder"):
            for r in results.get(name) or []:
                if r.get("error"):
                    where = f"{name} r={r.get('ratio')} {r.get('pattern')}"
                    if str(r["error"]).startswith("skipped"):
                        results["skipped"].append(f"{where}: {r['error']}")
                    else:
                        results["errors"].append(f"{where}: {r['error']}")
                if r.get("ops_kernel_error"):
                    results["errors"].append(f"{name} r={r.get('ratio')} {r.get('pattern')}: torch.profiler "
                                             f"failed ({r['ops_kernel_error']}); the timings are kept")
        for name, res in (results.get("kernels") or {}).items():
            if res.get("error"):
                results["errors"].append(f"kernels {name}: {res['error']}")
            if res.get("skipped"):
                results["skipped"].append(f"kernels {name}: {res['skipped']}")
        write_outputs(final=True)
    log(f"wrote {', '.join(str(p) for p in files)}")
    print()
    print("\n".join(goals_section(results, device)))
    for key in ("errors", "skipped"):
        if results[key]:
            print(f"{key}:")
            for e in results[key]:
                print(f"  - {e}")
    return results


if __name__ == "__main__":
    # Exit status 1 when a part failed (skipped parts do not count), so scripts can tell.
    sys.exit(1 if main()["errors"] else 0)
