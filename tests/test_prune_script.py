"""scripts/prune.py end to end: one process, two processes (DDP over gloo on CPU), bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FakeHfApi, load_script

from cap_hf import verify_sparsity

ROOT = Path(__file__).resolve().parents[1]


def env(threads="1"):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A digits ViT trained from a config (the demo's teacher, cached in a temp folder)."""
    from cap_hf.cli.demo import ensure_digits_teacher

    return ensure_digits_teacher(tmp_path_factory.mktemp("teacher") / "digits-vit", epochs=15)


def prune_args(teacher, out, *extra):
    return ["--model_name_or_path", str(teacher), "--dataset_name", "builtin:digits", "--output_dir", str(out),
            "--sparsity", "0.75", "--num_train_epochs", "2", "--num_grads", "16", "--grad_batch_size", "16",
            "--fisher_block_size", "64", "--per_device_train_batch_size", "32", "--save_strategy", "no",
            "--report_to", "none", "--disable_tqdm", "true", "--crop_scale_min", "0.8", "--hflip", "false",
            *map(str, extra)]


def run(cmd, threads="1"):
    return subprocess.run(cmd, env=env(threads), capture_output=True, text=True, cwd=ROOT)


def test_prune_one_process(teacher, tmp_path, capsys, caplog):
    """In process, so that a test double of HfApi receives the final push. A recipe file (a checkpoint's
    cap_recipe.yaml layout) gives some flags; the command line wins where both set one."""
    out = tmp_path / "run"
    api = FakeHfApi()
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("pruning:\n  damp: 1.0e-05\n  grad_chunk_size: 8\n  elimination_chunk_size: 16\n"
                           "schedule:\n  final_sparsity: 0.75\n")
    with caplog.at_level("WARNING"):
        load_script("prune").main(prune_args(teacher, out, "--push_to_hub", "true", "--hub_model_id", "me/digits-cap",
                                             "--recipe", recipe_file, "--damp", "1e-6"), hub_api=api)
    assert "damp is set both in the recipe" in caplog.text and "the command line wins" in caplog.text
    stdout = capsys.readouterr().out
    metrics = json.loads((out / "all_results.json").read_text())
    assert metrics["sparsity"] == pytest.approx(0.75, abs=1e-4)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["dense_accuracy"] > 0.5
    assert [h["num_grads"] for h in metrics["pruning_history"]] == [16] * len(metrics["pruning_history"])
    from transformers import AutoModelForImageClassification


    model = AutoModelForImageClassification.from_pretrained(out)
    verify_sparsity(model, 0.75, tolerance=1e-4)
    verify_sparsity(model, out)  # against the run's own sparsity_config.json, layer by layer
    assert "dense top-1" in stdout and "pushed" in stdout
    # the checkpoint: record, recipe, evaluation and card, all pushed
    recipe = yaml.safe_load((out / "cap_recipe.yaml").read_text())
    assert recipe["pruning"]["method"] == "cap" and recipe["distillation"]["alpha"] == 0.5
    assert (recipe["pruning"]["damp"], recipe["pruning"]["grad_chunk_size"]) == (1e-6, 8)  # flag, then recipe
    assert recipe["command"].startswith("accelerate launch scripts/prune.py --model_name_or_path")
    assert json.loads((out / "eval_results.json").read_text())["eval_accuracy"] == metrics["eval_accuracy"]
    card = (out / "README.md").read_text()
    assert f"{100 * metrics['eval_accuracy']:.2f}%" in card and f"{100 * metrics['dense_accuracy']:.2f}%" in card
    assert recipe["command"] in card and "top-1 accuracy (test)" in card
    assert 'from_pretrained("me/digits-cap")' in card  # the Hub id it was pushed as
    # the token and the repo are checked before the work, and again right before the upload
    assert [c[0] for c in api.calls] == ["whoami", "auth_check", "whoami", "auth_check", "create_repo", "upload_folder"]
    assert api.calls[-1][1]["repo_id"] == "me/digits-cap"
    assert {"README.md", "sparsity_config.json", "cap_recipe.yaml", "model.safetensors"} <= set(api.uploaded)
    # the folder now holds a run: a second run refuses to overwrite it
    again = run([sys.executable, "scripts/prune.py", *prune_args(teacher, out)])
    assert again.returncode != 0 and "is not empty" in again.stderr
    assert json.loads((out / "all_results.json").read_text()) == metrics


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not on PATH")
def test_prune_two_processes_gloo(teacher, tmp_path):
    out = tmp_path / "ddp"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "scripts/prune.py",
           *prune_args(teacher, out, "--max_memory_gb", 64)]
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    # each step is shared out: a plan per rank within the budget, each rank owning its share of the layers
    assert "on rank 1: memory budget 64.00 GB" in result.stderr and "2 ranks, sizes per rank" in result.stderr
    metrics = json.loads((out / "all_results.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["ranks_identical"] is True
    assert metrics["sparsity"] == pytest.approx(0.75, abs=1e-4)
    history = metrics["pruning_history"]
    assert history and all(h["processes"] == 2 and h["num_grads"] == 16 for h in history)  # 8 per rank, summed


@pytest.mark.parametrize(("extra", "message"), [
    (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["--init_sparsity", "0.9"], "init_sparsity (0.9) must be in [0, sparsity=0.75]"),
    (["--method", "nope"], "Unknown pruning method 'nope'; registered methods: cap, fastcap, magnitude, obs"),
    (["--pruning_schedule", "0:0.5,5:0.75"], "only 2.00 epochs"),
    (["--label_column_name", "target"], "no label column 'target'"),
    (["--push_to_hub", "true", "--hub_model_id", "me/digits-cap"], "HF_HUB_OFFLINE is set"),
    (["--push_to_hub", "true", "--hub_model_id", "me/bad id"], "not a valid Hub repo id"),
    (["--max_memory_gb", "0.01"], "max_memory_gb=0.01 cannot be met"),
    # the digits' calibration split cannot give 1024 gradients of 32 images: said before the dense evaluation
    (["--num_grads", "1024", "--grad_batch_size", "32"], "images in the calibration split, in batches of 32), but "
                                                         "1024 Fisher gradients are needed"),
    (["--dataset_name", "TMP/no-such-folder"], "dataset folder 'TMP/no-such-folder' does not exist"),
    (["--model_name_or_path", "no-such/model"], "model 'no-such/model' not found locally or on the Hub"),
    (["--teacher_name_or_path", "TMP/no-teacher"], "model folder 'TMP/no-teacher' does not exist"),
])
def test_prune_bad_input(teacher, tmp_path, extra, message):
    """One line, from the checks before any work: nothing is evaluated, trained or written."""
    out = tmp_path / "bad"
    extra = [e.replace("TMP", str(tmp_path)) for e in extra]
    result = run([sys.executable, "scripts/prune.py", *prune_args(teacher, out), *extra])
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message.replace("TMP", str(tmp_path)) in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "dense_" not in result.stderr + result.stdout
    assert not out.exists() or not any(out.iterdir())


def test_the_demo_takes_overrides_and_leaves_other_files_alone(teacher, tmp_path, monkeypatch, caplog, capsys):
    """Without a model and a dataset, prune.py is the offline demo with the user's flags over its own, into a
    folder named after them; a previous demo result there is replaced (and the log says so), other files are
    refused untouched. Naming a model leaves demo mode, and a missing flag is a one-line error that says so."""
    from cap_hf.cli import demo

    prune = load_script("prune")
    monkeypatch.chdir(tmp_path)
    taught = []
    monkeypatch.setattr(demo, "ensure_digits_teacher", lambda **kwargs: taught.append(kwargs))
    with caplog.at_level("INFO"):
        argv, (model_args, data_args, _, config, args, _) = prune.parse(["--sparsity", "0.9"])
    assert (config.method, config.sparsity, config.num_grads) == ("cap", 0.9, 64)  # the demo's num_grads
    assert args.output_dir == str(Path("outputs/demo/cap90")) and taught
    assert model_args.model_name_or_path == str(Path("outputs/demo/teacher"))
    assert data_args.dataset_name == "builtin:digits" and argv[-2:] == ["--sparsity", "0.9"]
    assert "offline demo" in caplog.text and "with your flags --sparsity 0.9" in caplog.text
    result = tmp_path / "outputs/demo/cap90"
    (result / "model.safetensors").write_text("an earlier demo's weights")
    with caplog.at_level("INFO"):
        prune.parse(["--sparsity", "0.9"])
    assert not (result / "model.safetensors").exists() and "Replacing the previous demo result" in caplog.text
    other = tmp_path / "outputs/demo/cap75"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds files the demo did not write"):
        prune.parse([])
    assert (other / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        prune.parse(["--model_name_or_path", str(teacher), "--output_dir", "x"])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "required: --dataset_name" in err and "offline demo" in err
    # the teacher is trained once; later runs say they reuse it
    with caplog.at_level("INFO"):
        assert demo.ensure_digits_teacher.__name__ == "<lambda>"
        monkeypatch.undo()
        demo.ensure_digits_teacher(teacher)
    assert f"Reusing the demo's teacher in {teacher} (top-1 " in caplog.text and "train it again" in caplog.text


def test_every_pruning_field_is_a_flag_and_recipes_are_checked(tmp_path):
    """PruningConfig is parsed as it is: fields that prune.py could not reach before (ignore, grad_chunk_size,
    elimination_chunk_size, fastcap_column_block) are flags; a recipe with an unknown key is refused."""
    from cap_hf.config import PruningConfig

    prune = load_script("prune")
    common = ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path / "o")]
    _, (_, _, _, config, args, _) = prune.parse([*common, "--ignore", ".*fc2", "--grad_chunk_size", "8", "--method",
                                           "fastcap", "--elimination_chunk_size", "9", "--fastcap_column_block", "4"])
    assert (config.ignore, config.grad_chunk_size, config.elimination_chunk_size, config.fastcap_column_block) == (
        ".*fc2", 8, 9, 4)
    assert config == PruningConfig(method="fastcap", ignore=".*fc2", grad_chunk_size=8, elimination_chunk_size=9,
                                   fastcap_column_block=4)  # every other field: the one default
    assert args.eval_strategy == "epoch" and args.remove_unused_columns is False
    bad = tmp_path / "bad.yaml"
    bad.write_text("dampening: 1.0e-7\n")
    with pytest.raises(ValueError, match=r"sets \['dampening'\], which are not flags of this script"):
        prune.parse([*common, "--recipe", str(bad)])


@pytest.mark.parametrize("family", ["dinov2", "dino-vit", "deit"])
def test_prune_backbone_without_labels(tmp_path, family):
    """DINO (ViTModel), DINOv2 and DeiT backbones have no head: pruned on the Fisher of their features,
    trained by feature distillation, judged by k-NN, a linear probe and feature cosine; OUT loads with
    AutoModel. With --fisher_objective cross_entropy, the path of before: a linear probe on the labels,
    then pruned and evaluated through it as a classifier."""
    from transformers import (
        AutoModel,
        AutoModelForImageClassification,
        DeiTConfig,
        DeiTModel,
        Dinov2Config,
        Dinov2Model,
        ViTConfig,
        ViTModel,
    )

    from cap_hf.io.models import make_image_processor

    backbone_dir = tmp_path / "backbone"
    if family == "dinov2":
        backbone = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8,
                                            patch_size=2, num_channels=1))
    elif family == "deit":
        backbone = DeiTModel(DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, image_size=8, patch_size=2, num_channels=1),
                             add_pooling_layer=False)
    else:
        backbone = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                      image_size=8, patch_size=2, num_channels=1), add_pooling_layer=False)
    backbone.save_pretrained(backbone_dir)
    make_image_processor(8, 1).save_pretrained(backbone_dir)
    out = tmp_path / "pruned"
    result = run([sys.executable, "scripts/prune.py", *prune_args(backbone_dir, out, "--fisher_block_size", 32)],
                 threads="2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "linear probe" not in result.stderr
    metrics = json.loads((out / "all_results.json").read_text())
    assert metrics["sparsity"] == pytest.approx(0.75, abs=1e-4)
    for key in ("knn_accuracy", "linear_probe_accuracy", "feature_cosine"):
        assert 0 <= metrics[f"eval_{key}"] <= 1 and f"dense_{key}" in metrics
    assert metrics["dense_feature_cosine"] == pytest.approx(1.0) and metrics["eval_feature_cosine"] < 1
    model = AutoModel.from_pretrained(out)
    assert type(model).__name__ == type(backbone).__name__
    verify_sparsity(model, out)
    card = (out / "README.md").read_text()
    assert "weighted k-NN top-1" in card and "Fisher of the output features" in card
    assert "Distillation of the features" in card and "image-feature-extraction" in card
    if family != "dino-vit":
        return
    for extra, message in ((["--distill", "false"], "Keep --distill true"),
                           (["--label_free_fisher", "true"], "Drop --label_free_fisher")):
        bad = run([sys.executable, "scripts/prune.py", *prune_args(backbone_dir, tmp_path / "bad", *extra)], threads="2")
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr[-2000:]
        assert not (tmp_path / "bad").exists()
    probe_out = tmp_path / "probe"
    result = run([sys.executable, "scripts/prune.py", *prune_args(backbone_dir, probe_out, "--probe_epochs", 2,
                                                                 "--fisher_block_size", 32, "--fisher_objective",
                                                                 "cross_entropy")], threads="2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "linear probe" in result.stderr
    model = AutoModelForImageClassification.from_pretrained(probe_out)
    assert model.config.num_labels == 10 and type(model).__name__ == "ViTForImageClassification"
    verify_sparsity(model, probe_out)
