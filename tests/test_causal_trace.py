"""Causal tracing (`alphaedit_fast.causal_trace`, `alphaedit-fast trace`) on tiny models of every family.

Tolerances: a restored row runs in a batch of other rows, the clean run alone; the two forward
passes sum the same terms in other orders, so their logits differ by at most rtol * (the sum of
the logit's |terms|, bounded by ||ln_f(h)|| * ||head row||, Cauchy-Schwarz), and log-probabilities
by twice that (the log-sum-exp moves by at most the largest logit error).
"""

import json
import math

import pytest
import torch

from alphaedit_fast.causal_trace import (
    TOKEN_GROUPS,
    CausalTracer,
    recommend_layers,
    subject_token_span,
    trace_requests,
)
from alphaedit_fast.cli import main
from alphaedit_fast.errors import InvalidArgumentError, InvalidRequestError
from alphaedit_fast.tiny import FAMILY_CONFIGS, tiny_model, tiny_tokenizer_for

from .conftest import forward_accumulation_length, tolerance

PROMPT, SUBJECT, TARGET = "The mother tongue of {} is", "Danielle Darrieux", "French"


def log_prob_atol(model, tok, ids: list[int]) -> float:
    """Bound on |log p| differences between two evaluations of the last position's distribution."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
        final = out.hidden_states[-1][0, -1].double().norm()
        head = model.get_output_embeddings().weight.double().norm(dim=1).max()
    rtol, _ = tolerance(torch.float32, forward_accumulation_length(model, seq=len(ids)) + model.config.vocab_size)
    return 2 * 2 * rtol * float(final * head)  # two logits' errors, each 2x (two implementations)


@pytest.fixture(params=sorted(FAMILY_CONFIGS))
def family_model(request):
    return request.param, tiny_model(request.param), tiny_tokenizer_for(request.param)


def corrupted_setup(model, tok, noise_std=1.0):
    tracer = CausalTracer(model, tok, noise=noise_std, batch_size=64)
    ids, span = subject_token_span(tok, PROMPT, SUBJECT)
    x = torch.tensor([ids])
    noise = torch.randn(span[1] - span[0] + 1, model.get_input_embeddings().weight.shape[1],
                        generator=torch.Generator().manual_seed(1)) * tracer.noise
    clean, states = tracer.clean_states(x)
    return tracer, ids, span, x, noise, clean, states


def test_restoring_every_state_of_a_layer_gives_the_clean_run_and_none_the_corrupted_one(family_model):
    family, model, tok = family_model
    tracer, ids, span, x, noise, clean, states = corrupted_setup(model, tok)
    last = tracer.num_layers - 1
    every_token = [[("block", t, layer) for t in range(len(ids))] for layer in (0, last)]
    probs = tracer.restored_probabilities(x, span, noise, [[], *every_token, [("block", len(ids) - 1, last)]],
                                          states)
    atol = log_prob_atol(model, tok, ids)
    for row in (1, 2, 3):  # all of block 0, all of the last block, the last block at the last token
        gap = (probs[row].log() - clean.log()).abs().max().item()
        assert gap <= atol, f"{family}: restored row {row} is off the clean run by {gap:.3g} > {atol:.3g}"
    # the corrupted row is not the clean run: the noise does change the prediction
    assert (probs[0].log() - clean.log()).abs().max().item() > 100 * atol
    # and a trace's corrupted probability is that of a run restoring nothing
    trace = tracer.trace(PROMPT, SUBJECT, TARGET, kinds=["block"])
    assert abs(math.log(trace.restored["block"][-1, -1]) - math.log(trace.clean)) <= atol


def test_batched_restorations_equal_one_at_a_time(family_model):
    family, model, tok = family_model
    ids = subject_token_span(tok, PROMPT, SUBJECT)[0]
    atol = log_prob_atol(model, tok, ids)
    batched = CausalTracer(model, tok, noise=1.0, batch_size=64, window=3).trace(PROMPT, SUBJECT, TARGET)
    single = CausalTracer(model, tok, noise=1.0, batch_size=1, window=3).trace(PROMPT, SUBJECT, TARGET)
    assert batched.subject_span == single.subject_span
    assert batched.corrupted == pytest.approx(single.corrupted, rel=atol)
    for kind in ("block", "mlp", "attn"):
        gap = (batched.restored[kind].log() - single.restored[kind].log()).abs().max().item()
        assert gap <= atol, f"{family} {kind}: batched vs one at a time {gap:.3g} > {atol:.3g}"


def test_tokens_before_the_subject_are_exactly_not_corrupted():
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    tracer, ids, span, x, noise, clean, states = corrupted_setup(model, tok)
    assert span[0] > 0
    probs = tracer.restored_probabilities(x, span, noise, [[]] + [[("mlp", 0, l)] for l in range(4)], states)
    gap = (probs[1:].log() - probs[:1].log()).abs().max().item()
    assert gap <= log_prob_atol(model, tok, ids)  # rows of one batch: equal up to the kernels' row blocking
    trace = tracer.trace(PROMPT, SUBJECT, TARGET)
    assert torch.all(trace.restored["mlp"][: span[0]] == trace.corrupted)


def test_restoring_chosen_tokens_gives_those_rows_of_the_full_trace():
    """`tokens` (the fact world's subject-last vs last token trace): the same rows, batched
    differently; the rows not traced from the subject on are NaN."""
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    tracer = CausalTracer(model, tok, noise=1.0, batch_size=5)
    ids, (first, last) = tracer.span(PROMPT, SUBJECT)
    chosen = [last, len(ids) - 1]
    full = tracer.trace(PROMPT, SUBJECT, TARGET, kinds=["block", "mlp"])
    part = tracer.trace(PROMPT, SUBJECT, TARGET, kinds=["block", "mlp"], tokens=chosen)
    atol = log_prob_atol(model, tok, ids)
    assert part.corrupted == pytest.approx(full.corrupted, rel=atol) and part.clean == full.clean
    for kind in ("block", "mlp"):
        assert (part.restored[kind][chosen].log() - full.restored[kind][chosen].log()).abs().max() <= atol
        assert torch.all(part.restored[kind][:first] == part.corrupted)
        others = [t for t in range(first, len(ids)) if t not in chosen]
        assert others and part.restored[kind][others].isnan().all()
    with pytest.raises(InvalidArgumentError, match="tokens to restore"):
        tracer.trace(PROMPT, SUBJECT, TARGET, tokens=[first - 1])


def test_without_noise_every_restoration_is_the_clean_run():
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    trace = CausalTracer(model, tok, noise=0.0).trace(PROMPT, SUBJECT, TARGET)
    atol = log_prob_atol(model, tok, subject_token_span(tok, PROMPT, SUBJECT)[0])
    assert trace.corrupted == pytest.approx(trace.clean, rel=atol)
    for kind, grid in trace.restored.items():
        assert (grid.log() - torch.tensor(trace.clean).log()).abs().max() <= atol, kind


def test_subject_span_covers_the_subjects_tokens():
    tok = tiny_tokenizer_for("llama")
    ids, (first, last) = subject_token_span(tok, PROMPT, SUBJECT)
    assert tok.decode(ids[first : last + 1]).strip() == SUBJECT
    assert tok.decode(ids[:first]).strip().endswith("The mother tongue of")


def test_noise_is_three_times_the_subject_states_std_and_the_prediction_is_traced_without_a_target():
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    tracer = CausalTracer(model, tok, noise=1.0)
    requests = [{"prompt": PROMPT, "subject": SUBJECT}, {"prompt": "{} plays the", "subject": "Toko Yasuda"}]
    states = torch.cat([tracer.subject_states(r["prompt"], r["subject"]) for r in requests])
    assert tracer.noise_scale(requests) == pytest.approx(3 * states.std().item())
    result = trace_requests(model, tok, requests, kinds=["mlp"])
    assert result["noise"] == pytest.approx(3 * states.std().item())
    assert result["mean"]["mlp"].shape == (len(TOKEN_GROUPS), 4)
    for trace in result["traces"]:  # no target: the model's own top token
        ids = subject_token_span(tok, trace.prompt, trace.subject)[0]
        with torch.no_grad():
            top = model(torch.tensor([ids])).logits[0, -1].argmax().item()
        assert trace.target == tok.decode([top])


def test_recommended_layers_are_the_window_with_the_largest_mean_effect():
    mean = torch.zeros(len(TOKEN_GROUPS), 8)
    mean[TOKEN_GROUPS.index("last subject token")] = torch.tensor([0.1, 0.2, 0.1, 0.5, 0.6, 0.4, 0.1, 0.0])
    mean[TOKEN_GROUPS.index("last token")] = 1.0  # other rows do not count
    result = {"mean": {"mlp": mean}, "corrupted": 0.05}
    assert recommend_layers(result, 3) == [3, 4, 5]
    assert recommend_layers(result, 1) == [4]
    assert recommend_layers(result, 20) == list(range(8))
    with pytest.raises(InvalidArgumentError, match="no attn states"):
        recommend_layers(result, 3, kind="attn")


def test_bad_arguments_are_refused():
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    with pytest.raises(InvalidArgumentError, match="at least 1"):
        CausalTracer(model, tok, noise=1.0, window=0)
    with pytest.raises(InvalidArgumentError, match="unknown kind"):
        CausalTracer(model, tok, noise=1.0).trace(PROMPT, SUBJECT, kinds=["mlp", "ffn"])
    with pytest.raises(InvalidRequestError, match="exactly one"):
        CausalTracer(model, tok, noise=1.0).trace("The mother tongue of Danielle Darrieux is", SUBJECT)
    with pytest.raises(InvalidArgumentError, match="no requests"):
        trace_requests(model, tok, [])


@pytest.fixture
def gpt2_dir(tmp_path):
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_cli_trace_writes_maps_json_and_recommends_layers(gpt2_dir, tmp_path, capsys):
    records = [{"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
                "target_new": "English", "ground_truth": "French"},
               {"requested_rewrite": {"prompt": "{} plays the", "subject": "Toko Yasuda",
                                      "target_new": {"str": "piano"}, "target_true": {"str": "guitar"}}}]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "trace"
    assert main(["trace", "--model", str(gpt2_dir), "--requests", str(path), "--window", "2",
                 "--restore-window", "3", "--out", str(out)]) == 0
    summary = json.loads((out / "trace.json").read_text())
    assert [p["target"] for p in summary["prompts"]] == ["French", "guitar"]
    assert summary["restore_window"] == 3 and len(summary["recommended_layers"]) == 2
    assert summary["token_groups"] == list(TOKEN_GROUPS)
    for kind in ("block", "mlp", "attn"):
        assert (out / f"trace-{kind}.png").stat().st_size > 0
    assert "recommended layers" in capsys.readouterr().out

    one = tmp_path / "one"
    assert main(["trace", "--model", str(gpt2_dir), "--prompt", "{} plays the", "--subject", "Toko Yasuda",
                 "--kinds", "mlp", "--out", str(one)]) == 0
    assert sorted(p.name for p in one.iterdir()) == ["trace-mlp.png", "trace.json"]


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "Toko Yasuda plays the", "--subject", "Toko Yasuda"], "exactly one"),
    (["--prompt", "{} plays the"], "needs --subject"),
    (["--kinds", "mlp,ffn", "--prompt", "{} plays the", "--subject", "Toko Yasuda"], "unknown"),
    ([], "give --requests FILE or --prompt"),
    (["--prompt", "{} plays the", "--subject", "Toko Yasuda", "--restore-window", "0"], "--restore-window 0: must be"),
])
def test_cli_trace_bad_input_is_one_line_and_writes_nothing(gpt2_dir, tmp_path, capsys, argv, message):
    out = tmp_path / "trace"
    assert main(["trace", "--model", str(gpt2_dir), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
