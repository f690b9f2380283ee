"""Command line (also ``python -m pcasurgery``).

``pcasurgery demo [--out DIR]``: the end-to-end demo on scikit-learn's digits.
``pcasurgery compress-lm MODEL --text FILE --remove 0.2 --out DIR``: compress a
causal language model under a parameter budget and write a checkpoint that
loads in plain transformers, with its reports.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pcasurgery", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the end-to-end demo on scikit-learn's digits")
    demo.add_argument("--out", default="demo-out", help="folder for the demo's files")
    from ._compress_lm import add_arguments

    lm = sub.add_parser(
        "compress-lm",
        help="compress a causal LM under a parameter budget",
        description=_compress_lm_doc(),
    )
    add_arguments(lm)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        run_demo(args.out)
    elif args.command == "compress-lm":
        from ._compress_lm import run_compress_lm

        try:
            run_compress_lm(args)
        except (ValueError, FileNotFoundError, ImportError) as err:
            print(f"pcasurgery compress-lm: error: {err}", file=sys.stderr)
            return 2
    return 0


def _compress_lm_doc() -> str:
    from . import _compress_lm

    return (_compress_lm.__doc__ or "").split("\n\n")[0]


if __name__ == "__main__":
    sys.exit(main())
