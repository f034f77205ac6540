"""Safe files: safetensors written atomically (temp file + rename) with typed metadata and a
sha256 over metadata and tensors, all checked on load; directories replaced atomically.

Nothing is ever unpickled.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import reprlib
import shutil
import sys
import tempfile
import types
import typing
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .arch import get_module
from .errors import AlphaEditError

FORMAT_VERSION = "3"  # 3: fingerprints over values, whatever the dtype
_ENVELOPE = ("format_version", "kind", "checksum")  # stored as plain strings; every other value as JSON


class StatsFileError(AlphaEditError, ValueError):
    """A statistics, projector or editor-state file is corrupted, stale or belongs to another model or corpus."""


def _checksum(stored: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the canonical JSON of the stored metadata, then each tensor's name, dtype,
    shape and bytes in sorted-name order: a flipped byte anywhere changes it."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in stored.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


def cache_root() -> Path:
    """The project's cache: $XDG_CACHE_HOME (default ~/.cache)/alphaedit_fast."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alphaedit_fast"


def umask_mode(mode: int) -> int:
    """`mode` less the process umask: what `open` and `mkdir` give new files and directories (mkstemp
    and mkdtemp create 0600 / 0700, which a rename into place would otherwise keep)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> Path:
    """Write `tensors` atomically to `path` with `metadata` (a str `kind` and JSON-able values)
    and a checksum over both."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}  # no shared storage
    stored = {k: json.dumps(v, sort_keys=True) for k, v in metadata.items() if k not in _ENVELOPE}
    stored.update(kind=str(metadata["kind"]), format_version=FORMAT_VERSION)
    stored["checksum"] = _checksum(stored, tensors)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=stored)
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_tensors(path: str | Path, kind: str, fields: dict[str, object] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Tensors and decoded metadata of a `save_tensors` file of this `kind`, checksum verified.

    fields: {name: type} the metadata must hold, e.g. {"count": int, "layers": list[int]}
    (unions with None and nested list/dict types allowed). Every problem is a StatsFileError.
    """
    path = Path(path)
    if not path.is_file():
        raise StatsFileError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
            # cloned: the reader's buffers are not 64-byte aligned, and a BLAS rounds differently on
            # unaligned data, so a checkpoint's tensors would not compute as the ones saved
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise StatsFileError(f"{path} is not a readable safetensors file ({err}); delete it and recompute") from None
    version = stored.get("format_version")
    if stored.get("kind") != kind:
        raise StatsFileError(f"{path} is not an alphaedit_fast {kind} file (kind {stored.get('kind')!r})")
    if version != FORMAT_VERSION:
        raise StatsFileError(f"{path} has file format {version!r}, this version reads {FORMAT_VERSION!r}: "
                             "recompute it with this version of alphaedit_fast")
    if stored.get("checksum") != _checksum(stored, tensors):
        raise StatsFileError(f"{path} is corrupted (its checksum does not match its contents); "
                             "delete it and recompute")
    metadata: dict[str, object] = {"kind": kind}
    for key, value in stored.items():
        if key not in _ENVELOPE:
            try:
                metadata[key] = json.loads(value)
            except (ValueError, RecursionError):
                raise StatsFileError(f"{path}: metadata field {key!r} is not valid JSON; recompute the file") \
                    from None
    for key, expected in (fields or {}).items():
        if key not in metadata:
            raise StatsFileError(f"{path}: metadata field {key!r} is missing; recompute the file")
        if not _conforms(metadata[key], expected):
            raise StatsFileError(f"{path}: metadata field {key!r} = {_short(metadata[key])} is not "
                                 f"{getattr(expected, '__name__', expected)}; recompute the file")
    return tensors, metadata


def require_tensors(path, tensors: dict[str, torch.Tensor], names: list[str]) -> None:
    """StatsFileError unless the file's tensors are exactly `names`."""
    if sorted(tensors) != sorted(names):
        raise StatsFileError(f"{path} holds tensors {_short(sorted(tensors))}, expected {_short(sorted(names))}; "
                             "recompute the file")


def _conforms(value, expected) -> bool:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is None or expected is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _conforms(v, args[1]) for k, v in value.items())
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _short(value) -> str:
    return reprlib.repr(value)  # bounded in length and depth


def write_directory(dest: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a new temporary sibling of `dest`, then put it in place of `dest`:
    a failure (or a kill) leaves the old `dest` as it was and no finished half of the new one."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        write(tmp)
        # what mkdtemp, mkstemp and some writers (safetensors shards in transformers 5) make 0700 / 0600
        # gets the permissions a plain open() or mkdir() would: the umask's
        for path in [tmp, *tmp.rglob("*")]:
            if not path.is_symlink():
                os.chmod(path, umask_mode(0o777 if path.is_dir() else 0o666))
        replace_directory(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def replace_directory(new: Path, dest: Path) -> None:
    """Move directory `new` to `dest` (same file system), removing an old `dest`.

    On Linux the two are swapped in one atomic step (renameat2 RENAME_EXCHANGE), so `dest` is
    always the old or the new directory; elsewhere the old one is first renamed aside to
    `.NAME.old-*`, where a kill in the instant between the two renames would leave it.
    """
    if not dest.exists():
        os.rename(new, dest)
    elif _exchange(new, dest):
        shutil.rmtree(new)  # now the old directory
    else:
        aside = dest.parent / f".{dest.name}.old-{os.getpid()}-{os.urandom(4).hex()}"
        os.rename(dest, aside)
        os.rename(new, dest)
        shutil.rmtree(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def model_fingerprint(model: torch.nn.Module, module_names: list[str]) -> str:
    """sha256 over the first MiB of the input embedding and of each named module's weight (the
    config is left out: saving and reloading a model rewrites some of its fields)."""
    weights = [(name, get_module(model, name).weight) for name in module_names]
    return _digest(model, [("embedding", model.get_input_embeddings().weight), *weights])


def base_fingerprint(model: torch.nn.Module, rewrite_names: list[str]) -> str:
    """Like `model_fingerprint`, over what AlphaEdit never changes: the input embedding and
    every parameter of each rewrite module's parent (the MLP: its input projections, biases)
    except the rewrite weights themselves. Equal for a model and all its edited descendants, so
    a projector computed once from the unedited model's statistics is recognised at any point of
    sequential editing, while another model (other seed, other fine-tune) is not."""
    tensors = [("embedding", model.get_input_embeddings().weight)]
    for name in rewrite_names:
        parent_name, _, leaf = name.rpartition(".")
        parent = get_module(model, parent_name) if parent_name else model
        tensors += [(f"{parent_name}.{p}", t) for p, t in parent.named_parameters() if p != f"{leaf}.weight"]
    return _digest(model, tensors)


FINGERPRINT_ELEMENTS = 1 << 18


def _digest(model: torch.nn.Module, tensors: list[tuple[str, torch.Tensor]]) -> str:
    """Over the values, not their storage: the first FINGERPRINT_ELEMENTS of each tensor as fp32, so an
    fp16 checkpoint has the same fingerprint loaded in fp16 or fp32 (edit on a GPU, continue on a CPU)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, weight in tensors:
        weight = weight.detach()
        digest.update(f"{name}:{tuple(weight.shape)}".encode())
        digest.update(weight.reshape(-1)[:FINGERPRINT_ELEMENTS].float().cpu().numpy().tobytes())
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
