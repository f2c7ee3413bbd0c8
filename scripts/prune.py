"""Gradual pruning with fine-tuning and distillation: the main job.

  accelerate launch scripts/prune.py                       # offline demo: digits ViT -> 75% with CAP + KD
  accelerate launch scripts/prune.py --sparsity 0.9        # the demo with some of its flags overridden
  accelerate launch scripts/prune.py --model_name_or_path M --dataset_name D --output_dir OUT \
      --sparsity 0.75 --num_train_epochs 10 ...   # every PruningConfig / CAPTrainingArguments / TrainingArguments flag
  accelerate launch scripts/prune.py config.json           # or config.yaml: the same keys
  accelerate launch scripts/prune.py --recipe OTHER/cap_recipe.yaml ...   # a recipe; flags given here win

On one or many processes (`accelerate launch --multi_gpu --num_processes N`); without a GPU the
processes train on the CPU with DDP over gloo. OUT is a pruned checkpoint: the model (plain
`from_pretrained`), sparsity_config.json, cap_recipe.yaml, eval_results.json, the model card
(README.md + sparsity_per_layer.png) and all_results.json (accuracy, sparsity, pruning history).
`--push_to_hub --hub_model_id NAME` publishes OUT when training is done (the token and the repo are checked
before it starts). Errors are one line from the main process; add `-q` to `accelerate launch` to drop the
launcher's own traceback after it.

A backbone without a head (DINO's ViTModel, Dinov2Model) is pruned without labels: the Fisher of its
features, training by distillation of the dense model's features, evaluation by weighted k-NN, a linear
probe and feature cosine (eval_knn_accuracy, eval_linear_probe_accuracy, eval_feature_cosine; labels only
there, bank: --knn_bank_split); OUT loads with AutoModel. `--fisher_objective cross_entropy` instead gives
it a linear probe on the labels first and prunes it as a classifier.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig

from cap_hf.cli import demo
from cap_hf.cli.backbone import FeatureEvalArguments, backbone_evaluator
from cap_hf.cli.parser import parse_args, run
from cap_hf.config import PruningConfig
from cap_hf.engine.calibration import check_calibration_size
from cap_hf.evaluation.metrics import compute_metrics
from cap_hf.evaluation.probe import train_linear_probe
from cap_hf.io.checkpoint import CheckpointError
from cap_hf.io.data import ImageClassificationTransform, RandomResizedCropFlip
from cap_hf.io.hub import HubError, check_push, push_checkpoint
from cap_hf.io.models import (
    load_classifier,
    load_for_labels,
    load_image_processor,
    load_model,
    saved_as_classifier,
)
from cap_hf.io.sources import check_sources
from cap_hf.io.stream import StreamArguments
from cap_hf.masks import SparsityMismatchError
from cap_hf.oneshot import METRICS
from cap_hf.trainer import CAPTrainer, CAPTrainingArguments, check_backbone_distillation
from model_cards import write_model_card

logger = logging.getLogger("cap_hf.prune")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Dense image classifier, or a backbone (DINO, DINOv2), pruned "
                                                     "without labels: Hub id or local folder."})
    probe_epochs: float = field(default=3.0, metadata={"help": "Epochs of the linear probe trained on frozen "
                                                              "features when the model has no head for the labels "
                                                              "(a classifier for other labels, or a backbone with "
                                                              "--fisher_objective cross_entropy)."})
    probe_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of that probe."})


@dataclass
class DataArguments:
    dataset_name: str = field(metadata={"help": "Hub id, save_to_disk folder, imagefolder folder, or "
                                                "builtin:digits / builtin:fashion-mnist."})
    image_column_name: str = field(default="image")
    label_column_name: str = field(default="label")
    train_split: str | None = field(default=None, metadata={"help": "Default: train."})
    eval_split: str | None = field(default=None, metadata={"help": "Default: validation, else test."})
    train_val_split: float | None = field(default=None, metadata={"help": "Hold out this fraction of train for "
                                                                           "evaluation when there is no eval split."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    crop_scale_min: float = field(default=0.08, metadata={"help": "RandomResizedCrop minimum area (1 = no crop)."})
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flips in training."})
    augmentation_backend: str = field(default="auto", metadata={
        "help": "auto: torchvision's transforms v2 where torchvision imports (faster), else PIL; "
                "torchvision (an error without it); pil."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing into a non-empty output_dir."})

    def __post_init__(self):
        self.augmentation()  # a backend that cannot run fails here, before anything is loaded

    def augmentation(self) -> RandomResizedCropFlip:
        return RandomResizedCropFlip(scale=(self.crop_scale_min, 1.0), hflip=self.hflip,
                                     backend=self.augmentation_backend)


TYPES = (ModelArguments, DataArguments, FeatureEvalArguments, PruningConfig, CAPTrainingArguments, StreamArguments)
PROG = "accelerate launch scripts/prune.py"


def parse(argv: list[str]) -> tuple[list[str], tuple]:
    """(the arguments in effect, the parsed dataclasses). Without --model_name_or_path and --dataset_name it is
    the offline demo (cap_hf.cli.demo): the demo's flags, then the user's, which win; its teacher is trained once."""
    if not demo.is_demo(argv):
        parsed = parse_args(TYPES, argv, description=__doc__, prog=PROG, hint="(Give neither --model_name_or_path nor "
                            "--dataset_name for the offline demo, with any other flag over its own.)")
        check_run(parsed)
    else:
        from accelerate import PartialState

        user = list(argv)
        config = parse_args(TYPES, demo.demo_arguments() + user, prog=PROG)[3]
        out = None if demo.gives_output_dir(user) else demo.demo_output_dir(config.method, config.sparsity)
        argv = demo.demo_arguments(out) + user
        parsed = parse_args(TYPES, argv, prog=PROG)
        check_run(parsed)  # before the teacher is trained
        logger.info("No --model_name_or_path / --dataset_name given: the offline demo (a ViT trained on scikit-learn's "
                    "digits, pruned gradually with %s and distillation)%s, into %s. For your model: "
                    "--model_name_or_path M --dataset_name D --output_dir OUT.", parsed[3].method,
                    f" with your flags {shlex.join(user)}" if user else "", parsed[4].output_dir)
        state = PartialState()
        with state.main_process_first():
            if out is not None and state.is_main_process:
                demo.prepare_output(out)
            demo.ensure_digits_teacher(progress=state.is_main_process)
    return argv, parsed


def check_run(parsed: tuple) -> None:
    """The schedule against the recipe, and a streamed run's own rules (--max_steps, a schedule in steps)."""
    config, training_args, stream = parsed[3], parsed[4], parsed[5]
    training_args.check_pruning(config)
    if stream.streaming:
        stream.check()
        training_args.check_stream()


def check_output_dir(data_args: DataArguments, training_args: CAPTrainingArguments) -> None:
    out = Path(training_args.output_dir)
    if out.is_dir() and any(p.name != demo.MARKER for p in out.iterdir()) and not data_args.overwrite_output_dir \
            and not training_args.resume_from_checkpoint:
        raise SystemExit(f"error: {out} is not empty (it may hold another run). Choose a new --output_dir, pass "
                         "--overwrite_output_dir true, or --resume_from_checkpoint to continue it.")


def main(argv: list[str] | None = None, hub_api=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cap_hf").setLevel(logging.INFO)
    logging.getLogger("trainer_plugins").setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    try:  # before anything is loaded: bad values, the push (token, repo), where the model and data come from
        argv, (model_args, data_args, feature_args, config, training_args, stream_args) = parse(argv)
        check_output_dir(data_args, training_args)
        repo_id = check_push(training_args, hub_api)
        check_sources(model=model_args.model_name_or_path, dataset=data_args.dataset_name,
                      teacher=training_args.teacher_name_or_path if training_args.distill else None)
    except (ValueError, HubError) as err:
        raise SystemExit(f"error: {err}") from None

    try:
        processor = load_image_processor(model_args.model_name_or_path)
        model_config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    channels = getattr(model_config, "num_channels", 3)
    # a backbone (no *ForImageClassification in its architectures) is pruned on its features, without labels
    backbone = not saved_as_classifier(model_config.architectures) and config.fisher_objective != "cross_entropy"
    if backbone and config.label_free_fisher:
        raise SystemExit(f"error: --label_free_fisher samples labels from a classifier's predictions, and "
                         f"{model_args.model_name_or_path} is a backbone without a head: it gets the Fisher of its "
                         "features, no labels needed. Drop --label_free_fisher, or give --fisher_objective "
                         "cross_entropy to train a linear probe first.")
    try:
        check_backbone_distillation(backbone, training_args.distill, model_args.model_name_or_path)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    augment = data_args.augmentation()
    try:
        train, evaluation, names = stream_args.splits(
            data_args.dataset_name, processor, channels, image_column=data_args.image_column_name,
            label_column=data_args.label_column_name, train_split=data_args.train_split,
            eval_split=data_args.eval_split, max_train_samples=data_args.max_train_samples,
            max_eval_samples=data_args.max_eval_samples, train_needs_labels=not backbone, seed=training_args.seed,
            train_augment=augment, train_val_split=data_args.train_val_split, eval_needs_labels=not backbone,
            rank=training_args.process_index, world=training_args.world_size)
        if config.needs_fisher and not stream_args.streaming:  # CAPTrainer's check, before the probe and the dense evaluation
            check_calibration_size(len(train), config.num_grads, config.grad_batch_size, training_args.world_size)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    if backbone:
        model, processor = load_model(model_args.model_name_or_path)
        fresh_head = False
    else:
        model, processor, fresh_head = load_for_labels(model_args.model_name_or_path, names)
        if fresh_head and stream_args.streaming:
            raise SystemExit(f"error: {model_args.model_name_or_path} has no head for the labels of "
                             f"{data_args.dataset_name}, and the linear probe it would need first is trained in "
                             "epochs, which a stream does not have. Train the head first (say, scripts/prune.py "
                             "--sparsity 0 on a prepared subset), or prune the backbone on its features.")
    calibration = train.with_transform(ImageClassificationTransform(
        processor, data_args.image_column_name, data_args.label_column_name, channels))  # eval transforms

    if fresh_head:  # a backbone (or another label set): linear probe on frozen features first
        logger.info("%s has no head for these %d labels; training a linear probe for %g epochs",
                    model_args.model_name_or_path, model.config.num_labels, model_args.probe_epochs)
        probe = train_linear_probe(model, train, evaluation, training_args, model_args.probe_epochs,
                                   model_args.probe_learning_rate)
        logger.info("linear probe: top-1 %.4f", probe.get("probe_accuracy", float("nan")))

    teacher = None
    if training_args.distill and training_args.teacher_name_or_path:
        teacher = (load_model if backbone else load_classifier)(training_args.teacher_name_or_path)[0]
    try:
        trainer = CAPTrainer(model=model, args=training_args, pruning_config=config, train_dataset=train,
                             eval_dataset=evaluation, calibration_dataset=calibration, teacher_model=teacher,
                             processing_class=processor, compute_metrics=None if backbone else compute_metrics)
    except ValueError as err:  # schedule does not fit, teacher with other labels, ...
        raise SystemExit(f"error: {err}") from None
    if backbone:  # on the device the Trainer chose; the dense features are taken now, before any pruning
        trainer.feature_evaluator = backbone_evaluator(
            trainer.model, processor, data_args.dataset_name, evaluation, feature_args, pooling=config.feature_pooling,
            image_column=data_args.image_column_name, label_column=data_args.label_column_name,
            eval_split=data_args.eval_split, seed=training_args.seed,
            batch_size=training_args.per_device_eval_batch_size, num_workers=training_args.dataloader_num_workers,
            stream=stream_args)

    dense_metrics = trainer.evaluate(metric_key_prefix="dense")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    metrics["sparsity"] = trainer.pruning_callback.sparsity
    metrics.update({f"dense_{k}": dense_metrics[f"dense_{k}"] for k in METRICS if f"dense_{k}" in dense_metrics})
    metrics["pruning_history"] = trainer.pruning_callback.history
    metrics["num_processes"] = trainer.args.world_size
    metrics["ranks_identical"] = trainer.pruning_callback.ranks_identical
    if stream_args.streaming:  # what the stream gave: a fixed evaluation set, corrupt images skipped
        metrics["eval_samples"] = len(evaluation)
        metrics["skipped_images"] = trainer.skipped_images
    command = shlex.join(["accelerate", "launch", "scripts/prune.py", *argv])
    trainer.recipe_info = {"command": command, "base_model": model_args.model_name_or_path,
                           "dataset": data_args.dataset_name}
    trainer.save_model()
    out = training_args.output_dir
    try:  # rank 0 writes the records and pushes while the others wait
        if trainer.is_world_process_zero():
            eval_split = "held-out part of train" if data_args.train_val_split and evaluation.split in (None, "train") \
                else str(evaluation.split or data_args.eval_split or "evaluation")
            trainer.save_metrics("eval", {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, combined=False)
            Path(out, "all_results.json").write_text(json.dumps(metrics, indent=2))
            trainer.save_state()
            write_model_card(out, repo_id=repo_id, base_model=model_args.model_name_or_path,
                             dataset=data_args.dataset_name, eval_split=eval_split, command=command)
            key = next(k for k in ("accuracy", "knn_accuracy", "feature_cosine") if f"eval_{k}" in metrics)
            name = {"accuracy": "top-1", "knn_accuracy": "k-NN top-1", "feature_cosine": "feature cosine"}[key]
            print(f"dense {name} {100 * metrics[f'dense_{key}']:.2f}% -> sparse {name} "
                  f"{100 * metrics[f'eval_{key}']:.2f}% at {100 * metrics['sparsity']:.1f}% sparsity "
                  f"({config.method}); model in {out}")
            if repo_id:
                try:
                    info = push_checkpoint(out, repo_id, private=training_args.hub_private_repo,
                                           revision=training_args.hub_revision, token=training_args.hub_token,
                                           api=hub_api)
                except (HubError, CheckpointError, SparsityMismatchError) as err:
                    raise SystemExit(f"error: {err}\nThe pruned model is saved in {out}; publish it with "
                                     f"`python scripts/push_to_hub.py {out} --repo_id {repo_id}` (running this "
                                     "command again would train again).") from None
                print(f"pushed {out} -> {getattr(info, 'commit_url', repo_id)}")
    finally:  # every process leaves the group together (a process exiting early can abort in gloo)
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()
    return metrics


if __name__ == "__main__":
    run(main)
