"""Scale of the CAP step: the rank-1 reference, streaming layer groups under a memory budget, bad input."""

import copy
import logging

import pytest
import torch
from conftest import random_batches, tiny_vit_config
from transformers import ViTForImageClassification

from cap_hf import PruningConfig, find_targets, oneshot_prune
from cap_hf.fisher import BlockFisher, collect_fisher
from cap_hf.memory import GB, PhaseProfiler, rss_bytes
from cap_hf.pruners import get_pruner
from cap_hf.pruners.base import select_pruned
from cap_hf.pruners.cap import greedy_eliminate
from cap_hf.reference import RankOneFisherInverse, reference_eliminate, reference_select
from cap_hf.streaming import MemoryBudgetError, StreamingPruner, pack_traces, prune_step, unpack_weights


def config(method="cap", sparsity=0.7, **kw):
    values = dict(method=method, sparsity=sparsity, num_grads=12, grad_batch_size=4, fisher_block_size=16,
                  damp=1e-4, grad_chunk_size=5, elimination_chunk_size=7)
    values.update(kw)
    return PruningConfig(**values)


def fresh_model(seed=1, **overrides):
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_vit_config(**overrides)).eval()


def in_memory_prune(model, cfg, batches):
    targets = find_targets(model)
    fisher = collect_fisher(model, targets, batches, cfg.num_grads, cfg.fisher_block_size,
                            grad_chunk_size=cfg.grad_chunk_size, accumulate=cfg.accumulation, damp=cfg.damp)["block"]
    pruner = get_pruner(cfg)
    pruner.prepare(targets, fisher)
    pruner.apply(targets, cfg.sparsity)
    return targets


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


# ---- streaming layer groups -------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "disk"])
@pytest.mark.parametrize("trace_mode", ["snapshot", "recompute"])
def test_streaming_groups_equal_all_at_once(tmp_path, store, trace_mode):
    model = fresh_model()
    batches = random_batches(12)
    cfg = config(trace_mode=trace_mode)
    expected = in_memory_prune(copy.deepcopy(model), cfg, batches)
    targets = find_targets(model)
    offload = tmp_path / "offload"
    offload.mkdir()
    with StreamingPruner(cfg.replace(max_memory_gb=64, offload_dir=str(offload)), max_group_bytes=1,
                         store=store) as pruner:
        plan = pruner.prepare(model, targets, batches)
        assert len(plan.groups) == 8  # the largest layer per group: fc1, fc2 alone, attention in pairs
        assert plan.groups[0][0] == list(targets)[-1]  # output side first
        assert plan.store == store
        assert bool(list(offload.iterdir())) == (store == "disk")
        pruner.apply(targets, cfg.sparsity)
    assert not list(offload.iterdir())  # the offload folder is removed
    assert_same_weights(targets, expected)


def test_streaming_obs_and_two_four_equal_all_at_once():
    batches = random_batches(12)
    model = fresh_model(seed=3)
    for cfg in (config("obs", 0.6), config("cap", 0.5, structure="2:4")):
        expected = in_memory_prune(copy.deepcopy(model), cfg, batches)
        pruned = copy.deepcopy(model)
        targets = find_targets(pruned)
        with StreamingPruner(cfg.replace(max_memory_gb=64), max_group_bytes=1, store="disk") as pruner:
            assert len(pruner.prepare(pruned, targets, batches).groups) > 1
            pruner.apply(targets, cfg.sparsity)
        assert_same_weights(targets, expected)


def test_streaming_prepare_once_apply_at_several_sparsities():
    model = fresh_model()
    batches = random_batches(12)
    cfg = config().replace(max_memory_gb=64)
    targets = find_targets(model)
    with StreamingPruner(cfg, max_group_bytes=1, store="disk") as pruner:
        pruner.prepare(model, targets, batches)
        for sparsity in (0.5, 0.8):
            expected = in_memory_prune(copy.deepcopy(model), config(sparsity=sparsity), batches)
            pruned = copy.deepcopy(model)
            pruned_targets = find_targets(pruned)
            pruner.apply(pruned_targets, sparsity)
            assert_same_weights(pruned_targets, expected)


def test_oneshot_prune_with_a_budget_streams_and_matches(caplog):
    model = fresh_model()
    batches = random_batches(12)
    expected = copy.deepcopy(model)
    oneshot_prune(expected, config(), batches)
    with caplog.at_level(logging.INFO, logger="cap_hf.streaming"):
        report = oneshot_prune(model, config(max_memory_gb=64), batches)
    assert "Streaming cap step" in caplog.text
    assert report.overall == pytest.approx(0.7, abs=1e-3)
    assert_same_weights(find_targets(model), find_targets(expected), atol=1e-5)


def test_without_a_budget_a_step_that_does_not_fit_streams_instead(caplog, monkeypatch):
    """No max_memory_gb: the all-at-once step runs when it fits in the memory available, and streams
    within that memory when it does not (instead of running out of memory after the gradient pass)."""
    import cap_hf.streaming as streaming
    from cap_hf.memory import device_memory_bytes

    model, batches = fresh_model(), random_batches(12)
    targets = find_targets(model)
    fisher = sum(m.weight.numel() for m in targets.values()) * 4 * 16  # the d*B Fisher in fp32
    assert streaming.in_memory_bytes(targets, config()) > fisher
    assert streaming.in_memory_bytes(targets, config(fisher_accumulation="sum")) > 3 * fisher
    expected = copy.deepcopy(model)
    monkeypatch.setattr(streaming, "in_memory_bytes", lambda targets, config: 40 * GB)  # as if DeiT-Base
    monkeypatch.setattr(streaming, "available_bytes", lambda device: 64 * GB)
    assert streaming.resolve_budget(config(), targets) == config()
    with caplog.at_level(logging.INFO, logger="cap_hf.streaming"):
        oneshot_prune(expected, config(), batches)
    assert "Streaming" not in caplog.text
    monkeypatch.setattr(streaming, "available_bytes", lambda device: 20 * GB)
    resolved = streaming.resolve_budget(config(), targets)
    assert resolved.max_memory_gb == pytest.approx(0.9 * (device_memory_bytes() / GB + 20), rel=0.01)
    for method in ("magnitude", "fastcap"):  # nothing to stream
        assert streaming.resolve_budget(config(method), targets).max_memory_gb is None
    assert streaming.resolve_budget(config(max_memory_gb=4), targets).max_memory_gb == 4  # the user's own
    with caplog.at_level(logging.INFO, logger="cap_hf.streaming"):
        oneshot_prune(model, config(), batches)
    assert "streaming it in layer groups" in caplog.text and "Streaming cap step" in caplog.text
    assert_same_weights(find_targets(model), find_targets(expected), atol=1e-5)


def test_shuffling_dataloader_replays_the_same_batches():
    """A seeded, shuffling DataLoader (cap_hf.data.calibration_loader) gives the same batches every group."""
    data = random_batches(12, batch_size=1)
    dataset = [{"pixel_values": b["pixel_values"][0], "labels": b["labels"][0]} for b in data]

    def loader():
        return torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True, drop_last=True,
                                           generator=torch.Generator().manual_seed(0))

    model = fresh_model()
    cfg = config(num_grads=6)
    expected = in_memory_prune(copy.deepcopy(model), cfg, loader())
    targets = find_targets(model)
    with StreamingPruner(cfg.replace(max_memory_gb=64), max_group_bytes=1) as pruner:
        pruner.prepare(model, targets, loader())
        pruner.apply(targets, cfg.sparsity)
    assert_same_weights(targets, expected)


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
        with StreamingPruner(config(max_memory_gb=64), max_group_bytes=1) as pruner:
            pruner.prepare(model, find_targets(model), Fresh())
    with pytest.raises(ValueError, match="re-iterable"):
        prune_step(model, config(max_memory_gb=64), iter(random_batches(12)))


# ---- bad input ----------------------------------------------------------------------------------------------


def test_budget_that_cannot_be_met_fails_before_any_batch():
    model = fresh_model()
    batches = CountingBatches(random_batches(12))
    with pytest.raises(MemoryBudgetError, match=r"max_memory_gb=0.01 cannot be met.*Raise max_memory_gb"):
        prune_step(model, config(max_memory_gb=0.01), batches)
    assert batches.read == 0
    # a layer whose Fisher alone is larger than what the budget leaves
    big = fresh_model(hidden_size=64, intermediate_size=2048, num_attention_heads=2)  # fc1: 70 MB of Fisher
    budget = (rss_bytes() + 300 * 1024 ** 2) / GB  # 256 MB of it are the fixed margin
    with pytest.raises(MemoryBudgetError, match=r"Fisher of layer vit\.layers\.\d\.mlp\.fc\d.*fisher_block_size"):
        prune_step(big, config(max_memory_gb=budget, fisher_block_size=128), batches)
    assert batches.read == 0
    # the same layer fits a larger budget
    report = prune_step(big, config(max_memory_gb=budget + 1, fisher_block_size=128), batches)
    assert report.overall == pytest.approx(0.7, abs=1e-3) and batches.read > 0


def test_max_memory_gb_is_validated():
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="max_memory_gb must be a positive number"):
            PruningConfig(max_memory_gb=bad)
    assert PruningConfig(max_memory_gb=8).max_memory_gb == 8


def test_block_size_that_does_not_divide_a_layer_is_reported(caplog):
    model = fresh_model()  # 32 x 32 and 64 x 32 weights: 48 divides neither
    batches = random_batches(12)
    cfg = config(fisher_block_size=48)
    expected = in_memory_prune(copy.deepcopy(model), cfg, batches)
    targets = find_targets(model)
    with caplog.at_level(logging.WARNING, logger="cap_hf.fisher"):
        with StreamingPruner(cfg.replace(max_memory_gb=64), max_group_bytes=1) as pruner:
            plan = pruner.prepare(model, targets, batches)
            pruner.apply(targets, cfg.sparsity)
    assert "Fisher block size 48 does not divide vit.layers.0.attention.q_proj (1024 weights); using 64" in caplog.text
    assert plan.adjusted["vit.layers.0.attention.q_proj"] == 64 and plan.adjusted["vit.layers.0.mlp.fc1"] == 64
    assert "block size adjusted" in plan.describe()
    assert_same_weights(targets, expected)


def test_more_gradients_than_batches_is_a_clear_error_before_work():
    model = fresh_model()
    batches = CountingBatches(random_batches(3))
    with pytest.raises(ValueError, match="holds only 3 batches, but num_grads=12"):
        prune_step(model, config(max_memory_gb=64), batches)
    with pytest.raises(ValueError, match="holds only 3 batches, but num_grads=12"):
        collect_fisher(model, find_targets(model), batches, 12, 16)
    assert batches.read == 0


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
        prune_step(model, config(max_memory_gb=64), random_batches(12), profiler=profiler)
    finally:
        profiler.close()
    phases = profiler.summary()
    for name in ("plan", "gradients", "fisher", "inversion", "elimination", "selection", "write-back"):
        assert phases[name]["seconds"] > 0 and phases[name]["peak_gb"] > 0, name
    assert phases["gradients"]["calls"] == 12


def test_streaming_matches_reference_pipeline_end_to_end():
    """prune_step on two layers == the plain rank-1 reference run in fp64 on the same gradients."""
    model = fresh_model()
    batches = random_batches(12)
    names = ["vit.layers.1.attention.q_proj", "vit.layers.1.mlp.fc2"]
    cfg = config(targets=names, sparsity=0.6)
    original = {n: m.weight.detach().clone() for n, m in find_targets(model, names).items()}
    # reference: its own gradient loop, one Sherman-Morrison update per gradient, snapshots kept
    targets = find_targets(model, names)
    inverses = {n: RankOneFisherInverse(m.weight.numel(), 16, 12, cfg.damp, dtype=torch.float64)
                for n, m in targets.items()}
    for batch in batches:
        logits = model(pixel_values=batch["pixel_values"]).logits
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        for n, g in zip(targets, torch.autograd.grad(loss, [m.weight for m in targets.values()]), strict=True):
            inverses[n].update(g.reshape(-1).double())
    losses, traces, zeros = {}, {}, {}
    for n, w in original.items():
        losses[n], traces[n] = reference_eliminate(w.reshape(-1, 16).double(), inverses[n].inverse)
        zeros[n] = w.reshape(-1, 16) == 0
    counts = {n: mask.sum(dim=1) for n, mask in reference_select(losses, zeros, 0.6).items()}
    with torch.no_grad():
        prune_step(model, cfg.replace(max_memory_gb=64), batches)
    for n, m in targets.items():
        expected = traces[n][counts[n], torch.arange(counts[n].numel())].reshape(m.weight.shape).float()
        assert torch.equal(m.weight == 0, expected == 0), n
        torch.testing.assert_close(m.weight.detach(), expected, rtol=1e-4, atol=1e-5)


def test_pruning_callback_with_a_budget_matches_the_in_memory_step():
    from cap_hf.masks import current_masks
    from cap_hf.schedule import SparsitySchedule
    from trainer_plugins.pruning import CAPPruningCallback

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
    assert_same_weights(results[64], results[None], atol=1e-5)


def test_training_arguments_carry_the_budget_but_not_the_offload_folder(tmp_path):
    """--max_memory_gb reaches the callback's config through CAPTrainingArguments; a bad value fails at
    construction; the local offload folder stays out of the recipe written next to the model."""
    from cap_hf.trainer import CAPTrainer, CAPTrainingArguments

    args = CAPTrainingArguments(output_dir=str(tmp_path), max_memory_gb=20, offload_dir=str(tmp_path / "off"),
                                fisher_accumulation="sum", report_to=[], distill=False)
    trainer = CAPTrainer(fresh_model(), args)
    cfg = trainer.pruning_callback.config
    assert (cfg.max_memory_gb, cfg.offload_dir, cfg.accumulation) == (20, str(tmp_path / "off"), "sum")
    recipe = trainer.recipe()["pruning"]
    assert recipe["max_memory_gb"] == 20 and "offload_dir" not in recipe
    with pytest.raises(ValueError, match="max_memory_gb must be a positive number"):
        CAPTrainingArguments(output_dir=str(tmp_path), max_memory_gb=-1, report_to=[])
    with pytest.raises(ValueError, match="fisher_accumulation must be"):
        CAPTrainingArguments(output_dir=str(tmp_path), fisher_accumulation="fast", report_to=[])
    tight = CAPTrainingArguments(output_dir=str(tmp_path), max_memory_gb=0.01, report_to=[], distill=False)
    with pytest.raises(MemoryBudgetError, match="max_memory_gb=0.01 cannot be met"):  # before any training
        CAPTrainer(fresh_model(), tight)


def _streaming_worker(rank, world, init_file, out_dir):
    """One process of a gloo group: its own share of the gradients, several layer groups."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = fresh_model()
        cfg = config(num_grads=12 // world, fisher_accumulation="auto", max_memory_gb=64)
        assert cfg.accumulation == "sum"  # only sums can be all-reduced
        targets = find_targets(model)
        with StreamingPruner(cfg, max_group_bytes=1) as pruner:
            plan = pruner.prepare(model, targets, random_batches(12)[rank::world])
            pruner.apply(targets, cfg.sparsity)
        torch.save({"weights": {n: m.weight.detach() for n, m in targets.items()}, "groups": plan.groups,
                    "num_grads": pruner.num_grads}, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_streaming_across_two_processes_equals_one_process(tmp_path):
    """Under torch.distributed (gloo) every process takes its share of the gradients, the Fisher sums are
    all-reduced per layer group, and every process ends with the weights one process gets from all."""
    import torch.multiprocessing as mp

    mp.spawn(_streaming_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["groups"] == ranks[1]["groups"] and len(ranks[0]["groups"]) > 1  # one plan everywhere
    assert ranks[0]["num_grads"] == 12  # the count summed over processes
    for name, w in ranks[0]["weights"].items():
        assert torch.equal(w, ranks[1]["weights"][name]), name
    model = fresh_model()
    single = in_memory_prune(model, config(fisher_accumulation="sum"), random_batches(12))
    for name, module in single.items():
        w = ranks[0]["weights"][name]
        assert torch.equal(w == 0, module.weight == 0), f"masks differ in {name}"
        torch.testing.assert_close(w, module.weight.detach(), rtol=1e-4, atol=1e-5)
