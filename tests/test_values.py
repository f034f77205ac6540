"""compute_zs (batched, replayed blocks) against the per-request reference.

The z's come out of up to `v_num_grad_steps` Adam steps, so the tolerance is `z_rtol` (conftest):
the per-step gradient rounding amplified by the optimisation. That bound needs every trajectory
to be decided by real gradients, not rounding: `reference_zs` checks it on the reference's own
trajectory (see `check_trajectory`) so that a configuration which breaks it fails loudly here
instead of on some other CPU.
"""

import logging
from contextlib import contextmanager

import pytest
import torch

from alphaedit_fast.reference import compute_z_ref
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for
from alphaedit_fast.values import compute_zs

from .conftest import CONTEXT_TEMPLATES, REQUESTS, assert_close_rel, test_hparams, z_rtol

MORE_REQUESTS = REQUESTS + [
    {"prompt": "{} is located in", "subject": "Paris", "target_new": {"str": "London"}},
    {"prompt": "{} was developed by", "subject": "Apple A5", "target_new": {"str": "Microsoft Google"}},
]


EARLY_STOP_MARGIN = 1e-3  # relative; fast and reference losses differ by ~1e-6 (z_rtol-sized)


@contextmanager
def reference_losses():
    """Collect the reference's (loss, nll) at every step, one list per request, from its debug log."""
    trajectories = []

    class Collect(logging.Handler):
        def emit(self, record):
            step, loss, nll = record.args[:3]
            if step == 0:
                trajectories.append([])
            trajectories[-1].append((loss.detach().item(), nll.detach().item()))

    logger, handler = logging.getLogger("alphaedit_fast.reference.alphaedit"), Collect(logging.DEBUG)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # pytest's capture would format every step's record (tensors with grad)
    logger.addHandler(handler)
    try:
        yield trajectories
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def check_trajectory(losses):
    """The premises of comparing two optimisations step by step, on one request's trajectory.

    1. The rewriting loss (nll) moves after the first step: it depends on delta. Otherwise the
       gradient at delta = 0 is zero in exact arithmetic (the KL term and ||delta|| have zero
       gradient there), i.e. rounding noise, and Adam's first step ~ lr*sign(noise) is random.
    2. No loss lies within EARLY_STOP_MARGIN of the early-stop threshold: there, a rounding-level
       difference decides whether a request stops a step earlier.
    """
    from alphaedit_fast.values import EARLY_STOP_LOSS

    (_, nll0), rest = losses[0], losses[1:]
    if rest:
        assert abs(rest[0][1] - nll0) > 1e-4 * abs(nll0), f"nll does not depend on delta: {losses[:2]}"
    for loss, _ in losses:
        assert abs(loss / EARLY_STOP_LOSS - 1) > EARLY_STOP_MARGIN, f"loss {loss} at the early-stop threshold"


def reference_zs(model, tok, requests, hparams, templates, layer=None):
    """The reference z of each request (n, d), after checking its trajectory's premises."""
    layer = hparams.layers[-1] if layer is None else layer
    with reference_losses() as trajectories:
        zs = torch.stack([compute_z_ref(model, tok, r, hparams, layer, templates) for r in requests])
    assert len(trajectories) == len(requests)
    for losses in trajectories:
        check_trajectory(losses)
    return zs


def assert_zs_match(fast, ref, model, hparams):
    assert fast.shape == ref.shape
    assert_close_rel(fast, ref, z_rtol(model, hparams, ref.norm(dim=1).min().item()), dim=1, what="z")


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_matches_reference(model_and_tok, batch_size):
    model, tok = model_and_tok
    hparams = test_hparams(model)
    fast = compute_zs(model, tok, MORE_REQUESTS, hparams, hparams.layers[-1], CONTEXT_TEMPLATES,
                      batch_size=batch_size)
    ref = reference_zs(model, tok, MORE_REQUESTS, hparams, CONTEXT_TEMPLATES)
    assert fast.shape == ref.shape == (len(MORE_REQUESTS), 64)
    assert_zs_match(fast, ref, model, hparams)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_early_stopped_requests_do_not_move(family, monkeypatch):
    """With a large learning rate some requests stop early; each must match its solo run."""
    import alphaedit_fast.values as values

    rows_run, run = [], values._run_blocks_after

    def spy(*args, **kwargs):
        if torch.is_grad_enabled():  # a step (the probe of fast_steps_exact runs without gradients)
            rows_run.append(len(args[4]))
        return run(*args, **kwargs)

    monkeypatch.setattr(values, "_run_blocks_after", spy)
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model, fact_token="last", v_lr=2.0, v_num_grad_steps=40, clamp_norm_factor=8.0,
                           kl_factor=0.0, v_weight_decay=0.0)
    templates = [["{}"]]
    fast = compute_zs(model, tok, MORE_REQUESTS, hparams, hparams.layers[-1], templates)
    assert rows_run[0] == 2 * len(MORE_REQUESTS) and len(set(rows_run)) > 2  # finished requests left the batch
    ref = reference_zs(model, tok, MORE_REQUESTS, hparams, templates)
    assert_zs_match(fast, ref, model, hparams)


def test_all_requests_stopping_early():
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    hparams = test_hparams(model, fact_token="last", v_lr=5.0, v_num_grad_steps=60, clamp_norm_factor=50.0,
                           kl_factor=0.0, v_weight_decay=0.0)
    fast = compute_zs(model, tok, REQUESTS[:2], hparams, 2, [["{}"]])
    ref = reference_zs(model, tok, REQUESTS[:2], hparams, [["{}"]], layer=2)
    assert_zs_match(fast, ref, model, hparams)


def test_loss_layer_equal_to_z_layer_and_single_template():
    """The loss read at the z layer itself (v_loss_layer below it), with the single template "{}".

    At the z layer the rewriting loss sees delta only where delta is added, so delta sits at a
    position that predicts a target token: fact_token="last". With the default "subject_last"
    the rewriting loss would not depend on delta at all and the KL term and ||delta|| have zero
    gradient at delta = 0: the first gradient is rounding noise, Adam's first step ~ lr*sign(noise)
    is random, and two correct implementations end O(lr) apart. It would also miss the bug this
    test is for, a fast path that reads the loss layer's output before delta is added to it.
    """
    model, tok = tiny_model("qwen2"), tiny_tokenizer_for("qwen2")
    hparams = test_hparams(model, layers=[2, 3], v_loss_layer=0, fact_token="last")  # loss at max(0, 3) = 3
    fast = compute_zs(model, tok, REQUESTS, hparams, 3, [["{}"]])
    ref = reference_zs(model, tok, REQUESTS, hparams, [["{}"]])
    assert_zs_match(fast, ref, model, hparams)


def test_gemma2_softcapped_kl():
    model, tok = tiny_model("gemma2"), tiny_tokenizer_for("gemma2")
    hparams = test_hparams(model, kl_factor=1.0)
    fast = compute_zs(model, tok, REQUESTS, hparams, 2, CONTEXT_TEMPLATES)
    ref = reference_zs(model, tok, REQUESTS, hparams, CONTEXT_TEMPLATES, layer=2)
    assert_zs_match(fast, ref, model, hparams)


def test_model_is_left_as_it_was():
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    layers_before = list(model.model.layers)
    model.train()
    compute_zs(model, tok, REQUESTS, test_hparams(model), 2, CONTEXT_TEMPLATES)
    assert list(model.model.layers) == layers_before  # the stand-ins are gone
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())


def test_bf16_matches_bf16_reference():
    """bf16 z's differ from fp32 ones by a few % on their own; the fast path must track the
    reference run on the same bf16 model.

    Both round every activation to bf16 (u = 2^-8 = 3.9e-3), but different ones (padded batch
    vs one request), so h0 and each gradient differ by a few u: the z_rtol argument with
    eps_g ~ 2u gives 2u * (1 + K*lr*sqrt(d)/||z||) ~ 1.8e-2 at ||z|| ~ 60 (20 steps, lr 0.5,
    d 64). A wrong fast path is off by far more than that."""
    model, tok = tiny_model("llama", dtype=torch.bfloat16), tiny_tokenizer_for("llama")
    hparams = test_hparams(model)
    ref = reference_zs(model, tok, REQUESTS, hparams, CONTEXT_TEMPLATES)
    fast = compute_zs(model, tok, REQUESTS, hparams, 2, CONTEXT_TEMPLATES)
    assert fast.dtype == torch.float32
    assert ((fast - ref).norm(dim=1) / ref.norm(dim=1)).max() < 2e-2


@pytest.mark.parametrize("batch_size", [2, 16])
def test_z_step_token_counts(batch_size):
    """padded / real / suffix token slots of a z step, against a count prompt by prompt."""
    from alphaedit_fast.positions import lookup_positions
    from alphaedit_fast.requests import normalize_requests, target_token_ids
    from alphaedit_fast.suffix import group_by_suffix_length
    from alphaedit_fast.values import FORWARD_COST_TOKENS, z_step_tokens

    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    hparams = test_hparams(model)
    requests = normalize_requests(MORE_REQUESTS)
    expected = {"padded": 0, "real": 0, "suffix": 0, "suffix_padded": 0}
    for start in range(0, len(requests), batch_size):
        lengths, suffixes = [], []
        for r in requests[start : start + batch_size]:
            suffix = tok.decode(target_token_ids(tok, r["target_new"]["str"])[:-1])
            templates = [c.format(r["prompt"]) + suffix for g in CONTEXT_TEMPLATES for c in g] + ["{} is a"]
            for template in templates:
                length = len(tok(template.format(r["subject"]))["input_ids"])
                lengths.append(length)
                suffixes.append(length - lookup_positions(tok, [template], [r["subject"]], hparams.fact_token)[0])
        expected["padded"] += len(lengths) * max(lengths)
        expected["real"] += sum(lengths)
        expected["suffix"] += sum(suffixes)
        groups = group_by_suffix_length(suffixes, FORWARD_COST_TOKENS["cpu"])
        expected["suffix_padded"] += sum(len(g) * max(suffixes[i] for i in g) for g in groups)
    got = z_step_tokens(model, tok, MORE_REQUESTS, hparams, CONTEXT_TEMPLATES, batch_size=batch_size)
    assert got == expected and got["suffix"] <= got["suffix_padded"] < got["real"] < got["padded"]


def test_z_progress_bar_shows_steps_and_loss_and_changes_nothing(capfd):
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    hparams = test_hparams(model, v_num_grad_steps=4)
    quiet = compute_zs(model, tok, REQUESTS, hparams, 2, CONTEXT_TEMPLATES, batch_size=2)
    capfd.readouterr()
    shown = compute_zs(model, tok, REQUESTS, hparams, 2, CONTEXT_TEMPLATES, batch_size=2, progress=True)
    assert torch.equal(quiet, shown)
    err = capfd.readouterr().err
    assert "z 1/2" in err and "z 2/2" in err  # one bar per micro-batch of requests
    # tqdm redraws at most every 0.1 s, so only the final state of each bar is sure to be shown
    assert "4/4 steps" in err and "loss " in err and "active 0/2" in err and "active 0/1" in err


# -- early_stop_top1 (ENCORE's most-probable early stopping) -----------------------------------
def top1_hparams(model, hits):
    """A learning rate at which the tiny models' targets become top-1 well before the last step."""
    extra = {} if hits is None else {"early_stop_top1": hits}
    return test_hparams(model, fact_token="last", v_lr=0.5, v_num_grad_steps=30, clamp_norm_factor=8.0, extra=extra)


def test_early_stop_top1_matches_reference_and_stops(model_and_tok):
    model, tok = model_and_tok
    hparams = top1_hparams(model, 2)
    fast = compute_zs(model, tok, MORE_REQUESTS, hparams, hparams.layers[-1], CONTEXT_TEMPLATES)
    with reference_losses() as trajectories:
        ref = reference_zs(model, tok, MORE_REQUESTS, hparams, CONTEXT_TEMPLATES)
    assert_zs_match(fast, ref, model, hparams)
    # requests stopped by the rule, not by the loss threshold or the step limit
    stopped = [t for t in trajectories if len(t) < hparams.v_num_grad_steps and t[-1][0] >= 5e-2]
    assert stopped, [len(t) for t in trajectories]


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_early_stop_top1_stops_each_request_at_its_nth_top1_evaluation(family, monkeypatch):
    """A request stops at its N-th evaluation with the new target top-1 on every checked prompt:
    one more hit takes later evaluations (more steps), and a stopped request's rows run no more."""
    import alphaedit_fast.values as values

    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    lengths = {}
    for hits in (1, 2, None):
        with reference_losses() as trajectories:
            reference_zs(model, tok, MORE_REQUESTS, top1_hparams(model, hits), CONTEXT_TEMPLATES)
        lengths[hits] = [len(t) for t in trajectories]
    assert all(a <= b <= c for a, b, c in zip(lengths[1], lengths[2], lengths[None]))
    assert lengths[1] != lengths[None]
    rows_run, run = [], values._run_blocks_after

    def spy(*args, **kwargs):
        if torch.is_grad_enabled():
            rows_run.append(len(args[4]))
        return run(*args, **kwargs)

    monkeypatch.setattr(values, "_run_blocks_after", spy)
    hparams = top1_hparams(model, 1)
    compute_zs(model, tok, MORE_REQUESTS, hparams, hparams.layers[-1], CONTEXT_TEMPLATES, batch_size=16)
    rows_per_request = sum(len(group) for group in CONTEXT_TEMPLATES) + 1
    # each request's rows run once per evaluation it made, as in the reference
    assert sum(rows_run) == rows_per_request * sum(lengths[1])


def test_early_stop_top1_off_is_the_original_loop(model_and_tok):
    model, tok = model_and_tok
    absent = top1_hparams(model, None)
    assert "early_stop_top1" not in absent.to_dict()
    none = top1_hparams(model, None)
    none.extra["early_stop_top1"] = None
    a = compute_zs(model, tok, MORE_REQUESTS, absent, absent.layers[-1], CONTEXT_TEMPLATES)
    b = compute_zs(model, tok, MORE_REQUESTS, none, none.layers[-1], CONTEXT_TEMPLATES)
    assert torch.equal(a, b)


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "2"])
def test_early_stop_top1_must_be_a_positive_int(value):
    from alphaedit_fast.errors import HyperParamsError

    model = tiny_model("gpt2")
    with pytest.raises(HyperParamsError, match="early_stop_top1 must be a positive int"):
        test_hparams(model, extra={"early_stop_top1": value})
