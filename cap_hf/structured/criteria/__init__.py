"""Channel criteria, one file each (dfpc.py, l1.py, random.py), each registering itself in CRITERIA."""

from cap_hf.structured.criteria import dfpc, l1, random  # noqa: F401  (each file registers its criterion)
from cap_hf.structured.criteria.base import CRITERIA, Criterion, register

__all__ = ["CRITERIA", "Criterion", "register"]
