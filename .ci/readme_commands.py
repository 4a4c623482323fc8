#!/usr/bin/env python3
"""Print the shell commands of one README section, so that CI runs exactly what the README says.

    python .ci/readme_commands.py [README.md] [--section "Set up"] [--lang bash]

Prints every fenced code block of the section (from its ``## `` heading to the next ``## ``
heading) whose language is ``--lang``, in order, each after a comment naming it. Blocks in other
languages are shown to the reader but not run by CI: the README's CPU-only route is a ``sh`` block
because it installs torch from the PyTorch CPU index, which CI cannot reach and which would
replace the CUDA build that CI checks. Exits 1 when the section or its blocks are missing, so that
renaming the section or the fence cannot silently drop the commands from CI.
"""

from __future__ import annotations

import argparse
import re
import sys


def section_blocks(text: str, section: str, lang: str) -> list[str]:
    """The ``lang`` code blocks of the ``## section`` of a markdown text."""
    m = re.search(rf"^## {re.escape(section)}[ \t]*\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    if m is None:
        raise LookupError(f"no '## {section}' section")
    # Fences at the start of a line; the block ends at the first closing fence.
    return [b for b in re.findall(rf"^```{re.escape(lang)}[ \t]*\n(.*?)^```[ \t]*$", m.group(1), flags=re.S | re.M)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Print the shell commands of one README section.")
    p.add_argument("readme", nargs="?", default="README.md", help="markdown file (default README.md)")
    p.add_argument("--section", default="Set up", help="the '## ' heading's text (default 'Set up')")
    p.add_argument("--lang", default="bash", help="the code fence's language (default bash)")
    args = p.parse_args(argv)
    try:
        with open(args.readme, encoding="utf-8") as f:
            blocks = section_blocks(f.read(), args.section, args.lang)
    except (OSError, LookupError) as e:
        print(f"readme_commands: {args.readme}: {e}", file=sys.stderr)
        return 1
    if not blocks:
        print(f"readme_commands: {args.readme}: no ```{args.lang} block in '## {args.section}'", file=sys.stderr)
        return 1
    for i, block in enumerate(blocks, 1):
        print(f"# --- {args.readme}, '## {args.section}', ```{args.lang} block {i} of {len(blocks)}")
        print(block, end="" if block.endswith("\n") else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
