"""patch_easyedit() on a stand-in of EasyEdit's package (tests/standins/easyedit: its module layout and
call contracts, written on alphaedit_fast.reference), and, opt-in, on a real EasyEdit checkout
(ALPHAEDIT_EASYEDIT_REPO=/path/to/EasyEdit)."""

import copy
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from alphaedit_fast import AlphaEditHyperParams
from alphaedit_fast.integrations import IntegrationError, patch_easyedit
from alphaedit_fast.integrations.patching import active_patch
from alphaedit_fast.tiny import corpus, tiny_model, tiny_tokenizer_for
from tests.conftest import edit_rtol, test_hparams, z_rtol

STANDIN = Path(__file__).parent / "standins" / "easyedit"
N_SAMPLES = 300
THRESHOLD = {"llama": 1.0, "gpt2": 0.1}  # about half of the tiny models' key space


def _forget_easyedit():
    for name in [n for n in sys.modules if n == "easyeditor" or n.startswith("easyeditor.")]:
        del sys.modules[name]


@pytest.fixture
def easyedit(monkeypatch):
    """The stand-in on sys.path; afterwards the patch undone and its modules forgotten."""
    monkeypatch.syspath_prepend(str(STANDIN))
    _forget_easyedit()
    yield
    patch = active_patch("easyedit")
    if patch is not None:
        patch.undo()
    _forget_easyedit()


def fake_load_dataset(name, config):
    assert (name, config) == ("Salesforce/wikitext", "wikitext-103-raw-v1")
    return {"train": [{"text": t} for t in corpus()]}


def write_yaml(tmp_path, model, family, **overrides) -> str:
    """An EasyEdit-style hparams YAML for the tiny model."""
    ours = test_hparams(model).to_dict()
    config = {k: v for k, v in ours.items() if k != "extra"}
    config.update(alg_name="AlphaEdit", device=0, model_name=f"tiny-{family}", stats_dir=str(tmp_path / "stats"),
                  P_loc=str(tmp_path / "null_space_project.pt"), mom2_dataset="wikitext", mom2_n_samples=N_SAMPLES,
                  mom2_dtype="float32", nullspace_threshold=THRESHOLD[family])
    config.update(overrides)
    path = tmp_path / "AlphaEdit.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def setup(tmp_path, monkeypatch, family="llama"):
    """(EasyEdit's modules, tiny model, tokenizer, EasyEdit hparams); load_dataset monkeypatched."""
    import easyeditor.models.alphaedit.AlphaEdit_main as main
    import easyeditor.models.rome.layer_stats as ls

    monkeypatch.setattr(ls, "load_dataset", fake_load_dataset)
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    model.config._name_or_path = f"hub/tiny-{family}"
    hparams = main.AlphaEditHyperParams.from_hparams(write_yaml(tmp_path, model, family))
    return main, model, tok, hparams


EE_REQUESTS = [
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "English"},
    {"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano"},
]


def weights(model, hparams):
    return {n: model.get_parameter(f"{hparams.rewrite_module_tmp.format(l)}.weight").detach().clone()
            for n, l in enumerate(hparams.layers)}


def reset_globals(main):
    main.P_loaded, main.cache_c_new = False, False
    main.COV_CACHE.clear()


def test_missing_module_names_it_and_the_fix(monkeypatch):
    _forget_easyedit()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "easyedit" not in p.lower()])
    with pytest.raises(IntegrationError, match=r"easyeditor\.models\.alphaedit.*PYTHONPATH"):
        patch_easyedit()
    assert active_patch("easyedit") is None


@pytest.mark.parametrize("imported_first", [True, False])
def test_patch_is_idempotent_reaches_every_name_and_undoes(easyedit, imported_first):
    if imported_first:
        import easyeditor  # noqa: F401 - BaseEditor, ALG_DICT and the package bind the originals first
    patch = patch_easyedit()
    assert patch_easyedit() is patch
    import easyeditor
    import easyeditor.models.alphaedit.AlphaEdit_main as main
    import easyeditor.models.alphaedit.compute_ks as ks_module
    import easyeditor.models.alphaedit.compute_z as z_module
    from easyeditor.util.alg_dict import ALG_DICT

    for f in (main.apply_AlphaEdit_to_model, easyeditor.apply_AlphaEdit_to_model, ALG_DICT["AlphaEdit"],
              easyeditor.models.alphaedit.apply_AlphaEdit_to_model, main.compute_z, z_module.compute_z,
              main.compute_ks, ks_module.compute_ks, main.get_cov, main.get_project, main.layer_stats,
              main.execute_AlphaEdit):
        assert "alphaedit_fast" in f.__module__, f
    import easyeditor.models.rome.layer_stats as ls
    assert ls.layer_stats.__module__.startswith("easyeditor")  # ROME's stays EasyEdit's
    patch.undo()
    assert active_patch("easyedit") is None
    for f in (main.apply_AlphaEdit_to_model, easyeditor.apply_AlphaEdit_to_model, ALG_DICT["AlphaEdit"],
              main.compute_z, z_module.compute_z, main.compute_ks, main.get_cov, main.layer_stats):
        assert f.__module__.startswith("easyeditor"), f
    assert ALG_DICT["AlphaEdit"] is main.apply_AlphaEdit_to_model
    assert patch_easyedit() is not patch  # a fresh patch after undo


def test_edit_matches_easyedit_flow_on_the_reference(easyedit, tmp_path, monkeypatch):
    """Unpatched (the stand-in: EasyEdit's flow on alphaedit_fast.reference, P from per-layer stats
    passes) against patched, on copies of one model: same P, same updates, same cache_c; the patched
    run calls none of the stand-in's functions and computes the statistics in one pass."""
    main, model, tok, hparams = setup(tmp_path, monkeypatch)
    import easyeditor.models.alphaedit.compute_z as z_module
    import easyeditor.models.rome.layer_stats as ls

    before = weights(model, hparams)
    ref_model, _ = main.apply_AlphaEdit_to_model(copy.deepcopy(model), tok, EE_REQUESTS, hparams)
    ref_P, ref_cache = main.P.clone(), main.cache_c.clone()
    assert len(ls.CALLS) == 2 and Path(hparams.P_loc).exists()
    ref_stats = sorted((tmp_path / "stats").rglob("*.npz"))
    assert [p.name for p in ref_stats] == [f"model.layers.{l}.mlp.down_proj_float32_mom2_{N_SAMPLES}.npz"
                                           for l in hparams.layers]
    assert ref_stats[0].parent == tmp_path / "stats" / "tiny-llama" / "wikitext_stats"
    saved = {p: p.read_bytes() for p in ref_stats}
    for p in ref_stats:
        p.unlink()
    Path(hparams.P_loc).unlink()
    reset_globals(main)

    patch_easyedit()
    calls = (len(main.CALLS), len(z_module.CALLS), len(ls.CALLS))
    forwards = []
    model.register_forward_pre_hook(lambda m, a, k: forwards.append(1), with_kwargs=True)
    model_out, weights_copy = main.apply_AlphaEdit_to_model(model, tok, EE_REQUESTS, hparams)
    assert model_out is model
    assert (len(main.CALLS), len(z_module.CALLS), len(ls.CALLS)) == calls  # no stand-in function ran
    # P: computed from one statistics pass, saved to P_loc, the same projector
    torch.testing.assert_close(main.P, ref_P, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.load(hparams.P_loc), main.P)
    new_stats = sorted((tmp_path / "stats").rglob("*.npz"))
    assert new_stats == ref_stats  # written where EasyEdit caches them, readable by its layer_stats
    for p in new_stats:
        with np.load(p) as new, np.load(io.BytesIO(saved[p])) as old:
            assert int(new["mom2.count"]) == int(old["mom2.count"])
            assert int(new["sample_size"]) == N_SAMPLES
            torch.testing.assert_close(torch.from_numpy(new["mom2.mom2"]), torch.from_numpy(old["mom2.mom2"]),
                                       rtol=1e-5, atol=1e-3)
    # the edit
    assert weights_copy == {}
    rtol = edit_rtol(model, tok, [{**r, "prompt": r["prompt"].replace(r["subject"], "{}")} for r in EE_REQUESTS],
                     AlphaEditHyperParams.from_dict(dict(vars(hparams))))
    after, ref_after = weights(model, hparams), weights(ref_model, hparams)
    for i in after:
        upd, ref_upd = after[i] - before[i], ref_after[i] - before[i]
        assert ref_upd.norm() > 0
        assert (upd - ref_upd).norm() / ref_upd.norm() < rtol
    assert (main.cache_c - ref_cache).norm() / ref_cache.norm() < rtol


def test_contract_copy_orig_weights_cache_and_sequential_editor(easyedit, tmp_path, monkeypatch):
    main, model, tok, hparams = setup(tmp_path, monkeypatch)
    patch_easyedit()
    from easyeditor import BaseEditor

    before = weights(model, hparams)
    # copy=True: the input model is untouched; return_orig_weights: originals of the edited modules
    edited, orig = main.apply_AlphaEdit_to_model(model, tok, EE_REQUESTS[:1], hparams, copy=True,
                                                 return_orig_weights=True, keep_original_weight=True, train_ds=None)
    assert edited is not model
    assert all(torch.equal(before[i], w) for i, w in weights(model, hparams).items())
    names = [f"{hparams.rewrite_module_tmp.format(l)}.weight" for l in hparams.layers]
    assert sorted(orig) == sorted(names)
    assert all(torch.equal(orig[n], before[i]) for i, n in enumerate(names))
    assert any(not torch.equal(w, before[i]) for i, w in weights(edited, hparams).items())
    P = main.P
    cache_one = main.cache_c.clone()
    assert cache_one.abs().sum() > 0
    # the global cache_c accumulates across calls (and P is loaded once), reset_cache starts it over
    main.apply_AlphaEdit_to_model(copy.deepcopy(model), tok, EE_REQUESTS[1:], hparams)
    assert main.P is P
    growth = main.cache_c - cache_one  # + K K^T of the second request: positive semi-definite, not zero
    assert all(torch.linalg.eigvalsh(g).min() > -1e-3 * g.abs().max() and g.trace() > 0 for g in growth)
    main.apply_AlphaEdit_to_model(copy.deepcopy(model), tok, EE_REQUESTS[:1], hparams, reset_cache=True)
    torch.testing.assert_close(main.cache_c, cache_one, rtol=1e-3, atol=1e-4)

    # BaseEditor: non-sequential restores the weights; sequential keeps every edit and accumulates cache_c
    main.cache_c_new = False
    editor = BaseEditor.from_hparams(hparams, model, tok)
    editor.edit([r["prompt"] for r in EE_REQUESTS], [r["target_new"] for r in EE_REQUESTS],
                [r["subject"] for r in EE_REQUESTS])
    assert all(torch.equal(before[i], w) for i, w in weights(model, hparams).items())
    main.cache_c_new = False
    editor.edit([r["prompt"] for r in EE_REQUESTS], [r["target_new"] for r in EE_REQUESTS],
                [r["subject"] for r in EE_REQUESTS], sequential_edit=True)
    assert any(not torch.equal(w, before[i]) for i, w in weights(editor.model, hparams).items())
    assert all(c.trace() > c1.trace() for c, c1 in zip(main.cache_c, cache_one))


def test_entry_points_and_gpt2(easyedit, tmp_path, monkeypatch):
    """compute_z / compute_ks / execute_AlphaEdit patched on GPT-2 (Conv1D weights) against the reference."""
    from alphaedit_fast.reference.alphaedit import compute_ks_ref

    main, model, tok, hparams = setup(tmp_path, monkeypatch, "gpt2")
    templates = main.get_context_templates(model, tok)
    request = {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": " piano"}
    import easyeditor.models.alphaedit.compute_ks as ks_module
    import easyeditor.models.alphaedit.compute_z as z_module
    ref_keys = ks_module.compute_ks(model, tok, [request], hparams, 1, templates)
    ref_z = z_module.compute_z(model, tok, request, hparams, hparams.layers[-1], templates)
    patch_easyedit()
    keys = main.compute_ks(model, tok, [request], hparams, 1, templates)
    torch.testing.assert_close(keys, compute_ks_ref(model, tok, [{**request, "target_new": {"str": " piano"}}],
                                                    AlphaEditHyperParams.from_dict(dict(vars(hparams))), 1, templates)
                               .float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(keys, ref_keys.float(), rtol=1e-4, atol=1e-5)
    z = main.compute_z(model, tok, request, hparams, hparams.layers[-1], templates)
    assert z.shape == (model.config.n_embd,)
    assert (z - ref_z).norm() / ref_z.norm() < z_rtol(model, hparams, ref_z.norm().item())
    main.P = torch.eye(160).repeat(len(hparams.layers), 1, 1)
    main.cache_c = torch.zeros(len(hparams.layers), 160, 160)
    before = weights(model, hparams)
    deltas = main.execute_AlphaEdit(model, tok, [dict(request, prompt="Toko Yasuda plays the")], hparams)
    assert all(torch.equal(before[i], w) for i, w in weights(model, hparams).items())  # model restored
    for layer in hparams.layers:
        name = f"transformer.h.{layer}.mlp.c_proj.weight"
        assert deltas[name].shape == model.get_parameter(name).shape and deltas[name].norm() > 0
    assert main.cache_c.abs().sum() > 0  # grown in place


@pytest.mark.skipif(not os.environ.get("ALPHAEDIT_EASYEDIT_REPO"), reason="set ALPHAEDIT_EASYEDIT_REPO to a checkout")
def test_real_easyedit_unpatched_vs_patched(tmp_path, monkeypatch):
    repo = os.environ["ALPHAEDIT_EASYEDIT_REPO"]
    monkeypatch.syspath_prepend(repo)
    _forget_easyedit()
    try:
        main = pytest.importorskip("easyeditor.models.alphaedit.AlphaEdit_main", reason="EasyEdit does not import")
        model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
        model.config._name_or_path = "tiny-llama"
        # EasyEdit moves tensors to hparams.device (an int means cuda:N): the CPU where there is no GPU
        device = 0 if torch.cuda.is_available() else "cpu"
        model.to(f"cuda:{device}" if device == 0 else "cpu")
        hparams = main.AlphaEditHyperParams.from_hparams(write_yaml(tmp_path, model, "llama",
                                                                    model_name="tiny-llama", device=device))
        P = torch.eye(160).repeat(len(hparams.layers), 1, 1)
        torch.save(P, hparams.P_loc)
        main.CONTEXT_TEMPLATES_CACHE = [["{}"], ["The a. {}", "I b. {}"]]
        before = weights(model, hparams)
        main.P_loaded, main.cache_c_new = False, False
        ref_model, _ = main.apply_AlphaEdit_to_model(copy.deepcopy(model), tok, EE_REQUESTS, hparams)
        ref_cache = main.cache_c.clone()
        patch = patch_easyedit()
        main.P_loaded, main.cache_c_new = False, False
        main.apply_AlphaEdit_to_model(model, tok, EE_REQUESTS, hparams)
        rtol = edit_rtol(model, tok, [{**r, "prompt": r["prompt"].replace(r["subject"], "{}")} for r in EE_REQUESTS],
                         AlphaEditHyperParams.from_dict(dict(vars(hparams))))
        for i, w in weights(model, hparams).items():
            ref_upd = weights(ref_model, hparams)[i] - before[i]
            assert ((w - before[i]) - ref_upd).norm() / ref_upd.norm() < rtol
        assert (main.cache_c - ref_cache).norm() / ref_cache.norm() < rtol
        patch.undo()
    finally:
        if active_patch("easyedit") is not None:
            active_patch("easyedit").undo()
        _forget_easyedit()


@pytest.mark.skipif(not os.environ.get("ALPHAEDIT_EASYEDIT_REPO"), reason="set ALPHAEDIT_EASYEDIT_REPO to a checkout")
def test_real_easyedit_statistics_and_P(tmp_path, monkeypatch):
    """EasyEdit's own get_project / layer_stats against the patched ones: the same P, the same stats
    files (names, keys, counts, moments), and each side reads the other's files without a pass."""
    repo = os.environ["ALPHAEDIT_EASYEDIT_REPO"]
    monkeypatch.syspath_prepend(repo)
    _forget_easyedit()
    try:
        main = pytest.importorskip("easyeditor.models.alphaedit.AlphaEdit_main", reason="EasyEdit does not import")
        ls = sys.modules["easyeditor.models.rome.layer_stats"]
        monkeypatch.setattr(ls, "load_dataset", fake_load_dataset)
        model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
        model.config._name_or_path = "hub/tiny-llama"
        device = 0 if torch.cuda.is_available() else "cpu"
        model.to(f"cuda:{device}" if device == 0 else "cpu")
        dirs = {side: tmp_path / side for side in ("easyedit", "patched")}
        hp = {}
        for side, d in dirs.items():
            d.mkdir()
            hp[side] = main.AlphaEditHyperParams.from_hparams(write_yaml(d, model, "llama", device=device))

        def projectors(hparams):
            main.COV_CACHE.clear()
            return torch.stack([main.get_project(model, tok, layer, hparams).cpu() for layer in hparams.layers])

        ref_P = projectors(hp["easyedit"])
        patch = patch_easyedit()
        P = projectors(hp["patched"])
        torch.testing.assert_close(P, ref_P, atol=1e-4, rtol=0)
        files = {side: sorted(p.relative_to(d) for p in d.rglob("*.npz")) for side, d in dirs.items()}
        assert files["patched"] == files["easyedit"] and len(files["easyedit"]) == len(hp["easyedit"].layers)
        for f in files["easyedit"]:
            with np.load(dirs["easyedit"] / f) as old, np.load(dirs["patched"] / f) as new:
                assert sorted(new.keys()) == sorted(old.keys())
                assert int(new["mom2.count"]) == int(old["mom2.count"])
                torch.testing.assert_close(torch.from_numpy(new["mom2.mom2"]), torch.from_numpy(old["mom2.mom2"]),
                                           rtol=1e-5, atol=1e-3)

        def no_pass(*args, **kwargs):
            raise AssertionError("a statistics pass where the files exist")

        monkeypatch.setattr(ls, "load_dataset", no_pass)
        torch.testing.assert_close(projectors(hp["easyedit"]), ref_P, atol=1e-4, rtol=0)  # patched reads EasyEdit's
        patch.undo()
        torch.testing.assert_close(projectors(hp["patched"]), ref_P, atol=1e-4, rtol=0)  # EasyEdit reads ours
    finally:
        if active_patch("easyedit") is not None:
            active_patch("easyedit").undo()
        _forget_easyedit()
