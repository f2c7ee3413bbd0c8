"""Second-order structured pruning (cap_hf.structured: greedy.py, curvature.py, allocate.py, second_order.py)."""

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import assert_cap_on_top, random_batches, run_script, tiny_resnet, tiny_vit_config
from transformers import AutoModelForImageClassification, ViTForImageClassification

from cap_hf.engine.plan import MemoryBudgetError
from cap_hf.modeling import PrunedViTForImageClassification
from cap_hf.structured.allocate import allocate, kept_widths
from cap_hf.structured.curvature import find_structures, hessians
from cap_hf.structured.greedy import greedy_removal, inverse_curvature
from cap_hf.structured.groups import ChannelGraph
from cap_hf.structured.measure import count_macs, count_parameters
from cap_hf.structured.second_order import prune_second_order


def spd(d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * d, d, generator=gen, dtype=torch.float64)
    return x.T @ x / (3 * d)


def test_greedy_removal_equals_the_joint_obs_solution_of_the_removed_columns():
    d, unit = 12, 3
    h = spd(d)
    w = torch.randn(5, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inverse = torch.linalg.inv(h)
    structures = torch.arange(d).reshape(-1, unit)
    removal = greedy_removal([w], [inverse], [structures], stop=2)
    cols = structures[removal.order].reshape(-1)
    block = torch.linalg.inv(inverse[cols][:, cols])
    joint_error = float(torch.einsum("rq,qp,rp->", w[:, cols], block, w[:, cols]))
    assert removal.errors[2] == pytest.approx(joint_error, rel=1e-9)
    expected = w - w[:, cols] @ block @ inverse[cols]
    torch.testing.assert_close(removal.weights[0], expected, rtol=1e-9, atol=1e-10)
    assert torch.all(removal.weights[0][:, cols] == 0)
    # the first choice is the cheapest single structure
    singles = [float(torch.einsum("rq,qp,rp->", w[:, q], torch.linalg.inv(inverse[q][:, q]), w[:, q])) for q in structures]
    assert removal.order[0] == int(np.argmin(singles)) and removal.errors[1] == pytest.approx(min(singles))


def test_a_structure_read_by_several_layers_costs_the_sum_of_their_errors_each_compensated_on_its_own():
    """A residual-stream channel: each reader's weights are its own closed-form OBS solution for the removed
    columns, and the error is the sum of the readers' errors over their scales."""
    d = 8
    readers = [(torch.randn(4, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64), spd(d, 3), 2.0),
               (torch.randn(6, 2 * d + 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64),
                spd(2 * d + 1, 5), 0.5)]
    structures = [torch.arange(d).reshape(-1, 1), torch.arange(2 * d).reshape(-1, 2)]  # 1 and 2 columns a channel
    inverses = [torch.linalg.inv(h) for _, h, _ in readers]
    removal = greedy_removal([w for w, _, _ in readers], inverses, structures, stop=3,
                             scales=[scale for _, _, scale in readers])
    total = 0.0
    for (w, _, scale), inverse, q, new in zip(readers, inverses, structures, removal.weights, strict=True):
        cols = q[removal.order].reshape(-1)
        block = torch.linalg.inv(inverse[cols][:, cols])
        total += float(torch.einsum("rq,qp,rp->", w[:, cols], block, w[:, cols])) / scale
        torch.testing.assert_close(new, w - w[:, cols] @ block @ inverse[cols], rtol=1e-9, atol=1e-10)
    assert removal.errors[3] == pytest.approx(total, rel=1e-9)
    singles = [sum(float(torch.einsum("rq,qp,rp->", w[:, q[c]], torch.linalg.inv(inverse[q[c]][:, q[c]]), w[:, q[c]]))
                   / scale for (w, _, scale), inverse, q in zip(readers, inverses, structures, strict=True))
               for c in range(d)]
    assert removal.order[0] == int(np.argmin(singles))


def test_the_database_error_is_the_layers_reconstruction_error_on_the_calibration_inputs():
    """The Hessian from the hooks (im2col, the batch norm's mean as a column) and the greedy error agree with
    the reconstruction error of the updated convolution measured on the very inputs it saw."""
    model = tiny_resnet()
    graph = ChannelGraph(model, 16)
    s = next(s for s in find_structures(graph) if s.readers[0].module.kernel_size == (3, 3))
    reader = s.readers[0]
    batches = random_batches(4, size=16)
    inputs = []
    hook = reader.module.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    h, seen = hessians(model, [s], batches)
    hook.remove()
    assert seen == 16
    removal = greedy_removal([reader.weight(model)], [inverse_curvature(h[reader.name], 1e-12)], [reader.columns], stop=2)
    conv, norm = reader.module, model.get_submodule(reader.shift[1])
    x = torch.cat(inputs)
    new = removal.weights[0]
    before = torch.nn.functional.conv2d(x, conv.weight, None, conv.stride, conv.padding) - norm.running_mean[:, None, None]
    after = torch.nn.functional.conv2d(x, new[:, :-1].reshape(conv.weight.shape).float(), None, conv.stride,
                                       conv.padding) + new[:, -1, None, None].float()
    positions = before.shape[0] * before.shape[2] * before.shape[3]
    measured = float(((after - before) ** 2).sum().detach()) / positions
    assert removal.errors[2] == pytest.approx(measured, rel=1e-3)


def test_allocate_finds_the_least_error_within_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(20):
        costs = [np.sort(rng.uniform(1, 10, 4)) for _ in range(3)]
        errors = [np.sort(rng.uniform(0, 5, 4))[::-1] for _ in range(3)]
        budget = rng.uniform(8, 25)
        picked = allocate(costs, errors, budget, buckets=100_000)
        feasible = [(sum(e[o] for e, o in zip(errors, combo, strict=True)), combo) for combo in itertools.product(range(4), repeat=3)
                    if sum(c[o] for c, o in zip(costs, combo, strict=True)) <= budget]
        if not feasible:
            assert picked is None
            continue
        assert sum(c[o] for c, o in zip(costs, picked, strict=True)) <= budget
        assert sum(e[o] for e, o in zip(errors, picked, strict=True)) == pytest.approx(min(feasible)[0], abs=1e-3)


def test_allocate_with_streams_keeps_each_stream_at_one_width_and_finds_the_least_error():
    """Units that read or write residual streams: brute force over every unit option whose stream widths agree."""
    rng = np.random.default_rng(1)
    for _ in range(6):
        widths = [2, 3, 2]  # options of three streams
        depends = [(), (0,), (0, 1), (1,), (1, 2), (2,)]
        costs, errors, links = [], [], []
        for d in depends:
            own = int(rng.integers(1, 3))
            combos = list(itertools.product(range(own), *[range(widths[k]) for k in d]))
            link = np.full((len(combos), 3), -1)
            for o, combo in enumerate(combos):
                for k, a in zip(d, combo[1:], strict=True):
                    link[o, k] = a
            costs.append(rng.uniform(1, 10, len(combos)))
            errors.append(rng.uniform(0, 5, len(combos)))
            links.append(link)
        stream_errors = [rng.uniform(0, 3, w) for w in widths]
        budget = rng.uniform(15, 40)
        picked = allocate(costs, errors, budget, buckets=50_000, stream_errors=stream_errors, stream_options=links)
        best = None
        for combo in itertools.product(*[range(len(c)) for c in costs]):
            chosen = np.max([links[u][o] for u, o in enumerate(combo)], axis=0)
            if any(np.any((links[u][o] >= 0) & (links[u][o] != chosen)) for u, o in enumerate(combo)):
                continue
            if sum(costs[u][o] for u, o in enumerate(combo)) > budget:
                continue
            total = sum(errors[u][o] for u, o in enumerate(combo)) + sum(e[a] for e, a in zip(stream_errors, chosen, strict=True))
            best = total if best is None else min(best, total)
        if best is None:
            assert picked is None
            continue
        chosen = np.max([links[u][o] for u, o in enumerate(picked)], axis=0)
        assert all(np.all((links[u][o] < 0) | (links[u][o] == chosen)) for u, o in enumerate(picked))
        assert sum(costs[u][o] for u, o in enumerate(picked)) <= budget
        total = sum(errors[u][o] for u, o in enumerate(picked)) + sum(e[a] for e, a in zip(stream_errors, chosen, strict=True))
        assert total == pytest.approx(best, abs=1e-3)


def test_kept_widths():
    assert kept_widths(3, 16) == [1, 2, 3]
    widths = kept_widths(768, 16, round_to=8)
    assert widths[-1] == 768 and all(w % 8 == 0 and w > 0 for w in widths) and len(widths) == 16


@pytest.mark.parametrize("method", ["obs", "cap"])
def test_a_flops_target_gives_a_smaller_vit_closer_to_the_dense_one_than_removal_without_compensation(method):
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_vit_config(intermediate_size=128)).eval()
    batches = random_batches(32, batch_size=4 if method == "obs" else 1)
    small, run = prune_second_order(model, 8, batches, method, flops_ratio=0.6, calibration_samples=128 if method == "obs" else 32)
    assert count_macs(small, 8) <= 0.6 * count_macs(model, 8)
    assert isinstance(small, PrunedViTForImageClassification) and run.removed > 0
    assert run.results()["second_order"]["curvature"] == method
    # the same channels removed without the weight update
    from cap_hf.structured.groups import remove_channels
    plain = remove_channels(model, ChannelGraph(model, 8), run.plan)
    x = torch.cat([b["pixel_values"] for b in random_batches(8, seed=5)])
    with torch.no_grad():
        dense, compensated, uncompensated = (m(pixel_values=x).logits for m in (model, small, plain))
    assert float((compensated - dense).pow(2).mean()) < float((uncompensated - dense).pow(2).mean())


def test_a_params_target_on_a_resnet_is_met():
    model = tiny_resnet()
    small, run = prune_second_order(model, 16, random_batches(8, size=16), "obs", params_ratio=0.9, calibration_samples=32)
    assert count_parameters(small) <= 0.9 * count_parameters(model)
    assert run.widths and all(after >= 1 for _, after in run.widths.values())


def test_residual_streams_are_pruned_and_compensated_beyond_what_block_channels_reach(caplog):
    import re

    model = tiny_resnet()
    graph = ChannelGraph(model, 16)
    streams = {g.name for g in graph.groups if g.coupled}
    with pytest.raises(ValueError, match="the lowest reachable is") as refused:
        prune_second_order(model, 16, random_batches(16, size=16), "obs", flops_ratio=0.01, calibration_samples=64,
                           uncoupled_only=True)
    floor = float(re.search(r"lowest reachable is ([0-9.e-]+?)\.?$", str(refused.value)).group(1))
    target = 0.8 * floor
    small, run = prune_second_order(model, 16, random_batches(16, size=16), "obs", flops_ratio=target, calibration_samples=64)
    assert count_macs(small, 16) <= target * count_macs(model, 16)
    assert any(run.widths[name][1] < run.widths[name][0] for name in streams)
    from cap_hf.structured.groups import remove_channels
    plain = remove_channels(model, graph, run.plan)
    x = torch.cat([b["pixel_values"] for b in random_batches(8, size=16, seed=5)])
    with torch.no_grad():
        dense, compensated, uncompensated = (m(pixel_values=x).logits for m in (model, small, plain))
    assert float((compensated - dense).pow(2).mean()) < float((uncompensated - dense).pow(2).mean())
    # one search per weight of the streams' errors; the model kept is the closest to the dense one
    from cap_hf.structured.second_order import STREAM_WEIGHTS, output_distance
    searches = run.results()["second_order"]["searches"]
    assert [step["stream_weight"] for step in searches] == list(STREAM_WEIGHTS)
    kept = [step for step in searches if step["kept"]]
    assert len(kept) == 1 and kept[0]["output_distance"] == min(step["output_distance"] for step in searches)
    held = [b["pixel_values"] for b in random_batches(16, size=16)]
    assert kept[0]["output_distance"] == pytest.approx(output_distance(model, small, held), rel=1e-6)
    assert output_distance(model, model, held) == 0.0
    # a stream whose reader (the classifier, one row an image) needs more images than given is kept whole
    last = next(g for g in graph.groups if g.coupled and any(c.name.startswith("classifier") for c in g.consumers))
    with caplog.at_level("WARNING"):
        _, few = prune_second_order(model, 16, random_batches(16, size=16), "obs", flops_ratio=0.8,
                                    calibration_samples=last.size)
    assert f"{last.name} is kept whole" in caplog.text and last.index not in few.plan
    # a ViT's stream passes through LayerNorms: kept whole
    vit = ViTForImageClassification(tiny_vit_config()).eval()
    assert not any(s.stream for s in find_structures(ChannelGraph(vit, 8)))


def test_a_backbone_is_pruned_without_labels_and_compared_by_its_features():
    """ResNetModel: no logits; its last stream (its output) may shrink, so the choice among the streams' weights
    compares the features by linear CKA."""
    from cap_hf.structured.second_order import output_distance

    model = tiny_resnet(classifier=False)
    batches = [{"pixel_values": b["pixel_values"]} for b in random_batches(16, size=16)]
    small, run = prune_second_order(model, 16, batches, "obs", flops_ratio=0.5, calibration_samples=64)
    assert count_macs(small, 16) <= 0.5 * count_macs(model, 16)
    held = [b["pixel_values"] for b in batches]
    distance = output_distance(model, small, held)
    assert 0.0 <= distance < 1.0
    with torch.no_grad():
        widths = model(pixel_values=held[0]).pooler_output.shape[1], small(pixel_values=held[0]).pooler_output.shape[1]
    if widths[0] == widths[1]:  # same width: the relative error of the pooled features
        assert distance == pytest.approx(next(s["output_distance"] for s in run.search if s["kept"]), rel=1e-6)


def test_bad_requests_are_refused_before_the_curvature():
    model = tiny_resnet()

    def never():
        raise AssertionError("calibration data read")

    with pytest.raises(ValueError, match="the lowest reachable is"):
        prune_second_order(model, 16, never, "obs", flops_ratio=0.05, calibration_samples=64)
    with pytest.raises(ValueError, match="it needs at least"):
        prune_second_order(model, 16, never, "obs", flops_ratio=0.9, calibration_samples=1)
    with pytest.raises(MemoryBudgetError, match="give at least"):
        prune_second_order(model, 16, never, "obs", flops_ratio=0.9, calibration_samples=64, max_memory_gb=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        prune_second_order(model, 16, never, "obs", flops_ratio=0.9, params_ratio=0.9, calibration_samples=64)
    with pytest.raises(ValueError, match="does not support"):
        from transformers import ConvNextConfig, ConvNextForImageClassification
        convnext = ConvNextForImageClassification(ConvNextConfig(num_channels=1, hidden_sizes=[8, 16], depths=[1, 1],
                                                                 num_stages=2)).eval()
        prune_second_order(convnext, 16, never, "obs", flops_ratio=0.9, calibration_samples=64)


def test_structured_prune_script_obs_then_cap_on_top(digits_model, digits_dir, tmp_path):
    out = tmp_path / "obs"
    run_script("structured_prune.py", "--method", "obs", "--model_name_or_path", digits_model, "--flops_ratio", 0.6,
               "--dataset_name", digits_dir, "--output_dir", out, "--latency_batch_sizes", "1,8",
               "--latency_repeats", 3, "--calibration_samples", 128)
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "obs" and results["target_met"] and results["target"]["achieved"] <= 0.6
    assert results["second_order"]["calibration"] == 128 and results["accuracy_pruned"] > 0.3
    card = (out / "README.md").read_text()
    assert "layer-wise Hessian" in card and "kurtic2023ziplm" in card
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.num_parameters() == results["params_pruned"]
    assert_cap_on_top(out, digits_dir, tmp_path / "obs+cap", num_grads=16)


@pytest.mark.parametrize("extra, message", [
    (["--flops_ratio", "0.5"], "needs calibration images"),
    (["--pruning_ratio", "0.5", "--dataset_name", "DATA"], "instead of --pruning_ratio"),
    (["--flops_ratio", "0.5", "--dataset_name", "DATA", "--normalize", "mean"], "is DFPC's"),
    (["--flops_ratio", "0.5", "--dataset_name", "DATA", "--calibration_samples", "100000"], "more than the"),
])
def test_structured_prune_script_second_order_bad_input(digits_model, digits_dir, tmp_path, extra, message):
    out = tmp_path / "out"
    extra = [str(digits_dir) if e == "DATA" else e for e in extra]
    result = run_script("structured_prune.py", "--method", "obs", "--model_name_or_path", digits_model,
                        "--output_dir", out, *extra, check=False)
    assert result.returncode != 0 and message in result.stderr
    assert not out.exists()
