"""`alphaedit-fast`: command-line entry point."""

from __future__ import annotations

import argparse
import sys

import torch

from .bench import SHAPES
from .tiny import FAMILY_CONFIGS


def run_bench(args) -> None:
    from .bench import bench_edit, bench_ops, bench_solve, write_results

    dtype = getattr(torch, args.dtype)
    default_shapes = [] if (args.ops or args.solve) else ["a-gpt2-6x128", "c-llama-8x512"]
    for shape in args.shape or default_shapes:
        result = bench_edit(shape, args.edits, args.repeats, tuple(args.paths.split(",")), args.device, dtype)
        path = write_results(f"edit-{shape}-{args.edits}-{args.device}", result, args.out)
        for name, med in result["paths"].items():
            phases = ", ".join(f"{k} {v:.3f}s" for k, v in med.items() if k not in ("edits_per_s",))
            print(f"{shape} {name:>9}: {med['edits_per_s']:.2f} edits/s ({phases})")
        if "speedup" in result:
            print(f"{shape}   speed-up: " + ", ".join(f"{k} {v:.1f}x" for k, v in result["speedup"].items()))
        print(f"  -> {path}")
    if args.ops:
        result = bench_ops(args.device)
        path = write_results(f"ops-{args.device}", result, args.out)
        print("ops: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in result["gb_per_s"].items()) + f"\n  -> {path}")
    if args.solve:
        result = bench_solve(d_k=args.solve_dk, n_edits=args.solve_edits, device=args.device)
        path = write_results(f"solve-dk{args.solve_dk}-{args.solve_edits}-{args.device}", result, args.out)
        print("solve: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result["seconds"].items())
              + " | speed-up " + ", ".join(f"{k} {v:.1f}x" for k, v in result["speedup"].items()) + f"\n  -> {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alphaedit-fast", description="Exact, fast AlphaEdit knowledge editing.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="edit a tiny model and print target probabilities before/after")
    demo.add_argument("--family", default="llama", choices=sorted(FAMILY_CONFIGS))
    demo.add_argument("--seed", type=int, default=0)
    bench = sub.add_parser("bench", help="reference vs fast editing throughput; writes benchmarks/results/*.json")
    bench.add_argument("--shape", action="append", choices=sorted(SHAPES),
                       help="model shape (repeatable; default: a-gpt2-6x128 and c-llama-8x512 unless --ops/--solve)")
    bench.add_argument("--edits", type=int, default=32, help="edits per batch")
    bench.add_argument("--repeats", type=int, default=3, help="runs per path; medians are reported")
    bench.add_argument("--paths", default="reference,fast", help="comma-separated: reference, fast")
    bench.add_argument("--solve", action="store_true", help="also time one layer's solve at --solve-dk")
    bench.add_argument("--solve-dk", type=int, default=3072)
    bench.add_argument("--solve-edits", type=int, default=100)
    bench.add_argument("--ops", action="store_true", help="also time the hot ops per backend (GB/s)")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--out", default="benchmarks/results")
    sub.add_parser("version", help="print versions and available backends")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.family, args.seed)
    elif args.command == "bench":
        run_bench(args)
    elif args.command == "version":
        import transformers

        from . import __version__, extension_available

        print(f"alphaedit_fast {__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
              f"compiled extension: {'yes' if extension_available() else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
