"""Opt-in norm anchors (NAS; `alphaedit_fast/anchors.py`) against the reference, on tiny models."""

import json

import pytest
import torch

from alphaedit_fast.anchors import (
    lookup_outputs,
    reference_norm,
    resolve_norm_anchor,
    sample_norms,
    trimmed_mean,
)
from alphaedit_fast.editor import AlphaEditor, target_values
from alphaedit_fast.errors import AlphaEditError, HyperParamsError
from alphaedit_fast.reference import compute_z_ref
from alphaedit_fast.requests import normalize_requests
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

from .conftest import CONTEXT_TEMPLATES, assert_close_rel, test_hparams, z_rtol
from .test_values import MORE_REQUESTS as RAW_REQUESTS

MORE_REQUESTS = normalize_requests(RAW_REQUESTS)  # target_values and lookup_outputs take normalised requests

ANCHOR_FAMILIES = ["gpt2", "gptj", "llama", "qwen2", "mistral", "gemma"]


def v_star_norms(model, tok, hparams):
    """||v0 + delta|| of each of MORE_REQUESTS without anchors (reference z's)."""
    zs = torch.stack([compute_z_ref(model, tok, r, hparams, hparams.layers[-1], CONTEXT_TEMPLATES)
                      for r in MORE_REQUESTS]).float()
    h0, v0 = lookup_outputs(model, tok, MORE_REQUESTS, hparams, CONTEXT_TEMPLATES)
    return (v0 + zs - h0).norm(dim=-1), h0, v0


@pytest.mark.parametrize("family", ANCHOR_FAMILIES)
def test_anchored_targets_match_the_reference_have_the_reference_norm_or_keep_v0(family):
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    plain = test_hparams(model)
    norms, h0, v0 = v_star_norms(model, tok, plain)
    # one reference drops the largest v* (above twice it) and scales the others down, one scales all up
    for reference, some_dropped in ((float(norms.max()) / 2.2, True), (2 * float(norms.max()), False)):
        hparams = test_hparams(model, extra={"norm_anchor": reference})
        fast, _ = target_values(model, tok, MORE_REQUESTS, hparams, CONTEXT_TEMPLATES, None, None, False)
        fast = fast.T
        ref = torch.stack([compute_z_ref(model, tok, r, hparams, hparams.layers[-1], CONTEXT_TEMPLATES)
                           for r in MORE_REQUESTS]).float()
        assert_close_rel(fast, ref, z_rtol(model, hparams, ref.norm(dim=1).min().item()), dim=1, what="z")
        anchored = (v0 + fast - h0).norm(dim=-1)
        dropped = norms > 2 * reference
        assert bool(dropped.any()) == some_dropped and not dropped.all()
        torch.testing.assert_close(anchored[~dropped], torch.full_like(anchored[~dropped], reference), rtol=1e-5,
                                   atol=0)
        torch.testing.assert_close(fast[dropped], h0[dropped], rtol=1e-6, atol=1e-6)  # v* = v0: z = h0


def test_a_dropped_edit_changes_nothing():
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    hparams = test_hparams(model)
    norms, _, _ = v_star_norms(model, tok, hparams)
    weights = [model.get_submodule(hparams.rewrite_module_tmp.format(l)).weight for l in hparams.layers]
    before = [w.detach().clone() for w in weights]
    AlphaEditor(model, tok, test_hparams(model, extra={"norm_anchor": float(norms[0]) / 3}),
                context_templates=CONTEXT_TEMPLATES).edit(MORE_REQUESTS[:1])
    dropped_change = sum(float((w.detach() - b).norm()) for w, b in zip(weights, before))
    AlphaEditor(model, tok, hparams, context_templates=CONTEXT_TEMPLATES).edit(MORE_REQUESTS[:1])
    edit_change = sum(float((w.detach() - b).norm()) for w, b in zip(weights, before)) - dropped_change
    assert edit_change > 0 and dropped_change < 1e-5 * edit_change


def test_off_leaves_files_fingerprints_and_targets_as_they_were():
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    hparams = test_hparams(model)
    assert "norm_anchor" not in hparams.to_dict()
    a, _ = target_values(model, tok, MORE_REQUESTS, hparams, CONTEXT_TEMPLATES, None, None, False)
    ref = torch.stack([compute_z_ref(model, tok, r, hparams, hparams.layers[-1], CONTEXT_TEMPLATES)
                       for r in MORE_REQUESTS]).float()
    assert_close_rel(a.T, ref, z_rtol(model, hparams, ref.norm(dim=1).min().item()), dim=1, what="z")


def test_trimmed_mean_leaves_out_the_largest_five_percent():
    norms = torch.arange(1.0, 41.0)  # 40 values: the 2 largest go
    assert trimmed_mean(norms) == pytest.approx(sum(range(1, 39)) / 38)
    assert trimmed_mean(torch.tensor([3.0, 1.0])) == 2.0  # floor(0.05 * 2) = 0 left out


def test_reference_norm_is_the_trimmed_mean_of_the_sample_computed_once(tmp_path, monkeypatch):
    import alphaedit_fast.anchors as anchors

    model, tok = tiny_model("qwen2"), tiny_tokenizer_for("qwen2")
    hparams = test_hparams(model, extra={"norm_anchor": "auto"})
    value = reference_norm(model, tok, MORE_REQUESTS, hparams, samples=3, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("vstar-norm-*.json")
    assert json.loads(cached.read_text())["samples"] == 3
    import random

    sample = random.Random(0).sample(MORE_REQUESTS, 3)
    assert value == pytest.approx(trimmed_mean(sample_norms(model, tok, sample, hparams)), rel=1e-6)
    # bare prompts: each sample norm is the z optimised on "{}" alone
    z = compute_z_ref(model, tok, sample[0], hparams.__class__.from_dict(
        {**hparams.to_dict(), "norm_anchor": None}), hparams.layers[-1], [["{}"]]).float()
    h0, v0 = lookup_outputs(model, tok, sample[:1], hparams, [["{}"]])
    assert float((v0[0] + z - h0[0]).norm()) == pytest.approx(float(sample_norms(model, tok, sample[:1], hparams)[0]),
                                                                rel=1e-4)
    monkeypatch.setattr(anchors, "sample_norms", lambda *a, **k: pytest.fail("recomputed"))
    assert reference_norm(model, tok, MORE_REQUESTS, hparams, samples=3, cache_dir=tmp_path) == value
    with torch.no_grad():  # another model is another reference
        model.get_submodule(hparams.mlp_module_tmp.format(hparams.layers[-1])).down_proj.weight.mul_(1.01)
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        reference_norm(model, tok, MORE_REQUESTS, hparams, samples=3, cache_dir=tmp_path)


def test_auto_is_resolved_from_the_requests_and_refused_unresolved(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, tok = tiny_model("mistral"), tiny_tokenizer_for("mistral")
    hparams = test_hparams(model, extra={"norm_anchor": "auto", "norm_anchor_samples": 2})
    editor = AlphaEditor(model, tok, hparams, context_templates=CONTEXT_TEMPLATES)
    weight = model.get_submodule(hparams.rewrite_module_tmp.format(1)).weight.detach().clone()
    with pytest.raises(AlphaEditError, match="norm_anchor 'auto'"):
        editor.edit(MORE_REQUESTS[:2])
    assert torch.equal(weight, model.get_submodule(hparams.rewrite_module_tmp.format(1)).weight)
    resolved = resolve_norm_anchor(model, tok, hparams, MORE_REQUESTS)
    assert isinstance(resolved.norm_anchor, float) and resolved.norm_anchor > 0 and hparams.norm_anchor == "auto"


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "yes"])
def test_norm_anchor_values_are_checked(value):
    with pytest.raises(HyperParamsError, match="norm_anchor must be"):
        test_hparams(tiny_model("gpt2"), extra={"norm_anchor": value})


@pytest.mark.parametrize("value", [0, 2.5, True, "10"])
def test_norm_anchor_samples_are_checked(value):
    with pytest.raises(HyperParamsError, match="norm_anchor_samples must be a positive int"):
        test_hparams(tiny_model("gpt2"), extra={"norm_anchor": "auto", "norm_anchor_samples": value})


def test_a_post_mlp_norm_model_is_refused():
    model, tok = tiny_model("gemma2"), tiny_tokenizer_for("gemma2")
    hparams = test_hparams(model, extra={"norm_anchor": 1.0})
    with pytest.raises(HyperParamsError, match="post-MLP norm"):
        AlphaEditor(model, tok, hparams, context_templates=CONTEXT_TEMPLATES).edit(MORE_REQUESTS[:1])


def test_cli_edit_resolves_auto_from_its_requests_as_the_number_would_edit(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from alphaedit_fast.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "requests.json").write_text(json.dumps(RAW_REQUESTS))
    values = test_hparams(model, v_num_grad_steps=6).to_dict()

    def edit(anchor, out):
        (tmp_path / f"{out}.json").write_text(json.dumps({**values, "norm_anchor": anchor, "norm_anchor_samples": 3}))
        assert main(["edit", "--model", str(tmp_path / "model"), "--requests", str(tmp_path / "requests.json"),
                     "--hparams", str(tmp_path / f"{out}.json"), "--batch-size", "2",
                     "--out", str(tmp_path / out)]) == 0
        return load_file(tmp_path / out / "model.safetensors")

    auto = edit("auto", "auto")
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("norm_anchor: "))
    hparams = test_hparams(model, v_num_grad_steps=6, extra={"norm_anchor": "auto", "norm_anchor_samples": 3})
    value = reference_norm(model, tok, RAW_REQUESTS, hparams, samples=3)  # cached by the CLI's run
    assert line == f"norm_anchor: {value:.6g}"
    number = edit(value, "number")
    assert all(torch.equal(auto[k], number[k]) for k in auto)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_both_opt_ins_together_match_the_reference(family):
    """Early stopping ends the loop, then the anchor rescales v* (NAS's order in its ENCORE port)."""
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    settings = dict(fact_token="last", v_lr=0.5, v_num_grad_steps=30, clamp_norm_factor=8.0)
    norms, _, _ = v_star_norms(model, tok, test_hparams(model, **settings))
    hparams = test_hparams(model, **settings, extra={"early_stop_top1": 2, "norm_anchor": float(norms.median())})
    fast, _ = target_values(model, tok, MORE_REQUESTS, hparams, CONTEXT_TEMPLATES, None, None, False)
    ref = torch.stack([compute_z_ref(model, tok, r, hparams, hparams.layers[-1], CONTEXT_TEMPLATES)
                       for r in MORE_REQUESTS]).float()
    assert_close_rel(fast.T, ref, z_rtol(model, hparams, ref.norm(dim=1).min().item()), dim=1, what="z")
