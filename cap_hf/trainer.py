"""CAPTrainer: transformers.Trainer with gradual CAP pruning, distillation and the cyclic-linear LR.

Narrow overrides only (compute_loss, create_scheduler, log); the pruning itself lives in
trainer_plugins.CAPPruningCallback, which also works with a plain Trainer.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from cap_hf.config import PruningConfig, parse_structure
from cap_hf.data import collate
from cap_hf.distill import distillation_loss
from cap_hf.schedule import SparsitySchedule, build_schedule, cyclic_linear_factor
from cap_hf.streaming import check_budget
from trainer_plugins.pruning import CAPPruningCallback


@dataclass
class CAPTrainingArguments(TrainingArguments):
    """TrainingArguments plus the pruning recipe, the Fisher, distillation and the LR cycle."""

    pruning_method: str = field(default="cap", metadata={"help": "cap | fastcap | obs | magnitude"})
    final_sparsity: float = field(default=0.75, metadata={"help": "Sparsity of the pruned layers at the end."})
    init_sparsity: float | None = field(
        default=None, metadata={"help": "Sparsity of the first pruning step (default: half of final_sparsity)."})
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
    sparsity_distribution: str = field(default="global", metadata={"help": "global | uniform"})
    sparsity_structure: str = field(default="unstructured", metadata={"help": "unstructured | N:M (e.g. 2:4)"})
    prune_targets: str | None = field(default=None, metadata={"help": "Regex of module names to prune."})
    num_grads: int = field(default=256, metadata={"help": "Fisher gradients per pruning step."})
    grad_batch_size: int = field(default=32, metadata={"help": "Images per Fisher gradient."})
    fisher_block_size: int = field(default=192, metadata={"help": "Fisher block size B."})
    damp: float = field(default=1e-7, metadata={"help": "Absolute Fisher dampening (CAP/OBS)."})
    fastcap_damp: float = field(default=1e-2, metadata={"help": "FastCAP relative dampening."})
    label_free_fisher: bool = field(default=False, metadata={"help": "Sample Fisher labels from the model."})
    trace_mode: str = field(default="recompute", metadata={"help": "CAP: recompute | snapshot"})
    fisher_accumulation: str = field(
        default="auto", metadata={"help": "CAP/OBS: inverse (Woodbury, one process) | sum (across processes) | auto"})
    max_memory_gb: float | None = field(
        default=None, metadata={"help": "CAP/OBS: memory budget (GB) of a pruning step; when the Fisher of all "
                                        "layers does not fit, they are pruned in groups with the same result."})
    offload_dir: str | None = field(
        default=None, metadata={"help": "With --max_memory_gb: folder for CAP snapshots (default: system temp)."})
    distill: bool = field(default=True, metadata={"help": "Distill from the dense model (or --teacher_name_or_path)."})
    teacher_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher model id or folder (default: a frozen copy of the dense model)."})
    distill_temperature: float = field(default=2.0, metadata={"help": "KD temperature T."})
    distill_alpha: float = field(default=0.5, metadata={"help": "Weight of the KD term; 1 - alpha goes to CE."})
    cyclic_lr: bool = field(
        default=False, metadata={"help": "The paper's LR: restart at learning_rate at every pruning step and fall "
                                         "linearly to min_learning_rate before the next (replaces lr_scheduler_type)."})
    min_learning_rate: float = field(default=1e-5, metadata={"help": "End of each cyclic-linear LR cycle."})

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.final_sparsity < 1.0:
            raise ValueError(f"final_sparsity must be in [0, 1), got {self.final_sparsity}. Use e.g. 0.75 for 75%.")
        if self.init_sparsity is not None and not 0.0 <= self.init_sparsity <= self.final_sparsity:
            raise ValueError(f"init_sparsity ({self.init_sparsity}) must be in [0, final_sparsity="
                             f"{self.final_sparsity}]: pruning never lowers the sparsity.")
        if not 0.0 <= self.distill_alpha <= 1.0 or self.distill_temperature <= 0:
            raise ValueError("distill_alpha must be in [0, 1] and distill_temperature positive.")
        if self.cyclic_lr and not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError(f"min_learning_rate ({self.min_learning_rate}) must be in [0, learning_rate].")
        self.pruning_config()  # validates method, structure, Fisher settings now, not at the first pruning step

    def pruning_config(self) -> PruningConfig:
        structure = self.sparsity_structure
        n_m = parse_structure(structure)  # N:M fixes the sparsity; otherwise the schedule sets it per step
        sparsity = 1 - n_m[0] / n_m[1] if n_m is not None else 0.0
        return PruningConfig(
            method=self.pruning_method, sparsity=sparsity, sparsity_distribution=self.sparsity_distribution,
            structure=structure, targets=self.prune_targets, num_grads=self.num_grads,
            grad_batch_size=self.grad_batch_size, fisher_block_size=self.fisher_block_size, damp=self.damp,
            fastcap_damp=self.fastcap_damp, label_free_fisher=self.label_free_fisher, trace_mode=self.trace_mode,
            fisher_accumulation=self.fisher_accumulation, max_memory_gb=self.max_memory_gb,
            offload_dir=self.offload_dir, seed=self.seed)

    def sparsity_schedule(self, total_steps: int, steps_per_epoch: float) -> SparsitySchedule:
        return build_schedule(self.final_sparsity, total_steps, steps_per_epoch, self.init_sparsity,
                              self.pruning_start_epoch, self.pruning_end_epoch, self.pruning_frequency_epochs,
                              self.num_pruning_steps, self.inter_func, self.pruning_schedule)


class CAPTrainer(Trainer):
    """Trainer that prunes gradually with CAP (or FastCAP / OBS / magnitude) and distils from the dense model.

    Args (besides Trainer's):
        calibration_dataset: dataset for the Fisher gradients (eval transforms, plain labels); default
            the train dataset.
        teacher_model: the distillation teacher; default a frozen copy of `model` taken before pruning.
        pruning_loss_fn: `loss_fn(model, batch)` for the Fisher (default cross-entropy of the logits).
    """

    _tag_names = ["cap", "sparse", "pruned"]

    def __init__(self, model: nn.Module, args: CAPTrainingArguments, *, calibration_dataset=None,
                 teacher_model: nn.Module | None = None, pruning_loss_fn=None, **kwargs):
        if not isinstance(args, CAPTrainingArguments):
            raise TypeError("CAPTrainer needs CAPTrainingArguments (TrainingArguments plus the pruning recipe).")
        self.teacher = None
        self.recipe_info: dict = {}
        if args.distill:
            self.teacher = teacher_model if teacher_model is not None else copy.deepcopy(model)
            self.teacher.eval().requires_grad_(False)
            self._check_teacher(model, self.teacher)
        kwargs.setdefault("data_collator", collate)
        calibration = calibration_dataset if calibration_dataset is not None else kwargs.get("train_dataset")
        self.pruning_callback = CAPPruningCallback(
            args.pruning_config(), schedule=self._schedule_for, calibration_batches=self._calibration_batches,
            loss_fn=pruning_loss_fn)
        callbacks = [self.pruning_callback, *(kwargs.pop("callbacks", None) or [])]
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        self._calibration_dataset = calibration
        if self.teacher is not None:
            self.loss_is_scaled_for_ga = False  # distillation loss is a per-batch mean
        check_budget(self.model, self.pruning_callback.config)  # a budget that can never be met fails now
        if self.train_dataset is not None:  # fail now, not after hours, if the schedule cannot fit
            self.pruning_callback.schedule = self._schedule_for(self._total_steps())
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

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

    # ---- schedule ------------------------------------------------------------------------------
    def _steps_per_epoch(self) -> float:
        batches = len(self.get_train_dataloader())
        return max(batches // self.args.gradient_accumulation_steps, 1)

    def _total_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        return math.ceil(self.args.num_train_epochs * self._steps_per_epoch())

    def _schedule_for(self, total_steps: int) -> SparsitySchedule:
        return self.args.sparsity_schedule(total_steps, self._steps_per_epoch())

    def _calibration_batches(self, step: int, rank: int):
        if self._calibration_dataset is None:
            raise ValueError("No calibration data: pass calibration_dataset or train_dataset to CAPTrainer.")
        generator = torch.Generator().manual_seed(self.args.seed + 7919 * step + rank)
        return torch.utils.data.DataLoader(self._calibration_dataset, batch_size=self.args.grad_batch_size,
                                           shuffle=True, drop_last=True, collate_fn=collate, generator=generator)

    # ---- overrides -------------------------------------------------------------------------------
    def train(self, *args, **kwargs):
        # evaluate() before train() prepares the model in evaluation mode and marks it
        # `_is_accelerate_prepared`; accelerate (1.15) then skips DDP wrapping for training, and every
        # process would train alone. Clear the mark while the model is not wrapped yet.
        if self.args.world_size > 1 and self.model_wrapped is self.model \
                and getattr(self.model, "_is_accelerate_prepared", False):
            del self.model._is_accelerate_prepared
        return super().train(*args, **kwargs)

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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.get("labels")
        outputs = model(pixel_values=inputs["pixel_values"])
        teacher = self.teacher
        device = inputs["pixel_values"].device
        if next(teacher.parameters()).device != device:
            teacher.to(device)
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

    # ---- checkpoints and model card ----------------------------------------------------------------
    def recipe(self) -> dict:
        """The recipe actually used: pruning settings, resolved schedule, distillation, training, plus
        whatever the caller put in `recipe_info` (command, base model, dataset)."""
        args = self.args
        config = args.pruning_config().to_dict()
        config.pop("sparsity", None)  # set per step by the schedule
        config.pop("offload_dir", None)  # a local folder: no part of the recipe
        schedule = self.pruning_callback.schedule
        recipe = {"pruning": config}
        if isinstance(schedule, SparsitySchedule):
            recipe["schedule"] = {
                "final_sparsity": args.final_sparsity, "inter_func": args.inter_func,
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
            from cap_hf.checkpoint import write_sparsity_files

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
        from cap_hf.checkpoint import SPARSITY_FILE

        if not os.path.isfile(os.path.join(self.args.output_dir, SPARSITY_FILE)):
            return super().create_model_card(model_name=model_name, license=license, finetuned_from=finetuned_from,
                                             dataset_tags=dataset_tags, dataset=dataset, **kwargs)
        from model_cards import write_model_card

        def first(value):
            return value[0] if isinstance(value, (list, tuple)) and value else value

        write_model_card(self.args.output_dir, repo_id=model_name or self.args.hub_model_id, license=license,
                         base_model=finetuned_from, dataset=first(dataset_tags), dataset_name=first(dataset))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs = dict(logs)
        logs.update(self.pruning_callback.pop_log())
        if "sparsity" not in logs and self.pruning_callback.targets:
            logs["sparsity"] = round(self.pruning_callback.sparsity, 6)
        super().log(logs, start_time)
