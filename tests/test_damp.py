"""The Fisher's dampening: absolute (--damp) or relative to each layer's mean Fisher diagonal
(--relative_damp, the default), the same in both accumulations; bad values and layers without a scale."""

import copy

import pytest
import torch
from conftest import load_script, random_batches, tiny_vit_config
from transformers import ViTForImageClassification

from cap_hf import Pruner, PruningConfig, find_targets
from cap_hf.config import DAMP_ESTIMATE_ROWS, SINGULAR_DAMP_FACTOR
from cap_hf.engine.collect import collect_fisher
from cap_hf.engine.gradients import iter_gradients
from cap_hf.masks import current_masks
from cap_hf.methods import get_method

CAP_DEFAULT = get_method("cap").default_dampening["relative_damp"]  # with at least as many gradients as B


def model_and_batches(num=24, seed=1):
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_vit_config()).eval(), random_batches(num, seed=seed)


def first_gradients(model, targets, batches, count, masks=None):
    rows = {name: [] for name in targets}
    for grads in iter_gradients(model, targets, batches, count, masks=masks):
        for name, g in grads.items():
            rows[name].append(g.double())
    return {name: torch.stack(r) for name, r in rows.items()}


@pytest.mark.parametrize("accumulate", ["sum", "inverse"])
def test_relative_damp_is_a_fraction_of_each_layers_mean_fisher_diagonal(accumulate):
    model, batches = model_and_batches()
    targets = find_targets(model)
    m, fraction = len(batches), 0.1
    fishers = collect_fisher(model, targets, batches, m, 16, grad_chunk_size=32, accumulate=accumulate,
                             relative_damp=fraction)
    grads = first_gradients(model, targets, batches, m)
    damps = fishers["block"].damps
    for name, g in grads.items():
        expected = fraction * float(g[:DAMP_ESTIMATE_ROWS].square().mean())  # the first 16 gradients only
        assert damps[name] == pytest.approx(expected, rel=1e-5), name
        assert expected != pytest.approx(fraction * float(g.square().mean()), rel=1e-3)  # not all 24: a real check
    # layers differ by orders of magnitude in their gradients: one absolute value could not suit them all
    assert max(damps.values()) / min(damps.values()) > 10
    for name in list(targets)[:3]:  # and the inverse is that of damp*I + the mean of g g^T, block by block
        blocks = grads[name].reshape(m, -1, 16).transpose(0, 1)
        eye = torch.eye(16, dtype=torch.float64)
        exact = torch.linalg.inv(damps[name] * eye + blocks.transpose(1, 2) @ blocks / m)
        got = fishers["block"].inverse(name).double()
        assert float((got - exact).abs().max() / exact.abs().max()) < 1e-3, name


def test_relative_damp_counts_only_the_weights_still_kept():
    model, batches = model_and_batches()
    targets = find_targets(model)
    name = "vit.layers.0.mlp.fc1"
    with torch.no_grad():
        weight = targets[name].weight
        weight[:, ::2] = 0  # half of the layer pruned
        pruned_away = copy.deepcopy(model)
        pruned_away.vit.layers[1].mlp.fc1.weight.zero_()  # a layer pruned entirely (fc2 still sees its bias)
        pruned_away.vit.layers[1].mlp.fc1.bias.uniform_(0.5, 1.0)
    masks = current_masks(targets)
    fishers = collect_fisher(model, targets, batches, 16, 16, accumulate="inverse", relative_damp=0.5,
                             masks=masks)
    g = first_gradients(model, targets, batches, 16, masks=masks)[name]
    kept = int(masks[name].sum())
    assert kept == weight.numel() // 2
    assert fishers["block"].damps[name] == pytest.approx(0.5 * float(g.square().sum()) / (16 * kept), rel=1e-5)
    # a layer with no weight left has nothing to score: it gets a dampening of 1, no error
    gone = find_targets(pruned_away)
    fishers = collect_fisher(pruned_away, gone, batches, 16, 16, accumulate="inverse", relative_damp=0.5,
                             masks=current_masks(gone))
    assert fishers["block"].damps["vit.layers.1.mlp.fc1"] == 1.0
    assert fishers["block"].damps["vit.layers.1.mlp.fc2"] != 1.0


def test_a_layer_without_gradient_has_no_relative_scale_and_the_error_names_it():
    model, batches = model_and_batches()
    with torch.no_grad():  # nothing reaches fc1's output any more: its gradient is exactly zero
        model.vit.layers[1].mlp.fc2.weight.zero_()
    targets = find_targets(model, ignore=r".*layers\.1\.mlp\.fc2")
    with pytest.raises(ValueError, match=r"Layer vit\.layers\.1\.mlp\.fc1 got all-zero gradients.*--ignore.*--damp"):
        collect_fisher(model, targets, batches, 16, 16, accumulate="inverse", relative_damp=1e-2,
                       masks=current_masks(targets))
    # an absolute dampening still works on it (every weight of it then scores alike)
    fishers = collect_fisher(model, targets, batches, 16, 16, accumulate="inverse", damp=1e-4)
    assert fishers["block"].damps["vit.layers.1.mlp.fc1"] == 1e-4


def test_each_method_has_its_default_also_in_a_sweep(caplog):
    """Methods compared in one Pruner each get their own default dampening (one gradient pass per dampening),
    so a sweep gives every method the pruned model it gives alone; a given dampening serves them all."""
    model, batches = model_and_batches()
    cfg = PruningConfig(sparsity=0.7, num_grads=16, grad_batch_size=4, fisher_block_size=16, grad_chunk_size=5)
    assert cfg.dampening == {"damp": None, "relative_damp": CAP_DEFAULT}  # cap: relative
    # fewer gradients than the block size: singular Fisher blocks get SINGULAR_DAMP_FACTOR x the default
    assert cfg.replace(num_grads=15).dampening == {"damp": None, "relative_damp": SINGULAR_DAMP_FACTOR * CAP_DEFAULT}
    assert cfg.replace(num_grads=15, relative_damp=0.5).dampening["relative_damp"] == 0.5  # a given value stays
    assert cfg.replace(num_grads=15, method="obs").dampening == {"damp": 1e-7, "relative_damp": None}
    assert cfg.replace(method="obs").dampening == {"damp": 1e-7, "relative_damp": None}  # obs: absolute
    swept = {}
    with caplog.at_level("INFO"), Pruner(model, cfg, ["obs", "cap", "magnitude"]) as pruner:
        pruner.prepare(batches)
        assert [names for _, names in pruner.passes] == [["cap", "magnitude"], ["obs"]]  # the recipe's first
        for method in ("obs", "cap", "magnitude"):
            swept[method] = copy.deepcopy(model)
            pruner.apply(0.7, method, model=swept[method])
        assert pruner.fisher_seconds_of("obs") > 0 and pruner.fisher_seconds_of("magnitude") == 0
    assert "one gradient pass per dampening" in caplog.text
    assert set(pruner.damps["obs"].values()) == {1e-7}
    targets = find_targets(model)
    grads = first_gradients(model, targets, batches, 5)  # grad_chunk_size 5: the first chunk sets the scale
    for name, g in grads.items():
        assert pruner.damps["cap"][name] == pytest.approx(CAP_DEFAULT * float(g.square().mean()), rel=1e-5)
    for method in ("obs", "cap"):  # alone, each method gives the model it gave in the sweep
        alone = copy.deepcopy(model)
        with Pruner(alone, cfg.replace(method=method)) as single:
            single.prepare(batches)
            single.apply(0.7)
        for name in targets:
            assert torch.equal(dict(alone.named_modules())[name].weight,
                               dict(swept[method].named_modules())[name].weight), (method, name)
    given = cfg.replace(damp=3e-6)  # a given dampening serves every method: one pass
    assert given.dampening == {"damp": 3e-6, "relative_damp": None}
    caplog.clear()
    with caplog.at_level("INFO"), Pruner(copy.deepcopy(model), given, ["obs", "cap"]) as pruner:
        pruner.prepare(batches)
        assert len(pruner.passes) == 1
    assert {v for damps in pruner.damps.values() for v in damps.values()} == {3e-6}
    assert "one gradient pass per dampening" not in caplog.text


def test_dampening_values_are_checked_and_described():
    for bad in ({"damp": 0.0}, {"damp": -1e-7}, {"relative_damp": 0.0}, {"relative_damp": float("nan")},
                {"fastcap_damp": -1.0}):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=rf"{name} must be a positive number"):
            PruningConfig(**bad)
    with pytest.raises(ValueError, match=r"damp=1e-08 \(absolute\) and relative_damp=0.01 are both set; give one"):
        PruningConfig(damp=1e-8, relative_damp=1e-2)
    assert PruningConfig(damp=1e-8).describe_dampening() == "1e-08 (absolute)"
    assert PruningConfig(relative_damp=0.1).describe_dampening() == "0.1 x each layer's mean Fisher diagonal"
    assert PruningConfig(method="fastcap").describe_dampening().endswith("(FastCAP)")
    assert PruningConfig(method="magnitude").describe_dampening() == "none (no Fisher)"
    # a recipe of an earlier cap_hf (damp always written, absolute) keeps its meaning
    assert PruningConfig.from_dict({"method": "cap", "damp": 1e-7}).dampening["damp"] == 1e-7


def test_oneshot_script_refuses_both_dampenings_before_loading(tmp_path):
    oneshot = load_script("oneshot")
    with pytest.raises(SystemExit, match="give one of them"):
        oneshot.main(["--model_name_or_path", str(tmp_path / "missing"), "--dataset_name", str(tmp_path),
                      "--output_dir", str(tmp_path / "out"), "--damp", "1e-8", "--relative_damp", "1e-2"])
    assert not (tmp_path / "out").exists()
