"""ResNet with per-block inner widths and shortcuts (physically smaller after channel pruning).

transformers' ResNet (stem and stage widths from `embedding_size` / `hidden_sizes`), with each
residual block's inner convolutions and batch norms rebuilt at the widths in the config, and its
shortcut a projection or the identity as the config says. Imports only transformers and torch, so it
travels with the checkpoint.
"""

import warnings

from torch import nn
from transformers import ResNetForImageClassification, ResNetModel
from transformers.models.resnet.modeling_resnet import ResNetShortCut

from .configuration_pruned_resnet import PrunedResNetConfig


def _resize_blocks(resnet: ResNetModel, config: PrunedResNetConfig) -> None:
    blocks = [block for stage in resnet.encoder.stages for block in stage.layers]
    shortcuts = config.block_shortcuts or [not isinstance(block.shortcut, nn.Identity) for block in blocks]
    for block, widths, projection in zip(blocks, config.block_widths, shortcuts, strict=True):
        convs = list(block.layer)
        channels = [convs[0].convolution.in_channels, *widths, convs[-1].convolution.out_channels]
        for conv_layer, c_in, c_out in zip(convs, channels[:-1], channels[1:], strict=True):
            old = conv_layer.convolution
            conv_layer.convolution = nn.Conv2d(c_in, c_out, kernel_size=old.kernel_size, stride=old.stride,
                                               padding=old.padding, dilation=old.dilation, bias=old.bias is not None)
            conv_layer.normalization = nn.BatchNorm2d(c_out)
        stride = max(conv.convolution.stride[0] for conv in convs)
        if projection and isinstance(block.shortcut, nn.Identity):
            block.shortcut = ResNetShortCut(channels[0], channels[-1], stride=stride)
        elif not projection and not isinstance(block.shortcut, nn.Identity):
            if channels[0] != channels[-1] or stride != 1:
                raise ValueError(f"block_shortcuts: a block from {channels[0]} to {channels[-1]} channels with stride "
                                 f"{stride} needs a projection shortcut.")
            block.shortcut = nn.Identity()


class PrunedResNetModel(ResNetModel):
    config_class = PrunedResNetConfig

    def __init__(self, config: PrunedResNetConfig):
        with warnings.catch_warnings():  # stock inner widths of narrow pruned stages can be 0 until resized
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            super().__init__(config)
        _resize_blocks(self, config)
        self.post_init()


class PrunedResNetForImageClassification(ResNetForImageClassification):
    config_class = PrunedResNetConfig

    def __init__(self, config: PrunedResNetConfig):
        with warnings.catch_warnings():  # stock inner widths of narrow pruned stages can be 0 until resized
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            super().__init__(config)  # builds ResNetModel(config) as self.resnet
        _resize_blocks(self.resnet, config)
        self.post_init()


__all__ = ["PrunedResNetForImageClassification", "PrunedResNetModel"]
