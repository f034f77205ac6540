"""The model's own output head: logits from final-norm outputs exactly as its forward makes them.

Computing logits by hand as `normed @ W_head + b` misses what a model's forward does after its
head: Cohere multiplies by `logit_scale`, Granite divides by `logits_scaling`, Gemma 2/3
soft-cap, other families have their own. `own_logits` runs the model's causal-LM forward with
its backbone standing aside, so whatever that forward does to the head's output is done.
`head_is_plain` checks once per call site whether the hand formula (with soft-capping) equals it.
"""

from __future__ import annotations

import functools

import torch

from .errors import ModelStructureError


class _Backbone(torch.nn.Module):
    """Takes the backbone's place for one call: returns the given final-norm outputs."""

    def __init__(self, normed: torch.Tensor):
        super().__init__()
        self.normed = normed

    def forward(self, *args, **kwargs):
        return _outputs_class()(last_hidden_state=self.normed)


@functools.cache
def _outputs_class() -> type:
    """A backbone output whose fields other than the hidden states read as None (a causal-LM
    forward copies e.g. `cross_attentions` or `router_logits` into its own output)."""
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    class Outputs(BaseModelOutputWithPastAndCrossAttentions):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return None

    return Outputs


def own_logits(model: torch.nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """normed: (tokens, d) final-norm outputs -> (tokens, vocab) logits as `model(...).logits`
    gives them at those tokens, differentiable. The causal-LM forward runs with its backbone
    (`model.base_model_prefix`) replaced by a stand-in returning `normed`."""
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    inner = getattr(model, "language_model", None)
    if (not isinstance(backbone, torch.nn.Module) and isinstance(inner, torch.nn.Module)
            and hasattr(inner, "get_output_embeddings") and inner.get_output_embeddings() is not None):
        return own_logits(inner, normed)  # a transformers 4 multimodal wrapper around a whole causal LM
    if not isinstance(backbone, torch.nn.Module) or backbone is model:
        raise ModelStructureError(f"{type(model).__name__} has no backbone under {prefix!r}: its logits "
                                  "cannot be computed from hidden states")
    tokens = normed.shape[0]
    dummy_ids = torch.zeros(1, tokens, dtype=torch.long, device=normed.device)
    setattr(model, prefix, _Backbone(normed[None]))
    try:
        logits = model(input_ids=dummy_ids, use_cache=False).logits
    finally:
        setattr(model, prefix, backbone)
    return logits[0]


def soft_capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap) in fp32 (Gemma 2/3's `final_logit_softcapping`), or the logits."""
    return torch.tanh(logits.float() / softcap) * softcap if softcap else logits


def plain_logits(normed: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor, softcap: float | None
                 ) -> torch.Tensor:
    """normed @ W + b, soft-capped when the config says: (tokens, vocab)."""
    return soft_capped(normed @ weight_t + bias, softcap)


@torch.no_grad()
def head_is_plain(model: torch.nn.Module, weight_t: torch.Tensor, bias: torch.Tensor, softcap: float | None,
                  probe_tokens: int = 4) -> bool:
    """Whether `plain_logits` gives the model's own logits, on random unit-RMS inputs
    (probe_tokens, d): within a rounding bound of the d-term dot products in the model dtype."""
    generator = torch.Generator().manual_seed(0)
    width = weight_t.shape[0]
    normed = torch.randn(probe_tokens, width, generator=generator).to(weight_t.device, weight_t.dtype)
    mine, theirs = plain_logits(normed, weight_t, bias, softcap).float(), own_logits(model, normed).float()
    if mine.shape != theirs.shape:
        return False
    unit = torch.finfo(weight_t.dtype).eps
    scale = (normed.float().abs() @ weight_t.float().abs()).amax() + bias.float().abs().amax()
    return bool(((mine - theirs).abs().amax() <= 8 * width**0.5 * unit * scale).item())
