"""`evaluation`: case readers for the three schemas, per-case NLLs and flags against a direct
computation with the model, the original's rates, sequential evaluation and `edit_prompts`."""

import json
import math

import pytest
import torch

from alphaedit_fast import AlphaEditor
from alphaedit_fast.errors import InvalidRequestError, RequestFileError
from alphaedit_fast.evaluation import (
    RATES,
    cases_from_lists,
    evaluate_edits,
    generation_entropy,
    greedy_generations,
    load_cases,
    ngram_entropy,
    plot_curve,
    score_cases,
    summarize,
    write_evaluation,
)
from alphaedit_fast.requests import targets_token_ids
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

from .conftest import CONTEXT_TEMPLATES, forward_accumulation_length, test_hparams, tolerance

SCHEMAS = ("counterfact", "zsre", "easyedit")


def counterfact_records(n=3):
    subjects = ["Danielle Darrieux", "Toko Yasuda", "Michel Denisot", "Pervez Musharraf"]
    objects = [("English", "French"), ("piano", "guitar"), ("Google", "Apple"), ("Spain", "London")]
    prompts = ["The mother tongue of {} is", "{} plays the", "{} works for", "{} is a citizen of"]
    return [{"case_id": 10 + i,
             "requested_rewrite": {"prompt": prompts[i], "subject": subjects[i],
                                   "target_new": {"str": objects[i][0]}, "target_true": {"str": objects[i][1]}},
             "paraphrase_prompts": [f"I b. {prompts[i].format(subjects[i])}", prompts[i - 1].format(subjects[i])],
             "neighborhood_prompts": [prompts[i].format(subjects[i - 1]), prompts[i].format(subjects[i - 2])]}
            for i in range(n)]


def as_schema(records, schema):
    """The CounterFact records rewritten in ZsRE's MEND layout or EasyEdit's flat one."""
    if schema == "counterfact":
        return records
    out = []
    for r in records:
        rw = r["requested_rewrite"]
        filled = rw["prompt"].format(rw["subject"])
        if schema == "zsre":
            out.append({"subject": rw["subject"], "src": filled, "answers": [rw["target_new"]["str"]],
                        "alt": rw["target_true"]["str"], "rephrase": r["paraphrase_prompts"][0],
                        "loc": "nq question: " + r["neighborhood_prompts"][0], "loc_ans": rw["target_true"]["str"]})
        else:
            out.append({"case_id": r["case_id"], "prompt": filled, "subject": rw["subject"],
                        "target_new": rw["target_new"]["str"], "ground_truth": rw["target_true"]["str"],
                        "rephrase_prompt": r["paraphrase_prompts"], "locality_prompt": r["neighborhood_prompts"][0],
                        "locality_ground_truth": rw["target_true"]["str"]})
    return out


def write_records(tmp_path, records, name="records.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


@torch.no_grad()
def direct_scores(model, tok, prompt, target):
    """Mean NLL of ' ' + target after prompt, and per token whether it is the argmax, from one
    unbatched, unpadded forward of the whole model; also max |logit| for the tolerance."""
    prefix = tok(prompt)["input_ids"]
    answer = targets_token_ids(tok, [" " + target])[0]
    logits = model(input_ids=torch.tensor([prefix + answer])).logits[0].double()
    rows = logits[torch.arange(len(answer)) + len(prefix) - 1]
    nll = -rows.log_softmax(-1)[torch.arange(len(answer)), answer].mean().item()
    return nll, (rows.argmax(-1) == torch.tensor(answer)).tolist(), rows.abs().max().item()


def expected_probes(case, schema):
    """(section, prompt, {key: target}) for every prompt of a case, computed independently of the module."""
    rw = case["requested_rewrite"]
    targets = {k: rw[k]["str"] for k in ("target_new", "target_true") if k in rw}
    out = [("rewrite", rw["prompt"].format(rw["subject"]), targets)]
    out += [("paraphrase", p, targets) for p in case["paraphrase_prompts"]]
    if schema == "counterfact":
        out += [("neighborhood", p, targets) for p in case["neighborhood_prompts"]]
    else:  # the locality answer as "true"; the new target too where the record has a ground truth
        new = {"target_new": rw["target_new"]["str"]} if "target_true" in rw else {}
        out += [("neighborhood", p["prompt"], {"target_true": p["target"], **new})
                for p in case["neighborhood_prompts"]]
    return out


def check_against_direct(model, tok, cases, schema, results):
    vocab = model.get_output_embeddings().weight.shape[0]
    rtol = tolerance(torch.float32, forward_accumulation_length(model) + vocab)[0]
    for case, result in zip(cases, results):
        correct = {s: [] for s in ("rewrite", "paraphrase", "neighborhood")}
        seen = {s: 0 for s in correct}
        for section, prompt, targets in expected_probes(case, schema):
            got = result[f"{section}_prompts_probs"][seen[section]]
            seen[section] += 1
            assert set(got) == set(targets)
            for key, target in targets.items():
                nll, hits, scale = direct_scores(model, tok, prompt, target)
                assert math.isclose(got[key], nll, rel_tol=0, abs_tol=4 * rtol * (1 + scale)), (prompt, target)
                right = "target_true" if section == "neighborhood" else "target_new"
                if schema == "counterfact" and key == right:
                    correct[section].append(all(hits))
                elif schema != "counterfact" and key == ("target_true" if section == "neighborhood" else "target_new"):
                    correct[section] += hits
        for section, flags in correct.items():
            assert result[f"{section}_prompts_probs"].__len__() == seen[section]
            assert result[f"{section}_prompts_correct"] == flags, section


@pytest.fixture(scope="module")
def shipped():
    from alphaedit_fast.factworld import load_shipped

    return load_shipped()


@pytest.mark.parametrize("schema", SCHEMAS)
def test_nlls_equal_a_direct_computation_on_the_shipped_model(shipped, schema, tmp_path):
    model, tok, world = shipped
    records = world.counterfact_requests(6, seed=1)
    for r in records:  # a paraphrase repeated, so prompts are matched by position, not by text
        r["paraphrase_prompts"].append(r["paraphrase_prompts"][0])
    got_schema, cases = load_cases(write_records(tmp_path, as_schema(records, schema)))
    assert got_schema == schema
    results = score_cases(model, tok, cases, schema, batch_tokens=64)  # several batches
    check_against_direct(model, tok, cases, schema, results)


@pytest.mark.parametrize("schema", SCHEMAS)
def test_nlls_equal_a_direct_computation_on_a_tiny_gpt2_directory(schema, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer_for("gpt2").save_pretrained(tmp_path / "gpt2")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "gpt2")
    _, cases = load_cases(write_records(tmp_path, as_schema(counterfact_records(4), schema)))
    check_against_direct(model, tok, cases, schema, score_cases(model, tok, cases, schema, batch_tokens=48))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_nlls_with_bos_and_softcapped_logits(family, tmp_path):
    model = tiny_model(family, **({"final_logit_softcapping": 3.0} if family == "gemma2" else {}))
    tok = tiny_tokenizer_for(family)
    _, cases = load_cases(write_records(tmp_path, counterfact_records(3)))
    check_against_direct(model, tok, cases, "counterfact", score_cases(model, tok, cases, "counterfact"))


def test_rates_follow_the_original_definitions():
    def pair(new, true):
        return {"target_new": new, "target_true": true}

    results = [  # case 0: 1 of 1 rewrite, 1 of 2 paraphrases, 2 of 2 neighbours; case 1: 0, 1 of 1, 0 of 1
        {"rewrite_prompts_probs": [pair(1.0, 2.0)], "paraphrase_prompts_probs": [pair(1.0, 3.0), pair(2.0, 1.0)],
         "neighborhood_prompts_probs": [pair(2.0, 1.0), pair(5.0, 0.5)], "rewrite_prompts_correct": [True],
         "paraphrase_prompts_correct": [True, False], "neighborhood_prompts_correct": [True, False]},
        {"rewrite_prompts_probs": [pair(2.0, 2.0)], "paraphrase_prompts_probs": [pair(0.5, 3.0)],
         "neighborhood_prompts_probs": [pair(1.0, 2.0)], "rewrite_prompts_correct": [False],
         "paraphrase_prompts_correct": [True], "neighborhood_prompts_correct": [False]},
    ]
    summary = summarize(results, "counterfact")
    assert summary["rates"] == {"efficacy": 0.5, "paraphrase": (0.5 + 1.0) / 2, "neighborhood": (1.0 + 0.0) / 2}
    e = math.exp
    assert math.isclose(summary["margins"]["efficacy"], ((e(-1) - e(-2)) + 0.0) / 2)
    assert math.isclose(summary["margins"]["neighborhood"],
                        (((e(-1) - e(-2)) + (e(-0.5) - e(-5))) / 2 + (e(-2) - e(-1))) / 2)
    assert summary["accuracy"] == {"efficacy": 0.5, "paraphrase": (0.5 + 1.0) / 2, "neighborhood": 0.25}
    tokens = [{"rewrite_prompts_correct": [True, False, True], "paraphrase_prompts_correct": [],
               "neighborhood_prompts_correct": [True], "rewrite_prompts_probs": [], "paraphrase_prompts_probs": [],
               "neighborhood_prompts_probs": []},
              {"rewrite_prompts_correct": [False], "paraphrase_prompts_correct": [True, True],
               "neighborhood_prompts_correct": [False, False], "rewrite_prompts_probs": [],
               "paraphrase_prompts_probs": [], "neighborhood_prompts_probs": []}]
    assert summarize(tokens, "zsre")["rates"] == {"efficacy": (2 / 3 + 0) / 2, "paraphrase": 1.0,
                                                  "neighborhood": 0.5}
    assert summarize(tokens, "zsre")["nll_rates"] == dict.fromkeys(("efficacy", "paraphrase", "neighborhood"))
    # EasyEdit records with a ground truth: token accuracies as the rates, the paper's comparison beside them
    easyedit = summarize(results, "easyedit")
    assert easyedit["rates"] == easyedit["accuracy"] == summary["accuracy"]
    assert easyedit["nll_rates"] == summary["rates"] and easyedit["margins"] == summary["margins"]


def test_easyedit_records_with_a_ground_truth_get_the_papers_rates(shipped, tmp_path):
    """NLL(new) against NLL(ground truth) at the rewrite and rephrase prompts, NLL(locality answer)
    against NLL(new) at the locality prompts, from scores computed here directly."""
    model, tok, world = shipped
    records = as_schema(world.counterfact_requests(4, seed=2), "easyedit")
    _, cases = load_cases(write_records(tmp_path, records))
    summary = summarize(score_cases(model, tok, cases, "easyedit"), "easyedit")

    def nll(prompt, target):
        return direct_scores(model, tok, prompt, target)[0]

    def share(flags):
        return sum(flags) / len(flags)

    expected = {"efficacy": [], "paraphrase": [], "neighborhood": []}
    for r in records:
        expected["efficacy"].append(float(nll(r["prompt"], r["target_new"]) < nll(r["prompt"], r["ground_truth"])))
        expected["paraphrase"].append(share([nll(p, r["target_new"]) < nll(p, r["ground_truth"])
                                             for p in r["rephrase_prompt"]]))
        expected["neighborhood"].append(float(nll(r["locality_prompt"], r["locality_ground_truth"])
                                              < nll(r["locality_prompt"], r["target_new"])))
    for rate, values in expected.items():
        assert math.isclose(summary["nll_rates"][rate], share(values)), rate
    without_truth = [{k: v for k, v in r.items() if k != "ground_truth"} for r in records]
    _, cases = load_cases(write_records(tmp_path, without_truth, "plain.json"))
    plain = summarize(score_cases(model, tok, cases, "easyedit"), "easyedit")
    assert plain["nll_rates"] == dict.fromkeys(expected) and plain["accuracy"] == summary["accuracy"]


def test_ngram_entropy_is_the_originals():
    # 14 tokens: 13 bigrams, 6 of them twice; 12 trigrams, 5 of them twice (counted by hand)
    text = "the cat sat on the mat. the cat sat on the mat."
    h2 = -(6 * (2 / 13) * math.log2(2 / 13) + (1 / 13) * math.log2(1 / 13))
    h3 = -(5 * (2 / 12) * math.log2(2 / 12) + 2 * (1 / 12) * math.log2(1 / 12))
    assert math.isclose(ngram_entropy(text), (2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("again " * 20) == 0.0 and ngram_entropy("one") == 0.0


def test_batched_generations_are_each_prompts_own(shipped):
    """Left-padded batches generate what each prompt generates alone (greedy)."""
    model, tok, world = shipped
    prompts = [c["requested_rewrite"]["prompt"].format(c["requested_rewrite"]["subject"])
               for c in world.counterfact_requests(5, seed=3)] + ["The"]
    alone = []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=24 - ids.shape[1], pad_token_id=tok.eos_token_id)
        alone.append(tok.decode(out[0], skip_special_tokens=True))
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 1  # batches are grouped by length, answers in order
    assert greedy_generations(model, tok, prompts, max_length=24, batch_size=4) == alone
    assert math.isclose(generation_entropy(model, tok, prompts, max_length=24, batch_size=4),
                        sum(map(ngram_entropy, alone)) / len(alone), rel_tol=1e-12)


def test_readers_map_each_schema_to_the_original_layout(tmp_path):
    zsre = as_schema(counterfact_records(1), "zsre")
    _, (case,) = load_cases(write_records(tmp_path, zsre))
    assert case["requested_rewrite"] == {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                         "target_new": {"str": "English"}}
    assert case["neighborhood_prompts"] == [{"prompt": zsre[0]["loc"] + "?", "target": "French"}]
    _, (case,) = load_cases(write_records(tmp_path, zsre), zsre_target="alt")
    assert case["requested_rewrite"]["target_new"] == {"str": "French"}
    _, (case,) = load_cases(write_records(tmp_path, as_schema(counterfact_records(1), "easyedit")))
    assert case["requested_rewrite"]["target_true"] == {"str": "French"}
    assert case["paraphrase_prompts"] == counterfact_records(1)[0]["paraphrase_prompts"]


@pytest.mark.parametrize("records, message", [
    (as_schema(counterfact_records(1), "zsre") + counterfact_records(1), "counterfact record in a file of zsre"),
    ([{**as_schema(counterfact_records(1), "zsre")[0], "subject": "Nobody"}], "does not occur"),
    ([{"requested_rewrite": {"prompt": "{} is", "subject": "X", "target_new": {"str": "Y"}}}], "target_true"),
    ([{**as_schema(counterfact_records(1), "easyedit")[0], "locality_ground_truth": ["a", "b"]}], "locality"),
    ([{**counterfact_records(1)[0], "paraphrase_prompts": [""]}], "paraphrase prompt"),
    ([{"text": "no schema"}], "expected CounterFact"),
    (counterfact_records(1) + [{"requested_rewrite": {"prompt": "{} is", "target_new": {"str": "Y"}}}],
     r"record 2 \(index 1\): requested_rewrite.subject is missing"),
    ([{k: v for k, v in as_schema(counterfact_records(1), "zsre")[0].items() if k != "loc_ans"}], "loc_ans is missing"),
    ([{k: v for k, v in as_schema(counterfact_records(1), "easyedit")[0].items() if k != "target_new"}],
     "target_new is missing"),
])
def test_bad_records_name_the_file_and_record(tmp_path, records, message):
    path = write_records(tmp_path, records)
    with pytest.raises(RequestFileError, match=message) as err:
        load_cases(path)
    assert str(path) in str(err.value)


def test_sequential_evaluation_edits_and_writes_the_original_case_layout(tmp_path):
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    hparams = test_hparams(model)
    _, cases = load_cases(write_records(tmp_path, counterfact_records(4)))
    editor = AlphaEditor(model, tok, hparams, projector=[torch.eye(160)] * 2, context_templates=CONTEXT_TEMPLATES)
    lines = []
    prompts = [c["requested_rewrite"]["prompt"].format(c["requested_rewrite"]["subject"]) for c in cases]
    fluency_before = generation_entropy(model, tok, prompts, max_length=20)
    metrics, records = evaluate_edits(editor, cases, "counterfact", 2, curve=True, fluency=True, generation_length=20,
                                      log=lines.append)
    assert metrics["fluency"]["before"] == fluency_before
    assert metrics["fluency"]["after"] == generation_entropy(model, tok, prompts, max_length=20)
    assert "20 tokens" in metrics["fluency"]["definition"]
    assert editor.num_edits == 4 and lines == [
        "unedited model: scoring 4 cases", "unedited model: fluency of 4 greedy generations", lines[2],
        lines[3], lines[4], "after 4 edits: scoring 4 cases and fluency of 4 greedy generations"]
    assert lines[2].startswith("edits 1-2 of 4: z") and lines[3].startswith("after 2 edits: efficacy")
    assert metrics["before"]["rates"]["efficacy"] < metrics["rates"]["efficacy"]
    assert [p["n_edits"] for p in metrics["curve"]] == [0, 2, 4]
    assert metrics["curve"][0]["nll_rates"] == metrics["before"]["nll_rates"]
    assert metrics["curve"][-1]["accuracy"] == metrics["accuracy"]
    assert {k: metrics["curve"][0][k] for k in ("n_edits", *RATES)} == {"n_edits": 0, **metrics["before"]["rates"]}
    assert {k: metrics["curve"][-1][k] for k in ("n_edits", *RATES)} == {"n_edits": 4, **metrics["rates"]}
    assert metrics["retention"]["still_held"] <= metrics["retention"]["first_batch_successes"]
    assert {"z", "keys", "solve", "cache update", "evaluate", "evaluate before"} <= set(metrics["seconds"])
    assert set(metrics["peak_memory_bytes"]) >= {"z", "evaluate"}
    assert records[0]["case_id"] == 10 and records[0]["num_edits"] == 2
    assert summarize([r["post"] for r in records], "counterfact")["rates"] == metrics["rates"]
    check_against_direct(model, tok, cases, "counterfact", [r["post"] for r in records])
    paths = write_evaluation(tmp_path / "out", {**metrics, "versions": {}}, records)
    assert [p.name for p in paths] == ["metrics.json", "cases.jsonl", "curve.png"]
    lines = (tmp_path / "out" / "cases.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["post"]["rewrite_prompts_probs"] == records[1]["post"]["rewrite_prompts_probs"]


def test_a_single_batch_curve_starts_at_zero_edits_even_without_before(tmp_path):
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    _, cases = load_cases(write_records(tmp_path, counterfact_records(2)))
    editor = AlphaEditor(model, tok, test_hparams(model), projector=[torch.eye(160)] * 2,
                         context_templates=CONTEXT_TEMPLATES)
    metrics, records = evaluate_edits(editor, cases, "counterfact", 2, before=False, curve=True, log=lambda _: None)
    assert [p["n_edits"] for p in metrics["curve"]] == [0, 2]
    assert "before" not in metrics and "pre" not in records[0]
    assert plot_curve(metrics, tmp_path / "curve.png").stat().st_size > 0


def test_edit_prompts_takes_easyedit_arguments_and_measures_before_and_after():
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    editor = AlphaEditor(model, tok, test_hparams(model), projector=[torch.eye(160)] * 2,
                         context_templates=CONTEXT_TEMPLATES)
    out = editor.edit_prompts(prompts=["The mother tongue of Danielle Darrieux is", "Toko Yasuda plays the"],
                              subject=["Danielle Darrieux", "Toko Yasuda"], target_new=["English", "piano"],
                              ground_truth=["French", "guitar"],
                              rephrase_prompts=["I b. The mother tongue of Danielle Darrieux is", None],
                              locality_prompts=["Michel Denisot works for", "Pervez Musharraf is a citizen of"],
                              locality_ground_truth=["Google", "Spain"])
    assert [r["requested_rewrite"]["prompt"] for r in out] == ["The mother tongue of {} is", "{} plays the"]
    for r in out:  # the new target became likelier; the rate is the token accuracy of the flags
        assert r["post"]["rewrite_prompts_probs"][0]["target_new"] < r["pre"]["rewrite_prompts_probs"][0]["target_new"]
        flags = r["post"]["rewrite_prompts_correct"]
        assert r["post"]["rates"]["efficacy"] == sum(flags) / len(flags)
    assert out[1]["post"]["rates"]["paraphrase"] is None  # no rephrase prompt
    assert set(out[0]["pre"]) == set(out[0]["post"])
    assert editor.num_edits == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"subject": ["Toko Yasuda"]}, "subject has 1 entries"),
    ({"subject": ["Nobody", "Toko Yasuda"]}, "does not occur"),
    ({"locality_prompts": ["a b", "c d"]}, "locality"),
])
def test_edit_prompts_refuses_bad_arguments_before_editing(kwargs, message):
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = AlphaEditor(model, tok, test_hparams(model), projector=[torch.eye(160)] * 2,
                         context_templates=CONTEXT_TEMPLATES)
    args = {"prompts": ["The mother tongue of Danielle Darrieux is", "Toko Yasuda plays the"],
            "subject": ["Danielle Darrieux", "Toko Yasuda"], "target_new": ["English", "piano"], **kwargs}
    with pytest.raises(InvalidRequestError, match=message):
        editor.edit_prompts(**args)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_cases_from_lists_accepts_single_strings():
    (case,) = cases_from_lists("Toko Yasuda plays the", "Toko Yasuda", "piano", rephrase_prompts="Toko Yasuda, the")
    assert case["paraphrase_prompts"] == ["Toko Yasuda, the"]


def test_an_empty_null_space_warns_that_edits_change_nothing():
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    with pytest.warns(UserWarning, match=r"layer\(s\) \[2\] is empty"):
        AlphaEditor(model, tok, test_hparams(model), projector=[torch.eye(160), torch.zeros(160, 0)],
                    context_templates=CONTEXT_TEMPLATES)
