"""Command line: ``earlytom demo [options]`` (the same as ``python -m earlytom_ext demo``).

``earlytom demo --help`` lists the options; ``earlytom --version`` prints the version.
"""

import argparse
import sys
from typing import Optional

from ._version import __version__


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``earlytom`` parser; ``prog`` defaults to the name the command was run by."""
    from . import demo

    parser = argparse.ArgumentParser(
        prog=prog or demo.prog_name(),
        description="EarlyTom video-token compression inside the vision encoder of video LLMs.",
        epilog="Run '%(prog)s demo --help' for the demo's options.",
    )
    parser.add_argument("--version", action="version", version=f"earlytom_ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "demo",
        help="compress a video through a video LLM (a small random LLaVA-OneVision by default; --model: a "
        "checkpoint of any supported family); writes a PNG and prints a summary",
        description=demo.DESCRIPTION,
    )
    demo.add_arguments(p)
    p.set_defaults(command_parser=p)  # so that run_args reports errors with the demo's usage line
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``earlytom`` command; returns the exit status."""
    from . import demo

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported with the usage of the command they were given to
        # The top level takes no option values: the first command name is the command.
        cut = argv.index(args.command) if args.command in argv else len(argv)
        before = set(argv[:cut])
        owner = parser if any(u in before for u in unknown) else getattr(args, "command_parser", parser)
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "demo":
        return demo.run_args(args, args.command_parser)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
