"""Pruning from Scratch: the expanded network, gates that act like removing channels, gate learning and its
rule, the global ranking under a FLOPs target, the uniform baseline, and scripts/structured_prune.py --method pfs."""

import json
import logging

import pytest
import torch
from conftest import load_script, run_script, tiny_resnet, tiny_vit_config
from transformers import AutoModelForImageClassification, ConvNextConfig, ViTForImageClassification

from cap_hf.io.data import collate, digits_dataset, prepare_splits
from cap_hf.io.models import make_image_processor
from cap_hf.modeling import (
    PrunedResNetConfig,
    PrunedResNetForImageClassification,
    PrunedViTForImageClassification,
)
from cap_hf.structured import pfs, prune_channels
from cap_hf.structured.groups import ChannelGraph, remove_channels
from cap_hf.structured.measure import count_macs


def vit_config():
    return tiny_vit_config(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)  # head_dim 8


def test_expanded_config_widens_what_is_gated():
    vit = pfs.expanded_config(vit_config())
    assert vit.model_type == "pruned_vit" and vit.hidden_size == 32 and vit.head_dim == 8
    assert vit.layer_num_heads == [5, 5] and vit.layer_intermediate_sizes == [80, 80]
    resnet = pfs.expanded_config(tiny_resnet("bottleneck").config)
    assert resnet.model_type == "pruned_resnet"
    original = PrunedResNetConfig(**{k: v for k, v in tiny_resnet("bottleneck").config.to_dict().items()
                                     if k not in ("model_type", "architectures", "transformers_version")})
    assert resnet.embedding_size == round(1.25 * original.embedding_size)
    assert resnet.hidden_sizes == [round(1.25 * h) for h in original.hidden_sizes]
    assert resnet.block_widths == [[round(1.25 * w) for w in block] for block in original.block_widths]
    narrow_stream = pfs.expanded_config(tiny_resnet("bottleneck").config, stream_ratio=1.0)
    assert narrow_stream.hidden_sizes == original.hidden_sizes  # the paper's ResNet-50 scales the two apart
    assert narrow_stream.embedding_size == original.embedding_size
    assert narrow_stream.block_widths == resnet.block_widths
    with pytest.raises(ValueError, match="hidden size .* is not widened"):
        pfs.expanded_config(vit_config(), stream_ratio=1.5)
    with pytest.raises(ValueError, match="supports ViT and ResNet configs"):
        pfs.expanded_config(type("C", (), {"model_type": "convnext"})())


def _gated_and_removed(model, image_size, x, zero):
    """Logits with the gates of `zero` ({group position: channels}) at 0 and the rest at 1, and logits of
    the model with those channels removed."""
    graph = ChannelGraph(model.eval(), image_size)
    gates = pfs.ChannelGates(graph)
    with torch.no_grad():
        for position, channels in zero.items():
            gates.values[position][channels] = 0.0
        with gates.applied():
            gated = model(pixel_values=x).logits
        plain = model(pixel_values=x).logits
        removed = remove_channels(model, graph, {gates.groups[p].index: c for p, c in zero.items()})
        return gates, gated, plain, removed(pixel_values=x).logits


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_a_zero_gate_removes_its_channel_and_ones_change_nothing(arch):
    torch.manual_seed(0)
    if arch == "vit":
        model, size = pfs.build_classifier(pfs.expanded_config(vit_config())), 8
    else:
        model, size = pfs.build_classifier(pfs.expanded_config(tiny_resnet("bottleneck").config)), 32
        for module in model.modules():  # non-trivial batch-norm statistics and affine parameters
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.normal_()
                module.bias.data.normal_()
    x = torch.randn(3, model.config.num_channels, size, size)
    graph = ChannelGraph(model.eval(), size)
    gates = pfs.ChannelGates(graph)
    assert gates.groups and all(not g.coupled for g in gates.groups)
    assert len(gates.groups) == sum(not g.coupled for g in graph.groups)
    zero = {p: list(range(0, g.size, 2)) for p, g in enumerate(gates.groups)}  # every other channel (head)
    gates, gated, plain, removed = _gated_and_removed(model, size, x, zero)
    torch.testing.assert_close(gated, removed, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(gated, plain, atol=1e-3)
    with torch.no_grad(), pfs.ChannelGates(graph).applied():  # all gates at 1
        torch.testing.assert_close(model(pixel_values=x).logits, plain)
    if arch == "vit":  # heads are gated whole
        assert {g.unit for g in gates.groups if g.name.endswith("q_proj")} == {8}


def digits_batches(split, batch_size=64, shuffle=False):
    train, test, _ = prepare_splits(digits_dataset(), make_image_processor(8, 1), 1)
    data = train if split == "train" else test
    generator = torch.Generator().manual_seed(0)
    return lambda: torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                                               generator=generator)


def test_gate_learning_pulls_the_mean_gate_to_r_and_keeps_the_papers_choice():
    torch.manual_seed(0)
    model = pfs.build_classifier(pfs.expanded_config(vit_config()))
    graph = ChannelGraph(model.eval(), 8)
    gates = pfs.ChannelGates(graph)
    before = [p.detach().clone() for p in model.parameters()]
    result = pfs.learn_gates(model, gates, digits_batches("train", shuffle=True), digits_batches("test"), epochs=4,
                             lr=0.05, lambd=20.0, sparsity=0.3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # weights stay frozen
    assert all(not p.requires_grad for p in model.parameters())
    flat = torch.cat(result.values)
    assert flat.min() >= 0 and flat.max() <= 1
    means = [row["mean_gate"] for row in result.history]
    assert means[0] < 1 and abs(means[-1] - 0.3) < abs(means[0] - 0.3)  # the regulariser pulls towards r
    eligible = [row for row in result.history if row["nonzero_fraction"] <= 0.3]
    candidates = eligible or result.history[-1:]
    best = max(row["val_accuracy"] for row in candidates)
    assert result.accuracy == best and result.history[result.epoch - 1]["val_accuracy"] == best
    assert result.epoch in [row["epoch"] for row in candidates]


def test_search_keeps_the_highest_gates_within_the_flops_target_and_never_empties_a_group():
    torch.manual_seed(0)
    config = vit_config()
    model = pfs.build_classifier(pfs.expanded_config(config)).eval()
    base = count_macs(pfs.build_classifier(pfs.expanded_config(config, 1.0)).eval(), 8)
    graph = ChannelGraph(model, 8)
    gates = pfs.ChannelGates(graph)
    values = [torch.rand(g.size) for g in gates.groups]
    values[1] = torch.zeros(gates.groups[1].size)  # a group whose gates all collapsed
    found = pfs.search_architecture(model, graph, gates, values, 0.6, base)
    assert found.flops_ratio <= 0.6
    order = pfs.gate_order(gates.groups, values)
    more = remove_channels(model, graph, pfs.kept_plan(gates.groups, values, order, found.kept + 1))
    assert count_macs(more, 8) / base > 0.6  # one more gate would exceed the target: the most that fit
    kept_values, removed_values = [], []
    for group, gate in zip(gates.groups, values, strict=True):
        removed = set(found.removed[group.index])
        assert len(removed) < group.size  # at least one channel left
        forced = int(gate.argmax())  # each group's highest gate stays, whatever the ranking says
        kept_values += [float(v) for c, v in enumerate(gate) if c not in removed and c != forced]
        removed_values += [float(v) for c, v in enumerate(gate) if c in removed]
    assert max(removed_values) <= min(kept_values)  # globally ranked: every removed gate below every kept one
    assert len(found.removed[gates.groups[1].index]) == gates.groups[1].size - 1  # the collapsed group keeps one


def test_an_unreachable_flops_target_fails_before_any_gate_is_learnt():
    def never():
        raise AssertionError("no batch may be read for a target that cannot be reached")

    with pytest.raises(ValueError, match=r"flops_ratio 0\.01 cannot be reached: with one channel left in every gated "
                                         r"group the model keeps 0\.\d+ of the original's FLOPs"):
        pfs.prune_from_scratch(vit_config(), 8, 0.01, never)
    with pytest.raises(ValueError, match=r"flops_ratio .* must be in \(0, 1\)"):
        pfs.prune_from_scratch(vit_config(), 8, 1.2, never)
    with pytest.raises(ValueError, match="expand_ratio must be >= 1"):
        pfs.prune_from_scratch(vit_config(), 8, 0.5, never, expand_ratio=0.8)


def test_prune_from_scratch_returns_fresh_weights_at_the_target():
    config = vit_config()
    small, run = pfs.prune_from_scratch(config, 8, 0.5, digits_batches("train", shuffle=True), digits_batches("test"),
                                        gate_epochs=2)
    assert isinstance(small, PrunedViTForImageClassification)
    assert run.flops_ratio_achieved <= 0.5 and run.macs_original == count_macs(ViTForImageClassification(config), 8)
    assert count_macs(small.eval(), 8) == pytest.approx(run.flops_ratio_achieved * run.macs_original)
    assert small.config.layer_num_heads == [run.widths[f"vit.layers.{i}.attention.q_proj"][1] for i in range(2)]
    assert small.config.layer_intermediate_sizes == [run.widths[f"vit.layers.{i}.mlp.fc1"][1] for i in range(2)]
    assert run.search_seconds >= run.gates.seconds > 0 and len(run.gates.history) == 2
    torch.manual_seed(0)  # fresh weights: the architecture's own init, not the gated network's
    assert torch.equal(small.classifier.weight, pfs.build_classifier(small.config).classifier.weight)


def test_collapsed_gates_keep_one_channel_with_a_warning_and_all_collapsed_is_an_error(monkeypatch, caplog):
    def learnt(zero_groups):
        def fake(model, gates, *args, **kwargs):
            values = [torch.linspace(0.1, 1.0, g.size) for g in gates.groups]
            for position in zero_groups(len(values)):
                values[position] = torch.zeros_like(values[position])
            return pfs.GateLearning(values, 1, None, [{"epoch": 1}], 0.1)
        return fake

    monkeypatch.setattr(pfs, "learn_gates", learnt(lambda n: [1]))
    with caplog.at_level(logging.WARNING, logger="cap_hf"):
        small, run = pfs.prune_from_scratch(vit_config(), 8, 0.7, None)
    assert run.collapsed == ["vit.layers.0.mlp.fc1"] and "Every gate of vit.layers.0.mlp.fc1 ended at 0" in caplog.text
    assert run.widths["vit.layers.0.mlp.fc1"] == (80, 1) and small.config.layer_intermediate_sizes[0] == 1
    monkeypatch.setattr(pfs, "learn_gates", learnt(range))
    with pytest.raises(ValueError, match="Every gate ended at 0 after 10 epoch"):
        pfs.prune_from_scratch(vit_config(), 8, 0.7, None)


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_uniform_baseline_scales_every_gated_width_alike_within_the_target(arch):
    config = vit_config() if arch == "vit" else tiny_resnet("basic", embedding_size=16).config
    size = 8 if arch == "vit" else 32
    model, ratio = pfs.uniform_architecture(config, size, 0.6)
    if arch == "resnet":  # streams kept at the original width: more of the budget left to the blocks
        narrow, narrow_ratio = pfs.uniform_architecture(config, size, 0.6, stream_ratio=1.0)
        assert narrow.config.hidden_sizes == list(config.hidden_sizes) and narrow_ratio <= 0.6
        assert sum(map(sum, narrow.config.block_widths)) > sum(map(sum, model.config.block_widths))
    base = count_macs(pfs.build_classifier(pfs.expanded_config(config, 1.0)).eval(), size)
    assert ratio == pytest.approx(count_macs(model.eval(), size) / base) and ratio <= 0.6
    if arch == "vit":
        assert len(set(model.config.layer_num_heads)) == 1 and len(set(model.config.layer_intermediate_sizes)) == 1
        assert model.config.hidden_size == config.hidden_size
    else:
        assert isinstance(model, PrunedResNetForImageClassification)
        expanded = pfs.expanded_config(config)
        assert model.config.hidden_sizes == expanded.hidden_sizes  # the stream is widened, never narrowed
        pairs = [(w, e) for b, eb in zip(model.config.block_widths, expanded.block_widths, strict=True)
                 for w, e in zip(b, eb, strict=True)]
        # one factor f < 1 with every width = round(f x expanded width)
        low, high = max((w - 0.5) / e for w, e in pairs), min((w + 0.5) / e for w, e in pairs)
        assert low <= high and low < 1


@pytest.fixture(scope="module")
def vit_config_folder(tmp_path_factory):
    """A folder with only a config and an image processor: all Pruning from Scratch needs."""
    folder = tmp_path_factory.mktemp("models") / "config-only"
    config = tiny_vit_config(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)})
    config.save_pretrained(folder)
    make_image_processor(8, 1).save_pretrained(folder)
    return folder


def test_pfs_script_trains_the_found_architecture_from_scratch(vit_config_folder, digits_dir, tmp_path):
    out = tmp_path / "pfs"
    run_script("structured_prune.py", "--method", "pfs", "--model_name_or_path", vit_config_folder,
               "--dataset_name", digits_dir, "--flops_ratio", 0.6, "--gate_epochs", 2, "--train_epochs", 12,
               "--learning_rate", 3e-3, "--per_device_train_batch_size", 32, "--output_dir", out,
               "--latency_batch_sizes", "1,8", "--latency_repeats", 3, "--disable_tqdm", "true")
    results = json.loads((out / "results.json").read_text())
    dfpc_keys = {"method", "model", "image_size", "removed_channels", "prunable_channels", "pruning_ratio",
                 "group_widths", "head_groups", "latency", "params_dense", "params_pruned", "macs_dense",
                 "macs_pruned", "latency_ms_dense", "latency_ms_pruned", "speedup", "accuracy_pruned", "command",
                 "arguments", "training_arguments"}
    assert dfpc_keys | {"flops_ratio_achieved", "search_seconds"} <= set(results)
    assert "accuracy_dense" not in results  # a config has no trained weights to evaluate
    assert results["flops_ratio_achieved"] <= 0.6
    assert results["macs_pruned"] / results["macs_dense"] == pytest.approx(results["flops_ratio_achieved"])
    assert results["training"]["epochs"] == 12 and results["training"]["distill"] is False  # no teacher
    assert results["accuracy_pruned"] > 0.5  # trained from scratch (chance is 0.1)
    assert len(results["gates"]["history"]) == 2 and results["gates"]["val_samples"] > 0
    model = AutoModelForImageClassification.from_pretrained(out)
    assert isinstance(model, PrunedViTForImageClassification)
    assert sum(p.numel() for p in model.parameters()) == results["params_pruned"]
    card = (out / "README.md").read_text()
    assert "Pruning from Scratch" in card and "wang2020pruning" in card and "Trained from scratch" in card
    assert "base_model:" not in card  # no weights come from the config's model


def test_pfs_script_distils_from_a_trained_model_and_scales_the_budget(digits_model, digits_dir, tmp_path):
    out = tmp_path / "uniform"
    run_script("structured_prune.py", "--method", "uniform", "--model_name_or_path", digits_model,
               "--dataset_name", digits_dir, "--flops_ratio", 0.5, "--train_epochs", 1, "--budget_train", "true",
               "--max_train_samples", 256, "--output_dir", out, "--latency_batch_sizes", "1",
               "--latency_repeats", 2, "--disable_tqdm", "true")
    results = json.loads((out / "results.json").read_text())
    assert results["accuracy_dense"] > 0.5  # the trained model, evaluated and used as the teacher
    assert results["training"]["distill"] is True and results["training"]["teacher"] == str(digits_model)
    assert results["training"]["epochs"] == pytest.approx(1 / 0.5)
    assert "gates" not in results and results["flops_ratio_achieved"] <= 0.5
    assert "uniform widths" in (out / "README.md").read_text()


def test_pfs_script_refuses_an_unsupported_architecture(digits_dir, tmp_path):
    ConvNextConfig(num_channels=1, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10).save_pretrained(
        tmp_path / "convnext")
    make_image_processor(8, 1).save_pretrained(tmp_path / "convnext")
    script = load_script("structured_prune")
    with pytest.raises(SystemExit, match="does not support ConvNextForImageClassification yet; supported:"):
        script.main(["--method", "pfs", "--model_name_or_path", str(tmp_path / "convnext"), "--dataset_name",
                     str(digits_dir), "--flops_ratio", "0.5", "--train_epochs", "1", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra,message", [
    (["--method", "pfs", "--flops_ratio", 0.5], "trains the architecture from scratch: give --dataset_name and "
                                                 "--train_epochs"),
    (["--method", "pfs", "--pruning_ratio", 0.5, "--train_epochs", 1], "takes --flops_ratio"),
    (["--method", "pfs", "--flops_ratio", 1.5, "--train_epochs", 1], r"must be in \(0, 1\)"),
    (["--method", "pfs", "--flops_ratio", 0.5, "--train_epochs", 1, "--gate_sparsity", 0], r"gate_sparsity must be"),
    (["--method", "pfs", "--flops_ratio", 0.5, "--train_epochs", 1, "--finetune_epochs", 1], "do not apply"),
    (["--method", "dfpc", "--flops_ratio", 0.5, "--train_epochs", 1], "are for pfs and uniform"),
    (["--method", "pfs", "--flops_ratio", 0.5, "--train_epochs", 1, "--stream_expand_ratio", 1.5], "is not widened"),
    (["--method", "pfs", "--flops_ratio", 0.5, "--train_epochs", 1, "--expand_ratio", 0.5], "must be >= 1"),
    (["--method", "pfs", "--flops_ratio", 0.01, "--train_epochs", 1], r"flops_ratio 0\.01 cannot be reached"),
])
def test_pfs_script_bad_input(vit_config_folder, digits_dir, tmp_path, extra, message):
    script = load_script("structured_prune")
    with pytest.raises(SystemExit, match=message):
        script.main([str(a) for a in ["--model_name_or_path", vit_config_folder, "--dataset_name", digits_dir,
                                      "--output_dir", tmp_path / "out", *extra]])
    assert not (tmp_path / "out").exists()


def test_dfpc_takes_a_flops_target_too(digits_model):
    model = AutoModelForImageClassification.from_pretrained(digits_model).eval()
    small, run = prune_channels(model, 8, "dfpc", flops_ratio=0.6)
    ratio = count_macs(small, 8) / count_macs(model, 8)
    assert ratio <= 0.6
    one_fewer, _ = prune_channels(model, 8, "dfpc", pruning_ratio=(run.removed - 1) / run.prunable)
    assert count_macs(one_fewer, 8) / count_macs(model, 8) > 0.6  # the fewest channels that reach it
