#!/usr/bin/env python
"""Time the ORIGINAL AlphaEdit (github jianghoucheng/AlphaEdit, a checkout named by the environment
variable ALPHAEDIT_ORIGINAL_REPO; nothing of it is in this repository) against
alphaedit_fast.apply_AlphaEdit_to_model on the same random-initialised GPT-2 model and the same
requests, and check that both codes make the same weight updates.

The original is run unmodified; it is made to run on a CPU at runtime only, while it runs:
  * torch.Tensor.cuda -> returns the tensor itself;
  * torch.Tensor.to (so also BatchEncoding.to) and the factories torch.tensor / zeros / ones /
    empty / full / eye / arange / rand / randn: a "cuda" device becomes "cpu";
  * torch.cuda.empty_cache -> no-op;
  * `datasets` (imported by rome/layer_stats.py, unused here) is stubbed if not installed;
  * util/globals.py reads ./globals.yml: imported with the checkout as working directory;
  * AlphaEdit_main.CONTEXT_TEMPLATES_CACHE is pre-set, so no templates are generated.
Both codes get the tokenizer with pad_token = eos_token, as the original's experiments/evaluate.py sets it.

Run with the transformers 4.46 environment (`make test-compat` builds .venv-tf446; the original
fails on 5.x), e.g. the configuration of issue 12 (GPT-2-small width, 10 layers, 16 edits):
  ALPHAEDIT_ORIGINAL_REPO=/path/to/AlphaEdit .venv-tf446/bin/python benchmarks/vs_original.py \
      --n-layer 10 --width 768 --layers 3,4,5,6 --edits 16 --repeats 2 --threads 2 \
      --out benchmarks/results/vs-original-gpt2-small-16-cpu.json

A real checkpoint instead of the random GPT-2: --model DIR (a model directory both transformers
versions read, e.g. the plain directory `--model smollm2-135m` converts the SmolLM2 GGUF into, under
~/.cache/alphaedit_fast/gguf/), --requests FILE (CounterFact or EasyEdit records, the first --edits
from --start) in sequential batches of --batch-size, the original's Llama3-8B.json (gpt2-xl.json for
GPT-2) with --layers and the last layer as v_loss_layer:
  ALPHAEDIT_ORIGINAL_REPO=/path/to/AlphaEdit .venv-tf446/bin/python benchmarks/vs_original.py \
      --model ~/.cache/alphaedit_fast/gguf/SmolLM2-135M-Instruct.Q4_1-<sha> --layers 3,4,5,6,7 \
      --requests ../shared/data/counterfact/counterfact-train.json --edits 8 --batch-size 4 \
      --repeats 1 --threads 2 --out benchmarks/results/vs-original-smollm2-135m-8-cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ORIG_DIR = Path(os.environ.get("ALPHAEDIT_ORIGINAL_REPO", HERE / "AlphaEdit")).resolve()
GPT2_TOKENIZER_CANDIDATES = [HERE.parent.parent / "shared" / "data" / "gpt2-tokenizer"]


# --------------------------------------------------------------------------------------------
# running the original on a CPU


def import_original():
    """Import the original's AlphaEdit package from ORIG_DIR without touching its files."""
    if not (ORIG_DIR / "AlphaEdit" / "AlphaEdit_main.py").exists():
        sys.exit(f"the original AlphaEdit checkout is missing: {ORIG_DIR}")
    try:
        import datasets  # noqa: F401
    except ImportError:  # rome/layer_stats.py imports it at module level; only get_cov would use it
        stub = types.ModuleType("datasets")

        def load_dataset(*a, **k):
            raise RuntimeError("datasets is stubbed by run.py (covariance statistics are not used)")

        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub
    sys.path.insert(0, str(ORIG_DIR))
    cwd = os.getcwd()
    os.chdir(ORIG_DIR)  # util/globals.py opens "globals.yml" relative to the working directory
    try:
        import AlphaEdit.AlphaEdit_main as main_mod
        from AlphaEdit.AlphaEdit_hparams import AlphaEditHyperParams
    finally:
        os.chdir(cwd)
    assert Path(main_mod.__file__).resolve().is_relative_to(ORIG_DIR), main_mod.__file__
    return main_mod, AlphaEditHyperParams


class CudaToCpu:
    """While active, every request for a CUDA device made through the patched entry points gets the CPU."""

    FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "eye", "arange", "rand", "randn")

    def __init__(self):
        self.remapped = 0

    def _dev(self, dev):
        if isinstance(dev, str) and dev.startswith("cuda"):
            self.remapped += 1
            return "cpu"
        if isinstance(dev, torch.device) and dev.type == "cuda":
            self.remapped += 1
            return torch.device("cpu")
        return dev

    def __enter__(self):
        self._saved = {"Tensor.cuda": torch.Tensor.cuda, "Tensor.to": torch.Tensor.to,
                       "cuda.empty_cache": torch.cuda.empty_cache}
        self._saved.update({f: getattr(torch, f) for f in self.FACTORIES})
        orig_to = torch.Tensor.to

        def cuda(t, *args, **kwargs):
            self.remapped += 1
            return t

        def to(t, *args, **kwargs):
            if args and isinstance(args[0], (str, torch.device)):
                args = (self._dev(args[0]),) + args[1:]
            if "device" in kwargs:
                kwargs["device"] = self._dev(kwargs["device"])
            return orig_to(t, *args, **kwargs)

        def factory(fn):
            def wrapped(*args, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = self._dev(kwargs["device"])
                return fn(*args, **kwargs)
            return wrapped

        torch.Tensor.cuda = cuda
        torch.Tensor.to = to
        torch.cuda.empty_cache = lambda: None
        for f in self.FACTORIES:
            setattr(torch, f, factory(self._saved[f]))
        return self

    def __exit__(self, *exc):
        torch.Tensor.cuda = self._saved["Tensor.cuda"]
        torch.Tensor.to = self._saved["Tensor.to"]
        torch.cuda.empty_cache = self._saved["cuda.empty_cache"]
        for f in self.FACTORIES:
            setattr(torch, f, self._saved[f])
        return False


# --------------------------------------------------------------------------------------------
# shared inputs


def load_tokenizer():
    from transformers import AutoTokenizer

    for path in GPT2_TOKENIZER_CANDIDATES:
        if (path / "tokenizer.json").exists() or (path / "vocab.json").exists():
            tok = AutoTokenizer.from_pretrained(str(path))
            source = str(path.resolve())
            break
    else:
        from alphaedit_fast.tiny import tiny_tokenizer_for

        tok, source = tiny_tokenizer_for("gpt2"), "alphaedit_fast.tiny.tiny_tokenizer_for('gpt2')"
    tok.pad_token = tok.eos_token  # as the original's experiments/evaluate.py
    return tok, source


def build_model(args, vocab_size):
    from alphaedit_fast.tiny import tiny_model

    n_head = args.heads or max(1, args.width // 64)
    return tiny_model("gpt2", vocab_size=vocab_size, seed=args.seed, dtype=torch.float32, device="cpu",
                      n_layer=args.n_layer, n_embd=args.width, n_inner=args.inner or 4 * args.width,
                      n_head=n_head, n_positions=1024, initializer_range=0.02)


def build_requests(n):
    from alphaedit_fast.bench import synthetic_requests

    trues = ["French", "guitar", "Apple", "France", "Berlin", "Dutch", "trumpet", "Tokyo"]
    reqs = synthetic_requests(n)
    for i, r in enumerate(reqs):
        r["target_true"] = {"str": trues[i % len(trues)]}
        if r["target_true"]["str"] == r["target_new"]["str"]:
            r["target_true"]["str"] = "Rome"
    return reqs


def load_real_model(directory):
    """(model in fp32 on the CPU, tokenizer with pad = eos as the original's evaluate.py sets it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    try:
        tok = AutoTokenizer.from_pretrained(directory)
    except ValueError:  # saved by transformers 5.x, whose tokenizer class 4.4x does not have
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(directory)
    tok.pad_token = tok.eos_token
    return model, tok


def file_requests(path, start, n):
    """The original's request dicts (case_id, prompt, subject, target_new, target_true) of records
    start .. start + n of a CounterFact or EasyEdit file."""
    from alphaedit_fast.requests import load_requests

    keys = ("case_id", "prompt", "subject", "target_new", "target_true")
    return [{k: r[k] for k in keys if k in r} for r in load_requests(path)[start : start + n]]


def real_hparams_dict(args, model):
    """The original's Llama3-8B.json (gpt2-xl.json for GPT-2) with --layers, the model's last
    layer as v_loss_layer and the overrides."""
    name = "gpt2-xl.json" if model.config.model_type == "gpt2" else "Llama3-8B.json"
    data = json.loads((ORIG_DIR / "hparams" / "AlphaEdit" / name).read_text())
    data["layers"] = args.layers
    data["v_loss_layer"] = model.config.num_hidden_layers - 1
    for key in ("v_num_grad_steps", "clamp_norm_factor", "v_lr", "kl_factor", "L2"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    return data


def random_projectors(n_layers, d_k, seed):
    """P_l = U U^T, U a random orthonormal d_k x d_k/2 basis; built in fp64, stored fp32 as the original's."""
    gen = torch.Generator().manual_seed(seed + 1)
    Ps = []
    for _ in range(n_layers):
        U = torch.linalg.qr(torch.randn(d_k, d_k // 2, generator=gen, dtype=torch.float64))[0]
        Ps.append((U @ U.T).float())
    return torch.stack(Ps)


def hparams_dict(args, n_layer):
    data = json.loads((ORIG_DIR / "hparams" / "AlphaEdit" / "gpt2-xl.json").read_text())
    data["layers"] = args.layers
    data["v_loss_layer"] = n_layer - 1
    for key in ("v_num_grad_steps", "clamp_norm_factor", "v_lr", "kl_factor", "L2"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    return data


def rel(a, b):
    """||a - b|| / ||a|| in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / a.norm()).item()


# --------------------------------------------------------------------------------------------


def counted_work(model, tok, batches, hp: dict, context_templates) -> dict:
    """Multiply-add FLOPs of the z optimisation (nearly all of both codes' time) in linear layers
    and the LM head, counted from the token slots each code pushes through the blocks, as if every
    request ran all v_num_grad_steps (both codes stop early at the same loss).

    The original, per request and step: its prompts padded together, every slot through every
    block forward and the blocks after the z layer backward, and the full-vocabulary head at every
    slot twice (the model's logits for KL, ln_f(h) @ W for the rewriting loss), forward and backward.
    Ours, per micro-batch and step: the real suffix tokens through the blocks after the z layer,
    forward and backward, the head at the target and KL positions only; plus one whole-row pass."""
    from alphaedit_fast.packing import is_tokenwise_linear
    from alphaedit_fast.values import _prepare

    blocks = model.get_submodule(hp["layer_module_tmp"].format("")[:-1])
    per_token = [2 * sum(m.weight.numel() for m in b.modules() if is_tokenwise_linear(m)) for b in blocks]
    head = 2 * model.get_output_embeddings().weight.numel()
    z_layer, steps = max(hp["layers"]), hp["v_num_grad_steps"]
    all_blocks, after = sum(per_token), sum(per_token[z_layer + 1 :])
    original = ours = 0
    for part in batches:
        for request in part:
            slots = _prepare(tok, [request], context_templates, hp["fact_token"], "cpu").input_ids.numel()
            original += steps * slots * (all_blocks + after + 4 * head)
        batch = _prepare(tok, part, context_templates, hp["fact_token"], "cpu")
        suffix_tokens = int((batch.attention_mask.sum(1) - batch.positions).sum())
        head_rows = len(batch.target_ids) + len(part)
        first_pass = int(batch.attention_mask.sum()) * all_blocks
        ours += steps * (2 * suffix_tokens * after + 2 * head_rows * head) + first_pass
    return {"original_gflop": original / 1e9, "ours_gflop": ours / 1e9, "ratio_original_over_ours": original / ours}


def add_model_arguments(ap: argparse.ArgumentParser, n_layer: int, width: int) -> None:
    """The random GPT-2's shape, the edited layers, the seed and the thread count, as
    `parse_with_overrides` reads them."""
    ap.add_argument("--n-layer", type=int, default=n_layer)
    ap.add_argument("--width", type=int, default=width, help="n_embd")
    ap.add_argument("--inner", type=int, default=None, help="n_inner (default 4*width)")
    ap.add_argument("--heads", type=int, default=None, help="n_head (default width/64)")
    ap.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="edited layers, comma-separated (default 3,4,5,6, or 1..n_layer-2 for small models)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def parse_with_overrides(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, with --v-num-grad-steps, --clamp-norm-factor, --v-lr, --kl-factor and --L2 overriding
    gpt2-xl.json; default layers for the model's depth; set the thread count."""
    for key, typ in (("v_num_grad_steps", int), ("clamp_norm_factor", float), ("v_lr", float),
                     ("kl_factor", float), ("L2", float)):
        ap.add_argument(f"--{key.replace('_', '-')}", dest=key, type=typ, default=None,
                        help=f"override the gpt2-xl.json value of {key}")
    args = ap.parse_args()
    if args.layers is None:
        args.layers = [3, 4, 5, 6] if args.n_layer >= 8 else list(range(1, max(args.n_layer - 1, 2)))
    if args.threads:
        torch.set_num_threads(args.threads)
    assert args.model or max(args.layers) < args.n_layer
    return args


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap, n_layer=10, width=768)
    ap.add_argument("--edits", type=int, default=16)
    ap.add_argument("--model", help="a real model directory instead of the random GPT-2 (needs --requests, --layers)")
    ap.add_argument("--requests", help="with --model: CounterFact or EasyEdit records")
    ap.add_argument("--start", type=int, default=0, help="with --model: the first record edited")
    ap.add_argument("--batch-size", type=int, default=0, help="edits per sequential batch (default: all at once)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--which", choices=["original", "ours", "both"], default="both")
    ap.add_argument("--out", default=str(HERE / "results" / "vs-original.json"))
    ap.add_argument("--reuse-P", action="store_true",
                    help="pass the same P tensor object every repeat (ours then factors it once and caches it); "
                         "default: a fresh copy per run, so ours pays for factoring P in every run")
    ap.add_argument("--verbose", action="store_true", help="show the original's prints")
    ap.add_argument("--save-updates", default=None,
                    help="torch.save the first run's weight updates, new cache_c and z's of each code to this path")
    args = parse_with_overrides(ap)

    import transformers

    import alphaedit_fast.editor as ours_editor
    from alphaedit_fast import AlphaEditHyperParams as OursHP
    from alphaedit_fast import apply_AlphaEdit_to_model as ours_apply
    from alphaedit_fast.bench import CONTEXT_TEMPLATES

    run_orig, run_ours = args.which in ("original", "both"), args.which in ("ours", "both")
    if args.model:
        if not args.requests:
            sys.exit("--model needs --requests FILE")
        model, tok = load_real_model(args.model)
        tok_source = args.model
        hp = real_hparams_dict(args, model)
        requests = file_requests(args.requests, args.start, args.edits)
    else:
        tok, tok_source = load_tokenizer()
        model = build_model(args, len(tok))
        hp = hparams_dict(args, args.n_layer)
        requests = build_requests(args.edits)
    rewrite = hp["rewrite_module_tmp"]
    base_W = {l: model.get_submodule(rewrite.format(l)).weight.detach().clone() for l in args.layers}
    module = model.get_submodule(rewrite.format(args.layers[0]))
    d_k = module.weight.shape[1] if isinstance(module, torch.nn.Linear) else module.weight.shape[0]  # Conv1D: (in, out)
    P = random_projectors(len(args.layers), d_k, args.seed)
    batch = args.batch_size or len(requests)
    batches = [requests[i : i + batch] for i in range(0, len(requests), batch)]
    cfg = model.config
    print(f"model: {cfg.model_type} {tok_source if args.model else ''} layers={cfg.num_hidden_layers} "
          f"width={cfg.hidden_size} d_k={d_k} vocab={cfg.vocab_size} fp32 cpu, threads={torch.get_num_threads()}; "
          f"tokenizer: {tok_source}; layers {args.layers}, v_loss_layer {hp['v_loss_layer']}, "
          f"{len(requests)} edits in {len(batches)} sequential batch(es), {args.repeats} repeats", flush=True)
    print("hparams:", {k: hp[k] for k in ("v_num_grad_steps", "v_lr", "clamp_norm_factor", "kl_factor",
                                          "v_weight_decay", "L2", "fact_token")}, flush=True)

    result = {"config": {**{k: v for k, v in vars(args).items()}, "d_k": d_k,
                         "vocab_size": model.config.vocab_size, "tokenizer": tok_source, "hparams": hp,
                         "context_templates": CONTEXT_TEMPLATES, "requests": requests},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                           "threads": torch.get_num_threads()},
              "original": None, "ours": None}

    result["work"] = counted_work(model, tok, batches, hp, CONTEXT_TEMPLATES)
    print("counted z work (GFLOP): original {original_gflop:.0f}, ours {ours_gflop:.0f}, "
          "ratio {ratio_original_over_ours:.2f}".format(**result["work"]), flush=True)

    def deltas(m):
        return {l: (m.get_submodule(rewrite.format(l)).weight.detach() - base_W[l]).clone() for l in args.layers}

    captured = {}

    # ---- original
    if run_orig:
        orig_main, OrigHP = import_original()
        orig_main.CONTEXT_TEMPLATES_CACHE = CONTEXT_TEMPLATES
        orig_hp = OrigHP(**hp)
        real_compute_z = orig_main.compute_z
        orig_zs = []

        def recording_compute_z(*a, **k):
            z = real_compute_z(*a, **k)
            orig_zs.append(z.detach().clone())
            return z

        orig_main.compute_z = recording_compute_z
        times, first = [], None
        for rep in range(args.repeats):
            work = copy.deepcopy(model)
            cache_c = torch.zeros(len(args.layers), d_k, d_k)
            P_run = P if args.reuse_P else P.clone()
            orig_zs.clear()
            buf = io.StringIO()
            patch = CudaToCpu()
            with patch, (contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(buf)):
                t0 = time.perf_counter()
                new_cache = cache_c
                for part in batches:
                    _, new_cache = orig_main.apply_AlphaEdit_to_model(work, tok, part, orig_hp, cache_c=new_cache,
                                                                      P=P_run)
                times.append(time.perf_counter() - t0)
            print(f"original run {rep + 1}/{args.repeats}: {times[-1]:.2f} s", flush=True)
            if first is None:
                first = {"deltas": deltas(work), "cache": new_cache.detach().clone(), "zs": torch.stack(orig_zs, 1)}
                Path(args.out + ".original.log").write_text(buf.getvalue())
                result["cuda_to_cpu_remaps_per_run"] = patch.remapped
            del work
        captured["original"] = first
        result["original"] = {"seconds": times, "median_s": statistics.median(times),
                              "edits_per_s": len(requests) / statistics.median(times)}

    # ---- ours
    if run_ours:
        real_target_values = getattr(ours_editor, "target_values", None)
        ours_zs = []
        if real_target_values is not None:
            def recording_target_values(*a, **k):
                out = real_target_values(*a, **k)
                z = out[0] if isinstance(out, tuple) else out
                ours_zs.append(z.detach().clone())
                return out
            ours_editor.target_values = recording_target_values
        ours_hp = OursHP.from_dict(hp)
        times, phases, first = [], [], None
        for rep in range(args.repeats):
            work = copy.deepcopy(model)
            cache_c = torch.zeros(len(args.layers), d_k, d_k)
            P_run = P if args.reuse_P else P.clone()
            ours_zs.clear()
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            new_cache = cache_c
            for part in batches:
                _, new_cache = ours_apply(work, tok, part, ours_hp, cache_c=new_cache, P=P_run,
                                          context_templates=CONTEXT_TEMPLATES, timings=timings)
            times.append(time.perf_counter() - t0)
            phases.append(timings)
            print(f"ours run {rep + 1}/{args.repeats}: {times[-1]:.2f} s  phases "
                  + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()), flush=True)
            if first is None:
                first = {"deltas": deltas(work), "cache": new_cache.detach().clone(),
                         "zs": ours_zs[0] if ours_zs else None}
            del work
        if real_target_values is not None:
            ours_editor.target_values = real_target_values
        captured["ours"] = first
        med_phases = {k: statistics.median(p.get(k, 0.0) for p in phases) for k in phases[0]}
        result["ours"] = {"seconds": times, "median_s": statistics.median(times),
                          "edits_per_s": len(requests) / statistics.median(times),
                          "phases_median_s": med_phases, "phases_per_run": phases}

    # ---- comparison
    if run_orig and run_ours:
        o, f = captured["original"], captured["ours"]
        cmp = {"ratio_original_over_ours": result["original"]["median_s"] / result["ours"]["median_s"],
               "update_rel_diff_per_layer": {str(l): rel(o["deltas"][l], f["deltas"][l]) for l in args.layers},
               "update_norm_original": {str(l): o["deltas"][l].norm().item() for l in args.layers},
               "update_norm_ours": {str(l): f["deltas"][l].norm().item() for l in args.layers},
               "cache_c_rel_diff_per_layer": {str(l): rel(o["cache"][i], f["cache"][i])
                                              for i, l in enumerate(args.layers)}}
        if f["zs"] is not None and f["zs"].shape == o["zs"].shape:
            zd = [rel(o["zs"][:, j], f["zs"][:, j]) for j in range(o["zs"].shape[1])]
            cmp["z_rel_diff_per_request"] = zd
            cmp["z_rel_diff_max"] = max(zd)
            cmp["z_rel_diff_median"] = statistics.median(zd)
        cmp["update_rel_diff_max"] = max(cmp["update_rel_diff_per_layer"].values())
        result["comparison"] = cmp
        print(f"\noriginal median {result['original']['median_s']:.2f} s, "
              f"ours median {result['ours']['median_s']:.2f} s,"
              f" ratio original/ours {cmp['ratio_original_over_ours']:.2f}x"
              f" (counted work ratio {result['work']['ratio_original_over_ours']:.2f}x)")
        print("ours phases (median s):", {k: round(v, 3) for k, v in result["ours"]["phases_median_s"].items()})
        print("||dW_orig - dW_ours|| / ||dW_orig|| per layer:",
              {l: f"{v:.2e}" for l, v in cmp["update_rel_diff_per_layer"].items()})
        print("cache_c rel diff per layer:", {l: f"{v:.2e}" for l, v in cmp["cache_c_rel_diff_per_layer"].items()})
        if "z_rel_diff_max" in cmp:
            print(f"z rel diff per request: max {cmp['z_rel_diff_max']:.2e}, median {cmp['z_rel_diff_median']:.2e}")
    elif run_ours:
        print("ours phases (median s):", {k: round(v, 3) for k, v in result["ours"]["phases_median_s"].items()})

    if args.save_updates:
        torch.save(captured, args.save_updates)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
