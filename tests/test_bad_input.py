"""Bad input: an AlphaEditError naming what is wrong, and every weight bit-identical."""

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from alphaedit_fast import (
    AlphaEditError,
    AlphaEditHyperParams,
    AlphaEditor,
    HyperParamsError,
    InvalidArgumentError,
    InvalidRequestError,
    ModelStructureError,
    ShapeError,
    apply_AlphaEdit_to_model,
    compute_ks,
    compute_zs,
    get_module_input_output_at_words,
)
from alphaedit_fast.tiny import tiny_model, tiny_tokenizer_for

from .conftest import CONTEXT_TEMPLATES, REQUESTS, assert_close_rel, identity_projector, test_hparams, z_rtol
from .test_engine import random_projector, rewrite_weights


def with_request(**change):
    return [{**REQUESTS[0], **change}, *copy.deepcopy(REQUESTS[1:])]


def hparams_with(hparams, **change):
    return AlphaEditHyperParams.from_dict({**hparams.to_dict(), **change})


def mutated(hparams, **change):
    """The same object with fields set after construction (skipping its validation)."""
    hparams = copy.deepcopy(hparams)
    for name, value in change.items():
        setattr(hparams, name, value)
    return hparams


REWRITE_INPUT = {"gpt2": "transformer.h.{}.mlp.c_fc", "llama": "model.layers.{}.mlp.up_proj"}
SPECIAL = {"gpt2": ["<|endoftext|>", " <|endoftext|> "], "llama": ["<s>", "</s>", "<s></s>", " </s>"]}

CASES = [  # (family or None for both, arguments, error, text the message must hold)
    (None, lambda h: dict(requests=with_request(prompt="{} plays {0}")), InvalidRequestError, "brace"),
    (None, lambda h: dict(requests=with_request(prompt="{x} and {}")), InvalidRequestError, "brace"),
    (None, lambda h: dict(requests=with_request(prompt="{} plays the {")), InvalidRequestError, "brace"),
    (None, lambda h: dict(requests=with_request(prompt="{} plays }")), InvalidRequestError, "brace"),
    (None, lambda h: dict(requests=with_request(prompt="{{}}")), InvalidRequestError, "brace"),
    (None, lambda h: dict(requests=with_request(prompt="{}")), InvalidRequestError, "nothing but the subject"),
    (None, lambda h: dict(requests=with_request(prompt=" {} ")), InvalidRequestError, "nothing but the subject"),
    (None, lambda h: dict(context_templates=[["{}"], ["The {0}. {}"]]), InvalidRequestError, "brace"),
    (None, lambda h: dict(context_templates=[["{}"], ["The }. {}"]]), InvalidRequestError, "brace"),
    (None, lambda h: dict(context_templates="{}"), InvalidRequestError, "context_templates"),
    (None, lambda h: dict(requests=with_request(prompt="{} is" + " very" * 200)), InvalidRequestError, "positions"),
    (None, lambda h: dict(requests=with_request(subject="Paris " * 150)), InvalidRequestError, "positions"),
    (None, lambda h: dict(requests=with_request(target_new={"str": "London" + " and London" * 80})),
     InvalidRequestError, "positions"),
    (None, lambda h: dict(context_templates=[["{}"], ["Long " * 200 + "{}"]]), InvalidRequestError, "positions"),
    (None, lambda h: dict(requests=5), InvalidRequestError, "list of request dicts"),
    (None, lambda h: dict(requests="The mother tongue of {} is"), InvalidRequestError, "list of request dicts"),
    (None, lambda h: dict(requests=REQUESTS[0]), InvalidRequestError, "wrap a single request"),
    (None, lambda h: dict(requests=[REQUESTS[0], 3]), InvalidRequestError, "request 1 must be a dict"),
    (None, lambda h: dict(requests=with_request(subject="\u200b")), InvalidRequestError, "subject"),
    (None, lambda h: dict(requests=with_request(subject=" \u200b\ufeff ")), InvalidRequestError, "subject"),
    (None, lambda h: dict(requests=with_request(target_new={"str": "\u200b"})), InvalidRequestError, "target_new"),
    (None, lambda h: dict(requests=with_request(target_new={"str": "{0}"})), InvalidRequestError, "braces"),
    (None, lambda h: dict(requests=[*REQUESTS, {**REQUESTS[0], "target_new": {"str": "French"}}]),
     InvalidRequestError, "contradict"),
    (None, lambda h: dict(hparams=None), HyperParamsError, "hparams must be"),
    (None, lambda h: dict(hparams=[h]), HyperParamsError, "got list"),
    (None, lambda h: dict(hparams=mutated(h, L2=-1.0)), HyperParamsError, "L2"),
    (None, lambda h: dict(hparams=mutated(h, layers=[2, 1])), HyperParamsError, "layers"),
    (None, lambda h: dict(hparams=mutated(h, v_loss_layer=7)), ModelStructureError, r"\.7'"),
    ("gpt2", lambda h: dict(hparams=hparams_with(h, rewrite_module_tmp=REWRITE_INPUT["gpt2"])),
     ModelStructureError, "hidden width"),
    ("llama", lambda h: dict(hparams=hparams_with(h, rewrite_module_tmp=REWRITE_INPUT["llama"])),
     ModelStructureError, "hidden width"),
    ("llama", lambda h: dict(hparams=hparams_with(h, rewrite_module_tmp="model.layers.{}.input_layernorm")),
     ModelStructureError, "2-D weight"),
    (None, lambda h: dict(solver="cholesky"), InvalidArgumentError, "solver"),
    (None, lambda h: dict(z_batch_size=0), InvalidArgumentError, "z_batch_size"),
    (None, lambda h: dict(z_batch_size=2.5), InvalidArgumentError, "z_batch_size"),
    (None, lambda h: dict(learning_rate=1.0), InvalidArgumentError, "unknown option"),
    (None, lambda h: dict(P=2 * identity_projector(h)), ShapeError, "not a symmetric idempotent"),
    (None, lambda h: dict(P=torch.randn(2, 160, 160, generator=torch.Generator().manual_seed(0))), ShapeError,
     "not a symmetric idempotent"),
    (None, lambda h: dict(P="proj.pt"), ShapeError, "P must be a tensor"),
    (None, lambda h: dict(P=[[[1.0, 0.0], [0.0]]] * 2), ShapeError, "regular shape"),
    (None, lambda h: dict(cache_c="cache"), ShapeError, "cache_c must be a tensor"),
    (None, lambda h: dict(cache_c=[[0.0] * 160] * 3), ShapeError, "cache_c must have shape"),
    (None, lambda h: dict(cache_template="{}/{}/no_case_id.npz",
                          requests=[{k: v for k, v in r.items() if k != "case_id"} for r in REQUESTS]),
     InvalidRequestError, "case_id"),
]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_bad_input_raises_an_alphaedit_error_and_changes_nothing(family, case):
    only, make_args, error, message = CASES[case]
    if only not in (None, family):
        pytest.skip(f"{family} has no such module")
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model, v_num_grad_steps=2)
    args = dict(requests=copy.deepcopy(REQUESTS), hparams=hparams, P=identity_projector(hparams),
                context_templates=CONTEXT_TEMPLATES)
    args.update(make_args(hparams))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        apply_AlphaEdit_to_model(model, tok, **args)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_special_token_subjects_and_targets_are_refused(family):
    model, tok = tiny_model(family), tiny_tokenizer_for(family)
    hparams = test_hparams(model, v_num_grad_steps=2)
    for text in SPECIAL[family]:
        for change in (dict(subject=text), dict(target_new={"str": text})):
            with pytest.raises(InvalidRequestError, match="no content once tokenised"):
                apply_AlphaEdit_to_model(model, tok, with_request(**change), hparams,
                                         P=identity_projector(hparams), context_templates=CONTEXT_TEMPLATES)


def test_compute_zs_and_compute_ks_check_their_input_too():
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    hparams = test_hparams(model, v_num_grad_steps=2)
    with pytest.raises(InvalidRequestError, match="positions"):
        compute_ks(model, tok, with_request(subject="Paris " * 150), hparams, 1, CONTEXT_TEMPLATES)
    with pytest.raises(InvalidRequestError, match="positions"):
        get_module_input_output_at_words(model, tok, 1, ["{} is"], ["Paris " * 150], hparams.rewrite_module_tmp,
                                         "subject_last")
    with pytest.raises(InvalidRequestError, match="brace"):
        compute_ks(model, tok, REQUESTS, hparams, 1, [["{} {x}"]])
    with pytest.raises(InvalidRequestError, match="positions"):
        compute_zs(model, tok, with_request(subject="Paris " * 150), hparams, 2, CONTEXT_TEMPLATES)
    with pytest.raises(InvalidRequestError, match="brace"):
        compute_zs(model, tok, REQUESTS, hparams, 2, [["{} {0}"]])
    with pytest.raises(InvalidArgumentError, match="z_batch_size"):
        compute_zs(model, tok, REQUESTS, hparams, 2, CONTEXT_TEMPLATES, batch_size=-1)


def test_identical_duplicate_requests_are_allowed():
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    hparams = test_hparams(model, v_num_grad_steps=2)
    apply_AlphaEdit_to_model(model, tok, [REQUESTS[0], {**REQUESTS[0], "target_new": "English"}], hparams,
                             P=identity_projector(hparams), context_templates=CONTEXT_TEMPLATES)


# --- AlphaEditor takes every projector form apply_AlphaEdit_to_model takes -----------------------------------------

def test_editor_takes_every_projector_form():
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    hparams = test_hparams(model)
    P = random_projector(hparams)
    bases = AlphaEditor(model, tok, hparams, projector=P, context_templates=CONTEXT_TEMPLATES).solver.bases
    forms = {
        "numpy P": P.numpy(), "nested-list P": P.tolist(), "numpy bases": [u.numpy() for u in bases],
        "dict of bases": dict(zip(hparams.layers, bases)),
        "string keys": {str(layer): u for layer, u in zip(hparams.layers, bases)},
    }
    for name, projector in forms.items():
        got = AlphaEditor(model, tok, hparams, projector=projector, context_templates=CONTEXT_TEMPLATES).solver.bases
        for u, v in zip(got, bases):  # same subspace (bases from eigh are unique up to rotation)
            torch.testing.assert_close(u @ u.T, v @ v.T, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "make_projector, error, message",
    [
        (lambda h, u: {h.layers[0]: u}, ShapeError, r"no basis for layer\(s\) \[2\]"),
        (lambda h, u: {"first": u, "second": u}, ShapeError, "layer numbers"),
        (lambda h, u: [2 * u, u], ShapeError, "orthonormal"),
        (lambda h, u: [u, u[:100]], ShapeError, "bases of shape"),
        (lambda h, u: 2 * random_projector(h), ShapeError, "not a symmetric idempotent"),
        (lambda h, u: "proj.safetensors", ShapeError, r"'proj.safetensors' is a path.*load_projector.*from_pretrained"),
        (lambda h, u: Path("proj.safetensors"), ShapeError, "is a path.*load_projector"),
        (lambda h, u: [u.numpy(), "basis"], ShapeError, "tensor"),
    ],
)
def test_editor_refuses_bad_projectors(make_projector, error, message):
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    hparams = test_hparams(model)
    basis = torch.linalg.qr(torch.randn(160, 60, generator=torch.Generator().manual_seed(0)))[0]
    with pytest.raises(error, match=message):
        AlphaEditor(model, tok, hparams, projector=make_projector(hparams, basis), context_templates=CONTEXT_TEMPLATES)


@pytest.mark.parametrize("options, message", [
    (dict(solver="dense"), "solver"), (dict(z_batch_size=-3), "z_batch_size"),
    (dict(solve_dtype=torch.int32), "solve_dtype"), (dict(solve_dtype="half"), "solve_dtype"),
])
def test_editor_refuses_bad_options(options, message):
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    with pytest.raises(InvalidArgumentError, match=message):
        AlphaEditor(model, tok, test_hparams(model), projector=None, context_templates=CONTEXT_TEMPLATES, **options)


def test_editor_solve_dtype_by_name():
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        editor = AlphaEditor(model, tok, test_hparams(model), context_templates=CONTEXT_TEMPLATES,
                             solve_dtype="float64")
    assert editor.solver.bases[0].dtype == torch.float64


def test_editor_edit_refuses_bad_requests_and_keeps_its_state():
    model, tok = tiny_model("llama"), tiny_tokenizer_for("llama")
    hparams = test_hparams(model, v_num_grad_steps=2)
    editor = AlphaEditor(model, tok, hparams, projector=random_projector(hparams), context_templates=CONTEXT_TEMPLATES)
    before, cache = rewrite_weights(model, hparams), [c.clone() for c in editor.solver.cache_proj]
    for requests in (with_request(subject="</s>"), with_request(prompt="{} {1}"), REQUESTS[0]):
        with pytest.raises(InvalidRequestError):
            editor.edit(requests)
    editor.hparams.L2 = float("nan")
    with pytest.raises(HyperParamsError, match="L2"):
        editor.edit(REQUESTS)
    assert all(torch.equal(a, b) for a, b in zip(before, rewrite_weights(model, hparams)))
    assert all(torch.equal(a, b) for a, b in zip(cache, editor.solver.cache_proj)) and editor.num_edits == 0


# --- z-cache files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong key", "wrong width", "nan", "pickle"])
def test_a_broken_z_cache_file_is_recomputed_with_a_warning(tmp_path, damage):
    model, tok = tiny_model("gpt2"), tiny_tokenizer_for("gpt2")
    hparams = test_hparams(model, v_num_grad_steps=3)
    template = str(tmp_path / "layer_{}_clamp_{}_case_{}.npz")
    edit = dict(hparams=hparams, P=identity_projector(hparams), context_templates=CONTEXT_TEMPLATES,
                cache_template=template)
    apply_AlphaEdit_to_model(copy.deepcopy(model), tok, REQUESTS, **edit)
    path = tmp_path / f"layer_2_clamp_{hparams.clamp_norm_factor}_case_1.npz"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a zip file at all")
    elif damage == "wrong key":
        np.savez(path, something=np.zeros(64))
    elif damage == "wrong width":
        np.savez(path, v_star=np.zeros(63))
    elif damage == "nan":
        np.savez(path, v_star=np.full(64, np.nan))
    else:
        np.savez(path, v_star=np.array([{"a": 1}], dtype=object))
    with pytest.warns(UserWarning, match="recomputing"):
        apply_AlphaEdit_to_model(copy.deepcopy(model), tok, REQUESTS, **edit)
    expected = compute_zs(model, tok, REQUESTS[1:2], hparams, 2, CONTEXT_TEMPLATES)
    recomputed = torch.from_numpy(np.load(path)["v_star"])[None]
    assert_close_rel(recomputed, expected, z_rtol(model, hparams, expected.norm().item()), what="recomputed z")


# --- property: success with finite weights, or an AlphaEditError with weights unchanged ---------------------------

FRAGMENTS = ["{}", "{", "}", "{0}", "{x}", "{{}}", "<|endoftext|>", "<s>", "</s>", "\u200b", " ", "\n", "Paris",
             " the", "plays", "Toko Yasuda", " is", "é", "語", "🙂"]
noise = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=5).map("".join)


def mostly(valid, invalid, valid_share=6):
    """`valid` drawn about valid_share times as often as `invalid`: most examples must edit."""
    return st.sampled_from([True] * valid_share + [False]).flatmap(lambda ok: valid if ok else invalid)


words = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=6)
prompts = mostly(st.tuples(st.sampled_from([r["prompt"] for r in REQUESTS]), st.sampled_from(["", " now", "?"]))
                 .map("".join), st.one_of(noise, st.tuples(noise, noise).map(lambda p: p[0] + "{}" + p[1])))
subjects = mostly(st.one_of(st.sampled_from(["Paris", "Toko Yasuda", "Apple A5"]), words), st.one_of(noise, st.none()))
targets = mostly(st.one_of(st.sampled_from(["London", " piano", "Google Paris"]), words).map(
    lambda t: {"str": t}), st.one_of(noise, noise.map(lambda t: {"str": t}), st.none(), st.integers()))
requests_strategy = mostly(
    st.lists(st.fixed_dictionaries({"prompt": prompts, "subject": subjects, "target_new": targets},
                                   optional={"case_id": st.integers(0, 3)}), min_size=1, max_size=3),
    st.one_of(st.integers(), noise, st.just(REQUESTS[0]), st.just([])), valid_share=8)
templates_strategy = mostly(st.one_of(st.just(CONTEXT_TEMPLATES), st.just([["{}"]])),
                            st.one_of(st.just("{}"), st.lists(st.lists(prompts, max_size=2), max_size=2)))


def projector_strategy(d_k=160):
    """P in one of several forms, as a function of the number of edited layers."""
    def build(kind, seed, n_layers):
        gen = torch.Generator().manual_seed(seed)
        basis = torch.linalg.qr(torch.randn(d_k, 1 + seed % d_k, generator=gen))[0]
        P = (basis @ basis.T).repeat(n_layers, 1, 1)
        forms = {"none": lambda: None, "projector": lambda: P, "scaled": lambda: 1.5 * P,
                 "random": lambda: torch.randn(n_layers, d_k, d_k, generator=gen),
                 "nan": lambda: P.masked_fill(P.abs() > 0.1, float("nan")), "small": lambda: P[:, :10, :10],
                 "list": P.tolist, "string": lambda: "P"}
        return forms[kind]()

    kinds = ["projector"] * 12 + ["none", "list", "scaled", "random", "nan", "small", "string"]
    return st.builds(lambda kind, seed: lambda n_layers: build(kind, seed, n_layers), st.sampled_from(kinds),
                     st.integers(0, 1000))


CACHES = st.sampled_from([None] * 4 + ["zeros"] * 4 + ["nan", "ragged", "wrong layers"]).map(
    lambda kind: lambda n: {None: None, "zeros": torch.zeros(n, 160, 160), "ragged": [[1.0], [1.0, 2.0]],
                            "nan": torch.full((n, 160, 160), float("nan")),
                            "wrong layers": torch.zeros(n + 1, 160, 160)}[kind])

_BASE = {}


def _base(family):
    if family not in _BASE:
        _BASE[family] = (tiny_model(family), tiny_tokenizer_for(family))
    return _BASE[family]


@pytest.mark.parametrize("api", ["apply_AlphaEdit_to_model", "AlphaEditor"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(requests=requests_strategy, templates=templates_strategy, P=projector_strategy(), cache_c=CACHES,
       l2=st.sampled_from([10.0] * 8 + [0.0, -1.0, float("nan")]),
       layers=st.sampled_from([[1, 2]] * 4 + [[2]] * 4 + [[1, 9]]))
def test_property_success_with_finite_weights_or_alphaedit_error_with_weights_unchanged(
        api, family, requests, templates, P, cache_c, l2, layers):
    base_model, tok = _base(family)
    model = copy.deepcopy(base_model)
    hparams = test_hparams(model, v_num_grad_steps=2)
    hparams = mutated(hparams, L2=l2, layers=layers)
    P, cache_c = P(len(layers)), cache_c(len(layers))
    before = copy.deepcopy(model.state_dict())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if api == "AlphaEditor":
                editor = AlphaEditor(model, tok, hparams, projector=P, cache_c=cache_c, context_templates=templates)
                editor.edit(requests)
                new_cache = editor.dense_cache()
            else:
                _, new_cache = apply_AlphaEdit_to_model(model, tok, requests, hparams, P=P, cache_c=cache_c,
                                                        context_templates=templates)
    except AlphaEditError as err:
        event(type(err).__name__)
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), name
        return
    event("edited")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert bool(torch.isfinite(new_cache).all())
