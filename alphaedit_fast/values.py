"""Target values z (DESIGN step 3): every request's delta optimised in one batch.

The loss is a sum of independent per-request terms and Adam is element-wise, so optimising
all requests together gives each the trajectory it would have alone. Blocks 0..L compute the
same thing at every step (only delta, added to block L's output, changes): their output is
computed once and replayed, and each step runs only the blocks after L, and in them only each
row's positions from its lookup position on (`suffix.py`), rows grouped by suffix length.
"""

from __future__ import annotations

import warnings
import weakref
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .arch import get_module, text_config
from .head import head_is_plain, own_logits, soft_capped
from .hparams import AlphaEditHyperParams
from .keys import average_over_templates, request_texts
from .modelstate import frozen
from .ops import add_at_positions
from .packing import packed_linears
from .positions import absolute_positions, encode_batch, lookup_positions
from .reference import compute_z_ref
from .requests import normalize_requests, target_token_ids, z_templates
from .suffix import (
    SplitRows,
    cache_keyword,
    forward_with_kv,
    gather_prefix,
    group_by_suffix_length,
    select_rows,
    split_rows,
    step_cache,
)
from .trace import StopForward, hidden_of, hooks, read_modules, replayed_blocks, run_model
from .validation import check_context_templates, check_options, check_requests_for_model

EARLY_STOP_LOSS = 5e-2
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def compute_z(model, tok, request, hparams: AlphaEditHyperParams, layer: int, context_templates) -> torch.Tensor:
    """z = h0 + delta at the output of block `layer` for one request: (d_model,).

    The original `compute_z`, one request at a time; `compute_zs` does many at once.
    """
    return compute_z_ref(model, tok, request, hparams, layer, context_templates)


@dataclass
class _Batch:
    """The prompts of a micro-batch of requests: per request its rewriting prompts, then "{} is a"."""

    input_ids: torch.Tensor  # (rows, seq)
    attention_mask: torch.Tensor  # (rows, seq)
    positions: torch.Tensor  # (rows,) lookup position of each row
    row_request: torch.Tensor  # (rows,) request index of each row
    kl_rows: torch.Tensor  # (n,) the "{} is a" row of each request
    first_rows: torch.Tensor  # (n,) the first rewriting row of each request (h0 is read there)
    target_rows: torch.Tensor  # (tokens,) row of each target token
    target_positions: torch.Tensor  # (tokens,) position predicting it
    target_ids: torch.Tensor  # (tokens,)
    target_weights: torch.Tensor  # (tokens,) 1 / (len(target) * rewriting prompts)


def _prepare(tok, requests, context_templates, fact_token: str, device) -> _Batch:
    templates, words, row_request, kl_rows, targets = [], [], [], [], []
    for index, request in enumerate(requests):
        ids = target_token_ids(tok, request["target_new"]["str"])
        suffix = tok.decode(ids[:-1])
        rows = z_templates(request["prompt"], suffix, context_templates)  # rewriting prompts, then the KL one
        targets.append((len(templates), len(rows) - 1, ids))
        templates += rows
        words += [request["subject"]] * len(rows)
        row_request += [index] * len(rows)
        kl_rows.append(len(templates) - 1)
    input_ids, mask = encode_batch(tok, [t.format(w) for t, w in zip(templates, words)], device)
    positions = absolute_positions(lookup_positions(tok, templates, words, fact_token), mask)
    lengths = mask.sum(1).tolist()
    t_rows, t_pos, t_ids, t_weights = [], [], [], []
    for first, n_prompts, ids in targets:
        for row in range(first, first + n_prompts):
            end = lengths[row]  # the prompt ends with target[:-1]
            t_rows += [row] * len(ids)
            t_pos += range(end - len(ids), end)  # the position before each target token predicts it
            t_ids += ids
            t_weights += [1.0 / (len(ids) * n_prompts)] * len(ids)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return _Batch(input_ids, mask, positions, as_long(row_request), as_long(kl_rows),
                  as_long([first for first, _, _ in targets]), as_long(t_rows), as_long(t_pos), as_long(t_ids),
                  torch.tensor(t_weights, device=device))


def _adam_step(param, grad, exp_avg, exp_avg_sq, step: int, lr: float) -> None:
    """torch.optim.Adam's update (single-tensor form), in place on rows of one request each."""
    beta1, beta2 = ADAM_BETAS
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(ADAM_EPS)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def default_z_batch_size(model, rows_per_request: int) -> int:
    """Requests per micro-batch: from free GPU memory, or 16 on CPU."""
    device = model.get_input_embeddings().weight.device
    if device.type != "cuda":
        return 16
    free, _ = torch.cuda.mem_get_info(device)
    config = text_config(model)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 1024)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 32)
    # activations kept for backward: ~40 floats of width d per token per block, 32 tokens a prompt
    per_request = rows_per_request * 32 * width * layers * 40 * 2
    return int(max(1, min(256, 0.5 * free // per_request)))


def compute_zs(model, tok, requests, hparams: AlphaEditHyperParams, layer: int, context_templates,
               batch_size: int | None = None, progress: bool = False, suffix_only: bool | None = None) -> torch.Tensor:
    """Target values of all requests: (n, d_model) fp32, each as `compute_z` would give it.

    Requests are optimised together in micro-batches of `batch_size` (default: `z_batch_size`
    in the hyper-parameters' extra keys, else chosen from free memory), each with its own Adam
    moments, early stop and norm clamp; a finished request never moves again. With
    `suffix_only` (default: wherever a probe proves it exact, `fast_steps_exact`) each step runs
    only the positions delta reaches, against cached keys/values of the rest (`suffix.py`).
    """
    requests = normalize_requests(requests)
    context_templates = check_context_templates(context_templates)
    check_requests_for_model(model, tok, requests, context_templates)
    check_options(z_batch_size=batch_size)
    return optimise_zs(model, tok, requests, hparams, layer, context_templates, batch_size, progress, suffix_only)


def optimise_zs(model, tok, requests: list[dict], hparams: AlphaEditHyperParams, layer: int, context_templates,
                batch_size: int | None = None, progress: bool = False, suffix_only: bool | None = None) -> torch.Tensor:
    """`compute_zs` on inputs already validated (normalised requests, checked templates)."""
    return optimise_zs_and_keys(model, tok, requests, hparams, layer, context_templates, batch_size, progress,
                                suffix_only)[0]


def optimise_zs_and_keys(model, tok, requests: list[dict], hparams: AlphaEditHyperParams, layer: int,
                         context_templates, batch_size: int | None = None, progress: bool = False,
                         suffix_only: bool | None = None, key_layer: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`optimise_zs`, and with `key_layer` the first edit's inputs read in the same first pass:
    the keys of `key_layer` (n, d_k) fp32 and block `layer`'s output at each plain prompt (n, d)
    fp32, as `keys.compute_keys(..., with_z_output=True)` gives them. Those are (None, None) when
    a key prompt's tokens up to its lookup position differ from the z prompt's (the target suffix
    merged into them) or no context template is the plain "{}"."""
    chunks = _micro_batches(model, requests, hparams, context_templates, batch_size)
    packed = hparams.extra.get("z_packed", True)
    if suffix_only is None:  # as configured where a probe proves it exact, else plain whole rows
        wanted = hparams.extra.get("z_suffix_only", True)
        exact = (wanted or packed) and fast_steps_exact(model, tok, requests, hparams, layer, context_templates,
                                                        wanted, packed)
        suffix_only, packed = wanted and exact, packed and exact
    parts = []
    with frozen(model):
        for index, chunk in enumerate(chunks):
            with z_progress_bar(index, len(chunks), hparams.v_num_grad_steps, progress) as bar:
                parts.append(_optimise(model, tok, chunk, hparams, layer, context_templates, suffix_only, packed,
                                       key_layer, bar if progress else None))
    zs = torch.cat([z for z, _, _ in parts])
    if any(keys is None for _, keys, _ in parts):
        return zs, None, None
    return zs, torch.cat([keys for _, keys, _ in parts]), torch.cat([out for _, _, out in parts])


def z_progress_bar(index: int, count: int, steps: int, enabled: bool) -> tqdm:
    """The bar of micro-batch `index` of `count`: one tick per loss evaluation (at most `steps`),
    then the mean loss of the requests evaluated and how many still optimise, e.g.
    `z 2/4:  48%|████▊     | 12/25 steps, loss 0.83  active 30/32`."""
    return tqdm(total=steps, desc="z" if count == 1 else f"z {index + 1}/{count}", unit="step", disable=not enabled,
                bar_format="{l_bar}{bar:10}| {n_fmt}/{total_fmt} steps{postfix} [{elapsed}<{remaining}]")


# Per model: {(z layer, suffix_only, packed): whether such steps gave its plain whole-row outputs}
_PROVEN_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# A wrong mask, position or cache moves a state by O(1); rounding, by far less than this.
PROBE_RTOL = {torch.float32: 1e-3, torch.float64: 1e-6}
PROBE_RTOL_16BIT = 5e-2


def fast_steps_exact(model, tok, requests: list[dict], hparams: AlphaEditHyperParams, layer: int,
                     context_templates, suffix_only: bool, packed: bool) -> bool:
    """Whether steps over suffixes only (`suffix_only`) and with `packed` linear layers are exact
    on this model: decided once per model, z layer and mode by probing, not by the model's name.
    One step with delta = 0 on the first two requests runs that way and over plain whole rows;
    the outputs of the loss layer and of the last block at every suffix token must agree to
    `PROBE_RTOL`. A model whose attention does not take the cache, mask or position ids as
    suffix steps hand them over, or that raises, fails: it runs plain whole rows, with a warning."""
    known = _PROVEN_STEPS.setdefault(model, {})
    key = (layer, suffix_only, packed)
    if key not in known:
        try:
            error = _probe_steps(model, tok, requests[:2], hparams, layer, context_templates, suffix_only, packed)
            why = f"they differ from plain whole-row steps by {error:.1e} relative"
        except Exception as exc:  # noqa: BLE001 - any failure means: not proven
            error, why = float("inf"), f"they fail: {type(exc).__name__}: {exc}"
        dtype = model.get_input_embeddings().weight.dtype
        known[key] = error <= PROBE_RTOL.get(dtype, PROBE_RTOL_16BIT)
        if not known[key]:
            mode = " and ".join(["suffix-only"] * suffix_only + ["packed"] * packed)
            warnings.warn(f"{mode} z steps are not exact on {type(model).__name__} ({why}); "
                          "running plain whole rows (exact, slower)", stacklevel=3)
    return known[key]


def _probe_steps(model, tok, requests, hparams, layer, context_templates, suffix_only, packed) -> float:
    """The largest relative difference, over the suffix tokens of `requests`' rows, between the
    loss-layer and last-block outputs of a step in the given mode and of a plain whole-row step
    (delta = 0)."""
    device = model.get_input_embeddings().weight.device
    batch = _prepare(tok, requests, context_templates, hparams.fact_token, device)
    loss_layer = max(hparams.v_loss_layer, layer)
    nothing = torch.zeros(0, dtype=torch.long, device=device)
    with torch.no_grad():
        first = _first_pass(model, hparams, layer, loss_layer, batch, nothing, nothing, with_kv=True)
        cached, kv = first["cached"], first["kv"]
        batch = _Batch(*[t.to(cached.device) for t in vars(batch).values()])
        n = len(requests)
        delta = cached.new_zeros(n, cached.shape[-1])
        local_request = torch.arange(n, device=cached.device)
        states = []
        whole = torch.zeros_like(batch.positions)
        for split_at, suffix, pack in ((batch.positions if suffix_only else whole, suffix_only, packed),
                                       (whole, False, False)):
            per_token = {}
            for group in _row_groups(batch, split_at, cached, kv if suffix else None, layer, suffix, pack):
                group_rows, h_loss, h_last = group.run(model, hparams, layer, loss_layer, first["tuple"],
                                                       local_request, batch.row_request, batch.positions - split_at,
                                                       delta, pack)
                for i, row in enumerate(group_rows.tolist()):
                    for position in range(int(batch.positions[row]), int(batch.attention_mask[row].sum())):
                        slot = position - int(split_at[row])
                        per_token[row, position] = torch.stack([h_loss[i, slot], h_last[i, slot]]).float()
            states.append(per_token)
    fast, plain = states
    return max(float((fast[k] - plain[k]).norm(dim=-1).div(plain[k].norm(dim=-1)).max()) for k in plain)


def _micro_batches(model, requests: list[dict], hparams: AlphaEditHyperParams, context_templates,
                   batch_size: int | None) -> list[list[dict]]:
    """The micro-batches of requests the z optimisation runs (see `compute_zs`)."""
    rows_per_request = sum(len(g) for g in context_templates) + 1
    batch_size = batch_size or hparams.extra.get("z_batch_size") or default_z_batch_size(model, rows_per_request)
    return [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]


def z_step_tokens(model, tok, requests, hparams: AlphaEditHyperParams, context_templates,
                  batch_size: int | None = None) -> dict[str, int]:
    """Token slots the first z step pushes through the blocks after the z layer, summed over the
    micro-batches: `padded` (rows x longest row, as whole-row steps run), `real` (non-padding),
    `suffix` (each row's lookup position to its end: under causal attention the only positions a
    step changes, and what the linear layers of packed suffix-only steps run) and
    `suffix_padded` (rows x longest suffix in each group of rows, as unpacked suffix-only steps
    run them on the model's device)."""
    counts = {"padded": 0, "real": 0, "suffix": 0, "suffix_padded": 0}
    cost = forward_cost_tokens(model.get_input_embeddings().weight.device)
    for chunk in _micro_batches(model, normalize_requests(requests), hparams, context_templates, batch_size):
        batch = _prepare(tok, chunk, context_templates, hparams.fact_token, "cpu")
        lengths = batch.attention_mask.sum(1)
        suffixes = (lengths - batch.positions).tolist()
        counts["padded"] += batch.input_ids.numel()
        counts["real"] += int(lengths.sum())
        counts["suffix"] += sum(suffixes)
        counts["suffix_padded"] += sum(len(group) * max(suffixes[row] for row in group)
                                       for group in group_by_suffix_length(suffixes, cost))
    return counts


def _run_blocks_after(model, hparams: AlphaEditHyperParams, layer: int, loss_layer: int, input_ids, attention_mask,
                      replay, as_tuple: bool, **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward with blocks 0..layer replayed; stops at the final norm.

    Returns the outputs of block `loss_layer` and of the last block, both (rows, seq, d).
    """
    seen = {}

    def keep_loss_layer(module, args, kwargs, output):
        seen["loss"] = hidden_of(output)

    def stop_at_final_norm(module, args, kwargs):
        seen["last"] = args[0] if args else kwargs["hidden_states"]
        raise StopForward

    ln_f = get_module(model, hparams.ln_f_module)
    with replayed_blocks(model, hparams.layer_module_tmp, layer, replay, as_tuple), \
            hooks(model, {hparams.layer_module_tmp.format(loss_layer): keep_loss_layer}):
        handle = ln_f.register_forward_pre_hook(stop_at_final_norm, with_kwargs=True)
        try:
            run_model(model, input_ids, attention_mask, **model_kwargs)
        finally:
            handle.remove()
    return seen["loss"], seen["last"]


def blocks_after(model, hparams: AlphaEditHyperParams, layer: int) -> list[torch.nn.Module]:
    """The decoder blocks after block `layer`: those a value step runs."""
    return list(get_module(model, hparams.layer_module_tmp.format("")[:-1]))[layer + 1 :]


def _first_pass(model, hparams: AlphaEditHyperParams, layer: int, loss_layer: int, batch: _Batch,
                fixed_rows: torch.Tensor, fixed_positions: torch.Tensor, with_kv: bool,
                key_module: str | None = None, key_rows: torch.Tensor | None = None) -> dict:
    """The pass over whole rows before the steps. Returns {"cached": block `layer`'s output
    (rows, seq, d), "tuple": whether blocks return tuples, "fixed": the loss layer's output at
    (fixed_rows, fixed_positions) (tokens, d), "kv": every block's keys/values, "keys": the
    input of `key_module` at the lookup positions of `key_rows` (len(key_rows), d_k)}. "fixed"
    and "kv" only `with_kv` (else the pass stops at block `layer`), "keys" only with a key_module."""
    seen: dict = {}
    readers: dict[str, list] = defaultdict(list)

    def on_z_block(x, output):
        seen["cached"], seen["tuple"] = hidden_of(output).detach(), isinstance(output, tuple)

    def on_loss_block(x, output):
        hidden = hidden_of(output)
        seen["fixed"] = hidden[fixed_rows.to(hidden.device), fixed_positions.to(hidden.device)]

    def on_key_module(x, output):
        seen["keys"] = x[key_rows.to(x.device), batch.positions[key_rows].to(x.device)]

    readers[hparams.layer_module_tmp.format(layer)].append(on_z_block)
    if key_module is not None:
        readers[key_module].append(on_key_module)
    if with_kv:
        readers[hparams.layer_module_tmp.format(loss_layer)].append(on_loss_block)
        seen["kv"] = forward_with_kv(model, batch.input_ids, batch.attention_mask, hparams.layer_module_tmp,
                                     readers, hparams.ln_f_module)
    else:
        read_modules(model, batch.input_ids, batch.attention_mask, readers)
    return seen


# A forward's fixed cost in token slots, for grouping rows by suffix length: on a CPU a step
# is compute-bound (a few dozen slots cost what a forward's hooks, masks and cache do); on a
# GPU small forwards are latency-bound, so rows split only when that saves many slots.
FORWARD_COST_TOKENS = {"cpu": 32, "cuda": 2048}


def forward_cost_tokens(device: torch.device) -> int:
    """`FORWARD_COST_TOKENS` of a device type (other accelerators count as GPUs)."""
    return FORWARD_COST_TOKENS.get(device.type, FORWARD_COST_TOKENS["cuda"])


@dataclass
class _RowGroup:
    """Rows of a micro-batch whose steps run in one forward: their split, replayed inputs and
    cached prefix keys/values."""

    rows: torch.Tensor  # (g,) rows of the batch
    split: SplitRows  # of these rows, (g, P) and (g, S)
    hidden: torch.Tensor  # (g, S, d) block L's output at the suffix slots, replayed (plus delta) every step
    input_ids: torch.Tensor  # (g, S) the suffix tokens (the embeddings they give are not used)
    prefix_kv: list | None  # per block (g, kv_heads, P, head_dim) keys and values, or None
    selected: tuple = (None, None)  # (kept rows, their prefix keys/values), re-gathered when requests finish

    def run(self, model, hparams, layer: int, loss_layer: int, as_tuple: bool, local_request, row_request,
            delta_at, delta, packed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The active rows' forward: (their batch rows, loss layer output (r, S, d), last block
        output (r, S, d)), or None when none of them is active. `packed`: linear layers run on
        the real suffix tokens only (`packing.py`)."""
        keep = (local_request[row_request[self.rows]] >= 0).nonzero().squeeze(1)
        if keep.numel() == 0:
            return None
        rows, split = self.rows[keep], self.split.select(keep)
        device = model.get_input_embeddings().weight.device
        kwargs = {"position_ids": split.suffix_index.to(device)}
        if self.prefix_kv is not None:
            if self.selected[0] is None or not torch.equal(self.selected[0], keep):
                self.selected = (keep, select_rows(self.prefix_kv, keep))
            kwargs[cache_keyword(model)] = step_cache(model, self.selected[1])

        def replay(hidden=self.hidden[keep], at=delta_at[rows], requests=local_request[row_request[rows]]):
            return add_at_positions(hidden, at, requests, delta)

        mask = split.attention_mask.to(device)
        packing = packed_linears(blocks_after(model, hparams, layer), split.suffix_mask) if packed else nullcontext()
        with packing:
            h_loss, h_last = _run_blocks_after(model, hparams, layer, loss_layer, self.input_ids[keep].to(device),
                                               mask, replay, as_tuple, **kwargs)
        return rows, h_loss, h_last


def _row_groups(batch: _Batch, split_at: torch.Tensor, cached: torch.Tensor, kv, layer: int,
                suffix_only: bool, packed: bool) -> list[_RowGroup]:
    """The rows split at `split_at` and grouped by suffix length (`group_by_suffix_length`;
    one group when `packed`: padding then costs no linear-layer work), each group with its
    replayed inputs and, from `kv` (every block's whole-row keys/values), its prefixes'
    keys/values of the blocks after `layer`."""
    lengths = batch.attention_mask.sum(1) - split_at
    if suffix_only and not packed:
        members = group_by_suffix_length(lengths.tolist(), forward_cost_tokens(cached.device))
    else:
        members = [list(range(len(lengths)))]
    groups = []
    for indices in members:
        rows = torch.tensor(indices, device=cached.device)
        split = split_rows(batch.attention_mask[rows], split_at[rows])
        hidden = cached[rows].gather(1, split.suffix_index[..., None].expand(-1, -1, cached.shape[-1]))
        prefix_kv = None
        if kv and split.prefix_mask.shape[1]:
            prefix_kv = gather_prefix(kv, split, first_needed=layer + 1, rows=rows)
        groups.append(_RowGroup(rows, split, hidden, batch.input_ids[rows].gather(1, split.suffix_index), prefix_kv))
    return groups


def _optimise(model, tok, requests, hparams: AlphaEditHyperParams, layer: int, context_templates,
              suffix_only: bool = True, packed: bool = True, key_layer: int | None = None,
              bar: tqdm | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """z of one micro-batch of requests (n, d_model) fp32, and with `key_layer` its keys and plain
    prompt outputs (see `optimise_zs_and_keys`), else (z, None, None).

    With `suffix_only` each step runs only the positions from each row's lookup position on,
    against the cached keys/values of the positions before it (`suffix.py`); else whole rows.
    With `packed` the linear layers compute real tokens only (`packing.py`). A `bar`
    (`z_progress_bar`) ticks at every loss evaluation; without one nothing is read back.
    """
    device = model.get_input_embeddings().weight.device
    batch = _prepare(tok, requests, context_templates, hparams.fact_token, device)
    key_rows, plain_rows = _key_rows(tok, requests, context_templates, hparams.fact_token, batch) \
        if key_layer is not None else (None, None)
    key_module = hparams.rewrite_module_tmp.format(key_layer) if key_rows is not None else None
    n = len(requests)
    loss_layer = max(hparams.v_loss_layer, layer)
    ln_f = get_module(model, hparams.ln_f_module)
    lm_head = get_module(model, hparams.lm_head_module)
    lm_w = lm_head.weight.T
    lm_b = lm_head.bias if getattr(lm_head, "bias", None) is not None else lm_w.new_zeros(lm_w.shape[1])
    softcap = getattr(text_config(model), "final_logit_softcapping", None)
    # The KL term reads the model's own logits; the rewriting loss, as the original, ln_f(h) @ W + b.
    plain_head = head_is_plain(model, lm_w, lm_b, softcap)

    def head(hidden):  # (tokens, d) -> logits (tokens, vocab) in the model dtype; norm and head may sit apart
        return ln_f(hidden.to(lm_w.device)).to(lm_w.device) @ lm_w + lm_b

    def target_log_probs(logits, ids):  # log_softmax in the model dtype, as the original
        log_probs = torch.log_softmax(logits, dim=-1)
        return log_probs.gather(1, ids.unsqueeze(1).to(log_probs.device)).squeeze(1).float()

    # Rows split at their lookup position: delta reaches only the suffix; a target token read
    # before it ("fixed", possible with fact_token="last") has a constant log-prob.
    split_at = batch.positions if suffix_only else torch.zeros_like(batch.positions)
    live = batch.target_positions >= split_at[batch.target_rows]
    first = _first_pass(model, hparams, layer, loss_layer, batch, batch.target_rows[~live],
                        batch.target_positions[~live], suffix_only, key_module, key_rows)
    cached, as_tuple, fixed_hidden, kv = first["cached"], first["tuple"], first.get("fixed"), first.pop("kv", None)
    dev = cached.device
    batch = _Batch(*[t.to(dev) for t in vars(batch).values()])
    split_at, live = split_at.to(dev), live.to(dev)
    h0 = cached[batch.first_rows, batch.positions[batch.first_rows]]
    h0_norm = h0.norm(dim=-1).float()
    delta_at = batch.positions - split_at  # suffix coordinate of each row's lookup position
    groups = _row_groups(batch, split_at, cached, kv, layer, suffix_only, packed)
    del kv  # whole rows, every block: only the prefixes of the blocks after the z layer are kept
    # early_stop_top1 (ENCORE's MPES) checks the target tokens of every rewriting prompt but the first
    checked = batch.target_rows != batch.first_rows[batch.row_request[batch.target_rows]]
    has_checked = torch.zeros(n, dtype=torch.bool, device=dev)
    has_checked[batch.row_request[batch.target_rows[checked]]] = True
    fixed_nll = torch.zeros(n, device=dev)
    fixed_misses = torch.zeros(n, dtype=torch.long, device=dev)  # checked fixed tokens that are not top-1
    if fixed_hidden is not None and fixed_hidden.shape[0]:
        fixed = ~live
        fixed_requests = batch.row_request[batch.target_rows[fixed]]
        with torch.no_grad():
            fixed_logits = head(fixed_hidden)
            log_probs = target_log_probs(fixed_logits, batch.target_ids[fixed]).to(dev)
            missed = (fixed_logits.argmax(-1).to(dev) != batch.target_ids[fixed]) & checked[fixed]
        fixed_terms = -(log_probs * batch.target_weights[fixed])
        fixed_nll.index_add_(0, fixed_requests, fixed_terms)
        fixed_misses.index_add_(0, fixed_requests, missed.long())
    t_rows, t_ids, t_weights = batch.target_rows[live], batch.target_ids[live], batch.target_weights[live]
    t_at = batch.target_positions[live] - split_at[t_rows]
    t_checked = checked[live]
    top1_evaluations = torch.zeros(n, dtype=torch.long, device=dev)

    all_rows = torch.arange(len(batch.row_request), device=dev)
    delta = torch.zeros(n, h0.shape[-1], device=dev)
    exp_avg, exp_avg_sq = torch.zeros_like(delta), torch.zeros_like(delta)
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    kl_init = None

    for step in range(hparams.v_num_grad_steps):
        active = (~done).nonzero().squeeze(1)  # requests still optimising; only their rows run
        if active.numel() == 0:
            break
        local_request = torch.full((n,), -1, dtype=torch.long, device=dev)
        local_request[active] = torch.arange(active.numel(), device=dev)
        active_delta = delta[active].clone().requires_grad_(True)

        with torch.enable_grad():
            outputs = [group.run(model, hparams, layer, loss_layer, as_tuple, local_request, batch.row_request,
                                 delta_at, active_delta, packed) for group in groups]
            outputs = [out for out in outputs if out is not None]
            rows = torch.cat([group_rows for group_rows, _, _ in outputs])  # the order of h_loss, h_last
            width = max(h.shape[1] for _, h, _ in outputs)
            h_loss, h_last = (torch.cat([F.pad(out[i], (0, 0, 0, width - out[i].shape[1])) for out in outputs])
                              for i in (1, 2))
            local_row = torch.full_like(all_rows, -1)
            local_row[rows] = torch.arange(rows.numel(), device=dev)
            row_request = local_request[batch.row_request[rows]]
            # Rewriting loss: read at the loss layer through the final norm and LM head (as the
            # original); KL at each request's "{} is a" lookup position, on the model's own
            # logits. One LM-head product serves both.
            tokens = local_row[t_rows] >= 0
            token_rows = local_row[t_rows[tokens]]
            hidden = h_loss[token_rows.to(h_loss.device), t_at[tokens].to(h_loss.device)]
            kl_rows = batch.kl_rows[active]
            last = h_last[local_row[kl_rows].to(h_last.device), delta_at[kl_rows].to(h_last.device)]
            if plain_head:  # one LM-head product serves both
                all_logits = head(torch.cat([hidden.to(lm_w.device), last.to(lm_w.device)]))
                rewrite_logits, kl_logits = all_logits[: len(hidden)], soft_capped(all_logits[len(hidden) :], softcap)
            else:
                rewrite_logits = head(hidden)
                kl_logits = own_logits(model, ln_f(last.to(lm_w.device)).to(lm_w.device))
            weighted = -(target_log_probs(rewrite_logits, t_ids[tokens]).to(dev) * t_weights[tokens])
            nll = fixed_nll[active].index_add(0, row_request[token_rows], weighted)
            kl_log_probs = F.log_softmax(kl_logits.float(), dim=-1).to(dev)
            if kl_init is None:
                kl_init = kl_log_probs.detach().clone()
            kl = F.kl_div(kl_init[active], kl_log_probs, log_target=True, reduction="none").sum(-1)
            decay = hparams.v_weight_decay * (active_delta.norm(dim=-1) / h0_norm[active] ** 2)
            loss = nll + hparams.kl_factor * kl + decay

            stop = (loss < EARLY_STOP_LOSS) | (step == hparams.v_num_grad_steps - 1)
            if hparams.early_stop_top1 is not None:
                missed = (rewrite_logits.argmax(-1).to(dev) != t_ids[tokens]) & t_checked[tokens]
                misses = fixed_misses[active].index_add(0, row_request[token_rows], missed.long())
                top1_evaluations[active] += ((misses == 0) & has_checked[active]).long()
                stop |= top1_evaluations[active] >= hparams.early_stop_top1
            moving = ~stop
            done[active[~moving]] = True
            if bar is not None:  # one device-to-host read per step, only with a bar
                mean_loss, still = torch.stack([loss.detach().mean(), moving.sum().float()]).tolist()
                bar.set_postfix_str(f"loss {mean_loss:.3g}  active {int(still)}/{n}", refresh=False)
                bar.update()
            if not moving.any():
                continue
            (grad,) = torch.autograd.grad(loss[moving].sum(), active_delta)
        ids = active[moving]
        param, m, v = delta[ids], exp_avg[ids], exp_avg_sq[ids]
        _adam_step(param, grad[moving], m, v, step + 1, hparams.v_lr)
        max_norm = hparams.clamp_norm_factor * h0_norm[ids]
        norms = param.norm(dim=-1)
        param = torch.where((norms > max_norm)[:, None], param * (max_norm / norms)[:, None], param)
        delta[ids], exp_avg[ids], exp_avg_sq[ids] = param, m, v
    if key_module is None:
        return h0.float() + delta, None, None
    keys = average_over_templates(first["keys"].to(dev), context_templates)
    return h0.float() + delta, keys, cached[plain_rows.to(dev), batch.positions[plain_rows.to(dev)]].float()


def _key_rows(tok, requests, context_templates, fact_token: str, batch: _Batch
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The z rows that hold each key prompt (request-major, template order as `keys.request_texts`)
    and the plain "{}" row of each request, if every key prompt's tokens up to its lookup position
    are the z row's and the lookup positions agree (causal attention then gives the same keys);
    else (None, None)."""
    flat = [ctx for group in context_templates for ctx in group]
    if "{}" not in flat:
        return None, None
    templates, words = request_texts(requests, context_templates)
    positions = lookup_positions(tok, templates, words, fact_token)
    rows_per_request = len(flat) + 1  # the rewriting prompts, then the KL one
    rows = [r * rows_per_request + j for r in range(len(requests)) for j in range(len(flat))]
    ids = tok([t.format(w) for t, w in zip(templates, words)])["input_ids"]
    z_positions, z_ids = batch.positions.tolist(), batch.input_ids.tolist()
    for row, position, key_ids in zip(rows, positions, ids):
        if z_positions[row] != position or z_ids[row][: position + 1] != key_ids[: position + 1]:
            return None, None
    plain = [r * rows_per_request + flat.index("{}") for r in range(len(requests))]
    device = batch.positions.device
    return torch.tensor(rows, device=device), torch.tensor(plain, device=device)
