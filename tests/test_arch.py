import re

import pytest
import torch
import transformers

from alphaedit_fast import ModelStructureError, detect
from alphaedit_fast.arch import get_module, key_width, stores_keys_first
from alphaedit_fast.tiny import (
    FAMILY_CONFIGS,
    WRAPPED_VISION_CONFIGS,
    tiny_model,
    tiny_tokenizer_for,
    tiny_wrapped_model,
)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_detects_every_family(family):
    from transformers import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {family} models")
    model = tiny_model(family)
    spec = detect(model)
    assert spec.num_layers == 4
    module = get_module(model, spec.rewrite_module_tmp.format(3))
    assert key_width(module) == 160
    assert stores_keys_first(module) == (family == "gpt2")  # GPT-2's Conv1D stores (d_k, d_model)
    get_module(model, spec.ln_f_module)
    assert get_module(model, spec.lm_head_module).weight.shape[1] == 64


def test_unknown_model_is_refused():
    with pytest.raises(ModelStructureError, match="cannot tell"):
        detect(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_missing_module_names_it():
    with pytest.raises(ModelStructureError, match="model.layers.9.mlp.down_proj"):
        get_module(tiny_model("llama"), "model.layers.9.mlp.down_proj")


MOE_EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


@pytest.mark.parametrize("family, overrides, dense", [
    ("qwen3_moe", dict(MOE_EXPERTS, mlp_only_layers=[0, 1]), [0, 1]),
    ("qwen2_moe", dict(MOE_EXPERTS, shared_expert_intermediate_size=32, mlp_only_layers=[0]), [0]),
])
def test_mixture_of_experts_layers_are_refused_naming_the_dense_ones(family, overrides, dense):
    """A routed MLP has no single output projection (Qwen2-MoE's gated shared expert is not
    one either): editing such a layer is refused, with the dense layers named; those edit."""
    from alphaedit_fast import AlphaEditHyperParams
    from alphaedit_fast.validation import check_model

    if family not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {family} models")
    model = tiny_model(family, **overrides)
    refusal = rf"layer 2 .*mixture-of-experts.*dense layers are {re.escape(str(dense))}"
    with pytest.raises(ModelStructureError, match=refusal):
        check_model(model, AlphaEditHyperParams.for_model(model, layers=[dense[-1], 2]))
    assert len(check_model(model, AlphaEditHyperParams.for_model(model, layers=dense))) == len(dense)


def test_all_experts_model_is_refused_as_such():
    model = tiny_model("mixtral", num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(ModelStructureError, match="mixture-of-experts model"):
        detect(model)


def _wrapped_or_skip(model_type):
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING or not hasattr(transformers, "AutoModelForImageTextToText"):
        pytest.skip(f"transformers {transformers.__version__} has no {model_type} image-text-to-text models")
    return tiny_wrapped_model(model_type)


@pytest.mark.parametrize("model_type", sorted(WRAPPED_VISION_CONFIGS))
def test_multimodal_wrappers_edit_their_language_model_as_the_reference(model_type):
    """`model.language_model.layers.{}` (transformers 5) and `language_model.model.layers.{}` (4.x):
    detected, and the edit of the wrapped decoder equals the reference's."""
    import copy

    from alphaedit_fast import apply_AlphaEdit_to_model
    from alphaedit_fast.reference import apply_alphaedit_ref

    from .conftest import CONTEXT_TEMPLATES, REQUESTS, edit_rtol, test_hparams
    from .test_engine import random_projector, rewrite_weights

    model = _wrapped_or_skip(model_type)
    tok = tiny_tokenizer_for(model_type)
    spec = detect(model)
    decoder = spec.layer_module_tmp.format("")[:-1]
    assert decoder in ("model.language_model.layers", "language_model.model.layers") and spec.num_layers == 4
    assert get_module(model, spec.lm_head_module) is model.get_output_embeddings()
    hparams = test_hparams(model, L2=10.0)
    assert hparams.rewrite_module_tmp == decoder + ".{}.mlp.down_proj"
    if model_type == "llava" and transformers.__version__ < "5":
        pytest.skip("4.x's Llava forward merges image features even for text-only prompts (and fails without them)")
    P, ref_model = random_projector(hparams), copy.deepcopy(model)
    before = rewrite_weights(model, hparams)
    apply_AlphaEdit_to_model(model, tok, copy.deepcopy(REQUESTS), hparams, P=P, context_templates=CONTEXT_TEMPLATES)
    updates, _ = apply_alphaedit_ref(ref_model, tok, copy.deepcopy(REQUESTS), hparams, CONTEXT_TEMPLATES, P,
                                     torch.zeros_like(P))
    rtol = edit_rtol(model, tok, REQUESTS, hparams)
    for b, w, layer in zip(before, rewrite_weights(model, hparams), hparams.layers):
        assert updates[layer].norm() > 0
        assert ((w - b) - updates[layer]).norm() / updates[layer].norm() < rtol


def test_a_text_model_preset_fits_the_same_model_under_a_wrapper(tmp_path, monkeypatch):
    import json

    import alphaedit_fast.hparams as hparams_module
    from alphaedit_fast import AlphaEditHyperParams

    model = _wrapped_or_skip("qwen3_5")
    preset = {**AlphaEditHyperParams.load("qwen3.5-27b").to_dict(), "layers": [1, 2], "v_loss_layer": 3,
              "architecture": {"model_type": "qwen3_5_text", "num_hidden_layers": 4, "hidden_size": 64}}
    (tmp_path / "tiny-qwen3.5.json").write_text(json.dumps(preset))
    monkeypatch.setattr(hparams_module, "PRESETS_DIR", tmp_path)
    hp = AlphaEditHyperParams.for_model(model)
    assert hp.extra["preset"] == "tiny-qwen3.5" and hp.layers == [1, 2]
    assert hp.rewrite_module_tmp == "model.language_model.layers.{}.mlp.down_proj"
    assert hp.ln_f_module == "model.language_model.norm" and hp.lm_head_module == "lm_head"
