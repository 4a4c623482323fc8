"""Generation throughput of LLaVA-OneVision: stock Hugging Face vs EarlyTom (the paper reports
1.3x), plus stock + fast pooling.

One call is ``model.generate(**inputs, max_new_tokens=N, min_new_tokens=N)`` on a batch of B
videos (the length is forced: the random model has no end-of-sequence token, and the output is
checked to hold N new tokens per sample). Timed with CUDA events (warm-up, median). Reported
per batch size and configuration: seconds per call, videos per second (B / time) and generated
tokens per second (B * N / time), and EarlyTom's throughput over each baseline's; also the same
batch's time to the first token and what each of the N - 1 decoding steps takes
((call - first token) / (N - 1)), so a difference in decoding shows apart from the prefill.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bench import models
from bench.bench_ttft import baseline_available, install_baseline
from bench.common import Budget, median, run_points, timed_calls
from bench.patterns import apply_earlytom

__all__ = ["benchmark"]


def _new_tokens(out, inputs: dict, handle, expected: int) -> int:
    """Tokens generated per sample. The returned sequences start with the caller's prompt; a
    version that returns the compressed prompt instead is recognised through ``last_inputs``."""
    n = int(out.shape[1]) - int(inputs["input_ids"].shape[1])
    li = getattr(handle, "last_inputs", None) if handle is not None else None
    if n != expected and isinstance(li, dict) and isinstance(li.get("input_ids"), torch.Tensor):
        alt = int(out.shape[1]) - int(li["input_ids"].shape[1])
        if alt == expected:
            return alt
    return n


def benchmark(
    model,
    spec,
    device="cuda",
    *,
    frames: int = 32,
    batches: Sequence[int] = (1, 4, 8),
    new_tokens: int = 64,
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
    """Rows ``(batch, config)``: stock and EarlyTom for every batch size first, then stock + fast
    pooling (the first to be dropped when the budget runs out)."""
    from earlytom_ext.config import preset

    budget = budget or Budget()
    cfg = preset(benchmark_preset, ratio)
    gen_kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    first_kwargs = dict(max_new_tokens=1, do_sample=False)
    points = []
    for b in batches:
        points += [dict(batch=b, config="stock"), dict(batch=b, config="earlytom", ratio=ratio, pattern=pattern)]
    points += [dict(batch=b, config="fastpool") for b in batches]
    inputs_cache = {}

    def measure_point(row: dict) -> None:
        B = row["batch"]
        row.update(frames=frames, new_tokens=new_tokens)
        if row["config"] == "fastpool":
            ok, why = baseline_available("fastpool")
            if not ok:
                row["skipped"] = why
                return
        if B not in inputs_cache:
            inputs_cache.clear()  # one batch of inputs on the device at a time
            inputs_cache[B] = models.make_batch(spec, B, frames, device=device, dtype=dtype, seed=seed)
        inputs = inputs_cache[B]
        handle = (
            apply_earlytom(model, cfg, pattern)
            if row["config"] == "earlytom"
            else install_baseline(model, row["config"])
        )
        produced: list[int] = []
        try:
            with torch.no_grad():
                times = timed_calls(
                    lambda: model.generate(**inputs, **gen_kwargs),
                    device,
                    warmup=warmup,
                    iters=iters,
                    after=lambda out: produced.append(_new_tokens(out, inputs, handle, new_tokens)),
                )
                # The same batch to its first token: what is left is the decoding steps.
                first = timed_calls(
                    lambda: model.generate(**inputs, **first_kwargs), device, warmup=min(warmup, 1), iters=iters
                )
        finally:
            if handle is not None:
                handle.remove()
        if any(n != new_tokens for n in produced):
            raise RuntimeError(
                f"generate produced {sorted(set(produced))} new tokens per sample, expected {new_tokens}"
            )
        s, s1 = median(times) / 1e3, median(first) / 1e3
        row.update(seconds=s, videos_per_s=B / s, tokens_per_s=B * new_tokens / s, iters=iters, warmup=warmup)
        row.update(first_token_s=s1, decode_ms_per_step=(s - s1) * 1e3 / (new_tokens - 1) if new_tokens > 1 else None)
        log(f"  throughput B={B} {row['config']}: {s:.2f} s per call, {row['tokens_per_s']:.0f} tokens/s")

    rows = run_points(
        points,
        measure_point,
        budget=budget,
        device=device,
        log=log,
        label=lambda r: f"throughput B={r['batch']} {r['config']}",
    )
    inputs_cache.clear()
    by = {(r["batch"], r["config"]): r for r in rows if r.get("tokens_per_s")}
    for r in rows:
        if r["config"] != "earlytom" or not r.get("tokens_per_s"):
            continue
        for base, key in (("stock", "speedup"), ("fastpool", "speedup_vs_fastpool")):
            b = by.get((r["batch"], base))
            if b:
                r[key] = r["tokens_per_s"] / b["tokens_per_s"]
    return rows
