"""The structured methods, named once: what the script accepts and lists, and what a model card calls and cites.

Three kinds: "channels" (a criterion scores a trained model's channels, then the global greedy order removes the
lowest: one file per criterion in criteria/), "second_order" (obs / cap: removal with compensation, from
calibration data, second_order.py) and "scratch" (an architecture searched and trained from scratch, pfs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from cap_hf.methods.cap import CITATION as CAP
from cap_hf.structured.criteria import CRITERIA

KINDS = ("channels", "second_order", "scratch")


@dataclass(frozen=True)
class StructuredMethod:
    name: str
    kind: str
    title: str  # what the model card calls it
    citation: str  # BibTeX for the card ("" for none)


ZIPLM = """@inproceedings{kurtic2023ziplm,
  title     = {{ZipLM}: Inference-Aware Structured Pruning of Language Models},
  author    = {Kurtic, Eldar and Frantar, Elias and Alistarh, Dan},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2023}
}"""
PFS = """@inproceedings{wang2020pruning,
  title     = {Pruning from Scratch},
  author    = {Wang, Yulong and Zhang, Xiaolu and Xie, Lingxi and Zhou, Jun and Su, Hang and Zhang, Bo and Hu, Xiaolin},
  booktitle = {AAAI Conference on Artificial Intelligence},
  year      = {2020}
}"""

OTHERS = {  # the methods that are not channel criteria
    "obs": StructuredMethod("obs", "second_order", "second-order structured pruning with the layer-wise Hessian "
                            "(ZipLM's OBS update of whole structures)", ZIPLM),
    "cap": StructuredMethod("cap", "second_order", "second-order structured pruning with the empirical Fisher "
                            "(a structured CAP)", ZIPLM + "\n\n" + CAP),
    "pfs": StructuredMethod("pfs", "scratch", "Pruning from Scratch (channel gates learnt on random weights)", PFS),
    "uniform": StructuredMethod("uniform", "scratch", "uniform widths (the Pruning from Scratch baseline)", PFS),
}


def methods() -> dict[str, StructuredMethod]:
    """Every structured method by name: the channel criteria registered so far (criteria.register, from this
    package or outside it), then the second-order and scratch methods."""
    return {**{c.name: StructuredMethod(c.name, "channels", c.title, c.citation) for c in CRITERIA.values()}, **OTHERS}


def names(kind: str) -> tuple[str, ...]:
    """The methods of one kind, in registration order."""
    return tuple(name for name, method in methods().items() if method.kind == kind)


def check_structured_method(method: str) -> None:
    """ValueError naming every structured method when `method` is none of them."""
    if method not in methods():
        channels, second_order, scratch = (", ".join(names(kind)) for kind in KINDS)
        raise ValueError(f"Unknown structured method {method!r}; choose one of {', '.join(methods())} ({channels} score "
                         f"the channels of a trained model; {second_order} remove and compensate with calibration data; "
                         f"{scratch} train an architecture from scratch).")
