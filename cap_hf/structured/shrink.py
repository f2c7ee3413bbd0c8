"""Physical removal: copy the kept heads and neurons of a ViT (channels of a ResNet) into a smaller model."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import ResNetForImageClassification, ResNetModel, ViTForImageClassification, ViTModel

from cap_hf.modeling import (
    PrunedResNetForImageClassification,
    PrunedResNetModel,
    PrunedViTConfig,
    PrunedViTForImageClassification,
    PrunedViTModel,
)
from cap_hf.structured.groups import ChannelGraph, remove_channels

_LAYER_PARAM = re.compile(r"(?:^|\.)layers\.(\d+)\.(attention\.[qkvo]_proj|mlp\.fc[12])\.(weight|bias)$")


def _check(kept: Sequence[int], total: int, what: str) -> list[int]:
    kept = sorted(int(i) for i in kept)
    if not kept or kept[0] < 0 or kept[-1] >= total or len(set(kept)) != len(kept):
        raise ValueError(f"{what}: kept indices must be distinct, in [0, {total}) and not empty; got {kept}.")
    return kept


@torch.no_grad()
def shrink_vit(
    model: ViTModel | ViTForImageClassification,
    keep_heads: Mapping[int, Sequence[int]] | None = None,
    keep_neurons: Mapping[int, Sequence[int]] | None = None,
) -> PrunedViTModel | PrunedViTForImageClassification:
    """A physically smaller copy of `model` keeping, in layer i, heads keep_heads[i] and MLP neurons keep_neurons[i].

    Layers not named keep everything. The result computes exactly what the masked dense model would.
    """
    config = model.config
    layers = config.num_hidden_layers
    heads_total = getattr(config, "layer_num_heads", None) or [config.num_attention_heads] * layers
    widths_total = getattr(config, "layer_intermediate_sizes", None) or [config.intermediate_size] * layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    keep_heads, keep_neurons = dict(keep_heads or {}), dict(keep_neurons or {})
    bad = sorted(i for i in (*keep_heads, *keep_neurons) if not 0 <= int(i) < layers)
    if bad:
        raise ValueError(f"Layers {bad} do not exist; the model has {layers} layers.")
    heads = {int(i): _check(v, heads_total[int(i)], f"layer {i} heads") for i, v in keep_heads.items()}
    neurons = {int(i): _check(v, widths_total[int(i)], f"layer {i} neurons") for i, v in keep_neurons.items()}

    values = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        values.pop(key, None)
    values.update(
        head_dim=head_dim,
        layer_num_heads=[len(heads[i]) if i in heads else heads_total[i] for i in range(layers)],
        layer_intermediate_sizes=[len(neurons[i]) if i in neurons else widths_total[i] for i in range(layers)],
    )
    new_config = PrunedViTConfig(**values)
    classifier = isinstance(model, ViTForImageClassification) or hasattr(model, "classifier")
    if classifier:
        small: nn.Module = PrunedViTForImageClassification(new_config)
    else:
        small = PrunedViTModel(new_config, add_pooling_layer=getattr(model, "pooler", None) is not None)
    small.to(dtype=next(model.parameters()).dtype)

    state = {}
    for name, tensor in model.state_dict().items():
        match = _LAYER_PARAM.search(name)
        if match:
            layer, module, kind = int(match.group(1)), match.group(2), match.group(3)
            if module.startswith("attention") and layer in heads:
                rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads[layer]])
                if module.endswith("o_proj"):
                    tensor = tensor[:, rows] if kind == "weight" else tensor
                else:
                    tensor = tensor[rows]
            elif module.startswith("mlp") and layer in neurons:
                rows = torch.tensor(neurons[layer])
                if module.endswith("fc1"):
                    tensor = tensor[rows]
                elif kind == "weight":
                    tensor = tensor[:, rows]
        state[name] = tensor.clone()
    small.load_state_dict(state, strict=True)
    return small.train(model.training)


TRACE_SIZE = 64  # input size for tracing a ResNet's channel groups (any size works; the widths do not depend on it)


@torch.no_grad()
def shrink_resnet(
    model: ResNetModel | ResNetForImageClassification,
    keep_channels: Mapping[int, Sequence[Sequence[int] | None]],
) -> PrunedResNetModel | PrunedResNetForImageClassification:
    """A physically smaller copy of a ResNet keeping, in residual block b (counted over all stages), the
    inner channels keep_channels[b][j] after its j-th convolution (None keeps them all).

    Only a block's inner channels are removed (the residual stream keeps its width), so the result
    computes exactly what the dense model computes with those channels' outgoing weights zeroed. The
    removal is the structured methods' own (cap_hf.structured.groups.remove_channels).
    """
    resnet = model.resnet if hasattr(model, "resnet") else model
    blocks = [block for stage in resnet.encoder.stages for block in stage.layers]
    names = {id(module): name for name, module in model.named_modules()}
    widths = [[conv.convolution.out_channels for conv in list(block.layer)[:-1]] for block in blocks]
    bad = sorted(b for b in keep_channels if not 0 <= int(b) < len(blocks))
    if bad:
        raise ValueError(f"Blocks {bad} do not exist; the model has {len(blocks)} residual blocks.")
    kept = {int(b): [None if k is None else _check(k, widths[int(b)][j], f"block {b} conv {j} channels")
                     for j, k in enumerate(v)] for b, v in keep_channels.items()}
    for b, lists in kept.items():
        if len(lists) != len(widths[b]):
            raise ValueError(f"Block {b} has {len(widths[b])} inner widths to choose, got {len(lists)} lists.")

    training = model.training
    model.eval()  # the trace runs one forward pass: batch-norm statistics must not move
    try:
        graph = ChannelGraph(model, TRACE_SIZE)
        by_producer = {member.name: (group, member) for group in graph.groups for member in group.producers}
        removed = {}
        for b, lists in kept.items():
            for j, channels in enumerate(lists):
                if channels is not None:
                    group, member = by_producer[f"{names[id(blocks[b])]}.layer.{j}.convolution"]
                    keep = set(channels)
                    removed[group.index] = [c for c in range(group.size) if member.channels[c] not in keep]
        small = remove_channels(model, graph, removed)
    finally:
        model.train(training)
    return small.train(training)
