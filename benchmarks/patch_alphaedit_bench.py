#!/usr/bin/env python
"""The authors' `alphaedit` package (AlphaEditor) unpatched against the same script after
`alphaedit_fast.integrations.patch_alphaedit()`, on the CPU: the statistics and projections
(AlphaEditor's constructor) and sequential edit batches, timed per phase, with the weight updates,
projections and key covariances of the two compared.

Uses the checkout named by ALPHAEDIT_PACKAGE_REPO (or --package-repo); the package refuses the CPU,
so its device check is switched off here for the unpatched run (nothing else of it is changed). The
model is a random Qwen2 of GPT-2-small width (12 layers, 768 wide, MLP 3072) with the real GPT-2
tokenizer (../shared/data/gpt2-tokenizer); statistics from the lines of wikitext-2-raw's
wiki.test.raw (a stand-in `load_dataset`); requests from the CounterFact development records. Both
editors get the same context templates (the package samples them).

  ALPHAEDIT_PACKAGE_REPO=/path/to/AlphaEdit PYTHONPATH=$PWD .venv/bin/python \
      benchmarks/patch_alphaedit_bench.py --out benchmarks/results/patch-alphaedit-qwen2-768-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.machinery
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
CORPUS = SHARED / "wikitext-2-raw" / "wiki.test.raw"
COUNTERFACT = SHARED / "counterfact" / "counterfact-train.json"
TOKENIZER = SHARED / "gpt2-tokenizer"


def import_package(root: str, texts: list[dict]):
    """The package from `root`, its `load_dataset` reading `texts` (the HF `datasets` is not needed)."""
    import transformers  # noqa: F401 - it probes for `datasets` when imported: before the stand-in

    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    fake.load_dataset = lambda *args, **kwargs: texts
    sys.modules.setdefault("datasets", fake)
    sys.path.insert(0, root)
    import alphaedit.editor
    import alphaedit.layer_stats

    alphaedit.layer_stats.load_dataset = fake.load_dataset
    return alphaedit


def build_model(args, vocab_size: int):
    from alphaedit_fast.tiny import tiny_model

    heads = args.width // 64
    model = tiny_model("qwen2", vocab_size=vocab_size, seed=args.seed, hidden_size=args.width,
                       num_hidden_layers=args.n_layer, intermediate_size=args.inner, num_attention_heads=heads,
                       num_key_value_heads=heads, max_position_embeddings=1024, initializer_range=0.02)
    model.config._name_or_path = f"random-qwen2-{args.width}"
    return model


def rewrite_weights(model, config) -> list[torch.Tensor]:
    return [model.get_parameter(config.rewrite_module_template.format(l) + ".weight").detach().clone()
            for l in config.layers]


def run(package, model, tok, config, contexts, batches, stats_dir) -> dict:
    """Construct the editor and apply the batches; seconds per phase."""
    start = time.perf_counter()
    editor = package.AlphaEditor(model, tok, config, stats_dir=stats_dir, context_templates=contexts)
    seconds = {"statistics and projections": time.perf_counter() - start, "batches": []}
    for batch in batches:
        start = time.perf_counter()
        editor.edit(batch)
        seconds["batches"].append(time.perf_counter() - start)
    return {"seconds": seconds, "editor": editor}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package-repo", default=os.environ.get("ALPHAEDIT_PACKAGE_REPO"))
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--inner", type=int, default=3072)
    ap.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=[4, 5, 6, 7, 8])
    ap.add_argument("--samples", type=int, default=1000, help="mom2_n_samples: texts sampled from the corpus")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--records", type=int, default=0, help="first CounterFact record used")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "patch-alphaedit-qwen2-768-cpu.json"))
    args = ap.parse_args()
    if not args.package_repo:
        sys.exit("name the AlphaEdit checkout holding the alphaedit package: --package-repo or ALPHAEDIT_PACKAGE_REPO")
    for path in (CORPUS, COUNTERFACT, TOKENIZER):
        if not path.exists():
            sys.exit(f"missing {path}")
    torch.set_num_threads(args.threads)
    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    texts = [{"text": line if line.strip() else ""} for line in lines]
    package = import_package(args.package_repo, texts)

    from transformers import AutoTokenizer

    from alphaedit_fast.integrations import patch_alphaedit
    from alphaedit_fast.requests import load_requests

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    tok.pad_token, tok.padding_side = tok.eos_token, "right"  # as the package's cli
    model = build_model(args, len(tok))
    config = package.AlphaEditConfig(layers=args.layers, v_loss_layer=args.n_layer - 1, mom2_dataset="wikitext",
                                     mom2_n_samples=args.samples)
    records = load_requests(COUNTERFACT)[args.records:args.records + args.batch_size * args.batches]
    requests = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"]["str"].strip(),
                 "case_id": r["case_id"]} for r in records]
    batches = [requests[i:i + args.batch_size] for i in range(0, len(requests), args.batch_size)]
    work = Path(tempfile.mkdtemp(prefix="patch-alphaedit-bench-"))
    print(f"Qwen2 {args.n_layer}x{args.width} (MLP {args.inner}), layers {args.layers}, {len(batches)} batches of "
          f"{args.batch_size}, {args.samples} texts, threads={torch.get_num_threads()}", flush=True)

    real_check = package.AlphaEditor._validate_single_device
    package.AlphaEditor._validate_single_device = lambda self: None  # the package refuses the CPU
    probe = package.AlphaEditor.__new__(package.AlphaEditor)  # only to sample the templates as the package does
    probe.model, probe.tokenizer, probe.context_templates = model, tok, None
    torch.manual_seed(args.seed)
    contexts = probe._get_context_templates()  # sampled once, given to both
    theirs_model, ours_model = copy.deepcopy(model), copy.deepcopy(model)
    theirs = run(package, theirs_model, tok, config, contexts, batches, work / "theirs")
    print(f"package: {json.dumps(theirs['seconds'])}", flush=True)
    package.AlphaEditor._validate_single_device = real_check

    patch = patch_alphaedit()
    try:
        ours = run(package, ours_model, tok, config, contexts, batches, work / "ours")
        passes = patch.state["passes"]
    finally:
        patch.undo()
    print(f"patched: {json.dumps(ours['seconds'])} ({passes} statistics pass)", flush=True)

    resolved = theirs["editor"].config
    before = rewrite_weights(model, resolved)
    update_diffs = [float(((a - w0) - (b - w0)).norm() / (b - w0).norm()) for w0, a, b in
                    zip(before, rewrite_weights(ours_model, resolved), rewrite_weights(theirs_model, resolved))]
    relative = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    edit_theirs, edit_ours = sum(theirs["seconds"]["batches"]), sum(ours["seconds"]["batches"])
    stats_theirs, stats_ours = (theirs["seconds"]["statistics and projections"],
                                ours["seconds"]["statistics and projections"])
    result = {
        "what": "the authors' alphaedit package unpatched vs patch_alphaedit(), same script, CPU",
        "model": f"random Qwen2 {args.n_layer} layers, width {args.width}, MLP {args.inner}, fp32, cpu",
        "tokenizer": str(TOKENIZER), "corpus": str(CORPUS), "mom2_n_samples": args.samples, "layers": args.layers,
        "config": resolved.to_dict(), "batches": len(batches), "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "seconds_package": theirs["seconds"], "seconds_patched": ours["seconds"],
        "seconds_per_edit_package": edit_theirs / len(requests), "seconds_per_edit_patched": edit_ours / len(requests),
        "speedup_edit": edit_theirs / edit_ours, "speedup_statistics": stats_theirs / stats_ours,
        "median_batch_speedup": statistics.median(a / b for a, b in zip(theirs["seconds"]["batches"],
                                                                        ours["seconds"]["batches"])),
        "statistics_passes_patched": passes,
        "projection_rel_diff": relative(ours["editor"].projection, theirs["editor"].projection),
        "key_covariance_rel_diff": relative(ours["editor"].key_covariance, theirs["editor"].key_covariance),
        "update_rel_diff_per_layer": update_diffs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("speedup_edit", "speedup_statistics", "seconds_per_edit_package",
                                             "seconds_per_edit_patched", "update_rel_diff_per_layer")}, indent=2))


if __name__ == "__main__":
    main()
