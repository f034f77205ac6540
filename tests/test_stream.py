"""The resumable edit stream (stream.py, `alphaedit-fast edit --batch-size B --resume`): a run killed
anywhere (between batches, inside one, while a checkpoint is written) and resumed ends bit-identical
to an uninterrupted run; a stream of other requests, hyper-parameters, model or batch size is refused
and left as it was."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alphaedit_fast import AlphaEditor
from alphaedit_fast.stream import CHECKPOINT, PROJECTOR, EditStream, StreamMismatchError, stream_directory
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

from .conftest import CONTEXT_TEMPLATES, test_hparams

SUBJECTS = ["Danielle Darrieux", "Toko Yasuda", "Michel Denisot", "Paris Hilton", "Anna Karenina", "Leo Messi",
            "Thomas Mann"]
TARGETS = ["English", "piano", "Google", "Rome", "cello", "French", "Berlin"]
REQUESTS = [{"case_id": i, "prompt": "{} is known for", "subject": s, "target_new": {"str": t}}
            for i, (s, t) in enumerate(zip(SUBJECTS, TARGETS))]


def random_bases(hparams, d_k=160, rank=120, seed=0):
    """Orthonormal (d_k, rank) bases: a null space wide enough that 4 * batch < rank (Woodbury
    solves, whose maintained inverse the checkpoint must carry)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.linalg.qr(torch.randn(d_k, rank, generator=g))[0] for _ in hparams.layers]


def editor_for(family, hparams=None):
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = hparams or test_hparams(model, v_num_grad_steps=8)
    return AlphaEditor(model, tok, hparams, projector=random_bases(hparams), context_templates=CONTEXT_TEMPLATES)


def edit_all(stream, batch_size, stop_after=None):
    for i, (first, stop) in enumerate(stream.batches(batch_size)):
        if stop_after is not None and i == stop_after:
            return
        stream.editor.edit(stream.requests[first:stop])
        stream.save(stop, {"batches": stream.progress.get("batches", 0) + 1})


def state_of(editor):
    weights = {n: editor.model.get_submodule(n).weight.detach().clone()
               for n in (editor.hparams.rewrite_module_tmp.format(l) for l in editor.hparams.layers)}
    return weights, editor.solver.state_tensors(editor.hparams.layers), editor.num_edits


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_resumed_stream_is_bit_identical(tmp_path, family):
    whole = editor_for(family)
    edit_all(EditStream.start(tmp_path / "whole", whole, REQUESTS, batch_size=2), 2)
    parted = editor_for(family)
    stream = EditStream.start(tmp_path / "parted", parted, REQUESTS, batch_size=2)
    edit_all(stream, 2, stop_after=2)  # 4 of 7 done; then the process "dies"
    del parted, stream
    model, tok = tiny_model(family), tiny_tokenizer_for(family)  # a fresh load of the unedited model
    resumed = EditStream.resume(tmp_path / "parted", model, tok, whole.hparams, REQUESTS, batch_size=2)
    assert resumed.done == 4 and resumed.editor.num_edits == 4 and resumed.progress == {"batches": 2}
    assert all(inv is not None for inv in resumed.editor.solver._inv_m)  # kept, not recomputed
    edit_all(resumed, 2)
    (w1, s1, n1), (w2, s2, n2) = state_of(whole), state_of(resumed.editor)
    assert n1 == n2 == len(REQUESTS)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(w, tiny_model(family).get_submodule(n).weight) for n, w in w1.items())
    changes = resumed.weight_change()  # against the unedited weights, across the interruption
    assert all(v > 0 for v in changes.values())


def test_checkpoint_holds_only_the_edited_layers_and_state(tmp_path):
    editor = editor_for("gpt2")
    stream = EditStream.start(tmp_path, editor, REQUESTS[:2], batch_size=2)
    edit_all(stream, 2)
    names = sorted(load_file(tmp_path / CHECKPOINT))
    layers = editor.hparams.layers
    assert names == sorted([f"weight.transformer.h.{l}.mlp.c_proj" for l in layers]
                           + [f"layer.{l}.{t}" for l in layers for t in ("cache_proj", "inverse")])
    assert sorted(load_file(tmp_path / PROJECTOR)) == [f"layer.{l}.basis" for l in layers]


@pytest.mark.parametrize("change", ["requests", "hparams", "model", "batch_size"])
def test_resume_refuses_another_stream_and_changes_nothing(tmp_path, change):
    editor = editor_for("gpt2")
    stream = EditStream.start(tmp_path, editor, REQUESTS, batch_size=2)
    edit_all(stream, 2, stop_after=1)
    before = (tmp_path / CHECKPOINT).read_bytes()
    model, tok = tiny_model("gpt2", seed=1 if change == "model" else 0), tiny_tokenizer_for("gpt2")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    hparams = editor.hparams if change != "hparams" else test_hparams(model, v_num_grad_steps=9)
    requests = REQUESTS if change != "requests" else [*REQUESTS[:-1], {**REQUESTS[-1], "subject": "Ada Lovelace"}]
    with pytest.raises(StreamMismatchError, match="was started with different"):
        EditStream.resume(tmp_path, model, tok, hparams, requests, batch_size=3 if change == "batch_size" else 2)
    assert (tmp_path / CHECKPOINT).read_bytes() == before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_start_and_resume_refusals(tmp_path):
    editor = editor_for("gpt2")
    EditStream.start(tmp_path / "a", editor, REQUESTS, batch_size=2)
    with pytest.raises(StreamMismatchError, match="resume it"):
        EditStream.start(tmp_path / "a", editor, REQUESTS, batch_size=2)
    with pytest.raises(StreamMismatchError, match="no edit stream"):
        EditStream.resume(tmp_path / "b", editor.model, editor.tok, editor.hparams, REQUESTS, batch_size=2)


# -- the command line, killed for real ---------------------------------------------------------

# Runs `alphaedit-fast edit ARGS`; KILL=MODE:N sends this process SIGKILL at the N-th event of MODE:
# "save" while the N-th checkpoint is half written, "after-save" just after it is in place, "layer"
# inside the N-th call of a layer solve after the first layer's weight was changed in place. Under
# torchrun, KILL_RANKS=1,2 kills only those ranks.
DRIVER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    mode, _, n = os.environ.get("KILL", ":0").partition(":")
    if os.environ.get("KILL_RANKS") and os.environ.get("RANK", "0") not in os.environ["KILL_RANKS"].split(","):
        mode = ""
    count = {"n": 0}
    def tick(event):
        if event == mode:
            count["n"] += 1
            if count["n"] == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
    from alphaedit_fast import storage, solve, stream
    save_file, save = storage.save_file, stream.EditStream.save
    def half_save(tensors, path, metadata=None):
        if "checkpoint" in str(metadata.get("kind")) and mode == "save" and count["n"] + 1 == int(n):
            save_file(tensors, path, metadata=metadata)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)  # half written, not yet renamed into place
        if "checkpoint" in str(metadata.get("kind")):
            tick("save")
        save_file(tensors, path, metadata=metadata)
    def killing_save(self, *a, **k):
        out = save(self, *a, **k)
        tick("after-save")
        return out
    update = solve.ProjectedSolver.update
    def killing_update(self, index, *a):
        if index == 1:
            tick("layer")
        return update(self, index, *a)
    storage.save_file, stream.EditStream.save, solve.ProjectedSolver.update = half_save, killing_save, killing_update
    from alphaedit_fast.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def write_cli_inputs(root: Path):
    """A tiny GPT-2 and its tokenizer (root/model), hparams of 6 z steps, the first 6 REQUESTS, the
    context templates and DRIVER in `root`; returns (model, tok, hparams)."""
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    hparams = test_hparams(model, v_num_grad_steps=6)
    (root / "hparams.json").write_text(json.dumps(hparams.to_dict()))
    (root / "requests.json").write_text(json.dumps(REQUESTS[:6]))
    (root / "templates.json").write_text(json.dumps(CONTEXT_TEMPLATES))
    (root / "driver.py").write_text(DRIVER)
    return model, tok, hparams


def edit_arguments(root: Path, out: str) -> list[str]:
    """`edit` of write_cli_inputs' files in batches of 2 into root/out."""
    return ["edit", "--model", str(root / "model"), "--requests", str(root / "requests.json"), "--hparams",
            str(root / "hparams.json"), "--batch-size", "2", "--out", str(root / out)]


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-cli")
    write_cli_inputs(root)
    reference = run_edit(root, "reference")
    assert reference.returncode == 0, reference.stderr
    return root


def run_edit(root: Path, out: str, kill: str = "", resume: bool = False, timeout: float = 300, wait: bool = True):
    env = {**os.environ, "KILL": kill, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(root / "cache"),
           "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, str(root / "driver.py"), *edit_arguments(root, out), *(["--resume"] if resume else [])]
    # the context templates: the model's generated ones are the same in every process (seeded, cached)
    if not wait:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def assert_same_result(root: Path, out: str) -> None:
    ref, got = root / "reference", root / out
    for name in ("model.safetensors", "editor-state.safetensors"):
        a, b = load_file(ref / name), load_file(got / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not stream_directory(got).exists()  # a finished stream leaves no checkpoint


@pytest.mark.parametrize("kill", ["after-save:2", "layer:2", "save:3"])
def test_killed_edit_resumes_to_the_uninterrupted_result(cli_setup, kill):
    root, out = cli_setup, f"killed-{kill.replace(':', '-')}"
    killed = run_edit(root, out, kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (stream_directory(root / out) / CHECKPOINT).exists() and not (root / out).exists()
    again = run_edit(root, out)  # without --resume: refused, nothing touched
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run_edit(root, out, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after" in resumed.stdout
    assert_same_result(root, out)
    finished = run_edit(root, out, resume=True)
    assert finished.returncode == 2 and "finished" in finished.stderr


def test_kills_at_random_times_then_resume(cli_setup):
    root, out, rng = cli_setup, "random-kills", random.Random(0)
    for _ in range(2):  # SIGKILL after a random time (loading, z, keys, solve or a write), then resume
        resume = (stream_directory(root / out) / CHECKPOINT).exists()
        process = run_edit(root, out, resume=resume, wait=False)
        time.sleep(rng.uniform(4.0, 12.0))
        process.send_signal(signal.SIGKILL)
        process.communicate()
    resume = (stream_directory(root / out) / CHECKPOINT).exists()
    final = run_edit(root, out, resume=resume)
    assert final.returncode == 0, final.stderr
    assert_same_result(root, out)
