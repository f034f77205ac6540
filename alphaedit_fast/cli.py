"""`alphaedit-fast`: command-line entry point."""

from __future__ import annotations

import argparse
import sys

from .tiny import FAMILY_CONFIGS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alphaedit-fast", description="Exact, fast AlphaEdit knowledge editing.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="edit a tiny model and print target probabilities before/after")
    demo.add_argument("--family", default="llama", choices=sorted(FAMILY_CONFIGS))
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("version", help="print versions and available backends")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.family, args.seed)
    elif args.command == "version":
        import torch
        import transformers

        from . import __version__, extension_available

        print(f"alphaedit_fast {__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
              f"compiled extension: {'yes' if extension_available() else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
