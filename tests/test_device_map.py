"""Models loaded with a `device_map` (accelerate's dispatch hooks on every block): the edit must
equal the plain model's. On the CPU every block sits on the same device, with the hooks in
place; `test_gpu.py` splits a model between cuda:0 and the CPU."""

import copy

import pytest
import torch

from alphaedit_fast import apply_AlphaEdit_to_model
from alphaedit_fast.arch import detect

from .conftest import CONTEXT_TEMPLATES, REQUESTS, assert_close_rel, edit_rtol, identity_projector, test_hparams
from .test_engine import rewrite_weights

accelerate = pytest.importorskip("accelerate", reason="device_map loading needs accelerate (a test dependency)")


def block_device_map(model, devices) -> dict[str, str]:
    """{module: device} with the blocks spread over `devices` in order, the rest on devices[0]
    (the LM head on the last device, as accelerate's "auto" maps put it)."""
    spec = detect(model)
    n = spec.num_layers
    container = spec.layer_module_tmp.format("")[:-1]
    mapping = {spec.layer_module_tmp.format(i): devices[i * len(devices) // n] for i in range(n)}
    for name, _ in model.named_children():
        for child, _ in getattr(model, name).named_children():
            full = f"{name}.{child}"
            if full != container:
                mapping[full] = devices[0]
    mapping[spec.lm_head_module] = devices[-1]
    return mapping


def load_with_device_map(model, tmp_path, devices):
    """`model` saved and loaded back with `from_pretrained(..., device_map=...)`, then dispatched
    with hooks forced on (accelerate adds none when every module sits on one device)."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    device_map = block_device_map(model, devices)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map).eval()
    return accelerate.dispatch_model(loaded, device_map=device_map, force_hooks=True)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_edit_with_device_map_hooks_matches_plain_model(family, tmp_path):
    from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model)
    dispatched = load_with_device_map(copy.deepcopy(model), tmp_path, ["cpu"])
    hooked = [name for name, m in dispatched.named_modules() if hasattr(m, "_hf_hook")]
    assert hparams.layer_module_tmp.format(hparams.layers[-1]) in hooked
    before = [w.clone() for w in rewrite_weights(model, hparams)]
    apply_AlphaEdit_to_model(model, tok, REQUESTS, hparams, P=identity_projector(hparams),
                             context_templates=CONTEXT_TEMPLATES)
    apply_AlphaEdit_to_model(dispatched, tok, REQUESTS, hparams, P=identity_projector(hparams),
                             context_templates=CONTEXT_TEMPLATES)
    # the same operations on the same data; memory layout may still pick other kernels: edit_rtol
    rtol = edit_rtol(model, tok, REQUESTS, hparams)
    for w0, plain, hooked_w in zip(before, rewrite_weights(model, hparams), rewrite_weights(dispatched, hparams)):
        assert hooked_w.device.type == "cpu" and not torch.equal(hooked_w, w0)
        assert_close_rel(hooked_w - w0, plain - w0, rtol, what="update")
