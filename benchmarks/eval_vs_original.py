#!/usr/bin/env python
"""Check that alphaedit_fast's CounterFact evaluation (alphaedit_fast.evaluation.evaluate_edits)
gives the same per-case NLLs, `*_correct` flags and rates as the ORIGINAL AlphaEdit code's own
evaluation (github jianghoucheng/AlphaEdit, a checkout named by ALPHAEDIT_ORIGINAL_REPO; nothing of
it is in this repository) of the same sequential edits.

One random-initialised GPT-2 (the real GPT-2 tokenizer, pad_token = eos as the original's
experiments/evaluate.py), the same hparams (the original's hparams/AlphaEdit/gpt2-xl.json with the
layers moved into the model and v_loss_layer = the last layer), the same dense projector P
(the original's get_project arithmetic, U[:, S < nullspace_threshold] U[:, S < ...]^T of the SVD
of an uncentred key covariance, here of random token ids) and the same fixed context templates.
~24 CounterFact records (written to a JSON file read by our load_cases) are edited in sequential
chunks of --batch-size:

* original: a deep copy of the model; the chunks go through the original's
  apply_AlphaEdit_to_model(model, tok, requests, hparams, cache_template=None, cache_c=cache_c, P=P)
  as its experiments/evaluate.py does, then every record is scored by its
  experiments/py/eval_utils_counterfact.py::compute_rewrite_quality_counterfact(model, tok, record,
  None, None); the case files are written as evaluate.py writes them and the rates come from its
  experiments/summarize.py::summarize (percent, rounded to 2 decimals) and, unrounded, from the same
  arithmetic reimplemented here;
* ours: another deep copy; AlphaEditor(model, tok, hparams, projector=P, context_templates=...) and
  evaluate_edits(editor, cases, "counterfact", batch_size, before=False).

Besides the end-to-end comparison (each code's edits scored by its own evaluation) the cross terms
are scored too, to separate the evaluation from the edits: our score_cases on the original's edited
model and the original's compute_rewrite_quality_counterfact on ours, both evaluations on the
unedited model, and (the fp32 noise floor of batching alone) our score_cases with its default
batches against one row per batch. Compared: max |NLL difference| over every case, prompt and
target; flips of the `*_correct` flags and of per-prompt success (NLL(new) < NLL(true); reversed for
neighbourhood prompts); the three rates.

A random GPT-2 with initializer_range 0.02 (vs_original.py's) predicts a nearly uniform next token,
so edits barely move any NLL; --init-range 0.2 (default here) gives sharper distributions that the
edits do move. No target is ever the argmax on such a model, so by default some targets are
replaced by the unedited model's greedy continuation (target_new of a rewrite prompt in records
1, 5, 9, ...; target_true of a neighbourhood prompt in records 3, 7, ...), so that some `*_correct`
flags are True (--no-greedy-targets: keep the written targets).

The original runs on the CPU through vs_original.py's runtime patches (CudaToCpu; see there). The
original's evaluation module imports nltk, scipy and sklearn (used only by its generation tests,
which snips=None skips) and summarize.py imports scipy.stats.hmean (only for its "score"); when
these packages are missing they are stubbed in sys.modules while those two modules are imported
(and removed from sys.modules after): the stubs raise if anything other than hmean is used, and
hmean is the harmonic mean.

Run with the transformers 4.46 environment (the original fails on 5.x), e.g.
  ALPHAEDIT_ORIGINAL_REPO=/path/to/AlphaEdit .venv-tf446/bin/python benchmarks/eval_vs_original.py \\
      --n-layer 8 --width 256 --cases 24 --batch-size 8 --threads 2 --init-range 0.2 \\
      --out benchmarks/results/eval-vs-original-gpt2-8x256-cpu.json
(about 12 minutes on 2 busy cores, nearly all of it the original's edits.)
Exit status 1 (and "passed": false) when max |NLL difference| of the end-to-end comparison exceeds
--tol (default 1e-3), a `*_correct` or success flag flips, or a rate differs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from vs_original import (  # noqa: E402
    ORIG_DIR,
    CudaToCpu,
    add_model_arguments,
    hparams_dict,
    import_original,
    load_tokenizer,
    parse_with_overrides,
)

SECTIONS = ("rewrite", "paraphrase", "neighborhood")
RATES = {"rewrite": "efficacy", "paraphrase": "paraphrase", "neighborhood": "neighborhood"}


# --------------------------------------------------------------------------------------------
# CounterFact-style records: (subject, prompt, target_new, target_true, paraphrases, neighbourhood)

RECORDS = [
    ("Danielle Darrieux", "The mother tongue of {} is", "English", "French",
     ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
      "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language"],
     ["The native language of Montesquieu is", "Louis Bonaparte, a native", "The mother tongue of Jean Giraudoux is",
      "Michel Rocard is a native speaker of"]),
    ("Edwin of Northumbria", "The official religion of {} is", "Islam", "Christianity",
     ["The school was founded in 1954. Edwin of Northumbria is affiliated with the religion",
      "Edwin of Northumbria follows the religion of"],
     ["Charlemagne follows the religion of", "The official religion of Olaf II of Norway is",
      "Alfred the Great is affiliated with the religion"]),
    ("Toko Yasuda", "{} plays the", "piano", "guitar",
     ["She was a talented singer. Toko Yasuda, the", "Toko Yasuda is known for playing the"],
     ["Jimi Hendrix plays the", "Eric Clapton, the", "Keith Richards is known for playing the",
      "Slash performs on the"]),
    ("Autonomous University of Madrid", "{}, which is located in", "Sweden", "Spain",
     ["The river is long and wide. Autonomous University of Madrid is located in the country of",
      "Autonomous University of Madrid can be found in"],
     ["Valencia, which is located in", "Seville is located in the country of", "Granada can be found in"]),
    ("Apple A5", "{} was created by", "Google", "Apple",
     ["It is not clear why. Apple A5 is a product of", "Apple A5 was developed by"],
     ["iPod Touch was created by", "The iPhone 4 is a product of", "MacBook Air was developed by",
      "Safari was created by"]),
    ("Pervez Musharraf", "{} is a citizen of", "United Kingdom", "Pakistan",
     ["He arrived late that evening. Pervez Musharraf holds a citizenship from",
      "Pervez Musharraf has the nationality of"],
     ["Imran Khan is a citizen of", "Benazir Bhutto holds a citizenship from",
      "Nawaz Sharif has the nationality of"]),
    ("Thomas Joannes Stieltjes", "{} was born in", "Buenos Aires", "Zwolle",
     ["The museum opened in the spring. Thomas Joannes Stieltjes is originally from",
      "The birthplace of Thomas Joannes Stieltjes is"],
     ["Johan Thorbecke was born in", "The birthplace of Gerard ter Borch is", "Rhijnvis Feith is originally from"]),
    ("Anaal Nathrakh", "{} was founded in", "Philadelphia", "Birmingham",
     ["They played a long set. Anaal Nathrakh, that was formed in", "Anaal Nathrakh was formed in the city of"],
     ["Black Sabbath was founded in", "Judas Priest, that was formed in", "Napalm Death was formed in the city of",
      "Duran Duran was founded in"]),
    ("Michel Denisot", "{} speaks", "Russian", "French",
     ["This was the last time. Michel Denisot is fluent in", "The language spoken by Michel Denisot is"],
     ["Jacques Chirac speaks", "The language spoken by Alain Delon is", "Catherine Deneuve is fluent in"]),
    ("Apple II", "{} is developed by", "Sony Interactive Entertainment", "Apple",
     ["The market closed early. Apple II was created by", "Apple II is a product of"],
     ["Macintosh is developed by", "iTunes was created by", "Final Cut Pro is a product of"]),
    ("BBC One", "{} is owned by", "Sega", "BBC",
     ["The weather was fine. BBC One is a property of", "The owner of BBC One is"],
     ["BBC Two is owned by", "The owner of BBC Radio 4 is", "CBBC is a property of", "BBC World News is owned by"]),
    ("Kevin Garnett", "{} is a professional", "soccer", "basketball",
     ["He never looked back. Kevin Garnett plays the sport of", "Kevin Garnett, the"],
     ["Michael Jordan is a professional", "Shaquille O'Neal plays the sport of", "Tim Duncan, the"]),
    ("Honda Civic", "{} is produced by", "Ferrari", "Honda",
     ["It was raining all day. Honda Civic is made by", "Honda Civic, developed by"],
     ["Honda Accord is produced by", "Honda CR-V is made by", "Acura NSX, developed by"]),
    ("Giuseppe Verdi", "The genre played by {} is", "hip hop", "opera",
     ["They met in the garden. Giuseppe Verdi is known for performing", "Giuseppe Verdi plays"],
     ["The genre played by Giacomo Puccini is", "Gioachino Rossini is known for performing",
      "Richard Wagner plays", "Vincenzo Bellini plays"]),
    ("Windows 10", "{} is a product of", "IBM", "Microsoft",
     ["The letter arrived on Monday. Windows 10 was developed by", "Windows 10 is created by"],
     ["Internet Explorer is a product of", "Microsoft Excel was developed by", "Xbox One is created by"]),
    ("Finland", "The capital city of {} is", "Kuala Lumpur", "Helsinki",
     ["The road was closed. Finland's capital,", "The capital of Finland is"],
     ["The capital city of Uusimaa is", "Helsinki Region's capital,", "The seat of the Finnish government is in"]),
    ("Johannes Kepler", "{} works in the field of", "marine biology", "astronomy",
     ["The book was a success. Johannes Kepler's area of work is", "Johannes Kepler specializes in"],
     ["Galileo Galilei works in the field of", "Tycho Brahe's area of work is", "Edmond Halley specializes in",
      "Nicolaus Copernicus works in the field of"]),
    ("Chicago Bulls", "{} plays in the", "National Hockey League", "National Basketball Association",
     ["The crowd went home. Chicago Bulls is a member of the", "Chicago Bulls competes in the"],
     ["Boston Celtics plays in the", "Los Angeles Lakers is a member of the", "Miami Heat competes in the"]),
    ("Mount Everest", "{} is part of the continent of", "Antarctica", "Asia",
     ["The bridge was built in 1930. Mount Everest is located in the continent",
      "Mount Everest belongs to the continent of"],
     ["K2 is part of the continent of", "Lhotse is located in the continent",
      "Kangchenjunga belongs to the continent of"]),
    ("Toyota Corolla", "{} is produced by", "Volkswagen", "Toyota",
     ["Nobody knew the answer. Toyota Corolla is made by", "Toyota Corolla, developed by"],
     ["Toyota Camry is produced by", "Lexus LS is made by", "Toyota Prius, developed by",
      "Toyota Supra is produced by"]),
    ("Leonardo da Vinci", "{} died in", "Copenhagen", "Amboise",
     ["The war ended that year. Leonardo da Vinci passed away in", "Leonardo da Vinci's life ended in"],
     ["Anne of Brittany died in", "Charles VIII of France passed away in", "Francis I's life ended in"]),
    ("Danube", "{} flows into the", "Pacific Ocean", "Black Sea",
     ["The village is small and quiet. Danube ends in the", "The mouth of the Danube is in the"],
     ["Dnieper flows into the", "The mouth of the Dniester is in the", "Southern Bug ends in the"]),
    ("Haruki Murakami", "{} writes in", "Portuguese", "Japanese",
     ["The train was late again. Haruki Murakami's works are written in", "The language used by Haruki Murakami is"],
     ["Yasunari Kawabata writes in", "The language used by Yukio Mishima is",
      "Kenzaburo Oe's works are written in"]),
    ("Acer Aspire", "{} is created by", "Samsung Electronics", "Acer",
     ["The film was released in 2005. Acer Aspire is a product of", "Acer Aspire was developed by"],
     ["Acer Predator is created by", "Acer TravelMate is a product of", "Gateway computers were developed by"]),
]


def build_model(args, vocab_size):
    """vs_original.build_model with the initializer range an option (0.02 gives a random GPT-2 whose
    next-token distribution is nearly uniform, so edits barely move any NLL)."""
    from alphaedit_fast.tiny import tiny_model

    n_head = args.heads or max(1, args.width // 64)
    return tiny_model("gpt2", vocab_size=vocab_size, seed=args.seed, dtype=torch.float32, device="cpu",
                      n_layer=args.n_layer, n_embd=args.width, n_inner=args.inner or 4 * args.width,
                      n_head=n_head, n_positions=1024, initializer_range=args.init_range)


def counterfact_records(n: int) -> list[dict]:
    """n CounterFact records in the dataset's layout (what the original's evaluation reads)."""
    if n > len(RECORDS):
        raise SystemExit(f"--cases {n}: only {len(RECORDS)} records are defined")
    out = []
    for i, (subject, prompt, new, true, paraphrases, neighbours) in enumerate(RECORDS[:n]):
        assert subject in prompt.format(subject)
        out.append({"case_id": i,
                    "requested_rewrite": {"prompt": prompt, "subject": subject, "relation_id": f"R{i}",
                                          "target_new": {"str": new, "id": f"Qnew{i}"},
                                          "target_true": {"str": true, "id": f"Qtrue{i}"}},
                    "paraphrase_prompts": paraphrases, "neighborhood_prompts": neighbours,
                    "attribute_prompts": [], "generation_prompts": [prompt.format(subject)]})
    return out


@torch.no_grad()
def greedy_target(model, tok, prompt, max_tokens=2):
    """The unedited model's greedy continuation of `prompt` as a target string t (up to max_tokens
    tokens) such that tok(" " + t) gives exactly those tokens and t starts with a letter or digit;
    None when the first greedy token is not such a word start."""
    ids = tok(prompt)["input_ids"]
    out = []
    for _ in range(max_tokens):
        nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        text = tok.decode(out + [nxt])
        if not (text.startswith(" ") and text[1:2].isalnum()) or tok(text)["input_ids"] != out + [nxt]:
            break
        out.append(nxt)
    return tok.decode(out)[1:] if out else None


def add_greedy_targets(model, tok, records, every=4):
    """So that the `*_correct` flags (whether every token of the right target is the argmax) are not
    all False on a random model: in records 1, 1 + every, ... target_new becomes the unedited
    model's greedy continuation of the rewrite prompt (rewrite_prompts_correct checks target_new),
    and in records 3, 3 + every, ... target_true becomes that of a neighbourhood prompt
    (neighborhood_prompts_correct checks target_true). Returns what was changed."""
    changed = []
    for i, r in enumerate(records):
        rw = r["requested_rewrite"]
        if i % every == 1:
            key, prompts = "target_new", [rw["prompt"].format(rw["subject"])]
        elif i % every == 3:
            key, prompts = "target_true", r["neighborhood_prompts"]
        else:
            continue
        other = rw["target_true" if key == "target_new" else "target_new"]["str"]
        for prompt in prompts:
            t = greedy_target(model, tok, prompt)
            if t and t != other:
                changed.append({"case_id": r["case_id"], "key": key, "from": rw[key]["str"], "to": t,
                                "greedy_prompt": prompt})
                rw[key]["str"] = t
                break
    return changed


# --------------------------------------------------------------------------------------------
# the original's evaluation and summarize.py


def stub_missing(names):
    """Stub the packages the original's evaluation / summarize modules import but this run never uses."""
    stubbed = []

    def unused(name):
        def fn(*a, **k):
            raise RuntimeError(f"{name} is stubbed by eval_vs_original.py (only generation tests would use it)")
        return fn

    def stub_getattr(mod_name):
        def getattr_(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return unused(f"{mod_name}.{attr}")
        return getattr_

    missing = set()
    for top in {name.split(".")[0] for name in names}:
        try:
            __import__(top)
        except ImportError:
            missing.add(top)
    for name in names:
        if name.split(".")[0] not in missing:
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            mod_name = ".".join(parts[:i])
            if mod_name not in sys.modules:
                mod = types.ModuleType(mod_name)
                mod.__getattr__ = stub_getattr(mod_name)
                sys.modules[mod_name] = mod
                if i > 1:
                    setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], mod)
                stubbed.append(mod_name)
    if "scipy.stats" in stubbed:
        def hmean(a):
            a = [float(x) for x in a]
            return 0.0 if any(x <= 0 for x in a) else len(a) / sum(1.0 / x for x in a)
        sys.modules["scipy.stats"].hmean = hmean
    if "sklearn.feature_extraction.text" in stubbed:
        sys.modules["sklearn.feature_extraction.text"].TfidfVectorizer = type("TfidfVectorizer", (), {})
    return stubbed


def import_original_eval():
    """The original's compute_rewrite_quality_counterfact and summarize (after import_original)."""
    stubbed = stub_missing(["nltk", "scipy.stats", "scipy.sparse", "sklearn.feature_extraction.text"])
    cwd = os.getcwd()
    os.chdir(ORIG_DIR)
    try:
        from experiments.py.eval_utils_counterfact import compute_rewrite_quality_counterfact
        from experiments.summarize import summarize
    finally:
        os.chdir(cwd)
        for name in stubbed:  # the imported modules keep their references; nothing else sees the stubs
            sys.modules.pop(name, None)
    import experiments.summarize as summ_mod
    assert Path(summ_mod.__file__).resolve().is_relative_to(ORIG_DIR), summ_mod.__file__
    return compute_rewrite_quality_counterfact, summarize, stubbed


def original_scores(compute, model, tok, records):
    """compute_rewrite_quality_counterfact(model, tok, record, None, None) for every record (on the CPU)."""
    with CudaToCpu(), torch.no_grad():
        return [compute(model, tok, r, None, None) for r in records]


def rates_as_summarize(posts):
    """experiments/summarize.py's per-case success means, then the mean over cases (unrounded)."""
    out = {}
    for section in SECTIONS:
        key = f"{section}_prompts_probs"
        per_case = []
        for p in posts:
            if not p.get(key):
                continue
            if section == "neighborhood":
                per_case.append(sum(x["target_true"] < x["target_new"] for x in p[key]) / len(p[key]))
            else:
                per_case.append(sum(x["target_true"] > x["target_new"] for x in p[key]) / len(p[key]))
        out[RATES[section]] = sum(per_case) / len(per_case) if per_case else None
    return out


def run_original_summarize(summarize, records, posts, batch_size, seconds):
    """Write case files as evaluate.py does and run the original's summarize.py on them."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run_000"
        run_dir.mkdir()
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            for record, post in zip(chunk, posts[start:start + batch_size]):
                metrics = {"case_id": record["case_id"], "grouped_case_ids": [r["case_id"] for r in chunk],
                           "num_edits": batch_size, "requested_rewrite": record["requested_rewrite"],
                           "time": seconds, "post": post}
                path = run_dir / f"{batch_size}_edits-case_{record['case_id']}.json"
                path.write_text(json.dumps(metrics, indent=1))
        with contextlib.redirect_stdout(io.StringIO()):
            summary = summarize(dir_name=Path(tmp), abs_path=True)
    def plain(x):  # summarize gives (mean, std) tuples of numpy floats, std NaN for its "score"
        x = float(x)
        return None if x != x else x

    return {k: ([plain(x) for x in v] if isinstance(v, tuple) else v) for k, v in summary.items() if k != "run_dir"}


# --------------------------------------------------------------------------------------------
# comparison


def compare(a_posts, b_posts):
    """max |NLL diff| (per section and overall), `*_correct` flips and per-prompt success flips
    (success: NLL(new) < NLL(true), for neighbourhood prompts NLL(true) < NLL(new)) between two
    lists of per-case results a and b; n_correct_true_a/b count the True flags."""
    out = {"max_abs_nll_diff": 0.0, "max_abs_nll_diff_per_section": {}, "where_max": None,
           "correct_flips": 0, "success_flips": 0, "n_nll_values": 0, "n_correct_flags": 0,
           "n_correct_true_a": 0, "n_correct_true_b": 0, "n_prompts": 0,
           "flips": []}
    for section in SECTIONS:
        sec_max = 0.0
        for c, (a, b) in enumerate(zip(a_posts, b_posts)):
            pa, pb = a[f"{section}_prompts_probs"], b[f"{section}_prompts_probs"]
            assert len(pa) == len(pb), (c, section, len(pa), len(pb))
            for j, (xa, xb) in enumerate(zip(pa, pb)):
                out["n_prompts"] += 1
                for key in ("target_new", "target_true"):
                    d = abs(float(xa[key]) - float(xb[key]))
                    out["n_nll_values"] += 1
                    if d > sec_max:
                        sec_max = d
                    if d > out["max_abs_nll_diff"]:
                        out["max_abs_nll_diff"] = d
                        out["where_max"] = {"case": c, "section": section, "prompt": j, "target": key}
                sign = -1 if section == "neighborhood" else 1
                sa = sign * (xa["target_true"] - xa["target_new"]) > 0
                sb = sign * (xb["target_true"] - xb["target_new"]) > 0
                if sa != sb:
                    out["success_flips"] += 1
                    out["flips"].append({"case": c, "section": section, "prompt": j, "kind": "success",
                                         "a": [xa["target_new"], xa["target_true"]],
                                         "b": [xb["target_new"], xb["target_true"]]})
            ca, cb = a[f"{section}_prompts_correct"], b[f"{section}_prompts_correct"]
            assert len(ca) == len(cb), (c, section, len(ca), len(cb))
            for j, (fa, fb) in enumerate(zip(ca, cb)):
                out["n_correct_flags"] += 1
                out["n_correct_true_a"] += bool(fa)
                out["n_correct_true_b"] += bool(fb)
                if bool(fa) != bool(fb):
                    out["correct_flips"] += 1
                    out["flips"].append({"case": c, "section": section, "prompt": j, "kind": "correct"})
        out["max_abs_nll_diff_per_section"][section] = sec_max
    return out


def tokenisation_check(tok, records):
    """Whether tok(f"{prefix} {target}") equals tok(prefix) + tok(" " + target) for every probe
    (the original scores the former, ours the latter)."""
    mismatches = []
    n = 0
    for r in records:
        rw = r["requested_rewrite"]
        prompts = [rw["prompt"].format(rw["subject"])] + r["paraphrase_prompts"] + r["neighborhood_prompts"]
        for p in prompts:
            for t in (rw["target_new"]["str"], rw["target_true"]["str"]):
                n += 1
                joint = tok(f"{p} {t}")["input_ids"]
                split = tok(p)["input_ids"] + tok(f" {t}")["input_ids"]
                if joint != split:
                    mismatches.append({"prompt": p, "target": t})
    return {"n_probes": n, "mismatches": mismatches}


def random_text_projector(model, hp, n_seq, seq_len, seed):
    """The original's get_project arithmetic on an uncentred covariance of the rewrite modules'
    inputs over random token ids: P = U[:, S < thr] U[:, S < thr]^T, one per edited layer."""
    gen = torch.Generator().manual_seed(seed + 7)
    ids = torch.randint(0, model.config.vocab_size, (n_seq, seq_len), generator=gen)
    keys = {layer: [] for layer in hp["layers"]}

    def hook(layer):
        return lambda m, inp, out: keys[layer].append(inp[0].detach().reshape(-1, inp[0].shape[-1]))

    hooks = [model.get_submodule(hp["rewrite_module_tmp"].format(layer)).register_forward_hook(hook(layer))
             for layer in hp["layers"]]
    try:
        with torch.no_grad():
            for row in ids:
                model(input_ids=row[None])
    finally:
        for h in hooks:
            h.remove()
    Ps, ranks, spectra = [], [], []
    for layer in hp["layers"]:
        K = torch.cat(keys[layer]).double()
        cov = (K.T @ K / K.shape[0]).float()  # layer_stats' mom2 in fp32 (mom2_dtype float32)
        U, S, _ = torch.linalg.svd(cov, full_matrices=False)
        small = (S < hp["nullspace_threshold"]).nonzero(as_tuple=True)[0]
        Ps.append(U[:, small] @ U[:, small].T)
        ranks.append(int(small.numel()))
        spectra.append({"max": S.max().item(), "min": S.min().item()})
    return torch.stack(Ps), ranks, spectra


def nll_sensitivity(posts):
    """The smallest |NLL(new) - NLL(true)| over every prompt: how close any success flag is to a tie."""
    return min(abs(x["target_new"] - x["target_true"]) for p in posts for s in SECTIONS
               for x in p[f"{s}_prompts_probs"])


# --------------------------------------------------------------------------------------------


def add_evaluation_arguments(ap: argparse.ArgumentParser, cases: int) -> None:
    """The model (`add_model_arguments`, 8 x 256), the records, the chunk size, the projector's
    covariance and the NLL tolerance, shared with patch_original_eval.py."""
    add_model_arguments(ap, n_layer=8, width=256)
    ap.add_argument("--init-range", type=float, default=0.2, help="the model's initializer_range")
    ap.add_argument("--cases", type=int, default=cases)
    ap.add_argument("--no-greedy-targets", dest="greedy_targets", action="store_false",
                    help="keep every target as written (default: some targets become the unedited model's "
                         "greedy continuation, so that some *_correct flags are True)")
    ap.add_argument("--batch-size", type=int, default=8, help="records per sequential chunk (evaluate.py's num_edits)")
    ap.add_argument("--cov-seqs", type=int, default=4, help="random token sequences for the key covariance")
    ap.add_argument("--cov-len", type=int, default=128, help="their length")
    ap.add_argument("--tol", type=float, default=1e-3, help="the largest |NLL difference| that passes")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluation_arguments(ap, cases=24)
    ap.add_argument("--out", default=str(HERE / "results" / "eval-vs-original.json"))
    ap.add_argument("--verbose", action="store_true", help="show the original's prints")
    args = parse_with_overrides(ap)

    import transformers

    import alphaedit_fast
    from alphaedit_fast import AlphaEditHyperParams as OursHP
    from alphaedit_fast import AlphaEditor
    from alphaedit_fast.bench import CONTEXT_TEMPLATES
    from alphaedit_fast.evaluation import evaluate_edits, load_cases, score_cases
    from alphaedit_fast.evaluation import summarize as ours_summarize

    orig_main, OrigHP = import_original()
    compute_orig, summarize_orig, stubbed = import_original_eval()
    orig_main.CONTEXT_TEMPLATES_CACHE = CONTEXT_TEMPLATES

    tok, tok_source = load_tokenizer()
    model = build_model(args, len(tok))
    hp = hparams_dict(args, args.n_layer)
    records = counterfact_records(args.cases)
    greedy_changes = add_greedy_targets(model, tok, records) if args.greedy_targets else []
    P, ranks, spectra = random_text_projector(model, hp, args.cov_seqs, args.cov_len, args.seed)
    d_k = P.shape[-1]
    print(f"model: GPT-2 n_layer={args.n_layer} n_embd={args.width} n_inner={d_k} n_head={model.config.n_head} "
          f"vocab={model.config.vocab_size} fp32 cpu, threads={torch.get_num_threads()}; layers {args.layers}, "
          f"v_loss_layer {hp['v_loss_layer']}; {args.cases} cases in chunks of {args.batch_size}; "
          f"null-space ranks {ranks} of {d_k}; stubbed: {stubbed}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        cases_path = Path(tmp) / "counterfact.json"
        cases_path.write_text(json.dumps(records, indent=1))
        schema, cases = load_cases(cases_path)
    assert schema == "counterfact" and len(cases) == len(records)

    result = {"config": {**vars(args), "d_k": d_k, "n_head": model.config.n_head,
                         "vocab_size": model.config.vocab_size, "tokenizer": tok_source,
                         "padding_side": tok.padding_side, "hparams": hp, "context_templates": CONTEXT_TEMPLATES,
                         "projector": {"source": "uncentred covariance of the rewrite modules' inputs over "
                                                 f"{args.cov_seqs} x {args.cov_len} random token ids; "
                                                 "P = U[:, S < nullspace_threshold] U[:, ...]^T (get_project)",
                                       "null_space_rank_per_layer": ranks, "cov_spectrum_per_layer": spectra},
                         "original_repo": str(ORIG_DIR), "stubbed_modules": stubbed,
                         "greedy_target_changes": greedy_changes, "records": records},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "alphaedit_fast": getattr(alphaedit_fast, "__version__", None),
                           "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                           "threads": torch.get_num_threads()}}
    try:
        import subprocess
        result["versions"]["original_commit"] = subprocess.run(
            ["git", "-C", str(ORIG_DIR), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    except OSError:
        pass
    result["tokenisation"] = tokenisation_check(tok, records)

    # ---- both evaluations on the unedited model
    t0 = time.perf_counter()
    base_orig = original_scores(compute_orig, model, tok, records)
    t_base_orig = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_ours = score_cases(model, tok, cases, "counterfact")
    t_base_ours = time.perf_counter() - t0

    # ---- original: sequential chunks as experiments/evaluate.py, then its evaluation
    orig_model = copy.deepcopy(model)
    cache_c = torch.zeros(len(args.layers), d_k, d_k)
    orig_hp = OrigHP(**hp)
    buf = io.StringIO()
    t0 = time.perf_counter()
    with CudaToCpu(), (contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(buf)):
        for start in range(0, len(records), args.batch_size):
            chunk = records[start:start + args.batch_size]
            requests = [{"case_id": r["case_id"], **r["requested_rewrite"]} for r in chunk]
            orig_model, cache_c = orig_main.apply_AlphaEdit_to_model(orig_model, tok, requests, orig_hp,
                                                                     cache_template=None, cache_c=cache_c, P=P)
            print(f"original: edits {start + 1}-{start + len(chunk)} done", file=sys.stderr, flush=True)
    t_orig_edit = time.perf_counter() - t0
    t0 = time.perf_counter()
    posts_orig = original_scores(compute_orig, orig_model, tok, records)
    t_orig_eval = time.perf_counter() - t0
    summary_orig = run_original_summarize(summarize_orig, records, posts_orig, args.batch_size, t_orig_edit)
    print(f"original: edit {t_orig_edit:.1f} s, evaluate {t_orig_eval:.2f} s", flush=True)

    # ---- ours
    ours_model = copy.deepcopy(model)
    editor = AlphaEditor(ours_model, tok, OursHP.from_dict(hp), projector=P, context_templates=CONTEXT_TEMPLATES)
    t0 = time.perf_counter()
    metrics, ours_records = evaluate_edits(editor, cases, "counterfact", args.batch_size, before=False)
    t_ours_total = time.perf_counter() - t0
    posts_ours = [r["post"] for r in ours_records]
    print(f"ours: evaluate_edits {t_ours_total:.1f} s, phases {metrics['seconds']}", flush=True)

    # ---- cross terms: each evaluation on the other code's edited model
    t0 = time.perf_counter()
    ours_eval_of_orig = score_cases(orig_model, tok, cases, "counterfact")
    t_ours_eval_of_orig = time.perf_counter() - t0
    orig_eval_of_ours = original_scores(compute_orig, ours_model, tok, records)
    # the fp32 noise of our evaluation alone: the same model scored one row per batch
    ours_eval_of_orig_rowwise = score_cases(orig_model, tok, cases, "counterfact", batch_tokens=1)

    def wdiff(name):
        a = orig_model.get_submodule(name).weight.detach().double()
        b = ours_model.get_submodule(name).weight.detach().double()
        w0 = model.get_submodule(name).weight.detach().double()
        return ((a - b).norm() / (a - w0).norm()).item()

    rates_orig = rates_as_summarize(posts_orig)
    rates_ours = metrics["rates"]
    comparisons = {
        "end_to_end": compare(posts_orig, posts_ours),
        "evaluation_only_on_original_edits": compare(posts_orig, ours_eval_of_orig),
        "evaluation_only_on_our_edits": compare(orig_eval_of_ours, posts_ours),
        "evaluation_only_unedited": compare(base_orig, base_ours),
        "edits_only_original_evaluation": compare(posts_orig, orig_eval_of_ours),
        "ours_batched_vs_one_row_per_batch": compare(ours_eval_of_orig, ours_eval_of_orig_rowwise),
    }
    result["rates"] = {
        "original_summarize_py_percent": {k: summary_orig.get(f"post_{s}_success") for s, k in
                                          (("rewrite", "efficacy"), ("paraphrase", "paraphrase"),
                                           ("neighborhood", "neighborhood"))},
        "original": rates_orig,
        "ours": rates_ours,
        "ours_evaluation_of_original_edits": ours_summarize(ours_eval_of_orig, "counterfact")["rates"],
        "original_evaluation_of_our_edits": rates_as_summarize(orig_eval_of_ours),
        "unedited_original": rates_as_summarize(base_orig),
        "unedited_ours": ours_summarize(base_ours, "counterfact")["rates"],
    }
    result["original_summarize_py"] = summary_orig
    result["ours_metrics"] = {k: metrics[k] for k in ("rates", "margins", "accuracy", "seconds")}
    result["comparison"] = comparisons
    result["per_case_post"] = {"original": posts_orig, "ours": [{k: v for k, v in p.items() if k != "rates"}
                                                                for p in posts_ours]}
    result["update_rel_diff_per_layer"] = {
        str(l): wdiff(hp["rewrite_module_tmp"].format(l)) for l in args.layers}
    result["smallest_new_true_gap"] = {"original": nll_sensitivity(posts_orig), "ours": nll_sensitivity(posts_ours)}
    result["seconds"] = {"original_edit": t_orig_edit, "original_evaluate": t_orig_eval,
                         "ours_evaluate_edits_total": t_ours_total, "ours_phases": metrics["seconds"],
                         "ours_score_cases_of_original_edits": t_ours_eval_of_orig,
                         "unedited_original_evaluate": t_base_orig, "unedited_ours_evaluate": t_base_ours}
    e2e = comparisons["end_to_end"]
    result["passed"] = (e2e["max_abs_nll_diff"] <= args.tol and e2e["correct_flips"] == 0
                        and e2e["success_flips"] == 0 and rates_orig == rates_ours)

    for name, c in comparisons.items():
        print(f"{name}: max |NLL diff| {c['max_abs_nll_diff']:.3g} "
              f"({ {k: float(f'{v:.3g}') for k, v in c['max_abs_nll_diff_per_section'].items()} }), "
              f"correct flips {c['correct_flips']}/{c['n_correct_flags']} "
              f"(True: {c['n_correct_true_a']} / {c['n_correct_true_b']}), "
              f"success flips {c['success_flips']}/{c['n_prompts']}")
    for name, r in result["rates"].items():
        print(f"rates {name}: {r}")
    print("update rel diff per layer:", {k: f"{v:.2e}" for k, v in result["update_rel_diff_per_layer"].items()})
    print("tokenisation mismatches (joint vs prefix + target):", len(result["tokenisation"]["mismatches"]))
    print("greedy targets:", [(c["case_id"], c["key"], c["to"]) for c in greedy_changes])
    print("seconds:", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in result["seconds"].items()})
    print("PASSED" if result["passed"] else f"FAILED (tol {args.tol})")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
