"""Structured pruning: remove whole channels (coupled residual-stream channels included) into a physically
smaller model that loads with from_pretrained, and measure what it gained.

  python scripts/structured_prune.py --method dfpc --model_name_or_path outputs/fmnist-resnet \
      --target_speedup 1.5 --dataset_name data/fashion-mnist --output_dir outputs/dfpc-1.5x

--method dfpc (data-free BGSC saliency), l1 or random; --uncoupled_only leaves the residual streams whole
(the paper's baseline). Exactly one of --pruning_ratio R (fraction of the prunable channels removed) and
--target_speedup S (the fewest channels whose removal gives S, measured at --speedup_batch_size on this
machine: a bisection over the removal order, each candidate timed). No data is needed; with
--dataset_name the dense and pruned models are evaluated, and --finetune_epochs E fine-tunes the pruned
model on the train split with distillation from the dense one (every TrainingArguments flag applies:
--learning_rate, --per_device_train_batch_size, ...; --distill false for plain cross-entropy). Writes the
model, its image processor and OUTPUT_DIR/results.json (parameters, MACs, latency at batch 1 and 64 with
the thread count, accuracy before and after fine-tuning) and its model card README.md.
--push_to_hub --hub_model_id NAME publishes OUT at the end (repo id and Hub checked before any work).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cap_hf.checkpoint import CheckpointError
from cap_hf.cli import parse_args
from cap_hf.data import collate, prepare_splits
from cap_hf.hub import HubError, check_push, push_checkpoint
from cap_hf.metrics import evaluate_accuracy
from cap_hf.models import load_classifier, processor_image_size
from cap_hf.structured import prune_channels
from cap_hf.structured.channels import check_request
from cap_hf.structured.groups import check_supported
from cap_hf.structured.measure import compare_models
from cap_hf.trainer import DistillationArguments, fine_tune
from model_cards import write_model_card

# this script's defaults for Trainer flags (a short fine-tuning of a small model; every flag can be given)
TRAINING_DEFAULTS = {"learning_rate": 5e-4, "weight_decay": 0.05, "per_device_train_batch_size": 128,
                     "per_device_eval_batch_size": 256, "save_strategy": "no", "report_to": "none"}


@dataclass
class StructuredArguments:
    model_name_or_path: str = field(metadata={"help": "Hub id or folder of an image classifier (ResNet or ViT)."})
    method: str = field(default="dfpc", metadata={"help": "dfpc (data-free BGSC saliency), l1 or random."})
    pruning_ratio: float | None = field(default=None, metadata={
        "help": "Fraction of the prunable channels to remove (exclusive with --target_speedup)."})
    target_speedup: float | None = field(default=None, metadata={
        "help": "Measured speed-up to reach at --speedup_batch_size (exclusive with --pruning_ratio)."})
    uncoupled_only: bool = field(default=False, metadata={
        "help": "Prune only channels with one producer and one consumer (residual streams kept whole)."})
    normalize: str = field(default="auto", metadata={
        "help": "mean: each group's scores over their mean before the global order; none: raw, as the paper; "
                "auto: the one measured best for the architecture (mean for ResNets, none for ViTs)."})
    round_to: int = field(default=1, metadata={
        "help": "Keep every group's width a multiple of this (e.g. 8: kernels run slower on odd widths)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Evaluate dense and pruned on its eval split."})
    image_column_name: str = field(default="image")
    label_column_name: str = field(default="label")
    eval_split: str | None = field(default=None, metadata={"help": "Default: validation, else test."})
    max_eval_samples: int | None = field(default=None)
    eval_batch_size: int = field(default=256)
    finetune_epochs: float = field(default=0, metadata={
        "help": "Epochs of fine-tuning after pruning, with distillation from the dense model (needs --dataset_name)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Fine-tune on a subset of the train split."})
    image_size: int | None = field(default=None, metadata={"help": "Input size (default: the image processor's)."})
    latency_batch_sizes: str = field(default="1,64", metadata={"help": "Batch sizes of the reported latencies."})
    latency_repeats: int = field(default=30, metadata={"help": "Timed forward passes per reported latency."})
    speedup_batch_size: int = field(default=64, metadata={"help": "Batch size the speed-up target is measured at."})
    search_repeats: int = field(default=10, metadata={"help": "Timed passes per candidate of the speed-up search."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


def main(argv: list[str] | None = None, hub_api=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cap_hf").setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, training_args = parse_args((StructuredArguments, DistillationArguments), argv, TRAINING_DEFAULTS)
        check_request(args.method, args.pruning_ratio, args.target_speedup, args.round_to, args.normalize)
        batch_sizes = [int(b) for b in args.latency_batch_sizes.split(",") if b.strip()]
        if args.finetune_epochs < 0:
            raise ValueError(f"--finetune_epochs must be >= 0, got {args.finetune_epochs}.")
        if args.finetune_epochs and not args.dataset_name:
            raise ValueError("--finetune_epochs needs --dataset_name (its train split).")
        repo_id = check_push(training_args, hub_api)
    except (ValueError, HubError) as err:
        raise SystemExit(f"error: {err}") from None
    out = Path(training_args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite_output_dir:
        raise SystemExit(f"error: {out} is not empty (another run?); pass --overwrite_output_dir to replace it.")

    try:
        model, processor = load_classifier(args.model_name_or_path)
        check_supported(model.eval())
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    image_size = (args.image_size, args.image_size) if args.image_size else processor_image_size(processor)
    train = evaluation = None
    if args.dataset_name:
        train, evaluation, _ = prepare_splits(
            args.dataset_name, processor, model.config.num_channels, args.image_column_name, args.label_column_name,
            None, args.eval_split, args.max_train_samples, args.max_eval_samples,
            train_needs_labels=bool(args.finetune_epochs), seed=training_args.seed)

    try:
        small, run = prune_channels(model, image_size, args.method, pruning_ratio=args.pruning_ratio,
                                    target_speedup=args.target_speedup, uncoupled_only=args.uncoupled_only,
                                    seed=training_args.seed, speedup_batch_size=args.speedup_batch_size,
                                    repeats=args.search_repeats, round_to=args.round_to,
                                    normalize=args.normalize)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None

    results = {
        "method": args.method, "uncoupled_only": args.uncoupled_only, "model": args.model_name_or_path,
        "image_size": list(image_size), "removed_channels": run.removed, "prunable_channels": run.prunable,
        "pruning_ratio": run.ratio, "round_to": args.round_to, "normalize": run.normalize,
        "latency": {"device": str(next(model.parameters()).device), "threads": torch.get_num_threads(),
                    "repeats": args.latency_repeats,
                    "statistic": "median of one forward pass, dense and pruned taking turns"},
        "group_widths": {name: list(w) for name, w in run.widths.items()},
        "head_groups": run.units,
        "speedup_search": [{"removed_channels": c, "speedup": s} for c, s in run.search],
    }
    if evaluation is not None:
        loader = torch.utils.data.DataLoader(evaluation, batch_size=args.eval_batch_size, collate_fn=collate,
                                             num_workers=training_args.dataloader_num_workers)
        results["accuracy_dense"] = evaluate_accuracy(model, loader)
        results["accuracy_pruned"] = evaluate_accuracy(small, loader)
    if args.finetune_epochs:
        training_args.num_train_epochs = args.finetune_epochs
        teacher = load_classifier(training_args.teacher_name_or_path)[0].eval() \
            if training_args.distill and training_args.teacher_name_or_path else model
        small, metrics = fine_tune(small, teacher, training_args, train, evaluation)
        results["accuracy_pruned_before_finetuning"] = results["accuracy_pruned"]
        results["accuracy_pruned"] = evaluate_accuracy(small, loader)
        results["finetuning"] = {"epochs": args.finetune_epochs, "train_samples": len(train),
                                 "distill": training_args.distill, "learning_rate": training_args.learning_rate,
                                 "teacher": training_args.teacher_name_or_path or args.model_name_or_path,
                                 "train_runtime_s": metrics.get("train_runtime")}
    results.update(compare_models(model, small, image_size, batch_sizes, args.latency_repeats))

    out.mkdir(parents=True, exist_ok=True)
    small.save_pretrained(out)
    processor.save_pretrained(out)
    results["command"] = " ".join(["python", "scripts/structured_prune.py", *argv])
    results["arguments"] = asdict(args)
    results["training_arguments"] = training_args.to_dict()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_model_card(out, repo_id=repo_id)  # README.md from results.json, with the chart of channels kept per group
    line = ", ".join(f"batch {b}: {results['latency_ms_dense'][str(b)]:.2f} -> {results['latency_ms_pruned'][str(b)]:.2f} ms "
                     f"({results['speedup'][str(b)]:.2f}x)" for b in batch_sizes)
    print(f"{args.method}: removed {run.removed}/{run.prunable} channels; params {results['params_dense']} -> "
          f"{results['params_pruned']}, MACs {results['macs_dense']} -> {results['macs_pruned']}; {line}")
    if evaluation is not None:
        print(f"top-1 {results['accuracy_dense']:.2%} -> {results['accuracy_pruned']:.2%}; model in {out}")
    if repo_id:
        try:
            info = push_checkpoint(out, repo_id, private=training_args.hub_private_repo,
                                   revision=training_args.hub_revision, token=training_args.hub_token, api=hub_api)
        except (HubError, CheckpointError) as err:
            raise SystemExit(f"error: {err}\nThe pruned model is saved in {out}; publish it later with "
                             f"`python scripts/push_to_hub.py {out} --repo_id {repo_id}`.") from None
        print(f"pushed {out} -> {getattr(info, 'commit_url', repo_id)}")
    return results


if __name__ == "__main__":
    main()
