"""Everything an edit needs besides the requests, from names and files: model and tokenizer,
hyper-parameters, null-space projector and context templates (`AlphaEditor.from_pretrained`,
`alphaedit-fast eval`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import InvalidArgumentError
from .hparams import AlphaEditHyperParams
from .storage import StatsFileError
from .validation import as_hparams


def is_factworld_model(path) -> bool:
    """Whether `path` is a fact-world model directory (the shipped one or a rebuilt one)."""
    return path is not None and (Path(path) / "factworld.json").is_file()


def resolve_hparams(hparams, model) -> AlphaEditHyperParams:
    """`hparams` as hyper-parameters: a file path or preset name (`AlphaEditHyperParams.load`),
    None for the preset matching `model` (`for_model`), or an object or dict (`as_hparams`)."""
    if hparams is None:
        return AlphaEditHyperParams.for_model(model)
    if isinstance(hparams, (str, Path)):
        return AlphaEditHyperParams.load(hparams)
    return as_hparams(hparams)


def read_projector(path, model, hparams: AlphaEditHyperParams, allow_foreign: bool = False):
    """A projector file in any of its forms, for `AlphaEditor(projector=...)`: this project's
    bases (`.safetensors` from `alphaedit-fast projector`, checked against `model`) or a dense P
    (len(layers), d_k, d_k) saved with `torch.save`, as the original's and EasyEdit's
    `null_space_project.pt` (read with `weights_only=True`: nothing is unpickled)."""
    from .projector import load_projector

    path = Path(path)
    if not path.is_file():
        raise StatsFileError(f"projector file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_projector(path, model, allow_foreign=allow_foreign)
    try:
        P = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError ... on a bad file
        raise StatsFileError(f"cannot read {path} as a tensor saved with torch.save ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if isinstance(P, dict) and "P" in P:
        P = P["P"]
    if not isinstance(P, torch.Tensor) or P.ndim != 3 or P.shape[0] != len(hparams.layers):
        shape = tuple(P.shape) if isinstance(P, torch.Tensor) else type(P).__name__
        raise StatsFileError(f"{path} holds {shape}, not a dense P of shape (len(layers)={len(hparams.layers)}, "
                             "d_k, d_k)")
    return P


def projector_from_stats(path, model, hparams: AlphaEditHyperParams) -> list[torch.Tensor]:
    """Null-space bases (d_k, r) per edited layer at `hparams.nullspace_threshold` from our
    statistics file (checked against `model`) or the original's directory of `layer_stats`
    `.npz` files (`{rewrite module}_{dtype}_mom2_{n}.npz`, searched below `path`)."""
    from .projector import nullspace_basis
    from .stats import KeyStatistics, read_original_stats

    path = Path(path)
    covariances = []
    if path.is_dir():
        for layer in hparams.layers:
            name = hparams.rewrite_module_tmp.format(layer)
            found = sorted(p for p in path.rglob(f"{name}_*.npz") if "mom2" in p.name)
            if len(found) != 1:
                raise StatsFileError(f"{path}: {'no' if not found else len(found)} statistics file(s) "
                                     f"{name}_*mom2*.npz for layer {layer}" + (f": {found}" if found else ""))
            covariances.append(read_original_stats(found[0])[0])
    else:
        stats = KeyStatistics.load(path, model)
        missing = [l for l in hparams.layers if l not in stats.sums]
        if missing:
            raise StatsFileError(f"{path} has no statistics of layer(s) {missing}; it holds {sorted(stats.sums)}")
        covariances = [stats.covariance(l) for l in hparams.layers]
    return [nullspace_basis(cov, hparams.nullspace_threshold) for cov in covariances]


def read_context_templates(path) -> list[list[str]]:
    """Context templates from a JSON file: a list of groups of strings (the original's
    `CONTEXT_TEMPLATES_CACHE`), or one flat list (a single group)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InvalidArgumentError(f"cannot read context templates from {path}: {err}") from None
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        data = [data]
    return data  # checked by the editor (one {} per template)


def load_for_editing(model, hparams=None, projector=None, stats=None, context_templates=None, *, dtype=None,
                     device=None, device_map=None, allow_foreign_projector: bool = False, max_memory=None) -> dict:
    """`AlphaEditor` arguments from names and files: {"model", "tok", "hparams", "projector",
    "context_templates"}.

    model: a local directory, hub id or 'factworld' (`loading.load_model`). projector: a file
    (`read_projector`), bases or a dense P, or "identity" for no constraint; stats: a statistics
    file or the original's `.npz` directory, turned into a projector at the hyper-parameters'
    threshold. A fact-world model given neither gets the null space of its own training corpus and
    its own context templates; any other model needs one of them (or projector="identity").
    """
    from .loading import load_model, resolve_model_name

    source = resolve_model_name(model)
    model, tok = load_model(source, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory)
    hparams = resolve_hparams(hparams, model)
    factworld = is_factworld_model(source)
    if projector is not None and stats is not None:
        raise InvalidArgumentError("give a projector or statistics, not both")
    if isinstance(projector, str) and projector == "identity":
        projector = [torch.eye(_key_width(model, hparams))] * len(hparams.layers)
    elif isinstance(projector, (str, Path)):
        projector = read_projector(projector, model, hparams, allow_foreign_projector)
    elif stats is not None:
        projector = projector_from_stats(stats, model, hparams)
    elif projector is None and factworld:
        from .factworld import load_world
        from .factworld.editing import corpus_projector

        projector = corpus_projector(model, tok, load_world(source), hparams)
    elif projector is None:
        raise InvalidArgumentError("no projector: give projector= (a file from `alphaedit-fast projector` or the "
                                   "original's null_space_project.pt), stats= (a statistics file or the original's "
                                   "stats directory), or projector='identity' to edit without the null-space "
                                   "constraint")
    if isinstance(context_templates, (str, Path)):
        context_templates = read_context_templates(context_templates)
    elif context_templates is None and factworld:
        from .factworld.editing import CONTEXT_TEMPLATES

        context_templates = CONTEXT_TEMPLATES
    return {"model": model, "tok": tok, "hparams": hparams, "projector": projector,
            "context_templates": context_templates}


def _key_width(model, hparams: AlphaEditHyperParams) -> int:
    from .arch import get_module, key_width

    return key_width(get_module(model, hparams.rewrite_module_tmp.format(hparams.layers[0])))

