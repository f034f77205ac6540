"""One batch of edits on shape (a) (GPT-2, 6 layers, width 128, MLP 512): reference vs fast."""

import copy

import pytest
import torch

from alphaedit_fast import AlphaEditor
from alphaedit_fast.bench import CONTEXT_TEMPLATES, bench_model, random_bases, synthetic_requests
from alphaedit_fast.reference import apply_alphaedit_ref

N_EDITS = 8


@pytest.fixture(scope="module")
def setup():
    model, tok, hparams = bench_model("a-gpt2-6x128")
    return model, tok, hparams, random_bases(len(hparams.layers), 512, "cpu"), synthetic_requests(N_EDITS)


def test_reference(benchmark, setup):
    model, tok, hparams, bases, requests = setup
    P = torch.stack([u @ u.T for u in bases])
    cache = torch.zeros(len(hparams.layers), 512, 512)
    benchmark.pedantic(lambda m: apply_alphaedit_ref(m, tok, requests, hparams, CONTEXT_TEMPLATES, P, cache),
                       setup=lambda: ((copy.deepcopy(model),), {}), rounds=3)


def test_fast(benchmark, setup):
    model, tok, hparams, bases, requests = setup
    benchmark.pedantic(lambda m: AlphaEditor(m, tok, hparams, projector=bases,
                                             context_templates=CONTEXT_TEMPLATES).edit(requests),
                       setup=lambda: ((copy.deepcopy(model),), {}), rounds=3)
