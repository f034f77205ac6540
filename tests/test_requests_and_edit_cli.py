"""Request files (CounterFact and EasyEdit schemas) and `alphaedit-fast edit` with editor state."""

import json

import pytest
import torch

from alphaedit_fast import AlphaEditor, InvalidRequestError
from alphaedit_fast.cli import main
from alphaedit_fast.requests import load_requests
from alphaedit_fast.storage import StatsFileError
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

from .conftest import CONTEXT_TEMPLATES, test_hparams

COUNTERFACT = [{"case_id": 7, "requested_rewrite": {
    "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
    "target_new": {"str": "English"}, "target_true": {"str": "French"}},
    "paraphrase_prompts": ["Danielle Darrieux speaks"], "neighborhood_prompts": ["The mother tongue of X is"]}]
EASYEDIT = [{"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano",
             "ground_truth": "guitar", "rephrase_prompt": "The instrument of Toko Yasuda is",
             "locality_prompt": "Michel Denisot works for", "locality_ground_truth": "Canal+"}]


def test_counterfact_and_easyedit_files(tmp_path):
    (tmp_path / "cf.json").write_text(json.dumps(COUNTERFACT))
    (tmp_path / "ee.jsonl").write_text("\n".join(json.dumps(r) for r in EASYEDIT))
    cf = load_requests(tmp_path / "cf.json")[0]
    assert cf["case_id"] == 7 and cf["target_new"]["str"] == " English" and cf["target_true"]["str"] == "French"
    assert cf["paraphrase_prompts"] == ["Danielle Darrieux speaks"]
    ee = load_requests(tmp_path / "ee.jsonl")[0]
    assert ee["prompt"] == "{} plays the" and ee["subject"] == "Toko Yasuda" and ee["target_new"]["str"] == " piano"
    assert ee["paraphrase_prompts"] == ["The instrument of Toko Yasuda is"]
    assert ee["neighborhood_prompts"] == ["Michel Denisot works for"] and ee["neighborhood_target"] == "Canal+"


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('[{"requested_rewrite": {"prompt": "{} is", "subject": "x"}}]',
     r"r.json, record 1 \(index 0\): requested_rewrite.target_new is missing"),
    ('[{"requested_rewrite": {"prompt": "{} is", "subject": "x", "target_new": {"str": "y"}}}, '
     '{"requested_rewrite": {"prompt": "{} is", "target_new": {"str": "y"}}}]',
     r"record 2 \(index 1\): requested_rewrite.subject is missing"),
    ('[{"requested_rewrite": {"prompt": "{} is", "subject": "x", "target_new": "y"}}]',
     "requested_rewrite.target_new must be a JSON object with 'str'"),
    ('[{"case_id": 4, "requested_rewrite": {"prompt": "is", "subject": "x", "target_new": {"str": "y"}}}]',
     r"record 1 \(index 0\): prompt 'is' must contain"),
    ('[{"subject": "x", "target_new": "y"}]', "record 1 \\(index 0\\): prompt is missing"),
    ('[{"prompt": "A B plays", "subject": "Z", "target_new": "t"}]', "does not occur"),
    ('[{"prompt": "{} plays", "subject": "Z", "target_new": ""}]', "target_new"),
    ("[]", "no requests"),
    ("[3]", r"record 1 \(index 0\): malformed"),
])
def test_malformed_request_files(tmp_path, content, message):
    (tmp_path / "r.json").write_text(content)
    with pytest.raises(InvalidRequestError, match=message):
        load_requests(tmp_path / "r.json")


def test_edit_cli_saves_model_and_state_and_continues(tmp_path):
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    hparams = test_hparams(model)
    (tmp_path / "hparams.json").write_text(json.dumps(hparams.to_dict()))
    (tmp_path / "cf.json").write_text(json.dumps(COUNTERFACT))
    (tmp_path / "ee.json").write_text(json.dumps(EASYEDIT))
    common = ["--hparams", str(tmp_path / "hparams.json")]
    with pytest.warns(UserWarning, match="projector=None"):
        assert main(["edit", "--model", str(tmp_path / "model"), "--requests", str(tmp_path / "cf.json"),
                     "--out", str(tmp_path / "run1"), *common]) == 0
    assert main(["edit", "--model", str(tmp_path / "run1"), "--requests", str(tmp_path / "ee.json"),
                 "--state", str(tmp_path / "run1" / "editor-state.safetensors"),
                 "--out", str(tmp_path / "run2"), *common]) == 0
    from transformers import AutoModelForCausalLM

    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "run2")
    editor = AlphaEditor.from_state(edited, tok, hparams, tmp_path / "run2" / "editor-state.safetensors")
    assert editor.num_edits == 2
    assert all(cp.norm() > 0 for cp in editor.solver.cache_proj)  # both runs' keys are in the cache
    w0 = model.get_submodule("transformer.h.1.mlp.c_proj").weight
    assert not torch.equal(edited.get_submodule("transformer.h.1.mlp.c_proj").weight, w0)
    with pytest.raises(StatsFileError, match="other weights"):  # the state belongs to the edited model
        AlphaEditor.from_state(model, tok, hparams, tmp_path / "run2" / "editor-state.safetensors",
                               context_templates=CONTEXT_TEMPLATES)
