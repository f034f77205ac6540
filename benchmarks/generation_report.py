#!/usr/bin/env python
"""What lowers fluency after editing: a report on the greedy generations a study kept
(`generations.json` of benchmarks/real_model_study.py: per method, one text per rewrite prompt).

Per method: the mean n-gram entropy (the original's fluency), the share of texts that contain
their record's new target, how often each new and true target appears, the share of texts caught
in a loop (one 3-gram of words repeated at least 10 times) and the entropy with those texts left
out. Against the unedited texts of the same prompts: the mean change of each text's entropy,
grouped by how often the edited text names its new target: each group's texts, their mean
change, and their contribution to the mean change over all texts (the contributions sum to it).

  python benchmarks/generation_report.py benchmarks/results/study-smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

from alphaedit_fast.evaluation import ngram_entropy
from alphaedit_fast.requests import load_requests

LOOP_REPEATS = 10  # a 100-token text that repeats one 3-gram of words 10 times is stuck
MENTION_GROUPS = ((0, 0), (1, 2), (3, 5), (6, None))  # inclusive ranges of new-target mentions


def looping(text: str) -> bool:
    words = text.split()
    counts = Counter(zip(words, words[1:], words[2:]))
    return bool(counts) and max(counts.values()) >= LOOP_REPEATS


def mentions(target: str, text: str) -> int:
    return text.lower().count(target.lower())


def change_by_mentions(counts: list[int], entropies: list[float], unedited_entropies: list[float]) -> dict:
    """Paired entropy change of each text against the unedited text of the same prompt, per group
    of new-target mention `counts`."""
    changes = [after - before for after, before in zip(entropies, unedited_entropies)]
    groups = {}
    for low, high in MENTION_GROUPS:
        picked = [c for n, c in zip(counts, changes) if n >= low and (high is None or n <= high)]
        name = f"{low}+" if high is None else (str(low) if low == high else f"{low}-{high}")
        groups[name] = {"texts": len(picked), "mean_change": statistics.fmean(picked) if picked else None,
                        "contribution": sum(picked) / len(changes)}
    return {"mean_change": statistics.fmean(changes), "by_new_target_mentions": groups}


def report(study_dir: Path) -> dict:
    study = json.loads((study_dir / "study.json").read_text())
    generations = json.loads((study_dir / "generations.json").read_text())
    start, count = (int(x) for x in study["records"].split(":"))
    records = load_requests(study["requests"])[start:start + count]
    targets = [r["target_new"]["str"].strip() for r in records]
    true_targets = [r.get("target_true", {}).get("str", "").strip() for r in records]  # ZsRE has none
    out, measured = {}, {}
    for method, texts in generations.items():
        new_mentions = [mentions(t, text) for t, text in zip(targets, texts)]
        loops = [looping(text) for text in texts]
        entropies = [ngram_entropy(text) for text in texts]
        out[method] = {
            "texts": len(texts),
            "fluency": statistics.fmean(entropies),
            "share_mentioning_new_target": statistics.fmean([n > 0 for n in new_mentions]),
            "new_target_mentions_per_text": statistics.fmean(new_mentions),
            "true_target_mentions_per_text": statistics.fmean(
                [mentions(t, text) for t, text in zip(true_targets, texts)]) if all(true_targets) else None,
            "share_looping": statistics.fmean(loops),
            "fluency_without_looping": statistics.fmean([e for e, loop in zip(entropies, loops) if not loop] or [0]),
            "fluency_of_looping": statistics.fmean([e for e, loop in zip(entropies, loops) if loop] or [0]),
            "examples_looping": [text for text, loop in zip(texts, loops) if loop][:3],
        }
        measured[method] = new_mentions, entropies
    unedited = measured.get("unedited", ([], []))[1]
    for method, (new_mentions, entropies) in measured.items():
        if method != "unedited" and len(unedited) == len(entropies):
            out[method]["against_unedited"] = change_by_mentions(new_mentions, entropies, unedited)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study_dir", type=Path)
    args = ap.parse_args()
    result = report(args.study_dir)
    (args.study_dir / "generation-report.json").write_text(json.dumps(result, indent=1) + "\n")
    for method, row in result.items():
        print(method, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()
                       if k != "examples_looping"})


if __name__ == "__main__":
    main()
