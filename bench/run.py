"""EarlyTom efficiency benchmarks: the paper's efficiency table for this implementation, side by
side with two baselines (stock Hugging Face, and stock + fast pooling), in one process on one GPU.

    python -m bench.run --all                       # GPU: LLaVA-OV-7B architecture, bf16, 32 frames
    python -m bench.run --device cpu --quick --all  # smoke test: tiny model, few frames (CPU)

Sections (``--all`` runs every one, in this order): ``--ttft`` (headline: TTFT, speed-ups, where
the time goes, op share, peak memory, prefill tokens; inner-LLM merge when available), ``--gaps``
(where the GPU waits during one TTFT call, from a torch.profiler trace; with the profiler only),
``--flops`` (the paper's analytical count), ``--throughput`` (generation, batch 1/4/8, 64 new
tokens), ``--scaling`` (vs frames and vs batch), ``--encoder`` (video features: time, memory),
``--kernels`` (the op microbenchmarks), ``--qwen`` (Qwen2.5-VL-7B architecture, or Qwen2-VL-7B's
with ``--qwen-model qwen2-vl-7b``, when ``earlytom_ext.apply`` accepts it), ``--next-video``
(LLaVA-NeXT-Video-7B architecture, or Video-LLaVA-7B's with ``--next-video-model video-llava-7b``).

Writes ``<out>/<device>-<date>.md`` (tables), ``.json`` (every number) and ``.png`` (one figure).
GPU runs default to ``bench/results/``; CPU runs are labelled as smoke runs and default to a
fresh temporary folder. See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from bench import (
    bench_encoder,
    bench_next_video,
    bench_qwen25vl,
    bench_throughput,
    bench_ttft,
    flops,
    models,
    profile_ttft,
)
from bench.common import Budget, free_memory, is_cuda, params_text
from bench.env import ROOT, device_slug, environment, utc_now
from bench.patterns import PATTERNS
from bench.report import GOALS, PAPER, goals_section, next_video_family, qwen_family, write_markdown, write_plot
from earlytom_ext.demo import cpu_or_cuda

KERNEL_MODULES = ("bench_merge_frames", "bench_attention_received", "bench_select_tokens")
#: sections in run order, with their weight in the time budget (a section gets its weight's share
#: of the time left when it starts, so time one leaves unused flows to the next).
SECTIONS = (
    ("ttft", 3.0),
    ("gaps", 0.4),
    ("flops", 0.0),
    ("throughput", 3.5),
    ("scaling", 3.0),
    ("encoder", 1.0),
    ("kernels", 1.2),
    ("qwen", 1.0),
    ("next_video", 0.6),
)
#: --help text of each section flag.
SECTION_HELP = {
    "ttft": "time to first token: stock, stock + fast pooling, EarlyTom per ratio and merge pattern",
    "gaps": "where the device idles in one stock and one EarlyTom TTFT call (torch.profiler)",
    "flops": "the paper's analytical FLOPs: the forced patterns (no model run) and the TTFT section's runs",
    "throughput": "generate throughput (videos/s, tokens/s) per batch size",
    "scaling": "TTFT against the number of frames and the batch size",
    "encoder": "pixels to LLM-ready video tokens (the vision side alone)",
    "kernels": "microbenchmarks of the earlytom:: ops",
    "qwen": "the Qwen2.5-VL-7B (or --qwen-model) configuration's TTFT (stock, fast window attention, EarlyTom)",
    "next_video": "the LLaVA-NeXT-Video-7B (or --next-video-model) configuration's TTFT (stock, EarlyTom)",
}


def run_kernels(device: str, quick: bool, budget: Budget, log) -> dict[str, object]:
    """The op microbenchmarks (``bench/bench_<op>.py``: ``benchmark(device, quick)``), each optional."""
    out: dict[str, object] = {}
    for name in KERNEL_MODULES:
        if budget.expired():
            out[name] = {"skipped": "time budget"}
            log(f"  {name}: skipped (time budget)")
            continue
        mod = importlib.import_module(f"bench.{name}")
        try:
            t0 = time.perf_counter()
            rows = mod.benchmark(device=device, quick=quick)
            out[name] = {"rows": list(rows), "seconds": time.perf_counter() - t0}
            log(f"  {name}: {len(rows)} rows in {out[name]['seconds']:.1f} s")
        except Exception as e:
            out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            log(f"  {name}: ERROR {type(e).__name__}: {e}")
            free_memory(device)
    return out


def collect_outcomes(results: dict) -> None:
    """Gather the failed and the skipped parts of every section into ``errors`` / ``skipped``."""
    from bench.bench_ttft import config_label

    def note(where: str, r: dict) -> None:
        if r.get("error"):
            results["errors"].append(f"{where}: {r['error']}")
        elif r.get("skipped"):
            results["skipped"].append(f"{where}: {r['skipped']}")

    for r in results.get("ttft") or []:
        note(f"ttft {config_label(r)}", r)
        if r.get("ops_kernel_error"):
            results["errors"].append(
                f"ttft {config_label(r)}: torch.profiler failed ({r['ops_kernel_error']}); the timings are kept"
            )
    gaps = results.get("gaps") or []
    if isinstance(gaps, dict):  # the section did not run
        note("gaps", gaps)
    for r in gaps if isinstance(gaps, list) else []:
        note(f"gaps {r['config']}", r)
    for r in results.get("throughput") or []:
        note(f"throughput B={r['batch']} {r['config']}", r)
    for r in results.get("scaling") or []:
        note(f"scaling B={r['batch']} T={r['frames']} ({r['axis']} axis)", r)
    for r in results.get("encoder") or []:
        note(f"encoder {r.get('baseline') or ''} r={r['ratio']} {r['pattern']}".replace("  ", " "), r)
    families = (("qwen25vl", qwen_family(results)), ("llava_next_video", next_video_family(results)))
    for key, tag in ((k, family.lower()) for k, family in families):
        q = results.get(key) or {}
        if q.get("skipped"):
            results["skipped"].append(f"{tag}: {q['skipped']}")
        for r in q.get("rows") or []:
            note(f"{tag} {config_label(r)}", r)
    for name, res in (results.get("kernels") or {}).items():
        note(f"kernels {name}", res)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _device(text: str) -> str:
    if cpu_or_cuda(text) is None:
        raise argparse.ArgumentTypeError(f"must be cpu or cuda (cuda:N), got {text!r}")
    return text


def flag(section: str) -> str:
    """The command-line flag of a section (``next_video`` -> ``--next-video``)."""
    return "--" + section.replace("_", "-")


def parse_args(argv=None):
    positive, non_negative = _int_at_least(1), _int_at_least(0)
    ap = argparse.ArgumentParser(
        prog="python -m bench.run", description="EarlyTom efficiency benchmarks (see bench/README.md)"
    )
    ap.add_argument("--all", action="store_true", help="every section")
    for name, _ in SECTIONS:
        ap.add_argument(flag(name), dest=name, action="store_true", help=SECTION_HELP[name])
    ap.add_argument("--device", type=_device, default="cuda", help="cuda (default) or cpu (smoke run)")
    ap.add_argument("--quick", action="store_true", help="tiny model, few frames, few iterations")
    ap.add_argument(
        "--model",
        choices=sorted(models.SPECS),
        default=None,
        help="default: llava-ov-7b on CUDA without --quick, tiny otherwise",
    )
    ap.add_argument(
        "--qwen-model",
        choices=sorted(bench_qwen25vl.TINY),
        default="qwen2.5-vl-7b",
        help="the --qwen section's architecture (its tiny version with --quick)",
    )
    ap.add_argument(
        "--next-video-model",
        choices=sorted(bench_next_video.TINY),
        default="llava-next-video-7b",
        help="the --next-video section's architecture (its tiny version with --quick)",
    )
    ap.add_argument("--frames", type=positive, default=None, help="default 32 (8 with --quick)")
    ap.add_argument("--batch", type=positive, default=1)
    ap.add_argument("--ratios", type=_ratio, nargs="+", default=None)
    ap.add_argument(
        "--patterns",
        nargs="+",
        default=None,
        choices=PATTERNS,
        help="merge patterns; the first is the headline (default: forced-merge forced-nomerge natural)",
    )
    ap.add_argument(
        "--llm-merge-ratios",
        type=_ratio,
        nargs="*",
        default=None,
        help="ratios run with the inner-LLM merge (default 0.1 0.2; the flag with no values leaves them out)",
    )
    ap.add_argument("--preset", default="videomme", help="benchmark preset of the paper's settings")
    ap.add_argument("--warmup", type=non_negative, default=None, help="default 2 (1 with --quick)")
    ap.add_argument("--iters", type=positive, default=None, help="default 7 (3 with --quick)")
    ap.add_argument("--scaling-frames", type=positive, nargs="+", default=None)
    ap.add_argument("--scaling-batch", type=positive, nargs="+", default=None)
    ap.add_argument(
        "--throughput-batch", type=positive, nargs="+", default=None, help="default 1 4 8 (1 2 with --quick)"
    )
    ap.add_argument(
        "--new-tokens",
        type=positive,
        default=None,
        help="tokens generated per sample in the throughput section (default 64, 4 with --quick)",
    )
    ap.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the torch.profiler kernel-time run (default: on for CUDA, off on the CPU)",
    )
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--out", default=None, help="output folder (GPU default bench/results, CPU default a temp dir)")
    ap.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds for the whole run; sections get shares of it, and configurations past a "
        "section's share are skipped and listed (default: no limit)",
    )
    ap.add_argument("--manifest", default=None, help="write the list of output files to this path")
    ap.add_argument(
        "--cpu-threads",
        type=positive,
        default=1,
        help="torch threads for CPU runs (default 1: steady smoke runs on a shared machine)",
    )
    args = ap.parse_args(argv)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"--out must be a folder, got the file {args.out}")
    if args.manifest and not Path(args.manifest).resolve().parent.is_dir():
        ap.error(f"--manifest: the folder of {args.manifest} does not exist")
    names = [n for n, _ in SECTIONS]
    if args.all:
        for n in names:
            setattr(args, n, True)
    if not any(getattr(args, n) for n in names):
        ap.error("choose --all or at least one of " + " ".join(flag(n) for n in names))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.monotonic()
    device = args.device
    cuda = is_cuda(device)
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU; use --device cpu --quick for a smoke run")
    budget = Budget(args.time_budget)
    quick = args.quick or not cuda
    model_name = args.model or ("tiny" if quick else "llava-ov-7b")
    dtype = torch.bfloat16 if cuda else torch.float32
    frames = args.frames or (8 if quick else 32)
    ratios = tuple(args.ratios) if args.ratios else ((0.10, 0.25) if quick else (0.10, 0.15, 0.20, 0.25))
    # Every pattern in quick runs too: the CPU smoke run goes through the same configurations.
    patterns = tuple(args.patterns) if args.patterns else PATTERNS
    llm_merge_ratios = tuple(args.llm_merge_ratios) if args.llm_merge_ratios is not None else (0.10, 0.20)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    iters = args.iters if args.iters is not None else (3 if quick else 7)
    profile = args.profile if args.profile is not None else cuda
    sc_frames = tuple(args.scaling_frames) if args.scaling_frames else ((4, 8) if quick else (8, 16, 32, 64, 128))
    sc_batch = tuple(args.scaling_batch) if args.scaling_batch else ((1, 2) if quick else (1, 2, 4))
    tp_batch = tuple(args.throughput_batch) if args.throughput_batch else ((1, 2) if quick else (1, 4, 8))
    new_tokens = args.new_tokens or (4 if quick else 64)

    if args.out:
        out_dir = Path(args.out)
    elif cuda:
        out_dir = ROOT / "bench" / "results"
    else:
        out_dir = Path(tempfile.mkdtemp(prefix="earlytom-bench-cpu-"))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out: cannot create {out_dir}: {e.strerror or e}") from None
    now = utc_now()
    stem = out_dir / f"{device_slug(device)}-{now.strftime('%Y-%m-%d')}"
    if any(Path(f"{stem}{s}").exists() for s in (".md", ".json", ".png")):
        stem = Path(f"{stem}-{now.strftime('%H%M%S')}")
    md, js, png = Path(f"{stem}.md"), Path(f"{stem}.json"), Path(f"{stem}.png")

    def log(msg: str) -> None:
        print(f"[bench {time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    spec = models.get_spec(model_name)
    selected = [(n, w) for n, w in SECTIONS if getattr(args, n)]
    results: dict = {
        "meta": {
            "device": device,
            "quick": quick,
            "model": model_name,
            "dtype": str(dtype).replace("torch.", ""),
            "frames": frames,
            "batch": args.batch,
            "ratios": list(ratios),
            "patterns": list(patterns),
            "headline_pattern": patterns[0],
            "llm_merge_ratios": list(llm_merge_ratios),
            "preset": args.preset,
            "warmup": warmup,
            "iters": iters,
            "profile": profile,
            "text_tokens": models.TEXT_TOKENS,
            "throughput_batch": list(tp_batch),
            "new_tokens": new_tokens,
            "time_budget_s": args.time_budget,
            "sections": [n for n, _ in selected],
            "spec": spec.to_dict(),
            "goals": GOALS,
            "paper": PAPER,
            "label": "CPU smoke run, not a performance result" if not cuda else "GPU run",
        },
        "env": environment(device),
        "errors": [],
        "skipped": [],
    }
    log(
        f"device {device} ({results['env'].get('gpu', {}).get('name', 'CPU')}), model {model_name}, {frames} frames, "
        f"batch {args.batch}, output {stem}.*"
    )

    state: dict = {"model": None}
    if any(n in ("ttft", "gaps", "encoder", "scaling", "throughput") for n, _ in selected):
        try:
            model, info = models.build_model(model_name, device=device, dtype=dtype)
            info["weights_finite"] = models.check_weights_finite(model)
            results["meta"]["model_info"] = info
            if not info["weights_finite"]:
                results["errors"].append("the random weights contain NaN/Inf")
            state["model"] = model
            log(f"model built in {info['build_s']:.1f} s ({params_text(info['params'])})")
        except Exception as e:
            results["errors"].append(f"model build failed: {type(e).__name__}: {e}")
            log(f"model build FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()

    files: list[Path] = []

    def write_outputs(final: bool) -> None:
        """md + json (+ the figure when final) and the manifest; called after every section so a
        run stopped by a time limit still leaves its finished sections behind."""
        nonlocal files
        results["meta"]["elapsed_s"] = time.monotonic() - t_start
        results["meta"]["complete"] = final
        plot = None
        if final and not args.no_plots:
            try:
                plot = write_plot(png, results)
            except Exception as e:
                results["errors"].append(f"plot failed: {type(e).__name__}: {e}")
                traceback.print_exc()
        files = [md, js] + ([plot] if plot else [])
        results["meta"]["files"] = [str(p) for p in files]
        write_markdown(md, results)
        js.write_text(json.dumps(results, indent=1, default=str))
        if args.manifest:
            Path(args.manifest).write_text("\n".join(str(p.resolve()) for p in files) + "\n")

    def needs_model(fn: Callable[[Budget], object]) -> Callable[[Budget], object]:
        def run(b: Budget):
            if state["model"] is None:
                raise RuntimeError("no model (its build failed)")
            return fn(b)

        return run

    m = lambda: state["model"]  # noqa: E731
    common = dict(benchmark_preset=args.preset, dtype=dtype, log=log)
    section_fns: dict[str, Callable[[Budget], object]] = {
        "ttft": needs_model(
            lambda b: bench_ttft.benchmark(
                m(),
                spec,
                device,
                frames=frames,
                batch=args.batch,
                ratios=ratios,
                patterns=patterns,
                llm_merge_ratios=llm_merge_ratios,
                warmup=warmup,
                iters=iters,
                profile=profile,
                budget=b,
                **common,
            )
        ),
        "gaps": needs_model(
            lambda b: (
                profile_ttft.benchmark(
                    m(),
                    spec,
                    device,
                    frames=frames,
                    batch=args.batch,
                    ratio=ratios[0],
                    pattern=patterns[0],
                    warmup=max(1, warmup),
                    budget=b,
                    **common,
                )
                if profile
                else {"skipped": "needs torch.profiler (on for CUDA runs; --profile turns it on)"}
            )
        ),
        "flops": lambda b: flops.section_rows(spec, results.get("ttft") or [], frames, models.TEXT_TOKENS, args.preset),
        "throughput": needs_model(
            lambda b: bench_throughput.benchmark(
                m(),
                spec,
                device,
                frames=frames,
                batches=tp_batch,
                new_tokens=new_tokens,
                ratio=ratios[0],
                pattern=patterns[0],
                warmup=1 if not quick else 0,
                iters=2 if not quick else 1,
                budget=b,
                **common,
            )
        ),
        "scaling": needs_model(
            lambda b: bench_ttft.scaling(
                m(),
                spec,
                device,
                frames_list=sc_frames,
                batch_list=sc_batch,
                base_frames=frames,
                ratio=ratios[0],
                pattern=patterns[0],
                warmup=1 if not quick else 0,
                iters=3 if not quick else 1,
                budget=b,
                **common,
            )
        ),
        "encoder": needs_model(
            lambda b: bench_encoder.benchmark(
                m(),
                spec,
                device,
                frames=frames,
                batch=args.batch,
                ratios=ratios,
                patterns=patterns,
                warmup=warmup,
                iters=iters,
                budget=b,
                **common,
            )
        ),
        "kernels": lambda b: run_kernels(device, quick, b, log),
        "qwen": lambda b: bench_qwen25vl.benchmark(
            device,
            size=bench_qwen25vl.TINY[args.qwen_model] if quick else args.qwen_model,
            ratios=(0.10, 0.25),
            pattern=patterns[0],
            warmup=warmup,
            iters=iters,
            budget=b,
            **common,
        ),
        "next_video": lambda b: bench_next_video.benchmark(
            device,
            size=bench_next_video.TINY[args.next_video_model] if quick else args.next_video_model,
            ratios=(0.10, 0.25),
            pattern=patterns[0],
            warmup=warmup,
            iters=iters,
            budget=b,
            **common,
        ),
    }
    result_key = {"qwen": "qwen25vl", "next_video": "llava_next_video"}

    def section(i: int, name: str, weight: float) -> None:
        if name != "flops" and budget.expired():
            results["skipped"].append(f"section {name}: the time budget of {args.time_budget:.0f} s is used up")
            log(f"section {name}: skipped (time budget)")
            return
        if name in ("qwen", "next_video") and state["model"] is not None:
            state["model"] = None  # the LLaVA model's memory goes back before the next 8B model
            free_memory(device)
        share = budget.share(weight, sum(w for _, w in selected[i:]))
        left = share.left()
        log(f"section {name}" + (f" ({left:.0f} s)" if left is not None and weight > 0 else ""))
        try:
            results[result_key.get(name, name)] = section_fns[name](share)
        except Exception as e:
            results["errors"].append(f"{name}: {type(e).__name__}: {e}")
            log(f"section {name} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
        free_memory(device)
        write_outputs(final=False)

    # A time limit (SIGTERM from `timeout`) ends the run through KeyboardInterrupt, so the
    # finished sections are still written.
    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    prev_term = signal.signal(signal.SIGTERM, on_term)
    prev_threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(max(1, args.cpu_threads))
    try:
        for i, (name, weight) in enumerate(selected):
            section(i, name, weight)
    except KeyboardInterrupt as e:
        results["errors"].append(f"run interrupted ({e}); the sections before it are complete")
        log(f"interrupted: {e}")
    finally:
        signal.signal(signal.SIGTERM, prev_term)
        torch.set_num_threads(prev_threads)
        state["model"] = None
        collect_outcomes(results)
        write_outputs(final=True)
    log(f"wrote {', '.join(str(p) for p in files)}")
    print()
    print("\n".join(goals_section(results)))
    for key in ("errors", "skipped"):
        if results[key]:
            print(f"{key}:")
            for e in results[key]:
                print(f"  - {e}")
    return results


if __name__ == "__main__":
    # Exit status 1 when a part failed (skipped parts do not count), so scripts can tell.
    sys.exit(1 if main()["errors"] else 0)
