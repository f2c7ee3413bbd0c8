"""The engine: one path for every method, with any number of layer groups and any store; the plain
reference; memory budgets, replayed calibration data, bad input."""

import copy
import logging

import pytest
import torch
from conftest import random_batches, tiny_vit_config
from reference import RankOneFisherInverse, reference_eliminate, reference_obs, reference_select
from transformers import ViTForImageClassification

from cap_hf import MemoryBudgetError, Pruner, PruningConfig, find_targets, oneshot_prune
from cap_hf.engine.calibration import Replay
from cap_hf.engine.collect import collect_fisher
from cap_hf.engine.fisher import BlockFisher
from cap_hf.engine.memory import GB, PhaseProfiler, rss_bytes
from cap_hf.engine.selection import select_pruned
from cap_hf.io.data import calibration_loader
from cap_hf.methods.cap import greedy_eliminate, pack_traces, unpack_weights


def config(method="cap", sparsity=0.7, **kw):
    values = dict(method=method, sparsity=sparsity, num_grads=12, grad_batch_size=4, fisher_block_size=16,
                  damp=1e-4, grad_chunk_size=5, elimination_chunk_size=7)
    values.update(kw)
    return PruningConfig(**values)


def fresh_model(seed=1, **overrides):
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_vit_config(**overrides)).eval()


def prune_copy(model, cfg, batches, groups=1, store=None, methods=None, sparsity=None):
    """A pruned copy of `model`: groups=1 is the all-at-once plan, groups='many' one layer group per
    Fisher-sized layer (a budget with max_group_bytes=1)."""
    pruned = copy.deepcopy(model)
    if groups != 1:
        cfg = cfg.replace(max_memory_gb=64)
    with Pruner(pruned, cfg, methods, max_group_bytes=1 if groups != 1 else None, store=store) as pruner:
        plan = pruner.prepare(batches)
        pruner.apply(sparsity)
    return find_targets(pruned, cfg.targets, cfg.ignore), plan


def assert_same_weights(a, b, atol=1e-6):
    for name in a:
        wa, wb = a[name].weight.detach(), b[name].weight.detach()
        assert torch.equal(wa == 0, wb == 0), f"masks differ in {name}"
        torch.testing.assert_close(wa, wb, rtol=1e-5, atol=atol, msg=name)


class CountingBatches:
    """A re-iterable list of batches that counts how many were read."""

    def __init__(self, batches):
        self.batches, self.read = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.read += 1
            yield batch


# ---- the reference ------------------------------------------------------------------------------------


def test_rank_one_reference_equals_batched_fisher_inverse():
    gen = torch.Generator().manual_seed(0)
    m, d, block, damp = 50, 48, 8, 1e-3
    grads = torch.randn(m, d, generator=gen, dtype=torch.float64) * 0.1
    reference = RankOneFisherInverse(d, block, m, damp, dtype=torch.float64)
    for g in grads:
        reference.update(g)
    fisher = BlockFisher({"w": d}, block, dtype=torch.float64)
    for start in range(0, m, 7):  # chunked sums, as collect_fisher does
        fisher.add({"w": grads[start:start + 7]})
    closed = fisher.inverse("w", damp)
    in_place = fisher.pop_inverse("w", damp, chunk_blocks=2)
    assert "w" not in fisher.sums
    torch.testing.assert_close(in_place, closed, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(reference.inverse, closed, rtol=1e-7, atol=1e-7)


def test_inverse_accumulation_keeps_the_rank_one_accuracy_at_tiny_damp():
    """With damp tiny next to the gradients (condition ~1e6, as for ViTs at damp 1e-7), forming the fp32
    sum and inverting it loses digits; the chunked Woodbury update of the inverse keeps the rank-1
    reference's accuracy."""
    gen = torch.Generator().manual_seed(0)
    m, d, block, damp, rank = 96, 64 * 32, 32, 1e-7, 6
    # real gradient blocks have a few large directions and many below damp (low effective rank)
    basis = torch.randn(d // block, rank, block, generator=gen, dtype=torch.float64) * 1e-2
    mixing = torch.randn(m, d // block, rank, generator=gen, dtype=torch.float64)
    grads = torch.einsum("mnr,nrb->mnb", mixing, basis).reshape(m, d)
    grads += 1e-6 * torch.randn(m, d, generator=gen, dtype=torch.float64)
    truth = BlockFisher({"w": d}, block, dtype=torch.float64)
    truth.add({"w": grads})
    truth = truth.inverse("w", damp)
    errors = {}
    for mode in ("sum", "inverse"):
        extra = {"accumulate": "inverse", "damp": damp, "num_grads": m} if mode == "inverse" else {}
        fisher = BlockFisher({"w": d}, block, **extra)
        for start in range(0, m, 32):
            fisher.add({"w": grads[start:start + 32].float()})
        errors[mode] = float((fisher.inverse("w", damp).double() - truth).abs().max() / truth.abs().max())
    reference = RankOneFisherInverse(d, block, m, damp)
    for g in grads:
        reference.update(g.float())
    errors["rank-1"] = float((reference.inverse.double() - truth).abs().max() / truth.abs().max())
    assert errors["inverse"] < 1e-4 and errors["rank-1"] < 1e-4, errors
    assert errors["sum"] > 10 * errors["inverse"], errors
    with pytest.raises(RuntimeError, match="built for num_grads=96"):
        partial = BlockFisher({"w": d}, block, accumulate="inverse", damp=damp, num_grads=m)
        partial.add({"w": grads[:8].float()})
        partial.inverse("w", damp)


def test_reference_elimination_and_threshold_equal_the_library():
    gen = torch.Generator().manual_seed(2)
    size, n = 8, 12
    a = torch.randn(n, size, 3 * size, generator=gen, dtype=torch.float64)
    inverse = torch.linalg.inv(a @ a.transpose(1, 2) / size + 0.05 * torch.eye(size, dtype=torch.float64))
    w = torch.randn(n, size, generator=gen, dtype=torch.float64)
    w[0, :3] = 0.0  # already pruned
    losses, ref_traces = reference_eliminate(w, inverse.clone())
    traces = torch.empty(size + 1, n, size, dtype=torch.float64)
    scores, order = greedy_eliminate(w.clone(), inverse.clone(), traces=traces)
    torch.testing.assert_close(scores, losses)
    torch.testing.assert_close(traces, ref_traces)
    # packed snapshots give every snapshot back
    packed = pack_traces(traces, order)
    assert packed.shape == (n, size * (size + 1) // 2)
    for k in range(size + 1):
        counts = torch.full((n,), k)
        torch.testing.assert_close(unpack_weights(packed, order, counts), traces[k])
    # one global threshold: the same per-block counts
    zero = w == 0
    scores[zero] = float("-inf")
    for sparsity in (0.3, 0.55, 0.9):
        mine = select_pruned({"w": scores}, sparsity, "global")["w"].sum(dim=1)
        assert torch.equal(mine, reference_select({"w": losses}, {"w": zero}, sparsity)["w"].sum(dim=1))


# ---- one engine: every method, any number of groups, any store ------------------------------------------

METHOD_CONFIGS = {
    "magnitude": config("magnitude"),
    "magnitude-uniform": config("magnitude", sparsity_distribution="uniform"),
    "obs": config("obs", 0.6),
    "cap": config("cap"),
    "cap-uniform": config("cap", sparsity_distribution="uniform"),
    "fastcap": config("fastcap", 0.6),
    "magnitude-2:4": config("magnitude", 0.5, structure="2:4"),
    "cap-2:4": config("cap", 0.5, structure="2:4"),
}
_BASELINES = {}


def baseline(name):
    """The all-at-once step with results on the device: what every other combination must give."""
    if name not in _BASELINES:
        _BASELINES[name] = prune_copy(fresh_model(), METHOD_CONFIGS[name], random_batches(12))[0]
    return _BASELINES[name]


@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
@pytest.mark.parametrize(("groups", "store"), [(1, "host"), (1, "disk"), ("many", "device"), ("many", "host"),
                                               ("many", "disk")])
def test_every_method_gives_the_same_result_with_any_groups_and_store(tmp_path, name, groups, store):
    cfg = METHOD_CONFIGS[name].replace(offload_dir=str(tmp_path))
    targets, plan = prune_copy(fresh_model(), cfg, random_batches(12), groups, store)
    assert plan.store == store
    if groups != 1 and cfg.needs_fisher:
        assert len(plan.groups) == 8  # the largest layer per group: fc1, fc2 alone, attention in pairs
        assert plan.groups[0][0] == list(targets)[-1]  # output side first
    assert not list(tmp_path.iterdir())  # the offload folder is removed
    assert_same_weights(targets, baseline(name), atol=0)
    expected = cfg.fixed_sparsity or cfg.sparsity
    total = sum(m.weight.numel() for m in targets.values())
    assert sum(int((m.weight == 0).sum()) for m in targets.values()) == pytest.approx(expected * total, abs=len(targets))


def test_cap_and_obs_equal_the_plain_reference_end_to_end():
    """The engine on two layers == the plain rank-1 reference run in fp64 on the same gradients."""
    model = fresh_model()
    batches = random_batches(12)
    names = ["vit.layers.1.attention.q_proj", "vit.layers.1.mlp.fc2"]
    original = {n: m.weight.detach().clone() for n, m in find_targets(model, names).items()}
    targets = find_targets(model, names)
    inverses = {n: RankOneFisherInverse(m.weight.numel(), 16, 12, 1e-4, dtype=torch.float64)
                for n, m in targets.items()}
    for batch in batches:  # the reference's own gradient loop
        logits = model(pixel_values=batch["pixel_values"]).logits
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        for n, g in zip(targets, torch.autograd.grad(loss, [m.weight for m in targets.values()]), strict=True):
            inverses[n].update(g.reshape(-1).double())
    blocks = {n: w.reshape(-1, 16).double() for n, w in original.items()}
    zeros = {n: w == 0 for n, w in blocks.items()}
    losses, traces = {}, {}
    for n, w in blocks.items():
        losses[n], traces[n] = reference_eliminate(w, inverses[n].inverse.clone())
    counts = {n: mask.sum(dim=1) for n, mask in reference_select(losses, zeros, 0.6).items()}
    expected = {"cap": {n: traces[n][counts[n], torch.arange(counts[n].numel())] for n in blocks}}
    scores = {n: w.pow(2) / (2 * inverses[n].inverse.diagonal(dim1=1, dim2=2)) for n, w in blocks.items()}
    masks = reference_select(scores, zeros, 0.6)
    expected["obs"] = {n: reference_obs(blocks[n], inverses[n].inverse, masks[n]) for n in blocks}
    for method in ("cap", "obs"):
        for groups in (1, "many"):
            pruned, _ = prune_copy(model, config(method, 0.6, targets=names), batches, groups)
            for n, m in pruned.items():
                want = expected[method][n].reshape(m.weight.shape).float()
                assert torch.equal(m.weight == 0, want == 0), (method, n)
                torch.testing.assert_close(m.weight.detach(), want, rtol=1e-4, atol=1e-5)


def test_a_sweep_of_several_methods_takes_one_gradient_pass_per_group():
    """With a budget, magnitude + OBS + CAP + FastCAP share every group's pass over the calibration data, and
    each method's result is what it gets alone."""
    model = fresh_model()
    batches = CountingBatches(random_batches(12))
    methods = ["magnitude", "obs", "cap", "fastcap"]
    with Pruner(model, config(max_memory_gb=64), methods, max_group_bytes=1) as pruner:
        plan = pruner.prepare(batches)
        assert len(plan.groups) == 8
        assert batches.read == len(plan.groups) * 12 + 1  # + the probe batch of the memory plan
        for method in methods:
            pruned = copy.deepcopy(model)
            pruner.apply(0.6, method, model=pruned)
            alone, _ = prune_copy(model, config(method, 0.6), random_batches(12))
            assert_same_weights(find_targets(pruned), alone, atol=0)
        with pytest.raises(ValueError, match="Several methods were prepared"):
            pruner.apply(0.6)


def test_prepare_once_apply_at_several_sparsities_in_groups():
    model = fresh_model()
    batches = random_batches(12)
    with Pruner(model, config(max_memory_gb=64), max_group_bytes=1, store="disk") as pruner:
        pruner.prepare(batches)
        for sparsity in (0.5, 0.8):
            pruned = copy.deepcopy(model)
            pruner.apply(sparsity, model=pruned)
            expected, _ = prune_copy(model, config(sparsity=sparsity), batches)
            assert_same_weights(find_targets(pruned), expected, atol=0)


def test_oneshot_prune_with_a_budget_plans_groups_and_matches(caplog):
    model = fresh_model()
    batches = random_batches(12)
    expected = copy.deepcopy(model)
    oneshot_prune(expected, config(), batches)
    with caplog.at_level(logging.INFO, logger="cap_hf.engine.pruner"):
        report = oneshot_prune(model, config(max_memory_gb=64), batches)
    assert "memory budget 64.00 GB" in caplog.text
    assert report.overall == pytest.approx(0.7, abs=1e-3)
    assert_same_weights(find_targets(model), find_targets(expected), atol=0)


def test_without_a_budget_a_step_that_does_not_fit_runs_in_groups(caplog, monkeypatch):
    """No max_memory_gb: the step runs all at once when it fits in the memory available, and in layer groups
    within that memory when it does not (instead of running out of memory after the gradient pass)."""
    import cap_hf.engine.plan as plan_module
    from cap_hf.engine.memory import device_memory_bytes

    model, batches = fresh_model(), random_batches(12)
    expected = copy.deepcopy(model)
    monkeypatch.setattr(plan_module, "all_at_once_bytes", lambda *a: 40 * GB)  # as if DeiT-Base
    monkeypatch.setattr(plan_module, "available_bytes", lambda device: 64 * GB)
    with caplog.at_level(logging.INFO):
        oneshot_prune(expected, config(), batches)
    assert "groups" not in caplog.text
    monkeypatch.setattr(plan_module, "available_bytes", lambda device: 20 * GB)
    with caplog.at_level(logging.INFO):
        with Pruner(model, config()) as pruner:
            plan = pruner.prepare(batches)
            pruner.apply()
    assert "pruning the layers in groups within max_memory_gb" in caplog.text
    assert plan.budget_bytes == pytest.approx(0.9 * (device_memory_bytes() + 20 * GB), rel=0.01)
    assert_same_weights(find_targets(model), find_targets(expected), atol=0)
    caplog.clear()
    with caplog.at_level(logging.INFO):  # magnitude has no Fisher: nothing to plan
        oneshot_prune(copy.deepcopy(model), config("magnitude"))
    assert "groups" not in caplog.text


def test_the_all_at_once_estimate_counts_the_fisher_and_the_results():
    from cap_hf.engine.fisher import divisor_block_size
    from cap_hf.engine.plan import MARGIN_BYTES, all_at_once_bytes
    from cap_hf.methods import get_method

    model = fresh_model()
    numels = {n: m.weight.numel() for n, m in find_targets(model).items()}
    blocks = {n: divisor_block_size(v, 16) for n, v in numels.items()}
    fisher = sum(numels.values()) * 4 * 16  # the d*B inverse in fp32

    def estimate(*methods):
        return all_at_once_bytes(numels, blocks, [get_method(m)(config(m)) for m in methods], config()) - MARGIN_BYTES

    assert estimate("cap") > fisher
    assert estimate("obs", "cap") > fisher * (1 + 17 / 32)  # OBS keeps the inverse, CAP its packed snapshots
    assert estimate("magnitude") < fisher / 2  # no Fisher: scores and the threshold, 24 bytes a weight (B=16: 64)


# ---- calibration batches: replayed, and read like training batches -------------------------------------------


def _images(n=24):
    data = random_batches(n, batch_size=1)
    return [{"pixel_values": b["pixel_values"][0], "labels": b["labels"][0]} for b in data]


def test_calibration_loader_gives_the_same_batches_with_two_workers_and_replays():
    dataset = _images()
    passes = {}
    for workers in (0, 2):
        replay = Replay(calibration_loader(dataset, 4, seed=3, num_workers=workers))
        passes[workers] = [[b["labels"].tolist() for b in replay()] for _ in range(2)]
    assert passes[0][0] == passes[0][1] == passes[2][0] == passes[2][1]
    assert len(passes[0][0]) == 6
    assert passes[0][0] != [[b["labels"].tolist() for b in calibration_loader(dataset, 4, seed=4)]][0]


def test_a_step_in_groups_over_a_two_worker_loader_equals_one_without_workers():
    model = fresh_model()
    dataset = _images()
    results = {}
    for workers in (0, 2):
        loader = calibration_loader(dataset, 2, seed=0, num_workers=workers)
        results[workers], plan = prune_copy(model, config(num_grads=12), loader, groups="many")
        assert len(plan.groups) > 1
    assert_same_weights(results[2], results[0], atol=0)


def test_shuffling_dataloader_replays_the_same_batches():
    """A seeded, shuffling DataLoader gives the same batches every group."""
    dataset = _images(12)

    def loader():
        return torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True, drop_last=True,
                                           generator=torch.Generator().manual_seed(0))

    model = fresh_model()
    expected, _ = prune_copy(model, config(num_grads=6), loader())
    pruned, plan = prune_copy(model, config(num_grads=6), loader(), groups="many")
    assert len(plan.groups) > 1
    assert_same_weights(pruned, expected, atol=0)


def test_batches_that_change_between_groups_are_an_error():
    class Fresh:  # new random images on every pass
        def __init__(self):
            self.seed = 0

        def __len__(self):
            return 12

        def __iter__(self):
            self.seed += 1
            return iter(random_batches(12, seed=self.seed))

    model = fresh_model()
    with pytest.raises(ValueError, match="differs between passes"):
        prune_copy(model, config(), Fresh(), groups="many")
    with pytest.raises(ValueError, match="re-iterable"):
        oneshot_prune(model, config(max_memory_gb=64), iter(random_batches(12)))
    report = oneshot_prune(copy.deepcopy(model), config(), iter(random_batches(12)))  # one pass: an iterator is fine
    assert report.overall == pytest.approx(0.7, abs=1e-3)


# ---- bad input ----------------------------------------------------------------------------------------------


def test_budget_that_cannot_be_met_fails_before_any_batch():
    model = fresh_model()
    batches = CountingBatches(random_batches(12))
    with pytest.raises(MemoryBudgetError, match=r"max_memory_gb=0.01 cannot be met.*Raise max_memory_gb"):
        oneshot_prune(model, config(max_memory_gb=0.01), batches)
    assert batches.read == 0
    # a layer whose Fisher alone is larger than what the budget leaves
    big = fresh_model(hidden_size=64, intermediate_size=2048, num_attention_heads=2)  # fc1: 70 MB of Fisher
    budget = (rss_bytes() + 300 * 1024 ** 2) / GB  # 256 MB of it are the fixed margin
    with pytest.raises(MemoryBudgetError, match=r"Fisher of layer vit\.layers\.\d\.mlp\.fc\d.*fisher_block_size"):
        oneshot_prune(big, config(max_memory_gb=budget, fisher_block_size=128), batches)
    assert batches.read == 0
    # the same layer fits a larger budget (OBS: the same Fisher, a quicker kernel)
    report = oneshot_prune(big, config("obs", max_memory_gb=budget + 1, fisher_block_size=128), batches)
    assert report.overall == pytest.approx(0.7, abs=1e-3) and batches.read > 0


def test_max_memory_gb_is_validated():
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="max_memory_gb must be a positive number"):
            PruningConfig(max_memory_gb=bad)
    assert PruningConfig(max_memory_gb=8).max_memory_gb == 8


def test_block_size_that_does_not_divide_a_layer_is_reported(caplog):
    model = fresh_model()  # 32 x 32 and 64 x 32 weights: 48 divides neither
    cfg = config(fisher_block_size=48)
    with caplog.at_level(logging.WARNING, logger="cap_hf.engine.fisher"):
        expected, _ = prune_copy(model, cfg, random_batches(12))
        pruned, plan = prune_copy(model, cfg, random_batches(12), groups="many")
    assert "Fisher block size 48 does not divide 8 layer(s) of 1024 weights -> 64 (vit.layers.0.attention.q_proj" \
        in caplog.text
    assert plan.adjusted["vit.layers.0.attention.q_proj"] == 64 and plan.adjusted["vit.layers.0.mlp.fc1"] == 64
    assert "block size adjusted" in plan.describe()
    assert_same_weights(pruned, expected, atol=0)


def test_more_gradients_than_batches_is_a_clear_error_before_work():
    model = fresh_model()
    batches = CountingBatches(random_batches(3))
    for cfg in (config(), config(max_memory_gb=64)):
        with pytest.raises(ValueError, match="holds 3 batches, but 12 Fisher gradients are needed"):
            oneshot_prune(model, cfg, batches)
    with pytest.raises(ValueError, match="holds 3 batches, but 12 Fisher gradients are needed"):
        collect_fisher(model, find_targets(model), batches, 12, 16)
    assert batches.read == 0


def test_methods_without_calibration_data_and_unknown_methods():
    model = fresh_model()
    with pytest.raises(ValueError, match=r"Methods \['cap'\] need calibration data"):
        oneshot_prune(model, config())
    with pytest.raises(ValueError, match="Unknown pruning method 'sparsegpt'; registered methods: cap, fastcap"):
        Pruner(model, config(), ["cap", "sparsegpt"])
    with Pruner(model, config(), ["cap", "obs"]) as pruner:
        with pytest.raises(RuntimeError, match="Call prepare"):
            pruner.apply(0.5, "cap")
        pruner.prepare(random_batches(12))
        with pytest.raises(ValueError, match="'fastcap' was not prepared; prepared: cap, obs"):
            pruner.apply(0.5, "fastcap")
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            pruner.apply(1.0, "cap")


def test_a_new_method_is_one_registered_class():
    """A method kernel registered by name works everywhere a name is taken, with groups and stores."""
    from cap_hf.methods import METHODS, Layer, PruningMethod, register_method

    @register_method
    class Random(PruningMethod):  # prunes random weights, from stored random scores
        name = "random-test"
        fisher = "block"  # asks for the Fisher to exercise the pass, uses only its shape

        def prepare_layer(self, layer: Layer):
            generator = torch.Generator().manual_seed(len(layer.name))
            scores = torch.rand(layer.weights.shape, generator=generator)
            layer.put("scores", scores)
            assert layer.fisher["block"].shape[1:] == (16, 16)
            return scores

        def apply_layer(self, layer, pruned, sparsity):
            stored = torch.cat(list(layer.chunks("scores")))  # what prepare kept, back from the store
            assert stored[pruned].max() <= stored[~pruned].min()  # the lowest scores go (one global threshold)
            return layer.weights.masked_fill(pruned, 0.0)

    try:
        results = [prune_copy(fresh_model(), config("random-test", 0.4), random_batches(12), groups, store)[0]
                   for groups, store in ((1, "device"), ("many", "disk"))]
        assert_same_weights(results[0], results[1], atol=0)
        total = sum(m.weight.numel() for m in results[0].values())
        assert sum(int((m.weight == 0).sum()) for m in results[0].values()) == round(0.4 * total)
    finally:
        METHODS.pop("random-test")


def test_recipe_of_an_earlier_version_loads_and_says_what_changed(tmp_path, caplog):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: cap\nsparsity: 0.6\ntrace_mode: snapshot\nseed: 3\n")
    with caplog.at_level(logging.WARNING, logger="cap_hf.config"):
        loaded = PruningConfig.load(recipe)
    assert (loaded.sparsity, loaded.calibration_seed) == (0.6, 3)
    assert "'trace_mode' is no longer used" in caplog.text and "packed snapshots" in caplog.text
    with pytest.raises(ValueError, match=r"Unknown PruningConfig keys \['dampening'\]"):
        PruningConfig.from_dict({"dampening": 1e-7})


# ---- measurement ------------------------------------------------------------------------------------------


def test_profiler_reports_phase_time_and_peak():
    profiler = PhaseProfiler()
    try:
        with profiler.phase("big"):
            block = torch.ones(512 * 1024 ** 2 // 4)  # 512 MB, touched, freed before the phase ends
            del block
        with profiler.phase("small"):
            pass
        summary = profiler.summary()
        assert summary["big"]["peak_gb"] > summary["small"]["peak_gb"] + 0.25, summary
        with pytest.raises(RuntimeError, match="do not nest"):
            with profiler.phase("a"), profiler.phase("b"):
                pass
    finally:
        profiler.close()
    model = fresh_model()
    profiler = PhaseProfiler()
    try:
        with Pruner(model, config(max_memory_gb=64), profiler=profiler) as pruner:
            pruner.prepare(random_batches(12))
            pruner.apply()
    finally:
        profiler.close()
    phases = profiler.summary()
    for name in ("plan", "gradients", "fisher", "inversion", "prepare:cap", "selection", "write-back"):
        assert phases[name]["seconds"] > 0 and phases[name]["peak_gb"] > 0, name
    assert phases["gradients"]["calls"] == 12


# ---- training ----------------------------------------------------------------------------------------------


def test_pruning_callback_with_a_budget_matches_the_all_at_once_step():
    from cap_hf.masks import current_masks
    from cap_hf.schedule import SparsitySchedule
    from trainer_plugins import CAPPruningCallback

    data = random_batches(12)
    results = {}
    for budget in (None, 64):
        model = fresh_model()
        callback = CAPPruningCallback(config(max_memory_gb=budget), SparsitySchedule((0,), (0.6,)),
                                      calibration_batches=lambda step, rank: data)
        callback.targets = find_targets(model)
        callback.masks = current_masks(callback.targets)
        callback.prune(model, 0.6, step=0)
        assert callback.history[-1]["num_grads"] == 12
        results[budget] = callback.targets
    assert_same_weights(results[64], results[None], atol=0)


def test_trainer_carries_the_budget_but_not_the_offload_folder(tmp_path):
    """max_memory_gb reaches the callback through the PruningConfig; the local offload folder stays out of the
    recipe written next to the model; a budget that can never be met fails at construction."""
    from cap_hf.trainer import CAPTrainer, CAPTrainingArguments

    args = CAPTrainingArguments(output_dir=str(tmp_path), report_to=[], distill=False)
    pruning = PruningConfig(max_memory_gb=20, offload_dir=str(tmp_path / "off"), fisher_accumulation="sum")
    trainer = CAPTrainer(fresh_model(), args, pruning_config=pruning)
    cfg = trainer.pruning_callback.config
    assert (cfg.max_memory_gb, cfg.offload_dir, cfg.accumulation, cfg.calibration_seed) == (
        20, str(tmp_path / "off"), "sum", args.seed)
    recipe = trainer.recipe()["pruning"]
    assert recipe["max_memory_gb"] == 20 and "offload_dir" not in recipe
    with pytest.raises(MemoryBudgetError, match="max_memory_gb=0.01 cannot be met"):  # before any training
        CAPTrainer(fresh_model(), args, pruning_config=PruningConfig(max_memory_gb=0.01))


