#!/usr/bin/env python
"""A small hyper-parameter sweep on a real checkpoint, on development records only.

Each configuration (the base preset with a few values changed) edits the same CounterFact
records (EasyEdit's flat schema: `../shared/data/counterfact/counterfact-train.json`, the
development split) from the same unedited weights, in sequential batches, under the null
space of WikiText key statistics; then scores them as `alphaedit-fast eval` does. Reported per
configuration: the paper's NLL comparison at the rewrite and paraphrase prompts (NLL(new) <
NLL(true)), EasyEdit's token accuracies (efficacy, paraphrase, and the locality answer's,
against the unedited model's), the mean NLL of the locality answers (what an edit should not
move), fluency (the n-gram entropy of greedy generations from the rewrite prompts), how often
those generations name their new target and how many are stuck in a loop (as
`generation_report.py` counts them), the relative change of each edited weight, and seconds per
phase.

  python benchmarks/real_model_sweep.py --model smollm2-135m --records 0:10 \\
      --variants '{"v_lr 0.5": {"v_lr": 0.5}, "layers 3-7": {"layers": [3, 4, 5, 6, 7]}}' \\
      --out benchmarks/results/sweep-smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def scores(model, tok, cases, fluency_length: int) -> dict:
    from generation_report import looping, mentions

    from alphaedit_fast.evaluation import greedy_generations, ngram_entropy, score_cases, summarize

    results = score_cases(model, tok, cases, "easyedit")
    summary = summarize(results, "easyedit")
    locality = [p["target_true"] for r in results for p in r["neighborhood_prompts_probs"]]
    out = {"nll_efficacy": summary["nll_rates"]["efficacy"], "nll_paraphrase": summary["nll_rates"]["paraphrase"],
           "locality_answer_nll": sum(locality) / len(locality) if locality else None,
           **{f"acc_{k}": v for k, v in summary["accuracy"].items()}}
    if fluency_length:
        rewrites = [c["requested_rewrite"] for c in cases]
        texts = greedy_generations(model, tok, [r["prompt"].format(r["subject"]) for r in rewrites], fluency_length)
        out["fluency"] = statistics.fmean(ngram_entropy(t) for t in texts)
        out["new_target_mentions_per_text"] = statistics.fmean(
            mentions(r["target_new"]["str"].strip(), t) for r, t in zip(rewrites, texts))
        out["share_looping"] = statistics.fmean(looping(t) for t in texts)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--hparams", help="base hyper-parameters (default: the preset matching the model)")
    parser.add_argument("--requests", default=str(SHARED / "counterfact" / "counterfact-train.json"))
    parser.add_argument("--records", default="0:10", help="START:COUNT of the development records")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--corpus", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--stats-tokens", type=int, default=60000)
    parser.add_argument("--variants", default="{}", help='JSON {"name": {field: value}}; "base" always runs first')
    parser.add_argument("--fluency-length", type=int, default=100, help="tokens per generation (0: no fluency)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from alphaedit_fast import AlphaEditHyperParams, AlphaEditor
    from alphaedit_fast.arch import get_module
    from alphaedit_fast.evaluation import edit_request, load_cases, versions
    from alphaedit_fast.loading import load_model, resolve_model_name
    from alphaedit_fast.projector import nullspace_basis
    from alphaedit_fast.stats import cached_statistics
    from alphaedit_fast.storage import cache_root
    from alphaedit_fast.templates import get_context_templates

    model, tok = load_model(resolve_model_name(args.model))
    base = AlphaEditHyperParams.load(args.hparams) if args.hparams else AlphaEditHyperParams.for_model(model)
    variants = {"base": {}, **json.loads(args.variants)}
    configs = {name: AlphaEditHyperParams.from_dict({**base.to_dict(), **change}) for name, change in variants.items()}
    layers = sorted({l for h in configs.values() for l in h.layers})
    names = [base.rewrite_module_tmp.format(l) for l in layers]
    stats = cached_statistics(model, tok, args.corpus, layers, base.rewrite_module_tmp, args.stats_tokens,
                              cache_root() / "sweep-stats")
    start, count = (int(x) for x in args.records.split(":"))
    schema, cases = load_cases(args.requests)
    cases = cases[start : start + count]
    templates = get_context_templates(model, tok)
    originals = {n: get_module(model, n).weight.detach().clone() for n in names}
    before = scores(model, tok, cases, args.fluency_length)
    print(f"before: {before}", flush=True)
    out = {"model": args.model, "requests": args.requests, "records": args.records, "batch_size": args.batch_size,
           "corpus": args.corpus, "stats_tokens": stats.count, "base": base.to_dict(), "before": before,
           "context_templates": templates, "versions": versions(), "runs": {}}
    for name, hparams in configs.items():
        bases = [nullspace_basis(stats.covariance(l), hparams.nullspace_threshold) for l in hparams.layers]
        editor = AlphaEditor(model, tok, hparams, projector=bases, context_templates=templates)
        seconds: dict[str, float] = {}
        requests = [edit_request(c) for c in cases]
        begin = time.perf_counter()
        for i in range(0, len(requests), args.batch_size):
            for phase, value in editor.edit(requests[i : i + args.batch_size]).items():
                seconds[phase] = seconds.get(phase, 0.0) + value
        seconds["total"] = time.perf_counter() - begin
        after = scores(model, tok, cases, args.fluency_length)
        deltas = {n: float((get_module(model, n).weight.detach() - w).norm() / w.norm()) for n, w in originals.items()}
        out["runs"][name] = {"change": variants[name], "after": after, "seconds": seconds,
                             "null_space": [b.shape[1] for b in bases], "relative_weight_change": deltas}
        print(f"{name}: {after} ({seconds['total']:.0f}s)", flush=True)
        with torch.no_grad():
            for n, w in originals.items():
                get_module(model, n).weight.copy_(w)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
