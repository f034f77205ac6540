"""CUDA checks (skipped without a GPU): the fast path on the GPU against the CPU reference."""

import copy

import pytest
import torch

from alphaedit_fast import AlphaEditor
from alphaedit_fast.reference import apply_alphaedit_ref
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

from .conftest import CONTEXT_TEMPLATES, REQUESTS, test_hparams
from .test_editor import key_covariance_bases, relative
from .test_engine import rewrite_weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
def test_cuda_editor_matches_cpu_reference(family, dtype, tolerance):
    model, tok = tiny_model(family, dtype=dtype), tiny_tokenizer_for(family)
    hparams = test_hparams(model, L2=10.0)
    bases = key_covariance_bases(hparams)
    P = torch.stack([u @ u.T for u in bases])
    ref_model = copy.deepcopy(model)
    updates, _ = apply_alphaedit_ref(ref_model, tok, REQUESTS, hparams, CONTEXT_TEMPLATES, P,
                                     torch.zeros(2, 160, 160))
    gpu_model = model.cuda()
    before = [w.float().cpu() for w in rewrite_weights(gpu_model, hparams)]
    AlphaEditor(gpu_model, tok, hparams, projector=bases, context_templates=CONTEXT_TEMPLATES).edit(REQUESTS)
    for b, w, layer in zip(before, rewrite_weights(gpu_model, hparams), hparams.layers):
        assert relative(w.float().cpu() - b, updates[layer].float()) < tolerance


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_model_split_between_cuda_and_cpu(family, tmp_path):
    """Blocks on cuda:0 then on the CPU (accelerate's hooks move activations between them): each
    layer's keys, solve and update stay on its own device, and the edit matches the CPU model's."""
    pytest.importorskip("accelerate")
    from alphaedit_fast import apply_AlphaEdit_to_model

    from .conftest import edit_rtol, identity_projector
    from .test_device_map import load_with_device_map

    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model, layers=[1, 2])  # block 1 on cuda:0, block 2 on the CPU
    split = load_with_device_map(copy.deepcopy(model), tmp_path, ["cuda:0", "cpu"])
    before = [w.detach().float().cpu().clone() for w in rewrite_weights(model, hparams)]
    apply_AlphaEdit_to_model(model, tok, REQUESTS, hparams, P=identity_projector(hparams),
                             context_templates=CONTEXT_TEMPLATES)
    apply_AlphaEdit_to_model(split, tok, REQUESTS, hparams, P=identity_projector(hparams),
                             context_templates=CONTEXT_TEMPLATES)
    devices = [w.device.type for w in rewrite_weights(split, hparams)]
    assert devices == ["cuda", "cpu"]
    rtol = 10 * edit_rtol(model, tok, REQUESTS, hparams)  # TF32 / other kernels on the GPU
    for w0, plain, moved in zip(before, rewrite_weights(model, hparams), rewrite_weights(split, hparams)):
        assert relative(moved.float().cpu() - w0, plain.float() - w0) < rtol
