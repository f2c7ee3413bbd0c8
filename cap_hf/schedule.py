"""Gradual sparsity schedules (in optimizer steps) and the cyclic-linear learning rate of the CAP paper."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from itertools import pairwise


@dataclass(frozen=True)
class SparsitySchedule:
    """Pruning steps (optimizer steps, sorted) and the target sparsity reached at each of them."""

    steps: tuple[int, ...]
    sparsities: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.steps) != len(self.sparsities) or not self.steps:
            raise ValueError("A sparsity schedule needs one sparsity per pruning step, and at least one step.")
        if list(self.steps) != sorted(set(self.steps)):
            raise ValueError(f"Pruning steps must be strictly increasing, got {list(self.steps)}.")
        if any(b < a for a, b in pairwise(self.sparsities)):
            raise ValueError(f"Sparsities must not decrease along the schedule, got {list(self.sparsities)}.")
        if not all(0.0 <= s < 1.0 for s in self.sparsities):
            raise ValueError(f"Every scheduled sparsity must be in [0, 1), got {list(self.sparsities)}.")

    def target_at(self, step: int) -> float:
        """The sparsity the model should have after the pruning steps up to and including `step`."""
        index = bisect.bisect_right(self.steps, step) - 1
        return self.sparsities[index] if index >= 0 else 0.0

    def sparsity_for(self, step: int) -> float | None:
        """The sparsity to prune to at `step`, or None if `step` is not a pruning step."""
        index = bisect.bisect_left(self.steps, step)
        return self.sparsities[index] if index < len(self.steps) and self.steps[index] == step else None


def interpolate(init: float, final: float, fraction: float, inter_func: str) -> float:
    fraction = min(max(fraction, 0.0), 1.0)
    if inter_func == "linear":
        return init + (final - init) * fraction
    return final + (init - final) * (1.0 - fraction) ** 3  # cubic: fast early, slow late


def parse_explicit(spec: str, name: str = "pruning_schedule", unit: str = "epoch") -> list[tuple[float, float]]:
    """'0:0.4,20:0.5,40:0.6' -> [(0, 0.4), (20, 0.5), (40, 0.6)] (epoch or step, sparsity) pairs."""
    pairs = []
    for item in spec.split(","):
        if not item.strip():
            continue
        try:
            when, sparsity = item.split(":")
            pairs.append((float(when), float(sparsity)))
        except ValueError:
            raise ValueError(f"{name} items must be '{unit}:sparsity' (e.g. '0:0.4,2:0.6'), got {item!r}.") \
                from None
    if not pairs:
        raise ValueError(f"{name} is empty.")
    return pairs


def check_schedule_values(final_sparsity: float, init_sparsity: float | None = None, inter_func: str = "cubic",
                          frequency_epochs: float | None = None) -> None:
    """What can be checked before the run's length is known (scripts call it before loading data)."""
    if not 0.0 <= final_sparsity < 1.0:
        raise ValueError(f"The final sparsity must be in [0, 1), got {final_sparsity}.")
    if init_sparsity is not None and not 0.0 <= init_sparsity <= final_sparsity:
        raise ValueError(f"init_sparsity ({init_sparsity}) must be in [0, sparsity={final_sparsity}]: pruning never "
                         "lowers the sparsity.")
    if inter_func not in ("cubic", "linear"):
        raise ValueError(f"inter_func must be 'linear' or 'cubic', got {inter_func!r}.")
    if frequency_epochs is not None and frequency_epochs <= 0:
        raise ValueError("pruning_frequency_epochs must be positive.")


def build_schedule(
    final_sparsity: float,
    total_steps: int,
    steps_per_epoch: float,
    init_sparsity: float | None = None,
    start_epoch: float = 0.0,
    end_epoch: float | None = None,
    frequency_epochs: float | None = None,
    num_pruning_steps: int | None = None,
    inter_func: str = "cubic",
    explicit: str | list[tuple[float, float]] | None = None,
    unit: str = "epoch",
) -> SparsitySchedule:
    """Turn the recipe vocabulary (epochs, or optimizer steps with unit='step' and steps_per_epoch 1: the
    times and messages are then in steps) into pruning steps (optimizer steps).

    Defaults adapt to the run: pruning starts at step 0 and ends two thirds into training, with four
    pruning steps (or one per `frequency_epochs`); the rest of training holds the final sparsity.
    Raises ValueError when the schedule does not fit into `total_steps`.
    """
    if total_steps < 1:
        raise ValueError("The run has no optimizer steps; increase num_train_epochs or max_steps.")
    total_epochs = total_steps / steps_per_epoch

    def to_step(epoch: float) -> int:
        return int(round(epoch * steps_per_epoch))

    name = "pruning_schedule" + ("_steps" if unit == "step" else "")
    if explicit is not None:
        pairs = parse_explicit(explicit, name, unit) if isinstance(explicit, str) else list(explicit)
        steps = [to_step(e) for e, _ in pairs]
        if steps[-1] >= total_steps:
            raise ValueError(f"{name} prunes at {unit} {pairs[-1][0]:g}, but the run has only "
                             f"{total_epochs:.2f} {unit}s ({total_steps} steps).")
        return SparsitySchedule(tuple(steps), tuple(s for _, s in pairs))

    check_schedule_values(final_sparsity, init_sparsity, inter_func, frequency_epochs)
    init = 0.5 * final_sparsity if init_sparsity is None else init_sparsity
    end_epoch = (2.0 / 3.0) * total_epochs if end_epoch is None else end_epoch
    if start_epoch < 0 or end_epoch < start_epoch:
        raise ValueError(f"Pruning must start before it ends: start {unit} {start_epoch:g}, end {unit} {end_epoch:g}.")
    if to_step(end_epoch) >= total_steps:
        raise ValueError(f"The last pruning step ({unit} {end_epoch:g}) must come before the end of training "
                         f"({total_epochs:.2f} {unit}s, {total_steps} steps); lower pruning_end_{unit} or train longer.")
    if frequency_epochs is not None:
        count = int(math.floor((end_epoch - start_epoch) / frequency_epochs + 1e-9)) + 1
        epochs = [start_epoch + i * frequency_epochs for i in range(count)]
    else:
        count = num_pruning_steps or 4
        epochs = ([start_epoch] if count == 1 else
                  [start_epoch + i * (end_epoch - start_epoch) / (count - 1) for i in range(count)])
    steps = sorted({to_step(e) for e in epochs})
    if len(steps) < len(epochs):
        raise ValueError(f"{len(epochs)} pruning steps do not fit between {unit}s {start_epoch:g} and {end_epoch:g} "
                         f"({to_step(end_epoch) - to_step(start_epoch)} optimizer steps); use fewer pruning steps.")
    span = max(steps[-1] - steps[0], 1)
    sparsities = [interpolate(init, final_sparsity, (s - steps[0]) / span, inter_func) for s in steps]
    if len(steps) == 1:
        sparsities = [final_sparsity]
    sparsities[-1] = final_sparsity
    return SparsitySchedule(tuple(steps), tuple(sparsities))


def cyclic_linear_factor(schedule: SparsitySchedule, total_steps: int, min_ratio: float):
    """LambdaLR factor: the LR restarts at every pruning step and falls linearly to min_ratio * max
    before the next one (the last cycle runs to the end of training)."""
    bounds = sorted(set([0, *schedule.steps]))

    def factor(step: int) -> float:
        index = bisect.bisect_right(bounds, step) - 1
        start = bounds[index]
        end = bounds[index + 1] if index + 1 < len(bounds) else total_steps
        length = max(end - start, 1)
        return 1.0 - (step - start) / length * (1.0 - min_ratio)

    return factor
