"""Suffix-only value steps (DESIGN "Causality"): the keys/values of the positions before a
row's lookup position are constants of the z optimisation, so each step runs only suffixes.

A right-padded row of length n with lookup position p splits into a prefix [0, p) and a suffix
[p, n). The keys/values of every block come once from a forward pass with the model's own KV
cache; the prefixes are laid out left-padded to the longest one, so that an index distance in
the cache is a token distance (as sliding-window masks assume), and every step hands the model
a fresh cache holding them, the suffixes following right-padded with their true position ids.
The model's own attention, rotary, GQA, sliding-window and softcap code does the rest, for
every family, on transformers 4.4x (tuple caches for GPT-2) and 5.x.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from .arch import get_module
from .trace import read_modules

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (rows, kv_heads, seq, head_dim) each


@dataclass
class SplitRows:
    """Where each row splits into a cached prefix and a recomputed suffix."""

    prefix_index: torch.Tensor  # (rows, P) full position of each prefix slot, left-padded (pads: 0)
    prefix_mask: torch.Tensor  # (rows, P) 1 on real prefix tokens
    suffix_index: torch.Tensor  # (rows, S) full position of each suffix slot (pads: the row's last token)
    suffix_mask: torch.Tensor  # (rows, S) 1 on real suffix tokens

    def select(self, rows: torch.Tensor) -> SplitRows:
        """The split of a subset of rows (same P and S)."""
        return SplitRows(*[getattr(self, f.name)[rows] for f in fields(self)])

    @property
    def attention_mask(self) -> torch.Tensor:
        """(rows, P + S): the mask of a step, cached prefix then suffix."""
        return torch.cat([self.prefix_mask, self.suffix_mask], dim=1)


def split_rows(attention_mask: torch.Tensor, positions: torch.Tensor) -> SplitRows:
    """Split right-padded rows (attention_mask: (rows, seq)) at `positions` (rows,)."""
    lengths = attention_mask.sum(1)
    device = attention_mask.device
    prefix_slots = torch.arange(int(positions.max()), device=device)
    start = prefix_slots.numel() - positions  # first real slot of each left-padded prefix
    prefix_offset = prefix_slots[None] - start[:, None]
    suffix_slots = torch.arange(int((lengths - positions).max()), device=device)
    suffix_index = positions[:, None] + suffix_slots[None]
    return SplitRows(prefix_index=prefix_offset.clamp(min=0), prefix_mask=(prefix_offset >= 0).long(),
                     suffix_index=torch.minimum(suffix_index, lengths[:, None] - 1),
                     suffix_mask=(suffix_index < lengths[:, None]).long())


def uses_legacy_cache(model: torch.nn.Module) -> bool:
    """Whether the model takes tuples of (keys, values) rather than a Cache object (GPT-2 on 4.4x)."""
    return not getattr(model, "_supports_cache_class", True)


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward keyword of the KV cache: `cache` in recent transformers, else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def forward_with_kv(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    layer_module_tmp: str, readers: dict[str, list[Callable]], ln_f_module: str) -> list[KV]:
    """One no-grad forward pass with a KV cache, calling `readers` as `trace.read_modules` does,
    through the final norm (not the LM head). Returns every block's full keys/values."""
    from transformers import DynamicCache

    n_blocks = len(get_module(model, layer_module_tmp.format("")[:-1]))
    readers = {name: list(functions) for name, functions in readers.items()}
    readers.setdefault(ln_f_module, []).append(lambda x, output: None)  # the pass stops after it
    if uses_legacy_cache(model):  # each block returns its (keys, values) second
        presents: dict[int, KV] = {}
        for index in range(n_blocks):
            readers.setdefault(layer_module_tmp.format(index), []).append(
                lambda x, output, index=index: presents.__setitem__(index, tuple(output[1])))
        read_modules(model, input_ids, attention_mask, readers, use_cache=True)
        return [presents[index] for index in range(n_blocks)]
    cache = DynamicCache()
    read_modules(model, input_ids, attention_mask, readers, use_cache=True, **{cache_keyword(model): cache})
    if hasattr(cache, "layers"):  # transformers 5.x
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def gather_prefix(kv: list[KV], split: SplitRows, first_needed: int, rows: torch.Tensor) -> list[KV]:
    """The left-padded prefix keys/values of `rows` (the rows `split` describes) in every block:
    (len(rows), kv_heads, P, head_dim), from whole-row keys/values (batch, kv_heads, seq, head_dim).

    Blocks before `first_needed` never run in a step; they get (rows, 1, P, 1) stand-ins that
    only carry the prefix length, which is what the model reads off a cache's first layer."""

    def gather(states: torch.Tensor) -> torch.Tensor:
        states = states[rows.to(states.device)]
        at = split.prefix_index.to(states.device)[:, None, :, None]
        return states.gather(2, at.expand(-1, states.shape[1], -1, states.shape[3]))

    out = []
    for index, (keys, values) in enumerate(kv):
        if index < first_needed:
            dummy = keys.new_zeros(len(rows), 1, split.prefix_index.shape[1], 1)
            out.append((dummy, dummy))
        else:
            out.append((gather(keys), gather(values)))
    return out


def select_rows(kv: list[KV], rows: torch.Tensor) -> list[KV]:
    """The cached keys/values of a subset of rows."""
    return [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in kv]


def step_cache(model: torch.nn.Module, prefix: list[KV]):
    """A fresh cache holding `prefix`, as the model's forward takes it; each step needs its own
    because the model appends the step's suffix keys/values to it."""
    if uses_legacy_cache(model):
        return tuple(prefix)
    from transformers import DynamicCache

    cache = DynamicCache()
    for index, (keys, values) in enumerate(prefix):
        cache.update(keys, values, index)
    return cache



def group_by_suffix_length(suffix_lengths: list[int], cost_per_forward: int) -> list[list[int]]:
    """Rows (indices into `suffix_lengths`) grouped so that one step's padded token slots
    (rows x longest suffix, per group) plus `cost_per_forward` slots per group is least.

    Exact: the best grouping takes contiguous runs of the distinct lengths in sorted order, found
    by dynamic programming over them (a few dozen values, whatever the number of rows).
    """
    lengths = sorted(set(suffix_lengths))
    count = {length: 0 for length in lengths}
    for length in suffix_lengths:
        count[length] += 1
    # best[j]: least cost of the rows with the j shortest distinct lengths; cut[j]: where its last group starts
    best, cut = [0] + [None] * len(lengths), [0] * (len(lengths) + 1)
    for j in range(1, len(lengths) + 1):
        rows = 0
        for i in range(j, 0, -1):
            rows += count[lengths[i - 1]]
            cost = best[i - 1] + rows * lengths[j - 1] + cost_per_forward
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i - 1
    groups, j = [], len(lengths)
    while j > 0:
        members = set(lengths[cut[j] : j])
        groups.append([row for row, length in enumerate(suffix_lengths) if length in members])
        j = cut[j]
    return groups[::-1]
