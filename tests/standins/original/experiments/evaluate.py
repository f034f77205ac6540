"""Stand-in of the original's experiments/evaluate.py: imports the entry points by name at
import time, builds P with get_project (get_cov per layer) and edits sequentially."""

import torch
from AlphaEdit.AlphaEdit_main import apply_AlphaEdit_to_model, get_cov
from util import nethook


def get_project(model, tok, layer, hparams):
    cov = get_cov(model, tok, hparams.rewrite_module_tmp.format(layer), hparams.mom2_dataset,
                  hparams.mom2_n_samples, hparams.mom2_dtype).cpu()
    U, S, _ = torch.linalg.svd(cov, full_matrices=False)
    small = (S < hparams.nullspace_threshold).nonzero(as_tuple=True)[0]
    return U[:, small] @ U[:, small].T


def main(model, tok, hparams, batches):
    weight = nethook.get_parameter(model, f"{hparams.rewrite_module_tmp.format(hparams.layers[-1])}.weight")
    d_k = weight.shape[0]  # GPT-2's Conv1D stores (d_k, d_model)
    cache_c = torch.zeros(len(hparams.layers), d_k, d_k)
    P = torch.zeros(len(hparams.layers), d_k, d_k)
    for i, layer in enumerate(hparams.layers):
        P[i] = get_project(model, tok, layer, hparams)
    for batch in batches:
        model, cache_c = apply_AlphaEdit_to_model(model, tok, batch, hparams, cache_c=cache_c, P=P)
    return cache_c, P
