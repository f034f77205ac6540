"""`"post_mlp_norm": "map"`: on models whose blocks normalise the MLP output (Gemma 2/3), each
layer's residual target is mapped through that norm. The fast path against the reference, and
what the mapping buys: the edited block's output reaches the target it is asked for."""

import copy
import warnings

import pytest
import torch

from alphaedit_fast import apply_AlphaEdit_to_model
from alphaedit_fast.editor import closest_unit_rms, through_post_mlp_norm
from alphaedit_fast.errors import HyperParamsError, NormalisedMLPOutputWarning
from alphaedit_fast.hparams import AlphaEditHyperParams
from alphaedit_fast.keys import get_module_input_output_at_words
from alphaedit_fast.reference import apply_alphaedit_ref
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for
from alphaedit_fast.values import compute_zs

from .conftest import CONTEXT_TEMPLATES, REQUESTS, assert_close_rel, edit_rtol, identity_projector, test_hparams

NORMALISED = ["gemma2", "gemma3_text"]


def rewrite_weights(model, hparams):
    return {l: model.get_parameter(hparams.rewrite_module_tmp.format(l) + ".weight").detach().clone()
            for l in hparams.layers}


def mapped(model, **overrides):
    hparams = test_hparams(model, **overrides)
    hparams.extra["post_mlp_norm"] = "map"
    return hparams


def block_output(model, tok, hparams):
    """The last edited block's output at each request's subject in its plain prompt: (d_model, n)."""
    return get_module_input_output_at_words(model, tok, hparams.layers[-1], [r["prompt"] for r in REQUESTS],
                                            [r["subject"] for r in REQUESTS], hparams.layer_module_tmp,
                                            hparams.fact_token)[1].T


def mlp_output(model, tok, hparams):
    """The rewrite module's output there: (n, d_model)."""
    return get_module_input_output_at_words(model, tok, hparams.layers[-1], [r["prompt"] for r in REQUESTS],
                                            [r["subject"] for r in REQUESTS], hparams.rewrite_module_tmp,
                                            hparams.fact_token)[1]


def gemma_like(family):
    """A tiny model whose post-MLP norm gains spread as Gemma-3-270M's do (0 to ~50x their mean
    of ~10 at layers 3-7, against an MLP output RMS of ~0.15), one feature of gain 0 included."""
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.model.layers:
            weight = block.post_feedforward_layernorm.weight
            gains = torch.exp(torch.empty(weight.shape).uniform_(-3, 4, generator=gen))
            gains[0] = 0
            weight.copy_(gains - 1)  # Gemma's norm multiplies by 1 + weight
    return model


@pytest.mark.parametrize("family", NORMALISED)
def test_mapped_edit_equals_the_reference(family):
    model, tok = gemma_like(family), tiny_tokenizer_for(family)
    hparams = mapped(model)
    P = identity_projector(hparams)
    before = rewrite_weights(model, hparams)
    fast, ref = copy.deepcopy(model), copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormalisedMLPOutputWarning)  # mapped: no warning
        apply_AlphaEdit_to_model(fast, tok, REQUESTS, hparams, P=P, context_templates=CONTEXT_TEMPLATES)
    apply_alphaedit_ref(ref, tok, REQUESTS, hparams, CONTEXT_TEMPLATES, P, torch.zeros_like(P))
    rtol = edit_rtol(model, tok, REQUESTS, hparams)
    plain = copy.deepcopy(model)
    with pytest.warns(NormalisedMLPOutputWarning, match="post_mlp_norm"):
        apply_AlphaEdit_to_model(plain, tok, REQUESTS, test_hparams(model), P=P, context_templates=CONTEXT_TEMPLATES)
    for layer, w0 in before.items():
        upd = fast.get_parameter(hparams.rewrite_module_tmp.format(layer) + ".weight").detach() - w0
        ref_upd = ref.get_parameter(hparams.rewrite_module_tmp.format(layer) + ".weight").detach() - w0
        plain_upd = plain.get_parameter(hparams.rewrite_module_tmp.format(layer) + ".weight").detach() - w0
        assert_close_rel(upd, ref_upd, rtol, what=f"layer {layer}")
        assert float((plain_upd - upd).norm() / upd.norm()) > 10 * rtol  # the mapping changes the edit


@pytest.mark.parametrize("family", NORMALISED)
def test_mapping_brings_the_block_output_nearest_its_target(family):
    """One edited layer, keys from the plain prompts (so the solve gives each request the MLP output
    it asks for) and no regularisation to speak of. Mapped, the block output at each prompt lands
    on the point of the norm's reach nearest z (computed here from the unedited MLP output);
    unmapped, it lands much farther."""
    model, tok = gemma_like(family), tiny_tokenizer_for(family)
    templates = [["{}"]]
    errors = {}
    for mode in ("ignore", "map"):
        edited = copy.deepcopy(model)
        hparams = test_hparams(model, layers=[2], L2=1e-6)
        hparams.extra["post_mlp_norm"] = mode
        zs = compute_zs(edited, tok, REQUESTS, hparams, 2, templates).T
        start, mlp_out = block_output(edited, tok, hparams), mlp_output(edited, tok, hparams)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NormalisedMLPOutputWarning)
            apply_AlphaEdit_to_model(edited, tok, REQUESTS, hparams, P=identity_projector(hparams),
                                     context_templates=templates)
        errors[mode] = float((block_output(edited, tok, hparams) - zs).norm() / (zs - start).norm())
    norm = model.model.layers[2].post_feedforward_layernorm
    with torch.no_grad():
        change = through_post_mlp_norm(zs - start, mlp_out, norm)
        nearest = start - norm(mlp_out).T + norm(mlp_out + change.T).T
    assert errors["map"] == pytest.approx(float((nearest - zs).norm() / (zs - start).norm()), abs=1e-3)
    assert errors["map"] < 0.6 * errors["ignore"], errors


def test_the_key_is_checked_and_kept_in_files():
    model = tiny_model("gemma2")
    with pytest.raises(HyperParamsError, match="post_mlp_norm"):
        AlphaEditHyperParams.from_dict({**test_hparams(model).to_dict(), "post_mlp_norm": "yes"})
    hparams = mapped(model)
    again = AlphaEditHyperParams.from_dict(hparams.to_dict())
    assert again.maps_post_mlp_norm and again.to_dict()["post_mlp_norm"] == "map"
    assert not test_hparams(model).maps_post_mlp_norm


def test_models_without_the_norm_edit_as_before():
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    P = identity_projector(test_hparams(model))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    apply_AlphaEdit_to_model(a, tok, REQUESTS, test_hparams(model), P=P, context_templates=CONTEXT_TEMPLATES)
    apply_AlphaEdit_to_model(b, tok, REQUESTS, mapped(model), P=P, context_templates=CONTEXT_TEMPLATES)
    for name, weight in rewrite_weights(a, test_hparams(model)).items():
        assert torch.equal(weight, rewrite_weights(b, test_hparams(model))[name])


def test_closest_unit_rms_is_the_nearest_reachable_point():
    gen = torch.Generator().manual_seed(1)
    gain = torch.exp(torch.empty(32, dtype=torch.float64).uniform_(-3, 3, generator=gen))
    gain[3] = 0
    target = torch.randn(32, 5, generator=gen, dtype=torch.float64) * 4
    u = closest_unit_rms(gain, target)
    assert torch.allclose(u.pow(2).mean(0), torch.ones(5, dtype=torch.float64), atol=1e-9)
    best = (gain[:, None] * u - target).norm(dim=0)
    for _ in range(200):  # random points of unit RMS and small moves around u do no better
        v = torch.randn(32, 5, generator=gen, dtype=torch.float64)
        near = u + 1e-3 * v
        for w in (v, near):
            w = w / w.pow(2).mean(0).sqrt()
            assert bool(((gain[:, None] * w - target).norm(dim=0) >= best - 1e-9).all())
