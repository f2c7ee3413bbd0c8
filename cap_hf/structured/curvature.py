"""What second-order structured pruning sees of a layer: its structures and the curvature of its input.

A structure is one channel of a group (ChannelGraph). Its removal takes the producers' rows (and norm
entries) away and the readers' columns; the error and the compensation are the readers'. An *uncoupled*
group has one reader: an attention head is a head_dim block of o_proj's input columns, an MLP neuron one
fc2 column, a ResNet block channel the k x k columns of the next convolution. A residual stream (a
*coupled* group) is read by several layers (each block's first convolution, the projection shortcuts, the
classifier): a stream channel's error is the sum of its readers' errors, each compensated with its own
curvature. Streams that pass through a LayerNorm (a ViT's) are kept whole: removing a channel there also
changes the norm's statistics, which no reader's curvature sees.

Two curvatures of the reader's input, both d_in x d_in (d_in = the reader's columns):
- "obs": the Hessian of the layer's reconstruction, X X^T / n over every input position of the
  calibration images (ZipLM). It needs no labels, so it serves backbones as they are. The reader's bias
  (or, for a convolution followed by a batch norm, that norm's running mean) is one more column, on a
  constant input of 1, so the compensation also moves the layer's mean output.
- "cap": the empirical Fisher of the loss shared by the reader's rows, sum_n G_n^T G_n / (n d_out) over
  per-image gradients G_n of the reader's weight (the project's Fisher gradients, cap_hf.engine.fisher): errors in
  units of the loss, so layers compare directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from cap_hf.structured.groups import ChannelGraph, ChannelGroup, Member

CURVATURES = ("obs", "cap")


@dataclass(eq=False)
class Reader:
    """One layer that reads a group: `columns[c]` are its weight columns (flattened (in, kh, kw)) of group
    channel c; `shift` = (kind, module name) of where its mean output is moved (its own bias, the running mean
    of the batch norm after it), or None."""

    member: Member
    columns: torch.Tensor  # (channels, unit x kh x kw)
    shift: tuple[str, str] | None

    @property
    def name(self) -> str:
        return self.member.name

    @property
    def module(self) -> nn.Module:
        return self.member.module

    @property
    def d_in(self) -> int:
        return self.module.weight[0].numel() + (self.shift is not None)

    def weight(self, model: nn.Module) -> torch.Tensor:
        """The reader's weight in `model` as (d_out, d_in), with the shift as the last column when there is one."""
        w = model.get_submodule(self.name).weight.detach().flatten(1).float()
        if self.shift is None:
            return w
        kind, holder = self.shift[0], model.get_submodule(self.shift[1])
        bias = holder.bias.detach() if kind == "bias" else -holder.running_mean.detach()
        return torch.cat([w, bias.float().unsqueeze(1)], dim=1)

    @torch.no_grad()
    def write(self, model: nn.Module, weight: torch.Tensor) -> None:
        """Write (d_out, d_in) weights into the reader of `model` (the same architecture: a copy) and its shift."""
        module = model.get_submodule(self.name)
        columns = module.weight[0].numel()
        module.weight.copy_(weight[:, :columns].reshape(module.weight.shape).to(module.weight.dtype))
        if self.shift is not None:
            kind, holder = self.shift[0], model.get_submodule(self.shift[1])
            if kind == "bias":
                holder.bias.copy_(weight[:, columns].to(holder.bias.dtype))
            else:
                holder.running_mean.copy_(-weight[:, columns].to(holder.running_mean.dtype))


@dataclass(eq=False)
class Structures:
    """The channels of one group and the layers that read them (one for an uncoupled group, several for a
    residual stream)."""

    group: ChannelGroup
    readers: list[Reader]

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def stream(self) -> bool:
        return self.group.coupled


def _batch_norm_after(graph: ChannelGraph, module: nn.Module) -> nn.BatchNorm2d | None:
    node = graph.dependencies.module2node[module]
    following = [out.module for out in node.outputs]
    return following[0] if len(following) == 1 and isinstance(following[0], nn.BatchNorm2d) else None


def _readable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _reader(graph: ChannelGraph, group: ChannelGroup, member: Member, shift: bool) -> Reader:
    module = member.module
    per_index = module.weight[0, 0].numel()  # k x k for a convolution, 1 for a linear layer
    indices = torch.tensor(member.channels).reshape(group.size, group.unit)
    columns = (indices.unsqueeze(2) * per_index + torch.arange(per_index)).reshape(group.size, -1)
    where = None
    if shift and getattr(module, "bias", None) is not None:
        where = ("bias", member.name)
    elif shift and isinstance(module, nn.Conv2d) and (norm := _batch_norm_after(graph, module)) is not None:
        where = ("running_mean", graph.names[id(norm)])
    return Reader(member, columns, where)


def find_structures(graph: ChannelGraph, shift: bool = True, streams: bool = True) -> list[Structures]:
    """The groups whose readers are all linear layers or (ungrouped) convolutions, in model order: every
    uncoupled group and, with `streams`, every residual stream without a LayerNorm. `shift`: give each reader
    its mean-output column where it has one (the "obs" curvature's)."""
    found = []
    for group in graph.groups:
        if not group.consumers or not all(_readable(m.module) for m in group.consumers):
            continue
        if group.coupled and (not streams or any(isinstance(n.module, nn.LayerNorm) for n in group.norms)):
            continue
        found.append(Structures(group, [_reader(graph, group, m, shift) for m in group.consumers]))
    found.sort(key=lambda s: graph.order[s.name])
    return found


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reader's inputs as rows of its columns: (positions, d_in) (im2col for a convolution)."""
    if isinstance(module, nn.Conv2d):
        cols = nn.functional.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                                    stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def rows_per_image(graph: ChannelGraph, reader: Reader, curvature: str) -> int:
    """How many rows of rank one an image adds to a reader's curvature: input positions for "obs", the reader's
    output rows for "cap" (each image's gradient is d_out x d_in)."""
    module = reader.module
    if curvature == "cap":
        return module.weight.shape[0]
    shape = graph.shapes[reader.name][1]  # the output: one row per output position
    return math.prod(shape[1:]) if isinstance(module, nn.Conv2d) else math.prod(shape[:-1])


def images_needed(graph: ChannelGraph, found: Iterable[Structures], curvature: str) -> tuple[int, str]:
    """The fewest calibration images whose curvature can have full rank in every reader, and the widest reader."""
    needed, widest = 0, ""
    for reader in (r for s in found for r in s.readers):
        images = -(-reader.d_in // rows_per_image(graph, reader, curvature))
        if images > needed:
            needed, widest = images, reader.name
    return needed, widest


@torch.no_grad()
def hessians(model: nn.Module, found: list[Structures], batches: Iterable[Mapping[str, torch.Tensor]]) -> tuple[
        dict[str, torch.Tensor], int]:
    """X X^T / n of every reader's input (plus the constant column of its shift), over all the batches, by
    reader name; returns them and the number of images seen."""
    readers = [r for s in found for r in s.readers]
    sums = {r.name: torch.zeros(r.d_in, r.d_in, dtype=torch.float64, device=r.module.weight.device) for r in readers}
    counts = dict.fromkeys(sums, 0)
    by_module = {id(r.module): r for r in readers}

    def record(module, inputs):
        r = by_module[id(module)]
        rows = _rows(module, inputs[0].detach()).double()
        if r.shift is not None:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)], dim=1)
        sums[r.name].addmm_(rows.T, rows)
        counts[r.name] += rows.shape[0]

    hooks = [r.module.register_forward_pre_hook(record) for r in readers]
    images = 0
    device = next(model.parameters()).device
    try:
        for batch in batches:
            pixels = batch["pixel_values"].to(device)
            model(pixel_values=pixels)
            images += pixels.shape[0]
    finally:
        for hook in hooks:
            hook.remove()
    return {name: total / max(1, counts[name]) for name, total in sums.items()}, images


def fishers(model: nn.Module, found: list[Structures], batches: Iterable[Mapping[str, torch.Tensor]], num_grads: int,
            *, label_free: bool = False, loss_fn: Callable | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """sum_n G_n^T G_n / (num_grads x d_out) of every reader's weight gradients, by reader name (one per batch, through
    cap_hf.engine.gradients.iter_gradients: eval mode, fp32, masked by nothing)."""
    from cap_hf.engine.gradients import iter_gradients

    targets = {r.name: r.module for s in found for r in s.readers}
    shapes = {name: module.weight.flatten(1).shape for name, module in targets.items()}
    sums = {name: torch.zeros(shape[1], shape[1], dtype=torch.float64, device=targets[name].weight.device)
            for name, shape in shapes.items()}
    for grads in iter_gradients(model, targets, batches, num_grads, label_free=label_free, loss_fn=loss_fn,
                                seed=seed):
        for name, g in grads.items():
            g = g.reshape(shapes[name]).double()
            sums[name].addmm_(g.T, g)
    return {name: total / (num_grads * shapes[name][0]) for name, total in sums.items()}
