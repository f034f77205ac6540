"""Model families: module templates, key width and weight orientation, read off the model."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .errors import ModelStructureError


@dataclass(frozen=True)
class ModelSpec:
    """Where AlphaEdit reads and writes inside one model family."""

    family: str
    layer_module_tmp: str  # decoder block l; its output is the z-layer hidden state
    rewrite_module_tmp: str  # MLP output projection; its input is the key k
    mlp_module_tmp: str
    attn_module_tmp: str
    ln_f_module: str
    lm_head_module: str
    num_layers: int = 0
    default_v_lr: float = 0.1


_GPT2 = ModelSpec("gpt2", "transformer.h.{}", "transformer.h.{}.mlp.c_proj", "transformer.h.{}.mlp",
                  "transformer.h.{}.attn", "transformer.ln_f", "lm_head", default_v_lr=0.5)
_GPTJ = ModelSpec("gptj", "transformer.h.{}", "transformer.h.{}.mlp.fc_out", "transformer.h.{}.mlp",
                  "transformer.h.{}.attn", "transformer.ln_f", "lm_head", default_v_lr=0.5)
_NEOX = ModelSpec("gpt_neox", "gpt_neox.layers.{}", "gpt_neox.layers.{}.mlp.dense_4h_to_h",
                  "gpt_neox.layers.{}.mlp", "gpt_neox.layers.{}.attention",
                  "gpt_neox.final_layer_norm", "embed_out")
_LLAMA_LIKE = ModelSpec("llama", "model.layers.{}", "model.layers.{}.mlp.down_proj", "model.layers.{}.mlp",
                        "model.layers.{}.self_attn", "model.norm", "lm_head")

# Dense MLPs whose output projection has another name
_PHI = ModelSpec("phi", "model.layers.{}", "model.layers.{}.mlp.fc2", "model.layers.{}.mlp",
                 "model.layers.{}.self_attn", "model.final_layernorm", "lm_head")
_STARCODER2 = ModelSpec("starcoder2", "model.layers.{}", "model.layers.{}.mlp.c_proj", "model.layers.{}.mlp",
                        "model.layers.{}.self_attn", "model.norm", "lm_head")
_FALCON = ModelSpec("falcon", "transformer.h.{}", "transformer.h.{}.mlp.dense_4h_to_h", "transformer.h.{}.mlp",
                    "transformer.h.{}.self_attention", "transformer.ln_f", "lm_head")

FAMILIES: dict[str, ModelSpec] = {
    "gpt2": _GPT2,
    "gptj": _GPTJ,
    "gpt_neox": _NEOX,
    **{name: replace(_LLAMA_LIKE, family=name)
       for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")},
    "phi": _PHI,
    "starcoder2": _STARCODER2,
    "falcon": _FALCON,
}


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """`model.get_submodule(name)` with an error that says which module is missing."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ModelStructureError(
            f"{type(model).__name__} has no module {name!r}; check the module templates and "
            "layer numbers in the hyper-parameters (AlphaEditHyperParams.for_model fills them in)."
        ) from None


def _has_module(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _output_embedding_name(model: torch.nn.Module, default: str) -> str:
    """Name of the LM head (`embed_out` in GPT-NeoX up to transformers 4.x, `lm_head` elsewhere)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            return name
    return default


# Where a multimodal wrapper keeps its language model's modules: transformers 5 puts the decoder at
# `model.language_model` (Qwen3.5, Gemma 3, Mistral 3 ...), 4.x wraps a whole causal LM at `language_model`.
_WRAPPER_PREFIXES = (("model.", "model.language_model."), ("", "language_model."))


def _wrapped(spec: ModelSpec, old: str, new: str) -> ModelSpec:
    """`spec` with its module templates' prefix `old` replaced by `new` (the head is found by identity)."""
    names = ("layer_module_tmp", "rewrite_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module")
    if not all(getattr(spec, name).startswith(old) for name in names):
        return spec
    return replace(spec, **{name: new + getattr(spec, name)[len(old):] for name in names})


def same_layout(name: str, other: str) -> bool:
    """Whether two module names are one, up to a multimodal wrapper's prefix (`_WRAPPER_PREFIXES`)."""
    def unwrapped(value: str) -> str:
        for old, new in _WRAPPER_PREFIXES:
            if value.startswith(new):
                return old + value[len(new):]
        return value

    return unwrapped(name) == unwrapped(other)


def text_config(model: torch.nn.Module):
    """The config of `model`'s language model: the text config of a multimodal wrapper, else its own."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def detect(model: torch.nn.Module) -> ModelSpec:
    """The ModelSpec of `model`: by its (text) `model_type`, else by probing the known layouts, also
    under a multimodal wrapper's `model.language_model` / `language_model`."""
    model_type = getattr(text_config(model), "model_type", None) if hasattr(model, "config") else None
    known = [FAMILIES[model_type]] if model_type in FAMILIES else list(FAMILIES.values())
    candidates = known + [_wrapped(spec, old, new) for old, new in _WRAPPER_PREFIXES for spec in known]
    for spec in candidates:
        if _has_module(model, spec.rewrite_module_tmp.format(0)) and _has_module(model, spec.ln_f_module):
            num_layers = len(get_module(model, spec.layer_module_tmp.format("")[:-1]))
            family = spec.family if model_type in FAMILIES else (model_type or spec.family)
            return replace(spec, family=family, num_layers=num_layers,
                           lm_head_module=_output_embedding_name(model, spec.lm_head_module))
    if has_experts(model):
        raise ModelStructureError(
            f"{type(model).__name__} (model_type={model_type!r}) is a mixture-of-experts model whose MLPs have no "
            "single dense output projection: AlphaEdit edits dense MLP layers; where some layers are dense, pass "
            "explicit module templates and those layers in AlphaEditHyperParams")
    raise ModelStructureError(
        f"cannot tell where the MLP output projections of {type(model).__name__} "
        f"(model_type={model_type!r}) are; supported families: {sorted(FAMILIES)}. "
        "Pass explicit module templates in AlphaEditHyperParams instead."
    )


def has_experts(module: torch.nn.Module) -> bool:
    """Whether `module` holds a mixture of experts: a submodule, at any depth, named `experts`."""
    return any(name.rsplit(".", 1)[-1] == "experts" for name, _ in module.named_modules())


def stores_keys_first(module: torch.nn.Module) -> bool:
    """True when the module's weight is stored (d_k, d_model), as GPT-2's Conv1D does.

    nn.Linear stores (out, in) = (d_model, d_k); Conv1D stores (in, out).
    """
    if isinstance(module, torch.nn.Linear):
        return False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return True
    raise ModelStructureError(
        f"rewrite module {type(module).__name__} is neither nn.Linear nor Conv1D; "
        "AlphaEdit edits a dense MLP output projection."
    )


def key_width(module: torch.nn.Module) -> int:
    """d_k: the input width of a rewrite module."""
    weight = module.weight
    return weight.shape[0] if stores_keys_first(module) else weight.shape[1]


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover, when its config says."""
    config = text_config(model)
    for name in ("n_positions", "max_position_embeddings", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
