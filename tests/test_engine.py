"""apply_AlphaEdit_to_model on tiny models of every family: effect, exactness, errors."""

import copy

import pytest
import torch

from alphaedit_fast import (
    InvalidRequestError,
    ModelStructureError,
    NonFiniteError,
    ShapeError,
    apply_AlphaEdit_to_model,
    compute_ks,
    get_module_input_output_at_words,
)
from alphaedit_fast.arch import get_module
from alphaedit_fast.reference import apply_alphaedit_ref, compute_ks_ref, module_reprs_at_words_ref
from alphaedit_fast.reference.alphaedit import compute_z_ref

from .conftest import (
    CONTEXT_TEMPLATES,
    REQUESTS,
    UNIT_ROUNDOFF,
    assert_close_rel,
    edit_rtol,
    forward_accumulation_length,
    identity_projector,
    test_hparams,
    tolerance,
)


def target_logprob(model, tok, request):
    """log p(target | filled prompt) summed over the target's tokens."""
    prompt_ids = tok(request["prompt"].format(request["subject"]))["input_ids"]
    target = request["target_new"]["str"]
    target_ids = [t for t in tok(" " + target.strip())["input_ids"] if t != tok.bos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + target_ids[:-1]])).logits.log_softmax(-1)[0]
    return sum(logits[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(target_ids))


def rewrite_weights(model, hparams):
    return [get_module(model, hparams.rewrite_module_tmp.format(l)).weight.detach().clone() for l in hparams.layers]


def random_projector(hparams, d_k=160, rank=100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d_k, rank, generator=gen))[0]
    return (basis @ basis.T).repeat(len(hparams.layers), 1, 1)


def test_edit_raises_target_probability(model_and_tok, requests_):
    model, tok = model_and_tok
    hparams = test_hparams(model, fact_token="last")
    before = [target_logprob(model, tok, r) for r in requests_]
    apply_AlphaEdit_to_model(model, tok, requests_, hparams, P=identity_projector(hparams),
                             context_templates=CONTEXT_TEMPLATES)
    after = [target_logprob(model, tok, r) for r in requests_]
    for b, a in zip(before, after):
        assert a > b + 2.0, (before, after)  # at least 7x more likely


def test_subject_edit_writes_z_at_the_subject(model_and_tok, requests_):
    """With P = I, a small L2 and only the plain prompt as context, the edited block-L output
    at the subject's last token is the optimised z."""
    model, tok = model_and_tok
    hparams = test_hparams(model, L2=1e-4)
    plain = [["{}"]]
    z_block = hparams.layer_module_tmp.format(hparams.layers[-1])
    prompts, subjects = [r["prompt"] for r in requests_], [r["subject"] for r in requests_]
    zs = torch.stack([compute_z_ref(model, tok, r, hparams, hparams.layers[-1], plain) for r in requests_])
    start = module_reprs_at_words_ref(model, tok, prompts, subjects, z_block, hparams.fact_token, "out")
    apply_AlphaEdit_to_model(model, tok, requests_, hparams, P=identity_projector(hparams), context_templates=plain)
    reached = module_reprs_at_words_ref(model, tok, prompts, subjects, z_block, hparams.fact_token, "out")
    remaining = (reached - zs).norm(dim=1) / (start - zs).norm(dim=1)
    assert remaining.max() < 1e-2, remaining


def test_matches_reference(model_and_tok, requests_):
    model, tok = model_and_tok
    hparams = test_hparams(model, L2=10.0)  # the original's L2; smaller values amplify fp32 noise
    P = random_projector(hparams)
    cache = 0.01 * torch.eye(160).repeat(len(hparams.layers), 1, 1)
    rtol = edit_rtol(model, tok, requests_, hparams)
    ref_model = copy.deepcopy(model)
    before = rewrite_weights(model, hparams)
    _, new_cache = apply_AlphaEdit_to_model(model, tok, requests_, hparams, cache_c=cache, P=P,
                                            context_templates=CONTEXT_TEMPLATES)
    updates, ref_cache = apply_alphaedit_ref(ref_model, tok, requests_, hparams, CONTEXT_TEMPLATES, P, cache)
    for b, w, layer in zip(before, rewrite_weights(model, hparams), hparams.layers):
        ref_upd = updates[layer]
        assert ref_upd.norm() > 0
        assert ((w - b) - ref_upd).norm() / ref_upd.norm() < rtol
    # the cache sums keys of the edited models, which differ by the updates' difference
    assert (new_cache - ref_cache).norm() / ref_cache.norm() < rtol


def test_keys_and_layer_outputs_match_reference(model_and_tok, requests_):
    model, tok = model_and_tok
    hparams = test_hparams(model)
    fast = compute_ks(model, tok, requests_, hparams, 1, CONTEXT_TEMPLATES)
    ref = compute_ks_ref(model, tok, requests_, hparams, 1, CONTEXT_TEMPLATES)
    assert fast.shape == (len(requests_), 160)
    # keys of layer 1: the input of its down projection, two blocks deep
    rtol, atol = tolerance(torch.float32, forward_accumulation_length(model, blocks=2), scale=ref.abs().max().item())
    torch.testing.assert_close(fast, ref, rtol=rtol, atol=atol)
    prompts, subjects = [r["prompt"] for r in requests_], [r["subject"] for r in requests_]
    _, out = get_module_input_output_at_words(model, tok, 2, prompts, subjects, hparams.layer_module_tmp,
                                             "subject_last", batch_size=2)
    ref_out = module_reprs_at_words_ref(model, tok, prompts, subjects, hparams.layer_module_tmp.format(2),
                                        "subject_last", "out")
    # batched (padded) and one-by-one forwards differ by fp32 rounding only: three blocks deep
    rtol, atol = tolerance(torch.float32, forward_accumulation_length(model, blocks=3),
                           scale=ref_out.abs().max().item())
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_zero_projector_changes_nothing(family, requests_):
    from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model)
    before = copy.deepcopy(model.state_dict())
    P = torch.zeros(len(hparams.layers), 160, 160)
    apply_AlphaEdit_to_model(model, tok, requests_, hparams, P=P, context_templates=CONTEXT_TEMPLATES)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_sequential_edits_accumulate_cache(family):
    from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model)
    P = random_projector(hparams)
    _, cache1 = apply_AlphaEdit_to_model(model, tok, REQUESTS[:2], hparams, P=P, context_templates=CONTEXT_TEMPLATES)
    keys1 = [compute_ks(model, tok, REQUESTS[:2], hparams, l, CONTEXT_TEMPLATES) for l in hparams.layers]
    _, cache2 = apply_AlphaEdit_to_model(model, tok, REQUESTS[2:], hparams, cache_c=cache1, P=P,
                                         context_templates=CONTEXT_TEMPLATES)
    keys2 = [compute_ks(model, tok, REQUESTS[2:], hparams, l, CONTEXT_TEMPLATES) for l in hparams.layers]
    assert cache1.norm() > 0
    for i in range(len(hparams.layers)):
        # keys1 were read after the first edit, as the cache update of the first call reads them.
        # Keys agree to the forward pass's rounding (relative to |k_i||k_j|), and the difference of
        # the two caches loses a rounding of cache2 itself.
        rtol, _ = tolerance(torch.float32, forward_accumulation_length(model, blocks=hparams.layers[i] + 1))
        k = keys2[i].abs()
        atol = 2 * rtol * (k.T @ k).max().item() + 4 * UNIT_ROUNDOFF[torch.float32] * cache2[i].abs().max().item()
        torch.testing.assert_close(cache2[i] - cache1[i], keys2[i].T @ keys2[i], rtol=rtol, atol=atol)
        # the second edit lies in the null space, so the first batch's keys barely moved
        # (the cache from the first call still matches them).
        torch.testing.assert_close(cache1[i], keys1[i].T @ keys1[i], rtol=1e-2, atol=1e-3)


def test_inputs_are_not_mutated(requests_):
    from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    hparams = test_hparams(model)
    P, cache = random_projector(hparams), torch.zeros(len(hparams.layers), 160, 160)
    snapshot = copy.deepcopy((requests_, hparams, P, cache, CONTEXT_TEMPLATES))
    _, new_cache = apply_AlphaEdit_to_model(model, tok, requests_, hparams, cache_c=cache, P=P,
                                            context_templates=CONTEXT_TEMPLATES)
    assert new_cache is not cache and new_cache.norm() > 0
    assert requests_ == snapshot[0] and hparams == snapshot[1] and CONTEXT_TEMPLATES == snapshot[4]
    assert torch.equal(P, snapshot[2]) and torch.equal(cache, snapshot[3])
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the edit


def _bad(requests, index, **change):
    bad = copy.deepcopy(requests)
    bad[index].update(change)
    return bad


@pytest.mark.parametrize(
    "make_args, error, message",
    [
        (lambda r, h: dict(requests=_bad(r, 1, prompt="Toko Yasuda plays the")), InvalidRequestError, "exactly one"),
        (lambda r, h: dict(requests=_bad(r, 1, prompt="{} plays {}")), InvalidRequestError, "exactly one"),
        (lambda r, h: dict(requests=_bad(r, 2, subject="")), InvalidRequestError, "subject"),
        (lambda r, h: dict(requests=_bad(r, 0, target_new={"str": "  "})), InvalidRequestError, "target_new"),
        (lambda r, h: dict(requests=[]), InvalidRequestError, "no requests"),
        (lambda r, h: dict(hparams=test_hparams_for_layers(h, [1, 9])), ModelStructureError, "layers.9"),
        (lambda r, h: dict(P=torch.zeros(2, 64, 64)), ShapeError, "P must have shape"),
        (lambda r, h: dict(cache_c=torch.zeros(3, 160, 160)), ShapeError, "cache_c"),
        (lambda r, h: dict(P=torch.full((2, 160, 160), float("nan"))), NonFiniteError, "P"),
        (lambda r, h: dict(cache_c=torch.full((2, 160, 160), float("inf"))), NonFiniteError, "cache_c"),
        (lambda r, h: dict(context_templates=[["no slot"]]), InvalidRequestError, "exactly one"),
    ],
)
def test_bad_input_raises_and_changes_nothing(make_args, error, message, requests_):
    from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    hparams = test_hparams(model)
    args = dict(requests=requests_, hparams=hparams, P=identity_projector(hparams), context_templates=CONTEXT_TEMPLATES)
    args.update(make_args(requests_, hparams))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        apply_AlphaEdit_to_model(model, tok, **args)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_hparams_for_layers(hparams, layers):
    return type(hparams).from_dict({**hparams.to_dict(), "layers": layers})


test_hparams_for_layers.__test__ = False


@pytest.mark.parametrize("solver, solve_function", [("dense", "dense_update"), ("auto", "projected_update")])
def test_failure_mid_edit_restores_every_weight(monkeypatch, requests_, solver, solve_function):
    from alphaedit_fast import solve
    from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    hparams = test_hparams(model)
    real_update, calls = getattr(solve, solve_function), []

    def update_then_nan(*args, **kwargs):
        calls.append(1)
        upd = real_update(*args, **kwargs)
        return upd if len(calls) == 1 else upd * float("nan")  # the second layer's solve fails

    P = identity_projector(hparams)
    if solver == "auto":  # the first calls with a P solve densely; the next one factors P
        from alphaedit_fast.editor import DENSE_CALLS_BEFORE_FACTORING

        for _ in range(DENSE_CALLS_BEFORE_FACTORING):
            apply_AlphaEdit_to_model(copy.deepcopy(model), tok, requests_, hparams, P=P,
                                     context_templates=CONTEXT_TEMPLATES)
    monkeypatch.setattr(solve, solve_function, update_then_nan)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NonFiniteError, match="layer 2"):
        apply_AlphaEdit_to_model(model, tok, requests_, hparams, P=P, context_templates=CONTEXT_TEMPLATES,
                                 solver=solver)
    assert len(calls) == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_z_cache_files_round_trip(tmp_path, requests_, monkeypatch):
    """The second edit reads every z from the files and optimises none. Its first layer's keys
    come from a key pass, not from the z pass, so the updates agree to rounding, not bit for bit."""
    import alphaedit_fast.editor as editor
    from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    hparams = test_hparams(model)
    template = str(tmp_path / "z" / "layer_{}_clamp_{}_case_{}.npz")
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    apply_AlphaEdit_to_model(first, tok, requests_, hparams, cache_template=template, P=identity_projector(hparams),
                             context_templates=CONTEXT_TEMPLATES)
    assert len(list((tmp_path / "z").glob("*.npz"))) == len(requests_)
    monkeypatch.setattr(editor, "optimise_zs_and_keys", lambda *a, **k: pytest.fail("z optimised again"))
    apply_AlphaEdit_to_model(second, tok, requests_, hparams, cache_template=template, P=identity_projector(hparams),
                             context_templates=CONTEXT_TEMPLATES)
    rtol = edit_rtol(model, tok, requests_, hparams)
    weights = zip(rewrite_weights(first, hparams), rewrite_weights(second, hparams), rewrite_weights(model, hparams))
    for a, b, before in weights:
        assert_close_rel(b - before, a - before, rtol, what="update")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_token_subject_after_a_space_edits(family):
    """In "The a. {}" the prefix's trailing space merges with " Paris": the subject adds no token."""
    from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model, L2=10.0)
    requests = [{"prompt": "{} is located in", "subject": "Paris", "target_new": {"str": "London"}}]
    rtol = edit_rtol(model, tok, requests, hparams)
    ref_model = copy.deepcopy(model)
    before = rewrite_weights(model, hparams)
    apply_AlphaEdit_to_model(model, tok, requests, hparams, P=identity_projector(hparams),
                             context_templates=CONTEXT_TEMPLATES)
    updates, _ = apply_alphaedit_ref(ref_model, tok, requests, hparams, CONTEXT_TEMPLATES,
                                     identity_projector(hparams), torch.zeros(2, 160, 160))
    for b, w, layer in zip(before, rewrite_weights(model, hparams), hparams.layers):
        assert updates[layer].norm() > 0
        assert ((w - b) - updates[layer]).norm() / updates[layer].norm() < rtol


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_null_space_solve_of_the_original_api_matches_dense(family, requests_, monkeypatch):
    """solver="auto" solves the first DENSE_CALLS_BEFORE_FACTORING calls with a P densely, then
    factors P = U U^T once and solves in the null space: the same updates as the original's dense form."""
    from alphaedit_fast import editor
    from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

    factorisations, factor = [], editor.basis_from_projector
    monkeypatch.setattr(editor, "basis_from_projector", lambda *a, **k: factorisations.append(1) or factor(*a, **k))
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model, L2=10.0)
    P = random_projector(hparams)
    # the two solves differ by rounding; the second batch's z's then start from models that
    # differ by it and the optimisation amplifies it like any gradient rounding (edit_rtol)
    rtol = edit_rtol(model, tok, requests_, hparams)
    dense_model = copy.deepcopy(model)
    cache_auto = cache_dense = None
    batches = [[r] for r in requests_ * 2]
    for index, batch in enumerate(batches):
        _, cache_auto = apply_AlphaEdit_to_model(model, tok, batch, hparams, cache_c=cache_auto, P=P,
                                                 context_templates=CONTEXT_TEMPLATES)
        _, cache_dense = apply_AlphaEdit_to_model(dense_model, tok, batch, hparams, cache_c=cache_dense, P=P,
                                                  context_templates=CONTEXT_TEMPLATES, solver="dense")
        # the first calls solve densely (factoring costs several dense solves), the next one factors
        factored = index >= editor.DENSE_CALLS_BEFORE_FACTORING
        assert len(factorisations) == (len(hparams.layers) if factored else 0)
    assert len(batches) >= editor.DENSE_CALLS_BEFORE_FACTORING + 2  # so that a call reuses the factors
    for a, b in zip(rewrite_weights(model, hparams), rewrite_weights(dense_model, hparams)):
        assert (a - b).norm() / b.norm() < rtol
    assert (cache_auto - cache_dense).norm() / cache_dense.norm() < rtol


def test_a_non_projector_P_is_refused(requests_):
    """The original's P is always U U^T; anything else (a covariance, a scaled P) is a mistake."""
    from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

    model, tok = tiny_model("qwen2"), tiny_tokenizer_for("qwen2")
    hparams = test_hparams(model, L2=10.0)
    for solver in ("auto", "dense"):
        with pytest.raises(ShapeError, match="not a symmetric idempotent projector"):
            apply_AlphaEdit_to_model(model, tok, requests_, hparams, P=0.5 * identity_projector(hparams),
                                     context_templates=CONTEXT_TEMPLATES, solver=solver)
