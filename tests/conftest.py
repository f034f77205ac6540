import copy
import math
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


# ---------------------------------------------------------------------------------------------
# Tolerances. Every fast-vs-reference and op test derives its tolerance here, from the dtype the
# quantity is accumulated in and the number of terms accumulated, never from what happened to pass
# on one machine: kernels sum in a different order on every CPU (AVX2 vs AVX-512 lanes), thread
# count (OpenMP splits) and BLAS (blocking), so only a bound that holds for every order is safe.

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11,
                 torch.bfloat16: 2.0**-8}
ROUNDING_SPREAD = 4.0  # lambda below


def tolerance(dtype: torch.dtype, accumulation_length: int = 1, scale: float = 1.0) -> tuple[float, float]:
    """(rtol, atol) for two computations of one quantity that each sum `accumulation_length`
    terms in `dtype` (the dtype of the accumulator: fp32 for bf16 inputs summed in fp32).

    A sum of n terms computed with unit roundoff u is off by at most n*u*sum|terms| (to first
    order; Higham, Accuracy and Stability of Numerical Algorithms, 3.1), in any order. That worst
    case needs every rounding to go the same way; modelling roundings as independent and
    zero-mean, the error stays below lambda*sqrt(n)*u*sum|terms| except with probability about
    2*exp(-lambda^2/2) (Higham & Mary, SIAM J. Sci. Comput. 41, 2019), and the blocked and
    pairwise sums of BLAS and vectorised reductions only shrink the constant. Two implementations
    err independently, so they may differ by up to twice that: rtol = min(lambda*sqrt(n), 2n)*u
    with lambda = 4 (the worst case 2n*u is smaller for n < 4).

    The bound is relative to sum|terms|, not to the result: where terms cancel (x^T x off its
    diagonal, a mean of signed values) pass `scale` ~ sum|terms|, and atol = rtol * scale.
    """
    u = UNIT_ROUNDOFF[dtype]
    n = max(1, int(accumulation_length))
    rtol = min(ROUNDING_SPREAD * math.sqrt(n), 2.0 * n) * u
    return rtol, rtol * scale


def relative_error(actual: torch.Tensor, expected: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """||actual - expected|| / ||expected|| (per slice along `dim` when given), in fp64."""
    actual, expected = actual.double(), expected.double()
    if dim is None:
        return (actual - expected).norm() / expected.norm()
    return (actual - expected).norm(dim=dim) / expected.norm(dim=dim)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, dim: int | None = None,
                     what: str = "") -> None:
    """Norm-wise relative error (the largest over slices along `dim`) below `rtol`."""
    err = relative_error(actual, expected, dim)
    assert err.max().item() <= rtol, f"{what} relative error {err.max().item():.3g} > {rtol:.3g} ({err})"


def gather_tolerance(hidden, positions, segment_ids, weights, n_segments) -> tuple[float, float]:
    """(rtol, atol) for gather_segment_mean: each output sums (rows of its segment) x P products
    w * h / P in fp32 (fp64 for fp64 input); atol is relative to the sum of their magnitudes."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    per_row = positions.shape[1] if positions.ndim == 2 else 1
    rows = int(torch.bincount(segment_ids.cpu(), minlength=max(n_segments, 1)).max()) if len(segment_ids) else 0
    if hidden.numel() == 0 or weights.numel() == 0:
        return tolerance(acc)
    magnitude = (hidden.detach().abs().amax().double() * weights.detach().abs().amax().double()).item() * max(rows, 1)
    return tolerance(acc, rows * per_row + 2, scale=magnitude)  # + the division by P and the weight


def forward_accumulation_length(model, blocks: int | None = None, seq: int = 32) -> int:
    """Accumulation length of a forward pass through the first `blocks` blocks (all by default)
    and the LM head, for `tolerance`.

    Each block sums over d (q, k, v, o and the MLP input projections: 5d), the head dimension
    (scores), the sequence (attention times V) and the MLP width (down projection). The
    relative errors of successive sums add up in quadrature like the terms of one longer sum,
    so the lengths add; the blocks of these random tiny models have a gain of order one.
    """
    from alphaedit_fast.arch import text_config

    cfg = text_config(model)

    def field(*names):  # the first of `names` the config has (per-layer configs refuse a global read)
        for name in names:
            try:
                value = getattr(cfg, name, None)
            except Exception:  # noqa: BLE001
                value = None
            if value:
                return value
        return None

    d = field("hidden_size", "n_embd")
    heads = field("num_attention_heads", "n_head")
    d_ff = field("intermediate_size", "n_inner") or 4 * d
    head_dim = field("head_dim") or d // heads
    n_blocks = field("num_hidden_layers", "n_layer")
    per_block = 5 * d + head_dim + seq + d_ff
    return per_block * (n_blocks if blocks is None else blocks) + d


def z_rtol(model, hparams, z_norm: float, dtype: torch.dtype = torch.float32) -> float:
    """Bound on ||z_fast - z_ref|| / ||z_ref|| after the value optimisation (DESIGN step 3).

    Each step's gradient comes from a forward and a backward pass through the blocks after the
    z layer, so the two paths' gradients differ by eps_g = tolerance(dtype, 2 * forward length)
    relative. Adam's step lr * m/sqrt(v) is scale-free: a relative gradient error eps moves each
    component by at most about lr*eps, so the step by lr*sqrt(d)*eps, and over K steps
    z moves by K*lr*sqrt(d)*eps_g. Relative to ||z||: K*lr*sqrt(d)*eps_g/||z||, plus eps_g for h0.

    This holds only while no gradient component is at rounding level (else Adam's sign-like
    steps turn noise into full steps, and no tolerance helps): tests check that premise with
    `check_trajectory` in test_values rather than widening this bound. Measured fast-vs-reference
    errors on the tiny models are 20-300x below it (1.5e-7 to 1.8e-6 on gpt2, llama, qwen2).
    """
    eps_g = tolerance(dtype, 2 * forward_accumulation_length(model))[0]
    d = model.get_input_embeddings().weight.shape[1]
    return eps_g * (1.0 + hparams.v_num_grad_steps * hparams.v_lr * math.sqrt(d) / z_norm)


def edit_rtol(model, tok, requests, hparams) -> float:
    """Bound on the relative difference of two implementations' weight updates (DESIGN step 4).

    z is within z_rtol of the reference, and ||z|| >= (1 - clamp_norm_factor) * ||h0|| since
    ||delta|| <= clamp_norm_factor * ||h0||. The update solves for the residual z - z_cur, whose
    relative error is that of z times ||z|| / ||z - z_cur|| (below 2 on these models: delta ends
    near its clamp), and the solve with L2 = 10 has a condition number below 10 on keys of norm
    ~1-10: 20 * z_rtol. (Measured differences are 100-1000x smaller; the bound is what holds on
    any CPU, not what happens here.)
    """
    from alphaedit_fast.reference import module_reprs_at_words_ref

    prompts, subjects = [r["prompt"] for r in requests], [r["subject"] for r in requests]
    h0 = module_reprs_at_words_ref(model, tok, prompts, subjects, hparams.layer_module_tmp.format(hparams.layers[-1]),
                                   hparams.fact_token, "out")
    z_norm = max(1.0 - hparams.clamp_norm_factor, 0.1) * h0.float().norm(dim=1).min().item()
    return 20.0 * z_rtol(model, hparams, z_norm)

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
