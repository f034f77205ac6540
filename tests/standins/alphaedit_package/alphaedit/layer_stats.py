"""Stand-in layer_stats: one layer per call, one text per forward, over the texts the package samples
(sample_size of them, chosen by random.Random(1)), cached in the same .npz files."""

import random
from pathlib import Path

import torch

from .spy import CALLS
from .utils.running_stats import CombinedStat, SecondMoment, load_cached_state, save_cached_state

SOURCES = {"wikipedia": ("wikimedia/wikipedia", "20231101.en"), "wikitext": ("Salesforce/wikitext",
                                                                           "wikitext-103-raw-v1")}


def load_dataset(path, name, split):  # the tests replace it: nothing is downloaded
    raise RuntimeError("the stand-in reads no data set")


def layer_stats(model, tokenizer, layer_name, stats_dir, dataset_name, to_collect, *, sample_size=None,
                precision="float32", batch_tokens=None, force_recompute=False):
    CALLS.append("layer_stats")
    maxlen = min(int(getattr(model.config, "max_position_embeddings", 4096)), 4096)
    model_name = str(model.config._name_or_path).rstrip("/").split("/")[-1]
    suffix = "" if sample_size is None else f"_{sample_size}"
    filename = (Path(stats_dir) / model_name / f"{dataset_name}_stats"
                / f"{layer_name}_{precision}_{'-'.join(sorted(to_collect))}{suffix}.npz")
    stat = CombinedStat(mom2=SecondMoment())
    state = None if force_recompute else load_cached_state(filename, {"sample_size": sample_size})
    if state is not None:
        stat.load_state_dict(state)
        return stat
    texts = load_dataset(*SOURCES[dataset_name], split="train")
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
