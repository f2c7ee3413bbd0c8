"""Benchmark: structured pruning (DFPC, L1, random, DFPC on uncoupled channels only) of a bottleneck ResNet
trained on Fashion-MNIST: top-1 against the measured CPU speed-up, no fine-tuning.

  OMP_NUM_THREADS=2 python scripts/bench_structured.py

Makes what is missing (data folder; the dense ResNet via scripts/train_dense.py), then for every method and
pruning ratio: prune_channels (the library's entry) -> the smaller model's parameters, MACs, latency at
batch 1 and 64 measured right after the dense model's in the same process (median of repeated passes),
and top-1 on the 10k test images. Writes the table, command and machine to docs/benchmarks.md (section
"Structured pruning") with a chart in docs/img/, and the raw records to OUTPUT_DIR/results.json.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch
from benchlib import ROOT, command_line, machine, parse_bench, run, write_section

from cap_hf.data import collate, prepare_splits
from cap_hf.metrics import evaluate_accuracy
from cap_hf.models import load_classifier, processor_image_size
from cap_hf.plots import plot_accuracy_lines
from cap_hf.structured import prune_channels
from cap_hf.structured.measure import count_macs, count_parameters, latencies_ms

IMAGE = "structured_fmnist_resnet.png"
SECTION = "## Structured pruning: Fashion-MNIST ResNet (bottleneck), no fine-tuning"
TEACHER = ["--arch", "resnet", "--layer_type", "bottleneck", "--embedding_size", "32", "--hidden_sizes", "64,128,256",
           "--depths", "2,2,2", "--image_size", "28", "--learning_rate", "2e-3", "--weight_decay", "0.05",
           "--warmup_steps", "200", "--per_device_train_batch_size", "128", "--per_device_eval_batch_size", "256",
           "--eval_strategy", "epoch", "--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none"]


@dataclass
class BenchStructured:
    data_dir: str = "data/fashion-mnist"
    teacher_dir: str = "outputs/fmnist-resnet"
    teacher_epochs: int = 5
    methods: str = "dfpc,l1,random,dfpc-uncoupled"  # -uncoupled: residual streams kept whole
    ratios: str = "0.1,0.2,0.3,0.4,0.5"
    latency_repeats: int = 30
    max_eval_samples: int | None = None
    output_dir: str = "outputs/bench-structured"
    no_write: bool = False  # do not touch docs/benchmarks.md


def main() -> None:
    args, rest = parse_bench(BenchStructured)
    if rest:
        raise SystemExit(f"Unknown flags: {rest}")
    py = sys.executable
    if not (ROOT / args.data_dir).exists():
        run([py, "scripts/prepare_data.py", "--dataset", "fashion-mnist", "--output_dir", args.data_dir])
    if not (ROOT / args.teacher_dir / "config.json").exists():
        run([py, "scripts/train_dense.py", "--dataset_name", args.data_dir, "--output_dir", args.teacher_dir,
             "--num_train_epochs", str(args.teacher_epochs), *TEACHER])
    model, processor = load_classifier(str(ROOT / args.teacher_dir))
    model.eval()
    size = processor_image_size(processor)
    _, evaluation, _ = prepare_splits(str(ROOT / args.data_dir), processor, model.config.num_channels,
                                      max_eval_samples=args.max_eval_samples, train_needs_labels=False)
    loader = torch.utils.data.DataLoader(evaluation, batch_size=256, collate_fn=collate)
    dense_accuracy = evaluate_accuracy(model, loader)
    dense = {"params": count_parameters(model), "macs": count_macs(model, size)}

    records = []
    for spec in args.methods.split(","):
        method, _, variant = spec.partition("-")
        for ratio in (float(r) for r in args.ratios.split(",")):
            try:
                small, pruned = prune_channels(model, size, method, pruning_ratio=ratio,
                                               uncoupled_only=variant == "uncoupled")
            except ValueError as err:  # beyond what this variant can reach
                print(f"{spec} {ratio}: {err}")
                continue
            record = {"method": spec, "ratio": ratio, "removed": pruned.removed, "prunable": pruned.prunable,
                      "params": count_parameters(small), "macs": count_macs(small, size)}
            for batch in (1, 64):
                before, after = latencies_ms([model, small], size, batch, args.latency_repeats)
                record[f"ms_dense_{batch}"], record[f"ms_{batch}"] = before, after
                record[f"speedup_{batch}"] = before / after
            record["accuracy"] = evaluate_accuracy(small, loader)
            records.append(record)
            print(json.dumps(record), flush=True)

    out = ROOT / args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"dense_accuracy": dense_accuracy, **dense, "records": records},
                                                 indent=2))
    chart = out / "accuracy_vs_speedup.png"
    series = {spec: [(r["speedup_64"], 100 * r["accuracy"]) for r in records if r["method"] == spec]
              for spec in args.methods.split(",")}
    plot_accuracy_lines(series, chart, "measured speed-up at batch 64 (dense ms / pruned ms)",
                        "Channel pruning, no fine-tuning", 100 * dense_accuracy)
    config = model.config
    lines = [SECTION, "", f"Command: `{command_line('bench_structured.py')}`", "", f"Machine: {machine()}.", "",
             f"Model: `{args.teacher_dir}`, transformers ResNetForImageClassification, bottleneck, stem "
             f"{config.embedding_size}, stages {config.hidden_sizes} x {config.depths} blocks, 28x28 inputs, trained "
             f"with `python scripts/train_dense.py --dataset_name {args.data_dir} --output_dir {args.teacher_dir} "
             f"--num_train_epochs {args.teacher_epochs} {' '.join(TEACHER)}`; {dense['params'] / 1e6:.2f} M "
             f"parameters, {dense['macs'] / 1e6:.1f} M MACs per image, dense top-1 **{100 * dense_accuracy:.2f}%** "
             "on the 10k test images.", "",
             "Ratio = fraction of the prunable channels removed (for -uncoupled, of the block-internal channels "
             "only). Latency: median of one forward pass over the repeats, the dense and the pruned model taking "
             "turns pass by pass in this process; speed-up = dense ms / pruned ms. No fine-tuning, no data used by the "
             "pruning.", "",
             "| method | ratio | channels removed | params (M) | MACs (M) | ms b1 (dense -> pruned) | "
             "ms b64 (dense -> pruned) | speed-up b1 | speed-up b64 | top-1 (%) | drop (points) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['method']} | {r['ratio']:.2f} | {r['removed']}/{r['prunable']} | {r['params'] / 1e6:.3f} "
                     f"| {r['macs'] / 1e6:.1f} | {r['ms_dense_1']:.2f} -> {r['ms_1']:.2f} | {r['ms_dense_64']:.1f} -> "
                     f"{r['ms_64']:.1f} | {r['speedup_1']:.2f}x | {r['speedup_64']:.2f}x | {100 * r['accuracy']:.2f} "
                     f"| {100 * (dense_accuracy - r['accuracy']):.2f} |")
    body = "\n".join(lines) + f"\n\n![accuracy vs speed-up](img/{IMAGE})\n"
    print(body)
    if not args.no_write:
        (ROOT / "docs" / "img" / IMAGE).write_bytes(chart.read_bytes())
        write_section(body, SECTION)


if __name__ == "__main__":
    main()
