"""Wall time (and peak memory) per named phase, with GPU work synchronised at each boundary."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Phases:
    """`with phases("z"): ...` adds the block's seconds to `phases.seconds["z"]` and, when a
    `peak_bytes` dict is given, records there the peak memory while it ran (`peak_memory_bytes`)."""

    def __init__(self, device: torch.device | str = "cpu", seconds: dict[str, float] | None = None,
                 peak_bytes: dict[str, int] | None = None):
        self.seconds = seconds if seconds is not None else {}
        self.peak_bytes = peak_bytes
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
            if self.peak_bytes is not None:
                torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            if self.peak_bytes is not None:
                self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), peak_memory_bytes(self.device))

    def since(self, before: dict[str, float], *names: str) -> str:
        """The seconds each named phase gained since `before` (a copy of `seconds`): "keys 0.12 s, solve 0.03 s"."""
        return ", ".join(f"{name} {self.seconds.get(name, 0.0) - before.get(name, 0.0):.2f} s" for name in names)


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak memory: allocated on a GPU since its last reset, else this process's peak resident set
    (Linux/macOS), which never decreases, so on the CPU a phase's value bounds it from above."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import platform
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def progress_line(message: str) -> None:
    """One line of progress on stderr, printed above a running tqdm bar instead of through it."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def silent(*_args, **_kwargs) -> None:
    """A `print` that prints nothing (the ranks of a data-parallel run but rank 0)."""


def edit_progress(total: int, done: int = 0, desc: str = "edits", disable: bool = False):
    """A progress bar of edits on stderr: edits done, edits per second and the time left
    (counted from `done`, where a resumed stream starts); `disable`: none (a rank but rank 0)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit="edit", file=sys.stderr, smoothing=0.1, disable=disable)
