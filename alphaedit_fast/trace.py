"""Forward hooks: read module inputs/outputs at given positions, edit outputs, stop early.

Decoder blocks return a tuple in transformers 4.4x and a tensor in 5.x; `hidden_of` and
`with_hidden` hide the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from .arch import get_module


def hidden_of(output):
    """The hidden-state tensor of a module output (first element of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output, hidden: torch.Tensor):
    """`output` with its hidden-state tensor replaced by `hidden`."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-state input of a module call (first positional or `hidden_states`)."""
    return args[0] if args else kwargs["hidden_states"]


class StopForward(Exception):
    """Raised inside a hook once everything needed is captured, to skip the rest of a forward."""


@contextmanager
def hooks(model: torch.nn.Module, handlers: dict[str, Callable], with_kwargs: bool = True) -> Iterator[None]:
    """Register `handlers[name](module, args, kwargs, output)` as forward hooks; remove on exit."""
    handles = [
        get_module(model, name).register_forward_hook(fn, with_kwargs=with_kwargs)
        for name, fn in handlers.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_model(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              use_cache: bool = False, **kwargs):
    """One forward pass (by default without a KV cache); returns the model output, or None if
    stopped early. `kwargs` go to the model (position ids, a cache)."""
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs)
    except StopForward:
        return None


def read_modules(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 readers: dict[str, Callable | list[Callable]], stop_early: bool = True, **model_kwargs) -> None:
    """One forward pass (no grad) calling `readers[name](module_input, module_output)` (one
    function or a list of them) as each named module runs; with `stop_early` the pass ends once
    every reader has been called. `model_kwargs` go to the model (a cache, `use_cache`)."""
    pending = set(readers)

    def make_hook(name: str):
        functions = readers[name] if isinstance(readers[name], list) else [readers[name]]

        def hook(module, args, kwargs, output):
            for read in functions:
                read(input_of(args, kwargs), output)
            pending.discard(name)
            if stop_early and not pending:
                raise StopForward

        return hook

    with torch.no_grad(), hooks(model, {name: make_hook(name) for name in readers}):
        run_model(model, input_ids, attention_mask, **model_kwargs)


def capture_at_positions(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    inputs_of: Sequence[str] = (),
    outputs_of: Sequence[str] = (),
    stop_early: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inputs/outputs of modules at one position per row, gathered inside the hooks.

    input_ids, attention_mask: (batch, seq); positions: (batch,) batch indices.
    Returns ({name: (batch, d_in)}, {name: (batch, d_out)}), detached, in the model dtype.
    With `stop_early` the forward pass ends as soon as every requested tensor is captured.
    """
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    captured_in: dict[str, torch.Tensor] = {}
    captured_out: dict[str, torch.Tensor] = {}

    def make_reader(name: str):
        def reader(x, output):
            if name in inputs_of:
                captured_in[name] = x[rows.to(x.device), positions.to(x.device)].detach()
            if name in outputs_of:
                y = hidden_of(output)
                captured_out[name] = y[rows.to(y.device), positions.to(y.device)].detach()

        return reader

    names = list(dict.fromkeys([*inputs_of, *outputs_of]))
    read_modules(model, input_ids, attention_mask, {n: make_reader(n) for n in names}, stop_early)
    return captured_in, captured_out


class _StandIn(torch.nn.Module):
    """Takes a decoder block's place; attribute reads fall through to the block (e.g. the
    `attention_type` some models read off each layer to pick its mask)."""

    def __init__(self, block: torch.nn.Module, output_fn: Callable[[torch.Tensor], torch.Tensor], as_tuple: bool):
        super().__init__()
        object.__setattr__(self, "block", block)  # not registered: no parameters of its own
        object.__setattr__(self, "output_fn", output_fn)
        self.as_tuple = as_tuple

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "block"), name)

    def forward(self, *args, **kwargs):
        hidden = self.output_fn(input_of(args, kwargs))
        return (hidden,) if self.as_tuple else hidden


@contextmanager
def replayed_blocks(model: torch.nn.Module, layer_module_tmp: str, last: int,
                    replay: Callable[[], torch.Tensor], as_tuple: bool) -> Iterator[None]:
    """Blocks 0..`last` stand aside: the first ones pass their input through, block `last`
    returns `replay()` (its cached output, edited). Only the blocks after `last` compute.

    `as_tuple`: whether the real blocks return a tuple (transformers 4.4x) or a tensor (5.x).
    """
    container = get_module(model, layer_module_tmp.format("")[:-1])
    originals = [container[i] for i in range(last + 1)]
    for i, block in enumerate(originals):
        container[i] = _StandIn(block, (lambda h: replay()) if i == last else (lambda h: h), as_tuple)
    try:
        yield
    finally:
        for i, block in enumerate(originals):
            container[i] = block
