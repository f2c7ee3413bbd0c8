"""End to end: scripts/train_dense.py and scripts/oneshot.py on real data (scikit-learn digits)."""

import json
import shutil
import subprocess

import pytest
from conftest import ENV, ROOT, run_script


def test_train_dense_writes_a_loadable_classifier(digits_model):
    from cap_hf.io.models import load_classifier

    model, processor = load_classifier(str(digits_model))
    assert model.config.num_labels == 10 and model.config.num_channels == 1
    assert processor.size == {"height": 8, "width": 8}
    results = json.loads((digits_model / "all_results.json").read_text())
    assert results["eval_accuracy"] > 0.5  # 10 classes: chance is 0.1


def test_oneshot_end_to_end(digits_model, digits_dir, tmp_path):
    out = tmp_path / "oneshot"
    run_script("oneshot.py", "--model_name_or_path", digits_model, "--dataset_name", digits_dir,
               "--methods", "magnitude,obs,cap,fastcap", "--sparsities", "0.5,0.9", "--num_grads", 48,
               "--grad_batch_size", 16, "--fisher_block_size", 32, "--damp", 1e-7, "--output_dir", out)
    records = json.loads((out / "results.json").read_text())
    assert records[0]["method"] == "dense"
    assert [(r["method"], r["sparsity"]) for r in records[1:]] == [
        (m, s) for m in ("magnitude", "obs", "cap", "fastcap") for s in (0.5, 0.9)]
    for r in records:
        assert set(r) >= {"method", "sparsity", "achieved_sparsity", "accuracy", "prune_seconds"}
        assert 0.0 <= r["accuracy"] <= 1.0 and r["prune_seconds"] >= 0
        assert abs(r["achieved_sparsity"] - r["sparsity"]) < 1e-3
    by = {(r["method"], r["sparsity"]): r["accuracy"] for r in records}
    assert by[("cap", 0.9)] >= by[("magnitude", 0.9)]
    assert (out / "accuracy_vs_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an existing result is not overwritten silently
    again = run_script("oneshot.py", "--model_name_or_path", digits_model, "--dataset_name", digits_dir,
                       "--output_dir", out, "--methods", "magnitude", check=False)
    assert again.returncode != 0 and "overwrite_output_dir" in again.stderr
    assert json.loads((out / "results.json").read_text()) == records


def test_oneshot_two_four(digits_model, digits_dir, tmp_path):
    out = tmp_path / "nm"
    run_script("oneshot.py", "--model_name_or_path", digits_model, "--dataset_name", digits_dir,
               "--methods", "magnitude,cap", "--structure", "2:4", "--num_grads", 32, "--grad_batch_size", 16,
               "--fisher_block_size", 32, "--output_dir", out)
    records = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["sparsity"]) for r in records[1:]] == [("magnitude", 0.5), ("cap", 0.5)]
    assert all(r["achieved_sparsity"] == pytest.approx(0.5) for r in records[1:])


@pytest.mark.parametrize(("extra", "message"), [
    (["--sparsities", "0.5,1.0"], "sparsity must be in [0, 1)"),
    (["--methods", "cap,random"], "Unknown pruning method 'random'; registered methods: cap, fastcap"),
    (["--method", "obs", "--structure", "2:4"], "structure '2:4' is supported by cap, magnitude, not obs"),
    (["--num_grads", 100000], "100000 Fisher gradients are needed"),
    (["--label_column_name", "target"], "no label column 'target'"),
    (["--methods", "cap", "--max_memory_gb", "0.01"], "max_memory_gb=0.01 cannot be met"),
])
def test_oneshot_bad_input(digits_model, digits_dir, tmp_path, extra, message):
    result = run_script("oneshot.py", "--model_name_or_path", digits_model, "--dataset_name", digits_dir,
                        "--output_dir", tmp_path / "bad", "--grad_batch_size", 16, *extra, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "bad" / "results.json").exists()


def test_oneshot_with_a_memory_budget_gives_the_same_results(digits_model, digits_dir, tmp_path):
    """--max_memory_gb streams CAP/OBS through layer groups over the real, shuffling calibration loader;
    the pruned models are the same, so are their accuracies."""
    common = ["--model_name_or_path", digits_model, "--dataset_name", digits_dir, "--methods", "obs,cap",
              "--sparsities", "0.7", "--num_grads", 24, "--grad_batch_size", 16, "--fisher_block_size", 32,
              "--damp", 1e-7]
    run_script("oneshot.py", *common, "--output_dir", tmp_path / "plain")
    run_script("oneshot.py", *common, "--output_dir", tmp_path / "budget", "--max_memory_gb", 64)
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    budget = json.loads((tmp_path / "budget" / "results.json").read_text())
    for a, b in zip(plain, budget, strict=True):
        assert (a["method"], a["sparsity"]) == (b["method"], b["sparsity"])
        assert a["achieved_sparsity"] == pytest.approx(b["achieved_sparsity"], abs=1e-6)
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=2e-3)


@pytest.fixture(scope="module")
def digits_backbone(digits_model, digits_dir, tmp_path_factory):
    """The digits ViT with its head dropped (a ViTModel folder), and the digits data with an unlabelled
    training split plus the labelled one under another name (the k-NN bank)."""
    from datasets import DatasetDict, load_from_disk

    from cap_hf.io.models import load_classifier

    root = tmp_path_factory.mktemp("backbone")
    model, processor = load_classifier(str(digits_model))
    model.vit.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    data = load_from_disk(str(digits_dir))
    DatasetDict({"train": data["train"].remove_columns("label"), "labelled": data["train"],
                 "test": data["test"]}).save_to_disk(str(root / "data"))
    return root / "model", root / "data"


def test_oneshot_prunes_a_backbone_without_labels(digits_backbone, tmp_path):
    from transformers import AutoModel

    model_dir, data_dir = digits_backbone
    assert type(AutoModel.from_pretrained(model_dir)).__name__ == "ViTModel"
    common = ["--model_name_or_path", model_dir, "--dataset_name", data_dir, "--methods", "magnitude,cap",
              "--sparsities", "0.5,0.9", "--num_grads", 48, "--grad_batch_size", 16, "--fisher_block_size", 32]
    run_script("oneshot.py", *common, "--knn_bank_split", "labelled", "--output_dir", tmp_path / "knn")
    records = json.loads((tmp_path / "knn" / "results.json").read_text())
    for r in records:
        assert set(r) >= {"knn_accuracy", "linear_probe_accuracy", "feature_cosine"} and "accuracy" not in r
    by = {(r["method"], r["sparsity"]): r for r in records}
    assert by[("dense", 0.0)]["feature_cosine"] == pytest.approx(1.0)
    assert by[("dense", 0.0)]["knn_accuracy"] > 0.5  # features of a trained classifier: chance is 0.1
    assert by[("cap", 0.9)]["feature_cosine"] > by[("magnitude", 0.9)]["feature_cosine"]
    assert by[("cap", 0.5)]["feature_cosine"] > by[("cap", 0.9)]["feature_cosine"]
    # the default bank is the training split, here without labels: feature cosine alone, and the log says why
    result = run_script("oneshot.py", *common, "--output_dir", tmp_path / "cosine")
    assert "feature cosine alone" in result.stderr
    records = json.loads((tmp_path / "cosine" / "results.json").read_text())
    assert all(set(r) & {"knn_accuracy", "linear_probe_accuracy", "accuracy"} == set() for r in records)
    # the cross-entropy objective needs labels the training split does not have: said before any work
    bad = run_script("oneshot.py", *common, "--fisher_objective", "cross_entropy", "--output_dir", tmp_path / "bad",
                     check=False)
    assert bad.returncode != 0 and "no label column" in bad.stderr and "--fisher_objective features" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
def test_oneshot_under_accelerate_launch_shares_the_step(digits_model, digits_dir, tmp_path):
    """`accelerate launch --num_processes 2 scripts/oneshot.py`: the step is shared out over two gloo processes
    (each its share of the gradients and of the layers), rank 0 writes the results; with a memory budget
    (layer groups, per rank) the pruned models and their accuracies are the same."""
    common = ["--model_name_or_path", digits_model, "--dataset_name", digits_dir, "--methods", "obs,cap",
              "--sparsities", "0.7", "--num_grads", 24, "--grad_batch_size", 16, "--fisher_block_size", 32]
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "scripts" / "oneshot.py")]
    runs = {}
    for name, extra in (("plain", []), ("budget", ["--max_memory_gb", "64"])):
        out = tmp_path / name
        result = subprocess.run([*launch, *map(str, common), "--output_dir", str(out), *extra], env=ENV,
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "on rank 1" in result.stderr and "2 ranks" in result.stderr  # the plan, per rank
        assert json.loads((out / "oneshot_args.json").read_text())["num_processes"] == 2
        runs[name] = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["sparsity"]) for r in runs["plain"]] == [("dense", 0.0), ("obs", 0.7), ("cap", 0.7)]
    for a, b in zip(runs["plain"], runs["budget"], strict=True):
        assert a["achieved_sparsity"] == pytest.approx(0.7 if a["method"] != "dense" else 0.0, abs=1e-3)
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=2e-3)
    assert runs["plain"][2]["accuracy"] > 0.5  # 10 classes: CAP at 70% keeps the digits model well above chance
