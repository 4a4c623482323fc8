"""Time to first token of LLaVA-OneVision, uncompressed vs EarlyTom, in one process.

TTFT is ``model.generate(**inputs, max_new_tokens=1)`` (vision encoder, projector, pooling,
EarlyTom's steps, embedding, LLM prefill, LM head, first-token choice), timed with CUDA events
around the call: 2 warm-up calls, then the median of ``iters`` calls (batch 1, 32 frames, bf16
by default). The uncompressed model is the same instance with the EarlyTom handle removed.

Per configuration this module also reports

* the time split: vision tower and LLM forward, from CUDA events recorded by forward hooks on
  ``model.model.vision_tower`` and ``model.model.language_model`` during the timed calls; the
  rest ("other") is embedding, projector, pooling, EarlyTom's post-encoder work, LM head, sampling
  and host gaps;
* **the time in EarlyTom's ops**, two ways:
  - ``ops_ms`` (the headline number): the product's own CUDA-event spans around its steps
    (``handle.last_stats["timings_ms"]``: Stage I at every prune layer, the attention score, the
    refined segmentation and Stage II). These spans measure the stream time from the start to the
    end of each step, so they include the kernels, the step's host-side work while the GPU
    waits, and its host syncs: the step's cost on the critical path. Median over the timed calls.
  - ``ops_kernel_ms``: GPU kernel time of the ``earlytom::*`` operators from one extra
    ``torch.profiler`` run (top-level ``earlytom::`` operator events only, each one's
    ``device_time_total``, which includes the kernels of any ATen op it calls). A lower bound:
    no host time.
* peak memory (``torch.cuda.max_memory_allocated`` over one extra call), prefill tokens (the
  sequence the LLM prefills, read by a hook), and the frame counts after every prune layer.

The merge pattern: with random weights the natural segmentation is meaningless, so the headline
uses a forced "paper-like" pattern installed through the handle's benchmark seam (see
``install_pattern`` and ``bench/models.py``); the natural random-weight pattern is reported too.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import flops as flops_mod
from bench import models

OP_SPAN_PREFIXES = ("stage1_layer", "attention_score", "refine_segments", "stage2")
PATTERNS = ("forced-merge", "forced-nomerge", "natural")


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


class Stamp:
    """A point in time: a recorded CUDA event on the current stream, or ``perf_counter``."""

    __slots__ = ("ev", "t")

    def __init__(self, cuda: bool):
        if cuda:
            self.ev = torch.cuda.Event(enable_timing=True)
            self.ev.record()
            self.t = None
        else:
            self.ev = None
            self.t = time.perf_counter()

    def ms_until(self, other: "Stamp") -> float:
        if self.ev is not None:
            other.ev.synchronize()
            return float(self.ev.elapsed_time(other.ev))
        return (other.t - self.t) * 1e3


def median(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def gib(n_bytes: Optional[float]) -> Optional[float]:
    return None if n_bytes is None else n_bytes / 2**30


# ---------------------------------------------------------------------------------------------
# Forward-hook timers on the vision tower and the language model
# ---------------------------------------------------------------------------------------------
class ModuleTimers:
    """Stamps at entry and exit of the vision tower and the language model (every call).

    Also records the sequence length the language model's first call receives (the prefill).
    """

    def __init__(self, model, device):
        self.cuda = is_cuda(device)
        self.inner = model.model
        self.handles = []
        self.reset()
        for name, mod in (("vision", self.inner.vision_tower), ("llm", self.inner.language_model)):
            self.handles.append(mod.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._post(name)))

    def reset(self) -> None:
        self.open: Dict[str, Stamp] = {}
        self.spans: Dict[str, List[tuple]] = {"vision": [], "llm": []}
        self.prefill_len: Optional[int] = None

    def _pre(self, name):
        def hook(module, args, kwargs):
            self.open[name] = Stamp(self.cuda)
            if name == "llm" and self.prefill_len is None:
                emb = kwargs.get("inputs_embeds")
                ids = kwargs.get("input_ids")
                t = emb if emb is not None else ids
                if t is None and args:
                    t = args[0]
                if isinstance(t, torch.Tensor) and t.dim() >= 2:
                    self.prefill_len = int(t.shape[1])
            return None

        return hook

    def _post(self, name):
        def hook(module, args, output):
            start = self.open.pop(name, None)
            if start is not None:
                self.spans[name].append((start, Stamp(self.cuda)))
            return None

        return hook

    def collect(self) -> Dict[str, float]:
        """Milliseconds per module: vision = all tower calls, llm = the first (prefill) call."""
        out = {}
        v = self.spans["vision"]
        out["vision_ms"] = sum(a.ms_until(b) for a, b in v) if v else None
        llm = self.spans["llm"]
        out["llm_ms"] = llm[0][0].ms_until(llm[0][1]) if llm else None
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


# ---------------------------------------------------------------------------------------------
# Forced merge patterns through the handle's benchmark seam
# ---------------------------------------------------------------------------------------------
class _ForcedPlans:
    """Device tensors of the forced plan / segments for a given tuple of per-video frame counts."""

    def __init__(self, cfg, pattern: str):
        self.window = cfg.max_window - 1
        self.merge = pattern == "forced-merge"
        self.keep_last = cfg.keep_last_interior
        self.cache: Dict[tuple, dict] = {}

    def get(self, counts: tuple, device) -> dict:
        key = (counts, str(device))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        src, w, new_counts, segs, seg_counts = [], [], [], [], []
        offset = 0
        for T in counts:
            plan, s = models.forced_plan(T, self.window, self.merge, self.keep_last)
            src.extend((offset + a, offset + b) for a, b, _ in plan)
            w.extend(float(x) for _, _, x in plan)
            new_counts.append(len(plan))
            # Segments of the merge: global input-frame indices.
            segs.extend((offset + a, offset + b) for a, b in s)
            seg_counts.append(len(s))
            offset += T
        # The refined segmentation of the *current* frames (same windows).
        ref_segs, ref_counts, offset = [], [], 0
        for T in counts:
            s = models.forced_segments(T, self.window)
            ref_segs.extend((offset + a, offset + b) for a, b in s)
            ref_counts.append(len(s))
            offset += T
        i64 = dict(dtype=torch.int64, device=device)
        hit = {
            "plan_src": torch.tensor(src, **i64).view(-1, 2),
            "plan_weight": torch.tensor(w, dtype=torch.float32, device=device),
            "frame_counts": torch.tensor(new_counts, **i64),
            "segments": torch.tensor(segs, **i64).view(-1, 2),
            "segment_counts": torch.tensor(seg_counts, **i64),
            "refined": (torch.tensor(ref_segs, **i64).view(-1, 2), torch.tensor(ref_counts, **i64)),
        }
        self.cache[key] = hit
        return hit



def peak_memory(fn: Callable[[], object], device) -> Dict[str, Optional[float]]:
    """Peak CUDA memory of one more call of ``fn``: in all and above what was allocated before
    (the weights and inputs). Empty on CPU."""
    if not is_cuda(device):
        return {}
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mem_gib": gib(peak), "peak_over_weights_gib": gib(peak - base)}

def install_pattern(handle, pattern: str) -> Callable[[], None]:
    """Force a merge pattern on an EarlyTom handle; returns a function that undoes it.

    ``"natural"``: nothing changes. ``"forced-merge"`` / ``"forced-nomerge"``: the handle's
    ``_stage1`` still runs the real Stage I op (so its cost is measured), then its decisions are
    replaced: the frames (and the scores travelling with them) are merged with the forced plan by
    ``ops.apply_merge_plan``; ``_refine`` still runs the real segmentation op and returns the
    forced windows. The forced steps add one plan application per prune layer, so the op time
    measured under a forced pattern is an upper bound of the real ops' time.
    """
    if pattern == "natural":
        return lambda: None
    if pattern not in models.FORCED_PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    import earlytom_ext.ops as ops

    orig_stage1 = handle._stage1
    orig_refine = handle._refine
    plans = _ForcedPlans(handle.config, pattern)

    def counts_of(frame_counts) -> tuple:
        if isinstance(frame_counts, torch.Tensor):
            return tuple(int(c) for c in frame_counts.tolist())
        return tuple(int(c) for c in frame_counts)

    def stage1(x, frame_counts, layer_index, extras=None):
        res = orig_stage1(x, frame_counts, layer_index, extras)
        p = plans.get(counts_of(frame_counts), x.device)
        xm = ops.apply_merge_plan(x, p["plan_src"], p["plan_weight"])
        em = ops.apply_merge_plan(extras, p["plan_src"], p["plan_weight"]) if extras is not None else None
        return res._replace(x=xm, extras=em, frame_counts=p["frame_counts"], segments=p["segments"],
                            segment_counts=p["segment_counts"], plan_src=p["plan_src"],
                            plan_weight=p["plan_weight"])

    def refine(x, frame_counts):
        orig_refine(x, frame_counts)
        return plans.get(counts_of(frame_counts), x.device)["refined"]

    handle._stage1 = stage1
    handle._refine = refine

    def undo():
        handle.__dict__.pop("_stage1", None)
        handle.__dict__.pop("_refine", None)

    return undo


def apply_earlytom(model, cfg, pattern: str):
    """``earlytom_ext.apply`` plus the merge pattern; returns the handle (``handle.remove()``
    undoes both)."""
    from earlytom_ext.integration import apply

    handle = apply(model, cfg)
    try:
        install_pattern(handle, pattern)
    except Exception:
        handle.remove()
        raise
    return handle


# ---------------------------------------------------------------------------------------------
# Profiler: kernel time inside earlytom:: operators
# ---------------------------------------------------------------------------------------------
def profile_op_time(fn: Callable[[], object], device) -> Dict[str, float]:
    """One profiled call of ``fn``: device (CUDA) or CPU time of top-level ``earlytom::`` ops."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda(device) else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    per_op: Dict[str, float] = {}
    total = 0.0
    for ev in prof.events():
        name = getattr(ev, "name", "") or getattr(ev, "key", "")
        if not name.startswith("earlytom::"):
            continue
        parent, nested = getattr(ev, "cpu_parent", None), False
        while parent is not None:
            if (getattr(parent, "name", "") or "").startswith("earlytom::"):
                nested = True
                break
            parent = getattr(parent, "cpu_parent", None)
        if nested:
            continue
        if is_cuda(device):
            us = getattr(ev, "device_time_total", None)
            if us is None:
                us = getattr(ev, "cuda_time_total", 0.0)
        else:
            us = ev.cpu_time_total
        per_op[name] = per_op.get(name, 0.0) + us / 1e3
        total += us / 1e3
    return {"ops_kernel_ms": total, "ops_kernel_by_op": per_op,
            "ops_kernel_kind": "cuda-kernel" if is_cuda(device) else "cpu"}


# ---------------------------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------------------------
def op_spans(stats: Optional[dict]) -> Dict[str, float]:
    """EarlyTom's own step spans (ms) from ``handle.last_stats``."""
    if not stats:
        return {}
    t = stats.get("timings_ms") or {}
    return {k: float(v) for k, v in t.items() if k.startswith(OP_SPAN_PREFIXES)}


def frames_after(stats: Optional[dict]) -> List[List[int]]:
    """Per video, the frame counts after each prune layer (in layer order)."""
    if not stats:
        return []
    out = []
    for v in stats.get("videos", []):
        fa = v.get("frames_after", {})
        out.append([int(fa[k]) for k in sorted(fa)])
    return out


def measure(model, inputs: dict, device, *, handle=None, warmup: int = 2, iters: int = 7,
            profile: bool = False, max_new_tokens: int = 1) -> dict:
    """TTFT and its split for one configuration (the model as it is: patched or not)."""
    timers = ModuleTimers(model, device)
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)

    def call():
        return model.generate(**inputs, **gen_kwargs)

    try:
        with torch.no_grad():
            for _ in range(warmup):
                call()
            sync(device)
            ttft, vision, llm, ops_ms = [], [], [], []
            span_lists: Dict[str, List[float]] = {}
            for _ in range(iters):
                timers.reset()
                a = Stamp(is_cuda(device))
                out = call()
                b = Stamp(is_cuda(device))
                ttft.append(a.ms_until(b))
                parts = timers.collect()
                vision.append(parts["vision_ms"])
                llm.append(parts["llm_ms"])
                if handle is not None:
                    spans = op_spans(handle.last_stats)
                    for k, v in spans.items():
                        span_lists.setdefault(k, []).append(v)
                    ops_ms.append(sum(spans.values()))
            prefill_len = timers.prefill_len
            # Peak memory over one more call.
            mem = peak_memory(call, device)
            prof = {}
            if profile:
                # The profiler (CUPTI on a GPU) is an extra: when it fails, the timings above stay.
                try:
                    prof = profile_op_time(call, device)
                except Exception as e:
                    prof = {"ops_kernel_error": f"{type(e).__name__}: {e}"}
    finally:
        timers.remove()

    t_med = median(ttft)
    row = {
        "ttft_ms": t_med,
        "ttft_min_ms": min(ttft),
        "ttft_spread_pct": 100.0 * (max(ttft) - min(ttft)) / t_med if t_med else None,
        "iters": iters,
        "warmup": warmup,
        "vision_ms": median(vision),
        "llm_ms": median(llm),
        "prefill_tokens": prefill_len,
        "generated_shape": list(out.shape) if isinstance(out, torch.Tensor) else None,
    }
    if row["vision_ms"] is not None and row["llm_ms"] is not None:
        row["other_ms"] = t_med - row["vision_ms"] - row["llm_ms"]
    if handle is not None:
        row["ops_ms"] = median(ops_ms)
        row["ops_share_pct"] = 100.0 * row["ops_ms"] / t_med if t_med and row["ops_ms"] is not None else None
        row["op_spans_ms"] = {k: median(v) for k, v in span_lists.items()}
        stats = handle.last_stats
        row["frames_after_prune"] = frames_after(stats)
        row["video_tokens"] = [int(v["tokens_after"]) for v in stats["videos"]] if stats else None
        row["adjusted_ratio"] = [float(v["ratio"]) for v in stats["videos"]] if stats else None
        row["refined_segments"] = [len(v["segments"]) for v in stats["videos"]] if stats else None
    row.update(mem)
    if prof:
        row.update(prof)
        if t_med and "ops_kernel_ms" in prof:
            row["ops_kernel_share_pct"] = 100.0 * prof["ops_kernel_ms"] / t_med
    return row


# ---------------------------------------------------------------------------------------------
# The section
# ---------------------------------------------------------------------------------------------
def benchmark(model, spec, device="cuda", *, frames: int = 32, batch: int = 1,
              ratios: Sequence[float] = (0.10, 0.15, 0.20, 0.25), patterns: Sequence[str] = ("forced-merge", "natural"),
              benchmark_preset: str = "videomme", warmup: int = 2, iters: int = 7, profile: bool = True,
              dtype=torch.bfloat16, seed: int = 0, deadline: Optional[float] = None, log=print) -> List[dict]:
    """Uncompressed TTFT (measured before and after the compressed runs) and EarlyTom at each
    ratio (the paper's ``preset(benchmark_preset, r)``) and merge pattern. One row per run.
    Configurations past ``deadline`` (a ``time.monotonic()`` value) are skipped and reported."""
    from earlytom_ext.config import preset

    inputs = models.make_batch(spec, batch, frames, device=device, dtype=dtype, seed=seed)
    full_lens = [int(x) for x in inputs["attention_mask"].sum(1).tolist()]
    rows: List[dict] = []

    def base_row(tag):
        r = measure(model, inputs, device, warmup=warmup, iters=iters)
        r.update(config="uncompressed", pattern=tag, ratio=1.0, frames=frames, batch=batch,
                 prefill_tokens_per_sample=full_lens)
        log(f"  uncompressed ({tag}): TTFT {r['ttft_ms']:.2f} ms")
        return r

    base = base_row("before")
    rows.append(base)
    for pattern in patterns:
        for r in ratios:
            cfg = preset(benchmark_preset, r)
            row = {"config": "earlytom", "pattern": pattern, "ratio": r, "frames": frames, "batch": batch,
                   "tau": cfg.tau, "prune_layers": list(cfg.prune_layers), "max_window": cfg.max_window}
            if deadline is not None and time.monotonic() > deadline:
                row["error"] = "skipped: time budget"
                rows.append(row)
                continue
            try:
                handle = apply_earlytom(model, cfg, pattern)
                try:
                    row.update(measure(model, inputs, device, handle=handle, warmup=warmup, iters=iters,
                                       profile=profile))
                    comp = handle.last_inputs
                    if comp is not None:
                        row["prefill_tokens_per_sample"] = [int(x) for x in comp["attention_mask"].sum(1).tolist()]
                finally:
                    handle.remove()
            except Exception as e:  # report and go on with the other configurations
                row["error"] = f"{type(e).__name__}: {e}"
                log(f"  r={r} {pattern}: ERROR {row['error']}")
                rows.append(row)
                continue
            row["speedup"] = base["ttft_ms"] / row["ttft_ms"] if row.get("ttft_ms") else None
            fa = row.get("frames_after_prune") or [[] for _ in range(batch)]
            comp_lens = row.get("prefill_tokens_per_sample") or []
            if len(fa) == batch and len(comp_lens) == batch:
                row.update(flops_mod.compare(spec, [frames] * batch, full_lens, comp_lens, cfg.prune_layers, fa))
            log(f"  r={r:.2f} {pattern}: TTFT {row['ttft_ms']:.2f} ms, x{row['speedup']:.2f}, "
                f"frames {fa}, prefill {row.get('prefill_tokens')}, ops {row.get('ops_share_pct') or 0:.2f}%")
            rows.append(row)
    rows.append(base_row("after"))
    return rows


def scaling(model, spec, device="cuda", *, frames_list: Sequence[int] = (8, 16, 32, 64, 128),
            batch_list: Sequence[int] = (1, 2, 4), base_frames: int = 32, ratio: float = 0.10,
            pattern: str = "forced-merge", benchmark_preset: str = "videomme", warmup: int = 2, iters: int = 5,
            dtype=torch.bfloat16, seed: int = 0, deadline: Optional[float] = None, log=print) -> List[dict]:
    """TTFT (uncompressed and EarlyTom) and EarlyTom's op time vs frames (batch 1) and vs batch
    (``base_frames`` frames). Points are skipped (and reported as skipped) past ``deadline``
    (a ``time.monotonic()`` value)."""
    from earlytom_ext.config import preset

    cfg = preset(benchmark_preset, ratio)
    points = [("frames", f, 1, f) for f in frames_list] + [("batch", b, b, base_frames) for b in batch_list]
    rows: List[dict] = []
    done: Dict[tuple, dict] = {}
    for axis, value, B, T in points:
        row = {"axis": axis, "value": value, "batch": B, "frames": T, "ratio": ratio, "pattern": pattern}
        if (B, T) in done:  # frames=32/batch=1 appears on both axes: measure once
            prev = dict(done[(B, T)])
            prev.update(axis=axis, value=value)
            rows.append(prev)
            continue
        if deadline is not None and time.monotonic() > deadline:
            row["skipped"] = "time budget"
            rows.append(row)
            log(f"  scaling {axis}={value}: skipped (time budget)")
            continue
        try:
            inputs = models.make_batch(spec, B, T, device=device, dtype=dtype, seed=seed)
            base = measure(model, inputs, device, warmup=warmup, iters=iters)
            handle = apply_earlytom(model, cfg, pattern)
            try:
                comp = measure(model, inputs, device, handle=handle, warmup=warmup, iters=iters)
            finally:
                handle.remove()
            row.update({
                "ttft_full_ms": base["ttft_ms"], "ttft_ms": comp["ttft_ms"],
                "speedup": base["ttft_ms"] / comp["ttft_ms"],
                "ops_ms": comp.get("ops_ms"), "ops_share_pct": comp.get("ops_share_pct"),
                "vision_full_ms": base["vision_ms"], "vision_ms": comp["vision_ms"],
                "llm_full_ms": base["llm_ms"], "llm_ms": comp["llm_ms"],
                "prefill_tokens_full": base["prefill_tokens"], "prefill_tokens": comp["prefill_tokens"],
                "peak_mem_full_gib": base.get("peak_mem_gib"), "peak_mem_gib": comp.get("peak_mem_gib"),
                "frames_after_prune": comp.get("frames_after_prune"),
            })
            log(f"  scaling B={B} T={T}: TTFT {base['ttft_ms']:.1f} -> {comp['ttft_ms']:.1f} ms "
                f"(x{row['speedup']:.2f}), ops {comp.get('ops_ms') or 0:.2f} ms")
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
            row["error"] = f"OutOfMemoryError: {str(e).splitlines()[0]}"
            log(f"  scaling B={B} T={T}: ERROR {row['error']}")
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            log(f"  scaling B={B} T={T}: ERROR {row['error']}")
        if row.get("error") and is_cuda(device):
            # Outside the except block: the traceback no longer holds the failed call's tensors.
            inputs = None
            torch.cuda.empty_cache()
        done[(B, T)] = row
        rows.append(row)
    return rows


def main(argv=None) -> None:
    import argparse

    from bench.common import markdown_table

    ap = argparse.ArgumentParser(description="TTFT of LLaVA-OneVision, uncompressed vs EarlyTom")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny model, few frames (smoke test)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--pattern", default="forced-merge", choices=PATTERNS)
    args = ap.parse_args(argv)
    quick = args.quick or not is_cuda(args.device)
    spec = models.get_spec("tiny" if quick else "llava-ov-7b")
    dtype = torch.float32 if not is_cuda(args.device) else torch.bfloat16
    model, info = models.build_model(spec.name, device=args.device, dtype=dtype)
    print(f"model {info}")
    rows = benchmark(model, spec, args.device, frames=args.frames or (8 if quick else 32),
                     ratios=(0.10, 0.25) if quick else (0.10, 0.15, 0.20, 0.25), patterns=(args.pattern,),
                     warmup=1 if quick else 2, iters=3 if quick else 7, dtype=dtype)
    print(markdown_table(rows, ["config", "pattern", "ratio", "ttft_ms", "speedup", "prefill_tokens", "ops_ms",
                                "ops_share_pct", "peak_mem_gib"]))


if __name__ == "__main__":
    main()
