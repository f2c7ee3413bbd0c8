"""Image-classification data: Hub ids, save_to_disk folders and imagefolder folders; preprocessing
from the model's image processor; and the offline data sets that ship in packages."""

from __future__ import annotations

import functools
import gzip
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset, load_from_disk

from cap_hf.io.models import processor_image_size
from cap_hf.io.sources import BUILTIN_PREFIX, SourceError, check_dataset_source

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                        "Bag", "Ankle boot"]
EVAL_SPLITS = ("validation", "valid", "val", "test")


BUILTIN_DATASETS = ("builtin:digits", "builtin:fashion-mnist")


def load_image_dataset(name_or_path: str) -> DatasetDict:
    """A DatasetDict from a save_to_disk folder (Dataset or DatasetDict), an imagefolder folder, a Hub id,
    or the offline data sets `builtin:digits` (scikit-learn) and `builtin:fashion-mnist` (Debian package).
    The name is checked first (cap_hf.io.sources): a missing folder, or a Hub id that is neither cached nor on
    the Hub, fails at once with what was tried."""
    if name_or_path == "builtin:digits":
        return digits_dataset()
    if name_or_path == "builtin:fashion-mnist":
        return fashion_mnist_dataset()
    if name_or_path.startswith(BUILTIN_PREFIX):
        raise SourceError(f"Unknown builtin data set {name_or_path!r}; there are {', '.join(BUILTIN_DATASETS)}.")
    check_dataset_source(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = load_from_disk(str(path))
            return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
        return load_dataset("imagefolder", data_dir=str(path))
    try:
        return load_dataset(name_or_path)
    except Exception as err:  # offline mode, gated repo, typo: say what was tried
        raise ValueError(f"Could not load dataset {name_or_path!r} from the Hub ({type(err).__name__}: {err}). "
                         "Check the id and your network / HF_HUB_OFFLINE, or pass a local folder.") from err


def pick_split(dataset: DatasetDict, wanted: str | None, candidates: Sequence[str], role: str) -> str:
    if wanted is not None:
        if wanted not in dataset:
            raise ValueError(f"Split {wanted!r} for {role} not found; the dataset has {list(dataset)}.")
        return wanted
    for name in candidates:
        if name in dataset:
            return name
    raise ValueError(f"No {role} split among {list(candidates)}; the dataset has {list(dataset)}. "
                     f"Name one with the {role} split flag.")


def check_columns(dataset: Dataset, image_column: str, label_column: str | None, role: str) -> None:
    columns = dataset.column_names
    if image_column not in columns:
        raise ValueError(f"The {role} split has no image column {image_column!r}; its columns are {columns}. "
                         "Set --image_column_name.")
    if label_column is not None and label_column not in columns:
        raise ValueError(f"The {role} split has no label column {label_column!r}; its columns are {columns}. "
                         "Set --label_column_name; for calibration without labels use --fisher_objective features (a "
                         "backbone's feature Fisher) or --label_free_fisher (labels sampled from a classifier).")


def label_names(dataset: Dataset, label_column: str) -> list[str] | None:
    feature = dataset.features.get(label_column)
    return list(feature.names) if isinstance(feature, ClassLabel) else None


class ImageClassificationTransform:
    """Batch transform for `Dataset.with_transform`: PIL images -> pixel_values via the image processor."""

    def __init__(self, image_processor, image_column: str = "image", label_column: str | None = "label",
                 num_channels: int = 3, augment=None):
        self.image_processor = image_processor
        self.image_column = image_column
        self.label_column = label_column
        self.mode = "L" if num_channels == 1 else "RGB"
        self.augment = augment
        # the augmentation with torchvision's transforms v2 (it sizes and normalises itself), where it can
        self.pipeline = augment.torchvision_pipeline(image_processor) if isinstance(augment, RandomResizedCropFlip) \
            else None

    def __call__(self, examples: dict) -> dict:
        images = [img.convert(self.mode) for img in examples[self.image_column]]
        if self.pipeline is not None:
            pixel_values = torch.stack([self.pipeline(img) for img in images])
        else:
            if self.augment is not None:
                images = [self.augment(img) for img in images]
            pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        out = {"pixel_values": pixel_values}
        if self.label_column is not None and self.label_column in examples:
            out["labels"] = torch.as_tensor(examples[self.label_column], dtype=torch.long)
        return out


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    batch = {"pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
    return batch


def calibration_loader(dataset, batch_size: int, seed: int = 0, *, num_workers: int = 0, pin_memory: bool = False,
                       persistent_workers: bool = False, prefetch_factor: int | None = None,
                       collate_fn: Callable | None = None) -> torch.utils.data.DataLoader:
    """Shuffled, full batches (one batch = one gradient), decoded by `num_workers` worker processes like
    the Trainer's training batches (TrainingArguments.dataloader_*). The order depends only on `seed`, so
    the batches are the same with any number of workers and can be replayed. From an ImageStream: the stream
    shuffled with `seed` (every process reads the whole stream with its own seed, as it samples the whole
    split with its own seed otherwise); the same batches again at each replay, for a fixed number of workers."""
    workers = int(num_workers or 0)
    if isinstance(dataset, torch.utils.data.IterableDataset):  # an ImageStream: its own seeded shuffle, no sampler
        extra = {"prefetch_factor": prefetch_factor} if workers > 0 and prefetch_factor else {}
        return torch.utils.data.DataLoader(dataset.with_(seed=seed, shuffle=True, rank=0, world=1, limit=None),
                                           batch_size=batch_size, drop_last=True, collate_fn=collate_fn or collate,
                                           num_workers=workers, pin_memory=bool(pin_memory) and torch.cuda.is_available(),
                                           **extra)
    generator = torch.Generator().manual_seed(seed)
    extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor} if workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       collate_fn=collate_fn or collate, generator=generator, num_workers=workers,
                                       pin_memory=bool(pin_memory) and torch.cuda.is_available(), **extra)


def _image_dataset(images: np.ndarray, labels: np.ndarray, names: list[str], split: str) -> Dataset:
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features, split=split)


def digits_dataset(test_fraction: float = 0.2, seed: int = 0) -> DatasetDict:
    """scikit-learn's 8x8 handwritten digits (1797 images) as grayscale images, split train/test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = int(round(test_fraction * len(images)))
    test, train = order[:n_test], order[n_test:]
    names = [str(i) for i in range(10)]
    return DatasetDict({"train": _image_dataset(images[train], digits.target[train], names, "train"),
                        "test": _image_dataset(images[test], digits.target[test], names, "test")})


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_dataset(root: str | os.PathLike = FASHION_MNIST_DIR) -> DatasetDict:
    """Fashion-MNIST (60k train / 10k test, 28x28 grayscale) from the idx files of the Debian package."""
    root = Path(root)
    files = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    missing = [name for pair in files.values() for name in pair if not (root / name).exists()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files {missing} not found in {root}. Install the Debian package "
                                "'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist) or pass --root.")
    return DatasetDict({split: _image_dataset(_read_idx(root / img), _read_idx(root / lab), FASHION_MNIST_LABELS, split)
                        for split, (img, lab) in files.items()})


AUGMENTATION_BACKENDS = ("auto", "torchvision", "pil")


@functools.cache
def torchvision_transforms():
    """torchvision.transforms.v2, or None where torchvision is missing or was built for another torch (PyPI's
    torchvision 0.28 beside a CPU-only torch 2.13 fails to import, for one)."""
    try:
        import torchvision.transforms.v2 as v2
    except Exception as err:  # ImportError, or RuntimeError / OSError of a build for another torch or CUDA
        logger.info("torchvision's transforms v2 unavailable (%s: %s): training crops with PIL.", type(err).__name__,
                    err)
        return None
    return v2


class RandomResizedCropFlip:
    """The training augmentation: a random crop of `scale` of the area and aspect `ratio`, resized to the model's
    input, and an optional horizontal flip (ImageNet's RandomResizedCrop, as DeiT and transformers'
    image-classification example train).

    backend "auto" (default): torchvision's transforms v2 where torchvision imports, sized and normalised from
    the model's image processor as transformers' example does (torchvision_pipeline); PIL otherwise.
    "torchvision": the same, and an error where it does not import. "pil": always the PIL crop, then the image
    processor resizes and normalises. v2 works on uint8 tensors and is faster (docs/benchmarks.md,
    "Image processors and transforms"). Its random numbers are torch's; the PIL crop's come
    from a generator seeded, in each process, by torch.initial_seed(). Either way the Trainer's seed drives the
    main process and every DataLoader worker gets its own seed, so workers do not repeat each other's crops."""

    def __init__(self, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: bool = True, backend: str = "auto"):
        if backend not in AUGMENTATION_BACKENDS:
            raise ValueError(f"augmentation backend must be one of {', '.join(AUGMENTATION_BACKENDS)}, got {backend!r}.")
        if backend == "torchvision" and torchvision_transforms() is None:
            raise ValueError(f"--augmentation_backend torchvision: torchvision does not import with torch "
                             f"{torch.__version__}. Install the torchvision release built for it (torch 2.13 -> "
                             "torchvision 0.28, and so on), or use auto / pil.")
        self.scale, self.ratio, self.hflip, self.backend = scale, ratio, hflip, backend
        self._rng, self._seed = None, None

    def torchvision_pipeline(self, image_processor):
        """This augmentation with transforms v2 for `image_processor`'s model: RandomResizedCrop to its input
        size (antialiased), the flip, then its rescaling and normalisation; None with backend "pil", without
        torchvision, or for a processor that does not rescale by 1/255 (then PIL and the processor)."""
        v2 = torchvision_transforms() if self.backend != "pil" else None
        if v2 is None or not getattr(image_processor, "do_rescale", False) \
                or abs(image_processor.rescale_factor - 1 / 255) > 1e-9:
            return None
        steps = [v2.ToImage(), v2.RandomResizedCrop(processor_image_size(image_processor), scale=self.scale,
                                                    ratio=self.ratio, antialias=True)]
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        steps.append(v2.ToDtype(torch.float32, scale=True))
        if getattr(image_processor, "do_normalize", False):
            steps.append(v2.Normalize(list(image_processor.image_mean), list(image_processor.image_std)))
        return v2.Compose(steps)

    @property
    def rng(self) -> np.random.Generator:
        seed = torch.initial_seed()
        if self._rng is None or seed != self._seed:  # first use in this process (or worker)
            self._rng, self._seed = np.random.default_rng(seed), seed
        return self._rng

    def __call__(self, img):
        width, height = img.size
        area = width * height
        for _ in range(10):
            target = area * self.rng.uniform(*self.scale)
            aspect = np.exp(self.rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1])))
            w = int(round(np.sqrt(target * aspect)))
            h = int(round(np.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = int(self.rng.integers(0, width - w + 1))
                top = int(self.rng.integers(0, height - h + 1))
                img = img.crop((left, top, left + w, top + h))
                break
        if self.hflip and self.rng.random() < 0.5:
            img = img.transpose(0)  # PIL.Image.FLIP_LEFT_RIGHT
        return img


def prepare_splits(
    dataset_name: str | DatasetDict,
    image_processor,
    num_channels: int,
    image_column: str = "image",
    label_column: str = "label",
    train_split: str | None = None,
    eval_split: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    train_needs_labels: bool = True,
    seed: int = 0,
    train_augment=None,
    train_val_split: float | None = None,
    eval_needs_labels: bool = True,
) -> tuple[Dataset, Dataset, list[str] | None]:
    """(train, eval, label names): train is the calibration/training split, eval is `validation` or
    else `test` (or a `train_val_split` fraction of train); both carry a transform giving
    pixel_values (+ labels, where the split has them: a split without them is refused when it
    `needs_labels`). Columns are checked up front. `train_augment` (a RandomResizedCropFlip) applies to train.
    A streamed run's splits: cap_hf.io.stream.StreamArguments.splits, which calls this without --streaming."""
    dataset = dataset_name if isinstance(dataset_name, DatasetDict) else load_image_dataset(dataset_name)
    if train_val_split is not None and eval_split is None and not any(n in dataset for n in EVAL_SPLITS):
        if not 0 < train_val_split < 1:
            raise ValueError(f"train_val_split must be in (0, 1), got {train_val_split}.")
        name = pick_split(dataset, train_split, ("train",), "train (--train_split)")
        parts = dataset[name].train_test_split(test_size=train_val_split, seed=seed)
        dataset = DatasetDict({**dataset, name: parts["train"], "validation": parts["test"]})
    train_name = pick_split(dataset, train_split, ("train",), "train (--train_split)")
    eval_name = pick_split(dataset, eval_split, EVAL_SPLITS, "evaluation (--eval_split)")
    train, evaluation = dataset[train_name], dataset[eval_name]
    check_columns(train, image_column, label_column if train_needs_labels else None, train_name)
    check_columns(evaluation, image_column, label_column if eval_needs_labels else None, eval_name)
    if max_train_samples is not None and max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(max_train_samples))
    if max_eval_samples is not None and max_eval_samples < len(evaluation):
        evaluation = evaluation.shuffle(seed=seed).select(range(max_eval_samples))
    train_labels = label_column if label_column in train.column_names else None
    transform = ImageClassificationTransform(image_processor, image_column, train_labels, num_channels,
                                             augment=train_augment)
    eval_labels = label_column if label_column in evaluation.column_names else None
    eval_transform = ImageClassificationTransform(image_processor, image_column, eval_labels, num_channels)
    return train.with_transform(transform), evaluation.with_transform(eval_transform), label_names(evaluation, label_column)
