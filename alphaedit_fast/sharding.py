"""Data-parallel editing under torch.distributed (`torchrun`): each rank optimises the values z
and reads the keys of a contiguous slice of a batch's requests, the slices are gathered in
request order, and every rank applies rank 0's update, so all replicas stay bit-identical.

Each request's z depends only on the model and that request, so the split changes z only at
rounding level (the rows a z step batches together differ), as `z_batch_size` does in one
process. A rank that dies or hangs makes the others fail within the group's timeout with a
`DistributedEditError` naming the ranks that did not answer (gloo's monitored barrier).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import DistributedEditError


def default_timeout_s() -> float:
    """Seconds a rank waits for the others at a collective: $ALPHAEDIT_DIST_TIMEOUT, else 30 minutes
    (a z optimisation may keep the ranks apart that long when the split is uneven)."""
    return float(os.environ.get("ALPHAEDIT_DIST_TIMEOUT", 1800))


@dataclass
class Shard:
    """This process's part of every batch: rank `rank` of `world`, in `group` (None: the default
    group); `monitor` is a gloo group for the barriers that name a missing rank."""

    rank: int
    world: int
    group: object = None
    monitor: object = None
    timeout_s: float = field(default_factory=default_timeout_s)

    @classmethod
    def current(cls, group=None) -> Shard | None:
        """The shard of this process when torch.distributed is initialised with several ranks, else None."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
            return None
        monitor = group
        if dist.get_backend(group) != "gloo":  # monitored barriers exist on gloo only
            monitor = _gloo_group(group)
        return cls(dist.get_rank(group), dist.get_world_size(group), group, monitor)

    def bounds(self, n: int) -> list[tuple[int, int]]:
        """(start, stop) of each rank's contiguous slice of n items; the first n % world ranks take one more."""
        size, extra = divmod(n, self.world)
        starts = [r * size + min(r, extra) for r in range(self.world + 1)]
        return list(zip(starts[:-1], starts[1:]))

    def local(self, items: Sequence) -> list:
        """This rank's slice of `items` (possibly empty)."""
        start, stop = self.bounds(len(items))[self.rank]
        return list(items[start:stop])

    def gather_rows(self, rows: torch.Tensor, n: int, what: str) -> torch.Tensor:
        """Every rank's `rows` (its slice's count, ...) stacked in request order: (n, ...) on `rows`' device."""
        import torch.distributed as dist

        counts = [stop - start for start, stop in self.bounds(n)]
        if rows.shape[0] != counts[self.rank]:
            raise DistributedEditError(f"rank {self.rank} holds {rows.shape[0]} rows of {what}, "
                                       f"its slice has {counts[self.rank]}")
        device = self._device(rows)
        padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=device)
        padded[:rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self.barrier(what)
        self._collective(what, lambda: dist.all_gather(parts, padded, group=self.group))
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(rows.device)

    def broadcast_(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Overwrite `tensor` with rank 0's, in place; returns it."""
        import torch.distributed as dist

        device = self._device(tensor)
        buffer = tensor.detach().to(device).contiguous()
        self._collective(what, lambda: dist.broadcast(buffer, self._global(0), group=self.group))
        if buffer is not tensor:
            tensor.copy_(buffer)
        return tensor

    def map_slices(self, compute, items: Sequence, what: str) -> list:
        """`compute(slice) -> list` (one entry per item) on this rank's slice of `items`, every
        rank's results gathered in item order."""
        mine = self.local(items)
        return [x for part in self.gather_objects(compute(mine) if mine else [], what) for x in part]

    def gather_objects(self, value, what: str) -> list:
        """Every rank's `value` (picklable), in rank order."""
        import torch.distributed as dist

        values = [None] * self.world
        self.barrier(what)
        self._collective(what, lambda: dist.all_gather_object(values, value, group=self.group))
        return values

    def require_same(self, value: str, what: str) -> None:
        """Raise DistributedEditError on every rank unless all ranks hold the same `value`."""
        values = self.gather_objects(value, f"comparing the ranks' {what}")
        if len(set(values)) > 1:
            groups: dict[str, list[int]] = {}
            for rank, v in enumerate(values):
                groups.setdefault(v, []).append(rank)
            raise DistributedEditError(f"the ranks hold different {what}: " + "; ".join(
                f"ranks {ranks}" for ranks in groups.values()) + " (every rank must load the same model, "
                "hyper-parameters and requests; nothing was edited)")

    def barrier(self, what: str) -> None:
        """Wait for every rank; after `timeout_s`, DistributedEditError naming those that did not come."""
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=self.timeout_s)
        self._collective(what, lambda: dist.monitored_barrier(self.monitor, timeout=timeout, wait_all_ranks=True))

    def _collective(self, what: str, call) -> None:
        try:
            call()
        except DistributedEditError:
            raise
        except (RuntimeError, ValueError) as err:  # torch's DistBackendError is a RuntimeError
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DistributedEditError(
                f"rank {self.rank} of {self.world}: {what} failed: {first}. Another rank died or hung; its own "
                "log says why. Resume from the last checkpoint (--resume), with any number of ranks") from None

    def _device(self, tensor: torch.Tensor) -> torch.device:
        import torch.distributed as dist

        if dist.get_backend(self.group) == "nccl":
            return tensor.device if tensor.is_cuda else torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _global(self, rank: int) -> int:
        import torch.distributed as dist

        return rank if self.group is None else dist.get_global_rank(self.group, rank)


_GLOO_GROUPS: dict = {}


def _gloo_group(group):
    """A gloo group over `group`'s ranks, made once per group (every rank makes it, in the same order)."""
    import torch.distributed as dist

    if group not in _GLOO_GROUPS:
        ranks = None if group is None else dist.get_process_group_ranks(group)
        _GLOO_GROUPS[group] = dist.new_group(ranks, backend="gloo")
    return _GLOO_GROUPS[group]


def weights_digest(weights: Sequence[torch.Tensor]) -> str:
    """sha256 over every byte of `weights` (to check that all ranks hold the same edit)."""
    digest = hashlib.sha256()
    for weight in weights:
        digest.update(weight.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def current_shard(distributed: bool | None) -> Shard | None:
    """The shard to edit with: None for `distributed=False`; for None (auto), this process's when
    torch.distributed is initialised with several ranks; for True, that one or an error."""
    from .errors import InvalidArgumentError

    if distributed is False:
        return None
    shard = Shard.current()
    if distributed and shard is None:
        raise InvalidArgumentError("distributed=True: initialise torch.distributed with two or more ranks first "
                                   "(torchrun --nproc-per-node N ...)")
    return shard


def check_replicas(shard: Shard, model, names: Sequence[str], hparams, requests: Sequence[dict],
                   context_templates) -> None:
    """Refuse, on every rank and before any weight changes, ranks whose model (embedding and
    edited weights), hyper-parameters, requests or context templates differ."""
    from .storage import model_fingerprint

    def digest(value) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

    shard.require_same(model_fingerprint(model, list(names)), "models (embedding or edited layers' weights)")
    shard.require_same(digest(hparams.to_dict()), "hyper-parameters")
    shard.require_same(digest([dict(r) for r in requests]), "requests")
    shard.require_same(digest(context_templates), "context templates")


def join_ranks(device=None, device_map: str | None = None) -> tuple[object, dict | None, bool]:
    """Under `torchrun` (WORLD_SIZE > 1): join its process group (nccl on GPUs, gloo on the CPU,
    with the `default_timeout_s` timeout) and place this rank's replica: its own GPU (LOCAL_RANK),
    or with `device_map="auto"` its own share of the node's GPUs (`rank_gpus`, as a max_memory
    for accelerate). Returns (device, max_memory, whether this process writes the outputs)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return device, None, True
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=default_timeout_s()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    max_memory = None
    if torch.cuda.is_available():
        if device_map is not None:
            gpus = rank_gpus(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", world)), torch.cuda.device_count())
            torch.cuda.set_device(gpus[0])
            max_memory = {g: torch.cuda.mem_get_info(g)[0] for g in gpus}
        elif device is None:
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
    return device, max_memory, dist.get_rank() == 0


def rank_gpus(local_rank: int, local_world: int, n_gpus: int) -> list[int]:
    """The GPUs of one rank's replica when each of a node's `local_world` ranks spreads its model
    over an equal share of the node's `n_gpus` (8 GPUs, 4 ranks: rank 1 takes GPUs 2 and 3)."""
    from .errors import InvalidArgumentError

    if n_gpus < local_world or n_gpus % local_world:
        raise InvalidArgumentError(f"--device-map auto under torchrun: {local_world} ranks per node cannot share "
                                   f"{n_gpus} GPU(s) equally; use a number of ranks per node that divides {n_gpus}")
    share = n_gpus // local_world
    return list(range(local_rank * share, (local_rank + 1) * share))


def wait_for_ranks(what: str) -> None:
    """A monitored barrier of the default group when several ranks run (else nothing): e.g. after
    every rank has checked the output directory and before rank 0 writes there."""
    shard = Shard.current()
    if shard is not None:
        shard.barrier(what)


def leave_ranks() -> None:
    """Wait for every rank, then leave the process group `join_ranks` joined (if any)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        wait_for_ranks("finishing")
        dist.destroy_process_group()
