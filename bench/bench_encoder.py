"""Vision side of LLaVA-OneVision, uncompressed vs EarlyTom: time and peak memory.

Both sides run the product path from pixels to the LLM-ready video tokens on the same model
(SigLIP-so400m architecture, 26 layers, random weights):

* uncompressed: ``model.model.get_video_features(pixel_values_videos, -1, "full")`` (the stock
  Hugging Face path: the tower with all hidden states, projector, 27x27 -> 14x14 pooling,
  newline): ``T*196 + 1`` tokens per video;
* EarlyTom: ``handle.encode_videos(pixel_values_videos)`` after ``earlytom_ext.apply``, which is
  what the patched ``generate`` calls: the tower with Stage I after the prune layers (later
  layers run on fewer frames), the attention score, the model's projector and pooling, Stage II
  and the newline.

Reported per configuration (CUDA events, 2 warm-ups, median of ``iters``): ``features_ms`` (the
whole path), ``tower_ms`` (the SigLIP forward alone, from forward-hook events on the tower; for
EarlyTom it contains Stage I and the score), EarlyTom's op spans (as in ``bench_ttft``), peak
memory of one extra call, and the frames left after each prune layer.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import models
from bench.bench_ttft import (ModuleTimers, Stamp, apply_earlytom, frames_after, is_cuda, median,
                              op_spans, peak_memory, sync)


def stock_video_features(model, videos):
    """The unpatched model's video features call (keyword names differ across transformers
    versions: ``pixel_values_videos`` in 5.x, ``pixel_values`` in 4.x)."""
    import inspect

    fn = model.model.get_video_features
    params = inspect.signature(fn).parameters
    key = "pixel_values_videos" if "pixel_values_videos" in params else "pixel_values"
    kwargs = {key: videos, "vision_feature_layer": model.config.vision_feature_layer,
              "vision_feature_select_strategy": model.config.vision_feature_select_strategy}
    return lambda: fn(**kwargs)


def _measure(fn, model, device, warmup: int, iters: int, handle=None) -> dict:
    timers = ModuleTimers(model, device)
    try:
        with torch.no_grad():
            for _ in range(warmup):
                fn()
            sync(device)
            total, tower, ops = [], [], []
            for _ in range(iters):
                timers.reset()
                a = Stamp(is_cuda(device))
                fn()
                b = Stamp(is_cuda(device))
                total.append(a.ms_until(b))
                tower.append(timers.collect()["vision_ms"])
                if handle is not None:
                    ops.append(sum(op_spans(handle.last_stats).values()))
            mem = peak_memory(fn, device)
    finally:
        timers.remove()
    row = {"features_ms": median(total), "features_min_ms": min(total), "tower_ms": median(tower),
           "iters": iters, "warmup": warmup}
    if handle is not None:
        row["ops_ms"] = median(ops)
    row.update(mem)
    return row


def benchmark(model, spec, device="cuda", *, frames: int = 32, batch: int = 1,
              ratios: Sequence[float] = (0.10, 0.15, 0.20, 0.25), patterns: Sequence[str] = ("forced-merge", "natural"),
              benchmark_preset: str = "videomme", warmup: int = 2, iters: int = 7, dtype=torch.bfloat16,
              seed: int = 0, deadline: Optional[float] = None, log=print) -> List[dict]:
    """Uncompressed vs EarlyTom video features at each ratio and merge pattern (configurations
    past ``deadline``, a ``time.monotonic()`` value, are skipped and reported)."""
    from earlytom_ext.config import preset

    videos = models.make_batch(spec, batch, frames, device=device, dtype=dtype, seed=seed)["pixel_values_videos"]
    rows: List[dict] = []
    base = _measure(stock_video_features(model, videos), model, device, warmup, iters)
    base.update(config="uncompressed", pattern="-", ratio=1.0, frames=frames, batch=batch,
                video_tokens=models.video_placeholders(frames, spec))
    rows.append(base)
    log(f"  encoder uncompressed: features {base['features_ms']:.2f} ms, tower {base['tower_ms']:.2f} ms")
    for pattern in patterns:
        for r in ratios:
            cfg = preset(benchmark_preset, r)
            row = {"config": "earlytom", "pattern": pattern, "ratio": r, "frames": frames, "batch": batch,
                   "prune_layers": list(cfg.prune_layers)}
            if deadline is not None and time.monotonic() > deadline:
                row["error"] = "skipped: time budget"
                rows.append(row)
                continue
            try:
                handle = apply_earlytom(model, cfg, pattern)
                try:
                    row.update(_measure(lambda: handle.encode_videos(videos), model, device, warmup, iters, handle))
                    stats = handle.last_stats
                    row["frames_after_prune"] = frames_after(stats)
                    row["video_tokens"] = int(stats["videos"][0]["tokens_after"]) if stats else None
                    row["op_spans_ms"] = op_spans(stats)
                finally:
                    handle.remove()
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                log(f"  encoder r={r} {pattern}: ERROR {row['error']}")
                rows.append(row)
                continue
            row["features_speedup"] = base["features_ms"] / row["features_ms"]
            row["tower_speedup"] = base["tower_ms"] / row["tower_ms"] if row.get("tower_ms") else None
            log(f"  encoder r={r:.2f} {pattern}: features {row['features_ms']:.2f} ms (x{row['features_speedup']:.2f}), "
                f"frames {row['frames_after_prune']}")
            rows.append(row)
    return rows


def main(argv=None) -> None:
    import argparse

    from bench.common import markdown_table

    ap = argparse.ArgumentParser(description="LLaVA-OneVision video features, uncompressed vs EarlyTom")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    quick = args.quick or not is_cuda(args.device)
    spec = models.get_spec("tiny" if quick else "llava-ov-7b")
    dtype = torch.float32 if not is_cuda(args.device) else torch.bfloat16
    model, _ = models.build_model(spec.name, device=args.device, dtype=dtype)
    rows = benchmark(model, spec, args.device, frames=8 if quick else 32,
                     ratios=(0.10, 0.25) if quick else (0.10, 0.15, 0.20, 0.25),
                     warmup=1 if quick else 2, iters=3 if quick else 7, dtype=dtype)
    print(markdown_table(rows, ["config", "pattern", "ratio", "features_ms", "features_speedup", "tower_ms",
                                "tower_speedup", "ops_ms", "peak_mem_gib", "video_tokens"]))


if __name__ == "__main__":
    main()
