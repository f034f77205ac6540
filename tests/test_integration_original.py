"""patch_original(): the original AlphaEdit code runs on alphaedit_fast. Checked on stand-ins
(tests/standins/original: the original's module layout and call contracts, written here) and,
when ALPHAEDIT_ORIGINAL_REPO names a checkout whose imports work (transformers 4.46), on the
real original."""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from alphaedit_fast.integrations import IntegrationError, patch_original
from alphaedit_fast.integrations.patching import active_patch
from alphaedit_fast.reference import apply_alphaedit_ref, compute_ks_ref, compute_z_ref
from alphaedit_fast.stats import read_original_stats
from alphaedit_fast.tiny import corpus, tiny_model, tiny_tokenizer_for

from .conftest import REQUESTS, edit_rtol, test_hparams

STANDINS = Path(__file__).resolve().parent / "standins" / "original"
PACKAGES = ("AlphaEdit", "rome", "util", "experiments", "datasets")
TEXTS = [{"text": t} for t in corpus()] + [{"text": ""}] * 40  # wikitext has empty lines too


def _drop_standin_modules():
    for name in list(sys.modules):
        if name.split(".")[0] in PACKAGES:
            del sys.modules[name]


@pytest.fixture
def standins(monkeypatch):
    """The stand-in original on sys.path with a tiny `datasets.load_dataset`; afterwards the patch
    is undone and every stand-in module forgotten."""
    _drop_standin_modules()
    loads = []

    def load_dataset(name, config):
        loads.append((name, config))
        return {"train": list(TEXTS)}

    import transformers  # noqa: F401 - it probes for `datasets` when imported: before the fake

    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.syspath_prepend(str(STANDINS))
    yield types.SimpleNamespace(loads=loads)
    patch = active_patch("original")
    if patch is not None:
        patch.undo()
    _drop_standin_modules()


def original_hparams(model, **overrides):
    from AlphaEdit.AlphaEdit_hparams import AlphaEditHyperParams

    fields = test_hparams(model, **overrides).to_dict()
    fields.pop("extra", None)
    fields.update(mom2_dataset="wikitext", mom2_n_samples=150, mom2_dtype="float32", nullspace_threshold=1e-3)
    return AlphaEditHyperParams(**fields)


def spy():
    from util.spy import CALLS

    return CALLS


def gpt2():
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    model.config._name_or_path = "someone/tiny-gpt2"
    return model, tok


ENTRY_POINTS = [("AlphaEdit.AlphaEdit_main", "apply_AlphaEdit_to_model"), ("AlphaEdit.AlphaEdit_main", "get_cov"),
                ("AlphaEdit.AlphaEdit_main", "get_context_templates"), ("AlphaEdit.compute_z", "compute_z"),
                ("AlphaEdit.compute_ks", "compute_ks"), ("rome.layer_stats", "layer_stats")]


def test_missing_checkout_is_a_clear_error(monkeypatch):
    _drop_standin_modules()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "standins" not in p])
    with pytest.raises(IntegrationError, match=r"AlphaEdit\.AlphaEdit_main.*PYTHONPATH"):
        patch_original()
    assert active_patch("original") is None


def test_every_entry_point_replaced_and_undo_restores_identity(standins):
    import experiments.evaluate as evaluate  # imported BEFORE the patch: its by-name imports are fixed too

    originals = {(m, n): getattr(importlib.import_module(m), n) for m, n in ENTRY_POINTS}
    by_name = (evaluate.apply_AlphaEdit_to_model, evaluate.get_cov, sys.modules["AlphaEdit"].apply_AlphaEdit_to_model,
               sys.modules["AlphaEdit.AlphaEdit_main"].compute_z, sys.modules["AlphaEdit.AlphaEdit_main"].layer_stats)
    patch = patch_original()
    assert patch_original() is patch and patch.active  # idempotent
    for (module, name), old in originals.items():
        assert getattr(sys.modules[module], name) is not old, f"{module}.{name} not replaced"
    main = sys.modules["AlphaEdit.AlphaEdit_main"]
    assert evaluate.apply_AlphaEdit_to_model is main.apply_AlphaEdit_to_model
    assert evaluate.get_cov is main.get_cov
    assert sys.modules["AlphaEdit"].apply_AlphaEdit_to_model is main.apply_AlphaEdit_to_model
    assert main.compute_z is sys.modules["AlphaEdit.compute_z"].compute_z
    assert main.layer_stats is sys.modules["rome.layer_stats"].layer_stats
    patch.undo()
    assert not patch.active and active_patch("original") is None
    for (module, name), old in originals.items():
        assert getattr(sys.modules[module], name) is old
    assert (evaluate.apply_AlphaEdit_to_model, evaluate.get_cov, sys.modules["AlphaEdit"].apply_AlphaEdit_to_model,
            main.compute_z, main.layer_stats) == by_name
    assert patch_original() is not patch  # a new patch after undo


def test_patch_before_import(standins):
    patch = patch_original()
    import experiments.evaluate as evaluate  # imports the patched names

    main = sys.modules["AlphaEdit.AlphaEdit_main"]
    assert evaluate.apply_AlphaEdit_to_model is main.apply_AlphaEdit_to_model
    assert main.apply_AlphaEdit_to_model.__module__ == "alphaedit_fast.integrations.original"
    patch.undo()
    assert main.apply_AlphaEdit_to_model.__module__ == "AlphaEdit.AlphaEdit_main"


def test_compute_z_and_ks_run_on_ours(standins):
    import AlphaEdit.compute_ks as ks_mod
    import AlphaEdit.compute_z as z_mod

    model, tok = gpt2()
    hp = original_hparams(model)
    patch_original()
    templates = [["{}"], ["The a. {}", "I b. {}"]]
    request = copy.deepcopy(REQUESTS[0])
    request["target_new"]["str"] = " " + request["target_new"]["str"]
    z = z_mod.compute_z(model, tok, request, hp, 2, templates)
    ks = ks_mod.compute_ks(model, tok, REQUESTS, hp, 1, templates)
    assert spy() == []  # the stand-ins never ran
    ours = test_hparams(model)
    assert torch.allclose(z, compute_z_ref(model, tok, request, ours, 2, templates), rtol=1e-4, atol=1e-5)
    assert torch.allclose(ks, compute_ks_ref(model, tok, REQUESTS, ours, 1, templates), rtol=1e-5, atol=1e-6)


def test_apply_keeps_the_contract_and_uses_the_shared_templates(standins):
    import AlphaEdit.AlphaEdit_main as main

    model, tok = gpt2()
    hp = original_hparams(model, L2=10.0)
    d_k = 160
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, d_k, generator=gen)
    P = torch.eye(d_k).repeat(2, 1, 1)
    cache_c = x.transpose(1, 2) @ x
    before = cache_c.clone()
    templates = [["{}"], ["Set by the original. {}", "Also set. {}"]]
    main.CONTEXT_TEMPLATES_CACHE = templates  # e.g. by an earlier unpatched call: our editing must use it
    ref_model = copy.deepcopy(model)
    patch_original()
    requests = copy.deepcopy(REQUESTS)
    out_model, out_cache = main.apply_AlphaEdit_to_model(model, tok, requests, hp, cache_c=cache_c, P=P)
    assert out_model is model and out_cache is cache_c  # updated in place, as evaluate.py relies on
    assert requests == REQUESTS
    assert spy() == []
    assert main.CONTEXT_TEMPLATES_CACHE is templates
    updates, new_cache = apply_alphaedit_ref(ref_model, tok, REQUESTS, test_hparams(model, L2=10.0), templates,
                                              P, before)
    rtol = edit_rtol(model, tok, REQUESTS, test_hparams(model, L2=10.0))
    for layer in hp.layers:
        name = hp.rewrite_module_tmp.format(layer)
        got = model.get_submodule(name).weight - ref_model.get_submodule(name).weight
        assert (got.norm() / ref_model.get_submodule(name).weight.norm()).item() < rtol
    assert ((cache_c - new_cache).norm() / new_cache.norm()).item() < 1e-4


def test_templates_generated_by_ours_are_stored_for_the_original(standins):
    import AlphaEdit.AlphaEdit_main as main

    from alphaedit_fast.templates import get_context_templates

    model, tok = gpt2()
    patch_original()
    assert main.CONTEXT_TEMPLATES_CACHE is None
    templates = main.get_context_templates(model, tok)
    assert templates == get_context_templates(model, tok) and main.CONTEXT_TEMPLATES_CACHE is templates
    assert "get_context_templates" not in spy()
    main.apply_AlphaEdit_to_model(model, tok, REQUESTS[:1], original_hparams(model), cache_c=torch.zeros(2, 160, 160),
                                  P=torch.eye(160).repeat(2, 1, 1))
    assert main.CONTEXT_TEMPLATES_CACHE is templates


def test_statistics_one_pass_shared_files(standins, tmp_path):
    import AlphaEdit.AlphaEdit_main as main
    import experiments.evaluate as evaluate
    import util.runningstats as running

    model, tok = gpt2()
    hp = original_hparams(model, layers=[1, 2, 3])
    # the stand-in's own per-layer passes, into another directory
    main.STATS_DIR = tmp_path / "plain"
    plain = {layer: evaluate.get_project(model, tok, layer, hp) for layer in hp.layers}
    plain_cov = {layer: main.COV_CACHE[("someone_tiny-gpt2", hp.rewrite_module_tmp.format(layer))]
                 for layer in hp.layers}
    plain_forwards = spy().count("forward")
    assert plain_forwards > 0
    main.COV_CACHE.clear()
    spy().clear()

    main.STATS_DIR = tmp_path / "fast"
    patch = patch_original()
    projectors = {layer: evaluate.get_project(model, tok, layer, hp) for layer in hp.layers}
    assert patch.state["passes"] == 1 and spy() == []  # one pass of ours computed all three layers
    assert standins.loads == [("wikitext", "wikitext-103-raw-v1")] * 4  # 3 plain layers + 1 pass
    for layer in hp.layers:
        name = hp.rewrite_module_tmp.format(layer)
        path = tmp_path / "fast" / "tiny-gpt2" / "wikitext_stats" / f"{name}_float32_mom2_150.npz"
        assert path.exists()
        state = running.load_cached_state(path, {"sample_size": 150})  # the original's loader
        stat = running.CombinedStat(mom2=running.SecondMoment())
        stat.load_state_dict(state)
        cov, count = read_original_stats(path)
        plain_path = tmp_path / "plain" / path.relative_to(tmp_path / "fast")
        plain_cov_file, plain_count = read_original_stats(plain_path)
        assert count == plain_count == stat.mom2.count
        assert torch.allclose(stat.mom2.moment(), cov)
        for a, b in ((cov, plain_cov_file), (main.COV_CACHE[("someone_tiny-gpt2", name)], plain_cov[layer])):
            assert ((a.double() - b.double()).norm() / b.double().norm()).item() < 1e-4
        assert ((projectors[layer] - plain[layer]).norm() / plain[layer].norm().clamp_min(1)).item() < 1e-3
        with np.load(path) as data:
            assert set(data.files) >= {"mom2.count", "mom2.mom2", "sample_size"}
    # a later call (another process: COV_CACHE empty) reads the shared files, computes nothing
    main.COV_CACHE.clear()
    main.get_cov(model, tok, hp.rewrite_module_tmp.format(2), "wikitext", 150, "float32")
    assert patch.state["passes"] == 1
    # and the stand-in (unpatched) reads our files without recomputing
    patch.undo()
    main.COV_CACHE.clear()
    main.get_cov(model, tok, hp.rewrite_module_tmp.format(3), "wikitext", 150, "float32")
    assert "forward" not in spy()


def test_statistics_layers_argument_and_force_recompute(standins, tmp_path):
    import rome.layer_stats as stats_mod

    model, tok = gpt2()
    patch = patch_original(layers=[0, 2])
    stat = stats_mod.layer_stats(model, tok, "transformer.h.0.mlp.c_proj", tmp_path, "wikitext", ["mom2"],
                                 sample_size=50, precision="float64")
    assert stat.mom2.mom2.dtype == torch.float64
    files = sorted(p.name for p in (tmp_path / "tiny-gpt2" / "wikitext_stats").iterdir())
    assert files == [f"transformer.h.{i}.mlp.c_proj_float64_mom2_50.npz" for i in (0, 2)]
    stats_mod.layer_stats(model, tok, "transformer.h.2.mlp.c_proj", tmp_path, "wikitext", ["mom2"],
                          sample_size=50, precision="float64")
    assert patch.state["passes"] == 1
    again = stats_mod.layer_stats(model, tok, "transformer.h.2.mlp.c_proj", tmp_path, "wikitext", ["mom2"],
                                  sample_size=50, precision="float64", force_recompute=True)
    assert patch.state["passes"] == 2 and again.mom2.count == stat.mom2.count
    assert len(files) == len(list((tmp_path / "tiny-gpt2" / "wikitext_stats").iterdir()))
    # an hparams argument widens the set; layers whose file exists are not recomputed
    directory = tmp_path / "tiny-gpt2" / "wikitext_stats"
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    hp = {"layers": [0, 1, 2], "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj"}
    layer1 = stats_mod.layer_stats(model, tok, "transformer.h.1.mlp.c_proj", tmp_path, "wikitext", ["mom2"],
                                   sample_size=50, precision="float64", hparams=hp)
    assert patch.state["passes"] == 3 and layer1.mom2.count == stat.mom2.count
    after = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    assert set(after) - set(before) == {"transformer.h.1.mlp.c_proj_float64_mom2_50.npz"}
    assert all(after[name] == t for name, t in before.items())
    # sample_size=None: every text, in order; None is stored as the original's loader expects
    full = stats_mod.layer_stats(model, tok, "transformer.h.1.mlp.c_proj", tmp_path, "wikitext", ["mom2"],
                                 precision="float32", hparams=hp)
    assert patch.state["passes"] == 4 and full.mom2.count > stat.mom2.count
    patch.undo()
    import util.runningstats as running

    path = directory / "transformer.h.0.mlp.c_proj_float32_mom2.npz"
    assert running.load_cached_state(path, {"sample_size": None})["mom2.count"] == full.mom2.count


def test_sequential_evaluate_flow_matches_the_standin(standins, tmp_path):
    """evaluate.main: P from get_cov for every layer, then two sequential batches; patched vs not."""
    import AlphaEdit.AlphaEdit_main as main
    import experiments.evaluate as evaluate

    model, tok = gpt2()
    hp = original_hparams(model, L2=10.0)
    main.STATS_DIR = tmp_path
    main.CONTEXT_TEMPLATES_CACHE = [["{}"], ["The a. {}", "I b. {}"]]
    batches = [copy.deepcopy(REQUESTS[:2]), copy.deepcopy(REQUESTS[2:])]
    ref_model = copy.deepcopy(model)
    ref_cache, ref_P = evaluate.main(ref_model, tok, hp, copy.deepcopy(batches))
    main.COV_CACHE.clear()
    patch_original()
    cache, P = evaluate.main(model, tok, hp, copy.deepcopy(batches))
    assert torch.allclose(P, ref_P, atol=1e-5)
    assert ((cache - ref_cache).norm() / ref_cache.norm()).item() < 1e-3
    rtol = 2 * edit_rtol(model, tok, REQUESTS, test_hparams(model, L2=10.0))
    for layer in hp.layers:
        name = hp.rewrite_module_tmp.format(layer)
        a, b = model.get_submodule(name).weight, ref_model.get_submodule(name).weight
        base = tiny_model("gpt2").get_submodule(name).weight
        assert ((a - b).norm() / (b - base).norm()).item() < max(rtol, 1e-3)


# ---------------------------------------------------------------------------------------------
# the real original (opt-in)

ORIGINAL = os.environ.get("ALPHAEDIT_ORIGINAL_REPO")


@pytest.mark.skipif(not ORIGINAL, reason="set ALPHAEDIT_ORIGINAL_REPO to an AlphaEdit checkout (transformers 4.46)")
def test_real_original_patched_matches_unpatched(monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import vs_original
    finally:
        sys.path.pop(0)
    _drop_standin_modules()
    monkeypatch.setattr(vs_original, "ORIG_DIR", Path(ORIGINAL).resolve())
    try:
        main, HParams = vs_original.import_original()
    except Exception as err:  # e.g. transformers 5.x: the original's imports fail
        pytest.skip(f"the original does not import here: {type(err).__name__}: {err}")
    try:
        tok, _ = vs_original.load_tokenizer()
        args = types.SimpleNamespace(heads=None, width=64, seed=0, n_layer=4, inner=None, layers=[1, 2],
                                     v_num_grad_steps=10, clamp_norm_factor=None, v_lr=None, kl_factor=None, L2=None)
        model = vs_original.build_model(args, len(tok))
        hp = HParams(**vs_original.hparams_dict(args, 4))
        requests = vs_original.build_requests(4)
        P = vs_original.random_projectors(2, 256, 0)
        main.CONTEXT_TEMPLATES_CACHE = [["{}"], ["The a. {}", "I b. {}"]]
        ref_model = copy.deepcopy(model)
        ref_cache = torch.zeros(2, 256, 256)
        with vs_original.CudaToCpu():
            main.apply_AlphaEdit_to_model(ref_model, tok, copy.deepcopy(requests), hp, cache_c=ref_cache, P=P)
        patch = patch_original()
        try:
            cache = torch.zeros(2, 256, 256)
            _, out = main.apply_AlphaEdit_to_model(model, tok, copy.deepcopy(requests), hp, cache_c=cache, P=P)
        finally:
            patch.undo()
        assert out is cache
        assert ((cache - ref_cache).norm() / ref_cache.norm()).item() < 1e-3
        base = vs_original.build_model(args, len(tok))
        for layer in hp.layers:
            name = hp.rewrite_module_tmp.format(layer)
            a, b = model.get_submodule(name).weight, ref_model.get_submodule(name).weight
            assert ((a - b).norm() / (b - base.get_submodule(name).weight).norm()).item() < 1e-3
    finally:
        _drop_standin_modules()


def test_counterfact_scoring_runs_on_ours_with_the_original_layout(standins):
    from alphaedit_fast.integrations import patch_original

    model, tok = gpt2()
    record = {"requested_rewrite": {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": {"str": "piano"},
                                    "target_true": {"str": "guitar"}},
              "paraphrase_prompts": ["I b. Toko Yasuda plays the"],
              "neighborhood_prompts": ["Michel Denisot plays the"]}
    import experiments.py.eval_utils_counterfact as ev

    expected = ev.compute_rewrite_quality_counterfact(model, tok, record)
    spy().clear()
    patch_original()
    got = ev.compute_rewrite_quality_counterfact(model, tok, record)  # the stand-in's caller, our scoring
    assert "test_batch_prediction" not in spy()
    for key, value in expected.items():
        if key.endswith("_correct"):
            assert got[key] == value
        else:
            for a, b in zip(got[key], value):
                assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
