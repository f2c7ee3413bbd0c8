"""Features of backbones without labels: the random-projection feature Fisher against the exact
Gauss-Newton J^T J, the token layouts (registers, distillation token), weighted k-NN and feature cosine."""

import copy

import pytest
import torch
from conftest import random_batches, tiny_vit_config
from transformers import (
    DeiTConfig,
    DeiTModel,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTForImageClassification,
    ViTModel,
)

from cap_hf import Pruner, PruningConfig
from cap_hf.distill import feature_distillation_loss
from cap_hf.engine.collect import collect_fisher
from cap_hf.engine.feature_fisher import FeatureFisherLoss
from cap_hf.evaluation.features import (
    FeatureEvaluator,
    extract_features,
    feature_cosine,
    is_backbone,
    knn_accuracy,
    linear_probe_accuracy,
)


def exact_gauss_newton(model, name, pixel_values, pooling):
    """mean_i J_i^T J_i / tokens, J_i = d features(x_i) / d weight, by torch.autograd.functional.jacobian."""
    weight = dict(model.named_parameters())[name]

    def features(w):
        hidden = torch.func.functional_call(model, {name: w}, kwargs={"pixel_values": pixel_values}).last_hidden_state
        return hidden[:, :1] if pooling == "cls" else hidden  # (b, tokens, dim)

    tokens = features(weight).shape[1]
    jac = torch.autograd.functional.jacobian(features, weight.detach())  # (b, tokens, dim, *weight.shape)
    jac = jac.reshape(pixel_values.shape[0], -1, weight.numel()).double()
    return torch.einsum("bpi,bpj->ij", jac, jac) / (pixel_values.shape[0] * tokens)


@pytest.mark.parametrize("pooling", ["cls", "tokens"])
def test_feature_fisher_converges_to_the_exact_gauss_newton_matrix(pooling):
    torch.manual_seed(0)
    model = ViTModel(tiny_vit_config(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                     image_size=4), add_pooling_layer=False).eval()
    batch = random_batches(1, batch_size=3, size=4)[0]
    modules = dict(model.named_modules())
    name = next(n for n in modules if n.endswith("mlp.fc2"))
    target = {name: modules[name]}
    exact = exact_gauss_newton(model, name + ".weight", batch["pixel_values"], pooling)
    numel = modules[name].weight.numel()

    def estimate(num_grads, seed):
        fishers = collect_fisher(model, target, [batch] * num_grads, num_grads, numel,
                                 loss_fn=FeatureFisherLoss(pooling, seed=seed))
        return fishers["block"].mean(name)[0].double()

    # an average of N outer products g g^T, g ~ N(0, G), misses G by sqrt((|G|^2 + tr(G)^2) / N) (Wishart)
    def error(estimated, n):
        expected = ((exact.norm() ** 2 + exact.trace() ** 2) / n).sqrt()
        return float((estimated - exact).norm()), float(expected)

    large, small = estimate(2048, 1), estimate(128, 2)
    (err_large, exp_large), (err_small, _) = error(large, 2048), error(small, 128)
    assert err_large < 1.5 * exp_large, (err_large, exp_large)
    assert err_large < 0.5 * err_small  # the estimate converges (expected ratio 1/4)
    # unbiased and at the right scale: the trace |g|^2 has standard deviation sqrt(2 tr(G^2) / N)
    spread = float((2 * (exact @ exact).trace() / 2048).sqrt())
    assert abs(float(large.trace() - exact.trace())) < 4 * spread


def test_feature_fisher_draws_new_projections_and_is_seeded():
    torch.manual_seed(0)
    model = ViTModel(tiny_vit_config(), add_pooling_layer=False).eval()
    batch = random_batches(1)[0]
    loss = FeatureFisherLoss(seed=5)
    first, second = loss(model, batch), loss(model, batch)
    assert not torch.allclose(first, second)  # a new v for every call
    assert torch.allclose(FeatureFisherLoss(seed=5)(model, batch), first)  # the same seed, the same draws


def test_token_layouts_leave_registers_and_distillation_tokens_out_of_the_patch_average():
    torch.manual_seed(0)
    pixels = torch.randn(2, 1, 8, 8)
    common = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  image_size=8, patch_size=2, num_channels=1)
    for model, prefix in ((Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **common)), 5),
                          (DeiTModel(DeiTConfig(**common), add_pooling_layer=False), 2),
                          (ViTModel(ViTConfig_(**common), add_pooling_layer=False), 1)):
        model.eval()
        hidden = model(pixel_values=pixels).last_hidden_state
        assert hidden.shape[1] == prefix + 16
        assert torch.allclose(extract_features(model, pixels, "cls"), hidden[:, 0])
        assert torch.allclose(extract_features(model, pixels, "mean"), hidden[:, prefix:].mean(1))
        tokens = extract_features(model, pixels, "tokens")
        assert tokens.shape == (2, 17, 16) and torch.allclose(tokens[:, 1:], hidden[:, prefix:])


def ViTConfig_(**kwargs):  # noqa: N802
    return tiny_vit_config(**kwargs)


def test_a_classifier_and_its_backbone_give_the_same_features():
    torch.manual_seed(0)
    classifier = ViTForImageClassification(tiny_vit_config()).eval()
    backbone = classifier.vit
    pixels = torch.randn(3, 1, 8, 8)
    assert not is_backbone(classifier) and is_backbone(backbone)
    assert torch.allclose(extract_features(classifier, pixels), extract_features(backbone, pixels))
    with pytest.raises(ValueError, match="pooling"):
        extract_features(backbone, pixels, "max")


def test_weighted_knn_votes_by_similarity_not_by_count():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [-0.1, 1.0]])
    bank_labels = torch.tensor([0, 1, 1, 1])
    query, label = torch.tensor([[1.0, 0.05]]), torch.tensor([0])
    # k=4: three class-1 neighbours far away (cosine ~0.05-0.15) against one class-0 neighbour at ~1
    assert knn_accuracy(bank, bank_labels, query, label, k=4, temperature=0.07) == 1.0
    # a high temperature flattens the weights to nearly a count: class 1 wins
    assert knn_accuracy(bank, bank_labels, query, label, k=4, temperature=100.0) == 0.0
    assert knn_accuracy(bank, bank_labels, query, torch.tensor([1]), k=1) == 0.0


def test_feature_cosine():
    a = torch.randn(5, 7)
    assert feature_cosine(a, a) == pytest.approx(1.0)
    assert feature_cosine(-a, a) == pytest.approx(-1.0)
    assert feature_cosine(2 * a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        feature_cosine(a, a[:, :3])


def test_a_backbone_is_pruned_with_the_feature_fisher_without_labels():
    torch.manual_seed(0)
    backbone = ViTModel(tiny_vit_config(), add_pooling_layer=False).eval()
    unlabelled = [{"pixel_values": b["pixel_values"]} for b in random_batches(32)]
    pixels = torch.cat([b["pixel_values"] for b in unlabelled])
    dense = extract_features(backbone, pixels).detach()
    config = PruningConfig(method="cap", sparsity=0.5, num_grads=32, grad_batch_size=4, fisher_block_size=16)
    distortion = {}
    for method in ("cap", "magnitude"):
        model = copy.deepcopy(backbone)
        with Pruner(model, config.replace(method=method)) as pruner:  # 'auto': a backbone gets the feature objective
            assert isinstance(pruner.loss_fn, FeatureFisherLoss)
            pruner.prepare(unlabelled)
            report = pruner.apply(0.5)
        assert abs(report.overall - 0.5) < 1e-3
        distortion[method] = float((extract_features(model, pixels).detach() - dense).square().sum())
    # CAP minimises the features' change measured by their Gauss-Newton matrix: less than magnitude's
    assert distortion["cap"] < distortion["magnitude"], distortion
    with pytest.raises(ValueError, match="fisher_objective features"):
        with Pruner(ViTModel(tiny_vit_config()).eval(), config.replace(fisher_objective="cross_entropy")) as pruner:
            pruner.prepare(unlabelled)
    with pytest.raises(ValueError, match="fisher_objective must be one of"):
        config.replace(fisher_objective="dino")
    # a classifier keeps the cross-entropy of its logits unless asked
    classifier = ViTForImageClassification(tiny_vit_config()).eval()
    assert Pruner(classifier, config).loss_fn is None
    assert isinstance(Pruner(classifier, config.replace(fisher_objective="features")).loss_fn, FeatureFisherLoss)


def test_linear_probe_learns_separable_features_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(4, 6, generator=gen)
    labels = torch.randint(0, 4, (400,), generator=gen)
    features = centers[labels] + torch.randn(400, 6, generator=gen)
    assert linear_probe_accuracy(features[:300], labels[:300], features[300:], labels[300:]) > 0.9
    shuffled = labels[torch.randperm(400, generator=gen)]
    assert linear_probe_accuracy(features[:300], shuffled[:300], features[300:], shuffled[300:]) < 0.5


def test_feature_evaluator_reports_what_the_labels_allow():
    torch.manual_seed(0)
    backbone = ViTModel(tiny_vit_config(), add_pooling_layer=False).eval()
    labelled = random_batches(6, batch_size=8)
    metrics = FeatureEvaluator(backbone, labelled[:4], labelled[4:])(backbone)
    assert metrics["feature_cosine"] == pytest.approx(1.0)
    assert set(metrics) == {"feature_cosine", "knn_accuracy", "linear_probe_accuracy"}
    other = ViTModel(tiny_vit_config(), add_pooling_layer=False).eval()  # other random weights
    assert FeatureEvaluator(backbone, labelled[:4], labelled[4:])(other)["feature_cosine"] < 0.99
    unlabelled = [{"pixel_values": b["pixel_values"]} for b in labelled[4:]]
    assert set(FeatureEvaluator(backbone, labelled[:4], unlabelled)(backbone)) == {"feature_cosine"}
    tokens = FeatureEvaluator(backbone, labelled[:4], labelled[4:], pooling="tokens", probe=False)(backbone)
    assert set(tokens) == {"feature_cosine", "knn_accuracy"}


def test_feature_distillation_loss():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 5, 8, generator=gen)
    assert float(feature_distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    # the CLS term is a cosine (scale-free), the patch term compares layer-normalised tokens
    assert float(feature_distillation_loss(3 * teacher, teacher)) == pytest.approx(0.0, abs=1e-5)
    assert float(feature_distillation_loss(teacher + torch.randn(4, 5, 8, generator=gen), teacher)) > 0.1
    pooled = torch.randn(4, 8, generator=gen)  # a convolutional backbone: one feature per image
    assert float(feature_distillation_loss(-pooled, pooled)) == pytest.approx(2.0)


def test_a_pruned_backbone_is_fine_tuned_by_feature_distillation_without_labels(tmp_path):
    from cap_hf.trainer import DistillationArguments, DistillationTrainer

    torch.manual_seed(0)
    dense = ViTModel(tiny_vit_config(), add_pooling_layer=False).eval()
    student = copy.deepcopy(dense)
    unlabelled = [{"pixel_values": b["pixel_values"][i]} for b in random_batches(8) for i in range(4)]
    with Pruner(student, PruningConfig(method="magnitude", sparsity=0.6)) as pruner:
        pruner.prepare()
        pruner.apply(0.6)
    pixels = torch.stack([e["pixel_values"] for e in unlabelled])

    def distance():
        with torch.no_grad():
            return float(feature_distillation_loss(extract_features(student, pixels, "tokens"),
                                                   extract_features(dense, pixels, "tokens")))

    before = distance()
    args = DistillationArguments(output_dir=str(tmp_path), num_train_epochs=10, per_device_train_batch_size=8,
                                 learning_rate=3e-3, report_to="none", save_strategy="no", use_cpu=True,
                                 logging_strategy="no", disable_tqdm=True)
    DistillationTrainer(model=student.train(), args=args, teacher_model=dense, train_dataset=unlabelled).train()
    student.eval()
    assert distance() < 0.5 * before, (distance(), before)


def test_a_model_without_features_is_refused_with_a_clear_message():
    class Logits(torch.nn.Module):  # takes images, but returns no last_hidden_state
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))

        def forward(self, pixel_values):
            return {"logits": self.scale * pixel_values.flatten(1)}

    with pytest.raises(ValueError, match="returns no last_hidden_state, so it has no features"):
        extract_features(Logits(), torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="no last_hidden_state"):
        FeatureEvaluator(Logits(), None, [{"pixel_values": torch.randn(2, 1, 4, 4)}])
