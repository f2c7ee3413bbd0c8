"""Pruning from Scratch (Wang, Zhang, Xie, Zhou, Su, Zhang, Hu, AAAI 2020): the architecture is found on an
expanded network with random, frozen weights, then trained from scratch; no pretrained model is needed.

expanded_config(config)            every prunable width x1.25 (a ResNet's residual stream too, but it is not gated;
                                   a ViT keeps its hidden size and gains heads and MLP neurons)
ChannelGates(graph)                one gate in [0, 1] per channel of every uncoupled group (a ResNet block's inner
                                   channels, a ViT layer's heads and MLP neurons), multiplied into the input of the
                                   group's one reader: after BN+ReLU, which equals the paper's before-ReLU gate for
                                   gates >= 0; after GELU; on each head's output before o_proj
learn_gates(...)                   cross-entropy + lambda * (mean|gate| - r)^2, Adam on the gates only, clamped to
                                   [0, 1] after every step; kept: the best validation accuracy among the epochs whose
                                   fraction of non-zero gates is at most r (the paper's rule)
search_architecture(...)           the gates ranked globally; the most kept whose model stays within the FLOPs
                                   target (a fraction of the original, unexpanded model's), by bisection
prune_from_scratch(...)            all of the above; returns the architecture with fresh random weights

Removal and export are the structured methods' own (groups.remove_channels): the result is a PrunedViT /
PrunedResNet that loads with from_pretrained.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cap_hf.modeling import (
    PrunedResNetConfig,
    PrunedResNetForImageClassification,
    PrunedViTConfig,
    PrunedViTForImageClassification,
)
from cap_hf.structured.channels import fewest
from cap_hf.structured.config import removal_record
from cap_hf.structured.groups import ChannelGraph, ChannelGroup, _config_values, remove_channels
from cap_hf.structured.measure import count_macs

logger = logging.getLogger(__name__)

# the paper's defaults (CIFAR-10; ImageNet used lambda 0.05, r 0.5 and one gate epoch)
EXPAND_RATIO = 1.25
GATE_LR = 0.01
GATE_LAMBDA = 0.5
GATE_SPARSITY = 0.2
GATE_EPOCHS = 10


def _scaled(values: Sequence[int], ratio: float) -> list[int]:
    return [max(1, round(v * ratio)) for v in values]


def expanded_config(config, ratio: float = EXPAND_RATIO, stream_ratio: float | None = None):
    """The config of the expanded network (a PrunedViTConfig or PrunedResNetConfig): a ViT's heads and MLP
    widths times `ratio` per layer (hidden size and head size unchanged); a ResNet's blocks' inner widths
    times `ratio` and its stem and residual streams times `stream_ratio` (default `ratio`, as the paper's
    CIFAR ResNets, whose base width sets both; its ImageNet ResNet-50 scales them apart)."""
    stream_ratio = ratio if stream_ratio is None else stream_ratio
    if config.model_type in ("vit", "pruned_vit"):
        if stream_ratio not in (ratio, 1.0):
            raise ValueError("A ViT's hidden size (its residual stream) is not widened; stream_expand_ratio applies "
                             "to ResNets.")
        config = config if config.model_type == "pruned_vit" else PrunedViTConfig(**_config_values(config))
        values = _config_values(config, "layer_num_heads", "layer_intermediate_sizes")
        return PrunedViTConfig(**values, layer_num_heads=_scaled(config.layer_num_heads, ratio),
                               layer_intermediate_sizes=_scaled(config.layer_intermediate_sizes, ratio))
    if config.model_type in ("resnet", "pruned_resnet"):
        config = config if config.model_type == "pruned_resnet" else PrunedResNetConfig(**_config_values(config))
        values = _config_values(config, "embedding_size", "hidden_sizes", "block_widths")
        return PrunedResNetConfig(**values, embedding_size=_scaled([config.embedding_size], stream_ratio)[0],
                                  hidden_sizes=_scaled(config.hidden_sizes, stream_ratio),
                                  block_widths=[_scaled(block, ratio) for block in config.block_widths])
    raise ValueError(f"Pruning from Scratch supports ViT and ResNet configs, got model_type {config.model_type!r}.")


def original_macs(config, image_size: int | Sequence[int]) -> int:
    """MACs per image of the original (unexpanded) model of `config`: what FLOPs targets are relative to."""
    return count_macs(build_classifier(expanded_config(config, 1.0)).eval(), image_size)


def build_classifier(config) -> nn.Module:
    """A randomly initialised classifier of a PrunedViT / PrunedResNet config (the architecture's own init)."""
    classes = {"pruned_vit": PrunedViTForImageClassification, "pruned_resnet": PrunedResNetForImageClassification}
    return classes[config.model_type](config)


class ChannelGates(nn.Module):
    """One gate per channel of each uncoupled group of `graph` (initialised to 1), applied while `applied()`
    is entered: the input of the group's reader is multiplied channel-wise (a head's gate on all its
    head_dim indices). Coupled groups (residual streams, a ViT's hidden size) are not gated."""

    def __init__(self, graph: ChannelGraph):
        super().__init__()
        self.groups: list[ChannelGroup] = [g for g in graph.groups if not g.coupled]
        if not self.groups:
            raise ValueError(f"{type(graph.model).__name__} has no uncoupled channel groups to gate.")
        device = next(graph.model.parameters()).device
        self.values = nn.ParameterList(nn.Parameter(torch.ones(g.size, device=device)) for g in self.groups)
        self._positions = []  # per group: the gate of each input index of its reader
        for group in self.groups:
            reader = group.consumers[0]
            width = reader.module.in_channels if isinstance(reader.module, nn.Conv2d) else reader.module.in_features
            if len(reader.channels) != width:
                raise ValueError(f"{reader.name} reads {width} channels but its group {group.name} has "
                                 f"{len(reader.channels)}; cannot gate it.")
            position = torch.empty(width, dtype=torch.long)
            position[torch.tensor(reader.channels)] = torch.arange(width) // group.unit
            self._positions.append(position.to(device))

    @contextmanager
    def applied(self):
        handles = []
        for group, gate, position in zip(self.groups, self.values, self._positions, strict=True):
            module = group.consumers[0].module
            dim = 1 if isinstance(module, nn.Conv2d) else -1

            def hook(_module, args, gate=gate, position=position, dim=dim):
                x = args[0]
                shape = [1] * x.dim()
                shape[dim] = -1
                return (x * gate[position].view(shape), *args[1:])

            handles.append(module.register_forward_pre_hook(hook))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def flat(self) -> torch.Tensor:
        return torch.cat(list(self.values))

    @torch.no_grad()
    def clamp_(self) -> None:
        for gate in self.values:
            gate.clamp_(0.0, 1.0)



@dataclass
class GateLearning:
    """The gates kept (`values`, one tensor per gated group), the epoch they come from (1-based), and per
    epoch: validation accuracy, mean gate and fraction of non-zero gates."""

    values: list[torch.Tensor]
    epoch: int
    accuracy: float | None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _on(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["pixel_values"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True)


@torch.no_grad()
def _accuracy(model: nn.Module, batches: Iterable[dict]) -> float:
    device = next(model.parameters()).device
    correct = total = 0
    for batch in batches:
        pixel_values, labels = _on(batch, device)
        correct += (model(pixel_values=pixel_values).logits.argmax(-1) == labels).sum().item()
        total += len(labels)
    return correct / max(total, 1)


def learn_gates(model: nn.Module, gates: ChannelGates, train_batches: Callable[[], Iterable[dict]],
                val_batches: Callable[[], Iterable[dict]] | None, epochs: int = GATE_EPOCHS, lr: float = GATE_LR,
                lambd: float = GATE_LAMBDA, sparsity: float = GATE_SPARSITY) -> GateLearning:
    """Learn the gates on `model` (weights frozen at their random init; batch norms in training mode use the
    batch's statistics, as in the paper). `train_batches()` / `val_batches()` give an epoch's batches
    (pixel_values, labels), moved to the model's device. Without validation batches, the first epoch that
    meets the rule (else the last) is kept."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    model.requires_grad_(False)
    optimizer = torch.optim.Adam(gates.parameters(), lr=lr)
    history, snapshots = [], []
    with gates.applied():
        for epoch in range(1, epochs + 1):
            model.train()
            for batch in train_batches():
                pixel_values, labels = _on(batch, device)
                regulariser = (gates.flat().abs().mean() - sparsity) ** 2
                loss = F.cross_entropy(model(pixel_values=pixel_values).logits, labels) + lambd * regulariser
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                gates.clamp_()
            model.eval()
            flat = gates.flat().detach()
            row = {"epoch": epoch, "loss": loss.item(), "mean_gate": flat.mean().item(),
                   "nonzero_fraction": (flat > 0).float().mean().item()}
            if val_batches is not None:
                row["val_accuracy"] = _accuracy(model, val_batches())
            history.append(row)
            snapshots.append([g.detach().clone() for g in gates.values])
            logger.info("gates, epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items() if k != "epoch"})
    # the paper's rule (script/learn_gates.py): among the epochs whose fraction of non-zero gates is at most r,
    # the best validation accuracy (the first on ties; without validation data, the first such epoch); when no
    # epoch qualifies, the last epoch's gates
    eligible = [row for row in history if row["nonzero_fraction"] <= sparsity]
    if not eligible:
        logger.warning("No epoch brought the fraction of non-zero gates down to r = %.2f (the paper's rule for the "
                       "gates to keep; the last epoch has %.2f, mean gate %.2f: the regulariser pulls the mean to r, "
                       "not the gates to 0); keeping the last epoch's gates, whose global ranking decides the widths.",
                       sparsity, history[-1]["nonzero_fraction"], history[-1]["mean_gate"])
        eligible = history[-1:]
    row = max(eligible, key=lambda r: r.get("val_accuracy", 0.0))
    values = snapshots[row["epoch"] - 1]
    return GateLearning(values, row["epoch"], row.get("val_accuracy"), history, time.perf_counter() - start)


def gate_order(groups: Sequence[ChannelGroup], values: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """Every (group index, channel), the highest gate first (ties: model order, then channel)."""
    entries = [(-float(v), position, c, group.index) for position, (group, gate) in enumerate(zip(groups, values, strict=True))
               for c, v in enumerate(gate.tolist())]
    return [(index, c) for _, _, c, index in sorted(entries)]


def kept_plan(groups: Sequence[ChannelGroup], values: Sequence[torch.Tensor], order: Sequence[tuple[int, int]],
              count: int) -> dict[int, list[int]]:
    """The channels removed when the first `count` of `order` are kept; every group keeps at least its
    highest gate (a group cannot be emptied; the paper's code would build a zero-width layer)."""
    kept = {g.index: {int(torch.argmax(v))} for g, v in zip(groups, values, strict=True)}
    for index, channel in order[:count]:
        kept[index].add(channel)
    return {g.index: [c for c in range(g.size) if c not in kept[g.index]] for g in groups}


@dataclass
class ArchitectureSearch:
    removed: dict[int, list[int]]
    kept: int  # gates kept by the global ranking (before each group's minimum of one)
    macs: int
    flops_ratio: float
    steps: list[tuple[int, float]] = field(default_factory=list)  # (gates kept, FLOPs ratio) per candidate


def search_architecture(model: nn.Module, graph: ChannelGraph, gates: ChannelGates, values: Sequence[torch.Tensor],
                        flops_ratio: float, base_macs: int) -> ArchitectureSearch:
    """The most gates kept (globally highest first) whose pruned model has at most `flops_ratio` x
    `base_macs` MACs: an exact bisection over the number kept (the paper stops at 0.1% of the target after
    at most 10 steps), each candidate counted on the removed model."""
    order = gate_order(gates.groups, values)
    macs: dict[int, int] = {}  # gates kept -> MACs of that model, in the order measured

    def ratio(count: int) -> float:
        if count not in macs:
            small = remove_channels(model, graph, kept_plan(gates.groups, values, order, count))
            macs[count] = count_macs(small, graph.image_size)
        return macs[count] / base_macs

    if ratio(0) > flops_ratio:
        raise unreachable_error(flops_ratio, ratio(0))
    n = len(order)
    count = n if ratio(n) <= flops_ratio else fewest(lambda c: ratio(c) > flops_ratio, n) - 1
    return ArchitectureSearch(kept_plan(gates.groups, values, order, count), count, macs[count], ratio(count),
                              [(c, m / base_macs) for c, m in macs.items()])


def unreachable_error(flops_ratio: float, lowest: float) -> ValueError:
    return ValueError(f"flops_ratio {flops_ratio:g} cannot be reached: with one channel left in every gated group "
                      f"the model keeps {lowest:.3g} of the original's FLOPs (the residual stream / hidden size "
                      f"and the stem are not gated). Ask for at least {lowest:.3g}, or expand less (--expand_ratio).")


def check_flops_ratio(flops_ratio: float) -> None:
    if not 0 < flops_ratio < 1:
        raise ValueError(f"flops_ratio (the pruned model's FLOPs over the original's) must be in (0, 1), "
                         f"got {flops_ratio}.")


def check_gate_arguments(expand_ratio: float, gate_epochs: int, gate_lr: float, gate_lambda: float,
                         gate_sparsity: float, stream_ratio: float | None = None) -> None:
    if expand_ratio < 1 or (stream_ratio is not None and stream_ratio < 1):
        raise ValueError(f"expand_ratio and stream_expand_ratio must be >= 1 (the architecture is searched in a "
                         f"wider network), got {expand_ratio} and {stream_ratio}.")
    if gate_epochs < 1:
        raise ValueError(f"gate_epochs must be >= 1, got {gate_epochs}.")
    if not 0 < gate_sparsity < 1 or gate_lambda < 0 or gate_lr <= 0:
        raise ValueError("gate_sparsity must be in (0, 1), gate_lambda >= 0 and gate_lr > 0; got "
                         f"{gate_sparsity}, {gate_lambda}, {gate_lr}.")


@dataclass
class ScratchPruning:
    """What Pruning from Scratch found: widths per gated group (expanded -> kept), the FLOPs reached, the
    gate learning and the search; `search_seconds` is both (what replaces pretraining a dense model)."""

    expand_ratio: float
    stream_ratio: float
    flops_ratio: float
    flops_ratio_achieved: float
    macs_original: int
    macs_expanded: int
    widths: dict[str, tuple[int, int]]
    units: dict[str, int]
    removed: int
    prunable: int
    gates: GateLearning
    search: list[tuple[int, float]]
    collapsed: list[str]  # groups whose gates all ended at zero (kept at one channel)
    search_seconds: float
    gate_settings: dict = field(default_factory=dict)  # epochs, lr, lambda, sparsity of the gate learning

    def results(self) -> dict:
        """The keys of structured_prune.py's results.json that this run fills (with DFPC's keys, for tools that
        read both)."""
        return {
            **removal_record(self.removed, self.prunable, self.widths, self.units),
            "flops_ratio_achieved": self.flops_ratio_achieved, "search_seconds": self.search_seconds,
            "expand_ratio": self.expand_ratio, "stream_expand_ratio": self.stream_ratio,
            "macs_expanded": self.macs_expanded, "round_to": 1, "normalize": None, "speedup_search": [],
            "gates": {**self.gate_settings, "kept_epoch": self.gates.epoch, "val_accuracy": self.gates.accuracy,
                      "seconds": self.gates.seconds, "history": self.gates.history, "collapsed_groups": self.collapsed},
            "flops_search": [{"gates_kept": c, "flops_ratio": r} for c, r in self.search]}


def prune_from_scratch(config, image_size: int | Sequence[int], flops_ratio: float,
                       train_batches: Callable[[], Iterable[dict]],
                       val_batches: Callable[[], Iterable[dict]] | None = None, *, expand_ratio: float = EXPAND_RATIO,
                       gate_epochs: int = GATE_EPOCHS, gate_lr: float = GATE_LR, gate_lambda: float = GATE_LAMBDA,
                       gate_sparsity: float = GATE_SPARSITY, stream_ratio: float | None = None, seed: int = 0,
                       device: torch.device | str = "cpu") -> tuple[nn.Module, ScratchPruning]:
    """The pruned architecture of `config` (a ViT or ResNet config) at `flops_ratio` of its FLOPs, with fresh
    random weights (to be trained from scratch), and what the search did. Bad requests (a ratio out of
    range, a target no width assignment reaches) fail before the gates are learnt."""
    check_flops_ratio(flops_ratio)
    check_gate_arguments(expand_ratio, gate_epochs, gate_lr, gate_lambda, gate_sparsity, stream_ratio)
    start = time.perf_counter()
    torch.manual_seed(seed)
    base_macs = original_macs(config, image_size)
    expanded_cfg = expanded_config(config, expand_ratio, stream_ratio)
    expanded = build_classifier(expanded_cfg).to(device).eval()
    graph = ChannelGraph(expanded, image_size)
    gates = ChannelGates(graph)
    values = [g.detach().clone() for g in gates.values]
    lowest = count_macs(remove_channels(expanded, graph, kept_plan(gates.groups, values, [], 0)), image_size) / base_macs
    if lowest > flops_ratio:
        raise unreachable_error(flops_ratio, lowest)
    expanded_macs = count_macs(expanded, image_size)
    logger.info("Pruning from Scratch: %d gates in %d groups of the x%g network (%.2fx the original's FLOPs)",
                sum(g.size for g in gates.groups), len(gates.groups), expand_ratio, expanded_macs / base_macs)
    learning = learn_gates(expanded, gates, train_batches, val_batches, gate_epochs, gate_lr, gate_lambda,
                           gate_sparsity)
    collapsed = [g.name for g, v in zip(gates.groups, learning.values, strict=True) if not bool((v > 0).any())]
    if len(collapsed) == len(gates.groups):
        raise ValueError(f"Every gate ended at 0 after {gate_epochs} epoch(s): the ranking cannot tell channels apart. "
                         f"Lower --gate_lambda ({gate_lambda}) or --gate_lr ({gate_lr}), or raise --gate_sparsity "
                         f"({gate_sparsity}).")
    if collapsed:
        logger.warning("Every gate of %s ended at 0; each keeps one channel (a lower --gate_lambda or a higher "
                       "--gate_sparsity keeps more gates alive).", ", ".join(collapsed))
    expanded.eval()
    found = search_architecture(expanded, graph, gates, learning.values, flops_ratio, base_macs)
    architecture = remove_channels(expanded, graph, found.removed)
    torch.manual_seed(seed)
    fresh = build_classifier(architecture.config).to(device)
    widths = {g.name: (g.size, g.size - len(found.removed[g.index])) for g in gates.groups}
    units = {g.name: g.unit for g in gates.groups if g.unit > 1}
    removed = sum(len(c) for c in found.removed.values())
    stream = 1.0 if expanded_cfg.model_type == "pruned_vit" else expand_ratio if stream_ratio is None else stream_ratio
    result = ScratchPruning(expand_ratio, stream, flops_ratio, found.flops_ratio, base_macs, expanded_macs,
                            widths, units, removed, sum(g.size for g in gates.groups), learning, found.steps, collapsed,
                            time.perf_counter() - start,
                            {"epochs": gate_epochs, "lr": gate_lr, "lambda": gate_lambda, "sparsity": gate_sparsity})
    return fresh, result


def uniform_architecture(config, image_size: int | Sequence[int], flops_ratio: float,
                         expand_ratio: float = EXPAND_RATIO, stream_ratio: float | None = None,
                         seed: int = 0) -> tuple[nn.Module, float]:
    """The baseline that tells whether the widths PFS finds matter: the same expanded network with every
    gated width (a ResNet block's inner widths; a ViT's heads and MLP widths) times one factor, the largest
    whose FLOPs stay within `flops_ratio` of the original's (bisection on the factor), with random weights.
    Returns the model and the FLOPs ratio it reached."""
    check_flops_ratio(flops_ratio)
    base_macs = original_macs(config, image_size)
    expanded = expanded_config(config, expand_ratio, stream_ratio)

    def ratio(factor: float) -> float:
        return count_macs(build_classifier(_gated_widths_times(expanded, factor)).eval(), image_size) / base_macs

    lowest = ratio(0.0)  # every gated width at one channel
    if lowest > flops_ratio:
        raise unreachable_error(flops_ratio, lowest)
    low, high = 0.0, 1.0
    while high - low > 1e-3:
        middle = (low + high) / 2
        low, high = (middle, high) if ratio(middle) <= flops_ratio else (low, middle)
    torch.manual_seed(seed)
    return build_classifier(_gated_widths_times(expanded, low)), ratio(low)


def _gated_widths_times(config, factor: float):
    """`config` with its gated widths (heads and MLP widths; a ResNet's inner block widths) times `factor`
    (at least one channel each)."""
    if config.model_type == "pruned_vit":
        values = _config_values(config, "layer_num_heads", "layer_intermediate_sizes")
        return PrunedViTConfig(**values, layer_num_heads=_scaled(config.layer_num_heads, factor),
                               layer_intermediate_sizes=_scaled(config.layer_intermediate_sizes, factor))
    values = _config_values(config, "block_widths")
    return PrunedResNetConfig(**values, block_widths=[_scaled(block, factor) for block in config.block_widths])
