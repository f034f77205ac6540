"""Suffix-only z steps (values.py + suffix.py) against whole-row steps and the reference.

Every family, on transformers 4.4x and 5.x (`make test-compat` runs this file too): the steps
must run only the suffixes (fewer token slots) and give the z's of whole-row steps, including
where a target token is read before the lookup position (fact_token="last") and under sliding
windows shorter than the prompts.
"""

import warnings

import pytest
import torch
import transformers

import alphaedit_fast.values as values
from alphaedit_fast.requests import normalize_requests
from alphaedit_fast.suffix import group_by_suffix_length, split_rows
from alphaedit_fast.tiny import FAMILY_CONFIGS, tiny_model, tiny_tokenizer_for

from .conftest import CONTEXT_TEMPLATES, REQUESTS, assert_close_rel, test_hparams, z_rtol
from .test_values import MORE_REQUESTS, reference_zs


def test_split_rows_layout():
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    split = split_rows(mask, torch.tensor([3, 1, 0]))
    assert split.prefix_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]  # left-padded to the longest prefix
    assert split.prefix_index.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 0]]
    assert split.suffix_mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert split.suffix_index.tolist() == [[3, 4, 4, 4], [1, 2, 2, 2], [0, 1, 2, 3]]  # = position ids
    assert split.attention_mask.shape == (3, 7)
    assert split.select(torch.tensor([1])).suffix_index.tolist() == [[1, 2, 2, 2]]


def _skip_unless_available(family):
    from transformers import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {family} models")


def _spy_step_widths(monkeypatch) -> list[int]:
    """From now on, the sequence width of every step's forward (not the probe's: no gradients)."""
    widths, run = [], values._run_blocks_after

    def spy(*args, **kwargs):
        if torch.is_grad_enabled():
            widths.append(args[4].shape[1])
        return run(*args, **kwargs)

    monkeypatch.setattr(values, "_run_blocks_after", spy)
    return widths


def _zs_and_step_widths(model, tok, requests, hparams, suffix_only, monkeypatch):
    """z's of `compute_zs` and the sequence width of every step's forward."""
    run = values._run_blocks_after
    widths = _spy_step_widths(monkeypatch)
    zs = values.compute_zs(model, tok, requests, hparams, hparams.layers[-1], CONTEXT_TEMPLATES,
                           suffix_only=suffix_only)
    monkeypatch.setattr(values, "_run_blocks_after", run)
    return zs, widths


@pytest.mark.parametrize("fact_token", ["subject_last", "last"])
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_suffix_steps_match_whole_rows(family, fact_token, monkeypatch):
    _skip_unless_available(family)
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model, fact_token=fact_token)
    hparams.extra["z_packed"] = False  # rows grouped by suffix length (tests/test_packing.py: packed)
    assert values.fast_steps_exact(model, tok, normalize_requests(MORE_REQUESTS), hparams, hparams.layers[-1],
                                   CONTEXT_TEMPLATES, suffix_only=True, packed=True)
    monkeypatch.setitem(values.FORWARD_COST_TOKENS, "cpu", 10**6)  # one group: its width is the longest suffix
    whole, whole_widths = _zs_and_step_widths(model, tok, MORE_REQUESTS, hparams, False, monkeypatch)
    suffix, suffix_widths = _zs_and_step_widths(model, tok, MORE_REQUESTS, hparams, None, monkeypatch)

    batch = values._prepare(tok, normalize_requests(MORE_REQUESTS), CONTEXT_TEMPLATES, fact_token, "cpu")
    suffixes = batch.attention_mask.sum(1) - batch.positions
    assert suffix_widths[0] == int(suffixes.max()) < whole_widths[0] == batch.input_ids.shape[1]
    rtol = z_rtol(model, hparams, whole.norm(dim=1).min().item())
    assert_close_rel(suffix, whole, rtol, dim=1, what="z")

    monkeypatch.setitem(values.FORWARD_COST_TOKENS, "cpu", 0)  # a group per suffix length
    grouped, grouped_widths = _zs_and_step_widths(model, tok, MORE_REQUESTS, hparams, None, monkeypatch)
    distinct = sorted(set(suffixes.tolist()))
    assert grouped_widths[: len(distinct)] == distinct  # the first step: one forward per group
    assert len(distinct) > 1 or fact_token == "last"  # "last": every suffix is the lookup token alone
    assert_close_rel(grouped, whole, rtol, dim=1, what="z")


def _padded_cost(groups, lengths, cost):
    return sum(len(g) * max(lengths[i] for i in g) + cost for g in groups)


@pytest.mark.parametrize("seed", range(20))
def test_grouping_by_suffix_length_is_optimal(seed):
    """Against every split of the sorted distinct lengths into contiguous runs."""
    import itertools
    import random

    rng = random.Random(seed)
    lengths = [rng.choice([1, 2, 3, 5, 8, 9]) for _ in range(rng.randint(1, 40))]
    cost = rng.choice([0, 4, 32, 1000])
    groups = group_by_suffix_length(lengths, cost)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # a partition
    distinct = sorted(set(lengths))
    best = min(
        _padded_cost([[i for i, n in enumerate(lengths) if lo <= n <= hi] for lo, hi in zip(
            [distinct[0]] + [distinct[c] for c in cuts], [distinct[c - 1] for c in cuts] + [distinct[-1]])],
            lengths, cost)
        for k in range(len(distinct))
        for cuts in itertools.combinations(range(1, len(distinct)), k))
    assert _padded_cost(groups, lengths, cost) == best


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma2", "phi3"])
def test_sliding_window_shorter_than_the_prompts(family):
    """A window of 3 tokens: the cached prefix must sit at its true distance from each suffix
    token, or the mask admits or drops the wrong keys. Checked against the reference oracle."""
    _skip_unless_available(family)
    tok = tiny_tokenizer_for(family)
    window = dict(sliding_window=3, use_sliding_window=True, max_window_layers=0)  # qwen2: window from layer 0
    windowed = tiny_model(family, **window)
    hparams = test_hparams(windowed, fact_token="last")
    fast = values.compute_zs(windowed, tok, REQUESTS, hparams, 2, CONTEXT_TEMPLATES)
    ref = reference_zs(windowed, tok, REQUESTS, hparams, CONTEXT_TEMPLATES)
    assert_close_rel(fast, ref, z_rtol(windowed, hparams, ref.norm(dim=1).min().item()), dim=1, what="z")
    unwindowed = values.compute_zs(tiny_model(family), tok, REQUESTS, hparams, 2, CONTEXT_TEMPLATES)
    assert ((unwindowed - ref).norm(dim=1) / ref.norm(dim=1)).max() > 1e-2  # the window mattered


def test_unknown_model_type_is_probed_not_named(monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    model.config.model_type = "my-llama"
    hparams = test_hparams(model)
    widths = _spy_step_widths(monkeypatch)
    values.compute_zs(model, tok, REQUESTS, hparams, hparams.layers[-1], CONTEXT_TEMPLATES)
    full = values._prepare(tok, normalize_requests(REQUESTS), CONTEXT_TEMPLATES, hparams.fact_token, "cpu")
    assert max(widths) < full.input_ids.shape[1]  # suffix-only steps: proven by the probe, whatever the name


def test_steps_the_probe_cannot_prove_run_plain_whole_rows(monkeypatch):
    """An attention that drops the cached prefix (here: every step cache comes empty) makes
    suffix steps wrong: the probe sees it, warns, and the z's are the reference's."""
    from transformers import DynamicCache

    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    hparams = test_hparams(model)
    monkeypatch.setattr(values, "step_cache", lambda model, prefix: DynamicCache())
    with pytest.warns(UserWarning, match="not exact on LlamaForCausalLM"):
        assert not values.fast_steps_exact(model, tok, normalize_requests(REQUESTS), hparams, hparams.layers[-1],
                                           CONTEXT_TEMPLATES, suffix_only=True, packed=True)
    widths = _spy_step_widths(monkeypatch)
    fast = values.compute_zs(model, tok, REQUESTS, hparams, hparams.layers[-1], CONTEXT_TEMPLATES)
    full = values._prepare(tok, normalize_requests(REQUESTS), CONTEXT_TEMPLATES, hparams.fact_token, "cpu")
    assert set(widths) == {full.input_ids.shape[1]}  # whole rows
    ref = reference_zs(model, tok, REQUESTS, hparams, CONTEXT_TEMPLATES)
    assert_close_rel(fast, ref, z_rtol(model, hparams, ref.norm(dim=1).min().item()), dim=1, what="z")


MIXED_WINDOWS = dict(sliding_window=3, layer_types=["sliding_attention", "full_attention"] * 2)
PROBED_TYPES = {  # model type: (config overrides, whether suffix-only steps are exact on it)
    "gemma3_text": (MIXED_WINDOWS, True),  # sliding-window and global layers mixed
    "cohere2": (MIXED_WINDOWS, True),  # the same, and a logit scale
    "olmo2": ({}, True),
    "qwen3_5_text": ({}, False),  # linear-attention layers keep a recurrent state, not keys/values
    # dense MLPs whose output projection has another name (arch.py)
    "phi": ({}, True),  # mlp.fc2, final_layernorm, partial rotary
    "starcoder2": ({}, True),  # mlp.c_proj
    "falcon": (dict(new_decoder_architecture=True, num_kv_heads=2), True),  # mlp.dense_4h_to_h
    # mixture of experts after dense layers: the edited layers 1, 2 are dense, layer 3 routes tokens
    "qwen3_moe": (dict(mlp_only_layers=[0, 1, 2], num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
                  True),
}


@pytest.mark.parametrize("family", sorted(PROBED_TYPES))
def test_probed_model_types_edit_as_the_reference(family, monkeypatch):
    """Model types outside the named families: the probe decides suffix-only steps, and either
    way the z's are the reference's."""
    _skip_unless_available(family)
    overrides, suffix_exact = PROBED_TYPES[family]
    model, tok = tiny_model(family, **overrides), tiny_tokenizer_for(family)
    hparams = test_hparams(model, fact_token="last")
    assert hparams.rewrite_module_tmp.format(0) in dict(model.named_modules())
    requests = normalize_requests(MORE_REQUESTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if not suffix_exact else "error")
        assert values.fast_steps_exact(model, tok, requests, hparams, hparams.layers[-1], CONTEXT_TEMPLATES,
                                       suffix_only=True, packed=True) == suffix_exact
    widths = _spy_step_widths(monkeypatch)
    fast = values.compute_zs(model, tok, MORE_REQUESTS, hparams, hparams.layers[-1], CONTEXT_TEMPLATES)
    full = values._prepare(tok, requests, CONTEXT_TEMPLATES, hparams.fact_token, "cpu")
    assert (max(widths) < full.input_ids.shape[1]) == suffix_exact
    ref = reference_zs(model, tok, MORE_REQUESTS, hparams, CONTEXT_TEMPLATES)
    assert_close_rel(fast, ref, z_rtol(model, hparams, ref.norm(dim=1).min().item()), dim=1, what="z")
