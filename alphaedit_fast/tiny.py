"""Tiny random-initialised models and small tokenizers of every supported family.

Used by the tests, the benchmarks and the demo: nothing is downloaded, everything is built
from a config and a tokenizer trained here on a few sentences.
"""

from __future__ import annotations

import functools
import itertools
import re

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
    "qwen3_5_text": dict(DECODER_SHAPE, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                         linear_value_head_dim=16),
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


# Other fields that size a model, shrunk wherever a type's default config has them (mixtures of
# experts, low-rank attention): name pattern -> tiny value.
_SHRUNK_FIELDS = (
    (re.compile(r"experts_per_tok$|^moe_k$|^num_selected_experts$"), 2),
    (re.compile(r"(^|_)(num|n)_(routed_|local_|shared_)?experts$|^moe_num_(shared_)?experts$|^num_experts$"), 4),
    (re.compile(r".+_intermediate_size$|^expert_ffn_hidden_size$"), 32),
    (re.compile(r"lora_rank$"), 16),
    (re.compile(r"^qk_head_dim$"), 32),
    (re.compile(r".+_head_dim$"), 16),
    (re.compile(r"^rotary_dim$"), 8),
    (re.compile(r"^(n_group|topk_group)$"), 1),
    (re.compile(r"^vocab_size_per_layer_input$"), 512),
    (re.compile(r"^hidden_size_per_layer_input$"), 16),
)


def _shrunk_fields(model_type: str) -> dict:
    """Tiny values for the sizing fields (`_SHRUNK_FIELDS`) of `model_type`'s default config."""
    from transformers import CONFIG_MAPPING

    try:
        defaults = CONFIG_MAPPING[model_type]().to_dict()
    except Exception:  # noqa: BLE001 - a type whose defaults do not build gets no shrinking
        return {}
    shrunk = {}
    for name, value in defaults.items():
        if isinstance(value, int) and not isinstance(value, bool):
            tiny = next((size for pattern, size in _SHRUNK_FIELDS if pattern.search(name)), None)
            if tiny is not None and value > tiny:
                shrunk[name] = tiny
    if defaults.get("kv_lora_rank"):  # multi-head latent attention: as many key/value heads as query heads
        shrunk["num_key_value_heads"] = DECODER_SHAPE["num_attention_heads"]
    return shrunk


def tiny_model_config(family: str, vocab_size: int = 512, **overrides):
    """The config `tiny_model` builds `family` from: its entry here, else `DECODER_SHAPE` with
    the type's other sizing fields shrunk."""
    from transformers import AutoConfig

    if family in WRAPPED_VISION_CONFIGS:
        text_type = _WRAPPED_TEXT_TYPES[family]
        text = {**tiny_model_config(text_type, vocab_size, **overrides).to_dict(), "model_type": text_type}
        extra = dict(mm_tokens_per_image=4) if family == "gemma3" else {}
        return AutoConfig.for_model(family, text_config=text, vision_config=WRAPPED_VISION_CONFIGS[family], **extra)
    known = {**FAMILY_CONFIGS, **OUTPUT_TRANSFORM_CONFIGS, **OTHER_SHAPES}
    shape = known[family] if family in known else {**DECODER_SHAPE, **_shrunk_fields(family)}
    kwargs = {**shape, "vocab_size": vocab_size, **overrides}
    kwargs.setdefault("initializer_range", 0.2)
    kwargs.setdefault("bos_token_id", 0)
    kwargs.setdefault("eos_token_id", 0 if family in ("gpt2", "gptj", "gpt_neox") else 1)
    kwargs.setdefault("pad_token_id", kwargs["eos_token_id"])
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, vocab_size: int = 512, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", **overrides) -> torch.nn.Module:
    """A random-initialised causal LM of `family` (4 layers, width 64, MLP 160 unless
    overridden; a model type without an entry here gets `DECODER_SHAPE`), in eval mode, built
    directly on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    from .checkpoints import dtype_kwargs

    config = tiny_model_config(family, vocab_size, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, **dtype_kwargs(dtype)).eval()


# Multimodal wrappers around a decoder (`model.language_model` in transformers 5, `language_model`
# in 4.x): a one-block vision tower each, the text model as `tiny_model` builds it.
WRAPPED_VISION_CONFIGS: dict[str, dict] = {
    "qwen3_5": dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64),
    "gemma3": dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=32,
                   patch_size=8),
    "llava": dict(model_type="clip_vision_model", num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                  num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
}
_WRAPPED_TEXT_TYPES = {"qwen3_5": "qwen3_5_text", "gemma3": "gemma3_text", "llava": "llama"}


def tiny_wrapped_model(model_type: str, vocab_size: int = 512, seed: int = 0, **text_overrides) -> torch.nn.Module:
    """A random-initialised image-text-to-text model of `model_type` (a key of
    `WRAPPED_VISION_CONFIGS`) whose language model is `tiny_model`'s, in eval mode."""
    from transformers import AutoModelForImageTextToText

    config = tiny_model_config(model_type, vocab_size, **text_overrides)
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config).eval()


def tiny_tokenizer_for(family: str, padding_side: str = "right"):
    """GPT-style tokenizer for GPT-2/GPT-J/NeoX, BOS-adding for the Llama-like families."""
    return tiny_tokenizer(add_bos=family not in ("gpt2", "gptj", "gpt_neox"), padding_side=padding_side)
