"""Lookup positions against brute-force tokenisation, under BOS and both padding sides."""

import pytest
import torch

from alphaedit_fast import InvalidRequestError, find_fact_lookup_idx, get_words_idxs_in_templates
from alphaedit_fast.positions import absolute_positions, encode_batch, lookup_positions
from alphaedit_fast.tiny import tiny_tokenizer

TEMPLATES = ["The mother tongue of {} is", "{} plays the", "{}", "I think {}", "{}, who speaks",
             "Because of it. {} works for", "x{}y", "The a. {}", "The capital of {} is"]
WORDS = ["Danielle Darrieux", "Toko Yasuda", "Apple A5", "Michel Denisot", " Pervez Musharraf",
         "Edwin of Northumbria", "ab", "Paris", "France"]


def brute_force(tok, template, word, subtoken):
    """Tokenise the prefix and prefix + word one at a time, as the original does."""
    prefix, suffix = template.split("{}")
    n_prefix = len(tok.encode(prefix))
    n_prompt = len(tok.encode(prefix + word))
    n_input = len(tok.encode(prefix + word + suffix))
    if subtoken == "first":
        return min(n_prefix, n_prompt - 1)
    if subtoken == "last" or n_input == n_prompt:
        return n_prompt - 1
    return n_prompt


def tokenizers(gpt2=None):
    toks = {"tiny": tiny_tokenizer(add_bos=False), "tiny-bos": tiny_tokenizer(add_bos=True)}
    if gpt2 is not None:
        toks["gpt2"] = gpt2
    return toks


@pytest.mark.parametrize("subtoken", ["last", "first_after_last", "first"])
@pytest.mark.parametrize("name", ["tiny", "tiny-bos"])
def test_indices_match_brute_force(name, subtoken):
    tok = tokenizers()[name]
    got = get_words_idxs_in_templates(tok, TEMPLATES, WORDS, subtoken)
    assert got == [[brute_force(tok, t, w, subtoken)] for t, w in zip(TEMPLATES, WORDS)]


@pytest.mark.parametrize("subtoken", ["last", "first_after_last", "first"])
def test_indices_match_brute_force_real_gpt2(gpt2_tokenizer, subtoken):
    got = get_words_idxs_in_templates(gpt2_tokenizer, TEMPLATES, WORDS, subtoken)
    assert got == [[brute_force(gpt2_tokenizer, t, w, subtoken)] for t, w in zip(TEMPLATES, WORDS)]
    ids = gpt2_tokenizer.encode(TEMPLATES[0].format(WORDS[0]))
    # `first` is len(tokens(prefix)) as DESIGN and the original define it; GPT-2 tokenises the
    # prefix's trailing space alone, so only `last` and `first_after_last` name a fixed token.
    expected_token = {"last": "ux", "first_after_last": " is", "first": None}[subtoken]
    if expected_token is not None:
        assert gpt2_tokenizer.decode(ids[got[0][0]]) == expected_token


def test_one_token_subject_merging_with_the_prefix_space():
    """"The a. " ends in a space tokenised alone; " Paris" is one token: the subject adds no token."""
    tok = tiny_tokenizer(add_bos=False)
    assert len(tok.encode("The a. ")) == len(tok.encode("The a. Paris"))
    idx = get_words_idxs_in_templates(tok, ["The a. {}"], ["Paris"], "last")[0][0]
    assert tok.decode(tok.encode("The a. Paris")[idx]) == " Paris"


def test_bos_shifts_positions_by_one():
    plain, bos = tiny_tokenizer(add_bos=False), tiny_tokenizer(add_bos=True)
    assert bos("The")["input_ids"][0] == bos.bos_token_id
    idx = lookup_positions(bos, ["{} plays the"], ["Toko Yasuda"], "subject_first")
    assert idx == [1]  # position 0 is BOS
    assert lookup_positions(plain, ["{} plays the"], ["Toko Yasuda"], "subject_first") == [0]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("fact_token", ["subject_last", "subject_first", "subject_first_after_last", "last"])
def test_positions_point_at_the_right_token_under_padding(padding_side, add_bos, fact_token):
    tok = tiny_tokenizer(add_bos=add_bos, padding_side=padding_side)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [t.format(w) for t, w in zip(TEMPLATES, WORDS)]
    rel = lookup_positions(tok, TEMPLATES, WORDS, fact_token)
    batch = tok(texts, padding=True, return_tensors="pt")  # the tokenizer's own padding side
    pos = absolute_positions(rel, batch["attention_mask"])
    for row, text in enumerate(texts):
        alone = tok(text)["input_ids"]
        expected = alone[rel[row]]
        assert batch["input_ids"][row, pos[row]].item() == expected
        if fact_token == "last":
            assert rel[row] == len(alone) - 1


def test_encode_batch_pads_right_and_leaves_tokenizer_alone():
    tok = tiny_tokenizer(add_bos=False, padding_side="left")
    assert tok.pad_token is None
    ids, mask = encode_batch(tok, ["a", "The mother tongue of"])
    assert mask[0].tolist()[0] == 1 and mask[0, -1] == 0  # right padded
    assert torch.equal(ids[1, : int(mask[1].sum())], torch.tensor(tok("The mother tongue of")["input_ids"]))
    assert tok.pad_token is None and tok.padding_side == "left"


def test_find_fact_lookup_idx_matches_original_convention():
    tok = tiny_tokenizer(add_bos=True)
    assert find_fact_lookup_idx("{} plays the", "Toko Yasuda", tok, "last") == -1
    idx = find_fact_lookup_idx("{} plays the", "Toko Yasuda", tok, "subject_last")
    assert idx == brute_force(tok, "{} plays the", "Toko Yasuda", "last")


@pytest.mark.parametrize("template, word", [("no placeholder", "x"), ("{} and {}", "x"), ("{} is", "")])
def test_bad_templates_and_words(template, word):
    with pytest.raises(InvalidRequestError):
        get_words_idxs_in_templates(tiny_tokenizer(), [template], [word], "last")
