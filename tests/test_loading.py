"""`load_model` (a local directory or a hub id, --dtype, --device, --device-map) and `bench --model`."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alphaedit_fast import InvalidArgumentError, ModelFileError
from alphaedit_fast.bench import default_results_dir
from alphaedit_fast.cli import main
from alphaedit_fast.loading import load_model, resolve_dtype
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

from .conftest import REQUESTS, forward_accumulation_length, test_hparams, tolerance

REPO = Path(__file__).resolve().parents[1]
EASYEDIT_REQUESTS = [{"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"]["str"]}
                     for r in REQUESTS]


@pytest.fixture
def fp16_dir(tmp_path):
    """A tiny GPT-2 saved in fp16 (its config says dtype float16), with its tokenizer, an hparams
    JSON of 3 z steps and a requests file next to it."""
    model = tiny_model("gpt2", dtype=torch.float16)
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer_for("gpt2").save_pretrained(tmp_path / "model")
    (tmp_path / "hparams.json").write_text(json.dumps(test_hparams(model, v_num_grad_steps=3).to_dict()))
    (tmp_path / "requests.json").write_text(json.dumps(EASYEDIT_REQUESTS))
    return tmp_path


def test_local_directory_dtypes(fp16_dir):
    model, tok = load_model(fp16_dir / "model")
    assert model.dtype == torch.float32 and model.device.type == "cpu" and not model.training  # fp16 saved
    assert tok("Toko Yasuda")["input_ids"]
    assert load_model(fp16_dir / "model", "bfloat16")[0].dtype == torch.bfloat16
    assert load_model(str(fp16_dir / "model"), "auto", "cpu")[0].dtype == torch.float32
    assert resolve_dtype("auto", "cuda") == "auto" and resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("float16", "cpu") == torch.float16


@pytest.mark.parametrize("name", ["{tmp}/nope", "./nope-dir", "no/such/dir", "~/no-such-model-dir-here"])
def test_missing_local_path_is_reported_as_such(tmp_path, name):
    name = name.format(tmp=tmp_path)
    with pytest.raises(ModelFileError, match=re.escape(f"model directory {name} does not exist")):
        load_model(name)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelFileError, match="is a file, not a model directory"):
        load_model(tmp_path / "file.txt")


@pytest.mark.parametrize("save_dtype, expected", [(None, torch.float16), ("float32", torch.float32)])
def test_edit_out_saves_in_the_checkpoint_dtype_with_umask_permissions(fp16_dir, monkeypatch, save_dtype, expected):
    """The fp16 checkpoint runs in fp32 on the CPU but is saved in fp16 (unless --save-dtype), and the
    output directory and its files get the umask's permissions, as save_pretrained's own files do."""
    import stat

    from safetensors import safe_open

    old_umask = os.umask(0o027)
    try:
        out = fp16_dir / f"out-{save_dtype}"
        argv = ["edit", "--model", str(fp16_dir / "model"), "--requests", str(fp16_dir / "requests.json"),
                "--hparams", str(fp16_dir / "hparams.json"), "--out", str(out)]
        with pytest.warns(UserWarning, match="projector=None"):
            assert main(argv + (["--save-dtype", save_dtype] if save_dtype else [])) == 0
    finally:
        os.umask(old_umask)
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {expected}
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == str(expected).removeprefix("torch.")  # 4.x: torch_dtype
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o640}
    edited, _ = load_model(out, "float32")
    original, _ = load_model(fp16_dir / "model", "float32")
    assert any(not torch.equal(a, b) for a, b in zip(edited.parameters(), original.parameters()))
    # the saved state belongs to the saved weights, in whatever dtype they are loaded next
    # (or wider: fp32 weights loaded in fp16 are other weights)
    for dtype in ("float32", "float16") if expected == torch.float16 else ("float32",):
        argv = ["edit", "--model", str(out), "--dtype", dtype, "--requests", str(fp16_dir / "requests.json"),
                "--hparams", str(fp16_dir / "hparams.json"), "--out", str(fp16_dir / f"continued-{save_dtype}-{dtype}")]
        assert main(argv) == 0


def test_cli_missing_model_exits_2_before_loading(fp16_dir, capsys):
    argv = ["edit", "--model", str(fp16_dir / "nope"), "--requests", str(fp16_dir / "requests.json"),
            "--hparams", str(fp16_dir / "hparams.json"), "--out", str(fp16_dir / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"model directory {fp16_dir / 'nope'} does not exist" in err and err.count("\n") == 1


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with pytest.raises(ModelFileError, match="HF_HUB_OFFLINE.*download it first"):
        load_model("alphaedit-fast-tests/no-such-model")
    assert main(["stats", "--model", "no-such-model", "--corpus", "c.txt", "--layers", "1",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no-such-model is not a local directory" in err and "Traceback" not in err


@pytest.mark.parametrize("resolver", ["fails", "hangs"])
def test_unresolvable_hub_fails_at_once_without_retries(tmp_path, monkeypatch, capfd, resolver):
    """Without network, a hub id is looked up in the cache only: no request, no retries (which took
    ~25 s and 10 log lines), one clear error."""
    import socket
    import time

    from alphaedit_fast import loading

    def fails(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def hangs(*args, **kwargs):
        time.sleep(2)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setattr(socket, "getaddrinfo", fails if resolver == "fails" else hangs)
    monkeypatch.setattr(loading, "HUB_RESOLVE_TIMEOUT_S", 0.2)
    expected = "cannot be resolved" if resolver == "fails" else "did not resolve within 0.2 s"
    with pytest.raises(ModelFileError, match=f"hub cannot be reached \\(huggingface.co {expected}"):
        load_model("alphaedit-fast-tests/no-such-model")
    captured = capfd.readouterr()
    assert "Retrying" not in captured.err + captured.out and "HEAD" not in captured.err + captured.out


def test_cached_hub_model_loads_offline(fp16_dir, tmp_path):
    """A hub id found in the Hugging Face cache loads with the hub off (in a fresh process: the
    hub library reads HF_HOME when it is imported)."""
    snapshot = tmp_path / "hf" / "hub" / "models--alphaedit-fast-tests--tiny" / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    (fp16_dir / "model").rename(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    code = "from alphaedit_fast.loading import load_model; print(load_model('alphaedit-fast-tests/tiny')[0].dtype)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "torch.float32"


def test_device_map_auto_loads_and_edits(fp16_dir):
    pytest.importorskip("accelerate")
    model, _ = load_model(fp16_dir / "model", device_map="auto")
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    with pytest.raises(InvalidArgumentError, match="not both"):
        load_model(fp16_dir / "model", device="cpu", device_map="auto")
    common = ["--requests", str(fp16_dir / "requests.json"), "--hparams", str(fp16_dir / "hparams.json")]
    with pytest.warns(UserWarning, match="projector=None"):
        assert main(["edit", "--model", str(fp16_dir / "model"), "--device-map", "auto", *common,
                     "--out", str(fp16_dir / "edited")]) == 0
    before, after = (load_model(fp16_dir / d)[0].get_submodule("transformer.h.1.mlp.c_proj").weight
                     for d in ("model", "edited"))
    assert not torch.equal(before, after)
    assert main(["edit", "--model", str(fp16_dir / "model"), "--device-map", "auto", "--device", "cpu", *common,
                 "--out", str(fp16_dir / "edited2")]) == 2


def test_bench_user_model_writes_phase_medians(fp16_dir, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(fp16_dir / "cache"))
    assert main(["bench", "--model", str(fp16_dir / "model"), "--requests", str(fp16_dir / "requests.json"),
                 "--hparams", str(fp16_dir / "hparams.json"), "--edits", "2", "--repeats", "1"]) == 0
    result = json.loads((fp16_dir / "cache" / "alphaedit_fast" / "bench" / "edit-model-2-cpu.json").read_text())
    assert result["model"] == "model" and result["edits"] == 2 and result["dtype"] == "torch.float32"
    assert list(result["paths"]) == ["fast"]
    assert {"z", "keys", "solve", "cache update", "total", "edits_per_s"} <= set(result["paths"]["fast"])
    captured = capsys.readouterr()
    assert "loading the model" in captured.err and "model fast run 1/1: z " in captured.err
    assert "3/3 steps" in captured.err and "layer 2: keys" in captured.err and "cache update" in captured.err
    assert "edits/s" in captured.out and "edit-model-2-cpu.json" in captured.out
    assert main(["bench", "--model", str(fp16_dir / "model"), "--out", str(fp16_dir)]) == 2
    assert "needs --requests FILE" in capsys.readouterr().err
    # without --hparams: the preset matching the model, and this tiny model matches none
    assert main(["bench", "--model", str(fp16_dir / "model"), "--requests", str(fp16_dir / "requests.json"),
                 "--out", str(fp16_dir)]) == 2
    assert "no preset fits" in capsys.readouterr().err


def test_bench_early_stop_path_reports_speedup_and_quality(fp16_dir, capsys):
    """`bench --model --paths fast,fast-early-stop --quality --projector FILE`: both paths scored
    after their edits; with a stop that never triggers, early stopping is the exact edit."""
    from alphaedit_fast.evaluation import load_cases, score_cases, summarize

    model, tok = load_model(fp16_dir / "model")
    hparams = json.loads((fp16_dir / "hparams.json").read_text())
    hparams.update(v_num_grad_steps=20, v_lr=0.5, clamp_norm_factor=10.0, L2=0.01)  # edits that show
    (fp16_dir / "hparams.json").write_text(json.dumps(hparams))
    requests = [{**r, "ground_truth": "nothing"} for r in EASYEDIT_REQUESTS]  # NLL comparisons: new vs true
    (fp16_dir / "requests.json").write_text(json.dumps(requests))
    bases = [torch.linalg.qr(torch.randn(160, 120, generator=torch.Generator().manual_seed(l)))[0] for l in (1, 2)]
    torch.save(torch.stack([u @ u.T for u in bases]), fp16_dir / "P.pt")  # a dense P, as the original's
    args = ["bench", "--model", str(fp16_dir / "model"), "--requests", str(fp16_dir / "requests.json"), "--hparams",
            str(fp16_dir / "hparams.json"), "--projector", str(fp16_dir / "P.pt"), "--edits", "3",
            "--repeats", "1", "--paths", "fast,fast-early-stop", "--quality", "--out", str(fp16_dir / "out")]
    assert main(args) == 0
    result = json.loads((fp16_dir / "out" / "edit-model-3-cpu.json").read_text())
    assert result["null_dim"] == 120 and result["early_stop"]["early_stop_top1"] == 2
    assert set(result["early_stop"]["speedup"]) == {"z", "total"}
    schema, cases = load_cases(fp16_dir / "requests.json")
    unedited = summarize(score_cases(model, tok, cases[:3], schema), schema)["margins"]["efficacy"]
    edited = result["quality"]["fast"]["margins"]["efficacy"]
    # scored after the edits, before the weights were restored: the mean margin moved (by 4.7e-3 on
    # this tiny model) far beyond the rounding of a forward pass (NLLs ~7 times its relative tolerance)
    noise = 7 * tolerance(torch.float32, forward_accumulation_length(model))[0]
    assert edited - unedited > 10 * noise
    assert "early stopping (early_stop_top1 2) vs exact" in capsys.readouterr().out
    hparams["early_stop_top1"] = 10_000  # never reached: the same edit as the exact path
    (fp16_dir / "hparams.json").write_text(json.dumps(hparams))
    assert main(args) == 0
    result = json.loads((fp16_dir / "out" / "edit-model-3-cpu.json").read_text())
    assert result["quality"]["fast"] == result["quality"]["fast-early-stop"]
    assert all(v in (0.0, None) for d in result["early_stop"]["rate_difference"].values() for v in d.values())


def test_default_bench_out_lies_outside_the_source_tree(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_results_dir() == Path.home() / ".cache" / "alphaedit_fast" / "bench"
    assert not default_results_dir().resolve().is_relative_to(REPO)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_results_dir() == tmp_path / "alphaedit_fast" / "bench"
