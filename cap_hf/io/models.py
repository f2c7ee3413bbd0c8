"""Loading classifiers and their image processors; small ViTs built from a config (for teachers made
offline, tests and benchmarks)."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from cap_hf.io.sources import check_model_source


def make_image_processor(image_size: int, num_channels: int, mean: float = 0.5, std: float = 0.5):
    """A ViT image processor (PIL backend, no torchvision needed) for square images of `image_size`."""
    return ViTImageProcessorPil(size={"height": image_size, "width": image_size},
                                image_mean=[mean] * num_channels, image_std=[std] * num_channels)


def processor_image_size(processor) -> tuple[int, int]:
    """(height, width) of the images `processor` gives the model (its crop when it crops)."""
    size = processor.crop_size if getattr(processor, "do_center_crop", False) and processor.crop_size else processor.size
    size = dict(size)
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    if size.get("shortest_edge"):
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise ValueError(f"Cannot tell the input size from the image processor's size {size}; pass --image_size.")


def make_vit_classifier(label_names: list[str], image_size: int, num_channels: int, patch_size: int,
                        hidden_size: int = 192, num_hidden_layers: int = 6, num_attention_heads: int = 3,
                        intermediate_size: int | None = None, seed: int = 0, family: str = "vit",
                        layerscale_value: float = 1.0):
    """A randomly initialised ViT classifier (`family` "vit"), or a DINOv2-shaped one ("dinov2": layer scales
    starting at `layerscale_value`, a head on CLS + patch mean); hidden 192 / 3 heads / MLP 768 is DeiT-Tiny's
    width."""
    import torch

    torch.manual_seed(seed)
    intermediate_size = intermediate_size or 4 * hidden_size
    common = dict(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                  image_size=image_size, patch_size=patch_size, num_channels=num_channels, num_labels=len(label_names),
                  id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)})
    if family == "dinov2":
        from transformers import Dinov2Config, Dinov2ForImageClassification

        if intermediate_size % hidden_size:
            raise ValueError(f"A DINOv2's MLP width is a whole multiple of its hidden size (mlp_ratio); got "
                             f"{intermediate_size} for hidden size {hidden_size}.")
        return Dinov2ForImageClassification(Dinov2Config(mlp_ratio=intermediate_size // hidden_size,
                                                         layerscale_value=layerscale_value, **common))
    if family != "vit":
        raise ValueError(f"family must be vit or dinov2, got {family!r}.")
    return ViTForImageClassification(ViTConfig(intermediate_size=intermediate_size, **common))


def make_resnet_classifier(label_names: list[str], num_channels: int, layer_type: str = "bottleneck",
                           embedding_size: int = 32, hidden_sizes: tuple[int, ...] = (64, 128, 256),
                           depths: tuple[int, ...] = (2, 2, 2), seed: int = 0) -> ResNetForImageClassification:
    """A randomly initialised transformers ResNet classifier (basic or bottleneck blocks)."""
    import torch

    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=num_channels, embedding_size=embedding_size, hidden_sizes=list(hidden_sizes),
        depths=list(depths), layer_type=layer_type, num_labels=len(label_names),
        id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)},
    )
    return ResNetForImageClassification(config)


def load_image_processor(name_or_path: str):
    """The model's image processor, with a clear error when the model cannot be found or has none."""
    check_model_source(name_or_path)
    try:
        return AutoImageProcessor.from_pretrained(name_or_path)
    except OSError as err:
        raise FileNotFoundError(f"No image processor (preprocessor_config.json) found for {name_or_path!r}; "
                                "save one next to the model with image_processor.save_pretrained(folder).") from err


def load_classifier(name_or_path: str):
    """(model, image processor) from a Hub id or a local folder written by save_pretrained."""
    processor = load_image_processor(name_or_path)
    return AutoModelForImageClassification.from_pretrained(name_or_path), processor


def saved_as_classifier(architectures: list[str] | None) -> bool:
    """Whether a checkpoint's config `architectures` name an *ForImageClassification class (else: a backbone)."""
    return any(name.endswith("ForImageClassification") for name in architectures or [])


def from_pretrained_as_saved(name_or_path: str, **kwargs):
    """(model, loading info) through the Auto class the checkpoint was saved as: a classifier through
    AutoModelForImageClassification, a backbone (DINO's ViTModel, Dinov2Model, ...) through AutoModel with no
    head added, and, when it was saved without its pooler (ViTModel(add_pooling_layer=False)), without one."""
    classifier = saved_as_classifier(AutoConfig.from_pretrained(name_or_path).architectures)
    auto = AutoModelForImageClassification if classifier else AutoModel
    model, info = auto.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    missing = info.get("missing_keys") or ()
    if missing and all(k.split(".")[0] == "pooler" for k in missing) and "add_pooling_layer" not in kwargs:
        model, info = auto.from_pretrained(name_or_path, output_loading_info=True, add_pooling_layer=False, **kwargs)
    return model, info


def load_model(name_or_path: str):
    """(model, image processor) as the checkpoint was saved (from_pretrained_as_saved)."""
    processor = load_image_processor(name_or_path)  # first: it checks where the model comes from
    return from_pretrained_as_saved(name_or_path)[0], processor


def load_for_labels(name_or_path: str, label_names: list[str] | None):
    """(model, processor, fresh_head) for a dataset's label set.

    A backbone without a classifier (DINO's ViTModel, Dinov2Model) or a classifier for another label
    set comes back as an *ForImageClassification model with a new head (`fresh_head=True`); train it
    as a linear probe (cap_hf.evaluation.probe) before pruning.
    """
    processor = load_image_processor(name_or_path)
    kwargs = {}
    if label_names is not None:
        kwargs = dict(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={n: i for i, n in enumerate(label_names)}, ignore_mismatched_sizes=True)
    model, info = AutoModelForImageClassification.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    fresh = {k for k in info.get("missing_keys", ()) if "classifier" in k} | \
        {k[0] for k in info.get("mismatched_keys", ()) if "classifier" in k[0]}
    return model, processor, bool(fresh)


def head_parameters(model) -> list:
    """The classification head's parameters (`classifier.*` in transformers' vision classifiers)."""
    return [p for n, p in model.named_parameters() if n.startswith("classifier")]
