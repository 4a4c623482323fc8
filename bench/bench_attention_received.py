"""attention_received microbenchmark: the fused two-pass op vs eager softmax maps.

    python -m bench.bench_attention_received                      # GPU: N=32, H=16, S=729, d=72
    python -m bench.bench_attention_received --device cpu --quick # smoke test (seconds)

Eager baseline: ``torch.softmax(q @ kᵀ * scale, -1).mean((1, 2))`` in the input dtype (what an
eager encoder layer with ``output_attentions=True`` materialises: [N, H, S, S] maps).
Reported per shape: median time (CUDA events / perf_counter), TFLOP/s (CUDA op: 2 passes of
q kᵀ = ``4·N·H·S²·d`` flops; CPU op and eager: one q kᵀ = ``2·N·H·S²·d``), peak extra memory
(``torch.cuda.max_memory_allocated`` above the inputs, CUDA only), speed-up and the max abs
difference between the two results.
"""

from __future__ import annotations

import torch

from bench.common import op_bench_main, peak_bytes, time_fn
from earlytom_ext.ops import attention_received

COLUMNS = [
    "N",
    "H",
    "S",
    "d",
    "dtype",
    "layout",
    "op_ms",
    "eager_ms",
    "speedup",
    "op_tflops",
    "eager_tflops",
    "op_peak_mib",
    "eager_peak_mib",
    "max_abs_diff",
]


def _eager(q, k, scale):
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1).mean(dim=(1, 2))


def _peak_mib(fn, device: str):
    """Peak memory allocated by one call above what was allocated before it (MiB); CUDA only."""
    pb = peak_bytes(fn, device)
    return None if pb is None else (pb[0] - pb[1]) / 2**20


def _inputs(N, H, S, d, dtype, layout, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if layout == "qproj":  # [N, S, H·d] projection output viewed as heads (strided, no copy)
        q = torch.randn(N, S, H * d, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(N, S, H * d, generator=g).to(device=device, dtype=dtype)
        return q.view(N, S, H, d).transpose(1, 2), k.view(N, S, H, d).transpose(1, 2)
    q = torch.randn(N, H, S, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(N, H, S, d, generator=g).to(device=device, dtype=dtype)
    return q, k


def benchmark(device: str = "cuda", quick: bool = False) -> list[dict[str, object]]:
    if quick:
        shapes = [(2, 4, 65, 72, torch.float32, "nhsd"), (2, 4, 65, 72, torch.bfloat16, "qproj")]
        warmup, iters = 1, 3
    else:
        shapes = [
            (32, 16, 729, 72, torch.bfloat16, "qproj"),
            (32, 16, 729, 72, torch.bfloat16, "nhsd"),
            (32, 16, 729, 72, torch.float16, "qproj"),
            (32, 16, 729, 72, torch.float32, "qproj"),
            (8, 16, 729, 72, torch.bfloat16, "qproj"),
            (32, 16, 196, 64, torch.bfloat16, "nhsd"),
        ]
        warmup, iters = 3, 20
        if not str(device).startswith("cuda"):
            shapes = [(2, 16, 729, 72, torch.float32, "nhsd"), (8, 16, 729, 72, torch.bfloat16, "qproj")]
            warmup, iters = 1, 3
    rows = []
    for N, H, S, d, dtype, layout in shapes:
        q, k = _inputs(N, H, S, d, dtype, layout, device)
        scale = d**-0.5
        op = lambda: attention_received(q, k, scale, check_finite=False)
        eager = lambda: _eager(q, k, scale)
        with torch.no_grad():
            diff = (op().float() - eager().float()).abs().max().item()
            t_op = time_fn(op, device=device, warmup=warmup, iters=iters)["median_ms"]
            t_eager = time_fn(eager, device=device, warmup=warmup, iters=iters)["median_ms"]
            peak_op = _peak_mib(op, device)
            peak_eager = _peak_mib(eager, device)
        mm_flops = 2.0 * N * H * S * S * d
        passes = 2 if str(device).startswith("cuda") else 1  # the CPU op computes q kᵀ once
        rows.append(
            {
                "N": N,
                "H": H,
                "S": S,
                "d": d,
                "dtype": str(dtype).replace("torch.", ""),
                "layout": layout,
                "op_ms": t_op,
                "eager_ms": t_eager,
                "speedup": t_eager / t_op,
                "op_tflops": passes * mm_flops / (t_op * 1e-3) / 1e12,
                "eager_tflops": mm_flops / (t_eager * 1e-3) / 1e12,
                "op_peak_mib": peak_op,
                "eager_peak_mib": peak_eager,
                "max_abs_diff": diff,
                "device": torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu",
            }
        )
    return rows


def main(argv=None) -> None:
    op_bench_main("attention_received", benchmark, COLUMNS, __doc__, argv)


if __name__ == "__main__":
    main()
