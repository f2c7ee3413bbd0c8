"""DINOv2 with per-layer head counts and MLP widths (physically smaller after structured pruning).

The modules and forward pass are transformers' DINOv2; only the Linear layers of each encoder layer are
rebuilt at their own sizes. Imports only transformers, torch and its neighbours (the attention from
modeling_pruned_vit.py), so they travel with the checkpoint.
"""

from torch import nn
from transformers import Dinov2ForImageClassification, Dinov2Model

from .configuration_pruned_dinov2 import PrunedDinov2Config
from .modeling_pruned_vit import resize_attention


def _resize_layers(dinov2: Dinov2Model, config: PrunedDinov2Config) -> None:
    hidden = config.hidden_size
    for layer, heads, width in zip(dinov2.encoder.layer, config.layer_num_heads, config.layer_intermediate_sizes,
                                   strict=True):
        resize_attention(layer.attention, config, heads)
        mlp = layer.mlp
        if config.use_swiglu_ffn:
            mlp.gate_proj = nn.Linear(hidden, width, bias=True)
            mlp.up_proj = nn.Linear(hidden, width, bias=True)
            mlp.down_proj = nn.Linear(width, hidden, bias=True)
        else:
            mlp.fc1 = nn.Linear(hidden, width)
            mlp.fc2 = nn.Linear(width, hidden)


class PrunedDinov2Model(Dinov2Model):
    config_class = PrunedDinov2Config

    def __init__(self, config: PrunedDinov2Config):
        super().__init__(config)
        _resize_layers(self, config)
        self.post_init()


class PrunedDinov2ForImageClassification(Dinov2ForImageClassification):
    config_class = PrunedDinov2Config

    def __init__(self, config: PrunedDinov2Config):
        super().__init__(config)  # builds Dinov2Model(config) as self.dinov2
        _resize_layers(self.dinov2, config)
        self.post_init()


__all__ = ["PrunedDinov2ForImageClassification", "PrunedDinov2Model"]
