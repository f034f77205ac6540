"""Data-parallel editing (sharding.py): 2 and 3 gloo ranks, spawned here, give every rank the
same weights and the single-process edit within the z tolerance; mismatched ranks are refused
before any change; a rank that dies or hangs makes the others fail with an error naming it."""

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import traceback

import pytest
import torch
from safetensors.torch import load_file

from alphaedit_fast import AlphaEditor, apply_AlphaEdit_to_model
from alphaedit_fast.reference import apply_alphaedit_ref
from alphaedit_fast.sharding import Shard
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

from .conftest import CONTEXT_TEMPLATES, edit_rtol, forward_accumulation_length, test_hparams, tolerance
from .test_editor import BATCHES, key_covariance_bases
from .test_engine import rewrite_weights
from .test_stream import REQUESTS, edit_arguments, write_cli_inputs


def test_bounds_are_contiguous_and_cover_every_request():
    assert Shard(0, 3).bounds(7) == [(0, 3), (3, 5), (5, 7)]
    assert Shard(0, 3).bounds(2) == [(0, 1), (1, 2), (2, 2)]  # more ranks than requests: one holds none
    assert Shard(2, 3).local(["a", "b"]) == []
    assert [x for r in range(4) for x in Shard(r, 4).local(list(range(10)))] == list(range(10))


def edit_in_rank(rank, world, store, out, family, fault, timeout_s):
    """One rank: edit BATCHES with AlphaEditor in a gloo group; write its weights, dense cache and
    any error to out/rank{rank}.pt. `fault`: "requests" (rank 1 edits other requests),
    "model" (rank 1's model differs), "die" (rank 1 exits before editing), "hang" (rank 1 sleeps)."""
    os.environ["ALPHAEDIT_DIST_TIMEOUT"] = str(timeout_s)
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model, L2=10.0)
    if fault == "model" and rank == 1:
        with torch.no_grad():
            model.get_submodule(hparams.rewrite_module_tmp.format(hparams.layers[0])).weight.mul_(1.001)
    before = rewrite_weights(model, hparams)
    editor = AlphaEditor(model, tok, hparams, projector=key_covariance_bases(hparams),
                         context_templates=CONTEXT_TEMPLATES)
    result = {"error": None}
    started = time.perf_counter()
    try:
        if rank == 1 and fault == "die":
            os._exit(3)
        if rank == 1 and fault == "hang":
            time.sleep(3 * timeout_s)
        if fault == "original-api":
            cache = original_api_edit(model, tok, hparams)
        for batch in BATCHES if fault != "original-api" else []:
            editor.edit(batch[::-1] if fault == "requests" and rank == 1 else batch)
    except Exception as err:  # noqa: BLE001 - recorded for the test to read
        result["error"] = f"{type(err).__name__}: {err}"
        result["trace"] = traceback.format_exc()
    result.update(seconds=time.perf_counter() - started, weights=rewrite_weights(model, hparams), before=before,
                  cache=cache if fault == "original-api" else editor.dense_cache())
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    if result["error"] is None:
        dist.destroy_process_group()


def original_api_edit(model, tok, hparams) -> torch.Tensor:
    """BATCHES through `apply_AlphaEdit_to_model` with dense P and cache_c, as the original calls it."""
    P = torch.stack([u @ u.T for u in key_covariance_bases(hparams)])
    cache = torch.zeros_like(P)
    for batch in BATCHES:
        _, cache = apply_AlphaEdit_to_model(model, tok, batch, hparams, P=P, cache_c=cache,
                                            context_templates=CONTEXT_TEMPLATES)
    return cache


def run_ranks(tmp_path, world, family, fault=None, timeout_s=120.0):
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=edit_in_rank, args=(rank, world, str(tmp_path / "store"), str(tmp_path),
                                                            family, fault, timeout_s)) for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
        if process.is_alive():
            process.kill()
            pytest.fail(f"a rank was still running after 300 s (fault {fault})")
    return [torch.load(tmp_path / f"rank{r}.pt") if (tmp_path / f"rank{r}.pt").exists() else None
            for r in range(world)], [p.exitcode for p in processes]


@pytest.mark.parametrize("family, world, api", [("llama", 2, "editor"), ("gpt2", 3, "editor"), ("gemma", 3, "editor"),
                                               ("qwen2", 2, "original-api")])
def test_ranks_give_one_process_edit(tmp_path, family, world, api):
    """Two sequential batches, the first of 2 requests (with 3 ranks, one rank holds none), with
    AlphaEditor or the original's apply_AlphaEdit_to_model (dense P and cache_c in and out)."""
    results, codes = run_ranks(tmp_path, world, family, api if api != "editor" else None)
    assert codes == [0] * world, [r and r["trace"] for r in results]
    for result in results[1:]:  # every rank's edited weights and state: bit-identical
        assert all(torch.equal(a, b) for a, b in zip(results[0]["weights"], result["weights"]))
        assert torch.equal(results[0]["cache"], result["cache"])
    torch.set_num_threads(1)
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model, L2=10.0)
    before = rewrite_weights(model, hparams)
    rtol = edit_rtol(model, tok, [r for batch in BATCHES for r in batch], hparams)
    if api == "editor":
        editor = AlphaEditor(model, tok, hparams, projector=key_covariance_bases(hparams),
                             context_templates=CONTEXT_TEMPLATES, distributed=False)
        for batch in BATCHES:
            editor.edit(batch)
        cache = editor.dense_cache()
    else:
        cache = original_api_edit(model, tok, hparams)  # no process group here: one process
    # z is optimised with other rows beside it than in one process: equal within the z tolerance
    for ranked, single, b in zip(results[0]["weights"], rewrite_weights(model, hparams), before):
        assert (single - b).norm() > 0
        assert ((ranked - single).norm() / (single - b).norm()).item() < rtol
    assert ((results[0]["cache"] - cache).norm() / cache.norm()).item() < rtol
    # and the oracle: the reference's sequential edit of the same batches from the same weights
    ref_model = tiny_model(family)
    P = torch.stack([u @ u.T for u in key_covariance_bases(hparams)])
    ref_cache = torch.zeros_like(P)
    for batch in BATCHES:
        _, ref_cache = apply_alphaedit_ref(ref_model, tok, batch, hparams, CONTEXT_TEMPLATES, P, ref_cache)
    for ranked, expected, b in zip(results[0]["weights"], rewrite_weights(ref_model, hparams), before):
        assert ((ranked - expected).norm() / (expected - b).norm()).item() < rtol


@pytest.mark.parametrize("fault, what", [("requests", "requests"), ("model", "models")])
def test_mismatched_ranks_are_refused_before_any_change(tmp_path, fault, what):
    results, codes = run_ranks(tmp_path, 2, "llama", fault)
    for result in results:
        assert result["error"].startswith("DistributedEditError") and f"different {what}" in result["error"]
        assert all(torch.equal(a, b) for a, b in zip(result["weights"], result["before"]))
        assert not result["cache"].any()


@pytest.mark.parametrize("fault", ["die", "hang"])
def test_a_rank_that_dies_or_hangs_stops_the_others_with_its_name(tmp_path, fault):
    timeout_s = 4.0
    results, codes = run_ranks(tmp_path, 2, "llama", fault, timeout_s)
    if fault == "die":
        assert codes[1] == 3 and results[1] is None
    error = results[0]["error"]
    assert error.startswith("DistributedEditError") and "rank 0 of 2" in error and "1" in error.split("failed:")[1]
    assert results[0]["seconds"] < 10 * timeout_s + 30
    assert all(torch.equal(a, b) for a, b in zip(results[0]["weights"], results[0]["before"]))


# ------------------------------------------------------------------------------------------------
# `alphaedit-fast edit` / `eval` under torchrun


@pytest.fixture(scope="module")
def torchrun_setup(tmp_path_factory):
    """A tiny GPT-2, its hparams and 6 requests on disk, and the single-process edit in batches of 2."""
    root = tmp_path_factory.mktemp("torchrun")
    model, tok, hparams = write_cli_inputs(root)
    single = launch(root, 1, edit_arguments(root, "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    rtol = edit_rtol(model, tok, REQUESTS[:6], hparams)
    return root, rtol


def launch(root, ranks: int, args: list[str], **env):
    """The driver (`alphaedit-fast ARGS`, one thread per rank) in one process or under torchrun."""
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1",
           "XDG_CACHE_HOME": str(root / "cache"), "PYTHONWARNINGS": "ignore", "ALPHAEDIT_DIST_TIMEOUT": "60", **env}
    if ranks == 1:
        command = [sys.executable, str(root / "driver.py"), *args]
    else:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
        command = [torchrun, "--standalone", "--nproc-per-node", str(ranks), str(root / "driver.py"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)


def assert_single_process_edit(root, out, rtol):
    single, got = load_file(root / "single" / "model.safetensors"), load_file(root / out / "model.safetensors")
    unedited = load_file(root / "model" / "model.safetensors")
    changed = [k for k in single if not torch.equal(single[k], unedited[k])]
    assert len(changed) == 2  # the two edited layers; every other weight is saved untouched
    for name in single:
        if name in changed:
            change = (single[name] - unedited[name]).norm()
            assert ((got[name] - single[name]).norm() / change).item() < rtol, name
        else:
            assert torch.equal(got[name], single[name]), name
    state = load_file(root / out / "editor-state.safetensors")
    assert state.keys() == load_file(root / "single" / "editor-state.safetensors").keys()
    assert not (root / f"{out}.stream").exists()


def test_torchrun_edit_gives_the_single_process_edit(torchrun_setup):
    root, rtol = torchrun_setup
    result = launch(root, 2, edit_arguments(root, "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("6 edits in") == 1  # rank 0 alone reports and writes
    assert_single_process_edit(root, "two", rtol)


def test_torchrun_rank_killed_then_resumed_with_other_rank_counts(torchrun_setup):
    """Rank 1 is killed after the first batch's checkpoint: the job stops naming it; --resume on 3
    ranks continues and ends at the single-process edit."""
    root, rtol = torchrun_setup
    killed = launch(root, 2, edit_arguments(root, "killed"), KILL="after-save:2", KILL_RANKS="1")
    assert killed.returncode != 0
    assert "rank" in killed.stderr and ("1 (local_rank: 1)" in killed.stderr or "Ranks 1 failed" in killed.stderr)
    assert (root / "killed.stream" / "stream-checkpoint.safetensors").exists() and not (root / "killed").exists()
    resumed = launch(root, 3, [*edit_arguments(root, "killed"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after 2 of 6 edits" in resumed.stdout
    assert_single_process_edit(root, "killed", rtol)


def test_torchrun_eval_scores_as_one_process(torchrun_setup, tmp_path):
    """Each case's NLLs before the edits equal one process's (the ranks score their slices), and
    the edits' change of each NLL agrees within the edit's tolerance."""
    root, _ = torchrun_setup
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    hparams = test_hparams(model)  # 20 z steps: edits that move the NLLs
    (tmp_path / "hparams.json").write_text(json.dumps(hparams.to_dict()))
    requests = json.loads((root / "requests.json").read_text())[:4]
    cases = [{"case_id": i, "requested_rewrite": {**r, "target_true": {"str": "nothing"}},
              "paraphrase_prompts": [f"So, {r['prompt'].format(r['subject'])}"], "neighborhood_prompts": [
                  "The capital of France is"], "generation_prompts": []} for i, r in enumerate(requests)]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    args = ["eval", "--model", str(root / "model"), "--requests", str(tmp_path / "cases.json"), "--hparams",
            str(tmp_path / "hparams.json"), "--projector", "identity", "--batch-size", "2", "--curve",
            "--fluency-records", "3", "--generation-length", "12"]
    one = launch(root, 1, [*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(root, 2, [*args, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert [p["n_edits"] for p in a["curve"]] == [p["n_edits"] for p in b["curve"]] == [0, 2, 4]
    assert set(a["fluency"]) == set(b["fluency"]) and a["fluency"]["before"] == pytest.approx(b["fluency"]["before"])
    rtol = edit_rtol(model, tok, requests, hparams)
    forward_rtol, _ = tolerance(torch.float32, forward_accumulation_length(model))
    ones, twos = ([json.loads(line) for line in (tmp_path / d / "cases.jsonl").read_text().splitlines()]
                  for d in ("one", "two"))
    assert [r["case_id"] for r in twos] == [0, 1, 2, 3]  # every case once, in order
    moved = 0
    for x, y in zip(ones, twos):
        pre_x, post_x, pre_y, post_y = (_numbers(r[k]) for r in (x, y) for k in ("pre", "post"))
        assert pre_x.keys() == pre_y.keys() == post_x.keys() == post_y.keys()
        for k in (k for k in pre_x if "_probs." in k):
            assert pre_y[k] == pytest.approx(pre_x[k], rel=4 * forward_rtol), k
            change = abs(post_x[k] - pre_x[k])
            assert abs(post_y[k] - post_x[k]) <= rtol * change + 4 * forward_rtol * abs(post_x[k]), k
            moved += change > 0.1
    assert moved >= 4  # the edits moved NLLs: the comparison above could fail


def _numbers(tree, prefix=""):
    """{"a.b.0.c": number} of a JSON tree."""
    if isinstance(tree, list):
        tree = dict(enumerate(tree))
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _numbers(value, f"{prefix}{key}.").items()}
    return {prefix: tree} if isinstance(tree, (int, float)) else {}


def test_rank_gpus_share_the_node_equally():
    from alphaedit_fast import InvalidArgumentError
    from alphaedit_fast.sharding import rank_gpus

    assert [rank_gpus(r, 4, 8) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert rank_gpus(1, 2, 2) == [1]
    for ranks, gpus in ((3, 8), (4, 2)):
        with pytest.raises(InvalidArgumentError, match="cannot share"):
            rank_gpus(0, ranks, gpus)
