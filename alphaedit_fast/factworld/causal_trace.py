"""Causal tracing of a fact-world model: where is a fact written? (ROME's method: noise on the
subject's embeddings, then restore one clean hidden state and see how much of p(object) returns.)

python -m alphaedit_fast.factworld.causal_trace [DIR] [--by-relation]
"""

from __future__ import annotations

import argparse
import random
import sys

import torch
from tqdm.auto import tqdm

from ..errors import run_reporting_errors
from ..trace import hidden_of, with_hidden
from . import load_model
from .evaluate import object_id


def subject_span(tok, prompt, subject):
    start = prompt.index(subject)
    end = start + len(subject)
    enc = tok(prompt, return_offsets_mapping=True)
    idx = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < end]
    return enc["input_ids"], idx


@torch.no_grad()
def causal_trace(model, tok, world, n=60, noise=3.0, seed=0, relation=None, progress=False):
    """Mean recovered p(object) restoring the layer-l output at the subject's last token vs the last token,
    over `n` facts (of `relation` only, if given); `progress` shows a bar over the facts."""
    rng = random.Random(seed)
    facts = rng.sample([f for f in world.fact_list() if relation in (None, f[1])], n)
    layers = model.model.layers
    emb_std = model.model.embed_tokens.weight.std().item()
    L = len(layers)
    res = {"clean": 0.0, "corrupt": 0.0, "subj": [0.0] * L, "last": [0.0] * L}
    for s, r, o in tqdm(facts, desc=f"tracing {relation or 'all facts'}", unit="fact", disable=not progress,
                        leave=False):
        prompt = world.relations[r]["templates"][0].format(s)
        ids, span = subject_span(tok, prompt, s)
        x = torch.tensor([ids])
        target = object_id(tok, o)
        clean_h = []
        def keep(m, a, out, store=clean_h):
            store.append(hidden_of(out).clone())

        hs = [layer.register_forward_hook(keep) for layer in layers]
        p_clean = model(x).logits[0, -1].softmax(-1)[target].item()
        for h in hs:
            h.remove()
        g = torch.Generator().manual_seed(rng.randrange(1 << 30))
        nz = torch.randn(len(span), model.config.hidden_size, generator=g) * noise * emb_std

        def corrupt(m, a, out, span=span, nz=nz):
            out = out.clone()
            out[0, span] += nz
            return out

        def run(restore_layer=None, pos=None, x=x, target=target, clean_h=clean_h, corrupt=corrupt):
            handles = [model.model.embed_tokens.register_forward_hook(corrupt)]
            if restore_layer is not None:
                def rest(m, a, out, clean_h=clean_h, restore_layer=restore_layer, pos=pos):
                    hid = hidden_of(out).clone()
                    hid[0, pos] = clean_h[restore_layer][0, pos]
                    return with_hidden(out, hid)
                handles.append(layers[restore_layer].register_forward_hook(rest))
            p = model(x).logits[0, -1].softmax(-1)[target].item()
            for h in handles:
                h.remove()
            return p

        res["clean"] += p_clean / n
        res["corrupt"] += run() / n
        for layer in range(L):
            res["subj"][layer] += run(layer, span[-1]) / n
            res["last"][layer] += run(layer, len(ids) - 1) / n
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
