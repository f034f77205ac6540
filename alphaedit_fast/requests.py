"""Edit requests: validation and normalisation into the original's dict layout."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InvalidRequestError, RequestFileError
from .positions import split_template


def describe(request: Mapping[str, Any], index: int) -> str:
    """How errors name a request: `request 3 (case_id 17)`."""
    return f"request {index}" + (f" (case_id {request['case_id']})" if "case_id" in request else "")


def field(record: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted `path` of a file record (`"requested_rewrite.target_new.str"`); a missing
    field raises InvalidRequestError `requested_rewrite.subject is missing`."""
    value: Any = record
    keys = path.split(".")
    for depth, key in enumerate(keys):
        if not isinstance(value, Mapping):
            raise InvalidRequestError(f"{'.'.join(keys[:depth])} must be a JSON object with {key!r}, "
                                      f"got {type(value).__name__}")
        if key not in value:
            raise InvalidRequestError(f"{'.'.join(keys[:depth + 1])} is missing")
        value = value[key]
    return value


def normalize_request(request: Mapping[str, Any], index: int | None = 0) -> dict[str, Any]:
    """A validated deep copy of `request` with `target_new = {"str": " target"}`.

    Accepts `target_new` as a string or `{"str": ...}`; a target without a leading space gets
    one (the original does the same so that it tokenises as a separate word).
    """
    if not isinstance(request, Mapping):
        raise InvalidRequestError(f"{describe({}, index or 0)} must be a dict with prompt, subject and target_new, "
                                  f"got {type(request).__name__}")
    out = copy.deepcopy(dict(request))
    # a file record (index None) is already named by its file and line
    lead = "" if index is None else f"{describe(out, index)}: "
    prompt, subject = out.get("prompt"), out.get("subject")
    if not isinstance(prompt, str):
        raise InvalidRequestError(f"{lead}prompt must be a string with one '{{}}' marking the subject, "
                                  f"e.g. 'The mother tongue of {{}} is'; got {prompt!r}")
    split_template(prompt, f"{lead}prompt")
    if not prompt.replace("{}", "").strip():
        raise InvalidRequestError(f"{lead}prompt {prompt!r} holds nothing but the subject; "
                                  "give the relation too, e.g. 'The mother tongue of {} is'")
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidRequestError(f"{lead}subject must be a non-empty string, got {subject!r}")
    target = out.get("target_new")
    target = target.get("str") if isinstance(target, Mapping) else target
    if not isinstance(target, str) or not target.strip():
        raise InvalidRequestError(f"{lead}target_new must be a non-empty string, got {target!r}")
    if "{" in target or "}" in target:  # it is appended to the prompt before the subject is filled in
        raise InvalidRequestError(f"{lead}target_new {target!r} must not contain braces")
    if target[0] != " ":
        target = " " + target
    out["target_new"] = {**(out["target_new"] if isinstance(out["target_new"], Mapping) else {}), "str": target}
    return out


def normalize_requests(requests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate every request before any work starts; returns copies."""
    if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Sequence):
        hint = " (wrap a single request in a list)" if isinstance(requests, Mapping) else ""
        raise InvalidRequestError(f"requests must be a list of request dicts{hint}, got {type(requests).__name__}")
    if not requests:
        raise InvalidRequestError("no requests given")
    return [normalize_request(r, i) for i, r in enumerate(requests)]


KL_PROMPT = "{} is a"  # the prompt whose next-token distribution the KL term keeps


def z_templates(prompt: str, suffix: str, context_templates) -> list[str]:
    """The templates (subject still `{}`) of one request's z optimisation: each context template
    filled with the prompt plus `suffix` (the target's tokens but the last, decoded), then KL_PROMPT."""
    return [ctx.format(prompt) + suffix for group in context_templates for ctx in group] + [KL_PROMPT]


def target_token_ids(tok, target: str) -> list[int]:
    """Token ids of a target string without a leading BOS/UNK (as the original)."""
    return targets_token_ids(tok, [target])[0]


def targets_token_ids(tok, targets: Sequence[str]) -> list[list[int]]:
    """`target_token_ids` of each target, in one batched tokenizer call."""
    drop = (tok.bos_token_id, tok.unk_token_id)
    out = []
    for target, ids in zip(targets, tok(list(targets))["input_ids"]):
        ids = list(ids[1:] if ids and ids[0] in drop else ids)
        if not ids:
            raise InvalidRequestError(f"target {target!r} produces no tokens")
        out.append(ids)
    return out


def _counterfact_record(record: dict, index: int) -> dict:
    out = {
        "case_id": record.get("case_id", index),
        "prompt": field(record, "requested_rewrite.prompt"),
        "subject": field(record, "requested_rewrite.subject"),
        "target_new": {"str": field(record, "requested_rewrite.target_new.str")},
    }
    if "target_true" in record["requested_rewrite"]:
        out["target_true"] = {"str": field(record, "requested_rewrite.target_true.str")}
    for key in ("paraphrase_prompts", "neighborhood_prompts"):
        if key in record:
            out[key] = list(record[key])
    return out


def _easyedit_record(record: dict, index: int) -> dict:
    prompt, subject = field(record, "prompt"), field(record, "subject")
    if "{}" not in prompt:  # EasyEdit prompts hold the subject itself
        at = prompt.rfind(subject)
        if not subject or at < 0:
            raise InvalidRequestError(f"subject {subject!r} does not occur in prompt {prompt!r}")
        prompt = prompt[:at] + "{}" + prompt[at + len(subject):]
    target = field(record, "target_new")  # EasyEdit's string, or the original's {"str": ...}
    out = {"case_id": record.get("case_id", index), "prompt": prompt, "subject": subject,
           "target_new": dict(target) if isinstance(target, Mapping) else {"str": target}}
    if "ground_truth" in record:
        out["target_true"] = {"str": record["ground_truth"]}
    if "rephrase_prompt" in record:
        rephrase = record["rephrase_prompt"]
        out["paraphrase_prompts"] = [rephrase] if isinstance(rephrase, str) else list(rephrase)
    if "locality_prompt" in record:
        locality = record["locality_prompt"]
        out["neighborhood_prompts"] = [locality] if isinstance(locality, str) else list(locality)
        if "locality_ground_truth" in record:
            out["neighborhood_target"] = record["locality_ground_truth"]
    return out


def load_requests(path) -> list[dict[str, Any]]:
    """Edit requests from a JSON list or JSONL file in the CounterFact schema
    (`requested_rewrite` with prompt, subject, target_new.str, target_true.str, plus
    `paraphrase_prompts`, `neighborhood_prompts`) or EasyEdit's flat one (prompt, subject,
    target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth).

    Returns validated requests in the original's layout (extra keys kept). Any problem raises
    RequestFileError naming the file, and for JSONL the line (counted in the file, from 1).
    """
    return [_request(record, index, where) for index, (where, record) in enumerate(read_records(path))]


def read_records(path) -> list[tuple[str, Any]]:
    """(where, record) for every record of a JSON list/object or JSONL file; `where` names the
    file and the JSONL line (from 1) or the JSON record (from 1, with its list index) for errors."""
    from pathlib import Path

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RequestFileError(f"cannot read requests file {path}: {err.strerror or err}") from None
    if b"\x00" in data:
        raise RequestFileError(f"{path} is a binary file, not JSON or JSONL text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RequestFileError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    if path.suffix == ".jsonl":  # split on "\n" only: str.splitlines also breaks inside JSON strings
        records = [(f"{path}:{number}", _parse(line, path, number))
                   for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    else:
        parsed = _parse(text, path)
        records = [(f"{path}, record {i + 1} (index {i})", r)
                   for i, r in enumerate(parsed if isinstance(parsed, list) else [parsed])]
    if not records:
        raise RequestFileError(f"{path} holds no requests")
    return records


def _parse(text: str, path, line: int | None = None):
    """JSON of a whole file, or of its line `line` (JSONL)."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestFileError(f"{path}:{line or err.lineno}:{err.colno}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise RequestFileError(f"{path}{f':{line}' if line else ''}: JSON nested too deeply") from None


def _request(record, index: int, where: str) -> dict[str, Any]:
    """One file record as a validated request; errors name `where` (file and line or record)."""
    try:
        if not isinstance(record, dict):
            raise TypeError(f"not a JSON object but {type(record).__name__}")
        convert = _counterfact_record if "requested_rewrite" in record else _easyedit_record
        return normalize_request(convert(record, index), None)
    except (KeyError, TypeError, AttributeError) as err:
        raise RequestFileError(
            f"{where}: malformed record ({type(err).__name__}: {err}); expected the CounterFact schema "
            "(requested_rewrite.prompt/subject/target_new.str) or EasyEdit's (prompt, subject, target_new)"
        ) from None
    except RecursionError:
        raise RequestFileError(f"{where}: record nested too deeply") from None
    except InvalidRequestError as err:
        raise RequestFileError(f"{where}: {err}") from None
