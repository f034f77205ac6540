import json

import pytest

from alphaedit_fast import AlphaEditHyperParams, HyperParamsError
from alphaedit_fast.tiny import tiny_model

# The keys and values of the original hparams/AlphaEdit/*.json files.
_COMMON = {
    "clamp_norm_factor": 0.75, "layer_selection": "all", "fact_token": "subject_last",
    "v_weight_decay": 0.5, "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000, "mom2_dtype": "float32", "nullspace_threshold": 2e-2, "L2": 10,
}
ORIGINAL_FILES = {
    "gpt2-xl": {**_COMMON, "model_name": "gpt2-xl", "layers": [13, 14, 15, 16, 17], "v_num_grad_steps": 20,
                "v_lr": 5e-1, "v_loss_layer": 47, "mom2_update_weight": 20000,
                "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "layer_module_tmp": "transformer.h.{}",
                "mlp_module_tmp": "transformer.h.{}.mlp", "attn_module_tmp": "transformer.h.{}.attn",
                "ln_f_module": "transformer.ln_f", "lm_head_module": "lm_head"},
    "EleutherAI_gpt-j-6B": {**_COMMON, "model_name": "EleutherAI_gpt-j-6B", "layers": [3, 4, 5, 6, 7, 8],
                            "v_num_grad_steps": 25, "v_lr": 5e-1, "v_loss_layer": 27, "mom2_update_weight": 15000,
                            "rewrite_module_tmp": "transformer.h.{}.mlp.fc_out",
                            "layer_module_tmp": "transformer.h.{}", "mlp_module_tmp": "transformer.h.{}.mlp",
                            "attn_module_tmp": "transformer.h.{}.attn", "ln_f_module": "transformer.ln_f",
                            "lm_head_module": "lm_head"},
    "Llama3-8B": {**_COMMON, "model_name": "Llama3-8B", "layers": [4, 5, 6, 7, 8], "v_num_grad_steps": 25,
                  "v_lr": 1e-1, "v_loss_layer": 31, "mom2_update_weight": 15000,
                  "rewrite_module_tmp": "model.layers.{}.mlp.down_proj", "layer_module_tmp": "model.layers.{}",
                  "mlp_module_tmp": "model.layers.{}.mlp", "attn_module_tmp": "model.layers.{}.self_attn",
                  "ln_f_module": "model.norm", "lm_head_module": "lm_head"},
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_FILES))
def test_reads_original_files_unchanged(tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(ORIGINAL_FILES[name], indent=4))
    hp = AlphaEditHyperParams.from_json(path)
    for key, value in ORIGINAL_FILES[name].items():
        assert getattr(hp, key) == value
    assert {k: v for k, v in hp.to_dict().items() if k in ORIGINAL_FILES[name]} == ORIGINAL_FILES[name]


def test_unknown_keys_are_kept(tmp_path):
    data = {**ORIGINAL_FILES["Llama3-8B"], "alg_name": "AlphaEdit", "device": 0}
    path = tmp_path / "h.json"
    path.write_text(json.dumps(data))
    hp = AlphaEditHyperParams.from_json(path)
    assert hp.extra == {"alg_name": "AlphaEdit", "device": 0}
    assert hp.to_dict()["alg_name"] == "AlphaEdit"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layers": []}, "layers"),
        ({"layers": [5, 4]}, "increasing"),
        ({"layers": [1, "2"]}, "layers"),
        ({"fact_token": "subject_middle"}, "fact_token"),
        ({"v_lr": -1.0}, "v_lr"),
        ({"v_num_grad_steps": 0}, "v_num_grad_steps"),
        ({"L2": float("nan")}, "L2"),
        ({"rewrite_module_tmp": "model.layers.mlp"}, "rewrite_module_tmp"),
        ({"rewrite_module_tmp": "model.layers.{}.{x}"}, "no other brace"),
        ({"layer_module_tmp": "model.layers.{}}"}, "no other brace"),
        ({"ln_f_module": None}, "ln_f_module"),
        ({"extra": 5}, "extra"),
    ],
)
def test_invalid_values_raise_clear_errors(change, message):
    with pytest.raises(HyperParamsError, match=message):
        AlphaEditHyperParams.from_dict({**ORIGINAL_FILES["Llama3-8B"], **change})


def test_missing_key_and_bad_file(tmp_path):
    data = dict(ORIGINAL_FILES["gpt2-xl"])
    del data["layers"]
    with pytest.raises(HyperParamsError, match="layers"):
        AlphaEditHyperParams.from_dict(data)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HyperParamsError, match="not valid JSON"):
        AlphaEditHyperParams.from_json(bad)
    with pytest.raises(HyperParamsError, match="does not exist"):
        AlphaEditHyperParams.from_json(tmp_path / "missing.json")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([ORIGINAL_FILES["gpt2-xl"]]))
    for path, message in ((binary, "not valid JSON"), (deep, "not valid JSON"), (tmp_path, "cannot read"),
                          (listed, "JSON object")):
        with pytest.raises(HyperParamsError, match=message):
            AlphaEditHyperParams.from_json(path)


def test_numpy_layer_numbers_are_plain_ints():
    import numpy as np

    hp = AlphaEditHyperParams.from_dict({**ORIGINAL_FILES["Llama3-8B"], "layers": list(np.arange(4, 9))})
    assert hp.layers == [4, 5, 6, 7, 8] and all(type(layer) is int for layer in hp.layers)


@pytest.mark.parametrize("family, rewrite", [("gpt2", "transformer.h.{}.mlp.c_proj"),
                                             ("llama", "model.layers.{}.mlp.down_proj")])
def test_for_model_fills_templates(family, rewrite):
    model = tiny_model(family)
    hp = AlphaEditHyperParams.for_model(model, layers=[1, 2], L2=3.0)
    assert hp.rewrite_module_tmp == rewrite
    assert hp.layers == [1, 2] and hp.L2 == 3.0
    assert hp.v_loss_layer == 3
    assert AlphaEditHyperParams.for_model(model).layers == [0, 1, 2, 3]
