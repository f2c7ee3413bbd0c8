"""Channel groups: the channels that can only be removed together, found from the model itself.

A group is one set of channel indices shared by the layers that write them (producers: output
channels of convolutions / linears), the layers that read them (consumers: input channels) and
the channel-wise layers between (batch / layer norms, embeddings). A residual stream is one group
across its whole stage ("coupled channels", DFPC's data-flow couplings); a block's inner channels
form groups with one producer and one consumer ("uncoupled"). In a ViT the residual stream is one
group across all layers (patch embedding, cls token, position embeddings, every LayerNorm, every
projection that reads or writes it); each layer's MLP neurons are a group, and so are its attention
heads: a group written by an attention module's projections is removed in whole heads (`unit` =
the module's `head_dim` indices per prunable channel). A group nothing reads (a backbone's output
features, a pooler's output) is the model's interface and is not prunable.

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
from transformers import (
    Dinov2ForImageClassification,
    Dinov2Model,
    ResNetForImageClassification,
    ResNetModel,
    ViTForImageClassification,
    ViTModel,
)

from cap_hf.modeling import (
    PrunedDinov2Config,
    PrunedDinov2ForImageClassification,
    PrunedDinov2Model,
    PrunedResNetConfig,
    PrunedResNetForImageClassification,
    PrunedResNetModel,
    PrunedViTConfig,
    PrunedViTForImageClassification,
    PrunedViTModel,
)
from cap_hf.structured.measure import images

NORMS = (nn.BatchNorm2d, nn.LayerNorm)
PRODUCERS = (nn.Conv2d, nn.Linear)
SUPPORTED = ("transformers ResNetModel / ResNetForImageClassification (basic and bottleneck blocks), ViTModel / "
             "ViTForImageClassification (ViT, DeiT without distillation token, DINO v1 checkpoints), Dinov2Model / "
             "Dinov2ForImageClassification (DINOv2 without registers, MLP or SwiGLU) and cap_hf's PrunedResNet / "
             "PrunedViT / PrunedDinov2")
SUPPORTED_CLASSES = (ResNetModel, ResNetForImageClassification, ViTModel, ViTForImageClassification, Dinov2Model,
                     Dinov2ForImageClassification)
VIT_CLASSES = (ViTModel, ViTForImageClassification)
DINOV2_CLASSES = (Dinov2Model, Dinov2ForImageClassification)


@dataclass
class Member:
    """One layer of a group (a producer, consumer or norm, by the list it is in) and which of its channels
    are the group's channels: indices `channels[c * unit : (c + 1) * unit]` are group channel c."""

    name: str
    module: nn.Module
    channels: list[int]


@dataclass
class ChannelGroup:
    """Channels that are removed together: `size` channels of `unit` indices each (an attention head is
    one channel of head_dim indices; everything else has unit 1)."""

    index: int
    size: int
    root: str  # the producer Torch-Pruning enumerated the group from
    unit: int = 1
    producers: list[Member] = field(default_factory=list)
    consumers: list[Member] = field(default_factory=list)
    norms: list[Member] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.producers[0].name

    @property
    def coupled(self) -> bool:
        """Several layers write or read these channels (a residual stream): DFPC's coupled channels. Writers
        inside one module count as one: the query, key and value projections of an attention group, the gate
        and up projections of a SwiGLU MLP."""
        writers = len({m.name.rpartition(".")[0] for m in self.producers})
        return writers > 1 or len(self.consumers) > 1

    def indices(self, member: Member, channels) -> list[int]:
        """`member`'s indices of the given group channels (every index of each head for an attention group)."""
        return [member.channels[c * self.unit + j] for c in sorted(set(channels)) for j in range(self.unit)]


def check_supported(model: nn.Module) -> None:
    """A clear error, before any work, for a model the structured methods cannot rebuild yet, or in training mode."""
    if not isinstance(model, SUPPORTED_CLASSES):
        raise ValueError(f"Structured pruning does not support {type(model).__name__} yet; supported: {SUPPORTED}.")
    if model.training:
        raise ValueError("The model is in training mode; call model.eval() first (a forward pass in training mode "
                         "would change its batch-norm statistics and apply dropout).")
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        raise ValueError(f"The model's weights are on {sorted(map(str, devices))}; structured pruning needs them "
                         "loaded, all on one device (e.g. model.to('cpu'), no device_map).")


def _outputs(output) -> list[torch.Tensor]:
    """The model's output tensors, each traced on its own: reducing them into one sum would tie the channels
    of unrelated outputs (a ViT's hidden states and its pooler's) into one group."""
    return [v for v in (output.values() if isinstance(output, Mapping) else [output]) if torch.is_tensor(v)]


def _dependency_graph(model: nn.Module, image_size: int | Sequence[int]) -> tp.DependencyGraph:
    """Torch-Pruning's graph of `model`, traced through autograd: every weight requires grad while it
    traces (a frozen model, a distillation teacher say, would otherwise show no graph at all)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(True)
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=images(model, 1, image_size), output_transform=_outputs, verbose=False)
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
        self.modules = dict(model.named_modules())
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
            if not group.consumers:
                continue  # nothing reads these channels: an output of the model (backbone features, a pooler)
            group.producers.sort(key=lambda m: self.order[m.name])
            group.consumers.sort(key=lambda m: self.order[m.name])
            group.unit = self._head_dim(group)
            group.size //= group.unit
            groups.append(group)
        return groups

    def _head_dim(self, group: ChannelGroup) -> int:
        """head_dim when every producer and consumer of the group belongs to one attention module (its
        query/key/value and output projections), else 1."""
        parents = {m.name.rpartition(".")[0] for m in group.producers + group.consumers}
        if len(parents) != 1:
            return 1
        head_dim = getattr(self.modules[parents.pop()], "head_dim", None)
        return head_dim if isinstance(head_dim, int) and head_dim > 1 and group.size % head_dim == 0 else 1

    def norm_after(self, producer: Member, group: ChannelGroup) -> Member | None:
        """The norm layer that reads `producer`'s output directly (a conv's batch norm), if any."""
        node = self.dependencies.module2node[producer.module]
        following = {id(out.module) for out in node.outputs}
        return next((n for n in group.norms if id(n.module) in following), None)

    def norm_before(self, consumer: Member, group: ChannelGroup) -> Member | None:
        """The norm layer whose output alone `consumer` reads (through activations, reshapes, the cls-token
        slice): a pre-norm transformer's LayerNorm, or the batch norm of the layer before. None when the
        input is the merge of several layers (a residual add) or comes straight from a producer."""
        reached, seen = set(), set()
        stack = list(self.dependencies.module2node[consumer.module].inputs)
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node.module, PRODUCERS + NORMS):
                reached.add(node.module)
            else:
                stack.extend(node.inputs)
        norms = {id(n.module): n for n in group.norms}
        return norms.get(id(reached.pop())) if len(reached) == 1 else None

    def pools_between(self, producer: str, consumer: str) -> list[tuple[str, nn.Module]]:
        """Pooling layers executed after `producer` and before `consumer`, in order."""
        lo, hi = self.order[producer], self.order[consumer]
        return [(n, self.modules[n]) for n, i in sorted(self.order.items(), key=lambda kv: kv[1])
                if lo < i < hi and isinstance(self.modules[n], (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d))]


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
        dependencies.get_pruning_group(root, handler, group.indices(member, channels)).prune()
        _narrow_stream_extras(work, model, group, member, channels)
    return export_pruned(work)


def _narrow_stream_extras(model: nn.Module, dense: nn.Module, group: ChannelGroup, member: Member, channels) -> None:
    """What the traced graph misses of a transformer's residual stream, narrowed by hand: the embeddings'
    mask token (unused by a forward pass without masked positions) and a DINOv2 classifier's input, the CLS
    token and the patch mean side by side (Torch-Pruning narrows one half of that concatenation only)."""
    if not member.name.endswith("patch_embeddings.projection"):
        return
    gone = set(group.indices(member, channels))
    kept = [i for i in range(member.module.out_channels) if i not in gone]
    embeddings = model.get_submodule(member.name.rpartition(".")[0].rpartition(".")[0])
    token = getattr(embeddings, "mask_token", None)
    if token is not None and token.shape[-1] == member.module.out_channels:
        embeddings.mask_token = nn.Parameter(token.detach()[..., kept].clone(), requires_grad=token.requires_grad)
    if isinstance(dense, Dinov2ForImageClassification) and isinstance(dense.classifier, nn.Linear):
        width = member.module.out_channels
        columns = kept + [width + i for i in kept]
        old = dense.classifier
        new = nn.Linear(len(columns), old.out_features, bias=old.bias is not None).to(old.weight)
        new.weight.copy_(old.weight[:, columns])
        if old.bias is not None:
            new.bias.copy_(old.bias)
        model.classifier = new


def _stages(resnet: ResNetModel):
    return [list(stage.layers) for stage in resnet.encoder.stages]


def _config_values(config, *derived: str) -> dict:
    """A config's fields without its class identity and without the widths the export recomputes."""
    values = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", *derived):
        values.pop(key, None)
    return values


def _export_resnet(model: nn.Module) -> nn.Module:
    resnet = model.resnet if hasattr(model, "resnet") else model
    blocks = [block for stage in _stages(resnet) for block in stage]
    values = _config_values(model.config, "block_widths", "block_shortcuts")
    values.update(
        embedding_size=resnet.embedder.embedder.convolution.out_channels,
        hidden_sizes=[stage[-1].layer[-1].convolution.out_channels for stage in _stages(resnet)],
        block_widths=[[conv.convolution.out_channels for conv in list(block.layer)[:-1]] for block in blocks],
        block_shortcuts=[not isinstance(block.shortcut, nn.Identity) for block in blocks],
    )
    config = PrunedResNetConfig(**values)
    return PrunedResNetForImageClassification(config) if hasattr(model, "classifier") else PrunedResNetModel(config)


def _transformer_layers(model: nn.Module):
    """(base model, its encoder layers) of a ViT or a DINOv2, classifier or backbone."""
    if isinstance(model, DINOV2_CLASSES):
        base = getattr(model, "dinov2", model)
        return base, list(base.encoder.layer)
    base = getattr(model, "vit", model)
    return base, list(base.layers)


def _mlp_width(mlp: nn.Module) -> int:
    """An MLP's hidden width: fc1's outputs, or a SwiGLU's gate."""
    return (mlp.gate_proj if hasattr(mlp, "gate_proj") else mlp.fc1).out_features


def _export_transformer(model: nn.Module) -> nn.Module:
    base, layers = _transformer_layers(model)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    values = _config_values(config, "head_dim", "layer_num_heads", "layer_intermediate_sizes")
    values.update(
        hidden_size=base.embeddings.patch_embeddings.projection.out_channels,
        head_dim=head_dim,  # the dense model's: the attention scaling must not change
        layer_num_heads=[layer.attention.q_proj.out_features // head_dim for layer in layers],
        layer_intermediate_sizes=[_mlp_width(layer.mlp) for layer in layers],
    )
    if isinstance(model, DINOV2_CLASSES):
        config = PrunedDinov2Config(**values)
        return PrunedDinov2ForImageClassification(config) if hasattr(model, "classifier") else PrunedDinov2Model(config)
    config = PrunedViTConfig(**values)
    if hasattr(model, "classifier"):
        return PrunedViTForImageClassification(config)
    return PrunedViTModel(config, add_pooling_layer=getattr(model, "pooler", None) is not None)


@torch.no_grad()
def export_pruned(model: nn.Module) -> nn.Module:
    """The same weights in a model class whose config records every width (PrunedResNet, PrunedViT,
    PrunedDinov2), so that `save_pretrained` / `from_pretrained` round-trip. Module names and computation are
    unchanged."""
    transformer = isinstance(model, VIT_CLASSES + DINOV2_CLASSES)
    small = _export_transformer(model) if transformer else _export_resnet(model)
    small.to(device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    small.load_state_dict(model.state_dict(), strict=True)
    return small.eval()
