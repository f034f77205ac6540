#!/usr/bin/env python
"""What lowers fluency after editing: a report on the greedy generations a study kept
(`generations.json` of benchmarks/real_model_study.py: per method, one text per rewrite prompt).

Per method: the mean n-gram entropy (the original's fluency), the share of texts that contain
their record's new target, how often each new target appears, the share of texts caught in a loop
(one 3-gram of words repeated at least 10 times) and the entropy with those texts left out.

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


def looping(text: str) -> bool:
    words = text.split()
    counts = Counter(zip(words, words[1:], words[2:]))
    return bool(counts) and max(counts.values()) >= LOOP_REPEATS


def report(study_dir: Path) -> dict:
    study = json.loads((study_dir / "study.json").read_text())
    generations = json.loads((study_dir / "generations.json").read_text())
    start, count = (int(x) for x in study["records"].split(":"))
    records = load_requests(study["requests"])[start:start + count]
    targets = [r["target_new"]["str"].strip() for r in records]
    out = {}
    for method, texts in generations.items():
        mentions = [t.lower() in text.lower() for t, text in zip(targets, texts)]
        loops = [looping(text) for text in texts]
        entropies = [ngram_entropy(text) for text in texts]
        mentions_per_text = [text.lower().count(t.lower()) for t, text in zip(targets, texts)]
        out[method] = {
            "texts": len(texts),
            "fluency": statistics.fmean(entropies),
            "share_mentioning_new_target": statistics.fmean(mentions),
            "new_target_mentions_per_text": statistics.fmean(mentions_per_text),
            "share_looping": statistics.fmean(loops),
            "fluency_without_looping": statistics.fmean([e for e, loop in zip(entropies, loops) if not loop] or [0]),
            "fluency_of_looping": statistics.fmean([e for e, loop in zip(entropies, loops) if loop] or [0]),
            "examples_looping": [text for text, loop in zip(texts, loops) if loop][:3],
        }
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
