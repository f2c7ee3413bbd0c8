"""Dataset sources (save_to_disk Dataset / DatasetDict, imagefolder), channel handling, offline data."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cap_hf.evaluation.metrics import topk_accuracy
from cap_hf.io.data import (
    FASHION_MNIST_DIR,
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
