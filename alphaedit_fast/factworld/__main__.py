"""python -m alphaedit_fast.factworld build --out DIR [--seed 0 ...]"""

import argparse

from .train import train


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m alphaedit_fast.factworld")
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
    a = ap.parse_args(argv)
    train(a.out, seed=a.seed, n_subjects=a.subjects, eval_every=a.eval_every, hidden=a.hidden, layers=a.layers,
          vocab_size=a.vocab, epochs=a.epochs, batch=a.batch, lr=a.lr, label_smoothing=a.label_smoothing,
          mlp_ratio=a.mlp_ratio, threads=a.threads, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
