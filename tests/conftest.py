import copy
import os
from pathlib import Path

import torch

# Without a GPU the Triton kernels run in Triton's interpreter; this must be set before
# anything imports them (triton.jit picks interpreted or compiled at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from alphaedit_fast import AlphaEditHyperParams
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

FAMILIES = ["gpt2", "gptj", "llama", "qwen2", "mistral", "gemma"]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

REQUESTS = [
    {"case_id": 0, "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
     "target_new": {"str": "English"}},
    {"case_id": 1, "prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": {"str": "piano"}},
    {"case_id": 2, "prompt": "{} works for", "subject": "Michel Denisot", "target_new": {"str": " Google"}},
]
CONTEXT_TEMPLATES = [["{}"], ["The a. {}", "I b. {}"]]


@pytest.fixture
def requests_():
    return copy.deepcopy(REQUESTS)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def model_and_tok(family):
    return tiny_model(family), tiny_tokenizer_for(family)


def test_hparams(model, **overrides):
    """Hyper-parameters that make edits visible on a tiny random model."""
    values = dict(layers=[1, 2], L2=0.1, v_lr=0.5, v_num_grad_steps=20)
    values.update(overrides)
    return AlphaEditHyperParams.for_model(model, **values)


test_hparams.__test__ = False  # a helper, not a test


def identity_projector(hparams, d_k=160):
    return torch.eye(d_k).repeat(len(hparams.layers), 1, 1)


@pytest.fixture
def gpt2_tokenizer():
    path = SHARED_DATA / "gpt2-tokenizer"
    if not path.exists():
        pytest.skip(f"real GPT-2 tokenizer not available at {path}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
