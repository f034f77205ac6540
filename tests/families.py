"""Every causal-LM model type of the installed transformers, built tiny and edited both ways.

`outcome(model_type)` builds the type from `tiny_model_config` with the config fields that change
the model's output set away from their defaults (`NON_DEFAULT`), edits it with the fast path and
with `alphaedit_fast.reference`, and says what happened: exact (and whether z steps ran
suffix-only), refused with a typed error, not buildable tiny (with the reason), or a failure.
`python -m tests.families` writes the table to docs/families.md.
"""

from __future__ import annotations

import copy
import functools
import re
import warnings
from dataclasses import dataclass

import torch
import transformers

from alphaedit_fast import AlphaEditHyperParams, apply_AlphaEdit_to_model
from alphaedit_fast.arch import key_width
from alphaedit_fast.errors import ModelStructureError
from alphaedit_fast.reference import apply_alphaedit_ref
from alphaedit_fast.tiny import tiny_model_config, tiny_tokenizer_for

from .conftest import CONTEXT_TEMPLATES, REQUESTS, edit_rtol

MAX_PARAMETERS = 20_000_000  # a type still larger at the tiny shape has fields tiny_model_config does not shrink

# Config fields that change what the model outputs, set away from their defaults wherever a type
# has them: what the fast path must reproduce (head transforms, windows, partial rotary).
NON_DEFAULT = {
    "logit_scale": 0.5,  # Cohere: logits * scale
    "logits_scaling": 8.0,  # Granite: logits / scaling
    "lm_head_multiplier": 0.5,  # Falcon-H1
    "final_logit_softcapping": 5.0,  # Gemma 2/3: cap * tanh(logits / cap)
    "attn_logit_softcapping": 5.0,
    "sliding_window": 3,  # shorter than every prompt
    "use_sliding_window": True,
    "partial_rotary_factor": 0.5,
}
MIXED_LAYER_TYPES = ["sliding_attention", "full_attention"] * 2


@dataclass(frozen=True)
class Outcome:
    """What editing one model type did. kind: "exact", "refused", "not built" or "failed"."""

    kind: str
    detail: str = ""  # the refusal or reason, the whole-row reason, or what failed
    suffix_only: bool | None = None  # for "exact": whether the z steps ran suffix-only
    error: float | None = None  # for "exact": the largest relative update difference
    experts: bool = False  # whether an edited layer's MLP is a mixture of experts


def causal_lm_types() -> list[str]:
    """The model types of the installed transformers' causal-LM mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def non_default_overrides(model_type: str) -> dict:
    """`NON_DEFAULT` restricted to the fields `model_type`'s default config has (rope parameters
    too), with sliding and global layers mixed where the type has both."""
    from transformers import CONFIG_MAPPING

    defaults = CONFIG_MAPPING[model_type]().to_dict()
    overrides = {k: v for k, v in NON_DEFAULT.items()
                 if k in defaults and (isinstance(defaults[k], (int, float)) or k == "final_logit_softcapping")}
    if "logit_scale" in overrides and not isinstance(defaults["logit_scale"], float):
        del overrides["logit_scale"]  # MPT's attention logit scale, not an output transform
    rope = defaults.get("rope_parameters")
    if isinstance(rope, dict) and "partial_rotary_factor" in rope:
        overrides["rope_parameters"] = {**rope, "partial_rotary_factor": 0.5}
    if {"sliding_attention", "full_attention"} <= set(defaults.get("layer_types") or []):
        overrides["layer_types"] = MIXED_LAYER_TYPES
    return overrides


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return re.sub(r"\s+", " ", " ".join(text[:2]))[:160]


def _build(model_type: str, changed: bool):
    """(model, tokenizer) of `model_type` at the tiny shape, with the `NON_DEFAULT` fields if
    `changed`, whose own forward runs; else why not."""
    from transformers import AutoModelForCausalLM

    try:
        config = tiny_model_config(model_type, **(non_default_overrides(model_type) if changed else {}))
        with torch.device("meta"):
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if size > MAX_PARAMETERS:
            return f"{size / 1e6:.0f}M parameters at the tiny shape"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        tok = tiny_tokenizer_for(model_type)
        with torch.no_grad():
            model(**tok(["The mother tongue of Danielle Darrieux is"], return_tensors="pt"))
        return model, tok
    except Exception as exc:  # noqa: BLE001 - the reason is the outcome
        return _first_line(exc)


@functools.cache
def outcome(model_type: str) -> Outcome:
    """Build `model_type` tiny, edit it fast and by the reference (dense P = I), compare."""
    note = ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = _build(model_type, changed=True)
        if isinstance(built, str):
            built = _build(model_type, changed=False)  # its default config, if the changed fields break the model
            note = "" if isinstance(built, str) else "default config (its own forward fails with the changed fields)"
        if isinstance(built, str):
            return Outcome("not built", built)
        model, tok = built
        hparams = None
        try:
            hparams = AlphaEditHyperParams.for_model(model, layers=[1, 2], L2=10.0, v_lr=0.5, v_num_grad_steps=5)
            # dense P = I of the key width (edited layers the engine refuses, e.g. routed experts, may have none)
            rewrite = re.compile(re.escape(hparams.rewrite_module_tmp).replace(r"\{\}", r"\d+"))
            d_k = next(key_width(module) for name, module in model.named_modules() if rewrite.fullmatch(name))
            P = torch.eye(d_k).repeat(2, 1, 1)
            reference = copy.deepcopy(model)
            before = {name: module.weight.detach().clone() for name, module in model.named_modules()
                      if rewrite.fullmatch(name)}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                apply_AlphaEdit_to_model(model, tok, copy.deepcopy(REQUESTS), hparams, P=P,
                                         context_templates=CONTEXT_TEMPLATES)
        except ModelStructureError as exc:
            return Outcome("refused", _joined(str(exc).split(";")[0].split(": ")[0][:160], note),
                           experts=_edits_experts(model, hparams))
        except Exception as exc:  # noqa: BLE001
            return Outcome("failed", "fast path: " + _first_line(exc))
        try:
            updates, _ = apply_alphaedit_ref(reference, tok, copy.deepcopy(REQUESTS), hparams, CONTEXT_TEMPLATES, P,
                                             torch.zeros_like(P))
        except Exception as exc:  # noqa: BLE001
            return Outcome("failed", "reference: " + _first_line(exc))
    errors = []
    for layer in hparams.layers:
        name = hparams.rewrite_module_tmp.format(layer)
        fast = model.get_submodule(name).weight.detach() - before[name]
        errors.append(float((fast - updates[layer].reshape(fast.shape)).norm() / updates[layer].norm()))
    rtol = edit_rtol(model, tok, REQUESTS, hparams)
    if not max(errors) <= rtol:
        return Outcome("failed", f"fast differs from the reference by {max(errors):.2g} > {rtol:.2g}")
    whole_rows = [str(w.message) for w in caught if "z steps are not exact" in str(w.message)]
    detail = re.sub(r".*\((they .*)\); running.*", r"\1", whole_rows[0]) if whole_rows else ""
    return Outcome("exact", _joined(detail, note), suffix_only=not whole_rows, error=max(errors))


def _edits_experts(model, hparams) -> bool:
    from alphaedit_fast.arch import has_experts

    if hparams is None:  # refused by detection: anywhere in the model
        return has_experts(model)
    mlps = [hparams.mlp_module_tmp.format(layer) for layer in hparams.layers]
    return any(has_experts(module) for name, module in model.named_modules() if name in mlps)


def _joined(*parts: str) -> str:
    return "; ".join(part for part in parts if part)


def table(types: list[str] | None = None) -> str:
    """The markdown table of `outcome` for every type (default: `causal_lm_types()`)."""
    types = causal_lm_types() if types is None else types
    rows = [f"Generated by `python -m tests.families` (tests/test_families.py checks it) with transformers "
            f"{transformers.__version__}: every model type of its causal-LM mapping, built tiny (4 layers, width "
            f"64, experts and low-rank widths shrunk) with {', '.join(f'`{k}`' for k in NON_DEFAULT)} set away "
            "from their defaults where the type has them, and edited at layers 1-2 by the fast path and by "
            "`alphaedit_fast.reference` (dense P = I; the weight updates must agree within the bound fp32 and the "
            "accumulation length give).", "",
            "- **exact**: the fast edit equals the reference's. *suffix-only*: the z steps ran the suffix tokens "
            "only, against cached prefixes (the probe `values.fast_steps_exact` proved them); *whole rows*: the "
            "probe found them inexact or failing (the reason follows), so the steps ran whole rows, as exact and "
            "slower.",
            "- **refused**: a `ModelStructureError` before any weight changes: no dense MLP output projection "
            "where the templates look (encoders, state-space models), mixture-of-experts MLPs at the edited "
            "layers (the error names the dense layers, which edit), blocks that run more than once or hand the "
            "next block more than the hidden state.",
            "- **not built**: the type cannot be built at the tiny shape, or its own forward fails there (the "
            "reason follows): untested, not known to be wrong.", "",
            "| model type | outcome | z steps / reason |", "|---|---|---|"]
    for model_type in types:
        result = outcome(model_type)
        if result.kind == "exact":
            how = "suffix-only" if result.suffix_only else "whole rows"
            rows.append(f"| `{model_type}` | exact | {_joined(how, result.detail)} |")
        else:
            rows.append(f"| `{model_type}` | {result.kind} | {result.detail.replace('|', '/')} |")
    counts = {kind: sum(outcome(t).kind == kind for t in types) for kind in ("exact", "refused", "not built", "failed")}
    suffix = sum(bool(outcome(t).suffix_only) for t in types)
    rows += ["", f"{len(types)} types: {counts['exact']} exact ({suffix} with suffix-only z steps), "
             f"{counts['refused']} refused, {counts['not built']} not built tiny, {counts['failed']} failed."]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "families.md"
    text = "# Model families\n\n" + table(sys.argv[1:] or None)
    if len(sys.argv) > 1:
        print(text)
    else:
        path.write_text(text)
        print(f"wrote {path}")
