"""Vision side of LLaVA-OneVision, baselines vs EarlyTom: time and peak memory.

Every configuration runs the path from pixels to the LLM-ready video tokens on the same model
(SigLIP-so400m architecture, 26 layers, random weights):

* ``stock`` / ``fastpool``: ``model.model.get_video_features(pixel_values_videos, -1, "full")``
  (the Hugging Face path: the tower with all hidden states, projector, 27x27 -> 14x14 pooling),
  without and with ``earlytom_ext.fast_pooling``: ``T*196 + 1`` tokens per video;
* EarlyTom: ``handle.encode_videos(pixel_values_videos)`` after ``earlytom_ext.apply``, which is
  what the patched ``generate`` calls: the tower with Stage I after the prune layers (later
  layers run on fewer frames), the attention score, the projector and pooling, Stage II and the
  newline.

Reported per configuration (CUDA events, warm-up, median): ``features_ms`` (the whole path),
``tower_ms`` (the SigLIP forward alone, from forward-hook events on the tower; for EarlyTom it
contains Stage I and the score), EarlyTom's op spans, peak memory of one extra call, and the
frames left after each prune layer.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from bench import models
from bench.bench_ttft import (
    BASELINES,
    baseline_available,
    frames_after,
    handle_timings,
    install_baseline,
    op_spans,
    timers_for,
)
from bench.common import Budget, is_cuda, median, peak_memory, run_points, timed_calls
from bench.patterns import PATTERNS, apply_earlytom

__all__ = ["stock_video_features", "benchmark"]


def stock_video_features(model, videos):
    """The unpatched model's video features call (keyword names differ across transformers
    versions: ``pixel_values_videos`` in 5.x, ``pixel_values`` in 4.x)."""
    fn = model.model.get_video_features
    params = inspect.signature(fn).parameters
    key = "pixel_values_videos" if "pixel_values_videos" in params else "pixel_values"
    kwargs = {
        key: videos,
        "vision_feature_layer": model.config.vision_feature_layer,
        "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
    }
    return lambda: fn(**kwargs)


def _measure(fn, model, device, warmup: int, iters: int, handle=None) -> dict:
    timers = timers_for(model, device)
    tower, ops = [], []

    def after(_):
        tower.append(timers.collect()["vision"])
        if handle is not None:
            ops.append(sum(op_spans(handle_timings(handle)).values()))

    try:
        with torch.no_grad():
            total = timed_calls(fn, device, warmup=warmup, iters=iters, before=timers.reset, after=after)
    finally:
        timers.remove()
    with torch.no_grad():
        mem = peak_memory(fn, device)
    row = {
        "features_ms": median(total),
        "features_min_ms": min(total),
        "tower_ms": median(tower),
        "iters": iters,
        "warmup": warmup,
    }
    if handle is not None:
        row["ops_ms"] = median(ops)
    row.update(mem)
    return row


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
    warmup: int = 2,
    iters: int = 7,
    dtype=torch.bfloat16,
    seed: int = 0,
    budget: Budget | None = None,
    log=print,
) -> list[dict]:
    """Both baselines vs EarlyTom's video features at each ratio and merge pattern
    (configurations past the budget are skipped and reported)."""
    from earlytom_ext.config import preset

    budget = budget or Budget()
    videos = models.make_batch(spec, batch, frames, device=device, dtype=dtype, seed=seed)["pixel_values_videos"]
    common = {"frames": frames, "batch": batch}
    points = [dict(config="uncompressed", baseline=b, pattern="-", ratio=1.0, **common) for b in BASELINES]
    points += [dict(config="earlytom", pattern=p, ratio=r, **common) for p in patterns for r in ratios]

    def measure_point(row: dict) -> None:
        if row["config"] == "uncompressed":
            ok, why = baseline_available(row["baseline"])
            if not ok:
                row["skipped"] = why
                return
            h = install_baseline(model, row["baseline"])
            try:
                row.update(_measure(stock_video_features(model, videos), model, device, warmup, iters))
            finally:
                if h is not None:
                    h.remove()
            row["video_tokens"] = models.video_placeholders(frames, spec)
            log(f"  encoder {row['baseline']}: features {row['features_ms']:.2f} ms, tower {row['tower_ms']:.2f} ms")
            return
        cfg = preset(benchmark_preset, row["ratio"])
        row["prune_layers"] = list(cfg.prune_layers)
        handle = apply_earlytom(model, cfg, row["pattern"])
        try:
            if not callable(getattr(handle, "encode_videos", None)):
                row["skipped"] = "the handle has no encode_videos in this version"
                return
            row.update(_measure(lambda: handle.encode_videos(videos), model, device, warmup, iters, handle))
            stats = getattr(handle, "last_stats", None)
            row["frames_after_prune"] = frames_after(stats)
            videos_stats = (stats or {}).get("videos") or []
            row["video_tokens"] = int(videos_stats[0]["tokens_after"]) if videos_stats else None
            row["op_spans_ms"] = op_spans(handle_timings(handle))
        finally:
            handle.remove()
        log(
            f"  encoder r={row['ratio']:.2f} {row['pattern']}: features {row['features_ms']:.2f} ms, "
            f"frames {row['frames_after_prune']}"
        )

    rows = run_points(
        points,
        measure_point,
        budget=budget,
        device=device,
        log=log,
        label=lambda r: f"encoder {r.get('baseline') or ''} r={r['ratio']} {r['pattern']}",
    )
    base = {r["baseline"]: r for r in rows if r["config"] == "uncompressed" and r.get("features_ms")}
    for r in rows:
        if not r.get("features_ms") or r.get("baseline") == "stock":
            continue
        if "stock" in base:
            r["features_speedup"] = base["stock"]["features_ms"] / r["features_ms"]
            if r.get("tower_ms") and base["stock"].get("tower_ms"):
                r["tower_speedup"] = base["stock"]["tower_ms"] / r["tower_ms"]
        if "fastpool" in base and r["config"] == "earlytom":
            r["features_speedup_vs_fastpool"] = base["fastpool"]["features_ms"] / r["features_ms"]
    return rows


def main(argv=None) -> None:
    import argparse

    from bench.common import markdown_table

    ap = argparse.ArgumentParser(description="LLaVA-OneVision video features: stock, fast pooling, EarlyTom")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    quick = args.quick or not is_cuda(args.device)
    spec = models.get_spec("tiny" if quick else "llava-ov-7b")
    dtype = torch.float32 if not is_cuda(args.device) else torch.bfloat16
    model, _ = models.build_model(spec.name, device=args.device, dtype=dtype)
    rows = benchmark(
        model,
        spec,
        args.device,
        frames=8 if quick else 32,
        ratios=(0.10, 0.25) if quick else (0.10, 0.15, 0.20, 0.25),
        warmup=1 if quick else 2,
        iters=3 if quick else 7,
        dtype=dtype,
    )
    print(
        markdown_table(
            rows,
            [
                "config",
                "baseline",
                "pattern",
                "ratio",
                "features_ms",
                "features_speedup",
                "features_speedup_vs_fastpool",
                "tower_ms",
                "tower_speedup",
                "ops_ms",
                "peak_mem_gib",
                "video_tokens",
                "skipped",
                "error",
            ],
        )
    )


if __name__ == "__main__":
    main()
