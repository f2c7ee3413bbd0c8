"""The offline demo behind `accelerate launch scripts/prune.py` with neither --model_name_or_path nor
--dataset_name: a small ViT teacher trained on scikit-learn's digits (cached on disk), then pruned gradually
to 75% with CAP + distillation. Flags given with it override the demo's own (`--sparsity 0.9`, ...)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from cap_hf.cli.parser import config_file, given_flags

logger = logging.getLogger(__name__)

DEMO_ROOT = Path("outputs") / "demo"
DEMO_IMAGE_SIZE = 8
DEMO_DATASET = "builtin:digits"
TEACHER_EPOCHS = 30
MARKER = ".cap_hf_demo"  # in a folder the demo wrote (hidden: never published)
# what a run needs that the demo otherwise supplies
RUN_FLAGS = ("model_name_or_path", "dataset_name")


def is_demo(argv: Sequence[str]) -> bool:
    """The demo runs when neither a model nor a dataset is named on the command line (and no config file or
    --help is given): what the user gives then overrides the demo's flags."""
    if any(a in ("-h", "--help") for a in argv) or config_file(argv):
        return False
    return not given_flags(argv) & set(RUN_FLAGS)


def gives_output_dir(argv: Sequence[str]) -> bool:
    return "output_dir" in given_flags(argv)


def demo_output_dir(method: str, sparsity: float) -> Path:
    """outputs/demo/cap75 for CAP at 75%: a demo run with other flags does not replace another's result."""
    return DEMO_ROOT / f"{method}{round(100 * sparsity)}"


def demo_arguments(output_dir: str | Path | None = None) -> list[str]:
    """Command-line arguments equivalent to the demo (documented in the README)."""
    return [
        "--model_name_or_path", str(DEMO_ROOT / "teacher"), "--dataset_name", DEMO_DATASET,
        "--output_dir", str(output_dir or demo_output_dir("cap", 0.75)),
        "--method", "cap", "--sparsity", "0.75", "--num_train_epochs", "12",
        "--num_pruning_steps", "4", "--num_grads", "64", "--grad_batch_size", "16", "--fisher_block_size", "64",
        "--learning_rate", "1e-3", "--cyclic_lr", "true", "--per_device_train_batch_size", "32",
        "--eval_strategy", "epoch", "--save_strategy", "no", "--logging_steps", "20", "--report_to", "none",
        "--crop_scale_min", "0.7", "--hflip", "false", "--seed", "0",
    ]


def _written_by_demo(folder: Path) -> bool:
    if (folder / MARKER).exists():
        return True
    recipe = folder / "cap_recipe.yaml"  # a demo result of an earlier cap_hf (no marker yet)
    if recipe.is_file():
        import yaml

        data = yaml.safe_load(recipe.read_text()) or {}
        return data.get("dataset") == DEMO_DATASET and data.get("base_model") == str(DEMO_ROOT / "teacher")
    return False


def prepare_output(folder: str | Path) -> None:
    """Make the demo's own output folder ready: a previous demo result there is replaced (said in the log),
    anything else is refused, so no file of another run is mixed into or lost by the demo."""
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()):
        if not _written_by_demo(folder):
            raise SystemExit(f"error: {folder} holds files the demo did not write. Move them, or give the demo another "
                             "--output_dir.")
        logger.info("Replacing the previous demo result in %s.", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("written by the cap_hf demo (scripts/prune.py without a model); replaced by the next\n")


def ensure_digits_teacher(folder: str | Path = DEMO_ROOT / "teacher", epochs: int = TEACHER_EPOCHS, seed: int = 0,
                          progress: bool = True) -> Path:
    """Train (once) a ViT on digits and save it with its image processor; reuse it when present. Says which,
    and shows the training's progress bar."""
    folder = Path(folder)
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        results = folder / "eval_results.json"
        accuracy = json.loads(results.read_text()).get("eval_accuracy") if results.is_file() else None
        logger.info("Reusing the demo's teacher in %s (%sdelete the folder to train it again).", folder,
                    f"top-1 {100 * accuracy:.2f}% on the digits test split; " if accuracy is not None else "")
        return folder
    import torch
    from transformers import Trainer, TrainingArguments

    from cap_hf.evaluation.metrics import compute_metrics
    from cap_hf.io.data import collate, digits_dataset, prepare_splits
    from cap_hf.io.models import make_image_processor, make_vit_classifier

    logger.info("Training the demo's teacher: a 4-layer ViT on scikit-learn's digits, %d epochs (about 30 s on 2 CPU "
                "cores), saved to %s and reused by later runs.", epochs, folder)
    processor = make_image_processor(DEMO_IMAGE_SIZE, 1)
    train, evaluation, names = prepare_splits(digits_dataset(), processor, 1, seed=seed)
    model = make_vit_classifier(names, DEMO_IMAGE_SIZE, 1, patch_size=2, hidden_size=64, num_hidden_layers=4,
                                num_attention_heads=2, seed=seed)
    args = TrainingArguments(output_dir=str(folder), num_train_epochs=epochs, learning_rate=2e-3,
                             per_device_train_batch_size=32, save_strategy="no", report_to="none",
                             use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
                             disable_tqdm=not progress, logging_strategy="no", seed=seed,
                             dataloader_pin_memory=torch.cuda.is_available())
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation, data_collator=collate,
                      compute_metrics=compute_metrics, processing_class=processor)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    trainer.save_metrics("eval", metrics)
    logger.info("Demo teacher trained: top-1 %.2f%% on the digits test split.", 100 * metrics["eval_accuracy"])
    return folder
