#!/usr/bin/env python
"""Sequential editing of a real checkpoint: AlphaEdit against P = I against the unedited model.

The same CounterFact records (EasyEdit's flat schema, a held-out slice of the development split
`../shared/data/counterfact/counterfact-train.json`; the presets were tuned on other records)
are edited in sequential batches, once under the null space of WikiText key statistics
(AlphaEdit) and once with P = I (MEMIT-style sequential editing, the same code with the
projection off), each from the unedited weights. After every batch, over the records edited so
far: the paper's CounterFact rates (NLL comparison), EasyEdit's token accuracies, fluency (the
n-gram entropy of greedy generations from the rewrite prompts), the unedited model's values on
the same records (fluency from a fixed sample of rewrite prompts, `--fluency-records`, and from
all of them after the last batch), and the Frobenius norm of each edited weight's total change. At the end:
retention, the share of the first batch's successful edits (NLL(new) < NLL(true) at the rewrite
prompt right after their batch) that still hold after the last batch.

  python benchmarks/real_model_study.py --model smollm2-135m --records 9000:200 --batch-size 20 \\
      --out benchmarks/results/study-smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METHODS = ("alphaedit", "identity")


GENERATIONS: dict[str, list[str]] = {}  # the last greedy generations measured, by method ("unedited" first)


def measure(model, tok, cases, fluency_cases, fluency_length: int, label: str = "") -> tuple[list[dict], list[float]]:
    """(per-case scores of `cases`, per-case fluency of greedy generations from the rewrite
    prompts of `fluency_cases`) on `model` now; the generations are kept in GENERATIONS[label]."""
    from alphaedit_fast.evaluation import greedy_generations, ngram_entropy, score_cases

    prompts = [c["requested_rewrite"]["prompt"].format(c["requested_rewrite"]["subject"]) for c in fluency_cases]
    texts = greedy_generations(model, tok, prompts, fluency_length) if fluency_length and prompts else []
    GENERATIONS[label] = texts
    return score_cases(model, tok, cases, "easyedit"), [ngram_entropy(t) for t in texts]


def summary(results: list[dict], entropies: list[float]) -> dict:
    from alphaedit_fast.evaluation import summarize

    rates = summarize(results, "easyedit")
    return {"nll_rates": rates["nll_rates"], "accuracy": rates["accuracy"],
            "fluency": sum(entropies) / len(entropies) if entropies else None}


def plot(study: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("nll_rates", "efficacy"), ("nll_rates", "paraphrase"), ("nll_rates", "neighborhood"),
              ("accuracy", "efficacy"), ("fluency", None), ("weight_change", None)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (family, rate) in zip(axes.flat, panels):
        for method in study["methods"]:
            curve = study["runs"][method]["curve"]
            x = [p["n_edits"] for p in curve]
            if family == "weight_change":
                y = [sum(p["weight_change"].values()) for p in curve]
            elif rate is None:
                y = [p[family] for p in curve]
            else:
                y = [p[family][rate] for p in curve]
            y = [float("nan") if v is None else v for v in y]  # fluency off, or no such prompts
            ax.plot(x, y, marker="o", label="AlphaEdit" if method == "alphaedit" else "P = I")
        if family != "weight_change":
            base = study["runs"][study["methods"][0]]["curve"]
            y = [p["unedited"][family] if rate is None else p["unedited"][family][rate] for p in base]
            ax.plot([p["n_edits"] for p in base], [float("nan") if v is None else v for v in y], color="grey",
                    linestyle="--", label="unedited")
        title = {"nll_rates": "NLL comparison", "accuracy": "token accuracy"}.get(family, family)
        ax.set_title(f"{title}: {rate}" if rate else {"fluency": "fluency (n-gram entropy)",
                                                      "weight_change": "sum of ||W - W0||_F"}[family])
        ax.set_xlabel("sequential edits")
        ax.legend(fontsize=8)
    fig.suptitle(f"{study['model']}: records {study['records']}, batches of {study['batch_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--hparams", help="hyper-parameters (default: the preset matching the model)")
    parser.add_argument("--requests", default=str(SHARED / "counterfact" / "counterfact-train.json"))
    parser.add_argument("--records", default="9000:200", help="START:COUNT of the development records (held out)")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--corpus", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--stats-tokens", type=int, default=60000)
    parser.add_argument("--fluency-length", type=int, default=100, help="tokens per generation (0: no fluency)")
    parser.add_argument("--fluency-records", type=int, default=20, help="fluency after each batch from the rewrite "
                        "prompts of the first N records (after the last batch: of all records)")
    parser.add_argument("--device", help="where the model runs (default: the CPU)")
    parser.add_argument("--dtype", help="model dtype (default: the checkpoint's)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", required=True, help="directory for study.json and study.png")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from alphaedit_fast import AlphaEditHyperParams, AlphaEditor
    from alphaedit_fast.arch import get_module
    from alphaedit_fast.evaluation import edit_request, load_cases, rewrite_success, versions
    from alphaedit_fast.loading import load_model, resolve_model_name
    from alphaedit_fast.projector import nullspace_basis
    from alphaedit_fast.stats import cached_statistics
    from alphaedit_fast.storage import cache_root
    from alphaedit_fast.templates import get_context_templates

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(resolve_model_name(args.model), dtype=args.dtype, device=args.device)
    hparams = AlphaEditHyperParams.load(args.hparams) if args.hparams else AlphaEditHyperParams.for_model(model)
    names = [hparams.rewrite_module_tmp.format(layer) for layer in hparams.layers]
    stats = cached_statistics(model, tok, args.corpus, hparams.layers, hparams.rewrite_module_tmp, args.stats_tokens,
                              cache_root() / "sweep-stats")
    start, count = (int(x) for x in args.records.split(":"))
    _, cases = load_cases(args.requests)
    cases = cases[start:start + count]
    templates = get_context_templates(model, tok)
    originals = {n: get_module(model, n).weight.detach().clone() for n in names}
    stops = list(range(args.batch_size, len(cases), args.batch_size)) + [len(cases)]
    begin = time.perf_counter()
    results, entropies = measure(model, tok, cases, cases, args.fluency_length, "unedited")
    sample = args.fluency_records
    unedited = {stop: summary(results[:stop], entropies[:sample] if stop < len(cases) else entropies)
                for stop in stops}
    print(f"unedited, all {len(cases)} records: {unedited[stops[-1]]} ({time.perf_counter() - begin:.0f}s)",
          flush=True)
    study = {"model": args.model, "requests": args.requests, "records": args.records, "batch_size": args.batch_size,
             "corpus": args.corpus, "stats_tokens": stats.count, "hparams": hparams.to_dict(),
             "methods": args.methods.split(","), "context_templates": templates, "versions": versions(),
             "threads": torch.get_num_threads(), "runs": {}}
    for method in study["methods"]:
        d_k = stats.covariance(hparams.layers[0]).shape[0]
        projector = ([nullspace_basis(stats.covariance(l), hparams.nullspace_threshold) for l in hparams.layers]
                     if method == "alphaedit" else [torch.eye(d_k)] * len(hparams.layers))
        projector = [p.to(originals[names[0]].device) for p in projector]
        editor = AlphaEditor(model, tok, hparams, projector=projector, context_templates=templates)
        requests = [edit_request(c) for c in cases]
        seconds: dict[str, float] = {}
        curve, first_batch = [], None
        for previous, stop in zip([0] + stops, stops):
            for phase, value in editor.edit(requests[previous:stop]).items():
                seconds[phase] = seconds.get(phase, 0.0) + value
            tick = time.perf_counter()
            fluency_cases = cases[:args.fluency_records] if stop < len(cases) else cases
            results, entropies = measure(model, tok, cases[:stop], fluency_cases, args.fluency_length, method)
            point = summary(results, entropies)
            seconds["evaluate"] = seconds.get("evaluate", 0.0) + time.perf_counter() - tick
            if first_batch is None:
                first_batch = rewrite_success(results)
            change = {n: float((get_module(model, n).weight.detach() - w).norm()) for n, w in originals.items()}
            curve.append({"n_edits": stop, **point, "unedited": unedited[stop], "weight_change": change})
            print(f"{method} after {stop}: {point}, sum ||dW|| {sum(change.values()):.3g} "
                  f"({sum(v for k, v in seconds.items() if k != 'evaluate'):.0f}s editing)", flush=True)
        held = [a and b for a, b in zip(first_batch, rewrite_success(results))]
        study["runs"][method] = {
            "curve": curve, "seconds": seconds, "seconds_per_edit": {k: v / len(cases) for k, v in seconds.items()},
            "null_space": [p.shape[1] for p in projector], "device": str(originals[names[0]].device),
            "relative_weight_change": {n: curve[-1]["weight_change"][n] / float(w.norm())
                                       for n, w in originals.items()},
            "retention": sum(held) / max(1, sum(first_batch)), "first_batch_successes": sum(first_batch)}
        print(f"{method}: retention {study['runs'][method]['retention']:.3f}", flush=True)
        with torch.no_grad():
            for n, w in originals.items():
                get_module(model, n).weight.copy_(w)
        (out_dir / "study.json").write_text(json.dumps(study, indent=1))
        (out_dir / "generations.json").write_text(json.dumps(GENERATIONS, indent=1))
    print(f"-> {out_dir / 'study.json'}, {plot(study, out_dir / 'study.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
