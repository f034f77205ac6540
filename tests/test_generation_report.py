"""benchmarks/generation_report.py: what it counts in a study's kept generations."""

import importlib.util
import json
from pathlib import Path

import pytest

from alphaedit_fast.evaluation import ngram_entropy

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generation_report.py"


@pytest.fixture(scope="module")
def generation_report():
    spec = importlib.util.spec_from_file_location("generation_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(subject, new, true):
    """EasyEdit's flat CounterFact schema, as the development split."""
    return {"prompt": f"{subject} plays", "subject": subject, "target_new": " " + new, "ground_truth": true}


def write_study(tmp_path, records, generations):
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps(records))
    (tmp_path / "study.json").write_text(json.dumps({"requests": str(requests), "records": f"1:{len(records) - 1}"}))
    (tmp_path / "generations.json").write_text(json.dumps(generations))


def test_loops_are_one_word_trigram_repeated_ten_times(generation_report):
    assert generation_report.looping("a b c " * 10)
    assert not generation_report.looping("a b c " * 9)
    assert not generation_report.looping("one two")


def test_mentions_contributions_and_the_records_slice(tmp_path, generation_report):
    records = [record("Skipped", "Nothing", "None"),  # outside the study's slice 1:3
               record("Ann", "piano", "guitar"),
               record("Bob", "chess", "golf"),
               record("Cy", "tennis", "rugby")]
    unedited = ["Ann plays the guitar at home and sings with friends every night",
                "Bob plays golf on sundays with his brother near the old river",
                "Cy plays rugby for a club in the north of the country since"]
    edited = ["Ann plays the Piano piano piano piano piano piano piano all day",
              "Bob plays chess and chess and chess again in the park",
              "Cy plays rugby for a club in the north of the country since"]
    write_study(tmp_path, records, {"unedited": unedited, "alphaedit": edited})

    result = generation_report.report(tmp_path)

    assert result["unedited"]["true_target_mentions_per_text"] == pytest.approx(1.0)
    assert "against_unedited" not in result["unedited"]
    row = result["alphaedit"]
    assert row["new_target_mentions_per_text"] == pytest.approx((7 + 3 + 0) / 3)
    assert row["share_mentioning_new_target"] == pytest.approx(2 / 3)
    changes = [ngram_entropy(after) - ngram_entropy(before) for before, after in zip(unedited, edited)]
    against = row["against_unedited"]
    assert against["mean_change"] == pytest.approx(sum(changes) / 3)
    groups = against["by_new_target_mentions"]
    assert {name: g["texts"] for name, g in groups.items()} == {"0": 1, "1-2": 0, "3-5": 1, "6+": 1}
    assert groups["0"]["mean_change"] == pytest.approx(0.0)
    assert groups["6+"]["mean_change"] == pytest.approx(changes[0])
    assert groups["1-2"]["mean_change"] is None
    assert sum(g["contribution"] for g in groups.values()) == pytest.approx(against["mean_change"])
