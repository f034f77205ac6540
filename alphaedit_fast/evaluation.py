"""Evaluation of edits on CounterFact, ZsRE and EasyEdit records with the original's metrics
(`alphaedit-fast eval --requests FILE`, `AlphaEditor.edit_prompts`).

A case (the original's record layout, whatever the file's schema):
`{"case_id", "requested_rewrite": {"prompt", "subject", "target_new": {"str"}, ["target_true": {"str"}]},
"paraphrase_prompts": [str], "neighborhood_prompts": [str] (CounterFact) or [{"prompt", "target"}]}`.

Per prompt and target the score is the mean per-token NLL of " " + target after the prompt (the
target's tokens appended to the prompt's, teacher forced) and, per target token, whether it is the
argmax. Rates, as the original's `summarize.py` (a mean over each case's prompts, then over cases):

- CounterFact: efficacy / paraphrase = share of rewrite / paraphrase prompts with
  NLL(new) < NLL(true); neighborhood = share of neighbourhood prompts with NLL(true) < NLL(new);
  margins are the mean of exp(-NLL(new)) - exp(-NLL(true)) (sign flipped for neighbourhood).
- ZsRE and EasyEdit: token-level accuracy of the new answer at the rewrite (efficacy) and rephrase
  (paraphrase) prompts and of the locality answer at the locality prompts (neighborhood).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import InvalidRequestError, RequestFileError
from .head import own_logits
from .positions import pad_right, pad_token_id
from .requests import field, normalize_request, read_records, targets_token_ids

SCHEMAS = ("counterfact", "zsre", "easyedit")
SECTIONS = ("rewrite", "paraphrase", "neighborhood")
RATES = ("efficacy", "paraphrase", "neighborhood")


# -- reading cases ---------------------------------------------------------------------------
def schema_of(record) -> str:
    """Which schema a record is in: CounterFact (`requested_rewrite`), ZsRE in MEND's layout
    (`src`, `loc`) or EasyEdit's flat one (`prompt`)."""
    if isinstance(record, dict):
        if "requested_rewrite" in record:
            return "counterfact"
        if "src" in record and "loc" in record:
            return "zsre"
        if "prompt" in record:
            return "easyedit"
    raise KeyError("requested_rewrite (CounterFact), src and loc (ZsRE), or prompt (EasyEdit)")


def _template(text: str, subject: str) -> str:
    """`text` with its last occurrence of `subject` replaced by `{}`."""
    at = text.rfind(subject) if subject else -1
    if at < 0:
        raise ValueError(f"subject {subject!r} does not occur in {text!r}")
    return text[:at] + "{}" + text[at + len(subject):]


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, (str, dict)) else list(value)


def _counterfact_case(record: dict, index: int, zsre_target: str) -> dict:
    case = {"case_id": record.get("case_id", index),
            "requested_rewrite": {"prompt": field(record, "requested_rewrite.prompt"),
                                  "subject": field(record, "requested_rewrite.subject"),
                                  "target_new": {"str": field(record, "requested_rewrite.target_new.str")}},
            "paraphrase_prompts": list(record.get("paraphrase_prompts", [])),
            "neighborhood_prompts": list(record.get("neighborhood_prompts", []))}
    if "target_true" in record["requested_rewrite"]:
        case["requested_rewrite"]["target_true"] = {"str": field(record, "requested_rewrite.target_true.str")}
    return case


def _zsre_case(record: dict, index: int, zsre_target: str) -> dict:
    """MEND's layout, read as the original's `MENDQADataset` (target: `answers[0]`, or `alt`)."""
    subject = field(record, "subject")
    if zsre_target == "answers":
        answers = field(record, "answers")
        if not isinstance(answers, list) or not answers:
            raise InvalidRequestError(f"answers must be a non-empty list, got {answers!r}")
        target = answers[0]
    else:
        target = field(record, "alt")
    return {"case_id": record.get("case_id", index),
            "requested_rewrite": {"prompt": _template(field(record, "src"), subject), "subject": subject,
                                  "target_new": {"str": target}},
            "paraphrase_prompts": _as_list(record.get("rephrase")),
            "neighborhood_prompts": [{"prompt": field(record, "loc") + "?", "target": field(record, "loc_ans")}]}


def _easyedit_case(record: dict, index: int, zsre_target: str) -> dict:
    subject, prompt = field(record, "subject"), field(record, "prompt")
    rewrite = {"prompt": prompt if "{}" in prompt else _template(prompt, subject), "subject": subject,
               "target_new": {"str": field(record, "target_new")}}
    if record.get("ground_truth") is not None:
        rewrite["target_true"] = {"str": record["ground_truth"]}
    localities = _as_list(record.get("locality_prompt"))
    answers = _as_list(record.get("locality_ground_truth"))
    if len(answers) != len(localities):
        raise ValueError(f"{len(localities)} locality prompt(s) but {len(answers)} locality_ground_truth answer(s)")
    return {"case_id": record.get("case_id", index), "requested_rewrite": rewrite,
            "paraphrase_prompts": _as_list(record.get("rephrase_prompt")),
            "neighborhood_prompts": [{"prompt": p, "target": a} for p, a in zip(localities, answers)]}


READERS = {"counterfact": _counterfact_case, "zsre": _zsre_case, "easyedit": _easyedit_case}


def load_cases(path, zsre_target: str = "answers") -> tuple[str, list[dict]]:
    """(schema, cases) from a JSON/JSONL file of CounterFact, ZsRE (MEND layout: `src`, `subject`,
    `answers`, `alt`, `rephrase`, `loc`, `loc_ans`) or EasyEdit flat records.

    ZsRE's edit target is `answers[0]`, as in the original (`zsre_target="alt"`: MEND's and
    EasyEdit's `alt`). Every case is checked as an edit request; a problem raises
    RequestFileError naming the file and record.
    """
    if zsre_target not in ("answers", "alt"):
        raise ValueError(f"zsre_target must be 'answers' or 'alt', got {zsre_target!r}")
    schema, cases = None, []
    for index, (where, record) in enumerate(read_records(path)):
        try:
            kind = schema_of(record)
            if schema not in (None, kind):
                raise RequestFileError(f"{where}: a {kind} record in a file of {schema} records")
            schema = kind
            case = READERS[kind](record, index, zsre_target)
            normalize_request(edit_request(case), None)
            _check_probes(case, kind)
        except RequestFileError:
            raise
        except InvalidRequestError as err:
            raise RequestFileError(f"{where}: {err}") from None
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as err:
            raise RequestFileError(f"{where}: malformed record ({type(err).__name__}: {err}); expected "
                                   "CounterFact, ZsRE (MEND layout) or EasyEdit records") from None
        cases.append(case)
    return schema, cases


def _check_probes(case: dict, schema: str) -> None:
    def text(value, what):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{what} must be a non-empty string, got {value!r}")

    for prompt in case["paraphrase_prompts"]:
        text(prompt, "a paraphrase prompt")
    for probe in case["neighborhood_prompts"]:
        if schema == "counterfact":
            text(probe, "a neighborhood prompt")
        else:
            text(probe["prompt"], "a locality prompt")
            text(probe["target"], "a locality answer")
    if schema == "counterfact" and "target_true" not in case["requested_rewrite"]:
        raise ValueError("a CounterFact record needs requested_rewrite.target_true")


def cases_from_lists(prompts, subject, target_new, ground_truth=None, rephrase_prompts=None,
                     locality_prompts=None, locality_ground_truth=None) -> list[dict]:
    """Cases from EasyEdit's `BaseEditor.edit` arguments: one list entry per edit (a string is
    one edit); rephrase and locality entries may be a string or a list per edit."""
    def per_edit(value, name):
        if value is None:
            return [None] * len(prompts)
        value = [value] if isinstance(value, str) else list(value)
        if len(value) != len(prompts):
            raise InvalidRequestError(f"{name} has {len(value)} entries for {len(prompts)} prompts")
        return value

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise InvalidRequestError("no prompts given")
    columns = {name: per_edit(value, name) for name, value in (
        ("subject", subject), ("target_new", target_new), ("ground_truth", ground_truth),
        ("rephrase_prompt", rephrase_prompts), ("locality_prompt", locality_prompts),
        ("locality_ground_truth", locality_ground_truth))}
    cases = []
    for i, prompt in enumerate(prompts):
        record = {"case_id": i, "prompt": prompt, **{k: v[i] for k, v in columns.items() if v[i] is not None}}
        try:
            case = _easyedit_case(record, i, "answers")
            normalize_request(edit_request(case), i)
            _check_probes(case, "easyedit")
        except InvalidRequestError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidRequestError(f"edit {i}: {err}") from None
        cases.append(case)
    return cases


def edit_request(case: dict) -> dict:
    """The edit request of a case: `{"case_id", "prompt", "subject", "target_new", ["target_true"]}`."""
    return {"case_id": case["case_id"], **case["requested_rewrite"]}


# -- scoring ---------------------------------------------------------------------------------
def _spaced(target: str) -> str:
    return target if target.startswith(" ") else " " + target


@torch.no_grad()
def score_targets(model, tok, prompts: Sequence[str], targets: Sequence[str], batch_tokens: int = 4096
                  ) -> list[tuple[float, list[bool]]]:
    """For each (prompt, target): the mean per-token NLL of `" " + target` after `prompt` and,
    per target token, whether the model's argmax there is that token.

    Rows are the prompt's tokens (with the tokenizer's BOS) followed by the target's (without);
    they run sorted by length in right-padded batches of about `batch_tokens` slots, and the LM
    head is applied only where a target token is predicted.
    """
    prefixes = tok(list(prompts))["input_ids"]
    answers = targets_token_ids(tok, [_spaced(t) for t in targets])
    order = sorted(range(len(prefixes)), key=lambda i: -(len(prefixes[i]) + len(answers[i])))
    head, backbone = model.get_output_embeddings(), model.base_model
    device = model.get_input_embeddings().weight.device
    results: list[tuple[float, list[bool]] | None] = [None] * len(prefixes)
    start = 0
    while start < len(order):
        width = len(prefixes[order[start]]) + len(answers[order[start]])
        stop = min(len(order), start + max(1, batch_tokens // width))
        rows = order[start:stop]
        input_ids, mask = pad_right([prefixes[i] + answers[i] for i in rows], pad_token_id(tok), device)
        hidden = backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
        row_of = torch.cat([torch.full((len(answers[i]),), r) for r, i in enumerate(rows)])
        at = torch.cat([torch.arange(len(answers[i])) + len(prefixes[i]) - 1 for i in rows])
        # the model's own logits there: its head and whatever its forward does after it (head.py)
        picked = hidden[row_of.to(hidden.device), at.to(hidden.device)].to(head.weight.device)
        logits = own_logits(model, picked).float()
        wanted = torch.tensor([t for i in rows for t in answers[i]], device=logits.device)
        nll = -logits.log_softmax(-1).gather(1, wanted[:, None])[:, 0].double().cpu()
        hit = (logits.argmax(-1) == wanted).cpu()
        offset = 0
        for i in rows:
            n = len(answers[i])
            results[i] = (nll[offset:offset + n].mean().item(), hit[offset:offset + n].tolist())
            offset += n
        start = stop
    return results


def _probes(case: dict, schema: str) -> list[tuple[str, int, str, str, str]]:
    """(section, prompt index, prompt, target key, target) of everything measured for one case;
    the key is `target_new`, `target_true` or `locality` (a locality prompt's own answer)."""
    rewrite = case["requested_rewrite"]
    targets = [(k, rewrite[k]["str"]) for k in ("target_new", "target_true") if k in rewrite]
    prompts = [("rewrite", [rewrite["prompt"].format(rewrite["subject"])]), ("paraphrase", case["paraphrase_prompts"])]
    if schema == "counterfact":
        prompts.append(("neighborhood", case["neighborhood_prompts"]))
    out = [(section, j, p, k, t) for section, ps in prompts for j, p in enumerate(ps) for k, t in targets]
    if schema != "counterfact":  # the locality answer, and the new target where the paper's comparison is possible
        new = [("target_new", rewrite["target_new"]["str"])] if "target_true" in rewrite else []
        out += [("neighborhood", j, p["prompt"], k, t) for j, p in enumerate(case["neighborhood_prompts"])
                for k, t in [("locality", p["target"]), *new]]
    return out


def score_cases(model, tok, cases: Sequence[dict], schema: str, batch_tokens: int = 4096) -> list[dict]:
    """Per case, the original's layout: `{section}_prompts_probs` (a list per prompt of
    `{"target_new": nll, "target_true": nll}`; a locality prompt has only `target_true`, its
    answer) and `{section}_prompts_correct` (CounterFact: per prompt, whether every token of the
    right target is the argmax; ZsRE/EasyEdit: per answer token, flattened over the prompts)."""
    probes = [(c, *probe) for c, case in enumerate(cases) for probe in _probes(case, schema)]
    scores = score_targets(model, tok, [p[3] for p in probes], [p[5] for p in probes], batch_tokens)
    out = [{f"{s}_prompts_{kind}": [] for kind in ("probs", "correct") for s in SECTIONS} for _ in cases]
    for (c, section, j, _, key, _), (nll, hits) in zip(probes, scores):
        probs = out[c][f"{section}_prompts_probs"]
        if j == len(probs):
            probs.append({})
        probs[j]["target_true" if key == "locality" else key] = nll
        correct = out[c][f"{section}_prompts_correct"]
        if schema == "counterfact":
            if key == ("target_true" if section == "neighborhood" else "target_new"):
                correct.append(all(hits))
        elif key == ("locality" if section == "neighborhood" else "target_new"):
            correct.extend(hits)  # the new answer (rewrite, paraphrase) or the locality answer
    return out


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def summarize(results: Sequence[dict], schema: str) -> dict:
    """`{"rates", "nll_rates", "margins", "accuracy"}`, each `{efficacy, paraphrase, neighborhood}`:
    means over each case's prompts, then over the cases that have such prompts (None if none).

    `nll_rates` and `margins`: the paper's CounterFact comparison of NLL(new) and NLL(true) (at a
    locality prompt, true = its answer), wherever both were scored (CounterFact; EasyEdit records
    with `ground_truth`). `accuracy`: token accuracies (EasyEdit's, ZsRE's) or, for CounterFact,
    whether every token of the right target is the argmax. `rates`: the schema's own, `nll_rates`
    for CounterFact, `accuracy` otherwise."""
    nll_rates, margins, accuracy = {}, {}, {}
    for rate, section in zip(RATES, SECTIONS):
        accuracy[rate] = _mean(_mean(r[f"{section}_prompts_correct"]) for r in results
                               if r[f"{section}_prompts_correct"])
        sign = -1 if section == "neighborhood" else 1
        pairs = [[p for p in r[f"{section}_prompts_probs"] if "target_new" in p and "target_true" in p]
                 for r in results]
        pairs = [ps for ps in pairs if ps]
        nll_rates[rate] = _mean(_mean(sign * (p["target_true"] - p["target_new"]) > 0 for p in ps) for ps in pairs)
        margins[rate] = _mean(_mean(sign * (math.exp(-p["target_new"]) - math.exp(-p["target_true"])) for p in ps)
                              for ps in pairs)
    rates = nll_rates if schema == "counterfact" else accuracy
    return {"rates": rates, "nll_rates": nll_rates, "margins": margins, "accuracy": accuracy}


DEFINITIONS = {
    "counterfact": "efficacy/paraphrase: share of rewrite/paraphrase prompts with NLL(new) < NLL(true); "
                   "neighborhood: share of neighbourhood prompts with NLL(true) < NLL(new); NLL = mean per-token "
                   "negative log-likelihood of ' ' + target; margins: mean p(new) - p(true) (flipped for "
                   "neighborhood), p = exp(-NLL); accuracy: share of prompts whose right target is the argmax at "
                   "every token. Means over each case's prompts, then over cases.",
    "zsre": "token-level accuracy (argmax, teacher forced) of the new answer at the rewrite (efficacy) and "
            "rephrase (paraphrase) prompts and of the locality answer (neighborhood); means over each case's "
            "tokens, then over cases.",
}
DEFINITIONS["easyedit"] = DEFINITIONS["zsre"] + (
    " nll_rates (records with ground_truth): the paper's CounterFact rates, efficacy/paraphrase = share of "
    "rewrite/rephrase prompts with NLL(new) < NLL(ground truth), neighborhood = share of locality prompts with "
    "NLL(locality answer) < NLL(new).")
FLUENCY_DEFINITION = ("mean over the rewrite prompts of the n-gram entropy of a greedy generation (prompt and "
                      "continuation, {max_length} tokens at most), as the original's n_gram_entropy: "
                      "2/3 * H(2-grams) + 4/3 * H(3-grams), averaged, H in bits over word and punctuation tokens")


# -- fluency ---------------------------------------------------------------------------------
def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """The original's `compute_n_gram_entropy`: the mean over n of weight_n * the entropy (bits)
    of the n-gram frequencies of `text`'s words and punctuation marks (a regular expression in
    place of NLTK's `word_tokenize`)."""
    import re
    from collections import Counter

    words = re.findall(r"\w+|[^\w\s]", text)
    entropies = []
    for n, weight in zip(ns, weights):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropies.append(weight * -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0)
    return sum(entropies) / len(entropies)


def generation_entropy(model, tok, prompts: Sequence[str], max_length: int = 100, batch_size: int = 64) -> float:
    """Mean `ngram_entropy` of greedy generations from `prompts` (`generation_entropies`)."""
    return _mean(generation_entropies(model, tok, prompts, max_length, batch_size))


def generation_entropies(model, tok, prompts: Sequence[str], max_length: int = 100, batch_size: int = 64
                         ) -> list[float]:
    """Per prompt, `ngram_entropy` of its greedy generation (`greedy_generations`)."""
    return [ngram_entropy(text) for text in greedy_generations(model, tok, prompts, max_length, batch_size)]


@torch.no_grad()
def greedy_generations(model, tok, prompts: Sequence[str], max_length: int = 100, batch_size: int = 64
                       ) -> list[str]:
    """Per prompt, its greedy generation, prompt included (`max_length` tokens at most, as the
    original's `max_out_len`), run in left-padded batches of prompts of similar length."""
    device = model.get_input_embeddings().weight.device
    pad = pad_token_id(tok)
    ids = tok(list(prompts))["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # little padding, few steps past max_length
    texts: list[str] = [""] * len(ids)
    for start in range(0, len(ids), batch_size):
        batch = order[start:start + batch_size]
        rows = [ids[i] for i in batch]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max(1, max_length - min(len(r) for r in rows)), pad_token_id=pad)
        for i, row, r in zip(batch, out.tolist(), rows):
            texts[i] = tok.decode(row[width - len(r):width - len(r) + max(max_length, len(r) + 1)],
                                  skip_special_tokens=True)
    return texts


# -- sequential editing and evaluation -------------------------------------------------------
def rewrite_success(results: Sequence[dict]) -> list[bool | None]:
    """Per case: NLL(new) < NLL(true) at the rewrite prompt (None without a true target)."""
    out = []
    for r in results:
        probs = r["rewrite_prompts_probs"][0]
        out.append(probs["target_new"] < probs["target_true"] if "target_true" in probs else None)
    return out


def evaluate_edits(editor, cases: Sequence[dict], schema: str, batch_size: int, *, before: bool = True,
                   curve: bool = False, curve_every: int | None = None, fluency: bool = False,
                   fluency_records: int | None = None, generation_length: int = 100, batch_tokens: int = 4096,
                   probe=None, probe_every: int | None = None, checkpoints=None, resume: bool = False,
                   stream_fingerprints: dict | None = None, log=print) -> tuple[dict, list[dict]]:
    """Edit `cases` with `editor` in sequential batches of `batch_size`, then score every case,
    as the original's `evaluate.py` does (with `before`, also before the first edit; with
    `fluency`, the n-gram entropy of greedy generations from the rewrite prompts after the edits,
    and before them with `before`).

    With `curve`: every case before the first edit (the 0-edit point) and the cases edited so far
    after every `curve_every` edits (default: every batch), each point with both metric families,
    each edited weight's ||W - W_0||_F and, with `fluency_records`, the fluency of the first that
    many cases; and `retention`, the share of the first batch's successful rewrites (NLL(new) <
    NLL(true) right after their batch) that still hold at the end. `probe(model, tok) -> dict` (general
    capability, perplexity) runs before the first edit, every `probe_every` edits and at the end.

    `checkpoints`: a directory where the stream (`stream.EditStream`) checkpoints the edited
    weights, editor state and everything measured so far after every batch; with `resume` it
    continues there after the last finished batch, and the result equals an uninterrupted run's.

    Returns (metrics, per-case records `{"case_id", "requested_rewrite", "num_edits", "post",
    ["pre"]}`); metrics holds rates, margins, accuracies, seconds and peak memory per phase.
    """
    from .sharding import current_shard
    from .stream import EditStream, bases_fingerprint, weight_changes
    from .timing import Phases, edit_progress, silent

    shard = current_shard(editor.distributed)
    writes = shard is None or shard.rank == 0
    if not writes:
        log = silent
    n = len(cases)
    requests = [edit_request(c) for c in cases]
    curve_every = curve_every or batch_size
    if curve_every % batch_size or (probe is not None and (probe_every or batch_size) % batch_size):
        raise ValueError(f"curve_every and probe_every must be multiples of the batch size {batch_size}")
    stream = None
    if checkpoints is not None:
        settings = dict(schema=schema, batch_size=batch_size, before=before, curve=curve, curve_every=curve_every,
                        fluency=fluency, fluency_records=fluency_records, generation_length=generation_length,
                        probe_every=probe_every if probe is not None else None, cases=list(cases),
                        projector=bases_fingerprint(editor.solver.bases), **(stream_fingerprints or {}))
        if resume:
            options = dict(z_batch_size=editor.z_batch_size, progress=editor.progress, solver=editor.solver.method,
                           solve_dtype=editor.solver.dtype, distributed=editor.distributed)
            stream = EditStream.resume(checkpoints, editor.model, editor.tok, editor.hparams, requests, options,
                                       writes=writes, **settings)
            editor = stream.editor
            log(f"resuming after {stream.done} of {n} edits")
        else:
            stream = EditStream.start(checkpoints, editor, requests, writes=writes, **settings)
    model, tok = editor.model, editor.tok
    names = [editor.hparams.rewrite_module_tmp.format(layer) for layer in editor.hparams.layers]
    unedited = stream.unedited if stream else {name: model.get_submodule(name).weight.detach().clone()
                                               for name in names}

    def weight_change() -> dict[str, float]:
        return weight_changes(model, unedited)

    state = dict(stream.progress) if stream and stream.progress else {
        "seconds": {}, "peak": {}, "entropy": {}, "points": [], "probes": [], "first_batch": None}
    seconds, peak = state["seconds"], state["peak"]
    phases = Phases(model.get_input_embeddings().weight.device, seconds, peak)
    rewrite_prompts = [c["requested_rewrite"]["prompt"].format(c["requested_rewrite"]["subject"]) for c in cases]
    fluency_sample = rewrite_prompts[:fluency_records] if fluency and fluency_records else []

    def score(some_cases: Sequence[dict]) -> list[dict]:  # with ranks, each scores its slice
        def compute(part):
            return score_cases(model, tok, part, schema, batch_tokens)

        return compute(some_cases) if shard is None else shard.map_slices(compute, some_cases, "scores of the cases")

    def fluency_of(prompts: Sequence[str]) -> float:  # `generation_entropy`; with ranks, each generates its slice
        def compute(part):
            return generation_entropies(model, tok, part, generation_length)

        return _mean(compute(prompts) if shard is None else shard.map_slices(compute, prompts, "fluency"))

    def point(n_edits: int, results: list[dict]) -> dict:
        rates = summarize(results, schema)
        out = {"n_edits": n_edits, **rates["rates"], "nll_rates": rates["nll_rates"],
               "accuracy": rates["accuracy"], "weight_change": weight_change()}
        if fluency_sample:
            out["fluency"] = fluency_of(fluency_sample)
        return out

    def run_probe(n_edits: int) -> None:
        with phases("evaluate probes"):  # with ranks: rank 0 measures, the others wait for its result
            result = probe(model, tok) if writes else None
            if shard is not None:
                result = shard.gather_objects(result, "general capability and perplexity")[0]
            state["probes"].append({"n_edits": n_edits, **result})
        log(f"after {n_edits} edits: " + ", ".join(f"{k} {_brief(v)}" for k, v in state["probes"][-1].items()
                                                   if k != "n_edits"))

    def measured() -> None:  # each measurement of the unedited model is kept as soon as it is done
        if stream:
            stream.save(0, state)

    with phases("evaluate before"):  # the curve starts at 0 edits: every case on the unedited model
        if "pre" not in state and (before or curve):
            log(f"unedited model: scoring {n} cases")
            state["pre"] = score(cases)
            measured()
        if fluency and before and "before" not in state["entropy"]:
            log(f"unedited model: fluency of {n} greedy generations")
            state["entropy"]["before"] = fluency_of(rewrite_prompts)
            measured()
        if curve and not state["points"]:
            state["points"].append(point(0, state["pre"]))
            measured()
    if probe is not None and not state["probes"]:
        log("unedited model: general capability and perplexity")
        run_probe(0)
        measured()
    with edit_progress(n, stream.done if stream else 0, disable=not writes) as bar:
        for start, stop in (stream.batches(batch_size) if stream else
                            ((i, min(i + batch_size, n)) for i in range(0, n, batch_size))):
            for name, value in editor.edit(requests[start:stop], peak_bytes=peak).items():
                seconds[name] = seconds.get(name, 0.0) + value
            bar.update(stop - start)
            log(f"edits {start + 1}-{stop} of {n}: " + ", ".join(
                f"{k} {v:.1f}s" for k, v in seconds.items() if not k.startswith("evaluate")))
            at_point = curve and stop < n and stop % curve_every == 0
            if at_point or (curve and state["first_batch"] is None):  # one scoring serves both
                with phases("evaluate curve"):
                    results = score(cases[:stop])
                    if state["first_batch"] is None:
                        state["first_batch"] = rewrite_success(results)
                    if at_point:
                        state["points"].append(point(stop, results))
            if at_point:
                log(f"after {stop} edits: " + ", ".join(f"{k} {_brief(v)}" for k, v in state["points"][-1].items()
                                                        if k in (*RATES, "fluency")))
            if probe is not None and stop < n and stop % (probe_every or batch_size) == 0:
                run_probe(stop)
            if stream:
                stream.save(stop, state)
    with phases("evaluate"):
        log(f"after {n} edits: scoring {n} cases" + (f" and fluency of {n} greedy generations" if fluency else ""))
        post = score(cases)
        if fluency:
            state["entropy"]["after"] = fluency_of(rewrite_prompts)
    if probe is not None and (not state["probes"] or state["probes"][-1]["n_edits"] != n):
        run_probe(n)
    summary = summarize(post, schema)
    metrics = {"schema": schema, "definition": DEFINITIONS[schema], "n_cases": n, "batch_size": batch_size,
               **summary, "seconds": seconds, "seconds_per_edit": {k: v / n for k, v in seconds.items()},
               "peak_memory_bytes": peak, "weight_change": weight_change()}
    pre = state.get("pre")
    if before:
        metrics["before"] = summarize(pre, schema)
    if curve:
        final = {"n_edits": n, **summary["rates"], "nll_rates": summary["nll_rates"], "accuracy": summary["accuracy"],
                 "weight_change": metrics["weight_change"]}
        if fluency_sample:
            final["fluency"] = fluency_of(fluency_sample)
        metrics["curve"] = [*state["points"], final]
        after = rewrite_success(post)
        successes = [i for i, ok in enumerate(state["first_batch"] or []) if ok]
        held = sum(bool(after[i]) for i in successes)
        metrics["retention"] = {"first_batch_successes": len(successes), "still_held": held,
                                "rate": held / len(successes)} if successes else None
    if probe is not None:
        metrics["probes"] = state["probes"]
    if fluency:
        metrics["fluency"] = {**state["entropy"], "definition": FLUENCY_DEFINITION.format(max_length=generation_length)}
        if fluency_sample:
            metrics["fluency"]["curve_sample"] = len(fluency_sample)

    def with_rates(scores):
        return {**scores, "rates": summarize([scores], schema)["rates"]}

    records = [{"case_id": c["case_id"], "requested_rewrite": c["requested_rewrite"], "num_edits": batch_size,
                "post": with_rates(post[i]), **({"pre": with_rates(pre[i])} if before else {})}
               for i, c in enumerate(cases)]
    return metrics, records


def _brief(value) -> str:
    """A float to 3 decimals; a dict of dicts (general capability per task) as each entry's `f1_new` / `f1`."""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
        return ", ".join(f"{k} f1_new {v.get('f1_new', float('nan')):.2f} f1 {v.get('f1', float('nan')):.2f}"
                         for k, v in value.items())
    return str(value)


def versions() -> dict[str, str]:
    import platform

    import transformers

    from . import __version__

    return {"alphaedit_fast": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def write_evaluation(out_dir, metrics: dict, records: Sequence[dict]) -> list[Path]:
    """`metrics.json`, `cases.jsonl` and, when metrics hold a curve, `curve.png` in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "metrics.json", out_dir / "cases.jsonl"]
    paths[0].write_text(json.dumps(metrics, indent=1, default=str))
    paths[1].write_text("".join(json.dumps(r) + "\n" for r in records))
    if "curve" in metrics:
        paths.append(plot_curve(metrics, out_dir / "curve.png"))
    return paths


def plot_curve(metrics: dict, path) -> Path:
    """Each rate against the number of edits; with probes, general capability (each task's
    log-probability answer, f1_new) and perplexity beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    probes = metrics.get("probes", [])
    panels = 1 + any("general" in p for p in probes) + any("perplexity" in p for p in probes)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    xs = [p["n_edits"] for p in metrics["curve"]]
    for rate in RATES:
        ys = [p[rate] for p in metrics["curve"]]
        if any(y is not None for y in ys):
            ax.plot(xs, [math.nan if y is None else y for y in ys], marker=".", label=rate)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{metrics['schema']}: sequential batches of {metrics['batch_size']}")
    extra = iter(axes[0][1:])
    if any("general" in p for p in probes):
        general = next(extra)
        tasks = next(p["general"] for p in probes if "general" in p)
        for task in tasks:
            points = [(p["n_edits"], p["general"][task]["f1_new"]) for p in probes if "general" in p]
            general.plot(*zip(*points), marker=".", label=task)
        general.set_title("general capability (glue_eval f1_new)")
        general.set_ylim(-0.02, 1.02)
    if any("perplexity" in p for p in probes):
        held_out = next(extra)
        held_out.plot(*zip(*[(p["n_edits"], p["perplexity"]) for p in probes if "perplexity" in p]), marker=".")
        held_out.set_title("held-out perplexity")
    for ax in axes[0]:
        ax.set_xlabel("edits")
        ax.set_xlim(0, max(xs) * 1.04 or 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
