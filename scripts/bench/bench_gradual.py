"""Benchmark: gradual CAP + distillation vs gradual magnitude (+ the same distillation), same schedule and
epochs, on the Fashion-MNIST ViT of DeiT-Tiny width (the teacher of scripts/bench/bench_oneshot.py).

  OMP_NUM_THREADS=2 python scripts/bench/bench_gradual.py

Runs scripts/prune.py once per (method, final sparsity, crop) and writes the table, commands and machine to
docs/benchmarks.md (section "Gradual pruning", or --section). Flags that are not the benchmark's own go to
scripts/prune.py. The augmentation default, measured:

  OMP_NUM_THREADS=2 python scripts/bench/bench_gradual.py --methods magnitude --sparsities 0.75 --crops 0.08,0.8,1 \
      --section augmentation --output_root outputs/bench-gradual-crops
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass

from benchlib import ROOT, FashionMnistBench, command_line, machine, parse_bench, write_section

SECTION = "## Gradual pruning: Fashion-MNIST ViT (DeiT-Tiny width)"
# the recipe of this benchmark (scripts/prune.py flags; flags given to the benchmark come after and win)
RECIPE = ["--num_pruning_steps", "4", "--num_grads", "256", "--grad_batch_size", "16", "--fisher_block_size", "192",
          "--damp", "1e-7", "--learning_rate", "5e-4", "--cyclic_lr", "true", "--min_learning_rate", "1e-5",
          "--weight_decay", "0.05", "--per_device_train_batch_size", "128", "--per_device_eval_batch_size", "256",
          "--hflip", "true", "--eval_strategy", "no", "--save_strategy", "no",
          "--logging_steps", "50", "--report_to", "none", "--disable_tqdm", "true"]


@dataclass
class BenchGradual(FashionMnistBench):
    methods: str = "cap,magnitude"
    sparsities: str = "0.75,0.9"
    output_root: str = "outputs/bench-gradual"
    epochs: str = "2"
    max_train_samples: str = "20000"
    crops: str = "0.8"  # --crop_scale_min of the runs (RandomResizedCrop's smallest area; 1 = no crop)
    section: str = ""  # a name for a section of its own (e.g. "augmentation"); default: the main one


def main() -> None:
    args, forwarded = parse_bench(BenchGradual)
    if not (ROOT / args.teacher_dir / "config.json").exists():
        raise SystemExit(f"No teacher in {args.teacher_dir}; run scripts/bench/bench_oneshot.py first (it trains one).")
    rows, commands = [], []
    crops = args.crops.split(",")
    for sparsity in args.sparsities.split(","):
        for method in args.methods.split(","):
            for crop in crops:
                out = f"{args.output_root}/{method}-{sparsity}" + (f"-crop{crop}" if len(crops) > 1 else "")
                cmd = [sys.executable, "scripts/prune.py", "--model_name_or_path", args.teacher_dir,
                       "--dataset_name", args.data_dir, "--output_dir", out, "--overwrite_output_dir", "true",
                       "--method", method, "--sparsity", sparsity, "--num_train_epochs", args.epochs,
                       "--max_train_samples", args.max_train_samples, "--crop_scale_min", crop, *RECIPE, *forwarded]
                commands.append(" ".join(["python", *cmd[1:]]))
                print("+", commands[-1], flush=True)
                start = time.perf_counter()
                subprocess.run(cmd, check=True, cwd=ROOT)
                wall = time.perf_counter() - start
                metrics = json.loads((ROOT / out / "all_results.json").read_text())
                prune_s = sum(h["seconds"] for h in metrics["pruning_history"])
                rows.append((method, float(sparsity), crop, metrics, wall, prune_s))
    dense = rows[0][3]["dense_accuracy"]
    grads = max(h.get("num_grads") or 0 for r in rows for h in r[3]["pruning_history"])  # 0 for magnitude alone
    fisher = f"Fisher (CAP): {grads} gradients of 16 images, B=192" if grads else "no Fisher (magnitude)"
    section = f"## Gradual pruning ({args.section}): Fashion-MNIST ViT" if args.section else SECTION
    lines = [section, "",
             f"Command: `{command_line('bench_gradual.py')}`",
             "", f"Machine: {machine()}.", "",
             f"Starting point: the dense teacher `{args.teacher_dir}` (top-1 **{100 * dense:.2f}%** on the 10k test "
             f"images). Each run: {args.epochs} epochs on {args.max_train_samples} training images, 4 pruning steps "
             "(cubic from half the final sparsity, the last at two thirds of training, then hold), cyclic-linear LR "
             "5e-4 -> 1e-5 restarting at each pruning step, AdamW wd 0.05, distillation from the dense model "
             f"(T=2, alpha=0.5) for every method; {fisher} (the commands below have every flag).", "",
             "| method | final sparsity | crop_scale_min | top-1 (%) | drop vs dense (points) | relative drop | "
             "pruning steps (s, total) | run wall time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for method, _sparsity, crop, metrics, wall, prune_s in rows:
        acc = metrics["eval_accuracy"]
        lines.append(f"| {method} | {100 * metrics['sparsity']:.1f}% | {crop} | {100 * acc:.2f} | "
                     f"{100 * (dense - acc):.2f} | {100 * (dense - acc) / dense:.2f}% | {prune_s:.0f} | {wall:.0f} |")
    lines += ["", "Commands:", ""] + [f"- `{c}`" for c in commands] + [""]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(body, section)


if __name__ == "__main__":
    main()
