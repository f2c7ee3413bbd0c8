"""Streamed data (cap_hf.io.stream): parquet shards and an imagefolder of small JPEGs written here, read as
datasets' streams; the scripts' --streaming runs; resumption; corrupt images; bad input."""

import io
import json
import logging

import numpy as np
import pytest
import torch
from conftest import load_script
from datasets import ClassLabel, Dataset, Features, Image, Value

from cap_hf.io.data import ImageClassificationTransform, RandomResizedCropFlip, collate, digits_dataset
from cap_hf.io.stream import (
    BadImagesError,
    ImageStream,
    StreamLoader,
    load_stream_state,
    materialize,
    open_stream,
)

SHARDS = {"train": 4, "validation": 2}


def jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shards(root, corrupt: int | None = None, all_bad_split: str | None = None):
    """digits as the Hub lays out parquet: data/{split}-0000i-of-0000n.parquet; every row has its `idx`. The
    train row `corrupt` holds bytes that are no image; every row of `all_bad_split` does."""
    digits = digits_dataset()
    names = digits["train"].features["label"].names
    features = Features({"image": Image(), "label": ClassLabel(names=names), "idx": Value("int64")})
    (root / "data").mkdir(parents=True)
    for split, source in (("train", digits["train"]), ("validation", digits["test"])):
        rows = [{"image": {"bytes": jpeg(ex["image"]), "path": None}, "label": ex["label"], "idx": i}
                for i, ex in enumerate(source)]
        if split == "train" and corrupt is not None:
            rows[corrupt]["image"] = {"bytes": b"no image here", "path": None}
        if split == all_bad_split:
            for row in rows:
                row["image"] = {"bytes": b"\xff\xd8 truncated", "path": None}
        n, count = len(rows), SHARDS[split]
        for s in range(count):
            Dataset.from_list(rows[s * n // count:(s + 1) * n // count], features=features).to_parquet(
                root / "data" / f"{split}-{s:05d}-of-{count:05d}.parquet")
    return root


@pytest.fixture(autouse=True)
def short_pause_after_a_shuffled_pass(monkeypatch):
    """datasets sleeps 5 s when a shuffled parquet stream ends or is left (for apache/arrow#45214: its reader
    threads must stop before the process exits), most of each test's time here; half a second still lets them
    stop. Forked DataLoader workers inherit the value."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("parquet") / "digits", corrupt=5)


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder") / "digits"
    digits = digits_dataset()
    for split, source in (("train", digits["train"]), ("validation", digits["test"])):
        names = source.features["label"].names
        for i, ex in enumerate(source):
            folder = root / split / names[ex["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            ex["image"].save(folder / f"{i}.jpg", quality=95)
    return root


def processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5])


def train_stream(folder, label="label", **settings) -> ImageStream:
    name, split = open_stream(str(folder), None, ("train",), "train", "image", label)
    return ImageStream(split, ImageClassificationTransform(processor(), "image", label, 1), split=name, **settings)


def ids(stream: ImageStream) -> list[int]:
    return [int(e["labels"]) for e in stream]


def test_bad_split_and_column_are_refused_before_reading(shards):
    with pytest.raises(ValueError, match=r"Split 'dev' for train not found; the dataset has \['train', 'validation'\]"):
        open_stream(str(shards), "dev", ("train",), "train", "image", "label")
    with pytest.raises(ValueError, match="no label column 'class'.*Set --label_column_name"):
        open_stream(str(shards), None, ("train",), "train", "image", "class")
    with pytest.raises(ValueError, match="no image column 'img'"):
        open_stream(str(shards), None, ("train",), "train", "img", None)


def test_a_pass_reads_every_image_once_and_holds_none(shards, monkeypatch):
    import cap_hf.io.stream as stream_module

    decoded = []
    original = stream_module.decode_image
    monkeypatch.setattr(stream_module, "decode_image", lambda value, mode: decoded.append(1) or original(value, mode))
    stream = train_stream(shards, "idx", buffer_size=64)
    assert not hasattr(stream, "__len__") and isinstance(stream.stream, stream_module.IterableDataset)
    seen = ids(stream)
    rows = len(digits_dataset()["train"])
    assert len(decoded) == rows  # each image decoded once in the pass, the corrupt one included
    assert sorted(seen) == sorted(set(range(rows)) - {5})  # every good image once, the corrupt one skipped
    assert seen != sorted(seen)  # shuffled: shard order and buffer
    assert ids(train_stream(shards, "idx", buffer_size=64)) == seen  # seeded: the same pass again
    other = train_stream(shards, "idx", buffer_size=64)
    other.epoch = 1
    assert ids(other) != seen  # another pass, another order


def test_two_processes_read_disjoint_shares(shards):
    first = ids(train_stream(shards, "idx", rank=0, world=2))
    second = ids(train_stream(shards, "idx", rank=1, world=2))
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(set(range(len(digits_dataset()["train"]))) - {5})
    assert abs(len(first) - len(second)) <= len(digits_dataset()["train"]) // 4  # two of the four shards each


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_loader_continues_the_pass(shards, workers):
    """Stopped after 10 batches and restored from its state: the rest of the pass, in the same order as an
    uninterrupted pass, no image twice (with 2 DataLoader workers too)."""
    def loader():
        return StreamLoader(train_stream(shards, "idx", buffer_size=32), 16, collate, num_workers=workers)

    whole = [i for batch in loader() for i in batch["labels"].tolist()]
    first, stopped = loader(), []
    for index, batch in enumerate(first):
        stopped += batch["labels"].tolist()
        if index == 9:
            state = json.loads(json.dumps(first.state()))  # through a file's format
            break
    resumed = loader()
    resumed.restore(state)
    resumed.set_epoch(0)
    rest = [i for batch in resumed for i in batch["labels"].tolist()]
    assert stopped + rest == whole and not set(stopped) & set(rest)
    changed = StreamLoader(train_stream(shards, "idx", buffer_size=32), 8, collate, num_workers=workers)
    with pytest.raises(ValueError, match="another layout.*batch_size 16 -> 8"):
        changed.restore(state)


def test_corrupt_images_are_skipped_and_too_many_stop_the_pass(shards, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cap_hf.io.stream"):
        seen = ids(train_stream(shards, "idx", shuffle=False))
    assert 5 not in seen and len(seen) == len(digits_dataset()["train"]) - 1
    assert "Skipped a corrupt image of split train" in caplog.text and "position 5" in caplog.text
    bad = write_shards(tmp_path / "bad", all_bad_split="train")
    with pytest.raises(BadImagesError, match=r"11 of the 11 images read .* could not be decoded.*--max_bad_fraction"):
        ids(train_stream(bad, "idx", shuffle=False))


def test_stream_examples_are_the_processors_own(shards):
    """Shapes and normalisation of a streamed example are those of the model's image processor."""
    stream = train_stream(shards, shuffle=False)
    example = next(iter(stream))
    raw = next(iter(stream.examples()))
    import PIL.Image

    image = PIL.Image.open(io.BytesIO(raw["image"]["bytes"])).convert("L")
    expected = processor()(images=[image], return_tensors="pt")["pixel_values"][0]
    assert example["pixel_values"].shape == (1, 8, 8) and torch.equal(torch.as_tensor(example["pixel_values"]), expected)
    assert float(expected.min()) >= -1 and float(expected.max()) <= 1  # (x - 0.5) / 0.5
    fixed = materialize(stream, 20)
    assert len(fixed) == 20 and torch.equal(torch.as_tensor(fixed[0]["pixel_values"]), expected)


def test_augmentation_differs_between_workers():
    """Every DataLoader worker draws its own crops (a generator seeded per process by torch)."""
    image = digits_dataset()["train"][0]["image"].convert("L").resize((32, 32))
    augment = RandomResizedCropFlip(scale=(0.1, 0.5))

    class Same(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            for _ in range(4):
                yield {"worker": info.id, "crop": np.asarray(augment(image).resize((8, 8)), dtype=np.float32)}

    batches = list(torch.utils.data.DataLoader(Same(), batch_size=4, num_workers=2))
    assert [int(b["worker"][0]) for b in batches] == [0, 1]
    assert not torch.equal(batches[0]["crop"], batches[1]["crop"])


def prune_args(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
            "--streaming", "true", "--sparsity", "0.75", "--num_grads", "8", "--grad_batch_size", "8",
            "--fisher_block_size", "32", "--per_device_train_batch_size", "32", "--report_to", "none",
            "--disable_tqdm", "true", "--max_eval_samples", "64", "--shuffle_buffer_size", "64", *map(str, extra)]


def test_streamed_gradual_pruning_reaches_its_target_and_resumes(digits_model, shards, tmp_path, caplog):
    prune = load_script("prune")
    out = tmp_path / "run"
    metrics = prune.main(prune_args(digits_model, shards, out, "--max_steps", 8, "--save_steps", 4,
                                    "--num_pruning_steps", 2))
    assert metrics["sparsity"] == pytest.approx(0.75, abs=1e-3) and metrics["eval_samples"] == 64
    state = load_stream_state(out / "checkpoint-4", 0)
    assert state["pass"] == 0 and sum(state["positions"].values()) >= 4 * 32  # 4 steps of 32 images read
    with caplog.at_level(logging.INFO):
        resumed = prune.main(prune_args(digits_model, shards, out, "--max_steps", 8, "--save_steps", 4,
                                        "--num_pruning_steps", 2, "--resume_from_checkpoint", out / "checkpoint-4"))
    assert "Resuming the stream at pass 0" in caplog.text
    assert resumed["sparsity"] == pytest.approx(0.75, abs=1e-3)


def test_a_resumed_trainer_sees_no_image_twice(digits_model, shards, tmp_path):
    """DistillationTrainer on a stream, stopped at a checkpoint and resumed: the images of the two runs are
    those of one uninterrupted run, in its order."""
    from transformers import AutoModelForImageClassification

    from cap_hf.trainer import DistillationArguments, DistillationTrainer

    def run(out, steps, seen, resume=None):
        def recording(examples):
            seen.extend(int(e["idx"]) for e in examples)
            return collate(examples)

        stream = train_stream(shards, "label", buffer_size=64)
        stream = stream.with_transform(IdTransform(stream.transform))
        args = DistillationArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=16,
                                     save_steps=3, report_to="none", distill=False, disable_tqdm=True, seed=0)
        model = AutoModelForImageClassification.from_pretrained(digits_model)
        DistillationTrainer(model, args, train_dataset=stream, data_collator=recording).train(resume)

    whole, before, after = [], [], []
    run(tmp_path / "whole", 6, whole)
    run(tmp_path / "parts", 3, before)
    run(tmp_path / "parts", 6, after, resume=str(tmp_path / "parts" / "checkpoint-3"))
    assert before + after == whole and not set(before) & set(after)


class IdTransform:
    """The stream's transform, plus each example's `idx` (what the test records)."""

    def __init__(self, transform):
        self.inner = transform
        self.mode, self.image_column, self.label_column = transform.mode, transform.image_column, "label"

    def __call__(self, examples):
        return {**self.inner(examples), "idx": torch.as_tensor(examples["idx"])}


def test_an_epoch_schedule_or_no_max_steps_is_refused_with_streaming(digits_model, shards, tmp_path):
    prune = load_script("prune")
    with pytest.raises(SystemExit, match="give --max_steps"):
        prune.main(prune_args(digits_model, shards, tmp_path / "a", "--num_train_epochs", 2))
    with pytest.raises(SystemExit, match=r"A stream has no epochs, so --pruning_end_epoch cannot be placed.*"
                                         "--pruning_end_step"):
        prune.main(prune_args(digits_model, shards, tmp_path / "b", "--max_steps", 10, "--pruning_end_epoch", 1))
    with pytest.raises(SystemExit, match="--train_val_split holds out part of a split held in memory"):
        prune.main(prune_args(digits_model, shards, tmp_path / "c", "--max_steps", 10, "--train_val_split", 0.2))


def test_streamed_oneshot_and_structured_pruning_from_an_imagefolder(digits_model, imagefolder, tmp_path):
    records = load_script("oneshot").main([
        "--model_name_or_path", str(digits_model), "--dataset_name", str(imagefolder), "--streaming", "true",
        "--methods", "magnitude,cap", "--sparsity", "0.5", "--num_grads", "8", "--grad_batch_size", "8",
        "--fisher_block_size", "32", "--max_eval_samples", "100", "--output_dir", str(tmp_path / "oneshot")])
    assert [round(r["achieved_sparsity"], 3) for r in records[1:]] == [0.5, 0.5]
    results = load_script("structured_prune").main([
        "--model_name_or_path", str(digits_model), "--dataset_name", str(imagefolder), "--streaming", "true",
        "--method", "obs", "--flops_ratio", "0.7", "--calibration_samples", "64", "--reconstruction_samples", "64",
        "--max_eval_samples", "100", "--latency_repeats", "2", "--output_dir", str(tmp_path / "structured")])
    assert results["target_met"] and "reconstruction" in results
    with pytest.raises(SystemExit, match="A stream has no epochs: fine-tune a streamed run with --max_steps"):
        load_script("structured_prune").main([
            "--model_name_or_path", str(digits_model), "--dataset_name", str(imagefolder), "--streaming", "true",
            "--method", "obs", "--flops_ratio", "0.7", "--finetune_epochs", "1", "--output_dir", str(tmp_path / "x")])
