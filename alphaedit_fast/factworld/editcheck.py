"""Causal tracing and AlphaEdit editability checks for a fact-world model.

python -m alphaedit_fast.factworld.editcheck DIR [--trace] [--grid]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
import warnings

import torch

from .world import build_world


def load(path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    meta = json.load(open(f"{path}/factworld.json"))
    return model, tok, build_world(meta.get("seed", 0), meta.get("n_subjects", 240))


def first_id(tok, word):
    return tok(" " + word)["input_ids"][0]


def subject_span(tok, prompt, subject):
    start = prompt.index(subject)
    end = start + len(subject)
    enc = tok(prompt, return_offsets_mapping=True)
    idx = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < end]
    return enc["input_ids"], idx


@torch.no_grad()
def causal_trace(model, tok, world, n=60, noise=3.0, seed=0):
    """Mean recovered p(object) restoring the layer-l output at the subject's last token vs the last token."""
    rng = random.Random(seed)
    facts = rng.sample(world.fact_list(), n)
    layers = model.model.layers
    emb_std = model.model.embed_tokens.weight.std().item()
    L = len(layers)
    res = {"clean": 0.0, "corrupt": 0.0, "subj": [0.0] * L, "last": [0.0] * L}
    for s, r, o in facts:
        prompt = world.relations[r]["templates"][0].format(s)
        ids, span = subject_span(tok, prompt, s)
        x = torch.tensor([ids])
        target = first_id(tok, o)
        clean_h = []
        def keep(m, a, out, store=clean_h):
            store.append((out[0] if isinstance(out, tuple) else out).clone())

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
                    hid = out[0] if isinstance(out, tuple) else out
                    hid = hid.clone()
                    hid[0, pos] = clean_h[restore_layer][0, pos]
                    return (hid, *out[1:]) if isinstance(out, tuple) else hid
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


def make_requests(world, n=10, seed=0):
    rng = random.Random(f"req-{seed}")
    rels = list(world.relations)
    subs = rng.sample(world.test_subjects(), n)
    reqs = []
    for i, s in enumerate(subs):
        r = rels[i % len(rels)]
        new = world.counterfactual(s, r, seed)
        reqs.append({"prompt": world.relations[r]["templates"][0], "subject": s, "target_new": {"str": new},
                     "relation": r, "true": world.facts[(s, r)]})
    return reqs


@torch.no_grad()
def argmax_is(model, tok, prompt, word):
    x = tok(prompt, return_tensors="pt")
    return model(**x).logits[0, -1].argmax().item() == first_id(tok, word)


def evaluate(model, tok, world, reqs):
    eff = para = nb = nbn = 0
    for q in reqs:
        s, r, new = q["subject"], q["relation"], q["target_new"]["str"]
        eff += argmax_is(model, tok, q["prompt"].format(s), new)
        para += argmax_is(model, tok, world.relations[r]["paraphrases"][0].format(s), new)
        for p, o in world.neighbourhood(s, r, k=3):
            nb += argmax_is(model, tok, p, o)
            nbn += 1
    n = len(reqs)
    return {"efficacy": eff / n, "paraphrase": para / n, "neighbourhood": nb / max(1, nbn)}


def try_edit(model, tok, world, reqs, layers, **hp_over):
    from alphaedit_fast import AlphaEditHyperParams, AlphaEditor

    m = copy.deepcopy(model)
    hp = AlphaEditHyperParams.for_model(m, layers=layers, **hp_over)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ed = AlphaEditor(m, tok, hp, projector=None,
                         context_templates=[["{}"], ["The. {}", "Therefore. {}", "Yes. {}", "So. {}"]])
    t0 = time.time()
    ed.edit([{k: q[k] for k in ("prompt", "subject", "target_new")} for q in reqs])
    out = evaluate(m, tok, world, reqs)
    out["edit_s"] = round(time.time() - t0, 1)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--grid", action="store_true")
    ap.add_argument("--n", type=int, default=10)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    model, tok, world = load(a.path)
    if a.trace:
        res = causal_trace(model, tok, world)
        print("clean {:.3f} corrupt {:.3f}".format(res["clean"], res["corrupt"]))
        print("restore subj-last:", " ".join(f"{v:.3f}" for v in res["subj"]))
        print("restore last tok :", " ".join(f"{v:.3f}" for v in res["last"]))
    reqs = make_requests(world, a.n)
    print("pre-edit", evaluate(model, tok, world, reqs), flush=True)
    if a.grid:
        L = model.config.num_hidden_layers
        base = dict(v_lr=0.5, L2=1.0, clamp_norm_factor=4.0, v_num_grad_steps=25)
        best = dict(v_lr=0.5, L2=1.0, clamp_norm_factor=1.0, v_num_grad_steps=25)  # best found: layer 0
        configs = [([0], best), ([0], {**best, "clamp_norm_factor": 4.0}), ([0, 1], base), ([1, 2], base),
                   ([2, 3], base), ([0, 1, 2], base), ([1, 2, 3], base),
                   (list(range(L - 1)), base), ([1, 2], {**base, "clamp_norm_factor": 0.75}),
                   ([1, 2], {**base, "L2": 10.0})]
        for layers, over in configs:
            print(layers, over, try_edit(model, tok, world, reqs, layers, **over), flush=True)


if __name__ == "__main__":
    main()
