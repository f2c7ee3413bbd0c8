"""CAPPruningCallback: gradual pruning for any `transformers.Trainer`.

- On scheduled optimizer steps it runs one step of the pruning engine (cap_hf.engine.pruner.Pruner), shared out
  over the processes (cap_hf.engine.ranks): each computes its share of the Fisher gradients, builds the Fisher of
  the layers it owns from every process's gradients and prunes them, and every process ends with the same
  weights (checked by a checksum at the end of training).
- Between pruning steps it keeps the masks exact: gradient hooks zero the gradients of pruned
  weights during backward (before clipping, accumulation and the all-reduce), and the weights are
  re-masked after every optimizer step (AdamW momentum and weight decay would revive them otherwise).
- Masks come from the weights' zeros at the start of training, so resuming from a checkpoint neither
  re-densifies nor re-prunes. (With a plain Trainer on transformers 5.23, resuming ViT-family models
  does not load the renamed weights; CAPTrainer fixes that, see docs/design.md.)
- Its metrics (`sparsity` in every log, `prune_seconds` after a pruning step) go into the Trainer's own
  logs through `on_log`: trainer_state.json and the console show them with any Trainer, and so do the
  reporting integrations (TensorBoard, W&B, ...) when the callback comes before them (`add_to(trainer)`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from cap_hf.config import PruningConfig
from cap_hf.engine.calibration import calibration_seed
from cap_hf.engine.pruner import Pruner
from cap_hf.engine.ranks import Ranks
from cap_hf.masks import current_masks, sparsity_report
from cap_hf.schedule import SparsitySchedule
from cap_hf.targets import find_targets

logger = logging.getLogger(__name__)


class CAPPruningCallback(TrainerCallback, ExportableState):
    """Prune on a schedule and keep the masks.

    Args:
        config: what a pruning step does (method, Fisher settings, targets); the schedule sets the sparsity
            of every step (an N:M structure fixes it).
        schedule: pruning steps (optimizer steps) and their sparsities, or a callable
            `total_steps -> SparsitySchedule` resolved when training starts.
        calibration_batches: `(step, rank) -> iterable of batches` for the Fisher; each batch is one
            gradient, and a rank reads its share of config.num_grads. Needed by every method with a Fisher. Use cap_hf.engine.calibration.calibration_seed(seed,
            step, rank) to seed them.
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

    def add_to(self, trainer) -> CAPPruningCallback:
        """Put this callback first among the trainer's callbacks, so that the reporting integrations see
        its metrics too (Trainer(callbacks=[...]) places it after them)."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

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

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending_log and args.logging_strategy != "no":  # log right after a pruning step
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the pruning metrics to what the Trainer logs (and to the entry it keeps in log_history)."""
        if logs is None or not self.targets:
            return
        extra = {"sparsity": round(self.sparsity, 6), **self._pending_log}
        self._pending_log = {}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:  # Trainer.log's entry
            state.log_history[-1].update(extra)

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
        ranks = Ranks.current()
        if not ranks.distributed or not self.targets:
            return True
        local = [[float(m.weight.double().abs().sum()), int((m.weight == 0).sum())] for m in self.targets.values()]
        gathered = ranks.gather_objects(local, "the pruned weights' checksums")
        same = all(other == gathered[0] for other in gathered[1:])
        if not same and ranks.rank == 0:
            logger.error("Processes ended with different pruned weights; check the data loaders' determinism.")
        return same

    @property
    def sparsity(self) -> float:
        return sparsity_report(self.targets).overall if self.targets else 0.0

    def prune(self, model: torch.nn.Module, sparsity: float, step: int) -> None:
        """One pruning step to `sparsity` (an N:M structure fixes it); identical result on every process."""
        start = time.perf_counter()
        here = Ranks.current()
        rank, world = here.rank, here.world
        (sparsity,) = self.config.sparsity_levels([sparsity])
        config = self.config.replace(sparsity=sparsity,
                                     calibration_seed=calibration_seed(self.config.calibration_seed, step, rank))
        with Pruner(model, config, targets=self.targets, loss_fn=self.loss_fn) as pruner:  # shared out over ranks
            batches = (lambda: self.calibration_batches(step, rank)) if config.needs_fisher else None
            pruner.prepare(batches)
            pruner.apply()  # every rank ends with every owner's new weights
            num_grads = pruner.num_grads
        self.masks = current_masks(self.targets)
        seconds = time.perf_counter() - start
        achieved = self.sparsity
        self.last_pruned_step = step
        self.history.append({"step": step, "target": sparsity, "sparsity": achieved, "seconds": seconds,
                             "num_grads": num_grads, "processes": world})
        self._pending_log = {"prune_seconds": round(seconds, 3)}
        if rank == 0:
            logger.info("Pruned at step %d to %.4f (target %.4f) with %s in %.1f s", step, achieved, sparsity,
                        config.method, seconds)
