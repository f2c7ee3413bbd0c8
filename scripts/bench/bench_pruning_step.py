"""Benchmark: time and peak memory of one pruning step on DeiT-sized models, against a plain reference.

  OMP_NUM_THREADS=1 python scripts/bench/bench_pruning_step.py --arch deit-small --method cap --num_grads 1024 \
      --fisher_block_size 192 --max_memory_gb 8

The model is ViTForImageClassification built from a DeiT config (image 224, patch 16, 12 layers, MLP 4x,
1000 classes) with random weights, or (--arch dinov2-large) a Dinov2Model of DINOv2-L's size (24 layers,
hidden 1024, patch 14 at 224: 257 tokens) without a head, whose Fisher is the label-free one of its
features (cap_hf.engine.feature_fisher.FeatureFisherLoss). One gradient is one real backward pass over
--grad_batch_size random images (with random labels for the classifiers). --layers prunes a slice of the
transformer layers (each is the same size), to measure a model too large to prune whole here.

Part 1 prunes all target layers (q/k/v/o, fc1, fc2; 72 in a DeiT), or those of --layers, to --sparsity with the engine (cap_hf.engine.pruner.Pruner,
within --max_memory_gb when given: layer groups when the step does not fit) and reports, per phase, the
seconds and the peak memory (process RSS on the CPU; torch.cuda.max_memory_allocated on CUDA).

Part 2 (CAP and OBS) runs on a few layers (--ref_layers) both the library's math (its Fisher and the
method's kernel) and a deliberately plain reference of the same math (tests/reference.py: one
Sherman-Morrison update per gradient, starting at I/damp with the 1/N scaling; greedy elimination over all
blocks with all (B+1)*d snapshots kept; one global threshold), on the same --ref_num_grads real gradients
(cap_hf.engine.gradients.iter_gradients), and compares masks, weights and speed.

Prints the command, the machine and the numbers, saves them to OUTPUT_DIR/<arch>-<method>-B<B>-N<N>.json and
writes a section to docs/benchmarks.md, plus a summary table of every result file in OUTPUT_DIR.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from benchlib import BENCHMARKS, ROOT, command_line, load_reference, machine, write_section
from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTForImageClassification

from cap_hf import Pruner, PruningConfig, find_targets
from cap_hf.cli.parser import parse_args
from cap_hf.engine.feature_fisher import fisher_loss
from cap_hf.engine.fisher import BlockFisher, choose_block_sizes, gradient_rows
from cap_hf.engine.gradients import iter_gradients
from cap_hf.engine.memory import GB, PhaseProfiler, rss_bytes
from cap_hf.engine.selection import select_pruned
from cap_hf.engine.store import Store
from cap_hf.masks import sparsity_report
from cap_hf.methods import Layer, get_method

ARCHS = {"deit-tiny": (192, 3), "deit-small": (384, 6), "deit-base": (768, 12), "dinov2-large": (1024, 16)}
PHASES = ["plan", "gradients", "fisher", "inversion", "prepare", "selection", "write-back"]
PHASE_NOTES = {
    "plan": "memory plan (with a budget: one probe forward+backward to measure activations)",
    "gradients": "forward + backward + masking, all layer groups",
    "fisher": "Fisher build: F^-1 updated 16 gradients at a time (Woodbury; 'inverse'), sums (one baddbmm per "
              "chunk; 'sum'), or FastCAP's shared B x B sums",
    "inversion": "nothing with 'inverse' accumulation; batched Cholesky in place with 'sum'; FastCAP's mean",
    "prepare": "the method's kernel per layer: CAP's greedy elimination with packing of the snapshots into the "
               "store, OBS's scores and stored inverses, FastCAP's Cholesky factors",
    "selection": "global threshold over all scores",
    "write-back": "the method's kernel per layer at the sparsity: snapshots read back (CAP), OBS update, FastCAP "
                  "column sweep; weights written",
}


def build_model(arch: str, seed: int):
    hidden, heads = ARCHS[arch]
    torch.manual_seed(seed)
    if arch.startswith("dinov2"):
        return Dinov2Model(Dinov2Config(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=24,
                                        image_size=224, patch_size=14, num_channels=3)).eval()
    config = ViTConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden,
                       num_hidden_layers=12, image_size=224, patch_size=16, num_channels=3, num_labels=1000)
    return ViTForImageClassification(config).eval()


def slice_targets(model, layers: str | None) -> dict:
    """The default targets, or those of the transformer layers listed in `layers` ("0,23")."""
    targets = find_targets(model)
    if not layers:
        return targets
    wanted = {int(i) for i in layers.split(",")}
    return {n: m for n, m in targets.items() if int(n.split("layers." if "layers." in n else "layer.")[1].split(".")[0])
            in wanted}


class RandomImages:
    """num batches of random 224x224 RGB images and labels; the same batches every time it is iterated. With
    (rank, world): batches rank, rank + world, ... (a process's share; together the same batches in one
    process's order)."""

    def __init__(self, num: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.num, self.batch_size, self.seed, self.rank, self.world = num, batch_size, seed, rank, world

    def __len__(self) -> int:
        return len(range(self.rank, self.num, self.world))

    def __iter__(self):
        for i in range(self.rank, self.num, self.world):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            yield {"pixel_values": torch.randn(self.batch_size, 3, 224, 224, generator=gen),
                   "labels": torch.randint(0, 1000, (self.batch_size,), generator=gen)}


def run_step(args, cfg: PruningConfig, device: torch.device, rank: int = 0, world: int = 1,
             save_weights: str | None = None) -> dict:
    """Part 1: one pruning step of the whole model, per-phase seconds and peak memory (of this process: one
    rank of `world` when the step is shared out, reading its share of the batches)."""
    model = build_model(args.arch, args.seed).to(device)
    targets = slice_targets(model, args.layers)
    numel = sum(m.weight.numel() for m in targets.values())
    batches = RandomImages(cfg.num_grads, cfg.grad_batch_size, args.seed, rank, world)
    base = rss_bytes()
    profiler = PhaseProfiler(device=str(device))
    start = time.perf_counter()
    try:
        with Pruner(model, cfg, targets=targets, profiler=profiler) as pruner:
            plan = pruner.prepare(batches, progress=args.progress and rank == 0)
            pruner.apply()
            owned = [name for name in targets if pruner.owns(name)]
        total = time.perf_counter() - start
        peak = profiler.overall_peak_bytes
    finally:
        profiler.close()
    phases = {("prepare" if name.startswith("prepare:") else name): stats
              for name, stats in profiler.summary().items()}
    fisher = cfg.needs_fisher == "block"
    result = {"phases": phases, "total_seconds": total, "peak_gb": peak / GB, "base_rss_gb": base / GB,
              "target_weights": numel, "achieved_sparsity": sparsity_report(targets).overall, "rank": rank,
              "world": world, "owned_layers": len(owned), "owned_weights": sum(targets[n].weight.numel() for n in owned),
              "fisher_gb": sum(targets[n].weight.numel() * plan.block_sizes[n] * 4 for n in owned) / GB if fisher
              else 0.0}
    if device.type == "cuda":
        result["cuda_peak_gb"] = max(s["peak_gb"] for s in result["phases"].values())
    result["plan"] = {"groups": len(plan.groups), "layers_per_group": [len(g) for g in plan.groups],
                      "store": plan.store, "store_gb": plan.store_bytes / GB, "describe": plan.describe(),
                      "activation_gb": plan.activation_bytes / GB, "adjusted_block_sizes": plan.adjusted}
    if save_weights:
        torch.save({n: m.weight.detach() for n, m in targets.items()}, save_weights)
    del model, targets
    return result


def _rank_entry(rank: int, world: int, folder: str, args, cfg: PruningConfig, device: str) -> None:
    """One process of a shared-out step (gloo), or the one process: its result into folder/rank<r>.json."""
    torch.set_num_threads(args.threads)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank,
                                             world_size=world)
    try:
        result = run_step(args, cfg, torch.device(device), rank, world,
                          save_weights=f"{folder}/weights.pt" if rank == 0 else None)
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def run_processes(args, cfg: PruningConfig, device: torch.device, world: int, folder: Path) -> list[dict]:
    """The step in `world` fresh processes (1 included: a fresh process for a fair peak memory), each with
    args.threads threads; every rank's result."""
    import multiprocessing

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*"):
        old.unlink()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_entry, args=(r, world, str(folder), args, cfg, str(device)))
             for r in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    failed = [r for r, proc in enumerate(procs) if proc.exitcode != 0]
    if failed:
        raise SystemExit(f"ranks {failed} of the {world}-process step failed (see above).")
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


PROCESS_PHASES = ["plan", "gradients", "exchange", "fisher", "inversion", "prepare", "selection", "write-back",
                  "broadcast"]


def compare_processes(args, cfg: PruningConfig, device: torch.device, out: Path) -> tuple[dict, list[str]]:
    """The same step with 1, 2, ... processes of args.threads threads each, one after the other on this machine:
    per phase the slowest rank's seconds, each rank's peak memory and the Fisher it held, and how far the
    pruned weights are from one process's (every rank reads batches r::N, so together they read the batches
    one process reads, in its order)."""
    counts = [int(x) for x in args.num_processes.split(",")]
    runs, weights = {}, {}
    for world in counts:
        folder = out / f"processes-{world}"
        runs[world] = run_processes(args, cfg, device, world, folder)
        weights[world] = torch.load(folder / "weights.pt")
        print(json.dumps(runs[world], indent=1), flush=True)
    first = counts[0]
    lines = [f"Threads per process: {args.threads}. Each column is one run of the step in that many fresh processes "
             "(gloo on this CPU), started one after the other; seconds per phase are the slowest rank's (the others "
             "wait for it at the next collective), memory is each rank's peak RSS (model, libraries and all).", "",
             "| phase | " + " | ".join(f"{w} process{'es' if w > 1 else ''} (s)" for w in counts) + " | speed-up |",
             "|---|" + "---|" * (len(counts) + 1)]
    for phase in PROCESS_PHASES:
        values = [max(r["phases"].get(phase, {}).get("seconds", 0.0) for r in runs[w]) for w in counts]
        if any(values):
            speed = f"{values[0] / values[-1]:.2f}x" if values[-1] > 0 and values[0] > 0 else "-"
            lines.append(f"| {phase} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {speed} |")
    key = ["fisher", "inversion", "prepare"]
    sums = [max(sum(r["phases"].get(p, {}).get("seconds", 0.0) for p in key) for r in runs[w]) for w in counts]
    lines.append("| **Fisher + elimination** (fisher, inversion, prepare) | " + " | ".join(f"**{v:.1f}**" for v in sums)
                 + f" | **{sums[0] / sums[-1]:.2f}x** |")
    totals = [max(r["total_seconds"] for r in runs[w]) for w in counts]
    lines.append("| total step | " + " | ".join(f"{v:.1f}" for v in totals) + f" | {totals[0] / totals[-1]:.2f}x |")
    lines += ["", "| processes | rank | layers owned | weights owned (M) | Fisher of its layers (GB, all groups) | peak RSS (GB) | plan |",
              "|---|---|---|---|---|---|---|"]
    for w in counts:
        for r in runs[w]:
            lines.append(f"| {w} | {r['rank']} | {r['owned_layers']} | {r['owned_weights'] / 1e6:.2f} | "
                         f"{r['fisher_gb']:.2f} | {r['peak_gb']:.2f} | {r['plan']['groups']} group(s), results in "
                         f"{r['plan']['store']} |")
    lines.append("")
    for w in counts[1:]:
        diffs = [float((weights[w][n] - weights[first][n]).abs().max()) for n in weights[first]]
        masks = sum(int(((weights[w][n] == 0) != (weights[first][n] == 0)).sum()) for n in weights[first])
        lines.append(f"{w} processes vs {first}: max abs weight difference {max(diffs):.1e}, {masks} weights pruned "
                     "in one and kept in the other.")
    return {str(w): runs[w] for w in counts}, lines


def plan_for_processes(args, cfg: PruningConfig, rates_file: Path) -> list[str]:
    """The step planned for args.plan_world processes with args.plan_gb each, by the library's own plan
    (cap_hf.engine.plan with a Ranks of that world; nothing is run but one timed backward pass per image), and the
    time per phase per rank from the rates measured by a --num_processes run (rates_file, its 1-process
    column) at this machine's speed."""
    from cap_hf.engine.fisher import divisor_block_size
    from cap_hf.engine.plan import plan_step
    from cap_hf.engine.ranks import Ranks

    world = args.plan_world
    model = build_model(args.arch, args.seed)
    targets = slice_targets(model, args.layers)
    kernel = get_method(cfg.method)(cfg)
    blocks = {n: divisor_block_size(m.weight.numel(), cfg.fisher_block_size) for n, m in targets.items()}
    planned = cfg.replace(max_memory_gb=args.plan_gb)
    plan = plan_step(model, targets, [kernel], planned, blocks, ranks=Ranks(0, world))
    numels = {n: m.weight.numel() for n, m in targets.items()}
    owned = [sum(numels[n] for n in targets if plan.owners[n] == r) for r in range(world)]
    busiest = max(owned)
    fisher_gb = [sum(numels[n] * blocks[n] * 4 for n in targets if plan.owners[n] == r) / GB for r in range(world)]
    batches = RandomImages(2, 1, args.seed)
    start = time.perf_counter()
    for _ in iter_gradients(model, targets, batches, 2, loss_fn=fisher_loss(cfg, model)):
        pass
    per_image = (time.perf_counter() - start) / 2
    measured = json.loads(rates_file.read_text())
    one = measured["processes"]["1"][0]
    weights, grads = one["target_weights"], measured["pruning"]["num_grads"]
    fisher_rate = one["phases"]["fisher"]["seconds"] / (weights * grads)  # s per weight per gradient at this B
    elim_rate = one["phases"]["prepare"]["seconds"] / weights  # s per weight (CAP at this B)
    measured_b = measured["pruning"]["fisher_block_size"]
    # per weight, a Woodbury update costs O(B) per gradient and the greedy elimination O(B^2): scaled to each
    # layer's block size
    work = [[0.0, 0.0] for _ in range(world)]
    for name in targets:
        ratio = blocks[name] / measured_b
        work[plan.owners[name]][0] += numels[name] * cfg.num_grads * fisher_rate * ratio
        work[plan.owners[name]][1] += numels[name] * elim_rate * ratio ** 2
    fisher_s, elim_s = max(w[0] for w in work), max(w[1] for w in work)
    n, images = cfg.num_grads, cfg.grad_batch_size
    passes = len(plan.groups)
    lines = [f"Plan for {world} processes of {args.plan_gb:g} GB each: {args.arch}"
             f"{f' (layers {args.layers})' if args.layers else ''}, {sum(numels.values()) / 1e6:.1f} M target weights, "
             f"{cfg.method}, B={cfg.fisher_block_size}, N={n} x {images} images; the library's plan "
             f"(cap_hf.engine.plan with {world} ranks): {plan.describe()}.", "",
             "| per rank | value |", "|---|---|",
             f"| layers owned (fewest-most) | {min(list(plan.owners.values()).count(r) for r in range(world))}-"
             f"{max(list(plan.owners.values()).count(r) for r in range(world))} |",
             f"| weights owned, busiest rank (M) | {busiest / 1e6:.1f} |",
             f"| Fisher held, busiest rank (GB) | {max(fisher_gb):.1f} (one process: "
             f"{sum(numels[k] * blocks[k] * 4 for k in numels) / GB:.1f}) |",
             f"| results kept, busiest rank (GB) | {plan.store_bytes / GB:.1f} ({plan.store}) |",
             f"| layer groups (gradient passes) | {passes} |",
             f"| gradients: {n // world} per rank x {images} images x {passes} pass(es), at {per_image:.2f} s per "
             f"image measured here (min) | {per_image * images * (n / world) * passes / 60:.1f} |",
             f"| Fisher build: owned weights x N x {fisher_rate:.2e} s x B/{measured_b}, slowest rank (min) | "
             f"{fisher_s / 60:.1f} |",
             f"| elimination: owned weights x {elim_rate:.2e} s x (B/{measured_b})^2, slowest rank (min) | "
             f"{elim_s / 60:.1f} |",
             f"| one process, for comparison: Fisher build + elimination (min) | "
             f"{sum(sum(w) for w in work) / 60:.1f} |",
             "", f"Rates: Fisher and elimination from the 1-process column of `{rates_file.name}` (this CPU, "
             f"{one['target_weights'] / 1e6:.2f} M weights, {grads} gradients, 1 thread); gradients: one full backward "
             "pass per image of this model, timed here. The plan leaves out the activations of a backward pass (a "
             "real run measures them first, with one batch) and the exchange of gradient rows. These are CPU rates: a GPU does each phase many times "
             "faster (not measured); what carries over is the split: each rank's Fisher, results and elimination are "
             f"1/{world} of one process's (plus at most one layer), the gradients 1/{world} per pass."]
    return lines


def default_ref_layers(arch: str) -> list[str]:
    last = 11
    return [f"vit.layers.{last}.attention.q_proj", f"vit.layers.{last}.mlp.fc2"]


def run_reference(args, cfg: PruningConfig, device: torch.device) -> dict:
    """Part 2: the library's math and the plain reference on the same real gradients of a few layers.

    Also an fp64 ground truth (Sherman-Morrison in fp64, elimination in fp64) to tell which of the two
    fp32 computations is closer to the exact math when they differ."""
    ref = load_reference()
    model = build_model(args.arch, args.seed).to(device)
    names = args.ref_layers.split(",") if args.ref_layers else default_ref_layers(args.arch)
    targets = find_targets(model, names)
    n_grads = args.ref_num_grads or cfg.num_grads
    blocks = choose_block_sizes({n: m.weight.numel() for n, m in targets.items()}, cfg.fisher_block_size)
    numels = {n: m.weight.numel() for n, m in targets.items()}
    reference = {n: ref.RankOneFisherInverse(numels[n], blocks[n], n_grads, cfg.damp, device=device) for n in targets}
    exact = ({n: ref.RankOneFisherInverse(numels[n], blocks[n], n_grads, cfg.damp, torch.float64, device)
              for n in targets} if args.ref_fp64 else {})
    accumulate = cfg.accumulation
    library = BlockFisher(numels, blocks, device=device, damp=cfg.damp, **(
        {"accumulate": "inverse", "num_grads": n_grads} if accumulate == "inverse" else {}))
    chunk = gradient_rows(cfg.grad_chunk_size, n_grads, accumulate)  # as the library buffers them
    buffers = {n: torch.empty(chunk, numels[n], device=device) for n in targets}
    original = {n: m.weight.detach().reshape(-1, blocks[n]).float().clone() for n, m in targets.items()}
    zeros = {n: w == 0 for n, w in original.items()}
    profiler = PhaseProfiler(device=str(device))
    row = 0
    try:
        gradients = iter_gradients(model, targets, RandomImages(n_grads, cfg.grad_batch_size, args.seed), n_grads,
                                   profiler=profiler)
        for i, grads in enumerate(gradients):
            with profiler.phase("reference fisher (rank-1 updates)"):
                for n, g in grads.items():
                    reference[n].update(g)
            if exact:
                with profiler.phase("fp64 truth: fisher"):
                    for n, g in grads.items():
                        exact[n].update(g.double())
            for n, g in grads.items():
                buffers[n][row].copy_(g)
            row += 1
            if row == chunk or i == n_grads - 1:
                with profiler.phase("library fisher (batched)"):
                    library.add({n: b[:row] for n, b in buffers.items()})
                row = 0
        del buffers, model
        inverses = {}
        with profiler.phase("library inversion"):
            for n in targets:
                inverses[n] = library.pop_inverse(n)
        diffs = {n: {"library": float((inverses[n] - exact[n].inverse).abs().max() / exact[n].inverse.abs().max()),
                     "reference": float((reference[n].inverse - exact[n].inverse).abs().max()
                                        / exact[n].inverse.abs().max())}
                 if exact else {"library_vs_reference": float((reference[n].inverse - inverses[n]).abs().max()
                                                              / inverses[n].abs().max())} for n in targets}
        results = {}
        if cfg.method == "cap":
            ref_losses, ref_traces = {}, {}
            with profiler.phase("reference elimination (all snapshots)"):
                for n in targets:
                    ref_losses[n], ref_traces[n] = ref.reference_eliminate(original[n], reference[n].inverse)
            ref_counts = {n: m.sum(dim=1) for n, m in ref.reference_select(ref_losses, zeros, cfg.sparsity).items()}
            results["reference"] = {n: ref_traces[n][ref_counts[n], torch.arange(ref_counts[n].numel(), device=device)]
                                    for n in targets}
            del ref_traces, reference
            with profiler.phase("library elimination (packed snapshots)"):
                results["library"] = library_weights(cfg, original, inverses)
            if exact:
                with profiler.phase("fp64 truth: elimination"):
                    results["fp64"] = library_weights(cfg, {n: w.double() for n, w in original.items()},
                                                      {n: e.inverse for n, e in exact.items()})
            ref_elim = profiler.phases["reference elimination (all snapshots)"].seconds
            lib_elim = profiler.phases["library elimination (packed snapshots)"].seconds
        else:
            for label, inv in (("reference", {n: r.inverse for n, r in reference.items()}), ("library", inverses),
                               ("fp64", {n: e.inverse for n, e in exact.items()})):
                if not inv:
                    continue
                w0 = {n: w.to(inv[n].dtype) for n, w in original.items()}
                if label == "library":
                    results[label] = library_weights(cfg, w0, inv)
                    continue
                scores = {n: w0[n].pow(2) / (2 * inv[n].diagonal(dim1=1, dim2=2)) for n in targets}
                masks = ref.reference_select(scores, zeros, cfg.sparsity)
                results[label] = {n: ref.reference_obs(w0[n], inv[n], masks[n]) for n in targets}
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
                 "reference_gb": numels[n] * (blocks[n] + (blocks[n] + 1 if cfg.method == "cap" else 0)) * 4 / GB}
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


def library_weights(config: PruningConfig, original: dict, inverses: dict) -> dict:
    """The method's kernel on given (n, B) weights and inverses, with the library's global selection."""
    kernel, store = get_method(config.method)(config), Store("device")
    layers = {n: Layer(n, w, store, n, {"block": inverses[n]}) for n, w in original.items()}
    scores = {n: kernel.prepare_layer(layer).masked_fill(layer.weights == 0, float("-inf"))
              for n, layer in layers.items()}
    pruned = select_pruned(scores, config.sparsity, "global")
    return {n: kernel.apply_layer(layer, pruned[n], config.sparsity) for n, layer in layers.items()}


def fmt_table(phases: dict, order: list[str]) -> list[str]:
    lines = ["| phase | seconds | calls | peak memory (GB) | what |", "|---|---|---|---|---|"]
    for name in order:
        if name in phases:
            p = phases[name]
            lines.append(f"| {name} | {p['seconds']:.1f} | {p['calls']} | {p['peak_gb']:.2f} | "
                         f"{PHASE_NOTES.get(name, '')} |")
    return lines


def section_name(args, config: PruningConfig) -> str:
    name = f"## Pruning step: {args.arch}{f' (layers {args.layers})' if args.layers else ''}, {config.method}, " \
        f"B={config.fisher_block_size}"
    if config.fisher_accumulation != "auto":
        name += f", fisher_accumulation={config.fisher_accumulation}"
    return name + (" (reference comparison only)" if args.skip_step else "")


SUMMARY = "## Pruning step scale: summary"


def write_summary(out_dir: Path) -> None:
    """One row per run configuration (arch, method, gradients, B, budget): from this machine's result files in
    OUTPUT_DIR, and the rows already in docs/benchmarks.md for configurations not measured again here."""
    rows = {}
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else ""
    if SUMMARY in text:
        section = text[text.index(SUMMARY):].split("\n## ", 1)[0]
        for line in section.splitlines():
            if line.startswith(tuple(f"| {arch}" for arch in ARCHS)):
                rows[tuple(c.strip() for c in line.split("|")[1:6])] = line
    for path in sorted(out_dir.glob("*.json")):
        r = json.loads(path.read_text())
        a, c, s = r["args"], r["pruning"], r["step"]
        sec = {k: s["phases"].get(k, {}).get("seconds", 0.0) for k in PHASES}
        plan, ref = s.get("plan") or {}, r.get("reference") or {}
        key = (a["arch"] + (f" (layers {a['layers']})" if a.get("layers") else ""), c["method"], f"{c['num_grads']} x {c['grad_batch_size']} img", str(c["fisher_block_size"]),
               str(c["max_memory_gb"]) if c["max_memory_gb"] is not None else "-")
        rows[key] = (f"| {' | '.join(key)} | {plan.get('groups', '-')} | {plan.get('store', '-')} "
                     f"| {sec['gradients']:.0f} | {sec['fisher']:.0f} | {sec['inversion']:.0f} | {sec['prepare']:.0f} "
                     f"| {sec['selection'] + sec['write-back']:.0f} | {s['total_seconds']:.0f} | **{s['peak_gb']:.2f}** "
                     + (f"| {ref['fisher_speedup']:.1f}x @N={ref['num_grads']} |" if ref else "| - |"))
    archs, methods = list(ARCHS), ["cap", "obs", "fastcap", "magnitude"]
    order = sorted(rows, key=lambda k: (archs.index(k[0].split()[0]), k[0], methods.index(k[1]), int(k[2].split()[0])))
    body = "\n".join([
        SUMMARY, "",
        "One pruning step of a DeiT-sized ViT or DINOv2-L-sized backbone (random weights, 224x224 random images), "
        "all attention/MLP layers (72 in a DeiT) or the transformer layers named in the arch column, sparsity 0.5. Seconds per phase (summed over layer groups), peak = the process's peak RSS "
        "during the step (model, libraries and everything). prepare = the method's kernel (CAP: greedy "
        "elimination and packing of the snapshots into the store); runs made before the engine (cap_hf 0.1) "
        "show their elimination there and the writes to the store under select+write. Fisher x = the rank-1 "
        "reference's Fisher build time over the library's (accumulation + inversion), same gradients and layers "
        "(Part 2 of each run). Rows come from different sessions and machines: each run's section below has its "
        "command and machine; made by scripts/bench/bench_pruning_step.py.", "",
        "| arch | method | gradients | B | budget GB | groups | results kept | grad s | fisher s | inversion s "
        "| prepare s | select+write s | total s | peak GB | Fisher x (ref/lib) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", *(rows[k] for k in order), ""])
    write_section(body, SUMMARY)


@dataclass
class BenchArguments:
    arch: str = field(default="deit-tiny", metadata={
        "help": "deit-tiny | deit-small | deit-base | dinov2-large (random weights)."})
    layers: str | None = field(default=None, metadata={
        "help": "Prune only these transformer layers (comma-separated indices; default: all)."})
    ref_layers: str | None = field(default=None, metadata={
        "help": "Comma-separated layers for the reference comparison (default: the last block's q_proj and fc2)."})
    ref_num_grads: int | None = field(default=None, metadata={"help": "Default: --num_grads."})
    ref_fp64: bool = field(default=True, metadata={"help": "The fp64 ground truth in the reference comparison."})
    skip_step: bool = field(default=False, metadata={"help": "Only the reference comparison."})
    skip_reference: bool = field(default=False, metadata={"help": "Only the whole step."})
    seed: int = field(default=0)
    output_dir: str = field(default="outputs/bench-pruning-step")
    progress: bool = field(default=False)
    no_write: bool = field(default=False, metadata={"help": "Do not touch docs/benchmarks.md."})
    num_processes: str | None = field(default=None, metadata={
        "help": "Compare the step shared out over these numbers of processes (e.g. '1,2'; gloo, one after the "
                "other, each process --threads threads) instead of Part 1 and 2."})
    threads: int = field(default=1, metadata={"help": "torch threads per process with --num_processes."})
    plan_world: int | None = field(default=None, metadata={
        "help": "Only plan the step for this many processes (--plan_gb each) and estimate each rank's time per "
                "phase from --rates_file (a --num_processes result)."})
    plan_gb: float = field(default=80.0, metadata={"help": "Memory per process for --plan_world (GB)."})
    rates_file: str | None = field(default=None, metadata={"help": "A processes/*.json result of --num_processes."})


def main() -> None:
    # the pruning flags are PruningConfig's; one image per gradient keeps the gradient phase short on a CPU; the
    # reference needs an absolute dampening (1e-7 unless --relative_damp is given, then it is skipped)
    relative = any(a.split("=")[0] == "--relative_damp" for a in sys.argv[1:])
    args, config = parse_args((BenchArguments, PruningConfig), sys.argv[1:],
                              defaults={"grad_batch_size": 1, **({} if relative else {"damp": 1e-7})},
                              description=__doc__, prog="python scripts/bench/bench_pruning_step.py")
    if relative and not args.skip_reference:
        print("--relative_damp: no reference comparison (the plain reference takes an absolute damp).")
        args.skip_reference = True
    if args.arch not in ARCHS:
        raise SystemExit(f"--arch must be one of {list(ARCHS)}, got {args.arch!r}.")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    command = command_line("bench_pruning_step.py")
    print(f"command: {command}\nmachine: {machine()}\ndevice: {device}", flush=True)
    result = {"args": vars(args), "pruning": config.to_dict(), "command": command, "machine": machine(),
              "device": str(device)}
    if args.plan_world:
        if not args.rates_file:
            raise SystemExit("--plan_world needs --rates_file (a --num_processes result).")
        title = f"## Pruning step planned for {args.plan_world} processes: {args.arch}, {config.method}"
        body = "\n".join([title, "", f"Command: `{command}`", "", f"Machine: {result['machine']}.", "",
                          *plan_for_processes(args, config, Path(args.rates_file)), ""])
        print(body)
        if not args.no_write:
            write_section(body, title)
        return
    if args.num_processes:
        out = ROOT / args.output_dir
        result["processes"], table = compare_processes(args, config, device, out)
        stem = (f"{args.arch}{'-L' + args.layers.replace(',', '_') if args.layers else ''}-{config.method}-"
                f"B{config.fisher_block_size}-N{config.num_grads}-P{args.num_processes.replace(',', '_')}")
        (out / "processes").mkdir(parents=True, exist_ok=True)
        (out / "processes" / f"{stem}.json").write_text(json.dumps(result, indent=1))
        title = (f"## Pruning step shared out over processes: {args.arch}"
                 f"{f' (layers {args.layers})' if args.layers else ''}, {config.method}, B={config.fisher_block_size}, "
                 f"N={config.num_grads}" + (f", budget {config.max_memory_gb} GB per rank" if config.max_memory_gb
                                             else ""))
        body = "\n".join([title, "", f"Command: `{command}`", "", f"Machine: {result['machine']}; device {device}.", "",
                          f"One pruning step ({config.describe_dampening()} dampening, sparsity {config.sparsity}) "
                          f"with {config.num_grads} gradients of {config.grad_batch_size} random image(s), shared out "
                          "over processes (cap_hf.engine.ranks): each computes its share of the gradients, the rows go to "
                          "the layers' owners, each owner builds and inverts its layers' Fisher and eliminates them.",
                          "", *table, ""])
        print(body)
        if not args.no_write:
            write_section(body, title)
        return
    if not args.skip_step:
        result["step"] = step = run_step(args, config, device)
        print(json.dumps(step, indent=1), flush=True)
    if not args.skip_reference and config.method in ("cap", "obs"):
        result["reference"] = run_reference(args, config, device)
        print(json.dumps(result["reference"], indent=1), flush=True)
    out = ROOT / args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    name = (f"{args.arch}{'-L' + args.layers.replace(',', '_') if args.layers else ''}-{config.method}-"
            f"B{config.fisher_block_size}-N{config.num_grads}-"
            f"{config.fisher_accumulation}.json")
    if not args.skip_step:
        (out / name).write_text(json.dumps(result, indent=1))

    lines = [section_name(args, config), "", f"Command: `{command}`", "",
             f"Machine: {result['machine']}; device {device}.", ""]
    if "step" in result:
        step = result["step"]
        plan = step["plan"]
        damp_text = f"damp {config.describe_dampening()}"
        lines += [f"Part 1, the whole step: {step['target_weights'] / 1e6:.2f} M target weights, {config.num_grads} "
                  f"gradients of {config.grad_batch_size} random image(s) each, B={config.fisher_block_size}, "
                  f"{damp_text}, sparsity {config.sparsity} (achieved {step['achieved_sparsity']:.4f}). "
                  f"Total **{step['total_seconds']:.0f} s**, peak memory **{step['peak_gb']:.2f} GB** "
                  f"(the process before the step: {step['base_rss_gb']:.2f} GB). Plan: {plan['describe']}.", ""]
        lines += fmt_table(step["phases"], PHASES) + [""]
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
        write_section(body, section_name(args, config))


if __name__ == "__main__":
    main()
