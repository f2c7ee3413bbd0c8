"""Benchmark: time and peak memory of one pruning step on DeiT-sized models, against a plain reference.

  OMP_NUM_THREADS=1 python scripts/bench_pruning_step.py --arch deit-small --method cap --num_grads 1024 \
      --fisher_block_size 192 --max_memory_gb 8

The model is ViTForImageClassification built from a DeiT config (image 224, patch 16, 12 layers, MLP 4x,
1000 classes) with random weights. One gradient is one real backward pass over --grad_batch_size random
images with random labels.

Part 1 prunes all 72 target layers (q/k/v/o, fc1, fc2) to --sparsity and reports, per phase, the seconds
and the peak memory (process RSS on the CPU; torch.cuda.max_memory_allocated on CUDA). CAP and OBS run
through cap_hf.streaming within --max_memory_gb (layer groups when the Fisher does not fit).

Part 2 (CAP and OBS) runs on a few layers (--ref_layers) both the library's math and a deliberately plain
reference of the same math (cap_hf/reference.py: one Sherman-Morrison update per gradient, starting at
I/damp with the 1/N scaling; greedy elimination over all blocks with all (B+1)*d snapshots kept; one global
threshold), on the same --ref_num_grads real gradients, and compares masks, weights and speed.

Prints the command, the machine and the numbers, saves them to OUTPUT_DIR/<arch>-<method>-B<B>-N<N>.json and
writes a section to docs/benchmarks.md, plus a summary table of every result file in OUTPUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

from cap_hf import PruningConfig, find_targets
from cap_hf.fisher import BlockFisher, choose_block_size, collect_fisher
from cap_hf.masks import sparsity_report
from cap_hf.memory import GB, PhaseProfiler, rss_bytes
from cap_hf.pruners import FastCAPPruner
from cap_hf.pruners.base import select_pruned, weight_blocks
from cap_hf.reference import RankOneFisherInverse, reference_eliminate, reference_obs, reference_select
from cap_hf.streaming import StreamingPruner, eliminate_layer, unpack_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_oneshot import machine, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHS = {"deit-tiny": (192, 3), "deit-small": (384, 6), "deit-base": (768, 12)}
PHASES = ["plan", "gradients", "fisher", "inversion", "elimination", "offload", "selection", "write-back"]
PHASE_NOTES = {
    "plan": "cheap checks, then one probe forward+backward to measure activations",
    "gradients": "forward + backward + masking/stacking, all layer groups",
    "fisher": "Fisher build: F^-1 updated 16 gradients at a time (Woodbury; 'inverse') or sums (one baddbmm per "
              "chunk; 'sum')",
    "inversion": "nothing with 'inverse' accumulation; batched Cholesky in place with 'sum'",
    "elimination": "greedy OBS elimination, chunks of blocks, with packing of the snapshots",
    "offload": "writing packed snapshots (or OBS inverses) to memory or disk",
    "selection": "global threshold over all scores",
    "write-back": "reading the snapshots back, writing the weights",
}
FASTCAP_NOTES = {
    "fisher": "sum of each layer's shared B x B Fisher (one matmul per chunk of gradients)",
    "inversion": "FastCAP prepare: one B x B Cholesky per layer",
    "elimination": "column sweep (SparseGPT-style) and write-back",
}


def build_model(arch: str, seed: int) -> ViTForImageClassification:
    hidden, heads = ARCHS[arch]
    config = ViTConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden,
                       num_hidden_layers=12, image_size=224, patch_size=16, num_channels=3, num_labels=1000)
    torch.manual_seed(seed)
    return ViTForImageClassification(config).eval()


class RandomImages:
    """num batches of random 224x224 RGB images and labels; the same batches every time it is iterated."""

    def __init__(self, num: int, batch_size: int, seed: int):
        self.num, self.batch_size, self.seed = num, batch_size, seed

    def __len__(self) -> int:
        return self.num

    def __iter__(self):
        for i in range(self.num):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            yield {"pixel_values": torch.randn(self.batch_size, 3, 224, 224, generator=gen),
                   "labels": torch.randint(0, 1000, (self.batch_size,), generator=gen)}


def run_step(args, device: torch.device) -> dict:
    """Part 1: one pruning step of the whole model, per-phase seconds and peak memory."""
    model = build_model(args.arch, args.seed).to(device)
    targets = find_targets(model)
    numel = sum(m.weight.numel() for m in targets.values())
    batches = RandomImages(args.num_grads, args.grad_batch_size, args.seed)
    cfg = PruningConfig(method=args.method, sparsity=args.sparsity, num_grads=args.num_grads,
                        grad_batch_size=args.grad_batch_size, fisher_block_size=args.fisher_block_size,
                        damp=args.damp, grad_chunk_size=args.grad_chunk_size,
                        elimination_chunk_size=args.elimination_chunk_size, max_memory_gb=args.max_memory_gb,
                        offload_dir=args.offload_dir, fisher_accumulation=args.fisher_accumulation)
    base = rss_bytes()
    profiler = PhaseProfiler(device=str(device))
    plan = None
    start = time.perf_counter()
    try:
        if args.method in ("cap", "obs"):
            with StreamingPruner(cfg, profiler) as pruner:
                plan = pruner.prepare(model, targets, batches, progress=args.progress)
                pruner.apply(targets, args.sparsity)
        else:
            fisher = collect_fisher(model, targets, batches, args.num_grads, args.fisher_block_size, kinds=("shared",),
                                    grad_chunk_size=args.grad_chunk_size, device=device, profiler=profiler,
                                    progress=args.progress)["shared"]
            pruner = FastCAPPruner(cfg)
            with profiler.phase("inversion"):
                pruner.prepare(targets, fisher)
            with profiler.phase("elimination"):  # the column sweep and the write-back
                pruner.apply(targets, args.sparsity)
        total = time.perf_counter() - start
        peak = profiler.overall_peak_bytes
    finally:
        profiler.close()
    report = sparsity_report(targets)
    result = {"phases": profiler.summary(), "total_seconds": total, "peak_gb": peak / GB, "base_rss_gb": base / GB,
              "target_weights": numel, "achieved_sparsity": report.overall}
    if device.type == "cuda":
        result["cuda_peak_gb"] = max(s["peak_gb"] for s in result["phases"].values())
    if plan is not None:
        result["plan"] = {"groups": len(plan.groups), "layers_per_group": [len(g) for g in plan.groups],
                          "store": plan.store, "store_gb": plan.store_bytes / GB, "describe": plan.describe(),
                          "activation_gb": plan.activation_bytes / GB, "adjusted_block_sizes": plan.adjusted}
    del model, targets
    return result


def default_ref_layers(arch: str) -> list[str]:
    last = 11
    return [f"vit.layers.{last}.attention.q_proj", f"vit.layers.{last}.mlp.fc2"]


def run_reference(args, device: torch.device) -> dict:
    """Part 2: the library's math and the plain reference on the same real gradients of a few layers.

    Also an fp64 ground truth (Sherman-Morrison in fp64, elimination in fp64) to tell which of the two
    fp32 computations is closer to the exact math when they differ."""
    model = build_model(args.arch, args.seed).to(device)
    names = args.ref_layers.split(",") if args.ref_layers else default_ref_layers(args.arch)
    targets = find_targets(model, names)
    n_grads = args.ref_num_grads or args.num_grads
    blocks = {n: choose_block_size(m.weight.numel(), args.fisher_block_size, n) for n, m in targets.items()}
    numels = {n: m.weight.numel() for n, m in targets.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [m.weight for m in targets.values()]
    for w in weights:
        w.requires_grad_(True)
    reference = {n: RankOneFisherInverse(numels[n], blocks[n], n_grads, args.damp, device=device) for n in targets}
    exact = ({n: RankOneFisherInverse(numels[n], blocks[n], n_grads, args.damp, torch.float64, device)
              for n in targets} if args.ref_fp64 else {})
    accumulate = "inverse" if args.fisher_accumulation == "auto" else args.fisher_accumulation
    library = BlockFisher(numels, blocks, device=device, **(
        {"accumulate": "inverse", "damp": args.damp, "num_grads": n_grads} if accumulate == "inverse" else {}))
    chunk = min(args.grad_chunk_size, n_grads)
    buffers = {n: torch.empty(chunk, numels[n], device=device) for n in targets}
    original = {n: weight_blocks(m, blocks[n]).to(device) for n, m in targets.items()}
    zeros = {n: w == 0 for n, w in original.items()}
    profiler = PhaseProfiler(device=str(device))
    row = 0
    try:
        for i, batch in enumerate(RandomImages(n_grads, args.grad_batch_size, args.seed)):
            with profiler.phase("gradients"):
                logits = model(pixel_values=batch["pixel_values"].to(device)).logits
                loss = F.cross_entropy(logits.float(), batch["labels"].to(device))
                grads = torch.autograd.grad(loss, weights)
            with profiler.phase("reference fisher (rank-1 updates)"):
                for n, g in zip(targets, grads, strict=True):
                    reference[n].update(g.reshape(-1).float())
            if exact:
                with profiler.phase("fp64 truth: fisher"):
                    for n, g in zip(targets, grads, strict=True):
                        exact[n].update(g.reshape(-1).double())
            for n, g in zip(targets, grads, strict=True):
                buffers[n][row].copy_(g.reshape(-1))
            row += 1
            if row == chunk or i == n_grads - 1:
                with profiler.phase("library fisher (batched)"):
                    library.add({n: b[:row] for n, b in buffers.items()})
                row = 0
        del buffers, grads, model
        inverses = {}
        with profiler.phase("library inversion"):
            for n in targets:
                inverses[n] = library.pop_inverse(n, args.damp)
        diffs = {n: {"library": float((inverses[n] - exact[n].inverse).abs().max() / exact[n].inverse.abs().max()),
                     "reference": float((reference[n].inverse - exact[n].inverse).abs().max()
                                        / exact[n].inverse.abs().max())}
                 if exact else {"library_vs_reference": float((reference[n].inverse - inverses[n]).abs().max()
                                                              / inverses[n].abs().max())} for n in targets}
        results = {}
        if args.method == "cap":
            ref_losses, ref_traces = {}, {}
            with profiler.phase("reference elimination (all snapshots)"):
                for n in targets:
                    ref_losses[n], ref_traces[n] = reference_eliminate(original[n], reference[n].inverse)
            ref_counts = {n: m.sum(dim=1) for n, m in reference_select(ref_losses, zeros, args.sparsity).items()}
            results["reference"] = {n: ref_traces[n][ref_counts[n], torch.arange(ref_counts[n].numel(), device=device)]
                                    for n in targets}
            del ref_traces, reference
            with profiler.phase("library elimination (packed snapshots)"):
                results["library"] = _library_cap(original, inverses, args)
            if exact:
                with profiler.phase("fp64 truth: elimination"):
                    results["fp64"] = _library_cap({n: w.double() for n, w in original.items()},
                                                   {n: e.inverse for n, e in exact.items()}, args)
            ref_elim = profiler.phases["reference elimination (all snapshots)"].seconds
            lib_elim = profiler.phases["library elimination (packed snapshots)"].seconds
        else:
            for label, inv in (("reference", {n: r.inverse for n, r in reference.items()}), ("library", inverses),
                               ("fp64", {n: e.inverse for n, e in exact.items()})):
                if not inv:
                    continue
                w0 = {n: w.to(inv[n].dtype) for n, w in original.items()}
                scores = {n: w0[n].pow(2) / (2 * inv[n].diagonal(dim1=1, dim2=2)) for n in targets}
                masks = (reference_select(scores, zeros, args.sparsity) if label != "library"
                         else select_pruned(scores, args.sparsity, "global"))
                results[label] = {n: reference_obs(w0[n], inv[n], masks[n]) for n in targets}
            ref_elim = lib_elim = None
        phases = profiler.summary()
    finally:
        profiler.close()
    ref_fisher = phases["reference fisher (rank-1 updates)"]["seconds"]
    lib_sum = phases["library fisher (batched)"]["seconds"]
    lib_inv = phases["library inversion"]["seconds"]
    pairs = [("library", "reference")] + ([("library", "fp64"), ("reference", "fp64")] if exact else [])
    layers = {}
    for n in targets:
        layer = {"weights": numels[n], "block_size": blocks[n], "max_abs_weight": float(original[n].abs().max()),
                 "sparsity": float((results["library"][n] == 0).float().mean()), "inverse_max_rel_diff": diffs[n],
                 "reference_gb": numels[n] * (blocks[n] + (blocks[n] + 1 if args.method == "cap" else 0)) * 4 / GB}
        for a, b in pairs:
            wa, wb = results[a][n].double(), results[b][n].double()
            same = ((wa == 0) == (wb == 0)).all(dim=1)  # blocks where both pruned the same weights
            layer[f"{a}_vs_{b}"] = {"max_abs_weight_diff": float((wa - wb).abs().max()),
                                    "max_abs_diff_same_mask_blocks": float((wa - wb)[same].abs().max())
                                    if bool(same.any()) else 0.0,
                                    "mask_mismatches": int(((wa == 0) != (wb == 0)).sum())}
        layers[n] = layer
    return {"layers": layers, "num_grads": n_grads, "phases": phases, "accumulation": accumulate,
            "fisher_speedup": ref_fisher / (lib_sum + lib_inv),
            "accumulation_speedup": ref_fisher / lib_sum,
            "elimination_speedup": (ref_elim / lib_elim) if ref_elim else None}


def _library_cap(original: dict, inverses: dict, args) -> dict:
    """The library's CAP math on given inverses: eliminate_layer, select_pruned, unpack_weights."""
    scores, orders, packed = {}, {}, {}
    for n in original:
        chunks = []
        scores[n], orders[n], _ = eliminate_layer(original[n], inverses[n], args.elimination_chunk_size,
                                                  on_chunk=chunks.append)
        packed[n] = torch.cat(chunks)
    counts = {n: m.sum(dim=1) for n, m in select_pruned(scores, args.sparsity, "global").items()}
    return {n: unpack_weights(packed[n].to(original[n].device), orders[n].to(original[n].device).long(), counts[n])
            for n in original}


def fmt_table(phases: dict, order: list[str], method: str = "cap") -> list[str]:
    notes = {**PHASE_NOTES, **FASTCAP_NOTES} if method == "fastcap" else PHASE_NOTES
    lines = ["| phase | seconds | calls | peak memory (GB) | what |", "|---|---|---|---|---|"]
    for name in order:
        if name in phases:
            p = phases[name]
            lines.append(f"| {name} | {p['seconds']:.1f} | {p['calls']} | {p['peak_gb']:.2f} | "
                         f"{notes.get(name, '')} |")
    return lines


def section_name(args) -> str:
    name = f"## Pruning step: {args.arch}, {args.method}, B={args.fisher_block_size}"
    if args.fisher_accumulation != "auto":
        name += f", fisher_accumulation={args.fisher_accumulation}"
    return name + (" (reference comparison only)" if args.skip_step else "")


def write_summary(out_dir: Path) -> None:
    rows = []
    results = [json.loads(path.read_text()) for path in out_dir.glob("*.json")]
    archs, methods = list(ARCHS), ["cap", "obs", "fastcap"]
    results.sort(key=lambda r: (archs.index(r["args"]["arch"]), methods.index(r["args"]["method"]),
                                r["args"]["num_grads"]))
    for r in results:
        a, s = r["args"], r["step"]
        ph = s["phases"]
        sec = {k: ph.get(k, {}).get("seconds", 0.0) for k in PHASES}
        plan = s.get("plan") or {}
        ref = r.get("reference") or {}
        rows.append(
            f"| {a['arch']} | {a['method']} | {a['num_grads']} x {a['grad_batch_size']} img | {a['fisher_block_size']} "
            f"| {a['max_memory_gb'] if a['max_memory_gb'] is not None else '-'} | {plan.get('groups', '-')} "
            f"| {plan.get('store', '-')} | {sec['gradients']:.0f} | {sec['fisher']:.0f} | {sec['inversion']:.0f} "
            f"| {sec['elimination']:.0f} | {sec['offload'] + sec['selection'] + sec['write-back']:.0f} "
            f"| {s['total_seconds']:.0f} | **{s['peak_gb']:.2f}** "
            + (f"| {ref['fisher_speedup']:.1f}x @N={ref['num_grads']} |" if ref else "| - |"))
    body = "\n".join([
        "## Pruning step scale: summary", "",
        "One pruning step of a DeiT-sized ViT (random weights, 224x224 random images), all 72 attention/MLP "
        "layers, sparsity 0.5. Seconds per phase (summed over layer groups), peak = the process's peak RSS "
        "during the step (model, libraries and everything). Fisher x = the rank-1 reference's Fisher build "
        "time over the library's (accumulation + inversion), same gradients and layers (Part 2 of each run). "
        "Per-run details, commands and machine in the sections below; made by scripts/bench_pruning_step.py.", "",
        "| arch | method | gradients | B | budget GB | groups | snapshots | grad s | fisher s | inversion s "
        "| elimination s | offload+select+write s | total s | peak GB | Fisher x (ref/lib) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""])
    write_section(ROOT / "docs" / "benchmarks.md", body, "## Pruning step scale: summary")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(ARCHS), default="deit-tiny")
    parser.add_argument("--method", choices=["cap", "fastcap", "obs"], default="cap")
    parser.add_argument("--num_grads", type=int, default=1024)
    parser.add_argument("--grad_batch_size", type=int, default=1, help="Images per gradient.")
    parser.add_argument("--fisher_block_size", type=int, default=192)
    parser.add_argument("--damp", type=float, default=1e-7)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--grad_chunk_size", type=int, default=32)
    parser.add_argument("--fisher_accumulation", choices=["auto", "inverse", "sum"], default="auto",
                        help="CAP/OBS Fisher: the inverse updated by chunks (auto, one process) or sums + Cholesky.")
    parser.add_argument("--elimination_chunk_size", type=int, default=64)
    parser.add_argument("--max_memory_gb", type=float, default=None,
                        help="CAP/OBS memory budget (default: 90%% of this machine's RAM, or of the GPU's).")
    parser.add_argument("--offload_dir", default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--ref_layers", default=None,
                        help="Comma-separated layers for the reference comparison (default: the last block's "
                             "q_proj and fc2).")
    parser.add_argument("--ref_num_grads", type=int, default=None, help="Default: --num_grads.")
    parser.add_argument("--no_ref_fp64", dest="ref_fp64", action="store_false",
                        help="Skip the fp64 ground truth in the reference comparison.")
    parser.add_argument("--skip_step", action="store_true", help="Only the reference comparison.")
    parser.add_argument("--skip_reference", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/bench-pruning-step")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--no_write", action="store_true", help="Do not touch docs/benchmarks.md.")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.method in ("cap", "obs") and args.max_memory_gb is None:
        if device.type == "cuda":
            args.max_memory_gb = round(0.9 * torch.cuda.get_device_properties(device).total_memory / GB, 1)
        else:
            import psutil

            args.max_memory_gb = round(0.9 * psutil.virtual_memory().total / GB, 1)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    command = " ".join([f"OMP_NUM_THREADS={threads}", "python", "scripts/bench_pruning_step.py", *sys.argv[1:]])
    print(f"command: {command}\nmachine: {machine()}\ndevice: {device}", flush=True)
    result = {"args": vars(args), "command": command, "machine": machine(), "device": str(device)}
    if not args.skip_step:
        result["step"] = step = run_step(args, device)
        print(json.dumps(step, indent=1), flush=True)
    if not args.skip_reference and args.method in ("cap", "obs"):
        result["reference"] = run_reference(args, device)
        print(json.dumps(result["reference"], indent=1), flush=True)
    out = ROOT / args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.arch}-{args.method}-B{args.fisher_block_size}-N{args.num_grads}-{args.fisher_accumulation}.json"
    if not args.skip_step:
        (out / name).write_text(json.dumps(result, indent=1))

    lines = [section_name(args), "", f"Command: `{command}`", "", f"Machine: {result['machine']}; device {device}.", ""]
    if "step" in result:
        step = result["step"]
        plan = step.get("plan")
        damp_text = (f"fastcap_damp={PruningConfig().fastcap_damp} (relative)" if args.method == "fastcap"
                     else f"damp={args.damp}")
        lines += [f"Part 1, the whole step: {step['target_weights'] / 1e6:.2f} M target weights, {args.num_grads} "
                  f"gradients of {args.grad_batch_size} random image(s) each, B={args.fisher_block_size}, "
                  f"{damp_text}, sparsity {args.sparsity} (achieved {step['achieved_sparsity']:.4f}). "
                  f"Total **{step['total_seconds']:.0f} s**, peak memory **{step['peak_gb']:.2f} GB** "
                  f"(the process before the step: {step['base_rss_gb']:.2f} GB)."
                  + (f" Budget {args.max_memory_gb} GB: {plan['describe']}." if plan else ""), ""]
        lines += fmt_table(step["phases"], PHASES, args.method) + [""]
    if "reference" in result:
        ref = result["reference"]
        lines += [f"Part 2, library vs the plain rank-1 reference on {len(ref['layers'])} layers, the same "
                  f"{ref['num_grads']} real gradients (the rest of the model is not involved): Fisher build "
                  f"(library: '{ref['accumulation']}' accumulation + inversion) **{ref['fisher_speedup']:.1f}x** "
                  f"faster than the rank-1 updates (accumulation alone {ref['accumulation_speedup']:.1f}x)"
                  + (f", elimination **{ref['elimination_speedup']:.1f}x** faster" if ref["elimination_speedup"]
                     else "") + ".", "",
                  "Max abs weight difference / mask mismatches (weights pruned in one and kept in the other) "
                  "(in brackets, where recorded: the max abs difference over blocks whose pruned sets agree) "
                  "between the library (fp32), the reference (fp32) and the fp64 ground truth (Sherman-Morrison "
                  "and elimination in fp64); inverse: max abs difference relative to the largest entry.", "",
                  "| layer | weights | B | max abs weight | library vs reference | library vs fp64 | "
                  "reference vs fp64 | inverse rel. diff | reference memory (GB) | sparsity |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for n, layer in ref["layers"].items():
            cells = []
            for key in ("library_vs_reference", "library_vs_fp64", "reference_vs_fp64"):
                c = layer.get(key)
                same = c.get("max_abs_diff_same_mask_blocks") if c else None
                cells.append((f"{c['max_abs_weight_diff']:.1e} / {c['mask_mismatches']}"
                              + (f" ({same:.0e})" if same is not None else "")) if c else "-")
            inv = ", ".join(f"{k} {v:.1e}" for k, v in layer["inverse_max_rel_diff"].items())
            lines.append(f"| {n} | {layer['weights']} | {layer['block_size']} | {layer['max_abs_weight']:.3f} | "
                         + " | ".join(cells) + f" | {inv} | {layer['reference_gb']:.2f} | {layer['sparsity']:.4f} |")
        lines += [""] + fmt_table(ref["phases"], list(ref["phases"])) + [""]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_summary(out)  # first, so that the summary comes before the per-run sections
        write_section(ROOT / "docs" / "benchmarks.md", body, section_name(args))


if __name__ == "__main__":
    main()
