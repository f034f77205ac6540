"""Temporary changes to a model's state, always undone: eval mode, frozen weights, rollback."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode and `requires_grad=False` on every parameter; both restored on exit.

    Editing must not run dropout nor accumulate `.grad` in the user's model.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@contextmanager
def restore_on_error(weights: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Snapshot `weights`; if the block raises, copy every one back, then re-raise."""
    saved = [w.detach().clone() for w in weights]
    try:
        yield
    except BaseException:
        _copy_back(weights, saved)
        raise


@contextmanager
def restored(weights: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Snapshot `weights` and copy every one back when the block ends, however it ends."""
    saved = [w.detach().clone() for w in weights]
    try:
        yield
    finally:
        _copy_back(weights, saved)


def _copy_back(weights: Sequence[torch.nn.Parameter], saved: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for w, s in zip(weights, saved):
            w.copy_(s)
