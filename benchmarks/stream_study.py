#!/usr/bin/env python
"""The AlphaEdit paper's protocol on a real checkpoint: thousands of sequential CounterFact edits in
batches of 100, AlphaEdit against P = I against the unedited model, both metric families, fluency,
general capability (the original's glue_eval) and held-out perplexity every --every edits, the
edited weights' change norms and the retention of the first batch.

Each method is one resumable `alphaedit-fast eval` stream (run this script again after a kill: it
resumes). Work files (the records' slice, the held-out text, statistics, checkpoints, per-case
scores) go to --work; study.json, study.png and each method's metrics.json go to --out.

  python benchmarks/stream_study.py --model smollm2-135m --records 2000:2000 --batch-size 100 \\
      --every 500 --out benchmarks/results/study-smollm2-135m-2000 --work /tmp/study-2000
  python benchmarks/stream_study.py ... --report      # the curves so far, read from the checkpoints
  python benchmarks/stream_study.py ... --check-resume 100 --snapshots DIR   # kill + resume gives the same bits
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # stream_report
SHARED = ROOT.parent / "shared" / "data"
METHODS = {"alphaedit": "AlphaEdit", "identity": "P = I", "early": "AlphaEdit + early stopping",
           "anchor": "AlphaEdit + norm anchor", "early+anchor": "AlphaEdit + both"}
# the opt-in hyper-parameters of each variant (issue 32), on top of the model's preset
OPT_INS = {"early": {"early_stop_top1": 2}, "anchor": {"norm_anchor": "auto"},
           "early+anchor": {"early_stop_top1": 2, "norm_anchor": "auto"}}
PROJECTOR_FILE = "projector.safetensors"  # the null-space bases at the preset's threshold, made once


def prepare(args, work: Path) -> dict[str, Path]:
    """The records' slice (EasyEdit's flat schema), the held-out text (the corpus after what the
    statistics read) and the key statistics, in `work` (computed once)."""
    work.mkdir(parents=True, exist_ok=True)
    files = {"requests": work / "requests.json", "heldout": work / "heldout.txt",
             "stats": work / "key-stats.safetensors", "projector": work / PROJECTOR_FILE}
    if not files["requests"].exists():
        start, count = (int(x) for x in args.records.split(":"))
        records = json.loads(Path(args.requests).read_text())[start:start + count]
        files["requests"].write_text(json.dumps(records))
    if not files["heldout"].exists():  # the statistics read the corpus from its start: score its last part
        text = Path(args.corpus).read_text(encoding="utf-8")
        files["heldout"].write_text(text[-args.heldout_chars:])
    if not files["projector"].exists():
        from alphaedit_fast import AlphaEditHyperParams
        from alphaedit_fast.loading import load_model, resolve_model_name

        model, _ = load_model(resolve_model_name(args.model))
        hparams = AlphaEditHyperParams.for_model(model)
        del model
        if not files["stats"].exists():
            run(["stats", "--model", args.model, "--corpus", args.corpus, "--layers",
                 ",".join(map(str, hparams.layers)), "--max-tokens", str(args.stats_tokens), "--out",
                 str(work / "stats")])
            (work / "stats" / "key-stats.safetensors").rename(files["stats"])
        run(["projector", "--stats", str(files["stats"]), "--threshold", str(hparams.nullspace_threshold),
             "--out", str(files["projector"])])
    return files


def carry(work: Path, carried: Path, methods: list[str], into_work: bool) -> None:
    """Keep the streams' state in `carried` (a folder in the repository, so that a study outlives
    the machine it ran on), or put it back into `work` where `work` lacks it.

    Carried: the projector file and per method its checkpoint, compacted: the maintained inverses
    (fp64) are left out and each projected cache (symmetric) keeps its lower triangle. A resume from
    it recomputes the inverses by Cholesky and mirrors the cache, so its later batches differ from an
    uninterrupted run's at rounding level. The stream's own copy of the projector bases is rebuilt
    from the projector file (AlphaEdit) or the identity (P = I)."""
    import shutil

    from alphaedit_fast.projector import load_projector
    from alphaedit_fast.storage import load_tensors, save_tensors
    from alphaedit_fast.stream import CHECKPOINT, CHECKPOINT_KIND, PROJECTOR, PROJECTOR_KIND

    carried.mkdir(parents=True, exist_ok=True)
    if into_work and (carried / PROJECTOR_FILE).exists() and not (work / PROJECTOR_FILE).exists():
        work.mkdir(parents=True, exist_ok=True)
        shutil.copy(carried / PROJECTOR_FILE, work / PROJECTOR_FILE)
    if not into_work and (work / PROJECTOR_FILE).exists():
        shutil.copy(work / PROJECTOR_FILE, carried / PROJECTOR_FILE)
    for method in methods:
        stream, kept = work / method / "stream", carried / f"{method}-checkpoint.safetensors"
        if not into_work and (stream / CHECKPOINT).exists():
            tensors, meta = load_tensors(stream / CHECKPOINT, CHECKPOINT_KIND)
            compact = {k: v for k, v in tensors.items() if not k.endswith((".inverse", ".cache_proj"))}
            for name in (k for k in tensors if k.endswith(".cache_proj")):
                rows, cols = torch.tril_indices(*tensors[name].shape)
                compact[name + ".lower"] = tensors[name][rows, cols].contiguous()
            save_tensors(kept, compact, meta)
            print(f"{stream / CHECKPOINT} -> {kept}", flush=True)
        elif into_work and kept.exists() and not (stream / CHECKPOINT).exists():
            compact, meta = load_tensors(kept, CHECKPOINT_KIND)
            tensors = {k: v for k, v in compact.items() if not k.endswith(".lower")}
            projector = load_projector(work / PROJECTOR_FILE) if method != "identity" else None
            bases = {}
            for name in (k for k in compact if k.endswith(".cache_proj.lower")):
                r = int((math.isqrt(8 * compact[name].numel() + 1) - 1) // 2)
                rows, cols = torch.tril_indices(r, r)
                cache = torch.zeros(r, r, dtype=compact[name].dtype)
                cache[rows, cols] = compact[name]
                cache[cols, rows] = compact[name]
                tensors[name.removesuffix(".lower")] = cache
                layer = int(name.split(".")[1])
                bases[f"layer.{layer}.basis"] = (projector[layer].float().contiguous() if projector is not None
                                                 else torch.eye(r))
            stream.mkdir(parents=True, exist_ok=True)
            save_tensors(stream / PROJECTOR, bases, {"kind": PROJECTOR_KIND, "fingerprints": meta["fingerprints"]})
            save_tensors(stream / CHECKPOINT, tensors, meta)
            print(f"{kept} -> {stream}", flush=True)


def run(cli_args: list[str]) -> None:
    command = [sys.executable, "-m", "alphaedit_fast.cli", *cli_args]
    print("$ alphaedit-fast " + " ".join(cli_args), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def eval_arguments(args, files: dict[str, Path], method: str, out: Path) -> list[str]:
    """The `alphaedit-fast eval` arguments of `method`'s stream, its outputs in `out`."""
    projector = ["--projector", "identity" if method == "identity" else str(files["projector"])]
    hparams = ["--hparams", str(variant_hparams(args, method, out.parent))] if method in OPT_INS else []
    general = ["--general", args.general, "--general-data", args.general_data] if args.general != "none" else []
    return ["eval", "--model", args.model, "--requests", str(files["requests"]), *projector, *hparams,
            "--batch-size", str(args.batch_size), "--curve", "--curve-every", str(args.every),
            "--fluency-records", str(args.fluency_records), *general, "--general-every", str(args.every),
            "--perplexity", str(files["heldout"]), "--threads", str(args.threads),
            *(["--device", args.device] if args.device else []), "--out", str(out),
            *(["--resume"] if (out / "stream" / "stream-checkpoint.safetensors").exists() else [])]


def variant_hparams(args, method: str, work: Path) -> Path:
    """The hyper-parameters file of an opt-in variant: the model's preset with OPT_INS[method] (written once)."""
    path = work / f"hparams-{method}.json"
    if not path.exists():
        from alphaedit_fast import AlphaEditHyperParams
        from alphaedit_fast.loading import load_model, resolve_model_name

        model, _ = load_model(resolve_model_name(args.model))
        path.write_text(json.dumps({**AlphaEditHyperParams.for_model(model).to_dict(), **OPT_INS[method]}, indent=1))
    return path


def eval_method(args, files: dict[str, Path], method: str, work: Path) -> Path:
    out = work / method
    if not (out / "metrics.json").exists():
        run(eval_arguments(args, files, method, out))
    return out


def share_unedited(work: Path, source: str, target: str) -> bool:
    """Give `target`'s stream, stopped before its first edit, the unedited model's measurements that
    `source`'s stream made (scores, fluency, the 0-edit point, the first probe): the same computation
    on the same model, records and threads, so it is done once. Refused unless both streams have the
    same requests, model and settings (all but the projector and hyper-parameters) and the same unedited scores;
    False when `source` has not finished them yet."""
    from alphaedit_fast.storage import load_tensors, save_tensors
    from alphaedit_fast.stream import CHECKPOINT, CHECKPOINT_KIND

    path = work / target / "stream" / CHECKPOINT
    _, given = load_tensors(work / source / "stream" / CHECKPOINT, CHECKPOINT_KIND)
    tensors, meta = load_tensors(path, CHECKPOINT_KIND)
    ours, theirs = meta["progress"], given["progress"]
    if not (theirs.get("points") and theirs.get("probes")) or meta["done"] or ours.get("points"):
        return False
    # neither the projector nor the hyper-parameters change anything measured before the first edit
    differ = [k for k in {*meta["fingerprints"], *given["fingerprints"]} - {"projector", "hparams"}
              if meta["fingerprints"].get(k) != given["fingerprints"].get(k)]
    if differ or meta["threads"] != given["threads"] or ("pre" in ours and ours["pre"] != theirs["pre"]):
        raise SystemExit(f"{source} and {target} measure different unedited models or settings ({differ})")
    for key, empty in (("seconds", {}), ("peak", {}), ("entropy", {}), ("first_batch", None)):
        ours.setdefault(key, empty)  # a stream stopped right after it started has recorded nothing yet
    ours.update(pre=theirs["pre"], points=theirs["points"][:1], probes=theirs["probes"][:1],
                entropy={"before": theirs["entropy"]["before"]} if "before" in theirs["entropy"] else {},
                shared_unedited_from=source)
    save_tensors(path, tensors, meta)
    print(f"{target}: the unedited measurements of {source}'s stream", flush=True)
    return True


def check_resume(args, files: dict[str, Path], method: str, work: Path, done: int) -> dict:
    """Kill and resume, on the real stream: copies of `method`'s checkpoints (`--snapshots`, kept
    while the study ran uninterrupted) after `done` and after `done + batch size` edits; `eval
    --resume` from the first in a fresh process, killed (SIGKILL) once it has checkpointed the next
    batch. Its checkpoint's tensors and record of done work are compared with the uninterrupted
    stream's."""
    import shutil
    import signal
    import time

    from alphaedit_fast.storage import load_tensors
    from alphaedit_fast.stream import CHECKPOINT, CHECKPOINT_KIND, PROJECTOR

    snapshots = {}
    for path in sorted(Path(args.snapshots).glob(f"{method}-*.safetensors")):
        snapshots.setdefault(load_tensors(path, CHECKPOINT_KIND)[1]["done"], path)
    after = done + args.batch_size
    if done not in snapshots or after not in snapshots:
        raise SystemExit(f"no snapshots of {method} after {done} and {after} edits in {args.snapshots} "
                         f"(there are {sorted(snapshots)})")
    out = work / "resume-check" / method
    shutil.rmtree(out, ignore_errors=True)
    (out / "stream").mkdir(parents=True)
    shutil.copy(work / method / "stream" / PROJECTOR, out / "stream" / PROJECTOR)
    shutil.copy(snapshots[done], out / "stream" / CHECKPOINT)
    command = [sys.executable, "-m", "alphaedit_fast.cli", *eval_arguments(args, files, method, out)]
    print("$ " + " ".join(command[2:]), flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    checkpoint = out / "stream" / CHECKPOINT
    while load_tensors(checkpoint, CHECKPOINT_KIND)[1]["done"] < after:
        if process.poll() is not None:
            raise SystemExit(f"the resumed stream ended (exit {process.returncode}) before {after} edits")
        time.sleep(5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed, resumed_meta = load_tensors(checkpoint, CHECKPOINT_KIND)
    straight, straight_meta = load_tensors(snapshots[after], CHECKPOINT_KIND)
    differ = sorted(name for name in straight if not torch.equal(straight[name], resumed.get(name)))
    differ += sorted(set(resumed) - set(straight))

    def work_done(meta):  # everything measured, less the wall-clock seconds and peak memory
        progress = {k: v for k, v in meta["progress"].items() if k not in ("seconds", "peak")}
        return {"done": meta["done"], "progress": progress, "fingerprints": meta["fingerprints"]}

    result = {"method": method, "resumed_after": done, "compared_after": after, "tensors": len(straight),
              "tensors_differing": differ, "records_equal": work_done(resumed_meta) == work_done(straight_meta),
              "seconds": round(time.perf_counter() - start, 1), "threads": args.threads}
    result["identical"] = not differ and result["records_equal"]
    print(json.dumps(result), flush=True)
    return result


def partial_metrics(work: Path, method: str) -> dict | None:
    """A running stream's curve and probes so far, from its checkpoint."""
    from alphaedit_fast.storage import load_tensors
    from alphaedit_fast.stream import CHECKPOINT, CHECKPOINT_KIND

    done = work / method / "metrics.json"
    if done.exists():
        return json.loads(done.read_text())
    path = work / method / "stream" / CHECKPOINT
    if not path.exists():
        return None
    _, meta = load_tensors(path, CHECKPOINT_KIND)
    progress = meta["progress"]
    return {"curve": progress.get("points", []), "probes": progress.get("probes", []),
            "seconds": progress.get("seconds", {}), "done": meta["done"], "partial": True,
            "fluency": progress.get("entropy", {})}


def plot(study: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("nll_rates", "efficacy"), ("nll_rates", "paraphrase"), ("nll_rates", "neighborhood"),
              ("fluency", None), ("perplexity", None), ("general", "sst2"), ("general", "mean"),
              ("weight_change", None)]
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    for ax, (family, key) in zip(axes.flat, panels):
        for method, label in METHODS.items():
            metrics = study["runs"].get(method)
            if not metrics:
                continue
            source = metrics["probes"] if family in ("perplexity", "general") else metrics["curve"]
            xs, ys = [], []
            for p in source:
                if family == "general":
                    tasks = p.get("general", {})
                    y = (tasks.get(key, {}).get("f1_new") if key != "mean" else
                         sum(t["f1_new"] for t in tasks.values()) / len(tasks) if tasks else None)
                elif family == "weight_change":
                    y = sum(p["weight_change"].values())
                elif key is None:
                    y = p.get(family)
                else:
                    y = p[family][key]
                if y is not None:
                    xs.append(p["n_edits"])
                    ys.append(y)
            ax.plot(xs, ys, marker="o", label=label)
        title = {"nll_rates": "NLL comparison", "general": "glue_eval f1_new"}.get(family, family)
        ax.set_title(f"{title}: {key}" if key else {"fluency": "fluency (sample of rewrite prompts)",
                                                    "perplexity": "held-out perplexity",
                                                    "weight_change": "sum of ||W - W0||_F"}[family])
        ax.set_xlabel("sequential edits")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{study['model']}: CounterFact records {study['records']}, batches of {study['batch_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", default=str(SHARED / "counterfact" / "counterfact-train.json"))
    parser.add_argument("--records", default="2000:2000", help="START:COUNT of the development records")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--every", type=int, default=500, help="curve, fluency, general and perplexity every N edits")
    parser.add_argument("--fluency-records", type=int, default=100)
    parser.add_argument("--general", default="all", help="glue_eval tasks, all, or none (e.g. for the fact world)")
    parser.add_argument("--general-data", default=str(SHARED / "glue-eval"))
    parser.add_argument("--corpus", default=str(SHARED / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--stats-tokens", type=int, default=60000)
    parser.add_argument("--heldout-chars", type=int, default=200000, help="perplexity on the corpus's last N chars")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", help="where the model runs (default: eval's, the GPU when there is one)")
    parser.add_argument("--work", required=True, help="work directory (checkpoints, statistics, per-case scores)")
    parser.add_argument("--out", required=True, help="directory for study.json, study.png, METHOD-metrics.json")
    parser.add_argument("--report", action="store_true", help="only collect what is done so far and plot it")
    parser.add_argument("--check-resume", type=int, metavar="DONE", help="resume each method's stream from its "
                        "snapshot after DONE edits, kill it after the next batch and compare (check_resume)")
    parser.add_argument("--share-unedited", metavar="SOURCE:TARGET", help="give TARGET's stopped stream the "
                        "unedited measurements SOURCE's stream made (share_unedited) and exit")
    parser.add_argument("--carry", help="a folder (in the repository) for the streams' state: restored into "
                        "--work where it lacks it, and refreshed from it by --report (carry)")
    parser.add_argument("--snapshots", help="directory of checkpoint copies METHOD-*.safetensors (--check-resume)")
    args = parser.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    if args.check_resume is not None:
        files = prepare(args, work)
        checks = [check_resume(args, files, method, work, args.check_resume) for method in methods]
        (out / "resume-check.json").write_text(json.dumps(checks, indent=1))
        return 0 if all(c["identical"] for c in checks) else 1
    if args.share_unedited:
        source, target = args.share_unedited.split(":")
        return 0 if share_unedited(work, source, target) else 1
    if args.carry and not args.report:
        carry(work, Path(args.carry), methods, into_work=True)
    if args.carry and args.report:
        carry(work, Path(args.carry), methods, into_work=False)
    if not args.report:
        files = prepare(args, work)
        for method in methods:
            eval_method(args, files, method, work)
    study = {"model": args.model, "records": args.records, "batch_size": args.batch_size, "every": args.every,
             "corpus": args.corpus, "stats_tokens": args.stats_tokens, "heldout_chars": args.heldout_chars,
             "runs": {}}
    for method in methods:
        metrics = partial_metrics(work, method)
        if metrics is not None:
            study["runs"][method] = metrics
            if not metrics.get("partial"):
                (out / f"{method}-metrics.json").write_text(json.dumps(metrics, indent=1))
    findings(study, work, args)
    (out / "study.json").write_text(json.dumps(study, indent=1))
    (out / "study.md").write_text(study["table"] + "".join(
        f"\n{METHODS[m]}: " + "; ".join(f"{t['target']}: {t['value']:.3f} ({'met' if t['met'] else 'missed'})"
                                      for t in f["targets"] if t["met"] is not None) + "\n"
        for m, f in study["findings"].items() if "targets" in f))
    print(f"-> {out / 'study.json'}, {out / 'study.md'}, {plot(study, out / 'study.png')}")
    return 0


def findings(study: dict, work: Path, args) -> None:
    """Add to `study` its table, each run's layer growth and, for finished runs, the targets, the
    scores per batch at the end and the failing records (stream_report), and the paper's claim."""
    import stream_report

    study["table"] = stream_report.markdown(study, METHODS) if study["runs"] else ""
    study["findings"] = {}
    for method, metrics in study["runs"].items():
        found = study["findings"][method] = {"layer_growth": stream_report.layer_growth(metrics)}
        cases = work / method / "cases.jsonl"
        if not metrics.get("partial") and cases.exists():
            found.update(targets=stream_report.targets(metrics, args.general_data),
                         by_batch=stream_report.by_batch(cases, args.batch_size),
                         failures=stream_report.failures(cases))
    runs = study["runs"]
    if all(m in runs and not runs[m].get("partial") for m in ("alphaedit", "identity")):
        a, i = runs["alphaedit"], runs["identity"]

        def general(metrics):
            return stream_report.mean(t["f1_new"] for t in metrics["probes"][-1]["general"].values())

        study["alphaedit_ahead"] = {
            "neighborhood": a["curve"][-1]["nll_rates"]["neighborhood"] > i["curve"][-1]["nll_rates"]["neighborhood"],
            "general_mean_f1_new": general(a) > general(i),
            "perplexity": a["probes"][-1]["perplexity"] < i["probes"][-1]["perplexity"]}


if __name__ == "__main__":
    sys.exit(main())
