"""Causal tracing of a fact-world model: where is a fact written? (ROME's method: noise on the
subject's embeddings, then restore one clean hidden state and see how much of p(object) returns.)

python -m alphaedit_fast.factworld.causal_trace [DIR] [--by-relation]
"""

from __future__ import annotations

import argparse
import random
import sys

from tqdm.auto import tqdm

from ..causal_trace import CausalTracer
from ..errors import run_reporting_errors
from . import load_model


def causal_trace(model, tok, world, n=60, noise=3.0, seed=0, relation=None, progress=False):
    """Mean recovered p(object) restoring the layer-l output at the subject's last token vs the last token,
    over `n` facts (of `relation` only, if given); `progress` shows a bar over the facts. The noise is
    `noise` x the standard deviation of the embedding matrix; the tracing is `CausalTracer`'s."""
    rng = random.Random(seed)
    facts = rng.sample([f for f in world.fact_list() if relation in (None, f[1])], n)
    emb_std = model.get_input_embeddings().weight.std().item()
    tracer = CausalTracer(model, tok, noise=noise * emb_std)
    L = tracer.num_layers
    res = {"clean": 0.0, "corrupt": 0.0, "subj": [0.0] * L, "last": [0.0] * L}
    for s, r, o in tqdm(facts, desc=f"tracing {relation or 'all facts'}", unit="fact", disable=not progress,
                        leave=False):
        template = world.relations[r]["templates"][0]
        ids, (_, subject_last) = tracer.span(template, s)
        last = len(ids) - 1
        trace = tracer.trace(template, s, o, kinds=("block",), seed=rng.randrange(1 << 30),
                             tokens=(subject_last, last))
        restored = trace.restored["block"]
        res["clean"] += trace.clean / n
        res["corrupt"] += trace.corrupted / n
        for layer in range(L):
            res["subj"][layer] += float(restored[subject_last, layer]) / n
            res["last"][layer] += float(restored[last, layer]) / n
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m alphaedit_fast.factworld.causal_trace")
    ap.add_argument("path", nargs="?", help="a fact-world model directory (default: the shipped one)")
    ap.add_argument("--n", type=int, default=60, help="facts traced (per relation with --by-relation)")
    ap.add_argument("--by-relation", action="store_true", help="one line per relation")
    ap.add_argument("--debug", action="store_true", help="on an error show the traceback, not one line")
    a = ap.parse_args(argv)
    return run_reporting_errors(ap.prog, a.debug, lambda: run(a))


def run(a) -> None:
    model, tok, world = load_model(a.path)
    for relation in list(world.relations) if a.by_relation else [None]:
        res = causal_trace(model, tok, world, n=a.n, relation=relation, progress=True)
        print(f"{relation or 'all facts':>10}: clean {res['clean']:.2f} corrupt {res['corrupt']:.2f} | restore "
              f"subject-last {' '.join(f'{v:.2f}' for v in res['subj'])} | last token "
              f"{' '.join(f'{v:.2f}' for v in res['last'])}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
