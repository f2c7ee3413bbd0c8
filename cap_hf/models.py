"""Loading classifiers and their image processors; small ViTs built from a config (for teachers made
offline, tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path

from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)


def make_image_processor(image_size: int, num_channels: int, mean: float = 0.5, std: float = 0.5):
    """A ViT image processor (PIL backend, no torchvision needed) for square images of `image_size`."""
    return ViTImageProcessorPil(size={"height": image_size, "width": image_size},
                                image_mean=[mean] * num_channels, image_std=[std] * num_channels)


def make_vit_classifier(label_names: list[str], image_size: int, num_channels: int, patch_size: int,
                        hidden_size: int = 192, num_hidden_layers: int = 6, num_attention_heads: int = 3,
                        intermediate_size: int | None = None, seed: int = 0) -> ViTForImageClassification:
    """A randomly initialised ViT classifier; hidden 192 / 3 heads / MLP 768 is DeiT-Tiny's width."""
    import torch

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size or 4 * hidden_size, image_size=image_size, patch_size=patch_size,
        num_channels=num_channels, num_labels=len(label_names),
        id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)},
    )
    return ViTForImageClassification(config)


def load_classifier(name_or_path: str):
    """(model, image processor) from a Hub id or a local folder written by save_pretrained."""
    if Path(name_or_path).expanduser().exists() and not (Path(name_or_path).expanduser() / "config.json").exists():
        raise FileNotFoundError(f"{name_or_path!r} has no config.json; pass a folder written by save_pretrained "
                                "(e.g. by scripts/train_dense.py) or a Hub model id.")
    model = AutoModelForImageClassification.from_pretrained(name_or_path)
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    except OSError as err:
        raise FileNotFoundError(f"No image processor (preprocessor_config.json) found for {name_or_path!r}; "
                                "save one next to the model with image_processor.save_pretrained(folder).") from err
    return model, processor
