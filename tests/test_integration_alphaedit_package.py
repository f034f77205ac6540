"""patch_alphaedit(): the authors' `alphaedit` package runs on alphaedit_fast. Checked on a stand-in
(tests/standins/alphaedit_package: the package's module layout and call contracts, written here)
and, when ALPHAEDIT_PACKAGE_REPO names a checkout holding the package, on the real one. The
package refuses anything but one CUDA device: its unpatched runs here switch that check off."""

from __future__ import annotations

import copy
import importlib
import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from alphaedit_fast.integrations import IntegrationError, patch_alphaedit
from alphaedit_fast.integrations.alphaedit_package import config_hparams
from alphaedit_fast.integrations.patching import active_patch
from alphaedit_fast.tiny import corpus, tiny_model, tiny_tokenizer_for, tiny_wrapped_model

from .conftest import edit_rtol, forward_accumulation_length, tolerance, z_rtol
from .test_device_map import load_with_device_map

STANDIN = Path(__file__).resolve().parent / "standins" / "alphaedit_package"
REAL = os.environ.get("ALPHAEDIT_PACKAGE_REPO")
TEXTS = [{"text": t} for t in corpus()] + [{"text": ""}] * 10
N_SAMPLES = 120
LAYERS = [1, 2]
REQUESTS = [{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English"},
            {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": {"str": "piano"}},
            {"prompt": "{} is located in", "subject": "Autonomous University of Madrid", "target_new": "Sweden",
             "case_id": 7}]
MORE_REQUESTS = [{"prompt": "{} works for", "subject": "Michel Denisot", "target_new": "Google", "case_id": 11},
                 {"prompt": "{} was developed by", "subject": "Apple A5", "target_new": "Microsoft", "case_id": 12}]


def _forget_package():
    for name in [n for n in sys.modules if n == "alphaedit" or n.startswith("alphaedit.") or n == "datasets"]:
        del sys.modules[name]


@pytest.fixture
def package(monkeypatch):
    """The stand-in (or, for `real_package`, the real package) importable, `load_dataset` reading
    the tiny corpus; afterwards the patch undone and the package forgotten."""
    yield from _package(monkeypatch, str(STANDIN))


@pytest.fixture
def real_package(monkeypatch):
    yield from _package(monkeypatch, REAL)


def _package(monkeypatch, root):
    import transformers  # noqa: F401 - it probes for `datasets` when imported: before the fake

    _forget_package()
    loads = []

    def load_dataset(path, name=None, split=None):
        loads.append((path, name, split))
        return list(TEXTS)

    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.syspath_prepend(root)
    stats = importlib.import_module("alphaedit.layer_stats")
    monkeypatch.setattr(stats, "load_dataset", load_dataset)
    editor = importlib.import_module("alphaedit.editor")
    yield types.SimpleNamespace(loads=loads, editor=editor, stats=stats, AlphaEditor=editor.AlphaEditor,
                                AlphaEditConfig=importlib.import_module("alphaedit.config").AlphaEditConfig)
    patch = active_patch("alphaedit")
    if patch is not None:
        patch.undo()
    _forget_package()


def on_cpu(pkg, monkeypatch):
    """Let the unpatched package run on the CPU (it refuses anything but one CUDA device)."""
    monkeypatch.setattr(pkg.AlphaEditor, "_validate_single_device", lambda self: None)


def calls():
    from alphaedit.spy import CALLS

    return CALLS


MODELS = {
    "qwen2": lambda: tiny_model("qwen2"),
    "qwen3": lambda: tiny_model("qwen3"),
    "qwen3_5_text": lambda: tiny_model("qwen3_5_text"),
    "qwen3_5": lambda: tiny_wrapped_model("qwen3_5"),  # model.language_model.layers.{}
}
THRESHOLD = 1.0  # about half of the tiny models' key directions


def make(family):
    from transformers import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {family}")
    model, tok = MODELS[family](), tiny_tokenizer_for("qwen2")
    model.config._name_or_path = f"hub/tiny-{family}"
    return model, tok


def config(pkg, **overrides):
    values = dict(layers=LAYERS, v_num_grad_steps=19, v_lr=0.5, v_loss_layer=3, l2_regularization=0.1,
                  mom2_dataset="wikitext", mom2_n_samples=N_SAMPLES, nullspace_threshold=THRESHOLD)
    values.update(overrides)
    return pkg.AlphaEditConfig(**values)


def rewrite_weights(model):
    """The edited layers' weights (copies)."""
    names = dict(model.named_modules())
    template = next(t for t in ("model.layers.{}.mlp.down_proj", "model.language_model.layers.{}.mlp.down_proj")
                    if t.format(LAYERS[0]) in names)
    return [model.get_parameter(template.format(l) + ".weight").detach().clone() for l in LAYERS]


def rtol_for(model, tok, editor, requests):
    hparams = config_hparams(editor.config)
    return edit_rtol(model, tok, [dict(r, target_new=r["target_new"] if isinstance(r["target_new"], dict)
                                        else {"str": r["target_new"]}) for r in requests], hparams)


def assert_same_updates(before, ours, theirs, rtol):
    for w0, a, b in zip(before, ours, theirs):
        upd, ref = a - w0, b - w0
        assert ref.norm() > 0
        assert float((upd - ref).norm() / ref.norm()) < rtol


# ---------------------------------------------------------------------------------------------


def test_missing_package_names_it_and_the_fix(monkeypatch):
    _forget_package()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "alphaedit_package" not in p])
    with pytest.raises(IntegrationError, match=r"alphaedit\.editor.*PYTHONPATH"):
        patch_alphaedit()
    assert active_patch("alphaedit") is None


def test_every_entry_point_replaced_idempotent_and_undone(package):
    import alphaedit.cli as cli
    import alphaedit.compute_keys as keys_module
    import alphaedit.compute_target as target_module

    editor = package.editor
    originals = {"edit": package.AlphaEditor.edit, "init": package.AlphaEditor._initialize_state,
                 "device": package.AlphaEditor._validate_single_device}
    patch = patch_alphaedit()
    assert patch_alphaedit() is patch
    for f in (editor.compute_target, target_module.compute_target, editor.compute_keys, keys_module.compute_keys,
              editor.layer_stats, package.stats.layer_stats, cli.main, package.AlphaEditor.edit,
              package.AlphaEditor._initialize_state, package.AlphaEditor._validate_single_device):
        assert f.__module__.startswith("alphaedit_fast"), f
    assert package.AlphaEditor.save_state.__module__ == "alphaedit.editor"  # the package's own state file
    patch.undo()
    assert active_patch("alphaedit") is None
    for f in (editor.compute_target, target_module.compute_target, editor.compute_keys, package.stats.layer_stats,
              cli.main):
        assert f.__module__.startswith("alphaedit"), f
    assert (package.AlphaEditor.edit, package.AlphaEditor._initialize_state,
            package.AlphaEditor._validate_single_device) == (originals["edit"], originals["init"], originals["device"])
    assert patch_alphaedit() is not patch


@pytest.mark.parametrize("family", list(MODELS))
def test_edit_matches_the_unpatched_package(package, monkeypatch, tmp_path, family):
    """Patched (statistics of both layers in one pass, batched targets, null-space solve) against
    unpatched (the stand-in: one target per request, dense solves) on copies of one model, from
    the same statistics files: same P, same updates, same key covariance."""
    on_cpu(package, monkeypatch)
    model, tok = make(family)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    before = rewrite_weights(model)
    patch = patch_alphaedit()
    fast = package.AlphaEditor(ours, tok, config(package), stats_dir=tmp_path / "stats")
    assert patch.state["passes"] == 1 and len(package.loads) == 1
    assert package.loads[0] == ("Salesforce/wikitext", "wikitext-103-raw-v1", "train")
    fast.edit(REQUESTS)
    patch.undo()

    del calls()[:]
    plain = package.AlphaEditor(theirs, tok, config(package), stats_dir=tmp_path / "stats")  # reads our files
    assert "forward" not in calls()
    plain.edit(REQUESTS)
    assert calls().count("compute_target") == len(REQUESTS)
    torch.testing.assert_close(fast.projection, plain.projection, atol=1e-4, rtol=0)
    rtol = rtol_for(model, tok, fast, REQUESTS)
    assert_same_updates(before, rewrite_weights(ours), rewrite_weights(theirs), rtol)
    assert float((fast.key_covariance - plain.key_covariance).norm() / plain.key_covariance.norm()) < rtol


def test_statistics_files_are_the_packages_both_ways(package, monkeypatch, tmp_path):
    """The stand-in's files (one layer per pass, one text per forward) and ours (one pass) are the
    same files with the same contents; each code reads the other's."""
    on_cpu(package, monkeypatch)
    model, tok = make("qwen2")
    plain = package.AlphaEditor(model, tok, config(package), stats_dir=tmp_path / "theirs")
    theirs = sorted((tmp_path / "theirs").rglob("*.npz"))
    assert [p.relative_to(tmp_path / "theirs").as_posix() for p in theirs] == [
        f"tiny-qwen2/wikitext_stats/model.layers.{l}.mlp.down_proj_float32_mom2_{N_SAMPLES}.npz" for l in LAYERS]
    patch = patch_alphaedit()
    fast = package.AlphaEditor(model, tok, config(package), stats_dir=tmp_path / "ours")
    assert patch.state["passes"] == 1
    ours = sorted((tmp_path / "ours").rglob("*.npz"))
    assert [p.relative_to(tmp_path / "ours") for p in ours] == [p.relative_to(tmp_path / "theirs") for p in theirs]
    for a, b in zip(ours, theirs):
        with np.load(a) as new, np.load(b) as old:
            assert sorted(new.files) == sorted(old.files)
            assert int(new["mom2.count"]) == int(old["mom2.count"]) and int(new["sample_size"]) == N_SAMPLES
            assert_same_second_moment(torch.from_numpy(new["mom2.mom2"]), torch.from_numpy(old["mom2.mom2"]),
                                      int(old["mom2.count"]), model)
    torch.testing.assert_close(fast.projection, plain.projection, atol=1e-4, rtol=0)
    package.AlphaEditor(model, tok, config(package), stats_dir=tmp_path / "theirs")  # the package's files: no pass
    assert patch.state["passes"] == 1


def assert_same_second_moment(ours: torch.Tensor, theirs: torch.Tensor, count: int, model) -> None:
    """Sums of `count` products k_i k_j of keys that each forward computes to its accumulation
    error: entry (i, j) within rtol * sqrt(S_ii S_jj) (Cauchy-Schwarz bounds the sum of |terms|)."""
    rtol = tolerance(torch.float32, count)[0] + 2 * tolerance(torch.float32, forward_accumulation_length(model))[0]
    diagonal = theirs.diagonal().clamp_min(0)
    assert bool(((ours - theirs).abs() <= rtol * torch.outer(diagonal, diagonal).sqrt()).all())


def test_direct_layer_stats_call(package, tmp_path):
    patch = patch_alphaedit(layers=LAYERS)
    model, tok = make("qwen2")
    name = "model.layers.1.mlp.down_proj"
    stat = package.stats.layer_stats(model, tok, name, tmp_path, "wikitext", ["mom2"], sample_size=N_SAMPLES)
    assert patch.state["passes"] == 1 and len(list(tmp_path.rglob("*.npz"))) == 2  # both layers, one pass
    assert stat.mom2.moment().shape == (160, 160)
    package.stats.layer_stats(model, tok, "model.layers.2.mlp.down_proj", tmp_path, "wikitext", ["mom2"],
                              sample_size=N_SAMPLES)
    assert patch.state["passes"] == 1  # read from its file
    forced = package.stats.layer_stats(model, tok, name, tmp_path / "forced", "wikitext", ["mom2"],
                                       sample_size=N_SAMPLES, force_recompute=True)
    assert not (tmp_path / "forced").exists()  # the package then writes nothing
    torch.testing.assert_close(forced.mom2.moment(), stat.mom2.moment())
    with pytest.raises(ValueError, match="wikipedia"):  # as the package: a ValueError
        package.stats.layer_stats(model, tok, name, tmp_path, "c4", ["mom2"])
    # a layer whose file exists is read, even while another edited layer has none
    (tmp_path / "tiny-qwen2" / "wikitext_stats" / f"model.layers.2.mlp.down_proj_float32_mom2_{N_SAMPLES}.npz"
     ).unlink()
    passes = patch.state["passes"]
    package.stats.layer_stats(model, tok, name, tmp_path, "wikitext", ["mom2"], sample_size=N_SAMPLES)
    assert patch.state["passes"] == passes


def test_states_and_z_caches_move_between_the_codes(package, monkeypatch, tmp_path):
    """Sequential batches: unpatched batch 1 -> its state file -> patched batch 2, against
    unpatched batches 1 and 2; the patched state file read back by the package; the z cache files
    of one code read by the other."""
    on_cpu(package, monkeypatch)
    model, tok = make("qwen2")
    original = copy.deepcopy(model)
    plain = package.AlphaEditor(model, tok, config(package), stats_dir=tmp_path / "stats",
                                cache_dir=tmp_path / "zs")
    plain.edit(REQUESTS)
    after_first = rewrite_weights(model)
    cached = sorted(p.name for p in (tmp_path / "zs" / "layer_2").iterdir())
    assert cached == ["case_0.npz", "case_1.npz", "case_7.npz"]
    plain.save_state(tmp_path / "after1.pt")
    middle = copy.deepcopy(model)
    plain.edit(MORE_REQUESTS)

    patch = patch_alphaedit()
    fast = package.AlphaEditor(middle, tok, config(package), stats_dir=tmp_path / "stats",
                               cache_dir=tmp_path / "fast-zs", state_path=tmp_path / "after1.pt")
    before = rewrite_weights(middle)
    fast.edit(MORE_REQUESTS)
    with np.load(tmp_path / "fast-zs" / "layer_2" / "case_11.npz") as data:
        assert data.files == ["target"] and data["target"].shape == (64,) and data["target"].dtype == np.float32
    rtol = rtol_for(middle, tok, fast, MORE_REQUESTS)
    assert_same_updates(before, rewrite_weights(middle), rewrite_weights(model), rtol)
    assert float((fast.key_covariance - plain.key_covariance).norm() / plain.key_covariance.norm()) < rtol
    fast.save_state(tmp_path / "after2.pt")
    patch.undo()
    reread = package.AlphaEditor(middle, tok, config(package), stats_dir=tmp_path / "stats",
                                 state_path=tmp_path / "after2.pt")
    torch.testing.assert_close(reread.key_covariance, fast.key_covariance)
    with pytest.raises(ValueError, match="layers do not match"):
        package.AlphaEditor(middle, tok, config(package, layers=[2, 3]), stats_dir=tmp_path / "stats",
                            state_path=tmp_path / "after2.pt")

    # the package's z files read under the patch: nothing optimised, the package's batch-1 update
    patch = patch_alphaedit()
    import alphaedit_fast.editor as engine

    monkeypatch.setattr(engine, "optimise_zs_and_keys", lambda *a, **k: pytest.fail("a cached z was recomputed"))
    replay = copy.deepcopy(original)
    package.AlphaEditor(replay, tok, config(package), stats_dir=tmp_path / "stats",
                        cache_dir=tmp_path / "zs").edit(REQUESTS)
    assert_same_updates(rewrite_weights(original), rewrite_weights(replay), after_first,
                        rtol_for(original, tok, fast, REQUESTS))


def test_two_patched_batches_equal_two_unpatched(package, monkeypatch, tmp_path):
    """The solver kept between batches (projected cache grown by the first batch's keys) edits as
    the package's dense state does."""
    on_cpu(package, monkeypatch)
    model, tok = make("qwen2")
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    plain = package.AlphaEditor(theirs, tok, config(package), stats_dir=tmp_path)
    patch_alphaedit()
    fast = package.AlphaEditor(ours, tok, config(package), stats_dir=tmp_path)
    fast.edit(REQUESTS)
    middle = rewrite_weights(ours)
    fast.edit(MORE_REQUESTS)
    active_patch("alphaedit").undo()
    plain.edit(REQUESTS)
    plain.edit(MORE_REQUESTS)
    rtol = rtol_for(model, tok, fast, REQUESTS + MORE_REQUESTS)
    assert_same_updates(rewrite_weights(model), rewrite_weights(ours), rewrite_weights(theirs), rtol)
    assert any(float((a - b).norm()) > 0 for a, b in zip(middle, rewrite_weights(ours)))
    assert float((fast.key_covariance - plain.key_covariance).norm() / plain.key_covariance.norm()) < rtol


def test_changed_state_rebuilds_the_solver(package, tmp_path):
    """Someone replacing the editor's projection, or changing it in place, is honoured."""
    patch_alphaedit()
    model, tok = make("qwen2")
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    a = package.AlphaEditor(first, tok, config(package), stats_dir=tmp_path)
    b = package.AlphaEditor(second, tok, config(package), stats_dir=tmp_path)
    P = a.projection.clone()
    b.projection = torch.eye(b.projection.shape[1]).repeat(len(LAYERS), 1, 1)  # replaced: P = I
    before = rewrite_weights(model)
    a.edit(REQUESTS[:1])
    b.edit(REQUESTS[:1])
    constrained = [w - w0 for w, w0 in zip(rewrite_weights(first), before)]
    free = [w - w0 for w, w0 in zip(rewrite_weights(second), before)]
    for upd, layer_P in zip(constrained, P):
        assert float((upd - upd @ layer_P).norm() / upd.norm()) < 1e-4  # rows of W^T: the update lies in range(P)
    assert all(float((f - f @ p).norm() / f.norm()) > 1e-2 for f, p in zip(free, P))
    a.projection[:] = torch.eye(a.projection.shape[1])  # in place: P = I from now on
    middle = rewrite_weights(first)
    a.edit(REQUESTS[1:2])
    assert all(float(((w - w0) - (w - w0) @ p).norm() / (w - w0).norm()) > 1e-2
               for w, w0, p in zip(rewrite_weights(first), middle, P))


def test_device_check_lifted_under_the_patch_and_device_map_models(package, tmp_path):
    model, tok = make("qwen2")
    with pytest.raises(ValueError, match="CUDA"):
        package.AlphaEditor(model, tok, config(package), stats_dir=tmp_path)
    patch_alphaedit()
    mapped = load_with_device_map(model, tmp_path / "mapped", ["cpu"])
    mapped.config._name_or_path = model.config._name_or_path
    plain_copy = copy.deepcopy(model)
    a = package.AlphaEditor(mapped, tok, config(package), stats_dir=tmp_path / "stats")
    b = package.AlphaEditor(plain_copy, tok, config(package), stats_dir=tmp_path / "stats")
    before = rewrite_weights(model)
    a.edit(REQUESTS)
    b.edit(REQUESTS)
    assert_same_updates(before, rewrite_weights(mapped), rewrite_weights(plain_copy),
                        rtol_for(model, tok, a, REQUESTS))
    active_patch("alphaedit").undo()
    with pytest.raises(ValueError, match="CUDA"):
        package.AlphaEditor(model, tok, config(package), stats_dir=tmp_path)


def test_position_disagreement_is_refused_and_changes_nothing(package, monkeypatch, tmp_path):
    patch_alphaedit()
    model, tok = make("qwen2")
    editor = package.AlphaEditor(model, tok, config(package), stats_dir=tmp_path)
    import alphaedit.representations as reps

    theirs = reps.get_words_idxs_in_templates
    monkeypatch.setattr(reps, "get_words_idxs_in_templates",
                        lambda *a: [[i[0] - (1 if "Toko" in w else 0)] for i, w in zip(theirs(*a), a[2])])
    before, cov = rewrite_weights(model), editor.key_covariance.clone()
    with pytest.raises(ValueError, match="Toko Yasuda.*nothing was changed"):
        editor.edit(REQUESTS)
    assert all(torch.equal(a, b) for a, b in zip(before, rewrite_weights(model)))
    assert torch.equal(cov, editor.key_covariance)
    with pytest.raises(ValueError, match="prompt must contain one"):  # the package's own checks still first
        editor.edit([{"prompt": "no subject here", "subject": "x", "target_new": "y"}])


def test_compute_target_and_keys_match_the_packages(package):
    model, tok = make("qwen2")
    cfg = config(package).resolve_layout(model)
    import alphaedit.compute_keys as keys_module
    import alphaedit.compute_target as target_module

    request = {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": {"str": " piano"}}
    contexts = [["{}"], ["Some text. {}", "More text here. {}"]]
    theirs = target_module.compute_target(model, tok, request, cfg, 2, contexts)
    their_keys = keys_module.compute_keys(model, tok, [request, REQUESTS[0] | {"target_new": {"str": " x"}}], cfg, 1,
                                          contexts)
    patch_alphaedit()
    ours = target_module.compute_target(model, tok, request, cfg, 2, contexts)
    our_keys = keys_module.compute_keys(model, tok, [request, REQUESTS[0] | {"target_new": {"str": " x"}}], cfg, 1,
                                        contexts)
    hparams = config_hparams(cfg)
    assert float((ours.cpu() - theirs).norm() / theirs.norm()) < z_rtol(model, hparams, float(theirs.norm()))
    torch.testing.assert_close(our_keys, their_keys, rtol=1e-4, atol=1e-5)


def test_cli_runs_unchanged_on_the_cpu(package, tmp_path, monkeypatch):
    from alphaedit_fast.patch import main

    model, tok = make("qwen2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "config.json").write_text(json.dumps(
        {"layers": LAYERS, "v_num_grad_steps": 5, "v_lr": 0.5, "v_loss_layer": 3, "L2": 0.1,
         "rewrite_module_tmp": "model.layers.{}.mlp.down_proj", "mom2_dataset": "wikitext",
         "mom2_n_samples": N_SAMPLES, "nullspace_threshold": THRESHOLD, "unknown_key": 1}))
    (tmp_path / "requests.json").write_text(json.dumps({"requests": REQUESTS[:2]}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    main(["alphaedit", "--", "python", "-m", "alphaedit.cli", "--model", str(tmp_path / "model"), "--config",
          "config.json", "--requests", "requests.json", "--output-dir", "out", "--stats-dir", "stats",
          "--cache-dir", "zs", "--device", "cpu", "--dtype", "float32"])
    out = tmp_path / "out"
    assert {"alphaedit_state.pt", "alphaedit_config.json", "config.json"} <= {p.name for p in out.iterdir()}
    state = torch.load(out / "alphaedit_state.pt", weights_only=True)
    assert state["layers"] == LAYERS and state["projection"].shape == (2, 160, 160)
    assert state["key_covariance"].abs().sum() > 0
    assert json.loads((out / "alphaedit_config.json").read_text())["l2_regularization"] == 0.1
    from transformers import AutoModelForCausalLM

    edited = AutoModelForCausalLM.from_pretrained(out)
    name = "model.layers.2.mlp.down_proj.weight"
    assert not torch.equal(edited.get_parameter(name), model.get_parameter(name))
    assert sorted(p.name for p in (tmp_path / "zs" / "layer_2").iterdir()) == ["case_0.npz", "case_1.npz"]


REAL_SKIP = "set ALPHAEDIT_PACKAGE_REPO to an AlphaEdit checkout with the alphaedit package"


@pytest.mark.skipif(not REAL, reason=REAL_SKIP)
@pytest.mark.parametrize("family", ["qwen2", "qwen3_5"])
def test_real_package_patched_matches_unpatched(real_package, monkeypatch, tmp_path, family):
    """The real package unpatched (its statistics pass, P, keys, solves and key covariance), reading
    the z cache files the patched run wrote, against the patched run: same statistics files, P,
    updates and key covariance. (Its own targets: the next test.)"""
    on_cpu(real_package, monkeypatch)
    model, tok = make(family)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    fields = dict(context_templates=[["{}"], ["Some text. {}", "More text here. {}"]], cache_dir=tmp_path / "zs")
    patch = patch_alphaedit()
    fast = real_package.AlphaEditor(ours, tok, config(real_package), stats_dir=tmp_path / "ours", **fields)
    fast.edit(REQUESTS)
    patch.undo()
    plain = real_package.AlphaEditor(theirs, tok, config(real_package), stats_dir=tmp_path / "theirs", **fields)
    plain.edit(REQUESTS)
    for a, b in zip(sorted((tmp_path / "ours").rglob("*.npz")), sorted((tmp_path / "theirs").rglob("*.npz")),
                    strict=True):
        assert a.relative_to(tmp_path / "ours") == b.relative_to(tmp_path / "theirs")
        with np.load(a) as new, np.load(b) as old:
            assert int(new["mom2.count"]) == int(old["mom2.count"])
            assert_same_second_moment(torch.from_numpy(new["mom2.mom2"]), torch.from_numpy(old["mom2.mom2"]),
                                      int(old["mom2.count"]), model)
    torch.testing.assert_close(fast.projection, plain.projection, atol=1e-4, rtol=0)
    rtol = rtol_for(model, tok, fast, REQUESTS)
    assert_same_updates(rewrite_weights(model), rewrite_weights(ours), rewrite_weights(theirs), rtol)
    assert float((fast.key_covariance - plain.key_covariance).norm() / plain.key_covariance.norm()) < rtol


@pytest.mark.skipif(not REAL, reason=REAL_SKIP)
def test_real_package_targets_match_ours(real_package):
    model, tok = make("qwen2")
    cfg = config(real_package).resolve_layout(model)
    import alphaedit.compute_target as target_module

    request = {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": {"str": " piano"}, "case_id": 0}
    contexts = [["{}"], ["Some text. {}", "More text here. {}"]]
    try:
        theirs = target_module.compute_target(model, tok, request, cfg, 2, contexts)
    except RuntimeError as err:  # the stored compute_target (2c84b82) gathers 4 label rows from 3 logit rows
        pytest.skip(f"the package's own compute_target fails: {err}")
    patch_alphaedit()
    ours = target_module.compute_target(model, tok, request, cfg, 2, contexts)
    assert float((ours - theirs).norm() / theirs.norm()) < z_rtol(model, config_hparams(cfg), float(theirs.norm()))
