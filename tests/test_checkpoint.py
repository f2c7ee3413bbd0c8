"""Sparse checkpoints, model cards, Hub publishing (test double of HfApi) and bad input."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FakeHfApi, load_script, random_batches
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoModelForImageClassification

from cap_hf import PruningConfig, oneshot_prune, verify_sparsity
from cap_hf.io.checkpoint import (
    CheckpointError,
    load_pruned_model,
    load_sparsity_config,
    save_sparse_checkpoint,
)
from cap_hf.io.hub import HubError, push_checkpoint
from cap_hf.io.models import make_image_processor
from cap_hf.masks import SparsityMismatchError
from model_cards import write_model_card


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def save_pruned(model, folder, method="cap", sparsity=0.6, structure="unstructured", **kwargs):
    config = PruningConfig(method=method, sparsity=sparsity, structure=structure, num_grads=8,
                           fisher_block_size=16, grad_chunk_size=4)
    oneshot_prune(model, config, random_batches(8))
    recipe = {"pruning": config.to_dict(), "command": "python scripts/oneshot.py --method cap"}
    kwargs.setdefault("eval_results", {"eval_accuracy": 0.81, "dense_accuracy": 0.84})
    return save_sparse_checkpoint(model, folder, method=method, structure=structure, recipe=recipe,
                                  image_processor=make_image_processor(8, 1), **kwargs)


@pytest.fixture
def checkpoint(tiny_vit, tmp_path):
    folder = save_pruned(tiny_vit, tmp_path / "ckpt", base_model="google/vit-base-patch16-224")
    write_model_card(folder, repo_id="me/tiny-vit-cap", dataset="uoft-cs/cifar10", dataset_name="CIFAR-10",
                     eval_split="test")
    return tiny_vit, folder


def test_checkpoint_round_trip_is_exact(checkpoint):
    model, folder = checkpoint
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert {"model.safetensors", "sparsity_config.json", "cap_recipe.yaml", "eval_results.json",
            "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}
    loaded, info = AutoModelForImageClassification.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, loaded.eval()(pixel_values=x).logits)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a == 0, b == 0), name
    record = load_sparsity_config(folder)
    assert record["version"] == 1 and record["method"] == "cap" and record["structure"] == "unstructured"
    assert record["overall_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert set(record["per_layer"]) == {n for n, _ in loaded.named_modules() if n.endswith(("_proj", "fc1", "fc2"))}
    assert set(record["versions"]) >= {"cap_hf", "transformers", "torch"}
    report = verify_sparsity(loaded, folder)
    assert report.overall == record["overall_sparsity"]


def test_backbone_checkpoint_loads_with_auto_model(tmp_path):
    from conftest import tiny_vit_config
    from transformers import ViTModel

    torch.manual_seed(0)
    backbone = ViTModel(tiny_vit_config(), add_pooling_layer=False).eval()
    config = PruningConfig(method="magnitude", sparsity=0.5)
    oneshot_prune(backbone, config)
    folder = save_sparse_checkpoint(backbone, tmp_path / "backbone", method="magnitude")
    loaded = load_pruned_model(folder)
    assert type(loaded) is ViTModel
    verify_sparsity(loaded, folder)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(backbone(pixel_values=x).last_hidden_state, loaded(pixel_values=x).last_hidden_state)


def test_verify_reports_drift_after_unmasked_finetuning(checkpoint):
    _, folder = checkpoint
    model = load_pruned_model(folder)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    batch = random_batches(1)[0]
    model(**batch).loss.backward()
    optimizer.step()  # no masks: pruned weights come back
    with pytest.raises(SparsityMismatchError, match=r"vit\.layers\.\d\.(attention|mlp)\.\w+: expected [01]\.\d+, found"):
        verify_sparsity(model, folder)


def test_two_four_structure_is_recorded_and_checked(tiny_vit, tmp_path):
    folder = save_pruned(tiny_vit, tmp_path / "nm", method="magnitude", sparsity=0.5, structure="2:4")
    assert load_sparsity_config(folder)["structure"] == "2:4"
    model = load_pruned_model(folder)
    verify_sparsity(model, folder)
    with torch.no_grad():  # swap a kept and a pruned weight: same sparsity, broken 2:4 groups
        w = model.vit.layers[1].mlp.fc2.weight.view(-1)
        zero = int((w == 0).nonzero()[0])
        other = next(i for i in range(w.numel()) if w[i] != 0 and i // 4 != zero // 4)
        w[zero], w[other] = 1.0, 0.0
    with pytest.raises(SparsityMismatchError, match="groups of 4 with more than 2 non-zeros"):
        verify_sparsity(model, folder)


def test_bad_checkpoint_folders(checkpoint, tmp_path):
    _, folder = checkpoint
    with pytest.raises(CheckpointError, match="not a pruned checkpoint"):
        load_sparsity_config(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "sparsity_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_sparsity_config(broken)
    newer = json.loads((folder / "sparsity_config.json").read_text()) | {"version": 99}
    (broken / "sparsity_config.json").write_text(json.dumps(newer))
    with pytest.raises(CheckpointError, match="upgrade cap_hf"):
        load_sparsity_config(broken)
    (broken / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="missing its weights"):
        load_pruned_model(broken)


def test_model_card_metadata_and_body(checkpoint):
    _, folder = checkpoint
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "google/vit-base-patch16-224" and data["base_model_relation"] == "finetune"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-classification"
    assert data["datasets"] == ["uoft-cs/cifar10"] and data["metrics"] == ["accuracy"]
    assert {"sparse", "pruned", "cap", "unstructured-sparsity"} <= set(data["tags"])
    result = data["model-index"][0]["results"][0]
    assert result["metrics"][0]["value"] == pytest.approx(0.81) and result["dataset"]["split"] == "test"
    record = load_sparsity_config(folder)
    for name, value in record["per_layer"].items():
        assert f"| `{name}` | {100 * value:.2f}% |" in card.text
    assert "84.00%" in card.text and "81.00%" in card.text and "96.43%" in card.text  # recovery 0.81/0.84
    assert "python scripts/oneshot.py --method cap" in card.text and "Kuznedelev" in card.text
    assert 'from_pretrained("me/tiny-vit-cap")' in card.text
    with Image.open(folder / "sparsity_per_layer.png") as chart:
        assert chart.size[0] > 100 and chart.size[1] > 100


def test_a_method_registered_from_outside_gets_its_own_card(tiny_vit, tmp_path, request):
    """To add a method, write one file: registered from outside the package, it prunes, and the card names and
    cites it (not CAP) and says it used no Fisher."""
    from cap_hf.methods import METHODS, PruningMethod, register_method

    request.addfinalizer(lambda: METHODS.pop("seeded-random", None))

    @register_method
    class SeededRandom(PruningMethod):
        name = "seeded-random"
        title = "seeded random scores (a test's method)"
        citation = "@misc{seededrandom, title = {A test's method}}"

        def prepare_layer(self, layer):
            return torch.rand(layer.weights.shape, generator=torch.Generator().manual_seed(0)).to(layer.weights)

        def apply_layer(self, layer, pruned, sparsity):
            return layer.weights.masked_fill(pruned, 0.0)

    folder = save_pruned(tiny_vit, tmp_path / "ckpt", method="seeded-random", sparsity=0.5)
    assert load_sparsity_config(folder)["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    write_model_card(folder, repo_id="me/tiny-vit-random")
    text = (folder / "README.md").read_text()
    assert "Method: seeded random scores (a test's method), unstructured sparsity" in text
    assert "@misc{seededrandom" in text and "Kuznedelev" not in text and "Empirical Fisher" not in text
    assert PruningConfig(method="seeded-random").describe_dampening() == "none (no Fisher)"


def test_model_card_inherits_local_base_license(tiny_vit, tmp_path):
    base = tmp_path / "base"
    tiny_vit.save_pretrained(base)
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    folder = save_pruned(tiny_vit, tmp_path / "ckpt", base_model=str(base), eval_results={"eval_accuracy": 0.5})
    write_model_card(folder, dataset="builtin:digits")
    data = ModelCard.load(folder / "README.md").data.to_dict()
    assert data["license"] == "mit"
    assert "base_model" not in data and "datasets" not in data  # a local path / builtin set is not a Hub id
    assert "No dense baseline" in (folder / "README.md").read_text()


def test_model_card_loads_from_the_folder_it_names_until_pushed(tiny_vit, tmp_path, monkeypatch):
    """Without a Hub id the card's snippet loads the folder by the path given (not its bare name, which works
    only from its parent folder); with one, by the Hub id."""
    monkeypatch.chdir(tmp_path)
    folder = save_pruned(tiny_vit, Path("runs") / "cap60", base_model="google/vit-base-patch16-224")
    write_model_card(folder)
    text = (folder / "README.md").read_text()
    assert 'AutoModelForImageClassification.from_pretrained("runs/cap60")' in text
    write_model_card(folder, repo_id="me/vit-cap60")
    assert 'from_pretrained("me/vit-cap60")' in (folder / "README.md").read_text()


def test_model_card_refuses_a_base_model_or_dataset_that_contradicts_the_record(checkpoint, caplog, capsys):
    """The card states what the run recorded: another base model or dataset is refused (nothing written), or,
    asked for with override_record, written with a warning and a line saying what the run recorded."""
    _, folder = checkpoint
    recipe = yaml.safe_load((folder / "cap_recipe.yaml").read_text())
    recipe["dataset"] = "uoft-cs/cifar10"
    (folder / "cap_recipe.yaml").write_text(yaml.safe_dump(recipe))
    before = folder_digest(folder)
    with pytest.raises(ValueError, match="records the base model 'google/vit-base-patch16-224', but "
                                         "'facebook/deit-small-patch16-224' was given"):
        write_model_card(folder, base_model="facebook/deit-small-patch16-224")
    with pytest.raises(ValueError, match="records the dataset 'uoft-cs/cifar10', but 'ILSVRC/imagenet-1k'"):
        write_model_card(folder, dataset="ILSVRC/imagenet-1k")
    from model_cards.__main__ import main as cards_main

    with pytest.raises(SystemExit, match="--override_record"):
        cards_main([str(folder), "--base_model", "facebook/deit-small-patch16-224"])
    assert folder_digest(folder) == before
    write_model_card(folder, base_model="google/vit-base-patch16-224", dataset="uoft-cs/cifar10")  # agreeing: fine
    with caplog.at_level("WARNING"):
        cards_main([str(folder), "--base_model", "me/vit-base-copy", "--override_record"])
    assert "instead of the recorded 'google/vit-base-patch16-224'" in caplog.text
    card = ModelCard.load(folder / "README.md")
    assert card.data.to_dict()["base_model"] == "me/vit-base-copy"
    assert "The base model me/vit-base-copy was given when this card was written; the run recorded " \
           "google/vit-base-patch16-224." in card.text


def test_push_uploads_the_folder_with_options(checkpoint):
    _, folder = checkpoint
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"x")
    before = folder_digest(folder)
    api = FakeHfApi()
    push_checkpoint(folder, "me/tiny-vit-cap", private=True, revision="v1", create_pr=True,
                    commit_message="sparse model", api=api)
    names = [c[0] for c in api.calls]
    assert names == ["whoami", "auth_check", "create_repo", "create_branch", "upload_folder"]  # may it write? then
    assert api.calls[2][1]["private"] is True and api.calls[2][1]["exist_ok"] is True
    upload = api.calls[4][1]
    assert upload["repo_id"] == "me/tiny-vit-cap" and upload["revision"] == "v1" and upload["create_pr"] is True
    assert upload["commit_message"] == "sparse model"
    assert {"README.md", "model.safetensors", "sparsity_config.json", "cap_recipe.yaml",
            "sparsity_per_layer.png"} <= set(api.uploaded)
    assert not any(name.startswith("checkpoint-") for name in api.uploaded)
    assert folder_digest(folder) == before


def test_failed_push_leaves_folder_unchanged(checkpoint):
    _, folder = checkpoint
    before = folder_digest(folder)
    with pytest.raises(HubError, match="connection reset.*local folder is unchanged"):
        push_checkpoint(folder, "me/tiny-vit-cap", api=FakeHfApi(fail=True))
    assert folder_digest(folder) == before


def test_push_bad_input_fails_before_any_call(checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    _, folder = checkpoint
    before = folder_digest(folder)
    api = FakeHfApi()
    with pytest.raises(HubError, match="not a valid Hub repo id"):
        push_checkpoint(folder, "me/bad name!", api=api)
    with pytest.raises(CheckpointError, match="no config.json"):
        push_checkpoint(tmp_path, "me/x", api=api)
    plain = tmp_path / "plain"  # an ordinary model folder, not pruned by cap_hf
    plain.mkdir()
    for name in ("config.json", "model.safetensors"):
        (plain / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(CheckpointError, match="not a pruned checkpoint"):
        push_checkpoint(plain, "me/x", api=api)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("HfApi must not be created"))
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_checkpoint(folder, "me/x")
    # zeros that disagree with sparsity_config.json
    record = json.loads((folder / "sparsity_config.json").read_text())
    first = next(iter(record["per_layer"]))
    record["per_layer"][first] = 0.1
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for p in folder.iterdir():
        if p.is_file():
            (tampered / p.name).write_bytes(p.read_bytes())
    (tampered / "sparsity_config.json").write_text(json.dumps(record))
    with pytest.raises(SparsityMismatchError, match=first.replace(".", r"\.")):
        push_checkpoint(tampered, "me/x", api=api)
    (tampered / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing its weights"):
        push_checkpoint(tampered, "me/x", api=api)
    assert api.calls == [] and folder_digest(folder) == before


def test_push_script(checkpoint, capsys):
    _, folder = checkpoint
    script = load_script("push_to_hub")
    api = FakeHfApi()
    script.main([str(folder), "--repo_id", "me/tiny", "--create_pr"], api=api)
    assert api.calls[-1][1]["create_pr"] is True and "pushed" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a valid Hub repo id"):
        script.main([str(folder), "--repo_id", "a/b/c"], api=api)
