"""Physical removal: copy the kept heads and neurons of a ViT (channels of a ResNet) into a smaller model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import ResNetForImageClassification, ResNetModel, ViTForImageClassification, ViTModel

from cap_hf.modeling import (
    PrunedResNetForImageClassification,
    PrunedResNetModel,
    PrunedViTForImageClassification,
    PrunedViTModel,
)
from cap_hf.structured.groups import ChannelGraph, remove_channels


def _check(kept: Sequence[int], total: int, what: str) -> list[int]:
    kept = sorted(int(i) for i in kept)
    if not kept or kept[0] < 0 or kept[-1] >= total or len(set(kept)) != len(kept):
        raise ValueError(f"{what}: kept indices must be distinct, in [0, {total}) and not empty; got {kept}.")
    return kept


@torch.no_grad()
def _keep(model: nn.Module, image_size, keep: Mapping[nn.Module, set[int]]) -> nn.Module:
    """remove_channels keeping, of each producer module named, the channels (heads for an attention
    projection) in keep[module]; the model is traced in eval mode and left in the mode it was in."""
    training = model.training
    model.eval()  # the trace runs one forward pass: batch-norm statistics must not move
    try:
        graph = ChannelGraph(model, image_size)
        by_producer = {id(member.module): (group, member) for group in graph.groups for member in group.producers}
        removed = {}
        for module, kept in keep.items():
            group, member = by_producer[id(module)]
            removed[group.index] = [c for c in range(group.size)
                                    if member.channels[c * group.unit] // group.unit not in kept]
        small = remove_channels(model, graph, removed)
    finally:
        model.train(training)
    return small.train(training)


def shrink_vit(
    model: ViTModel | ViTForImageClassification,
    keep_heads: Mapping[int, Sequence[int]] | None = None,
    keep_neurons: Mapping[int, Sequence[int]] | None = None,
) -> PrunedViTModel | PrunedViTForImageClassification:
    """A physically smaller copy of `model` keeping, in layer i, heads keep_heads[i] and MLP neurons keep_neurons[i].

    Layers not named keep everything. The result computes exactly what the masked dense model would. The
    removal is the structured methods' own (cap_hf.structured.groups.remove_channels).
    """
    config = model.config
    layers = (model.vit if hasattr(model, "vit") else model).layers
    bad = sorted(i for i in (*(keep_heads or {}), *(keep_neurons or {})) if not 0 <= int(i) < len(layers))
    if bad:
        raise ValueError(f"Layers {bad} do not exist; the model has {len(layers)} layers.")
    keep = {}
    for i, heads in (keep_heads or {}).items():
        attention = layers[int(i)].attention
        keep[attention.q_proj] = set(_check(heads, attention.q_proj.out_features // attention.head_dim,
                                            f"layer {i} heads"))
    for i, neurons in (keep_neurons or {}).items():
        fc1 = layers[int(i)].mlp.fc1
        keep[fc1] = set(_check(neurons, fc1.out_features, f"layer {i} neurons"))
    return _keep(model, config.image_size, keep)


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
    widths = [[conv.convolution.out_channels for conv in list(block.layer)[:-1]] for block in blocks]
    bad = sorted(b for b in keep_channels if not 0 <= int(b) < len(blocks))
    if bad:
        raise ValueError(f"Blocks {bad} do not exist; the model has {len(blocks)} residual blocks.")
    keep = {}
    for b, lists in keep_channels.items():
        if len(lists) != len(widths[int(b)]):
            raise ValueError(f"Block {b} has {len(widths[int(b)])} inner widths to choose, got {len(lists)} lists.")
        for j, channels in enumerate(lists):
            if channels is not None:
                conv = list(blocks[int(b)].layer)[j].convolution
                keep[conv] = set(_check(channels, widths[int(b)][j], f"block {b} conv {j} channels"))
    return _keep(model, TRACE_SIZE, keep)
