"""Wall time per named phase, with GPU work synchronised at each boundary."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class Phases:
    """`with phases("z"): ...` adds the block's seconds to `phases.seconds["z"]`."""

    def __init__(self, device: torch.device | str = "cpu", seconds: dict[str, float] | None = None):
        self.seconds = seconds if seconds is not None else {}
        self.cuda = torch.device(device).type == "cuda"

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
