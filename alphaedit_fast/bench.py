"""Editing throughput per phase: the reference path against the fast path on random models of
fixed shapes, or the fast path on the user's own model and requests.

`alphaedit-fast bench` runs this and writes JSON (medians over repeats, ratios measured in the
same run, with the machine, versions and date) to `--out`, by default under
`~/.cache/alphaedit_fast/bench` (`make bench` writes the project's `benchmarks/results`).
"""

from __future__ import annotations

import copy
import datetime
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .arch import get_module, key_width
from .editor import AlphaEditor
from .errors import InvalidArgumentError
from .hparams import AlphaEditHyperParams
from .modelstate import restored
from .projector import basis_from_projector
from .reference import apply_alphaedit_ref
from .solve import ProjectedSolver, dense_update, woodbury_absorb
from .storage import cache_root
from .templates import get_context_templates
from .tiny import tiny_model, tiny_tokenizer_for
from .values import z_step_tokens

# name -> (family, config overrides, edited layers)
SHAPES: dict[str, tuple[str, dict, list[int]]] = {
    "a-gpt2-6x128": ("gpt2", dict(n_layer=6, n_embd=128, n_inner=512, n_head=4, vocab_size=50257,
                                           n_positions=1024), [2, 3, 4]),
    "b-gpt2-small": ("gpt2", dict(n_layer=12, n_embd=768, n_inner=3072, n_head=12, vocab_size=50257,
                                           n_positions=1024),
                     [3, 4, 5, 6, 7]),
    "c-llama-8x512": ("llama", dict(num_hidden_layers=8, hidden_size=512, intermediate_size=1376,
                                    num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                                    max_position_embeddings=2048), [2, 3, 4]),
    "llama3-8b": ("llama", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                rope_theta=500000.0, max_position_embeddings=8192), [4, 5, 6, 7, 8]),
}
# whole-rows: every z step over whole rows; early-stop: the fast path with ENCORE's early stopping
# (`"early_stop_top1"`, the hparams' own value or EARLY_STOP_TOP1), not the original's result
EDIT_PATHS = ("reference", "fast", "fast-whole-rows", "fast-early-stop")
EARLY_STOP_TOP1 = 2
CONTEXT_TEMPLATES = [["{}"], ["The first thing. {}", "Therefore it is. {}", "Because of this. {}",
                              "I think that. {}", "You know what. {}"]]
_SUBJECTS = ["Danielle Darrieux", "Toko Yasuda", "Michel Denisot", "Pervez Musharraf", "Edwin of Northumbria",
             "Thomas Joannes Stieltjes", "Anaal Nathrakh", "Apple A5"]
_PROMPTS = ["The mother tongue of {} is", "{} plays the", "{} works for", "{} is a citizen of", "{} was born in"]
_TARGETS = ["English", "piano", "Google", "Sweden", "Paris", "French", "violin", "London"]


def synthetic_requests(n: int) -> list[dict]:
    """n distinct requests built from a few subjects, prompts and targets."""
    combos = itertools.islice(itertools.product(_PROMPTS, _SUBJECTS), n)
    return [{"case_id": i, "prompt": p, "subject": s + ("" if i < 40 else f" {i}"),
             "target_new": {"str": _TARGETS[i % len(_TARGETS)]}} for i, (p, s) in enumerate(combos)]


def bench_model(shape: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    family, overrides, layers = SHAPES[shape]
    model = tiny_model(family, initializer_range=0.02, dtype=dtype, device=device, **overrides)
    hparams = AlphaEditHyperParams.for_model(model, layers=layers, v_num_grad_steps=20)
    return model, tiny_tokenizer_for(family), hparams


def random_bases(n_layers: int, d_k: int, device, null_fraction: float = 0.5, seed: int = 0) -> list[torch.Tensor]:
    """Random orthonormal null-space bases (d_k, r = null_fraction * d_k), one per layer.

    Only their shape matters for timing; a QR on the device is quick even at d_k = 14336.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    r = int(null_fraction * d_k)
    return [torch.linalg.qr(torch.randn(d_k, r, generator=gen, device=device))[0] for _ in range(n_layers)]


def _median_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    import transformers

    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def bench_edit(shape: str, n_edits: int, repeats: int = 3, paths=("reference", "fast"), device: str = "cpu",
               dtype: torch.dtype = torch.float32, null_fraction: float = 0.5, batch_size: int | None = None,
               report: Callable[[str], None] | None = None) -> dict:
    """`time_edits` of `n_edits` synthetic requests on a random model of `shape`."""
    if report:
        report(f"bench {shape}: building the model ...")
    model, tok, hparams = bench_model(shape, device, dtype)
    result = time_edits(model, tok, synthetic_requests(n_edits), hparams, CONTEXT_TEMPLATES, paths, repeats,
                        batch_size, null_fraction, report, label=shape)
    return {"shape": shape, **result}


def bench_user_model(model, tok, requests: list[dict], hparams: AlphaEditHyperParams, name: str, paths=("fast",),
                     repeats: int = 3, batch_size: int | None = None, null_fraction: float = 0.5,
                     report: Callable[[str], None] | None = None, bases: list[torch.Tensor] | None = None,
                     cases: tuple[str, list[dict]] | None = None) -> dict:
    """`time_edits` of the user's `requests` on the user's `model`, with the context templates
    `alphaedit-fast edit` uses (generated once, before timing)."""
    if report:
        report(f"bench {name}: generating context templates ...")
    context_templates = get_context_templates(model, tok)
    result = time_edits(model, tok, requests, hparams, context_templates, paths, repeats, batch_size,
                        null_fraction, report, label=name, bases=bases, cases=cases)
    return {"model": name, "context_templates": context_templates, **result}


def time_edits(model, tok, requests: list[dict], hparams: AlphaEditHyperParams, context_templates,
               paths=("fast",), repeats: int = 3, batch_size: int | None = None, null_fraction: float = 0.5,
               report: Callable[[str], None] | None = None, label: str = "bench",
               bases: list[torch.Tensor] | None = None, cases: tuple[str, list[dict]] | None = None) -> dict:
    """Median seconds per phase of editing `requests` in batches of `batch_size` (default: one
    batch), for each path ("reference", "fast", "fast-whole-rows", "fast-early-stop"), every run
    from the same weights, under `bases` (default: a random null space of `null_fraction` of the
    key width). Also the peak memory per phase, the token slots of the first z step, speed-ups
    between paths, and with `report` a progress line as each run starts and ends (the fast path
    adds its own per phase). `cases` ((schema, records) of `evaluation.load_cases`, one per
    request): each path's first run is scored after its last batch (`quality`, the rates of
    `evaluation.summarize`), and early stopping's speed-up comes with its rates' difference."""
    unknown = sorted(set(paths) - set(EDIT_PATHS))
    if unknown:
        raise InvalidArgumentError(f"unknown bench path(s) {unknown}; give some of {', '.join(EDIT_PATHS)}")
    modules = [get_module(model, hparams.rewrite_module_tmp.format(layer)) for layer in hparams.layers]
    d_k = key_width(modules[0])
    device = model.get_input_embeddings().weight.device
    bases = bases if bases is not None else random_bases(len(hparams.layers), d_k, modules[0].weight.device,
                                                         null_fraction)
    size = batch_size or len(requests)
    batches = [requests[i : i + size] for i in range(0, len(requests), size)]
    tokens: dict[str, int] = {}
    for batch in batches:
        for kind, count in z_step_tokens(model, tok, batch, hparams, context_templates).items():
            tokens[kind] = tokens.get(kind, 0) + count
    result = {"edits": len(requests), "batch_size": size, "repeats": repeats, "d_k": d_k, "null_dim": bases[0].shape[1],
              "layers": hparams.layers, "dtype": str(next(model.parameters()).dtype), "device": str(device),
              "paths": {}, "z_step_tokens": tokens, "peak_memory_bytes": {}}
    for path in paths:
        runs, peaks = [], {}
        for run in range(repeats):
            what = f"{label} {path} run {run + 1}/{repeats}"
            if report:
                report(f"{what} ..." + (" (one request at a time: slow)" if path == "reference" else ""))
            with restored([m.weight for m in modules]):
                timings = _edit_once(model, tok, batches, hparams, context_templates, bases, path, peaks,
                                     progress=report is not None)
                if cases is not None and run == 0:
                    from .evaluation import score_cases, summarize

                    schema, records = cases
                    scored = summarize(score_cases(model, tok, records, schema), schema)
                    quality = {k: scored[k] for k in ("nll_rates", "margins", "accuracy")}
                    result.setdefault("quality", {})[path] = quality
            runs.append(timings)
            if report:
                report(f"{what}: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
        med = _median_phases(runs)
        med["edits_per_s"] = len(requests) / med["total"]
        result["paths"][path], result["peak_memory_bytes"][path] = med, peaks
    if "reference" in result["paths"] and "fast" in result["paths"]:
        ref, fast = result["paths"]["reference"], result["paths"]["fast"]
        result["speedup"] = {k: ref[k] / fast[k] for k in ("z", "keys", "solve", "cache update", "total")}
    if "fast-whole-rows" in result["paths"] and "fast" in result["paths"]:
        whole, fast = result["paths"]["fast-whole-rows"], result["paths"]["fast"]
        result["suffix_only_speedup"] = {k: whole[k] / fast[k] for k in ("z", "total")}
    if "fast-early-stop" in result["paths"] and "fast" in result["paths"]:
        early, fast = result["paths"]["fast-early-stop"], result["paths"]["fast"]
        result["early_stop"] = {"early_stop_top1": _early_stop_hparams(hparams).early_stop_top1,
                                "speedup": {k: fast[k] / early[k] for k in ("z", "total")}}
        quality = result.get("quality", {})
        if "fast" in quality and "fast-early-stop" in quality:
            result["early_stop"]["rate_difference"] = {
                family: {k: _difference(quality["fast-early-stop"][family][k], v) for k, v in rates.items()}
                for family, rates in quality["fast"].items()}
    return result


def _early_stop_hparams(hparams: AlphaEditHyperParams) -> AlphaEditHyperParams:
    """`hparams` with early stopping on (its own `early_stop_top1`, else EARLY_STOP_TOP1)."""
    early = copy.deepcopy(hparams)
    early.extra["early_stop_top1"] = hparams.early_stop_top1 or EARLY_STOP_TOP1
    return early


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _edit_once(model, tok, batches: list[list[dict]], hparams: AlphaEditHyperParams, context_templates,
               bases: list[torch.Tensor], path: str, peaks: dict[str, int], progress: bool) -> dict[str, float]:
    """Seconds per phase (summed over the batches) and in total of one run of `path`, in place on `model`."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if path == "reference":
        d_k = bases[0].shape[0]
        P = torch.stack([u @ u.T for u in bases]).cpu()
        cache = torch.zeros(len(hparams.layers), d_k, d_k)
        for batch in batches:
            _, cache = apply_alphaedit_ref(model, tok, batch, hparams, context_templates, P, cache, timings=timings,
                                           peak_bytes=peaks)
    else:
        path_hparams = _early_stop_hparams(hparams) if path == "fast-early-stop" else copy.deepcopy(hparams)
        if path == "fast-whole-rows":  # every z step runs whole rows, as before suffix-only steps
            path_hparams.extra["z_suffix_only"] = False
        editor = AlphaEditor(model, tok, path_hparams, projector=bases, context_templates=context_templates,
                             progress=progress)
        for batch in batches:
            for phase, seconds in editor.edit(batch, peak_bytes=peaks).items():
                timings[phase] = timings.get(phase, 0.0) + seconds
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    timings["total"] = time.perf_counter() - start
    return timings


def bench_solve(d_k: int = 3072, d_model: int = 768, n_edits: int = 100, null_fraction: float = 0.5,
                repeats: int = 5, device: str = "cpu") -> dict:
    """One layer's solve: the original's dense form against the projected Cholesky and Woodbury."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(d_k, n_edits, generator=gen).to(device)
    resid = torch.randn(d_model, n_edits, generator=gen).to(device)
    x = torch.randn(d_k // 2, d_k, generator=gen)
    cache = (x.T @ x / d_k).to(device)
    basis = random_bases(1, d_k, device, null_fraction)[0]
    P = basis @ basis.T

    def timed(fn):
        return _median_seconds(fn, repeats, device), fn()

    t_dense, dense = timed(lambda: dense_update(P, keys, cache, resid, 10.0))
    result = {"d_k": d_k, "d_model": d_model, "edits": n_edits, "null_dim": basis.shape[1], "repeats": repeats,
              "device": device, "seconds": {"dense": t_dense}, "max_rel_diff_vs_dense": {}}
    for method in ("cholesky", "woodbury"):
        solver = ProjectedSolver([basis], 10.0, method, cache_proj=[basis.T @ cache @ basis])
        solver.update(0, keys, resid)  # Woodbury's (Cp + l2 I)^-1 is kept across batches: built once here
        seconds, out = timed(lambda s=solver: s.update(0, keys, resid))
        result["seconds"][method] = seconds
        result["max_rel_diff_vs_dense"][method] = ((out - dense).norm() / dense.norm()).item()
    # Woodbury keeps (Cp + l2 I)^-1 up to date: its per-batch price is this rank-n absorb.
    inv_m = solver._inverse(0)
    result["seconds"]["woodbury_absorb"], _ = timed(lambda: woodbury_absorb(inv_m, (basis.T @ keys).double()))
    # Factoring a dense P (fp32, as the original stores it) into U: full eigh against the range QR
    P32 = P.float()
    t_eigh, (evals, evecs) = timed(lambda: torch.linalg.eigh(P32.double() if device == "cpu" else P32))
    t_range, factored = timed(lambda: basis_from_projector(P32, tolerance=1e-3))
    result["seconds"]["factor_P_eigh"], result["seconds"]["factor_P_range_qr"] = t_eigh, t_range
    # the same update from either basis, solved in fp64 so that only the bases differ
    c64, k64, r64 = cache.double(), keys.double(), resid.double()
    updates = [ProjectedSolver([u], 10.0, "cholesky", torch.float64, [u.T @ c64 @ u]).update(0, k64, r64)
               for u in (evecs[:, evals > 0.5].double(), factored.double())]
    result["factor_P_update_rel_diff_vs_eigh"] = ((updates[1] - updates[0]).norm() / updates[0].norm()).item()
    result["speedup"] = {m: t_dense / result["seconds"][m] for m in ("cholesky", "woodbury")}
    result["speedup"]["factor_P"] = t_eigh / t_range
    result["speedup"]["woodbury_with_absorb"] = t_dense / (result["seconds"]["woodbury"]
                                                           + result["seconds"]["woodbury_absorb"])
    return result


def default_results_dir() -> Path:
    """Where `alphaedit-fast bench` writes without --out: $XDG_CACHE_HOME (default ~/.cache)/alphaedit_fast/bench,
    outside any source tree."""
    return cache_root() / "bench"


def write_results(name: str, payload: dict, out_dir: str | Path | None = None) -> Path:
    """`payload` with the machine's description as `out_dir/name.json` (default `default_results_dir()`)."""
    out = Path(out_dir) if out_dir is not None else default_results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


def _median_seconds(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (autotuning, allocations)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_ops(device: str = "cpu", d: int = 14336, rows: int = 600, seq: int = 32, n_segments: int = 100,
              dtype: torch.dtype = torch.bfloat16, repeats: int = 20) -> dict:
    """GB/s of the hot ops per backend at Llama-3-8B key width (d_k = 14336): 100 requests x 6
    templates rows of `seq` tokens. Bytes counted: what each op must read and write (the
    second-moment update, a GEMM, is also reported in TFLOP/s)."""
    from . import ops

    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(rows, seq, d, generator=gen, device=device).to(dtype)
    positions = torch.randint(0, seq, (rows,), generator=gen, device=device)
    segments = torch.arange(rows, device=device) // max(rows // n_segments, 1) % n_segments
    weights = torch.rand(rows, generator=gen, device=device)
    delta = torch.randn(n_segments, d, generator=gen, device=device)
    x = torch.randn(4096, 4096, generator=gen, device=device).to(dtype)
    acc = torch.zeros(4096, 4096, device=device)
    elt = hidden.element_size()
    moved = {
        "gather_segment_mean": rows * d * elt + n_segments * d * 4,
        "add_at_positions": 2 * rows * seq * d * elt + rows * d * 4,
        "second_moment_update_": x.numel() * elt + 2 * acc.numel() * 4,
    }
    calls = {
        "gather_segment_mean": lambda: ops.gather_segment_mean(hidden, positions, segments, weights, n_segments),
        "add_at_positions": lambda: ops.add_at_positions(hidden, positions, segments, delta),
        "second_moment_update_": lambda: ops.second_moment_update_(acc, x),
    }
    backends = ["torch"] + (["ext"] if ops._ext_usable(hidden.device) else []) + \
        (["triton"] if device == "cuda" and ops._triton_usable(hidden.device) else [])
    result = {"device": device, "d": d, "rows": rows, "seq": seq, "dtype": str(dtype), "repeats": repeats,
              "gb_per_s": {}, "seconds": {}}
    previous = os.environ.get("ALPHAEDIT_BACKEND")
    try:
        for backend in backends:
            os.environ["ALPHAEDIT_BACKEND"] = backend
            for name, fn in calls.items():
                if name == "second_moment_update_" and backend != "torch":
                    continue  # one BLAS implementation for every backend
                seconds = _median_seconds(fn, repeats, device)
                result["seconds"][f"{name}/{backend}"] = seconds
                result["gb_per_s"][f"{name}/{backend}"] = moved[name] / seconds / 1e9
    finally:
        if previous is None:
            os.environ.pop("ALPHAEDIT_BACKEND", None)
        else:
            os.environ["ALPHAEDIT_BACKEND"] = previous
    seconds = result["seconds"]["second_moment_update_/torch"]
    result["second_moment_tflop_per_s"] = 2 * x.shape[0] * x.shape[1] ** 2 / seconds / 1e12
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    return result


def bench_stats(shape: str = "b-gpt2-small", corpus: str | None = None, max_tokens: int = 20000,
                device: str = "cpu", dtype: torch.dtype = torch.float32, max_length: int = 256,
                batch_tokens: int = 8192) -> dict:
    """Tokens/s of key statistics for all edited layers in one pass vs one pass per layer."""
    import tempfile

    from .stats import collect_statistics
    from .tiny import corpus as tiny_corpus

    model, tok, hparams = bench_model(shape, device, dtype)
    corpus_name = corpus or "built-in tiny corpus, 40-sentence paragraphs"
    with tempfile.TemporaryDirectory() as tmp:
        if corpus is None:
            corpus = str(Path(tmp) / "corpus.txt")
            sentences = tiny_corpus() * 40  # paragraphs of 40 sentences: documents longer than max_length
            Path(corpus).write_text("\n".join(" ".join(sentences[i : i + 40]) for i in range(0, len(sentences), 40)))
        settings = dict(max_tokens=max_tokens, max_length=max_length, batch_tokens=batch_tokens, progress=False)
        layers = hparams.layers

        def run(layer_sets):
            start = time.perf_counter()
            for layer_set in layer_sets:
                stats = collect_statistics(model, tok, corpus, layer_set, hparams.rewrite_module_tmp, **settings)
            if device == "cuda":
                torch.cuda.synchronize()
            return stats.count, time.perf_counter() - start

        tokens, one_pass = run([layers])
        _, per_layer = run([[layer] for layer in layers])
    return {"shape": shape, "layers": layers, "tokens": tokens, "device": device, "dtype": str(dtype),
            "corpus": corpus_name,
            "seconds": {"one_pass": one_pass, "per_layer_passes": per_layer},
            "tokens_per_s": {"one_pass": tokens / one_pass, "per_layer_passes": tokens / per_layer},
            "speedup": per_layer / one_pass}
