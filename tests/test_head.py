"""The model's own output head (head.py) in value steps and evaluation.

Cohere multiplies its logits by `logit_scale`, Granite divides them by `logits_scaling`, Gemma 2
soft-caps them: the KL term of the value optimisation and the evaluation scores must read the
logits the model itself gives, on transformers 4.4x and 5.x.
"""

import pytest
import torch

import alphaedit_fast.values as values
from alphaedit_fast.evaluation import score_targets
from alphaedit_fast.head import head_is_plain, own_logits
from alphaedit_fast.tiny import FAMILY_CONFIGS, OUTPUT_TRANSFORM_CONFIGS, tiny_model, tiny_tokenizer_for

from .conftest import CONTEXT_TEMPLATES, REQUESTS, assert_close_rel, test_hparams, tolerance, z_rtol
from .test_suffix import _skip_unless_available
from .test_values import reference_zs

TRANSFORMS = sorted(OUTPUT_TRANSFORM_CONFIGS)
PROMPTS = ["The mother tongue of Toko Yasuda is", "Apple A5 was developed by Google"]


def _plain(model) -> bool:
    head = model.get_output_embeddings()
    bias = head.bias if getattr(head, "bias", None) is not None else head.weight.new_zeros(head.weight.shape[0])
    return head_is_plain(model, head.weight.T, bias, getattr(model.config, "final_logit_softcapping", None))


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS) + TRANSFORMS)
def test_own_logits_are_the_models_logits(family):
    _skip_unless_available(family)
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    tok.pad_token = tok.pad_token or tok.eos_token
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits[batch["attention_mask"].bool()]
        normed = model.base_model(**batch).last_hidden_state[batch["attention_mask"].bool()]
    got = own_logits(model, normed)
    assert got.shape == expected.shape and not model.base_model.__class__.__name__.startswith("_")
    rtol, atol = tolerance(torch.float32, normed.shape[1], scale=float(expected.abs().max()))
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    normed.requires_grad_(True)
    own_logits(model, normed).sum().backward()  # differentiable, as the KL term needs
    assert normed.grad is not None and normed.grad.abs().sum() > 0


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS) + TRANSFORMS)
def test_plain_head_only_where_the_model_adds_nothing(family):
    _skip_unless_available(family)
    assert _plain(tiny_model(family)) == (family not in TRANSFORMS)
    if family == "granite":
        assert _plain(tiny_model(family, logits_scaling=1.0))
    if family == "cohere":
        assert _plain(tiny_model(family, logit_scale=1.0))


@pytest.mark.parametrize("family", TRANSFORMS)
def test_values_match_reference_under_output_transforms(family, monkeypatch):
    _skip_unless_available(family)
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model, kl_factor=1.0)  # the KL term, the one that reads the model's logits, weighs
    ref = reference_zs(model, tok, REQUESTS, hparams, CONTEXT_TEMPLATES)
    fast = values.compute_zs(model, tok, REQUESTS, hparams, hparams.layers[-1], CONTEXT_TEMPLATES)
    rtol = z_rtol(model, hparams, ref.norm(dim=1).min().item())
    assert_close_rel(fast, ref, rtol, dim=1, what="z")
    # The hand formula alone (what ran before head.py) gives another edit: this test can fail.
    monkeypatch.setattr(values, "head_is_plain", lambda *a, **k: True)
    hand = values.compute_zs(model, tok, REQUESTS, hparams, hparams.layers[-1], CONTEXT_TEMPLATES)
    assert ((hand - ref).norm(dim=1) / ref.norm(dim=1)).max() > 100 * rtol


@pytest.mark.parametrize("family", ["gemma2", *TRANSFORMS])
def test_evaluation_scores_use_the_models_logits(family):
    _skip_unless_available(family)
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    (nll, hits), = score_targets(model, tok, ["The mother tongue of Toko Yasuda is"], ["French"])
    prompt = tok("The mother tongue of Toko Yasuda is")["input_ids"]
    answer = tok(" French", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
    log_probs = logits[len(prompt) - 1 : -1].log_softmax(-1)
    expected = -log_probs[torch.arange(len(answer)), torch.tensor(answer)].mean().item()
    assert nll == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert hits == (log_probs.argmax(-1) == torch.tensor(answer)).tolist()
