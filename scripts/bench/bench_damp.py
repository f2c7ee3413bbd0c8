"""Benchmark: the Fisher dampening of one-shot CAP and OBS, swept, on the Fashion-MNIST ViT and ResNet.

  OMP_NUM_THREADS=2 python scripts/bench/bench_damp.py

For each model (trained first by scripts/train_dense.py when missing) and each number of Fisher gradients
(fewer than the block size B and more), one Pruner per dampening prepares OBS and CAP together (one
gradient pass, fp32, the default 'inverse' accumulation) and prunes copies to each sparsity; accuracy on
the whole test split. Dampenings: absolute (--damp, the paper's form) and relative (--relative_damp, a
fraction of each layer's mean Fisher diagonal). Writes docs/benchmarks.md (section "Dampening") and the
records to OUTPUT_DIR/results.json (kept between runs: --render_only rewrites the section from them).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass

import torch
from benchlib import (
    RESNET_TEACHER,
    ROOT,
    VIT_TEACHER,
    command_line,
    machine,
    parse_bench,
    prepare_teacher,
    write_section,
)

from cap_hf.config import PruningConfig
from cap_hf.engine.pruner import Pruner
from cap_hf.evaluation.metrics import evaluate_accuracy
from cap_hf.io.data import calibration_loader, collate, prepare_splits
from cap_hf.io.models import load_classifier

SECTION = "## Dampening: one-shot CAP and OBS, swept"
MODELS = {"vit": ("outputs/fmnist-vit-tiny", VIT_TEACHER), "resnet": ("outputs/fmnist-resnet", RESNET_TEACHER)}


@dataclass
class BenchDamp:
    data_dir: str = "data/fashion-mnist"
    models: str = "resnet,vit"
    methods: str = "obs,cap"
    sparsities: str = "0.75,0.9"
    num_grads: str = "128,512"  # fewer gradients than B=192, and more
    grad_batch_size: int = 32
    fisher_block_size: int = 192
    absolute: str = "1e-9,1e-8,1e-7,1e-6"
    relative: str = "1e-3,1e-2,1e-1,1"
    teacher_epochs: int = 5
    output_dir: str = "outputs/bench-damp"
    render_only: bool = False
    no_write: bool = False


class FallbackCounter(logging.Handler):
    """Counts the Fisher blocks that needed more dampening than asked (cap_hf.engine.fisher.invert_spd's warning)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "not positive definite" in record.getMessage():
            self.count += 1


def settings(args: BenchDamp) -> list[dict]:
    return ([{"damp": float(v)} for v in args.absolute.split(",") if v]
            + [{"relative_damp": float(v)} for v in args.relative.split(",") if v])


def label(setting: dict, methods: list[str], num_grads: int, block_size: int) -> str:
    """'absolute 1e-07 (obs default)': the setting, and which methods take it when the recipe gives none
    (PruningConfig.dampening: the default depends on the number of gradients)."""
    text = f"absolute {setting['damp']:g}" if "damp" in setting else f"relative {setting['relative_damp']:g}"
    default = [m for m in methods if {k: v for k, v in PruningConfig(
        method=m, num_grads=num_grads, fisher_block_size=block_size).dampening.items() if v is not None} == setting]
    return text + (f" ({', '.join(default)} default)" if default else "")


def sweep_model(args: BenchDamp, arch: str, records: list[dict]) -> None:
    teacher_dir, teacher = MODELS[arch]
    prepare_teacher(args.data_dir, teacher_dir, teacher, args.teacher_epochs)
    model, processor = load_classifier(str(ROOT / teacher_dir))
    model.eval()
    train, test, _ = prepare_splits(str(ROOT / args.data_dir), processor, model.config.num_channels)
    loader = torch.utils.data.DataLoader(test, batch_size=256, collate_fn=collate)
    dense = evaluate_accuracy(model, loader)
    methods = args.methods.split(",")
    levels = [float(s) for s in args.sparsities.split(",")]
    with Pruner(model, PruningConfig(method="magnitude")) as pruner:  # the baseline without a Fisher
        pruner.prepare()
        for level in levels:
            pruned = copy.deepcopy(model)
            pruner.apply(level, model=pruned)
            records.append({"model": arch, "dense": dense, "method": "magnitude", "sparsity": level,
                            "accuracy": evaluate_accuracy(pruned, loader)})
    counter = FallbackCounter()
    logging.getLogger("cap_hf.engine.fisher").addHandler(counter)
    save = (ROOT / args.output_dir / "results.json").write_text
    save(json.dumps(records, indent=1))
    for num_grads in (int(n) for n in args.num_grads.split(",") if n):
        for setting in settings(args):
            config = PruningConfig(num_grads=num_grads, grad_batch_size=args.grad_batch_size,
                                   fisher_block_size=args.fisher_block_size, calibration_seed=0, **setting)
            base = {"model": arch, "dense": dense, "num_grads": num_grads,
                    "setting": label(setting, methods, num_grads, args.fisher_block_size), **setting}
            counter.count = 0
            start = time.perf_counter()
            try:
                with Pruner(model, config, methods) as pruner:
                    pruner.prepare(calibration_loader(train, args.grad_batch_size, 0))
                    for method in methods:
                        for level in levels:
                            pruned = copy.deepcopy(model)
                            pruner.apply(level, method, model=pruned)
                            records.append({**base, "method": method, "sparsity": level,
                                            "accuracy": evaluate_accuracy(pruned, loader),
                                            "damp_range": [min(pruner.damps[method].values()),
                                                           max(pruner.damps[method].values())],
                                            "fallback_blocks": counter.count})
                            print(records[-1], flush=True)
            except FloatingPointError as err:  # the inverse lost positive definiteness: no result at this value
                records.append({**base, "method": "all", "error": str(err)})
                print(records[-1], flush=True)
            records[-1]["seconds"] = time.perf_counter() - start
            save(json.dumps(records, indent=1))
    logging.getLogger("cap_hf.engine.fisher").removeHandler(counter)


def named(record: dict, args: BenchDamp) -> str:
    """A record's row label, from its dampening (labels of earlier runs are not trusted: defaults move)."""
    setting = {key: record[key] for key in ("damp", "relative_damp") if key in record}
    return label(setting, args.methods.split(","), record["num_grads"], args.fisher_block_size)


def render(args: BenchDamp, records: list[dict], wall: float | None, command: str) -> str:
    methods = args.methods.split(",")
    lines = [SECTION, "", f"Command: `{command}`", "",
             f"Machine: {machine()}." + (f" Wall time: {wall:.0f} s." if wall else ""), "",
             f"One-shot pruning of the Fashion-MNIST teachers (`{MODELS['vit'][0]}`: ViT 6x192; `{MODELS['resnet'][0]}`: "
             f"bottleneck ResNet), {args.grad_batch_size} training images per gradient, B={args.fisher_block_size}, "
             "fp32, the default 'inverse' accumulation, global selection; OBS and CAP from one Fisher per row; "
             "top-1 (%) on the 10k test images. λ: the smallest and largest dampening a layer got. "
             "non-PD: Fisher blocks that needed more dampening than asked (a failed row would say so).", ""]
    for arch in dict.fromkeys(r["model"] for r in records):
        magnitude = ", ".join(f"{100 * r['sparsity']:.0f}%: {100 * r['accuracy']:.2f}" for r in records
                              if r["model"] == arch and r["method"] == "magnitude")
        for num_grads in dict.fromkeys(r["num_grads"] for r in records if r["model"] == arch and "num_grads" in r):
            rows = [r for r in records if r["model"] == arch and r.get("num_grads") == num_grads]
            cells = [(r["method"], r["sparsity"]) for r in rows if "error" not in r]
            columns = sorted(dict.fromkeys(cells), key=lambda c: (methods.index(c[0]) if c[0] in methods else 99, c[1]))
            lines += [f"**{arch}, {num_grads} gradients** (dense {100 * rows[0]['dense']:.2f}%; magnitude {magnitude}):",
                      "",
                      "| dampening | " + " | ".join(f"{m} {100 * s:.0f}%" for m, s in columns) + " | λ | non-PD |",
                      "|---|" + "---|" * (len(columns) + 2)]
            best = {c: max(r["accuracy"] for r in rows if (r.get("method"), r.get("sparsity")) == c) for c in columns}
            for setting in dict.fromkeys(named(r, args) for r in rows):
                mine = {(r.get("method"), r.get("sparsity")): r for r in rows if named(r, args) == setting}
                if any("error" in r for r in mine.values()):
                    lines.append(f"| {setting} | failed: inverse not positive definite |" + " |" * (len(columns) + 1))
                    continue
                acc = [mine[c]["accuracy"] for c in columns]
                text = [f"**{100 * a:.2f}**" if a == best[c] else f"{100 * a:.2f}" for a, c in zip(acc, columns,
                                                                                                    strict=True)]
                first = next(iter(mine.values()))
                lines.append(f"| {setting} | " + " | ".join(text) + f" | {first['damp_range'][0]:.1e} .. "
                             f"{first['damp_range'][1]:.1e} | {first['fallback_blocks']} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    args, _ = parse_bench(BenchDamp)
    out = ROOT / args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    wall = None
    if args.render_only:
        records = json.loads((out / "results.json").read_text())
        run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        wall, command = run.get("wall_seconds"), run.get("command", "(not recorded)")
    else:
        records = []
        start = time.perf_counter()
        for arch in args.models.split(","):
            sweep_model(args, arch, records)
        wall = time.perf_counter() - start
        command = command_line("bench_damp.py")
        (out / "run.json").write_text(json.dumps({"wall_seconds": wall, "command": command}))
    body = render(args, records, wall, command)
    print(body)
    if not args.no_write:
        write_section(body, SECTION)


if __name__ == "__main__":
    main()
