"""collect_fisher: gradients in, Fisher statistics out, with the rows of each layer sent to its owner rank.

One process: every chunk of gradients goes into the Fisher. Several processes (cap_hf.engine.ranks): each
computes its share of the gradients from its own batches, and every chunk's rows go to the owner of each
layer (all-to-all, RowExchange), interleaved as one process reading batches[r::world] on rank r would meet
them; the Fisher returned holds only this rank's layers, built with the one-process math.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

from cap_hf.engine.fisher import BlockFisher, gradient_rows, relative_dampening
from cap_hf.engine.gradients import iter_gradients
from cap_hf.engine.memory import PhaseProfiler, maybe_phase
from cap_hf.engine.ranks import Ranks, interleave_index, rows_per_rank


class RowExchange:
    """Send buffers with one (per_rank, numel) slot per layer, laid out by owner (the all-to-all's segments);
    with several ranks two of each, so that a chunk's exchange runs while the next gradients are taken."""

    def __init__(self, numels: Mapping[str, int], owners: Mapping[str, int], ranks: Ranks, per_rank: int,
                 device: torch.device, profiler: PhaseProfiler | None = None):
        self.numels, self.owners, self.ranks, self.per_rank = numels, owners, ranks, per_rank
        self.device, self.profiler = device, profiler
        self.layout = sorted(numels, key=lambda name: owners[name])
        self.mine = [name for name in numels if owners[name] == ranks.rank]
        copies = 2 if ranks.distributed else 1
        self.sends = [torch.empty(per_rank * sum(numels.values()), device=device) for _ in range(copies)]
        self.slots = []
        for send in self.sends:
            slot, offset = {}, 0
            for name in self.layout:
                slot[name] = send[offset:offset + per_rank * numels[name]].view(per_rank, numels[name])
                offset += per_rank * numels[name]
            self.slots.append(slot)
        self.send_sizes = [per_rank * sum(numels[n] for n in numels if owners[n] == r) for r in range(ranks.world)]
        self.owned = sum(numels[name] for name in self.mine)
        self.receives = [torch.empty(ranks.world * per_rank * self.owned, device=device) for _ in range(copies)] \
            if ranks.distributed else []

    def run(self, gradients: Iterator[Mapping[str, torch.Tensor]], shares: list[int]) -> Iterator[dict]:
        """Fill the slots from `gradients` (this rank's share) exchange by exchange, and yield each
        exchange's rows of this rank's layers, {name: (rows, numel)}, in one process's order."""
        pending = None  # the exchange in flight: (handle, receive buffer, rows per rank)
        copies = len(self.sends)
        for exchange in range(math.ceil(max(shares) / self.per_rank)):
            counts = [max(0, min(self.per_rank, share - exchange * self.per_rank)) for share in shares]
            slot = self.slots[exchange % copies]
            for row in range(counts[self.ranks.rank]):
                grads = next(gradients)
                for name, g in grads.items():
                    slot[name][row].copy_(g)
                del grads, g  # in the send buffer now
            if not self.ranks.distributed:
                yield {name: slot[name][:counts[0]] for name in self.mine}
                continue
            receive = self.receives[exchange % copies]
            handle = self.ranks.exchange(self.sends[exchange % copies], self.send_sizes, receive,
                                         [self.per_rank * self.owned] * self.ranks.world,
                                         f"exchange of gradient rows {exchange}")
            if pending is not None:
                yield self.arrived(*pending)  # while this exchange runs
            pending = (handle, receive, counts)
        if pending is not None:
            yield self.arrived(*pending)

    def arrived(self, handle, receive: torch.Tensor, counts: list[int]) -> dict[str, torch.Tensor]:
        """An exchange's rows of this rank's layers, in order, once it is done."""
        world, per_rank = self.ranks.world, self.per_rank
        with maybe_phase(self.profiler, "exchange"):
            handle.wait()
            index = interleave_index(counts, per_rank, self.device)
            stacked = receive.view(world, per_rank * self.owned)
            rows, offset = {}, 0
            for name in self.layout:
                if self.owners[name] == self.ranks.rank:
                    n = self.numels[name]
                    part = stacked[:, offset:offset + per_rank * n].view(world, per_rank, n)
                    rows[name] = part.transpose(0, 1).reshape(-1, n)  # one copy, row j of every rank
                    if index is not None:
                        rows[name] = rows[name].index_select(0, index)
                    offset += per_rank * n
        return rows


def new_fishers(first: Mapping[str, torch.Tensor], numels: Mapping[str, int], block_size: int | Mapping[str, int],
                kinds: list[str], accumulate: str, num_grads: int, damp: float | None, relative_damp: float | None,
                masks: Mapping[str, torch.Tensor] | None, device: torch.device) -> dict[str, BlockFisher]:
    """One BlockFisher per kind over the layers of `first` (this rank's), its dampening fixed from the first
    gradients when it is relative."""
    damps = damp
    if relative_damp is not None and "block" in kinds:
        damps = relative_dampening(first, relative_damp, {name: m.reshape(-1) for name, m in (masks or {}).items()})
    sizes = block_size if not isinstance(block_size, Mapping) else {name: block_size[name] for name in first}
    fishers = {}
    for kind in kinds:
        inverse = accumulate == "inverse" and kind == "block"
        fishers[kind] = BlockFisher({name: numels[name] for name in first}, sizes, kind, device=device,
                                    damp=damps if kind == "block" else None,
                                    **({"accumulate": "inverse", "num_grads": num_grads} if inverse else {}))
    return fishers


def collect_fisher(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    batches: Iterable[Mapping[str, torch.Tensor]],
    num_grads: int,
    block_size: int | Mapping[str, int],
    kinds: Iterable[str] = ("block",),
    *,
    grad_chunk_size: int = 32,
    device: torch.device | str | None = None,
    accumulate: str = "sum",
    damp: float | None = None,
    relative_damp: float | None = None,
    profiler: PhaseProfiler | None = None,
    owners: Mapping[str, int] | None = None,
    ranks: Ranks | None = None,
    **gradient_options,
) -> dict[str, BlockFisher]:
    """The Fisher statistics of `kinds` ('block', 'shared') from `num_grads` gradients in all (iter_gradients,
    whose options pass through), `grad_chunk_size` at a time; `owners` ({layer: rank}) and `ranks` share the
    work out over processes (see the module's docstring).

    The 'block' kind carries its dampening (BlockFisher.damps): `damp` (absolute), or `relative_damp`
    times the mean Fisher diagonal of each layer, estimated from the first gradients (relative_dampening).
    accumulate='inverse' builds the 'block' kind as its inverse directly (see BlockFisher), which is why
    the dampening is fixed before the first update. `profiler` times the accumulation as "fisher" and the
    rows sent between ranks as "exchange"."""
    if damp is not None and relative_damp is not None:
        raise ValueError("Give damp (absolute) or relative_damp, not both.")
    kinds = list(kinds)
    ranks = ranks or Ranks()
    owners = {name: int((owners or {}).get(name, 0)) for name in targets}
    device = torch.device(device) if device is not None else next(model.parameters()).device
    numels = {name: module.weight.numel() for name, module in targets.items()}
    shares = ranks.shares(num_grads)
    first_rows = gradient_rows(grad_chunk_size, num_grads, accumulate, kinds)  # one process's first chunk
    exchange = RowExchange(numels, owners, ranks, rows_per_rank(first_rows, ranks.world), device, profiler)
    gradients = iter_gradients(model, targets, batches, shares[ranks.rank], profiler=profiler, **gradient_options)
    fishers: dict[str, BlockFisher] = {}
    for rows in exchange.run(gradients, shares):
        with maybe_phase(profiler, "fisher"):
            if not fishers:
                fishers = new_fishers({name: r[:first_rows] for name, r in rows.items()}, numels, block_size, kinds,
                                      accumulate, num_grads, damp, relative_damp, gradient_options.get("masks"),
                                      device)
            for fisher in fishers.values():
                fisher.add(rows)
    for _ in gradients:  # runs iter_gradients' own end-of-data check
        pass
    return fishers
