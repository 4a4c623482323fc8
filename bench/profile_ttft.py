"""Where the GPU waits during one TTFT call: one ``generate(max_new_tokens=1)`` per configuration
(stock Hugging Face, EarlyTom) under ``torch.profiler``, reduced to the device's idle gaps and
what ended each of them.

    python -m bench.run --gaps            # the section of the benchmark run (GPU)
    python -m bench.profile_ttft          # alone: LLaVA-OV-7B architecture, 32 frames, bf16

The call is annotated with phases (``record_function`` ranges, installed for the profiled call
only): ``vision_tower``, ``multi_modal_projector`` and ``language_model`` (forward hooks; the
language model's first call is the prefill), EarlyTom's ``earlytom.encode`` (its vision path and
Stage II), ``earlytom.prompt_rewrite`` and ``earlytom.llm_inputs`` (the rewritten prompt and the
embeddings), and Hugging Face's ``prepare_inputs_for_generation``. A gap (no kernel, copy or
memset running) is charged to the innermost phase around the host call that launched the work
that ended it; host time the GPU never waited for costs nothing here. Reported per
configuration: the call's wall time, device busy and idle time, idle time per phase, and the
largest gaps (previous and next kernel, the launching operator).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import json
import os
import tempfile
import warnings
from collections.abc import Iterator

import torch

from bench import models
from bench.common import Budget, is_cuda, sync, wrap_attr
from bench.patterns import apply_earlytom

__all__ = ["analyse", "annotated", "profile_call", "benchmark", "main"]

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
CALL = "ttft"  # the annotation around the whole call


def _short(name: str, n: int = 72) -> str:
    """A kernel or operator name for a table cell (C++ templates make them long)."""
    name = name.replace("|", "/")
    return name if len(name) <= n else name[: n - 3] + "..."


def _intervals(events: list[dict], cats: tuple[str, ...]) -> list[tuple[float, float, dict]]:
    """``(start, end, event)`` of the events of these categories, by start (longest first)."""
    return sorted(
        ((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e) for e in events if e.get("cat") in cats),
        key=lambda t: (t[0], -t[1]),
    )


def _innermost(ranges: list[tuple[float, float, dict]], starts: list[float], t: float) -> dict | None:
    """The shortest range that contains ``t`` (ranges sorted by start)."""
    best = None
    for i in range(bisect.bisect_right(starts, t) - 1, -1, -1):
        a, b, e = ranges[i]
        if a <= t <= b and (best is None or b - a < best[1] - best[0]):
            best = (a, b, e)
    return best[2] if best else None


def analyse(trace: dict, *, min_gap_us: float = 10.0, top: int = 12) -> dict:
    """The device's idle gaps inside the ``ttft`` annotation of a Chrome trace (``torch.profiler``
    ``export_chrome_trace``): totals, idle time per phase, and the ``top`` largest gaps.

    Times are microseconds on the trace's clock. The window opens when the call starts on the
    host and closes at the later of its host end and its last device event; the idle time before
    the first device event (host work nothing was queued behind) is a gap like the others.
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    calls = [e for e in events if e.get("cat") == "user_annotation" and e.get("name") == CALL]
    if not calls:
        raise ValueError(f"the trace has no {CALL!r} annotation")
    call = calls[0]
    w0, w1 = float(call["ts"]), float(call["ts"]) + float(call["dur"])
    phases = [r for r in _intervals(events, ("user_annotation",)) if r[2].get("name") != CALL]
    phase_starts = [r[0] for r in phases]
    ops = _intervals(events, ("cpu_op",))
    op_starts = [r[0] for r in ops]
    launches = {}
    for e in events:
        corr = (e.get("args") or {}).get("correlation")
        if e.get("cat") in LAUNCH_CATS and corr is not None:
            launches[corr] = float(e["ts"])
    # Only the profiled call is in the trace; its device work ends before generate returns.
    device = _intervals(events, DEVICE_CATS)

    def who(e: dict) -> tuple[str, str]:
        t = launches.get((e.get("args") or {}).get("correlation"))
        if t is None:
            return "?", "?"
        ph = _innermost(phases, phase_starts, t)
        op = _innermost(ops, op_starts, t)
        return (ph["name"] if ph else "generate (other)"), _short(op["name"]) if op else "?"

    gaps, busy, end = [], 0.0, w0
    prev_name = "(call start)"
    for a, b, e in device:
        a = max(a, w0)
        if a - end >= min_gap_us:
            phase, op = who(e)
            before = _short(e.get("name", "?"))
            gaps.append({"us": a - end, "after": prev_name, "before": before, "phase": phase, "op": op})
        if b > end:
            busy += b - max(a, end)
            end = b
            prev_name = _short(e.get("name", "?"))
    w1 = max(w1, end)
    idle = (w1 - w0) - busy
    by_phase: dict[str, float] = {}
    for g in gaps:
        by_phase[g["phase"]] = by_phase.get(g["phase"], 0.0) + g["us"]
    tail = w1 - end  # after the last device event (reading the token on the host)
    return {
        "wall_ms": (w1 - w0) / 1e3,
        "device_busy_ms": busy / 1e3,
        "device_idle_ms": idle / 1e3,
        "idle_in_gaps_ms": sum(g["us"] for g in gaps) / 1e3,
        "idle_after_last_ms": tail / 1e3,
        "device_events": len(device),
        "idle_by_phase_ms": {k: v / 1e3 for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1])},
        "top_gaps": [
            {**{k: v for k, v in g.items() if k != "us"}, "ms": g["us"] / 1e3}
            for g in sorted(gaps, key=lambda g: -g["us"])[:top]
        ],
        "gaps_over_min": len(gaps),
        "phases_seen": sorted({r[2]["name"] for r in phases}),
        "min_gap_us": min_gap_us,
    }


@contextlib.contextmanager
def annotated(model, handle=None) -> Iterator[None]:
    """Phase annotations (``record_function`` ranges) on ``model`` (and EarlyTom's steps when a
    handle is given) for the duration of the block; everything is restored afterwards."""
    from torch.autograd.profiler import record_function

    inner = model.model
    hooks, restore, open_ranges = [], [], {}
    tower = getattr(inner, "vision_tower", None)
    modules = {
        "vision_tower": tower if tower is not None else getattr(inner, "visual", None),
        "multi_modal_projector": getattr(inner, "multi_modal_projector", None),
        "language_model": inner.language_model,
    }
    seen_llm = [False]

    def pre(name):
        def hook(module, args):
            if name == "language_model":
                if seen_llm[0]:
                    return
                seen_llm[0] = True
            rf = record_function(name)
            rf.__enter__()
            open_ranges.setdefault(name, []).append(rf)

        return hook

    def post(name):
        def hook(module, args, output):
            stack = open_ranges.get(name)
            if stack:
                stack.pop().__exit__(None, None, None)

        return hook

    for name, mod in modules.items():
        if mod is not None:
            hooks.append(mod.register_forward_pre_hook(pre(name)))
            hooks.append(mod.register_forward_hook(post(name)))

    def wrap(owner, attr: str, label: str) -> None:
        def make(current):
            @functools.wraps(current)
            def annotated_call(*args, **kwargs):
                with record_function(label):
                    return current(*args, **kwargs)

            return annotated_call

        restore.append(wrap_attr(owner, attr, make))

    wrap(model, "prepare_inputs_for_generation", "prepare_inputs_for_generation")
    if handle is not None:
        from earlytom_ext.integration import core

        wrap(handle, "_encode", "earlytom.encode")
        wrap(core, "rewrite_placeholders", "earlytom.prompt_rewrite")
        wrap(handle.adapter, "build_llm_inputs", "earlytom.llm_inputs")
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        while restore:
            restore.pop()()
        for stack in open_ranges.values():
            while stack:
                stack.pop().__exit__(None, None, None)


def profile_call(model, inputs: dict, device, *, handle=None, warmup: int = 2) -> dict:
    """Warm-up calls, then one annotated, profiled ``generate(max_new_tokens=1)``; its analysis."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    def call():
        return model.generate(**inputs, max_new_tokens=1, do_sample=False)

    with torch.no_grad():
        for _ in range(warmup):
            call()
        sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda(device) else [])
        with warnings.catch_warnings(), annotated(model, handle):
            warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
            with profile(activities=acts) as prof:
                with record_function(CALL):
                    call()
                sync(device)
    fd, path = tempfile.mkstemp(suffix=".json", prefix="earlytom-trace-")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    return analyse(trace)


def benchmark(
    model,
    spec,
    device="cuda",
    *,
    frames: int = 32,
    batch: int = 1,
    ratio: float = 0.10,
    pattern: str = "forced-merge",
    benchmark_preset: str = "videomme",
    warmup: int = 2,
    dtype=torch.bfloat16,
    seed: int = 0,
    budget: Budget | None = None,
    log=print,
) -> list[dict]:
    """One row per configuration: stock Hugging Face, then EarlyTom (``ratio``, ``pattern``)."""
    from earlytom_ext.config import preset

    budget = budget or Budget()
    inputs = models.make_batch(spec, batch, frames, device=device, dtype=dtype, seed=seed)
    rows = []
    for config in ("stock", "earlytom"):
        row = {"config": config, "frames": frames, "batch": batch}
        if config == "earlytom":
            row.update(ratio=ratio, pattern=pattern)
        rows.append(row)
        if budget.expired():
            row["skipped"] = "time budget"
            continue
        handle = apply_earlytom(model, preset(benchmark_preset, ratio), pattern) if config == "earlytom" else None
        try:
            row.update(profile_call(model, inputs, device, handle=handle, warmup=warmup))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
        finally:
            if handle is not None:
                handle.remove()
        if not row.get("error"):
            log(
                f"  gaps {config}: wall {row['wall_ms']:.2f} ms, device idle {row['device_idle_ms']:.2f} ms "
                f"({row['device_events']} device events)"
            )
    return rows


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny model, 8 frames (smoke test)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--ratio", type=float, default=0.10)
    ap.add_argument("--pattern", default="forced-merge")
    args = ap.parse_args(argv)
    quick = args.quick or not is_cuda(args.device)
    spec = models.get_spec("tiny" if quick else "llava-ov-7b")
    dtype = torch.bfloat16 if is_cuda(args.device) else torch.float32
    model, info = models.build_model(spec.name, device=args.device, dtype=dtype)
    rows = benchmark(
        model,
        spec,
        args.device,
        frames=args.frames or (8 if quick else 32),
        ratio=args.ratio,
        pattern=args.pattern,
        dtype=dtype,
    )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
