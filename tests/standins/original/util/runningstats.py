"""Stand-in running statistics: the npz state layout of the original's CombinedStat/SecondMoment
("<name>.count", "<name>.mom2", "<name>.constructor", plus the tally arguments; None stored as NaN)."""

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
        return {"constructor": "util.runningstats.SecondMoment()", "count": self.count, "mom2": self.mom2.numpy()}

    def load_state_dict(self, state):
        self.count, self.mom2 = int(state["count"]), torch.from_numpy(state["mom2"])


class CombinedStat:
    def __init__(self, **stats):
        self._objs = stats

    def __getattr__(self, name):
        if name != "_objs" and name in self._objs:
            return self._objs[name]
        raise AttributeError(name)

    def add(self, x):
        for stat in self._objs.values():
            stat.add(x)

    def state_dict(self):
        return {f"{p}.{k}": v for p, stat in self._objs.items() for k, v in stat.state_dict().items()}

    def load_state_dict(self, state):
        for p, stat in self._objs.items():
            stat.load_state_dict({k[len(p) + 1:]: v for k, v in state.items() if k.startswith(p + ".")})


def box_numpy_null(d):
    return {k: np.array(np.nan) if v is None else v for k, v in d.items()}


def _unbox(v):
    return None if v.ndim == 0 and v.dtype == np.float64 and np.isnan(v) else v


def load_cached_state(cachefile, args, quiet=False, throw=False):
    try:
        with np.load(cachefile) as data:
            state = {k: _unbox(data[k]) for k in data.files}
    except (FileNotFoundError, ValueError):
        return None
    for key, value in args.items():
        if key not in state or state[key] != value:
            return None
    return state


def save_cached_state(cachefile, obj, args):
    state = {**obj.state_dict(), **args}
    os.makedirs(os.path.dirname(cachefile), exist_ok=True)
    np.savez(cachefile, **box_numpy_null(state))
