"""Structured pruning: remove whole channels (coupled residual-stream channels included) into a physically
smaller model that loads with from_pretrained, and measure what it gained.

  python scripts/structured_prune.py --method dfpc --model_name_or_path outputs/fmnist-resnet \
      --target_speedup 1.5 --dataset_name data/fashion-mnist --output_dir outputs/dfpc-1.5x

--method dfpc (data-free BGSC saliency), l1 or random; --uncoupled_only leaves the residual streams whole
(the paper's baseline). Exactly one of --pruning_ratio R (fraction of the prunable channels removed),
--flops_ratio F (the fewest channels whose removal leaves at most F of the dense model's MACs) and
--target_speedup S (the fewest channels whose removal gives S, measured at --speedup_batch_size on this
machine: a bisection over the removal order, each candidate timed). No data is needed; with
--dataset_name the dense and pruned models are evaluated, and --finetune_epochs E fine-tunes the pruned
model on the train split with distillation from the dense one (every TrainingArguments flag applies:
--learning_rate, --per_device_train_batch_size, ...; --distill false for plain cross-entropy). Writes the
model, its image processor and OUTPUT_DIR/results.json (parameters, MACs, latency at batch 1 and 64 with
the thread count, accuracy before and after fine-tuning) and its model card README.md.
--push_to_hub --hub_model_id NAME publishes OUT at the end (repo id and Hub checked before any work).

Second-order structured pruning removes whole heads, MLP neurons and block channels and updates the weights
that stay to make up for them (the OBS update of a group of columns), spending the removals where they cost
least per millisecond (or MAC, or parameter) saved:

  python scripts/structured_prune.py --method obs --model_name_or_path outputs/fmnist-vit-tiny \
      --dataset_name data/fashion-mnist --target_speedup 1.5 --output_dir outputs/obs-1.5x

--method obs uses the layer-wise Hessian of --calibration_samples training images (no labels needed), cap the
empirical Fisher of as many per-image gradients. One of --target_speedup (latency tables of every layer at
--levels widths, timed at --speedup_batch_size; the built model is measured and the search tightened when it
falls short), --flops_ratio or --params_ratio. Residual streams are pruned too (a stream channel's error is the
sum over the layers that read it; --uncoupled_only keeps them whole), except a ViT's, which passes through
LayerNorms.

A backbone without a head (DINO's ViTModel, a Dinov2Model, a ResNetModel: a checkpoint saved without
*ForImageClassification) is pruned as it is, without labels (obs: the Hessian of the layers' inputs; cap: the
Fisher of its CLS features) and judged by a weighted k-NN (bank: --knn_bank_split, default the train split), a
linear probe and the cosine of its features to the dense model's (their linear CKA where the output width
changed); labels are used only there. A backbone is not fine-tuned here.

With --dataset_name, every method that keeps trained weights then refits the pruned model's layers, one after
the other in the order the model runs them, to reproduce the dense model's layer outputs on
--reconstruction_samples training images (512; least squares, no labels; 0 turns it off), and, if asked,
re-estimates its batch-norm statistics on --bn_recalibration_samples training images (default 0: after the
refit it only lowered top-1 in the benchmarks): results.json keeps the accuracy before each under
reconstruction and bn_recalibration.

Pruning from Scratch needs no trained model, only its config (a folder or Hub id with config.json and
preprocessor_config.json; weights, if any, are used for the dense accuracy and as the distillation teacher):

  python scripts/structured_prune.py --method pfs --model_name_or_path outputs/fmnist-resnet \
      --dataset_name data/fashion-mnist --flops_ratio 0.5 --gate_epochs 10 --train_epochs 5 --output_dir OUT

learns channel gates on a x--expand_ratio network with random frozen weights (--gate_lr, --gate_lambda,
--gate_sparsity; --gate_val_fraction of the train split chooses the gates), keeps the globally highest
gates within --flops_ratio of the original model's FLOPs, and trains that architecture from scratch for
--train_epochs (x 1/flops_ratio with --budget_train), distilling from the trained model or
--teacher_name_or_path when there is one. --method uniform trains the same expanded network with every
gated width scaled by one factor to the same FLOPs (the baseline that shows whether the widths matter).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageClassification

from cap_hf.cli.backbone import FeatureEvalArguments, backbone_evaluator
from cap_hf.cli.parser import parse_args, run
from cap_hf.engine.feature_fisher import FeatureFisherLoss
from cap_hf.evaluation.features import is_backbone
from cap_hf.evaluation.metrics import evaluate_accuracy
from cap_hf.io.checkpoint import CheckpointError
from cap_hf.io.data import calibration_loader, collate
from cap_hf.io.hub import HubError, check_push, push_checkpoint
from cap_hf.io.models import load_classifier, load_image_processor, load_model, processor_image_size
from cap_hf.io.sources import check_sources
from cap_hf.io.stream import StreamArguments, is_stream
from cap_hf.structured import (
    StructuredConfig,
    pfs,
    prune_channels,
    prune_second_order,
    recalibrate_batch_norms,
    reconstruct,
)
from cap_hf.structured.config import describe_target, judge_target
from cap_hf.structured.groups import check_supported
from cap_hf.structured.measure import compare_models
from cap_hf.trainer import DistillationArguments, fine_tune
from model_cards import write_model_card

logger = logging.getLogger("cap_hf.scripts.structured_prune")

# this script's defaults for Trainer flags (a short fine-tuning of a small model; every flag can be given)
TRAINING_DEFAULTS = {"learning_rate": 5e-4, "weight_decay": 0.05, "per_device_train_batch_size": 128,
                     "per_device_eval_batch_size": 256, "save_strategy": "no", "report_to": "none"}


@dataclass
class StructuredArguments:
    model_name_or_path: str = field(metadata={
        "help": "Hub id or folder of an image classifier or a backbone (ResNet, ViT / DeiT / DINO, DINOv2)."})
    reconstruction_samples: int = field(default=512, metadata={
        "help": "With --dataset_name, for methods that keep trained weights: refit every convolution and linear "
                "layer of the pruned model, in the order the model runs them, to the dense model's outputs of the "
                "same layer on this many training images (least squares on the pruned model's own inputs, no labels; "
                "all of the split when smaller); 0 turns it off. Runs before the batch-norm re-estimation."})
    bn_recalibration_samples: int = field(default=0, metadata={
        "help": "With --dataset_name, for methods that keep trained weights: re-estimate the batch norms' running "
                "statistics of the pruned model on this many training images (no labels, no weight trained; all of "
                "the split when smaller); 0 (the default) leaves them. Off by default because after the "
                "reconstruction it lowered top-1 in 10 of 11 benchmark rows; with --reconstruction_samples 0 it helps "
                "(docs/benchmarks.md). Models without batch norms (ViTs) are unchanged."})
    dataset_name: str | None = field(default=None, metadata={"help": "Evaluate dense and pruned on its eval split."})
    image_column_name: str = field(default="image")
    label_column_name: str = field(default="label")
    eval_split: str | None = field(default=None, metadata={"help": "Default: validation, else test."})
    max_eval_samples: int | None = field(default=None)
    eval_batch_size: int = field(default=256)
    finetune_epochs: float = field(default=0, metadata={
        "help": "Epochs of fine-tuning after pruning, with distillation from the dense model (needs --dataset_name)."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Use a subset of the train split (fine-tuning; for pfs the gates and the training)."})
    train_epochs: float = field(default=0, metadata={
        "help": "pfs / uniform: epochs of training the found architecture from scratch (required)."})
    budget_train: bool = field(default=False, metadata={
        "help": "pfs / uniform: train for --train_epochs / --flops_ratio epochs (the paper's Scratch-B budget)."})
    expand_ratio: float = field(default=pfs.EXPAND_RATIO, metadata={"help": "pfs: width of the searched network."})
    stream_expand_ratio: float | None = field(default=None, metadata={
        "help": "pfs / uniform on a ResNet: width of the stem and residual streams, never gated (default: "
                "--expand_ratio, as the paper's CIFAR ResNets; 1 keeps the original's, so all FLOPs go to the blocks)."})
    gate_epochs: int = field(default=pfs.GATE_EPOCHS, metadata={"help": "pfs: epochs of gate learning."})
    gate_lr: float = field(default=pfs.GATE_LR, metadata={"help": "pfs: Adam learning rate of the gates."})
    gate_lambda: float = field(default=pfs.GATE_LAMBDA, metadata={
        "help": "pfs: weight of the sparsity term (mean|gate| - r)^2 (the paper: 0.5 on CIFAR, 0.05 on ImageNet)."})
    gate_sparsity: float = field(default=pfs.GATE_SPARSITY, metadata={
        "help": "pfs: r, the mean gate aimed at (the paper: 0.2 on CIFAR, 0.5 on ImageNet)."})
    gate_batch_size: int = field(default=128, metadata={"help": "pfs: batch size of gate learning."})
    gate_val_fraction: float = field(default=0.1, metadata={
        "help": "pfs: fraction of the train split held out to choose the gates (the paper's rule)."})
    image_size: int | None = field(default=None, metadata={"help": "Input size (default: the image processor's)."})
    latency_batch_sizes: str = field(default="1,64", metadata={"help": "Batch sizes of the reported latencies."})
    latency_repeats: int = field(default=30, metadata={"help": "Timed forward passes per reported latency."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


def check_arguments(args: StructuredArguments, config: StructuredConfig, stream: StreamArguments | None = None,
                    training_args: DistillationArguments | None = None) -> None:
    """ValueError for a request that cannot be run, before anything is loaded: the request's own checks
    (StructuredConfig.check), then what this script adds (data, training, a stream's rules)."""
    config.check()
    if stream is not None and stream.streaming:
        stream.check()
        if config.kind == "scratch":
            raise ValueError(f"--method {config.method} holds out part of the train split to learn its gates and "
                             "trains for epochs; a stream has neither. Run it without --streaming.")
        if args.finetune_epochs:
            raise ValueError("A stream has no epochs: fine-tune a streamed run with --max_steps N instead of "
                             "--finetune_epochs.")
        if training_args is not None and training_args.max_steps > 0:
            training_args.check_stream()
    if args.finetune_epochs < 0 or args.train_epochs < 0:
        raise ValueError("--finetune_epochs and --train_epochs must be >= 0.")
    for name in ("reconstruction_samples", "bn_recalibration_samples"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0 (0 turns it off), got {getattr(args, name)}.")
    if config.kind != "scratch" and (args.train_epochs or args.budget_train):
        raise ValueError(f"--train_epochs / --budget_train are for pfs and uniform; {config.method} fine-tunes "
                         "with --finetune_epochs.")
    if config.kind == "second_order" and not args.dataset_name:
        raise ValueError(f"--method {config.method} needs calibration images: give --dataset_name (its train split).")
    if config.kind == "channels" and args.finetune_epochs and not args.dataset_name:
        raise ValueError("--finetune_epochs needs --dataset_name (its train split).")
    if config.kind != "scratch":
        return
    if not args.dataset_name or not args.train_epochs:
        raise ValueError(f"--method {config.method} trains the architecture from scratch: give --dataset_name and "
                         "--train_epochs.")
    if args.finetune_epochs or config.uncoupled_only:
        raise ValueError(f"--finetune_epochs / --uncoupled_only do not apply to --method {config.method}.")
    if not 0 < args.gate_val_fraction < 1:
        raise ValueError(f"--gate_val_fraction must be in (0, 1), got {args.gate_val_fraction}.")
    pfs.check_gate_arguments(args.expand_ratio, args.gate_epochs, args.gate_lr, args.gate_lambda, args.gate_sparsity,
                             args.stream_expand_ratio)


def load_dense(args: StructuredArguments, config: StructuredConfig):
    """(model in eval mode, image processor, trained): the model as it was saved (a classifier, or a backbone
    such as DINO's ViTModel or a Dinov2Model); for pfs / uniform a folder with only a config is enough (the model
    is then the config's classifier, randomly initialised, and not trained)."""
    if config.kind != "scratch":
        model, processor = load_model(args.model_name_or_path)
        return model.eval(), processor, True
    processor = load_image_processor(args.model_name_or_path)
    try:
        return AutoModelForImageClassification.from_pretrained(args.model_name_or_path).eval(), processor, True
    except OSError:  # no weights: the config alone
        model_config = AutoConfig.from_pretrained(args.model_name_or_path)
        return AutoModelForImageClassification.from_config(model_config).eval(), processor, False


def batches(dataset, batch_size: int, seed: int, workers: int, shuffle: bool = False):
    """An epoch of batches per call (a new shuffle each epoch, fixed by the seed)."""
    generator = torch.Generator().manual_seed(seed)
    return lambda: torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                                               num_workers=workers, generator=generator)


def search_from_scratch(args, config, model, image_size, train, training_args) -> tuple[torch.nn.Module, dict]:
    """pfs: gates on the expanded network, then the architecture; uniform: the same expanded network with its
    gated widths scaled alike. The model returned has random weights."""
    if config.method == "uniform":
        start = time.perf_counter()
        small, achieved = pfs.uniform_architecture(model.config, image_size, config.flops_ratio, args.expand_ratio,
                                                   args.stream_expand_ratio, seed=training_args.seed)
        return small, {"flops_ratio_achieved": achieved, "search_seconds": time.perf_counter() - start,
                       "expand_ratio": args.expand_ratio, "stream_expand_ratio": args.stream_expand_ratio}
    parts = train.train_test_split(test_size=args.gate_val_fraction, seed=training_args.seed)
    workers = training_args.dataloader_num_workers
    small, run = pfs.prune_from_scratch(
        model.config, image_size, config.flops_ratio,
        batches(parts["train"], args.gate_batch_size, training_args.seed, workers, shuffle=True),
        batches(parts["test"], args.eval_batch_size, training_args.seed, workers), expand_ratio=args.expand_ratio,
        gate_epochs=args.gate_epochs, gate_lr=args.gate_lr, gate_lambda=args.gate_lambda,
        gate_sparsity=args.gate_sparsity, stream_ratio=args.stream_expand_ratio, seed=training_args.seed,
        device="cuda" if torch.cuda.is_available() else "cpu")
    small = small.to(next(model.parameters()).device)  # measured next to the dense model, on its device
    results = run.results()
    results["gates"].update(train_samples=len(parts["train"]), val_samples=len(parts["test"]))
    return small, results


def check_backbone(args: StructuredArguments, config: StructuredConfig) -> None:
    """ValueError for what a backbone (no classification head) cannot be given."""
    if config.kind == "scratch":
        raise ValueError(f"--method {config.method} trains a classifier from scratch; {args.model_name_or_path} is a "
                         "backbone without a head. Use obs, cap, dfpc, l1 or random.")
    if args.finetune_epochs:
        raise ValueError(f"{args.model_name_or_path} is a backbone without a head: --finetune_epochs needs a "
                         "classifier. Prune the backbone alone (its k-NN accuracy and features are reported), or "
                         "prune a *ForImageClassification checkpoint.")


def prune_with_curvature(config, model, image_size, train, training_args) -> tuple[torch.nn.Module, dict]:
    """obs / cap on calibration images of the train split (eval transforms, a fixed shuffle). A backbone's cap
    Fisher is that of its CLS features (cap_hf.engine.feature_fisher.FeatureFisherLoss: no labels)."""
    if not is_stream(train) and len(train) < config.calibration_samples:  # a stream says so when it runs out
        raise ValueError(f"--calibration_samples {config.calibration_samples} is more than the {len(train)} images of the "
                         "train split; lower it or use a larger split.")
    batch_size = 64 if config.method == "obs" else 1  # cap: one gradient per image
    loader = calibration_loader(train, batch_size, training_args.seed,
                                num_workers=training_args.dataloader_num_workers)
    small, run = prune_second_order(
        model, image_size, loader, config,
        loss_fn=FeatureFisherLoss("cls", seed=training_args.seed) if is_backbone(model) else None,
        seed=training_args.seed)
    return small, run


def main(argv: list[str] | None = None, hub_api=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cap_hf").setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, config, feature_args, training_args, stream = parse_args(
            (StructuredArguments, StructuredConfig, FeatureEvalArguments, DistillationArguments, StreamArguments), argv,
            TRAINING_DEFAULTS, description=__doc__, prog="python scripts/structured_prune.py")
        check_arguments(args, config, stream, training_args)
        batch_sizes = [int(b) for b in args.latency_batch_sizes.split(",") if b.strip()]
        if config.target_speedup is not None and config.speedup_batch_size not in batch_sizes:
            batch_sizes.append(config.speedup_batch_size)  # the final measurement says whether the target holds
        out = Path(training_args.output_dir)
        if out.exists() and any(out.iterdir()) and not args.overwrite_output_dir:
            raise ValueError(f"{out} is not empty (another run?); pass --overwrite_output_dir to replace it.")
        repo_id = check_push(training_args, hub_api)
        check_sources(model=args.model_name_or_path, dataset=args.dataset_name,
                      teacher=training_args.teacher_name_or_path if training_args.distill else None)
    except (ValueError, HubError) as err:
        raise SystemExit(f"error: {err}") from None
    scratch = config.kind == "scratch"

    try:
        model, processor, trained = load_dense(args, config)
        check_supported(model)
        backbone = is_backbone(model)
        if backbone:
            check_backbone(args, config)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    image_size = (args.image_size, args.image_size) if args.image_size else processor_image_size(processor)
    train = evaluation = loader = None
    if args.dataset_name:
        try:
            train, evaluation, names = stream.splits(
                args.dataset_name, processor, model.config.num_channels, image_column=args.image_column_name,
                label_column=args.label_column_name, eval_split=args.eval_split,
                max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
                train_needs_labels=bool(args.finetune_epochs) or scratch or (config.method == "cap" and not backbone),
                eval_needs_labels=not backbone, seed=training_args.seed,
                rank=training_args.process_index, world=training_args.world_size)
            if backbone:  # k-NN, linear probe and feature similarity against the dense model (labels only here)
                evaluate = backbone_evaluator(
                    model, processor, args.dataset_name, evaluation, feature_args, image_column=args.image_column_name,
                    label_column=args.label_column_name, eval_split=args.eval_split, seed=training_args.seed,
                    batch_size=args.eval_batch_size, num_workers=training_args.dataloader_num_workers, stream=stream)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: {err}") from None
        loader = torch.utils.data.DataLoader(evaluation, batch_size=args.eval_batch_size, collate_fn=collate,
                                             num_workers=training_args.dataloader_num_workers)
        if not backbone:
            evaluate = lambda m: {"accuracy": evaluate_accuracy(m, loader)}  # noqa: E731
        if scratch and names is not None and len(names) != model.config.num_labels:
            logger.info("%s has %d classes, the config %d: the architecture is trained for the data's.",
                        args.dataset_name, len(names), model.config.num_labels)
            model.config.num_labels = len(names)
            model.config.id2label, model.config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
            model, trained = AutoModelForImageClassification.from_config(model.config).eval(), False

    try:
        if scratch:
            small, results = search_from_scratch(args, config, model, image_size, train, training_args)
        elif config.kind == "second_order":
            small, run = prune_with_curvature(config, model, image_size, train, training_args)
            results = run.results()
        else:
            small, run = prune_channels(model, image_size, config, seed=training_args.seed)
            results = run.results()
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    results = {"method": config.method, "uncoupled_only": config.uncoupled_only, "model": args.model_name_or_path,
               "image_size": list(image_size), **results,
               "latency": {"device": str(next(model.parameters()).device), "threads": torch.get_num_threads(),
                           "repeats": args.latency_repeats,
                           "statistic": "median of one forward pass, dense and pruned taking turns"}}
    if loader is not None and trained:
        results.update(_evaluation(evaluate(model), "dense"))
    if loader is not None and not scratch:
        results.update(_evaluation(evaluate(small), "pruned"))
        if args.reconstruction_samples:
            images = capped(args.reconstruction_samples, train)
            record = reconstruct(model, small, run, image_size, calibration_loader(train, 64, training_args.seed), images)
            results["reconstruction"] = {**record, "accuracy_before": results["accuracy_pruned"]}
            results.update(_evaluation(evaluate(small), "pruned"))
        if args.bn_recalibration_samples:
            images = capped(args.bn_recalibration_samples, train)
            norms = recalibrate_batch_norms(small, calibration_loader(train, 64, training_args.seed), images)
            if norms:
                results["bn_recalibration"] = {"images": images, "batch_norms": norms,
                                               "accuracy_before": results["accuracy_pruned"]}
                results.update(_evaluation(evaluate(small), "pruned"))
    epochs = args.train_epochs / config.flops_ratio if args.budget_train else args.train_epochs or args.finetune_epochs
    if epochs or (stream.streaming and training_args.max_steps > 0):
        training_args.num_train_epochs = epochs or training_args.num_train_epochs
        teacher = model if trained else None
        if training_args.distill and training_args.teacher_name_or_path:
            teacher = load_classifier(training_args.teacher_name_or_path)[0].eval()
        training_args.distill = training_args.distill and teacher is not None
        small, metrics = fine_tune(small, teacher, training_args, train, evaluation)
        if not scratch:
            results["accuracy_pruned_before_finetuning"] = results["accuracy_pruned"]
        results.update(_evaluation(evaluate(small), "pruned"))
        results["training" if scratch else "finetuning"] = {
            "epochs": epochs, "train_samples": available(train), "distill": training_args.distill,
            "max_steps": training_args.max_steps if training_args.max_steps > 0 else None,
            "learning_rate": training_args.learning_rate,
            "teacher": (training_args.teacher_name_or_path or args.model_name_or_path) if training_args.distill else None,
            "train_runtime_s": metrics.get("train_runtime")}
    results.update(compare_models(model, small, image_size, batch_sizes, args.latency_repeats))
    results.update(judge_target(config, results))

    out.mkdir(parents=True, exist_ok=True)
    small.save_pretrained(out)
    processor.save_pretrained(out)
    results["command"] = " ".join(["python", "scripts/structured_prune.py", *argv])
    results["arguments"] = {**asdict(args), **asdict(config)}
    results["training_arguments"] = training_args.to_dict()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_model_card(out, repo_id=repo_id)  # README.md from results.json, with the chart of channels kept per group
    line = ", ".join(f"batch {b}: {results['latency_ms_dense'][str(b)]:.2f} -> {results['latency_ms_pruned'][str(b)]:.2f} ms "
                     f"({results['speedup'][str(b)]:.2f}x)" for b in batch_sizes)
    what = f"MACs ratio {results['macs_pruned'] / results['macs_dense']:.3f}" if scratch else \
        f"removed {results['removed_channels']}/{results['prunable_channels']} channels"
    print(f"{config.method}: {what}; params {results['params_dense']} -> {results['params_pruned']}, MACs "
          f"{results['macs_dense']} -> {results['macs_pruned']}; {line}")
    print(f"target {'met' if results['target_met'] else 'MISSED'}: {describe_target(results['target'])}")
    if loader is not None:
        steps = [f"{_pct(results[key]['accuracy_before'])} before {what}" for key, what in
                 (("reconstruction", "the layers were refitted"), ("bn_recalibration", "the batch norms were re-estimated"))
                 if key in results]
        if "accuracy_pruned_before_finetuning" in results:
            steps.append(f"{_pct(results['accuracy_pruned_before_finetuning'])} before fine-tuning")
        similarity = {k: v for k, v in (results.get("features_pruned") or {}).items() if k.startswith("feature_")}
        print(f"{'k-NN top-1' if backbone else 'top-1'} {_pct(results.get('accuracy_dense'))} -> "
              f"{_pct(results.get('accuracy_pruned'))}" + (f" ({'; '.join(steps)})" if steps else "")
              + "".join(f", {k.replace('_', ' ')} {v:.4f}" for k, v in similarity.items()) + f"; model in {out}")
    if repo_id:
        try:
            info = push_checkpoint(out, repo_id, private=training_args.hub_private_repo,
                                   revision=training_args.hub_revision, token=training_args.hub_token, api=hub_api)
        except (HubError, CheckpointError) as err:
            raise SystemExit(f"error: {err}\nThe pruned model is saved in {out}; publish it with "
                             f"`python scripts/push_to_hub.py {out} --repo_id {repo_id}` (running this command again "
                             "would prune again).") from None
        print(f"pushed {out} -> {getattr(info, 'commit_url', repo_id)}")
    return results


def available(train) -> int | None:
    """Images of a split held in memory; None for a stream (its length is unknown)."""
    return None if is_stream(train) else len(train)


def capped(count: int, train) -> int:
    """`count` images, or all of a smaller split held in memory (a stream is read for `count`)."""
    return count if is_stream(train) else min(count, len(train))


def _evaluation(metrics: dict, which: str) -> dict:
    """results.json's keys of one evaluation: a classifier's accuracy_<which>; a backbone's features_<which> (k-NN,
    probe, feature similarity) with its k-NN top-1 as accuracy_<which> (None without labels)."""
    if set(metrics) == {"accuracy"}:
        return {f"accuracy_{which}": metrics["accuracy"]}
    return {f"features_{which}": metrics, f"accuracy_{which}": metrics.get("knn_accuracy")}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


if __name__ == "__main__":
    run(main)
