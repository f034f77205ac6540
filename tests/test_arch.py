import re

import pytest
import torch
import transformers

from alphaedit_fast import ModelStructureError, detect
from alphaedit_fast.arch import get_module, key_width, stores_keys_first
from alphaedit_fast.tiny import FAMILY_CONFIGS, tiny_model


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
