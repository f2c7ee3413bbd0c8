"""Model classes with per-layer sizes for physically smaller (structurally pruned) ViTs, DINOv2s and ResNets.

Importing cap_hf registers them with the Auto classes, so `AutoModelForImageClassification
.from_pretrained(folder)` works; checkpoints also carry the configuration and modeling files and an `auto_map`,
so `from_pretrained(folder, trust_remote_code=True)` works where cap_hf is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from cap_hf.modeling.configuration_pruned_dinov2 import PrunedDinov2Config
from cap_hf.modeling.configuration_pruned_resnet import PrunedResNetConfig
from cap_hf.modeling.configuration_pruned_vit import PrunedViTConfig
from cap_hf.modeling.modeling_pruned_dinov2 import PrunedDinov2ForImageClassification, PrunedDinov2Model
from cap_hf.modeling.modeling_pruned_resnet import PrunedResNetForImageClassification, PrunedResNetModel
from cap_hf.modeling.modeling_pruned_vit import PrunedViTForImageClassification, PrunedViTModel

for _config, _base, _classifier in ((PrunedViTConfig, PrunedViTModel, PrunedViTForImageClassification),
                                    (PrunedDinov2Config, PrunedDinov2Model, PrunedDinov2ForImageClassification),
                                    (PrunedResNetConfig, PrunedResNetModel, PrunedResNetForImageClassification)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _base, exist_ok=True)
    AutoModelForImageClassification.register(_config, _classifier, exist_ok=True)
    # save_pretrained copies the modeling files and writes auto_map (trust_remote_code loading)
    _config.register_for_auto_class()
    _base.register_for_auto_class("AutoModel")
    _classifier.register_for_auto_class("AutoModelForImageClassification")

__all__ = ["PrunedDinov2Config", "PrunedDinov2ForImageClassification", "PrunedDinov2Model", "PrunedResNetConfig", "PrunedResNetForImageClassification", "PrunedResNetModel", "PrunedViTConfig",
           "PrunedViTForImageClassification", "PrunedViTModel"]
