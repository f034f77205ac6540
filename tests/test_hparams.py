import dataclasses
import json
import re
import sys

import pytest
import transformers
from transformers import GPT2Config, GPTJConfig, LlamaConfig, Qwen2Config

from alphaedit_fast import AlphaEditHyperParams, HyperParamsError
from alphaedit_fast.hparams import MODEL_FIELDS, find_preset, matching_preset, preset_names
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
    assert hp.v_loss_layer == 3 and "preset" not in hp.extra


# -- presets ---------------------------------------------------------------------------------
EASYEDIT_KEYS = {"alg_name", "stats_dir", "P_loc", "device"}


@pytest.fixture(scope="module")
def factworld_model():
    from alphaedit_fast.factworld import load_shipped

    return load_shipped()[0]


def test_every_preset_loads_with_its_source_and_architecture():
    assert preset_names() == ["EleutherAI_gpt-j-6B", "factworld", "gemma3-270m", "gpt2-xl", "Llama3-8B",
                              "llama3.1-8b", "qwen2.5-7b", "qwen3.5-27b", "smollm2-135m"]
    for name in preset_names():
        hp = AlphaEditHyperParams.load(name)
        depth = hp.extra["architecture"]["num_hidden_layers"]
        assert hp.extra["source"] and hp.extra["architecture"]["model_type"]
        assert hp.layers[-1] < depth and hp.v_loss_layer == depth - 1


@pytest.mark.parametrize("name", sorted(ORIGINAL_FILES))
def test_original_presets_hold_the_original_values(name):
    hp = AlphaEditHyperParams.load(name)
    assert {k: v for k, v in hp.to_dict().items() if k in ORIGINAL_FILES[name]} == ORIGINAL_FILES[name]
    assert set(hp.extra) == {"source", "architecture"}
    assert hp.extra["source"].endswith(f"/hparams/AlphaEdit/{name}.json")


def test_easyedit_presets_keep_easyedit_values_and_keys():
    qwen, llama = AlphaEditHyperParams.load("qwen2.5-7b"), AlphaEditHyperParams.load("llama3.1-8b")
    assert (qwen.layers, qwen.v_lr, qwen.clamp_norm_factor, qwen.v_weight_decay, qwen.L2, qwen.v_loss_layer) == (
        [4, 5, 6, 7, 8], 0.5, 4.0, 1e-3, 1.0, 27)
    assert {k: v for k, v in llama.to_dict().items() if k in ORIGINAL_FILES["Llama3-8B"] and k != "model_name"} == {
        k: v for k, v in ORIGINAL_FILES["Llama3-8B"].items() if k != "model_name"}
    for hp, name in ((qwen, "qwen2.5-7b"), (llama, "llama3.1-8b")):
        assert EASYEDIT_KEYS < set(hp.extra) and hp.extra["alg_name"] == "AlphaEdit"
        assert hp.extra["source"].endswith(f"/hparams/AlphaEdit/{name}.yaml")


@pytest.mark.parametrize("alias, name", [
    ("Llama3-8B", "Llama3-8B"), ("llama3-8b.json", "Llama3-8B"), ("LLAMA3-8B.JSON", "Llama3-8B"),
    ("llama-3-8b", "Llama3-8B"), ("gpt2-xl", "gpt2-xl"), ("GPT2_XL.json", "gpt2-xl"),
    ("gpt-j-6b", "EleutherAI_gpt-j-6B"), ("gpt-j-6B", "EleutherAI_gpt-j-6B"),
    ("EleutherAI_gpt-j-6B.json", "EleutherAI_gpt-j-6B"), ("qwen2.5-7b", "qwen2.5-7b"), ("Qwen2.5-7B", "qwen2.5-7b"),
    ("llama3.1-8b", "llama3.1-8b"), ("Llama-3.1-8B", "llama3.1-8b"), ("factworld", "factworld"),
])
def test_presets_load_by_name_variants(alias, name):
    assert find_preset(alias) == name
    assert AlphaEditHyperParams.load(alias).to_dict() == AlphaEditHyperParams.load(name).to_dict()


def test_load_reads_json_files_as_from_json(tmp_path):
    path = tmp_path / "Llama3-8B.json"
    path.write_text(json.dumps({**ORIGINAL_FILES["Llama3-8B"], "layers": [1, 2]}))
    for given in (path, str(path)):
        assert AlphaEditHyperParams.load(given) == AlphaEditHyperParams.from_json(path)
        assert AlphaEditHyperParams.load(given).layers == [1, 2]  # the file, not the preset of that name


EASYEDIT_YAML = """alg_name: "AlphaEdit"
model_name: "Qwen/Qwen2.5-7B-Instruct"
stats_dir: "./data/stats"
# a comment, as EasyEdit's files have
P_loc: "./null_space_project.pt"
device: 0
layers: [4, 5, 6, 7, 8]
clamp_norm_factor: 4
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 27
v_weight_decay: 1e-3
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
nullspace_threshold: 2e-2
L2: 1
"""


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".YAML"])
def test_load_reads_easyedit_yaml(tmp_path, suffix):
    path = tmp_path / f"qwen{suffix}"
    path.write_text(EASYEDIT_YAML)
    hp = AlphaEditHyperParams.load(path)
    assert hp.extra == {"alg_name": "AlphaEdit", "stats_dir": "./data/stats", "P_loc": "./null_space_project.pt",
                        "device": 0}
    assert (hp.v_lr, hp.v_weight_decay, hp.nullspace_threshold) == (0.5, 1e-3, 2e-2)  # '5e-1' is a str to YAML 1.1
    assert (hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_dtype) == ("wikipedia", 100000, "float32")
    preset = AlphaEditHyperParams.load("qwen2.5-7b").to_dict()
    assert hp.to_dict() == {k: v for k, v in preset.items() if k not in ("source", "architecture")}


def test_bad_yaml_and_unknown_names_raise_clear_errors(tmp_path, monkeypatch):
    cases = {"broken.yaml": "layers: [1, 2\n", "list.yaml": "- layers\n- 4\n", "empty.yml": "",
             "binary.yaml": b"\xff\xfe\x00"}
    for name, text in cases.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(HyperParamsError, match=re.escape(str(path))):
            AlphaEditHyperParams.load(path)
    with pytest.raises(HyperParamsError, match="neither a hyper-parameter file.*Llama3-8B, llama3.1-8b"):
        AlphaEditHyperParams.load("llama-9-400b")
    with pytest.raises(HyperParamsError, match="no such file"):
        AlphaEditHyperParams.load(tmp_path / "missing.json")
    with pytest.raises(HyperParamsError, match="preset name"):
        AlphaEditHyperParams.load(5)
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML not installed
    with pytest.raises(HyperParamsError, match="needs PyYAML"):
        AlphaEditHyperParams.load(tmp_path / "list.yaml")


def _named(config, name_or_path):
    config._name_or_path = name_or_path
    return config


LLAMA3_SHAPE = dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336)


@pytest.mark.parametrize("config, preset", [
    (LlamaConfig(**LLAMA3_SHAPE), "Llama3-8B"),
    (_named(LlamaConfig(**LLAMA3_SHAPE), "meta-llama/Meta-Llama-3-8B-Instruct"), "Llama3-8B"),
    (_named(LlamaConfig(**LLAMA3_SHAPE), "meta-llama/Llama-3.1-8B-Instruct"), "llama3.1-8b"),
    (Qwen2Config(num_hidden_layers=28, hidden_size=3584, intermediate_size=18944), "qwen2.5-7b"),
    (GPT2Config(n_layer=48, n_embd=1600), "gpt2-xl"),
    (GPTJConfig(n_layer=28, n_embd=4096), "EleutherAI_gpt-j-6B"),
    (LlamaConfig(num_hidden_layers=6, hidden_size=128, intermediate_size=512), "factworld"),
    (LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008), None),  # Llama-2-7B
    (GPT2Config(n_layer=48, n_embd=1280), None),
    (Qwen2Config(**LLAMA3_SHAPE), None),
])
def test_matching_preset_compares_model_type_depth_and_widths(config, preset):
    assert matching_preset(config) == preset


def test_qwen3_5_27b_preset_holds_the_authors_values_and_fits_its_shape():
    hp = AlphaEditHyperParams.load("qwen3.5-27b")
    assert "jianghoucheng/AlphaEdit" in hp.extra["source"] and hp.extra["source"].split(" ")[0].endswith(
        "/configs/qwen3.5-27b.json")
    assert (hp.layers, hp.v_lr, hp.v_loss_layer, hp.v_weight_decay, hp.clamp_norm_factor, hp.kl_factor, hp.L2,
            hp.nullspace_threshold, hp.mom2_n_samples) == ([4, 5, 6, 7, 8], 0.1, 63, 0.5, 0.75, 0.0625, 10.0, 0.02,
                                                           100000)
    config_class = getattr(transformers, "Qwen3_5TextConfig", None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3.5")
    assert matching_preset(config_class(num_hidden_layers=64, hidden_size=5120, intermediate_size=17408)) == \
        "qwen3.5-27b"


def test_for_model_takes_the_matching_preset(factworld_model):
    hp = AlphaEditHyperParams.for_model(factworld_model)
    assert hp.extra["preset"] == "factworld" and hp.layers == [0]
    expected = AlphaEditHyperParams.load("factworld")
    assert dataclasses.replace(hp, extra={}) == dataclasses.replace(expected, extra={})
    overridden = AlphaEditHyperParams.for_model(factworld_model, L2=3.0)
    assert overridden.L2 == 3.0 and overridden.layers == [0]


def test_factworld_preset_is_what_edit_hparams_gives_the_shipped_model(factworld_model):
    from alphaedit_fast.factworld.editing import edit_hparams

    def fields(hp, skip=("model_name", "extra")):
        return {k: v for k, v in dataclasses.asdict(hp).items() if k not in skip}

    preset = AlphaEditHyperParams.load("factworld")
    assert fields(edit_hparams(factworld_model)) == fields(preset)
    assert edit_hparams(factworld_model).extra == {"preset": "factworld"}
    detected = AlphaEditHyperParams.for_model(factworld_model, layers=[0])
    assert fields(detected, skip=()).items() >= {k: getattr(preset, k) for k in MODEL_FIELDS[1:]}.items()
    config = factworld_model.config
    assert preset.extra["architecture"] == {k: getattr(config, k) for k in preset.extra["architecture"]}


def test_for_model_without_layers_or_preset_raises():
    message = r"give the layers to edit \(0-3 here\).*layers=\[4, 5, 6, 7, 8\]"
    with pytest.raises(HyperParamsError, match=message) as info:
        AlphaEditHyperParams.for_model(tiny_model("llama"))
    for name, label in (("Llama3-8B", "Llama-3-8B"), ("gpt2-xl", "GPT-2 XL"), ("EleutherAI_gpt-j-6B", "GPT-J-6B")):
        hp = AlphaEditHyperParams.load(name)  # the message quotes these presets' layers
        depth = hp.extra["architecture"]["num_hidden_layers"]
        assert f"{hp.layers[0]}-{hp.layers[-1]} of {depth} for {label}" in str(info.value)


def test_for_model_checks_a_matching_presets_modules(tmp_path, monkeypatch):
    import alphaedit_fast.hparams as hparams_module

    data = {**ORIGINAL_FILES["Llama3-8B"], "layers": [1, 2], "v_loss_layer": 3, "rewrite_module_tmp": "model.{}.mlp",
            "architecture": {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 64}}
    (tmp_path / "tiny-llama.json").write_text(json.dumps(data))
    monkeypatch.setattr(hparams_module, "PRESETS_DIR", tmp_path)
    model = tiny_model("llama")
    with pytest.raises(HyperParamsError, match="preset tiny-llama fits the shape.*rewrite_module_tmp"):
        AlphaEditHyperParams.for_model(model)
    data["rewrite_module_tmp"] = "model.layers.{}.mlp.down_proj"
    (tmp_path / "tiny-llama.json").write_text(json.dumps(data))
    hp = AlphaEditHyperParams.for_model(model)
    assert hp.layers == [1, 2] and hp.extra["preset"] == "tiny-llama"


@pytest.mark.parametrize("name, family, config", [
    ("smollm2-135m", "llama", dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                                   num_attention_heads=9, num_key_value_heads=3)),
    ("gemma3-270m", "gemma3_text", dict(num_hidden_layers=18, hidden_size=640, intermediate_size=2048,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=256)),
])
def test_the_real_checkpoints_get_their_presets(name, family, config):
    """A model of each real checkpoint's shape (random, small vocabulary) matches its preset."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {family} (Gemma 3 arrived in 4.50)")

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, vocab_size=64, **config))
    hp = AlphaEditHyperParams.for_model(model)
    assert hp.extra["preset"] == name and hp.model_name == name
