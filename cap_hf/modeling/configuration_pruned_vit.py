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
        complete_layer_widths(self, self.intermediate_size)
        super().__post_init__(**kwargs)


def complete_layer_widths(config, intermediate_size: int) -> None:
    """Fill a pruned transformer config's per-layer fields left unset (head_dim from the dense model, every layer
    at `num_attention_heads` heads and `intermediate_size` MLP neurons) and check them (PrunedViT, PrunedDinov2)."""
    if config.head_dim is None:
        config.head_dim = config.hidden_size // config.num_attention_heads
    layers = config.num_hidden_layers
    if config.layer_num_heads is None:
        config.layer_num_heads = [config.num_attention_heads] * layers
    if config.layer_intermediate_sizes is None:
        config.layer_intermediate_sizes = [intermediate_size] * layers
    config.layer_num_heads = [int(h) for h in config.layer_num_heads]
    config.layer_intermediate_sizes = [int(m) for m in config.layer_intermediate_sizes]
    for name in ("layer_num_heads", "layer_intermediate_sizes"):
        values = getattr(config, name)
        if len(values) != layers:
            raise ValueError(f"{name} has {len(values)} entries but the model has {layers} layers.")
        if min(values) < 1:
            raise ValueError(f"{name} must be >= 1 in every layer, got {values}; a layer cannot lose all "
                             "of its heads or neurons in this model class.")


__all__ = ["PrunedViTConfig"]
