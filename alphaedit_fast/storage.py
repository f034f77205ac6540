"""Safe files: safetensors written atomically (temp file + rename) with metadata checked on load.

Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import AlphaEditError

FORMAT_VERSION = "1"


class StatsFileError(AlphaEditError, ValueError):
    """A statistics or projector file is corrupted, stale or belongs to another model or corpus."""


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> Path:
    """Write `tensors` with string metadata (non-strings JSON-encoded) atomically to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta["format_version"] = FORMAT_VERSION
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, tmp, metadata=meta)  # no shared storage
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_tensors(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a file written by `save_tensors` with metadata kind == `kind`."""
    path = Path(path)
    if not path.exists():
        raise StatsFileError(f"{path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise StatsFileError(f"{path} is not a readable safetensors file ({err}); delete it and recompute") from None
    if metadata.get("kind") != kind or metadata.get("format_version") != FORMAT_VERSION:
        raise StatsFileError(f"{path} is not an alphaedit_fast {kind} file (kind={metadata.get('kind')!r}, "
                             f"format {metadata.get('format_version')!r}, expected {FORMAT_VERSION!r})")
    return tensors, metadata


def model_fingerprint(model: torch.nn.Module, module_names: list[str]) -> str:
    """sha256 over the first MiB of the input embedding and of each named module's weight (the
    config is left out: saving and reloading a model rewrites some of its fields)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    embedding = model.get_input_embeddings()
    for name in ["embedding", *module_names]:
        weight = (embedding if name == "embedding" else model.get_submodule(name)).weight.detach()
        digest.update(f"{name}:{tuple(weight.shape)}:{weight.dtype}".encode())
        flat = weight.reshape(-1)[: (1 << 20) // weight.element_size()]
        digest.update(flat.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a corpus file's size and first 16 MiB (or of a directory's file listing)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
        with open(file, "rb") as f:
            digest.update(f.read(16 << 20))
    return digest.hexdigest()[:32]
