"""Config of a ViT whose layers were shrunk unevenly (per-layer head counts and MLP widths).

Stock ViTConfig has one global `num_attention_heads` and `intermediate_size`; structured pruning
removes different heads and neurons in every layer. This file imports only transformers, so it is
copied next to saved checkpoints and loads with `trust_remote_code=True` where cap_hf is absent.
"""

from huggingface_hub.dataclasses import strict
from transformers import ViTConfig


@strict
class PrunedViTConfig(ViTConfig):
    r"""
    layer_num_heads (`list[int]`, *optional*):
        Attention heads kept in each layer (default: `num_attention_heads` everywhere).
    layer_intermediate_sizes (`list[int]`, *optional*):
        MLP width of each layer (default: `intermediate_size` everywhere).
    head_dim (`int`, *optional*):
        Size of one head; fixed by the dense model (`hidden_size // num_attention_heads`), so the
        attention scaling stays that of the dense model.
    """

    model_type = "pruned_vit"

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
            self.layer_intermediate_sizes = [self.intermediate_size] * layers
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


__all__ = ["PrunedViTConfig"]
