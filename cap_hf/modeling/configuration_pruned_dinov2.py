"""Config of a DINOv2 whose layers were shrunk unevenly (per-layer head counts and MLP widths).

Stock Dinov2Config has one `num_attention_heads` and one `mlp_ratio`; structured pruning removes different
heads and neurons in every layer. This file imports only transformers, so it is copied next to saved
checkpoints and loads with `trust_remote_code=True` where cap_hf is absent.
"""

from huggingface_hub.dataclasses import strict
from transformers import Dinov2Config


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
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        layers = self.num_hidden_layers
        if self.layer_num_heads is None:
            self.layer_num_heads = [self.num_attention_heads] * layers
        if self.layer_intermediate_sizes is None:
            width = int(self.hidden_size * self.mlp_ratio)
            if self.use_swiglu_ffn:  # transformers' Dinov2SwiGLUFFN: two thirds, rounded up to a multiple of 8
                width = (int(width * 2 / 3) + 7) // 8 * 8
            self.layer_intermediate_sizes = [width] * layers
        self.layer_num_heads = [int(h) for h in self.layer_num_heads]
        self.layer_intermediate_sizes = [int(m) for m in self.layer_intermediate_sizes]
        for name in ("layer_num_heads", "layer_intermediate_sizes"):
            values = getattr(self, name)
            if len(values) != layers:
                raise ValueError(f"{name} has {len(values)} entries but the model has {layers} layers.")
            if min(values) < 1:
                raise ValueError(f"{name} must be >= 1 in every layer, got {values}; a layer cannot lose all "
                                 "of its heads or neurons in this model class.")
        super().__post_init__(**kwargs)


__all__ = ["PrunedDinov2Config"]
