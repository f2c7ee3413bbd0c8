"""Structured pruning of ViTs: heads, MLP neurons and the residual stream found from the model, BGSC with
the LayerNorm surrogate against explicit matrices, and removal into a PrunedViT that loads with from_pretrained."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_cap_on_top, assert_computes_and_reloads, run_script, tiny_vit_config
from torch import nn
from transformers import AutoModelForImageClassification, ViTForImageClassification, ViTModel

from cap_hf.io.models import make_image_processor
from cap_hf.modeling import PrunedViTForImageClassification, PrunedViTModel
from cap_hf.structured import prune_channels
from cap_hf.structured.criteria.dfpc import bgsc_scores
from cap_hf.structured.criteria.l1 import l1_scores
from cap_hf.structured.groups import ChannelGraph, remove_channels
from cap_hf.structured.order import channel_scores, removal_order, removal_plan

LAYERS, HEADS, HEAD_DIM, HIDDEN, MLP = 3, 4, 8, 32, 64


def vit(cls=ViTForImageClassification, **overrides):
    torch.manual_seed(0)
    model = cls(tiny_vit_config(num_hidden_layers=LAYERS, num_attention_heads=HEADS, **overrides)).eval()
    with torch.no_grad():
        for module in model.modules():  # LayerNorm gammas of both signs and sizes: BGSC takes |gamma|
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_()
                module.bias.normal_(std=0.1)
    return model


def names(members):
    return [m.name for m in members]


def test_groups_of_a_vit():
    graph = ChannelGraph(vit(), 8)
    assert len(graph.groups) == 1 + 2 * LAYERS  # the residual stream, then heads and neurons of every layer
    stream = graph.groups[0]
    assert stream.coupled and stream.size == HIDDEN and stream.unit == 1
    layer = [f"vit.layers.{i}" for i in range(LAYERS)]
    assert names(stream.producers) == ["vit.embeddings.patch_embeddings.projection"] + [
        f"{p}.{m}" for p in layer for m in ("attention.o_proj", "mlp.fc2")]
    assert names(stream.consumers) == [f"{p}.{m}" for p in layer for m in (
        "attention.q_proj", "attention.k_proj", "attention.v_proj", "mlp.fc1")] + ["classifier"]
    assert len(stream.norms) == 2 * LAYERS + 1
    for prefix in layer:
        heads = next(g for g in graph.groups if g.name == f"{prefix}.attention.q_proj")
        assert (heads.size, heads.unit, heads.coupled) == (HEADS, HEAD_DIM, False)
        assert names(heads.producers) == [f"{prefix}.attention.{p}_proj" for p in "qkv"]
        assert names(heads.consumers) == [f"{prefix}.attention.o_proj"]
        neurons = next(g for g in graph.groups if g.name == f"{prefix}.mlp.fc1")
        assert (neurons.size, neurons.unit, neurons.coupled) == (MLP, 1, False)
        assert names(neurons.consumers) == [f"{prefix}.mlp.fc2"]
        assert graph.norm_before(next(c for c in stream.consumers if c.name == f"{prefix}.attention.k_proj"),
                                 stream).name == f"{prefix}.layernorm_before"
    assert graph.norm_before(stream.consumers[-1], stream).name == "vit.layernorm"


def test_a_backbone_keeps_its_pooler_output():
    model = vit(ViTModel)
    graph = ChannelGraph(model, 8)
    assert "pooler.dense" in names(graph.groups[0].consumers)
    assert not any("pooler" in m.name for g in graph.groups for m in g.producers)  # its output is the interface
    small = remove_channels(model, graph, {0: [0, 1, 2]})
    assert isinstance(small, PrunedViTModel) and small.config.hidden_size == HIDDEN - 3
    assert small(pixel_values=torch.randn(2, 1, 8, 8)).pooler_output.shape == (2, HIDDEN)


def _pre_norm(name):
    """The LayerNorm a consumer reads in a pre-norm ViT, written out by hand."""
    if name == "classifier":
        return "vit.layernorm"
    layer, _, module = name.rpartition(".attention.") if ".attention." in name else name.rpartition(".mlp.")
    return f"{layer}.layernorm_before" if module in ("q_proj", "k_proj", "v_proj") else f"{layer}.layernorm_after"


def _explicit_bgsc(model, graph, group):
    """sum over (producer a, later consumer b) of 1^T N_b diag(|gamma_b|) D_k M_a 1 per token, explicit matrices;
    in an attention group only the value projection's path (q and k set convex attention weights)."""
    modules = dict(model.named_modules())
    scores = torch.zeros(group.size * group.unit, dtype=torch.float64)
    producers = [a for a in group.producers if group.unit == 1 or a.name.endswith("v_proj")]
    for a in producers:
        weight = a.module.weight.double().abs()
        m = weight.reshape(weight.shape[0], -1)[a.channels]  # a patch convolution is one matrix per token
        for b in group.consumers:
            if graph.order[b.name] <= graph.order[a.name]:
                continue
            n = b.module.weight.double().abs()[:, b.channels]
            gamma = torch.ones(len(b.channels), dtype=torch.float64)
            if group is graph.groups[0]:
                gamma = modules[_pre_norm(b.name)].weight.double().abs()[b.channels]
            for k in range(len(scores)):
                d = torch.zeros(len(scores), dtype=torch.float64)
                d[k] = gamma[k]
                scores[k] += (n @ torch.diag(d) @ m).sum()
    return scores.reshape(group.size, group.unit).sum(1)


@pytest.mark.parametrize("which", ["stream", "heads", "neurons"])
def test_bgsc_with_the_layernorm_surrogate_equals_the_explicit_products(which):
    model = vit()
    graph = ChannelGraph(model, 8)
    group = graph.groups[0] if which == "stream" else next(
        g for g in graph.groups if g.name == {"heads": "vit.layers.1.attention.q_proj", "neurons": "vit.layers.1.mlp.fc1"}[which])
    torch.testing.assert_close(bgsc_scores(graph, group), _explicit_bgsc(model, graph, group), rtol=1e-5, atol=1e-8)
    assert not torch.allclose(bgsc_scores(graph, group) / bgsc_scores(graph, group).sum(),
                              l1_scores(graph, group) / l1_scores(graph, group).sum())


class KeptLayerNorm(nn.Module):
    """A LayerNorm over the kept channels only, zero on the removed ones: what the shrunk stream computes."""

    def __init__(self, norm, kept):
        super().__init__()
        self.norm, self.kept = norm, kept

    def forward(self, x):
        out = torch.zeros_like(x)
        n = self.norm
        out[..., self.kept] = F.layer_norm(x[..., self.kept], (len(self.kept),), n.weight[self.kept],
                                           n.bias[self.kept], n.eps)
        return out


def masked(model, graph, plan):
    """The dense model with the removed heads and neurons' outgoing weights zeroed, and the removed stream
    channels zero everywhere (every writer's rows zeroed, every LayerNorm over the kept channels only)."""
    dense = copy.deepcopy(model)
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for index, channels in plan.items():
            group = graph.groups[index]
            if index != 0:
                for b in group.consumers:
                    modules[b.name].weight[:, group.indices(b, channels)] = 0
                continue
            gone = group.indices(group.producers[0], channels)
            for a in group.producers:
                modules[a.name].weight[gone] = 0
                modules[a.name].bias[gone] = 0
            embeddings = dense.base_model.embeddings
            embeddings.cls_token[..., gone] = 0
            embeddings.position_embeddings[..., gone] = 0
            kept = [c for c in range(group.size) if c not in set(gone)]
            for norm in group.norms:
                parent, _, child = norm.name.rpartition(".")
                setattr(modules[parent], child, KeptLayerNorm(modules[norm.name], kept))
    return dense


@pytest.mark.parametrize("method", ["dfpc", "l1", "random"])
def test_removed_heads_neurons_and_stream_channels_give_a_smaller_model_that_computes_the_masked_one(method, tmp_path):
    model = vit()
    graph = ChannelGraph(model, 8)
    order = removal_order(graph.groups, channel_scores(graph, method))
    plan = removal_plan(order, len(order) // 2)
    plan.setdefault(0, [1, 5])  # every kind of group loses something
    plan.setdefault(1, [2])
    small = remove_channels(model, graph, plan)
    assert isinstance(small, PrunedViTForImageClassification)
    config = small.config
    assert config.hidden_size == HIDDEN - len(plan[0]) and config.head_dim == HEAD_DIM
    width = {g.name: g.size - len(plan.get(g.index, [])) for g in graph.groups}
    assert config.layer_num_heads == [width[f"vit.layers.{i}.attention.q_proj"] for i in range(LAYERS)]
    assert config.layer_intermediate_sizes == [width[f"vit.layers.{i}.mlp.fc1"] for i in range(LAYERS)]
    assert_computes_and_reloads(small, masked(model, graph, plan), torch.randn(3, 1, 8, 8), tmp_path)
    assert model.config.hidden_size == HIDDEN  # the original is untouched


def test_uncoupled_only_keeps_the_stream_and_a_ratio_prunes_every_kind():
    model = vit()
    small, run = prune_channels(model, 8, "dfpc", pruning_ratio=0.4, uncoupled_only=True)
    assert small.config.hidden_size == HIDDEN and run.prunable == LAYERS * (HEADS + MLP)
    small, run = prune_channels(model, 8, "dfpc", pruning_ratio=0.4)
    assert run.normalize == "none"  # auto: raw sums, which keep the stream read by every layer above the neurons
    assert run.prunable == HIDDEN + LAYERS * (HEADS + MLP)
    assert abs(run.removed - 0.4 * run.prunable) <= 1
    assert small.num_parameters() < model.num_parameters()


def test_structured_prune_script_on_a_trained_vit_then_cap_on_top(digits_model, digits_dir, tmp_path):
    out = tmp_path / "dfpc"
    run_script("structured_prune.py", "--model_name_or_path", digits_model, "--pruning_ratio", 0.3,
               "--dataset_name", digits_dir, "--output_dir", out, "--latency_batch_sizes", "1,8",
               "--latency_repeats", 3, "--finetune_epochs", 1, "--max_train_samples", 256, "--disable_tqdm", "true")
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "dfpc" and results["normalize"] == "none"
    assert results["head_groups"] == {f"vit.layers.{i}.attention.q_proj": 16 for i in range(2)}
    assert results["params_pruned"] < results["params_dense"] and results["macs_pruned"] < results["macs_dense"]
    assert results["accuracy_dense"] > 0.5 and "accuracy_pruned_before_finetuning" in results
    card = (out / "README.md").read_text()
    assert "a channel is a whole head of 16 indices" in card and "`layer_num_heads`" in card
    assert "| `vit.layers.0.mlp.fc1` | 128 |" in card
    model = AutoModelForImageClassification.from_pretrained(out)
    assert isinstance(model, PrunedViTForImageClassification)
    assert model.num_parameters() == results["params_pruned"]
    # structured first, then CAP on top of the smaller ViT
    assert_cap_on_top(out, digits_dir, tmp_path / "dfpc+cap", num_grads=16)


def test_a_structured_folder_is_published_with_its_card_and_checked_first(tmp_path):
    from conftest import FakeHfApi, load_script

    vit().save_pretrained(tmp_path / "vit")
    make_image_processor(8, 1).save_pretrained(tmp_path / "vit")
    script = load_script("structured_prune")
    flags = ["--model_name_or_path", str(tmp_path / "vit"), "--pruning_ratio", "0.3", "--latency_batch_sizes", "1",
             "--latency_repeats", "2", "--push_to_hub", "true"]
    with pytest.raises(SystemExit, match="is not a valid Hub repo id"):
        script.main([*flags, "--output_dir", str(tmp_path / "bad"), "--hub_model_id", "me/not valid"],
                    hub_api=FakeHfApi())
    assert not (tmp_path / "bad").exists()
    api = FakeHfApi()
    out = tmp_path / "out"
    script.main([*flags, "--output_dir", str(out), "--hub_model_id", "me/vit-dfpc"], hub_api=api)
    assert {"config.json", "model.safetensors", "README.md", "results.json", "channels_per_group.png",
            "configuration_pruned_vit.py", "modeling_pruned_vit.py"} <= set(api.uploaded)
    upload = dict(api.calls)["upload_folder"]
    assert upload["repo_id"] == "me/vit-dfpc" and "channel-pruned model" in upload["commit_message"]
    assert "me/vit-dfpc" in (out / "README.md").read_text()
    # a folder whose weights no longer match its record is refused before any network call
    results = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps({**results, "params_pruned": results["params_pruned"] + 1}))
    api = FakeHfApi()
    with pytest.raises(SystemExit, match="describes .* parameters but the weights have"):
        load_script("push_to_hub").main([str(out), "--repo_id", "me/vit-dfpc"], api=api)
    assert api.calls == []
