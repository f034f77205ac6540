"""`alphaedit-fast eval --requests` and `AlphaEditor.from_pretrained`: a saved model, its
hyper-parameters, projector (ours, the original's dense P, statistics of either form) and
context templates from files, on the shipped model and a tiny GPT-2 directory."""

import json
import warnings

import numpy as np
import pytest
import torch

from alphaedit_fast import AlphaEditor
from alphaedit_fast.cli import main
from alphaedit_fast.evaluation import load_cases, score_cases
from alphaedit_fast.projector import nullspace_basis
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

from .conftest import CONTEXT_TEMPLATES, test_hparams
from .test_evaluation import as_schema, check_against_direct, counterfact_records, write_records

LAYERS = [1, 2]


@pytest.fixture
def gpt2_dir(tmp_path):
    """A tiny GPT-2 and its tokenizer saved to a directory, its hparams file, a dense P (torch.save)
    from random keys' covariance, the same covariance as the original's .npz files, and templates."""
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    hparams = test_hparams(model, layers=LAYERS)
    (tmp_path / "hparams.json").write_text(json.dumps(hparams.to_dict()))
    keys = torch.randn(400, 160, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 1, 160)
    stats_dir = tmp_path / "stats" / "gpt2" / "wikipedia_stats"
    stats_dir.mkdir(parents=True)
    covs = []
    for layer in LAYERS:
        total = (keys.T @ keys).double()
        np.savez(stats_dir / f"{hparams.rewrite_module_tmp.format(layer)}_float32_mom2_100000.npz",
                 **{"mom2.constructor": "SecondMoment()", "mom2.count": 400, "mom2.mom2": total.numpy()})
        covs.append(total / 400)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bases = [nullspace_basis(c, hparams.nullspace_threshold) for c in covs]
    torch.save(torch.stack([(u @ u.T).float() for u in bases]), tmp_path / "null_space_project.pt")
    (tmp_path / "templates.json").write_text(json.dumps(CONTEXT_TEMPLATES))
    return tmp_path


def run_eval(tmp_path, *args, schema="counterfact", n=4):
    requests = write_records(tmp_path, as_schema(counterfact_records(n), schema), f"{schema}.json")
    out = tmp_path / f"out-{schema}"
    code = main(["eval", "--requests", str(requests), "--out", str(out), *map(str, args)])
    return code, out, requests


@pytest.mark.parametrize("schema", ["counterfact", "zsre", "easyedit"])
def test_eval_on_a_gpt2_directory_scores_the_edited_model(gpt2_dir, schema):
    code, out, requests = run_eval(
        gpt2_dir, "--model", gpt2_dir / "model", "--hparams", gpt2_dir / "hparams.json", "--projector",
        gpt2_dir / "null_space_project.pt", "--context-templates", gpt2_dir / "templates.json", "--batch-size", 2,
        schema=schema)
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    cases = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert metrics["schema"] == schema and metrics["n_cases"] == 4 and metrics["batch_size"] == 2
    assert set(metrics["rates"]) == set(metrics["nll_rates"]) == {"efficacy", "paraphrase", "neighborhood"}
    # the paper's NLL comparison wherever the records carry a true target (not MEND's ZsRE layout)
    assert (metrics["nll_rates"]["efficacy"] is None) == (schema == "zsre")
    assert {"before", "after", "definition"} <= set(metrics["fluency"])
    assert {"z", "keys", "solve", "cache update", "evaluate"} <= set(metrics["seconds"])
    assert {"torch", "transformers", "alphaedit_fast"} <= set(metrics["versions"])
    assert metrics["context_templates"] == CONTEXT_TEMPLATES
    # the per-case NLLs are the edited model's: redo the edit in-process and score it directly
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    editor = AlphaEditor(model, tok, test_hparams(model, layers=LAYERS),
                         projector=torch.load(gpt2_dir / "null_space_project.pt"), context_templates=CONTEXT_TEMPLATES)
    _, expected_cases = load_cases(requests)
    for start in (0, 2):
        editor.edit([{"case_id": c["case_id"], **c["requested_rewrite"]} for c in expected_cases[start:start + 2]])
    check_against_direct(model, tok, expected_cases, schema, [c["post"] for c in cases])
    assert [c["case_id"] for c in cases] == [c["case_id"] for c in expected_cases]
    assert cases[0]["pre"]["rewrite_prompts_probs"] != cases[0]["post"]["rewrite_prompts_probs"]


def test_statistics_of_either_form_give_the_dense_p_results(gpt2_dir):
    common = ["--model", gpt2_dir / "model", "--hparams", gpt2_dir / "hparams.json", "--context-templates",
              gpt2_dir / "templates.json", "--no-before"]
    results = []
    for source in (["--projector", gpt2_dir / "null_space_project.pt"], ["--stats", gpt2_dir / "stats"]):
        code, out, _ = run_eval(gpt2_dir, *common, *source)
        assert code == 0
        results.append([json.loads(x)["post"] for x in (out / "cases.jsonl").read_text().splitlines()])
    for a, b in zip(*results):
        for x, y in zip(a["rewrite_prompts_probs"], b["rewrite_prompts_probs"]):
            assert x["target_new"] == pytest.approx(y["target_new"], abs=1e-4)


def test_the_shipped_model_needs_no_projector_or_hparams(tmp_path, capsys):
    from alphaedit_fast.factworld import load_shipped

    model, tok, world = load_shipped()
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(world.counterfact_requests(4, seed=2)))
    assert main(["eval", "--requests", str(path), "--out", str(tmp_path / "out"), "--curve", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "before any edit (NLL comparison): efficacy" in printed
    assert "after 4 edits in batches of 2 (NLL comparison): efficacy" in printed and ", fluency " in printed
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["fluency"]["before"] > 0 and metrics["fluency"]["after"] > 0
    assert metrics["hparams"]["preset"] == "factworld" and metrics["projector"] == "corpus"
    assert metrics["rates"]["efficacy"] > metrics["before"]["rates"]["efficacy"]
    assert (tmp_path / "out" / "curve.png").stat().st_size > 0
    editor = AlphaEditor.from_pretrained("factworld")
    assert editor.hparams.layers == [0] and editor.solver.bases[0].shape[1] < editor.solver.bases[0].shape[0]
    _, cases = load_cases(path)
    check_against_direct(editor.model, editor.tok, cases, "counterfact",
                         score_cases(editor.model, editor.tok, cases, "counterfact"))


@pytest.mark.parametrize("extra, message", [
    ([], "no projector: give"),
    (["--projector", "{tmp}/missing.pt"], "does not exist"),
    (["--projector", "{tmp}/hparams.json"], "cannot read"),
    (["--projector", "{tmp}/bad-P.pt"], "not a dense P"),
    (["--stats", "{tmp}/model"], "no statistics file"),
    (["--projector", "{tmp}/null_space_project.pt", "--stats", "{tmp}/stats"], "not both"),
    (["--projector", "identity", "--edits", "9"], "holds 4 records"),
    (["--projector", "identity", "--hparams", "no-such-preset"], "no-such-preset"),
])
def test_eval_errors_are_one_line_and_change_nothing(gpt2_dir, capsys, extra, message):
    torch.save(torch.zeros(3, 4, 4), gpt2_dir / "bad-P.pt")
    before = (gpt2_dir / "model" / "model.safetensors").read_bytes()
    args = [a.format(tmp=gpt2_dir) if isinstance(a, str) else a for a in extra]
    if "--hparams" not in args:
        args += ["--hparams", gpt2_dir / "hparams.json"]
    code, out, _ = run_eval(gpt2_dir, "--model", gpt2_dir / "model", *args)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert (gpt2_dir / "model" / "model.safetensors").read_bytes() == before
