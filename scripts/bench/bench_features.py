"""Benchmark: a backbone pruned without labels (the Fisher of its features) against the labelled
cross-entropy Fisher of before, both judged the way DINO users judge a backbone.

  OMP_NUM_THREADS=2 python scripts/bench/bench_features.py

The Fashion-MNIST ViT teacher (trained first by scripts/train_dense.py when missing) is taken as a backbone:
its features are the CLS token of the last layer, its head is used by nothing but the cross-entropy Fisher.
One-shot magnitude, OBS and CAP at each sparsity, from one Fisher per objective (`--fisher_objective
features`: random projections of the CLS feature, no labels; `cross_entropy`: the dataset's labels through
the classifier's head); evaluation by cap_hf.evaluation.features.FeatureEvaluator: weighted k-NN top-1 (k=20,
T=0.07, bank: a random subset of the training split), a linear probe trained on that bank, and the mean
cosine of the pruned and dense features on the test split.

With --gradual true, also a short gradual run of scripts/prune.py on the backbone itself (the teacher's
ViTModel saved without its head, under --backbone_dir) to --gradual_sparsity with CAP, two ways: the
label-free path (feature Fisher, feature distillation) and the probe path (`--fisher_objective
cross_entropy`: a linear probe on the labels, then CE Fisher and logit distillation); both results judged
by the same evaluator. Writes docs/benchmarks.md (section "Backbones without labels") and
OUTPUT_DIR/results.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from benchlib import (
    ROOT,
    VIT_TEACHER,
    FashionMnistBench,
    command_line,
    machine,
    parse_bench,
    prepare_teacher,
    write_section,
)

from cap_hf.config import PruningConfig
from cap_hf.evaluation.features import FeatureEvaluator
from cap_hf.io.data import calibration_loader, collate, prepare_splits
from cap_hf.io.models import load_classifier, load_model
from cap_hf.oneshot import oneshot_sweep

SECTION = "## Backbones without labels: the feature Fisher, judged by k-NN, probe and cosine"
METRICS = (("knn_accuracy", "k-NN"), ("linear_probe_accuracy", "probe"), ("feature_cosine", "cosine"))


@dataclass
class BenchFeatures(FashionMnistBench):
    methods: str = "magnitude,obs,cap"
    objectives: str = "features,cross_entropy"
    num_grads: int = 128
    grad_batch_size: int = 32
    fisher_block_size: int = 192
    bank_samples: int = 10000
    eval_samples: int = 10000
    teacher_epochs: int = 5
    output_dir: str = "outputs/bench-features"
    gradual: bool = False
    backbone_dir: str = "outputs/fmnist-vit-tiny-backbone"
    gradual_sparsity: str = "0.75"
    gradual_epochs: str = "2"
    gradual_train_samples: str = "20000"


# the gradual runs' recipe (scripts/prune.py flags); the in-run evaluation is kept small, the bench's own
# evaluator judges the results
GRADUAL = ["--method", "cap", "--num_pruning_steps", "2", "--learning_rate", "5e-4", "--cyclic_lr", "true", "--min_learning_rate", "1e-5",
           "--weight_decay", "0.05", "--per_device_train_batch_size", "128", "--per_device_eval_batch_size", "256",
           "--crop_scale_min", "1", "--hflip", "true", "--eval_strategy", "no", "--save_strategy", "no",
           "--max_eval_samples", "2000", "--max_knn_bank_samples", "5000", "--probe_epochs", "1",
           "--logging_steps", "50", "--report_to", "none", "--disable_tqdm", "true"]


def main() -> None:
    args, forwarded = parse_bench(BenchFeatures)  # the rest: flags of the gradual runs' scripts/prune.py
    prepare_teacher(args.data_dir, args.teacher_dir, VIT_TEACHER, args.teacher_epochs)
    model, processor = load_classifier(str(ROOT / args.teacher_dir))
    model.eval()
    data = str(ROOT / args.data_dir)
    train, test, _ = prepare_splits(data, processor, model.config.num_channels, max_eval_samples=args.eval_samples)
    bank = prepare_splits(data, processor, model.config.num_channels, max_train_samples=args.bank_samples)[0]
    loader = lambda d: torch.utils.data.DataLoader(d, batch_size=256, collate_fn=collate)  # noqa: E731
    evaluator = FeatureEvaluator(model, loader(bank), loader(test))
    levels = [float(s) for s in args.sparsities.split(",")]
    records, start = [], time.perf_counter()
    for index, objective in enumerate(args.objectives.split(",")):
        methods = [m for m in args.methods.split(",") if index == 0 or m != "magnitude"]  # magnitude: no Fisher
        config = PruningConfig(num_grads=args.num_grads, grad_batch_size=args.grad_batch_size,
                               fisher_block_size=args.fisher_block_size, fisher_objective=objective, calibration_seed=0)
        for record in oneshot_sweep(model, config, methods, levels, calibration_loader(train, args.grad_batch_size, 0),
                                    evaluate=evaluator):
            if record["method"] != "dense" or index == 0:
                records.append({**record, "objective": objective if record["method"] not in ("dense", "magnitude")
                                else "-"})
                print(records[-1], flush=True)
    if args.gradual:
        records += gradual(args, model, processor, evaluator, forwarded)
    wall = time.perf_counter() - start
    out = ROOT / args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(records, indent=1))
    body = render(args, records, wall, levels)
    print(body)
    if not args.no_write:
        write_section(body, SECTION)


def gradual(args: BenchFeatures, model, processor, evaluator: FeatureEvaluator, forwarded: list[str]) -> list[dict]:
    """scripts/prune.py on the backbone, label-free and through a probe; each result judged by `evaluator`."""
    backbone = ROOT / args.backbone_dir
    if not (backbone / "config.json").exists():
        model.base_model.save_pretrained(backbone)
        processor.save_pretrained(backbone)
    records = []
    for path, extra in (("features", []), ("probe", ["--fisher_objective", "cross_entropy"])):
        out = f"{args.output_dir}/gradual-{path}"
        cmd = [sys.executable, "scripts/prune.py", "--model_name_or_path", args.backbone_dir, "--dataset_name",
               args.data_dir, "--output_dir", out, "--overwrite_output_dir", "true", "--sparsity", args.gradual_sparsity,
               "--num_train_epochs", args.gradual_epochs, "--max_train_samples", args.gradual_train_samples,
               "--num_grads", str(args.num_grads), "--grad_batch_size", str(args.grad_batch_size),
               "--fisher_block_size", str(args.fisher_block_size), *GRADUAL,
               *extra, *forwarded]
        print("+", " ".join(["python", *cmd[1:]]), flush=True)
        begin = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        seconds = time.perf_counter() - begin
        pruned = load_model(str(ROOT / out))[0].eval()
        records.append({"method": "cap", "objective": f"gradual, {path}", "sparsity": float(args.gradual_sparsity),
                        **evaluator(pruned), "seconds": seconds, "command": " ".join(["python", *cmd[1:]])})
        print(records[-1], flush=True)
    return records


def render(args: BenchFeatures, records: list[dict], wall: float, levels: list[float]) -> str:
    dense = next(r for r in records if r["method"] == "dense")
    damping = ", ".join(f"{m.upper()}: " + PruningConfig(method=m, num_grads=args.num_grads,
                                                           fisher_block_size=args.fisher_block_size).describe_dampening()
                        for m in ("cap", "obs"))
    lines = [SECTION, "", f"Command: `{command_line('bench_features.py')}`", "",
             f"Machine: {machine()}. Wall time: {wall:.0f} s.", "",
             f"The Fashion-MNIST ViT teacher (`{args.teacher_dir}`, 6x192) as a backbone: the CLS token of its "
             f"last layer. One-shot, no fine-tuning; Fisher: {args.num_grads} gradients of {args.grad_batch_size} "
             f"training images, B={args.fisher_block_size}, the default dampening ({damping}); `features`: random projections of the CLS feature (no labels), `cross_entropy`: the labels "
             f"through the classifier's head (the labelled path of before). k-NN: weighted, k=20, T=0.07, bank = "
             f"{args.bank_samples} training images; probe: logistic regression on the bank's features; cosine: "
             f"pruned vs dense features; on {args.eval_samples} test images. Dense: k-NN "
             f"{100 * dense['knn_accuracy']:.2f}%, probe {100 * dense['linear_probe_accuracy']:.2f}%.", "",
             "| method | Fisher | " + " | ".join(f"{name} {100 * s:.0f}%" for s in levels for _, name in METRICS) + " |",
             "|---|---|" + "---|" * (len(levels) * len(METRICS))]
    oneshot = [r for r in records if not r["objective"].startswith("gradual")]
    for method in dict.fromkeys(r["method"] for r in oneshot if r["method"] != "dense"):
        for objective in dict.fromkeys(r["objective"] for r in oneshot if r["method"] == method):
            mine = {r["sparsity"]: r for r in records if r["method"] == method and r["objective"] == objective}
            cells = [f"{100 * mine[s][key]:.2f}" if key != "feature_cosine" else f"{mine[s][key]:.4f}"
                     for s in levels for key, _ in METRICS]
            lines.append(f"| {method} | {objective} | " + " | ".join(cells) + " |")
    runs = [r for r in records if r["objective"].startswith("gradual")]
    if runs:
        lines += ["", f"Gradual, `scripts/prune.py` on the backbone folder (`{args.backbone_dir}`), CAP to "
                  f"{100 * runs[0]['sparsity']:.0f}%, {args.gradual_epochs} epochs on {args.gradual_train_samples} "
                  "training images, the Fisher as above, the same evaluation. `features`: the label-free path (feature Fisher, feature "
                  "distillation); `probe`: `--fisher_objective cross_entropy` (a linear probe on the labels first, "
                  f"then CE Fisher and logit distillation). Recipe: `{' '.join(GRADUAL)}`.", "",
                  "| run | k-NN | probe | cosine | wall s |", "|---|---|---|---|---|"]
        for r in runs:
            lines.append(f"| {r['objective']} | {100 * r['knn_accuracy']:.2f} | {100 * r['linear_probe_accuracy']:.2f} "
                         f"| {r['feature_cosine']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
