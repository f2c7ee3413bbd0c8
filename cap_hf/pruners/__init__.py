"""Unstructured pruners behind one interface; `get_pruner(config)` picks one by name."""

from cap_hf.config import PruningConfig
from cap_hf.pruners.base import Pruner
from cap_hf.pruners.cap import CAPPruner
from cap_hf.pruners.fast_cap import FastCAPPruner
from cap_hf.pruners.magnitude import MagnitudePruner
from cap_hf.pruners.obs import OBSPruner

PRUNERS: dict[str, type[Pruner]] = {
    "magnitude": MagnitudePruner,
    "obs": OBSPruner,
    "cap": CAPPruner,
    "fastcap": FastCAPPruner,
}


def get_pruner(config: PruningConfig) -> Pruner:
    return PRUNERS[config.method](config)


__all__ = ["PRUNERS", "CAPPruner", "FastCAPPruner", "MagnitudePruner", "OBSPruner", "Pruner", "get_pruner"]
