"""merge_frames (Stage I) microbenchmark: the fused op vs the reference vs a per-frame loop.

    python -m bench.bench_merge_frames                       # GPU: 32 x 729 x 1152 bf16 (SigLIP)
    python -m bench.bench_merge_frames --device cpu --quick  # smoke test (seconds)

Compared on the same inputs (frame counts checked equal before timing):
- ``op``: ``earlytom_ext.ops.merge_frames`` (frame counts already on the device, as in the
  encoder hooks): band similarities, the walk, one host sync, the merge pass;
- ``op_raw``: ``torch.ops.earlytom.merge_frames`` without the wrapper;
- ``apply``: the merge pass alone, ``torch.ops.earlytom.apply_merge_plan`` with the op's plan;
- ``segment``: ``earlytom_ext.ops.segment_frames`` (the refined segmentation);
- ``reference``: ``earlytom_ext.reference.merge_frames_batched`` (normalises once, one Python
  float per similarity);
- ``loop``: a per-frame Python loop in the style of the published code (``F.cosine_similarity``
  per frame pair with ``.item()``, Python lists of frames, one ``torch.stack``).
Times: median of CUDA-event-timed calls after warm-up (``bench/common.py``). Bandwidth:
``apply_GBps`` counts the frames the merge pass must read (src0, plus src1 when w != 1) and write
(N'); ``op_GBps`` adds one read of every input frame (the similarity pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import gbps, op_bench_main, time_fn
from earlytom_ext import EarlyTomConfig, preset
from earlytom_ext import reference as R
from earlytom_ext.ops.merge import merge_frames, segment_frames
from earlytom_ext.tiny_model import make_feature_video

COLUMNS = [
    "videos",
    "T",
    "S",
    "D",
    "dtype",
    "tau",
    "M",
    "N_out",
    "K",
    "op_ms",
    "op_raw_ms",
    "apply_ms",
    "segment_ms",
    "reference_ms",
    "loop_ms",
    "apply_GBps",
    "op_GBps",
    "vs_reference",
    "vs_loop",
]


def _loop_merge(x: torch.Tensor, counts: list[int], cfg: EarlyTomConfig) -> torch.Tensor:
    """Published-code style: one video at a time, a cosine + ``.item()`` per frame pair."""
    outs, off = [], 0
    for T in counts:
        v = x[off : off + T]
        off += T

        def sim(a, b):
            return F.cosine_similarity(v[a].float(), v[b].float(), dim=-1).mean().item()

        segs, start, s_hat = [], 0, 1.0
        for i in range(1, T):
            s_hat = cfg.ema * sim(start, i) + (1 - cfg.ema) * s_hat
            if s_hat < cfg.tau or (i - start + 1) >= cfg.max_window:
                segs.append((start, i - 1))
                start, s_hat = i, 1.0
        segs.append((start, T - 1))
        frames = []
        for s, e in segs:
            if e - s + 1 <= 2:
                frames.extend(v[f] for f in range(s, e + 1))
                continue
            frames.append(v[s])
            L = e - s - 1
            if L == 1:
                frames.append(v[s + 1])
            else:
                tau_m = sim(s, e)
                sig = [sim(s + 1 + j, s + 2 + j) for j in range(L - 1)]
                j = 0
                while j < L - 1:
                    a = v[s + 1 + j]
                    if j + 1 < L - 1:
                        if sig[j] > tau_m and sig[j] > sig[j + 1]:
                            w = sig[j] / (sig[j] + sig[j + 1])
                            frames.append((w * a.float() + (1 - w) * v[s + 2 + j].float()).to(v.dtype))
                            j += 2
                        else:
                            frames.append(a)
                            j += 1
                    else:
                        frames.append(a)  # published: weight 1 at the last pair (merged or not)
                        j += 2 if sig[j] > tau_m else 1
            frames.append(v[e])
        outs.append(torch.stack(frames))
    return torch.cat(outs)


def _cases(device: str, quick: bool):
    # (frames per video, S, D, dtype, cfg)
    vmme = preset("videomme", 0.1)  # tau 0.3, max_window 6
    if quick:
        return [([8, 5], 49, 64, torch.bfloat16, vmme), ([6], 16, 32, torch.float32, EarlyTomConfig())]
    if not str(device).startswith("cuda"):
        return [([32], 729, 1152, torch.bfloat16, vmme)]
    return [
        ([32], 729, 1152, torch.bfloat16, vmme),
        ([32], 729, 1152, torch.bfloat16, EarlyTomConfig()),  # tau 0.6, max_window 8
        ([32], 729, 1152, torch.float16, vmme),
        ([32], 729, 1152, torch.float32, vmme),
        ([32] * 4, 729, 1152, torch.bfloat16, vmme),
        ([64], 729, 1152, torch.bfloat16, vmme),
    ]


def benchmark(device: str = "cuda", quick: bool = False) -> list[dict[str, object]]:
    cuda = str(device).startswith("cuda")
    warmup, iters = (1, 3) if quick else ((5, 30) if cuda else (1, 3))
    slow_iters = 3 if (quick or not cuda) else 5
    rows = []
    for counts, S, D, dtype, cfg in _cases(device, quick):
        x = torch.cat([make_feature_video(T, S, D, seed=17 * i + T) for i, T in enumerate(counts)])
        x = x.to(device=device, dtype=dtype)
        counts_d = torch.tensor(counts, dtype=torch.int64, device=device)
        args = (float(cfg.tau), int(cfg.max_window), float(cfg.ema), bool(cfg.keep_last_interior))

        with torch.no_grad():
            res = merge_frames(x, counts_d, cfg)
            ref = R.merge_frames_batched(x, counts, cfg)
            if res.frame_counts.tolist() != ref[2]:
                raise AssertionError(f"merge_frames counts {res.frame_counts.tolist()} != reference {ref[2]}")
            loop_out = _loop_merge(x, counts, cfg)
            if loop_out.shape != res.x.shape:
                raise AssertionError("the per-frame loop disagrees with the op on the number of merged frames")
            ps, pw = res.plan_src, res.plan_weight

            op = lambda: merge_frames(x, counts_d, cfg)
            op_raw = lambda: torch.ops.earlytom.merge_frames(x, counts_d, *args)
            apply = lambda: torch.ops.earlytom.apply_merge_plan(x, ps, pw)
            seg = lambda: segment_frames(x, counts_d, cfg)
            t_op = time_fn(op, device=device, warmup=warmup, iters=iters)["median_ms"]
            t_raw = time_fn(op_raw, device=device, warmup=warmup, iters=iters)["median_ms"]
            t_apply = time_fn(apply, device=device, warmup=warmup, iters=iters)["median_ms"]
            t_seg = time_fn(seg, device=device, warmup=warmup, iters=iters)["median_ms"]
            t_ref = time_fn(lambda: R.merge_frames_batched(x, counts, cfg), device=device, warmup=1, iters=slow_iters)[
                "median_ms"
            ]
            t_loop = time_fn(lambda: _loop_merge(x, counts, cfg), device=device, warmup=1, iters=slow_iters)[
                "median_ms"
            ]

        N, n_out = x.shape[0], res.x.shape[0]
        frame_bytes = S * D * x.element_size()
        merged = int((pw != 1.0).sum())
        apply_bytes = (n_out + merged + n_out) * frame_bytes
        op_bytes = N * frame_bytes + apply_bytes
        rows.append(
            {
                "videos": len(counts),
                "T": "+".join(map(str, counts)),
                "S": S,
                "D": D,
                "dtype": str(dtype).replace("torch.", ""),
                "tau": cfg.tau,
                "M": cfg.max_window,
                "N_out": n_out,
                "K": int(res.segments.shape[0]),
                "op_ms": t_op,
                "op_raw_ms": t_raw,
                "apply_ms": t_apply,
                "segment_ms": t_seg,
                "reference_ms": t_ref,
                "loop_ms": t_loop,
                "apply_GBps": gbps(apply_bytes, t_apply),
                "op_GBps": gbps(op_bytes, t_raw),
                "vs_reference": t_ref / t_op,
                "vs_loop": t_loop / t_op,
                "device": torch.cuda.get_device_name() if cuda else "cpu",
            }
        )
    return rows


def main(argv=None) -> None:
    op_bench_main("merge_frames", benchmark, COLUMNS, __doc__, argv)


if __name__ == "__main__":
    main()
