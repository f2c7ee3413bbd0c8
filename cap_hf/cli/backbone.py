"""What the scripts use to judge a backbone: the flags (FeatureEvalArguments) and a FeatureEvaluator with its
k-NN bank loaded from the dataset (backbone_evaluator)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from cap_hf.evaluation.features import FeatureEvaluator

logger = logging.getLogger(__name__)


@dataclass
class FeatureEvalArguments:
    """The flags of a backbone's evaluation (scripts/oneshot.py, scripts/prune.py)."""

    knn_bank_split: str | None = field(default=None, metadata={
        "help": "Backbones: the labelled split whose features form the k-NN bank and train the linear probe "
                "(default: the training split)."})
    max_knn_bank_samples: int | None = field(default=None, metadata={
        "help": "Backbones: a random subset of the bank split of this size (default: all of it, DINO's protocol)."})


def backbone_evaluator(model: nn.Module, processor, dataset_name, evaluation, args: FeatureEvalArguments, *,
                       pooling: str = "cls", image_column: str = "image", label_column: str = "label",
                       eval_split: str | None = None, seed: int = 0, batch_size: int = 256, num_workers: int = 0,
                       device: torch.device | str | None = None, stream=None) -> FeatureEvaluator:
    """A FeatureEvaluator of `model` (dense, as it is now) on the prepared `evaluation` split, with the bank
    from --knn_bank_split (default: the training split) of `dataset_name`. Without labels in the evaluation
    split or the bank, feature cosine alone, and the log says why. With `stream` (StreamArguments, streaming
    on) the bank is a fixed set of --max_knn_bank_samples images (default 10000) read from the stream."""
    from cap_hf.io.data import collate, prepare_splits

    bank = None
    if label_column not in evaluation.column_names:
        logger.warning("The evaluation split has no label column %r: reporting feature cosine alone (k-NN and the "
                       "linear probe need labels).", label_column)
    elif stream is not None and stream.streaming:  # a fixed set: the whole split would be read at every evaluation
        from cap_hf.io.stream import fixed_sample

        bank = fixed_sample(dataset_name, args.knn_bank_split, ("train",), "k-NN bank (--knn_bank_split)", processor,
                            model.config.num_channels, stream, image_column=image_column, label_column=label_column,
                            seed=seed, count=args.max_knn_bank_samples or None)
    else:
        bank, _, _ = prepare_splits(dataset_name, processor, model.config.num_channels, image_column, label_column,
                                    args.knn_bank_split, eval_split, args.max_knn_bank_samples,
                                    train_needs_labels=False, eval_needs_labels=False, seed=seed)
    if bank is not None and label_column not in bank.column_names:
        logger.warning("The k-NN bank split has no label column %r: reporting feature cosine alone; name a labelled "
                       "split with --knn_bank_split.", label_column)
        bank = None

    def loader(data):
        return torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)

    return FeatureEvaluator(model, loader(bank) if bank is not None else None, loader(evaluation), pooling,
                            device=device)

