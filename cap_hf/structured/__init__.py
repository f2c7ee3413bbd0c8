"""Structured pruning: physical removal of heads, neurons and channels."""

from cap_hf.structured.shrink import shrink_resnet, shrink_vit

__all__ = ["shrink_resnet", "shrink_vit"]
