"""One-shot pruning: one method at one sparsity, or several of each compared on one table.

  python scripts/oneshot.py --model_name_or_path outputs/fmnist-vit-tiny --dataset_name data/fashion-mnist \
      --methods magnitude,obs,cap,fastcap --sparsities 0.5,0.75,0.9 --num_grads 1024 --grad_batch_size 16 \
      --fisher_block_size 192 --damp 1e-7 --output_dir outputs/oneshot

Under `accelerate launch --num_processes N` (add --multi_gpu; on CPUs the processes use gloo) the step is shared
out: each process computes num_grads / N gradients and builds the Fisher of, and prunes, its share of the layers
(memory and time per process divided by about N); rank 0 writes the results.

Every PruningConfig field is a flag (--method, --sparsity, --damp, ...; or --recipe FILE). The Fisher is
collected once for all methods (one gradient pass per layer group) and each method prepares once for
all sparsities. Writes OUTPUT_DIR/results.json (records: method, sparsity, achieved_sparsity, accuracy,
prune_seconds, ...) and OUTPUT_DIR/accuracy_vs_sparsity.png. --streaming reads the dataset as a stream
(cap_hf.io.stream): calibration batches from a seeded shuffle of it, evaluation on the first
--max_eval_samples images (default 10000, a sample seeded by --seed) of the evaluation split.

A backbone without a head (DINO's ViTModel, Dinov2Model: a checkpoint saved without
*ForImageClassification) is pruned with the Fisher of its output features (no labels needed: the training
split may have no label column) and judged as DINO users judge one: weighted k-NN top-1 (k=20, T=0.07,
bank: --knn_bank_split), a linear probe, and the mean cosine of its features to the dense model's
(records: knn_accuracy, linear_probe_accuracy, feature_cosine). Labels are used only there; without them
in the evaluation split, feature cosine alone is reported.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState

from cap_hf.cli.backbone import FeatureEvalArguments, backbone_evaluator
from cap_hf.cli.parser import parse_args, run
from cap_hf.config import PruningConfig
from cap_hf.engine.calibration import calibration_seed, check_calibration_size
from cap_hf.engine.feature_fisher import fisher_objective
from cap_hf.engine.plan import MemoryBudgetError, check_budget
from cap_hf.evaluation.features import is_backbone
from cap_hf.evaluation.metrics import evaluate_accuracy
from cap_hf.io.data import calibration_loader, collate
from cap_hf.io.models import load_model
from cap_hf.io.plots import plot_accuracy_vs_sparsity
from cap_hf.io.sources import check_sources
from cap_hf.io.stream import StreamArguments
from cap_hf.oneshot import METRICS, main_metric, oneshot_sweep

logger = logging.getLogger("cap_hf.oneshot")


@dataclass
class OneShotArguments:
    model_name_or_path: str = field(metadata={"help": "Hub id or folder of an image classifier or a backbone."})
    dataset_name: str = field(metadata={"help": "Hub id, save_to_disk folder or imagefolder folder."})
    output_dir: str = field(metadata={"help": "Where results.json and the plot go."})
    methods: str | None = field(default=None, metadata={
        "help": "Comma-separated methods to compare (default: --method alone)."})
    sparsities: str | None = field(default=None, metadata={
        "help": "Comma-separated sparsities to compare (default: --sparsity alone)."})
    image_column_name: str = field(default="image")
    label_column_name: str = field(default="label")
    train_split: str | None = field(default=None, metadata={"help": "Calibration split (default: train)."})
    eval_split: str | None = field(default=None, metadata={"help": "Default: validation, else test."})
    max_eval_samples: int | None = field(default=None)
    eval_batch_size: int = field(default=256)
    dataloader_num_workers: int = field(default=0, metadata={
        "help": "Processes decoding the calibration and evaluation images (as in TrainingArguments)."})
    seed: int = field(default=0, metadata={"help": "Seed of the evaluation subset and, unless --calibration_seed, "
                                                   "of the calibration batches."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing results.json."})


def parse_floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated numbers, got {text!r}.") from None


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cap_hf").setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    try:  # every combination, and where the model and the data come from, is checked before anything is loaded
        args, feature_args, config, stream = parse_args((OneShotArguments, FeatureEvalArguments, PruningConfig,
                                                          StreamArguments), argv,
                                                description=__doc__, prog="python scripts/oneshot.py")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else [config.method]
        sparsities = parse_floats(args.sparsities, "sparsities") if args.sparsities else [config.sparsity]
        if config.calibration_seed is None:
            config = config.replace(calibration_seed=args.seed)
        methods, sparsities = config.sweep(methods, sparsities)
        stream.check()
        out = Path(args.output_dir)
        if (out / "results.json").exists() and not args.overwrite_output_dir:
            raise ValueError(f"{out / 'results.json'} exists; pass --overwrite_output_dir to replace it.")
        check_sources(model=args.model_name_or_path, dataset=args.dataset_name)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None

    # under `accelerate launch --num_processes N` the pruning step is shared out over the N processes (each
    # computes its share of the gradients and prunes the layers it owns; cap_hf.engine.ranks); rank 0 writes the results
    state = PartialState(cpu=not torch.cuda.is_available())
    rank = state.process_index
    try:
        model, processor = load_model(args.model_name_or_path)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    backbone = is_backbone(model)
    device = torch.device(config.device) if config.device else state.device
    model.to(device).eval()
    try:  # a memory budget that can never be met fails before the data is prepared
        check_budget(model, config, methods)
    except MemoryBudgetError as err:
        raise SystemExit(f"error: {err}") from None
    needs_labels = fisher_objective(config, model) == "cross_entropy" and not config.label_free_fisher
    try:
        train, evaluation, _ = stream.splits(
            args.dataset_name, processor, model.config.num_channels, image_column=args.image_column_name,
            label_column=args.label_column_name, train_split=args.train_split, eval_split=args.eval_split,
            max_eval_samples=args.max_eval_samples,
            train_needs_labels=needs_labels and any(config.replace(method=m).needs_fisher for m in methods),
            eval_needs_labels=not backbone, seed=args.seed, rank=rank, world=state.num_processes)
        if any(config.replace(method=m).needs_fisher for m in methods) and not stream.streaming:
            check_calibration_size(len(train), config.num_grads, config.grad_batch_size, state.num_processes)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    if backbone:
        evaluate = backbone_evaluator(model, processor, args.dataset_name, evaluation, feature_args,
                                      pooling=config.feature_pooling, image_column=args.image_column_name,
                                      label_column=args.label_column_name, eval_split=args.eval_split, seed=args.seed,
                                      batch_size=args.eval_batch_size, num_workers=args.dataloader_num_workers,
                                      stream=stream,
                                      device=device)
    else:
        labels = evaluation.with_format(None)[args.label_column_name]
        if max(labels) >= model.config.num_labels:
            raise SystemExit(f"error: the eval split has label {max(labels)} but the model has only "
                             f"{model.config.num_labels} classes; is this the dataset the model was trained on?")
        eval_loader = torch.utils.data.DataLoader(evaluation, batch_size=args.eval_batch_size, collate_fn=collate,
                                                  num_workers=args.dataloader_num_workers)
        evaluate = lambda m: evaluate_accuracy(m, eval_loader, device)  # noqa: E731

    records = oneshot_sweep(
        model, config, methods, sparsities,
        calibration_batches=calibration_loader(train, config.grad_batch_size,
                                               calibration_seed(config.calibration_seed, 0, rank),
                                               num_workers=args.dataloader_num_workers),
        evaluate=evaluate, progress=state.is_main_process)  # every rank evaluates the same weights
    if not state.is_main_process:
        return records

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(records, indent=2))
    (out / "oneshot_args.json").write_text(json.dumps({**asdict(args), "pruning": config.to_dict(),
                                                       "num_processes": state.num_processes,
                                                       "command": " ".join(sys.argv)}, indent=2))
    metric = main_metric(records)
    plot_accuracy_vs_sparsity(records, out / "accuracy_vs_sparsity.png", metric=metric,
                              title=f"One-shot pruning of {Path(args.model_name_or_path).name}")
    shown = [k for k in METRICS if k in records[0]]
    print(f"{'method':<10} {'sparsity':>8} {'achieved':>8} " + " ".join(f"{k:>21}" for k in shown) + f" {'seconds':>8}")
    for r in records:
        print(f"{r['method']:<10} {r['sparsity']:>8.2f} {r['achieved_sparsity']:>8.4f} "
              + " ".join(f"{r[k]:>21.4f}" for k in shown) + f" {r['prune_seconds']:>8.1f}")
    return records


if __name__ == "__main__":
    run(main)
