"""CounterFact-style evaluation of AlphaEdit on the fact world (`alphaedit-fast eval`).

For each method (AlphaEdit with the corpus null-space projector, and the same engine with
P = I) and mode (sequential batches, or all edits in one batch), after each step:

- efficacy: p(new) > p(true) on the rewrite prompt (and the top-1 rate, `efficacy_top1`),
- paraphrase: the same on the fact's two held-out phrasings, never seen in training,
- neighbourhood: p(true) > p(new) on other subjects with the same relation and true object,
- retention: the share of the unedited facts (every fact x training phrasing) the model
  recalled (top-1) before editing that it still recalls, split into other subjects' facts and
  the edited subjects' other relations.

Rates are means over prompts; `*_margin` are mean probability differences. Objects are compared
by their first token (every fact-world object is one token).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from ..arch import get_module, key_width
from ..editor import AlphaEditor
from ..positions import encode_batch
from .editing import CONTEXT_TEMPLATES, corpus_projector, edit_hparams
from .world import World

METHODS = ("alphaedit", "identity")
MODES = ("sequential", "batch")
PLOTTED = ("efficacy", "paraphrase", "neighbourhood", "retention")


def object_id(tok, word: str) -> int:
    return tok(" " + word)["input_ids"][0]


def fact_items(world: World, held_out: bool = False) -> list[tuple[str, str, str, str]]:
    """(subject, relation, prompt, object) for every fact in every training phrasing (held_out:
    every held-out fact in every held-out phrasing)."""
    chosen = set(world.held_out_facts()) if held_out else None
    return [(s, r, prompt, o) for s, r, o in world.fact_list() if chosen is None or (s, r) in chosen
            for prompt in world.prompts(s, r, held_out)]


@torch.no_grad()
def next_token_scores(model, tok, prompts: list[str], columns: torch.Tensor, batch: int = 512):
    """p(columns[i] | prompts[i]) as (n, k) and the top-1 token (n,) at each prompt's end."""
    probs, top1 = [], []
    device = model.get_input_embeddings().weight.device
    for start in range(0, len(prompts), batch):
        input_ids, mask = encode_batch(tok, prompts[start:start + batch], device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        last = logits[torch.arange(len(input_ids), device=device), mask.sum(1) - 1].float()
        probs.append(last.softmax(-1).gather(1, columns[start:start + batch].to(device)).cpu())
        top1.append(last.argmax(-1).cpu())
    return torch.cat(probs), torch.cat(top1)


class Probe:
    """What is measured after every edit step: the records' prompts and every fact in every
    training phrasing, with the unedited model's recall of the latter."""

    def __init__(self, model, tok, world: World, records: list[dict]):
        self.tok, self.world, self.records = tok, world, records
        items = fact_items(world)
        self.fact_keys = [(s, r) for s, r, _, _ in items]
        self.fact_prompts = [prompt for _, _, prompt, _ in items]
        self.fact_ids = torch.tensor([[object_id(tok, o)] for _, _, _, o in items])
        _, top1 = next_token_scores(model, tok, self.fact_prompts, self.fact_ids)
        self.recalled_before = top1 == self.fact_ids[:, 0]

    def _pairs(self, records, key):
        """Prompts of `key` for each record and their (new, true) object token ids (n, 2)."""
        prompts, columns = [], []
        for rec in records:
            rw = rec["requested_rewrite"]
            chosen = [rw["prompt"].format(rw["subject"])] if key == "rewrite" else rec[key]
            prompts += chosen
            columns += [[object_id(self.tok, rw["target_new"]["str"]), object_id(self.tok, rw["target_true"]["str"])]]\
                * len(chosen)
        return prompts, torch.tensor(columns, dtype=torch.long).view(-1, 2)

    def measure(self, model, n_done: int) -> dict:
        done = self.records[:n_done]
        out = {"n_edits": n_done}
        for name, key, sign in (("efficacy", "rewrite", 1), ("paraphrase", "paraphrase_prompts", 1),
                                ("neighbourhood", "neighborhood_prompts", -1)):
            prompts, columns = self._pairs(done, key)
            probs, top1 = next_token_scores(model, self.tok, prompts, columns)
            diff = sign * (probs[:, 0] - probs[:, 1])
            out[name], out[f"{name}_margin"] = (diff > 0).double().mean().item(), diff.double().mean().item()
            if name == "efficacy":
                out["efficacy_top1"] = (top1 == columns[:, 0]).double().mean().item()
        edited = {(r["requested_rewrite"]["subject"], r["relation"]) for r in done}
        edited_subjects = {s for s, _ in edited}
        _, top1 = next_token_scores(model, self.tok, self.fact_prompts, self.fact_ids)
        kept = top1 == self.fact_ids[:, 0]
        unedited = torch.tensor([k not in edited for k in self.fact_keys]) & self.recalled_before
        same_subject = torch.tensor([s in edited_subjects for s, _ in self.fact_keys])
        for name, mask in (("retention", unedited), ("retention_other_subjects", unedited & ~same_subject),
                           ("retention_same_subject", unedited & same_subject)):
            out[name] = kept[mask].double().mean().item() if mask.any() else float("nan")
        return out


def identity_bases(model, hparams) -> list[torch.Tensor]:
    d_k = key_width(get_module(model, hparams.rewrite_module_tmp.format(hparams.layers[0])))
    return [torch.eye(d_k) for _ in hparams.layers]


def run_method(model, tok, probe: Probe, hparams, bases, mode: str, batch_size: int, batch_sizes: list[int],
               progress: bool = True) -> list[dict]:
    """Points (metrics after each step) for one method in one mode; `model` is not modified."""
    from tqdm.auto import tqdm

    requests = [r["requested_rewrite"] for r in probe.records]
    steps = ([(n, n + batch_size) for n in range(0, len(requests), batch_size)] if mode == "sequential"
             else [(0, n) for n in batch_sizes])
    points, edited, editor, seconds = [], None, None, 0.0
    for start, stop in tqdm(steps, desc=mode, disable=not progress, leave=False):
        if mode == "batch" or editor is None:
            edited, seconds = copy.deepcopy(model), 0.0
            editor = AlphaEditor(edited, tok, hparams, projector=bases, context_templates=CONTEXT_TEMPLATES)
        begin = time.perf_counter()
        editor.edit(requests[start:stop])
        seconds += time.perf_counter() - begin
        points.append({**probe.measure(edited, stop), "edit_seconds": seconds})
    return points


def evaluate_editing(model, tok, world: World, n_edits: int = 400, batch_size: int = 20,
                     batch_sizes: list[int] | None = None, methods=METHODS, modes=MODES, seed: int = 0,
                     hparams=None, progress: bool = True, log=None) -> dict:
    """Edit copies of `model` with `n_edits` counterfactuals and measure them (see the module docstring)."""
    unknown = set(methods) - set(METHODS) | set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown method/mode {sorted(unknown)}; methods: {METHODS}, modes: {MODES}")
    if batch_size < 1 or n_edits % batch_size:
        raise ValueError(f"n_edits ({n_edits}) must be a positive multiple of batch_size ({batch_size})")
    batch_sizes = sorted(batch_sizes or {batch_size, n_edits // 4, n_edits // 2, n_edits} - {0})
    if batch_sizes[-1] > n_edits:
        raise ValueError(f"batch sizes {batch_sizes} exceed n_edits {n_edits}")
    if log is None:
        from tqdm.auto import tqdm

        log = tqdm.write
    hparams = hparams or edit_hparams(model)
    records = world.counterfact_requests(n_edits, seed)
    probe = Probe(model, tok, world, records)
    result = {"config": {"n_edits": n_edits, "batch_size": batch_size, "batch_sizes": batch_sizes, "seed": seed,
                         "hparams": hparams.to_dict(), "context_templates": CONTEXT_TEMPLATES,
                         "facts": len(world.facts), "subjects": len(world.subjects)},
              "recall_before": probe.recalled_before.double().mean().item(), "runs": []}
    begin = time.perf_counter()
    projector = corpus_projector(model, tok, world, hparams, seed=seed) if "alphaedit" in methods else None
    if projector is not None:
        result["config"]["nullspace_dims"] = [[u.shape[1], u.shape[0]] for u in projector]
        log(f"projector from the corpus: null space {projector[0].shape[1]}/{projector[0].shape[0]} "
            f"({time.perf_counter() - begin:.1f} s)")
    for method in methods:
        bases = projector if method == "alphaedit" else identity_bases(model, hparams)
        for mode in modes:
            points = run_method(model, tok, probe, hparams, bases, mode, batch_size, batch_sizes, progress)
            result["runs"].append({"method": method, "mode": mode, "points": points})
            log(summary_line(method, mode, points[-1]))
    return result


def summary_line(method: str, mode: str, point: dict) -> str:
    return (f"{method:>9} {mode:>10} {point['n_edits']:4d} edits: efficacy {point['efficacy']:.3f} "
            f"paraphrase {point['paraphrase']:.3f} neighbourhood {point['neighbourhood']:.3f} "
            f"retention {point['retention']:.3f} (other subjects {point['retention_other_subjects']:.3f}, "
            f"same subject {point['retention_same_subject']:.3f}) {point['edit_seconds']:.1f} s")


def plot(result: dict, path) -> Path:
    """The PLOTTED metrics against the number of edits, one line per method and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.4), sharex=True)
    colours = {"alphaedit": "tab:blue", "identity": "tab:red"}
    for ax, metric in zip(axes, PLOTTED):
        for run in result["runs"]:
            xs = [p["n_edits"] for p in run["points"]]
            ax.plot(xs, [p[metric] for p in run["points"]], color=colours[run["method"]],
                    linestyle="-" if run["mode"] == "sequential" else "--", marker=".",
                    label=f"{'AlphaEdit' if run['method'] == 'alphaedit' else 'P = I'}, {run['mode']}")
        ax.set_title(metric)
        ax.set_xlabel("edits")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Fact world: {result['config']['n_edits']} edits, sequential batches of "
                 f"{result['config']['batch_size']} (solid) or one batch (dashed)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(result: dict, out_dir) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "factworld-eval.json"
    json_path.write_text(json.dumps(result, indent=1))
    return json_path, plot(result, out_dir / "factworld-eval.png")
