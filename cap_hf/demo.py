"""The offline demo behind `accelerate launch scripts/prune.py` with no arguments: a small ViT teacher
trained on scikit-learn's digits (cached on disk), then pruned gradually to 75% with CAP + distillation."""

from __future__ import annotations

from pathlib import Path

DEMO_ROOT = Path("outputs") / "demo"
DEMO_IMAGE_SIZE = 8


def demo_arguments() -> list[str]:
    """Command-line arguments equivalent to the demo (documented in the README)."""
    return [
        "--model_name_or_path", str(DEMO_ROOT / "teacher"), "--dataset_name", "builtin:digits",
        "--output_dir", str(DEMO_ROOT / "cap75"), "--overwrite_output_dir", "true",
        "--method", "cap", "--sparsity", "0.75", "--num_train_epochs", "12",
        "--num_pruning_steps", "4", "--num_grads", "64", "--grad_batch_size", "16", "--fisher_block_size", "64",
        "--learning_rate", "1e-3", "--cyclic_lr", "true", "--per_device_train_batch_size", "32",
        "--eval_strategy", "epoch", "--save_strategy", "no", "--logging_steps", "20", "--report_to", "none",
        "--crop_scale_min", "0.7", "--hflip", "false", "--seed", "0",
    ]


def ensure_digits_teacher(folder: str | Path = DEMO_ROOT / "teacher", epochs: int = 30, seed: int = 0) -> Path:
    """Train (once) a ViT on digits and save it with its image processor; reuse it when present."""
    folder = Path(folder)
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    import torch
    from transformers import Trainer, TrainingArguments

    from cap_hf.data import collate, digits_dataset, prepare_splits
    from cap_hf.metrics import compute_metrics
    from cap_hf.models import make_image_processor, make_vit_classifier

    processor = make_image_processor(DEMO_IMAGE_SIZE, 1)
    train, evaluation, names = prepare_splits(digits_dataset(), processor, 1, seed=seed)
    model = make_vit_classifier(names, DEMO_IMAGE_SIZE, 1, patch_size=2, hidden_size=64, num_hidden_layers=4,
                                num_attention_heads=2, seed=seed)
    args = TrainingArguments(output_dir=str(folder), num_train_epochs=epochs, learning_rate=2e-3,
                             per_device_train_batch_size=32, save_strategy="no", report_to="none",
                             use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
                             disable_tqdm=True, logging_strategy="no", seed=seed)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation, data_collator=collate,
                      compute_metrics=compute_metrics, processing_class=processor)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    trainer.save_metrics("eval", metrics)
    return folder
