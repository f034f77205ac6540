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
