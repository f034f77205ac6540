"""Key statistics: exact sums, one pass for all layers, resume, 2-rank gloo, safe files; projector rules."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from alphaedit_fast import InvalidRequestError, NonFiniteError
from alphaedit_fast.cli import main
from alphaedit_fast.projector import load_projector, nullspace_basis
from alphaedit_fast.stats import (
    KeyStatistics,
    collect_statistics,
    read_original_stats,
    token_batches,
    top_p_sample,
)
from alphaedit_fast.storage import StatsFileError
from alphaedit_fast.tiny import corpus, tiny_model, tiny_tokenizer_for

from .conftest import forward_accumulation_length, tolerance

TEMPLATE = "model.layers.{}.mlp.down_proj"
SETTINGS = dict(max_length=24, batch_tokens=160, progress=False)


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus()[:120]) + "\n\n")
    return path


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama"), tiny_tokenizer_for("llama")


def direct_sums(model, tok, path, layer, max_length):
    """One document at a time, every token, fp64."""
    total = torch.zeros(160, 160, dtype=torch.float64)
    module = model.get_submodule(TEMPLATE.format(layer))
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0][0].double()))
    with torch.no_grad():
        for line in path.read_text().splitlines():
            if line.strip():
                ids = tok(line.strip())["input_ids"][:max_length]
                model(torch.tensor([ids]))
                total += seen[-1].T @ seen[-1]
    handle.remove()
    return total


def test_sums_equal_a_direct_computation(llama, corpus_file):
    model, tok = llama
    stats = collect_statistics(model, tok, corpus_file, [1, 2], TEMPLATE, precision=torch.float64, **SETTINGS)
    n_tokens = sum(min(len(tok(l.strip())["input_ids"]), 24) for l in corpus_file.read_text().splitlines() if l.strip())
    assert stats.count == n_tokens
    for layer in (1, 2):
        direct = direct_sums(model, tok, corpus_file, layer, 24)
        # fp64 sums of keys from fp32 forwards, padded batches vs one document: each key is off by
        # its forward's rounding (layer + 1 blocks deep), each k k^T by twice that
        rtol, _ = tolerance(torch.float32, forward_accumulation_length(model, blocks=layer + 1))
        assert ((stats.sums[layer] - direct).norm() / direct.norm()).item() < 2 * rtol
    torch.testing.assert_close(stats.covariance(1), stats.sums[1] / n_tokens)


def test_one_pass_equals_per_layer_passes(llama, corpus_file):
    model, tok = llama
    both = collect_statistics(model, tok, corpus_file, [1, 3], TEMPLATE, **SETTINGS)
    for layer in (1, 3):
        alone = collect_statistics(model, tok, corpus_file, [layer], TEMPLATE, **SETTINGS)
        assert torch.equal(both.sums[layer], alone.sums[layer])


def test_token_budget_and_batches(llama, corpus_file):
    _, tok = llama
    docs = corpus_file.read_text().splitlines()
    batches = list(token_batches(tok, docs, max_length=24, batch_tokens=160, max_tokens=500))
    assert sum(len(ids) for b in batches for ids in b) == 500
    assert all(len(b) * max(map(len, b)) <= 160 for b in batches)


def test_resume_after_a_kill_gives_the_same_result(llama, corpus_file, tmp_path):
    model, tok = llama
    whole = collect_statistics(model, tok, corpus_file, [1, 2], TEMPLATE, **SETTINGS)

    def kill_after_batch_4(index):  # batch 4 is summed but not yet checkpointed (every 2 batches)
        if index == 4:
            raise KeyboardInterrupt

    checkpoints = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        collect_statistics(model, tok, corpus_file, [1, 2], TEMPLATE, checkpoint_dir=checkpoints,
                           checkpoint_every=2, on_batch=kill_after_batch_4, **SETTINGS)
    resumed_from = []
    resumed = collect_statistics(model, tok, corpus_file, [1, 2], TEMPLATE, checkpoint_dir=checkpoints,
                                 checkpoint_every=2, on_batch=resumed_from.append, **SETTINGS)
    assert resumed_from[0] == 4  # batches 0-3 came from the checkpoint
    assert resumed.count == whole.count
    for layer in (1, 2):
        assert torch.equal(resumed.sums[layer], whole.sums[layer])
    with pytest.raises(StatsFileError, match="another run"):
        collect_statistics(model, tok, corpus_file, [1, 2], TEMPLATE, checkpoint_dir=checkpoints,
                           **{**SETTINGS, "max_length": 16})


def test_files_are_checked(llama, corpus_file, tmp_path):
    model, tok = llama
    stats = collect_statistics(model, tok, corpus_file, [1], TEMPLATE, **SETTINGS)
    path = stats.save(tmp_path / "stats.safetensors")
    loaded = KeyStatistics.load(path, model=model, corpus=corpus_file)
    assert torch.equal(loaded.sums[1], stats.sums[1]) and loaded.count == stats.count
    other = tiny_model("llama", seed=1)
    with pytest.raises(StatsFileError, match="another model"):
        KeyStatistics.load(path, model=other)
    other_corpus = tmp_path / "other.txt"
    other_corpus.write_text("something else entirely\n")
    with pytest.raises(StatsFileError, match="another corpus"):
        KeyStatistics.load(path, corpus=other_corpus)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StatsFileError, match="not a readable"):
        KeyStatistics.load(broken)
    nan = KeyStatistics({1: torch.full((4, 4), float("nan"))}, 3, dict(stats.metadata))
    with pytest.raises(NonFiniteError):
        KeyStatistics.load(nan.save(tmp_path / "nan.safetensors"))


def test_reads_the_original_npz_without_pickle(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 6))
    np.savez(tmp_path / "orig.npz", **{"mom2.constructor": "util.runningstats.SecondMoment()",
                                        "mom2.count": 50, "mom2.mom2": x.T @ x})
    cov, count = read_original_stats(tmp_path / "orig.npz")
    assert count == 50
    torch.testing.assert_close(cov, torch.from_numpy(x.T @ x / 50))


def test_unreadable_original_npz_is_a_stats_file_error(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 6))
    good = tmp_path / "orig.npz"
    np.savez(good, **{"mom2.count": 50, "mom2.mom2": x.T @ x})
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(StatsFileError, match="truncated.npz is not a readable .npz"):
        read_original_stats(truncated)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{"mom2.count": 50, "mom2.mom2": np.array([x.T @ x, None], dtype=object)})
    with pytest.raises(StatsFileError, match="pickled.npz is not a plain numeric .npz.*never unpickled"):
        read_original_stats(pickled)
    empty = tmp_path / "empty.npz"
    np.savez(empty, other=np.zeros(3))
    with pytest.raises(StatsFileError, match="empty.npz holds no second moment"):
        read_original_stats(empty)
    with pytest.raises(StatsFileError, match="missing.npz does not exist"):
        read_original_stats(tmp_path / "missing.npz")


def test_bad_corpora(llama, tmp_path):
    model, tok = llama
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(InvalidRequestError, match="bad.jsonl:2"):
        collect_statistics(model, tok, bad, [1], TEMPLATE, **SETTINGS)
    with pytest.raises(InvalidRequestError, match="does not exist"):
        collect_statistics(model, tok, tmp_path / "missing.txt", [1], TEMPLATE, **SETTINGS)
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": line}) for line in corpus()[:20]))
    assert collect_statistics(model, tok, good, [1], TEMPLATE, **SETTINGS).count > 0


@pytest.mark.parametrize("rule, expected_r", [({"threshold": 1e-6}, 18), ({"relative": 1e-6}, 18),
                                              ({"rank": 30}, 18), ({"rank": 40}, 8)])
def test_projector_rules(rule, expected_r):
    x = torch.randn(30, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cov = x.T @ x / 30  # rank 30
    assert nullspace_basis(cov, **rule).shape == (48, expected_r)


@pytest.mark.parametrize("energy, protected", [(0.4, 1), (0.5, 2), (0.7, 2), (0.71, 3), (1.0, 4)])
def test_projector_energy_rule(energy, protected):
    # Boundary cases on purpose (0.4 and 0.7 are reached exactly): exact in floating point, since
    # eigh of a diagonal matrix returns its diagonal, the partial sums are small integers and
    # k / 10 rounds to the same double as the literal 0.k.
    cov = torch.diag(torch.tensor([0.0, 1.0, 0.0, 3.0, 2.0, 4.0, 0.0], dtype=torch.float64))  # trace 10
    assert nullspace_basis(cov, energy=energy).shape == (7, 7 - protected)


def test_projector_warnings_and_bad_rules():
    cov = torch.eye(8)
    with pytest.warns(UserWarning, match="empty"):
        assert nullspace_basis(cov, 0.5).shape == (8, 0)
    with pytest.warns(UserWarning, match="whole key space"):
        assert nullspace_basis(cov, 2.0).shape == (8, 8)
    with pytest.raises(InvalidRequestError, match="exactly one"):
        nullspace_basis(cov, 0.5, rank=2)


def test_cli_stats_projector_and_two_rank_gloo(llama, corpus_file, tmp_path):
    model, tok = llama
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    args = ["--model", str(model_dir), "--corpus", str(corpus_file), "--layers", "1,2", "--max-length", "24",
            "--batch-tokens", "160", "--precision", "float64"]
    assert main(["stats", *args, "--out", str(tmp_path / "one")]) == 0
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "alphaedit_fast.cli",
                             "stats", *args, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                            env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    one = KeyStatistics.load(tmp_path / "one" / "key-stats.safetensors")
    two = KeyStatistics.load(tmp_path / "two" / "key-stats.safetensors")
    assert one.count == two.count
    assert len(list((tmp_path / "two" / "checkpoints").glob("partial-rank*-of2.safetensors"))) == 2
    for layer in (1, 2):
        # the ranks see the same batches, but torchrun runs them with one thread each, and an fp32
        # forward may round differently under another thread count or BLAS: bound as above
        rtol, _ = tolerance(torch.float32, forward_accumulation_length(model, blocks=layer + 1))
        assert ((one.sums[layer] - two.sums[layer]).norm() / one.sums[layer].norm()).item() < 2 * rtol
    assert main(["projector", "--stats", str(tmp_path / "one" / "key-stats.safetensors"), "--rank", "100",
                 "--out", str(tmp_path / "proj.safetensors"), "--dense", str(tmp_path / "P.safetensors")]) == 0
    bases = load_projector(tmp_path / "proj.safetensors")
    assert set(bases) == {1, 2} and all(u.shape == (160, 60) for u in bases.values())
    u = bases[1]
    torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=u.dtype), atol=1e-6, rtol=0)


def test_statistics_to_projector_to_edit(llama, corpus_file, tmp_path):
    """The whole pipeline: statistics -> projector file -> AlphaEditor; the update lies in the null space."""
    from alphaedit_fast import AlphaEditor
    from alphaedit_fast.projector import save_projector

    from .conftest import CONTEXT_TEMPLATES, REQUESTS, test_hparams

    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    stats = collect_statistics(model, tok, corpus_file, [1, 2], TEMPLATE, **SETTINGS)
    path = save_projector(tmp_path / "proj.safetensors",
                          {l: nullspace_basis(stats.covariance(l), rank=100) for l in (1, 2)}, stats)
    bases = load_projector(path, model)
    before = [model.get_submodule(TEMPLATE.format(l)).weight.detach().clone() for l in (1, 2)]
    AlphaEditor(model, tok, test_hparams(model), projector=bases, context_templates=CONTEXT_TEMPLATES).edit(REQUESTS)
    for layer, b in zip((1, 2), before):
        delta = model.get_submodule(TEMPLATE.format(layer)).weight.detach() - b  # (d_model, d_k)
        u = bases[layer]
        assert delta.norm() > 0
        assert (delta - delta @ u @ u.T).norm() / delta.norm() < 1e-4  # no component outside the null space


def test_unreadable_corpus_lines_name_the_line(llama, tmp_path):
    model, tok = llama
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"first line\n" + "caf\xe9 au lait\n".encode("latin-1"))
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    for path, message in ((latin1, "latin1.txt:2: not UTF-8"), (deep, "deep.jsonl:2: expected a JSON object")):
        with pytest.raises(InvalidRequestError, match=message):
            collect_statistics(model, tok, path, [1], TEMPLATE, **SETTINGS)


@pytest.mark.parametrize("k", [4, 64, 1024])
def test_top_p_sample_draws_from_the_nucleus_transformers_keeps(k):
    """Rows from flat to peaked: with k = 4 and 64 some nuclei reach past the top k (sorted whole),
    others not; k = 1024 covers the vocabulary. Every draw lies in transformers' top-p set, each
    token about as often as its renormalised probability, and a seed repeats the draws."""
    from transformers import TopPLogitsWarper

    vocab, draws = 200, 4000
    scales = torch.tensor([0.1, 1.0, 2.0, 4.0, 8.0, 30.0])
    logits = torch.randn(len(scales), vocab, generator=torch.Generator().manual_seed(0)) * scales[:, None]
    kept = TopPLogitsWarper(0.95)(None, logits.clone()).isfinite()
    expected = torch.where(kept, logits.softmax(-1), 0.0)
    expected /= expected.sum(-1, keepdim=True)
    tokens = top_p_sample(logits.repeat(draws, 1), 0.95, torch.Generator().manual_seed(1), k=k).view(draws, -1)
    assert kept.gather(1, tokens.T).all()
    frequency = torch.nn.functional.one_hot(tokens, vocab).double().mean(0)
    bound = 5 * (expected * (1 - expected) / draws).sqrt() + 1e-9  # 5 standard deviations of a frequency
    assert ((frequency - expected).abs() <= bound).all()
    again = top_p_sample(logits.repeat(draws, 1), 0.95, torch.Generator().manual_seed(1), k=k).view(draws, -1)
    assert torch.equal(tokens, again)
