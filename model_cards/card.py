"""Fill the sparse-model card from what a run left in its folder.

Everything comes from the folder's own records (sparsity_config.json, cap_recipe.yaml,
eval_results.json), so the card never states a number the run did not measure.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from cap_hf.config import PruningConfig
from cap_hf.io.checkpoint import EVAL_FILE, RECIPE_FILE, load_sparsity_config
from cap_hf.io.models import saved_as_classifier
from cap_hf.io.plots import plot_layer_sparsity
from cap_hf.methods import get_method
from cap_hf.structured.registry import methods as structured_methods

TEMPLATE = Path(__file__).with_name("sparse_model_card.md")
STRUCTURED_TEMPLATE = Path(__file__).with_name("structured_model_card.md")
CHART_FILE = "sparsity_per_layer.png"
WIDTHS_CHART_FILE = "channels_per_group.png"
STRUCTURED_RESULTS = "results.json"

logger = logging.getLogger(__name__)

def is_hub_id(name: str | None) -> bool:
    """A Hub repo id (not a local path, not one of cap_hf's builtin datasets)."""
    if not name or name.startswith("builtin:") or Path(name).expanduser().exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def base_model_license(base_model: str | None) -> str | None:
    """The license of the base model's card: a local folder's README.md, or the Hub card when online."""
    if not base_model:
        return None
    local = Path(base_model).expanduser() / "README.md"
    try:
        if local.is_file():
            return ModelCard.load(local).data.license
        if is_hub_id(base_model):
            return ModelCard.load(base_model).data.license
    except Exception:  # offline, private or card-less base model: the license stays unknown
        return None
    return None


FEATURE_METRICS = (("knn_accuracy", "weighted k-NN top-1 (k=20, T=0.07)"), ("linear_probe_accuracy", "linear probe top-1"),
                   ("feature_cosine", "mean cosine of the features to the dense model's"),
                   ("feature_cka", "linear CKA of the features to the dense model's (widths differ)"))


def _pct(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def _method(name: str):
    """The registered pruning method of a record (None for one this version does not know)."""
    try:
        return get_method(name)
    except ValueError:
        return None


def _method_title(name: str) -> str:
    method = _method(name)
    return (method.title or method.name) if method else name


def _dampening(pruning: dict, method: str) -> str:
    try:
        return PruningConfig.from_dict({**pruning, "method": method}).describe_dampening()
    except ValueError:  # a recipe of another version: show what it says
        return ", ".join(f"{key} {pruning[key]}" for key in ("damp", "relative_damp", "fastcap_damp")
                         if pruning.get(key) is not None) or "not recorded"


def _procedure(record: dict, recipe: dict, backbone: bool = False) -> list[str]:
    pruning = recipe.get("pruning", {})
    on_features = pruning.get("fisher_objective") == "features" or \
        (backbone and pruning.get("fisher_objective", "auto") == "auto")
    lines = [f"Method: {_method_title(record['method'])}, {record['structure']} sparsity, "
             f"{record.get('sparsity_distribution') or 'global'} distribution over the targets."]
    if getattr(_method(record["method"]), "fisher", None) and pruning:
        kind = (f"Fisher of the output features ({pruning.get('feature_pooling', 'cls')}; random projections, no labels)"
                if on_features else "Empirical Fisher")
        lines.append(f"{kind} from {pruning.get('num_grads')} gradients of {pruning.get('grad_batch_size')} "
                     f"images each, block size {pruning.get('fisher_block_size')}, dampening "
                     f"{_dampening(pruning, record['method'])}"
                     f"{', label-free' if pruning.get('label_free_fisher') else ''}.")
    schedule = recipe.get("schedule")
    if schedule:
        steps = schedule.get("steps") or []
        shown = ", ".join(f"{_pct(s, 1)} at step {k}" for k, s in steps)
        lines.append(f"Gradual pruning during fine-tuning ({schedule.get('inter_func', 'cubic')} schedule): {shown}.")
    else:
        lines.append("One-shot pruning (no fine-tuning).")
    distill = recipe.get("distillation")
    if distill and backbone:
        lines.append(f"Distillation of the features of {distill.get('teacher') or 'the dense model'} (1 - cosine of "
                     "the CLS tokens + mean squared error of the layer-normalised patch tokens; no labels).")
    elif distill:
        lines.append(f"Knowledge distillation from {distill.get('teacher') or 'the dense model'} "
                     f"(alpha {distill.get('alpha')}, temperature {distill.get('temperature')}).")
    training = recipe.get("training")
    if training:
        lines.append("Training: " + ", ".join(f"{k} {v}" for k, v in training.items()) + ".")
    versions = record.get("versions", {})
    if versions:
        lines.append("Software: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    return lines


def build_model_card(
    folder: str | Path,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    dataset: str | None = None,
    dataset_name: str | None = None,
    eval_split: str = "validation",
    license: str | None = None,
    command: str | None = None,
    notes: list[str] | None = None,
) -> ModelCard:
    """The card of a pruned checkpoint folder (also writes its per-layer sparsity chart there). `repo_id`: the
    Hub id it is published as (None: the card names the folder as given); `notes`: lines added to the
    procedure (what was given when the card was written)."""
    folder = Path(folder)
    record = load_sparsity_config(folder)
    recipe_path, eval_path = folder / RECIPE_FILE, folder / EVAL_FILE
    recipe = yaml.safe_load(recipe_path.read_text()) if recipe_path.is_file() else {}
    results = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    base_model = base_model or record.get("base_model") or recipe.get("base_model")
    dataset = dataset or recipe.get("dataset")
    command = command or recipe.get("command")
    license = license or base_model_license(base_model)
    load_id = repo_id or str(folder)  # what from_pretrained takes: the Hub id once pushed, else the folder's path
    repo_id = repo_id or folder.name
    sparse_acc, dense_acc = results.get("eval_accuracy"), results.get("dense_accuracy")
    # a backbone's evaluation (cap_hf.evaluation.features.FeatureEvaluator): k-NN, linear probe, feature cosine
    features = feature_rows({key: results.get(f"dense_{key}") for key, _ in FEATURE_METRICS},
                            {key: results[f"eval_{key}"] for key, _ in FEATURE_METRICS if f"eval_{key}" in results})
    if sparse_acc is None and "eval_knn_accuracy" in results:  # k-NN top-1 is a backbone's headline accuracy
        sparse_acc, dense_acc = results["eval_knn_accuracy"], results.get("dense_knn_accuracy")

    classifier = saved_as_classifier(config.get("architectures"))
    tags = ["sparse", "sparsity", "pruned", record["method"], "cap_hf", "vision",
            "unstructured-sparsity" if record["structure"] == "unstructured" else f"{record['structure']}-sparsity"]
    eval_results = None
    if sparse_acc is not None:
        eval_results = [EvalResult(
            task_type="image-classification", dataset_type=dataset if is_hub_id(dataset) else (dataset or "custom"),
            dataset_name=dataset_name or dataset or "evaluation data", dataset_split=eval_split,
            metric_type="accuracy", metric_name="Top-1 Accuracy" if not features else "k-NN Top-1 Accuracy",
            metric_value=round(float(sparse_acc), 6))]
    card_data = ModelCardData(
        base_model=base_model if is_hub_id(base_model) else None,
        base_model_relation="finetune" if is_hub_id(base_model) else None,
        library_name="transformers",
        pipeline_tag="image-classification" if classifier else "image-feature-extraction",
        datasets=[dataset] if is_hub_id(dataset) else None,
        metrics=["accuracy"],
        license=license,
        tags=tags,
        model_name=repo_id,
        eval_results=eval_results,
    )
    plot_layer_sparsity(record["per_layer"], folder / CHART_FILE,
                        title=f"{record['method']} {record['structure']}: {_pct(record['overall_sparsity'], 1)}")
    where = f"[{base_model}](https://huggingface.co/{base_model})" if is_hub_id(base_model) else \
        (f"`{base_model}`" if base_model else "a dense model")
    summary = (f"{where} pruned to **{_pct(record['overall_sparsity'])}** {record['structure']} sparsity in its "
               f"{len(record['per_layer'])} attention and MLP weight matrices with "
               f"{_method_title(record['method'])}, using "
               "cap_hf.")
    recovery = _pct(sparse_acc / dense_acc) if sparse_acc is not None and dense_acc else None
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=repo_id,
        summary=summary,
        base_model=base_model,
        eval_split=eval_split,
        features=features,
        dense_accuracy=_pct(dense_acc),
        sparse_accuracy=_pct(sparse_acc),
        sparsity_pct=_pct(record["overall_sparsity"]),
        structure=record["structure"],
        recovery=recovery,
        procedure=_procedure(record, recipe, backbone=not classifier) + list(notes or ()),
        num_zeros=f"{record.get('num_zeros', 0):,}",
        num_weights=f"{record.get('num_weights', 0):,}",
        num_layers=len(record["per_layer"]),
        chart=CHART_FILE,
        per_layer=[(name, _pct(value)) for name, value in record["per_layer"].items()],
        repo_id=load_id,
        auto_class="AutoModelForImageClassification" if classifier else "AutoModel",
        remote_code="auto_map" in config,
        command=command,
        citation=getattr(_method(record["method"]), "citation", ""),
    )


def feature_rows(dense: dict, pruned: dict) -> list[tuple[str, str, str]]:
    """(label, dense, pruned) of a backbone's evaluation (FEATURE_METRICS) for the metrics `pruned` holds; the
    similarities to the dense model read 1 on the dense side."""
    rows = []
    for key, label in FEATURE_METRICS:
        if pruned.get(key) is None:
            continue
        similarity = key.startswith("feature_")
        rows.append((label, "1 (itself)" if similarity else _pct(dense.get(key)),
                     f"{pruned[key]:.4f}" if similarity else _pct(pruned[key])))
    return rows


def _count(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.3f} M"


def _structured_title(method: str) -> str:
    """What a card calls a structured method (its name where the registry does not know it)."""
    known = structured_methods()
    return known[method].title if method in known else method


def _channel_procedure(results: dict) -> list[str]:
    method = results["method"]
    return [f"Channel scores: {_structured_title(method)}, computed once on the dense model without "
            f"data; each group's scores {'over their mean' if results.get('normalize') == 'mean' else 'raw'}; "
            f"{'uncoupled channels only' if results.get('uncoupled_only') else 'coupled (residual-stream) and uncoupled groups'}.",
            f"Removed {results['removed_channels']} of {results['prunable_channels']} prunable channels "
            f"({_pct(results['pruning_ratio'])}), globally lowest score first, never a group's last channel"
            + (f", widths rounded to multiples of {results['round_to']}" if results.get("round_to", 1) > 1 else "")
            + "." + (" In the attention groups (the `q_proj` rows) a channel is a whole head of "
                     f"{next(iter(results['head_groups'].values()))} indices." if results.get("head_groups") else "")]


def _second_order_procedure(results: dict) -> list[str]:
    run = results["second_order"]
    curvature = ("the layer-wise Hessian X X^T of each layer's input over "
                 f"{run['calibration']} calibration images (no labels)" if run["curvature"] == "obs" else
                 f"the empirical Fisher of {run['calibration']} per-image gradients, shared by each layer's rows"
                 + (" (gradients of random projections of the CLS features: no labels)"
                    if run.get("fisher_objective") == "features" else ""))
    if run.get("layer_scales_folded"):
        curvature += f"; {run['layer_scales_folded']} layer scales folded into the weights before them first"
    target = {"latency": f"a measured speed-up of {run['target']:g}x at batch {results['target'].get('batch_size')}",
              "macs": f"{run['target']:g} of the dense model's MACs",
              "params": f"{run['target']:g} of the dense model's parameters"}[run["metric"]]
    searches = run["searches"]
    return [f"Second-order structured pruning ({_structured_title(results['method'])}): curvature {curvature}, "
            f"dampening {run['relative_damp']:g} x its mean diagonal. In each layer the attention heads, MLP neurons "
            "or block channels were removed one at a time, cheapest first, and the remaining weights updated to make "
            "up for each removal (the OBS update of a group of columns; a layer's bias or its batch norm's mean moves "
            "with them). " + ("Residual streams were kept whole." if results.get("uncoupled_only") else
                              "A residual-stream channel (a ResNet's; a ViT's stream passes through LayerNorms and "
                              "is kept whole) costs the sum of the errors of every layer that reads it, each "
                              "compensated on its own."),
            f"Widths chosen per layer by dynamic programming over {run['levels']} widths per group: least summed "
            f"error under {target}" + (f", {len(searches)} search(es) against the measured model" if
                                       run["metric"] == "latency" else "")
            + f". Removed {results['removed_channels']} of {results['prunable_channels']} channels "
            f"({_pct(results['pruning_ratio'])})."]


def _scratch_procedure(results: dict) -> list[str]:
    ratio = (f"{results['flops_ratio_achieved']:.3f} of the original model's FLOPs (target "
             f"{results['arguments']['flops_ratio']})")
    gates = results.get("gates")
    if gates is None:
        return [f"Architecture: the network widened x{results['expand_ratio']} with every gated width (block inner "
                f"channels, heads, MLP neurons) scaled by one factor to {ratio}: the baseline of Pruning from Scratch."]
    chosen = f"epoch {gates['kept_epoch']}" + (f" (validation accuracy {_pct(gates['val_accuracy'])} on "
                                                f"{gates['val_samples']} held-out training images)"
                                                if gates.get("val_accuracy") is not None else "")
    return [f"Architecture: Pruning from Scratch on the network widened x{results['expand_ratio']}, weights random and "
            f"frozen; one gate per block-inner channel, head and MLP neuron (a ResNet's stem and residual streams "
            f"x{results.get('stream_expand_ratio') or results['expand_ratio']}, a ViT's hidden size kept; neither "
            f"gated), learnt {gates['epochs']} epoch(s) on {gates['train_samples']} images with "
            f"cross-entropy + {gates['lambda']} (mean|gate| - {gates['sparsity']})^2, Adam lr {gates['lr']}; gates of "
            f"{chosen} kept.",
            f"The globally highest {results['prunable_channels'] - results['removed_channels']} of "
            f"{results['prunable_channels']} gates kept (at least one per group): {ratio}; search "
            f"{results['search_seconds']:.0f} s."]


def build_structured_card(folder: str | Path, *, repo_id: str | None = None, base_model: str | None = None,
                          dataset: str | None = None, license: str | None = None,
                          notes: list[str] | None = None) -> ModelCard:
    """The card of a structurally pruned folder, from its results.json (scripts/structured_prune.py); also
    writes the chart of channels kept per group there. `repo_id` and `notes` as in build_model_card."""
    from cap_hf.io.plots import plot_group_widths

    folder = Path(folder)
    results = json.loads((folder / STRUCTURED_RESULTS).read_text())
    base_model = base_model or results.get("model")
    dataset = dataset or results.get("arguments", {}).get("dataset_name")
    license = license or base_model_license(base_model)
    load_id = repo_id or str(folder)
    repo_id = repo_id or folder.name
    method = results["method"]
    widths = [(name, before, after) for name, (before, after) in results.get("group_widths", {}).items()]
    if widths:
        plot_group_widths(widths, folder / WIDTHS_CHART_FILE, title=f"{method}: channels kept per group")
    latency = results.get("latency", {})
    known = structured_methods()
    scratch = method in known and known[method].kind == "scratch"
    second_order = "second_order" in results
    procedure = (_scratch_procedure(results) if scratch else _second_order_procedure(results) if second_order else
                 _channel_procedure(results))
    rebuilt = results.get("reconstruction")
    if rebuilt:
        procedure.append(f"Layers refitted one after the other ({rebuilt['layers']} convolutions and linear layers, in the "
                         "order the model runs them) to reproduce the dense model's layer outputs on "
                         f"{rebuilt['images']} training images: least squares on the pruned model's own inputs, no "
                         f"labels (mean relative layer error {rebuilt['error_before']:.4f} -> {rebuilt['error_after']:.4f}; "
                         f"top-1 before: {_pct(rebuilt['accuracy_before'])}).")
    recalibrated = results.get("bn_recalibration")
    if recalibrated:
        procedure.append(f"Batch-norm statistics re-estimated on {recalibrated['images']} training images, no weight "
                         f"trained ({recalibrated['batch_norms']} batch norms; top-1 before: "
                         f"{_pct(recalibrated['accuracy_before'])}).")
    tuning = results.get("finetuning")
    if tuning:
        procedure.append(f"Fine-tuned {tuning['epochs']} epoch(s) on {tuning['train_samples']} training images, lr "
                         f"{tuning['learning_rate']}" + (f", distilling from {tuning.get('teacher')}" if tuning.get("distill")
                                                         else "") + ".")
    training = results.get("training")
    if training:
        procedure.append(f"Trained from scratch (fresh random weights) {training['epochs']:g} epoch(s) on "
                         f"{training['train_samples']} training images, lr {training['learning_rate']}"
                         + (f", distilling from {training.get('teacher')}" if training.get("distill") else "") + ".")
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    classifier = saved_as_classifier(config.get("architectures")) if config else True
    features = feature_rows(results.get("features_dense") or {}, results.get("features_pruned") or {})
    derived = is_hub_id(base_model) and not scratch  # trained from scratch: no weights come from the base model
    card_data = ModelCardData(
        base_model=base_model if derived else None, base_model_relation="finetune" if derived else None,
        library_name="transformers", pipeline_tag="image-classification" if classifier else "image-feature-extraction",
        datasets=[dataset] if is_hub_id(dataset) else None, license=license, model_name=repo_id,
        tags=["pruned", "structured-pruning", "channel-pruning", method, "cap_hf", "vision"])
    speedups = ", ".join(f"{float(v):.2f}x at batch {b}" for b, v in results.get("speedup", {}).items())
    where = f"`{base_model}`" if base_model else "a dense model"
    params = f"{_count(results['params_pruned'])} parameters instead of {_count(results['params_dense'])}"
    summary = (f"The architecture of {where} narrowed by {_structured_title(method)} and trained from scratch, using "
               f"cap_hf: {params}." if scratch else
               f"{where} with whole channels removed by {_structured_title(method)}, using cap_hf: "
               f"a physically smaller model, {params}.")
    return ModelCard.from_template(
        card_data, template_path=str(STRUCTURED_TEMPLATE), model_name=repo_id, summary=summary,
        base_model=base_model,
        params_dense=_count(results["params_dense"]), params_pruned=_count(results["params_pruned"]),
        macs_dense=_count(results["macs_dense"]), macs_pruned=_count(results["macs_pruned"]),
        latencies=[(batch, f"{ms:.2f}", f"{results['latency_ms_pruned'][batch]:.2f}")
                   for batch, ms in results["latency_ms_dense"].items()],
        accuracy_dense=_pct(results.get("accuracy_dense")), accuracy_pruned=_pct(results.get("accuracy_pruned")),
        accuracy_before=_pct(results["accuracy_pruned_before_finetuning"]) if tuning else None,
        features=features, auto_class="AutoModelForImageClassification" if classifier else "AutoModel",
        speedups=speedups or "n/a",
        latency_note=f"median of {latency.get('repeats')} forward passes on {latency.get('device')}, "
                     f"{latency.get('threads')} threads, dense and pruned taking turns",
        procedure=procedure + list(notes or ()), chart=WIDTHS_CHART_FILE, widths=widths, repo_id=load_id,
        width_fields=", ".join(f"`{f}`" for f in WIDTH_FIELDS.get(config.get("model_type"), ("hidden_size",))),
        command=results.get("command", ""), citation=known[method].citation if method in known else "",
        target=_target(results.get("target")))


def _target(target: dict | None) -> str | None:
    """The card's line on what was asked and whether the final measurement of the built model reaches it."""
    if not target:
        return None
    verdict = "**met**" if target.get("met") else "**missed**"
    if target["kind"] == "speedup":
        search = f"; the search had measured {target['search']:.2f}x" if target.get("search") else ""
        return (f"Target: {target['value']:g}x faster at batch {target['batch_size']}; the final measurement above gives "
                f"{target['achieved']:.2f}x: {verdict}{search}.")
    what = "MACs of the dense model" if target["kind"] == "flops_ratio" else "of the prunable channels removed"
    return f"Target: {target['kind']} {target['value']:g} ({what}); achieved {target['achieved']:.3f}: {verdict}."


WIDTH_FIELDS = {"pruned_resnet": ("embedding_size", "hidden_sizes", "block_widths", "block_shortcuts"),
                "pruned_vit": ("hidden_size", "head_dim", "layer_num_heads", "layer_intermediate_sizes"),
                "pruned_dinov2": ("hidden_size", "head_dim", "layer_num_heads", "layer_intermediate_sizes")}


def recorded_sources(folder: str | Path) -> dict[str, str | None]:
    """The base model and dataset a run recorded in its folder: a sparse checkpoint's sparsity_config.json and
    cap_recipe.yaml, or structured_prune.py's results.json."""
    folder = Path(folder)
    if not (folder / "sparsity_config.json").is_file() and (folder / STRUCTURED_RESULTS).is_file():
        results = json.loads((folder / STRUCTURED_RESULTS).read_text())
        return {"base_model": results.get("model"), "dataset": results.get("arguments", {}).get("dataset_name")}
    record = load_sparsity_config(folder)
    recipe_path = folder / RECIPE_FILE
    recipe = yaml.safe_load(recipe_path.read_text()) or {} if recipe_path.is_file() else {}
    return {"base_model": record.get("base_model") or recipe.get("base_model"), "dataset": recipe.get("dataset")}


def check_against_record(folder: str | Path, given: dict[str, str | None], override: bool = False) -> list[str]:
    """A base model or dataset given for the card must agree with what the run recorded: a contradiction is an
    error (the card would claim what the run did not do), or with `override` a warning and a line on the card
    saying what was given and what the run recorded. Returns those lines."""
    recorded = recorded_sources(folder)
    notes = []
    for key, label in (("base_model", "base model"), ("dataset", "dataset")):
        value, kept = given.get(key), recorded.get(key)
        if not value or not kept or value == kept:
            continue
        if not override:
            raise ValueError(f"{folder} records the {label} {kept!r}, but {value!r} was given. A card states what the "
                             f"run did: leave --{key} out, or, if the record is out of date (e.g. the {label} is now "
                             f"on the Hub as {value!r}), pass --override_record to use it; the card will say so.")
        logger.warning("The card of %s names the %s %r instead of the recorded %r (--override_record).", folder, label,
                       value, kept)
        notes.append(f"The {label} {value} was given when this card was written; the run recorded {kept}.")
    return notes


def write_model_card(folder: str | Path, *, override_record: bool = False, **kwargs) -> Path:
    """Write README.md (the card) and its chart into a pruned folder: a sparse checkpoint's (sparsity_config.json)
    or a structurally pruned model's (results.json of scripts/structured_prune.py). A base model or dataset that
    contradicts the folder's record is refused, unless `override_record` (check_against_record)."""
    folder = Path(folder)
    notes = check_against_record(folder, kwargs, override_record)
    if not (folder / "sparsity_config.json").is_file() and (folder / STRUCTURED_RESULTS).is_file():
        known = {k: kwargs[k] for k in ("repo_id", "base_model", "dataset", "license") if kwargs.get(k)}
        card = build_structured_card(folder, **known, notes=notes)
    else:
        card = build_model_card(folder, **kwargs, notes=notes)
    path = Path(folder) / "README.md"
    card.save(path)
    return path
