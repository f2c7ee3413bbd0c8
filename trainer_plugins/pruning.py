"""CAPPruningCallback: gradual pruning for any `transformers.Trainer`.

- On scheduled optimizer steps it collects the Fisher (each process its share of the gradients, summed
  across processes), prunes to the scheduled sparsity with the configured method, and makes every
  process hold the same weights.
- Between pruning steps it keeps the masks exact: gradient hooks zero the gradients of pruned
  weights during backward (before clipping, accumulation and the all-reduce), and the weights are
  re-masked after every optimizer step (AdamW momentum and weight decay would revive them otherwise).
- Masks come from the weights' zeros at the start of training, so resuming from a checkpoint neither
  re-densifies nor re-prunes. (With a plain Trainer on transformers 5.23, resuming ViT-family models
  does not load the renamed weights; CAPTrainer fixes that, see docs/design.md.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from cap_hf.config import PruningConfig
from cap_hf.fisher import collect_fisher
from cap_hf.masks import current_masks, sparsity_report
from cap_hf.pruners import get_pruner
from cap_hf.schedule import SparsitySchedule
from cap_hf.streaming import STREAMING_METHODS, StreamingPruner, resolve_budget
from cap_hf.targets import find_targets

logger = logging.getLogger(__name__)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class CAPPruningCallback(TrainerCallback, ExportableState):
    """Prune on a schedule and keep the masks.

    Args:
        config: what a pruning step does (method, Fisher settings, targets); its `sparsity` is ignored.
        schedule: pruning steps (optimizer steps) and their sparsities, or a callable
            `total_steps -> SparsitySchedule` resolved when training starts.
        calibration_batches: `(step, rank) -> iterable of batches` for the Fisher; each batch is one
            gradient. Needed by every method but magnitude.
        loss_fn: optional `loss_fn(model, batch)` for the Fisher (default: cross-entropy of the logits).
    """

    def __init__(self, config: PruningConfig, schedule: SparsitySchedule | Callable[[int], SparsitySchedule],
                 calibration_batches: Callable[[int, int], Iterable[Mapping[str, torch.Tensor]]] | None = None,
                 loss_fn: Callable | None = None):
        if config.needs_fisher and calibration_batches is None:
            raise ValueError(f"Pruning method {config.method!r} needs calibration_batches for its Fisher.")
        self.config = config
        self.schedule = schedule
        self.calibration_batches = calibration_batches
        self.loss_fn = loss_fn
        self.targets: dict[str, torch.nn.Module] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.last_pruned_step = -1
        self.ranks_identical: bool | None = None
        self.history: list[dict] = []
        self._hooks = []
        self._pending_log: dict[str, float] = {}

    # ---- state for checkpoints (TrainerState.stateful_callbacks) -----------------------------------
    def state(self) -> dict:
        return {"args": {}, "attributes": {"last_pruned_step": self.last_pruned_step, "history": self.history}}

    # ---- training events -----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if callable(self.schedule) and not isinstance(self.schedule, SparsitySchedule):
            self.schedule = self.schedule(state.max_steps)
        self.targets = find_targets(model, self.config.targets, self.config.ignore)
        self.masks = current_masks(self.targets)  # zeros of a resumed checkpoint stay pruned
        done = [s for s in self.schedule.steps if s < state.global_step]
        self.last_pruned_step = max(done) if done else -1
        self._install_hooks()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        sparsity = self.schedule.sparsity_for(state.global_step)
        if sparsity is not None and state.global_step > self.last_pruned_step:
            self.prune(model, sparsity, state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.enforce()

    def on_train_end(self, args, state, control, **kwargs):
        self.enforce()
        self.ranks_identical = self.check_ranks_identical()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ---- mechanics ---------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for name, module in self.targets.items():
            self._hooks.append(module.weight.register_hook(self._grad_hook(name)))

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            mask = self.masks.get(name)
            return grad if mask is None else grad * mask.to(grad.dtype)
        return hook

    @torch.no_grad()
    def enforce(self) -> None:
        for name, module in self.targets.items():
            module.weight.mul_(self.masks[name].to(module.weight.dtype))

    @torch.no_grad()
    def check_ranks_identical(self) -> bool:
        """All-gather a checksum of every target weight and its zeros; True when all processes agree."""
        rank, world = _dist()
        if world == 1 or not self.targets:
            return True
        local = torch.stack([torch.stack([m.weight.double().abs().sum(), (m.weight == 0).sum().double()])
                             for m in self.targets.values()])
        gathered = [torch.empty_like(local) for _ in range(world)]
        torch.distributed.all_gather(gathered, local)
        same = all(torch.equal(gathered[0], other) for other in gathered[1:])
        if not same and rank == 0:
            logger.error("Processes ended with different pruned weights; check the data loaders' determinism.")
        return same

    @property
    def sparsity(self) -> float:
        return sparsity_report(self.targets).overall if self.targets else 0.0

    def prune(self, model: torch.nn.Module, sparsity: float, step: int) -> None:
        """One pruning step to `sparsity`; identical result on every process."""
        start = time.perf_counter()
        rank, world = _dist()
        config = resolve_budget(self.config.replace(sparsity=sparsity), self.targets)
        if config.max_memory_gb is not None and config.method in STREAMING_METHODS:
            num_grads = self._prune_streaming(model, config, sparsity, step, rank, world)
        else:
            pruner = get_pruner(config)
            fisher = None
            if pruner.fisher_kind is not None:
                share = config.num_grads // world + (1 if rank < config.num_grads % world else 0)
                fisher = collect_fisher(
                    model, self.targets, self.calibration_batches(step, rank), num_grads=share,
                    block_size=config.fisher_block_size, kinds=(pruner.fisher_kind,), masks=self.masks,
                    label_free=config.label_free_fisher, loss_fn=self.loss_fn,
                    grad_chunk_size=config.grad_chunk_size, device=config.device, seed=config.seed + step + 1000 * rank,
                    accumulate=config.accumulation, damp=config.damp,
                )[pruner.fisher_kind]  # summed over processes inside ('sum' with several processes)
            num_grads = fisher.count if fisher is not None else 0  # summed over all processes
            pruner.prepare(self.targets, fisher)
            pruner.apply(self.targets, sparsity)
            del pruner, fisher
        if world > 1:  # the math is deterministic, but make sure every rank holds rank 0's weights
            for module in self.targets.values():
                torch.distributed.broadcast(module.weight.data, src=0)
        self.masks = current_masks(self.targets)
        seconds = time.perf_counter() - start
        achieved = self.sparsity
        self.last_pruned_step = step
        self.history.append({"step": step, "target": sparsity, "sparsity": achieved, "seconds": seconds,
                             "num_grads": num_grads, "processes": world})
        self._pending_log = {"sparsity": achieved, "prune_seconds": seconds}
        if rank == 0:
            logger.info("Pruned at step %d to %.4f (target %.4f) with %s in %.1f s", step, achieved, sparsity,
                        config.method, seconds)

    def _prune_streaming(self, model: torch.nn.Module, config: PruningConfig, sparsity: float, step: int,
                         rank: int, world: int) -> int:
        """CAP / OBS within config.max_memory_gb: layer groups, each with its own pass over this step's
        calibration batches (the same plan on every process; the Fisher sums are all-reduced per group)."""
        share = config.num_grads // world + (1 if rank < config.num_grads % world else 0)
        if share < 1:
            raise ValueError(f"num_grads={config.num_grads} is less than the {world} processes; raise num_grads.")
        rank_config = config.replace(num_grads=share, seed=config.seed + step + 1000 * rank)
        with StreamingPruner(rank_config) as pruner:
            pruner.prepare(model, self.targets, lambda: self.calibration_batches(step, rank), self.loss_fn)
            pruner.apply(self.targets, sparsity)
            return pruner.num_grads

    def pop_log(self) -> dict[str, float]:
        """Metrics of the last pruning step (once), for Trainer.log."""
        logs, self._pending_log = self._pending_log, {}
        return logs
