"""Model classes with per-layer sizes for physically smaller (structurally pruned) models.

Importing cap_hf registers them with the Auto classes, so `AutoModelForImageClassification
.from_pretrained(folder)` works; checkpoints also carry the two modeling files and an `auto_map`,
so `from_pretrained(folder, trust_remote_code=True)` works where cap_hf is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from cap_hf.modeling.configuration_pruned_vit import PrunedViTConfig
from cap_hf.modeling.modeling_pruned_vit import PrunedViTForImageClassification, PrunedViTModel

AutoConfig.register(PrunedViTConfig.model_type, PrunedViTConfig, exist_ok=True)
AutoModel.register(PrunedViTConfig, PrunedViTModel, exist_ok=True)
AutoModelForImageClassification.register(PrunedViTConfig, PrunedViTForImageClassification, exist_ok=True)
# save_pretrained copies the modeling files and writes auto_map (trust_remote_code loading)
PrunedViTConfig.register_for_auto_class()
PrunedViTModel.register_for_auto_class("AutoModel")
PrunedViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = ["PrunedViTConfig", "PrunedViTForImageClassification", "PrunedViTModel"]
