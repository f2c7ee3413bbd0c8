"""Config of a DINOv2 whose layers were shrunk unevenly (per-layer head counts and MLP widths).

Stock Dinov2Config has one `num_attention_heads` and one `mlp_ratio`; structured pruning removes different
heads and neurons in every layer. This file imports only transformers and its neighbour
configuration_pruned_vit.py, so both are copied next to saved checkpoints and load with `trust_remote_code=True`
where cap_hf is absent.
"""

from huggingface_hub.dataclasses import strict
from transformers import Dinov2Config

from .configuration_pruned_vit import complete_layer_widths


@strict
class PrunedDinov2Config(Dinov2Config):
    r"""
    layer_num_heads (`list[int]`, *optional*):
        Attention heads kept in each layer (default: `num_attention_heads` everywhere).
    layer_intermediate_sizes (`list[int]`, *optional*):
        MLP width of each layer: fc1's outputs, or with `use_swiglu_ffn` the gate's (default: the stock width
        from `mlp_ratio`).
    head_dim (`int`, *optional*):
        Size of one head; fixed by the dense model (`hidden_size // num_attention_heads`), so the attention
        scaling stays that of the dense model.
    """

    model_type = "pruned_dinov2"

    head_dim: int | None = None
    layer_num_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None

    def __post_init__(self, **kwargs):
        width = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:  # transformers' Dinov2SwiGLUFFN: two thirds, rounded up to a multiple of 8
            width = (int(width * 2 / 3) + 7) // 8 * 8
        complete_layer_widths(self, width)
        super().__post_init__(**kwargs)


__all__ = ["PrunedDinov2Config"]
