"""Packed token-wise layers: a forward over padded rows whose linear layers see only real tokens.

A value step runs rows of different lengths padded to one width. Attention needs that (rows,
seq) layout, but the linear layers (attention projections, the MLP: nearly all of a block's
arithmetic) act on each token alone, so inside `packed_linears` each of them takes the real
token slots as one (tokens, d) matrix and scatters its output back, zeros at the padding. A
padded slot is masked out of every real token's attention, so real tokens compute what they
would have; all rows then run in one forward, each weight read once per step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


def is_tokenwise_linear(module: torch.nn.Module) -> bool:
    """nn.Linear, or the (in, out)-stored Conv1D of GPT-2-style models: out = x W + b per token."""
    return isinstance(module, torch.nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


@contextmanager
def packed_linears(blocks: Iterable[torch.nn.Module], mask: torch.Tensor) -> Iterator[None]:
    """While active, every linear layer inside `blocks` called on a (rows, seq, d) tensor runs
    on its real slots only (mask: (rows, seq), 1 on real tokens) and returns (rows, seq, out)
    with zeros at the padding. Calls on other shapes run unchanged."""
    rows, seq = mask.shape
    flat = mask.reshape(-1).bool()
    if bool(flat.all()):  # nothing to skip
        yield
        return
    index_on: dict[torch.device, torch.Tensor] = {}
    packed: dict[torch.nn.Module, bool] = {}
    last: list = [None, None]  # the latest (input, packed input): q/k/v and gate/up share theirs

    def index(device: torch.device) -> torch.Tensor:
        if device not in index_on:
            index_on[device] = flat.nonzero().squeeze(1).to(device)
        return index_on[device]

    def pack(module, args):
        x = args[0] if args else None
        packed[module] = x is not None and x.dim() == 3 and tuple(x.shape[:2]) == (rows, seq)
        if not packed[module]:
            return None
        if last[0] is not x:
            last[:] = x, x.reshape(rows * seq, -1).index_select(0, index(x.device))
        return (last[1], *args[1:])

    def unpack(module, args, output):
        if packed.pop(module, False):
            full = output.new_zeros(rows * seq, output.shape[-1]).index_copy(0, index(output.device), output)
            return full.view(rows, seq, -1)
        return None

    handles = []
    try:
        for block in blocks:
            for module in block.modules():
                if is_tokenwise_linear(module):
                    handles += [module.register_forward_pre_hook(pack), module.register_forward_hook(unpack)]
        yield
    finally:
        for handle in handles:
            handle.remove()
