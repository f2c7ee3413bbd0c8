"""A pruning step shared out over the processes of torch.distributed.

Every rank computes its share of the Fisher gradients (one backward pass per calibration batch, as
always), but each target layer has one *owner* rank: the rows of every gradient chunk are sent to the
layers' owners (one all-to-all per chunk), so the owner accumulates that layer's Fisher from all ranks'
gradients, in the order one process would (`interleave`), and only the owner keeps the layer's Fisher,
forms its inverse and runs the method's kernel on it. The global threshold is found across ranks
(cap_hf.engine.selection), each owner computes its layers' new weights and broadcasts them, so every rank ends
with the same model. Memory per rank: its share of the layers' Fisher and results, plus gradient rows.

Layers go to owners by a greedy balance of their Fisher size (largest first, to the least loaded rank):
deterministic, so every rank computes the same owners from the same plan. One process is the case
world == 1 of the same code: no collective is called.

Collectives run in the default process group, or in one created for the step with `dist_timeout`
seconds; a lost or silent rank turns into a RankError that says which rank saw it and during what,
instead of a hang.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


class RankError(RuntimeError):
    """A collective of the pruning step failed: another rank failed, disagreed or did not answer in time."""


def initialised() -> bool:
    """torch.distributed is available and a process group is up."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def share_of(total: int, rank: int, world: int) -> int:
    """The gradients rank `rank` computes out of `total`: total // world, one more for the first total % world."""
    return total // world + (1 if rank < total % world else 0)


def assign_owners(costs: Mapping[str, float], world: int) -> dict[str, int]:
    """{layer: owner rank}: largest cost first, each to the least loaded rank (ties: the lower rank, and for
    equal costs the earlier layer first), so the heaviest rank carries at most the mean plus one layer."""
    loads = [0.0] * world
    owners = {}
    for name in sorted(costs, key=lambda n: -costs[n]):  # stable: equal costs keep their order
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[name] = rank
        loads[rank] += costs[name]
    return {name: owners[name] for name in costs}


@dataclass
class Ranks:
    """The processes a pruning step is shared out over (rank, world, the group its collectives use)."""

    rank: int = 0
    world: int = 1
    group: object | None = None  # a ProcessGroup created for the step (dist_timeout), else the default group
    timeout: float | None = None
    device: torch.device = torch.device("cpu")  # where small collective tensors live (CUDA under NCCL)

    @classmethod
    def current(cls, timeout: float | None = None) -> Ranks:
        """The initialised torch.distributed group (every rank must call this together), or one process."""
        if not initialised() or torch.distributed.get_world_size() == 1:
            return cls()
        backend = torch.distributed.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        group = None
        if timeout is not None:
            group = torch.distributed.new_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout)))
        return cls(torch.distributed.get_rank(), torch.distributed.get_world_size(), group, timeout, device)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def close(self) -> None:
        if self.group is not None:
            torch.distributed.destroy_process_group(self.group)
            self.group = None

    def shares(self, total: int) -> list[int]:
        return [share_of(total, r, self.world) for r in range(self.world)]

    # ---- collectives with clear errors ----------------------------------------------------------------
    def _failed(self, what: str, err: Exception) -> RankError:
        limit = (f"dist_timeout={self.timeout:g} s" if self.timeout is not None
                 else "the process group's timeout (accelerate / --ddp_timeout)")
        return RankError(
            f"Rank {self.rank} of {self.world}: the pruning step's {what} failed: another rank stopped, failed or did "
            f"not answer within {limit}. Look for the first error in the other ranks' logs; if a rank is only slow "
            f"(a large layer group on one rank), raise --dist_timeout. ({type(err).__name__}: {str(err)[:300]})")

    def all_reduce(self, tensor: torch.Tensor, what: str, op: str = "SUM") -> torch.Tensor:
        if not self.distributed:
            return tensor
        try:
            torch.distributed.all_reduce(tensor, op=getattr(torch.distributed.ReduceOp, op), group=self.group)
        except (RuntimeError, ValueError) as err:
            raise self._failed(what, err) from err
        return tensor

    def sum(self, values: Sequence[float], what: str, dtype: torch.dtype = torch.float64) -> list:
        """Element-wise sum over ranks of a short list of numbers."""
        if not self.distributed:
            return list(values)
        return self.all_reduce(torch.tensor(list(values), dtype=dtype, device=self.device), what).tolist()

    def broadcast(self, tensor: torch.Tensor, src: int, what: str) -> None:
        if not self.distributed:
            return
        try:
            torch.distributed.broadcast(tensor, src=src, group=self.group)  # the step's group holds every rank
        except (RuntimeError, ValueError) as err:
            raise self._failed(what, err) from err

    def gather_objects(self, value, what: str) -> list:
        if not self.distributed:
            return [value]
        gathered = [None] * self.world
        try:
            torch.distributed.all_gather_object(gathered, value, group=self.group)
        except (RuntimeError, ValueError) as err:
            raise self._failed(what, err) from err
        return gathered

    def agree(self, values: Mapping[str, object], what: str) -> None:
        """Every rank must hold the same `values`; otherwise every rank raises the same ValueError, naming the
        first rank that differs from rank 0 and what differs."""
        gathered = self.gather_objects(dict(values), what)
        for rank, other in enumerate(gathered[1:], start=1):
            for key, mine in gathered[0].items():
                theirs = other.get(key)
                if theirs != mine:
                    raise ValueError(f"Rank {rank} disagrees with rank 0 on the {what}: its {key} is "
                                     f"{_short(theirs, mine)}. Every process must prune the same model with the "
                                     "same recipe (check the launch command, the config files and the model folder "
                                     "each rank reads).")

    def exchange(self, send: torch.Tensor, send_sizes: Sequence[int], receive: torch.Tensor,
                 receive_sizes: Sequence[int], what: str) -> _Pending:
        """all_to_all_single, started: send[segment r] goes to rank r, receive[segment s] comes from rank s once
        the returned handle's wait() is done (the caller works meanwhile)."""
        try:
            work = torch.distributed.all_to_all_single(receive, send, list(receive_sizes), list(send_sizes),
                                                       group=self.group, async_op=True)
        except (RuntimeError, ValueError) as err:
            raise self._failed(what, err) from err
        return _Pending(self, work, what)


@dataclass
class _Pending:
    ranks: Ranks
    work: object
    what: str

    def wait(self) -> None:
        try:
            self.work.wait()
        except (RuntimeError, ValueError) as err:
            raise self.ranks._failed(self.what, err) from err


def _short(theirs, mine) -> str:
    """What differs, briefly: for lists, the items one side has and the other lacks."""
    if isinstance(theirs, list) and isinstance(mine, list):
        extra = [x for x in theirs if x not in mine][:3]
        missing = [x for x in mine if x not in theirs][:3]
        if extra or missing:
            return f"different (it has {extra} that rank 0 lacks, and lacks {missing})"
        return "in a different order"
    return f"{theirs!r} where rank 0 has {mine!r}"


def rows_per_rank(rows: int, world: int) -> int:
    """Gradients each rank adds to one exchange so that an exchange carries `rows` in all."""
    return math.ceil(rows / world)


def interleave_index(counts: Sequence[int], per_rank: int, device: torch.device) -> torch.Tensor | None:
    """Received rows are put in the order one process would have met them: row j of every rank before row
    j + 1 (rank r's j-th gradient is batch j * world + r when each rank reads batches[r::world]), position
    j * world + r. `counts[r]` rows of rank r are valid: the positions to keep, or None when all are."""
    world = len(counts)
    if all(c == per_rank for c in counts):
        return None
    index = [j * world + r for j in range(per_rank) for r in range(world) if j < counts[r]]
    return torch.tensor(index, dtype=torch.long, device=device)
