"""Config of a ResNet whose residual blocks have their own inner widths (channel pruning).

Stock ResNetConfig fixes a bottleneck's inner width at out_channels // 4 and a basic block's at
out_channels; coupled-channel pruning leaves each block with its own. Imports only transformers.
"""

from huggingface_hub.dataclasses import strict
from transformers import ResNetConfig


@strict
class PrunedResNetConfig(ResNetConfig):
    r"""
    block_widths (`list[list[int]]`, *optional*):
        For every residual block, in order over the stages: the output channels of each inner
        convolution but the last (bottleneck: [conv1, conv2]; basic: [conv1]). Default: the stock widths.
    block_shortcuts (`list[bool]`, *optional*):
        For every residual block: whether its shortcut is a projection (1x1 convolution + batch norm) or the
        identity. Default: the stock rule (a projection where the width or the resolution changes); pruned
        residual streams can end up with equal widths where the original had a projection.
    """

    model_type = "pruned_resnet"

    block_widths: list[list[int]] | None = None
    block_shortcuts: list[bool] | None = None

    def __post_init__(self, **kwargs):
        inner = 2 if self.layer_type == "bottleneck" else 1
        stock = []
        for size, depth in zip(self.hidden_sizes, self.depths, strict=True):
            width = size // 4 if self.layer_type == "bottleneck" else size
            stock += [[width] * inner for _ in range(depth)]
        if self.block_widths is None:
            self.block_widths = stock
        self.block_widths = [[int(w) for w in block] for block in self.block_widths]
        if len(self.block_widths) != len(stock) or any(len(b) != inner for b in self.block_widths):
            raise ValueError(f"block_widths needs {len(stock)} blocks of {inner} widths for this {self.layer_type} "
                             f"ResNet (depths {list(self.depths)}), got {self.block_widths}.")
        if min(min(b) for b in self.block_widths) < 1:
            raise ValueError("Every inner width in block_widths must be >= 1.")
        if self.block_shortcuts is not None:
            self.block_shortcuts = [bool(s) for s in self.block_shortcuts]
            if len(self.block_shortcuts) != len(stock):
                raise ValueError(f"block_shortcuts needs one entry per residual block ({len(stock)}), "
                                 f"got {len(self.block_shortcuts)}.")
        super().__post_init__(**kwargs)


__all__ = ["PrunedResNetConfig"]
