"""Host time of the integration's per-call steps that launch no kernel (they run on host copies),
the part of the glue that a GPU waits for after the last prune layer's sync.

    python -m bench.bench_glue            # LLaVA-OneVision prompts: 32 frames x 196 tokens + text
    python -m bench.bench_glue --quick    # smoke test

Per batch size (one video per sample, 16 text tokens on each side, the shorter samples left
padded): ``runs_us`` finds every video's placeholder run (``prompt.placeholder_runs``),
``rewrite_us`` shortens the runs and re-pads (``prompt.rewrite_placeholders``, including its own
run search), ``plan_us`` splits the refined segments per video and computes Stage II's plan
(``ops.segments_per_video`` + ``ops.stage2_plan``), ``config_check_hf_us`` / ``config_check_us``
time the check of the model config that Hugging Face's ``generate`` runs on every call without a
``generation_config`` (transformers 5; blank on 4.x), as Hugging Face runs it and inside the
patched ``generate`` (the LLaVA-OneVision config class; the same figure in every row).
``perf_counter``, warm-up, median.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch

from bench.common import op_bench_main, segments_from_lengths
from earlytom_ext import ops
from earlytom_ext.integration.prompt import HostPrompt, placeholder_runs, rewrite_placeholders
from earlytom_ext.integration.wrappers import _quick_generation_parameters, _slow_config_check
from earlytom_ext.tiny_model import tiny_config

COLUMNS = [
    "batch",
    "frames",
    "prompt_tokens",
    "compressed_tokens",
    "runs_us",
    "rewrite_us",
    "plan_us",
    "config_check_hf_us",
    "config_check_us",
]
VIDEO_ID, PAD_ID, P = 301, 0, 196


def host_us(fn, *, warmup: int, iters: int) -> float:
    """Median microseconds of ``fn()`` (host only: nothing here runs on a device)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def make_prompt(batch: int, frames: int, seed: int = 0) -> tuple[HostPrompt, list[int]]:
    """Left-padded prompts ``text, video placeholders, text`` (sample b has b extra text tokens)."""
    g = torch.Generator().manual_seed(seed)
    n_video = frames * P + 1
    rows = []
    for b in range(batch):
        text = lambda n: torch.randint(1, 290, (n,), generator=g)  # noqa: E731
        rows.append(torch.cat([text(16 + b), torch.full((n_video,), VIDEO_ID), text(16)]))
    L = max(r.shape[0] for r in rows)
    ids = torch.full((batch, L), PAD_ID, dtype=torch.int64)
    mask = torch.zeros((batch, L), dtype=torch.int64)
    for b, r in enumerate(rows):
        ids[b, L - r.shape[0] :] = r
        mask[b, L - r.shape[0] :] = 1
    return HostPrompt(ids, mask, None), [n_video] * batch


def config_check_us(*, warmup: int, iters: int) -> tuple[float | None, float | None]:
    """Median microseconds of ``generate``'s model-config check: Hugging Face's, and the patched
    ``generate``'s; ``(None, None)`` where transformers has no such check (4.x), the same function
    twice where it is already quick (5.20 on)."""
    config = tiny_config()
    check = getattr(config, "_get_generation_parameters", None)
    if check is None:
        return None, None
    quick = functools.partial(_quick_generation_parameters, config) if _slow_config_check() is not None else check
    return host_us(check, warmup=warmup, iters=iters), host_us(quick, warmup=warmup, iters=iters)


def benchmark(device: str = "cpu", quick: bool = False) -> list[dict]:
    frames = 8 if quick else 32
    warmup, iters = (2, 5) if quick else (20, 200)
    check_hf, check_ours = config_check_us(warmup=warmup, iters=iters)
    rows = []
    for batch in (1, 4):
        prompt, before = make_prompt(batch, frames)
        # A refined segmentation of 12 merged frames per video (as after Stage I at r = 0.1).
        segs = segments_from_lengths([1, 2, 3, 1, 3, 2] if frames >= 12 else [1, 2, 1])
        merged = segs[-1][1] + 1
        seg_t = torch.tensor([[a + v * merged, e + v * merged] for v in range(batch) for a, e in segs])
        seg_counts, frame_counts = torch.tensor([len(segs)] * batch), torch.tensor([merged] * batch)
        plan = ops.stage2_plan(ops.segments_per_video(seg_t, seg_counts, frame_counts), [frames] * batch, 0.1)
        after = [n + 1 for n in plan.tokens_per_video]

        def rewrite():
            return rewrite_placeholders(prompt, VIDEO_ID, before, after, padding_side=None, pad_token_id=PAD_ID)

        def stage2():
            return ops.stage2_plan(ops.segments_per_video(seg_t, seg_counts, frame_counts), [frames] * batch, 0.1)

        rows.append(
            {
                "batch": batch,
                "frames": frames,
                "prompt_tokens": int(prompt.input_ids.shape[1]),
                "compressed_tokens": int(rewrite().input_ids.shape[1]),
                "runs_us": host_us(
                    lambda: placeholder_runs(prompt.input_ids, VIDEO_ID, before), warmup=warmup, iters=iters
                ),
                "rewrite_us": host_us(rewrite, warmup=warmup, iters=iters),
                "plan_us": host_us(stage2, warmup=warmup, iters=iters),
                "config_check_hf_us": check_hf,
                "config_check_us": check_ours,
                "device": "host",
            }
        )
    return rows


def main(argv=None) -> None:
    op_bench_main("integration glue (host)", benchmark, COLUMNS, __doc__, argv)


if __name__ == "__main__":
    main()
