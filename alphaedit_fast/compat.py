"""The original AlphaEdit names, so existing scripts switch with one import.

    from alphaedit_fast.compat import apply_AlphaEdit_to_model, AlphaEditHyperParams

`AlphaEditHyperParams.from_json` reads the original hparams files unchanged.
"""

from __future__ import annotations

import torch

from .editor import apply_AlphaEdit_to_model
from .errors import ShapeError
from .hparams import AlphaEditHyperParams
from .keys import compute_ks, get_module_input_output_at_words
from .positions import find_fact_lookup_idx, get_words_idxs_in_templates
from .projector import nullspace_projector
from .templates import get_context_templates
from .values import compute_z


def upd_matrix_match_shape(matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`matrix` or its transpose, whichever has `shape` (the original's helper)."""
    if matrix.shape == shape:
        return matrix
    if matrix.T.shape == shape:
        return matrix.T
    raise ShapeError(f"update of shape {tuple(matrix.shape)} does not match weight shape {tuple(shape)}")


__all__ = [
    "AlphaEditHyperParams",
    "apply_AlphaEdit_to_model",
    "compute_ks",
    "compute_z",
    "find_fact_lookup_idx",
    "get_context_templates",
    "get_module_input_output_at_words",
    "get_words_idxs_in_templates",
    "nullspace_projector",
    "upd_matrix_match_shape",
]
