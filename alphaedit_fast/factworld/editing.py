"""How the fact-world model is edited: hyper-parameters, context templates and the null-space
projector from its own training corpus (shared by the demo, `alphaedit-fast eval` and tests)."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from ..hparams import AlphaEditHyperParams
from ..projector import nullspace_basis
from ..stats import collect_statistics
from .world import World, training_texts

# the facts sit at the subject's last token in layers 0-2 (causal_trace.py); layer 0 edits best; at 100
# sequential edits a clamp of 0.6 gave efficacy 0.90 / retention 0.73, 1.0 gave 0.96 / 0.45
EDIT_HPARAMS = {"layers": [0], "v_lr": 0.5, "L2": 1.0, "clamp_norm_factor": 0.6, "v_num_grad_steps": 25}
CONTEXT_TEMPLATES = [["{}"], ["The. {}", "Therefore. {}", "Yes. {}", "So. {}"]]
NULLSPACE_RELATIVE = 1e-2


def edit_hparams(model, **overrides) -> AlphaEditHyperParams:
    return AlphaEditHyperParams.for_model(model, **{**EDIT_HPARAMS, **overrides})


def corpus_projector(model, tok, world: World, hparams: AlphaEditHyperParams, relative: float = NULLSPACE_RELATIVE,
                     n_texts: int = 3000, seed: int = 0) -> list[torch.Tensor]:
    """Null-space bases U0 (d_k, r), one per edited layer, from the key statistics of the first
    `n_texts` lines of the world's training corpus."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(training_texts(world, seed)[:n_texts]))
        stats = collect_statistics(model, tok, corpus, hparams.layers, hparams.rewrite_module_tmp, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small MLP's statistics: a large null space is expected
        return [nullspace_basis(stats.covariance(layer), relative=relative) for layer in hparams.layers]
