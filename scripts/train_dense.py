"""Train a dense ViT, DINOv2-shaped or ResNet classifier from a config on an image dataset, so benchmarks can make their
own teachers.

  python scripts/train_dense.py --dataset_name data/fashion-mnist --output_dir outputs/fmnist-vit \
      --image_size 28 --patch_size 7 --hidden_size 192 --num_hidden_layers 6 --num_attention_heads 3 \
      --num_train_epochs 5 --learning_rate 1e-3
  python scripts/train_dense.py --arch resnet --layer_type bottleneck --embedding_size 32 \
      --hidden_sizes 64,128,256 --depths 2,2,2 --dataset_name data/fashion-mnist --output_dir outputs/fmnist-resnet

The folder it writes (model + preprocessor_config.json + all_results.json) is a --model_name_or_path
for scripts/oneshot.py and scripts/prune.py.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from cap_hf.cli.parser import parse_args, run
from cap_hf.evaluation.metrics import compute_metrics
from cap_hf.io.data import collate, prepare_splits
from cap_hf.io.models import make_image_processor, make_resnet_classifier, make_vit_classifier
from cap_hf.io.sources import check_sources


@dataclass
class ModelArguments:
    arch: str = field(default="vit", metadata={
        "help": "vit, dinov2 (transformers Dinov2ForImageClassification: layer scales, a head on CLS + patch mean), or "
                "resnet (transformers ResNetForImageClassification)."})
    image_size: int = field(default=28, metadata={"help": "Input resolution (images are resized to it)."})
    num_channels: int = field(default=1, metadata={"help": "1 for grayscale data, 3 for RGB."})
    patch_size: int = field(default=7, metadata={"help": "ViT patch size; must divide image_size."})
    hidden_size: int = field(default=192, metadata={"help": "192 is DeiT-Tiny's width."})
    num_hidden_layers: int = field(default=6)
    num_attention_heads: int = field(default=3)
    intermediate_size: int | None = field(default=None, metadata={"help": "MLP width (default 4x hidden)."})
    layerscale_value: float = field(default=1.0, metadata={"help": "dinov2: the layer scales' initial value."})
    layer_type: str = field(default="bottleneck", metadata={"help": "ResNet blocks: bottleneck or basic."})
    embedding_size: int = field(default=32, metadata={"help": "ResNet stem width."})
    hidden_sizes: str = field(default="64,128,256", metadata={"help": "ResNet stage widths, comma-separated."})
    depths: str = field(default="2,2,2", metadata={"help": "ResNet blocks per stage, comma-separated."})


@dataclass
class DataArguments:
    dataset_name: str = field(metadata={"help": "Hub id, save_to_disk folder or imagefolder folder."})
    image_column_name: str = field(default="image")
    label_column_name: str = field(default="label")
    train_split: str | None = field(default=None, metadata={"help": "Default: train."})
    eval_split: str | None = field(default=None, metadata={"help": "Default: validation, else test."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, training_args = parse_args((ModelArguments, DataArguments, TrainingArguments),
                                                      sys.argv[1:] if argv is None else argv, description=__doc__,
                                                      prog="python scripts/train_dense.py")
    try:
        check_sources(dataset=data_args.dataset_name)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if model_args.arch not in ("vit", "dinov2", "resnet"):
        raise SystemExit(f"--arch must be vit, dinov2 or resnet, got {model_args.arch!r}.")
    if model_args.arch != "resnet" and model_args.image_size % model_args.patch_size:
        raise SystemExit(f"--patch_size {model_args.patch_size} must divide --image_size {model_args.image_size}.")
    if os.path.isdir(training_args.output_dir) and os.listdir(training_args.output_dir) \
            and not data_args.overwrite_output_dir:
        raise SystemExit(f"{training_args.output_dir} is not empty; pass --overwrite_output_dir to replace it.")
    if not torch.cuda.is_available():
        training_args.use_cpu = True
        training_args.dataloader_pin_memory = False  # nothing to pin for (torch warns at every loader otherwise)
    training_args.remove_unused_columns = False

    processor = make_image_processor(model_args.image_size, model_args.num_channels)
    try:
        train, evaluation, names = prepare_splits(
            data_args.dataset_name, processor, model_args.num_channels, data_args.image_column_name,
            data_args.label_column_name, data_args.train_split, data_args.eval_split, data_args.max_train_samples,
            data_args.max_eval_samples, seed=training_args.seed)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    if names is None:
        raise SystemExit(f"Label column {data_args.label_column_name!r} is not a ClassLabel; cannot name classes.")
    if model_args.arch == "resnet":
        sizes, depths = (tuple(int(x) for x in text.split(",")) for text in (model_args.hidden_sizes, model_args.depths))
        model = make_resnet_classifier(names, model_args.num_channels, model_args.layer_type, model_args.embedding_size,
                                       sizes, depths, seed=training_args.seed)
    else:
        try:
            model = make_vit_classifier(names, model_args.image_size, model_args.num_channels, model_args.patch_size,
                                        model_args.hidden_size, model_args.num_hidden_layers,
                                        model_args.num_attention_heads, model_args.intermediate_size,
                                        seed=training_args.seed, family=model_args.arch,
                                        layerscale_value=model_args.layerscale_value)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                      data_collator=collate, compute_metrics=compute_metrics, processing_class=processor)
    train_result = trainer.train()
    metrics = dict(train_result.metrics)
    metrics.update(trainer.evaluate())
    trainer.save_model()
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)


if __name__ == "__main__":
    run(main)
