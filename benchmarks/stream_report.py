"""The 2,000-edit study's findings (`stream_study.py --report`): the targets of the paper's protocol
checked against the unedited model, where along the stream each method's scores move, which
layers' weights grow, and which records fail at the end; as JSON and as a Markdown table."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from alphaedit_fast.evaluation import summarize
from alphaedit_fast.general import load_task

FAMILIES = ("efficacy", "paraphrase", "neighborhood")


def chance(data_dir, task: str, n_items: int) -> float:
    """The share of the scored items' most common label: the accuracy of always giving it."""
    labels = Counter(item["label"] for item in load_task(data_dir, task, n_items))
    return max(labels.values()) / sum(labels.values())


def above_chance(accuracy: float, n: int, share: float, alpha: float = 0.05) -> bool:
    """Whether `accuracy` over `n` items beats `share` (one-sided binomial test at `alpha`)."""
    k = round(accuracy * n)
    tail = sum(math.comb(n, i) * share ** i * (1 - share) ** (n - i) for i in range(k, n + 1))
    return tail < alpha


def targets(metrics: dict, data_dir) -> list[dict]:
    """Issue 31's targets after the last edit, each {"target", "value", "unedited", "bound", "met"}."""
    first, last = metrics["curve"][0], metrics["curve"][-1]
    start, end = metrics["probes"][0], metrics["probes"][-1]
    rows = [{"target": "efficacy >= 0.95", "value": last["nll_rates"]["efficacy"], "bound": 0.95},
            {"target": "paraphrase >= 0.85", "value": last["nll_rates"]["paraphrase"], "bound": 0.85},
            {"target": "neighborhood >= 0.85 x unedited", "value": last["nll_rates"]["neighborhood"],
             "unedited": first["nll_rates"]["neighborhood"], "bound": 0.85 * first["nll_rates"]["neighborhood"]}]
    for row in rows:
        row["met"] = row["value"] >= row["bound"]
    fluency = metrics["fluency"]
    rows.append({"target": "fluency within 5%", "value": fluency["after"], "unedited": fluency["before"],
                 "bound": 0.95 * fluency["before"], "met": abs(fluency["after"] / fluency["before"] - 1) <= 0.05})
    rows.append({"target": "perplexity within 10%", "value": end["perplexity"], "unedited": start["perplexity"],
                 "bound": 1.1 * start["perplexity"], "met": end["perplexity"] <= 1.1 * start["perplexity"]})
    for task, before in start.get("general", {}).items():
        share = chance(data_dir, task, before["n"])
        counts = above_chance(before["accuracy_new"], before["n"], share)
        after = end["general"][task]["f1_new"]
        rows.append({"target": f"{task} f1_new within 0.05" + ("" if counts else " (unedited at chance: reported)"),
                     "value": after, "unedited": before["f1_new"], "bound": before["f1_new"] - 0.05,
                     "met": after >= before["f1_new"] - 0.05 if counts else None,
                     "unedited_accuracy_new": before["accuracy_new"], "majority_share": share})
    return rows


def case_rates(record: dict, schema: str = "easyedit") -> dict:
    """One case's NLL-comparison rates after the stream ({family: share of its prompts})."""
    return summarize([record["post"]], schema)["nll_rates"]


def by_batch(cases_path: Path, batch_size: int) -> list[dict]:
    """Per batch of the stream (in edit order), its cases' NLL-comparison rates after the last edit."""
    records = [json.loads(line) for line in cases_path.read_text().splitlines()]
    rows = []
    for start in range(0, len(records), batch_size):
        rates = [case_rates(r) for r in records[start:start + batch_size]]
        rows.append({"batch": start // batch_size + 1, **{f: mean(r[f] for r in rates) for f in FAMILIES}})
    return rows


def failures(cases_path: Path) -> dict:
    """The cases whose rewrite prompt fails at the end (NLL(new) >= NLL(true)): how many, how firmly the
    unedited model held the true object (mean NLL(new) - NLL(true) before) against the cases that hold,
    and their new objects' length in characters."""
    records = [json.loads(line) for line in cases_path.read_text().splitlines()]

    def margin(r):
        probs = r["pre"]["rewrite_prompts_probs"][0]
        return probs["target_new"] - probs["target_true"]

    failed = [r for r in records if case_rates(r)["efficacy"] == 0]
    held = [r for r in records if case_rates(r)["efficacy"] == 1]
    return {"failed": len(failed), "of": len(records),
            "unedited_margin_failed": mean(map(margin, failed)), "unedited_margin_held": mean(map(margin, held)),
            "new_object_chars_failed": mean(len(r["requested_rewrite"]["target_new"]["str"]) for r in failed),
            "new_object_chars_held": mean(len(r["requested_rewrite"]["target_new"]["str"]) for r in held),
            "examples": [f'{r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"])} '
                         f'[{r["requested_rewrite"]["target_true"]["str"]} -> '
                         f'{r["requested_rewrite"]["target_new"]["str"]}]' for r in failed[:8]]}


def layer_growth(metrics: dict) -> list[dict]:
    """||W - W0||_F of each edited layer at each curve point."""
    return [{"n_edits": p["n_edits"], **{name.split(".")[2]: round(v, 2) for name, v in p["weight_change"].items()}}
            for p in metrics["curve"]]


def markdown(study: dict, labels: dict[str, str] | None = None) -> str:
    """The study's table: the unedited model and each method (named by `labels`) at the last measured point."""
    header = ("| | edits | efficacy | paraphrase | neighbourhood | fluency | perplexity | SST-2 f1_new | "
              "mean f1_new (6 tasks) | sum of ||W-W0|| |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for method, metrics in study["runs"].items():
        curve, probes = metrics["curve"], metrics["probes"]
        if not rows:
            rows.append(_row("unedited", curve[0], probes[0]))
        label = (labels or {"alphaedit": "AlphaEdit", "identity": "P = I"}).get(method, method)
        partial = f" (running: {metrics['done']} edits done)" if metrics.get("partial") else ""
        rows.append(_row(label + partial, curve[-1], _at(probes, curve[-1])))
    return header + "\n".join(rows) + "\n"


def _at(probes: list[dict], point: dict) -> dict:
    return next((p for p in probes if p["n_edits"] == point["n_edits"]), {})


def _row(label: str, point: dict, probe: dict) -> str:
    general = probe.get("general", {})
    cells = [label, point["n_edits"], *(point["nll_rates"][f] for f in FAMILIES), point.get("fluency"),
             probe.get("perplexity"), general.get("sst2", {}).get("f1_new"),
             mean(t["f1_new"] for t in general.values()) if general else None, sum(point["weight_change"].values())]
    return "| " + " | ".join("-" if c is None else f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |"


def mean(values):
    """The mean of the values that are not None (None when none are)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
