"""Trainers: DistillationTrainer (transformers.Trainer with distillation from the unpruned model: the
fine-tuning of structurally pruned models) and CAPTrainer (that plus gradual pruning and the cyclic-linear LR).

Narrow overrides only (compute_loss, create_scheduler, train, _load_from_checkpoint, save_model,
create_model_card); the pruning itself lives in trainer_plugins.CAPPruningCallback, which also works with
a plain Trainer, and the recipe of a pruning step in cap_hf.config.PruningConfig.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from cap_hf.config import PruningConfig
from cap_hf.distill import distillation_loss, feature_distillation_loss
from cap_hf.engine.calibration import calibration_seed, check_calibration_size
from cap_hf.engine.plan import check_budget
from cap_hf.evaluation.features import FeatureEvaluator, extract_features, is_backbone
from cap_hf.evaluation.metrics import compute_metrics
from cap_hf.io.data import calibration_loader, collate
from cap_hf.io.stream import STATE_FILE, StreamLoader, is_stream, load_stream_state, save_stream_state
from cap_hf.schedule import SparsitySchedule, build_schedule, check_schedule_values, cyclic_linear_factor
from trainer_plugins.pruning import CAPPruningCallback

logger = logging.getLogger(__name__)


@dataclass
class DistillationArguments(TrainingArguments):
    """TrainingArguments plus distillation from a teacher (by default the model as it was before pruning),
    with the Trainer defaults that suit fine-tuning pruned image models."""

    # Trainer defaults that suit pruning runs
    eval_strategy: IntervalStrategy | str = field(default="epoch", metadata={
        "help": "When to evaluate: 'no', 'steps', 'epoch' (default here: every epoch, to follow the accuracy as "
                "the sparsity rises; turned off when there is no evaluation data)."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Image datasets keep their columns for the transforms (Trainer's default is True)."})
    # distillation
    distill: bool = field(default=True, metadata={"help": "Distill from the dense model (or --teacher_name_or_path)."})
    teacher_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher model id or folder (default: a frozen copy of the dense model)."})
    distill_temperature: float = field(default=2.0, metadata={"help": "KD temperature T."})
    distill_alpha: float = field(default=0.5, metadata={"help": "Weight of the KD term; 1 - alpha goes to CE."})

    def __post_init__(self):
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for (torch warns at every loader otherwise)
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                self.use_cpu = True  # several CPU processes: accelerate then runs DDP over gloo
        super().__post_init__()
        if not 0.0 <= self.distill_alpha <= 1.0 or self.distill_temperature <= 0:
            raise ValueError("distill_alpha must be in [0, 1] and distill_temperature positive.")

    def check_stream(self) -> None:
        """A streamed training set (--streaming) has no length: the run is --max_steps long, and an evaluation
        'every epoch' (a pass of the whole stream) becomes one every tenth of the run. Scripts call this before
        loading anything; the trainers again when given a stream."""
        if self.max_steps <= 0:
            raise ValueError("A streamed dataset has no length, so the run is counted in optimizer steps: give "
                             "--max_steps (steps per pass = images / (per-device batch x processes x gradient "
                             "accumulation): ImageNet-1k at a global batch of 1024 is 1252 steps per pass); "
                             "--num_train_epochs does not apply to a stream.")
        if self.eval_strategy == IntervalStrategy.EPOCH:
            self.eval_strategy = IntervalStrategy.STEPS
            self.eval_steps = self.eval_steps or max(1, math.ceil(self.max_steps / 10))
            logger.info("Streaming: evaluating every %s steps instead of every epoch.", self.eval_steps)


@dataclass
class CAPTrainingArguments(DistillationArguments):
    """TrainingArguments plus the training side of gradual pruning: the schedule, distillation and the LR
    cycle. What a pruning step does (method, final sparsity, Fisher, targets) is a PruningConfig."""

    # schedule
    init_sparsity: float | None = field(
        default=None, metadata={"help": "Sparsity of the first pruning step (default: half of the final sparsity)."})
    pruning_start_epoch: float = field(default=0.0, metadata={"help": "Epoch of the first pruning step."})
    pruning_end_epoch: float | None = field(
        default=None, metadata={"help": "Epoch of the last pruning step (default: 2/3 of training, then hold)."})
    pruning_frequency_epochs: float | None = field(
        default=None, metadata={"help": "Epochs between pruning steps (default: num_pruning_steps evenly)."})
    num_pruning_steps: int = field(default=4, metadata={"help": "Pruning steps when no frequency is given."})
    inter_func: str = field(default="cubic", metadata={"help": "Sparsity interpolation: cubic | linear."})
    pruning_schedule: str | None = field(
        default=None, metadata={"help": "Explicit 'epoch:sparsity,...' list, e.g. '0:0.4,2:0.6,4:0.75'; "
                                        "overrides the fields above."})
    # the same schedule in optimizer steps (the only unit of a streamed run)
    pruning_start_step: int | None = field(default=None, metadata={"help": "Optimizer step of the first pruning "
                                                                          "step (instead of pruning_start_epoch)."})
    pruning_end_step: int | None = field(default=None, metadata={"help": "Optimizer step of the last pruning step."})
    pruning_frequency_steps: int | None = field(default=None, metadata={"help": "Optimizer steps between pruning "
                                                                               "steps."})
    pruning_schedule_steps: str | None = field(
        default=None, metadata={"help": "Explicit 'step:sparsity,...' list, e.g. '0:0.4,2000:0.6,4000:0.75'."})
    # learning rate
    cyclic_lr: bool = field(
        default=False, metadata={"help": "The paper's LR: restart at learning_rate at every pruning step and fall "
                                         "linearly to min_learning_rate before the next (replaces lr_scheduler_type)."})
    min_learning_rate: float = field(default=1e-5, metadata={"help": "End of each cyclic-linear LR cycle."})

    def __post_init__(self):
        super().__post_init__()
        if self.cyclic_lr and not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError(f"min_learning_rate ({self.min_learning_rate}) must be in [0, learning_rate].")

    def epoch_schedule_given(self) -> list[str]:
        """The flags of the schedule in epochs that were given (pruning_start_epoch: when not 0, its default)."""
        epochs = ("pruning_end_epoch", "pruning_frequency_epochs", "pruning_schedule")
        return [f"--{k}" for k in ("pruning_start_epoch", *epochs)
                if (getattr(self, k) != 0 if k == "pruning_start_epoch" else getattr(self, k) is not None)]

    def step_schedule_given(self) -> list[str]:
        """The flags of the schedule in optimizer steps that were given."""
        steps = ("pruning_start_step", "pruning_end_step", "pruning_frequency_steps", "pruning_schedule_steps")
        return [f"--{k}" for k in steps if getattr(self, k) is not None]

    def check_stream(self) -> None:
        super().check_stream()
        if self.epoch_schedule_given():
            raise ValueError(f"A stream has no epochs, so {', '.join(self.epoch_schedule_given())} cannot be placed: "
                             "give the schedule in optimizer steps (--pruning_start_step, --pruning_end_step, "
                             "--pruning_frequency_steps or --pruning_schedule_steps), or leave it to the default "
                             "(num_pruning_steps steps from step 0 to two thirds of --max_steps).")

    def check_pruning(self, config: PruningConfig) -> None:
        """The schedule against the recipe's final sparsity, before any data is loaded."""
        check_schedule_values(config.sparsity, self.init_sparsity, self.inter_func, self.pruning_frequency_epochs)
        if self.epoch_schedule_given() and self.step_schedule_given():
            raise ValueError(f"Give the pruning schedule in epochs or in steps, not both: "
                             f"{', '.join(self.epoch_schedule_given() + self.step_schedule_given())}.")
        if self.pruning_frequency_steps is not None and self.pruning_frequency_steps <= 0:
            raise ValueError("pruning_frequency_steps must be positive.")

    def sparsity_schedule(self, final_sparsity: float, total_steps: int,
                          steps_per_epoch: float | None) -> SparsitySchedule:
        """The schedule in optimizer steps: from the epoch fields (steps_per_epoch of the run), or from the step
        fields (a streamed run has no epochs: steps_per_epoch None)."""
        if steps_per_epoch is None or self.step_schedule_given():
            return build_schedule(final_sparsity, total_steps, 1.0, self.init_sparsity, self.pruning_start_step or 0,
                                  self.pruning_end_step, self.pruning_frequency_steps, self.num_pruning_steps,
                                  self.inter_func, self.pruning_schedule_steps, unit="step")
        return build_schedule(final_sparsity, total_steps, steps_per_epoch, self.init_sparsity,
                              self.pruning_start_epoch, self.pruning_end_epoch, self.pruning_frequency_epochs,
                              self.num_pruning_steps, self.inter_func, self.pruning_schedule)


def check_backbone_distillation(backbone: bool, distill: bool, name: str) -> None:
    """A backbone (no head) trains only by distilling the dense model's features: refuse it without distillation.
    The one place of this check: DistillationTrainer (on the model) and scripts/prune.py (on the config, before
    anything is loaded) call it."""
    if backbone and not distill:
        raise ValueError(f"{name} is a backbone without a head: its only training loss is the distillation of the "
                         "dense model's features. Keep --distill true (the default).")


class DistillationTrainer(Trainer):
    """Trainer whose loss distils from a frozen teacher: (1 - alpha) CE + alpha T^2 KL (cap_hf.distill).

    Fine-tunes a structurally pruned model from the unpruned one (scripts/structured_prune.py
    --finetune_epochs). Args (besides Trainer's): teacher_model, the teacher (default: a frozen copy of
    `model` as it is now). With `args.distill` false it is a plain Trainer with these defaults.
    """

    def __init__(self, model: nn.Module, args: DistillationArguments, *, teacher_model: nn.Module | None = None,
                 feature_evaluator: FeatureEvaluator | None = None, **kwargs):
        if not isinstance(args, DistillationArguments):
            raise TypeError(f"{type(self).__name__} needs {DistillationArguments.__name__} or CAPTrainingArguments.")
        check_backbone_distillation(is_backbone(model), args.distill, type(model).__name__)
        self.feature_evaluator = feature_evaluator
        self.teacher = None
        if args.distill:
            self.teacher = teacher_model if teacher_model is not None else copy.deepcopy(model)
            self.teacher.eval().requires_grad_(False)
            self._check_teacher(model, self.teacher)
        if kwargs.get("eval_dataset") is None and feature_evaluator is None and args.eval_strategy != IntervalStrategy.NO:
            logger.warning("No eval_dataset: evaluation during training is off (eval_strategy %s -> no).",
                           args.eval_strategy.value)
            args.eval_strategy = IntervalStrategy.NO
        kwargs.setdefault("data_collator", collate)
        self._stream_loader = self._stream_resume = None
        if is_stream(kwargs.get("train_dataset")):
            args.check_stream()
        super().__init__(model=model, args=args, **kwargs)
        if self.teacher is not None:
            self.loss_is_scaled_for_ga = False  # distillation loss is a per-batch mean

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """With a feature_evaluator (a backbone): its metrics (knn_accuracy, linear_probe_accuracy,
        feature_cosine against the dense model), prefixed, logged and passed to the callbacks like Trainer's;
        otherwise Trainer.evaluate."""
        if self.feature_evaluator is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        model = self.accelerator.unwrap_model(self.model)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.feature_evaluator(model).items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    @staticmethod
    def _check_teacher(student: nn.Module, teacher: nn.Module) -> None:
        s_cfg, t_cfg = getattr(student, "config", None), getattr(teacher, "config", None)
        if s_cfg is None or t_cfg is None:
            return
        if getattr(s_cfg, "num_labels", None) != getattr(t_cfg, "num_labels", None) or \
                getattr(s_cfg, "id2label", None) != getattr(t_cfg, "id2label", None):
            raise ValueError(f"The teacher's labels ({t_cfg.num_labels} classes) differ from the student's "
                             f"({s_cfg.num_labels}); distillation needs the same label set. Pass a teacher "
                             "trained on the same classes, or --distill false.")

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        # evaluate() before train() prepares the model in evaluation mode and marks it
        # `_is_accelerate_prepared`; accelerate (1.15) then skips DDP wrapping for training, and every
        # process would train alone. Clear the mark while the model is not wrapped yet.
        if self.args.world_size > 1 and self.model_wrapped is self.model \
                and getattr(self.model, "_is_accelerate_prepared", False):
            del self.model._is_accelerate_prepared
        if resume_from_checkpoint and is_stream(self.train_dataset):
            self._resume_stream(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- streamed training data (cap_hf.io.stream) --------------------------------------------------
    def get_train_dataloader(self):
        """A stream's own loader (this process's share, split by datasets, resumable), not accelerate's: its
        sharding would split the share again. The Trainer moves each batch to the device itself."""
        if not is_stream(self.train_dataset):
            return super().get_train_dataloader()
        if self._stream_loader is None:
            args = self.args
            self._stream_loader = StreamLoader(self.train_dataset, args.per_device_train_batch_size, self.data_collator,
                                               args.dataloader_num_workers, args.dataloader_pin_memory,
                                               args.dataloader_prefetch_factor)
            if self._stream_resume is not None:
                self._stream_loader.restore(self._stream_resume)
        return self._stream_loader

    def _resume_stream(self, checkpoint: str | bool) -> None:
        """Continue the stream where the checkpoint stopped (StreamLoader.restore) instead of the Trainer's
        skipping of the batches already trained on, which would read and decode them all again."""
        from transformers.trainer_utils import get_last_checkpoint

        folder = get_last_checkpoint(self.args.output_dir) if checkpoint is True else checkpoint
        state = load_stream_state(folder, self.args.process_index) if folder else None
        if state is None:
            logger.warning("%s holds no stream position (%s): the Trainer skips the batches already trained on by "
                           "reading them again.", folder, STATE_FILE.format(rank=self.args.process_index))
            return
        self._stream_resume = state
        self._stream_loader = None
        self.args.ignore_data_skip = True  # the loader itself starts where the checkpoint stopped
        logger.info("Resuming the stream at pass %d, positions %s per worker.", state["pass"], state["positions"])

    def _save_checkpoint(self, model, trial) -> None:
        """The stream's position of this process goes into checkpoint-N first, then the Trainer's files."""
        if self._stream_loader is not None:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            save_stream_state(self._stream_loader, folder)
        return super()._save_checkpoint(model, trial)

    @property
    def skipped_images(self) -> int:
        """Corrupt images the training stream skipped in its current pass (0 without a stream)."""
        return sum(self._stream_loader.skipped.values()) if self._stream_loader is not None else 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.get("labels")
        teacher = self.teacher
        device = inputs["pixel_values"].device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        if is_backbone(self.accelerator.unwrap_model(model)):  # no head, no labels: distil the features
            with torch.no_grad():
                target = extract_features(teacher, inputs["pixel_values"], "tokens")
            loss = feature_distillation_loss(extract_features(model, inputs["pixel_values"], "tokens"), target)
            return (loss, None) if return_outputs else loss
        outputs = model(pixel_values=inputs["pixel_values"])
        with torch.no_grad():
            teacher_logits = teacher(pixel_values=inputs["pixel_values"]).logits
        loss = distillation_loss(outputs.logits, teacher_logits, labels, self.args.distill_temperature,
                                 self.args.distill_alpha)
        return (loss, outputs) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Trainer (transformers 5.23) loads model.safetensors with a plain non-strict load_state_dict, but
        ViT/DeiT/DINOv2 checkpoints keep the legacy on-disk names, so most weights would silently stay
        un-loaded. Load through from_pretrained (which applies the renaming rules) and copy strictly."""
        from transformers import PreTrainedModel

        model = model if model is not None else self.model
        weights = os.path.join(resume_from_checkpoint, "model.safetensors")
        if not isinstance(model, PreTrainedModel) or not os.path.isfile(weights) or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = type(model).from_pretrained(resume_from_checkpoint, config=model.config)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded


def fine_tune(student: nn.Module, teacher: nn.Module | None, args: DistillationArguments, train_dataset,
              eval_dataset=None) -> tuple[nn.Module, dict]:
    """Train `student` (say, a structurally pruned model) on `train_dataset`, distilling from `teacher` when
    `args.distill`; returns it in eval mode on the teacher's device, and the training metrics."""
    trainer = DistillationTrainer(model=student.train(), args=args, teacher_model=teacher, train_dataset=train_dataset,
                                  eval_dataset=eval_dataset, compute_metrics=compute_metrics)
    metrics = trainer.train().metrics
    device = next((teacher or student).parameters()).device
    return trainer.model.to(device).eval(), metrics


class CAPTrainer(DistillationTrainer):
    """Trainer that prunes gradually with CAP (or FastCAP / OBS / magnitude) and distils from the dense model.

    Args (besides Trainer's):
        pruning_config: what each pruning step does, and the final sparsity (default PruningConfig()).
        calibration_dataset: dataset for the Fisher gradients (eval transforms, plain labels); default
            the train dataset. Read like the training data (dataloader_num_workers, ...).
        teacher_model: the distillation teacher; default a frozen copy of `model` taken before pruning.
        pruning_loss_fn: `loss_fn(model, batch)` for the Fisher (default cross-entropy of the logits).
    """

    _tag_names = ["cap", "sparse", "pruned"]

    def __init__(self, model: nn.Module, args: CAPTrainingArguments, *, pruning_config: PruningConfig | None = None,
                 calibration_dataset=None, teacher_model: nn.Module | None = None, pruning_loss_fn=None, **kwargs):
        if not isinstance(args, CAPTrainingArguments):
            raise TypeError("CAPTrainer needs CAPTrainingArguments (TrainingArguments plus the pruning schedule).")
        config = pruning_config if pruning_config is not None else PruningConfig()
        if config.calibration_seed is None:
            config = config.replace(calibration_seed=args.seed)
        args.check_pruning(config)
        self.recipe_info: dict = {}
        calibration = calibration_dataset if calibration_dataset is not None else kwargs.get("train_dataset")
        self.pruning_callback = CAPPruningCallback(
            config, schedule=self._schedule_for, calibration_batches=self._calibration_batches,
            loss_fn=pruning_loss_fn)
        super().__init__(model=model, args=args, teacher_model=teacher_model, **kwargs)
        self.pruning_callback.add_to(self)  # first, so that reporting integrations see its metrics
        self._calibration_dataset = calibration
        check_budget(self.model, config)  # a budget that can never be met fails now
        if config.needs_fisher and calibration is not None and hasattr(calibration, "__len__"):
            check_calibration_size(len(calibration), config.num_grads, config.grad_batch_size, self.args.world_size)
        if self.train_dataset is not None:  # fail now, not after hours, if the schedule cannot fit
            self.pruning_callback.schedule = self._schedule_for(self._total_steps())
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    @property
    def pruning_config(self) -> PruningConfig:
        return self.pruning_callback.config

    # ---- schedule ------------------------------------------------------------------------------
    def _steps_per_epoch(self) -> float | None:
        """None for a stream (no length, no epochs)."""
        if is_stream(self.train_dataset):
            return None
        batches = len(self.get_train_dataloader())
        return max(batches // self.args.gradient_accumulation_steps, 1)

    def _total_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        return math.ceil(self.args.num_train_epochs * self._steps_per_epoch())

    def _schedule_for(self, total_steps: int) -> SparsitySchedule:
        return self.args.sparsity_schedule(self.pruning_config.sparsity, total_steps, self._steps_per_epoch())

    def _calibration_batches(self, step: int, rank: int):
        if self._calibration_dataset is None:
            raise ValueError("No calibration data: pass calibration_dataset or train_dataset to CAPTrainer.")
        args = self.args
        return calibration_loader(
            self._calibration_dataset, self.pruning_config.grad_batch_size,
            calibration_seed(self.pruning_config.calibration_seed, step, rank),
            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers, prefetch_factor=args.dataloader_prefetch_factor)

    # ---- overrides -------------------------------------------------------------------------------
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if not self.args.cyclic_lr:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            schedule = self._schedule_for(num_training_steps)
            factor = cyclic_linear_factor(schedule, num_training_steps,
                                          self.args.min_learning_rate / self.args.learning_rate)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # ---- checkpoints and model card ----------------------------------------------------------------
    def recipe(self) -> dict:
        """The recipe actually used: pruning settings, resolved schedule, distillation, training, plus
        whatever the caller put in `recipe_info` (command, base model, dataset)."""
        args = self.args
        config = self.pruning_config.to_dict()
        for local in ("offload_dir", "device"):  # this machine's, no part of the recipe
            config.pop(local, None)
        schedule = self.pruning_callback.schedule
        recipe = {"pruning": config}
        if isinstance(schedule, SparsitySchedule):
            recipe["schedule"] = {
                "final_sparsity": self.pruning_config.sparsity, "inter_func": args.inter_func,
                "steps": [[int(k), float(v)] for k, v in zip(schedule.steps, schedule.sparsities, strict=True)]}
        if self.teacher is not None:
            recipe["distillation"] = {"teacher": args.teacher_name_or_path, "alpha": args.distill_alpha,
                                      "temperature": args.distill_temperature}
        recipe["training"] = {"epochs": args.num_train_epochs, "learning_rate": args.learning_rate,
                              "cyclic_lr": args.cyclic_lr, "batch_size": args.per_device_train_batch_size,
                              "processes": args.world_size, "seed": args.seed}
        recipe.update(self.recipe_info)
        return recipe

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """save_pretrained as usual, plus sparsity_config.json and cap_recipe.yaml (also in checkpoint-N)."""
        super().save_model(output_dir, _internal_call)
        callback = self.pruning_callback
        if self.args.should_save and callback.targets:
            from cap_hf.io.checkpoint import write_sparsity_files

            write_sparsity_files(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir,
                                 method=callback.config.method, structure=callback.config.structure,
                                 targets=callback.targets, ignore=callback.config.ignore,
                                 sparsity_distribution=callback.config.sparsity_distribution,
                                 recipe=self.recipe(), base_model=self.recipe_info.get("base_model"))

    def create_model_card(self, model_name: str | None = None, license: str | None = None,
                          finetuned_from: str | None = None, dataset_tags=None, dataset=None, **kwargs) -> None:
        """Trainer.push_to_hub calls this: our sparse-model card instead of the generic one."""
        if not self.is_world_process_zero():
            return
        from cap_hf.io.checkpoint import SPARSITY_FILE

        if not os.path.isfile(os.path.join(self.args.output_dir, SPARSITY_FILE)):
            return super().create_model_card(model_name=model_name, license=license, finetuned_from=finetuned_from,
                                             dataset_tags=dataset_tags, dataset=dataset, **kwargs)
        from model_cards import write_model_card

        def first(value):
            return value[0] if isinstance(value, (list, tuple)) and value else value

        write_model_card(self.args.output_dir, repo_id=model_name or self.args.hub_model_id, license=license,
                         base_model=finetuned_from, dataset=first(dataset_tags), dataset_name=first(dataset),
                         override_record=True)  # Trainer.push_to_hub's arguments are the caller's own choice
