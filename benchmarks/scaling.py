#!/usr/bin/env python
"""Data-parallel editing, measured: the same sequential batches of real CounterFact edits with 1
rank and with N ranks under torchrun (each rank --threads threads), edits per second from the
median batch time, and how far the N-rank edit lies from the 1-rank one (relative difference of
the edited weights' total change; z differs at rounding level between the splits).

  python benchmarks/scaling.py --model smollm2-135m --records 0:36 --batch-size 12 --ranks 1,2 \\
      --out benchmarks/results/scaling-smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def worker(args) -> None:
    """One rank of a run (launched by torchrun): edit the batches, time each after a barrier; rank 0
    writes the seconds and the edited weights' change to --result."""
    import torch.distributed as dist

    from alphaedit_fast import AlphaEditor
    from alphaedit_fast.requests import load_requests
    from alphaedit_fast.sharding import join_ranks, leave_ranks, wait_for_ranks
    from alphaedit_fast.timing import progress_line

    torch.set_num_threads(args.threads)
    device, max_memory, writes = join_ranks(args.device)
    start, count = (int(x) for x in args.records.split(":"))
    requests = load_requests(args.requests)[start:start + count]
    editor = AlphaEditor.from_pretrained(args.model, hparams=args.hparams, projector=args.projector, device=device,
                                         max_memory=max_memory)
    names = [editor.hparams.rewrite_module_tmp.format(layer) for layer in editor.hparams.layers]
    unedited = {n: editor.model.get_submodule(n).weight.detach().clone() for n in names}
    batches = []
    for first in range(0, len(requests), args.batch_size):
        wait_for_ranks("timing")
        began = time.perf_counter()
        phases = editor.edit(requests[first:first + args.batch_size])
        batches.append({"seconds": time.perf_counter() - began, "phases": phases})
        if writes:
            progress_line(f"ranks {dist.get_world_size() if dist.is_initialized() else 1}: batch "
                          f"{len(batches)} in {batches[-1]['seconds']:.1f}s")
    if writes:
        change = {n: (editor.model.get_submodule(n).weight.detach().float() - w.float()).cpu()
                  for n, w in unedited.items()}
        torch.save({"batches": batches, "change": change}, args.result)
    leave_ranks()


def launch(args, ranks: int, result: Path) -> dict:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    command = [torchrun, "--standalone", "--nproc-per-node", str(ranks), __file__, "--worker", "--result",
               str(result), "--model", args.model, "--requests", args.requests, "--records", args.records,
               "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               *(["--projector", args.projector] if args.projector else []),
               *(["--hparams", args.hparams] if args.hparams else []),
               *(["--device", args.device] if args.device else [])]
    print("$ " + " ".join(command[1:]), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    subprocess.run(command, check=True, env=env)
    return torch.load(result)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", default=str(SHARED / "counterfact" / "counterfact-train.json"))
    parser.add_argument("--records", default="0:36", help="START:COUNT of the records")
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--hparams", help="hparams file or preset (default: the model's preset)")
    parser.add_argument("--ranks", default="1,2", help="rank counts to compare; the first is the baseline")
    parser.add_argument("--threads", type=int, default=1, help="threads per rank")
    parser.add_argument("--projector", default="identity", help="projector file, or identity (timing only)")
    parser.add_argument("--device", help="default: each rank's GPU where there are GPUs, else the CPU")
    parser.add_argument("--out", help="JSON result (default: print only)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from alphaedit_fast.bench import machine
    from alphaedit_fast.evaluation import versions

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (int(r) for r in args.ranks.split(",")):
            runs[ranks] = launch(args, ranks, Path(tmp) / f"ranks{ranks}.pt")
    base_ranks = next(iter(runs))
    base = runs[base_ranks]
    n_edits = int(args.records.split(":")[1])
    report = {"model": args.model, "records": args.records, "batch_size": args.batch_size,
              "threads_per_rank": args.threads, "projector": args.projector, "machine": machine(),
              "versions": versions(), "date": time.strftime("%Y-%m-%d"), "runs": {}}
    for ranks, run in runs.items():
        seconds = [b["seconds"] for b in run["batches"]]
        median = statistics.median(seconds)
        diff = {n: float((c - base["change"][n]).norm() / base["change"][n].norm()) for n, c in run["change"].items()}
        report["runs"][str(ranks)] = {
            "batch_seconds": seconds, "median_batch_seconds": median, "edits_per_second": args.batch_size / median,
            "phases_per_batch": [b["phases"] for b in run["batches"]],
            "speedup_vs_baseline": statistics.median(b["seconds"] for b in base["batches"]) / median,
            "edited_weights_relative_difference_vs_baseline": diff}
        print(f"{ranks} rank(s) x {args.threads} thread(s): median batch {median:.1f}s, "
              f"{args.batch_size / median:.2f} edits/s, {report['runs'][str(ranks)]['speedup_vs_baseline']:.2f}x; "
              f"edited weights vs {base_ranks} rank(s): max relative difference {max(diff.values()):.2e}")
    report["n_edits"] = n_edits
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
