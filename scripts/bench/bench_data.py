"""Benchmark: does decoding keep up with a training step? Images per second of the streamed training pipeline
(JPEG decode + RandomResizedCropFlip + the image processor to 224 + collate: cap_hf.io.stream's ImageStream
and StreamLoader, as scripts/prune.py --streaming reads them) with 0, 1 and 2 DataLoader workers, next to the
time of a training step (forward, backward, AdamW) of DeiT-Tiny and DeiT-Small at batch 64.

  OMP_NUM_THREADS=2 python scripts/bench/bench_data.py

The JPEGs are made here (no Hub): smooth random images at 224 x 224 (the size the issue names) and at
500 x 375 (ImageNet's typical size), quality 90, in 8 parquet shards laid out as on the Hub. Each DataLoader
worker runs with one thread; the training step uses torch's threads (OMP_NUM_THREADS). Also measured: the
evaluation transform (no augmentation), which is what a calibration pass decodes. Writes docs/benchmarks.md
(section "Data pipeline").
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from benchlib import command_line, machine, parse_bench, publish

from cap_hf.config import PruningConfig
from cap_hf.io.data import torchvision_transforms

SECTION = "## Data pipeline: streamed decoding against the training step (issue 26)"


@dataclass
class DataBenchArguments:
    images: int = 1536  # per image size
    batch_size: int = 64
    steps: int = 3  # timed training steps per model (after one warm-up)
    no_write: bool = False


def smooth_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG of a smooth random image (low-frequency noise upsampled): compresses and decodes like a photo,
    unlike white noise."""
    import PIL.Image

    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return jpeg(PIL.Image.fromarray(small).resize((width, height), PIL.Image.BICUBIC))


def jpeg(image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_shards(root: Path, count: int, width: int, height: int) -> int:
    from datasets import ClassLabel, Dataset, Features, Image

    rng = np.random.default_rng(0)
    rows = [
        {"image": {"bytes": smooth_jpeg(rng, width, height), "path": None}, "label": i % 10}
        for i in range(count)
    ]
    features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
    (root / "data").mkdir(parents=True)
    for s in range(8):
        Dataset.from_list(rows[s::8], features=features).to_parquet(
            root / "data" / f"train-{s:05d}-of-00008.parquet"
        )
    return int(np.mean([len(r["image"]["bytes"]) for r in rows]))


def stream_of(root: Path, augment: bool):
    from transformers import ViTImageProcessor

    from cap_hf.io.data import ImageClassificationTransform, RandomResizedCropFlip
    from cap_hf.io.stream import ImageStream, open_stream

    # DeiT's processor: resize to 224, ImageNet mean and std
    processor = ViTImageProcessor(size={"height": 224, "width": 224})
    name, split = open_stream(str(root), None, ("train",), "train", "image", "label")
    transform = ImageClassificationTransform(
        processor, "image", "label", 3, augment=RandomResizedCropFlip() if augment else None
    )
    return ImageStream(split, transform, split=name, seed=0, buffer_size=256)


def _one_thread(_):
    torch.set_num_threads(1)


def pipeline_rate(root: Path, workers: int, batch_size: int, augment: bool = True) -> float:
    """Images per second over one pass, from the first batch (which starts the workers) to the last. Not counted:
    the pause at the end of each worker's shuffled pass of parquet shards (datasets waits
    config.SLEEP_TIME_ON_THREADS_SHUTDOWN, 5 s, for arrow's reader threads; set to 0 here, see main())."""
    from cap_hf.io.data import collate

    stream = stream_of(root, augment)
    extra = {"worker_init_fn": _one_thread} if workers else {}
    loader = torch.utils.data.DataLoader(
        stream, batch_size=batch_size, num_workers=workers, collate_fn=collate, **extra
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the main process decodes itself with 0 workers: one core, as a worker has
    try:
        images, start, last = 0, None, None
        for batch in loader:
            last = time.perf_counter()
            if start is None:
                start = last
                continue
            images += len(batch["labels"])
        return images / (last - start)
    finally:
        torch.set_num_threads(threads)


def step_seconds(hidden: int, heads: int, batch_size: int, steps: int) -> float:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=224,
        patch_size=16,
        hidden_size=hidden,
        num_hidden_layers=12,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        num_labels=1000,
    )
    model = ViTForImageClassification(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    x, y = torch.randn(batch_size, 3, 224, 224), torch.randint(0, 1000, (batch_size,))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    args, _ = parse_bench(DataBenchArguments)
    import datasets

    # A shuffled pass over parquet shards ends, in every worker, with a fixed pause (datasets'
    # SLEEP_TIME_ON_THREADS_SHUTDOWN, apache/arrow#45214) when its shards run out: once per pass of 1.28 M images
    # at ImageNet scale, but most of the time of this benchmark's few hundred. The rate is measured without it;
    # the pause is reported beside it. (The workers are forked: they inherit the value.)
    pause = datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    rows, sizes = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for width, height in ((224, 224), (500, 375)):
            root = Path(tmp) / f"{width}x{height}"
            sizes[(width, height)] = write_shards(root, args.images, width, height)
            for workers in (0, 1, 2):
                rate = pipeline_rate(root, workers, args.batch_size)
                rows.append((f"{width}x{height}", "train", workers, rate))
                print(rows[-1], flush=True)
            rows.append(
                (f"{width}x{height}", "eval", 0, pipeline_rate(root, 0, args.batch_size, augment=False))
            )
            print(rows[-1], flush=True)
    steps = {}
    for name, hidden, heads in (("DeiT-Tiny", 192, 3), ("DeiT-Small", 384, 6)):
        steps[name] = step_seconds(hidden, heads, args.batch_size, args.steps)
        print(name, steps[name], flush=True)

    augmentation = (
        "torchvision v2" if torchvision_transforms() is not None else "PIL (torchvision does not import)"
    )
    per_core = {size: rate for size, kind, workers, rate in rows if kind == "train" and workers == 0}
    eval_rate = {size: rate for size, kind, _, rate in rows if kind == "eval"}
    lines = [
        SECTION,
        "",
        f"Command: `{command_line('bench_data.py')}`",
        "",
        f"Machine: {machine()}",
        "",
        f"{args.images} JPEGs per size, made here (smooth random images, quality 90; mean file "
        + ", ".join(f"{w}x{h}: {b // 1024} KB" for (w, h), b in sizes.items())
        + f"), 8 parquet shards, read as a stream (cap_hf.io.stream, shuffle buffer 256) at batch "
        f"{args.batch_size}. Augmentation backend: {augmentation} (--augmentation_backend auto here; "
        "scripts/bench/bench_transforms.py compares the two). Each worker and the main process with 0 workers "
        "decode on one thread. Not in the "
        f"rates: datasets pauses {pause} s (config.SLEEP_TIME_ON_THREADS_SHUTDOWN, for apache/arrow#45214) when "
        "a worker's shuffled shards run out, once per pass and worker, and when a shuffled stream is left early "
        "(each calibration pass): nothing next to a pass over ImageNet, but most of a pass of a few hundred "
        "images.",
        "",
        "| images | transform | DataLoader workers | images / s |",
        "|---|---|---:|---:|",
    ]
    lines += [
        f"| {size} | {'RandomResizedCropFlip + processor' if kind == 'train' else 'processor only'} | "
        f"{workers} | {rate:.0f} |"
        for size, kind, workers, rate in rows
    ]
    lines += [
        "",
        f"Training step, batch {args.batch_size}, forward + backward + AdamW, random weights, "
        f"{torch.get_num_threads()} threads (median of {args.steps}):",
        "",
        "| model | seconds / step | images / s | pipeline / step (224 px, 1 worker) |",
        "|---|---:|---:|---:|",
    ]
    one_worker = next(
        rate for size, kind, workers, rate in rows if size == "224x224" and kind == "train" and workers == 1
    )
    for name, seconds in steps.items():
        lines.append(
            f"| {name} | {seconds:.2f} | {args.batch_size / seconds:.1f} | "
            f"{one_worker / (args.batch_size / seconds):.1f}x |"
        )
    rate224, rate_in = per_core["224x224"], per_core["500x375"]
    grads, batch = PruningConfig.num_grads, PruningConfig.grad_batch_size
    calibration = grads * batch
    slowest = min(args.batch_size / seconds for seconds in steps.values())
    fastest = max(args.batch_size / seconds for seconds in steps.values())
    if one_worker > fastest:
        verdict = "one worker already outpaces both training steps, so here the model is the bottleneck, not the data"
    elif one_worker > slowest:
        verdict = "one worker outpaces the slower step but not the faster one"
    else:
        verdict = "one worker does not keep up with either step: the data is the bottleneck here"
    lines += [
        "",
        "Reading:",
        "",
        f"- One core decodes and augments {rate224:.0f} images/s at 224 px and {rate_in:.0f} images/s at "
        f"ImageNet's typical 500 x 375. On these CPU cores {verdict} (the last column is how many times "
        "faster the pipeline is than the step).",
        f"- On a GPU the step is the fast side. A run that trains at R images/s per GPU needs about "
        f"R / {rate_in:.0f} workers per GPU at ImageNet's image size: 1,000 images/s needs "
        f"{1000 / rate_in:.0f} workers, 3,000 needs {3000 / rate_in:.0f}. R is not measured here (no GPU); "
        "those two values are assumptions to read the table by, and a GPU server's cores are often faster "
        "than these.",
        f"- A pruning step's calibration reads num_grads x grad_batch_size images ({calibration:,} with the "
        f"defaults {grads} x {batch}) with the evaluation transform: at {eval_rate['500x375']:.0f} images/s per "
        f"core (500 x 375), {calibration / eval_rate['500x375']:.0f} s of decoding on one core, shared by "
        "--dataloader_num_workers workers (the calibration reads with the training's workers). It keeps up with "
        f"the {grads} backward passes when workers x {eval_rate['500x375']:.0f} exceeds {batch} / (the seconds of "
        "one backward pass of a batch).",
    ]
    publish(lines, SECTION, write=not args.no_write)


if __name__ == "__main__":
    main()
