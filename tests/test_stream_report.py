"""The 2,000-edit study's findings (`benchmarks/stream_report.py`) on hand-made metrics and cases."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import stream_report  # noqa: E402


def test_above_chance_is_a_one_sided_binomial_test():
    # 60 of 100 against a fair coin: P(X >= 60) = 0.028; 58 of 100: 0.067
    assert stream_report.above_chance(0.60, 100, 0.5) and not stream_report.above_chance(0.58, 100, 0.5)
    assert not stream_report.above_chance(0.70, 100, 0.7)  # the majority answer itself is not above chance
    tail = sum(math.comb(100, i) for i in range(60, 101)) / 2 ** 100
    assert 0.028 < tail < 0.029


def general_data(tmp_path: Path, positives: int) -> Path:
    records = [{"sentence": f"s{i}", "label": int(i < 10 + positives)} for i in range(110)]
    (tmp_path / "sst2.json").write_text(json.dumps(records))
    return tmp_path


def metrics(first: dict, last: dict) -> dict:
    def point(n, rates, sst2):
        change = {"model.layers.4.mlp.down_proj": n}
        return ({"n_edits": n, "nll_rates": rates, "fluency": 5.0, "weight_change": change},
                {"n_edits": n, "perplexity": 20.0 + n / 100, "general": {"sst2": sst2}})

    (c0, p0), (c1, p1) = point(0, *first), point(2000, *last)
    return {"curve": [c0, c1], "probes": [p0, p1], "fluency": {"before": 5.0, "after": 4.9}}


def test_targets_compare_the_last_point_with_the_unedited_model(tmp_path):
    data = general_data(tmp_path, positives=50)  # chance: half the items
    sst2_before = {"n": 100, "accuracy_new": 0.70, "f1_new": 0.70}
    sst2_after = {"n": 100, "accuracy_new": 0.60, "f1_new": 0.66}
    m = metrics(({"efficacy": 0.1, "paraphrase": 0.1, "neighborhood": 0.8}, sst2_before),
                ({"efficacy": 0.96, "paraphrase": 0.80, "neighborhood": 0.70}, sst2_after))
    rows = {r["target"].split(" ")[0]: r for r in stream_report.targets(m, data)}
    assert rows["efficacy"]["met"] and not rows["paraphrase"]["met"]
    assert rows["neighborhood"]["met"] and rows["neighborhood"]["bound"] == pytest.approx(0.68)  # 0.85 x 0.8
    assert rows["fluency"]["met"]  # 2% lower
    assert not rows["perplexity"]["met"]  # 20 -> 40
    assert rows["sst2"]["met"] and rows["sst2"]["majority_share"] == 0.5


def test_a_task_at_chance_is_reported_not_judged(tmp_path):
    data = general_data(tmp_path, positives=80)  # always "positive" scores 0.8
    sst2 = {"n": 100, "accuracy_new": 0.80, "f1_new": 0.71}
    m = metrics(({"efficacy": 0, "paraphrase": 0, "neighborhood": 1}, sst2),
                ({"efficacy": 1, "paraphrase": 1, "neighborhood": 1}, {**sst2, "f1_new": 0.2}))
    (row,) = [r for r in stream_report.targets(m, data) if r["target"].startswith("sst2")]
    assert row["met"] is None and "at chance" in row["target"]


def case(new_wins: bool, margin_before: float, new: str = "Paris") -> dict:
    post = {"rewrite_prompts_probs": [{"target_new": 1.0, "target_true": 2.0 if new_wins else 0.5}],
            "paraphrase_prompts_probs": [], "neighborhood_prompts_probs": [],
            **{f"{s}_prompts_correct": [] for s in ("rewrite", "paraphrase", "neighborhood")}}
    pre = {"rewrite_prompts_probs": [{"target_new": 3.0 + margin_before, "target_true": 3.0}]}
    return {"requested_rewrite": {"prompt": "{} is in", "subject": "X", "target_new": {"str": new},
                                  "target_true": {"str": "Rome"}}, "post": post, "pre": pre}


def test_by_batch_and_failures_read_the_cases_in_edit_order(tmp_path):
    path = tmp_path / "cases.jsonl"
    cases = [case(False, 4.0, "Berlin"), case(True, 1.0), case(True, 1.0), case(True, 3.0)]
    path.write_text("".join(json.dumps(c) + "\n" for c in cases))
    batches = stream_report.by_batch(path, 2)
    assert [b["efficacy"] for b in batches] == [0.5, 1.0] and batches[0]["paraphrase"] is None
    found = stream_report.failures(path)
    assert found["failed"] == 1 and found["of"] == 4
    assert found["unedited_margin_failed"] == 4.0 and found["unedited_margin_held"] == pytest.approx(5 / 3)
    assert found["new_object_chars_failed"] == 6 and found["examples"] == ["X is in [Rome -> Berlin]"]


def test_the_table_has_the_unedited_row_and_one_per_method(tmp_path):
    m = metrics(({"efficacy": 0.1, "paraphrase": 0.1, "neighborhood": 0.8}, {"f1_new": 0.7}),
                ({"efficacy": 0.9, "paraphrase": 0.8, "neighborhood": 0.7}, {"f1_new": 0.6}))
    table = stream_report.markdown({"runs": {"alphaedit": m, "identity": {**m, "partial": True, "done": 2100}}})
    lines = table.strip().splitlines()
    assert len(lines) == 5 and lines[2].startswith("| unedited | 0 | 0.100")
    assert lines[3].startswith("| AlphaEdit | 2000 | 0.900")
    assert lines[4].startswith("| P = I (running: 2100 edits done) | 2000 |")
    assert stream_report.layer_growth(m)[1] == {"n_edits": 2000, "4": 2000}
