"""Benchmark: one-shot magnitude / OBS / CAP / FastCAP on a DeiT-Tiny-width ViT trained on Fashion-MNIST.

  OMP_NUM_THREADS=2 python scripts/bench/bench_oneshot.py

Makes what is missing (data folder, dense teacher via scripts/train_dense.py), runs scripts/oneshot.py at
50/60/75/80/90% for all four methods in one run, and writes the table, command and machine to
docs/benchmarks.md (section "One-shot pruning") and the raw records to OUTPUT_DIR/results.json. Flags that
are not the benchmark's own (e.g. --damp 1e-8, --max_memory_gb 2) go to scripts/oneshot.py.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from benchlib import (
    ROOT,
    VIT_TEACHER,
    FashionMnistBench,
    command_line,
    machine,
    parse_bench,
    prepare_teacher,
    run,
    write_section,
)

SECTION = "## One-shot pruning: Fashion-MNIST ViT (DeiT-Tiny width)"
# the recipe of this benchmark (scripts/oneshot.py flags; flags given to the benchmark come after and win)
RECIPE = ["--num_grads", "1024", "--grad_batch_size", "16", "--fisher_block_size", "192", "--damp", "1e-7"]


@dataclass
class BenchOneShot(FashionMnistBench):
    sparsities: str = "0.5,0.6,0.75,0.8,0.9"
    output_dir: str = "outputs/bench-oneshot"
    teacher_epochs: int = 5


def main() -> None:
    args, forwarded = parse_bench(BenchOneShot)
    py = sys.executable
    prepare_teacher(args.data_dir, args.teacher_dir, VIT_TEACHER, args.teacher_epochs)
    oneshot = [py, "scripts/oneshot.py", "--model_name_or_path", args.teacher_dir, "--dataset_name", args.data_dir,
               "--methods", args.methods, "--sparsities", args.sparsities, *RECIPE,
               "--output_dir", args.output_dir, "--overwrite_output_dir", "true", *forwarded]
    start = time.perf_counter()
    run(oneshot)
    wall = time.perf_counter() - start
    records = json.loads((ROOT / args.output_dir / "results.json").read_text())
    dense = next(r for r in records if r["method"] == "dense")["accuracy"]
    methods = list(dict.fromkeys(r["method"] for r in records if r["method"] != "dense"))
    levels = sorted({r["sparsity"] for r in records if r["method"] != "dense"})
    acc = {(r["method"], r["sparsity"]): r for r in records}
    recipe = json.loads((ROOT / args.output_dir / "oneshot_args.json").read_text())["pruning"]
    command = command_line("bench_oneshot.py")
    lines = [SECTION, "",
             f"Command: `{command}`",
             "",
             f"Runs: `{' '.join(['python'] + oneshot[1:])}`", "",
             f"Machine: {machine()}. Wall time of the one-shot run: {wall:.0f} s.", "",
             f"Teacher: `{args.teacher_dir}`, ViT 6 layers, hidden 192, 3 heads, MLP 768, patch 7 on 28x28, trained "
             f"with scripts/train_dense.py; dense top-1 on the 10k test images: **{100 * dense:.2f}%**. Targets: "
             "q/k/v/o and fc1/fc2 of every layer (2.65 M weights). Fisher: "
             f"{recipe['num_grads']} gradients of {recipe['grad_batch_size']} training images, "
             f"B={recipe['fisher_block_size']}, damp={recipe['damp']}.", "",
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
              "sparsity-independent work of the method's kernel (CAP's greedy eliminations and packed snapshots, "
              "OBS's scores, FastCAP's factors), `apply` one sparsity level (CAP reads each block's snapshot back).",
              "",
              f"![accuracy vs sparsity](img/{chart.name})", ""]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        chart.parent.mkdir(parents=True, exist_ok=True)
        chart.write_bytes((ROOT / args.output_dir / "accuracy_vs_sparsity.png").read_bytes())
        write_section(body, SECTION)


if __name__ == "__main__":
    main()
