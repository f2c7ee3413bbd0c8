"""Layer-wise reconstruction: each layer of a pruned model refitted, in the order the model runs them, so that its
output on the pruned model's own inputs matches the dense model's output of the same layer (kept channels).

The removal updates (OBS) compensate each layer for its own lost inputs as if every earlier layer were exact; the
errors of the earlier layers still build up through the depth. Here layer l, with the inputs it receives in the
pruned model (every earlier layer already refitted), gets the weights that best reproduce the dense layer's output
on calibration images (the least-squares reconstruction of He et al., ICCV 2017, run layer after layer):

    W = argmin ||Y_dense - W X||^2 + lambda ||W - W_0||^2 = (Y X^T + lambda W_0) (X X^T + lambda I)^-1

with X the layer's inputs (a convolution's unfolded k x k patches, one row per position) with a column of ones for
the bias, W_0 the weights it has (the fit stays there where the data says nothing), and lambda a fraction of the
mean diagonal of X X^T. A layer without a bias whose output goes straight into a batch norm of the same parent
module (a ResNet's convolution and its normalization) takes its bias in that batch norm's running mean. Grouped convolutions are left as they are.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cap_hf.engine.calibration import first_images
from cap_hf.structured.config import RELATIVE_DAMP
from cap_hf.structured.groups import ChannelGraph

LAYERS = (nn.Conv2d, nn.Linear)


class _Stop(Exception):
    """Raised by a hook once it holds what it came for: the rest of the forward pass is not needed."""


def removed_outputs(graph: ChannelGraph, plan: Mapping[int, Sequence[int]]) -> dict[str, list[int]]:
    """{producer name: the output indices removed from it} for a removal plan of `graph`'s groups."""
    removed: dict[str, set[int]] = {}
    for index, channels in plan.items():
        group = graph.groups[index]
        for producer in group.producers:
            removed.setdefault(producer.name, set()).update(group.indices(producer, channels))
    return {name: sorted(indices) for name, indices in removed.items()}


@torch.no_grad()
def _call_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The names of the layers and batch norms in the order a forward pass calls them (first call)."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda _m, _i, _o, name=name: order.append(name) if name not in order else None)
               for name, m in model.named_modules() if isinstance(m, (*LAYERS, nn.BatchNorm2d))]
    try:
        model(pixel_values=x)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as one row per output position: [positions, in_features] (a convolution's unfolded
    patches, in the order of its flattened weight)."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # [B, C*k*k, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _outputs(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer's output as [positions, out_features]."""
    if isinstance(layer, nn.Conv2d):
        return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


@torch.no_grad()
def _capture(model: nn.Module, module: nn.Module, x: torch.Tensor, want: str) -> torch.Tensor:
    """The input (want="in") or output ("out") of `module` when `model` runs on x; the pass stops there."""
    held = []

    def hook(_m, inputs, output):
        held.append(inputs[0] if want == "in" else output)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        model(pixel_values=x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return held[0]


def _relative_error(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, norm_y: float) -> float:
    """||Y - W X||^2 / ||Y||^2 from the sums the fit keeps: (||Y||^2 - 2 tr(W C) + tr(W G W^T)) / ||Y||^2."""
    error = norm_y - 2 * float((weight * cross.T).sum()) + float((weight @ gram * weight).sum())
    return max(error, 0.0) / max(norm_y, 1e-30)


@torch.no_grad()
def reconstruct_layers(dense: nn.Module, pruned: nn.Module, graph: ChannelGraph, plan: Mapping[int, Sequence[int]],
                       images: Sequence[torch.Tensor], relative_damp: float = RELATIVE_DAMP) -> dict:
    """Refit every convolution and linear layer of `pruned` (in place, in call order) to the dense model's layer
    outputs on `images` (batches of pixel values), as in the module docstring. `graph` is the dense model's and
    `plan` the removal that made `pruned` from it (which outputs each layer kept). Returns the record:
    layers refitted, images, and the mean relative output error of the layers before and after their refit."""
    start = time.perf_counter()
    removed = removed_outputs(graph, plan)
    dense_modules, small_modules = dict(dense.named_modules()), dict(pruned.named_modules())
    order = _call_order(pruned, images[0][:1])
    before, after, layers = [], [], 0
    for position, name in enumerate(order):
        layer = small_modules[name]
        reference = dense_modules.get(name)
        if not isinstance(layer, LAYERS) or type(reference) is not type(layer) or getattr(layer, "groups", 1) != 1:
            continue
        gone = set(removed.get(name, ()))
        keep = [i for i in range(reference.weight.shape[0]) if i not in gone]
        if len(keep) != layer.weight.shape[0]:
            raise RuntimeError(f"{name} has {layer.weight.shape[0]} outputs where the plan keeps {len(keep)}; "
                               "please report this.")
        follower = order[position + 1] if position + 1 < len(order) else None
        if follower is not None and follower.rpartition(".")[0] != name.rpartition(".")[0]:
            follower = None  # a batch norm of another module (a sibling's: conv + its norm, as transformers' ResNet)
        norm = small_modules[follower] if layer.bias is None and follower is not None else None
        norm = norm if isinstance(norm, nn.BatchNorm2d) and norm.num_features == len(keep) else None
        with_bias = layer.bias is not None or norm is not None
        weight = layer.weight.detach().reshape(len(keep), -1).double()
        if layer.bias is not None:
            bias = layer.bias.detach().double()
        elif norm is not None:  # the batch norm's mean, moved from the dense one's: the bias the layer has now
            bias = (dense_modules[follower].running_mean[keep] - norm.running_mean).double()
        w0 = torch.cat([weight, bias[:, None]], 1) if with_bias else weight
        gram = torch.zeros(w0.shape[1], w0.shape[1], dtype=torch.float64, device=w0.device)
        cross = torch.zeros(w0.shape[1], len(keep), dtype=torch.float64, device=w0.device)
        norm_y = 0.0
        for x in images:
            rows = _rows(layer, _capture(pruned, layer, x, "in")).double()
            target = _outputs(reference, _capture(dense, reference, x, "out")).double()[:, keep]
            if with_bias:
                rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
            gram += rows.T @ rows
            cross += rows.T @ target
            norm_y += float(target.pow(2).sum())
        damp = relative_damp * float(gram.diagonal().mean()) or relative_damp
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        fitted = torch.linalg.solve(gram + damp * eye, cross + damp * w0.T).T  # [out, in (+1)]
        new_weight = fitted[:, : weight.shape[1]] if with_bias else fitted
        layer.weight.copy_(new_weight.reshape(layer.weight.shape).to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(fitted[:, -1].to(layer.bias.dtype))
        elif norm is not None:
            norm.running_mean.copy_((dense_modules[follower].running_mean[keep].double() - fitted[:, -1]).to(
                norm.running_mean.dtype))
        before.append(_relative_error(w0, gram, cross, norm_y))
        after.append(_relative_error(fitted, gram, cross, norm_y))
        layers += 1
    if not layers:
        raise ValueError("No layer of the pruned model matches one of the dense model by name: is it the dense model "
                         "it was pruned from?")
    return {"layers": layers, "images": sum(len(x) for x in images), "relative_damp": relative_damp,
            "error_before": sum(before) / max(len(before), 1), "error_after": sum(after) / max(len(after), 1),
            "seconds": time.perf_counter() - start}


def reconstruct(dense: nn.Module, pruned: nn.Module, run, image_size: int | Sequence[int],
                batches: Iterable[Mapping[str, torch.Tensor]], images: int, relative_damp: float = RELATIVE_DAMP) -> dict:
    """reconstruct_layers on the first `images` images of `batches` (held in memory: every layer reads them
    again) for `run`, a ChannelPruning (prune_channels) or SecondOrderPruning (prune_second_order) whose result is
    `pruned`, on the dense model it came from: the layer scales folded first where the run folded them (a DINOv2
    under obs / cap), so that both models' layers compute the same thing. In place; no labels are read."""
    from cap_hf.structured.second_order import fold_layer_scales

    if images < 1:
        raise ValueError(f"images must be positive, got {images}.")
    device = next(pruned.parameters()).device
    held = [batch["pixel_values"].to(device) for batch in first_images(batches, images)]
    if not held:
        raise ValueError("The batches held no images to reconstruct the layers from.")
    reference = fold_layer_scales(dense)[0] if getattr(run, "layer_scales_folded", 0) else dense
    return reconstruct_layers(reference, pruned, ChannelGraph(reference, image_size), run.plan, held, relative_damp)
