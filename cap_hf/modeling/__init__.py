"""Model classes with per-layer sizes for physically smaller (structurally pruned) ViTs and ResNets.

Importing cap_hf registers them with the Auto classes, so `AutoModelForImageClassification
.from_pretrained(folder)` works; checkpoints also carry the two modeling files and an `auto_map`,
so `from_pretrained(folder, trust_remote_code=True)` works where cap_hf is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from cap_hf.modeling.configuration_pruned_resnet import PrunedResNetConfig
from cap_hf.modeling.configuration_pruned_vit import PrunedViTConfig
from cap_hf.modeling.modeling_pruned_resnet import PrunedResNetForImageClassification, PrunedResNetModel
from cap_hf.modeling.modeling_pruned_vit import PrunedViTForImageClassification, PrunedViTModel

for _config, _base, _classifier in ((PrunedViTConfig, PrunedViTModel, PrunedViTForImageClassification),
                                    (PrunedResNetConfig, PrunedResNetModel, PrunedResNetForImageClassification)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _base, exist_ok=True)
    AutoModelForImageClassification.register(_config, _classifier, exist_ok=True)
    # save_pretrained copies the modeling files and writes auto_map (trust_remote_code loading)
    _config.register_for_auto_class()
    _base.register_for_auto_class("AutoModel")
    _classifier.register_for_auto_class("AutoModelForImageClassification")

__all__ = ["PrunedResNetConfig", "PrunedResNetForImageClassification", "PrunedResNetModel", "PrunedViTConfig",
           "PrunedViTForImageClassification", "PrunedViTModel"]
