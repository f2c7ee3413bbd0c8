"""Benchmark: structured pruning (second-order obs / cap, DFPC, L1, random; -uncoupled: residual streams kept
whole) of a bottleneck ResNet or a ViT trained on Fashion-MNIST: top-1 against the measured CPU speed-up, as
pruned, with the batch norms re-estimated, with the layers refitted to the dense outputs (and then the batch
norms too), and after a short fine-tuning (distillation from the dense model).

  OMP_NUM_THREADS=2 python scripts/bench/bench_structured.py --arch resnet
  OMP_NUM_THREADS=2 python scripts/bench/bench_structured.py --arch vit

Makes what is missing (data folder; the dense model via scripts/train_dense.py), then for every method and
target speed-up (or pruning ratio with --ratios, MACs ratio with --flops_ratios): prune_channels or
prune_second_order (the library's entries, on --calibration_samples training images for obs / cap; a target is
reached by measurement) -> the smaller model's parameters, MACs, latency at batch 1 and 64 measured right after
the dense model's in the same process (median of repeated passes), and top-1 on the 10k test images: as pruned;
with its batch norms re-estimated on --calibration_samples training images (recalibrate_batch_norms, on a copy);
with its layers refitted on as many (reconstruct, --reconstruction), and that with the batch norms re-estimated
too (a copy); then after `--finetune_epochs` on `--finetune_samples` training images (cap_hf.trainer.fine_tune)
from the reconstructed model. Writes the table, command and machine to docs/benchmarks.md (section "Structured
pruning: Fashion-MNIST <arch>") with a chart in docs/img/, and the raw records to OUTPUT_DIR/results.json.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import dataclass

import torch
from benchlib import (
    RESNET_TEACHER,
    ROOT,
    VIT_TEACHER,
    command_line,
    machine,
    parse_bench,
    prepare_teacher,
    write_section,
)

from cap_hf.evaluation.metrics import evaluate_accuracy
from cap_hf.io.data import calibration_loader, collate, prepare_splits
from cap_hf.io.models import load_classifier, processor_image_size
from cap_hf.io.plots import plot_accuracy_lines
from cap_hf.structured import (
    StructuredConfig,
    prune_channels,
    prune_second_order,
    recalibrate_batch_norms,
    reconstruct,
)
from cap_hf.structured.measure import compare_models, count_macs, count_parameters
from cap_hf.structured.registry import names
from cap_hf.trainer import DistillationArguments, fine_tune

ARCHES = {  # teacher folder, its train_dense flags, section of docs/benchmarks.md, chart
    "resnet": ("outputs/fmnist-resnet", RESNET_TEACHER, "## Structured pruning: Fashion-MNIST ResNet (bottleneck)",
               "structured_fmnist_resnet.png"),
    "vit": ("outputs/fmnist-vit-tiny", VIT_TEACHER, "## Structured pruning: Fashion-MNIST ViT",
            "structured_fmnist_vit.png"),
}


def widths(config) -> str:
    if config.model_type == "pruned_vit":
        return f"{config.hidden_size}; {config.layer_num_heads}; {config.layer_intermediate_sizes}"
    return f"stages {config.hidden_sizes}"


def describe(config) -> str:
    if config.model_type == "resnet":
        return (f"transformers ResNetForImageClassification, bottleneck, stem {config.embedding_size}, stages "
                f"{config.hidden_sizes} x {config.depths} blocks")
    return (f"transformers ViTForImageClassification, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_attention_heads} heads, MLP {config.intermediate_size}, patch {config.patch_size}")


@dataclass
class BenchStructured:
    arch: str = "resnet"  # resnet or vit
    data_dir: str = "data/fashion-mnist"
    teacher_dir: str | None = None  # default: the arch's (outputs/fmnist-resnet, outputs/fmnist-vit-tiny)
    teacher_epochs: int = 5
    methods: str = "obs,cap,dfpc,l1"  # also random; -uncoupled: residual streams kept whole; -mean / -none:
    # that normalisation for this entry (e.g. dfpc-mean next to dfpc on auto)
    normalize: str = "auto"  # prune_channels' normalize: auto, mean, or none (raw scores, as the DFPC paper)
    speedups: str = "1.25,1.5,2"  # targets, measured at batch 64 (prune_channels' search)
    ratios: str | None = None  # fractions of the prunable channels instead of speed-up targets
    flops_ratios: str | None = None  # MACs ratios instead of speed-up targets (no latency noise in the choice)
    calibration_samples: int = 512  # obs / cap curvature, the reconstruction and batch-norm re-estimation of every method
    reconstruction: bool = True  # refit the layers to the dense outputs (cap_hf.structured.reconstruct) before the BNs
    latency_repeats: int = 30
    finetune_epochs: float = 1.0  # 0: no fine-tuning
    finetune_samples: int = 20000
    finetune_learning_rate: float = 5e-4
    max_eval_samples: int | None = None
    output_dir: str | None = None  # default: outputs/bench-structured-<arch>
    no_write: bool = False  # do not touch docs/benchmarks.md


def main() -> None:
    args, rest = parse_bench(BenchStructured)
    if rest:
        raise SystemExit(f"Unknown flags: {rest}")
    if args.arch not in ARCHES:
        raise SystemExit(f"--arch {args.arch!r}: choose one of {', '.join(ARCHES)}.")
    default_teacher, teacher_flags, section, image = ARCHES[args.arch]
    args.teacher_dir = args.teacher_dir or default_teacher
    args.output_dir = args.output_dir or f"outputs/bench-structured-{args.arch}"
    teacher_command = prepare_teacher(args.data_dir, args.teacher_dir, teacher_flags, args.teacher_epochs)
    model, processor = load_classifier(str(ROOT / args.teacher_dir))
    model.eval()
    size = processor_image_size(processor)
    train, evaluation, _ = prepare_splits(str(ROOT / args.data_dir), processor, model.config.num_channels,
                                          max_train_samples=args.finetune_samples,
                                          max_eval_samples=args.max_eval_samples)
    loader = torch.utils.data.DataLoader(evaluation, batch_size=256, collate_fn=collate)
    dense_accuracy = evaluate_accuracy(model, loader)
    dense = {"params": count_parameters(model), "macs": count_macs(model, size)}

    if args.ratios:
        goals = [{"pruning_ratio": float(r)} for r in args.ratios.split(",")]
    elif args.flops_ratios:
        goals = [{"flops_ratio": float(r)} for r in args.flops_ratios.split(",")]
    else:
        goals = [{"target_speedup": float(x)} for x in args.speedups.split(",")]
    records = []
    for spec in args.methods.split(","):
        method, _, variant = spec.partition("-")
        for goal in goals:
            start = time.perf_counter()
            try:
                if method in names("second_order"):
                    config = StructuredConfig(method, uncoupled_only=variant == "uncoupled",
                                              calibration_samples=args.calibration_samples, **goal)
                    calibration = calibration_loader(train, 64 if method == "obs" else 1, 0)
                    small, pruned = prune_second_order(model, size, calibration, config)
                    ratio, normalize = pruned.removed / pruned.prunable, "-"
                else:
                    config = StructuredConfig(method, uncoupled_only=variant == "uncoupled",
                                              normalize=variant if variant in ("mean", "none") else args.normalize, **goal)
                    small, pruned = prune_channels(model, size, config)
                    ratio, normalize = pruned.ratio, pruned.normalize
            except ValueError as err:  # beyond what this variant can reach
                print(f"{spec} {goal}: {err}")
                records.append({"method": spec, **goal, "unreachable": str(err)})
                continue
            record = {"method": spec, **goal, "ratio": ratio, "removed": pruned.removed, "prunable": pruned.prunable,
                      "normalize": normalize, "prune_seconds": time.perf_counter() - start,
                      "widths": widths(small.config), **compare_models(model, small, size, (1, 64), args.latency_repeats)}
            record["accuracy"] = evaluate_accuracy(small, loader)
            recalibrated = copy.deepcopy(small)  # the batch norms re-estimated on the model as pruned
            if recalibrate_batch_norms(recalibrated, calibration_loader(train, 64, 0), args.calibration_samples):
                record["accuracy_recalibrated"] = evaluate_accuracy(recalibrated, loader)
            if args.reconstruction:  # the layers refitted (structured_prune.py's default), then also the batch norms
                record["reconstruction"] = reconstruct(model, small, pruned, size, calibration_loader(train, 64, 0),
                                                       args.calibration_samples)
                record["accuracy_reconstructed"] = evaluate_accuracy(small, loader)
                both = copy.deepcopy(small)
                if recalibrate_batch_norms(both, calibration_loader(train, 64, 0), args.calibration_samples):
                    record["accuracy_reconstructed_recalibrated"] = evaluate_accuracy(both, loader)
            else:
                small = recalibrated
            if args.finetune_epochs:
                training = DistillationArguments(
                    output_dir=tempfile.mkdtemp(), num_train_epochs=args.finetune_epochs,
                    learning_rate=args.finetune_learning_rate, weight_decay=0.05, per_device_train_batch_size=128,
                    eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
                tuned, metrics = fine_tune(small, model, training, train)
                record["accuracy_finetuned"] = evaluate_accuracy(tuned, loader)
                record["finetune_seconds"] = metrics["train_runtime"]
            records.append(record)
            print(json.dumps(record), flush=True)

    out = ROOT / args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"dense_accuracy": dense_accuracy, **dense, "records": records},
                                                 indent=2))
    chart = out / "accuracy_vs_speedup.png"
    done = [r for r in records if "unreachable" not in r]
    series = {spec: [(r["speedup"]["64"], 100 * r["accuracy"]) for r in done if r["method"] == spec]
              for spec in args.methods.split(",")}
    series.update({f"{spec} + {step}": [(r["speedup"]["64"], 100 * r[key]) for r in done if r["method"] == spec and key in r]
                   for spec in args.methods.split(",")
                   for key, step in (("accuracy_recalibrated", "BN re-estimated"), ("accuracy_reconstructed", "reconstructed"))})
    series = {name: points for name, points in series.items() if points}
    if args.finetune_epochs:
        series.update({f"{spec} + fine-tuning": [(r["speedup"]["64"], 100 * r["accuracy_finetuned"]) for r in done
                                                 if r["method"] == spec] for spec in args.methods.split(",")})
    plot_accuracy_lines(series, chart, "measured speed-up at batch 64 (dense ms / pruned ms)",
                        f"Channel pruning of a Fashion-MNIST {dict(resnet='ResNet', vit='ViT')[args.arch]}", 100 * dense_accuracy)
    def tuned_cell(record: dict, what: str) -> str:
        if "accuracy_finetuned" not in record:
            return "-"
        value = record["accuracy_finetuned"] if what == "accuracy_finetuned" else dense_accuracy - record[
            "accuracy_finetuned"]
        return f"{100 * value:.2f}"

    normalized = sorted({r["normalize"] for r in records if "normalize" in r
                         and r["method"].partition("-")[2] not in ("mean", "none")})
    lines = [section, "", f"Command: `{command_line('bench_structured.py')}`", "", f"Machine: {machine()}.", "",
             f"Model: `{args.teacher_dir}`, {describe(model.config)}, 28x28 inputs, trained "
             f"with `python {' '.join(teacher_command[1:])}`; {dense['params'] / 1e6:.2f} M "
             f"parameters, {dense['macs'] / 1e6:.1f} M MACs per image, dense top-1 **{100 * dense_accuracy:.2f}%** "
             f"on {len(evaluation)} test images.", "",
             "Goal: a target speed-up (the fewest channels, in each method's order, whose smaller model is that "
             "much faster as measured at batch 64: prune_channels' bisection) or a pruning ratio. Ratio = "
             "fraction of the prunable channels removed (for -uncoupled, of the block-internal channels "
             f"only). Scores normalised per group: {args.normalize} -> {', '.join(normalized)}, entries -mean / -none force "
             "one (mean: each group's scores over their mean; none: "
             "raw scores compared across groups, as the DFPC paper's code). Latency: median of one forward pass over the repeats, the dense and the pruned model taking "
             "turns pass by pass in this process; speed-up = dense ms / pruned ms. DFPC, L1 and random use no data; "
             f"obs and cap use {args.calibration_samples} training images (obs: the layer-wise Hessian; cap: one "
             "gradient per image for the Fisher). Pruning time (s): the library call, cost tables and latency "
             "search included. BN: the batch-norm statistics of the model as pruned re-estimated on "
             f"{args.calibration_samples} training images, no weight trained (recalibrate_batch_norms). Reconstructed: every "
             "convolution and linear layer of the model as pruned refitted, in the order the model runs them, to the dense "
             f"model's layer outputs on {args.calibration_samples} training images (least squares on the pruned model's "
             "own inputs, cap_hf.structured.reconstruct; '-' where it was off); + BN: then also its batch norms "
             "re-estimated. Fine-tuning starts from the reconstructed model (from the BN one without reconstruction). "
             f"Fine-tuning: {args.finetune_epochs:g} epoch(s) on {len(train)} training images, AdamW lr "
             f"{args.finetune_learning_rate:g} linear decay, wd 0.05, batch 128, distillation from the dense model "
             "(T=2, alpha=0.5), cap_hf.trainer.fine_tune.", "",
             "| method | goal | ratio | channels removed | params (M) | MACs (M) | ms b1 (dense -> pruned) | "
             "ms b64 (dense -> pruned) | speed-up b1 | speed-up b64 | pruning (s) | top-1 (%) | drop (points) | "
             "top-1 BN (%) | top-1 reconstructed (%) | top-1 reconstructed + BN (%) | top-1 fine-tuned (%) | drop fine-tuned |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        goal = (f"{r['target_speedup']:g}x" if "target_speedup" in r else f"MACs {r['flops_ratio']:g}"
                if "flops_ratio" in r else f"ratio {r['pruning_ratio']:g}")
        if "unreachable" in r:
            lines.append(f"| {r['method']} | {goal} | not reached: {r['unreachable']} |" + " |" * 15)
            continue
        dense_ms, pruned_ms, speedup = r["latency_ms_dense"], r["latency_ms_pruned"], r["speedup"]
        lines.append(f"| {r['method']} | {goal} | {r['ratio']:.2f} | {r['removed']}/{r['prunable']} "
                     f"| {r['params_pruned'] / 1e6:.3f} | {r['macs_pruned'] / 1e6:.1f} | {dense_ms['1']:.2f} -> "
                     f"{pruned_ms['1']:.2f} | {dense_ms['64']:.1f} -> {pruned_ms['64']:.1f} | {speedup['1']:.2f}x "
                     f"| {speedup['64']:.2f}x | {r['prune_seconds']:.0f} | {100 * r['accuracy']:.2f} "
                     f"| {100 * (dense_accuracy - r['accuracy']):.2f} | "
                     + " | ".join(f"{100 * r[key]:.2f}" if key in r else "-"
                                  for key in ("accuracy_recalibrated", "accuracy_reconstructed",
                                              "accuracy_reconstructed_recalibrated"))
                     + f" | {tuned_cell(r, 'accuracy_finetuned')} "
                     f"| {tuned_cell(r, 'drop')} |")
    if args.arch == "vit":
        lines += ["", "Widths kept (hidden; heads per layer; MLP per layer):", ""]
        lines += [f"- {r['method']} {r.get('target_speedup', r.get('flops_ratio', r.get('pruning_ratio')))}: {r['widths']}"
                  for r in records if "widths" in r]
    body = "\n".join(lines) + f"\n\n![accuracy vs speed-up](img/{image})\n"
    print(body)
    if not args.no_write:
        (ROOT / "docs" / "img" / image).write_bytes(chart.read_bytes())
        write_section(body, section)


if __name__ == "__main__":
    main()
