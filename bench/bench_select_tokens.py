"""select_tokens (Stage II) microbenchmark: the fused op vs the reference vs a per-frame loop.

    python -m bench.bench_select_tokens                      # GPU: P=196, C=3584 (Qwen2-7B), bf16
    python -m bench.bench_select_tokens --device cpu --quick # smoke test (seconds)

Compared, on the same inputs and plan (results checked equal before timing):
- ``op``: ``earlytom_ext.ops.select_tokens`` (host plan -> device copies -> one fused op; no sync);
- ``op_raw``: ``torch.ops.earlytom.select_tokens`` with the per-frame tensors already on the device;
- ``reference``: ``earlytom_ext.reference.select_tokens_batched`` (stable sort per frame);
- ``loop``: a per-frame Python loop in the style of the published code (``torch.topk`` per
  dynamic frame + sort of the kept indices, per-window ``argmax`` for static frames, then one
  gather).
``GB/s`` counts the bytes the op must move: scores read, selected feature rows read and written,
index written. ``plan_ms`` is the host-only ``stage2_plan`` time.
"""

from __future__ import annotations

import time

import torch

from bench.common import gbps, op_bench_main, segments_from_lengths, time_fn
from earlytom_ext import reference as R
from earlytom_ext.ops import select_tokens, stage2_plan

COLUMNS = [
    "frames",
    "T",
    "P",
    "C",
    "dtype",
    "r",
    "num_out",
    "plan_ms",
    "op_ms",
    "op_raw_ms",
    "reference_ms",
    "loop_ms",
    "op_GBps",
    "vs_reference",
    "vs_loop",
]


def _loop_select(feats, scores, segs_per_video, counts, plan):
    """Per-frame Python loop, published-code style (one video at a time, a few ops per frame)."""
    P = scores.shape[1]
    rows, offset = [], 0
    for segs, Tm, r_adj in zip(segs_per_video, counts, plan.ratios):
        k = R.dynamic_keep(r_adj, P)
        windows = R.window_bounds(P, R.static_windows(r_adj, P))
        for s, e in segs:
            for f in range(s, e + 1):
                g = offset + f
                if e - s + 1 >= 3 and s < f < e:
                    pos = torch.stack([scores[g, a:b].argmax() + a for a, b in windows])
                else:
                    pos = torch.topk(scores[g], k).indices.sort().values
                rows.append(feats[g][pos])
        offset += Tm
    return torch.cat(rows)


def _cases(device: str, quick: bool):
    # (segment lengths per video, frames before Stage I per video, P, C, dtype, r)
    if quick:
        return [
            ([[1, 2, 5], [3, 2]], [12, 6], 196, 64, torch.bfloat16, 0.1),
            ([[2, 4]], [8], 49, 16, torch.float32, 0.25),
        ]
    cases = [
        # One 32-frame video after Stage I (T' = 22): the refined segments mix 1/2-frame
        # segments and longer ones with static interiors.
        ([[2, 5, 3, 1, 4, 2, 5]], [32], 196, 3584, torch.bfloat16, 0.1),
        # 32 merged frames (e.g. a 48-frame video), same mix.
        ([[2, 5, 3, 1, 4, 2, 6, 1, 3, 5]], [48], 196, 3584, torch.bfloat16, 0.1),
        # A batch of 4 videos of 32 frames, different r' per video.
        ([[2, 5, 3, 1, 4, 2, 5], [6, 6, 6, 4], [1] * 30, [3, 3, 3, 3, 2]], [32] * 4, 196, 3584, torch.bfloat16, 0.1),
        # Higher retention, and the encoder-grid size P = 729.
        ([[2, 5, 3, 1, 4, 2, 5]], [32], 196, 3584, torch.bfloat16, 0.25),
        ([[2, 5, 3, 1, 4, 2, 5]], [32], 729, 1152, torch.bfloat16, 0.1),
    ]
    if not str(device).startswith("cuda"):
        cases = [([[2, 5, 3, 1, 4, 2, 5]], [32], 196, 3584, torch.bfloat16, 0.1)]
    return cases


def benchmark(device: str = "cuda", quick: bool = False) -> list[dict[str, object]]:
    cuda = str(device).startswith("cuda")
    warmup, iters = (1, 3) if quick else ((5, 50) if cuda else (1, 5))
    rows = []
    for lengths, before, P, C, dtype, r in _cases(device, quick):
        segs = [segments_from_lengths(lv) for lv in lengths]
        counts = [sum(lv) for lv in lengths]
        N = sum(counts)
        g = torch.Generator().manual_seed(0)
        feats = torch.randn(N, P, C, generator=g).to(device=device, dtype=dtype)
        scores = torch.rand(N, P, generator=g).to(device)

        t0 = time.perf_counter()
        n_plan = 20
        for _ in range(n_plan):
            plan = stage2_plan(segs, before, r, tokens_per_frame=P)
        plan_ms = (time.perf_counter() - t0) * 1e3 / n_plan

        keep_d = torch.tensor(plan.frame_keep, dtype=torch.int64, device=device)
        static_d = torch.tensor(plan.frame_static, dtype=torch.bool, device=device)
        op = lambda: select_tokens(feats, scores, plan)
        op_raw = lambda: torch.ops.earlytom.select_tokens(feats, scores, keep_d, static_d, plan.num_out)
        ref = lambda: R.select_tokens_batched(feats, scores, counts, segs, plan.ratios)
        loop = lambda: _loop_select(feats, scores, segs, counts, plan)

        with torch.no_grad():
            tok, idx = op()
            ref_t, ref_i = ref()
            if not (torch.equal(tok, ref_t) and torch.equal(idx, ref_i)):
                raise AssertionError("select_tokens disagrees with the reference")
            loop_t = loop()
            # topk has no tie rule; random scores have no ties, so the loop must agree too.
            if not torch.equal(loop_t, ref_t):
                raise AssertionError("the per-frame loop disagrees with the reference")
            t_op = time_fn(op, device=device, warmup=warmup, iters=iters)["median_ms"]
            t_raw = time_fn(op_raw, device=device, warmup=warmup, iters=iters)["median_ms"]
            t_ref = time_fn(ref, device=device, warmup=1, iters=max(3, iters // 10))["median_ms"]
            t_loop = time_fn(loop, device=device, warmup=1, iters=max(3, iters // 10))["median_ms"]

        row_bytes = C * feats.element_size()
        moved = N * P * 4 + 2 * plan.num_out * row_bytes + plan.num_out * 16
        rows.append(
            {
                "frames": N,
                "T": "+".join(str(t) for t in before),
                "P": P,
                "C": C,
                "dtype": str(dtype).replace("torch.", ""),
                "r": r,
                "num_out": plan.num_out,
                "plan_ms": plan_ms,
                "op_ms": t_op,
                "op_raw_ms": t_raw,
                "reference_ms": t_ref,
                "loop_ms": t_loop,
                "op_GBps": gbps(moved, t_raw),
                "vs_reference": t_ref / t_op,
                "vs_loop": t_loop / t_op,
                "device": torch.cuda.get_device_name() if cuda else "cpu",
            }
        )
    return rows


def main(argv=None) -> None:
    op_bench_main("select_tokens", benchmark, COLUMNS, __doc__, argv)


if __name__ == "__main__":
    main()
