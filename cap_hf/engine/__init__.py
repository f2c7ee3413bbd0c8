"""The unstructured engine: one pruning step from calibration data to new weights.

- pruner.py: Pruner, the one driver of every step (prepare once, apply at each sparsity)
- plan.py: the memory plan (layer groups, where results are kept) under a budget, per process
- fisher.py: gradients, Fisher blocks and their inverses, dampening, the exchange between processes;
  feature_fisher.py: the label-free Fisher of a backbone's features
- calibration.py: calibration batches and their checks; ranks.py: a step shared out over processes
- store.py: per-layer results between prepare and apply; selection.py: masks from scores; memory.py: measuring it
"""
