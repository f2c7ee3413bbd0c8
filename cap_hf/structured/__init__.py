"""Structured pruning: whole channels, heads and neurons removed into physically smaller models.

- groups.py: channel groups (coupled residual streams and uncoupled block channels) read off the model
  by Torch-Pruning's DependencyGraph; physical removal; export into cap_hf.modeling classes
- criteria/: the channel criteria of a trained model, one file each (dfpc.py: DFPC's data-free saliency, BGSC;
  l1.py; random.py), each registering itself; registry.py: every structured method's name, kind, title, citation
- order.py: the global greedy order (scores once, normalised across groups, lowest first) and removal plans
- config.py: StructuredConfig, the request of a run declared once (the library's argument, the script's flags),
  its checks and the judgement of its target on the built model
- channels.py: one run (a pruning ratio, or the fewest channels that reach a FLOPs ratio or a measured speed-up)
- measure.py: parameters, MACs and latency
- second_order.py: heads, neurons and block channels removed with second-order compensation (greedy.py: the
  per-layer kernel; curvature.py: Hessian / Fisher of each reader's input; allocate.py: cost tables and the search)
- reconstruct.py: the pruned model's layers refitted one after the other to the dense model's layer outputs
  (least squares on unlabelled calibration images)
- recalibrate.py: batch-norm statistics re-estimated on the pruned model from unlabelled images
- shrink.py: keep given heads / neurons / block channels (explicit choices, no scores)
- pfs.py: Pruning from Scratch (gates on an expanded random network, an architecture under a FLOPs target)
"""

from cap_hf.structured import pfs
from cap_hf.structured.channels import ChannelPruning, prune_channels
from cap_hf.structured.config import StructuredConfig
from cap_hf.structured.groups import ChannelGraph, ChannelGroup, remove_channels
from cap_hf.structured.recalibrate import recalibrate_batch_norms
from cap_hf.structured.reconstruct import reconstruct
from cap_hf.structured.second_order import SecondOrderPruning, prune_second_order
from cap_hf.structured.shrink import shrink_resnet, shrink_vit

__all__ = ["pfs", "StructuredConfig", "ChannelGraph", "ChannelGroup", "ChannelPruning", "SecondOrderPruning", "prune_channels",
           "prune_second_order", "recalibrate_batch_norms", "reconstruct", "remove_channels", "shrink_resnet", "shrink_vit"]
