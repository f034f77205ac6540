"""`patch_alphaedit()`: the authors' packaged editor (the `alphaedit/` package of github
jianghoucheng/AlphaEdit: `AlphaEditor`, `AlphaEditConfig`, `python -m alphaedit.cli`), unchanged,
runs on alphaedit_fast.

The package must be importable (the checkout's root on sys.path / PYTHONPATH). Replaced, in their
modules and wherever they were already imported by name:

* `AlphaEditor.edit`: one batched z optimisation for the whole batch (the package runs one
  `compute_target` per request), keys read in the passes of our engine, the update solved in each
  layer's null space with the factored projector kept on the layer's device (the package copies the
  dense P and key covariance from the CPU per layer per batch and solves d_k x d_k). The editor's
  `projection` and `key_covariance` stay the package's dense CPU tensors, updated as the package
  updates them, so `save_state` and `state_path` work unchanged, both ways;
* `AlphaEditor._initialize_state`: the statistics of every edited layer in ONE pass over the
  package's texts (see `layer_stats` below), P from an fp64 eigendecomposition on each layer's
  device with the package's absolute threshold;
* `AlphaEditor._validate_single_device`: lifted: CPU, one GPU or a `device_map` model;
* `alphaedit.compute_target.compute_target`, `alphaedit.compute_keys.compute_keys`: ours;
* `alphaedit.layer_stats.layer_stats` (second moments): the layers without a file computed in one
  pass, each written where and as the package's `tally` writes it;
* `alphaedit.cli.main`: the package's flow and options, with `--device cpu`, `cuda[:N]` or `auto`
  (a `device_map`).

The z-cache files (`cache_dir/layer_{L}/case_{id}.npz`, entry "target") are read and written as
the package does. The package takes `v_num_grad_steps` Adam steps (the original takes one fewer);
the patch takes the same number. Its subject positions come from token offsets, ours from token
counts: a batch where the two differ is refused before anything changes. With `subject_last` (every
published config) and `subject_first_after_last` none of the 10,000 CounterFact development records
differs (GPT-2 and SmolLM2 tokenizers); with `subject_first` most do (a prefix's trailing space
counts as a token here, as DESIGN and the original define it), so such configs are refused. Its
targets assume right padding (its CLI sets it); ours do not depend on the padding side.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import torch

from ..editor import ZCacheFiles, check_edit, run_edit
from ..errors import InvalidRequestError
from ..hparams import AlphaEditHyperParams
from ..keys import compute_ks as fast_compute_ks
from ..positions import lookup_positions
from ..projector import basis_from_projector, nullspace_basis
from ..requests import normalize_requests, target_token_ids, z_templates
from ..solve import ProjectedSolver
from ..validation import check_model, check_projector
from ..values import compute_z as fast_compute_z
from .original import StatsSpec, _from_frames, _names_from_layers, original_batches, second_moments
from .patching import IntegrationError, Patch, active_patch, import_module, register

NAME = "alphaedit"
MODULES = ("alphaedit.editor", "alphaedit.compute_target", "alphaedit.compute_keys", "alphaedit.layer_stats",
           "alphaedit.representations", "alphaedit.cli", "alphaedit.config", "alphaedit.utils.running_stats")
HINT = ("put the root of an AlphaEdit checkout that has the alphaedit/ package (github jianghoucheng/AlphaEdit) "
        "on sys.path or PYTHONPATH")
DATASETS = {"wikipedia": ("wikimedia/wikipedia", "20231101.en"), "wikitext": ("Salesforce/wikitext",
                                                                           "wikitext-103-raw-v1")}
REPLACED = {"alphaedit.editor": ("AlphaEditor",), "alphaedit.compute_target": ("compute_target",),
            "alphaedit.compute_keys": ("compute_keys",), "alphaedit.layer_stats": ("layer_stats", "load_dataset"),
            "alphaedit.representations": ("get_words_idxs_in_templates",), "alphaedit.cli": ("main", "build_parser"),
            "alphaedit.config": ("AlphaEditConfig",),
            "alphaedit.utils.running_stats": ("CombinedStat", "SecondMoment", "load_cached_state")}
EDITOR_METHODS = ("edit", "_initialize_state", "_validate_single_device", "_normalize_requests",
                  "_get_context_templates", "save_state")


def patch_alphaedit(layers: list[int] | None = None) -> Patch:
    """Make the authors' `alphaedit` package run on alphaedit_fast; returns the `Patch` (`undo()`
    restores every replaced object). A second call returns the patch in force. `layers`: the layers
    whose statistics a direct `layer_stats` call computes in its one pass (default: an
    `AlphaEditConfig` in a calling frame, else only the requested layer)."""
    patch = active_patch(NAME)
    if patch is not None:
        return patch
    modules = {name: import_module(name, "the authors' alphaedit package", HINT) for name in MODULES}
    for name, attributes in REPLACED.items():
        for attribute in attributes:
            if not hasattr(modules[name], attribute):
                raise IntegrationError(f"{name} has no {attribute}: not the alphaedit package this patch was "
                                       "written for")
    editor_class = modules["alphaedit.editor"].AlphaEditor
    missing = [m for m in EDITOR_METHODS if not hasattr(editor_class, m)]
    if missing:
        raise IntegrationError(f"alphaedit.editor.AlphaEditor has no {missing}: not the alphaedit package this patch "
                               "was written for")
    stats_mod, running = modules["alphaedit.layer_stats"], modules["alphaedit.utils.running_stats"]
    representations = modules["alphaedit.representations"]
    patch = Patch(NAME)
    patch.state.update(layers=list(layers) if layers is not None else None, passes=0,
                       original_layer_stats=stats_mod.layer_stats)

    def statistics(model, tok, names, spec: PackageStatsSpec, force_recompute=False) -> dict:
        """The package's CombinedStat of each module in `names`: read from its file, or computed
        (all missing ones in one pass) and written there unless `force_recompute`."""
        found = {} if force_recompute else {n: spec.load(running, n) for n in names}
        todo = [n for n in names if found.get(n) is None]
        if todo:
            source, config = DATASETS[spec.dataset]
            dataset = stats_mod.load_dataset(source, config, split="train")
            sums, count = second_moments(model, tok, original_batches(dataset, tok, spec), todo, spec.dtype)
            patch.state["passes"] += 1
            for name in todo:
                found[name] = spec.stat(running, sums[name], count)
                if not force_recompute:
                    spec.save(running, name, found[name])
        return found

    def layer_stats(model, tokenizer, layer_name, stats_dir, dataset_name, to_collect, *, sample_size=None,
                    precision="float32", batch_tokens=None, force_recompute=False):
        if sorted(to_collect) != ["mom2"]:  # only the second moment is ours
            return patch.state["original_layer_stats"](
                model, tokenizer, layer_name, stats_dir, dataset_name, to_collect, sample_size=sample_size,
                precision=precision, batch_tokens=batch_tokens, force_recompute=force_recompute)
        spec = PackageStatsSpec(model, stats_dir, dataset_name, sample_size, precision, batch_tokens)
        if force_recompute:
            return statistics(model, tokenizer, [layer_name], spec, force_recompute=True)[layer_name]
        stat = spec.load(running, layer_name)
        if stat is not None:
            return stat
        names = [n for n in edited_layer_names(layer_name, patch) if n == layer_name or not spec.has(n)]
        return statistics(model, tokenizer, names, spec)[layer_name]

    def initialize_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        modules = check_model(self.model, config_hparams(config))
        spec = PackageStatsSpec(self.model, self.stats_dir, config.mom2_dataset, config.mom2_n_samples,
                                config.mom2_dtype, None)
        names = [config.rewrite_module_template.format(layer) for layer in config.layers]
        stats = statistics(self.model, self.tokenizer, names, spec)
        bases = [nullspace_basis(stats[name].mom2.moment().float().to(m.weight.device), config.nullspace_threshold)
                 for name, m in zip(names, modules)]
        projection = torch.stack([(u @ u.T).cpu() for u in bases])
        key_covariance = torch.zeros_like(projection)
        self.projection, self.key_covariance = projection, key_covariance  # as the constructor sets them
        _SOLVERS[self] = (ProjectedSolver(bases, config.l2_regularization),
                          _Fingerprint(self, [m.weight.device for m in modules]))
        return projection, key_covariance

    def validate_single_device(self) -> None:
        pass  # any device layout: our engine places each layer's work on that layer's device

    def edit(self, requests):
        normalized = normalize_requests(self._normalize_requests(requests))
        contexts = self._get_context_templates()
        edit_batch(self, normalized, contexts, representations)
        return self.model

    def compute_target(model, tokenizer, request, config, layer, context_templates):
        return fast_compute_z(model, tokenizer, request, config_hparams(config), layer, context_templates)

    def compute_keys(model, tokenizer, requests, config, layer, context_templates):
        return fast_compute_ks(model, tokenizer, requests, config_hparams(config), layer, context_templates)

    def main(argv=None):
        run_cli(modules["alphaedit.cli"], modules["alphaedit.config"].AlphaEditConfig, editor_class, argv)

    register(patch)
    try:
        patch.set(editor_class, "edit", edit)
        patch.set(editor_class, "_initialize_state", initialize_state)
        patch.set(editor_class, "_validate_single_device", validate_single_device)
        patch.replace_function(modules["alphaedit.compute_target"], "compute_target", compute_target)
        patch.replace_function(modules["alphaedit.compute_keys"], "compute_keys", compute_keys)
        patch.replace_function(stats_mod, "layer_stats", layer_stats)
        patch.replace_function(modules["alphaedit.cli"], "main", main)
    except BaseException:
        patch.undo()
        raise
    return patch


# ---------------------------------------------------------------------------------------------
# the edit


def config_hparams(config) -> AlphaEditHyperParams:
    """Our hyper-parameters for an `AlphaEditConfig` whose layout is resolved. The package steps
    Adam `v_num_grad_steps` times; our loop, as the original's, one time fewer."""
    return AlphaEditHyperParams.from_dict(dict(
        layers=list(config.layers), rewrite_module_tmp=config.rewrite_module_template,
        layer_module_tmp=config.layer_module_template, ln_f_module=config.final_norm_module,
        lm_head_module=config.lm_head_module, v_loss_layer=config.v_loss_layer, fact_token=config.fact_token,
        v_num_grad_steps=config.v_num_grad_steps + 1, v_lr=config.v_lr, v_weight_decay=config.v_weight_decay,
        clamp_norm_factor=config.clamp_norm_factor, kl_factor=config.kl_factor, mom2_dataset=config.mom2_dataset,
        mom2_n_samples=config.mom2_n_samples, mom2_dtype=config.mom2_dtype,
        nullspace_threshold=config.nullspace_threshold, L2=config.l2_regularization))


# package editor -> (solver, `_fingerprint` of what it was built from)
_SOLVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Fingerprint:
    """The dense projection and key covariance a solver was built from (the tensors themselves,
    weakly, and their in-place versions), its L2 and the layers' devices."""

    def __init__(self, editor, devices: list[torch.device]):
        tensors = (editor.projection, editor.key_covariance)
        self.refs = [weakref.ref(t) for t in tensors]
        self.versions = [t._version for t in tensors]
        self.rest = (editor.config.l2_regularization, devices)

    def matches(self, editor, devices: list[torch.device]) -> bool:
        tensors = (editor.projection, editor.key_covariance)
        return (all(ref() is t for ref, t in zip(self.refs, tensors))
                and self.versions == [t._version for t in tensors]
                and self.rest == (editor.config.l2_regularization, devices))


def layer_solver(editor, modules: list[torch.nn.Module]) -> ProjectedSolver:
    """The editor's null-space solver (bases U and projected caches U^T C U on each layer's
    device), rebuilt from its dense `projection` and `key_covariance` whenever they, its L2 or
    the layers' devices changed since the last patched call."""
    devices = [m.weight.device for m in modules]
    solver, fingerprint = _SOLVERS.get(editor, (None, None))
    if solver is None or not fingerprint.matches(editor, devices):
        check_projector(editor.projection, "the editor's projection")
        bases = [basis_from_projector(p.to(m.weight.device)) for p, m in zip(editor.projection, modules)]
        caches = [u.T @ c.to(u.device, u.dtype) @ u for u, c in zip(bases, editor.key_covariance)]
        solver = ProjectedSolver(bases, editor.config.l2_regularization, cache_proj=caches)
    return solver


class _KeyRecorder:
    """A solver that remembers the keys it absorbed (each layer's (d_k, n) after the edit)."""

    def __init__(self, solver: ProjectedSolver):
        self.solver, self.absorbed = solver, None

    def update(self, index: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        return self.solver.update(index, keys, resid)

    def absorb(self, keys_per_layer: list[torch.Tensor]) -> None:
        self.solver.absorb(keys_per_layer)
        self.absorbed = keys_per_layer


def edit_batch(editor, requests: list[dict], contexts, representations) -> None:
    """One batch of the package's `edit` on our engine; `requests` normalised by both codes."""
    hparams = config_hparams(editor.config)
    model, tok = editor.model, editor.tokenizer
    modules = check_model(model, hparams)
    check_positions(representations, tok, requests, contexts, hparams.fact_token)
    cache = None
    if editor.cache_dir is not None:
        directory = Path(editor.cache_dir) / f"layer_{hparams.layers[-1]}"
        cache = ZCacheFiles(lambda request: directory / f"case_{request['case_id']}.npz", "target")
    check_edit(model, tok, requests, hparams, contexts, cache, None)
    if len(editor.projection) != len(hparams.layers):
        raise InvalidRequestError(f"the editor holds {len(editor.projection)} projections for "
                                  f"{len(hparams.layers)} layers")
    recorder = _KeyRecorder(layer_solver(editor, modules))
    _SOLVERS.pop(editor, None)  # until the key covariance holds what the solver absorbs
    run_edit(model, tok, requests, hparams, contexts, recorder, cache_template=cache)
    added = [(keys @ keys.T).float().cpu() for keys in recorder.absorbed]
    for index, outer in enumerate(added):
        editor.key_covariance[index].add_(outer)
    _SOLVERS[editor] = (recorder.solver, _Fingerprint(editor, [m.weight.device for m in modules]))


def check_positions(representations, tok, requests: list[dict], contexts, fact_token: str) -> None:
    """Refuse the batch where the package's subject positions (token offsets) differ from ours
    (token counts), in any prompt the edit reads: rewriting and KL prompts, key prompts, the plain
    prompt."""
    templates, words = [], []
    for request in requests:
        suffix = tok.decode(target_token_ids(tok, request["target_new"]["str"])[:-1])
        filled = [context.format(request["prompt"]) for group in contexts for context in group]
        ours = z_templates(request["prompt"], suffix, contexts) + filled + [request["prompt"]]
        templates += ours
        words += [request["subject"]] * len(ours)
    theirs = [i[0] for i in representations.get_words_idxs_in_templates(tok, templates, words,
                                                                        fact_token.removeprefix("subject_"))]
    ours = lookup_positions(tok, templates, words, fact_token)
    for template, word, a, b in zip(templates, words, theirs, ours):
        if a != b:
            raise InvalidRequestError(
                f"the alphaedit package finds the subject {word!r} of {template!r} at token {a}, alphaedit_fast at "
                f"token {b}: this batch cannot be edited as the package edits it; nothing was changed (edit it "
                "without the patch, or reword the prompt)")


# ---------------------------------------------------------------------------------------------
# statistics


class PackageStatsSpec(StatsSpec):
    """What the package's `layer_stats` derives from its arguments: the file
    `stats_dir/<model name>/<dataset>_stats/<module>_<precision>_mom2_<sample_size>.npz` and texts
    truncated to min(max_position_embeddings, 4096) tokens. The package forwards one text at a
    time; the one pass here packs texts up to its batch_tokens (3 x that) per forward: the same
    tokens, summed in another order."""

    def __init__(self, model, stats_dir, dataset: str, sample_size: int | None, precision: str,
                 batch_tokens: int | None):
        if dataset not in DATASETS:
            raise InvalidRequestError(f"the alphaedit package reads statistics only from {sorted(DATASETS)}, "
                                      f"not {dataset!r}")
        maxlen = min(int(getattr(model.config, "max_position_embeddings", 4096)), 4096)
        model_name = str(model.config._name_or_path).rstrip("/").split("/")[-1]
        super().__init__(Path(stats_dir) / model_name / f"{dataset}_stats", precision,
                         "" if sample_size is None else f"_{sample_size}", maxlen,
                         maxlen * 3 if batch_tokens is None else batch_tokens, sample_size)
        self.dataset = dataset


def edited_layer_names(layer_name: str, patch: Patch) -> list[str]:
    """The modules one `layer_stats` pass computes: `layer_name` with its layer number replaced by
    each of `patch_alphaedit(layers=...)`, else those of an `AlphaEditConfig` (or an editor holding
    one) in a calling frame, else `layer_name` alone."""
    for found in (_names_from_layers(patch.state["layers"], layer_name) if patch.state["layers"] else None,
                  _from_frames(layer_name, template_attribute="rewrite_module_template")):
        if found:
            return list(dict.fromkeys([layer_name, *found]))
    return [layer_name]


# ---------------------------------------------------------------------------------------------
# the command line


def run_cli(cli, config_class, editor_class, argv=None) -> None:
    """The package's `alphaedit.cli.main` (same options and outputs) with `--device` also `cpu`
    or `auto` (the model spread over the visible devices by accelerate's device_map)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..checkpoints import dtype_kwargs

    args = cli.build_parser().parse_args(argv)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    placement = {"device_map": "auto"} if args.device == "auto" else {}
    model = AutoModelForCausalLM.from_pretrained(args.model, **dtype_kwargs(dtype), low_cpu_mem_usage=True,
                                                 trust_remote_code=args.trust_remote_code, **placement)
    if not placement:
        model = model.to(args.device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    config = config_class.from_json(args.config)
    payload = json.loads(Path(args.requests).read_text(encoding="utf-8"))
    requests = payload["requests"] if isinstance(payload, dict) else payload
    if not isinstance(requests, list):
        raise ValueError("Request file must be a JSON list or contain a 'requests' list")
    editor = editor_class(model, tokenizer, config, stats_dir=args.stats_dir, cache_dir=args.cache_dir,
                          state_path=args.state)
    editor.edit(requests)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output_dir, safe_serialization=True)
    tokenizer.save_pretrained(args.output_dir)
    editor.save_state(args.output_dir / "alphaedit_state.pt")
    (args.output_dir / "alphaedit_config.json").write_text(
        json.dumps(editor.config.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")


__all__ = ["patch_alphaedit"]
