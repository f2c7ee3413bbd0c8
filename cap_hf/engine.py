"""The pruning engine: one driver for every pruning step, every method, with or without a memory budget.

    with Pruner(model, PruningConfig(method="cap"), methods=["magnitude", "obs", "cap"]) as pruner:
        pruner.prepare(calibration_batches)            # the gradient passes and each method's kernel, once
        for sparsity in (0.5, 0.75, 0.9):
            pruner.apply(sparsity, "cap", model=copy.deepcopy(model))

prepare(): plan the layer groups (cap_hf.plan: one group when the step fits); for each group, one pass
over the calibration batches gives the Fisher statistics every method needs (cap_hf.fisher), each
layer's inverse is formed in place, and every method's per-layer kernel (cap_hf.methods) turns it into
scores and results kept in the store (cap_hf.store). Nothing is written into the model during prepare
(pruned weights would change later groups' gradients). apply(): one global selection over the scores,
then each layer's new weights from its kernel, written back; as often as wanted, on this model or on
copies of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from cap_hf.calibration import Replay, first_pass
from cap_hf.config import PruningConfig
from cap_hf.features import fisher_loss, is_backbone
from cap_hf.fisher import check_enough_batches, choose_block_size, collect_fisher
from cap_hf.masks import SparsityReport, current_masks, sparsity_report
from cap_hf.memory import PhaseProfiler
from cap_hf.methods import Layer, canonical_name, get_method
from cap_hf.plan import MemoryPlan, fisher_kinds, plan_step
from cap_hf.ranks import Ranks
from cap_hf.selection import select_pruned, weight_blocks, write_blocks
from cap_hf.store import Store
from cap_hf.targets import find_targets

logger = logging.getLogger(__name__)

Batches = Iterable[Mapping[str, torch.Tensor]] | Callable[[], Iterable[Mapping[str, torch.Tensor]]]


class Pruner:
    """Prepare once, apply at any sparsity, for one method or several sharing one gradient pass.

    Args:
        model: the model whose target weights are pruned (by apply() without `model=`).
        config: the recipe; `methods` (default: [config.method]) replace its method, each validated.
        targets: {name: module}; default find_targets(model, config.targets, config.ignore).
        loss_fn: `loss_fn(model, batch)` for the Fisher (default: cross-entropy of the logits).
        profiler: a cap_hf.memory.PhaseProfiler to time (and measure) the phases; one that only times
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
        self.block_sizes = {name: choose_block_size(m.weight.numel(), config.fisher_block_size, name)
                            for name, m in self.targets.items()}
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
        self.damps: dict[str, float] = {}  # the dampening each layer's block Fisher got (absolute value)
        self.dampening_config = self._dampening_config()
        self._store: Store | None = None
        self.ranks = Ranks.current(config.dist_timeout)  # one process, or the step shared out (cap_hf.ranks)
        if self.ranks.distributed and any(k.fisher for k in self.methods.values()) and config.num_grads < self.ranks.world:
            raise ValueError(f"num_grads={config.num_grads} is less than the {self.ranks.world} processes, so some would "
                             "compute no gradient; raise num_grads.")

    def _dampening_config(self) -> PruningConfig:
        """The config whose dampening the shared block Fisher takes: the recipe's own method when it needs
        one, else the first that does. Methods whose default dampenings differ share it (one gradient pass),
        with a warning."""
        block = [name for name, kernel in self.methods.items() if kernel.fisher == "block"]
        if not block:
            return self.config
        block.sort(key=lambda name: name != self.config.method)
        chosen = self.configs[block[0]]
        others = [name for name in block[1:] if self.configs[name].dampening != chosen.dampening]
        if others:
            logger.warning("%s share one Fisher with %s, so they are compared at its dampening, %s, not at their "
                           "own default; run them separately, or give --damp / --relative_damp to choose.",
                           ", ".join(others), block[0], chosen.describe_dampening())
        return chosen

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
                             "(e.g. cap_hf.calibration.calibration_loader(...)).")
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
        if len(plan.groups) > 1:
            replayed()
        if plan.budget_bytes is not None or ranks.distributed:
            logger.info("Pruning step (%s)%s: %s", ", ".join(self.methods),
                        f" on rank {ranks.rank}" if ranks.distributed else "", plan.describe())
        self._store = Store(plan.store, cfg.offload_dir)
        self.scores = {name: {} for name in self.methods}
        self.damps = {}
        if not kinds:
            for name in self.targets:
                if self.owns(name):
                    self._prepare_layer(name, {})
            return plan
        for index, group in enumerate(plan.groups):
            group_targets = {name: self.targets[name] for name in group}
            batches = replay() if replay is not None else first_pass(calibration_batches)
            fishers = collect_fisher(
                self.model, group_targets, batches, cfg.num_grads, {name: self.block_sizes[name] for name in group},
                kinds, grad_chunk_size=cfg.grad_chunk_size, device=self.device, accumulate=cfg.accumulation,
                **self.dampening_config.dampening, profiler=self.profiler, masks=current_masks(group_targets),
                label_free=cfg.label_free_fisher, loss_fn=self.loss_fn, seed=int(cfg.calibration_seed or 0),
                progress=progress, on_batch=replay.check if replay is not None else None,
                owners=plan.owners, ranks=ranks)
            for name in group:
                if not self.owns(name):
                    continue
                stats = {}
                with self._phase("inversion"):
                    if "block" in fishers:
                        self.damps[name] = fishers["block"].damp_of(name)
                        stats["block"] = fishers["block"].pop_inverse(name)
                    if "shared" in fishers:
                        stats["shared"] = fishers["shared"].mean(name)
                self._prepare_layer(name, stats)
                del stats
            del fishers
            if len(plan.groups) > 1:
                logger.info("Layer group %d/%d done (%d layers).", index + 1, len(plan.groups), len(group))
        self.num_grads = cfg.num_grads  # over all processes (iter_gradients checked each share)
        if "block" in kinds:  # every rank knows every layer's dampening (records, model cards)
            values = ranks.sum([self.damps.get(name, 0.0) for name in self.targets], "dampening of the layers")
            self.damps = dict(zip(self.targets, values, strict=True))
            low, high = min(self.damps, key=self.damps.get), max(self.damps, key=self.damps.get)
            logger.info("Fisher dampening %s: from %.2e (%s) to %.2e (%s).", self.dampening_config.describe_dampening(),
                        self.damps[low], low, self.damps[high], high)
        return plan

    def _layer(self, method: str, name: str, weights: torch.Tensor, fisher: Mapping) -> Layer:
        return Layer(name=name, weights=weights, store=self._store, store_prefix=f"{method}/{name}", fisher=fisher)

    def _prepare_layer(self, name: str, fisher: Mapping[str, torch.Tensor]) -> None:
        w = weight_blocks(self.targets[name], self.block_sizes[name], self.device)
        zero = w == 0
        for method, kernel in self.methods.items():
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
        return self.profiler.seconds("plan", "gradients", "fisher", "inversion")

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
