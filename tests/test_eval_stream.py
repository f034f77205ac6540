"""`eval` over a long stream: checkpoints after every batch, --resume keeps the finished batches'
scores and ends with the uninterrupted run's metrics; curve points every N edits with both metric
families, weight changes and retention; general capability and perplexity probes; perplexity
itself against the model's own loss."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from alphaedit_fast import AlphaEditor
from alphaedit_fast.cli import main
from alphaedit_fast.evaluation import evaluate_edits, load_cases
from alphaedit_fast.perplexity import perplexity
from alphaedit_fast.stream import StreamMismatchError
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

from .conftest import CONTEXT_TEMPLATES, test_hparams
from .test_evaluation import write_records

SUBJECTS = ["Danielle Darrieux", "Toko Yasuda", "Michel Denisot", "Pervez Musharraf", "Anna Karenina", "Leo Messi",
            "Thomas Mann"]
OBJECTS = [("English", "French"), ("piano", "guitar"), ("Google", "Apple"), ("Spain", "London"), ("Rome", "Paris"),
           ("cello", "violin"), ("Berlin", "Vienna")]


def counterfact_records(n):
    """n CounterFact records (up to 7), each with a paraphrase and two neighbours."""
    prompts = ["The mother tongue of {} is", "{} plays the", "{} works for", "{} is a citizen of"]
    out = []
    for i, (subject, (new, true)) in enumerate(zip(SUBJECTS[:n], OBJECTS)):
        prompt = prompts[i % 4]
        out.append({"case_id": i, "requested_rewrite": {"prompt": prompt, "subject": subject,
                                                        "target_new": {"str": new}, "target_true": {"str": true}},
                    "paraphrase_prompts": [f"I b. {prompt.format(subject)}"],
                    "neighborhood_prompts": [prompt.format(SUBJECTS[i - 1]), prompt.format(SUBJECTS[i - 2])]})
    return out


def editor_for(family="gpt2", seed=0):
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model)
    g = torch.Generator().manual_seed(seed)
    bases = [torch.linalg.qr(torch.randn(160, 120, generator=g))[0] for _ in hparams.layers]
    return AlphaEditor(model, tok, hparams, projector=bases, context_templates=CONTEXT_TEMPLATES)


def probe(model, tok):
    return {"perplexity": perplexity(model, tok, list(range(3, 60)), window=16)}


def run(editor, cases, checkpoints=None, resume=False):
    return evaluate_edits(editor, cases, "counterfact", 2, curve=True, curve_every=4, fluency=True,
                          fluency_records=2, generation_length=12, probe=probe, probe_every=4,
                          checkpoints=checkpoints, resume=resume, log=lambda _: None)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_interrupted_evaluation_resumes_to_the_same_metrics(tmp_path, family):
    _, cases = load_cases(write_records(tmp_path, counterfact_records(7), "cf.json"))
    whole, _ = run(editor_for(family), cases)
    editor = editor_for(family)
    calls = {"n": 0}
    edit = editor.edit

    def dying_edit(requests, **kwargs):  # the third batch never finishes
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return edit(requests, **kwargs)

    editor.edit = dying_edit
    with pytest.raises(KeyboardInterrupt):
        run(editor, cases, tmp_path / "stream")
    fresh = editor_for(family)
    with pytest.raises(StreamMismatchError, match="holds an edit stream"):  # never started over silently
        run(fresh, cases, tmp_path / "stream")
    resumed, records = run(fresh, cases, tmp_path / "stream", resume=True)
    drop = ("seconds", "seconds_per_edit", "peak_memory_bytes")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}
    assert [p["n_edits"] for p in whole["curve"]] == [0, 4, 7]
    assert [p["n_edits"] for p in whole["probes"]] == [0, 4, 7]
    assert all(set(p) >= {"nll_rates", "accuracy", "weight_change", "fluency"} for p in whole["curve"])
    assert sum(whole["curve"][0]["weight_change"].values()) == 0 < sum(whole["curve"][-1]["weight_change"].values())
    retention = whole["retention"]
    assert retention["first_batch_successes"] >= retention["still_held"] > 0
    assert len(records) == 7


def test_resume_refuses_other_settings(tmp_path):
    _, cases = load_cases(write_records(tmp_path, counterfact_records(4), "cf.json"))
    editor = editor_for()
    editor.edit = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        run(editor, cases, tmp_path / "stream")
    with pytest.raises(StreamMismatchError, match="started with different .*curve_every"):
        evaluate_edits(editor_for(), cases, "counterfact", 2, curve=True, curve_every=2, fluency=True,
                       fluency_records=2, generation_length=12, probe=probe, probe_every=4,
                       checkpoints=tmp_path / "stream", resume=True, log=lambda _: None)
    with pytest.raises(StreamMismatchError, match="started with different .*requests"):
        run(editor_for(), cases[:3], tmp_path / "stream", resume=True)
    with pytest.raises(StreamMismatchError, match="started with different projector"):
        run(editor_for(seed=1), cases, tmp_path / "stream", resume=True)


def test_perplexity_is_the_models_own_loss():
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    ids = list(range(5, 45))
    bos = tok.bos_token_id
    losses = []
    for start in range(0, len(ids), 16):  # windows of 16 tokens, each after BOS, scored by the model itself
        row = torch.tensor([[bos] + ids[start:start + 16]])
        with torch.no_grad():
            losses.append(model(row, labels=row).loss.double() * (row.shape[1] - 1))
    expected = math.exp(float(sum(losses)) / len(ids))
    assert perplexity(model, tok, ids, window=16, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_eval_cli_general_and_perplexity_need_their_data(tmp_path, capsys):
    requests = write_records(tmp_path, counterfact_records(2), "cf.json")
    args = ["eval", "--requests", str(requests), "--out", str(tmp_path / "out"), "--model", "factworld"]
    assert main([*args, "--general", "sst2", "--general-data", str(tmp_path / "none")]) == 2
    assert "sst2.json" in capsys.readouterr().err
    assert main([*args, "--perplexity", str(tmp_path / "none.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*args, "--batch-size", "2", "--curve", "--curve-every", "3"]) == 2
    assert "multiple of --batch-size" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 2
    assert "no unfinished evaluation" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_cli_killed_and_resumed(tmp_path):
    """The command line killed for real (SIGKILL after the second batch's checkpoint), then resumed:
    the same metrics.json as an uninterrupted run, and the checkpoint gone at the end."""
    records = write_records(tmp_path, counterfact_records(6), "cf.json")
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "hparams.json").write_text(json.dumps(test_hparams(model, v_num_grad_steps=6).to_dict()))
    (tmp_path / "templates.json").write_text(json.dumps(CONTEXT_TEMPLATES))
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, signal, sys, torch\ntorch.set_num_threads(1)\nfrom alphaedit_fast import stream\n"
        "save = stream.EditStream.save\n"
        "def killing_save(self, *a, **k):\n    out = save(self, *a, **k)\n"
        "    if os.environ.get('KILL') and self.done == 4:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return out\nstream.EditStream.save = killing_save\n"
        "from alphaedit_fast.cli import main\nsys.exit(main(sys.argv[1:]))\n")

    def eval_(out, kill=False, resume=False):
        args = [sys.executable, str(driver), "eval", "--requests", str(records), "--model", str(tmp_path / "model"),
                "--hparams", str(tmp_path / "hparams.json"), "--projector", "identity", "--context-templates",
                str(tmp_path / "templates.json"), "--batch-size", "2", "--curve", "--generation-length", "12",
                "--perplexity", str(tmp_path / "text.txt"), "--perplexity-tokens", "64", "--general-every", "4",
                "--out", str(tmp_path / out), *(["--resume"] if resume else [])]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL": "1" if kill else "", "PYTHONWARNINGS": "ignore"}
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)

    assert eval_("whole").returncode == 0
    killed = eval_("parted", kill=True)
    assert killed.returncode == -signal.SIGKILL and (tmp_path / "parted" / "stream").is_dir()
    resumed = eval_("parted", resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after 4 of 6 edits" in resumed.stdout
    assert not (tmp_path / "parted" / "stream").exists()
    assert (tmp_path / "parted" / "curve.png").stat().st_size > 0  # rates and perplexity
    whole, parted = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "parted"))
    for metrics in (whole, parted):
        for key in ("seconds", "seconds_per_edit", "peak_memory_bytes"):
            metrics.pop(key)
    assert parted == whole
    assert [p["n_edits"] for p in whole["probes"]] == [0, 4, 6] and whole["probes"][0]["perplexity"] > 1


def test_unedited_measurements_are_kept_one_by_one(tmp_path):
    """Interrupted while measuring the unedited model (in the first probe): the resumed run keeps
    the scores and fluency already measured and ends with the uninterrupted run's metrics."""
    _, cases = load_cases(write_records(tmp_path, counterfact_records(4), "cf.json"))
    whole, _ = run(editor_for(), cases)

    def dying_probe(model, tok):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_edits(editor_for(), cases, "counterfact", 2, curve=True, curve_every=4, fluency=True,
                       fluency_records=2, generation_length=12, probe=dying_probe, probe_every=4,
                       checkpoints=tmp_path / "stream", log=lambda _: None)
    from alphaedit_fast.storage import load_tensors
    from alphaedit_fast.stream import CHECKPOINT, CHECKPOINT_KIND

    progress = load_tensors(tmp_path / "stream" / CHECKPOINT, CHECKPOINT_KIND)[1]["progress"]
    assert {"pre", "points"} <= set(progress) and "before" in progress["entropy"] and not progress["probes"]
    resumed, _ = run(editor_for(), cases, tmp_path / "stream", resume=True)
    drop = ("seconds", "seconds_per_edit", "peak_memory_bytes")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}
