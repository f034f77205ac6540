"""python -m alphaedit_fast.factworld build --out DIR [--seed 0 ...]   # world + tokenizer + model
python -m alphaedit_fast.factworld requests --edits N --out FILE        # CounterFact records of a world
python -m alphaedit_fast.factworld requests --stream --out FILE         # every fact but one per subject
python -m alphaedit_fast.factworld corpus --out FILE                    # its training text, one per line"""

import argparse
import json
import sys
from pathlib import Path

from ..errors import run_reporting_errors


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m alphaedit_fast.factworld")
    ap.add_argument("--debug", action="store_true", help="on an error show the traceback, not one line")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the world, train tokenizer + model, save them")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--subjects", type=int, default=500)
    b.add_argument("--eval-every", type=int, default=0)
    b.add_argument("--hidden", type=int, default=128)
    b.add_argument("--layers", type=int, default=6)
    b.add_argument("--vocab", type=int, default=4096)
    b.add_argument("--epochs", type=int, default=20)
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--lr", type=float, default=3e-3)
    b.add_argument("--label-smoothing", type=float, default=0.0)
    b.add_argument("--mlp-ratio", type=int, default=4)
    b.add_argument("--threads", type=int, default=1)
    r = sub.add_parser("requests", help="write counterfactual edits of a world as CounterFact records (JSON)")
    c = sub.add_parser("corpus", help="write a world's training text, one sentence per line")
    for p in (r, c):
        p.add_argument("--model", help="a fact-world model directory (default: the shipped one)")
        p.add_argument("--out", required=True)
        p.add_argument("--seed", type=int, default=0)
    r.add_argument("--edits", type=int, default=20)
    r.add_argument("--stream", action="store_true", help="every fact but one relation per subject (3,500 edits "
                   "of the shipped world) in a seeded order, instead of --edits, one per subject")
    c.add_argument("--lines", type=int, default=3000)
    a = ap.parse_args(argv)
    return run_reporting_errors(ap.prog, a.debug, lambda: run(a))


def run(a) -> None:
    if a.cmd in ("requests", "corpus"):
        write_data(a)
        return
    from .train import train

    train(a.out, seed=a.seed, n_subjects=a.subjects, eval_every=a.eval_every, hidden=a.hidden, layers=a.layers,
          vocab_size=a.vocab, epochs=a.epochs, batch=a.batch, lr=a.lr, label_smoothing=a.label_smoothing,
          mlp_ratio=a.mlp_ratio, threads=a.threads, log=lambda m: print(m, flush=True))


def write_data(args) -> None:
    """Write a world's CounterFact records or training corpus (the world of --model's directory)."""
    from . import load_world
    from .world import training_texts

    world = load_world(args.model)
    if args.cmd == "requests":
        records = world.stream_requests(args.seed) if args.stream else world.counterfact_requests(args.edits, args.seed)
        text = json.dumps(records, indent=1)
    else:
        text = "\n".join(training_texts(world, args.seed)[:args.lines]) + "\n"
    Path(args.out).write_text(text)
    print(f"-> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
