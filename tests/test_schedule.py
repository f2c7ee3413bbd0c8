"""Sparsity schedules, the cyclic-linear LR and the distillation loss."""

from itertools import pairwise

import pytest
import torch

from cap_hf.distill import distillation_loss
from cap_hf.schedule import SparsitySchedule, build_schedule, cyclic_linear_factor, interpolate


def test_default_schedule_adapts_to_run_length():
    # --final_sparsity 0.75 --num_train_epochs 2 with 50 steps per epoch
    schedule = build_schedule(0.75, total_steps=100, steps_per_epoch=50)
    assert schedule.steps[0] == 0 and schedule.steps[-1] <= 67 and len(schedule.steps) == 4
    assert schedule.sparsities[-1] == 0.75 and schedule.sparsities[0] == pytest.approx(0.375)
    assert list(schedule.sparsities) == sorted(schedule.sparsities)
    assert schedule.target_at(99) == 0.75 and schedule.target_at(-1) == 0.0


def test_frequency_and_cubic_shape():
    schedule = build_schedule(0.9, total_steps=300, steps_per_epoch=10, init_sparsity=0.4, start_epoch=0,
                              end_epoch=28, frequency_epochs=2)
    assert schedule.steps == tuple(range(0, 281, 20))
    gaps = [b - a for a, b in pairwise(schedule.sparsities)]
    assert all(g2 <= g1 + 1e-12 for g1, g2 in pairwise(gaps))  # cubic: fast early, slow late
    assert interpolate(0.4, 0.9, 0.5, "linear") == pytest.approx(0.65)


def test_explicit_schedule():
    schedule = build_schedule(0.75, total_steps=100, steps_per_epoch=10, explicit="0:0.4,3:0.6,6:0.75")
    assert schedule.steps == (0, 30, 60) and schedule.sparsities == (0.4, 0.6, 0.75)
    assert schedule.sparsity_for(30) == 0.6 and schedule.sparsity_for(31) is None


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(end_epoch=12), "must come before the end of training"),
    (dict(explicit="0:0.5,20:0.7"), "only 10.00 epochs"),
    (dict(explicit="0:0.6,2:0.5"), "must not decrease"),
    (dict(init_sparsity=0.8), "init_sparsity"),
    (dict(num_pruning_steps=50, end_epoch=0.2), "do not fit"),
])
def test_schedule_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_schedule(0.75, total_steps=100, steps_per_epoch=10, **kwargs)


def test_cyclic_lr_restarts_exactly_at_pruning_steps():
    schedule = SparsitySchedule((0, 10, 30), (0.3, 0.5, 0.7))
    factor = cyclic_linear_factor(schedule, total_steps=50, min_ratio=0.1)
    values = [factor(s) for s in range(50)]
    for start in schedule.steps:
        assert values[start] == 1.0
        if start > 0:
            assert values[start - 1] < 1.0
    assert values[9] == pytest.approx(1 - 9 / 10 * 0.9)
    assert all(values[i + 1] < values[i] for i in range(10, 29))
    assert min(values) >= 0.1


def test_distillation_loss():
    student = torch.tensor([[2.0, 0.5, -1.0]])
    labels = torch.tensor([0])
    assert float(distillation_loss(student, student.clone(), labels, 2.0, 1.0)) == pytest.approx(0.0, abs=1e-7)
    ce = torch.nn.functional.cross_entropy(student, labels)
    assert float(distillation_loss(student, student.clone(), labels, 2.0, 0.0)) == pytest.approx(float(ce))
    assert float(distillation_loss(student, torch.tensor([[-1.0, 0.5, 2.0]]), labels, 2.0, 0.5)) > float(ce) / 2
