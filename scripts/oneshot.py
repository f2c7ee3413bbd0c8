"""One-shot pruning at several sparsities with several methods, evaluated on one table.

  python scripts/oneshot.py --model_name_or_path outputs/fmnist-vit-tiny --dataset_name data/fashion-mnist \
      --methods magnitude,obs,cap,fastcap --sparsities 0.5,0.75,0.9 --num_grads 1024 --grad_batch_size 16 \
      --fisher_block_size 192 --damp 1e-7 --output_dir outputs/oneshot

Writes OUTPUT_DIR/results.json (records: method, sparsity, achieved_sparsity, accuracy, prune_seconds, ...)
and OUTPUT_DIR/accuracy_vs_sparsity.png.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from cap_hf.config import PruningConfig, parse_structure
from cap_hf.data import calibration_loader, collate, prepare_splits
from cap_hf.metrics import evaluate_accuracy
from cap_hf.models import load_classifier
from cap_hf.oneshot import oneshot_sweep
from cap_hf.plots import plot_accuracy_vs_sparsity
from cap_hf.streaming import MemoryBudgetError, check_budget


@dataclass
class OneShotArguments:
    model_name_or_path: str = field(metadata={"help": "Hub id or folder of an image classifier."})
    dataset_name: str = field(metadata={"help": "Hub id, save_to_disk folder or imagefolder folder."})
    output_dir: str = field(metadata={"help": "Where results.json and the plot go."})
    methods: str = field(default="magnitude,obs,cap,fastcap", metadata={"help": "Comma-separated methods."})
    sparsities: str = field(default="0.5,0.75,0.9", metadata={"help": "Comma-separated target sparsities."})
    num_grads: int = field(default=1024, metadata={"help": "Fisher gradients (m)."})
    grad_batch_size: int = field(default=32, metadata={"help": "Images per Fisher gradient."})
    fisher_block_size: int = field(default=192, metadata={"help": "Fisher block size B."})
    damp: float = field(default=1e-7, metadata={"help": "Absolute Fisher dampening (CAP, OBS)."})
    fastcap_damp: float = field(default=1e-2, metadata={"help": "FastCAP relative dampening."})
    fastcap_column_block: int | None = field(default=None, metadata={"help": "FastCAP column chunk."})
    sparsity_distribution: str = field(default="global", metadata={"help": "global | uniform"})
    structure: str = field(default="unstructured", metadata={"help": "unstructured | N:M (e.g. 2:4)"})
    targets: str | None = field(default=None, metadata={"help": "Regex of module names to prune."})
    label_free_fisher: bool = field(default=False, metadata={"help": "Sample Fisher labels from the model."})
    trace_mode: str = field(default="recompute", metadata={"help": "CAP: recompute | snapshot"})
    fisher_accumulation: str = field(default="auto", metadata={"help": "CAP/OBS: auto | inverse | sum"})
    max_memory_gb: float | None = field(default=None, metadata={
        "help": "CAP/OBS: memory budget of a pruning step (GB); layers are pruned in groups when the Fisher "
                "does not fit (one gradient pass per group, same result)."})
    offload_dir: str | None = field(default=None, metadata={"help": "With --max_memory_gb: folder for snapshots."})
    image_column_name: str = field(default="image")
    label_column_name: str = field(default="label")
    train_split: str | None = field(default=None, metadata={"help": "Calibration split (default: train)."})
    eval_split: str | None = field(default=None, metadata={"help": "Default: validation, else test."})
    max_eval_samples: int | None = field(default=None)
    eval_batch_size: int = field(default=256)
    seed: int = field(default=0)
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing results.json."})


def parse_floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{name} must be comma-separated numbers, got {text!r}.") from None


def main(argv: list[str] | None = None) -> list[dict]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cap_hf").setLevel(logging.INFO)
    (args,) = HfArgumentParser(OneShotArguments).parse_args_into_dataclasses(args=argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    sparsities = parse_floats(args.sparsities, "sparsities")
    try:  # every combination is checked before anything is loaded
        n_m = parse_structure(args.structure)
        if n_m is not None:  # N:M fixes the sparsity
            sparsities = [1 - n_m[0] / n_m[1]]
        base = PruningConfig(
            method=methods[0] if methods else "", sparsity=sparsities[0] if sparsities else 0.0, num_grads=args.num_grads,
            grad_batch_size=args.grad_batch_size, fisher_block_size=args.fisher_block_size, damp=args.damp,
            fastcap_damp=args.fastcap_damp, fastcap_column_block=args.fastcap_column_block,
            sparsity_distribution=args.sparsity_distribution, structure=args.structure, targets=args.targets,
            label_free_fisher=args.label_free_fisher, trace_mode=args.trace_mode, seed=args.seed,
            max_memory_gb=args.max_memory_gb, offload_dir=args.offload_dir,
            fisher_accumulation=args.fisher_accumulation)
        for method in methods:
            for sparsity in sparsities:
                base.replace(method=method, sparsity=sparsity)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    out = Path(args.output_dir)
    if (out / "results.json").exists() and not args.overwrite_output_dir:
        raise SystemExit(f"{out / 'results.json'} exists; pass --overwrite_output_dir to replace it.")

    model, processor = load_classifier(args.model_name_or_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    try:  # a memory budget that can never be met fails before the data is prepared
        for method in methods:
            check_budget(model, base.replace(method=method))
    except MemoryBudgetError as err:
        raise SystemExit(f"error: {err}") from None
    train, evaluation, _ = prepare_splits(
        args.dataset_name, processor, model.config.num_channels, args.image_column_name, args.label_column_name,
        args.train_split, args.eval_split, None, args.max_eval_samples,
        train_needs_labels=not args.label_free_fisher, seed=args.seed)
    if any(base.replace(method=m).needs_fisher for m in methods):
        available = len(train) // args.grad_batch_size
        if available < args.num_grads:
            raise SystemExit(f"error: --num_grads {args.num_grads} x --grad_batch_size {args.grad_batch_size} needs "
                             f"{args.num_grads * args.grad_batch_size} calibration images, the train split has "
                             f"{len(train)} ({available} batches). Lower one of them.")
    labels = evaluation.with_format(None)[args.label_column_name]
    if max(labels) >= model.config.num_labels:
        raise SystemExit(f"error: the eval split has label {max(labels)} but the model has only "
                         f"{model.config.num_labels} classes; is this the dataset the model was trained on?")
    eval_loader = torch.utils.data.DataLoader(evaluation, batch_size=args.eval_batch_size, collate_fn=collate)

    records = oneshot_sweep(
        model, base, methods, sparsities,
        calibration_batches=lambda: calibration_loader(train, args.grad_batch_size, args.seed),
        evaluate=lambda m: evaluate_accuracy(m, eval_loader, device), progress=True)

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(records, indent=2))
    (out / "oneshot_args.json").write_text(json.dumps({**asdict(args), "command": " ".join(sys.argv)}, indent=2))
    plot_accuracy_vs_sparsity(records, out / "accuracy_vs_sparsity.png",
                              title=f"One-shot pruning of {Path(args.model_name_or_path).name}")
    print(f"{'method':<10} {'sparsity':>8} {'achieved':>8} {'top-1':>7} {'seconds':>8}")
    for r in records:
        print(f"{r['method']:<10} {r['sparsity']:>8.2f} {r['achieved_sparsity']:>8.4f} {r['accuracy']:>7.4f} "
              f"{r['prune_seconds']:>8.1f}")
    return records


if __name__ == "__main__":
    main()
