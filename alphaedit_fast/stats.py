"""Key statistics (DESIGN step 6): sum of k k^T over a corpus's tokens for every edited layer.

One truncated forward pass per batch serves all layers; padding tokens are excluded; sums are
kept in fp32 (or fp64) on each layer's device. Partial sums are checkpointed atomically, so a
killed run restarts where it stopped and gives the same result. Under `torch.distributed`
(`torchrun`), ranks take disjoint batches (batch i goes to rank i mod world) and the sums are
all-reduced once at the end.
"""

from __future__ import annotations

import itertools
import json
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .arch import get_module, key_width, max_positions
from .errors import InvalidRequestError, require_finite
from .modelstate import frozen
from .ops import second_moment_update_
from .positions import pad_right, pad_token_id
from .storage import (
    StatsFileError,
    base_fingerprint,
    file_fingerprint,
    load_tensors,
    model_fingerprint,
    require_tensors,
    save_tensors,
)
from .trace import read_modules

STATS_KIND, PARTIAL_KIND = "key-stats", "key-stats-partial"


def iter_documents(corpus: str | Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a plain text file (one per non-empty line), a JSONL file (`text_field` of
    each record) or a `datasets` dataset saved with `save_to_disk` (a directory)."""
    path = Path(corpus)
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise InvalidRequestError(f"{path} is a directory: reading a saved dataset needs `pip install datasets`") \
                from None
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
        for record in dataset:
            yield record[text_field]
        return
    if not path.exists():
        raise InvalidRequestError(f"corpus {path} does not exist")
    jsonl = path.suffix in (".jsonl", ".json")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InvalidRequestError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start} of the "
                                          "line); convert the corpus to UTF-8") from None
            if not line.strip():
                continue
            if not jsonl:
                yield line.strip()
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
                raise InvalidRequestError(f"{path}:{number}: expected a JSON object with a {text_field!r} string") \
                    from None
            if not isinstance(text, str):
                raise InvalidRequestError(f"{path}:{number}: {text_field!r} must be a string")
            yield text


def cached_statistics(model, tok, corpus: str | Path, layers: list[int], rewrite_module_tmp: str, max_tokens: int,
                      directory: str | Path, max_length: int = 512, progress: bool = True) -> KeyStatistics:
    """`collect_statistics` of `layers` over `corpus`, kept in `directory` under a name made of the
    model's fingerprint (of those layers), the corpus's and the token budget; a later call with
    the same model, corpus, layers and budget reads the file instead."""
    names = [rewrite_module_tmp.format(l) for l in layers]
    path = Path(directory) / (f"{model_fingerprint(model, names)[:16]}-{file_fingerprint(corpus)[:16]}-{max_tokens}-"
                              f"{max_length}.safetensors")
    if path.is_file():
        if progress:
            print(f"key statistics: cached {path}", flush=True)
        return KeyStatistics.load(path, model, corpus)
    if progress:
        print(f"key statistics of layers {layers} over {max_tokens} tokens of {corpus}", flush=True)
    stats = collect_statistics(model, tok, corpus, layers, rewrite_module_tmp, max_tokens=max_tokens,
                               max_length=max_length, batch_tokens=4096, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    return stats


def sample_corpus(model, tok, path: str | Path, n_tokens: int, seed: int = 0, length: int = 128,
                  batch_size: int = 64, progress: bool = False) -> Path:
    """Write about `n_tokens` tokens of text sampled from `model` (nucleus sampling, p = 0.95, from
    its BOS token; one document of `length` tokens per line, `batch_size` documents at a time) to
    `path`: a corpus for key statistics when no text is at hand. The draws come from a generator
    seeded with `seed` (the global one is left alone): the same seed and batch size, the same text."""
    from transformers import LogitsProcessor, LogitsProcessorList

    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise InvalidRequestError("the tokenizer has neither a BOS nor an EOS token to start sampling from")
    device = model.get_input_embeddings().weight.device
    ends = (tok.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    banned = torch.tensor(sorted({t for end in ends for t in (end if isinstance(end, list) else [end])
                                  if t is not None}), dtype=torch.long)

    class Sample(LogitsProcessor):
        """Draws each row's next token (`top_p_sample`, no end of text before `length` tokens) and
        leaves only it: `generate` runs greedy and keeps the model's own cache handling."""

        def __init__(self):
            self.generator = None  # made on the device of the logits (the last one under a device map)

        def __call__(self, input_ids, scores):
            if self.generator is None:
                self.generator = torch.Generator(device=scores.device).manual_seed(seed)
            scores = scores.float().index_fill(1, banned.to(scores.device), float("-inf"))
            chosen = top_p_sample(scores, 0.95, self.generator)
            return torch.full_like(scores, float("-inf")).scatter_(1, chosen[:, None], 0.0)

    sampler = LogitsProcessorList([Sample()])  # one stream of draws over every batch
    lines, total = [], 0
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="sampling text", disable=not progress)
    try:
        while total < n_tokens:
            ids = torch.full((batch_size, 1), start, dtype=torch.long, device=device)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     logits_processor=sampler, max_new_tokens=length,
                                     min_new_tokens=length, pad_token_id=start)
            for row in out[:, 1:]:
                text = " ".join(tok.decode(row, skip_special_tokens=True).split())
                if text:
                    lines.append(text)
            total += out[:, 1:].numel()
            bar.update(out[:, 1:].numel())
    finally:
        bar.close()
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


def top_p_sample(logits: torch.Tensor, top_p: float, generator: torch.Generator | None = None,
                 k: int = 4096) -> torch.Tensor:
    """One token per row of `logits` (rows, vocab), drawn from the row's nucleus: the most probable
    tokens, most probable first, up to the first whose cumulative probability reaches `top_p` (at
    least one; transformers' top-p rule), renormalised. Only rows whose nucleus reaches past their
    `k` most probable tokens are sorted whole. (SmolLM2-135M sampling from BOS, p = 0.95, 64 rows:
    transformers' top-p sorts the 49,152 logits of every row, 0.5 s a step on one busy core, as
    long as the forward pass; here 2% of the rows reach past the top 4,096, 0.08 s.)"""
    probs = logits.float().softmax(-1)
    values, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
    wide = values.sum(-1) < top_p
    if not bool(wide.any()):
        return _draw_nucleus(values, ids, top_p, generator)
    tokens = torch.empty(len(probs), dtype=torch.long, device=probs.device)
    if not bool(wide.all()):
        tokens[~wide] = _draw_nucleus(values[~wide], ids[~wide], top_p, generator)
    tokens[wide] = _draw_nucleus(*probs[wide].sort(dim=-1, descending=True), top_p, generator)
    return tokens


def _draw_nucleus(probs: torch.Tensor, ids: torch.Tensor, top_p: float, generator) -> torch.Tensor:
    """`top_p_sample` on probabilities sorted in descending order (`ids`: their tokens)."""
    kept = probs * ((probs.cumsum(-1) - probs) < top_p)
    return ids.gather(-1, torch.multinomial(kept, 1, generator=generator))[:, 0]


def token_batches(tok, documents: Iterable[str], max_length: int, batch_tokens: int,
                  max_tokens: int | None = None) -> Iterator[list[list[int]]]:
    """Batches of token lists: each document truncated to `max_length` tokens, a batch holding
    at most `batch_tokens` padded tokens, all stopping once `max_tokens` real tokens are out."""
    budget = max_tokens if max_tokens is not None else float("inf")
    batch: list[list[int]] = []
    for chunk in _chunks(documents, 256):
        for ids in tok(chunk)["input_ids"]:
            ids = ids[: int(min(max_length, budget))]
            if not ids:
                continue
            if batch and (len(batch) + 1) * max(max(map(len, batch)), len(ids)) > batch_tokens:
                yield batch
                batch = []
            batch.append(ids)
            budget -= len(ids)
            if budget <= 0:
                yield batch
                return
    if batch:
        yield batch


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@dataclass
class KeyStatistics:
    """Sums of k k^T (d_k, d_k) per layer over `count` tokens, and where they came from."""

    sums: dict[int, torch.Tensor]
    count: int
    metadata: dict[str, object] = field(default_factory=dict)

    def covariance(self, layer: int) -> torch.Tensor:
        """E[k k^T] at `layer`: (d_k, d_k), what the original's `get_cov` returns."""
        return self.sums[layer] / self.count

    def save(self, path: str | Path) -> Path:
        return save_tensors(path, {f"layer.{l}.sum": s for l, s in self.sums.items()},
                            {**self.metadata, "kind": STATS_KIND, "count": self.count})

    @classmethod
    def load(cls, path: str | Path, model=None, corpus: str | Path | None = None) -> KeyStatistics:
        """Read and check a statistics file: against `model`'s weights and `corpus` when given."""
        tensors, metadata = load_tensors(path, STATS_KIND, STATS_FIELDS)
        layers = metadata["layers"]
        require_tensors(path, tensors, [f"layer.{l}.sum" for l in layers])
        if metadata["count"] <= 0:
            raise StatsFileError(f"{path}: token count {metadata['count']} must be positive; recompute the file")
        if model is not None:
            names = [metadata["rewrite_module_tmp"].format(l) for l in layers]
            if model_fingerprint(model, names) != metadata["model_fingerprint"]:
                raise StatsFileError(f"{path} was computed for another model or other weights "
                                     f"({metadata['model']!r}); recompute the statistics for this model")
        if corpus is not None and file_fingerprint(corpus) != metadata["corpus_fingerprint"]:
            raise StatsFileError(f"{path} was computed on another corpus ({metadata['corpus']!r})")
        sums = {l: tensors[f"layer.{l}.sum"] for l in layers}
        for layer, s in sums.items():
            if s.ndim != 2 or s.shape[0] != s.shape[1]:
                raise StatsFileError(f"{path}: the sum of layer {layer} has shape {tuple(s.shape)}, not (d_k, d_k)")
            require_finite(s, f"statistics of layer {layer} in {path}")
        return cls(sums, metadata["count"], metadata)


# what every statistics file must say about itself (load_tensors checks the types)
STATS_FIELDS = {"count": int, "layers": list[int], "rewrite_module_tmp": str, "model": str,
                "model_fingerprint": str, "base_fingerprint": str, "corpus": str, "corpus_fingerprint": str}
PARTIAL_FIELDS = {"count": int, "next_batch": int, "config": dict[str, object]}


def read_original_stats(path: str | Path) -> tuple[torch.Tensor, int]:
    """(E[k k^T], token count) from the original's `layer_stats` `.npz`, without unpickling."""
    try:
        with np.load(path, allow_pickle=False) as data:
            prefix = "mom2." if "mom2.mom2" in data.files else ""
            if prefix + "mom2" not in data.files or prefix + "count" not in data.files:
                raise StatsFileError(f"{path} holds no second moment (it has {data.files})")
            total, count = np.array(data[prefix + "mom2"]), int(data[prefix + "count"])
    except FileNotFoundError:
        raise StatsFileError(f"{path} does not exist") from None
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise StatsFileError(f"{path} is not a readable .npz file (truncated or corrupted: {err})") from None
    except ValueError as err:  # numpy refuses object (pickled) arrays with allow_pickle=False
        raise StatsFileError(f"{path} is not a plain numeric .npz file ({err}); it is never unpickled: "
                             "write it again with the original's layer_stats") from None
    cov = torch.from_numpy(total) / count
    require_finite(cov, f"statistics in {path}")
    return cov, count


def collect_statistics(model, tok, corpus: str | Path, layers: list[int], rewrite_module_tmp: str, *,
                       max_tokens: int | None = None, max_length: int = 512, batch_tokens: int = 8192,
                       precision: torch.dtype = torch.float32, checkpoint_dir: str | Path | None = None,
                       checkpoint_every: int = 50, text_field: str = "text", progress: bool = True,
                       on_batch: Callable[[int], None] | None = None) -> KeyStatistics:
    """Sum of k k^T of the inputs of `rewrite_module_tmp.format(l)` for every l in `layers`.

    max_tokens: token budget (None: the whole corpus); max_length: tokens per document (at most
    the model's position range); batch_tokens: padded tokens per batch; precision: fp32 or fp64
    sums. With `checkpoint_dir`, each rank writes its partial sums every `checkpoint_every` of its
    batches, and a restart (with the same number of ranks) picks them up.
    `on_batch(i)` is called after batch i (tests use it to interrupt a run).
    """
    import torch.distributed as dist

    if not Path(corpus).exists():
        raise InvalidRequestError(f"corpus {corpus} does not exist")
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    max_length = min(max_length, max_positions(model) or max_length)
    names = [rewrite_module_tmp.format(l) for l in layers]
    modules = [get_module(model, n) for n in names]
    metadata = {
        "model": str(getattr(model.config, "_name_or_path", "")), "model_fingerprint": model_fingerprint(model, names),
        "base_fingerprint": base_fingerprint(model, names),
        "layers": list(layers), "rewrite_module_tmp": rewrite_module_tmp, "corpus": str(corpus),
        "corpus_fingerprint": file_fingerprint(corpus), "max_tokens": max_tokens, "max_length": max_length,
        "batch_tokens": batch_tokens, "precision": str(precision), "model_dtype": str(modules[0].weight.dtype),
        "library_version": _version(),
    }
    sums = {l: torch.zeros(key_width(m), key_width(m), dtype=precision, device=m.weight.device)
            for l, m in zip(layers, modules)}
    count, start, batches, processed = 0, 0, 0, 0
    partial = Path(checkpoint_dir) / f"partial-rank{rank}-of{world}.safetensors" if checkpoint_dir else None
    if partial is not None and partial.exists():
        tensors, meta = load_tensors(partial, PARTIAL_KIND, PARTIAL_FIELDS)
        if meta["config"] != metadata:
            raise StatsFileError(f"{partial} belongs to another run (model, corpus or settings differ); "
                                 "delete it or choose another checkpoint directory")
        require_tensors(partial, tensors, [f"layer.{l}.sum" for l in layers])
        for l in layers:
            if tensors[f"layer.{l}.sum"].shape != sums[l].shape or min(meta["count"], meta["next_batch"]) < 0:
                raise StatsFileError(f"{partial} is inconsistent (shapes or counts); delete it and rerun")
            sums[l].copy_(tensors[f"layer.{l}.sum"])
        count, start = meta["count"], meta["next_batch"]

    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="stats", disable=not progress or rank != 0)
    with frozen(model):
        for index, batch in enumerate(token_batches(tok, iter_documents(corpus, text_field), max_length,
                                                    batch_tokens, max_tokens)):
            tokens, batches = sum(map(len, batch)), index + 1
            if index >= start and index % world == rank:
                add_batch_moments(model, batch, pad_token_id(tok), {name: sums[l] for name, l in zip(names, layers)})
                count, processed = count + tokens, processed + 1
                if partial is not None and processed % checkpoint_every == 0:
                    _save_partial(partial, sums, count, batches, metadata)
                if on_batch is not None:
                    on_batch(index)
            bar.update(tokens)
    bar.close()
    if partial is not None:  # the finished state: a rerun returns at once with the same sums
        _save_partial(partial, sums, count, batches, metadata)
    if distributed:
        total = torch.tensor([count], dtype=torch.float64, device=sums[layers[0]].device)
        dist.all_reduce(total)
        count = int(total.item())
        for l in layers:
            dist.all_reduce(sums[l])
    if count == 0:
        raise InvalidRequestError(f"corpus {corpus} produced no tokens")
    for l in layers:
        require_finite(sums[l], f"statistics of layer {l}")
    return KeyStatistics(sums, count, {**metadata, "count": count})


def add_batch_moments(model, batch: list[list[int]], pad_id: int, sums: dict[str, torch.Tensor]) -> int:
    """One truncated forward pass over `batch` (token lists, right-padded here) adding k k^T of
    the real tokens' inputs of every module `name` to `sums[name]`; returns the token count.
    Used by `collect_statistics` and by `integrations.patch_original` (the original's corpus)."""
    input_ids, mask = pad_right(batch, pad_id, model.get_input_embeddings().weight.device)
    read_modules(model, input_ids, mask, {name: second_moment_reader(acc, mask) for name, acc in sums.items()})
    return sum(map(len, batch))


def second_moment_reader(acc: torch.Tensor, mask: torch.Tensor):
    """A `read_modules` reader adding k k^T of the real tokens' (mask (batch, seq)) inputs to acc (d, d)."""
    def reader(x, output):
        rows = x[mask.to(x.device).bool()]  # real tokens only
        second_moment_update_(acc, rows)

    return reader


def _save_partial(path: Path, sums, count: int, next_batch: int, metadata) -> None:
    save_tensors(path, {f"layer.{l}.sum": s for l, s in sums.items()},
                 {"kind": PARTIAL_KIND, "count": count, "next_batch": next_batch, "config": metadata})


def _version() -> str:
    from . import __version__

    return __version__
