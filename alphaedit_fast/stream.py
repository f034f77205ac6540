"""A resumable stream of sequential edit batches (DESIGN "Scale"): a checkpoint after every batch.

A stream directory holds two files: `stream-projector.safetensors`, the editor's projector bases
(constant, written once when the stream starts), and `stream-checkpoint.safetensors`, replaced
atomically after every batch: the edited layers' weights, each layer's projected cache, how many
requests are done, the caller's progress record (`progress`, JSON) and the fingerprints of the
requests, the hyper-parameters and the unedited model. Resuming loads the same model, checks the
fingerprints, puts the checkpoint's weights back and rebuilds the editor from the two files, so
the batches after it compute exactly what an uninterrupted run computes (at the same number of
threads: a BLAS sums in another order on another count).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .arch import get_module
from .errors import AlphaEditError
from .storage import load_tensors, model_fingerprint, require_tensors, save_tensors

CHECKPOINT = "stream-checkpoint.safetensors"
PROJECTOR = "stream-projector.safetensors"
CHECKPOINT_KIND, PROJECTOR_KIND = "alphaedit-stream-checkpoint", "alphaedit-stream-projector"


class StreamMismatchError(AlphaEditError, ValueError):
    """A stream's checkpoint belongs to another request file, hyper-parameters, model or batch size,
    or a stream is started where one exists (or resumed where none does)."""


def fingerprint_of(value) -> str:
    """sha256 of the canonical JSON of `value` (requests, hyper-parameters, options)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def bases_fingerprint(bases: Sequence[torch.Tensor]) -> str:
    """sha256 of each basis's shape, first 2^20 values and column sums: which projector a stream edits under."""
    digest = hashlib.sha256()
    for basis in bases:
        basis = basis.detach().float().cpu()
        digest.update(f"{tuple(basis.shape)}".encode())
        digest.update(basis.reshape(-1)[: 1 << 20].numpy().tobytes())
        digest.update(basis.sum(0).numpy().tobytes())
    return digest.hexdigest()[:32]


def has_checkpoint(directory) -> bool:
    return (Path(directory) / CHECKPOINT).is_file()


def stream_directory(out) -> Path:
    """Where the stream of an edit whose result goes to directory `out` keeps its checkpoints:
    the sibling `OUT.stream` (so `out` itself changes only when the result is complete)."""
    out = Path(out)
    return out.with_name(out.name + ".stream")


@dataclass
class EditStream:
    """Checkpoints of `editor`'s sequential batches over `requests` in `directory`.

    `fingerprints` are what a resume must match besides the requests, hyper-parameters and model
    (e.g. {"batch_size": 100}); `done` counts the requests edited so far, `progress` is the
    caller's JSON record (scores so far, seconds), both restored by `resume`.
    """

    directory: Path
    editor: object  # AlphaEditor
    requests: Sequence[dict]
    fingerprints: dict[str, object]
    done: int = 0
    progress: dict = field(default_factory=dict)
    unedited: dict[str, torch.Tensor] = field(default_factory=dict)  # the edited layers' weights before the stream
    writes: bool = True  # False on every rank of a data-parallel edit but rank 0: only rank 0 writes

    @classmethod
    def start(cls, directory, editor, requests: Sequence[dict], writes: bool = True, **fingerprints) -> EditStream:
        """A new stream from the editor's current model and state; refused where a checkpoint exists.
        `writes=False`: keep count but write nothing (the ranks of a data-parallel edit but rank 0)."""
        directory = Path(directory)
        if writes and has_checkpoint(directory):  # (another rank may already have started it)
            raise StreamMismatchError(f"{directory} holds an edit stream's checkpoint: resume it (--resume), or "
                                      "choose another directory (or delete that one) to start a new stream")
        stream = cls(directory, editor, requests, _fingerprints(editor.model, editor.hparams, requests, fingerprints),
                     writes=writes)
        stream.unedited = stream._weights()
        if writes:
            bases = {f"layer.{l}.basis": u for l, u in zip(editor.hparams.layers, editor.solver.bases)}
            save_tensors(directory / PROJECTOR, bases, {"kind": PROJECTOR_KIND, "fingerprints": stream.fingerprints})
        stream.save()  # done = 0: a resume before the first batch finds the starting cache and edit count
        return stream

    @classmethod
    def resume(cls, directory, model, tok, hparams, requests: Sequence[dict], editor_options: dict | None = None,
               writes: bool = True, **fingerprints) -> EditStream:
        """The stream of `directory`, its editor rebuilt on `model` (loaded as when the stream
        started, unedited by it) with the checkpoint's weights put back. StreamMismatchError when
        the requests, hyper-parameters, model or `fingerprints` differ from the stream's."""
        from .editor import AlphaEditor
        from .validation import as_hparams

        directory, hparams = Path(directory), as_hparams(hparams)
        if not has_checkpoint(directory):
            raise StreamMismatchError(f"{directory} holds no edit stream to resume ({CHECKPOINT} is missing): "
                                      "start one without --resume")
        tensors, meta = load_tensors(directory / CHECKPOINT, CHECKPOINT_KIND, CHECKPOINT_FIELDS)
        expected = _fingerprints(model, hparams, requests, fingerprints)
        differ = [k for k in sorted(set(expected) | set(meta["fingerprints"]))
                  if expected.get(k) != meta["fingerprints"].get(k)]
        if differ:
            what = {"requests": "requests (file or --edits)", "hparams": "hyper-parameters",
                    "model": "model (its embedding or edited layers' weights)"}
            raise StreamMismatchError(f"the stream in {directory} was started with different "
                                      f"{', '.join(what.get(k, k) for k in differ)}: resume it with what started it, "
                                      "or start a new stream elsewhere")
        bases, projector_meta = load_tensors(directory / PROJECTOR, PROJECTOR_KIND, {"fingerprints": dict[str, str]})
        if projector_meta["fingerprints"] != meta["fingerprints"]:
            raise StreamMismatchError(f"{directory / PROJECTOR} belongs to another stream than {CHECKPOINT}")
        layers = hparams.layers
        require_tensors(directory / PROJECTOR, bases, [f"layer.{l}.basis" for l in layers])
        names = _names(hparams)
        missing = [k for k in [f"layer.{l}.cache_proj" for l in layers] + [f"weight.{n}" for n in names]
                   if k not in tensors]
        if missing:
            raise StreamMismatchError(f"{directory / CHECKPOINT} lacks {missing}: it is not this stream's checkpoint")
        if meta["threads"] != torch.get_num_threads():
            warnings.warn(f"the stream ran on {meta['threads']} threads and resumes on {torch.get_num_threads()}: "
                          "the remaining batches sum in another order and differ from an uninterrupted run at "
                          "rounding level", stacklevel=2)
        editor = AlphaEditor(model, tok, hparams, projector=[bases[f"layer.{l}.basis"] for l in layers],
                             context_templates=meta["context_templates"], **(editor_options or {}))
        stream = cls(directory, editor, requests, meta["fingerprints"], meta["done"], meta["progress"], writes=writes)
        stream.unedited = stream._weights()
        with torch.no_grad():
            for name in names:
                weight = get_module(model, name).weight
                weight.copy_(tensors[f"weight.{name}"].to(weight.device, weight.dtype))
        editor.solver.load_state_tensors(layers, tensors)
        editor.num_edits = meta["num_edits"]
        return stream

    def _weights(self) -> dict[str, torch.Tensor]:
        return {n: get_module(self.editor.model, n).weight.detach().clone() for n in _names(self.editor.hparams)}

    @property
    def finished(self) -> bool:
        return self.done >= len(self.requests)

    def batches(self, batch_size: int):
        """(start, stop) of each batch still to edit."""
        for start in range(self.done, len(self.requests), batch_size):
            yield start, min(start + batch_size, len(self.requests))

    def weight_change(self) -> dict[str, float]:
        """||W - W_0||_F of each edited weight since the stream started."""
        return weight_changes(self.editor.model, self.unedited)

    def save(self, done: int | None = None, progress: dict | None = None) -> Path:
        """Replace the checkpoint (atomically) with the model and editor now, `done` requests edited."""
        if done is not None:
            self.done = done
        if progress is not None:
            self.progress = progress
        if not self.writes:
            return self.directory / CHECKPOINT
        editor = self.editor
        tensors = {f"weight.{n}": get_module(editor.model, n).weight for n in _names(editor.hparams)}
        tensors.update(editor.solver.state_tensors(editor.hparams.layers))
        return save_tensors(self.directory / CHECKPOINT, tensors, {
            "kind": CHECKPOINT_KIND, "fingerprints": self.fingerprints, "done": self.done,
            "num_edits": editor.num_edits, "context_templates": editor.context_templates,
            "threads": torch.get_num_threads(), "progress": self.progress})


def weight_changes(model, unedited: dict[str, torch.Tensor]) -> dict[str, float]:
    """||W - W_0||_F of each named weight against `unedited` {module name: W_0}."""
    return {n: float((get_module(model, n).weight.detach().float() - w.float()).norm()) for n, w in unedited.items()}


def _fingerprints(model, hparams, requests, extra: dict) -> dict[str, str]:
    """What a resume must match: the requests, hyper-parameters, the model before the stream and `extra`."""
    return {"requests": fingerprint_of(list(requests)), "hparams": fingerprint_of(hparams.to_dict()),
            "model": model_fingerprint(model, _names(hparams)), **{k: fingerprint_of(v) for k, v in extra.items()}}


def _names(hparams) -> list[str]:
    return [hparams.rewrite_module_tmp.format(layer) for layer in hparams.layers]


CHECKPOINT_FIELDS = {"fingerprints": dict[str, str], "done": int, "num_edits": int,
                     "context_templates": list[list[str]], "threads": int, "progress": dict}
