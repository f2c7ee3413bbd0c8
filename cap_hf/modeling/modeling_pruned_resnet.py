"""ResNet with per-block inner widths (physically smaller after channel pruning).

transformers' ResNet, with each residual block's inner convolutions and batch norms rebuilt at the
widths in the config. Imports only transformers and torch, so it travels with the checkpoint.
"""

from torch import nn
from transformers import ResNetForImageClassification, ResNetModel

from .configuration_pruned_resnet import PrunedResNetConfig


def _resize_blocks(resnet: ResNetModel, config: PrunedResNetConfig) -> None:
    blocks = [block for stage in resnet.encoder.stages for block in stage.layers]
    for block, widths in zip(blocks, config.block_widths, strict=True):
        convs = list(block.layer)
        channels = [convs[0].convolution.in_channels, *widths, convs[-1].convolution.out_channels]
        for conv_layer, c_in, c_out in zip(convs, channels[:-1], channels[1:], strict=True):
            old = conv_layer.convolution
            conv_layer.convolution = nn.Conv2d(c_in, c_out, kernel_size=old.kernel_size, stride=old.stride,
                                               padding=old.padding, dilation=old.dilation, bias=old.bias is not None)
            conv_layer.normalization = nn.BatchNorm2d(c_out)


class PrunedResNetModel(ResNetModel):
    config_class = PrunedResNetConfig

    def __init__(self, config: PrunedResNetConfig):
        super().__init__(config)
        _resize_blocks(self, config)
        self.post_init()


class PrunedResNetForImageClassification(ResNetForImageClassification):
    config_class = PrunedResNetConfig

    def __init__(self, config: PrunedResNetConfig):
        super().__init__(config)  # builds ResNetModel(config) as self.resnet
        _resize_blocks(self.resnet, config)
        self.post_init()


__all__ = ["PrunedResNetForImageClassification", "PrunedResNetModel"]
