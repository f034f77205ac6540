"""Keys (DESIGN step 4): rewrite-module inputs at the subject, averaged over context templates."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .hparams import AlphaEditHyperParams
from .ops import gather_segment_mean
from .positions import absolute_positions, encode_batch, lookup_positions
from .requests import normalize_requests
from .trace import capture_at_positions, hidden_of, read_modules, replayed_blocks
from .validation import check_context_templates, check_length, check_requests_for_model

MICRO_BATCH = 128


def get_module_input_output_at_words(
    model, tok, layer: int, context_templates: Sequence[str], words: Sequence[str],
    module_template: str, fact_token_strategy: str, batch_size: int = MICRO_BATCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of `module_template.format(layer)` at each word's lookup position.

    Returns (inputs (n, d_in), outputs (n, d_out)), detached, in the model dtype. Each forward
    pass stops at that module; the gather happens inside the hook.
    """
    name = module_template.format(layer)
    positions = lookup_positions(tok, context_templates, words, fact_token_strategy)
    texts = [t.format(w) for t, w in zip(context_templates, words)]
    device = model.get_input_embeddings().weight.device
    ins, outs = [], []
    for start in range(0, len(texts), batch_size):
        input_ids, mask = encode_batch(tok, texts[start : start + batch_size], device)
        check_length(model, input_ids.shape[1], f"prompt {texts[start + int(mask.sum(1).argmax())]!r}")
        pos = absolute_positions(positions[start : start + batch_size], mask)
        got_in, got_out = capture_at_positions(model, input_ids, mask, pos, inputs_of=[name], outputs_of=[name])
        ins.append(got_in[name])
        outs.append(got_out[name])
    return torch.cat(ins), torch.cat(outs)


def request_texts(requests, context_templates) -> tuple[list[str], list[str]]:
    """Every (request x context template) prompt and its subject: two lists of n * m strings."""
    per_request = sum(len(group) for group in context_templates)
    templates = [ctx.format(r["prompt"]) for r in requests for group in context_templates for ctx in group]
    words = [r["subject"] for r in requests for _ in range(per_request)]
    return templates, words


def average_over_templates(reprs: torch.Tensor, context_templates) -> torch.Tensor:
    """(n * m, d) representations -> (n, d) fp32: mean inside each context group, then over groups.

    The same two means in the same order as the original, so fp32 keys agree bit for bit.
    """
    bounds = np.cumsum([0] + [len(group) for group in context_templates]).tolist()
    per_request = reprs.float().view(-1, bounds[-1], reprs.shape[-1])
    group_means = [per_request[:, start:end].mean(1) for start, end in zip(bounds, bounds[1:])]
    return torch.stack(group_means, 1).mean(1)


def compute_ks(model, tok, requests, hparams: AlphaEditHyperParams, layer: int, context_templates) -> torch.Tensor:
    """Keys of every request at `layer`: (n_requests, d_k), fp32, as the original `compute_ks`."""
    requests = normalize_requests(requests)
    context_templates = check_context_templates(context_templates)
    check_requests_for_model(model, tok, requests, context_templates)
    templates, words = request_texts(requests, context_templates)
    reprs, _ = get_module_input_output_at_words(
        model, tok, layer, templates, words, hparams.rewrite_module_tmp, hparams.fact_token
    )
    return average_over_templates(reprs, context_templates)


def compute_keys(model, tok, requests, hparams: AlphaEditHyperParams, layers, context_templates,
                 with_z_output: bool = False, batch_size: int = MICRO_BATCH
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Keys of several layers, and optionally block L's output at the plain prompts, in one pass.

    Returns ([(n, d_k) fp32 per layer], (n, d_model) fp32 or None). Valid while the model does
    not change between the layers read: after an edit, or for one layer at a time during it.
    Each forward stops after the deepest module read; inside the hooks, `gather_segment_mean`
    gathers the lookup positions and averages over context templates in one pass.
    """
    passes = KeyPasses(model, tok, requests, hparams, context_templates, with_z_output, batch_size)
    return passes.read(layers, with_z_output)


class KeyPasses:
    """Key passes over one batch of requests' prompts, tokenised once (see `compute_keys`).

    Editing layer l changes nothing before block l, so a pass after that edit can restart from
    block l's input as an earlier pass saw it (`keep_inputs_of`), instead of from the embeddings.
    """

    def __init__(self, model, tok, requests, hparams: AlphaEditHyperParams, context_templates,
                 with_z_output: bool = False, batch_size: int = MICRO_BATCH):
        templates, words = request_texts(requests, context_templates)
        n, per_request = len(requests), len(templates) // len(requests)
        flat = [ctx for group in context_templates for ctx in group]
        group_weights = [1.0 / (len(group) * len(context_templates)) for group in context_templates for _ in group]
        row_request = [i for i in range(n) for _ in range(per_request)]
        row_weight = group_weights * n
        plain_rows = [i * per_request + flat.index("{}") for i in range(n)] if "{}" in flat else None
        if with_z_output and plain_rows is None:  # read the plain prompts in the same pass; they are no keys
            plain_rows = list(range(len(templates), len(templates) + n))
            templates, words = templates + [r["prompt"] for r in requests], words + [r["subject"] for r in requests]
            row_request, row_weight = row_request + [0] * n, row_weight + [0.0] * n
        positions = lookup_positions(tok, templates, words, hparams.fact_token)
        texts = [t.format(w) for t, w in zip(templates, words)]
        device = model.get_input_embeddings().weight.device
        self.model, self.hparams, self.n, self.plain_rows = model, hparams, n, plain_rows
        self.batches = []  # (input_ids, mask, positions, row_request, row_weight) per micro-batch
        for start in range(0, len(texts), batch_size):
            stop = start + batch_size
            input_ids, mask = encode_batch(tok, texts[start:stop], device)
            self.batches.append((input_ids, mask, absolute_positions(positions[start:stop], mask),
                                 torch.tensor(row_request[start:stop], device=device),
                                 torch.tensor(row_weight[start:stop], device=device)))
        self.block_inputs: dict[int, list[torch.Tensor]] = {}  # block -> its input (rows, seq, d) per micro-batch
        self.as_tuple: bool | None = None  # whether blocks return tuples (learnt while keeping an input)

    def read(self, layers, with_z_output: bool = False, resume_at: int | None = None,
             keep_inputs_of: Sequence[int] = ()) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """As `compute_keys`. `resume_at`: start at this block from its kept input (the blocks
        before it must be unchanged since), if kept; `keep_inputs_of`: keep these blocks' inputs
        for later passes (only blocks the pass runs through, so at most block L with z outputs)."""
        hparams = self.hparams
        module_names = [hparams.rewrite_module_tmp.format(layer) for layer in layers]
        z_block = hparams.layer_module_tmp.format(hparams.layers[-1]) if with_z_output else None
        resume = resume_at if resume_at and resume_at in self.block_inputs and self.as_tuple is not None else None
        # a block the pass skips keeps the input it had (its stand-in would see another block's)
        keep_inputs_of = [b for b in keep_inputs_of if resume is None or b >= resume]
        kept: dict[str, list[torch.Tensor]] = {hparams.layer_module_tmp.format(b): [] for b in keep_inputs_of}
        keys: dict[str, torch.Tensor] = {}
        outputs: list[torch.Tensor] = []
        for index, (input_ids, mask, positions, segment, weight) in enumerate(self.batches):
            with self._resumed(resume, index):
                part_keys, part_z = _read_batch(self.model, input_ids, mask, positions, segment, weight, self.n,
                                                module_names, z_block, kept, self)
            for name, part in part_keys.items():
                keys[name] = part if name not in keys else keys[name] + part
            outputs += part_z
        for block in keep_inputs_of:
            self.block_inputs[block] = kept[hparams.layer_module_tmp.format(block)]
        z_out = torch.cat(outputs)[self.plain_rows].float() if with_z_output else None
        return [keys[name] for name in module_names], z_out

    def drop_input(self, block: int) -> None:
        """Forget the kept input of `block` (frees its memory)."""
        self.block_inputs.pop(block, None)

    def _resumed(self, block: int | None, batch_index: int):
        if block is None:
            return contextlib.nullcontext()
        cached = self.block_inputs[block][batch_index]
        return replayed_blocks(self.model, self.hparams.layer_module_tmp, block - 1, lambda: cached, self.as_tuple)


def _read_batch(model, input_ids, mask, positions, segment, weight, n: int, module_names, z_block: str | None,
                keep: dict[str, list[torch.Tensor]], passes: KeyPasses
                ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """One micro-batch: each module's template-averaged keys (n, d_k) and block L's output rows;
    appends the input of each block named in `keep` to its list."""
    keys: dict[str, torch.Tensor] = {}
    outputs: list[torch.Tensor] = []

    def read_keys(x, output, name):
        keys[name] = gather_segment_mean(x, positions.to(x.device), segment.to(x.device), weight.to(x.device), n)

    def read_z(x, output):
        y = hidden_of(output)
        outputs.append(y[torch.arange(len(positions), device=y.device), positions.to(y.device)])

    def keep_input(x, output, name):
        keep[name].append(x.detach())
        passes.as_tuple = isinstance(output, tuple)

    readers: dict[str, list[Callable]] = {name: [functools.partial(read_keys, name=name)] for name in module_names}
    if z_block is not None:
        readers.setdefault(z_block, []).append(read_z)
    for name in keep:
        readers.setdefault(name, []).append(functools.partial(keep_input, name=name))
    read_modules(model, input_ids, mask, readers)
    return keys, outputs
