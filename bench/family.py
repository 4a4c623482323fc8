"""The TTFT section of one more model family (Qwen2.5-VL / Qwen2-VL, LLaVA-NeXT-Video): stock,
EarlyTom per ratio, and optional second baselines (stock + a fix EarlyTom's path also has), on one
7B-architecture model built for the section and freed after it."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from bench.bench_ttft import config_label, measure
from bench.common import Budget, free_memory, params_text, run_points
from bench.patterns import apply_earlytom

__all__ = ["apply_accepted", "family_benchmark", "ready_model"]


def apply_accepted(tiny_model, cfg, model_name: str) -> tuple[bool, str]:
    """Whether ``earlytom_ext.apply(tiny_model, cfg)`` succeeds (the section's check on the CPU
    before it builds a 7B model); ``(False, reason)`` otherwise."""
    import earlytom_ext

    try:
        handle = earlytom_ext.apply(tiny_model, cfg)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return False, f"earlytom_ext.apply does not accept {model_name} in this version: {first}"
    handle.remove()
    return True, ""


def ready_model(model, size: str, device: torch.device, dtype, t0: float) -> tuple[Any, dict]:
    """A freshly built benchmark model in eval mode without gradients, greedy with no end token
    (every call generates the tokens asked for); ``(model, info)`` with the build time since ``t0``."""
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.do_sample = model.config.pad_token_id, None, False
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(gc, k):
            setattr(gc, k, None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    info = {"model": size, "build_s": time.perf_counter() - t0, "params": sum(p.numel() for p in model.parameters())}
    return model, info


def family_benchmark(
    device,
    *,
    tag: str,
    family: str,
    model_name: str,
    prune_layers: Sequence[int],
    available: Callable[[], tuple[bool, str]],
    build: Callable[[], tuple[Any, dict]],
    make_inputs: Callable[[Any], dict],
    earlytom_config: Callable[[float], Any],
    geometry: Mapping[str, Any],
    ratios: Sequence[float],
    pattern: str,
    baselines: Mapping[str, Callable[[Any], Any]] | None = None,
    warmup: int,
    iters: int,
    budget: Budget | None = None,
    log=print,
) -> dict:
    """``{"rows": [...], "model_info": ...}`` or ``{"skipped": reason, "model_info": ...}``.

    ``available()`` says whether ``earlytom_ext.apply`` takes the family (checked before the model
    is built); ``baselines`` maps a baseline's name to a function that installs its fix on the
    model and returns a handle with ``remove()``; each EarlyTom row gets ``speedup`` (vs stock) and
    ``speedup_vs_<name>`` per baseline. ``geometry`` (frames, image size, batch) goes into every row.
    """
    budget = budget or Budget()
    baselines = dict(baselines or {})
    ok, why = available()
    if not ok:
        log(f"  {tag}: skipped ({why})")
        return {"skipped": why, "model_info": {"model": model_name, "family": family, "geometry": dict(geometry)}}
    model, info = build()
    info.update(family=family, prune_layers=list(prune_layers), geometry=dict(geometry))
    log(f"  {tag}: {info['model']} built in {info['build_s']:.1f} s ({params_text(info['params'])})")
    try:
        inputs = make_inputs(model)
        points = [dict(config="uncompressed", baseline="stock", ratio=1.0)]
        points += [dict(config="earlytom", pattern=pattern, ratio=r, llm_merge=False) for r in ratios]
        points += [dict(config="uncompressed", baseline=name, ratio=1.0) for name in baselines]

        def measure_point(row: dict) -> None:
            row.update(geometry)
            if row["config"] == "uncompressed":
                fix = baselines[row["baseline"]](model) if row["baseline"] in baselines else None
                try:
                    row.update(measure(model, inputs, device, warmup=warmup, iters=iters))
                finally:
                    if fix is not None:
                        fix.remove()
            else:
                handle = apply_earlytom(model, earlytom_config(row["ratio"]), pattern)
                try:
                    row.update(measure(model, inputs, device, handle=handle, warmup=warmup, iters=iters))
                finally:
                    handle.remove()
            log(f"  {tag} {config_label(row)}: TTFT {row['ttft_ms']:.2f} ms, prefill {row.get('prefill_tokens')}")

        rows = run_points(
            points, measure_point, budget=budget, device=device, log=log, label=lambda r: f"{tag} {config_label(r)}"
        )
    finally:
        model = None  # the 7B model's memory goes back before the next section
        free_memory(device)
    base = {
        r["baseline"]: r["ttft_ms"] for r in rows if r.get("config") == "uncompressed" and r.get("ttft_ms") is not None
    }
    for r in rows:
        if (r.get("config") == "uncompressed" and r.get("baseline") == "stock") or not r.get("ttft_ms"):
            continue
        if base.get("stock"):
            r["speedup"] = base["stock"] / r["ttft_ms"]
        for name in baselines:
            if base.get(name) and r.get("config") == "earlytom":
                r[f"speedup_vs_{name}"] = base[name] / r["ttft_ms"]
    return {"rows": rows, "model_info": info}
