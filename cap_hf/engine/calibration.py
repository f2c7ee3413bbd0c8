"""Calibration batches for the Fisher: one seeding rule, loaders built like the Trainer's, and replay.

One batch is one Fisher gradient. A step that runs in several layer groups reads its batches once per
group, so they must be the same every time: `Replay` restores every random state the loader draws from
before each pass and checks a fingerprint of every batch against the first pass.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch


def calibration_seed(seed: int | None, step: int = 0, rank: int = 0) -> int:
    """The seed of the calibration batches (their order) and of label-free labels for pruning step `step`
    on process `rank`: different for every step and rank, the same on every run with the same seed."""
    return (int(seed or 0) + 1_000_003 * int(step) + 7_919 * int(rank)) % (2 ** 63)


def too_few_batches(available: int, needed: int, images: int | None = None, batch_size: int | None = None,
                    world: int = 1) -> str:
    """The one message for calibration data too short for the Fisher (one batch per gradient)."""
    where = "" if images is None else f" ({images} images in the calibration split, in batches of {batch_size})"
    share = f" (each of the {world} processes computes its share of --num_grads)" if world > 1 else ""
    return (f"The calibration data holds {available} batches{where}, but {needed} Fisher gradients are needed"
            f"{share}: one batch of --grad_batch_size images per gradient. Lower --num_grads or --grad_batch_size, or "
            "use a larger calibration split.")


def check_calibration_size(num_images: int, num_grads: int, grad_batch_size: int, world: int = 1) -> None:
    """Before any work: a calibration split of `num_images` gives each of `world` processes its share of
    `num_grads` full batches (cap_hf.io.data.calibration_loader drops the last, partial one; every process draws from the
    whole split with its own seed)."""
    needed = -(-int(num_grads) // max(1, int(world)))
    available = int(num_images) // int(grad_batch_size)
    if available < needed:
        raise ValueError(too_few_batches(available, needed, num_images, grad_batch_size, world))


def check_enough_batches(batches: Iterable, num_grads: int) -> None:
    """Fail before any backward pass when calibration batches of known length are too few."""
    try:
        available = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return  # a generator or an iterable dataset: checked when it runs out
    if available < num_grads:
        raise ValueError(too_few_batches(available, num_grads))


class Replay:
    """Iterates calibration batches identically as many times as called: restores the RNG states (torch,
    CUDA, numpy, random, the DataLoader's generator) before every pass and checks a fingerprint of every
    batch (`check`, given to the gradient loop as on_batch) against the first pass."""

    def __init__(self, batches: Iterable | Callable[[], Iterable]):
        self.factory = batches if callable(batches) and not hasattr(batches, "__iter__") else None
        if self.factory is None and isinstance(batches, Iterator):  # iter() itself could draw from an RNG
            raise ValueError("The layer groups of this step read the calibration batches once each, so they must be "
                             "re-iterable: pass a list, a DataLoader, or a callable returning a fresh iterable (not a "
                             "generator or an iterator).")
        self.batches = batches
        self.generators = [g for g in (getattr(batches, "generator", None),
                                       getattr(getattr(batches, "sampler", None), "generator", None))
                           if isinstance(g, torch.Generator)]
        self.states = self._capture()
        self.fingerprints: list[tuple] | None = None
        self._current: list[tuple] = []

    def _capture(self):
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return (torch.get_rng_state(), cuda, np.random.get_state(), random.getstate(),
                [g.get_state() for g in self.generators])

    def _restore(self) -> None:
        cpu, cuda, np_state, py_state, gens = self.states
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)
        for g, state in zip(self.generators, gens, strict=True):
            g.set_state(state)

    def __call__(self) -> Iterable:
        """A new pass over the batches, from the same random states as the first."""
        if self._current:
            self.fingerprints = self.fingerprints or self._current
        self._current = []
        self._restore()
        return self.factory() if self.factory is not None else self.batches

    def check(self, index: int, batch: Mapping) -> None:
        values = tuple((k, tuple(v.shape), float(v.detach().double().sum())) for k, v in sorted(batch.items())
                       if torch.is_tensor(v))
        self._current.append(values)
        if self.fingerprints is not None and (index >= len(self.fingerprints) or self.fingerprints[index] != values):
            raise ValueError(
                f"Calibration batch {index} differs between passes over the layer groups. Every group re-reads the "
                "calibration data, which must give the same batches each time: use a DataLoader without random "
                "augmentation (cap_hf.io.data.calibration_loader), or a list of batches."
            )

    def __len__(self) -> int:
        return len(self.factory() if self.factory is not None else self.batches)  # type: ignore[arg-type]


def first_images(batches: Iterable[Mapping[str, torch.Tensor]], count: int) -> Iterator[Mapping[str, torch.Tensor]]:
    """The batches up to `count` images (the last one cut)."""
    seen = 0
    for batch in batches:
        if seen >= count:
            return
        take = min(count - seen, batch["pixel_values"].shape[0])
        seen += take
        yield {**batch, "pixel_values": batch["pixel_values"][:take]}


def first_pass(batches: Iterable | Callable[[], Iterable]) -> Iterable:
    """The batches of a step that reads them once."""
    return batches() if callable(batches) and not hasattr(batches, "__iter__") else batches
