"""Tiny random-initialised models and small tokenizers of every supported family.

Used by the tests, the benchmarks and the demo: nothing is downloaded, everything is built
from a config and a tokenizer trained here on a few sentences.
"""

from __future__ import annotations

import functools
import itertools

import torch

FAMILY_CONFIGS: dict[str, dict] = {
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_inner=160, n_positions=128),
    "gptj": dict(n_embd=64, n_layer=4, n_head=4, n_inner=160, n_positions=128, rotary_dim=8),
    "gpt_neox": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=160,
                     max_position_embeddings=128),
    "llama": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=160, max_position_embeddings=128),
    "mistral": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=160, max_position_embeddings=128),
    "qwen2": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=160, max_position_embeddings=128),
    "qwen3": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=160, head_dim=16, max_position_embeddings=128),
    "gemma": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=160, head_dim=16, max_position_embeddings=128),
    "gemma2": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=160, head_dim=16, max_position_embeddings=128),
    "phi3": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=160, max_position_embeddings=128),
}

# The shape of any other decoder-only model type (config field names of the Llama lineage),
# and of those that name their fields otherwise.
DECODER_SHAPE = dict(FAMILY_CONFIGS["gemma"])
OTHER_SHAPES: dict[str, dict] = {
    "falcon": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, ffn_hidden_size=160,
                   max_position_embeddings=128),
}

# Families whose causal-LM forward transforms the head's output (head.py): a logit scale, a
# logits divisor, set away from 1 so that a missing transform shows.
OUTPUT_TRANSFORM_CONFIGS: dict[str, dict] = {
    "cohere": dict(FAMILY_CONFIGS["llama"], logit_scale=0.5),
    "granite": dict(FAMILY_CONFIGS["llama"], logits_scaling=8.0),
}

_NAMES = ["Danielle Darrieux", "Toko Yasuda", "Autonomous University of Madrid", "Edwin of Northumbria",
          "Apple A5", "Thomas Joannes Stieltjes", "Anaal Nathrakh", "Michel Denisot", "Pervez Musharraf"]
_OBJECTS = ["French", "English", "Spain", "Sweden", "Google", "Apple", "Microsoft", "Paris", "London",
            "guitar", "piano", "violin", "football", "basketball", "Christianity", "Islam", "Dutch"]
_PROMPTS = ["The mother tongue of {} is", "{} is located in", "{} was developed by", "{} plays the",
            "The official religion of {} is", "{} works for", "{} is a citizen of", "{}, who speaks"]


def corpus() -> list[str]:
    """A few hundred short sentences covering the test subjects, prompts and targets."""
    rows = [p.format(n) + " " + o + "." for (p, n), o in zip(itertools.product(_PROMPTS, _NAMES),
                                                            itertools.cycle(_OBJECTS))]
    rows += ["The", "Therefore", "Because", "I", "You", "{} is a", "is a"]
    return rows * 4 + [" " + " ".join(_OBJECTS)] * 50 + [" ".join(_NAMES)] * 20


@functools.cache
def _tokenizer_json(add_bos: bool, vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<s>", "</s>", "<pad>", "<unk>"] if add_bos else ["<|endoftext|>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>" if add_bos else None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus(), trainer=trainer)
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))]
        )
    return tk.to_str()


def tiny_tokenizer(add_bos: bool = False, padding_side: str = "right", vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `corpus()`.

    add_bos=False behaves like GPT-2's (no BOS, no pad token); add_bos=True like Llama's
    (prepends `<s>`, has a pad token); `padding_side` is what the tokenizer itself would use.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer.from_str(_tokenizer_json(add_bos, vocab_size))
    # Like real GPT-2/Llama tokenizers: no token_type_ids, which `model(**tok(...))` would pass on.
    common = dict(tokenizer_object=tk, padding_side=padding_side, model_input_names=["input_ids", "attention_mask"])
    if add_bos:
        return PreTrainedTokenizerFast(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                       **common)
    return PreTrainedTokenizerFast(bos_token="<|endoftext|>", eos_token="<|endoftext|>", **common)


def tiny_model(family: str, vocab_size: int = 512, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", **overrides) -> torch.nn.Module:
    """A random-initialised causal LM of `family` (4 layers, width 64, MLP 160 unless
    overridden; a model type without an entry here gets `DECODER_SHAPE`), in eval mode, built
    directly on `device` in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .loading import dtype_kwargs

    shape = {**FAMILY_CONFIGS, **OUTPUT_TRANSFORM_CONFIGS, **OTHER_SHAPES}.get(family, DECODER_SHAPE)
    kwargs = {**shape, "vocab_size": vocab_size, **overrides}
    kwargs.setdefault("initializer_range", 0.2)
    kwargs.setdefault("bos_token_id", 0)
    kwargs.setdefault("eos_token_id", 0 if family in ("gpt2", "gptj", "gpt_neox") else 1)
    kwargs.setdefault("pad_token_id", kwargs["eos_token_id"])
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, **dtype_kwargs(dtype)).eval()


def tiny_tokenizer_for(family: str, padding_side: str = "right"):
    """GPT-style tokenizer for GPT-2/GPT-J/NeoX, BOS-adding for the Llama-like families."""
    return tiny_tokenizer(add_bos=family not in ("gpt2", "gptj", "gpt_neox"), padding_side=padding_side)
