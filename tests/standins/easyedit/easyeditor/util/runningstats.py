"""The parts of EasyEdit's runningstats that AlphaEdit's statistics use: SecondMoment, CombinedStat,
npz caching keyed by sample_size, and tally (first `sample_size` items, batches of `batch_size`)."""

import os

import numpy as np
import torch


class SecondMoment:
    def __init__(self):
        self.count, self.mom2 = 0, None

    def add(self, a):
        if self.mom2 is None:
            self.mom2 = a.new_zeros(a.shape[1], a.shape[1])
        self.count += a.shape[0]
        self.mom2 += a.T @ a

    def moment(self):
        return self.mom2 / self.count

    def state_dict(self):
        return {"count": self.count, "mom2": self.mom2.cpu().numpy()}

    def load_state_dict(self, state):
        self.count, self.mom2 = int(state["count"]), torch.from_numpy(np.array(state["mom2"]))


class CombinedStat:
    def __init__(self, **objs):
        self.__dict__["_objs"] = objs

    def __getattr__(self, key):
        try:
            return self.__dict__["_objs"][key]
        except KeyError:
            raise AttributeError(key) from None

    def add(self, a):
        for obj in self._objs.values():
            obj.add(a)

    def state_dict(self):
        return {f"{p}.{k}": v for p, obj in self._objs.items() for k, v in obj.state_dict().items()}

    def load_state_dict(self, state):
        for p, obj in self._objs.items():
            obj.load_state_dict({k[len(p) + 1:]: v for k, v in state.items() if k.startswith(p + ".")})


def load_cached_state(cachefile, args, quiet=False):
    if cachefile is None or not os.path.exists(cachefile):
        return None
    with np.load(cachefile) as data:
        state = {k: data[k] for k in data.files}
    if any(k not in state or state[k] != v for k, v in args.items()):
        return None
    return state


def save_cached_state(cachefile, obj, args):
    if cachefile is None:
        return
    state = {**obj.state_dict(), **args}
    os.makedirs(os.path.dirname(cachefile), exist_ok=True)
    np.savez(cachefile, **state)


def tally(stat, dataset, cache=None, sample_size=None, batch_size=100, collate_fn=None, **loader_options):
    state = load_cached_state(cache, {"sample_size": sample_size})
    if state is not None:
        stat.load_state_dict(state)
        return iter(())
    items = [dataset[i] for i in range(min(len(dataset), sample_size or len(dataset)))]

    def batches():
        for start in range(0, len(items), batch_size):
            yield collate_fn(items[start:start + batch_size])
        save_cached_state(cache, stat, {"sample_size": sample_size})

    return batches()
