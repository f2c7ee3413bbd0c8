"""Benchmark: one-shot magnitude / OBS / CAP / FastCAP on a DeiT-Tiny-width ViT trained on Fashion-MNIST.

  OMP_NUM_THREADS=2 python scripts/bench_oneshot.py

Makes what is missing (data folder, dense teacher via scripts/train_dense.py), runs scripts/oneshot.py at
50/60/75/80/90% for all four methods in one run, and writes the table, command and machine to
docs/benchmarks.md (section "One-shot pruning") and the raw records to OUTPUT_DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## One-shot pruning: Fashion-MNIST ViT (DeiT-Tiny width)"


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} (torch threads {torch.get_num_threads()})")


def write_section(path: Path, body: str, section: str = SECTION) -> None:
    """Replace (or append) the part of docs/benchmarks.md that starts with `section`."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery number here comes from a script in scripts/; the command is given with it.\n"
    start = text.find(section)
    if start >= 0:
        end = text.find("\n## ", start + len(section))
        text = text[:start] + body.rstrip() + ("\n\n" + text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + body
    path.write_text(text.rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="data/fashion-mnist")
    parser.add_argument("--teacher_dir", default="outputs/fmnist-vit-tiny")
    parser.add_argument("--output_dir", default="outputs/bench-oneshot")
    parser.add_argument("--sparsities", default="0.5,0.6,0.75,0.8,0.9")
    parser.add_argument("--num_grads", type=int, default=1024)
    parser.add_argument("--grad_batch_size", type=int, default=16)
    parser.add_argument("--fisher_block_size", type=int, default=192)
    parser.add_argument("--damp", type=float, default=1e-7)
    parser.add_argument("--teacher_epochs", type=int, default=5)
    parser.add_argument("--extra", default="", help="Extra flags passed to scripts/oneshot.py.")
    parser.add_argument("--no_write", action="store_true", help="Do not touch docs/benchmarks.md.")
    args = parser.parse_args()
    py = sys.executable
    if not (ROOT / args.data_dir).exists():
        run([py, "scripts/prepare_data.py", "--dataset", "fashion-mnist", "--output_dir", args.data_dir])
    if not (ROOT / args.teacher_dir / "config.json").exists():
        run([py, "scripts/train_dense.py", "--dataset_name", args.data_dir, "--output_dir", args.teacher_dir,
             "--image_size", "28", "--patch_size", "7", "--hidden_size", "192", "--num_hidden_layers", "6",
             "--num_attention_heads", "3", "--num_train_epochs", str(args.teacher_epochs), "--learning_rate", "1e-3",
             "--weight_decay", "0.05", "--warmup_steps", "200", "--per_device_train_batch_size", "128",
             "--per_device_eval_batch_size", "256", "--eval_strategy", "epoch", "--save_strategy", "no",
             "--disable_tqdm", "true", "--report_to", "none"])
    oneshot = [py, "scripts/oneshot.py", "--model_name_or_path", args.teacher_dir, "--dataset_name", args.data_dir,
               "--methods", "magnitude,obs,cap,fastcap", "--sparsities", args.sparsities,
               "--num_grads", str(args.num_grads), "--grad_batch_size", str(args.grad_batch_size),
               "--fisher_block_size", str(args.fisher_block_size), "--damp", str(args.damp),
               "--output_dir", args.output_dir, "--overwrite_output_dir", *args.extra.split()]
    start = time.perf_counter()
    run(oneshot)
    wall = time.perf_counter() - start
    records = json.loads((ROOT / args.output_dir / "results.json").read_text())
    dense = next(r for r in records if r["method"] == "dense")["accuracy"]
    methods = list(dict.fromkeys(r["method"] for r in records if r["method"] != "dense"))
    levels = sorted({r["sparsity"] for r in records if r["method"] != "dense"})
    acc = {(r["method"], r["sparsity"]): r for r in records}
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    command = " ".join([f"OMP_NUM_THREADS={threads}", "python", "scripts/bench_oneshot.py", *sys.argv[1:]])
    lines = [SECTION, "",
             f"Command: `{command}`",
             "",
             f"Runs: `{' '.join(['python'] + oneshot[1:])}`", "",
             f"Machine: {machine()}. Wall time of the one-shot run: {wall:.0f} s.", "",
             f"Teacher: `{args.teacher_dir}`, ViT 6 layers, hidden 192, 3 heads, MLP 768, patch 7 on 28x28, trained "
             f"with scripts/train_dense.py; dense top-1 on the 10k test images: **{100 * dense:.2f}%**. Targets: "
             "q/k/v/o and fc1/fc2 of every layer (2.65 M weights). Fisher: "
             f"{args.num_grads} gradients of {args.grad_batch_size} training images, B={args.fisher_block_size}, "
             f"damp={args.damp}.", "",
             "Top-1 accuracy (%) on the test split after one-shot pruning, no fine-tuning:", "",
             "| method | " + " | ".join(f"{100 * s:.0f}%" for s in levels)
             + " | Fisher s | prepare s | apply s (max over levels) |",
             "|---|" + "---|" * (len(levels) + 3)]
    for m in methods:
        rows = [acc[(m, s)] for s in levels if (m, s) in acc]
        cells = [f"{100 * acc[(m, s)]['accuracy']:.2f}" if (m, s) in acc else "-" for s in levels]
        timing = [max(r.get(k, 0.0) for r in rows) for k in ("fisher_seconds", "prepare_seconds", "apply_seconds")]
        lines.append(f"| {m} | " + " | ".join(cells) + " | " + " | ".join(f"{t:.1f}" for t in timing) + " |")
    chart = ROOT / "docs" / "img" / "oneshot_fmnist.png"
    lines += ["", "One backward pass over the calibration batches fills both Fisher kinds (block for OBS/CAP, "
              "shared for FastCAP), so the Fisher time is counted once per method. `prepare` is the "
              "sparsity-independent work (block inversion; CAP's greedy eliminations), `apply` one sparsity "
              "level (CAP re-runs each block's elimination to its cut).", "",
              f"![accuracy vs sparsity](img/{chart.name})", ""]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        chart.parent.mkdir(parents=True, exist_ok=True)
        chart.write_bytes((ROOT / args.output_dir / "accuracy_vs_sparsity.png").read_bytes())
        write_section(ROOT / "docs" / "benchmarks.md", body)


if __name__ == "__main__":
    main()
