import math

import pytest
import torch

from alphaedit_fast import cli
from alphaedit_fast.cli import main
from alphaedit_fast.demo import run_demo, run_tiny_demo
from alphaedit_fast.factworld import __main__ as factworld_main
from alphaedit_fast.factworld import causal_trace


def test_tiny_demo_edits_raise_every_target(capsys):
    rows = run_tiny_demo("gpt2")
    assert all(after > 10 * before for _, before, after in rows), rows
    assert "p after" in capsys.readouterr().out


def test_factworld_demo_edits_its_facts(capsys):
    rows = run_demo()
    printed = capsys.readouterr()
    assert "z:" in printed.err and "stats:" in printed.err  # every step longer than a few seconds shows progress
    rewrites = sum(row["after"][0] > 0.5 for row in rows)
    paraphrases = sum(row["after"][1] > 0.5 for row in rows)
    assert rewrites >= 8 and paraphrases >= 8, rows
    assert all(row["before"][0] < 0.01 < row["after"][0] for row in rows)
    assert "neighbour p(true)" in printed.out


def test_cli_demo_and_version(capsys):
    assert main(["demo", "--tiny", "qwen2"]) == 0
    assert main(["version"]) == 0
    out = capsys.readouterr().out
    assert "edits in" in out and "alphaedit_fast 0.1.0" in out


def test_cli_bench_writes_results(tmp_path, capsys):
    import json

    assert main(["bench", "--shape", "a-gpt2-6x128", "--edits", "2", "--repeats", "1", "--solve",
                 "--solve-dk", "96", "--solve-edits", "8", "--paths", "reference,fast,fast-whole-rows",
                 "--out", str(tmp_path)]) == 0
    edit = json.loads((tmp_path / "edit-a-gpt2-6x128-2-cpu.json").read_text())
    assert set(edit["paths"]) == {"reference", "fast", "fast-whole-rows"} and edit["speedup"]["total"] > 0
    assert set(edit["suffix_only_speedup"]) == {"z", "total"}
    assert {"z", "keys", "solve", "cache update", "total", "edits_per_s"} <= set(edit["paths"]["fast"])
    assert "torch" in edit["machine"] and "date" in edit["machine"]
    tokens = edit["z_step_tokens"]
    assert 0 < tokens["suffix"] <= tokens["suffix_padded"] < tokens["real"] <= tokens["padded"]
    for path in ("reference", "fast"):
        peaks = edit["peak_memory_bytes"][path]
        assert set(peaks) == {"z", "keys", "solve", "cache update"} and min(peaks.values()) > 0
    solve = json.loads((tmp_path / "solve-dk96-8-cpu.json").read_text())
    # fp32 solves of a system with condition number ~20 (L2 = 10): the forms differ by at most
    # cond * tolerance(float32, d_k=96) ~ 5e-5 (conftest); 1e-3 leaves room for any seed's draw
    assert max(solve["max_rel_diff_vs_dense"].values()) < 1e-3
    out = capsys.readouterr().out
    assert "speed-up" in out and "tokens per z step" in out


@pytest.mark.parametrize("entry, argv, run_name", [
    (cli.main, ["version"], "run_command"),
    (factworld_main.main, ["corpus", "--out", "x.txt"], "run"),
    (causal_trace.main, [], "run"),
])
def test_an_unexpected_crash_is_one_line_with_exit_1(entry, argv, run_name, monkeypatch, capsys):
    """A failure that is not an AlphaEditError (a bug, a library's ImportError) prints its type and
    message on one line and points at --debug; --debug prints the traceback. Bad input stays exit 2."""
    module = {cli.main: cli, factworld_main.main: factworld_main, causal_trace.main: causal_trace}[entry]

    def crash(*args):
        raise ImportError("cannot import name 'CUDAProperties' from 'kernels'")

    monkeypatch.setattr(module, run_name, crash)
    assert entry(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.endswith("error: ImportError: cannot import name 'CUDAProperties' from 'kernels' "
                        "(--debug for the traceback)\n")
    assert entry(["--debug", *argv]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, run_name, interrupted)
    assert entry(argv) == 130 and capsys.readouterr().err.endswith("interrupted\n")


def test_bad_input_is_still_exit_2(capsys):
    assert main(["eval", "--requests", "no-such-file.json"]) == 2
    err = capsys.readouterr().err
    assert "no-such-file.json" in err and err.count("\n") == 1


def test_real_model_demo_runs_on_any_model_directory_and_caches_its_statistics(tmp_path, monkeypatch, capsys):
    """The real-model demo's code path, on a tiny Llama saved as a directory (a real checkpoint
    takes minutes): statistics over the Python documentation (or text sampled from the model) are
    cached, the edits raise every new object."""
    from alphaedit_fast.demo import REAL_FACTS, SAMPLED, python_docs_text, run_real_demo
    from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    hparams = {"layers": [1, 2], "fact_token": "last", "v_lr": 0.5, "L2": 0.1, "v_num_grad_steps": 20,
               "v_loss_layer": 3, "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
               "layer_module_tmp": "model.layers.{}", "mlp_module_tmp": "model.layers.{}.mlp",
               "attn_module_tmp": "model.layers.{}.self_attn", "ln_f_module": "model.norm",
               "lm_head_module": "lm_head", "nullspace_threshold": 1.0}  # about half of the 160 directions
    rows = run_real_demo(str(tmp_path / "model"), stats_tokens=600, hparams=hparams)
    out = capsys.readouterr().out
    assert "key statistics over 600 tokens of the Python documentation" in out
    assert (tmp_path / "cache" / "alphaedit_fast" / "demo-stats" / "python-docs.txt").read_text() == python_docs_text()
    assert len(rows) == len(REAL_FACTS) and out.count("  before: ") == len(REAL_FACTS)
    # the tiny tokenizer splits most of the new objects into 5-7 tokens, which a random 4-layer model
    # does not learn in 20 steps; together they rise, and the two-token one (French) to > 0.1
    gains = [math.log(row["after"]["p_new"] / row["before"]["p_new"]) for row in rows]
    assert sum(gains) > 0 and max(row["after"]["p_new"] for row in rows) > 0.1
    cached = list((tmp_path / "cache" / "alphaedit_fast" / "demo-stats").glob("*.safetensors"))
    assert len(cached) == 1
    run_real_demo(str(tmp_path / "model"), stats_tokens=600, hparams=hparams)
    assert f"key statistics: cached {cached[0]}" in capsys.readouterr().out
    run_real_demo(str(tmp_path / "model"), corpus=SAMPLED, stats_tokens=200, hparams=hparams)
    assert "sampling 200 tokens of text from the model itself" in capsys.readouterr().out
    assert len(list(cached[0].parent.glob("sampled-*.txt"))) == 1


def test_sample_corpus_is_seeded_and_leaves_the_global_generator_alone(tmp_path):
    from alphaedit_fast.stats import sample_corpus
    from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = sample_corpus(model, tok, tmp_path / "a.txt", 100, seed=3, length=20, batch_size=4).read_text()
    assert torch.equal(torch.random.get_rng_state(), state)
    b = sample_corpus(model, tok, tmp_path / "b.txt", 100, seed=3, length=20, batch_size=4).read_text()
    assert a == b and len(a.splitlines()) == 8  # two batches of 4 rows of 20 tokens reach 100 tokens
    assert sample_corpus(model, tok, tmp_path / "c.txt", 100, seed=4, length=20, batch_size=4).read_text() != a


def test_demo_options_for_a_real_model_need_one(capsys):
    assert main(["demo", "--corpus", "wiki.txt"]) == 2
    assert "give --model too" in capsys.readouterr().err
    assert main(["demo", "--tiny", "llama", "--model", "smollm2-135m"]) == 2
