"""Pruners on real (tiny) HF models: targets, exact sparsity, masks kept, Fisher collection, bad input."""

import copy

import pytest
import torch
from conftest import random_batches, tiny_vit_config
from torch import nn
from transformers import Dinov2Config, Dinov2Model, ResNetConfig, ResNetForImageClassification

from cap_hf import Pruner, PruningConfig, SparsityMismatchError, find_targets, oneshot_prune, verify_sparsity
from cap_hf.engine.collect import collect_fisher
from cap_hf.masks import current_masks

METHODS = ["magnitude", "obs", "cap", "fastcap"]


def small_config(method, sparsity, **kw):
    values = dict(method=method, sparsity=sparsity, num_grads=12, grad_batch_size=4, fisher_block_size=16,
                  damp=1e-4, grad_chunk_size=5, elimination_chunk_size=7)
    values.update(kw)
    return PruningConfig(**values)


def test_vit_targets_are_attention_and_mlp(tiny_vit):
    names = list(find_targets(tiny_vit))
    assert len(names) == 2 * 6
    assert all(n.split(".")[-1] in {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"} for n in names)
    assert not any("classifier" in n or "embeddings" in n for n in names)
    assert list(find_targets(tiny_vit, r".*\.mlp\.fc1")) == ["vit.layers.0.mlp.fc1", "vit.layers.1.mlp.fc1"]
    assert list(find_targets(tiny_vit, ["classifier"])) == ["classifier"]


def test_dinov2_swiglu_and_resnet_targets():
    dino = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                                    patch_size=2, use_swiglu_ffn=True))
    assert {n.split(".")[-1] for n in find_targets(dino)} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"}
    resnet = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                       num_labels=3))
    names = list(find_targets(resnet))
    assert names and all("embedder" not in n and "classifier" not in n for n in names)


def test_no_prunable_weights_error_names_model_and_fix():
    class Empty(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match=r"No prunable weights found in Empty.*targets"):
        find_targets(Empty())
    with pytest.raises(ValueError, match="not found"):
        find_targets(nn.Linear(2, 2), ["nope"])


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_sparsity_outside_range_is_rejected(bad):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        PruningConfig(sparsity=bad)


def test_bad_config_values():
    with pytest.raises(ValueError, match="Unknown pruning method 'random'; registered methods: cap, fastcap, "
                                         "magnitude, obs"):
        PruningConfig(method="random")
    with pytest.raises(ValueError, match="structure '2:4' is supported by cap, magnitude, not obs"):
        PruningConfig(method="obs", structure="2:4")
    with pytest.raises(ValueError, match="need 0 < N < M"):
        PruningConfig(structure="4:2")
    with pytest.raises(ValueError, match="'2:4' means sparsity 0.5"):
        PruningConfig(method="cap", structure="2:4", sparsity=0.75)


def test_backbone_without_logits_gets_the_feature_fisher_or_a_clear_error():
    from transformers import ViTModel

    backbone = ViTModel(tiny_vit_config())
    with pytest.raises(ValueError, match="has no classification head, so the cross-entropy Fisher has no logits"):
        oneshot_prune(backbone, small_config("cap", 0.5, num_grads=2, fisher_objective="cross_entropy"),
                      random_batches(2))
    report = oneshot_prune(backbone, small_config("cap", 0.5, num_grads=2), random_batches(2))  # auto: features
    assert abs(report.overall - 0.5) < 1e-3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_exact_sparsity_and_masks_kept(tiny_vit, method, sparsity):
    targets = find_targets(tiny_vit)
    # prune 30% by magnitude first: those weights must stay zero
    oneshot_prune(tiny_vit, PruningConfig(method="magnitude", sparsity=0.3))
    before = current_masks(targets)
    report = oneshot_prune(tiny_vit, small_config(method, sparsity), random_batches(12))
    total = sum(m.weight.numel() for m in targets.values())
    if method == "fastcap":  # uniform: every layer rounds on its own
        assert report.num_zeros == sum(round(sparsity * m.weight.numel()) for m in targets.values())
    else:
        assert report.num_zeros == round(sparsity * total)
    for name, module in targets.items():
        assert bool((module.weight[~before[name]] == 0).all()), name
        if method == "fastcap":
            assert int((module.weight == 0).sum()) == round(sparsity * module.weight.numel())
    verify_sparsity(tiny_vit, sparsity, tolerance=len(targets) / total)
    assert all(torch.isfinite(p).all() for p in tiny_vit.parameters())


@pytest.mark.parametrize("method", ["magnitude", "cap"])
def test_two_four_structure(tiny_vit, method):
    oneshot_prune(tiny_vit, small_config(method, 0.5, structure="2:4"), random_batches(12))
    report = verify_sparsity(tiny_vit, 0.5, n_m=(2, 4))
    assert report.overall == pytest.approx(0.5)


def test_cap_lowers_the_loss_more_than_magnitude_and_obs():
    """With strongly correlated inputs, CAP's joint updates beat OBS's summed single-weight updates
    (which can overshoot, even past magnitude) and magnitude."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16, bias=False))
    x = torch.randn(256, 16) @ (torch.eye(16) + 0.8 * torch.randn(16, 16))
    teacher_out = model(x).detach()
    batches = [{"x": x[i:i + 8]} for i in range(0, 256, 8)]

    def loss_fn(m, batch):  # regression onto the dense outputs: gradients ~ correlated inputs
        return (m(batch["x"]) - model(batch["x"]).detach() + 0.1 * torch.randn(len(batch["x"]), 16)).pow(2).sum()

    losses = {}
    for method in ("magnitude", "obs", "cap"):
        pruned = copy.deepcopy(model)
        cfg = PruningConfig(method=method, sparsity=0.75, num_grads=32, fisher_block_size=16, damp=1e-3,
                            targets=["0"])
        oneshot_prune(pruned, cfg, batches, loss_fn=loss_fn)
        losses[method] = float((pruned(x).detach() - teacher_out).pow(2).mean())
    assert losses["cap"] < min(losses["obs"], losses["magnitude"]), losses


def test_fisher_masks_gradients_and_restores_model_state(tiny_vit):
    targets = find_targets(tiny_vit)
    name = next(iter(targets))
    masks = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in targets.items()}
    masks[name][:, :4] = False
    tiny_vit.train()
    frozen = tiny_vit.vit.embeddings.patch_embeddings.projection.weight
    frozen.requires_grad_(False)
    fisher = collect_fisher(tiny_vit, targets, random_batches(6), num_grads=6, block_size=16, masks=masks)["block"]
    assert tiny_vit.training and not frozen.requires_grad and tiny_vit.classifier.weight.requires_grad
    assert all(m.weight.grad is None for m in targets.values())
    first = fisher.mean(name)[0]  # block 0 = row 0, columns 0..15; columns 0..3 are masked
    assert bool((first[:4] == 0).all()) and bool((first[:, :4] == 0).all()) and float(first[4:, 4:].abs().sum()) > 0


def test_label_free_fisher_needs_no_labels(tiny_vit):
    batches = [{"pixel_values": b["pixel_values"]} for b in random_batches(6)]
    with pytest.raises(ValueError, match="no 'labels'"):
        oneshot_prune(copy.deepcopy(tiny_vit), small_config("cap", 0.5, num_grads=6), batches)
    report = oneshot_prune(tiny_vit, small_config("cap", 0.5, num_grads=6, label_free_fisher=True), batches)
    assert report.overall == pytest.approx(0.5, abs=1e-3)


def test_non_finite_gradient_names_the_layer(tiny_vit):
    with torch.no_grad():
        tiny_vit.vit.layers[1].mlp.fc2.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"Non-finite gradient in layer vit\.layers\.\d"):
        oneshot_prune(tiny_vit, small_config("obs", 0.5), random_batches(12))


def test_too_few_calibration_batches(tiny_vit):
    with pytest.raises(ValueError, match="holds 3 batches, but 12 Fisher gradients are needed"):
        oneshot_prune(tiny_vit, small_config("cap", 0.5), random_batches(3))


def test_prepare_once_apply_at_many_sparsities(tiny_vit):
    targets = find_targets(tiny_vit)
    with Pruner(tiny_vit, small_config("cap", 0.5)) as pruner:
        pruner.prepare(random_batches(12))
        previous = None
        for sparsity in (0.5, 0.7, 0.9):
            copy_model = copy.deepcopy(tiny_vit)
            report = pruner.apply(sparsity, model=copy_model)
            assert report.overall == pytest.approx(sparsity, abs=1e-3)
            zeros = {n: m.weight == 0 for n, m in find_targets(copy_model).items()}
            if previous is not None:  # prefixes of one order: higher sparsity prunes a superset
                assert all(bool(zeros[n][previous[n]].all()) for n in zeros)
            previous = zeros
    assert all(bool((m.weight != 0).all()) for m in targets.values())  # the dense model is untouched


def test_verify_sparsity_reports_drift(tiny_vit):
    oneshot_prune(tiny_vit, PruningConfig(method="magnitude", sparsity=0.5))
    verify_sparsity(tiny_vit, 0.5)
    with torch.no_grad():
        tiny_vit.vit.layers[0].mlp.fc1.weight.add_(0.01)  # fine-tuning without masks densifies
    with pytest.raises(SparsityMismatchError, match="overall: expected 0.5000"):
        verify_sparsity(tiny_vit, 0.5)
