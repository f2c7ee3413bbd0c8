"""Pruning methods: one small per-layer kernel per file, found by name (see base.py to add one)."""

from cap_hf.methods.base import (
    ALIASES,
    METHODS,
    Layer,
    PruningMethod,
    canonical_name,
    get_method,
    register_method,
)
from cap_hf.methods.cap import CAP
from cap_hf.methods.fastcap import FastCAP
from cap_hf.methods.magnitude import Magnitude
from cap_hf.methods.obs import OBS

__all__ = ["ALIASES", "CAP", "METHODS", "OBS", "FastCAP", "Layer", "Magnitude", "PruningMethod", "canonical_name",
           "get_method", "register_method"]
