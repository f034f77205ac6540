"""The fact world: deterministic, and its shipped model recalls its facts and can be edited."""

import copy
import warnings

import pytest

from alphaedit_fast import AlphaEditHyperParams, AlphaEditor
from alphaedit_fast.factworld import build_world, load_shipped, training_texts
from alphaedit_fast.factworld.editcheck import evaluate, make_requests
from alphaedit_fast.factworld.train import recall


def test_world_and_corpus_are_deterministic():
    a, b = build_world(0, 200), build_world(0, 200)
    assert a.subjects == b.subjects and a.facts == b.facts
    assert len(a.subjects) == 200 and len(a.relations) == 8 and len(a.facts) == 1600
    assert training_texts(a, 0) == training_texts(b, 0)
    assert build_world(1, 200).subjects != a.subjects


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


def test_shipped_model_recalls_its_facts(shipped):
    model, tok, world = shipped
    assert recall(model, tok, world) >= 0.95


def test_a_demo_sized_edit_works(shipped):
    model, tok, world = shipped
    model = copy.deepcopy(model)
    requests = make_requests(world, 10)
    hparams = AlphaEditHyperParams.for_model(model, layers=[0], v_lr=0.5, L2=1.0, clamp_norm_factor=1.0,
                                             v_num_grad_steps=25)
    before = evaluate(model, tok, world, requests)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        editor = AlphaEditor(model, tok, hparams, projector=None,
                             context_templates=[["{}"], ["The. {}", "Therefore. {}", "Yes. {}", "So. {}"]])
    editor.edit([{k: q[k] for k in ("prompt", "subject", "target_new")} for q in requests])
    after = evaluate(model, tok, world, requests)
    assert before["efficacy"] == 0.0
    assert after["efficacy"] >= 0.9 and after["paraphrase"] >= 0.8
