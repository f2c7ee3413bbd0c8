"""What a structured result is judged by: parameters, MACs, and measured latency."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def images(model: nn.Module, batch_size: int, image_size: int | Sequence[int]) -> torch.Tensor:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    param = next(model.parameters())
    return torch.randn(batch_size, model.config.num_channels, *size, generator=torch.Generator().manual_seed(0)).to(
        device=param.device, dtype=param.dtype)


def count_macs(model: nn.Module, image_size: int | Sequence[int]) -> int:
    """Multiply-accumulates of one image's forward pass (torch's FLOP counter, every aten op: convolutions,
    linears and attention's matmuls alike), halved from FLOPs."""
    return module_macs(model, (), {"pixel_values": images(model, 1, image_size)})


@torch.inference_mode()
def module_macs(module: nn.Module, args: tuple, kwargs: Mapping) -> int:
    """Multiply-accumulates of one call of `module` on these arguments (count_macs of a part of a model)."""
    with FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return int(counter.get_total_flops() // 2)


@torch.inference_mode()
def latencies_ms(models: Sequence[nn.Module], image_size: int | Sequence[int], batch_size: int, repeats: int = 30,
                 warmup: int = 5) -> list[float]:
    """Median wall time of one forward pass of each model at `batch_size`, in milliseconds. The models take
    turns pass by pass (warm-up first), so drifts of the machine fall on all of them alike; CUDA is
    synchronised. Thread count: torch.get_num_threads(), recorded by the caller."""
    inputs = [images(model, batch_size, image_size) for model in models]
    calls = [functools.partial(model, pixel_values=x) for model, x in zip(models, inputs, strict=True)]
    return time_calls(calls, repeats, warmup, cuda=any(x.device.type == "cuda" for x in inputs))


@torch.inference_mode()
def time_calls(calls: Sequence[Callable[[], object]], repeats: int = 30, warmup: int = 5, cuda: bool = False
               ) -> list[float]:
    """Median wall time of each call in milliseconds, the calls taking turns (warm-up passes first)."""
    times: list[list[float]] = [[] for _ in calls]
    for i in range(warmup + repeats):
        for call, kept in zip(calls, times, strict=True):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                kept.append((time.perf_counter() - start) * 1000)
    return [statistics.median(kept) for kept in times]


def compare_models(dense: nn.Module, pruned: nn.Module, image_size: int | Sequence[int], batch_sizes: Sequence[int],
                   repeats: int = 30) -> dict:
    """Parameters, MACs and latency (per batch size, the two models taking turns) of a dense model and its
    pruned copy: params_/macs_dense|pruned, latency_ms_dense|pruned and speedup as {str(batch): value}."""
    result = {"params_dense": count_parameters(dense), "params_pruned": count_parameters(pruned),
              "macs_dense": count_macs(dense, image_size), "macs_pruned": count_macs(pruned, image_size),
              "latency_ms_dense": {}, "latency_ms_pruned": {}, "speedup": {}}
    for batch in batch_sizes:
        before, after = latencies_ms([dense, pruned], image_size, batch, repeats)
        result["latency_ms_dense"][str(batch)] = before
        result["latency_ms_pruned"][str(batch)] = after
        result["speedup"][str(batch)] = before / after
    return result

