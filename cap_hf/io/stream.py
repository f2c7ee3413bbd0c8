"""Streamed image data, for data sets of ImageNet's size that are read, never prepared or held: a Hub id or a
local folder (parquet shards laid out as on the Hub, `data/train-*.parquet`, or an imagefolder) read as
datasets' streaming IterableDataset.

- open_stream: one split as a stream whose images stay undecoded (bytes) until a DataLoader worker needs them;
  the split and the columns are checked before any work (one example read when the format does not say).
- ImageStream: what the Trainer, the calibration and the evaluation read. Each pass shuffles the order of the
  shards and a seeded buffer of `shuffle_buffer_size` examples (datasets' IterableDataset.shuffle, reseeded by
  the pass), takes this process's share (split_dataset_by_node) and decodes and transforms each image lazily,
  in the worker that reads it. A corrupt image is skipped, counted and named in the log; the pass stops with an
  error only when more than `max_bad_fraction` of the images a worker read were bad (and more than 10).
- StreamLoader: the DataLoader of a training stream, resumable where it stopped: it counts, per DataLoader
  worker, the stream positions the Trainer has consumed; a resumed run makes each worker skip that many raw
  examples (read, not decoded) of the same pass. datasets' own IterableDataset.state_dict is not used: with a
  shuffle buffer it repeats and loses examples on resume (huggingface/datasets#7901) and fails with several
  DataLoader workers (datasets 5.2), so a resumed run would see images twice.
- materialize: the first n images of a (seeded, shuffled) stream as a map-style Dataset (the evaluation set and
  the k-NN bank: a fixed, named number of images, evaluated the same way at every evaluation).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset, load_from_disk
from datasets import Image as ImageFeature
from datasets.distributed import split_dataset_by_node

from cap_hf.io.data import (
    BUILTIN_DATASETS,
    EVAL_SPLITS,
    ImageClassificationTransform,
    check_columns,
    label_names,
    load_image_dataset,
    pick_split,
    prepare_splits,
)
from cap_hf.io.sources import check_dataset_source

logger = logging.getLogger(__name__)

STATE_FILE = "stream_state-rank{rank}.json"  # in every checkpoint-N folder of a streamed run, one per process
MIN_BAD_IMAGES = 10  # bad images a worker may skip before the fraction applies


@dataclass
class StreamArguments:
    """The flags of a streamed run (scripts/prune.py, scripts/oneshot.py, scripts/structured_prune.py)."""

    streaming: bool = field(default=False, metadata={
        "help": "Read the dataset as a stream (datasets' streaming): nothing is downloaded or prepared first, "
                "images are decoded as they are needed. Training needs --max_steps and a schedule in steps; "
                "evaluation uses --max_eval_samples images of the evaluation split (default 10000, a sample "
                "seeded by --seed)."})
    shuffle_buffer_size: int = field(default=4096, metadata={
        "help": "--streaming: examples in each worker's shuffle buffer (undecoded: ~110 KB each for ImageNet). "
                "The shard order is shuffled too, anew at every pass."})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "--streaming: corrupt images are skipped and counted; stop when more than this fraction of the "
                "images a worker read were bad (after the first 10)."})

    def splits(self, dataset_name: str, image_processor, num_channels: int, *, rank: int = 0, world: int = 1,
               train_val_split: float | None = None, **kwargs) -> tuple:
        """(train, eval, label names) as these flags ask: with --streaming, this process's (`rank` of `world`)
        ImageStream and a fixed evaluation sample (prepare_stream_splits); else cap_hf.io.data.prepare_splits.
        kwargs: prepare_splits' own (columns, splits, sample counts, labels needed, seed, train_augment)."""
        if not self.streaming:
            return prepare_splits(dataset_name, image_processor, num_channels, train_val_split=train_val_split,
                                  **kwargs)
        if train_val_split is not None:
            raise ValueError("--train_val_split holds out part of a split held in memory; a stream has none. Name an "
                             "evaluation split with --eval_split.")
        return prepare_stream_splits(dataset_name, image_processor, num_channels, self, rank=rank, world=world, **kwargs)

    def check(self) -> None:
        if self.shuffle_buffer_size < 1:
            raise ValueError(f"--shuffle_buffer_size must be >= 1, got {self.shuffle_buffer_size}.")
        if not 0 <= self.max_bad_fraction < 1:
            raise ValueError(f"--max_bad_fraction must be in [0, 1), got {self.max_bad_fraction}.")


DEFAULT_STREAM_EVAL_SAMPLES = 10_000


class BadImagesError(RuntimeError):
    """Too many images of a stream could not be decoded."""


def _splits_of(name_or_path: str) -> IterableDatasetDict:
    """Every split of a data set as streams: Hub id, parquet / imagefolder folder, save_to_disk folder, builtin."""
    if name_or_path in BUILTIN_DATASETS:  # small, in memory: streamed from their Arrow tables, 4 shards each
        return IterableDatasetDict({k: v.to_iterable_dataset(num_shards=4) for k, v in
                                    load_image_dataset(name_or_path).items()})
    check_dataset_source(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = load_from_disk(str(path))
            loaded = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
            return IterableDatasetDict({k: v.to_iterable_dataset(num_shards=max(1, len(v.cache_files)))
                                        for k, v in loaded.items()})
        if any(path.glob("**/*.parquet")):
            return load_dataset(str(path), streaming=True)
        return load_dataset("imagefolder", data_dir=str(path), streaming=True)
    try:
        return load_dataset(name_or_path, streaming=True)
    except Exception as err:  # gated without a token, offline, typo: say what was tried
        raise ValueError(f"Could not stream dataset {name_or_path!r} from the Hub ({type(err).__name__}: {err}). "
                         "Check the id, your token (`hf auth login`, for a gated dataset accept its terms on the "
                         "Hub first) and your network / HF_HUB_OFFLINE, or pass a local folder.") from err


def open_stream(name_or_path: str, split: str | None, candidates: tuple[str, ...], role: str, image_column: str,
                label_column: str | None) -> tuple[str, IterableDataset]:
    """(the split's name, the split as a stream with undecoded images), checked: the split exists (`split`, else
    the first of `candidates`) and has the image column (and the label column when one is given)."""
    splits = _splits_of(name_or_path)
    name = pick_split(splits, split, candidates, role)
    stream = splits[name]
    columns = list(stream.features) if stream.features is not None else None
    if columns is None:  # the format does not say: read one example (nothing decoded)
        first = next(iter(stream.decode(False).take(1)), None)
        if first is None:
            raise ValueError(f"Split {name!r} of {name_or_path} is empty.")
        columns = list(first)
    check_columns(_ColumnView(columns), image_column, label_column, name)
    if stream.features is not None and isinstance(stream.features[image_column], ImageFeature):
        stream = stream.cast_column(image_column, ImageFeature(decode=False))
    else:
        stream = stream.decode(False)
    return name, stream


@dataclass
class _ColumnView:  # what check_columns reads of a split
    column_names: list[str]


def decode_image(value, mode: str):
    """A PIL image in `mode` from a stream's undecoded image ({'bytes', 'path'}) or a PIL image; raises on a
    corrupt file."""
    import PIL.Image

    if isinstance(value, PIL.Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes") is not None:
        image = PIL.Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = PIL.Image.open(value["path"])
    else:
        raise ValueError(f"not an image: {type(value).__name__}")
    image.load()  # decode now: a truncated or corrupt file fails here, not in the model's batch
    return image.convert(mode)


class ImageStream(torch.utils.data.IterableDataset):
    """A streamed split as (pixel_values, labels) examples for a DataLoader (see the module's docstring).

    transform: cap_hf.io.data.ImageClassificationTransform (its image processor, augmentation and columns).
    shuffle: a seeded buffer and shard order per pass (training and calibration), or the stream's own order
    (evaluation). rank / world: this process's share. limit: at most this many examples per pass and process.
    tag: add each example's worker and raw position (what StreamLoader counts to resume)."""

    def __init__(self, stream: IterableDataset, transform, *, split: str | None = None, seed: int = 0,
                 shuffle: bool = True, buffer_size: int = 4096, rank: int = 0, world: int = 1,
                 limit: int | None = None, max_bad_fraction: float = 0.01, tag: bool = False):
        super().__init__()
        self.stream, self.transform, self.split = stream, transform, split
        self.seed, self.shuffle, self.buffer_size = seed, shuffle, buffer_size
        self.rank, self.world, self.limit = rank, world, limit
        self.max_bad_fraction, self.tag = max_bad_fraction, tag
        self.epoch = 0
        self.skip: dict[int, int] = {}  # worker -> raw examples of this pass already consumed (a resumed run)

    @property
    def column_names(self) -> list[str]:
        return list(self.stream.features or {})

    def with_transform(self, transform) -> ImageStream:
        """The same stream with another transform (as Dataset.with_transform: the calibration's, say)."""
        return self.with_(transform=transform)

    def with_(self, **changes) -> ImageStream:
        """A copy with other settings (say, the evaluation transform and another seed for calibration)."""
        keys = ("transform", "split", "seed", "shuffle", "buffer_size", "rank", "world", "limit", "max_bad_fraction", "tag")
        settings = {key: getattr(self, key) for key in keys}
        settings.update(changes)
        return ImageStream(self.stream, **settings)

    def examples(self) -> IterableDataset:
        """This process's raw examples of the current pass, in the order every worker layout reads them."""
        stream = self.stream
        if self.shuffle:
            stream = stream.shuffle(seed=self.seed, buffer_size=self.buffer_size)
        if self.world > 1:
            stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world)
        stream.set_epoch(self.epoch)
        return stream

    def decoded(self, worker: int = 0) -> Iterator[tuple[int, dict, object, int]]:
        """(raw position, example, decoded image, corrupt images skipped so far) of this process's pass, from
        `self.skip[worker]` on: corrupt images skipped, counted and logged; too many stop the pass
        (BadImagesError)."""
        skip = self.skip.get(worker, 0)
        mode, column = self.transform.mode, self.transform.image_column
        read = bad = 0
        for position, example in enumerate(self.examples()):  # in a worker: its own shards of the pass
            if position < skip:
                continue
            read += 1
            try:
                image = decode_image(example[column], mode)
            except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
                bad += 1
                logger.warning("Skipped a corrupt image of split %s (process %d, worker %d, position %d in its "
                               "stream, %s): %s: %s; %d skipped by this worker in this pass.", self.split, self.rank,
                               worker, position, _where(example[column]), type(err).__name__, err, bad)
                if bad > MIN_BAD_IMAGES and bad > self.max_bad_fraction * read:
                    raise BadImagesError(
                        f"{bad} of the {read} images read by worker {worker} of process {self.rank} in split "
                        f"{self.split} could not be decoded (more than --max_bad_fraction {self.max_bad_fraction}); "
                        "the data is damaged or not images. Check the shards (the log names each bad image), or "
                        "raise --max_bad_fraction. The last checkpoint is unchanged; resume from it once the data "
                        "is repaired.") from err
                continue
            yield position, example, image, bad

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        image_column = self.transform.image_column
        for given, (position, example, image, bad) in enumerate(self.decoded(worker)):
            if self.limit is not None and given >= self.limit:
                return
            out = {k: v[0] for k, v in self.transform({**{k: [v] for k, v in example.items()},
                                                        image_column: [image]}).items()}
            if self.tag:
                out.update(stream_worker=worker, stream_position=position, stream_skipped=bad)
            yield out


def is_stream(dataset) -> bool:
    """A streamed split (ImageStream): no length, read pass by pass."""
    return isinstance(dataset, ImageStream)


def _where(value) -> str:
    path = value.get("path") if isinstance(value, dict) else None
    return f"file {os.path.basename(path)}" if path else "no file name"


def tagged_collate(collate: Callable) -> Callable:
    """`collate` that keeps the stream tags of a training batch (one worker builds a whole batch)."""
    def wrapped(examples: list[dict]) -> dict:
        batch = collate(examples)
        if "stream_worker" in examples[0]:
            last = examples[-1]
            batch["stream_tags"] = (last["stream_worker"], last["stream_position"], last["stream_skipped"])
        return batch
    return wrapped


class StreamLoader:
    """The DataLoader of a training ImageStream for the Trainer: one pass per `set_epoch`, resumable.

    It hands the Trainer batches without their tags and keeps, per worker, the next raw position of the pass
    (state()); `restore(state)` makes the next pass start where that state stopped. The layout that fixes the
    order (workers, processes, batch size, seed, buffer) must be the same to resume, and is checked."""

    def __init__(self, stream: ImageStream, batch_size: int, collate: Callable, num_workers: int = 0,
                 pin_memory: bool = False, prefetch_factor: int | None = None):
        self.stream = stream.with_(tag=True)
        self.batch_size, self.collate, self.num_workers = batch_size, collate, int(num_workers or 0)
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.first_pass = 0  # the stream's pass at the Trainer's epoch 0 (after a resume, the checkpoint's)
        self.positions: dict[int, int] = {}  # worker -> next raw position of this pass
        self.skipped: dict[int, int] = {}  # worker -> corrupt images skipped in this pass
        self.dataset = self.stream

    def set_epoch(self, epoch: int) -> None:
        """The Trainer's epoch: the stream's pass is first_pass + epoch (another shuffle at every pass)."""
        pass_ = self.first_pass + epoch
        if pass_ != self.stream.epoch:
            self.stream.epoch, self.stream.skip, self.positions, self.skipped = pass_, {}, {}, {}

    def layout(self) -> dict:
        s = self.stream
        return {"num_workers": self.num_workers, "rank": s.rank, "world": s.world, "batch_size": self.batch_size,
                "seed": s.seed, "shuffle_buffer_size": s.buffer_size}

    def state(self) -> dict:
        return {"pass": self.stream.epoch, "positions": {str(k): v for k, v in self.positions.items()},
                "skipped_images": sum(self.skipped.values()), **self.layout()}

    def restore(self, state: dict) -> None:
        theirs = {k: state.get(k) for k in self.layout()}
        if theirs != self.layout():
            diff = ", ".join(f"{k} {theirs[k]} -> {v}" for k, v in self.layout().items() if theirs[k] != v)
            raise ValueError(f"The checkpoint's stream was read with another layout ({diff}), so its position means "
                             "nothing here. Resume with the same --dataloader_num_workers, number of processes, "
                             "--per_device_train_batch_size, --seed and --shuffle_buffer_size.")
        self.first_pass = int(state["pass"])
        self.stream.epoch = self.first_pass
        self.positions = {int(k): int(v) for k, v in state["positions"].items()}
        self.stream.skip = dict(self.positions)

    def __iter__(self) -> Iterator[dict]:
        extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers and self.prefetch_factor else {}
        loader = torch.utils.data.DataLoader(self.stream, batch_size=self.batch_size, num_workers=self.num_workers,
                                             collate_fn=tagged_collate(self.collate),
                                             pin_memory=self.pin_memory and torch.cuda.is_available(), **extra)
        for batch in loader:
            worker, position, skipped = (int(x) for x in batch.pop("stream_tags"))
            self.positions[worker] = position + 1
            self.skipped[worker] = skipped
            yield batch
        self.stream.skip = {}  # the pass is over: the next one starts from its beginning


def save_stream_state(loader: StreamLoader, folder: str | os.PathLike) -> None:
    Path(folder, STATE_FILE.format(rank=loader.stream.rank)).write_text(json.dumps(loader.state(), indent=1))


def load_stream_state(folder: str | os.PathLike, rank: int) -> dict | None:
    path = Path(folder, STATE_FILE.format(rank=rank))
    return json.loads(path.read_text()) if path.is_file() else None


def materialize(stream: ImageStream, count: int) -> Dataset:
    """The first `count` decodable examples of a stream (in its own order; corrupt images skipped as in training)
    as a map-style Dataset with the stream's transform, the images kept undecoded in memory (~110 KB each for
    ImageNet: 1.1 GB for 10,000): a fixed set that every evaluation reads the same way. Fewer when the split is
    shorter (the log says so)."""
    features = stream.examples().features
    rows = [example for _, example, _, _ in islice(stream.decoded(), count)]  # decoded once, to skip the bad ones
    if len(rows) < count:
        logger.warning("Split %s gave %d images, fewer than the %d asked for.", stream.split, len(rows), count)
    data = Dataset.from_list(rows, features=features, split=stream.split)
    return data.with_transform(_DecodeThen(stream.transform))


class _DecodeThen:
    """A map-style transform: decode the undecoded images of a batch, then the stream's transform."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, examples: dict) -> dict:
        column = self.transform.image_column
        images = [decode_image(value, self.transform.mode) for value in examples[column]]
        return self.transform({**examples, column: images})


def fixed_sample(dataset_name: str, split: str | None, candidates: tuple[str, ...], role: str, image_processor,
                 num_channels: int, args: StreamArguments, *, image_column: str = "image", label_column: str = "label",
                 needs_labels: bool = True, seed: int = 0, count: int | None = None) -> Dataset:
    """A fixed set of `count` images (default DEFAULT_STREAM_EVAL_SAMPLES) of a streamed split, checked first
    (open_stream): the first of a shuffle seeded by `seed`, the same on every process, not the first images (an
    imagefolder, and some parquet exports, list a split by class). The evaluation set and the k-NN bank."""
    name, stream = open_stream(dataset_name, split, candidates, role, image_column,
                               label_column if needs_labels else None)
    labels = label_column if label_column in (stream.features or {}) else None
    transform = ImageClassificationTransform(image_processor, image_column, labels, num_channels)
    return materialize(ImageStream(stream, transform, split=name, seed=seed, buffer_size=args.shuffle_buffer_size,
                                   max_bad_fraction=args.max_bad_fraction),
                       DEFAULT_STREAM_EVAL_SAMPLES if count is None else count)


def prepare_stream_splits(dataset_name: str, image_processor, num_channels: int, args: StreamArguments, *,
                          image_column: str = "image", label_column: str = "label", train_split: str | None = None,
                          eval_split: str | None = None, max_train_samples: int | None = None,
                          max_eval_samples: int | None = None, train_needs_labels: bool = True,
                          eval_needs_labels: bool = True, seed: int = 0, train_augment=None, rank: int = 0,
                          world: int = 1) -> tuple[ImageStream, Dataset, list[str] | None]:
    """prepare_splits for a stream: (the training stream of this process, max_eval_samples images of the
    evaluation split (default DEFAULT_STREAM_EVAL_SAMPLES: the first of a shuffle seeded by `seed`, the same on
    every process) as a fixed Dataset, label names). Both splits and their columns are checked before anything
    is decoded."""
    args.check()
    train_name, train = open_stream(dataset_name, train_split, ("train",), "train (--train_split)", image_column,
                                    label_column if train_needs_labels else None)
    labels = label_column if label_column in (train.features or {}) else None
    transform = ImageClassificationTransform(image_processor, image_column, labels, num_channels, augment=train_augment)
    limit = None if max_train_samples is None else max(1, max_train_samples // world)
    train_stream = ImageStream(train, transform, split=train_name, seed=seed, buffer_size=args.shuffle_buffer_size,
                               rank=rank, world=world, limit=limit, max_bad_fraction=args.max_bad_fraction)
    fixed = fixed_sample(dataset_name, eval_split, EVAL_SPLITS, "evaluation (--eval_split)", image_processor,
                         num_channels, args, image_column=image_column, label_column=label_column,
                         needs_labels=eval_needs_labels, seed=seed, count=max_eval_samples)
    logger.info("Streaming %s: training on split %s (shuffle buffer %d, process %d of %d); evaluation on %d images "
                "of split %s (the first of a shuffle seeded by --seed %d).", dataset_name, train_name,
                args.shuffle_buffer_size, rank, world, len(fixed), fixed.split, seed)
    return train_stream, fixed, label_names(fixed, label_column)
