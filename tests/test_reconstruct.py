"""Layer-wise reconstruction of a pruned model (cap_hf.structured.reconstruct)."""

import copy

import pytest
import torch
from conftest import random_batches, tiny_resnet, tiny_vit_config
from test_structured_dinov2 import dinov2
from torch import nn
from transformers import ViTForImageClassification

from cap_hf.structured import prune_channels, prune_second_order, reconstruct
from cap_hf.structured.groups import ChannelGraph, remove_channels
from cap_hf.structured.reconstruct import reconstruct_layers, removed_outputs


def logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


@pytest.mark.parametrize("arch, folded", [("resnet", False), ("dinov2", False), ("dinov2", True)])
def test_an_unpruned_copy_is_refitted_to_itself(arch, folded):
    """Where nothing was removed each layer already reproduces the dense one: the fit (pulled towards the weights
    the layer has) keeps every weight, bias and batch-norm mean, and the model computes what it did. A DINOv2 copy
    with its layer scales folded (as obs / cap prune it) is compared with the folded dense model, one without with
    the dense model as it is."""
    from types import SimpleNamespace

    from cap_hf.structured.second_order import fold_layer_scales

    model, size = (tiny_resnet(), 16) if arch == "resnet" else (dinov2(), 8)
    source, count = fold_layer_scales(model) if folded else (model, 0)
    same = remove_channels(source, ChannelGraph(source, size), {})
    run = SimpleNamespace(plan={}, layer_scales_folded=count)
    record = reconstruct(model, same, run, size, random_batches(32, batch_size=8, size=size), 256)
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert record["layers"] == layers and record["images"] == 256
    assert record["error_before"] < 1e-12 and record["error_after"] < 1e-10
    x = torch.cat([b["pixel_values"] for b in random_batches(8, size=size, seed=5)])
    torch.testing.assert_close(logits(same, x), logits(model, x), rtol=1e-4, atol=1e-5)
    norms = [m for m in same.modules() if isinstance(m, nn.BatchNorm2d)]
    for mine, theirs in zip(norms, [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)], strict=True):
        torch.testing.assert_close(mine.running_mean, theirs.running_mean, rtol=1e-4, atol=1e-5)


def test_removed_outputs_follow_the_plan():
    model = tiny_resnet()
    graph = ChannelGraph(model, 16)
    group = next(g for g in graph.groups if not g.coupled)
    removed = removed_outputs(graph, {group.index: [0, 2]})
    assert removed == {p.name: sorted(group.indices(p, [0, 2])) for p in group.producers}


@pytest.mark.parametrize("arch, method", [("resnet", "obs"), ("resnet", "dfpc"), ("vit", "obs"), ("dinov2", "obs"),
                                          ("dinov2", "dfpc")])
def test_reconstruction_brings_a_pruned_model_closer_to_the_dense_one(arch, method):
    """Every layer's error on the calibration images goes down, and so does the logits' error on other images;
    a DINOv2 under obs was pruned with its layer scales folded, under dfpc without: both refit like with like."""
    if arch == "resnet":
        model, size = tiny_resnet(), 16
    elif arch == "vit":
        torch.manual_seed(0)
        model, size = ViTForImageClassification(tiny_vit_config(intermediate_size=128)).eval(), 8
    else:
        model, size = dinov2(), 8
    batches = random_batches(32, batch_size=8, size=size)
    if method == "obs":
        small, run = prune_second_order(model, size, batches, "obs", flops_ratio=0.5, calibration_samples=128)
        assert bool(run.layer_scales_folded) == (arch == "dinov2")
    else:
        small, run = prune_channels(model, size, "dfpc", pruning_ratio=0.3)
    before = copy.deepcopy(small)
    record = reconstruct(model, small, run, size, random_batches(32, batch_size=8, size=size, seed=3), 96)
    assert record["images"] == 96 and record["layers"] > 0
    assert record["error_after"] < record["error_before"]
    x = torch.cat([b["pixel_values"] for b in random_batches(16, size=size, seed=5)])
    dense = logits(model, x)
    assert float((logits(small, x) - dense).pow(2).mean()) < float((logits(before, x) - dense).pow(2).mean())
    if arch == "resnet":  # each convolution's bias went into the running mean of its own batch norm (all but the
        # stem's, which reads the image itself: where none of its outputs went, it is its own fixed point)
        means = [(m.running_mean, b.running_mean) for m, b in zip(small.modules(), before.modules(), strict=True)
                 if isinstance(m, nn.BatchNorm2d)]
        assert sum(not torch.equal(after, was) for after, was in means) >= len(means) - 1


def test_reconstruction_refuses_a_model_it_was_not_pruned_from():
    model = tiny_resnet()
    small, run = prune_channels(model, 16, "dfpc", pruning_ratio=0.3)
    with pytest.raises(ValueError, match="images must be positive"):
        reconstruct(model, small, run, 16, random_batches(4, size=16), 0)
    vit = ViTForImageClassification(tiny_vit_config()).eval()
    with pytest.raises(ValueError, match="No layer of the pruned model matches"):
        reconstruct_layers(vit, small, ChannelGraph(model, 16), run.plan, [torch.randn(2, 1, 16, 16)])
