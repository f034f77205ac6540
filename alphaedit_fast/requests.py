"""Edit requests: validation and normalisation into the original's dict layout."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from .errors import InvalidRequestError


def normalize_request(request: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """A validated deep copy of `request` with `target_new = {"str": " target"}`.

    Accepts `target_new` as a string or `{"str": ...}`; a target without a leading space gets
    one (the original does the same so that it tokenises as a separate word).
    """
    if not isinstance(request, dict):
        raise InvalidRequestError(f"request {index} must be a dict, got {type(request).__name__}")
    out = copy.deepcopy(request)
    where = f"request {index}" + (f" (case_id {out['case_id']})" if "case_id" in out else "")
    prompt, subject = out.get("prompt"), out.get("subject")
    if not isinstance(prompt, str) or prompt.count("{}") != 1:
        raise InvalidRequestError(
            f"{where}: prompt {prompt!r} must contain exactly one '{{}}' marking the subject, "
            "e.g. 'The mother tongue of {} is'"
        )
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidRequestError(f"{where}: subject must be a non-empty string, got {subject!r}")
    target = out.get("target_new")
    target = target.get("str") if isinstance(target, dict) else target
    if not isinstance(target, str) or not target.strip():
        raise InvalidRequestError(f"{where}: target_new must be a non-empty string, got {target!r}")
    if target[0] != " ":
        target = " " + target
    out["target_new"] = {**(out["target_new"] if isinstance(out["target_new"], dict) else {}), "str": target}
    return out


def normalize_requests(requests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate every request before any work starts; returns copies."""
    if isinstance(requests, dict):
        requests = [requests]
    if not requests:
        raise InvalidRequestError("no requests given")
    return [normalize_request(r, i) for i, r in enumerate(requests)]


def target_token_ids(tok, target: str) -> list[int]:
    """Token ids of a target string without a leading BOS/UNK (as the original)."""
    ids = list(tok(target)["input_ids"])
    if ids and ids[0] in (tok.bos_token_id, tok.unk_token_id):
        ids = ids[1:]
    if not ids:
        raise InvalidRequestError(f"target {target!r} produces no tokens")
    return ids
