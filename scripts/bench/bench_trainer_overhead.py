"""Benchmark: training-step time of CAPTrainer (masks kept by gradient hooks + re-masking after each
optimizer step) against a plain transformers.Trainer on the same model, outside pruning steps.

  OMP_NUM_THREADS=2 python scripts/bench/bench_trainer_overhead.py

The model is the DeiT-Tiny-width ViT of the other benchmarks (6 layers, hidden 192, 28x28 inputs);
CAPTrainer prunes once to 75% by magnitude at step 0 and then only keeps the masks; distillation is
off (it adds a teacher forward pass by design). Runs alternate plain / CAP; the median step time of
each (first steps skipped) is compared. Writes docs/benchmarks.md (section "Trainer overhead").
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from benchlib import command_line, machine, write_section
from transformers import Trainer, TrainerCallback, TrainingArguments

from cap_hf import PruningConfig
from cap_hf.cli.parser import ArgumentParser, HelpFormatter
from cap_hf.io.data import collate
from cap_hf.io.models import make_vit_classifier
from cap_hf.trainer import CAPTrainer, CAPTrainingArguments

SECTION = "## Trainer overhead: CAPTrainer vs Trainer outside pruning steps"


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 28, 28, generator=gen)
        self.y = torch.randint(0, 10, (n,), generator=gen)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def run_once(kind: str, steps: int, batch: int, skip: int) -> float:
    model = make_vit_classifier([str(i) for i in range(10)], 28, 1, 7)
    data = Images(steps * batch)
    timer = StepTimer()
    common = dict(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch,
                  learning_rate=5e-4, weight_decay=0.05, use_cpu=True, report_to="none", save_strategy="no",
                  logging_strategy="no", disable_tqdm=True, remove_unused_columns=False, seed=0)
    if kind == "plain":
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, data_collator=collate,
                          callbacks=[timer])
    else:
        args = CAPTrainingArguments(**common, pruning_schedule="0:0.75", distill=False)
        trainer = CAPTrainer(model=model, args=args, pruning_config=PruningConfig(method="magnitude", sparsity=0.75),
                             train_dataset=data, callbacks=[timer])
    trainer.train()
    deltas = [b - a for a, b in zip(timer.times[skip:], timer.times[skip + 1:], strict=False)]
    return statistics.median(deltas)


def main() -> None:
    parser = ArgumentParser(prog="python scripts/bench/bench_trainer_overhead.py", description=__doc__,
                            formatter_class=HelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--skip", type=int, default=5, help="First steps left out (warm-up, the pruning step).")
    parser.add_argument("--no_write", action="store_true")
    args = parser.parse_args()
    results = {"plain": [], "cap": []}
    for repeat in range(args.repeats):
        for kind in (("plain", "cap") if repeat % 2 == 0 else ("cap", "plain")):  # alternate the order
            results[kind].append(run_once(kind, args.steps, args.batch_size, args.skip))
            print(kind, f"{results[kind][-1] * 1000:.1f} ms/step", flush=True)
    plain, cap = statistics.median(results["plain"]), statistics.median(results["cap"])
    overhead = 100 * (cap - plain) / plain
    body = "\n".join([
        SECTION, "",
        f"Command: `{command_line('bench_trainer_overhead.py')}`",
        "", f"Machine: {machine()}.", "",
        f"ViT 6 layers, hidden 192, 28x28 grayscale, batch {args.batch_size}, AdamW, {args.steps} steps per run, "
        f"median step time over steps {args.skip + 1}..{args.steps} of each run, median over {args.repeats} "
        "runs alternating in order (plain first, then CAP first, ...). CAPTrainer: 75% magnitude at step 0, then gradient hooks + re-masking; no distillation.",
        "", "| trainer | ms / step | runs (ms) |", "|---|---|---|",
        f"| Trainer | {plain * 1000:.1f} | {', '.join(f'{t * 1000:.1f}' for t in results['plain'])} |",
        f"| CAPTrainer | {cap * 1000:.1f} | {', '.join(f'{t * 1000:.1f}' for t in results['cap'])} |",
        "", f"Overhead outside pruning steps: **{overhead:+.1f}%** (goal: under 5%).", ""])
    print(body)
    if not args.no_write:
        write_section(body, SECTION)


if __name__ == "__main__":
    main()
