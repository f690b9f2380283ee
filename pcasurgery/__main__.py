"""Command line: ``pcasurgery demo [--out DIR]`` (also ``python -m pcasurgery demo``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pcasurgery", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the end-to-end demo on scikit-learn's digits")
    demo.add_argument("--out", default="demo-out", help="folder for the demo's files")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        run_demo(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
