"""A pruning step shared out over processes (cap_hf.engine.ranks): two gloo processes give what one process gives,
each keeping only its layers' Fisher; bad input and failing ranks stop with clear errors, never a hang."""

import multiprocessing
import time
import traceback

import pytest
import torch
from conftest import random_batches
from test_engine import config, fresh_model, prune_copy

from cap_hf import Pruner, find_targets
from cap_hf.engine.ranks import RankError, assign_owners, interleave_index, share_of
from cap_hf.engine.selection import lowest_k_masks

WORLD = 2


def _entry(rank, world, init_file, out_dir, worker, kwargs):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {"ok": worker(rank, world, **kwargs)}
    except BaseException as err:  # noqa: BLE001 - reported to the test
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def run_ranks(tmp_path, worker, world=WORLD, limit=240, **kwargs) -> list[dict]:
    """Run worker(rank, world, **kwargs) in `world` gloo processes; each rank's return value or error."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(r, world, str(tmp_path / "init"), str(tmp_path), worker, kwargs))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + limit
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} hung"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def ok(results):
    for rank, result in enumerate(results):
        assert "ok" in result, f"rank {rank}: {result.get('traceback')}"
    return [r["ok"] for r in results]


# ---- what each rank runs -----------------------------------------------------------------------------------


def prune_share(rank, world, cfg, num_batches, groups=1, targets=None, methods=None):
    """Rank r reads batches[r::world] (so that one process reading them all meets the same gradients)."""
    model = fresh_model()
    chosen = find_targets(model, targets) if targets else None
    with Pruner(model, cfg, methods, targets=chosen, max_group_bytes=groups if groups != 1 else None) as pruner:
        plan = pruner.prepare(random_batches(num_batches)[rank::world])
        pruner.apply()
        owned = [name for name in pruner.targets if pruner.owns(name)]
        damps = dict(pruner.damps.get(pruner.config.method, {}))
    weights = {n: m.weight.detach().clone() for n, m in (chosen or find_targets(model)).items()}
    return {"weights": weights, "groups": plan.groups, "owners": plan.owners, "owned": owned, "damps": damps,
            "num_grads": pruner.num_grads}


def one_process(cfg, num_batches, groups=1, targets=None):
    model = fresh_model()
    if targets:
        cfg = cfg.replace(targets=targets)
    pruned, _ = prune_copy(model, cfg, random_batches(num_batches), groups=groups)
    return {n: m.weight.detach() for n, m in pruned.items()}


def assert_same(ranks, single):
    for name, w in single.items():
        for r, result in enumerate(ranks):
            got = result["weights"][name]
            assert torch.equal(got, ranks[0]["weights"][name]), f"rank {r} differs from rank 0 in {name}"
        got = ranks[0]["weights"][name]
        assert torch.equal(got == 0, w == 0), f"masks differ from one process in {name}"
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-5, msg=name)  # the tolerance of test_engine


# ---- two processes = one process ----------------------------------------------------------------------------


CASES = {
    "cap": dict(method="cap"),
    "cap-default-relative-damp": dict(method="cap", damp=None),
    "cap-sum-13-grads": dict(method="cap", fisher_accumulation="sum", num_grads=13),
    "obs": dict(method="obs"),
    "cap-2:4": dict(method="cap", structure="2:4", sparsity=0.5),
    "magnitude": dict(method="magnitude"),
    "fastcap": dict(method="fastcap"),
}


@pytest.mark.parametrize("budget", [False, True], ids=["all-at-once", "budget-groups"])
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_prune_as_one(tmp_path, case, budget):
    """Each rank owns some layers, builds their Fisher from both ranks' gradient rows (in one process's order),
    prunes them and broadcasts them: the same masks and weights as one process reading every batch, for CAP,
    OBS, 2:4, magnitude and FastCAP, all at once and in layer groups under a budget."""
    cfg = config(**CASES[case])
    num = cfg.num_grads
    groups = 1
    if budget:
        cfg = cfg.replace(max_memory_gb=64)
        groups = 3 * 4 * 32 * 32 * 20  # a few layers per group: every group shared by both ranks
    ranks = ok(run_ranks(tmp_path, prune_share, cfg=cfg, num_batches=num, groups=groups))
    assert ranks[0]["groups"] == ranks[1]["groups"] and ranks[0]["owners"] == ranks[1]["owners"]
    if budget and cfg.needs_fisher:  # (magnitude has nothing to plan: one group)
        assert len(ranks[0]["groups"]) > 1 and any(
            len({ranks[0]["owners"][n] for n in g}) == 2 for g in ranks[0]["groups"])
    assert ranks[0]["owned"] and ranks[1]["owned"] and not set(ranks[0]["owned"]) & set(ranks[1]["owned"])
    if cfg.needs_fisher:
        assert ranks[0]["num_grads"] == num
    if cfg.needs_fisher == "block":  # every rank knows every layer's dampening, and they agree
        assert ranks[0]["damps"] == ranks[1]["damps"] and len(ranks[0]["damps"]) == len(ranks[0]["owners"])
    assert_same(ranks, one_process(cfg, num, groups))


def test_more_processes_than_layers(tmp_path):
    """One target layer and two ranks: rank 1 owns nothing, computes its share of the gradients, sends them
    and receives the weights."""
    target = "vit.layers.1.mlp.fc2"
    ranks = ok(run_ranks(tmp_path, prune_share, cfg=config(), num_batches=12, targets=target))
    assert ranks[0]["owners"] == {target: 0} and ranks[1]["owned"] == []
    assert_same(ranks, one_process(config(), 12, targets=target))


# ---- bad input and failing ranks ----------------------------------------------------------------------------


def prune_disagreeing(rank, world, what):
    model = fresh_model()
    cfg = config(sparsity=0.7 if rank == 0 or what != "sparsity" else 0.8, max_memory_gb=64)
    targets = find_targets(model, r".*fc\d" if rank == 1 and what == "targets" else None)
    groups = 1 if rank == 1 and what == "plan" else None  # e.g. a rank that measured another budget
    with Pruner(model, cfg, targets=targets, max_group_bytes=groups) as pruner:
        pruner.prepare(random_batches(12)[rank::world])


@pytest.mark.parametrize(("what", "message"), [
    ("targets", "Rank 1 disagrees with rank 0 on the pruning step (targets and recipe): its targets is different"),
    ("sparsity", "its recipe is"),
    ("plan", "Rank 1 disagrees with rank 0 on the memory plan: its groups is different"),
])
def test_ranks_that_disagree_stop_before_any_work(tmp_path, what, message):
    results = run_ranks(tmp_path, prune_disagreeing, what=what)
    for result in results:  # every rank, not only the odd one, says which rank and what
        assert "error" in result and message in result["error"], result
        assert "ValueError" in result["error"]


class FailingLoss:
    """The Fisher loss of rank `rank` raises (or sleeps) at its `at`-th batch."""

    def __init__(self, rank, at, sleep=None):
        self.rank, self.at, self.sleep, self.seen = rank, at, sleep, 0

    def __call__(self, model, batch):
        if torch.distributed.get_rank() == self.rank:
            self.seen += 1
            if self.seen == self.at:
                if self.sleep is None:
                    raise RuntimeError("this rank ran out of GPU memory")
                time.sleep(self.sleep)
        logits = model(pixel_values=batch["pixel_values"]).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"])


def prune_failing(rank, world, sleep, timeout):
    model = fresh_model()
    start = time.monotonic()
    try:
        with Pruner(model, config(dist_timeout=timeout), loss_fn=FailingLoss(1, 4, sleep)) as pruner:
            pruner.prepare(random_batches(12)[rank::world])
            pruner.apply()
    except Exception as err:  # noqa: BLE001 - what this rank saw, and when
        return {"error": f"{type(err).__name__}: {err}", "seconds": time.monotonic() - start}
    return {"seconds": time.monotonic() - start}


@pytest.mark.parametrize(("sleep", "timeout"), [(None, None), (10, 3)], ids=["rank-raises", "rank-stuck"])
def test_a_failing_rank_stops_the_others_with_a_clear_error(tmp_path, sleep, timeout):
    """Rank 1 fails (an exception) or stops answering (stuck for 10 s) in the middle of the gradient pass: rank 0
    stops with a RankError naming itself and the phase, at once or after dist_timeout, instead of hanging."""
    rank0, rank1 = ok(run_ranks(tmp_path, prune_failing, limit=120, sleep=sleep, timeout=timeout))
    assert "error" in rank1
    assert rank0["error"].startswith(f"{RankError.__name__}: Rank 0 of 2: the pruning step's exchange of gradient rows")
    assert "Look for the first error in the other ranks' logs" in rank0["error"]
    if timeout is None:
        assert "this rank ran out of GPU memory" in rank1["error"] and rank0["seconds"] < 30
    else:
        assert "dist_timeout=3 s" in rank0["error"] and 3 <= rank0["seconds"] < 15


def test_owners_balance_and_interleaving():
    owners = assign_owners({"a": 4, "b": 1, "c": 1, "d": 4, "e": 1, "f": 1}, 2)
    loads = [sum(c for n, c in {"a": 4, "b": 1, "c": 1, "d": 4, "e": 1, "f": 1}.items() if owners[n] == r)
             for r in range(2)]
    assert loads == [6, 6] and list(owners) == list("abcdef")
    assert assign_owners({"a": 1}, 3) == {"a": 0}
    assert [share_of(13, r, 2) for r in range(2)] == [7, 6]
    # rows j-major (j * world + r); rank 0 sent 3 rows, rank 1 two: r0j0, r1j0, r0j1, r1j1, r0j2 are kept
    assert interleave_index([3, 2], 3, torch.device("cpu")).tolist() == [0, 1, 2, 3, 4]
    assert interleave_index([2, 1, 1], 2, torch.device("cpu")).tolist() == [0, 1, 2, 3]
    assert interleave_index([2, 2], 2, torch.device("cpu")) is None


def test_lowest_k_over_several_tensors_breaks_ties_by_position():
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        x = torch.randint(-2, 3, (n,), generator=gen).float()
        x[torch.rand(n, generator=gen) < 0.2] = float("-inf")
        x[torch.rand(n, generator=gen) < 0.1] = -0.0
        k = int(torch.randint(0, n + 1, (1,), generator=gen))
        parts = {"a": x[: n // 3], "b": x[n // 3: 2 * n // 3].reshape(1, -1), "c": x[2 * n // 3:]}
        masks = lowest_k_masks(parts, k)
        got = torch.cat([masks[p].reshape(-1) for p in "abc"])
        expected = torch.zeros(n, dtype=torch.bool)
        expected[sorted(range(n), key=lambda i: (float(x[i]), i))[:k]] = True
        assert torch.equal(got, expected), (x, k)


def test_the_plan_counts_one_rank_share():
    """The memory plan of a rank counts every layer's gradient rows but only its own layers' Fisher: with two
    ranks a budget holds more layers per group, and the all-at-once estimate nearly halves."""
    from cap_hf.engine.fisher import divisor_block_size
    from cap_hf.engine.plan import all_at_once_bytes, layer_cost, plan_step
    from cap_hf.engine.ranks import Ranks
    from cap_hf.methods import get_method

    model, cfg = fresh_model(), config(max_memory_gb=64, fisher_block_size=64)  # the Fisher outweighs the rows
    targets = find_targets(model)
    blocks = {n: divisor_block_size(m.weight.numel(), 64) for n, m in targets.items()}
    numels = {n: m.weight.numel() for n, m in targets.items()}
    kernels = [get_method("cap")(cfg)]
    limit = 3 * max(layer_cost(numels[n], blocks[n], ["block"], cfg).owner for n in targets)
    one = plan_step(model, targets, kernels, cfg, blocks, max_group_bytes=limit)
    two = plan_step(model, targets, kernels, cfg, blocks, max_group_bytes=limit, ranks=Ranks(0, 2))
    assert len(two.groups) < len(one.groups) and set(one.owners.values()) == {0} and set(two.owners.values()) == {0, 1}
    for group in two.groups:  # each group's layers are split between the ranks by Fisher size
        loads = [sum(numels[n] for n in group if two.owners[n] == r) for r in range(2)]
        assert max(loads) <= sum(loads) / 2 + max(numels[n] for n in group)
    alone, shared = (all_at_once_bytes(numels, blocks, kernels, cfg, w) for w in (1, 2))
    fisher = sum(numels[n] * blocks[n] * 4 for n in targets)
    assert shared < alone - 0.4 * fisher


def prune_too_few_gradients(rank, world):
    with Pruner(fresh_model(), config(num_grads=1)) as pruner:
        pruner.prepare(random_batches(1))


def test_fewer_gradients_than_processes_and_a_bad_timeout_are_refused(tmp_path):
    from cap_hf import PruningConfig

    for result in run_ranks(tmp_path, prune_too_few_gradients):
        assert "num_grads=1 is less than the 2 processes" in result["error"], result
    with pytest.raises(ValueError, match="dist_timeout must be a positive number of seconds, got 0"):
        PruningConfig(dist_timeout=0)
