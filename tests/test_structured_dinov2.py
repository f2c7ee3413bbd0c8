"""Structured pruning of DINOv2 (layer scales, MLP or SwiGLU, a classifier on CLS + patch mean, or the backbone
alone): removal into a PrunedDinov2 that computes the masked model and loads with from_pretrained, layer scales
folded exactly, second-order pruning with compensation and without labels."""

import json

import pytest
import torch
from conftest import random_batches
from test_structured_vit import masked
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
)

from cap_hf.modeling import PrunedDinov2ForImageClassification, PrunedDinov2Model
from cap_hf.structured.groups import ChannelGraph, remove_channels
from cap_hf.structured.measure import count_macs
from cap_hf.structured.second_order import fold_layer_scales, prune_second_order

HIDDEN, HEADS, LAYERS = 32, 4, 2


def dinov2(cls=Dinov2ForImageClassification, swiglu=False):
    """A tiny DINOv2 with layer scales, LayerNorm gains and biases all different from their initial values."""
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, mlp_ratio=2,
                          image_size=8, patch_size=2, num_channels=1, num_labels=10, use_swiglu_ffn=swiglu)
    model = cls(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_()
                module.bias.normal_(std=0.1)
            if hasattr(module, "lambda1"):
                module.lambda1.uniform_(0.05, 1.0)
        model.base_model.embeddings.mask_token.normal_()
    return model


def outputs(model, x):
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("cls", [Dinov2ForImageClassification, Dinov2Model])
def test_removed_heads_neurons_and_stream_channels_give_a_pruned_dinov2_that_computes_the_masked_one(cls, swiglu,
                                                                                                       tmp_path):
    model = dinov2(cls, swiglu)
    graph = ChannelGraph(model, 8)
    mlp = "gate_proj" if swiglu else "fc1"
    kinds = [g.name.rpartition(".")[2] for g in graph.groups]
    assert kinds == ["projection"] + ["q_proj", mlp] * LAYERS
    assert [g.coupled for g in graph.groups] == [True] + [False] * 2 * LAYERS  # SwiGLU's gate and up: one writer
    plan = {0: [1, 5, 6], 1: [2], 2: list(range(0, 20, 3)), 3: [0, 3], 4: [7]}
    small = remove_channels(model, graph, plan)
    assert isinstance(small, PrunedDinov2ForImageClassification if cls is Dinov2ForImageClassification
                      else PrunedDinov2Model)
    config = small.config
    assert config.hidden_size == HIDDEN - 3 and config.head_dim == HIDDEN // HEADS
    assert config.layer_num_heads == [HEADS - 1, HEADS - 2]
    assert config.layer_intermediate_sizes == [graph.groups[2].size - 7, graph.groups[4].size - 1]
    kept = [c for c in range(HIDDEN) if c not in plan[0]]
    embeddings = small.base_model.embeddings
    torch.testing.assert_close(embeddings.mask_token, model.base_model.embeddings.mask_token[..., kept])
    if cls is Dinov2ForImageClassification:  # the classifier reads CLS and the patch mean: both halves narrowed
        torch.testing.assert_close(small.classifier.weight,
                                   model.classifier.weight[:, kept + [HIDDEN + c for c in kept]])
    x = torch.randn(3, 1, 8, 8)
    reference = outputs(masked(model, graph, plan), x)
    if cls is Dinov2Model:  # the removed stream channels are zero in the masked model's features
        reference = reference[..., kept]
    torch.testing.assert_close(outputs(small, x), reference, rtol=1e-4, atol=1e-5)
    small.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "pruned_dinov2"
    auto = AutoModelForImageClassification if cls is Dinov2ForImageClassification else AutoModel
    loaded, info = auto.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert torch.equal(outputs(loaded.eval(), x), outputs(small, x))
    assert model.config.hidden_size == HIDDEN  # the original is untouched


def test_layer_scales_fold_into_the_weights_before_them_exactly():
    model = dinov2()
    folded, count = fold_layer_scales(model)
    assert folded is not model and count == 2 * LAYERS
    embeddings = folded.base_model.embeddings
    assert fold_layer_scales(embeddings) == (embeddings, 0)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(outputs(folded, x), outputs(model, x), rtol=1e-5, atol=1e-5)
    scales = [m.lambda1 for m in folded.modules() if hasattr(m, "lambda1")]
    assert len(scales) == 2 * LAYERS and all(torch.equal(s, torch.ones_like(s)) for s in scales)
    assert not all(torch.equal(m.lambda1, torch.ones_like(m.lambda1)) for m in model.modules() if hasattr(m, "lambda1"))


@pytest.mark.parametrize("swiglu", [False, True])
def test_second_order_pruning_of_a_dinov2_is_compensated_and_keeps_its_stream(swiglu):
    model = dinov2(swiglu=swiglu)
    batches = random_batches(16, batch_size=4)
    small, run = prune_second_order(model, 8, batches, "obs", flops_ratio=0.7, calibration_samples=64)
    assert isinstance(small, PrunedDinov2ForImageClassification) and run.removed > 0
    assert count_macs(small, 8) <= 0.7 * count_macs(model, 8)
    assert small.config.hidden_size == HIDDEN  # the stream passes through LayerNorms: kept whole
    assert run.results()["second_order"]["layer_scales_folded"] == 2 * LAYERS
    plain = remove_channels(model, ChannelGraph(model, 8), run.plan)  # the same removals, no update, no fold
    x = torch.cat([b["pixel_values"] for b in random_batches(8, seed=5)])
    dense, compensated, uncompensated = (outputs(m, x) for m in (model, small, plain))
    assert float((compensated - dense).pow(2).mean()) < float((uncompensated - dense).pow(2).mean())


def test_a_dinov2_backbone_is_pruned_without_labels():
    model = dinov2(Dinov2Model)
    batches = [{"pixel_values": b["pixel_values"]} for b in random_batches(16, batch_size=4)]
    small, run = prune_second_order(model, 8, batches, "obs", flops_ratio=0.7, calibration_samples=64)
    assert isinstance(small, PrunedDinov2Model) and run.removed > 0
    plain = remove_channels(model, ChannelGraph(model, 8), run.plan)
    x = torch.cat([b["pixel_values"] for b in random_batches(8, seed=5)])
    dense, compensated, uncompensated = (outputs(m, x)[:, 0] for m in (model, small, plain))  # the CLS feature
    assert float((compensated - dense).pow(2).mean()) < float((uncompensated - dense).pow(2).mean())


def test_structured_prune_script_prunes_a_dinov2_backbone_without_labels_and_judges_it_by_its_features(digits_dir,
                                                                                                       tmp_path):
    from conftest import run_script

    from cap_hf.io.models import make_image_processor

    folder = tmp_path / "dinov2"
    dinov2(Dinov2Model).save_pretrained(folder)
    make_image_processor(8, 1).save_pretrained(folder)
    out = tmp_path / "obs"
    result = run_script("structured_prune.py", "--method", "obs", "--model_name_or_path", folder, "--flops_ratio", 0.7,
                        "--dataset_name", digits_dir, "--output_dir", out, "--latency_batch_sizes", "1",
                        "--latency_repeats", 3, "--calibration_samples", 64, "--max_knn_bank_samples", 300)
    results = json.loads((out / "results.json").read_text())
    assert results["target_met"] and results["target"]["achieved"] <= 0.7
    dense, pruned = results["features_dense"], results["features_pruned"]
    assert dense["feature_cosine"] == pytest.approx(1.0)
    assert 0.0 < pruned["feature_cosine"] < 1.0 and 0.0 <= pruned["knn_accuracy"] <= 1.0
    assert results["accuracy_pruned"] == pruned["knn_accuracy"] and "k-NN top-1" in result.stdout
    card = (out / "README.md").read_text()
    assert "weighted k-NN top-1" in card and "AutoModel.from_pretrained" in card and "image-feature-extraction" in card
    assert "4 layer scales folded" in card
    assert isinstance(AutoModel.from_pretrained(out), PrunedDinov2Model)
    refused = run_script("structured_prune.py", "--method", "obs", "--model_name_or_path", folder, "--flops_ratio",
                         0.7, "--dataset_name", digits_dir, "--output_dir", tmp_path / "tuned", "--finetune_epochs", 1,
                         check=False)
    assert refused.returncode != 0 and "backbone without a head" in refused.stderr
    assert not (tmp_path / "tuned").exists()


def test_cap_prunes_a_dinov2_backbone_with_the_fisher_of_its_features():
    from cap_hf.engine.feature_fisher import FeatureFisherLoss

    model = dinov2(Dinov2Model)
    batches = [{"pixel_values": b["pixel_values"]} for b in random_batches(32, batch_size=1)]  # no labels
    small, run = prune_second_order(model, 8, batches, "cap", flops_ratio=0.7, calibration_samples=32,
                                    loss_fn=FeatureFisherLoss("cls"))
    assert isinstance(small, PrunedDinov2Model) and run.removed > 0
    assert run.results()["second_order"]["fisher_objective"] == "features"


def test_train_dense_builds_a_dinov2_shaped_classifier():
    from cap_hf.io.models import make_vit_classifier

    names = [str(i) for i in range(10)]
    model = make_vit_classifier(names, 28, 1, 7, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                family="dinov2", layerscale_value=0.1)
    assert isinstance(model, Dinov2ForImageClassification) and model.config.num_labels == 10
    assert model.dinov2.encoder.layer[0].mlp.fc1.out_features == 4 * 48
    assert float(model.dinov2.encoder.layer[1].layer_scale2.lambda1.detach().mean()) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="whole multiple"):
        make_vit_classifier(names, 28, 1, 7, hidden_size=48, intermediate_size=100, family="dinov2")
