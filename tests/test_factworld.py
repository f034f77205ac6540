"""The fact world: deterministic, its shipped model recalls its facts and can be edited, and
`alphaedit-fast eval` measures edits end to end."""

import copy
import json

import pytest
import torch

from alphaedit_fast.cli import main
from alphaedit_fast.editor import AlphaEditor
from alphaedit_fast.factworld import build_world, load_shipped, training_texts
from alphaedit_fast.factworld.causal_trace import causal_trace
from alphaedit_fast.factworld.editing import CONTEXT_TEMPLATES, corpus_projector, edit_hparams
from alphaedit_fast.factworld.evaluate import Probe, evaluate_editing, next_token_scores, write_report
from alphaedit_fast.factworld.train import recall, train_tokenizer

from .conftest import forward_accumulation_length, tolerance


def test_world_and_corpus_are_deterministic():
    a, b = build_world(0, 60), build_world(0, 60)
    assert a.subjects == b.subjects and a.facts == b.facts and a.held_out_facts() == b.held_out_facts()
    assert len(a.subjects) == 60 and len(a.relations) == 8 and len(a.facts) == 480
    assert training_texts(a, 0) == training_texts(b, 0)
    assert build_world(1, 60).subjects != a.subjects
    tok_a, tok_b = train_tokenizer(training_texts(a, 0)), train_tokenizer(training_texts(b, 0))
    assert tok_a.get_vocab() == tok_b.get_vocab()


def test_held_out_phrasings_never_appear_in_training():
    world = build_world(0, 60)
    held_out = world.held_out_facts()
    assert len(held_out) == len(world.facts) // 2
    assert all(sum((s, r) in held_out for r in world.relations) == 4 for s in world.subjects)
    corpus = "\n".join(training_texts(world, 0))
    s, r = held_out[0]
    assert all(p not in corpus for p in world.prompts(s, r, held_out=True))
    trained = next((s, r) for s in world.subjects for r in world.relations if (s, r) not in held_out)
    assert all(p in corpus for p in world.prompts(*trained, held_out=True))


def test_counterfact_requests_one_per_subject_with_clean_neighbours():
    world = build_world(0, 60)
    records = world.counterfact_requests(40, seed=3)
    assert records == world.counterfact_requests(40, seed=3)
    subjects = [r["requested_rewrite"]["subject"] for r in records]
    assert len(set(subjects)) == 40
    edited = {(r["requested_rewrite"]["subject"], r["relation"]) for r in records}
    held_out = set(world.held_out_facts())
    for rec in records:
        rw, rel = rec["requested_rewrite"], rec["relation"]
        assert (rw["subject"], rel) in held_out
        assert rw["target_true"]["str"] == world.facts[(rw["subject"], rel)] != rw["target_new"]["str"]
        assert len(rec["paraphrase_prompts"]) == 2 and rec["neighborhood_prompts"]
        for prompt in rec["neighborhood_prompts"]:
            other = next(s for s in world.subjects if world.relations[rel]["templates"][0].format(s) == prompt)
            assert (other, rel) not in edited and world.facts[(other, rel)] == rw["target_true"]["str"]
    with pytest.raises(ValueError, match="one edit per subject"):
        world.counterfact_requests(61)


def test_stream_requests_edit_every_fact_but_one_per_subject():
    world = build_world(0, 500)  # the shipped world's size
    records = world.stream_requests(seed=1)
    assert records == world.stream_requests(seed=1) and records != world.stream_requests(seed=2)
    assert len(records) == 500 * (len(world.relations) - 1) == 3500
    edited = [(r["requested_rewrite"]["subject"], r["relation"]) for r in records]
    assert len(set(edited)) == len(edited)
    assert all(sum(s == subject for s, _ in edited) == len(world.relations) - 1 for subject in world.subjects)
    assert sum(bool(r["neighborhood_prompts"]) for r in records) > 0.95 * len(records)
    edited, subject_of = set(edited), {}
    for rel, spec in world.relations.items():
        subject_of.update({(spec["templates"][0].format(s), rel): s for s in world.subjects})
    for rec in records:
        rw, rel = rec["requested_rewrite"], rec["relation"]
        assert rw["target_true"]["str"] == world.facts[(rw["subject"], rel)] != rw["target_new"]["str"]
        assert rec["paraphrase_prompts"] == world.prompts(rw["subject"], rel, held_out=True)
        for prompt in rec["neighborhood_prompts"]:  # a kept fact of another subject, with the same true object
            other = subject_of[(prompt, rel)]
            assert other != rw["subject"] and (other, rel) not in edited
            assert world.facts[(other, rel)] == rw["target_true"]["str"]


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


def test_shipped_model_recalls_its_facts(shipped):
    model, tok, world = shipped
    assert recall(model, tok, world) >= 0.95
    # every object and every name word is one token: edits and metrics read one position
    assert all(len(tok(" " + o)["input_ids"]) == 1 for spec in world.relations.values() for o in spec["objects"])
    assert all(len(tok(" " + s)["input_ids"]) == 2 for s in world.subjects)


@pytest.mark.parametrize("relation", ["instrument", "city"])
def test_shipped_model_writes_facts_at_the_subject(shipped, relation):
    """Causal trace: restoring the subject's last token at the edited layer brings the fact back (what
    AlphaEdit's subject_last edits rely on), restoring the last token at that layer does not."""
    model, tok, world = shipped
    layer = edit_hparams(model).layers[0]
    res = causal_trace(model, tok, world, n=6, relation=relation)
    assert res["clean"] > 0.9 and res["corrupt"] < 0.3
    assert res["subj"][layer] > 0.6 and res["last"][layer] < 0.3, res


def test_next_token_scores_match_one_prompt_at_a_time(shipped):
    model, tok, world = shipped
    prompts = [world.prompts(s, "city")[0] for s in world.subjects[:5]] + ["Hi"]
    columns = torch.tensor([[3, 7]] * len(prompts))
    probs, top1 = next_token_scores(model, tok, prompts, columns, batch=4)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            logits = model(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1]
        last = logits.softmax(-1)
        # padded batch vs one prompt: logits agree to a forward pass's rounding relative to their
        # size; a probability's relative error is about twice its logits' absolute error
        rtol = 2 * tolerance(torch.float32, forward_accumulation_length(model))[0] * logits.abs().max().item()
        torch.testing.assert_close(probs[i], last[[3, 7]], rtol=rtol, atol=1e-7)
        # the argmax of two forwards can differ on a near-tie: top1 must be a maximum up to rounding
        assert last[top1[i]] >= last.max() * (1 - rtol), (top1[i], last.argmax())


def test_a_demo_sized_edit_works(shipped):
    model, tok, world = shipped
    model = copy.deepcopy(model)
    records = world.counterfact_requests(10)
    hparams = edit_hparams(model)
    probe = Probe(model, tok, world, records)
    before = probe.measure(model, 10)
    editor = AlphaEditor(model, tok, hparams, projector=corpus_projector(model, tok, world, hparams),
                         context_templates=CONTEXT_TEMPLATES)
    editor.edit([r["requested_rewrite"] for r in records])
    after = probe.measure(model, 10)
    assert before["efficacy"] == 0.0 and before["retention"] == 1.0
    assert after["efficacy"] >= 0.9 and after["paraphrase"] >= 0.8
    assert after["retention"] < 1.0  # it measures the edited model, not the original


def test_eval_end_to_end_writes_json_and_plot(shipped, tmp_path):
    model, tok, world = shipped
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    result = evaluate_editing(model, tok, world, n_edits=4, batch_size=2, batch_sizes=[2, 4], progress=False,
                              log=lambda _: None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # edits copies
    runs = {(r["method"], r["mode"]): r["points"] for r in result["runs"]}
    assert set(runs) == {(m, d) for m in ("alphaedit", "identity") for d in ("sequential", "batch")}
    assert [p["n_edits"] for p in runs[("alphaedit", "sequential")]] == [2, 4]
    for points in runs.values():
        for point in points:
            assert all(0.0 <= point[k] <= 1.0 for k in ("efficacy", "paraphrase", "neighbourhood", "retention"))
        assert points[-1]["efficacy"] >= 0.75
    json_path, png_path = write_report(result, tmp_path)
    assert json.loads(json_path.read_text())["config"]["n_edits"] == 4
    assert png_path.read_bytes()[:4] == b"\x89PNG"


def test_eval_rejects_bad_arguments(shipped):
    model, tok, world = shipped
    with pytest.raises(ValueError, match="multiple of batch_size"):
        evaluate_editing(model, tok, world, n_edits=5, batch_size=2)
    with pytest.raises(ValueError, match="unknown method"):
        evaluate_editing(model, tok, world, n_edits=4, batch_size=2, methods=["memit"])


@pytest.mark.parametrize("model", [[], ["--model", "factworld"]])  # the default, or the shipped model by name
def test_cli_eval(tmp_path, capsys, model):
    assert main(["eval", *model, "--edits", "2", "--batch-size", "2", "--methods", "alphaedit", "--modes",
                 "sequential", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "factworld-eval.png").is_file()
    assert "alphaedit sequential    2 edits" in capsys.readouterr().out
