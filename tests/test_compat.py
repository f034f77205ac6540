import pytest
import torch

import alphaedit_fast
from alphaedit_fast import ShapeError, compat


def test_original_names_are_exported():
    for name in compat.__all__:
        assert callable(getattr(compat, name)), name
    assert compat.apply_AlphaEdit_to_model is alphaedit_fast.apply_AlphaEdit_to_model


def test_upd_matrix_match_shape():
    upd = torch.arange(6.0).view(2, 3)
    assert compat.upd_matrix_match_shape(upd, torch.Size([2, 3])) is upd
    assert torch.equal(compat.upd_matrix_match_shape(upd, torch.Size([3, 2])), upd.T)
    with pytest.raises(ShapeError):
        compat.upd_matrix_match_shape(upd, torch.Size([4, 2]))


def test_original_style_hparams_object_is_accepted():
    """Scripts pass the original's AlphaEditHyperParams (a plain dataclass): any object with its fields."""
    from types import SimpleNamespace

    from alphaedit_fast.tiny import tiny_model
    from alphaedit_fast.validation import as_hparams

    ours = alphaedit_fast.AlphaEditHyperParams.for_model(tiny_model("gpt2"), layers=[1, 2])
    theirs = SimpleNamespace(**{k: v for k, v in ours.to_dict().items()})
    assert as_hparams(theirs) == ours
