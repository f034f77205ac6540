"""Target values z (DESIGN step 3)."""

from __future__ import annotations

import torch

from .hparams import AlphaEditHyperParams
from .reference import compute_z_ref


def compute_z(model, tok, request, hparams: AlphaEditHyperParams, layer: int, context_templates) -> torch.Tensor:
    """z = h0 + delta at the output of block `layer` for one request: (d_model,).

    Same signature and result as the original `compute_z`. (The batched version that
    optimises many requests at once is `compute_zs`, added with the fast paths.)
    """
    return compute_z_ref(model, tok, request, hparams, layer, context_templates)
