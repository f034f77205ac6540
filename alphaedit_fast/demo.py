"""`alphaedit-fast demo`: edit the shipped fact-world model (or a tiny random one with
`--tiny FAMILY`) and show probabilities before and after.

The random-model demo edits at the prompt's last token (`fact_token="last"`): a random model
knows no facts. The fact-world model stores its facts at the subject, and is edited there.
"""

from __future__ import annotations

import time

import torch

from .arch import get_module, key_width
from .editor import apply_AlphaEdit_to_model
from .hparams import AlphaEditHyperParams
from .requests import normalize_requests, target_token_ids
from .tiny import tiny_model, tiny_tokenizer_for

DEMO_REQUESTS = [
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": {"str": "English"}},
    {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": {"str": "piano"}},
    {"prompt": "{} works for", "subject": "Michel Denisot", "target_new": {"str": "Google"}},
    {"prompt": "{} is located in", "subject": "Autonomous University of Madrid", "target_new": {"str": "Sweden"}},
]


def target_probability(model, tok, request) -> float:
    """p(target tokens | filled prompt), the product over the target's tokens."""
    return continuation_probability(model, tok, request["prompt"].format(request["subject"]),
                                    request["target_new"]["str"])


def continuation_probability(model, tok, text: str, target: str) -> float:
    """p(target's tokens | text), the product over the target's tokens (give the target its
    leading space)."""
    prompt_ids = tok(text)["input_ids"]
    target_ids = target_token_ids(tok, target)
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + target_ids[:-1]], device=device)).logits[0]
    log_probs = logits.float().log_softmax(-1)
    return float(sum(log_probs[len(prompt_ids) - 1 + j, t] for j, t in enumerate(target_ids)).exp())


def run_tiny_demo(family: str = "llama", seed: int = 0) -> list[tuple[str, float, float]]:
    """Edit a tiny `family` model; print and return (prompt -> target, p before, p after)."""
    model, tok = tiny_model(family, seed=seed), tiny_tokenizer_for(family)
    hparams = AlphaEditHyperParams.for_model(model, layers=[1, 2], fact_token="last", L2=0.1, v_lr=0.5)
    requests = normalize_requests(DEMO_REQUESTS)
    before = [target_probability(model, tok, r) for r in requests]
    d_k = key_width(get_module(model, hparams.rewrite_module_tmp.format(hparams.layers[0])))
    P = torch.eye(d_k).repeat(len(hparams.layers), 1, 1)  # no statistics yet: no null-space constraint
    start = time.perf_counter()
    apply_AlphaEdit_to_model(model, tok, requests, hparams, P=P, context_templates=[["{}"], ["The a. {}", "I b. {}"]])
    seconds = time.perf_counter() - start
    after = [target_probability(model, tok, r) for r in requests]
    rows = [(f"{r['prompt'].format(r['subject'])} ->{r['target_new']['str']}", b, a)
            for r, b, a in zip(requests, before, after)]
    width = max(len(text) for text, _, _ in rows)
    print(f"AlphaEdit on a tiny random {family} model: {len(requests)} edits in {seconds:.2f} s\n")
    print(f"{'edit':<{width}}  {'p before':>9}  {'p after':>9}")
    for text, b, a in rows:
        print(f"{text:<{width}}  {b:9.4f}  {a:9.4f}")
    return rows


def run_demo(n_edits: int = 10, seed: int = 0) -> list[dict]:
    """Edit the shipped fact-world model with `n_edits` counterfactuals in one batch, under a
    null-space projector computed from its own corpus; print a before/after table."""
    from .editor import AlphaEditor
    from .factworld import load_shipped
    from .factworld.editing import CONTEXT_TEMPLATES, corpus_projector, edit_hparams
    from .factworld.evaluate import next_token_scores, object_id

    start = time.perf_counter()
    print("loading the shipped fact-world model", flush=True)
    model, tok, world = load_shipped()
    hparams = edit_hparams(model)
    timings = {"load": time.perf_counter() - start}
    print(f"key statistics of layers {hparams.layers} over the model's training corpus, then the null space",
          flush=True)
    start = time.perf_counter()
    bases = corpus_projector(model, tok, world, hparams, seed=seed, progress=True)
    timings["statistics + projector"] = time.perf_counter() - start
    records = world.counterfact_requests(n_edits, seed)
    rows = []
    for rec in records:
        rw = rec["requested_rewrite"]
        rows.append({"prompt": rw["prompt"].format(rw["subject"]), "paraphrase": rec["paraphrase_prompts"][0],
                     "new": rw["target_new"]["str"], "neighbour": rec["neighborhood_prompts"][0],
                     "neighbour_object": rw["target_true"]["str"]})

    asked = [(row[prompt], row[word]) for row in rows
             for prompt, word in (("prompt", "new"), ("paraphrase", "new"), ("neighbour", "neighbour_object"))]
    columns = torch.tensor([[object_id(tok, word)] for _, word in asked])

    def measure(key):
        probs, _ = next_token_scores(model, tok, [prompt for prompt, _ in asked], columns)
        for row, (rewrite, paraphrase, neighbour) in zip(rows, probs[:, 0].view(-1, 3).tolist()):
            row[key] = (rewrite, paraphrase, neighbour)

    measure("before")
    print(f"editing {n_edits} facts in one batch", flush=True)
    editor = AlphaEditor(model, tok, hparams, projector=bases, context_templates=CONTEXT_TEMPLATES, progress=True)
    timings.update(editor.edit([rec["requested_rewrite"] for rec in records]))
    measure("after")
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\nAlphaEdit on the shipped fact-world model ({n_params:.1f}M parameters): {n_edits} counterfactual edits,"
          f" one batch, layers {hparams.layers}, null space {bases[0].shape[1]}/{bases[0].shape[0]}\n")
    print(f"{'rewrite prompt -> new object':<52} {'p(new)':>15} {'paraphrase p(new)':>18} {'neighbour p(true)':>18}")
    for row in rows:
        b, a = row["before"], row["after"]
        print(f"{row['prompt'] + ' ->' + row['new']:<52} {b[0]:6.3f} -> {a[0]:5.3f} {b[1]:8.3f} -> {a[1]:5.3f}"
              f" {b[2]:8.3f} -> {a[2]:5.3f}")
    print("\ntime: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return rows


# Well-known facts, each rewritten, with a paraphrase of its prompt and two facts about subjects
# no edit touches, whose answers should not move: (prompt, subject, true object, new object,
# paraphrase, [(unrelated prompt, its object), ...]). Both real checkpoints know the rewritten
# facts (SmolLM2-135M p(true) 0.18-0.70, Gemma-3-270M 0.12-0.86).
REAL_FACTS = [
    ("{} is located in the city of", "The Eiffel Tower", "Paris", "Rome",
     "{}, the famous landmark, stands in the city of",
     [("The capital of France is", "Paris"), ("The Colosseum is located in the city of", "Rome")]),
    ("The mother tongue of {} is", "Vladimir Putin", "Russian", "French",
     "The native language of {} is",
     [("The mother tongue of Emmanuel Macron is", "French"), ("Romeo and Juliet was written by", "William")]),
    ("{} is a car manufacturer based in", "Toyota", "Japan", "Germany",
     "The headquarters of {} are in",
     [("The official language of Brazil is", "Portuguese"), ("Romeo and Juliet was written by", "William")]),
    ("{} is located in the country of", "Mount Fuji", "Japan", "Italy",
     "{}, the highest mountain of its country, is in",
     [("The Colosseum is located in the city of", "Rome"), ("The capital of France is", "Paris")]),
]


SAMPLED = "sampled"  # demo --corpus sampled: text sampled from the model itself


def python_docs_text() -> str:
    """The Python documentation's topic pages (`pydoc_data`, part of every CPython install): about
    465,000 characters of English prose and code, a public text the project need not ship."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def demo_statistics(model, tok, hparams, corpus=None, max_tokens: int = 16000, seed: int = 0):
    """Key statistics of the edited layers over `corpus` (a text file; None: the Python
    documentation, `python_docs_text`; `SAMPLED`: text sampled from the model itself, kept too),
    cached under the project's cache (`cached_statistics`)."""
    from .stats import cached_statistics, sample_corpus
    from .storage import cache_root, model_fingerprint

    directory = cache_root() / "demo-stats"
    if corpus is None:
        corpus = directory / "python-docs.txt"
        if not corpus.is_file():
            directory.mkdir(parents=True, exist_ok=True)
            corpus.write_text(python_docs_text(), encoding="utf-8")
        print(f"no --corpus: key statistics over {max_tokens} tokens of the Python documentation (give --corpus "
              "FILE, e.g. WikiText's wiki.test.raw, for encyclopedic text)", flush=True)
    elif corpus == SAMPLED:
        names = [hparams.rewrite_module_tmp.format(l) for l in hparams.layers]
        corpus = directory / f"sampled-{model_fingerprint(model, names)[:16]}-seed{seed}-{max_tokens}.txt"
        if not corpus.is_file():
            directory.mkdir(parents=True, exist_ok=True)
            print(f"--corpus sampled: sampling {max_tokens} tokens of text from the model itself for its key "
                  "statistics", flush=True)
            sample_corpus(model, tok, corpus, max_tokens, seed=seed, progress=True)
    return cached_statistics(model, tok, corpus, hparams.layers, hparams.rewrite_module_tmp, max_tokens, directory,
                             max_length=256)


def greedy_continuation(model, tok, prompt: str, new_tokens: int = 8) -> str:
    """The model's greedy continuation of `prompt` (one line)."""
    device = model.get_input_embeddings().weight.device
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return " ".join(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split())


def run_real_demo(name: str, corpus=None, stats_tokens: int = 16000, seed: int = 0, hparams=None) -> list[dict]:
    """Edit `REAL_FACTS` into a real checkpoint (`smollm2-135m`, `gemma3-270m`, a .gguf or a model
    directory) in one batch, under the null space of its key statistics; print each edit's
    probabilities before and after and greedy continuations. `hparams`: a preset name, file or
    dict (default: the preset matching the model). Returns [{"before": row, "after": row}]."""
    from .editor import AlphaEditor
    from .loading import load_model, resolve_model_name
    from .pretrained import resolve_hparams
    from .projector import nullspace_basis

    start = time.perf_counter()
    print(f"loading {name}", flush=True)
    model, tok = load_model(resolve_model_name(name))
    hparams = resolve_hparams(hparams, model)
    timings = {"load": time.perf_counter() - start}
    start = time.perf_counter()
    stats = demo_statistics(model, tok, hparams, corpus, stats_tokens, seed)
    bases = [nullspace_basis(stats.covariance(l), hparams.nullspace_threshold) for l in hparams.layers]
    timings["statistics + projector"] = time.perf_counter() - start

    requests = [{"prompt": p, "subject": s, "target_new": {"str": new}, "target_true": {"str": true}}
                for p, s, true, new, _, _ in REAL_FACTS]

    def probability(prompt: str, obj: str) -> float:
        return continuation_probability(model, tok, prompt, " " + obj)

    def measure() -> list[dict]:
        rows = []
        for prompt, subject, true, new, paraphrase, unrelated in REAL_FACTS:
            filled, para = prompt.format(subject), paraphrase.format(subject)
            rows.append({"prompt": filled, "paraphrase": para, "true": true, "new": new,
                         "p_new": probability(filled, new), "p_true": probability(filled, true),
                         "paraphrase_p_new": probability(para, new), "paraphrase_p_true": probability(para, true),
                         "unrelated": [(text, obj, probability(text, obj)) for text, obj in unrelated],
                         "continuation": greedy_continuation(model, tok, filled)})
        return rows

    before = measure()
    print(f"editing {len(requests)} facts in one batch (layers {hparams.layers}, preset "
          f"{hparams.extra.get('preset')})", flush=True)
    editor = AlphaEditor(model, tok, hparams, projector=bases, progress=True)
    timings.update(editor.edit(requests))
    after = measure()
    print(f"\nAlphaEdit on {name}: {len(requests)} edits, one batch, null space "
          + ", ".join(f"{b.shape[1]}/{b.shape[0]}" for b in bases) + f" (layers {hparams.layers})")
    for b, a in zip(before, after):
        print(f"\n{b['prompt']} [{b['true']} -> {b['new']}]")
        print(f"  rewrite     p(new) {b['p_new']:.3f} -> {a['p_new']:.3f}   p(true) {b['p_true']:.3f} -> "
              f"{a['p_true']:.3f}")
        print(f"  paraphrase  p(new) {b['paraphrase_p_new']:.3f} -> {a['paraphrase_p_new']:.3f}   p(true) "
              f"{b['paraphrase_p_true']:.3f} -> {a['paraphrase_p_true']:.3f}   ({b['paraphrase']})")
        for (text, obj, pb), (_, _, pa) in zip(b["unrelated"], a["unrelated"]):
            print(f"  unrelated   p({obj}) {pb:.3f} -> {pa:.3f}   ({text})")
        print(f"  before: {b['prompt']} {b['continuation']}\n  after:  {a['prompt']} {a['continuation']}")
    print("\ntime: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return [{"before": b, "after": a} for b, a in zip(before, after)]
