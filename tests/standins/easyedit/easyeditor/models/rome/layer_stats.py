"""layer_stats as AlphaEdit calls it, with the names the patch reuses (load_dataset, TokenizedDataset,
length_collation, tally, CombinedStat, SecondMoment): one pass per layer, cached in
{stats_dir}/{model}/{ds}_stats/{layer}_{precision}_mom2_{n}.npz."""

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...util.runningstats import CombinedStat, SecondMoment, tally

CALLS = []


def load_dataset(name, config):
    raise RuntimeError("stand-in load_dataset: tests monkeypatch it with a small corpus")


class TokenizedDataset:
    def __init__(self, texts, tokenizer, maxlen):
        self.texts, self.tokenizer, self.maxlen = texts, tokenizer, maxlen

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        ids = self.tokenizer(self.texts[i]["text"])["input_ids"][: self.maxlen]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long)}


def length_collation(token_size):
    def collate(items):
        items = sorted((it for it in items if len(it["input_ids"])), key=lambda it: -len(it["input_ids"]))
        groups, group = [], []
        for it in items:
            if group and (len(group) + 1) * len(group[0]["input_ids"]) > token_size:
                groups.append(group)
                group = []
            group.append(it)
        groups.append(group)
        out = []
        for group in (g for g in groups if g):
            width = len(group[0]["input_ids"])
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, it in enumerate(group):
                ids[row, : len(it["input_ids"])], mask[row, : len(it["input_ids"])] = it["input_ids"], 1
            out.append({"input_ids": ids, "attention_mask": mask})
        return out

    return collate


def layer_stats(model, tokenizer, layer_name, stats_dir, ds_name, to_collect, model_name=None, sample_size=None,
                precision=None, batch_tokens=None, download=True, progress=tqdm, force_recompute=False, hparams=None):
    CALLS.append(layer_name)
    npos = model.config.n_positions if hasattr(model.config, "n_positions") else model.config.max_position_embeddings
    precision = precision or "float64"
    model_name = model_name or model.config._name_or_path.rsplit("/")[-1]
    suffix = "" if sample_size is None else f"_{sample_size}"
    filename = Path(stats_dir) / model_name / f"{ds_name}_stats" / f"{layer_name}_{precision}_mom2{suffix}.npz"
    names = {"wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1")}
    ds = None if filename.exists() else TokenizedDataset(load_dataset(*names[ds_name])["train"], tokenizer, npos)
    stat = CombinedStat(mom2=SecondMoment())
    module = model.get_submodule(layer_name)
    for group in tally(stat, ds, cache=None if force_recompute else filename, sample_size=sample_size,
                       batch_size=100, collate_fn=length_collation(batch_tokens or 3 * npos)):
        for batch in group:
            seen = []
            handle = module.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))
            with torch.no_grad():
                model(**batch)
            handle.remove()
            stat.add(seen[0][batch["attention_mask"].bool()].to(getattr(torch, precision)))
    return stat
