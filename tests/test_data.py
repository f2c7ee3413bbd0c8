"""Dataset sources (save_to_disk Dataset / DatasetDict, imagefolder), channel handling, offline data."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cap_hf.evaluation.metrics import topk_accuracy
from cap_hf.io import data
from cap_hf.io.data import (
    FASHION_MNIST_DIR,
    ImageClassificationTransform,
    RandomResizedCropFlip,
    collate,
    digits_dataset,
    fashion_mnist_dataset,
    load_image_dataset,
    prepare_splits,
)
from cap_hf.io.models import make_image_processor
from cap_hf.io.sources import SourceError


def test_digits_dataset_is_real_and_split():
    ds = digits_dataset()
    assert len(ds["train"]) + len(ds["test"]) == 1797
    img = ds["train"][0]["image"]
    assert img.size == (8, 8) and img.mode == "L"
    assert ds["train"].features["label"].names == [str(i) for i in range(10)]


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).exists(), reason="Debian package dataset-fashion-mnist missing")
def test_fashion_mnist_from_debian_package():
    ds = fashion_mnist_dataset()
    assert len(ds["train"]) == 60000 and len(ds["test"]) == 10000
    assert ds["test"][0]["image"].size == (28, 28)
    assert set(ds["test"]["label"]) == set(range(10))


def test_fashion_mnist_missing_files_say_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist_dataset(tmp_path)


def test_save_to_disk_dataset_and_dict(tmp_path):
    ds = digits_dataset()
    ds.save_to_disk(str(tmp_path / "dict"))
    ds["train"].save_to_disk(str(tmp_path / "single"))
    assert set(load_image_dataset(str(tmp_path / "dict"))) == {"train", "test"}
    assert list(load_image_dataset(str(tmp_path / "single"))) == ["train"]
    with pytest.raises(SourceError, match="dataset folder '.*nope' does not exist"):
        load_image_dataset(str(tmp_path / "nope"))


def test_imagefolder_rgb_images_for_a_grayscale_model(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    processor = make_image_processor(8, 1)
    train, evaluation, names = prepare_splits(str(tmp_path), processor, num_channels=1)
    assert names == ["cat", "dog"]
    batch = collate([evaluation[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 1, 8, 8) and batch["labels"].dtype == torch.long
    rgb = make_image_processor(8, 3)
    train, _, _ = prepare_splits(str(tmp_path), rgb, num_channels=3)
    assert train[0]["pixel_values"].shape == (3, 8, 8)


def test_missing_label_column_is_a_clear_error(tmp_path):
    ds = digits_dataset().rename_column("label", "target")
    ds.save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="no label column 'label'.*--label_column_name"):
        prepare_splits(str(tmp_path / "d"), make_image_processor(8, 1), 1)
    # calibration without labels is allowed (label-free Fisher); evaluation still needs them
    train, _, _ = prepare_splits(str(tmp_path / "d"), make_image_processor(8, 1), 1, label_column="target",
                                 train_needs_labels=False)
    assert "labels" in train[0]


def test_topk_accuracy():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    labels = np.array([1, 1, 0])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def test_the_pil_augmentation_and_a_clear_error_without_torchvision(monkeypatch):
    """backend pil: the PIL crop, then the processor; torchvision asked for where it does not import: refused;
    auto without it: PIL."""
    processor = make_image_processor(8, 1)
    assert RandomResizedCropFlip(backend="pil").torchvision_pipeline(processor) is None
    monkeypatch.setattr(data, "torchvision_transforms", lambda: None)
    with pytest.raises(ValueError, match="torchvision does not import"):
        RandomResizedCropFlip(backend="torchvision")
    with pytest.raises(ValueError, match="one of auto, torchvision, pil"):
        RandomResizedCropFlip(backend="cv2")
    transform = ImageClassificationTransform(processor, "image", "label", 1, augment=RandomResizedCropFlip((0.3, 1)))
    assert transform.pipeline is None
    out = transform({"image": [smooth_image(32, 24)], "label": [3]})
    assert out["pixel_values"].shape == (1, 1, 8, 8) and out["labels"].tolist() == [3]
    assert -1 <= float(out["pixel_values"].min()) and float(out["pixel_values"].max()) <= 1  # (x - 0.5) / 0.5


def test_torchvision_augmentation_gives_the_processors_shapes_and_normalisation():
    """transforms v2 sized and normalised from the processor: the whole image (scale 1, its own aspect, no flip)
    comes out as the processor makes it, within the two resizers' rounding; a flat image exactly."""
    pytest.importorskip("torchvision.transforms.v2")  # CI's CPU torch 2.13 has no torchvision that imports
    from transformers import ViTImageProcessorPil

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    processor = ViTImageProcessorPil(size={"height": 24, "width": 32}, image_mean=mean, image_std=std)
    whole = RandomResizedCropFlip(scale=(1, 1), ratio=(4 / 3, 4 / 3), hflip=False, backend="torchvision")
    transform = ImageClassificationTransform(processor, "image", None, 3, augment=whole)
    assert transform.pipeline is not None
    image = smooth_image(96, 72)
    got = transform({"image": [image]})["pixel_values"][0]
    expected = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    assert got.shape == expected.shape == (3, 24, 32)
    assert float((got - expected).abs().max()) < 3 / 255 / min(std)  # at most 3 levels of 255 apart
    flat = transform({"image": [Image.new("RGB", (96, 72), (128, 64, 200))]})["pixel_values"][0]
    want = (torch.tensor([128, 64, 200]) / 255 - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(flat, want.view(3, 1, 1).expand(3, 24, 32), atol=1e-5)
    crops = ImageClassificationTransform(processor, "image", None, 3, augment=RandomResizedCropFlip((0.1, 0.5)))
    first, second = (crops({"image": [image]})["pixel_values"][0] for _ in range(2))
    assert first.shape == (3, 24, 32) and not torch.equal(first, second)  # random crops
