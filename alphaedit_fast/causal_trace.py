"""Causal tracing (ROME, Meng et al. 2022): where does a model recall a fact?

Noise is added to the subject tokens' hidden states as they enter the first block (after any
embedding scale or position embedding: the same place for every family), 3x their standard
deviation by default; then one clean (token, layer) hidden state is restored at a time, of
the block output, the MLP output or the attention output. The indirect effect of a state is
p(true object | restored) - p(true object | corrupted). All restorations of a prompt run as
rows of a few batched forward passes; tokens before the subject are never corrupted, so
restoring them changes nothing and they are not run (their effect is exactly 0).

`trace_requests` averages the effects over requests on ROME's six token groups and
`recommend_layers` picks the window of consecutive MLP layers with the largest mean effect at
the subject's last token: the layers to edit.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .arch import detect, get_module
from .errors import InvalidArgumentError
from .positions import get_words_idxs_in_templates, split_template
from .requests import targets_token_ids
from .trace import hidden_of, input_of, with_hidden

KINDS = ("block", "mlp", "attn")
TOKEN_GROUPS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
                "further tokens", "last token")


def check_kinds(kinds: Sequence[str]) -> None:
    """Every kind is one of `KINDS`, else InvalidArgumentError."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise InvalidArgumentError(f"unknown kind(s) {unknown}; choose from {','.join(KINDS)}")


@dataclass
class PromptTrace:
    """The trace of one prompt. `restored[kind]`: (tokens, layers) p(true object) with that state
    restored; minus `corrupted`, the indirect effects."""

    prompt: str
    subject: str
    target: str
    tokens: list[str]
    subject_span: tuple[int, int]  # first and last subject token (inclusive)
    clean: float
    corrupted: float
    restored: dict[str, torch.Tensor] = field(default_factory=dict)

    def grouped(self, kind: str) -> torch.Tensor:
        """(6, layers): the restored probabilities averaged over ROME's `TOKEN_GROUPS`; a group the
        prompt has no token in (no middle subject token, nothing after the subject) is NaN."""
        first, last = self.subject_span
        n = len(self.tokens)
        groups = [[first], list(range(first + 1, last)), [last], [last + 1] if last + 1 < n - 1 else [],
                  list(range(last + 2, n - 1)), [n - 1]]
        rows = self.restored[kind]
        return torch.stack([rows[g].mean(0) if g else torch.full_like(rows[0], float("nan")) for g in groups])


def _logits_argument(model) -> dict:
    """Keep only the last position's logits when the model's forward can (`logits_to_keep` in
    transformers 5.x, `num_logits_to_keep` in some 4.4x models)."""
    parameters = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in parameters:
            return {name: 1}
    return {}


def subject_token_span(tok, prompt: str, subject: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of `prompt.format(subject)` and the (first, last) token overlapping the subject's
    characters (from the tokenizer's offsets; without them, the editor's `subject_last` position
    and the first token after the prefix's tokens)."""
    prefix, _ = split_template(prompt, "prompt")
    text = prompt.format(subject)
    begin, end = len(prefix), len(prefix) + len(subject)
    try:
        encoded = tok(text, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer has no offsets
        encoded = None
    if encoded is not None and "offset_mapping" in encoded:
        inside = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > begin and a < end and b > a]
        if inside:
            return list(encoded["input_ids"]), (inside[0], inside[-1])
    ids = tok(text)["input_ids"]
    first = get_words_idxs_in_templates(tok, [prompt], [subject], "first")[0][0]
    last = get_words_idxs_in_templates(tok, [prompt], [subject], "last")[0][0]
    return ids, (first, last)


class CausalTracer:
    """Batched causal tracing of one model. `noise`: the noise's standard deviation (absolute;
    `noise_scale(requests)` gives ROME's 3x the subject states' own). `batch_size`: rows per
    forward pass. `window`: the MLP and attention states of this many layers around the traced
    one are restored together (ROME's figures use 10; 1 restores one state); block outputs are
    always restored one at a time."""

    def __init__(self, model, tok, noise: float, batch_size: int = 64, seed: int = 0, window: int = 1):
        spec = detect(model)
        if window < 1:
            raise InvalidArgumentError(f"the restore window must be at least 1 layer, got {window}")
        self.model, self.tok, self.noise, self.batch_size, self.seed = model, tok, noise, batch_size, seed
        self.window = window
        self.modules = {"block": spec.layer_module_tmp, "mlp": spec.mlp_module_tmp, "attn": spec.attn_module_tmp}
        self.num_layers = spec.num_layers
        self.first_block = get_module(model, spec.layer_module_tmp.format(0))
        self.device = model.get_input_embeddings().weight.device
        self.logits_argument = _logits_argument(model)
        self._spans: dict[tuple[str, str], tuple[list[int], tuple[int, int]]] = {}

    def span(self, prompt: str, subject: str) -> tuple[list[int], tuple[int, int]]:
        """`subject_token_span`, tokenised once per (prompt, subject)."""
        if (prompt, subject) not in self._spans:
            self._spans[prompt, subject] = subject_token_span(self.tok, prompt, subject)
        return self._spans[prompt, subject]

    def _forward(self, input_ids: torch.Tensor, hooks: dict[str, callable], pre_hook=None) -> torch.Tensor:
        """p(next token) at the last position of each row: (rows, vocab), float32."""
        handles = [get_module(self.model, name).register_forward_hook(fn) for name, fn in hooks.items()]
        if pre_hook is not None:
            handles.append(self.first_block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        try:
            with torch.no_grad():
                logits = self.model(input_ids=input_ids, use_cache=False, **self.logits_argument).logits
        finally:
            for handle in handles:
                handle.remove()
        return logits[:, -1].float().softmax(-1)

    def _corrupt(self, span: tuple[int, int], noise: torch.Tensor):
        """A pre-hook on the first block adding `noise` (span tokens, width) at the subject."""
        first, last = span

        def pre_hook(module, args, kwargs):
            hidden = input_of(args, kwargs).clone()
            hidden[:, first : last + 1] += noise.to(hidden.dtype)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return pre_hook

    def subject_states(self, prompt: str, subject: str) -> torch.Tensor:
        """(subject tokens, width): the hidden states entering the first block at the subject."""
        ids, (first, last) = self.span(prompt, subject)
        seen = []

        def pre_hook(module, args, kwargs):
            seen.append(input_of(args, kwargs)[0, first : last + 1].float())

        self._forward(torch.tensor([ids], device=self.device), {}, pre_hook)
        return seen[0]

    def noise_scale(self, requests: Sequence[dict], factor: float = 3.0) -> float:
        """`factor` x the standard deviation of the subject tokens' states entering the first
        block, over `requests` (ROME: 3x that of the subjects' embeddings)."""
        states = torch.cat([self.subject_states(r["prompt"], r["subject"]) for r in requests])
        return factor * float(states.std())

    def trace(self, prompt: str, subject: str, target: str | None = None, kinds: Sequence[str] = KINDS,
              seed: int | None = None, progress=None, tokens: Sequence[int] | None = None) -> PromptTrace:
        """Restore every (token, layer) state of each kind in `kinds` once. `target`: the true
        object, whose first token is scored (as `evaluation.score_targets` does), or None for the
        model's own prediction. `seed` draws the noise (default: the tracer's). `tokens`: restore
        only these token positions (default: every one from the subject's first on; the rows of
        the others from the subject on are NaN)."""
        check_kinds(kinds)
        ids, span = self.span(prompt, subject)
        traced = range(span[0], len(ids)) if tokens is None else sorted(set(tokens))
        if traced and not span[0] <= traced[0] <= traced[-1] < len(ids):
            raise InvalidArgumentError(f"tokens to restore must lie in {span[0]}..{len(ids) - 1} (from the "
                                       f"subject's first token to the prompt's last), got {list(tokens)}")
        x = torch.tensor([ids], device=self.device)
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        width = self.model.get_input_embeddings().weight.shape[1]
        noise = (torch.randn(span[1] - span[0] + 1, width, generator=generator) * self.noise).to(self.device)

        clean_probs, clean_states = self.clean_states(x, kinds)
        if target is None:
            target_id = int(clean_probs.argmax())
            target = self.tok.decode([target_id])
        else:
            target_id = self.target_id(target)
        corrupted = float(self.restored_probabilities(x, span, noise, [[]], clean_states)[0, target_id])
        n_tokens = len(ids)
        jobs = [(k, t, l) for k in kinds for t in traced for l in range(self.num_layers)]
        restored = {k: torch.full((n_tokens, self.num_layers), corrupted) for k in kinds}
        untraced = sorted(set(range(span[0], n_tokens)) - set(traced))
        for rows in restored.values():
            rows[untraced] = float("nan")
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            probs = self.restored_probabilities(x, span, noise, [[job] for job in batch], clean_states)
            for row, (kind, token, layer) in enumerate(batch):
                restored[kind][token, layer] = probs[row, target_id]
            if progress is not None:
                progress.update(len(batch))
        tokens = [self.tok.decode([i]) for i in ids]
        return PromptTrace(prompt, subject, target, tokens, span, float(clean_probs[target_id]), corrupted, restored)

    def clean_probability(self, prompt: str, subject: str, target: str | None) -> float:
        """p(first token of `target`, or of the prediction when None | the filled prompt)."""
        ids, _ = self.span(prompt, subject)
        probs = self._forward(torch.tensor([ids], device=self.device), {})[0]
        return float(probs.max() if target is None else probs[self.target_id(target)])

    def target_id(self, target: str) -> int:
        """The first token of " " + target (as `evaluation.score_targets` scores targets)."""
        return targets_token_ids(self.tok, [target if target.startswith(" ") else " " + target])[0][0]

    def states_to_restore(self, prompt: str, subject: str, kinds: Sequence[str] = KINDS) -> int:
        """How many restorations `trace` runs for this prompt (for a progress bar)."""
        ids, (first, _) = self.span(prompt, subject)
        return len(kinds) * self.num_layers * (len(ids) - first)

    def restored_layers(self, kind: str, layer: int) -> range:
        """The layers whose `kind` states are restored when tracing `layer` (ROME's window)."""
        if kind == "block" or self.window == 1:
            return range(layer, layer + 1)
        return range(max(0, layer - self.window // 2), min(self.num_layers, layer - (-self.window // 2)))

    def clean_states(self, input_ids: torch.Tensor, kinds: Sequence[str] = KINDS):
        """(p(next token) of the clean run: (vocab,), {(kind, layer): (tokens, width) state})."""
        states: dict[tuple[str, int], torch.Tensor] = {}

        def keeper(kind, layer):
            def hook(module, args, output):
                states[kind, layer] = hidden_of(output)[0].detach().clone()
            return hook

        probs = self._forward(input_ids, {self.modules[k].format(l): keeper(k, l)
                                          for k in kinds for l in range(self.num_layers)})
        return probs[0], states

    def restored_probabilities(self, input_ids: torch.Tensor, span: tuple[int, int], noise: torch.Tensor,
                               restorations: Sequence[Sequence[tuple[str, int, int]]], clean_states: dict
                               ) -> torch.Tensor:
        """p(next token) of corrupted runs, one row per entry of `restorations`: the (kind, token,
        layer) states put back from `clean_states` in that row (each with its restore window).
        input_ids: (1, tokens) -> (len(restorations), vocab)."""
        by_module: dict[str, tuple[list[int], list[int], str, int]] = {}
        for row, jobs in enumerate(restorations):
            for kind, token, layer in jobs:
                for restored in self.restored_layers(kind, layer):
                    rows, tokens, _, _ = by_module.setdefault(self.modules[kind].format(restored),
                                                              ([], [], kind, restored))
                    rows.append(row)
                    tokens.append(token)

        def restorer(rows, tokens, kind, layer):
            rows, tokens = torch.tensor(rows), torch.tensor(tokens)

            def hook(module, args, output):
                hidden = hidden_of(output).clone()
                hidden[rows, tokens] = clean_states[kind, layer][tokens].to(hidden.dtype)
                return with_hidden(output, hidden)
            return hook

        hooks = {name: restorer(*spec) for name, spec in by_module.items()}
        return self._forward(input_ids.expand(len(restorations), -1), hooks, self._corrupt(span, noise))


def request_target(request: dict) -> str | None:
    """The true object of a request (`target_true`, as `requests.load_requests` gives it for
    CounterFact and EasyEdit records), or None: trace what the model predicts."""
    target = request.get("target_true")
    return target.get("str") if isinstance(target, dict) else target


def trace_requests(model, tok, requests: Sequence[dict], kinds: Sequence[str] = KINDS, noise_factor: float = 3.0,
                   batch_size: int = 64, seed: int = 0, window: int = 1, min_clean: float = 0.0,
                   limit: int | None = None, progress: bool = False) -> dict:
    """Trace requests (prompt with `{}`, subject, optional target_true) whose clean p(true object)
    is at least `min_clean` (facts the model knows, as ROME selects them), the first `limit` such
    (default: all); the i-th request draws its noise with seed `seed + i`; `window` as
    `CausalTracer`'s.

    Returns {"noise", "window", "scanned", "traces": [PromptTrace], "mean": {kind: (6, layers)
    mean restored probability per token group}, "clean", "corrupted"}: means over the traced
    requests, as ROME's average figures."""
    if not requests:
        raise InvalidArgumentError("no requests to trace")
    tracer = CausalTracer(model, tok, noise=1.0, batch_size=batch_size, seed=seed, window=window)
    chosen, scanned, best = [], 0, 0.0
    with tqdm(total=limit, desc=f"facts known (p >= {min_clean})", unit="fact",
              disable=not (progress and min_clean > 0)) as bar:
        for i, request in enumerate(requests):
            if limit is not None and len(chosen) == limit:
                break
            scanned += 1
            if min_clean > 0:
                clean = tracer.clean_probability(request["prompt"], request["subject"], request_target(request))
                best = max(best, clean)
                bar.set_postfix_str(f"{scanned} scanned", refresh=False)
                if clean < min_clean:
                    continue
                bar.update()
            chosen.append((i, request))
    if not chosen:
        raise InvalidArgumentError(f"none of the {scanned} requests has a clean p(true object) of at least "
                                   f"{min_clean} (the highest is {best:.3g}): lower the minimum or give facts the "
                                   "model knows")
    tracer.noise = tracer.noise_scale([r for _, r in chosen], noise_factor)
    total = sum(tracer.states_to_restore(r["prompt"], r["subject"], kinds) for _, r in chosen)
    with tqdm(total=total, desc="causal trace", unit="state", disable=not progress) as bar:
        traces = [tracer.trace(r["prompt"], r["subject"], request_target(r), kinds, seed=seed + i, progress=bar)
                  for i, r in chosen]
    mean = {k: torch.stack([t.grouped(k) for t in traces]).nanmean(0) for k in kinds}
    return {"noise": tracer.noise, "window": window, "scanned": scanned, "min_clean": min_clean, "traces": traces,
            "mean": mean, "clean": sum(t.clean for t in traces) / len(traces),
            "corrupted": sum(t.corrupted for t in traces) / len(traces)}


def subject_last_effects(result: dict, kind: str = "mlp") -> torch.Tensor:
    """(layers,): the mean indirect effect of `kind` states at the subject's last token."""
    if kind not in result["mean"]:
        raise InvalidArgumentError(f"the trace has no {kind} states; trace with kinds including {kind!r}")
    return result["mean"][kind][TOKEN_GROUPS.index("last subject token")] - result["corrupted"]


def recommend_layers(result: dict, window: int = 5, kind: str = "mlp") -> list[int]:
    """The `window` consecutive layers whose `kind` states at the subject's last token have the
    largest mean indirect effect."""
    effects = subject_last_effects(result, kind)
    window = max(1, min(window, len(effects)))
    sums = effects.unfold(0, window, 1).sum(-1)
    start = int(sums.argmax())
    return list(range(start, start + window))


def trace_summary(result: dict, window: int = 5) -> dict:
    """A JSON-ready summary: noise, mean clean/corrupted probability, the mean restored
    probabilities per token group, the recommended layers and every prompt's own map."""
    kinds = list(result["mean"])
    summary = {"noise": result["noise"], "restore_window": result["window"], "scanned": result["scanned"],
               "min_clean": result["min_clean"], "clean": result["clean"], "corrupted": result["corrupted"],
               "token_groups": list(TOKEN_GROUPS),
               "mean_restored": {k: _nan_to_none(v) for k, v in result["mean"].items()}}
    if "mlp" in kinds:
        summary["recommended_layers"] = recommend_layers(result, window)
        summary["peak_mlp_layer"] = int(subject_last_effects(result).argmax())
    summary["prompts"] = [{"prompt": t.prompt, "subject": t.subject, "target": t.target, "tokens": t.tokens,
                           "subject_span": list(t.subject_span), "clean": t.clean, "corrupted": t.corrupted,
                           "restored": {k: v.tolist() for k, v in t.restored.items()}} for t in result["traces"]]
    return summary


def _nan_to_none(matrix: torch.Tensor) -> list:
    return [[None if v != v else v for v in row] for row in matrix.tolist()]


def write_trace(result: dict, out_dir, window: int = 5, title: str = "") -> list:
    """`trace.json` (`trace_summary`) and one heat map per kind, `trace-{kind}.png`, in `out_dir`:
    the prompt's tokens x layers for one request, ROME's six token groups x layers averaged over
    several."""
    import json
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "trace.json"
    path.write_text(json.dumps(trace_summary(result, window), indent=1))
    paths = [path]
    for kind in result["mean"]:
        paths.append(plot_trace(result, kind, out_dir / f"trace-{kind}.png", title))
    return paths


def plot_trace(result: dict, kind: str, path, title: str = ""):
    """A heat map of the restored probability, rows tokens (or token groups), columns layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = result["traces"]
    if len(traces) == 1:
        grid, labels = traces[0].restored[kind], list(traces[0].tokens)
        first, last = traces[0].subject_span
        labels = [f"{label}*" if first <= i <= last else label for i, label in enumerate(labels)]
    else:
        grid, labels = result["mean"][kind], list(TOKEN_GROUPS)
    names = {"block": "block output", "mlp": "MLP output", "attn": "attention output"}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.22 * grid.shape[1]), 0.9 + 0.3 * len(labels)))
    image = ax.imshow(grid.numpy(), cmap={"block": "Purples", "mlp": "Greens", "attn": "Reds"}[kind],
                      aspect="auto", interpolation="nearest", vmin=result["corrupted"] if len(traces) > 1
                      else traces[0].corrupted)
    ax.set_yticks(range(len(labels)), [repr(label)[1:-1] for label in labels], fontsize=8)
    ax.set_xlabel("layer")
    subtitle = f"{len(traces)} prompts, " if len(traces) > 1 else ""
    if kind != "block" and result["window"] > 1:
        names[kind] += f"s of {result['window']} layers around"
    ax.set_title(f"{title + ': ' if title else ''}restoring the {names[kind]}\n({subtitle}corrupted p = "
                 f"{result['corrupted']:.3f}, clean p = {result['clean']:.3f})", fontsize=9)
    fig.colorbar(image, ax=ax, label="p(true object)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
