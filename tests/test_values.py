"""compute_zs (batched, replayed blocks) against the per-request reference."""

import pytest
import torch

from alphaedit_fast.reference import compute_z_ref
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for
from alphaedit_fast.values import compute_zs

from .conftest import CONTEXT_TEMPLATES, REQUESTS, test_hparams

MORE_REQUESTS = REQUESTS + [
    {"prompt": "{} is located in", "subject": "Paris", "target_new": {"str": "London"}},
    {"prompt": "{} was developed by", "subject": "Apple A5", "target_new": {"str": "Microsoft Google"}},
]


def reference_zs(model, tok, requests, hparams, templates):
    return torch.stack([compute_z_ref(model, tok, r, hparams, hparams.layers[-1], templates) for r in requests])


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_matches_reference(model_and_tok, batch_size):
    model, tok = model_and_tok
    hparams = test_hparams(model)
    fast = compute_zs(model, tok, MORE_REQUESTS, hparams, hparams.layers[-1], CONTEXT_TEMPLATES,
                      batch_size=batch_size)
    ref = reference_zs(model, tok, MORE_REQUESTS, hparams, CONTEXT_TEMPLATES)
    assert fast.shape == ref.shape == (len(MORE_REQUESTS), 64)
    err = (fast - ref).norm(dim=1) / ref.norm(dim=1)
    assert err.max() < 1e-5, err


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_early_stopped_requests_do_not_move(family, monkeypatch):
    """With a large learning rate some requests stop early; each must match its solo run."""
    import alphaedit_fast.values as values

    rows_run, run = [], values._run_blocks_after
    monkeypatch.setattr(values, "_run_blocks_after", lambda *a, **k: rows_run.append(len(a[4])) or run(*a, **k))
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model, fact_token="last", v_lr=2.0, v_num_grad_steps=40, clamp_norm_factor=8.0,
                           kl_factor=0.0, v_weight_decay=0.0)
    templates = [["{}"]]
    fast = compute_zs(model, tok, MORE_REQUESTS, hparams, hparams.layers[-1], templates)
    assert rows_run[0] == 2 * len(MORE_REQUESTS) and len(set(rows_run)) > 2  # finished requests left the batch
    ref = reference_zs(model, tok, MORE_REQUESTS, hparams, templates)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_all_requests_stopping_early():
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    hparams = test_hparams(model, fact_token="last", v_lr=5.0, v_num_grad_steps=60, clamp_norm_factor=50.0,
                           kl_factor=0.0, v_weight_decay=0.0)
    fast = compute_zs(model, tok, REQUESTS[:2], hparams, 2, [["{}"]])
    ref = reference_zs(model, tok, REQUESTS[:2], hparams, [["{}"]])
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_loss_layer_equal_to_z_layer_and_single_template():
    model, tok = tiny_model("qwen2"), tiny_tokenizer_for("qwen2")
    hparams = test_hparams(model, layers=[2, 3], v_loss_layer=0)  # loss read at max(0, 3) = the z layer
    fast = compute_zs(model, tok, REQUESTS, hparams, 3, [["{}"]])
    ref = reference_zs(model, tok, REQUESTS, hparams, [["{}"]])
    assert ((fast - ref).norm(dim=1) / ref.norm(dim=1)).max() < 1e-5


def test_gemma2_softcapped_kl():
    model, tok = tiny_model("gemma2"), tiny_tokenizer_for("gemma2")
    hparams = test_hparams(model, kl_factor=1.0)
    fast = compute_zs(model, tok, REQUESTS, hparams, 2, CONTEXT_TEMPLATES)
    ref = reference_zs(model, tok, REQUESTS, hparams, CONTEXT_TEMPLATES)
    assert ((fast - ref).norm(dim=1) / ref.norm(dim=1)).max() < 1e-5


def test_model_is_left_as_it_was():
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    layers_before = list(model.model.layers)
    model.train()
    compute_zs(model, tok, REQUESTS, test_hparams(model), 2, CONTEXT_TEMPLATES)
    assert list(model.model.layers) == layers_before  # the stand-ins are gone
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())


def test_bf16_matches_bf16_reference():
    """bf16 z's differ from fp32 ones by a few % on their own; the fast path must track the
    reference run on the same bf16 model."""
    model, tok = tiny_model("llama", dtype=torch.bfloat16), tiny_tokenizer_for("llama")
    hparams = test_hparams(model)
    ref = reference_zs(model, tok, REQUESTS, hparams, CONTEXT_TEMPLATES)
    fast = compute_zs(model, tok, REQUESTS, hparams, 2, CONTEXT_TEMPLATES)
    assert fast.dtype == torch.float32
    assert ((fast - ref).norm(dim=1) / ref.norm(dim=1)).max() < 2e-2
