"""ViT with per-layer head counts and MLP widths (physically smaller after structured pruning).

The modules and forward pass are transformers' ViT; only the Linear layers of each encoder layer are
rebuilt at their own sizes. Imports only transformers and torch, so it travels with the checkpoint.
"""

from torch import nn
from transformers import ViTForImageClassification, ViTModel

from .configuration_pruned_vit import PrunedViTConfig


def resize_attention(attention: nn.Module, config, heads: int) -> None:
    """A transformers-5 attention module (q/k/v/o_proj) rebuilt with `heads` heads of the config's head_dim."""
    hidden, head_dim = config.hidden_size, config.head_dim
    attention.num_attention_heads = heads
    attention.head_dim = head_dim
    attention.scaling = head_dim**-0.5
    attention.q_proj = nn.Linear(hidden, heads * head_dim, bias=config.qkv_bias)
    attention.k_proj = nn.Linear(hidden, heads * head_dim, bias=config.qkv_bias)
    attention.v_proj = nn.Linear(hidden, heads * head_dim, bias=config.qkv_bias)
    attention.o_proj = nn.Linear(heads * head_dim, hidden, bias=True)


def _resize_layers(vit: ViTModel, config: PrunedViTConfig) -> None:
    hidden = config.hidden_size
    for layer, heads, width in zip(vit.layers, config.layer_num_heads, config.layer_intermediate_sizes, strict=True):
        resize_attention(layer.attention, config, heads)
        layer.mlp.fc1 = nn.Linear(hidden, width)
        layer.mlp.fc2 = nn.Linear(width, hidden)


class PrunedViTModel(ViTModel):
    config_class = PrunedViTConfig

    def __init__(self, config: PrunedViTConfig, add_pooling_layer: bool = True, use_mask_token: bool = False):
        super().__init__(config, add_pooling_layer=add_pooling_layer, use_mask_token=use_mask_token)
        _resize_layers(self, config)
        self.post_init()


class PrunedViTForImageClassification(ViTForImageClassification):
    config_class = PrunedViTConfig

    def __init__(self, config: PrunedViTConfig):
        super().__init__(config)  # builds ViTModel(config, add_pooling_layer=False) as self.vit
        _resize_layers(self.vit, config)
        self.post_init()


__all__ = ["PrunedViTForImageClassification", "PrunedViTModel"]
