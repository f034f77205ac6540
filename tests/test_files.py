"""Files: request files, checksummed statistics / projector / editor-state files, foreign
projectors, atomic `edit --out`, editor state found in --model, CLI error lines."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from alphaedit_fast import AlphaEditor, InvalidRequestError, RequestFileError, StatsFileError
from alphaedit_fast.cli import main
from alphaedit_fast.projector import load_projector, nullspace_basis, save_projector
from alphaedit_fast.requests import load_requests
from alphaedit_fast.stats import KeyStatistics, collect_statistics
from alphaedit_fast.storage import _checksum, load_tensors, replace_directory, save_tensors
from alphaedit_fast.tiny import corpus, tiny_model, tiny_tokenizer_for

from .conftest import CONTEXT_TEMPLATES, test_hparams

TEMPLATE = "model.layers.{}.mlp.down_proj"
GOOD = {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano"}


# request files

def test_jsonl_errors_name_the_line_in_the_file(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(f"\n{json.dumps(GOOD)}\n{{broken\n")
    with pytest.raises(RequestFileError, match=r"r\.jsonl:3:2: not valid JSON"):
        load_requests(path)
    path.write_text(f"{json.dumps(GOOD)}\n\n\n{json.dumps({'prompt': '{} is'})}\n")
    with pytest.raises(RequestFileError, match=r"r\.jsonl:4: subject is missing"):
        load_requests(path)
    path.write_text(f"{json.dumps(GOOD)}\n\n{json.dumps({**GOOD, 'target_new': ''})}\n")
    with pytest.raises(RequestFileError, match=r"r\.jsonl:3: target_new must be a non-empty string"):
        load_requests(path)
    record = {**GOOD, "subject": "Toko\u2028Yasuda", "prompt": "{} plays"}
    path.write_text(json.dumps(record, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert load_requests(path)[0]["subject"] == "Toko\u2028Yasuda"  # one record, not split at U+2028


def test_json_errors_give_line_and_record(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('[\n  {"prompt": "{} is",\n  oops]')
    with pytest.raises(RequestFileError, match=r"r\.json:3:3: not valid JSON"):
        load_requests(path)


@pytest.mark.parametrize("content, message", [
    (b"\x00\x01\x02safetensors", "binary file"),
    (b'[{"prompt": "{} is", "subject": "caf\xe9"}]', "not UTF-8 text"),
    (b"[" * 100000, "nested too deeply"),
    (b'{"prompt": "{} is", "subject": "x", "target_new": ' + b"[" * 100000 + b"\n", "nested too deeply"),
])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_unreadable_request_files(tmp_path, content, message, suffix):
    path = tmp_path / f"r{suffix}"
    path.write_bytes(content)
    with pytest.raises(RequestFileError, match=message) as err:
        load_requests(path)
    assert isinstance(err.value, InvalidRequestError)  # existing callers keep catching it
    with pytest.raises(RequestFileError, match="cannot read"):
        load_requests(tmp_path / "missing.json")


# statistics, projector and editor-state files

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A statistics file, a projector file and an editor-state file of one tiny llama."""
    tmp = tmp_path_factory.mktemp("files")
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    (tmp / "corpus.txt").write_text("\n".join(corpus()[:40]))
    stats = collect_statistics(model, tok, tmp / "corpus.txt", [1, 2], TEMPLATE, max_length=24, batch_tokens=160,
                               progress=False)
    stats_path = stats.save(tmp / "stats.safetensors")
    bases = {l: nullspace_basis(stats.covariance(l), rank=100) for l in (1, 2)}
    projector_path = save_projector(tmp / "proj.safetensors", bases, stats, {"rule": {"rank": 100}})
    hparams = test_hparams(model)
    editor = AlphaEditor(model, tok, hparams, projector=load_projector(projector_path, model),
                         context_templates=CONTEXT_TEMPLATES)
    editor.num_edits = 12  # a count whose digits a flipped byte could change
    state_path = editor.save_state(tmp / "state.safetensors")
    return {"model": model, "tok": tok, "hparams": hparams, "stats": stats_path, "projector": projector_path,
            "state": state_path}


LOADERS = {
    "stats": lambda f, path: KeyStatistics.load(path, model=f["model"]),
    "projector": lambda f, path: load_projector(path, f["model"]),
    "state": lambda f, path: AlphaEditor.from_state(f["model"], f["tok"], f["hparams"], path),
}
COUNT_FIELD = {"stats": "count", "projector": "stats_tokens", "state": "num_edits"}


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_intact_files_load(files, kind):
    LOADERS[kind](files, files[kind])


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_a_flipped_tensor_byte_is_refused(files, kind, tmp_path):
    data = bytearray(files[kind].read_bytes())
    data[-6] ^= 0x01  # inside the last tensor's data
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(StatsFileError, match="checksum"):
        LOADERS[kind](files, tmp_path / "bad.safetensors")


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_a_flipped_metadata_digit_is_refused(files, kind, tmp_path):
    data = files[kind].read_bytes()
    match = re.search(rb'"%s":"(\d)' % COUNT_FIELD[kind].encode(), data)
    at = match.start(1)
    flipped = data[:at] + str((int(data[at:at + 1]) + 1) % 10).encode() + data[at + 1:]
    (tmp_path / "bad.safetensors").write_bytes(flipped)
    with pytest.raises(StatsFileError, match="checksum"):
        LOADERS[kind](files, tmp_path / "bad.safetensors")


def _rewrite(path, out, edit_metadata, edit_tensors=lambda t: t, envelope=None):
    """Copy of a file with changed metadata, re-checksummed (as a buggy writer would make it)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    stored, tensors = edit_metadata(stored), edit_tensors(tensors)
    stored["checksum"] = _checksum(stored, tensors)
    stored.update(envelope or {})
    save_file(tensors, str(out), metadata=stored)
    return out


@pytest.mark.parametrize("kind", sorted(LOADERS))
@pytest.mark.parametrize("edit, message", [
    (lambda m: {k: v for k, v in m.items() if k != "layers"}, "'layers' is missing"),
    (lambda m: {**m, "layers": '"1,2"'}, "'layers' = '1,2' is not"),
    (lambda m: {**m, "layers": "[1, 2"}, "'layers' is not valid JSON"),
    (lambda m: {**m, "layers": "[" * 100000}, "'layers' is not valid JSON"),
])
def test_missing_and_garbled_metadata_fields(files, kind, edit, message, tmp_path):
    bad = _rewrite(files[kind], tmp_path / "bad.safetensors", edit)
    with pytest.raises(StatsFileError, match=message):
        LOADERS[kind](files, bad)


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_missing_tensor_and_old_format(files, kind, tmp_path):
    drop_one = _rewrite(files[kind], tmp_path / "drop.safetensors", dict,
                        lambda t: dict(sorted(t.items())[1:]))
    with pytest.raises(StatsFileError, match="holds tensors"):
        LOADERS[kind](files, drop_one)
    old = _rewrite(files[kind], tmp_path / "old.safetensors", dict, envelope={"format_version": "1"})
    with pytest.raises(StatsFileError, match="recompute it with this version"):
        LOADERS[kind](files, old)


def test_count_fields_are_typed(files, tmp_path):
    for value, message in (('"12"', "'count' = '12' is not int"), ("0", "must be positive")):
        bad = _rewrite(files["stats"], tmp_path / "bad.safetensors", lambda m, v=value: {**m, "count": v})
        with pytest.raises(StatsFileError, match=message):
            KeyStatistics.load(bad)
    save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)}, {"kind": "k", "n": 1.5})
    with pytest.raises(StatsFileError, match="'n' = 1.5 is not int"):
        load_tensors(tmp_path / "x.safetensors", "k", {"n": int})
    assert load_tensors(tmp_path / "x.safetensors", "k", {"n": float | None})[1]["n"] == 1.5


def test_corrupted_partial_checkpoint_is_refused(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    (tmp_path / "corpus.txt").write_text("\n".join(corpus()[:12]))
    run = dict(max_length=16, batch_tokens=64, progress=False, checkpoint_dir=tmp_path / "ckpt")
    collect_statistics(model, tok, tmp_path / "corpus.txt", [1], TEMPLATE, **run)
    partial = next((tmp_path / "ckpt").glob("partial-*.safetensors"))
    data = bytearray(partial.read_bytes())
    data[-5] ^= 0x01
    partial.write_bytes(bytes(data))
    with pytest.raises(StatsFileError, match="checksum"):
        collect_statistics(model, tok, tmp_path / "corpus.txt", [1], TEMPLATE, **run)


# foreign projectors

def test_foreign_projector_needs_the_explicit_flag(files):
    other = tiny_model("llama", seed=1)
    with pytest.raises(StatsFileError, match="another model.*allow_foreign"):
        load_projector(files["projector"], other)
    bases = load_projector(files["projector"])  # no model: checked when an editor gets it
    with pytest.raises(StatsFileError, match="another model"):
        AlphaEditor(other, files["tok"], files["hparams"], bases, context_templates=CONTEXT_TEMPLATES)
    assert set(load_projector(files["projector"], other, allow_foreign=True)) == {1, 2}
    AlphaEditor(other, files["tok"], files["hparams"], bases, context_templates=CONTEXT_TEMPLATES,
                allow_foreign_projector=True)


def test_projector_stays_valid_for_the_edited_model(files):
    """Sequential editing changes the rewrite weights, not what the projector is checked against."""
    edited = tiny_model("llama")
    with torch.no_grad():
        for layer in (1, 2):
            edited.get_submodule(TEMPLATE.format(layer)).weight.add_(0.1)
    with pytest.raises(StatsFileError, match="another model"):  # the statistics are for the unedited weights
        KeyStatistics.load(files["stats"], model=edited)
    load_projector(files["projector"], edited)


# directories and the CLI

def test_replace_directory_without_atomic_exchange(tmp_path, monkeypatch):
    import alphaedit_fast.storage as storage

    for exchange in (storage._exchange, lambda a, b: False):
        monkeypatch.setattr(storage, "_exchange", exchange)
        (tmp_path / "old").mkdir(exist_ok=True)
        (tmp_path / "old" / "f").write_text("old")
        (tmp_path / "new").mkdir()
        (tmp_path / "new" / "f").write_text("new")
        replace_directory(tmp_path / "new", tmp_path / "old")
        assert (tmp_path / "old" / "f").read_text() == "new"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_edit_out_is_atomic_and_state_in_model_dir_is_continued(tmp_path, monkeypatch, capsys):
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "hparams.json").write_text(json.dumps(test_hparams(model, v_num_grad_steps=2).to_dict()))
    (tmp_path / "r.json").write_text(json.dumps([GOOD]))
    common = ["--hparams", str(tmp_path / "hparams.json"), "--requests", str(tmp_path / "r.json")]

    def edit(model_dir, out, *extra):
        return main(["edit", "--model", str(tmp_path / model_dir), "--out", str(tmp_path / out), *common, *extra])

    def num_edits(out):
        return load_tensors(tmp_path / out / "editor-state.safetensors", AlphaEditor.STATE_KIND)[1]["num_edits"]

    with pytest.warns(UserWarning, match="projector=None"):
        assert edit("base", "run1") == 0
    assert edit("run1", "run2") == 0  # the state in run1 is picked up
    assert "continuing from" in capsys.readouterr().out and num_edits("run2") == 2
    before = {p.name: p.read_bytes() for p in (tmp_path / "run2").iterdir()}

    def killed(*args, **kwargs):
        raise RuntimeError("killed while saving the state")

    with monkeypatch.context() as patch:  # the model is written, then the state fails
        patch.setattr(AlphaEditor, "save_state", killed)
        capsys.readouterr()
        assert edit("run1", "run2") == 1
        assert capsys.readouterr().err.strip().endswith(
            "error: RuntimeError: killed while saving the state (--debug for the traceback)")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run2").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert edit("run1", "run2") == 2  # the edited batch waits in run2.stream/ for --resume
    assert "--resume" in capsys.readouterr().err
    assert edit("run1", "run2", "--resume") == 0 and num_edits("run2") == 2  # written, run2.stream/ gone

    with pytest.warns(UserWarning, match="projector=None"):
        assert edit("run1", "run2", "--fresh") == 0  # replaces run2 whole
    assert num_edits("run2") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "hparams.json", "r.json", "run1", "run2"]
    assert edit("run1", "run3", "--projector", str(tmp_path / "p.safetensors")) == 2
    assert "holds its projector" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    assert edit("run1", "notes") == 2 and "not a model directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["edit", "--model", "{tmp}/nope", "--requests", "{tmp}/r.json", "--hparams", "{tmp}/h.json", "--out", "{tmp}/o"],
     "model directory {tmp}/nope does not exist"),
    (["edit", "--model", "{tmp}/nope", "--requests", "r.json", "--hparams", "{tmp}/h.json", "--out", "{tmp}/o"],
     "cannot read requests file r.json"),  # the files are read before the model, which may take minutes to load
    (["stats", "--model", "{tmp}/nope", "--corpus", "c.txt", "--layers", "1", "--out", "{tmp}/o"],
     "model directory {tmp}/nope does not exist"),
    (["eval", "--model", "{tmp}/nope", "--out", "{tmp}/o"], "model directory {tmp}/nope does not exist"),
    (["eval", "--model", "{tmp}", "--out", "{tmp}/o"], "not a fact-world model directory"),
    (["projector", "--stats", "{tmp}/nope.safetensors", "--out", "{tmp}/p"], "nope.safetensors does not exist"),
    (["edit", "--model", "{tmp}", "--requests", "{tmp}/r.json", "--hparams", "{tmp}/h.json", "--out", "{tmp}/o"],
     "is not a model directory"),
])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys, argv, message):
    (tmp_path / "r.json").write_text(json.dumps([GOOD]))
    (tmp_path / "h.json").write_text(json.dumps(test_hparams(tiny_model("gpt2")).to_dict()))
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("alphaedit-fast: error: ") and err.count("\n") == 1
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and message.format(tmp=tmp_path) in err


def test_edit_resume_needs_the_starting_projector(files, tmp_path, monkeypatch, capsys):
    """An interrupted `edit --projector A` resumes with A; with another projector it is refused."""
    from alphaedit_fast.stream import EditStream

    files["model"].save_pretrained(tmp_path / "model")
    files["tok"].save_pretrained(tmp_path / "model")
    (tmp_path / "hparams.json").write_text(json.dumps(files["hparams"].to_dict()))
    (tmp_path / "r.json").write_text(json.dumps([GOOD, {**GOOD, "subject": "Danielle Darrieux"}]))
    stats = KeyStatistics.load(files["stats"], model=files["model"])
    other = save_projector(tmp_path / "other.safetensors", {l: nullspace_basis(stats.covariance(l), rank=90)
                                                            for l in (1, 2)}, stats, {"rule": {"rank": 90}})

    def edit(projector, *extra):
        return main(["edit", "--model", str(tmp_path / "model"), "--requests", str(tmp_path / "r.json"), "--hparams",
                     str(tmp_path / "hparams.json"), "--projector", str(projector), "--batch-size", "1",
                     "--out", str(tmp_path / "out"), *extra])

    save = EditStream.save
    with monkeypatch.context() as patch:  # interrupted after the first batch's checkpoint
        patch.setattr(EditStream, "save", lambda self, done=None, progress=None: (
            save(self, done, progress), done == 1 and (_ for _ in ()).throw(KeyboardInterrupt))[0])
        assert edit(files["projector"]) == 130
    assert edit(other, "--resume") == 2 and "different projector" in capsys.readouterr().err
    assert edit(files["projector"], "--resume") == 0 and (tmp_path / "out" / "config.json").exists()
