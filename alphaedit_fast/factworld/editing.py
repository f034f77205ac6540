"""How the fact-world model is edited: hyper-parameters, context templates and the null-space
projector from its own training corpus (shared by the demo, `alphaedit-fast eval` and tests)."""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from pathlib import Path

import torch

from ..hparams import MODEL_FIELDS, AlphaEditHyperParams
from ..projector import nullspace_basis
from ..stats import collect_statistics
from .world import World, training_texts

CONTEXT_TEMPLATES = [["{}"], ["The. {}", "Therefore. {}", "Yes. {}", "So. {}"]]
NULLSPACE_RELATIVE = 1e-2


def edit_hparams(model, **overrides) -> AlphaEditHyperParams:
    """The `factworld` preset (tuned on the shipped model; its "source" says how) for `model`: the module
    templates and v_loss_layer are `model`'s, so fact-world models built with other --layers work too."""
    preset = dataclasses.asdict(AlphaEditHyperParams.load("factworld"))
    tuned = {k: v for k, v in preset.items() if k not in (*MODEL_FIELDS, "extra")}
    return AlphaEditHyperParams.for_model(model, **{**tuned, "extra": {"preset": "factworld"}, **overrides})


def corpus_projector(model, tok, world: World, hparams: AlphaEditHyperParams, relative: float = NULLSPACE_RELATIVE,
                     n_texts: int = 3000, seed: int = 0, progress: bool = False) -> list[torch.Tensor]:
    """Null-space bases U0 (d_k, r), one per edited layer, from the key statistics of the first
    `n_texts` lines of the world's training corpus (`progress`: a tokens/s bar)."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(training_texts(world, seed)[:n_texts]))
        stats = collect_statistics(model, tok, corpus, hparams.layers, hparams.rewrite_module_tmp,
                                   progress=progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small MLP's statistics: a large null space is expected
        return [nullspace_basis(stats.covariance(layer), relative=relative) for layer in hparams.layers]
