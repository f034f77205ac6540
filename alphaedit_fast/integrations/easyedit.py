"""`patch_easyedit()`: EasyEdit's AlphaEdit (`easyeditor.models.alphaedit`) runs unchanged on alphaedit_fast.

What is replaced, in `easyeditor.models.alphaedit.AlphaEdit_main` and wherever those functions were
imported by name (the package `__init__`, `easyeditor.util.alg_dict.ALG_DICT["AlphaEdit"]`):

* `apply_AlphaEdit_to_model`: EasyEdit's contract (copy, return_orig_weights, keep_original_weight,
  reset_cache, the module globals `P`, `P_loaded`, `cache_c`, `cache_c_new`, P read from `hparams.P_loc`
  or computed and saved there), editing with `alphaedit_fast.editor.apply_AlphaEdit_to_model` on
  EasyEdit's own context templates (`AlphaEdit_main.get_context_templates`).
* `execute_AlphaEdit`: the deltas, model restored and the global `cache_c` grown in place, as EasyEdit's.
* `compute_z`, `compute_ks`: one request's z / the template-averaged keys, from our batched passes.
* `get_cov`, `get_project` and the alphaedit module's `layer_stats` name: the second moments of every
  edited layer in ONE pass over EasyEdit's own sample of its corpus (its `load_dataset`,
  `TokenizedDataset`, `tally(..., random_sample=1)` and `length_collation`), read from and written to
  EasyEdit's stats files (`{stats_dir}/{model}/{ds}_stats/{layer}_{precision}_mom2_{n}.npz`).
  ROME's and MEMIT's `layer_stats` stay EasyEdit's.

`Patch.undo()` restores all of it. BaseEditor instances made before the patch keep the function they
took from ALG_DICT: create editors after patching.
"""

from __future__ import annotations

import os
import sys
from copy import deepcopy
from pathlib import Path

import torch

from ..arch import get_module, key_width
from ..editor import apply_AlphaEdit_to_model as fast_apply
from ..keys import compute_keys
from ..requests import normalize_request, normalize_requests
from ..stats import second_moment_reader
from ..trace import read_modules
from ..validation import as_hparams, check_context_templates
from ..values import optimise_zs
from .patching import IntegrationError, Patch, active_patch, import_module, register

NAME = "easyedit"
PACKAGE = "easyeditor.models.alphaedit"
MAIN = PACKAGE + ".AlphaEdit_main"
LAYER_STATS = "easyeditor.models.rome.layer_stats"
RUNNING_STATS = "easyeditor.util.runningstats"
HINT = ("put the EasyEdit checkout (the directory that holds easyeditor/) on sys.path or PYTHONPATH, "
        "and install EasyEdit's requirements")
# what EasyEdit's layer_stats.get_ds loads for each mom2_dataset name
DATASETS = {"wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
            "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
            "wikipedia": ("wikimedia/wikipedia", "20231101.en")}
STATS_BATCH = 100  # documents per tally batch in EasyEdit's layer_stats


class _Items:
    """A dict seen through attributes, so `Patch.set` (setattr/getattr) can replace and restore an entry."""

    def __init__(self, mapping: dict):
        object.__setattr__(self, "_mapping", mapping)

    def __getattr__(self, key):
        try:
            return self._mapping[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self._mapping[key] = value


def patch_easyedit() -> Patch:
    """Make EasyEdit's AlphaEdit run on alphaedit_fast; returns the `Patch` (`undo()` restores EasyEdit).

    Imports EasyEdit's alphaedit package (the checkout must be importable); a second call returns the
    active patch."""
    active = active_patch(NAME)
    if active is not None:
        return active
    main = import_module(MAIN, "EasyEdit", HINT)
    missing = [n for n in ("apply_AlphaEdit_to_model", "get_context_templates") if not hasattr(main, n)]
    if missing:
        raise IntegrationError(f"{MAIN} has no {', '.join(missing)}: not an EasyEdit version this patch knows")
    patch = Patch(NAME)
    old_apply = main.apply_AlphaEdit_to_model
    replacements = {
        "apply_AlphaEdit_to_model": lambda *a, **k: apply_easyedit(main, *a, **k),
        "execute_AlphaEdit": lambda *a, **k: execute_easyedit(main, *a, **k),
        "compute_z": compute_z,
        "compute_ks": compute_ks,
        "get_cov": lambda *a, **k: get_cov(main, *a, **k),
        "get_project": lambda *a, **k: get_project(main, *a, **k),
    }
    for name, new in replacements.items():
        if hasattr(main, name):
            new.__name__ = new.__qualname__ = name
            new.__doc__ = f"alphaedit_fast's replacement of EasyEdit's {name} (patch_easyedit)"
            patch.replace_function(main, name, new)
    for name in ("compute_z", "compute_ks"):  # their own modules' definitions, if main did not import them
        module = import_module(f"{PACKAGE}.{name}", "EasyEdit", HINT)
        if getattr(module, name, None) is not None and getattr(module, name) is not replacements[name]:
            patch.replace_function(module, name, replacements[name])
    if hasattr(main, "layer_stats"):  # only the alphaedit module's name: ROME and MEMIT keep theirs
        def alphaedit_layer_stats(*args, **kwargs):
            return layer_stats(main, *args, **kwargs)

        alphaedit_layer_stats.__name__ = "layer_stats"
        patch.state["original_layer_stats"] = main.layer_stats
        patch.set(main, "layer_stats", alphaedit_layer_stats)
    new_apply = main.apply_AlphaEdit_to_model
    for module_name, module in list(sys.modules.items()):  # ALG_DICT["AlphaEdit"] and the like
        if not module_name.startswith("easyeditor") or module is None:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, dict):
                for key, item in list(value.items()):
                    if item is old_apply and isinstance(key, str):
                        patch.set(_Items(value), key, new_apply)
    return register(patch)


# -- requests and hyper-parameters ---------------------------------------------------------------

def original_requests(requests) -> list[dict]:
    """EasyEdit's requests (prompt holding the subject, target_new a string) in the original's layout,
    transformed as EasyEdit's execute_AlphaEdit does: every occurrence of the subject in the prompt
    becomes '{}', the target gets a leading space. Other keys (case_id, ...) are kept."""
    out = []
    for request in requests:
        request = dict(request)
        if isinstance(request.get("prompt"), str) and isinstance(request.get("subject"), str) and request["subject"]:
            request["prompt"] = request["prompt"].replace(request["subject"], "{}")
        out.append(request)
    return normalize_requests(out)


def _edited_modules(model, hparams):
    names = [hparams.rewrite_module_tmp.format(layer) for layer in hparams.layers]
    return {f"{name}.weight": get_module(model, name) for name in names}


# -- the edit ----------------------------------------------------------------------------------

def _ensure_P_and_cache(main, model, tok, hparams) -> None:
    """EasyEdit's handling of the globals P / P_loaded / cache_c / cache_c_new; P computed (one
    statistics pass for all layers) is saved to hparams.P_loc, so the next run loads it."""
    modules = list(_edited_modules(model, hparams).values())
    d_k, n_layers = key_width(modules[0]), len(hparams.layers)
    if not os.path.exists(hparams.P_loc):
        print(f"The null-space projection matrix P does not exist at {os.path.abspath(hparams.P_loc)}; computing it.")
        P = torch.zeros((n_layers, d_k, d_k), device="cpu")
        for i, layer in enumerate(hparams.layers):
            P[i, :, :] = main.get_project(model, tok, layer, hparams)
        Path(hparams.P_loc).parent.mkdir(parents=True, exist_ok=True)
        torch.save(P, hparams.P_loc)
        main.P, main.P_loaded = P, True
    elif not getattr(main, "P_loaded", False):
        main.P, main.P_loaded = torch.load(hparams.P_loc, map_location="cpu"), True
    if not getattr(main, "cache_c_new", False):
        main.cache_c = torch.zeros((n_layers, d_k, d_k), device="cpu")
        main.cache_c_new = True


def _edit_in_place(main, model, tok, requests, hparams, cache_template) -> None:
    """Edit `model` with our engine on the globals P and cache_c; cache_c grows in place."""
    fast_hparams = as_hparams(hparams)
    context_templates = check_context_templates(main.get_context_templates(model, tok))
    _, new_cache = fast_apply(model, tok, original_requests(requests), fast_hparams, cache_template=cache_template,
                              cache_c=main.cache_c, P=main.P, context_templates=context_templates)
    if isinstance(main.cache_c, torch.Tensor) and main.cache_c.shape == new_cache.shape:
        main.cache_c.copy_(new_cache.to(main.cache_c.device, main.cache_c.dtype))
    else:
        main.cache_c = new_cache


def apply_easyedit(main, model, tok, requests, hparams, copy=False, return_orig_weights=False,
                   cache_template=None, keep_original_weight=False, reset_cache=False, **kwargs):
    """EasyEdit's apply_AlphaEdit_to_model -> (model, weights_copy), on alphaedit_fast.
    `keep_original_weight` and extra keyword arguments (BaseEditor's train_ds) are accepted and
    unused, as in EasyEdit."""
    if reset_cache:
        main.cache_c_new = False
    weights_copy = {}
    if copy:
        model = deepcopy(model)
    _ensure_P_and_cache(main, model, tok, hparams)
    modules = _edited_modules(model, hparams)
    if return_orig_weights:
        weights_copy = {name: m.weight.detach().clone() for name, m in modules.items()}
    _edit_in_place(main, model, tok, requests, hparams, cache_template)
    print(f"New weights successfully inserted into {list(modules)}")
    return model, weights_copy


def execute_easyedit(main, model, tok, requests, hparams, cache_template=None):
    """EasyEdit's execute_AlphaEdit: {weight name: delta (cpu, shaped like the weight)}, the model
    unchanged at the end, the global cache_c grown in place (P and cache_c must be set, as there)."""
    modules = _edited_modules(model, hparams)
    before = {name: m.weight.detach().clone() for name, m in modules.items()}
    try:
        _edit_in_place(main, model, tok, requests, hparams, cache_template)
        deltas = {name: (m.weight.detach() - before[name]).float().cpu() for name, m in modules.items()}
    finally:
        with torch.no_grad():
            for name, m in modules.items():
                m.weight.copy_(before[name])
    return deltas


def compute_z(model, tok, request, hparams, layer, context_templates):
    """EasyEdit's compute_z: the target output z (d_model,) of block `layer` for one request (its
    prompt holding '{}', as execute_AlphaEdit passes it), on that block's device."""
    fast_hparams = as_hparams(hparams)
    request = normalize_request(dict(request))
    z = optimise_zs(model, tok, [request], fast_hparams, layer, check_context_templates(context_templates))[0]
    device = next(get_module(model, fast_hparams.layer_module_tmp.format(layer)).parameters()).device
    return z.to(device)


def compute_ks(model, tok, requests, hparams, layer, context_templates):
    """EasyEdit's compute_ks: (n, d_k) keys of `layer` averaged over each context group, then the groups."""
    fast_hparams = as_hparams(hparams)
    requests = normalize_requests([dict(r) for r in requests])
    (keys,), _ = compute_keys(model, tok, requests, fast_hparams, [layer], check_context_templates(context_templates))
    return keys


# -- statistics --------------------------------------------------------------------------------

def _max_positions(config) -> int:
    """The token length EasyEdit's layer_stats truncates documents to (its npos)."""
    for name in ("n_positions", "max_sequence_length", "max_position_embeddings", "seq_length"):
        if hasattr(config, name):
            npos = getattr(config, name)
            break
    else:
        raise IntegrationError("the model config has no n_positions / max_position_embeddings, which EasyEdit's "
                               "layer_stats needs")
    model_type = getattr(config, "model_type", "") or ""
    if "mistral" in model_type:
        npos = getattr(config, "sliding_window", None) or 4096
    if "qwen" in model_type:
        npos = min(npos, 4096)
    return npos


def stats_file(model, layer_name: str, stats_dir, ds_name: str, precision: str | None, sample_size,
               model_name: str | None = None) -> Path:
    """Where EasyEdit's layer_stats caches a layer's second moment (batch_tokens left at its default)."""
    model_name = model_name or model.config._name_or_path.rsplit("/")[-1]
    suffix = "" if sample_size is None else f"_{sample_size}"
    return Path(stats_dir) / model_name / f"{ds_name}_stats" / f"{layer_name}_{precision or 'float64'}_mom2{suffix}.npz"


def second_moments(model, tok, layer_names, stats_dir, ds_name, sample_size=None, precision=None,
                   force_recompute=False, model_name=None, progress=True) -> dict[str, tuple[torch.Tensor, int]]:
    """{layer name: (sum of k k^T on the CPU, token count)} as EasyEdit's layer_stats would give them for
    each layer, from its stats files where they exist, the rest in ONE pass over EasyEdit's sample of
    its dataset (same documents, truncation and batches), written where EasyEdit caches them (unless
    force_recompute, as there)."""
    ls = import_module(LAYER_STATS, "EasyEdit", HINT)
    rs = import_module(RUNNING_STATS, "EasyEdit", HINT)
    precision = precision or "float64"
    files = {n: stats_file(model, n, stats_dir, ds_name, precision, sample_size, model_name) for n in layer_names}
    out: dict[str, tuple[torch.Tensor, int]] = {}
    for name, path in files.items():
        state = None if force_recompute else rs.load_cached_state(str(path), {"sample_size": sample_size}, quiet=True)
        if state is not None:
            out[name] = (torch.as_tensor(state["mom2.mom2"]).clone(), int(state["mom2.count"]))
    todo = [n for n in layer_names if n not in out]
    if not todo:
        return out
    if ds_name not in DATASETS:
        raise IntegrationError(f"mom2_dataset {ds_name!r} is not one EasyEdit's layer_stats knows ({sorted(DATASETS)})")
    npos = _max_positions(model.config)
    raw = ls.load_dataset(*DATASETS[ds_name])
    dataset = ls.TokenizedDataset(raw["train"], tok, maxlen=npos)
    loader = ls.tally(ls.CombinedStat(mom2=ls.SecondMoment()), dataset, cache=None, sample_size=sample_size,
                      batch_size=STATS_BATCH, collate_fn=ls.length_collation(npos * 3), pin_memory=True,
                      random_sample=1, num_workers=2)
    dtype = getattr(torch, precision)
    modules = {n: get_module(model, n) for n in todo}
    sums = {n: torch.zeros(key_width(m), key_width(m), dtype=dtype, device=m.weight.device) for n, m in modules.items()}
    count = 0
    device = model.get_input_embeddings().weight.device
    total = -(-(sample_size or len(dataset)) // STATS_BATCH)
    iterator = ls.tqdm(loader, total=total) if progress and hasattr(ls, "tqdm") else loader
    with torch.no_grad():
        for batch_group in iterator:
            for batch in batch_group:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                mask = batch["attention_mask"]
                read_modules(model, batch["input_ids"], mask, {n: second_moment_reader(sums[n], mask) for n in todo})
                count += int(mask.bool().sum())
    for name in todo:
        out[name] = (sums[name].cpu(), count)
        if not force_recompute:
            stat = ls.CombinedStat(mom2=ls.SecondMoment())
            stat.mom2.mom2, stat.mom2.count = sums[name].cpu(), count
            rs.save_cached_state(str(files[name]), stat, {"sample_size": sample_size})
    return out


def _cache_key(model, layer_name):
    return model.config._name_or_path.replace("/", "_"), layer_name


def get_cov(main, model, tok, layer_name, mom2_dataset, mom2_n_samples, mom2_dtype, inv=False,
            force_recompute=False, hparams=None):
    """EasyEdit's get_cov (E[k k^T], cached in AlphaEdit_main.COV_CACHE); the first call also fills the
    cache for every other edited layer of `hparams`, from the same single statistics pass."""
    cache = main.COV_CACHE
    key = _cache_key(model, layer_name)
    if key not in cache or force_recompute:
        names = [layer_name]
        if hparams is not None and not force_recompute:
            names += [n for n in (hparams.rewrite_module_tmp.format(l) for l in hparams.layers)
                      if n != layer_name and _cache_key(model, n) not in cache]
        moments = second_moments(model, tok, names, hparams.stats_dir if hparams is not None else "data/stats",
                                 mom2_dataset, mom2_n_samples, mom2_dtype, force_recompute=force_recompute)
        for name, (total, count) in moments.items():
            cache[_cache_key(model, name)] = (total / count).float().to("cpu")
    device = getattr(hparams, "device", None) if hparams is not None else None
    cov = cache[key].to(_device(device))
    return torch.inverse(cov) if inv else cov


def _device(device) -> torch.device:
    """EasyEdit's normalize_device: an int is a CUDA index when CUDA exists, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, int):
        return torch.device(f"cuda:{device}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    return device if device.type != "cuda" or torch.cuda.is_available() else torch.device("cpu")


def get_project(main, model, tok, layer, hparams):
    """EasyEdit's get_project: P = U0 U0^T of the covariance's singular vectors below nullspace_threshold
    (eigendecomposition in fp64; for the PSD covariance its eigenvalues are the singular values)."""
    from ..projector import nullspace_projector

    cov = main.get_cov(model, tok, hparams.rewrite_module_tmp.format(layer), hparams.mom2_dataset,
                       hparams.mom2_n_samples, hparams.mom2_dtype, force_recompute=False, hparams=hparams).cpu()
    return nullspace_projector(cov.float(), hparams.nullspace_threshold)


class _Moment:
    def __init__(self, total: torch.Tensor, count: int):
        self.mom2, self.count = total, count

    def moment(self) -> torch.Tensor:
        return self.mom2 / self.count


class _Stats:
    """What layer_stats returns, as far as AlphaEdit reads it (`stat.mom2.moment()`)."""

    def __init__(self, total: torch.Tensor, count: int):
        self.mom2 = _Moment(total, count)


def layer_stats(main, model, tokenizer, layer_name, stats_dir, ds_name, to_collect, model_name=None,
                sample_size=None, precision=None, batch_tokens=None, download=True, progress=None,
                force_recompute=False, hparams=None):
    """The alphaedit module's layer_stats: second moments by `second_moments` (ONE pass for all of
    hparams' layers still uncached); anything but to_collect=['mom2'] at default batch_tokens goes to
    EasyEdit's own."""
    if list(to_collect) != ["mom2"] or batch_tokens is not None:
        return active_patch(NAME).state["original_layer_stats"](
            model, tokenizer, layer_name, stats_dir, ds_name, to_collect, model_name=model_name,
            sample_size=sample_size, precision=precision, batch_tokens=batch_tokens, download=download,
            **({} if progress is None else {"progress": progress}), force_recompute=force_recompute, hparams=hparams)
    names = [layer_name]
    if hparams is not None and not force_recompute:
        names += [n for n in (hparams.rewrite_module_tmp.format(l) for l in hparams.layers) if n != layer_name]
    moments = second_moments(model, tokenizer, names, stats_dir, ds_name, sample_size, precision,
                             force_recompute=force_recompute, model_name=model_name)
    return _Stats(*moments[layer_name])
