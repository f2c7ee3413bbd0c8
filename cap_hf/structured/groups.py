"""Channel groups: the channels that can only be removed together, found from the model itself.

A group is one set of channel indices shared by the layers that write them (producers: output
channels of convolutions / linears), the layers that read them (consumers: input channels) and
the channel-wise layers between (batch / layer norms, embeddings). A residual stream is one group
across its whole stage ("coupled channels", DFPC's data-flow couplings); a block's inner channels
form groups with one producer and one consumer ("uncoupled").

The groups are read off the autograd graph by Torch-Pruning's DependencyGraph (one forward pass on an
example input), so no architecture is written out by hand here; the physical removal of channels from a
copy of the model is Torch-Pruning's too. `export_pruned` then turns the shrunk copy into a model class
whose config holds the new widths (cap_hf.modeling), so that the result loads with `from_pretrained`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from transformers import ResNetForImageClassification, ResNetModel

from cap_hf.modeling import PrunedResNetConfig, PrunedResNetForImageClassification, PrunedResNetModel
from cap_hf.structured.measure import images

NORMS = (nn.BatchNorm2d, nn.LayerNorm)
PRODUCERS = (nn.Conv2d, nn.Linear)
SUPPORTED = "transformers ResNetModel / ResNetForImageClassification (basic and bottleneck blocks) and cap_hf's PrunedResNet"


@dataclass
class Member:
    """One layer of a group (a producer, consumer or norm, by the list it is in) and which of its channels
    are the group's channels."""

    name: str
    module: nn.Module
    channels: list[int]


@dataclass
class ChannelGroup:
    """Channels that are removed together. `producers[i].channels[c]` is group channel c."""

    index: int
    size: int
    root: str  # the producer Torch-Pruning enumerated the group from
    producers: list[Member] = field(default_factory=list)
    consumers: list[Member] = field(default_factory=list)
    norms: list[Member] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.producers[0].name

    @property
    def coupled(self) -> bool:
        """Several layers write or read these channels (a residual stream): DFPC's coupled channels."""
        return len(self.producers) > 1 or len(self.consumers) > 1


def check_supported(model: nn.Module) -> None:
    """A clear error, before any work, for a model the structured methods cannot rebuild yet, or in training mode."""
    if not isinstance(model, (ResNetModel, ResNetForImageClassification)):
        raise ValueError(f"Structured pruning does not support {type(model).__name__} yet; supported: {SUPPORTED}.")
    if model.training:
        raise ValueError("The model is in training mode; call model.eval() first (a forward pass in training mode "
                         "would change its batch-norm statistics).")
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        raise ValueError(f"The model's weights are on {sorted(map(str, devices))}; structured pruning needs them "
                         "loaded, all on one device (e.g. model.to('cpu'), no device_map).")


def _reduce_output(output) -> torch.Tensor:
    tensors = [v for v in (output.values() if isinstance(output, Mapping) else [output]) if torch.is_tensor(v)]
    return sum(t.float().sum() for t in tensors)


def _dependency_graph(model: nn.Module, image_size: int | Sequence[int]) -> tp.DependencyGraph:
    """Torch-Pruning's graph of `model`, traced through autograd: every weight requires grad while it
    traces (a frozen model, a distillation teacher say, would otherwise show no graph at all)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(True)
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=images(model, 1, image_size), output_transform=_reduce_output, verbose=False)
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _heads(model: nn.Module) -> list[nn.Module]:
    """Classification heads: their outputs are the labels, never pruned."""
    head = getattr(model, "classifier", None)
    return [m for m in head.modules() if isinstance(m, PRODUCERS)] if head is not None else []


class ChannelGraph:
    """The channel groups of `model` (in eval mode), with each layer's execution order and shapes.

    `groups` lists every prunable group (heads excluded); `order[name]` is the position of a layer in
    one forward pass, `shapes[name]` = (input shape, output shape) without the batch dimension.
    """

    def __init__(self, model: nn.Module, image_size: int | Sequence[int]):
        check_supported(model)
        self.model = model
        self.image_size = image_size
        self.names = {id(m): n for n, m in model.named_modules()}
        self.order: dict[str, int] = {}
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

        def record(module, inputs, output):
            name = self.names[id(module)]
            if name not in self.order and torch.is_tensor(output):
                self.order[name] = len(self.order)
                self.shapes[name] = (tuple(inputs[0].shape[1:]), tuple(output.shape[1:]))

        hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
        try:
            self.dependencies = _dependency_graph(model, image_size)
        finally:
            for hook in hooks:
                hook.remove()
        self.groups = self._read_groups()
        if not self.groups:
            raise ValueError(f"No prunable channel groups found in {type(model).__name__}.")

    def _read_groups(self) -> list[ChannelGroup]:
        graph = self.dependencies
        groups = []
        for tp_group in graph.get_all_groups(ignored_layers=_heads(self.model), root_module_types=PRODUCERS):
            root = tp_group[0].dep.target.module
            group = ChannelGroup(index=len(groups), size=len(tp_group[0].idxs), root=self.names[id(root)])
            for item in tp_group:
                module, handler = item.dep.target.module, item.dep.handler
                name = self.names.get(id(module))
                if name is None or not isinstance(module, PRODUCERS + NORMS):
                    continue  # element-wise ops, reshapes, the add of a residual: channel-wise, nothing to keep
                channels = [int(i) for i in item.idxs]
                if isinstance(module, NORMS):
                    group.norms.append(Member(name, module, channels))
                elif graph.is_out_channel_pruning_fn(handler):
                    group.producers.append(Member(name, module, channels))
                else:
                    group.consumers.append(Member(name, module, channels))
            group.producers.sort(key=lambda m: self.order[m.name])
            group.consumers.sort(key=lambda m: self.order[m.name])
            groups.append(group)
        return groups

    def norm_after(self, producer: Member, group: ChannelGroup) -> Member | None:
        """The norm layer that reads `producer`'s output directly (a conv's batch norm), if any."""
        node = self.dependencies.module2node[producer.module]
        following = {id(out.module) for out in node.outputs}
        return next((n for n in group.norms if id(n.module) in following), None)

    def pools_between(self, producer: str, consumer: str) -> list[tuple[str, nn.Module]]:
        """Pooling layers executed after `producer` and before `consumer`, in order."""
        lo, hi = self.order[producer], self.order[consumer]
        modules = dict(self.model.named_modules())
        return [(n, modules[n]) for n, i in sorted(self.order.items(), key=lambda kv: kv[1])
                if lo < i < hi and isinstance(modules[n], (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d))]


@torch.no_grad()
def remove_channels(model: nn.Module, graph: ChannelGraph, removed: Mapping[int, Sequence[int]]) -> nn.Module:
    """A physically smaller copy of `model` without the channels `removed[group index]` (group channel
    numbers), as a model class that loads with `from_pretrained` (see `export_pruned`)."""
    for index, channels in removed.items():
        size = graph.groups[index].size
        if len(set(channels)) >= size:
            raise ValueError(f"Group {index} ({graph.groups[index].name}) has {size} channels; removing "
                             f"{len(set(channels))} would empty it.")
    work = copy.deepcopy(model)
    dependencies = _dependency_graph(work, graph.image_size)
    modules = dict(work.named_modules())
    for index, channels in removed.items():
        if not channels:
            continue
        group = graph.groups[index]
        root = modules[group.root]
        handler = dependencies.get_pruner_of_module(root).prune_out_channels
        member = next(m for m in group.producers if m.name == group.root)
        dependencies.get_pruning_group(root, handler, sorted(member.channels[c] for c in set(channels))).prune()
    return export_pruned(work)


def _stages(resnet: ResNetModel):
    return [list(stage.layers) for stage in resnet.encoder.stages]


@torch.no_grad()
def export_pruned(model: nn.Module) -> nn.Module:
    """The same weights in a model class whose config records every width (PrunedResNet), so that
    `save_pretrained` / `from_pretrained` round-trip. Module names and computation are unchanged."""
    resnet = model.resnet if hasattr(model, "resnet") else model
    blocks = [block for stage in _stages(resnet) for block in stage]
    values = model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "block_widths", "block_shortcuts"):
        values.pop(key, None)
    values.update(
        embedding_size=resnet.embedder.embedder.convolution.out_channels,
        hidden_sizes=[stage[-1].layer[-1].convolution.out_channels for stage in _stages(resnet)],
        block_widths=[[conv.convolution.out_channels for conv in list(block.layer)[:-1]] for block in blocks],
        block_shortcuts=[not isinstance(block.shortcut, nn.Identity) for block in blocks],
    )
    config = PrunedResNetConfig(**values)
    small = PrunedResNetForImageClassification(config) if hasattr(model, "classifier") else PrunedResNetModel(config)
    small.to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    small.load_state_dict(model.state_dict(), strict=True)
    return small.eval()
