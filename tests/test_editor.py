"""AlphaEditor (factored projector, projected solve) against the reference, over batches."""

import copy

import pytest
import torch

from alphaedit_fast import AlphaEditor, ShapeError, apply_AlphaEdit_to_model, nullspace_basis
from alphaedit_fast.reference import apply_alphaedit_ref
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

from .conftest import CONTEXT_TEMPLATES, REQUESTS, edit_rtol, test_hparams
from .test_engine import rewrite_weights

BATCHES = [REQUESTS[:2], REQUESTS[2:] + [{"prompt": "{} is located in", "subject": "Paris",
                                         "target_new": {"str": "London"}}]]


def key_covariance_bases(hparams, d_k=160, rank=110, seed=0):
    """Null-space bases of a random low-rank covariance, one per layer."""
    gen = torch.Generator().manual_seed(seed)
    bases = []
    for _ in hparams.layers:
        x = torch.randn(rank, d_k, generator=gen)
        bases.append(nullspace_basis(x.T @ x / rank, 1e-4))
    return bases


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("solver", ["cholesky", "woodbury"])
def test_sequential_batches_match_reference(model_and_tok, solver):
    model, tok = model_and_tok
    hparams = test_hparams(model, L2=10.0)
    bases = key_covariance_bases(hparams)
    assert bases[0].shape == (160, 50)
    P = torch.stack([u @ u.T for u in bases])
    rtol = edit_rtol(model, tok, [r for batch in BATCHES for r in batch], hparams)
    ref_model, cache = copy.deepcopy(model), torch.zeros(len(hparams.layers), 160, 160)
    editor = AlphaEditor(model, tok, hparams, projector=bases, context_templates=CONTEXT_TEMPLATES, solver=solver)
    for batch in BATCHES:
        before = rewrite_weights(model, hparams)
        editor.edit(batch)
        updates, cache = apply_alphaedit_ref(ref_model, tok, batch, hparams, CONTEXT_TEMPLATES, P, cache)
        for b, w, layer in zip(before, rewrite_weights(model, hparams), hparams.layers):
            expected = updates[layer]
            assert expected.norm() > 0
            assert relative(w - b, expected) < rtol, (layer, relative(w - b, expected))
    assert relative(editor.dense_cache(), P @ cache @ P) < rtol  # the part of the cache that matters
    assert editor.num_edits == 4


def test_dense_projector_is_factored_and_agrees_with_the_original_api():
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    hparams = test_hparams(model, L2=10.0)
    bases = key_covariance_bases(hparams)
    P = torch.stack([u @ u.T for u in bases])
    # same z's for the first batch; the solves differ by rounding, which the second batch's z
    # optimisation amplifies like gradient rounding (edit_rtol)
    rtol = edit_rtol(model, tok, [r for batch in BATCHES for r in batch], hparams)
    dense_model = copy.deepcopy(model)
    editor = AlphaEditor(model, tok, hparams, projector=P, context_templates=CONTEXT_TEMPLATES)
    assert [u.shape[1] for u in editor.solver.bases] == [50, 50]
    cache = None
    for batch in BATCHES:
        editor.edit(batch)
        _, cache = apply_AlphaEdit_to_model(dense_model, tok, batch, hparams, cache_c=cache, P=P,
                                            context_templates=CONTEXT_TEMPLATES)
    for a, b in zip(rewrite_weights(model, hparams), rewrite_weights(dense_model, hparams)):
        assert relative(a, b) < rtol
    assert relative(editor.dense_cache(), P @ cache @ P) < rtol


def test_starting_cache_and_timings():
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    hparams = test_hparams(model, L2=10.0)
    bases = key_covariance_bases(hparams)
    P = torch.stack([u @ u.T for u in bases])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 20, 160, generator=gen)
    cache = x.transpose(1, 2) @ x
    rtol = edit_rtol(model, tok, REQUESTS, hparams)
    ref_model = copy.deepcopy(model)
    editor = AlphaEditor(model, tok, hparams, projector=bases, cache_c=cache, context_templates=CONTEXT_TEMPLATES)
    before = rewrite_weights(model, hparams)
    timings = editor.edit(REQUESTS)
    assert set(timings) == {"z", "keys", "solve", "cache update"} and all(t > 0 for t in timings.values())
    updates, _ = apply_alphaedit_ref(ref_model, tok, REQUESTS, hparams, CONTEXT_TEMPLATES, P, cache)
    for b, w, layer in zip(before, rewrite_weights(model, hparams), hparams.layers):
        assert relative(w - b, updates[layer]) < rtol


def test_bf16_model_matches_reference_on_the_same_bf16_model(family):
    model, tok = tiny_model(family, dtype=torch.bfloat16), tiny_tokenizer_for(family)
    hparams = test_hparams(model, L2=10.0)
    bases = key_covariance_bases(hparams)
    P = torch.stack([u @ u.T for u in bases])
    ref_model = copy.deepcopy(model)
    before = rewrite_weights(model, hparams)
    AlphaEditor(model, tok, hparams, projector=bases, context_templates=CONTEXT_TEMPLATES).edit(REQUESTS)
    updates, _ = apply_alphaedit_ref(ref_model, tok, REQUESTS, hparams, CONTEXT_TEMPLATES, P,
                                     torch.zeros(2, 160, 160))
    assert all(w.dtype == torch.bfloat16 for w in rewrite_weights(model, hparams))
    # bf16 z's agree to ~5 bf16 roundings, 5u with u = 2^-8 (test_values.test_bf16_matches_bf16_reference);
    # keys and the fp32 solve add little. The update is read back as w - b with w = bf16(b + update): w's
    # rounding (2^-9 |w| per element) is relative to the weight, not to the update, so it adds
    # 2^-9 ||w|| / ||update|| (0.006-0.008 on these models, whose updates are 1/3-1/5 of the weights),
    # and the reference update's own cast to bf16 adds 2^-9.
    u = 2.0**-8
    for b, w, layer in zip(before, rewrite_weights(model, hparams), hparams.layers):
        expected = updates[layer].to(torch.bfloat16).float()
        rounding = u / 2 * (w.float().norm() / expected.norm()).item() + u / 2
        assert relative((w.float() - b.float()), expected) < 5 * u + rounding


def test_bad_projectors():
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    hparams = test_hparams(model)
    with pytest.raises(ShapeError):
        AlphaEditor(model, tok, hparams, projector=[torch.zeros(64, 3)] * 2, context_templates=CONTEXT_TEMPLATES)
    with pytest.raises(ShapeError):
        AlphaEditor(model, tok, hparams, projector=torch.zeros(3, 160, 160), context_templates=CONTEXT_TEMPLATES)


@pytest.mark.parametrize("family, warned", [("gemma2", True), ("gemma", False), ("llama", False)])
def test_a_normalised_mlp_output_is_warned_about(family, warned):
    """Gemma 2/3 put a norm between the MLP output and the residual stream, which AlphaEdit's update
    does not model: the editor says so once, naming the layers."""
    import warnings as w

    from alphaedit_fast import AlphaEditHyperParams
    from alphaedit_fast.errors import NormalisedMLPOutputWarning

    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = AlphaEditHyperParams.for_model(model, layers=[1, 2])
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        AlphaEditor(model, tok, hparams, context_templates=[["{}"]])
    found = [c for c in caught if issubclass(c.category, NormalisedMLPOutputWarning)]
    assert len(found) == (1 if warned else 0)
    if warned:
        assert "layers [1, 2]" in str(found[0].message) and "post_feedforward_layernorm" in str(found[0].message)
