"""Packed linear layers in value steps (packing.py): real tokens only, the same z's.

On every family, on transformers 4.4x and 5.x: steps with packed linear layers give the z's of
unpacked steps (suffix-only and whole rows), and the linear layers do see fewer rows.
"""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import alphaedit_fast.values as values
from alphaedit_fast.packing import is_tokenwise_linear, packed_linears
from alphaedit_fast.requests import normalize_requests
from alphaedit_fast.tiny import FAMILY_CONFIGS, tiny_model, tiny_tokenizer_for

from .conftest import CONTEXT_TEMPLATES, assert_close_rel, test_hparams, tolerance, z_rtol
from .test_suffix import _skip_unless_available
from .test_values import MORE_REQUESTS


class _Block(torch.nn.Module):
    """Linear layers around a cross-token op (a cumulative sum over the sequence), as attention."""

    def __init__(self):
        super().__init__()
        self.linear, self.conv = torch.nn.Linear(6, 5), Conv1D(4, 5)

    def forward(self, x):  # x: (rows, seq, 6)
        return self.conv(self.linear(x).cumsum(1))


def test_packed_linears_compute_real_slots_only():
    torch.manual_seed(0)
    block, x = _Block(), torch.randn(3, 4, 6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    rows_seen = []
    with packed_linears([block], mask):  # a hook registered after the packing one sees its input
        handle = block.linear.register_forward_pre_hook(lambda m, args: rows_seen.append(args[0].shape[0]))
        packed = block(x)
        handle.remove()
    assert rows_seen == [int(mask.sum())]
    plain = block(x)
    real = mask.bool()
    # a real token reads only the real tokens before it (as a masked attention would)
    rtol, atol = tolerance(torch.float32, 6 + 4 * 5, scale=10.0)
    torch.testing.assert_close(packed[real], plain[real], rtol=rtol, atol=atol)
    assert not torch.equal(packed, plain)  # the padding slots held zeros inside the block
    assert not block.linear._forward_pre_hooks and not block.linear._forward_hooks  # hooks removed
    torch.testing.assert_close(block(x), plain, rtol=0, atol=0)


def test_packed_linears_leave_other_shapes_and_full_masks_alone():
    block = torch.nn.Linear(6, 5)
    with packed_linears([block], torch.ones(3, 4)):  # nothing padded: no hooks at all
        assert not block._forward_pre_hooks
    with packed_linears([block], torch.tensor([[1, 0], [1, 1]])):
        assert block(torch.ones(7, 6)).shape == (7, 5)  # not (rows, seq, d): runs unchanged
        assert block(torch.ones(2, 3, 6)).shape == (2, 3, 5)
        assert block(torch.ones(2, 2, 6)).shape == (2, 2, 5)  # packed, then scattered back


def test_tokenwise_modules():
    assert is_tokenwise_linear(torch.nn.Linear(2, 3)) and is_tokenwise_linear(Conv1D(3, 2))
    assert not is_tokenwise_linear(torch.nn.Conv1d(2, 3, 1)) and not is_tokenwise_linear(torch.nn.LayerNorm(2))


def _zs_and_linear_rows(model, tok, hparams, packed, suffix_only):
    """z's, and the rows the z layer's next block's first linear layer saw at the first step
    (the only forward with gradients on: the whole-row first pass runs without)."""
    hparams.extra["z_packed"] = packed
    block = values.blocks_after(model, hparams, hparams.layers[-1])[0]
    linear = next(m for m in block.modules() if is_tokenwise_linear(m))
    rows = []
    def spy(module, args, output):  # runs before the packing's own hook scatters the output back
        if torch.is_grad_enabled():
            rows.append(output.reshape(-1, output.shape[-1]).shape[0])

    handle = linear.register_forward_hook(spy)
    try:
        zs = values.compute_zs(model, tok, MORE_REQUESTS, hparams, hparams.layers[-1], CONTEXT_TEMPLATES,
                               suffix_only=suffix_only)
    finally:
        handle.remove()
    return zs, rows[0]


@pytest.mark.parametrize("suffix_only", [True, False])
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_packed_steps_match_unpacked(family, suffix_only, monkeypatch):
    _skip_unless_available(family)
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model)
    monkeypatch.setitem(values.FORWARD_COST_TOKENS, "cpu", 10**6)  # unpacked: one group, padded
    plain, plain_rows = _zs_and_linear_rows(model, tok, hparams, False, suffix_only)
    packed, packed_rows = _zs_and_linear_rows(model, tok, hparams, True, suffix_only)

    batch = values._prepare(tok, normalize_requests(MORE_REQUESTS), CONTEXT_TEMPLATES, hparams.fact_token, "cpu")
    lengths = batch.attention_mask.sum(1) - (batch.positions if suffix_only else 0)
    assert packed_rows == int(lengths.sum()) < plain_rows == len(lengths) * int(lengths.max())
    assert_close_rel(packed, plain, z_rtol(model, hparams, plain.norm(dim=1).min().item()), dim=1, what="z")
