"""Benchmark: transformers' fast image processor (torchvision backend) against its PIL backend, and torchvision's
transforms v2 against cap_hf's PIL augmentation (cap_hf.io.data.RandomResizedCropFlip).

  OMP_NUM_THREADS=1 python scripts/bench/bench_transforms.py

Needs torchvision built for the installed torch. transformers 5 picks the torchvision backend by itself when
torchvision imports (AutoImageProcessor, as cap_hf.io.models.load_image_processor calls it), so most GPU users
evaluate with it. This project's CPU torch 2.13.0 has no matching CPU torchvision on the package index (PyPI's
torchvision 0.28.0 fails to import without CUDA libraries), so run this where both are installed.

1. Evaluation: the demo's digits teacher (trained once by scripts/prune.py's demo, or here) on the digits test
   split, every image first enlarged to --upscale px and stored as a JPEG, then brought back to 8 px by either
   backend: accuracy, agreement of predictions, pixel differences. Then 500 x 375 JPEGs through DeiT's processor
   (resize to 224): pixel differences and images/s, each image decoded and transformed on its own as a
   stream does it.
2. Training: cap_hf's augmentation (RandomResizedCropFlip, 0.08-1 of the area, flips) with
   --augmentation_backend torchvision (transforms v2, what "auto" picks where torchvision imports) and pil:
   images/s on one thread, decoding included.
Writes docs/benchmarks.md (section "Image processors and transforms").
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from bench_data import jpeg, smooth_jpeg
from benchlib import command_line, machine, parse_bench, publish

SECTION = "## Image processors and transforms: torchvision against PIL (issue 26)"


@dataclass
class TransformBenchArguments:
    upscale: int = 64  # px of the stored digits JPEGs (the processor brings them back to 8)
    images: int = 256  # 500 x 375 JPEGs for the rates and the pixel differences
    rounds: int = 3
    no_write: bool = False


def need_torchvision():
    try:
        import torchvision
        import torchvision.transforms.v2  # noqa: F401
    except Exception as err:  # ImportError, or a build for another torch / CUDA (RuntimeError, OSError)
        raise SystemExit(
            f"error: this benchmark needs torchvision built for torch {torch.__version__} "
            f"({type(err).__name__}: {err}). Install the matching release in another environment "
            "(torch 2.13 -> torchvision 0.28); this project's CPU torch has none."
        ) from err
    return torchvision


def decoded(data: bytes, mode: str):
    """What a stream's worker does with an image's bytes (cap_hf.io.stream.decode_image)."""
    from cap_hf.io.stream import decode_image

    return decode_image({"bytes": data, "path": None}, mode)


def pixels(transform, jpegs: list[bytes]) -> tuple[torch.Tensor, float]:
    """pixel_values of each JPEG, decoded and transformed one at a time (as ImageStream does), and images/s."""
    start = time.perf_counter()
    out = [transform({"image": [decoded(data, transform.mode)]})["pixel_values"][0] for data in jpegs]
    rate = len(jpegs) / (time.perf_counter() - start)
    return torch.stack(out), rate


def difference(a: torch.Tensor, b: torch.Tensor, std: float) -> tuple[str, float]:
    """(max and mean absolute difference, in the model's input units and in 8-bit levels; the max in levels)."""
    d = (a - b).abs()
    levels = float(d.max()) * std * 255
    return (
        f"max {d.max():.3f} ({levels:.1f} levels), mean {d.mean():.4f} ({d.mean() * std * 255:.2f} levels)",
        levels,
    )


def digits_evaluation(upscale: int) -> list[str]:
    import PIL.Image
    from transformers import AutoImageProcessor

    from cap_hf.cli.demo import ensure_digits_teacher
    from cap_hf.io.data import ImageClassificationTransform, digits_dataset
    from cap_hf.io.models import load_classifier

    teacher = ensure_digits_teacher(progress=False)
    model = load_classifier(str(teacher))[0].eval()
    test = digits_dataset()["test"]
    jpegs = [
        jpeg(image.convert("L").resize((upscale, upscale), PIL.Image.BICUBIC)) for image in test["image"]
    ]
    labels = torch.tensor(test["label"])
    rows, predictions = [], {}
    for backend in ("pil", "torchvision"):
        processor = AutoImageProcessor.from_pretrained(str(teacher), backend=backend)
        values, _ = pixels(ImageClassificationTransform(processor, "image", None, 1), jpegs)
        with torch.no_grad():
            predictions[backend] = model(pixel_values=values).logits.argmax(-1)
        accuracy = (predictions[backend] == labels).float().mean().item()
        rows.append((backend, type(processor).__name__, values, accuracy))
    agree = (predictions["pil"] == predictions["torchvision"]).float().mean().item()
    std = float(processor.image_std[0])
    lines = [
        f"Digits test split ({len(jpegs)} images), each enlarged to {upscale} px (bicubic) and stored as a "
        "JPEG (quality 90), then resized to the teacher's 8 px by its processor:",
        "",
        "| backend | class | top-1 |",
        "|---|---|---:|",
    ]
    lines += [f"| {b} | {name} | {100 * acc:.2f}% |" for b, name, _, acc in rows]
    text, levels = difference(rows[0][2], rows[1][2], std)
    lines += ["", f"Predictions that agree: {100 * agree:.2f}%; pixel_values: {text}."]
    if agree == 1 and levels <= 1.5:
        verdict = (
            "the fast (torchvision) path is enough for evaluation: the same prediction for every image, the "
            "pixels within rounding. cap_hf evaluates with whichever backend AutoImageProcessor picks."
        )
    else:
        verdict = (
            f"the backends differ ({100 * (1 - agree):.2f}% of predictions, up to {levels:.1f} levels): "
            "evaluate with the backend the model was evaluated with (AutoImageProcessor's backend=...)."
        )
    lines += ["", f"Decision: {verdict}"]
    return lines


def imagenet_sized(count: int, rounds: int) -> list[str]:
    from transformers import ViTImageProcessor, ViTImageProcessorPil

    from cap_hf.io.data import ImageClassificationTransform, RandomResizedCropFlip

    rng = np.random.default_rng(0)
    jpegs = [smooth_jpeg(rng, 500, 375) for _ in range(count)]
    images = [decoded(data, "RGB") for data in jpegs]
    size = {"height": 224, "width": 224}
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # DeiT's (ImageNet's)
    fast = ViTImageProcessor(size=size, image_mean=mean, image_std=std)
    slow = ViTImageProcessorPil(size=size, image_mean=mean, image_std=std)
    pipelines = {
        "evaluation: ViTImageProcessorPil (resize to 224, normalise)": ImageClassificationTransform(
            slow, "image", None
        ),
        "evaluation: ViTImageProcessor, torchvision backend": ImageClassificationTransform(
            fast, "image", None
        ),
        "training, --augmentation_backend pil: PIL crop + flip, then ViTImageProcessorPil": ImageClassificationTransform(
            slow, "image", None, augment=RandomResizedCropFlip(backend="pil")
        ),
        "training, --augmentation_backend torchvision (what auto picks where torchvision imports): v2 "
        "RandomResizedCrop + flip + ToDtype + Normalize": ImageClassificationTransform(
            slow, "image", None, augment=RandomResizedCropFlip(backend="torchvision")
        ),
    }
    decode, rates, values = [], {name: ([], []) for name in pipelines}, {}
    for _ in range(rounds):  # alternated, medians: the rates of one pass move by 10-20% on this machine
        start = time.perf_counter()
        for data in jpegs:
            decoded(data, "RGB")
        decode.append(count / (time.perf_counter() - start))
        for name, transform in pipelines.items():
            values[name], rate = pixels(transform, jpegs)
            rates[name][0].append(rate)
            start = time.perf_counter()
            for image in images:
                transform({"image": [image]})
            rates[name][1].append(count / (time.perf_counter() - start))
    names = list(pipelines)
    lines = [
        f"{count} JPEGs of 500 x 375 (smooth random images, quality 90), one image per call as a stream "
        f"transforms them, {torch.get_num_threads()} thread(s), median of {rounds} alternated rounds. JPEG "
        f"decoding alone: {statistics.median(decode):.0f} images/s.",
        "",
        "| pipeline | images / s, decoding included | images / s, transform only |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {name} | {statistics.median(rates[name][0]):.0f} | {statistics.median(rates[name][1]):.0f} |"
        for name in names
    ]
    lines += [
        "",
        f"Evaluation pixel_values of the two backends: {difference(values[names[0]], values[names[1]], max(std))[0]}"
        f" (shapes {tuple(values[names[0]].shape[1:])} and {tuple(values[names[1]].shape[1:])}; training: "
        f"{tuple(values[names[3]].shape[1:])}).",
    ]
    return lines


def main() -> None:
    args, _ = parse_bench(TransformBenchArguments)
    torchvision = need_torchvision()
    import transformers

    lines = [
        SECTION,
        "",
        f"Command: `{command_line('bench_transforms.py')}`",
        "",
        f"Machine: {machine()}; torchvision {torchvision.__version__}, transformers {transformers.__version__}",
        "",
    ]
    lines += digits_evaluation(args.upscale) + [""] + imagenet_sized(args.images, args.rounds)
    publish(lines, SECTION, write=not args.no_write)


if __name__ == "__main__":
    main()
