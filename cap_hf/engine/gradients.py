"""The one loop of backward passes over calibration batches (the engine, the structured curvature, the
benchmarks and the tests use it) and the losses whose gradients it takes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cap_hf.engine.calibration import check_enough_batches, too_few_batches
from cap_hf.engine.memory import PhaseProfiler, maybe_phase


def default_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], label_free: bool,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy of the model's logits; with label_free, labels sampled from its own softmax."""
    outputs = model(pixel_values=batch["pixel_values"])
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError(f"{type(model).__name__} returns no logits, so the cross-entropy Fisher has no loss. Use "
                         "--fisher_objective features (the Fisher of its output features, no labels needed), give it a "
                         "classification head, or pass loss_fn(model, batch).")
    if label_free:
        probs = torch.softmax(logits.detach().float(), dim=-1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        if "labels" not in batch:
            raise ValueError("The calibration batch has no 'labels'; pass a dataset with a label column or "
                             "use label_free_fisher=True (labels sampled from the model's predictions).")
        labels = batch["labels"]
    return F.cross_entropy(logits.float(), labels.to(logits.device))


@contextlib.contextmanager
def gradients_only_for(model: nn.Module, weights: Iterable[torch.Tensor]):
    """Eval mode, and only `weights` require grad: autograd keeps no activations before the first of them
    and backpropagates no further. The model's mode and every requires_grad flag are restored after."""
    weights = list(weights)
    was_training = model.training
    saved = {p: p.requires_grad for p in model.parameters()}
    for w in weights:
        saved.setdefault(w, w.requires_grad)
    wanted = {id(w) for w in weights}
    try:
        for p in saved:
            p.requires_grad_(id(p) in wanted)
        model.eval()
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)


def batch_loss(model: nn.Module, batch: Mapping, loss_fn: Callable | None, label_free: bool,
               generator: torch.Generator | None) -> torch.Tensor:
    """The Fisher's loss of one calibration batch, moved to the model's device, in fp32 (no autocast)."""
    param = next(model.parameters())
    batch = {k: v.to(param.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.enable_grad(), torch.autocast(device_type=param.device.type, enabled=False):
        return loss_fn(model, batch) if loss_fn is not None else default_loss(model, batch, label_free, generator)


def iter_gradients(model: nn.Module, targets: Mapping[str, nn.Module], batches: Iterable[Mapping[str, torch.Tensor]],
                   num_grads: int, *, masks: Mapping[str, torch.Tensor] | None = None, label_free: bool = False,
                   loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
                   seed: int = 0, progress: bool = False, profiler: PhaseProfiler | None = None,
                   on_batch: Callable[[int, Mapping[str, torch.Tensor]], None] | None = None,
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """One backward pass per calibration batch, for the first `num_grads` batches: yields {name: the flat
    fp32 gradient of the target's weight, times its mask (True = kept)}.

    Gradients come from torch.autograd.grad in eval mode and fp32 (gradients_only_for), so nothing is
    accumulated into .grad and no DDP reducer hook fires. Non-finite gradients raise, naming the layer.
    `on_batch(index, batch)` sees every batch before its backward pass; `profiler` times "gradients".
    """
    check_enough_batches(batches, num_grads)
    names = list(targets)
    weights = [targets[name].weight for name in names]
    masks = {name: mask.reshape(-1).to(targets[name].weight.device, torch.bool)
             for name, mask in (masks or {}).items() if name in targets and not bool(mask.all())}  # layers with zeros
    param = next(model.parameters())
    generator = torch.Generator(device=param.device).manual_seed(seed) if label_free else None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=num_grads, desc="Fisher gradients")
    collected = 0
    try:
        with gradients_only_for(model, weights):
            for batch in batches:
                with maybe_phase(profiler, "gradients"):
                    if on_batch is not None:
                        on_batch(collected, batch)
                    grads = list(torch.autograd.grad(batch_loss(model, batch, loss_fn, label_free, generator), weights,
                                                     allow_unused=True))
                    flat = {}
                    for index, name in enumerate(names):
                        grad, grads[index] = grads[index], None  # a masked copy replaces autograd's gradient
                        if grad is None:
                            raise RuntimeError(f"Layer {name} received no gradient; is it used in the forward pass?")
                        g = grad.detach().reshape(-1).float()
                        if not bool(torch.isfinite(g).all()):
                            raise FloatingPointError(
                                f"Non-finite gradient in layer {name} at calibration batch {collected}. Check the "
                                "model for inf/NaN weights, and compute the Fisher in fp32 (no fp16 autocast).")
                        flat[name] = g * masks[name] if name in masks else g
                        del grad, g
                collected += 1
                if bar is not None:
                    bar.update(1)
                yield flat
                del flat  # the consumer has them: no second set of gradients during the next backward pass
                if collected >= num_grads:
                    break
    finally:
        if bar is not None:
            bar.close()
    if collected < num_grads:
        raise ValueError(too_few_batches(collected, num_grads))
