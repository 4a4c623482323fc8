"""Command line: ``python -m earlytom_ext demo [--video PATH] [--frames 32] [--ratio 0.1] [--out DIR]``."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m earlytom_ext",
                                     description="EarlyTom video-token compression (LLaVA-OneVision).")
    sub = parser.add_subparsers(dest="command")
    from . import demo

    p = sub.add_parser("demo", help="compress a video through a small random LLaVA-OneVision model; "
                                    "writes a PNG and prints a summary")
    demo.add_arguments(p)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo.run_args(args, p)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
