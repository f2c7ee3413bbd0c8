"""CAPPruningCallback with a plain Trainer, and CAPTrainer: masks, schedule, distillation, resume."""

import copy
import json

import pytest
import torch
import yaml
from conftest import tiny_vit_config
from transformers import Trainer, TrainingArguments, ViTForImageClassification

from cap_hf import PruningConfig, find_targets, verify_sparsity
from cap_hf.io.data import collate, digits_dataset, prepare_splits
from cap_hf.io.models import make_image_processor
from cap_hf.schedule import SparsitySchedule
from cap_hf.trainer import CAPTrainer, CAPTrainingArguments
from trainer_plugins import CAPPruningCallback  # the documented import


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n=64, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 8, 8, generator=gen)
        self.y = torch.randint(0, 10, (n,), generator=gen)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


@pytest.fixture(scope="module")
def digits_splits():
    processor = make_image_processor(8, 1)
    train, evaluation, _ = prepare_splits(digits_dataset(), processor, 1, max_train_samples=256, max_eval_samples=128)
    return train, evaluation


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_vit_config())


@pytest.mark.parametrize("bf16", [False, True])
def test_masks_stay_exact_through_adamw_weight_decay_and_accumulation(tmp_path, bf16):
    model = tiny_model()
    data = RandomImages()
    schedule = SparsitySchedule((0, 3), (0.5, 0.7))
    callback = CAPPruningCallback(PruningConfig(method="magnitude"), schedule)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, learning_rate=1e-2, weight_decay=0.1,
                             gradient_accumulation_steps=2, per_device_train_batch_size=8, use_cpu=True, bf16=bf16,
                             report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True)
    seen = {}
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[callback])
    original_prune = callback.prune

    after_prune = None

    def prune_and_record(m, sparsity, step):
        nonlocal after_prune
        original_prune(m, sparsity, step)
        seen[step] = {n: (mod.weight == 0).clone() for n, mod in callback.targets.items()}
        after_prune = m.vit.layers[0].mlp.fc1.weight.detach().clone()

    callback.prune = prune_and_record
    trainer.train()
    assert sorted(seen) == [0, 3]
    report = verify_sparsity(model, 0.7, tolerance=1e-4)
    assert report.num_zeros == round(0.7 * report.num_weights)
    for name, module in find_targets(model).items():
        assert bool((module.weight[seen[0][name]] == 0).all())  # step-0 zeros survived AdamW + weight decay
        assert bool((module.weight[seen[3][name]] == 0).all())
    assert callback.history[-1]["sparsity"] == report.overall
    # the optimizer did move the kept weights; only the pruned ones are pinned at zero
    kept = ~seen[3]["vit.layers.0.mlp.fc1"]
    assert not torch.equal(model.vit.layers[0].mlp.fc1.weight[kept], after_prune[kept])


def cap_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), max_steps=16, learning_rate=2e-3, per_device_train_batch_size=16,
                  use_cpu=True, report_to="none", save_strategy="no", logging_steps=4, disable_tqdm=True,
                  init_sparsity=0.5, pruning_schedule="0:0.5,0.25:0.7,0.5:0.8", cyclic_lr=True, seed=0)
    values.update(overrides)
    return CAPTrainingArguments(**values)


def cap_config(**overrides):
    values = dict(method="cap", sparsity=0.8, num_grads=8, grad_batch_size=8, fisher_block_size=16, damp=1e-6)
    values.update(overrides)
    return PruningConfig(**values)


def test_cap_trainer_prunes_on_schedule_with_distillation(tmp_path, digits_splits):
    train, evaluation = digits_splits
    model = tiny_model()
    trainer = CAPTrainer(model=model, args=cap_args(tmp_path), pruning_config=cap_config(), train_dataset=train,
                         eval_dataset=evaluation)
    assert trainer.teacher is not None and trainer.loss_is_scaled_for_ga is False
    dense_teacher = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    trainer.train()
    steps = [h["step"] for h in trainer.pruning_callback.history]
    assert steps == [0, 4, 8]  # 16 steps per epoch (256 / 16), epochs 0, 0.25, 0.5
    assert [h["target"] for h in trainer.pruning_callback.history] == [0.5, 0.7, 0.8]
    verify_sparsity(model, 0.8, tolerance=1e-4)
    assert all(torch.equal(v, trainer.teacher.state_dict()[k]) for k, v in dense_teacher.items())  # frozen
    logged = [entry for entry in trainer.state.log_history if "sparsity" in entry]
    assert logged and logged[-1]["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert any("prune_seconds" in entry for entry in trainer.state.log_history)
    # cyclic LR: back at learning_rate right after each pruning step, lower just before the next one
    assert trainer.lr_scheduler.lr_lambdas[0](4) == 1.0 and trainer.lr_scheduler.lr_lambdas[0](7) < 1.0


def test_resume_continues_without_re_pruning(tmp_path, digits_splits):
    train, evaluation = digits_splits
    args = cap_args(tmp_path / "run", save_strategy="steps", save_steps=6, distill=False)
    first = CAPTrainer(model=tiny_model(), args=args, pruning_config=cap_config(), train_dataset=train)
    first.train()
    full_history = [h["step"] for h in first.pruning_callback.history]
    # every checkpoint carries its sparsity record and recipe, which agree with its weights
    checkpoint = tmp_path / "run" / "checkpoint-6"
    record = json.loads((checkpoint / "sparsity_config.json").read_text())
    assert record["method"] == "cap" and record["overall_sparsity"] == pytest.approx(0.7, abs=1e-3)
    recipe = yaml.safe_load((checkpoint / "cap_recipe.yaml").read_text())
    assert [s for _, s in recipe["schedule"]["steps"]] == list(first.pruning_callback.schedule.sparsities)
    verify_sparsity(ViTForImageClassification.from_pretrained(checkpoint), checkpoint)
    first.save_model()
    first.create_model_card(model_name="me/tiny-cap")  # what Trainer.push_to_hub calls: our sparse card
    card = (tmp_path / "run" / "README.md").read_text()
    assert "base_model_relation" not in card and "# me/tiny-cap" in card and "Kuznedelev" in card

    model = tiny_model(seed=1)  # different init: resume must load the checkpoint's weights
    resumed = CAPTrainer(model=model, args=cap_args(tmp_path / "run", distill=False), pruning_config=cap_config(),
                         train_dataset=train)
    sparsity_at_resume = {}
    original = resumed.pruning_callback.on_train_begin

    def spy(*a, **kw):
        original(*a, **kw)
        sparsity_at_resume["value"] = resumed.pruning_callback.sparsity

    resumed.pruning_callback.on_train_begin = spy
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert full_history == [0, 4, 8]
    assert sparsity_at_resume["value"] == pytest.approx(0.7, abs=1e-3)  # not re-densified
    assert [h["step"] for h in resumed.pruning_callback.history] == [8]  # not re-pruned
    verify_sparsity(model, 0.8, tolerance=1e-4)


def test_teacher_with_other_labels_is_rejected(tmp_path, digits_splits):
    train, _ = digits_splits
    teacher = ViTForImageClassification(tiny_vit_config(num_labels=5))
    with pytest.raises(ValueError, match="teacher's labels"):
        CAPTrainer(model=tiny_model(), args=cap_args(tmp_path), train_dataset=train, teacher_model=teacher)


@pytest.mark.parametrize(("overrides", "pruning", "message"), [
    ({}, dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (dict(init_sparsity=0.7, pruning_schedule=None), dict(sparsity=0.5), r"init_sparsity \(0.7\) must be in \[0, "
                                                                        r"sparsity=0.5\]"),
    ({}, dict(method="nope"), "Unknown pruning method 'nope'; registered methods"),
    (dict(inter_func="quadratic"), {}, "inter_func must be"),
])
def test_bad_recipe_fails_at_construction(tmp_path, overrides, pruning, message):
    with pytest.raises(ValueError, match=message):
        CAPTrainer(model=tiny_model(), args=cap_args(tmp_path, **overrides), pruning_config=cap_config(**pruning))


def test_schedule_that_does_not_fit_fails_before_training(tmp_path, digits_splits):
    train, _ = digits_splits
    with pytest.raises(ValueError, match="only 1.00 epochs"):
        CAPTrainer(model=tiny_model(), args=cap_args(tmp_path, pruning_schedule="0:0.5,3:0.8"),
                   pruning_config=cap_config(), train_dataset=train)


def test_training_arguments_defaults_suit_pruning_runs(tmp_path, caplog):
    args = CAPTrainingArguments(output_dir=str(tmp_path), report_to="none")
    assert args.eval_strategy == "epoch" and args.remove_unused_columns is False  # class defaults, no argv patching
    defaults = PruningConfig()
    with caplog.at_level("WARNING"):  # enough images for the default recipe's gradients (1024 x 32)
        trainer = CAPTrainer(model=tiny_model(), args=args,
                             train_dataset=RandomImages(defaults.num_grads * defaults.grad_batch_size))
    assert trainer.args.eval_strategy == "no" and "No eval_dataset" in caplog.text
    assert trainer.pruning_config == PruningConfig(calibration_seed=args.seed)  # the recipe's defaults
    # too few, said at construction rather than at the first pruning step
    with pytest.raises(ValueError, match=r"holds 2 batches \(64 images in the calibration split, in batches of 32\), "
                                         r"but 1024 Fisher gradients are needed"):
        CAPTrainer(model=tiny_model(), args=args, train_dataset=RandomImages(64))


def test_calibration_batches_are_read_like_training_batches(tmp_path):
    """dataloader_num_workers applies to the Fisher's batches too, which stay the same for a seed, step and rank."""
    data = RandomImages()
    batches = {}
    for workers in (0, 2):
        args = cap_args(tmp_path, dataloader_num_workers=workers)
        trainer = CAPTrainer(model=tiny_model(), args=args, pruning_config=cap_config(), train_dataset=data)
        loader = trainer._calibration_batches(step=4, rank=1)
        assert loader.num_workers == workers
        batches[workers] = [b["labels"].tolist() for b in loader]
    assert batches[0] == batches[2]
    other = trainer._calibration_batches(step=8, rank=1)
    assert [b["labels"].tolist() for b in other] != batches[0]  # another pruning step draws other batches


def test_callback_metrics_reach_any_trainers_logs(tmp_path):
    """A plain Trainer with the callback: sparsity and prune_seconds in log_history (trainer_state.json) and in
    the logs every later callback (console, integrations) receives."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    recorder = Recorder()
    callback = CAPPruningCallback(PruningConfig(method="magnitude"), SparsitySchedule((0, 2), (0.5, 0.7)))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, use_cpu=True,
                             report_to="none", save_strategy="no", logging_steps=100, disable_tqdm=True)
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=RandomImages(), data_collator=collate,
                      callbacks=[callback, recorder])
    trainer.train()
    pruned_logs = [entry for entry in trainer.state.log_history if "prune_seconds" in entry]
    assert [entry["step"] for entry in pruned_logs] == [1, 3]  # logged right after each pruning step
    assert pruned_logs[-1]["sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert [log["sparsity"] for log in recorder.logs if "prune_seconds" in log] == [e["sparsity"] for e in pruned_logs]
    assert "sparsity" in trainer.state.log_history[-1]  # the final train summary too


# ---- transformers private API that CAPTrainer relies on: these fail loudly when transformers changes ----------


def test_private_api_load_from_checkpoint_is_what_trainer_calls_on_resume():
    """CAPTrainer overrides Trainer._load_from_checkpoint (ViT names on disk, see docs/design.md)."""
    import inspect

    params = list(inspect.signature(Trainer._load_from_checkpoint).parameters)
    assert params == ["self", "resume_from_checkpoint", "model"], params
    assert "self._load_from_checkpoint(resume_from_checkpoint" in inspect.getsource(Trainer)


def test_private_api_evaluate_marks_the_model_prepared(tmp_path, digits_splits):
    """CAPTrainer.train clears `_is_accelerate_prepared`, set by evaluate() before train(): accelerate would skip
    DDP wrapping of a model so marked."""
    import inspect

    from accelerate import Accelerator

    _, evaluation = digits_splits
    trainer = Trainer(model=tiny_model(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                 report_to="none", remove_unused_columns=False),
                      eval_dataset=evaluation, data_collator=collate)
    trainer.evaluate()
    assert getattr(trainer.model, "_is_accelerate_prepared", False) is True
    assert '_is_accelerate_prepared' in inspect.getsource(Accelerator.prepare_model)


def test_private_api_created_lr_scheduler_flag(tmp_path):
    """CAPTrainer.create_scheduler sets `_created_lr_scheduler` as Trainer.create_scheduler does (Trainer reads it
    to build a new scheduler when train() is called again)."""
    import inspect

    trainer = Trainer(model=tiny_model(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                 report_to="none"))
    assert trainer._created_lr_scheduler is False
    trainer.create_optimizer()
    trainer.create_scheduler(10)
    assert trainer._created_lr_scheduler is True
    assert "if self._created_lr_scheduler" in inspect.getsource(Trainer)


def test_callback_works_with_a_copy_of_the_model_as_calibration_source(tmp_path):
    """OBS through the callback on a plain Trainer: the Fisher comes from calibration batches."""
    model = tiny_model()
    data = RandomImages()
    batches = lambda step, rank: torch.utils.data.DataLoader(data, batch_size=8, collate_fn=collate)  # noqa: E731
    callback = CAPPruningCallback(PruningConfig(method="obs", num_grads=6, fisher_block_size=16, damp=1e-5),
                                  SparsitySchedule((0,), (0.6,)), calibration_batches=batches)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, use_cpu=True,
                             report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True)
    before = copy.deepcopy(model)
    Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[callback]).train()
    verify_sparsity(model, 0.6, tolerance=1e-4)
    assert not torch.equal(before.vit.layers[0].mlp.fc1.weight, model.vit.layers[0].mlp.fc1.weight)


def test_distillation_trainer_fine_tunes_a_smaller_model_from_a_frozen_teacher(tmp_path):
    """The fine-tuning of structured pruning: a shrunk ResNet learns, the dense teacher does not move."""
    from conftest import tiny_resnet

    from cap_hf.structured import prune_channels
    from cap_hf.trainer import DistillationArguments, DistillationTrainer

    dense = tiny_resnet()
    small, _ = prune_channels(dense, 16, "dfpc", pruning_ratio=0.3)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in dense.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(1, 16, 16, generator=gen), "labels": torch.tensor(i % 10)} for i in range(32)]
    args = DistillationArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                                 learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True)
    trainer = DistillationTrainer(model=small.train(), args=args, teacher_model=dense, train_dataset=data)
    assert trainer.args.eval_strategy.value == "no"  # no eval dataset: turned off
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in dense.state_dict().items())
    assert not dense.training
    with pytest.raises(TypeError, match="DistillationTrainer needs DistillationArguments"):
        DistillationTrainer(model=small, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))



def test_a_backbone_without_distillation_is_refused_by_the_trainer_as_by_the_script(tmp_path):
    """One check, two callers: DistillationTrainer on the model, scripts/prune.py on the config
    (tests/test_prune_script.py); both say the same."""
    from transformers import ViTModel

    from cap_hf.trainer import DistillationArguments, DistillationTrainer

    backbone = ViTModel(tiny_vit_config())
    args = DistillationArguments(output_dir=str(tmp_path), distill=False, report_to="none")
    with pytest.raises(ValueError, match="ViTModel is a backbone without a head: its only training loss is the "
                                         "distillation of the dense model's features. Keep --distill true"):
        DistillationTrainer(backbone, args)
