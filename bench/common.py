"""Timing and reporting helpers shared by the benchmarks."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch


def time_fn(fn: Callable[[], object], *, device: str = "cuda", warmup: int = 2, iters: int = 7) -> Dict[str, float]:
    """Median/min wall time of ``fn()`` in milliseconds.

    CUDA: each iteration is bracketed by CUDA events on the current stream (warm-up runs first,
    then ``iters`` timed runs). CPU: ``time.perf_counter``.
    """
    for _ in range(warmup):
        fn()
    times: List[float] = []
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(iters):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iters": iters}


def gbps(n_bytes: float, ms: float) -> float:
    """Achieved bandwidth in GB/s (1e9 bytes) for ``n_bytes`` moved in ``ms`` milliseconds."""
    return n_bytes / (ms * 1e-3) / 1e9


def markdown_table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    """Rows (dicts) as a GitHub markdown table over ``columns``; floats get 4 significant digits."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(out)


def op_bench_main(name: str, benchmark, columns: List[str], doc: str, argv=None) -> None:
    """Command line of an op microbenchmark: ``--device``, ``--quick``; prints a markdown table."""
    import argparse

    ap = argparse.ArgumentParser(description=(doc or name).split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shapes, few iterations (smoke test)")
    args = ap.parse_args(argv)
    rows = benchmark(device=args.device, quick=args.quick)
    print(f"{name} on {rows[0]['device'] if rows else args.device}")
    print(markdown_table(rows, columns))
