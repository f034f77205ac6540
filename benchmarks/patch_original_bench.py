#!/usr/bin/env python
"""The ORIGINAL AlphaEdit's covariance path (AlphaEdit_main.get_cov -> rome.layer_stats, one
pass per layer) unpatched against the same calls after `alphaedit_fast.integrations.patch_original()`
(the first get_cov computes every edited layer in one pass), on the same corpus and token budget.

Uses the checkout named by ALPHAEDIT_ORIGINAL_REPO (run with the transformers 4.46 env), a random
GPT-2 as benchmarks/vs_original.py builds it (and its CPU patching), the real GPT-2 tokenizer,
and a stand-in `load_dataset` whose "train" split is the lines of wikitext-2-raw's wiki.test.raw
(each line one text, as the HF wikitext rows; empty lines included). Both codes write their
`.npz` files to separate directories; we compare them (read_original_stats) and the timings.

  ALPHAEDIT_ORIGINAL_REPO=/path/to/AlphaEdit PYTHONPATH=$PWD .venv-tf446/bin/python \
      benchmarks/patch_original_bench.py --threads 2 --out benchmarks/results/patch-original-stats-cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import vs_original  # noqa: E402 - the CPU patching and model/tokenizer builders of the other harness

CORPUS = HERE.parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--inner", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=[3, 4, 5, 6, 7])
    ap.add_argument("--samples", type=int, default=1000, help="mom2_n_samples: texts sampled from the corpus")
    ap.add_argument("--dtype", default="float32", help="mom2_dtype")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "patch-original-stats-cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers  # noqa: F401 - before vs_original's `datasets` stub (transformers probes for it)

    main_mod, _ = vs_original.import_original()
    import rome.layer_stats as stats_mod

    from alphaedit_fast.integrations import patch_original
    from alphaedit_fast.stats import read_original_stats

    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    texts = [{"text": line if line.strip() else ""} for line in lines]
    loads = []

    def load_dataset(name, config):
        loads.append((name, config))
        return {"train": texts}

    stats_mod.load_dataset = load_dataset  # what the original's get_ds calls

    tok, tok_source = vs_original.load_tokenizer()
    model = vs_original.build_model(argparse.Namespace(heads=args.heads, width=args.width, seed=args.seed,
                                                       n_layer=args.n_layer, inner=args.inner), len(tok))
    model.config._name_or_path = "random-gpt2"
    hparams = vs_original.hparams_dict(argparse.Namespace(layers=args.layers, v_num_grad_steps=None,
                                                          clamp_norm_factor=None, v_lr=None, kl_factor=None,
                                                          L2=None), args.n_layer)
    names = [hparams["rewrite_module_tmp"].format(layer) for layer in args.layers]
    work = Path(tempfile.mkdtemp(prefix="patch-original-bench-"))

    def covariances(hp):  # as the original's experiments/evaluate.get_project calls get_cov, layer by layer
        return {name: main_mod.get_cov(model, tok, name, "wikitext", args.samples, args.dtype).cpu()
                for name in names}

    hp = argparse.Namespace(**{**hparams, "mom2_dataset": "wikitext", "mom2_n_samples": args.samples,
                               "mom2_dtype": args.dtype})
    print(f"GPT-2 n_layer={args.n_layer} width={args.width} layers={args.layers}, {args.samples} of {len(texts)} "
          f"texts of {CORPUS.name}, {tok_source}, threads={torch.get_num_threads()}", flush=True)

    main_mod.STATS_DIR = work / "original"
    main_mod.COV_CACHE.clear()
    with vs_original.CudaToCpu(), contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        original = covariances(hp)
        t_original = time.perf_counter() - start
    print(f"original: {t_original:.1f} s", flush=True)

    main_mod.STATS_DIR = work / "fast"
    main_mod.COV_CACHE.clear()
    patch = patch_original()
    try:
        start = time.perf_counter()
        fast = covariances(hp)
        t_fast = time.perf_counter() - start
        passes = patch.state["passes"]
    finally:
        patch.undo()
    print(f"patched: {t_fast:.1f} s ({passes} pass)", flush=True)

    per_layer = {}
    for name in names:
        rel_path = Path("random-gpt2") / "wikitext_stats" / f"{name}_{args.dtype}_mom2_{args.samples}.npz"
        cov_o, count_o = read_original_stats(work / "original" / rel_path)
        cov_f, count_f = read_original_stats(work / "fast" / rel_path)
        a, b = cov_f.double(), cov_o.double()
        per_layer[name] = {
            "tokens_original": count_o, "tokens_patched": count_f,
            "rel_frobenius_diff_files": ((a - b).norm() / b.norm()).item(),
            "max_abs_diff_over_max_abs_files": ((a - b).abs().max() / b.abs().max()).item(),
            "rel_frobenius_diff_get_cov": ((fast[name].double() - original[name].double()).norm()
                                           / original[name].double().norm()).item(),
        }
    worst = max(max(v["rel_frobenius_diff_files"], v["rel_frobenius_diff_get_cov"]) for v in per_layer.values())
    result = {
        "what": "original get_cov/layer_stats per layer (unpatched) vs patch_original() (one pass for all layers)",
        "model": f"random GPT-2 n_layer={args.n_layer} n_embd={args.width} n_positions=1024 fp32 cpu",
        "tokenizer": tok_source, "corpus": str(CORPUS), "texts_in_corpus": len(texts),
        "mom2_n_samples": args.samples, "mom2_dtype": args.dtype, "layers": args.layers,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "seconds_original": t_original, "seconds_patched": t_fast, "speedup": t_original / t_fast,
        "passes_patched": passes, "load_dataset_calls": len(loads),
        "same_token_counts": all(v["tokens_original"] == v["tokens_patched"] for v in per_layer.values()),
        "max_rel_diff": worst, "per_layer": per_layer,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds_original", "seconds_patched", "speedup", "max_rel_diff",
                                             "same_token_counts")}, indent=2))


if __name__ == "__main__":
    main()
