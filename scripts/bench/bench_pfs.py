"""Benchmark: Pruning from Scratch against pruning a trained model, at the same FLOPs, on Fashion-MNIST.

  OMP_NUM_THREADS=2 python scripts/bench/bench_pfs.py --arch resnet

Makes what is missing (data folder; the dense model via scripts/train_dense.py, whose training time is
the pretraining cost), then runs scripts/structured_prune.py once per method, all at --flops_ratio:
  pfs      gates on the x1.25 network (random frozen weights), the architecture trained from scratch
  uniform  the same x1.25 network with every gated width scaled alike to the same FLOPs, trained the same
           way (does the architecture PFS finds matter?)
  dfpc, l1 the trained dense model pruned to the same FLOPs, then fine-tuned for as many epochs
  pfs-stream1, uniform-stream1: the same with a ResNet's stem and streams kept at the original width
           (--stream_expand_ratio 1), so the whole budget goes to the gated block channels
Every run trains --epochs epochs on the 60k training images with distillation from the dense model,
and measures latency right after the dense model's in the same process. Writes the table, command and
machine to docs/benchmarks.md (section "Pruning from Scratch: Fashion-MNIST <arch>") and the raw records
to OUTPUT_DIR/<method>/results.json.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from bench_structured import ARCHES, describe
from benchlib import ROOT, command_line, machine, parse_bench, prepare_teacher, run, write_section

from cap_hf.io.models import load_classifier


@dataclass
class BenchPfs:
    arch: str = "resnet"  # resnet or vit
    data_dir: str = "data/fashion-mnist"
    teacher_dir: str | None = None  # default: the arch's (outputs/fmnist-resnet, outputs/fmnist-vit-tiny)
    teacher_epochs: int = 5
    methods: str = "pfs,uniform,pfs-stream1,uniform-stream1,dfpc,l1"
    flops_ratio: float = 0.5
    epochs: float = 3.0  # training from scratch (pfs, uniform) or fine-tuning (dfpc, l1)
    gate_epochs: int = 2
    learning_rate: float = 2e-3
    latency_repeats: int = 30
    output_dir: str | None = None  # default outputs/bench-pfs-<arch>
    render_only: bool = False  # rewrite the table from OUTPUT_DIR/<method>/results.json of an earlier run
    no_write: bool = False  # do not touch docs/benchmarks.md


def main() -> None:
    args, forwarded = parse_bench(BenchPfs)
    if args.arch not in ARCHES:
        raise SystemExit(f"--arch must be one of {', '.join(ARCHES)}, got {args.arch!r}.")
    teacher_dir, teacher_flags, _, _ = ARCHES[args.arch]
    teacher_dir = args.teacher_dir or teacher_dir
    teacher_command = prepare_teacher(args.data_dir, teacher_dir, teacher_flags, args.teacher_epochs)
    out = Path(args.output_dir or f"outputs/bench-pfs-{args.arch}")
    records = {}
    for name in args.methods.split(","):
        folder = out / name
        method, _, stream = name.partition("-stream")  # pfs-stream1: --stream_expand_ratio 1
        if method in ("pfs", "uniform"):
            extra = ["--train_epochs", str(args.epochs)]
            if method == "pfs":
                extra += ["--gate_epochs", str(args.gate_epochs)]
            if stream:
                extra += ["--stream_expand_ratio", stream]
        else:
            extra = ["--finetune_epochs", str(args.epochs)]
        if not args.render_only:
            run([sys.executable, "scripts/structured_prune.py", "--method", method, "--model_name_or_path", teacher_dir,
                 "--dataset_name", args.data_dir, "--flops_ratio", str(args.flops_ratio), "--output_dir", str(folder),
                 "--overwrite_output_dir", "true", "--learning_rate", str(args.learning_rate), "--disable_tqdm", "true",
                 "--latency_repeats", str(args.latency_repeats), *extra, *forwarded])
        records[name] = json.loads((ROOT / folder / "results.json").read_text())

    dense_metrics = json.loads((ROOT / teacher_dir / "all_results.json").read_text())
    config = load_classifier(str(ROOT / teacher_dir))[0].config
    any_record = next(iter(records.values()))

    def dense_ms(batch: str) -> str:  # every run measures the dense model next to its own; their range
        values = sorted(r["latency_ms_dense"][batch] for r in records.values())
        return f"{values[0]:.2f}-{values[-1]:.2f}"

    rows = [f"| dense | 1.000 | {any_record['params_dense'] / 1e6:.3f} | {dense_ms('1')} | {dense_ms('64')} | "
            f"{dense_metrics['eval_accuracy']:.2%} | pretraining {args.teacher_epochs} epochs: "
            f"{dense_metrics['train_runtime']:.0f} s | - |"]
    for method, r in records.items():
        trained = r.get("training") or r.get("finetuning")
        search = (f"gates {r['gates']['epochs']} epochs + search: {r['search_seconds']:.0f} s" if "gates" in r else
                  f"{r['search_seconds']:.1f} s" if "search_seconds" in r else
                  f"pretraining ({dense_metrics['train_runtime']:.0f} s) + pruning")
        rows.append(f"| {method} | {r['macs_pruned'] / r['macs_dense']:.3f} | {r['params_pruned'] / 1e6:.3f} | "
                    f"{r['latency_ms_pruned']['1']:.2f} ({r['speedup']['1']:.2f}x) | "
                    f"{r['latency_ms_pruned']['64']:.2f} ({r['speedup']['64']:.2f}x) | {r['accuracy_pruned']:.2%} | "
                    f"{search} | {trained['epochs']:g} epochs: {trained['train_runtime_s']:.0f} s |")
    widths = []
    for method in records:
        if records[method]["method"] in ("pfs", "uniform"):
            folder_config = json.loads((ROOT / out / method / "config.json").read_text())
            keys = ("block_widths",) if args.arch == "resnet" else ("layer_num_heads", "layer_intermediate_sizes")
            widths.append(f"- {method}: " + "; ".join(f"{k} {folder_config[k]}" for k in keys))
    samples = "/".join(sorted({str((r.get("training") or r["finetuning"])["train_samples"]) for r in records.values()}))
    section = f"## Pruning from Scratch: Fashion-MNIST {args.arch}"
    body = "\n".join([
        section, "",
        f"Command: `{command_line('bench_pfs.py')}`", "",
        f"Machine: {machine()}", "",
        f"Model: {describe(config)}; dense top-1 {dense_metrics['eval_accuracy']:.2%} on the 10k test images after "
        f"`{' '.join(teacher_command[1:])}`.", "",
        f"Every method at {args.flops_ratio} of the dense model's FLOPs, then {args.epochs:g} epochs on {samples} training "
        f"images with distillation from the dense model (lr {args.learning_rate}); pfs/uniform train from fresh random "
        "weights, dfpc/l1 fine-tune the pruned weights. Latency: median of "
        f"{args.latency_repeats} passes, each model right after the dense one in the same process (the dense row: the "
        "range over the runs; speed-ups are against the dense model of the same run).", "",
        "| method | MACs / dense | params (M) | latency batch 1 (ms) | latency batch 64 (ms) | top-1 | "
        "architecture search | training |",
        "|---|---|---|---|---|---|---|---|",
        *rows, "",
        "Widths found:", *widths,
    ])
    print(body)
    if not args.no_write:
        write_section(body, section)


if __name__ == "__main__":
    main()
