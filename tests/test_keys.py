"""Shared key passes (issue 12, item 2): keys read in the z pass, passes restarted at an edited
block, compared with key passes from the embeddings and with the reference edit."""

import pytest
import torch

from alphaedit_fast import apply_AlphaEdit_to_model
from alphaedit_fast.arch import get_module
from alphaedit_fast.keys import KeyPasses, compute_keys
from alphaedit_fast.requests import normalize_requests, target_token_ids
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for
from alphaedit_fast.values import optimise_zs_and_keys

from .conftest import (
    CONTEXT_TEMPLATES,
    REQUESTS,
    assert_close_rel,
    forward_accumulation_length,
    identity_projector,
    test_hparams,
    tolerance,
)
from .test_values import MORE_REQUESTS


def forward_rtol(model, blocks: int) -> float:
    """Two forward passes over the same tokens in differently shaped batches."""
    return 2 * tolerance(torch.float32, forward_accumulation_length(model, blocks))[0]


def block_calls(model, hparams) -> list[int]:
    """Forward calls of each real block, counted by pre-hooks on the blocks themselves (a
    stand-in that replays a cached tensor in a block's place does not count)."""
    container = get_module(model, hparams.layer_module_tmp.format("")[:-1])
    calls = [0] * len(container)
    for index, block in enumerate(container):
        block.register_forward_pre_hook(lambda module, args, index=index: calls.__setitem__(index, calls[index] + 1))
    return calls


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_restarted_pass_matches_a_pass_from_the_embeddings(family):
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model, layers=[1, 2, 3])
    requests = normalize_requests(MORE_REQUESTS)
    passes = KeyPasses(model, tok, requests, hparams, CONTEXT_TEMPLATES, with_z_output=True, batch_size=4)
    passes.read([1], with_z_output=True, keep_inputs_of=[1])
    with torch.no_grad():  # an edit of layer 1 changes nothing before block 1
        get_module(model, hparams.rewrite_module_tmp.format(1)).weight.mul_(1.5)
    calls = block_calls(model, hparams)
    (resumed,), resumed_z = passes.read([2], with_z_output=True, resume_at=1, keep_inputs_of=[2])
    assert calls[0] == 0 and calls[1] == len(passes.batches)  # started at block 1
    (fresh,), fresh_z = compute_keys(model, tok, requests, hparams, [2], CONTEXT_TEMPLATES, with_z_output=True)
    assert_close_rel(resumed, fresh, forward_rtol(model, 3), dim=1, what="keys")
    assert_close_rel(resumed_z, fresh_z, forward_rtol(model, 4), dim=1, what="z output")
    assert 2 in passes.block_inputs and 1 in passes.block_inputs
    passes.drop_input(1)
    assert list(passes.block_inputs) == [2]


@pytest.mark.parametrize("fact_token", ["subject_last", "last"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_keys_read_in_the_z_pass(family, fact_token):
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model, fact_token=fact_token)
    requests = normalize_requests(REQUESTS + [
        {"prompt": "{} is located in", "subject": "Paris", "target_new": {"str": "London"}},
        {"prompt": "The mother tongue of {} is", "subject": "Toko Yasuda", "target_new": {"str": "French"}}])
    # With "last" the z prompt's lookup position moves onto the target's tokens, unless it has one.
    single_token = [r for r in requests if len(target_token_ids(tok, r["target_new"]["str"])) == 1]
    usable = requests if fact_token == "subject_last" else single_token
    assert usable
    _, keys, z_out = optimise_zs_and_keys(model, tok, usable, hparams, 2, CONTEXT_TEMPLATES, key_layer=1)
    (expected,), expected_z = compute_keys(model, tok, usable, hparams, [1], CONTEXT_TEMPLATES, with_z_output=True)
    assert_close_rel(keys, expected, forward_rtol(model, 2), dim=1, what="keys")
    assert_close_rel(z_out, expected_z, forward_rtol(model, 3), dim=1, what="z output")


def test_keys_not_read_in_the_z_pass_when_prompts_differ():
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    multi = [{"prompt": "{} was developed by", "subject": "Apple A5", "target_new": {"str": "Microsoft Google"}}]
    hparams = test_hparams(model, fact_token="last")  # the lookup moves onto the target's first token
    assert optimise_zs_and_keys(model, tok, multi, hparams, 2, CONTEXT_TEMPLATES, key_layer=1)[1:] == (None, None)
    no_plain = [["The first thing. {}", "Because. {}"]]  # no "{}" prompt to read z outputs at
    assert optimise_zs_and_keys(model, tok, REQUESTS, test_hparams(model), 2, no_plain, key_layer=1)[1:] == (None, None)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_an_edit_runs_block_0_twice(family):
    """Three edited layers: block 0 runs in the z pass and in the second layer's key pass; the
    first layer's keys come from the z pass, every later pass restarts at an edited block.
    (The once-per-model checks run before counting: the probe of the fast value steps and the
    forward that checks the blocks run once each.)"""
    from alphaedit_fast.requests import normalize_requests
    from alphaedit_fast.validation import check_block_calls
    from alphaedit_fast.values import fast_steps_exact

    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model, layers=[1, 2, 3])
    assert fast_steps_exact(model, tok, normalize_requests(REQUESTS), hparams, 3, CONTEXT_TEMPLATES,
                            suffix_only=True, packed=True)
    check_block_calls(model, hparams.layer_module_tmp)
    calls = block_calls(model, hparams)
    apply_AlphaEdit_to_model(model, tok, REQUESTS, hparams, P=identity_projector(hparams),
                             context_templates=CONTEXT_TEMPLATES)
    assert calls[0] == 2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_four_edited_layers_match_the_reference(family):
    """Later key passes and the cache update restart at edited blocks: updates and cache as the
    reference's, with four edited layers of six (so passes restart past a block whose input
    they must not overwrite)."""
    import copy

    from alphaedit_fast.reference import apply_alphaedit_ref

    from .conftest import edit_rtol
    from .test_engine import random_projector, rewrite_weights

    blocks = {"gpt2": dict(n_layer=6), "llama": dict(num_hidden_layers=6)}[family]
    model, tok = tiny_model(family, **blocks), tiny_tokenizer_for(family)
    hparams = test_hparams(model, L2=10.0, layers=[1, 2, 3, 4])
    P, cache = random_projector(hparams), 0.01 * torch.eye(160).repeat(4, 1, 1)
    ref_model, before = copy.deepcopy(model), [w.clone() for w in rewrite_weights(model, hparams)]
    _, new_cache = apply_AlphaEdit_to_model(model, tok, REQUESTS, hparams, cache_c=cache, P=P,
                                            context_templates=CONTEXT_TEMPLATES)
    updates, ref_cache = apply_alphaedit_ref(ref_model, tok, REQUESTS, hparams, CONTEXT_TEMPLATES, P, cache)
    rtol = edit_rtol(model, tok, REQUESTS, hparams)
    for w0, w, layer in zip(before, rewrite_weights(model, hparams), hparams.layers):
        assert_close_rel(w - w0, updates[layer], rtol, what=f"update of layer {layer}")
    assert_close_rel(new_cache, ref_cache, rtol, what="cache")
