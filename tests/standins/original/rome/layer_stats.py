"""Stand-in layer_stats: one layer per call, one text per forward pass, over the texts the
original samples (sample_size of them, chosen by random.Random(1)), cached in the same .npz files."""

import random
from pathlib import Path

import torch
from datasets import load_dataset
from util.runningstats import CombinedStat, SecondMoment, load_cached_state, save_cached_state
from util.spy import CALLS

CONFIGS = {"wikitext": "wikitext-103-raw-v1", "wikipedia": "20200501.en"}


def layer_stats(model, tokenizer, layer_name, stats_dir, ds_name, to_collect, model_name=None, sample_size=None,
                precision=None, batch_tokens=None, download=True, progress=None, force_recompute=False,
                hparams=None):
    CALLS.append("layer_stats")
    npos = model.config.n_positions
    batch_tokens = batch_tokens or 3 * npos
    maxlen = min(npos, batch_tokens)
    precision = precision or "float64"
    suffix = "" if sample_size is None else f"_{sample_size}"
    if batch_tokens < npos:
        suffix = "_t{batch_tokens}" + suffix
    model_name = model_name or model.config._name_or_path.rsplit("/")[-1]
    filename = Path(stats_dir) / model_name / f"{ds_name}_stats" / \
        f"{layer_name}_{precision}_{'-'.join(sorted(to_collect))}{suffix}.npz"
    stat = CombinedStat(mom2=SecondMoment())
    state = None if force_recompute else load_cached_state(filename, {"sample_size": sample_size})
    if state is not None:
        stat.load_state_dict(state)
        return stat
    texts = load_dataset(ds_name, CONFIGS[ds_name])["train"]
    order = list(range(len(texts)))
    if sample_size is not None:
        random.Random(1).shuffle(order)
        order = order[:sample_size]
    module = dict(model.named_modules())[layer_name]
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            for i in order:
                ids = tokenizer.encode(texts[i]["text"], truncation=True, max_length=maxlen)
                if ids:
                    CALLS.append("forward")
                    model(input_ids=torch.tensor([ids]))
                    stat.add(seen.pop()[0].to(getattr(torch, precision)))
    finally:
        handle.remove()
    if not force_recompute:
        save_cached_state(filename, stat, {"sample_size": sample_size})
    return stat
