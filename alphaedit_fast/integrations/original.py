"""`patch_original()`: the original AlphaEdit repository's code (github jianghoucheng/AlphaEdit),
unchanged, runs on alphaedit_fast.

The checkout must be importable (its root on sys.path / PYTHONPATH) and, as the original
itself requires, `util/globals.py` must find `globals.yml` (run from the checkout's root).
Replaced, in their modules and wherever they were already imported by name (e.g.
`experiments.evaluate.apply_AlphaEdit_to_model`):

* `AlphaEdit.AlphaEdit_main.apply_AlphaEdit_to_model`: our engine, with the original's
  contract: returns (model, cache_c) and updates the caller's cache_c tensor in place, z-cache
  files through `cache_template`, the original's hparams object;
* `AlphaEdit.AlphaEdit_main.get_context_templates`: shares the original's module-level
  `CONTEXT_TEMPLATES_CACHE` both ways (set: used by our editing; None: ours generates and stores
  the result there, so the original's later code sees the same templates);
* `AlphaEdit.compute_z.compute_z`, `AlphaEdit.compute_ks.compute_ks`: ours;
* `experiments.py.eval_utils_counterfact.test_batch_prediction` (when that module imports: it
  needs nltk, scipy and scikit-learn): the CounterFact scores of `evaluation.score_targets`, one
  batched pass with the LM head applied only where a target token is predicted, same return layout;
* `AlphaEdit.AlphaEdit_main.get_cov` and `rome.layer_stats.layer_stats`: the first statistics
  wanted for a layer compute those of every edited layer in ONE pass over the same texts the
  original reads (see `original_batches`), and write each layer's `.npz` where and as the
  original's `layer_stats` does, so both codes share the cache.

"Every edited layer" is, in this order: the `hparams` argument of `layer_stats`; the `layers`
given to `patch_original`; an hparams object (anything with `layers` and
`rewrite_module_tmp` that names the requested module) in a calling frame (the original's
`get_project(model, tok, layer, hparams)` holds one); the hparams of the last patched
`apply_AlphaEdit_to_model` call; else only the requested layer. Layers whose file exists are not
recomputed.
"""

from __future__ import annotations

import importlib
import inspect
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..editor import apply_AlphaEdit_to_model as fast_apply
from ..editor import save_npz_atomically
from ..evaluation import score_targets
from ..keys import compute_ks as fast_compute_ks
from ..modelstate import frozen
from ..positions import pad_token_id
from ..stats import add_batch_moments
from ..templates import get_context_templates as fast_context_templates
from ..validation import as_hparams
from ..values import compute_z as fast_compute_z
from .patching import IntegrationError, Patch, active_patch, import_module, register

NAME = "original"
EVAL_MODULE = "experiments.py.eval_utils_counterfact"
MODULES = ("AlphaEdit.AlphaEdit_main", "AlphaEdit.compute_z", "AlphaEdit.compute_ks", "rome.layer_stats",
           "util.runningstats")
HINT = ("put the root of an AlphaEdit checkout (github jianghoucheng/AlphaEdit) on sys.path or PYTHONPATH, "
        "and run from that root (its util/globals.py reads ./globals.yml)")
DATASET_CONFIGS = {"wikitext": "wikitext-103-raw-v1", "wikipedia": "20200501.en"}  # as the original's get_ds
TEXTS_PER_LOADER_BATCH = 100  # the original's layer_stats: batch_size = 100
SAMPLE_SEED = 1  # tally(..., random_sample=1)
FRAMES_SEARCHED = 12


def patch_original(layers: list[int] | None = None) -> Patch:
    """Make the original AlphaEdit code run on alphaedit_fast; returns the `Patch` (`undo()`
    restores every replaced object). A second call returns the patch in force. `layers`: the
    layers whose statistics the first `get_cov`/`layer_stats` call computes (see the module
    docstring for the default)."""
    patch = active_patch(NAME)
    if patch is not None:
        return patch
    modules = {}
    for name in MODULES:
        try:
            modules[name] = import_module(name, "the original AlphaEdit", HINT)
        except OSError as err:  # util/globals.py: open("globals.yml")
            raise IntegrationError(f"cannot import {name} of the original AlphaEdit ({type(err).__name__}: {err}); "
                                   f"{HINT}") from None
    main, z_mod, ks_mod = modules["AlphaEdit.AlphaEdit_main"], modules["AlphaEdit.compute_z"], \
        modules["AlphaEdit.compute_ks"]
    stats_mod, running = modules["rome.layer_stats"], modules["util.runningstats"]
    for module, attribute in [(main, "apply_AlphaEdit_to_model"), (main, "get_cov"), (main, "get_context_templates"),
                              (main, "CONTEXT_TEMPLATES_CACHE"), (main, "COV_CACHE"), (z_mod, "compute_z"),
                              (ks_mod, "compute_ks"), (stats_mod, "layer_stats"), (running, "CombinedStat"),
                              (running, "SecondMoment"), (running, "load_cached_state")]:
        if not hasattr(module, attribute):
            raise IntegrationError(f"{module.__name__} has no {attribute}: not the original AlphaEdit code this "
                                   "patch was written for")

    patch = Patch(NAME)
    patch.state.update(layers=list(layers) if layers is not None else None, hparams=None, passes=0,
                       original_layer_stats=stats_mod.layer_stats)

    def get_context_templates(model, tok):
        if main.CONTEXT_TEMPLATES_CACHE is None:
            main.CONTEXT_TEMPLATES_CACHE = fast_context_templates(model, tok)
        return main.CONTEXT_TEMPLATES_CACHE

    def apply_AlphaEdit_to_model(model, tok, requests, hparams, cache_template=None, cache_c=None, P=None):  # noqa: N802
        patch.state["hparams"] = hparams
        templates = main.get_context_templates(model, tok)
        model, new_cache = fast_apply(model, tok, requests, as_hparams(hparams), cache_template, cache_c, P,
                                      context_templates=templates)
        if isinstance(cache_c, torch.Tensor):  # the original adds to the caller's tensor in place
            with torch.no_grad():
                cache_c.copy_(new_cache.to(cache_c.device, cache_c.dtype))
            return model, cache_c
        return model, new_cache

    def compute_z(model, tok, request, hparams, layer, context_templates):
        return fast_compute_z(model, tok, request, as_hparams(hparams), layer, context_templates)

    def compute_ks(model, tok, requests, hparams, layer, context_templates):
        return fast_compute_ks(model, tok, requests, as_hparams(hparams), layer, context_templates)

    def get_cov(model, tok, layer_name, mom2_dataset, mom2_n_samples, mom2_dtype, inv=False, force_recompute=False):
        key = (model.config._name_or_path.replace("/", "_"), layer_name)
        if key not in main.COV_CACHE or force_recompute:
            stat = main.layer_stats(model, tok, layer_name, main.STATS_DIR, mom2_dataset, to_collect=["mom2"],
                                    sample_size=mom2_n_samples, precision=mom2_dtype,
                                    force_recompute=force_recompute)
            main.COV_CACHE[key] = stat.mom2.moment().float().to("cpu")
        cov = main.COV_CACHE[key].to(model.get_input_embeddings().weight.device)  # the original: "cuda"
        return torch.inverse(cov) if inv else cov

    def layer_stats(model, tokenizer, layer_name, stats_dir, ds_name, to_collect, model_name=None,
                    sample_size=None, precision=None, batch_tokens=None, download=True, progress=None,
                    force_recompute=False, hparams=None):
        if sorted(to_collect) != ["mom2"]:  # only the second moment is ours
            return patch.state["original_layer_stats"](
                model, tokenizer, layer_name, stats_dir, ds_name, to_collect, model_name=model_name,
                sample_size=sample_size, precision=precision, batch_tokens=batch_tokens, download=download,
                **({} if progress is None else {"progress": progress}), force_recompute=force_recompute,
                hparams=hparams)
        spec = StatsSpec.original(model, stats_dir, ds_name, model_name, sample_size, precision, batch_tokens)
        if not force_recompute:
            stat = spec.load(running, layer_name)
            if stat is not None:
                return stat
            names = [n for n in edited_layer_names(layer_name, hparams, patch) if n == layer_name
                     or not spec.has(n)]
        else:  # the original then neither reads nor writes the file
            names = [layer_name]
        dataset = stats_mod.load_dataset(ds_name, DATASET_CONFIGS[ds_name])["train"]
        sums, count = second_moments(model, tokenizer, original_batches(dataset, tokenizer, spec), names, spec.dtype)
        patch.state["passes"] += 1
        stats = {name: spec.stat(running, sums[name], count) for name in names}
        if not force_recompute:
            for name, stat in stats.items():
                spec.save(running, name, stat)
        return stats[layer_name]

    def test_batch_prediction(model, tok, prefixes, which_correct, target_new, target_true):
        scores = score_targets(model, tok, [p for p in prefixes for _ in (0, 1)],
                               [t for _ in prefixes for t in (target_new, target_true)])
        probs = [{"target_new": scores[2 * i][0], "target_true": scores[2 * i + 1][0]} for i in range(len(prefixes))]
        return probs, [all(scores[2 * i + int(right)][1]) for i, right in enumerate(which_correct)]

    register(patch)
    try:
        counterfact_eval = _optional_module(EVAL_MODULE)
        if counterfact_eval is not None and hasattr(counterfact_eval, "test_batch_prediction"):
            patch.replace_function(counterfact_eval, "test_batch_prediction", test_batch_prediction)
        patch.replace_function(main, "get_context_templates", get_context_templates)
        patch.replace_function(main, "apply_AlphaEdit_to_model", apply_AlphaEdit_to_model)
        patch.replace_function(main, "get_cov", get_cov)
        patch.replace_function(z_mod, "compute_z", compute_z)
        patch.replace_function(ks_mod, "compute_ks", compute_ks)
        patch.replace_function(stats_mod, "layer_stats", layer_stats)
    except BaseException:
        patch.undo()
        raise
    return patch


def _optional_module(name: str):
    """`name` imported, or None when it (or what it imports) is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------
# which layers


def _layer_names_of(candidate: Any, layer_name: str, template_attribute: str = "rewrite_module_tmp"
                    ) -> list[str] | None:
    """The rewritten modules of an hparams-like object (attributes or keys `layers` and
    `template_attribute`), if `layer_name` is one of them."""
    get = candidate.get if isinstance(candidate, dict) else lambda key: getattr(candidate, key, None)
    try:
        layers, template = get("layers"), get(template_attribute)
        if not isinstance(template, str) or not isinstance(layers, (list, tuple)):
            return None
        names = [template.format(layer) for layer in layers]
    except Exception:  # anything odd in someone else's frame is not an hparams object
        return None
    return names if layer_name in names else None


def _names_from_layers(layers: list[int], layer_name: str) -> list[str] | None:
    """`layer_name` with its layer number replaced by each of `layers` (e.g. model.layers.{}.mlp.down_proj)."""
    parts = layer_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and int(part) in layers:
            return [".".join(parts[:i] + [str(layer)] + parts[i + 1:]) for layer in layers]
    return None


def edited_layer_names(layer_name: str, hparams: Any, patch: Patch) -> list[str]:
    """The modules whose statistics one pass computes (the module docstring gives the order)."""
    for found in (_layer_names_of(hparams, layer_name) if hparams is not None else None,
                  _names_from_layers(patch.state["layers"], layer_name) if patch.state["layers"] else None,
                  _from_frames(layer_name),
                  _layer_names_of(patch.state["hparams"], layer_name) if patch.state["hparams"] is not None else None):
        if found:
            return list(dict.fromkeys(found))
    return [layer_name]


def _config_of(value: Any) -> Any:
    try:  # someone else's object: any property may raise
        return getattr(value, "config", None)
    except Exception:
        return None


def _from_frames(layer_name: str, template_attribute: str = "rewrite_module_tmp") -> list[str] | None:
    """The modules of the first hparams-like object (or object holding one as `.config`) in the
    calling frames that names `layer_name`."""
    frame = inspect.currentframe()
    try:
        for _ in range(FRAMES_SEARCHED):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            for value in list(frame.f_locals.values()):
                if isinstance(value, (torch.nn.Module, torch.Tensor)):
                    continue
                for candidate in (value, _config_of(value)):
                    if hasattr(candidate, template_attribute):
                        found = _layer_names_of(candidate, layer_name, template_attribute)
                        if found:
                            return found
        return None
    finally:
        del frame


# ---------------------------------------------------------------------------------------------
# the original's corpus, token budget and files


def model_positions(model) -> int:
    """The original layer_stats' npos/maxlen rule."""
    config = model.config
    for attribute in ("n_positions", "max_sequence_length", "max_position_embeddings", "seq_length"):
        if hasattr(config, attribute):
            npos = getattr(config, attribute)
            break
    else:
        raise IntegrationError("the original's layer_stats knows no position range for this model's config")
    model_type = getattr(config, "model_type", "") or ""
    if "mistral" in model_type:
        npos = (getattr(config, "sliding_window", None) or 4096)
    if "qwen2" in model_type:
        npos = 4096
    return npos


class StatsSpec:
    """Where and how a `layer_stats` caches a module's second moment: the `.npz` directory and
    file suffix, the precision, and the corpus reading (texts sampled, truncated to maxlen,
    forwarded in batches of at most batch_tokens tokens)."""

    def __init__(self, directory: Path, precision: str, suffix: str, maxlen: int, batch_tokens: int,
                 sample_size: int | None):
        self.directory, self.precision, self.suffix = Path(directory), precision, suffix
        self.dtype = getattr(torch, precision)
        self.maxlen, self.batch_tokens, self.sample_size = maxlen, batch_tokens, sample_size

    @classmethod
    def original(cls, model, stats_dir, ds_name, model_name, sample_size, precision, batch_tokens) -> StatsSpec:
        """What the original's `layer_stats` derives from its arguments."""
        if ds_name not in DATASET_CONFIGS:
            raise IntegrationError(f"the original's layer_stats reads only {sorted(DATASET_CONFIGS)}, not {ds_name!r}")
        npos = model_positions(model)
        batch_tokens = npos * 3 if batch_tokens is None else batch_tokens
        suffix = "" if sample_size is None else f"_{sample_size}"
        if batch_tokens < npos:
            suffix = "_t{batch_tokens}" + suffix  # sic: the original's file name (not an f-string there)
        model_name = model_name if model_name is not None else model.config._name_or_path.rsplit("/")[-1]
        return cls(Path(stats_dir) / model_name / f"{ds_name}_stats", precision or "float64", suffix,
                   min(npos, batch_tokens), batch_tokens, sample_size)

    def path(self, layer_name: str) -> Path:
        return self.directory / f"{layer_name}_{self.precision}_mom2{self.suffix}.npz"

    def load(self, running, layer_name: str):
        """The original's CombinedStat read from the shared file, or None (absent, other sample_size)."""
        state = running.load_cached_state(self.path(layer_name), {"sample_size": self.sample_size}, quiet=True)
        if state is None:
            return None
        stat = running.CombinedStat(mom2=running.SecondMoment())
        stat.load_state_dict(state)
        return stat

    def has(self, layer_name: str) -> bool:
        """Whether the layer's file exists for this sample_size; reads only that entry (the
        original's loader would read the whole d_k x d_k matrix)."""
        try:
            with np.load(self.path(layer_name), allow_pickle=False) as data:
                stored = data["sample_size"]
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            return False
        if self.sample_size is None:
            return stored.ndim == 0 and stored.dtype.kind == "f" and bool(np.isnan(stored))
        return stored.ndim == 0 and stored.dtype.kind in "iuf" and stored == self.sample_size

    def stat(self, running, total: torch.Tensor, count: int):
        stat = running.CombinedStat(mom2=running.SecondMoment())
        stat.load_state_dict({"mom2.count": np.array(count), "mom2.mom2": total.to("cpu", self.dtype).numpy()})
        return stat

    def save(self, running, layer_name: str, stat) -> Path:
        """The file tally(cache=...) writes: the stat's state_dict plus sample_size, None boxed as
        the original does; written atomically."""
        state = dict(stat.state_dict())
        state["sample_size"] = self.sample_size
        box = getattr(running, "box_numpy_null", None)
        if self.sample_size is None and box is None:
            raise IntegrationError("util.runningstats has no box_numpy_null to store sample_size=None")
        path = self.path(layer_name)
        save_npz_atomically(path, **(box(state) if box is not None else state))
        return path


def sample_order(n_texts: int, sample_size: int | None) -> list[int]:
    """The dataset indices the original's tally visits: with a sample_size, the first
    min(sample_size, n) of range(n) shuffled by random.Random(1) (FixedRandomSubsetSampler);
    without one, every index in order."""
    if sample_size is None:
        return list(range(n_texts))
    order = list(range(n_texts))
    random.Random(SAMPLE_SEED).shuffle(order)
    return order[:min(sample_size, n_texts)]


def original_batches(dataset, tok, spec: StatsSpec):
    """The token batches of the original's statistics loop: loader batches of 100 texts in
    `sample_order`, each text encoded with truncation to maxlen, sorted longest first, empty ones
    dropped, split so that width x rows <= batch_tokens (length_collation)."""
    order = sample_order(len(dataset), spec.sample_size)
    for start in range(0, len(order), TEXTS_PER_LOADER_BATCH):
        texts = [dataset[i]["text"] for i in order[start:start + TEXTS_PER_LOADER_BATCH]]
        encoded = tok(texts, truncation=True, max_length=spec.maxlen)["input_ids"]
        items = sorted(encoded, key=lambda ids: -len(ids))
        batch: list[list[int]] = []
        for ids in items:
            if not ids:
                break
            if batch and len(batch[0]) * (len(batch) + 1) > spec.batch_tokens:
                yield batch
                batch = []
            batch.append(list(ids))
        if batch:
            yield batch


def second_moments(model, tok, batches, names: list[str], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int]:
    """Sum of k k^T of the inputs of every module in `names`, all in one pass per batch."""
    from ..arch import get_module, key_width

    modules = [get_module(model, name) for name in names]
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    sums = {name: torch.zeros(key_width(m), key_width(m), dtype=acc_dtype, device=m.weight.device)
            for name, m in zip(names, modules)}
    count, pad = 0, pad_token_id(tok)
    with frozen(model):
        for batch in batches:
            count += add_batch_moments(model, batch, pad, sums)
    return sums, count


__all__ = ["patch_original"]
