"""The pruning engine: one driver for every pruning step, every method, with or without a memory budget.

    with Pruner(model, PruningConfig(method="cap"), methods=["magnitude", "obs", "cap"]) as pruner:
        pruner.prepare(calibration_batches)            # the gradient passes and each method's kernel, once
        for sparsity in (0.5, 0.75, 0.9):
            pruner.apply(sparsity, "cap", model=copy.deepcopy(model))

prepare(): plan the layer groups (cap_hf.engine.plan: one group when the step fits); for each group, one pass
over the calibration batches gives the Fisher statistics every method needs (cap_hf.engine.fisher), each
layer's inverse is formed in place, and every method's per-layer kernel (cap_hf.methods) turns it into
scores and results kept in the store (cap_hf.engine.store). Nothing is written into the model during prepare
(pruned weights would change later groups' gradients). apply(): one global selection over the scores,
then each layer's new weights from its kernel, written back; as often as wanted, on this model or on
copies of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from cap_hf.config import PruningConfig
from cap_hf.engine.calibration import Replay, check_enough_batches, first_pass
from cap_hf.engine.collect import collect_fisher
from cap_hf.engine.feature_fisher import fisher_loss
from cap_hf.engine.fisher import choose_block_sizes
from cap_hf.engine.memory import PhaseProfiler
from cap_hf.engine.plan import MemoryPlan, fisher_kinds, plan_step
from cap_hf.engine.ranks import Ranks
from cap_hf.engine.selection import select_pruned, weight_blocks, write_blocks
from cap_hf.engine.store import Store
from cap_hf.evaluation.features import is_backbone
from cap_hf.masks import SparsityReport, current_masks, sparsity_report
from cap_hf.methods import Layer, canonical_name, get_method
from cap_hf.targets import find_targets

logger = logging.getLogger(__name__)

Batches = Iterable[Mapping[str, torch.Tensor]] | Callable[[], Iterable[Mapping[str, torch.Tensor]]]
FISHER_PHASES = ("gradients", "fisher", "exchange", "inversion")  # the profiler's phases of a gradient pass


class Pruner:
    """Prepare once, apply at any sparsity, for one method or several sharing one gradient pass.

    Args:
        model: the model whose target weights are pruned (by apply() without `model=`).
        config: the recipe; `methods` (default: [config.method]) replace its method, each validated.
        targets: {name: module}; default find_targets(model, config.targets, config.ignore).
        loss_fn: `loss_fn(model, batch)` for the Fisher (default: cross-entropy of the logits).
        profiler: a cap_hf.engine.memory.PhaseProfiler to time (and measure) the phases; one that only times
            them is made otherwise.
        max_group_bytes, store: force more layer groups and where results wait (tests, experiments).
    """

    def __init__(self, model: nn.Module, config: PruningConfig, methods: Sequence[str] | None = None, *,
                 targets: Mapping[str, nn.Module] | None = None, loss_fn: Callable | None = None,
                 profiler: PhaseProfiler | None = None, max_group_bytes: int | None = None,
                 store: str | None = None):
        config.validate()
        names = list(dict.fromkeys(canonical_name(m) for m in (methods or [config.method])))
        self.configs = {name: config.replace(method=name) for name in names}  # validates each combination
        self.methods = {name: get_method(name)(cfg) for name, cfg in self.configs.items()}
        self.config = config
        self.model = model
        self.targets = dict(targets) if targets is not None else find_targets(model, config.targets, config.ignore)
        self.block_sizes = choose_block_sizes({name: m.weight.numel() for name, m in self.targets.items()},
                                              config.fisher_block_size)
        self.loss_fn = loss_fn if loss_fn is not None else fisher_loss(config, model)
        if self.loss_fn is None and is_backbone(model) and any(k.fisher for k in self.methods.values()):
            raise ValueError(f"{type(model).__name__} has no classification head, so the cross-entropy Fisher has no "
                             "logits. Use --fisher_objective features (or auto, without --label_free_fisher), or "
                             "pass loss_fn(model, batch).")
        self.profiler = profiler if profiler is not None else PhaseProfiler(track_memory=False)
        self.max_group_bytes, self.forced_store = max_group_bytes, store
        self.device = torch.device(config.device) if config.device is not None else next(model.parameters()).device
        self.plan: MemoryPlan | None = None
        self.scores: dict[str, dict[str, torch.Tensor]] = {}
        self.num_grads = 0
        self.damps: dict[str, dict[str, float]] = {}  # method -> the dampening each layer's block Fisher got
        self.passes = self._fisher_passes()
        self._pass_seconds: dict[int, float] = {}
        self._store: Store | None = None
        self.ranks = Ranks.current(config.dist_timeout)  # one process, or the step shared out (cap_hf.engine.ranks)
        if self.ranks.distributed and any(k.fisher for k in self.methods.values()) and config.num_grads < self.ranks.world:
            raise ValueError(f"num_grads={config.num_grads} is less than the {self.ranks.world} processes, so some would "
                             "compute no gradient; raise num_grads.")

    def _fisher_passes(self) -> list[tuple[PruningConfig, list[str]]]:
        """The gradient passes of a step: (the config whose dampening the pass's block Fisher takes, the methods
        prepared from it). Every method gets its own dampening (the recipe's, or each method's default when the
        recipe gives none), so methods compared in one sweep are each at their own default; methods that agree
        on it share a pass. The recipe's method's pass comes first and also serves the methods without a block
        Fisher (FastCAP's shared one, magnitude's none)."""
        passes: dict[tuple, tuple[PruningConfig, list[str]]] = {}
        order = sorted(self.methods, key=lambda name: name != self.config.method)
        first = None
        for name in order:
            if self.methods[name].fisher != "block":
                continue
            key = tuple(sorted(self.configs[name].dampening.items()))
            first = first or key
            passes.setdefault(key, (self.configs[name], []))[1].append(name)
        others = [name for name in order if self.methods[name].fisher != "block"]
        if not passes:
            return [(self.config, others)]
        passes[first][1].extend(others)
        if len(passes) > 1:
            logger.info("The methods' dampenings differ (%s): one gradient pass per dampening.", "; ".join(
                f"{', '.join(names)}: {cfg.describe_dampening()}" for cfg, names in passes.values()))
        return list(passes.values())

    # ---- context manager: the store (a temporary folder on disk) is removed on close -------------------
    def __enter__(self) -> Pruner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._close_store()
        self.ranks.close()

    def _close_store(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def owns(self, name: str) -> bool:
        """Whether this process prunes layer `name` (always, in one process)."""
        return self.plan is None or self.plan.owners.get(name, 0) == self.ranks.rank

    def _agreement(self) -> dict:
        """What every rank must hold alike for the step to be shared out."""
        local = ("device", "offload_dir", "calibration_seed")  # may differ between ranks
        return {"targets": [(name, tuple(m.weight.shape), self.block_sizes[name]) for name, m in self.targets.items()],
                "methods": list(self.methods),
                "recipe": {k: v for k, v in sorted(self.config.to_dict().items()) if k not in local}}

    def _phase(self, name: str):
        return self.profiler.phase(name)

    # ---- prepare ------------------------------------------------------------------------------------------
    def prepare(self, calibration_batches: Batches | None = None, progress: bool = False) -> MemoryPlan:
        """Gradient passes, Fisher, inverses and every method's per-layer kernel; returns the plan.

        `calibration_batches`: dicts with 'pixel_values' (and 'labels' unless label-free), one batch per
        Fisher gradient; an iterable, or a callable returning one. When the plan has several layer groups
        the batches are read once per group and must be the same each time (a list, a DataLoader without
        random augmentation; checked)."""
        self._close_store()
        kernels = list(self.methods.values())
        kinds = fisher_kinds(kernels)
        if kinds and calibration_batches is None:
            needing = [name for name, m in self.methods.items() if m.fisher]
            raise ValueError(f"Methods {needing} need calibration data for their Fisher: pass calibration_batches "
                             "(e.g. cap_hf.io.data.calibration_loader(...)).")
        cfg = self.config
        ranks = self.ranks
        ranks.agree(self._agreement(), "pruning step (targets and recipe)")
        share = ranks.shares(cfg.num_grads)[ranks.rank]
        if kinds:
            check_enough_batches(first_pass(calibration_batches), share)
        replay: Replay | None = None

        def replayed() -> Replay:  # only a step in several groups reads the batches more than once
            nonlocal replay
            replay = replay or Replay(calibration_batches)
            return replay

        with self._phase("plan"):
            self.plan = plan = plan_step(
                self.model, self.targets, kernels, cfg, self.block_sizes, loss_fn=self.loss_fn, device=self.device,
                max_group_bytes=self.max_group_bytes, store=self.forced_store, ranks=ranks,
                probe=(lambda: _first_batch(replayed()())) if kinds else None)
        ranks.agree({"groups": plan.groups, "owners": plan.owners, "store": plan.store}, "memory plan")
        if len(plan.groups) * len(self.passes) > 1:
            replayed()
        if plan.budget_bytes is not None or ranks.distributed:
            logger.info("Pruning step (%s)%s: %s", ", ".join(self.methods),
                        f" on rank {ranks.rank}" if ranks.distributed else "", plan.describe())
        self._store = Store(plan.store, cfg.offload_dir)
        self.scores = {name: {} for name in self.methods}
        self.damps = {}
        self._pass_seconds = {}
        if not kinds:
            for name in self.targets:
                if self.owns(name):
                    self._prepare_layer(name, {}, list(self.methods))
            return plan
        local_damps: dict[int, dict[str, float]] = {}
        for index, group in enumerate(plan.groups):
            for number in range(len(self.passes)):
                batches = replay() if replay is not None else first_pass(calibration_batches)
                local_damps.setdefault(number, {}).update(self._fisher_pass(
                    group, number, batches, progress, replay.check if replay is not None else None))
            if len(plan.groups) > 1:
                logger.info("Layer group %d/%d done (%d layers).", index + 1, len(plan.groups), len(group))
        self.num_grads = cfg.num_grads  # over all processes (iter_gradients checked each share)
        self._share_damps(local_damps)
        return plan

    def _fisher_pass(self, group: Sequence[str], number: int, batches: Iterable, progress: bool,
                     on_batch: Callable | None) -> dict[str, float]:
        """One gradient pass over the batches for a layer group and the methods of pass `number`: their Fisher,
        inverted layer by layer, into their kernels. Returns the dampening of this rank's layers."""
        cfg, plan = self.config, self.plan
        damp_config, names = self.passes[number]
        start = self.profiler.seconds(*FISHER_PHASES)
        group_targets = {name: self.targets[name] for name in group}
        fishers = collect_fisher(
            self.model, group_targets, batches, cfg.num_grads, {name: self.block_sizes[name] for name in group},
            fisher_kinds([self.methods[m] for m in names]), grad_chunk_size=cfg.grad_chunk_size, device=self.device,
            accumulate=cfg.accumulation, **damp_config.dampening, profiler=self.profiler,
            masks=current_masks(group_targets), label_free=cfg.label_free_fisher, loss_fn=self.loss_fn,
            seed=int(cfg.calibration_seed or 0), progress=progress, on_batch=on_batch, owners=plan.owners,
            ranks=self.ranks)
        damps = {}
        for name in filter(self.owns, group):
            stats = {}
            with self._phase("inversion"):
                if "block" in fishers:
                    damps[name] = fishers["block"].damp_of(name)
                    stats["block"] = fishers["block"].pop_inverse(name)
                if "shared" in fishers:
                    stats["shared"] = fishers["shared"].mean(name)
            self._prepare_layer(name, stats, names)
            del stats
        del fishers
        self._pass_seconds[number] = self._pass_seconds.get(number, 0.0) + self.profiler.seconds(*FISHER_PHASES) - start
        return damps

    def _share_damps(self, local_damps: Mapping[int, Mapping[str, float]]) -> None:
        """Every rank learns every layer's dampening, per method with a block Fisher (records, model cards)."""
        for number, (damp_config, names) in enumerate(self.passes):
            block = [m for m in names if self.methods[m].fisher == "block"]
            if not block:
                continue
            mine = local_damps.get(number, {})
            values = self.ranks.sum([mine.get(name, 0.0) for name in self.targets], "dampening of the layers")
            damps = dict(zip(self.targets, values, strict=True))
            self.damps.update({method: damps for method in block})
            low, high = min(damps, key=damps.get), max(damps, key=damps.get)
            logger.info("Fisher dampening of %s %s: from %.2e (%s) to %.2e (%s).", ", ".join(block),
                        damp_config.describe_dampening(), damps[low], low, damps[high], high)

    def _layer(self, method: str, name: str, weights: torch.Tensor, fisher: Mapping) -> Layer:
        return Layer(name=name, weights=weights, store=self._store, store_prefix=f"{method}/{name}", fisher=fisher)

    def _prepare_layer(self, name: str, fisher: Mapping[str, torch.Tensor], methods: Sequence[str]) -> None:
        w = weight_blocks(self.targets[name], self.block_sizes[name], self.device)
        zero = w == 0
        for method in methods:
            kernel = self.methods[method]
            with self._phase(f"prepare:{method}"):
                scores = kernel.prepare_layer(self._layer(method, name, w, fisher))
                if scores is not None:
                    self.scores[method][name] = scores.float().masked_fill(zero, float("-inf")).cpu()

    # ---- apply ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, sparsity: float | None = None, method: str | None = None,
              model: nn.Module | None = None) -> SparsityReport:
        """Prune to `sparsity` (default: the config's) with `method` (default: the only one prepared), in
        place: this model's targets, or the same-named modules of `model` (a copy of it). Returns the
        sparsity measured from the zeros."""
        if self._store is None:
            raise RuntimeError("Call prepare() first (or the pruner was closed).")
        if method is None:
            if len(self.methods) > 1:
                raise ValueError(f"Several methods were prepared ({', '.join(self.methods)}); name one.")
            method = next(iter(self.methods))
        method = canonical_name(method)
        if method not in self.methods:
            raise ValueError(f"Method {method!r} was not prepared; prepared: {', '.join(self.methods)}.")
        config = self.configs[method]
        config = config.replace(sparsity=config.sparsity if sparsity is None else float(sparsity))  # validates
        targets = self.targets if model is None else _same_modules(model, self.targets)
        ranks = self.ranks
        if ranks.distributed:
            ranks.agree({"method": method, "sparsity": config.sparsity}, "pruning to apply")
        kernel = self.methods[method]
        with self._phase("selection"):
            kept = self.scores[method]  # in model order, whatever the order of the groups (ties break alike)
            scores = {name: kept[name] for name in self.targets if name in kept}
            scored = ranks.sum([len(scores)], "selection")[0] > 0  # a method scores on every rank or on none
            sizes = {name: self.targets[name].weight.numel() for name in self.targets}
            pruned = select_pruned(scores, config.sparsity, config.sparsity_distribution, sizes, ranks) if scored \
                else {}
        for name, module in targets.items():
            if not self.owns(name):
                continue
            with self._phase("write-back"):
                w = weight_blocks(module, self.block_sizes[name], self.device)
                mask = pruned.get(name)
                new = kernel.apply_layer(self._layer(method, name, w, {}),
                                         mask.to(w.device) if mask is not None else None, config.sparsity)
                write_blocks(module, new)
        if ranks.distributed:
            with self._phase("broadcast"):  # every rank ends with every owner's weights
                for name, module in targets.items():
                    _broadcast_weight(module, self.plan.owners[name], ranks)
        return sparsity_report(targets)

    # ---- timings -------------------------------------------------------------------------------------------
    @property
    def fisher_seconds(self) -> float:
        """Time of the shared part of prepare: plan, gradient passes, Fisher accumulation, inversion."""
        return self.profiler.seconds("plan", *FISHER_PHASES)

    def fisher_seconds_of(self, method: str) -> float:
        """What one method's Fisher cost: the plan and the gradient pass(es) it was prepared from (0 without one)."""
        method = canonical_name(method)
        if not self.methods[method].fisher:
            return 0.0
        number = next(i for i, (_, names) in enumerate(self.passes) if method in names)
        return self.profiler.seconds("plan") + self._pass_seconds.get(number, 0.0)

    def prepare_seconds(self, method: str) -> float:
        """Time of one method's kernels during prepare."""
        return self.profiler.seconds(f"prepare:{canonical_name(method)}")


@torch.no_grad()
def _broadcast_weight(module: nn.Module, owner: int, ranks: Ranks) -> None:
    data = module.weight.data
    buffer = data if data.is_contiguous() else data.contiguous()
    ranks.broadcast(buffer, owner, f"broadcast of the new weights of a layer from rank {owner}")
    if buffer is not data:
        data.copy_(buffer)


def _first_batch(batches: Iterable) -> Mapping:
    for batch in batches:
        return batch
    raise ValueError("The calibration data is empty.")


def _same_modules(model: nn.Module, targets: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = [name for name in targets if name not in modules]
    if missing:
        raise ValueError(f"The model passed to apply() lacks the prepared layers {missing[:3]}; pass a copy of the "
                         "prepared model.")
    return {name: modules[name] for name in targets}
