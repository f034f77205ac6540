"""Checks on everything a caller passes in, run before the first weight changes.

Bad input raises an AlphaEditError subclass whose message names the argument or record and
says how to fix it; nothing here modifies its arguments.
"""

from __future__ import annotations

import os
import unicodedata
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .arch import get_module, has_experts, key_width, max_positions, stores_keys_first
from .errors import (
    HyperParamsError,
    InvalidArgumentError,
    InvalidRequestError,
    ModelStructureError,
    NormalisedMLPOutputWarning,
    ShapeError,
    require_finite,
)
from .hparams import AlphaEditHyperParams
from .positions import split_template

# A projector check multiplies P by a few random vectors; fp32 rounding of P x over d_k terms is
# far below this, while a matrix that is not a projector misses by O(1).
PROJECTOR_TOLERANCE = 1e-3
SOLVERS = ("auto", "cholesky", "woodbury")
SOLVE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def as_hparams(hparams: Any) -> AlphaEditHyperParams:
    """Our hyper-parameters from ours (re-validated: fields may have been set since), a dict, or
    any object with the original's attributes."""
    if isinstance(hparams, AlphaEditHyperParams):
        hparams.validate()
        return hparams
    if isinstance(hparams, Mapping):
        return AlphaEditHyperParams.from_dict(dict(hparams))
    if hparams is None or isinstance(hparams, (str, bytes, Sequence)) or not hasattr(hparams, "__dict__"):
        raise HyperParamsError(
            f"hparams must be an AlphaEditHyperParams, a dict or the original's hparams object, got "
            f"{type(hparams).__name__}; e.g. AlphaEditHyperParams.from_json('Llama3-8B.json')")
    return AlphaEditHyperParams.from_dict(dict(vars(hparams)))


def model_width(model) -> int:
    """d_model: the width of the residual stream (the input embedding's)."""
    return model.get_input_embeddings().weight.shape[1]


def check_model(model, hparams: AlphaEditHyperParams) -> list[torch.nn.Module]:
    """Every module the edit touches exists and each rewrite module maps d_k -> d_model;
    returns the rewrite modules, one per layer."""
    z_layer = hparams.layers[-1]
    for name in (hparams.layer_module_tmp.format(z_layer),
                 hparams.layer_module_tmp.format(max(hparams.v_loss_layer, z_layer)),
                 hparams.ln_f_module, hparams.lm_head_module):
        get_module(model, name)
    d_model = model_width(model)
    modules = []
    for layer in hparams.layers:
        name = hparams.rewrite_module_tmp.format(layer)
        check_dense_mlp(model, hparams, layer)
        module = get_module(model, name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise ModelStructureError(f"rewrite module {name!r} ({type(module).__name__}) has no 2-D weight; "
                                      "rewrite_module_tmp must name the MLP's output projection")
        out_width = weight.shape[1] if stores_keys_first(module) else weight.shape[0]
        if out_width != d_model:
            raise ModelStructureError(
                f"rewrite module {name!r} writes {out_width} features but the model's hidden width is {d_model}; "
                "rewrite_module_tmp must name the MLP's output projection (e.g. 'model.layers.{}.mlp.down_proj')")
        modules.append(module)
    check_block_calls(model, hparams.layer_module_tmp)
    widths = {key_width(m) for m in modules}
    if len(widths) != 1:
        raise ModelStructureError(f"rewrite modules of layers {hparams.layers} differ in input width: {widths}")
    normalised = list(post_mlp_norms(model, hparams))
    if normalised and not hparams.maps_post_mlp_norm:
        warnings.warn(
            f"layers {normalised} of {type(model).__name__} normalise the MLP output ({POST_MLP_NORM}) before adding "
            "it to the residual stream, while AlphaEdit's update (the original's and this one, alike) assumes it adds "
            "as it is: edits may need weight changes far larger than the weights (measured on Gemma-3-270M, "
            "docs/real-models.md); check the model's other predictions after editing, or map the residuals through "
            "the norm (hyper-parameter \"post_mlp_norm\": \"map\")",
            NormalisedMLPOutputWarning, stacklevel=3)
    return modules


_BLOCK_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_block_calls(model, layer_module_tmp: str) -> None:
    """Refuse a model whose forward does not run its blocks once each, in order (looped depth,
    as in Dory), or whose blocks hand the next block more than the hidden state (GLM-MoE-DSA's
    top-k indices): the z step replays block `layer` from its hidden state and runs the blocks
    after it once each. Decided once per model by a forward of two tokens."""
    known = _BLOCK_CALLS.setdefault(model, {})
    if layer_module_tmp not in known:
        known[layer_module_tmp] = _block_calls(model, layer_module_tmp)
    order, extra = known[layer_module_tmp]
    name = type(model).__name__
    if order != list(range(len(get_module(model, layer_module_tmp.format("")[:-1])))):
        shown = ", ".join(map(str, order[:24])) + (", ..." if len(order) > 24 else "")
        raise ModelStructureError(
            f"{name}'s forward does not run its blocks once each in order (it runs blocks {shown}: {len(order)} "
            "calls): AlphaEdit edits a layer that runs once, and its z step runs the blocks after that layer once each")
    if extra:
        raise ModelStructureError(
            f"the blocks of {name} return {extra} besides the hidden state, which the next block takes: the z step "
            "restarts the forward from one block's hidden state, so it cannot run this model")


def _block_calls(model, layer_module_tmp: str) -> tuple[list[int], str]:
    """(the order the forward calls the blocks in, a description of any tensors a block returns
    besides its hidden state, or "")."""
    from .trace import run_model

    blocks = list(get_module(model, layer_module_tmp.format("")[:-1]))
    order: list[int] = []
    extra: list[str] = []
    handed_on: dict[int, torch.Tensor] = {}  # id -> tensor: what the last block returned besides its hidden state

    def check_inputs(module, args, kwargs):
        given = [*args, *kwargs.values()]
        extra.extend(f"{type(value).__name__} {tuple(value.shape)}" for value in given
                     if isinstance(value, torch.Tensor) and handed_on.get(id(value)) is value)

    def record(index):
        def hook(module, args, kwargs, output):
            order.append(index)
            handed_on.clear()
            if isinstance(output, tuple):
                handed_on.update({id(value): value for value in output[1:] if isinstance(value, torch.Tensor)})
        return hook

    handles = [handle for i, block in enumerate(blocks)
               for handle in (block.register_forward_pre_hook(check_inputs, with_kwargs=True),
                              block.register_forward_hook(record(i), with_kwargs=True))]
    device = model.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            run_model(model, torch.zeros(1, 2, dtype=torch.long, device=device),
                      torch.ones(1, 2, dtype=torch.long, device=device))
    except Exception:  # noqa: BLE001 - a model that needs more than tokens: the edit's own forward will say
        return list(range(len(blocks))), ""
    finally:
        for handle in handles:
            handle.remove()
    return order, ", ".join(sorted(set(extra)))


def check_dense_mlp(model, hparams: AlphaEditHyperParams, layer: int) -> None:
    """Refuse a layer whose MLP is a mixture of experts (it has `experts`), naming the dense layers."""
    try:
        mlp = model.get_submodule(hparams.mlp_module_tmp.format(layer))
    except AttributeError:
        return  # no MLP module under that name: the rewrite module's own check reports it
    if not has_experts(mlp):
        return
    blocks = get_module(model, hparams.layer_module_tmp.format("")[:-1])
    names = {name for name, _ in model.named_modules()}
    dense = [l for l in range(len(blocks)) if hparams.rewrite_module_tmp.format(l) in names]
    raise ModelStructureError(
        f"layer {layer} of {type(model).__name__} has a mixture-of-experts MLP ({type(mlp).__name__}): AlphaEdit "
        "edits one dense MLP output projection per layer, and routed experts have none; "
        + (f"this model's dense layers are {dense}: choose layers among them" if dense
           else "this model has no dense MLP layer to edit"))


POST_MLP_NORM = "post_feedforward_layernorm"  # Gemma 2 and 3: norm(MLP(x)) joins the residual stream


def post_mlp_norms(model, hparams: AlphaEditHyperParams) -> dict[int, torch.nn.Module]:
    """{layer: the norm its block applies to the MLP output}, for the edited layers whose blocks
    have one (Gemma 2/3)."""
    blocks = {layer: get_module(model, hparams.layer_module_tmp.format(layer)) for layer in hparams.layers}
    return {layer: getattr(block, POST_MLP_NORM) for layer, block in blocks.items() if hasattr(block, POST_MLP_NORM)}


def check_context_templates(context_templates) -> list[list[str]]:
    """A copy of `context_templates` (groups of strings with one `{}` each) after checking it."""
    if isinstance(context_templates, (str, bytes)) or not isinstance(context_templates, Sequence) \
            or not context_templates \
            or not all(isinstance(g, Sequence) and not isinstance(g, (str, bytes)) and g for g in context_templates):
        raise InvalidRequestError("context_templates must be a non-empty list of non-empty lists of strings, "
                                  "e.g. [['{}'], ['The a. {}', 'I b. {}']]")
    for group in context_templates:
        for template in group:
            split_template(template, "context template")
    return [list(g) for g in context_templates]


def check_options(solver: str | None = None, z_batch_size: Any = None, solve_dtype: Any = None) -> torch.dtype | None:
    """Check the editing options; returns the solve dtype as a torch dtype (None if not given)."""
    if solver is not None and solver not in SOLVERS:
        raise InvalidArgumentError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if z_batch_size is not None and (isinstance(z_batch_size, bool) or not isinstance(z_batch_size, int)
                                     or z_batch_size < 1):
        raise InvalidArgumentError(f"z_batch_size must be a positive int or None (chosen from memory), "
                                   f"got {z_batch_size!r}")
    if solve_dtype is None:
        return None
    dtype = SOLVE_DTYPES.get(solve_dtype.removeprefix("torch.")) if isinstance(solve_dtype, str) else solve_dtype
    if dtype not in SOLVE_DTYPES.values():
        raise InvalidArgumentError(f"solve_dtype must be torch.float32 or torch.float64, got {solve_dtype!r}")
    return dtype


def as_tensor(value: Any, name: str) -> torch.Tensor:
    """A float tensor from a tensor, numpy array or nested list of numbers."""
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        if isinstance(value, (str, bytes, os.PathLike)):
            raise ShapeError(f"{name} must be a tensor, numpy array or nested list of numbers, got the path "
                             f"{str(value)!r}: load the file first")
        if isinstance(value, Mapping):
            raise ShapeError(f"{name} must be a tensor, numpy array or nested list of numbers, "
                             f"got {type(value).__name__}")
        try:
            tensor = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise ShapeError(f"{name} must be a tensor, numpy array or nested list of numbers with a regular "
                             f"shape ({err})") from None
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int64, torch.int32, torch.bool)):
        raise ShapeError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    return tensor if tensor.is_floating_point() else tensor.float()


def layer_stack(value: Any, n_layers: int, d_k: int, name: str, fill: str) -> torch.Tensor:
    """Validate P or cache_c, shaped (n_layers, d_k, d_k); None becomes identity or zeros."""
    if value is None:
        if fill == "identity":
            warnings.warn("P=None: editing without a null-space constraint (P = I)", stacklevel=3)
            return torch.eye(d_k).expand(n_layers, d_k, d_k)
        return torch.zeros(n_layers, d_k, d_k)
    value = as_tensor(value, name)
    if tuple(value.shape) != (n_layers, d_k, d_k):
        raise ShapeError(
            f"{name} must have shape (len(layers), d_k, d_k) = {(n_layers, d_k, d_k)}, got {tuple(value.shape)}"
        )
    require_finite(value, name)
    return value


def random_unit_vectors(d: int, device, dtype, n: int = 4) -> torch.Tensor:
    """A few fixed random unit vectors (d, n) that probe a matrix cheaply and deterministically."""
    x = torch.randn(d, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (x / x.norm(dim=0)).to(device, dtype)


def check_projector(P: torch.Tensor, name: str = "P") -> None:
    """Each P[i] (d, d) is a symmetric idempotent projector, checked on random unit vectors x:
    ||P x - P^T x|| and ||P (P x) - P x|| both below PROJECTOR_TOLERANCE."""
    for index, layer_P in enumerate(P):
        work = layer_P if layer_P.dtype in (torch.float32, torch.float64) else layer_P.float()
        x = random_unit_vectors(work.shape[0], work.device, work.dtype)
        px = work @ x
        asymmetry = float((px - work.T @ x).norm(dim=0).max())
        non_idempotence = float((work @ px - px).norm(dim=0).max())
        if max(asymmetry, non_idempotence) > PROJECTOR_TOLERANCE:
            raise ShapeError(
                f"{name}[{index}] is not a symmetric idempotent projector (|Px - P^T x| = {asymmetry:.2g}, "
                f"|P(Px) - Px| = {non_idempotence:.2g}); pass U0 U0^T from nullspace_projector or the original's "
                "get_project, not a covariance or a scaled matrix")


def check_basis(basis: torch.Tensor, name: str) -> None:
    """`basis` (d, r) has orthonormal columns: ||U y|| = ||y|| for random unit y."""
    if basis.shape[1] == 0:
        return
    y = random_unit_vectors(basis.shape[1], basis.device, basis.dtype if basis.is_floating_point() else torch.float32)
    error = float(((basis @ y).norm(dim=0) - 1).abs().max())
    if error > PROJECTOR_TOLERANCE:
        raise ShapeError(f"{name} does not have orthonormal columns (| |Uy| - 1 | = {error:.2g}); pass the "
                         "eigenvectors from nullspace_basis or load_projector")


def as_bases(projector: Any, layers: list[int], d_k: int) -> list[torch.Tensor] | None:
    """Per-layer null-space bases U (d_k, r) from a list or {layer: U} dict of tensors or arrays
    (string keys such as "4" are read as layer numbers); None when `projector` is a dense P."""
    n_layers = len(layers)
    if isinstance(projector, Mapping):
        by_layer = {}
        for key, basis in projector.items():
            try:
                by_layer[int(key)] = basis
            except (TypeError, ValueError):
                raise ShapeError(f"projector keys must be layer numbers, got {key!r}") from None
        missing = [layer for layer in layers if layer not in by_layer]
        if missing:
            raise ShapeError(f"the projector has no basis for layer(s) {missing} (it holds {sorted(by_layer)}); "
                             "compute statistics and a projector for every edited layer")
        items = [by_layer[layer] for layer in layers]
    elif isinstance(projector, (torch.Tensor, np.ndarray)):
        return None  # a dense P
    elif isinstance(projector, Sequence) and not isinstance(projector, (str, bytes)) \
            and all(isinstance(u, (torch.Tensor, np.ndarray)) for u in projector):
        items = list(projector)
    else:
        return None  # nested lists: a dense P, checked as such
    bases = [as_tensor(u, f"projector basis of layer {layer}") for u, layer in zip(items, layers)]
    if len(items) != n_layers or any(u.ndim != 2 or u.shape[0] != d_k for u in bases):
        raise ShapeError(f"projector must be {n_layers} bases of shape (d_k={d_k}, r) or dense "
                         f"P of shape {(n_layers, d_k, d_k)}")
    for u, layer in zip(bases, layers):
        require_finite(u, f"projector basis of layer {layer}")
        check_basis(u, f"projector basis of layer {layer}")
    return bases


def visible_text(text: str) -> str:
    """`text` without whitespace and invisible characters (zero-width spaces, BOMs, controls)."""
    return "".join(ch for ch in text if not ch.isspace() and unicodedata.category(ch) not in ("Cf", "Cc", "Zs"))


def check_requests_for_model(model, tok, requests: list[dict], context_templates: list[list[str]]) -> None:
    """Requests that this tokenizer and model can edit: subjects and targets made of real
    tokens, no two requests asking for different targets of the same prompt and subject, and
    every prompt the edit runs (context + prompt + target) within the model's positions.
    Tokenises in a few batched calls."""
    from .requests import describe, targets_token_ids, z_templates

    n = len(requests)
    subjects = [r["subject"] for r in requests]
    targets = [r["target_new"]["str"] for r in requests]
    special = set(tok.all_special_ids)
    content = tok([t.strip() for t in subjects + targets], add_special_tokens=False)["input_ids"]
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    for index, request in enumerate(requests):
        where = describe(request, index)
        for field, text, ids in (("subject", subjects[index], content[index]),
                                 ("target_new", targets[index], content[n + index])):
            if not visible_text(text) or all(t in special for t in ids):
                raise InvalidRequestError(f"{where}: {field} {text!r} has no content once tokenised (only "
                                          "whitespace, invisible characters or special tokens); give real text")
        key = (request["prompt"], request["subject"])
        if key in seen and seen[key][1] != targets[index]:
            raise InvalidRequestError(
                f"{where} asks for {targets[index]!r} but request {seen[key][0]} asks for {seen[key][1]!r} with the "
                f"same prompt {request['prompt']!r} and subject {request['subject']!r}: they contradict each other; "
                "keep one")
        seen.setdefault(key, (index, targets[index]))
    if max_positions(model) is None:
        return
    suffixes = tok.batch_decode([ids[:-1] for ids in targets_token_ids(tok, targets)])
    texts, owners = [], []
    for index, request in enumerate(requests):  # the rows values._prepare builds
        rows = z_templates(request["prompt"], suffixes[index], context_templates)
        texts += [t.format(request["subject"]) for t in rows]
        owners += [index] * len(rows)
    lengths = [len(ids) for ids in tok(texts)["input_ids"]]
    longest = max(range(len(texts)), key=lengths.__getitem__)
    check_length(model, lengths[longest], f"{describe(requests[owners[longest]], owners[longest])}: "
                                          "a prompt the edit runs")


def check_length(model, length: int, what: str) -> None:
    """`length` tokens fit the model's position range (when its config states one)."""
    limit = max_positions(model)
    if limit is not None and length > limit:
        raise InvalidRequestError(f"{what} is {length} tokens long, more than the model's {limit} positions; "
                                  "shorten the prompt, subject, target or context templates")
