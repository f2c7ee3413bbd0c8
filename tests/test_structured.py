"""Structured pruning: channel groups found from the model, DFPC's data-free saliency against explicit
matrices, the global greedy removal, and physically smaller models that compute what the masked ones do."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_cap_on_top, assert_computes_and_reloads, load_script, run_script, tiny_resnet
from torch import nn
from transformers import AutoModelForImageClassification, ConvNextConfig, ConvNextForImageClassification

from cap_hf.io.models import make_image_processor
from cap_hf.modeling import PrunedResNetForImageClassification
from cap_hf.structured import prune_channels
from cap_hf.structured.criteria.dfpc import bgsc_scores
from cap_hf.structured.criteria.l1 import l1_scores
from cap_hf.structured.groups import ChannelGraph, remove_channels
from cap_hf.structured.order import channel_scores, prunable_channels, removal_order, removal_plan

SIZE = 32


def resnet(layer_type="bottleneck", **overrides):
    model = tiny_resnet(layer_type, **overrides)
    torch.manual_seed(1)
    for module in model.modules():  # gammas of both signs: BGSC takes |gamma|
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.normal_()
    return model


def tiny_convnext_config():
    return ConvNextConfig(num_channels=1, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)


def names(members):
    return [m.name for m in members]


def producing(graph, suffix):
    """The group one of whose producers' names ends with `suffix`."""
    return next(g for g in graph.groups if any(n.endswith(suffix) for n in names(g.producers)))


def test_groups_of_a_bottleneck_resnet():
    graph = ChannelGraph(resnet("bottleneck", depths=[2, 2]), SIZE)
    # stem + 2 stage streams + 2 inner groups in each of 4 blocks; the classifier's outputs are not a group
    assert len(graph.groups) == 1 + 2 + 8
    by_root = {g.root: g for g in graph.groups}
    stem = next(g for g in graph.groups if "embedder" in g.name)
    assert stem.size == 8 and stem.coupled
    assert names(stem.producers) == ["resnet.embedder.embedder.convolution"]
    assert set(names(stem.consumers)) == {"resnet.encoder.stages.0.layers.0.layer.0.convolution",
                                          "resnet.encoder.stages.0.layers.0.shortcut.convolution"}
    stage0 = producing(graph, "stages.0.layers.0.shortcut.convolution")
    assert stage0.size == 16 and stage0.coupled
    s = "resnet.encoder.stages"
    assert set(names(stage0.producers)) == {f"{s}.0.layers.0.layer.2.convolution", f"{s}.0.layers.0.shortcut.convolution",
                                            f"{s}.0.layers.1.layer.2.convolution"}
    assert set(names(stage0.consumers)) == {f"{s}.0.layers.1.layer.0.convolution", f"{s}.1.layers.0.layer.0.convolution",
                                            f"{s}.1.layers.0.shortcut.convolution"}
    assert len(stage0.norms) == 3
    last = producing(graph, "stages.1.layers.0.shortcut.convolution")
    assert "classifier.1" in names(last.consumers)
    inner = by_root[f"{s}.1.layers.0.layer.0.convolution"]
    assert not inner.coupled and inner.size == 8
    assert names(inner.consumers) == [f"{s}.1.layers.0.layer.1.convolution"]


def test_a_frozen_model_has_the_same_groups_and_stays_frozen():
    model = resnet()
    expected = [(g.root, g.size) for g in ChannelGraph(model, SIZE).groups]
    model.requires_grad_(False)  # a distillation teacher, say
    graph = ChannelGraph(model, SIZE)
    assert [(g.root, g.size) for g in graph.groups] == expected
    small = remove_channels(model, graph, {0: [0]})
    assert not any(p.requires_grad for p in model.parameters())
    assert small.num_parameters() < model.num_parameters()


def test_stem_and_first_stage_are_one_group_when_nothing_projects_between():
    # basic blocks, embedding 16 = first stage 16, stride 1: the first block's shortcut is the identity
    graph = ChannelGraph(resnet("basic", embedding_size=16), SIZE)
    stream = next(g for g in graph.groups if "embedder" in g.name)
    assert "resnet.encoder.stages.0.layers.1.layer.1.convolution" in names(stream.producers)
    assert "resnet.encoder.stages.1.layers.0.shortcut.convolution" in names(stream.consumers)


def _matrix(fn, shape):
    """The explicit matrix of a linear map on tensors of `shape` (rows: outputs, columns: inputs)."""
    jac = torch.autograd.functional.jacobian(fn, torch.zeros(1, *shape, dtype=torch.float64))
    out = jac.shape[: jac.dim() - len(shape) - 1]
    return jac.reshape(out.numel(), -1)


def _explicit_bgsc(graph, group):
    """sum over pairs of 1^T N_b D_k P M_a 1, with every matrix built explicitly (Jacobians)."""
    scores = torch.zeros(group.size, dtype=torch.float64)
    for a in group.producers:
        conv = a.module
        in_a, out_a = graph.shapes[a.name]
        m = _matrix(lambda x, conv=conv: F.conv2d(x, conv.weight.double().abs(), None, conv.stride, conv.padding), in_a)
        bn = graph.norm_after(a, group).module
        scale = (bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)).double()
        m = scale.repeat_interleave(out_a[1] * out_a[2])[:, None] * m
        for b in group.consumers:
            if graph.order[b.name] <= graph.order[a.name]:
                continue
            in_b = graph.shapes[b.name][0]
            path = m
            if isinstance(b.module, nn.Linear):  # global average pooling, then the classifier
                path = _matrix(lambda x: F.adaptive_avg_pool2d(x, 1).flatten(1), out_a) @ m
                n = b.module.weight.double().abs()
            else:
                if tuple(in_b) != tuple(out_a):  # the stem's max-pooling, bounded by the same-window average
                    path = _matrix(lambda x: F.avg_pool2d(x, 3, 2, 1), out_a) @ m
                conv_b = b.module
                n = _matrix(lambda x, c=conv_b: F.conv2d(x, c.weight.double().abs(), None, c.stride, c.padding), in_b)
            positions = n.shape[1] // group.size  # columns of N_b per channel
            for k in range(group.size):
                d = torch.zeros(n.shape[1], dtype=torch.float64)
                d[k * positions:(k + 1) * positions] = 1
                scores[k] += (n @ torch.diag(d) @ path).sum()
    return scores


@pytest.mark.parametrize("which", ["stem", "inner strided", "last stream"])
def test_bgsc_equals_the_explicit_matrix_products(which):
    graph = ChannelGraph(resnet("bottleneck", embedding_size=4, hidden_sizes=[8, 16], depths=[1, 2]), 24)
    group = {
        "stem": next(g for g in graph.groups if "embedder" in g.name),
        # conv1 of stage 1's first block feeds its 3x3 conv of stride 2 (borders and stride matter)
        "inner strided": next(g for g in graph.groups if g.root == "resnet.encoder.stages.1.layers.0.layer.0.convolution"),
        "last stream": next(g for g in graph.groups if any(c.name == "classifier.1" for c in g.consumers)),
    }[which]
    torch.testing.assert_close(bgsc_scores(graph, group), _explicit_bgsc(graph, group), rtol=1e-5, atol=1e-8)


def test_bgsc_is_not_the_l1_norm():
    graph = ChannelGraph(resnet(), SIZE)
    group = graph.groups[0]
    assert not torch.allclose(bgsc_scores(graph, group) / bgsc_scores(graph, group).sum(),
                              l1_scores(graph, group) / l1_scores(graph, group).sum())


def test_removal_order_is_global_lowest_first_and_never_empties_a_group():
    graph = ChannelGraph(resnet(), SIZE)
    scores = channel_scores(graph, "dfpc")
    order = removal_order(graph.groups, scores)
    assert len(order) == sum(g.size - 1 for g in graph.groups)
    assert len(set(order)) == len(order)
    values = [float(scores[g][c]) for g, c in order]
    # lowest first, except where a group's last channel was skipped
    assert values[:5] == sorted(values)[:5]
    uncoupled = removal_order(graph.groups, scores, uncoupled_only=True)
    assert {graph.groups[g].coupled for g, _ in uncoupled} == {False}
    assert prunable_channels(graph.groups, uncoupled_only=True) < prunable_channels(graph.groups)
    random_a, random_b = channel_scores(graph, "random", seed=0), channel_scores(graph, "random", seed=0)
    assert all(torch.equal(random_a[i], random_b[i]) for i in random_a)
    with pytest.raises(ValueError, match="choose one of dfpc, l1, random"):
        channel_scores(graph, "taylor")
    with pytest.raises(ValueError, match="Unknown normalize 'max'; choose one of auto, mean, none"):
        channel_scores(graph, "dfpc", normalize="max")


def test_a_criterion_registered_from_outside_runs_end_to_end_with_its_own_card(digits_resnet, tmp_path, request):
    """One file is one criterion: registered from outside the package, the script accepts it, removes the channels
    it scores lowest, and the card names and cites it (not DFPC)."""
    from cap_hf.structured.criteria import CRITERIA, Criterion, register

    def l2_scores(graph, group, generator):
        scores = torch.zeros(group.size * group.unit, dtype=torch.float64)
        for producer in group.producers:
            weight = producer.module.weight.detach()
            scores += weight.reshape(weight.shape[0], -1).norm(dim=1)[producer.channels].double()
        return scores.reshape(group.size, group.unit).sum(1)

    request.addfinalizer(lambda: CRITERIA.pop("l2", None))  # registered for this test only
    register(Criterion("l2", "L2 norm of the filters (a test's criterion)", "@misc{l2test, title={L2 test}}", l2_scores))
    with pytest.raises(ValueError, match="named 'l2' is registered already"):
        register(Criterion("l2", "again", "", l2_scores))
    model = AutoModelForImageClassification.from_pretrained(digits_resnet)
    graph = ChannelGraph(model, 8)
    order = removal_order(graph.groups, channel_scores(graph, "l2", normalize="none"))
    assert order != removal_order(graph.groups, channel_scores(graph, "l1", normalize="none"))
    script = load_script("structured_prune")
    out = tmp_path / "l2"
    script.main([str(a) for a in ["--method", "l2", "--model_name_or_path", digits_resnet, "--pruning_ratio", 0.3,
                                  "--normalize", "none", "--output_dir", out, "--latency_batch_sizes", "1",
                                  "--latency_repeats", 2]])
    results = json.loads((out / "results.json").read_text())
    plan = removal_plan(order, results["removed_channels"])
    widths = {g.name: [g.size, g.size - len(plan.get(g.index, []))] for g in graph.groups}
    assert results["method"] == "l2" and results["group_widths"] == widths
    card = (out / "README.md").read_text()
    assert "L2 norm of the filters (a test's criterion)" in card and "@misc{l2test" in card
    assert "narshana2023dfpc" not in card
    with pytest.raises(SystemExit, match="choose one of dfpc, l1, random, l2, obs, cap, pfs, uniform"):
        script.main(["--method", "l3", "--model_name_or_path", str(digits_resnet), "--pruning_ratio", "0.3",
                     "--output_dir", str(tmp_path / "l3")])


def test_mean_normalised_scores_are_the_raw_ones_over_each_groups_mean():
    graph = ChannelGraph(resnet(), SIZE)
    raw, mean = channel_scores(graph, "dfpc", normalize="none"), channel_scores(graph, "dfpc")
    for g in graph.groups:
        torch.testing.assert_close(mean[g.index], raw[g.index] / raw[g.index].mean())
        torch.testing.assert_close(raw[g.index], bgsc_scores(graph, g))
    assert removal_order(graph.groups, raw) != removal_order(graph.groups, mean)


def test_round_to_keeps_multiples_and_gives_back_the_highest_scored_removals():
    order = [(0, 5), (1, 0), (0, 2), (0, 7), (1, 3), (0, 1)]
    sizes = {0: 16, 1: 8}
    assert removal_plan(order, 6) == {0: [5, 2, 7, 1], 1: [0, 3]}
    # group 0 keeps 12 of 16 already; group 1 would keep 6 of 8: rounded up to 8, nothing removed
    assert removal_plan(order, 6, sizes, round_to=4) == {0: [5, 2, 7, 1]}
    # 3 removed from 16 leaves 13 -> 16: all given back
    assert removal_plan(order, 4, sizes, round_to=4) == {}
    with pytest.raises(ValueError, match="needs the group sizes"):
        removal_plan(order, 4, round_to=4)


def masked(model, graph, plan):
    """The dense model with every consumer's input weights of the removed channels zeroed."""
    dense = copy.deepcopy(model)
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for index, channels in plan.items():
            for consumer in graph.groups[index].consumers:
                columns = [consumer.channels[c] for c in channels]
                modules[consumer.name].weight[:, columns] = 0
    return dense


@pytest.mark.parametrize("layer_type,overrides", [("bottleneck", {}), ("basic", {}), ("basic", {"embedding_size": 16})])
@pytest.mark.parametrize("method", ["dfpc", "l1", "random"])
def test_removed_channels_give_a_smaller_model_that_computes_what_the_masked_one_does(layer_type, overrides, method,
                                                                                       tmp_path):
    model = resnet(layer_type, **overrides)
    graph = ChannelGraph(model, SIZE)
    order = removal_order(graph.groups, channel_scores(graph, method))
    plan = removal_plan(order, len(order) // 2)
    small = remove_channels(model, graph, plan)
    assert isinstance(small, PrunedResNetForImageClassification)
    assert small.num_parameters() < model.num_parameters()
    assert_computes_and_reloads(small, masked(model, graph, plan), torch.randn(3, 1, SIZE, SIZE), tmp_path)
    assert model.config.hidden_sizes == [16, 32]  # the original is untouched


def test_a_projection_stays_where_pruned_widths_become_equal():
    model = resnet("basic")  # stem 8 -> stage 16 through a projection shortcut (stride 1)
    graph = ChannelGraph(model, SIZE)
    stage0 = producing(graph, "stages.0.layers.0.shortcut.convolution")
    small = remove_channels(model, graph, {stage0.index: list(range(8))})
    assert small.config.embedding_size == small.config.hidden_sizes[0] == 8
    assert small.config.block_shortcuts[0]
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(small(pixel_values=x).logits,
                                   masked(model, graph, {stage0.index: list(range(8))})(pixel_values=x).logits)


def test_bad_input_is_refused_before_any_work():
    with pytest.raises(ValueError, match="does not support ConvNextForImageClassification yet; supported: transformers "
                                         "ResNet.*ViTForImageClassification"):
        ChannelGraph(ConvNextForImageClassification(tiny_convnext_config()).eval(), 8)
    with pytest.raises(ValueError, match=r"training mode; call model.eval\(\)"):
        ChannelGraph(resnet().train(), SIZE)
    with pytest.raises(ValueError, match=r"weights are on \['meta'\]; structured pruning needs them loaded"):
        ChannelGraph(resnet().to("meta"), SIZE)
    model = resnet()
    graph = ChannelGraph(model, SIZE)
    with pytest.raises(ValueError, match="would empty it"):
        remove_channels(model, graph, {0: list(range(graph.groups[0].size))})


def test_recalibrated_batch_norms_hold_the_statistics_of_the_images_they_saw():
    from cap_hf.structured import recalibrate_batch_norms

    model = resnet()
    stem = model.resnet.embedder.embedder
    batches = [{"pixel_values": torch.randn(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(i))}
               for i in range(3)]
    outputs = []
    hook = stem.convolution.register_forward_hook(lambda m, a, out: outputs.append(out.detach()))
    count = recalibrate_batch_norms(model, batches, images=10)  # the last batch is cut to 2 images
    hook.remove()
    assert count == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not model.training and not any(m.training for m in model.modules())
    assert [out.shape[0] for out in outputs] == [4, 4, 2]
    expected = torch.stack([out.mean(dim=(0, 2, 3)) for out in outputs]).mean(dim=0)  # the average of batch means
    torch.testing.assert_close(stem.normalization.running_mean, expected, rtol=1e-4, atol=1e-5)
    # a model without batch norms is left as it is, and its data is not read
    from conftest import tiny_vit_config
    from transformers import ViTForImageClassification
    vit = ViTForImageClassification(tiny_vit_config()).eval()
    assert recalibrate_batch_norms(vit, iter(()), images=10) == 0


@pytest.fixture(scope="module")
def digits_resnet(digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "digits-resnet"
    run_script("train_dense.py", "--arch", "resnet", "--layer_type", "bottleneck", "--embedding_size", 8,
               "--hidden_sizes", "16,32", "--depths", "2,1", "--image_size", 16, "--dataset_name", digits_dir,
               "--output_dir", out, "--num_train_epochs", 8, "--learning_rate", 3e-3,
               "--per_device_train_batch_size", 32, "--save_strategy", "no", "--disable_tqdm", "true",
               "--report_to", "none")
    return out


def test_structured_prune_script_writes_a_smaller_model_and_its_measurements(digits_resnet, digits_dir, tmp_path):
    out = tmp_path / "dfpc"
    run_script("structured_prune.py", "--method", "dfpc", "--model_name_or_path", digits_resnet,
               "--pruning_ratio", 0.3, "--dataset_name", digits_dir, "--output_dir", out,
               "--latency_batch_sizes", "1,8", "--latency_repeats", 3, "--finetune_epochs", 1,
               "--max_train_samples", 256, "--disable_tqdm", "true", "--bn_recalibration_samples", 512)
    results = json.loads((out / "results.json").read_text())
    for key in ("method", "params_dense", "params_pruned", "macs_dense", "macs_pruned", "latency_ms_dense",
                "latency_ms_pruned", "accuracy_dense", "accuracy_pruned", "accuracy_pruned_before_finetuning"):
        assert key in results, key
    assert results["finetuning"]["epochs"] == 1 and results["finetuning"]["train_samples"] == 256
    rebuilt = results["reconstruction"]  # first the layers refitted to the dense outputs, on all 256 images
    assert rebuilt["images"] == 256 and rebuilt["layers"] > 0 and rebuilt["error_after"] < rebuilt["error_before"]
    recalibrated = results["bn_recalibration"]  # after the refit, before fine-tuning, on all 256 images (fewer than asked)
    assert recalibrated["images"] == 256 and recalibrated["batch_norms"] > 0 and 0 <= recalibrated["accuracy_before"] <= 1
    assert results["finetuning"]["distill"] is True
    assert not list(out.glob("checkpoint-*"))  # the Trainer saved nothing of its own
    card = (out / "README.md").read_text()  # the structured model card, from results.json
    assert (out / "channels_per_group.png").is_file()
    assert f"{results['params_pruned'] / 1e6:.3f} M" in card and f"{results['macs_dense'] / 1e6:.3f} M" in card
    dense8, pruned8 = results["latency_ms_dense"]["8"], results["latency_ms_pruned"]["8"]
    assert f"| latency, batch 8 (ms) | {dense8:.2f} | {pruned8:.2f} |" in card
    assert "| `resnet.embedder.embedder.convolution` | 8 |" in card
    assert "structured-pruning" in card and "narshana2023dfpc" in card and "`block_widths`" in card
    assert "Batch-norm statistics re-estimated on 256 training images" in card
    assert f"Layers refitted one after the other ({rebuilt['layers']} convolutions and linear layers" in card
    assert results["method"] == "dfpc"
    assert results["params_pruned"] < results["params_dense"]
    assert results["macs_pruned"] < results["macs_dense"]
    assert set(results["latency_ms_pruned"]) == {"1", "8"} and results["latency"]["threads"] >= 1
    assert results["accuracy_dense"] > 0.5  # a trained model (chance is 0.1)
    assert abs(results["pruning_ratio"] - 0.3) < 0.01
    assert results["target_met"] is True and results["target"]["kind"] == "pruning_ratio"
    assert "Target: pruning_ratio 0.3" in card and "**met**" in card
    model = AutoModelForImageClassification.from_pretrained(out)
    assert isinstance(model, PrunedResNetForImageClassification)
    assert sum(p.numel() for p in model.parameters()) == results["params_pruned"]
    # the smaller model is an ordinary input of the unstructured methods: CAP on top of DFPC
    assert_cap_on_top(out, digits_dir, tmp_path / "dfpc+cap", num_grads=8)


@pytest.mark.parametrize("extra,message", [
    (["--pruning_ratio", 0.3, "--target_speedup", 1.5], "exactly one of pruning_ratio, target_speedup and flops_ratio"),
    (["--pruning_ratio", 1.5], r"pruning_ratio must be in \(0, 1\)"),
    (["--pruning_ratio", 0.3, "--method", "taylor"], "choose one of dfpc, l1, random, obs, cap, pfs, uniform"),
    (["--pruning_ratio", 0.3, "--finetune_epochs", 1], "--finetune_epochs needs --dataset_name"),
    (["--pruning_ratio", 0.3, "--round_to", 0], "round_to must be a positive number of channels"),
    (["--pruning_ratio", 0.3, "--bn_recalibration_samples", -1], "--bn_recalibration_samples must be >= 0"),
    (["--pruning_ratio", 0.3, "--reconstruction_samples", -2], "--reconstruction_samples must be >= 0"),
    (["--pruning_ratio", 0.999], r"cannot be reached without emptying a channel group \(every group\); the largest "
                                 r"reachable is 0\.\d+"),
    (["--pruning_ratio", 0.95, "--uncoupled_only", "true"], r"\(uncoupled channels only\); the largest reachable is 0\.\d+"),
])
def test_structured_prune_script_bad_input(digits_resnet, tmp_path, extra, message):
    script = load_script("structured_prune")
    with pytest.raises(SystemExit, match=message):
        script.main([str(a) for a in ["--model_name_or_path", digits_resnet, "--output_dir", tmp_path / "out", *extra]])
    assert not (tmp_path / "out").exists()


def test_a_missed_speedup_target_is_said_in_the_log_the_results_and_the_card(caplog):
    """The search confirmed the target, the final measurement of the built model did not: said, not hidden."""
    from cap_hf.structured import StructuredConfig
    from cap_hf.structured.config import judge_target

    config = StructuredConfig("dfpc", target_speedup=1.5, speedup_batch_size=64)
    results = {"speedup": {"1": 1.2, "64": 1.46}, "speedup_search": [{"removed_channels": 40, "speedup": 1.54}]}
    with caplog.at_level("WARNING"):
        reached = judge_target(config, results)
    assert reached["target_met"] is False and reached["target"]["achieved"] == 1.46
    assert "misses the target: --target_speedup 1.5 at batch 64, final measurement 1.46x; the search confirmed 1.54x" \
        in caplog.text
    from model_cards.card import _target

    line = _target(reached["target"])
    assert "Target: 1.5x faster at batch 64" in line and "1.46x: **missed**" in line and "1.54x" in line
    results["speedup"]["64"] = 1.51
    assert judge_target(config, results)["target_met"] is True


def test_structured_prune_script_refuses_convnexts_and_folders_of_other_runs(digits_resnet, tmp_path):
    ConvNextForImageClassification(tiny_convnext_config()).save_pretrained(tmp_path / "convnext")
    make_image_processor(8, 1).save_pretrained(tmp_path / "convnext")
    script = load_script("structured_prune")
    with pytest.raises(SystemExit, match="does not support ConvNextForImageClassification yet; supported:"):
        script.main(["--model_name_or_path", str(tmp_path / "convnext"), "--output_dir", str(tmp_path / "out"),
                     "--pruning_ratio", "0.3"])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"is not empty \(another run\?\); pass --overwrite_output_dir"):
        script.main(["--model_name_or_path", str(digits_resnet), "--output_dir", str(busy), "--pruning_ratio", "0.3"])
    assert (busy / "results.json").read_text() == "{}"


def test_speedup_search_finds_the_fewest_channels_that_reach_the_target(monkeypatch):
    """The bisection, with latency replaced by a deterministic stand-in (the parameter count), so no timing."""
    import cap_hf.structured.channels as channels

    monkeypatch.setattr(channels, "latencies_ms", lambda models, size, batch, repeats: [
        float(sum(p.numel() for p in m.parameters())) for m in models])
    model = resnet()
    small, run = prune_channels(model, SIZE, "dfpc", target_speedup=1.5)
    dense = sum(p.numel() for p in model.parameters())
    assert dense / sum(p.numel() for p in small.parameters()) >= 1.5
    graph = ChannelGraph(model, SIZE)
    order = removal_order(graph.groups, channel_scores(graph, "dfpc"))
    one_less = remove_channels(model, graph, removal_plan(order, run.removed - 1))
    assert dense / sum(p.numel() for p in one_less.parameters()) < 1.5
    assert len(run.search) <= 3 + len(order).bit_length()  # the ends, the bisection, one confirmation
    with pytest.raises(ValueError, match="target_speedup 100 cannot be reached .* the largest reachable is"):
        prune_channels(model, SIZE, "dfpc", target_speedup=100)


def test_speedup_search_confirms_its_answer_with_more_passes(monkeypatch):
    """Short readings that flatter the pruned model (timing noise) must not decide: the answer is re-measured
    with more passes and moved along the order until the target holds there too."""
    import cap_hf.structured.channels as channels

    def size(m):
        return float(sum(p.numel() for p in m.parameters()))

    def flattering(models, image_size, batch, passes):
        dense, small = map(size, models)
        return [dense, small * (0.7 if passes < channels.CONFIRM_PASSES * 10 else 1.0)]

    monkeypatch.setattr(channels, "latencies_ms", flattering)
    model = resnet()
    small, run = prune_channels(model, SIZE, "dfpc", target_speedup=1.5, search_repeats=10)
    assert size(model) / size(small) >= 1.5  # on the short readings alone it would stop near 1.05x
    assert run.search[-1][1] >= 1.5 and any(value < 1.5 for _, value in run.search[-3:-1])


def test_the_structured_request_is_declared_once_and_checked_in_one_place():
    import dataclasses
    import inspect

    from cap_hf.structured import StructuredConfig, prune_second_order

    names = {f.name for f in dataclasses.fields(StructuredConfig)}
    script = load_script("structured_prune")
    assert not names & {f.name for f in dataclasses.fields(script.StructuredArguments)}  # the script parses the config
    for function in (prune_channels, prune_second_order):  # no second default in the library
        assert not names & set(inspect.signature(function).parameters)
    with pytest.raises(ValueError, match="--params_ratio is not a target of dfpc, which takes --pruning_ratio or "
                                         "--target_speedup or --flops_ratio"):
        StructuredConfig("dfpc", params_ratio=0.5).check()
    with pytest.raises(ValueError, match="instead of --pruning_ratio"):
        StructuredConfig("obs", pruning_ratio=0.5).check()
    with pytest.raises(ValueError, match="exactly one of target_speedup, flops_ratio and params_ratio"):
        StructuredConfig("cap").check()
    with pytest.raises(ValueError, match="levels must be at least 2"):
        StructuredConfig("obs", flops_ratio=0.5, levels=1).check()
    StructuredConfig("obs", params_ratio=0.5).check()
    assert StructuredConfig("obs", params_ratio=0.5).kind == "second_order"
    model = resnet()
    with pytest.raises(ValueError, match="target_speedup must be above 1"):  # checked before the graph is traced
        prune_channels(model, SIZE, StructuredConfig("l1", target_speedup=0.5))
