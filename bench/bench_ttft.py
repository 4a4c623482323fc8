"""Time to first token of LLaVA-OneVision: two baselines vs EarlyTom, in one process.

TTFT is ``model.generate(**inputs, max_new_tokens=1)`` (vision encoder, projector, pooling,
EarlyTom's steps, prompt rewriting, embedding, LLM prefill, LM head, first-token choice), timed
with CUDA events around the call: warm-up calls, then the median of ``iters`` calls.

Baselines, both on the same model instance with nothing of EarlyTom installed:

* ``stock``: Hugging Face as it is;
* ``fastpool``: Hugging Face with ``earlytom_ext.fast_pooling(model)``, which replaces the
  video pooling (an NCHW-contiguous ``F.interpolate``, the largest single kernel of the stock
  path) by a bit-identical channels-last one. EarlyTom's speed-up against this baseline is the
  algorithm's gain without the pooling fix.

Per configuration this module also reports

* the time split (``PARTS``): the vision tower and the LLM prefill (forward hooks on
  ``vision_tower`` / ``language_model``), the projector and the pooling (a hook on
  ``multi_modal_projector`` and a wrapper around ``apply_pooling``; EarlyTom runs take them from
  the handle's spans when it reports them), EarlyTom's Stage II and prompt rewriting (the
  handle's spans), the setup before the prefill (from the ``generate`` call to the model's first
  ``forward``, minus the parts that ran in between: Hugging Face's generate setup and, with
  EarlyTom, the wrapper's own host work around the video path), and the generate overhead: TTFT
  minus every measured part (embedding, LM head, token choice, the remaining host work and gaps);
* the time in EarlyTom's ops, two ways: ``ops_ms``, the product's own CUDA-event spans (Stage I
  at each prune layer, attention score, refined segmentation, Stage II: stream time including
  the steps' host work and syncs) and ``ops_kernel_ms``, kernel time of the top-level
  ``earlytom::*`` operators in one ``torch.profiler`` run (GPU runs; a lower bound);
* peak memory of one extra call, prefill tokens (read by a hook), frames after every prune
  layer, and the paper's analytical FLOPs.

Merge patterns: see ``bench/patterns.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Callable

import torch

from bench import flops as flops_mod
from bench import models
from bench.common import Budget, HookTimers, Stamp, is_cuda, median, peak_memory, run_points, sync, timed_calls
from bench.patterns import PATTERNS, apply_earlytom

__all__ = [
    "OP_SPAN_PREFIXES",
    "PARTS",
    "BASELINES",
    "baseline_available",
    "install_baseline",
    "llm_merge_config",
    "timers_for",
    "handle_timings",
    "op_spans",
    "frames_after",
    "profile_op_time",
    "measure",
    "benchmark",
    "scaling",
]

OP_SPAN_PREFIXES = ("stage1_layer", "attention_score", "refine_segments", "stage2")
IN_TOWER_PREFIXES = ("stage1_layer", "attention_score", "refine_segments")
#: disjoint parts of TTFT (ms); ``overhead_ms`` is TTFT minus the ones that were measured.
PARTS = ("vision_ms", "projector_ms", "pooling_ms", "stage2_ms", "prompt_rewrite_ms", "setup_ms", "llm_ms")
#: parts that EarlyTom's generate runs before the model's first forward (its video path runs first).
BEFORE_FORWARD = ("vision_ms", "projector_ms", "pooling_ms", "stage2_ms", "prompt_rewrite_ms")
#: hook-timed parts: a baseline runs them inside the prefill forward (transformers 4.57) or before
#: it, in generate's setup (transformers 5.x encodes images and videos there).
HOOKED = {"vision_ms": "vision", "projector_ms": "projector", "pooling_ms": "pooling"}
BASELINES = ("stock", "fastpool")


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------
def baseline_available(name: str) -> tuple[bool, str]:
    """Whether a baseline can run here, and why not."""
    if name == "stock":
        return True, ""
    if name != "fastpool":
        raise ValueError(f"baseline must be one of {BASELINES}, got {name!r}")
    return True, ""


def install_baseline(model, name: str):
    """``None`` for ``stock``; the removable ``earlytom_ext.fast_pooling`` handle for ``fastpool``."""
    if name == "stock":
        return None
    ok, why = baseline_available(name)
    if not ok:
        raise RuntimeError(why)
    from earlytom_ext import fast_pooling

    return fast_pooling(model)


def llm_merge_config(benchmark_preset: str, ratio: float, text_layers: int | None = None):
    """``(config, None)`` of EarlyTom with the published inner-LLM merge at ``ratio``. A language
    model with no more layers than the merge layer (the tiny smoke-run models) merges at its middle
    layer instead."""
    import earlytom_ext

    cfg = earlytom_ext.preset(benchmark_preset, ratio, llm_merge=True)
    if text_layers is not None and cfg.llm_merge_layer >= text_layers:
        cfg = cfg.replace(llm_merge_layer=max(1, text_layers // 2))
    return cfg, None


def timers_for(model, device) -> HookTimers:
    """Hook timers on the parts of a LLaVA-OneVision (or Qwen2.5-VL / Qwen2-VL, LLaVA-NeXT-Video,
    Video-LLaVA) model: ``vision`` (every call of the tower videos go through), ``llm`` (its first call:
    the prefill), ``projector``, ``pooling``."""
    inner = model.model
    tower = getattr(inner, "video_tower", None)  # Video-LLaVA: videos have a tower of their own
    if tower is None:
        tower = getattr(inner, "vision_tower", None)
    if tower is None:
        tower = inner.visual  # Qwen: its merger (projector) runs inside the tower
    modules = {"vision": tower, "llm": inner.language_model}
    proj = getattr(inner, "multi_modal_projector", None)
    if proj is not None:
        modules["projector"] = proj
    methods = {"pooling": (inner, "apply_pooling")} if callable(getattr(inner, "apply_pooling", None)) else None
    return HookTimers(device, modules, first_only=("llm",), methods=methods)


# ---------------------------------------------------------------------------------------------
# Statistics of the handle (read defensively: a missing key is a blank)
# ---------------------------------------------------------------------------------------------
def handle_timings(handle) -> dict[str, float]:
    """``handle.last_stats["timings_ms"]`` (numbers only; empty when absent)."""
    stats = getattr(handle, "last_stats", None) if handle is not None else None
    t = (stats or {}).get("timings_ms") or {}
    return {k: float(v) for k, v in t.items() if isinstance(v, (int, float))}


def op_spans(timings: dict | None) -> dict[str, float]:
    """EarlyTom's own step spans (ms) from ``last_stats["timings_ms"]``."""
    return {k: float(v) for k, v in (timings or {}).items() if k.startswith(OP_SPAN_PREFIXES)}


def frames_after(stats: dict | None) -> list[list[int]]:
    """Per video, the frame counts after each prune layer (in layer order)."""
    out = []
    for v in (stats or {}).get("videos", []) or []:
        fa = v.get("frames_after") or {}
        out.append([int(fa[k]) for k in sorted(fa)])
    return out


def _video_stat(stats: dict | None, key: str, cast) -> list | None:
    videos = (stats or {}).get("videos") or []
    try:
        vals = [cast(v[key]) for v in videos]
    except (KeyError, TypeError, ValueError):
        return None
    return vals or None


# ---------------------------------------------------------------------------------------------
# Profiler: kernel time inside earlytom:: operators
# ---------------------------------------------------------------------------------------------
def profile_op_time(fn: Callable[[], object], device) -> dict[str, object]:
    """One profiled call of ``fn``: device (CUDA) or CPU time of top-level ``earlytom::`` ops."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda(device) else [])
    with warnings.catch_warnings():
        # torch 2.11 warns on every profile that events are cleared per cycle (one cycle here).
        warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
        with profile(activities=acts) as prof:
            fn()
            sync(device)
    per_op: dict[str, float] = {}
    total = 0.0
    for ev in prof.events():
        name = getattr(ev, "name", "") or getattr(ev, "key", "")
        if not name.startswith("earlytom::"):
            continue
        parent, nested = getattr(ev, "cpu_parent", None), False
        while parent is not None:
            if (getattr(parent, "name", "") or "").startswith("earlytom::"):
                nested = True
                break
            parent = getattr(parent, "cpu_parent", None)
        if nested:
            continue
        if is_cuda(device):
            us = getattr(ev, "device_time_total", None)
            if us is None:
                us = getattr(ev, "cuda_time_total", 0.0)
        else:
            us = ev.cpu_time_total
        per_op[name] = per_op.get(name, 0.0) + us / 1e3
        total += us / 1e3
    return {
        "ops_kernel_ms": total,
        "ops_kernel_by_op": per_op,
        "ops_kernel_kind": "cuda-kernel" if is_cuda(device) else "cpu",
    }


# ---------------------------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------------------------
def _split(parts: dict[str, float | None], timings: dict[str, float]) -> dict[str, float | None]:
    """One call's disjoint parts (ms): the handle's spans where it reports them, else the hooks
    (the vision tower: the hook, else the handle's ``vision_tower`` span for adapters that run
    the tower's layers themselves)."""
    vision = parts.get("vision")
    return {
        "vision_ms": vision if vision is not None else timings.get("vision_tower"),
        "projector_ms": timings.get("projector", parts.get("projector")),
        "pooling_ms": timings.get("pooling", parts.get("pooling")),
        "stage2_ms": timings.get("stage2"),
        "prompt_rewrite_ms": timings.get("prompt_rewrite"),
        "setup_ms": None,  # filled in by measure()
        "llm_ms": parts.get("llm"),
    }


def measure(
    model,
    inputs: dict,
    device,
    *,
    handle=None,
    warmup: int = 2,
    iters: int = 7,
    profile: bool = False,
    max_new_tokens: int = 1,
    peak: bool = True,
) -> dict:
    """TTFT and its split for one configuration (the model as it is: patched or not)."""
    timers = timers_for(model, device)
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
    calls: list[dict] = []
    last_out: list[object] = [None]
    cuda = is_cuda(device)
    marks: dict[str, Stamp | None] = {"call": None, "forward": None}

    def on_forward(module, args, kwargs):
        if marks["forward"] is None:  # the prefill
            marks["forward"] = Stamp(cuda)

    def before():
        timers.reset()
        marks["forward"] = None

    def call():
        marks["call"] = Stamp(cuda)
        return model.generate(**inputs, **gen_kwargs)

    def after(out):
        timings = handle_timings(handle)
        rec = _split(timers.collect(), timings)
        fwd = marks["forward"]
        if fwd is not None:
            if handle is not None:
                inside = BEFORE_FORWARD
            else:
                inside = tuple(k for k, name in HOOKED.items() if timers.ended_before(name, fwd))
            before_fwd = marks["call"].ms_until(fwd)
            rec["setup_ms"] = max(0.0, before_fwd - sum(rec[k] or 0.0 for k in inside))
        spans = op_spans(timings)
        rec["spans"] = spans
        rec["in_tower"] = sum(v for k, v in spans.items() if k.startswith(IN_TOWER_PREFIXES)) if spans else None
        calls.append(rec)
        last_out[0] = out

    fwd_hook = model.register_forward_pre_hook(on_forward, with_kwargs=True)
    try:
        with torch.no_grad():
            ttft = timed_calls(call, device, warmup=warmup, iters=iters, before=before, after=after)
            prefill_len = timers.prefill_len
    finally:
        fwd_hook.remove()
        timers.remove()
    mem, prof = {}, {}
    with torch.no_grad():
        if peak:
            mem = peak_memory(call, device)
        if profile:
            # The profiler (CUPTI on a GPU) is an extra: when it fails, the timings above stay.
            try:
                prof = profile_op_time(call, device)
            except Exception as e:
                prof = {"ops_kernel_error": f"{type(e).__name__}: {e}"}

    t_med = median(ttft)
    out = last_out[0]
    row = {
        "ttft_ms": t_med,
        "ttft_min_ms": min(ttft),
        "ttft_spread_pct": 100.0 * (max(ttft) - min(ttft)) / t_med if t_med else None,
        "iters": iters,
        "warmup": warmup,
        "prefill_tokens": prefill_len,
        "generated_shape": list(out.shape) if isinstance(out, torch.Tensor) else None,
    }
    for key in PARTS:
        row[key] = median(c[key] for c in calls)
    # Generate overhead per call (TTFT minus every part measured in that call), then the median.
    row["overhead_ms"] = median(t - sum(c[k] for k in PARTS if c[k] is not None) for t, c in zip(ttft, calls))
    if handle is not None:
        totals = [sum(c["spans"].values()) if c["spans"] else None for c in calls]
        row["ops_ms"] = median(totals)
        row["in_tower_ops_ms"] = median(c["in_tower"] for c in calls)
        row["ops_share_pct"] = 100.0 * row["ops_ms"] / t_med if t_med and row["ops_ms"] is not None else None
        keys = sorted({k for c in calls for k in c["spans"]})
        row["op_spans_ms"] = {k: median(c["spans"].get(k) for c in calls) for k in keys}
        stats = getattr(handle, "last_stats", None)
        row["frames_after_prune"] = frames_after(stats)
        row["video_tokens"] = _video_stat(stats, "tokens_after", int)
        row["adjusted_ratio"] = _video_stat(stats, "ratio", float)
        row["refined_segments"] = _video_stat(stats, "segments", len)
    row.update(mem)
    if prof:
        row.update(prof)
        if t_med and "ops_kernel_ms" in prof:
            row["ops_kernel_share_pct"] = 100.0 * prof["ops_kernel_ms"] / t_med
    return row


def _prefill_per_sample(handle) -> list[int] | None:
    li = getattr(handle, "last_inputs", None)
    mask = li.get("attention_mask") if isinstance(li, dict) else None
    return [int(x) for x in mask.sum(1).tolist()] if isinstance(mask, torch.Tensor) else None


def _llm_merge_removed(cfg, video_tokens: list[int] | None) -> tuple[int | None, list[int] | None]:
    """``(layer, tokens removed per sample)`` of the inner-LLM merge (the span is the video's
    tokens plus its newline; ``round(L * (1 - r))`` of them are kept, Python's rounding)."""
    layer = getattr(cfg, "llm_merge_layer", None)
    r_in = getattr(cfg, "llm_merge_ratio", None)
    if layer is None or r_in is None or not video_tokens:
        return None, None
    return int(layer), [L - int(round(L * (1.0 - float(r_in)))) for L in video_tokens]


# ---------------------------------------------------------------------------------------------
# The section
# ---------------------------------------------------------------------------------------------
_BASELINE_NAMES = {
    "stock": "stock HF",
    "fastpool": "stock HF + fast pooling",
    "fastwin": "stock HF + fast window attention",
}


def config_label(row: dict) -> str:
    """Short human name of a TTFT/scaling row."""
    if row.get("config") == "uncompressed":
        name = _BASELINE_NAMES.get(row.get("baseline"), f"stock HF + {row.get('baseline')}")
        return f"{name} ({row['when']})" if row.get("when") else name
    name = "EarlyTom + LLM merge" if row.get("llm_merge") else "EarlyTom"
    return f"{name} r={row.get('ratio')} {row.get('pattern')}"


def _add_speedups(rows: list[dict], key: str = "ttft_ms") -> None:
    """``speedup`` (vs stock HF) and ``speedup_vs_fastpool`` of every row, from the baselines
    measured before the EarlyTom runs."""
    base = {
        r["baseline"]: r.get(key)
        for r in rows
        if r.get("config") == "uncompressed" and r.get("when") == "before" and not r.get("error")
    }
    for r in rows:
        t = r.get(key)
        if not t or r.get("error") or r.get("skipped"):
            continue
        if r.get("config") == "uncompressed" and r.get("baseline") == "stock":
            continue
        if base.get("stock"):
            r["speedup"] = base["stock"] / t
        if base.get("fastpool") and not (r.get("config") == "uncompressed"):
            r["speedup_vs_fastpool"] = base["fastpool"] / t


def benchmark(
    model,
    spec,
    device="cuda",
    *,
    frames: int = 32,
    batch: int = 1,
    ratios: Sequence[float] = (0.10, 0.15, 0.20, 0.25),
    patterns: Sequence[str] = PATTERNS,
    benchmark_preset: str = "videomme",
    llm_merge_ratios: Sequence[float] = (0.10, 0.20),
    warmup: int = 2,
    iters: int = 7,
    profile: bool = True,
    dtype=torch.bfloat16,
    seed: int = 0,
    budget: Budget | None = None,
    log=print,
) -> list[dict]:
    """Both baselines (measured before and after the compressed runs) and EarlyTom at each ratio
    (the paper's ``preset(benchmark_preset, r)``) and merge pattern, plus EarlyTom with the
    inner-LLM merge at ``llm_merge_ratios`` (headline pattern) when the option exists. One row
    per run; runs past the budget are skipped and reported."""
    from earlytom_ext.config import preset

    budget = budget or Budget()
    inputs = models.make_batch(spec, batch, frames, device=device, dtype=dtype, seed=seed)
    full_lens = [int(x) for x in inputs["attention_mask"].sum(1).tolist()]
    common = {"frames": frames, "batch": batch}
    points: list[dict] = [
        dict(config="uncompressed", baseline=b, when="before", ratio=1.0, **common) for b in BASELINES
    ]
    for i, pattern in enumerate(patterns):
        points += [dict(config="earlytom", pattern=pattern, ratio=r, llm_merge=False, **common) for r in ratios]
        if i == 0:
            points += [
                dict(config="earlytom", pattern=pattern, ratio=r, llm_merge=True, **common) for r in llm_merge_ratios
            ]
    points += [dict(config="uncompressed", baseline=b, when="after", ratio=1.0, **common) for b in BASELINES]

    def warm_start() -> None:
        """A few untimed calls through EarlyTom's path (headline configuration) before anything
        is timed, so first-use costs (kernel loading, allocator growth, new GEMM shapes) do not
        land on the first configuration measured."""
        try:
            handle = apply_earlytom(model, preset(benchmark_preset, ratios[0]), patterns[0])
        except Exception as e:  # the configuration itself will report it
            log(f"  warm start skipped ({type(e).__name__}: {e})")
            return
        try:
            with torch.no_grad():
                for _ in range(max(2, warmup)):
                    model.generate(**inputs, max_new_tokens=1, do_sample=False)
            sync(device)
        finally:
            handle.remove()

    def measure_point(row: dict) -> None:
        if row["config"] == "uncompressed":
            ok, why = baseline_available(row["baseline"])
            if not ok:
                row["skipped"] = why
                return
            h = install_baseline(model, row["baseline"])
            try:
                row.update(measure(model, inputs, device, warmup=warmup, iters=iters))
            finally:
                if h is not None:
                    h.remove()
            row["prefill_tokens_per_sample"] = full_lens
            log(f"  {config_label(row)}: TTFT {row['ttft_ms']:.2f} ms")
            return
        r = row["ratio"]
        if row["llm_merge"]:
            cfg, why = llm_merge_config(benchmark_preset, r, spec.text_layers)
            if cfg is None:
                row["skipped"] = why
                return
            row.update(llm_merge_layer=cfg.llm_merge_layer, llm_merge_ratio=cfg.llm_merge_ratio)
        else:
            cfg = preset(benchmark_preset, r)
        row.update(tau=cfg.tau, prune_layers=list(cfg.prune_layers), max_window=cfg.max_window)
        handle = apply_earlytom(model, cfg, row["pattern"])
        try:
            row.update(measure(model, inputs, device, handle=handle, warmup=warmup, iters=iters, profile=profile))
            row["prefill_tokens_per_sample"] = _prefill_per_sample(handle)
        finally:
            handle.remove()
        fa = row.get("frames_after_prune") or []
        comp_lens = row.get("prefill_tokens_per_sample") or []
        if len(fa) == batch and len(comp_lens) == batch:
            layer, removed = _llm_merge_removed(cfg, row.get("video_tokens")) if row["llm_merge"] else (None, None)
            if not row["llm_merge"] or layer is not None:
                row.update(
                    flops_mod.compare(
                        spec,
                        [frames] * batch,
                        full_lens,
                        comp_lens,
                        cfg.prune_layers,
                        fa,
                        llm_merge_layer=layer,
                        llm_merge_removed=removed,
                    )
                )
        log(
            f"  {config_label(row)}: TTFT {row['ttft_ms']:.2f} ms, frames {fa}, prefill {row.get('prefill_tokens')}, "
            f"ops {row.get('ops_share_pct') or 0:.2f}%"
        )

    if ratios and patterns and not budget.expired():
        warm_start()
    rows = run_points(points, measure_point, budget=budget, device=device, log=log, label=config_label)
    _add_speedups(rows)
    return rows


def scaling(
    model,
    spec,
    device="cuda",
    *,
    frames_list: Sequence[int] = (8, 16, 32, 64, 128),
    batch_list: Sequence[int] = (1, 2, 4),
    base_frames: int = 32,
    ratio: float = 0.10,
    pattern: str = "forced-merge",
    benchmark_preset: str = "videomme",
    warmup: int = 1,
    iters: int = 3,
    dtype=torch.bfloat16,
    seed: int = 0,
    budget: Budget | None = None,
    log=print,
) -> list[dict]:
    """TTFT of both baselines and EarlyTom (``ratio``, ``pattern``) and EarlyTom's op time vs
    frames (batch 1) and vs batch (``base_frames`` frames). Points past the budget are skipped."""
    from earlytom_ext.config import preset

    budget = budget or Budget()
    cfg = preset(benchmark_preset, ratio)
    fast_ok, _ = baseline_available("fastpool")
    points = [dict(axis="frames", value=f, batch=1, frames=f) for f in frames_list] + [
        dict(axis="batch", value=b, batch=b, frames=base_frames) for b in batch_list
    ]
    done: dict[tuple, dict] = {}

    def measure_point(row: dict) -> None:
        key = (row["batch"], row["frames"])
        if key in done:  # frames=32/batch=1 appears on both axes: measure once
            row.update({k: v for k, v in done[key].items() if k not in ("axis", "value")})
            return
        row.update(ratio=ratio, pattern=pattern)
        inputs = models.make_batch(spec, row["batch"], row["frames"], device=device, dtype=dtype, seed=seed)
        base = measure(model, inputs, device, warmup=warmup, iters=iters)
        fast = None
        if fast_ok:
            h = install_baseline(model, "fastpool")
            try:
                fast = measure(model, inputs, device, warmup=warmup, iters=iters)
            finally:
                h.remove()
        handle = apply_earlytom(model, cfg, pattern)
        try:
            comp = measure(model, inputs, device, handle=handle, warmup=warmup, iters=iters)
        finally:
            handle.remove()
        row.update(
            {
                "ttft_full_ms": base["ttft_ms"],
                "ttft_fastpool_ms": fast["ttft_ms"] if fast else None,
                "ttft_ms": comp["ttft_ms"],
                "speedup": base["ttft_ms"] / comp["ttft_ms"],
                "speedup_vs_fastpool": fast["ttft_ms"] / comp["ttft_ms"] if fast else None,
                "ops_ms": comp.get("ops_ms"),
                "ops_share_pct": comp.get("ops_share_pct"),
                "vision_full_ms": base["vision_ms"],
                "vision_ms": comp["vision_ms"],
                "llm_full_ms": base["llm_ms"],
                "llm_ms": comp["llm_ms"],
                "prefill_tokens_full": base["prefill_tokens"],
                "prefill_tokens": comp["prefill_tokens"],
                "peak_mem_full_gib": base.get("peak_mem_gib"),
                "peak_mem_gib": comp.get("peak_mem_gib"),
                "frames_after_prune": comp.get("frames_after_prune"),
            }
        )
        done[key] = dict(row)
        log(
            f"  scaling B={row['batch']} T={row['frames']}: TTFT {base['ttft_ms']:.1f} -> {comp['ttft_ms']:.1f} ms "
            f"(x{row['speedup']:.2f}), ops {comp.get('ops_ms') or 0:.2f} ms"
        )

    return run_points(
        points,
        measure_point,
        budget=budget,
        device=device,
        log=log,
        label=lambda r: f"scaling B={r['batch']} T={r['frames']}",
    )


def main(argv=None) -> None:
    import argparse

    from bench.common import markdown_table

    ap = argparse.ArgumentParser(description="TTFT of LLaVA-OneVision: stock, stock + fast pooling, EarlyTom")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny model, few frames (smoke test)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--pattern", default="forced-merge", choices=PATTERNS)
    args = ap.parse_args(argv)
    quick = args.quick or not is_cuda(args.device)
    spec = models.get_spec("tiny" if quick else "llava-ov-7b")
    dtype = torch.float32 if not is_cuda(args.device) else torch.bfloat16
    model, info = models.build_model(spec.name, device=args.device, dtype=dtype)
    print(f"model {info}")
    rows = benchmark(
        model,
        spec,
        args.device,
        frames=args.frames or (8 if quick else 32),
        ratios=(0.10, 0.25) if quick else (0.10, 0.15, 0.20, 0.25),
        patterns=(args.pattern,),
        warmup=1 if quick else 2,
        iters=3 if quick else 7,
        profile=not quick,
        dtype=dtype,
    )
    for r in rows:
        r["name"] = config_label(r)
    print(
        markdown_table(
            rows,
            [
                "name",
                "ttft_ms",
                "speedup",
                "speedup_vs_fastpool",
                "prefill_tokens",
                "ops_ms",
                "ops_share_pct",
                "peak_mem_gib",
                "skipped",
                "error",
            ],
        )
    )


if __name__ == "__main__":
    main()
