"""The general-capability evaluation (the original's glue_eval) against a per-item loop written from
the original's definition, its parser and metrics on hand-made inputs, and its data errors."""

import json
import math

import pytest
import torch

from alphaedit_fast.errors import InvalidArgumentError
from alphaedit_fast.general import (
    CHOICES,
    POOL_SIZE,
    TASKS,
    evaluate_general,
    f1_weighted,
    load_task,
    mcc,
    parse_answer,
    prompt_for,
    task_metrics,
)
from alphaedit_fast.tiny import corpus, tiny_model, tiny_tokenizer_for

from .conftest import SHARED_DATA

GLUE_DATA = SHARED_DATA / "glue-eval"
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"
N_ITEMS = 6


def synthetic_data(directory, n=POOL_SIZE + N_ITEMS):
    """Records of every task in the original's layouts, from the tiny tokenizer's corpus."""
    rows = corpus()[::7]
    s = [rows[i % len(rows)] for i in range(4 * n)]
    data = {"sst2": [{"sentence": s[i], "label": i % 2, "idx": i} for i in range(n)],
            "cola": [{"sentence": s[i + 1], "label": (i // 2) % 2, "idx": i} for i in range(n)],
            "mrpc": [{"sentence1": s[i], "sentence2": s[i + 2], "label": i % 2, "idx": i} for i in range(n)],
            "rte": [{"sentence1": s[i + 3], "sentence2": s[i], "label": (i + 1) % 2, "idx": i} for i in range(n)],
            "nli": [{"index": str(i), "sentence1": s[i], "sentence2": s[i + 5],
                     "label": "entailment" if i % 3 else "not_entailment"} for i in range(n)],
            "mmlu": [{"question": s[i], "subject": "x", "choices": s[i + 1:i + 5], "answer": i % 4} for i in range(n)]}
    for task, records in data.items():
        (directory / f"{task}.json").write_text(json.dumps(records))
    return directory


# -- the original's per-item loop, from its glue_eval/*_eval.py ------------------------------
ORIGINAL_PROMPTS = {
    "sst2": lambda r: "Review :" + r["sentence"] + "\nSentiment :",
    "mrpc": lambda r: ("Are the sentences paraphrases of each other.\n" + "Sentence 1: " + r["sentence1"] + "\n"
                       + "Sentence 2: " + r["sentence2"] + "\n" + "Answer:"),
    "cola": lambda r: ("Is this sentence linguistically acceptable?\n" + "Sentence: " + r["sentence"] + "\n"
                       + "Answer: "),
    "rte": lambda r: r["sentence1"] + "\n" + "question: " + r["sentence2"] + " True or False?" + "\n" + "answer:",
    "nli": lambda r: f'{r["sentence1"]} entails the {r["sentence2"]} True or False? Answer:',
    "mmlu": lambda r: ("Question: " + r["question"] + "\n" + "(A) " + r["choices"][0] + "\n" + "(B) "
                       + r["choices"][1] + "\n" + "(C) " + r["choices"][2] + "\n" + "(D) " + r["choices"][3] + "\n"
                       + "Answer:"),
}
# (answer strings in the original's suffix order, the label of each)
ORIGINAL_SUFFIXES = {"sst2": (["positive", "negative"], [1, 0]), "mrpc": (["Yes", "No"], [1, 0]),
                     "cola": (["Yes", "No"], [1, 0]), "rte": (["True", "False"], [1, 0]),
                     "nli": (["True", "False"], [1, 0]), "mmlu": (["A", "B", "C", "D"], [0, 1, 2, 3])}


def original_get_answer(task, generated_text):
    if task == "mmlu":
        text = generated_text.lower()
        for label, key in enumerate(["a\n", "b\n", "c\n", "d\n"]):
            if key in text:
                return label
        return -1
    split = {"sst2": "Sentiment :", "mrpc": "Answer:", "cola": "Answer:", "rte": "answer:",
             "nli": "True or False? Answer:"}[task]
    answer_text = generated_text.split(split)[-1].strip().strip().lower()
    order = {"sst2": [("positive", 1), ("negative", 0)], "mrpc": [("yes", 1), ("no", 0)],
             "cola": [("yes", 1), ("no", 0)], "rte": [("false", 0), ("true", 1)], "nli": [("true", 1), ("false", 0)]}
    for word, label in order[task]:
        if word in answer_text:
            return label
    return -1


@torch.no_grad()
def original_item(model, tok, task, record, gen_len=5):
    """One item as the original's evaluate loop: (full generated text, answer, per-label NLL, answer_new,
    number of new tokens).
    Its `'llama' in model name` test is written as: the tokenizer prepends a BOS."""
    input_prompt = ORIGINAL_PROMPTS[task](record)
    llama = tok.bos_token_id is not None and tok(" x")["input_ids"][0] == tok.bos_token_id
    input_prompt_ids = tok.encode(input_prompt, return_tensors="pt")
    input_prompt_text = tok.decode(input_prompt_ids[0], skip_special_tokens=True)
    prefix_tok_len = len(tok(input_prompt)["input_ids"]) - (1 if llama else 0)
    output = model.generate(input_prompt_ids, max_length=input_prompt_ids.shape[1] + gen_len, do_sample=False)
    generated_text = tok.decode(output[0], skip_special_tokens=True)
    answer = original_get_answer(task, generated_text.replace(input_prompt_text, "") if task == "mmlu"
                                 else generated_text)
    strings, labels = ORIGINAL_SUFFIXES[task]
    nll, prob = {}, {}
    for string, label in zip(strings, labels):
        suffix = tok(f" {string}")["input_ids"][1 if llama else 0:]
        logits = model(**tok([f"{input_prompt} {string}"], return_tensors="pt")).logits
        if llama:
            logits = logits[:, 1:, :]
        total = 0
        for j, cur_tok in enumerate(suffix):
            total += -torch.nn.functional.log_softmax(logits[0, prefix_tok_len + j - 1, :], dim=0)[cur_tok].item()
        nll[label] = total / len(suffix)
        prob[label] = math.exp(-nll[label])
    if task == "mmlu":
        answer_new = -1
        for label in range(4):
            if prob[label] > max(prob[k] for k in range(4) if k != label):
                answer_new = label
                break
    else:
        answer_new = 1 if prob[1] > prob[0] else 0
    n_new = output.shape[1] - input_prompt_ids.shape[1]
    return generated_text, answer, [nll[k] for k in sorted(nll)], answer_new, n_new


def labels_of(task, records):
    if task == "nli":
        return [1 if r["label"] == "entailment" else 0 for r in records]
    return [r["answer" if task == "mmlu" else "label"] for r in records]


def long_tiny(family, data_dir):
    """A float64 tiny model long enough for the tasks' prompts; it also stops at the third token it
    generates after each task's first prompt, so that rows of a batch finish at different steps."""
    positions = {"n_positions": 1024} if family == "gpt2" else {"max_position_embeddings": 1024}
    model, tok = tiny_model(family, **positions).double(), tiny_tokenizer_for(family)
    stops = [model.generation_config.eos_token_id]
    for task in TASKS:
        ids = tok.encode(load_task(data_dir, task, 1)[0]["prompt"], return_tensors="pt")
        stops.append(model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)[0, -1].item())
    model.generation_config.eos_token_id = stops
    return model, tok


def assert_same_as_the_original(model, tok, data_dir, n_items):
    """Every item's generation, answers and NLLs, and every task's metrics, as the per-item loop's."""
    metrics, items = evaluate_general(model, tok, data_dir, n_items=n_items, batch_size=4, return_items=True)
    assert list(metrics) == list(TASKS)
    stopped_early = 0
    for task in TASKS:
        records = json.loads((data_dir / f"{task}.json").read_text())[POOL_SIZE:POOL_SIZE + n_items]
        reference = [original_item(model, tok, task, r) for r in records]
        ours = items[task]
        assert [it["prompt"] for it in ours] == [ORIGINAL_PROMPTS[task](r) for r in records]
        for it, (text, answer, nll, answer_new, n_new) in zip(ours, reference):
            shown = tok.decode(tok(it["prompt"])["input_ids"], skip_special_tokens=True)
            assert text.replace(shown, "") == it["generated_text"], task
            assert (it["answer"], it["answer_new"]) == (answer, answer_new), task
            assert it["nll"] == pytest.approx(nll, rel=1e-9), task
            stopped_early += n_new < 5
        labels = labels_of(task, records)
        assert [it["label"] for it in ours] == labels
        expected = task_metrics([{"label": y, "answer": r[1], "answer_new": r[3]} for y, r in zip(labels, reference)])
        assert metrics[task] == expected, task
    return stopped_early


@pytest.mark.parametrize("source", ["synthetic", "shared"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_evaluation_equals_the_originals_per_item_loop(family, source, tmp_path):
    if source == "shared" and not GLUE_DATA.is_dir():
        pytest.skip(f"{GLUE_DATA} is absent")
    data_dir = synthetic_data(tmp_path) if source == "synthetic" else GLUE_DATA
    model, tok = long_tiny(family, data_dir)
    stopped_early = assert_same_as_the_original(model, tok, data_dir, N_ITEMS if source == "synthetic" else 3)
    assert stopped_early > 0  # some generations ended at an extra EOS


@pytest.mark.skipif(not (GLUE_DATA.is_dir() and GPT2_TOKENIZER.is_dir()), reason="no ../shared/data")
def test_the_real_gpt2_tokenizer_on_the_real_data_gives_the_originals_items():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    model = tiny_model("gpt2", vocab_size=len(tok), n_positions=1024).double()
    assert_same_as_the_original(model, tok, GLUE_DATA, 3)


def test_prompts_labels_and_pool_follow_the_original(tmp_path):
    synthetic_data(tmp_path)
    for task in TASKS:
        records = json.loads((tmp_path / f"{task}.json").read_text())
        items = load_task(tmp_path, task, n_items=4)
        assert [it["index"] for it in items] == [10, 11, 12, 13]  # records 0-9: the few-shot pool
        assert [it["record"] for it in items] == records[10:14]
        assert [it["prompt"] for it in items] == [ORIGINAL_PROMPTS[task](r) for r in records[10:14]]
        assert [it["label"] for it in items] == labels_of(task, records[10:14])
        assert len(load_task(tmp_path, task, n_items=None)) == len(records) - POOL_SIZE
    assert prompt_for("cola", {"sentence": "It rains."}) == ("Is this sentence linguistically acceptable?\n"
                                                            "Sentence: It rains.\nAnswer: ")
    assert CHOICES["rte"][1] == "True" and CHOICES["sst2"][1] == "positive"


@pytest.mark.skipif(not GLUE_DATA.is_dir(), reason=f"{GLUE_DATA} is absent")
def test_the_shared_data_hold_the_papers_items():
    sizes = {"sst2": 856, "mrpc": 258, "cola": 644, "rte": 262, "nli": 2489, "mmlu": 1516}
    for task in TASKS:
        assert len(load_task(GLUE_DATA, task, n_items=None)) == sizes[task] - POOL_SIZE
        assert len(load_task(GLUE_DATA, task)) == 100
    assert load_task(GLUE_DATA, "sst2", 1)[0]["index"] == 10


@pytest.mark.parametrize("task,text,expected", [
    ("sst2", "Review :fine\nSentiment : positive and", 1),
    ("sst2", "Review :a positive one\nSentiment : negative", 0),  # only after the last marker
    ("sst2", "Review :good\nSentiment : great", -1),
    ("sst2", "Review :x\nSentiment : Negative, positive", 1),  # positive is looked for first
    ("mrpc", "Are ...\nAnswer: Nothing", 0),  # 'no' as a substring
    ("mrpc", "Are ...\nAnswer: Yes, no", 1),
    ("mrpc", "Are ...\nAnswer: maybe", -1),
    ("cola", "Is ...\nAnswer:  YES", 1),
    ("rte", "s\nquestion: t True or False?\nanswer: true, not false", 0),  # false first
    ("rte", "s\nquestion: t True or False?\nanswer: Truly", -1),
    ("nli", "a entails the b True or False? Answer: True or false", 1),
    ("nli", "a entails the b True or False? Answer:", -1),
])
def test_parser_on_hand_written_generations(task, text, expected):
    assert parse_answer(task, text) == expected == original_get_answer(task, text)


def test_mmlu_parser_reads_the_continuation_only():
    prompt = "Question: q\n(A) an idea\n(B) b\n(C) c\n(D) d\nAnswer:"
    for continuation in (" C\n(", " The data\nX", " B", " d\n"):
        assert parse_answer("mmlu", prompt + continuation, prompt) == original_get_answer("mmlu", continuation)
    assert parse_answer("mmlu", prompt + " C\n(", prompt) == 2
    assert parse_answer("mmlu", prompt + " The data\nX", prompt) == 0  # 'a\n' anywhere, as the original
    assert parse_answer("mmlu", prompt + " B", prompt) == -1  # no newline after the letter
    assert parse_answer("mmlu", prompt + " B", "") == 0  # with the prompt left in, "(A) an idea\n" matches


def test_metrics_on_hand_made_predictions():
    labels = [1, 1, 0, 0, 1, 0]
    # class 1: TP 2, FP 1, FN 1 -> F1 2/3; class 0: TP 1, FP 1, FN 2 -> F1 2/5; weights 3 and 3
    assert f1_weighted(labels, [1, 0, 0, -1, 1, 1]) == pytest.approx((2 / 3 * 3 + 0.4 * 3) / 6)
    # classes -1, 0, 1: true counts 0, 3, 3; predicted 1, 2, 3; 3 correct of 6
    assert mcc(labels, [1, 0, 0, -1, 1, 1]) == pytest.approx((3 * 6 - 15) / math.sqrt((36 - 14) * (36 - 18)))
    # binary: TP 2, TN 2, FP 1, FN 1 -> (TP TN - FP FN) / sqrt(...) = 1/3
    assert mcc(labels, [1, 0, 0, 0, 1, 1]) == pytest.approx(1 / 3)
    assert mcc(labels, labels) == 1.0 and mcc(labels, [1 - y for y in labels]) == -1.0
    assert mcc(labels, [-1] * 6) == 0.0 and f1_weighted(labels, [-1] * 6) == 0.0
    assert f1_weighted(labels, labels) == 1.0
    assert f1_weighted([0, 1, 2, 3], [0, 1, 3, 3]) == pytest.approx((1 + 1 + 0 + 2 / 3) / 4)
    items = [{"label": y, "answer": a, "answer_new": b}
             for y, a, b in zip(labels, [1, 0, 0, -1, 1, 1], [1, 1, 0, 0, 0, 0])]
    m = task_metrics(items)
    assert (m["n"], m["total"], m["correct"], m["incorrect"], m["invalid"]) == (6, 6, 3, 2, 1)
    assert (m["accuracy"], m["correct_new"], m["incorrect_new"], m["accuracy_new"]) == (0.5, 5, 1, 5 / 6)
    assert m["f1_new"] == f1_weighted(labels, [1, 1, 0, 0, 0, 0]) and m["mcc_new"] == mcc(labels, [1, 1, 0, 0, 0, 0])


def test_missing_or_malformed_data_raises_an_error_that_says_where_to_get_it(tmp_path):
    where = r"sst2\.json.*glue_eval/dataset/sst2\.pkl.*\.\./shared/data/glue-eval"
    with pytest.raises(InvalidArgumentError, match=where):
        load_task(tmp_path, "sst2")
    synthetic_data(tmp_path)
    (tmp_path / "mmlu.json").unlink()
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    with pytest.raises(InvalidArgumentError, match="mmlu.json"):  # before any task is evaluated
        evaluate_general(model, tok, tmp_path, n_items=N_ITEMS)
    with pytest.raises(InvalidArgumentError, match="unknown task"):
        load_task(tmp_path, "squad")
    with pytest.raises(InvalidArgumentError, match="n_items=20"):
        load_task(tmp_path, "sst2", n_items=20)
    with pytest.raises(InvalidArgumentError, match="gen_len"):
        evaluate_general(model, tok, tmp_path, tasks="sst2", n_items=N_ITEMS, gen_len=0)
    (tmp_path / "rte.json").write_text(json.dumps(json.loads((tmp_path / "rte.json").read_text())[:POOL_SIZE]))
    with pytest.raises(InvalidArgumentError, match="0 records after"):
        load_task(tmp_path, "rte", n_items=None)
    (tmp_path / "cola.json").write_text(json.dumps([{"text": "no sentence"}] * 12))
    with pytest.raises(InvalidArgumentError, match="malformed.*sentence, label"):
        load_task(tmp_path, "cola", n_items=2)
