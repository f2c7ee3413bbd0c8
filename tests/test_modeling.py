"""Physically smaller ViTs and ResNets: per-layer sizes, Auto classes, and trust_remote_code loading without cap_hf."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_resnet, tiny_vit_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    ViTForImageClassification,
    ViTModel,
)

from cap_hf.modeling import PrunedViTConfig, PrunedViTForImageClassification, PrunedViTModel
from cap_hf.structured import shrink_vit

KEEP_HEADS = {0: [1, 3], 2: [2]}
KEEP_NEURONS = {1: list(range(0, 64, 3)), 2: [5, 7, 60]}


def masked_copy(model):
    """The dense model with the dropped heads' o_proj columns and dropped neurons' fc2 columns zeroed."""
    dense = type(model)(model.config).eval()
    dense.load_state_dict(model.state_dict())
    layers = dense.vit.layers if hasattr(dense, "vit") else dense.layers
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for i, heads in KEEP_HEADS.items():
            for h in set(range(model.config.num_attention_heads)) - set(heads):
                layers[i].attention.o_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0
        for i, neurons in KEEP_NEURONS.items():
            drop = sorted(set(range(model.config.intermediate_size)) - set(neurons))
            layers[i].mlp.fc2.weight[:, drop] = 0
    return dense


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return ViTForImageClassification(tiny_vit_config(num_hidden_layers=3, num_attention_heads=4)).eval()


def test_shrunk_vit_equals_masked_dense_and_is_smaller(vit):
    small = shrink_vit(vit, KEEP_HEADS, KEEP_NEURONS).eval()
    assert isinstance(small, PrunedViTForImageClassification)
    assert small.config.layer_num_heads == [2, 4, 1]
    assert small.config.layer_intermediate_sizes == [64, 22, 3]
    assert small.vit.layers[2].attention.q_proj.weight.shape == (8, 32)
    assert small.num_parameters() < vit.num_parameters()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(pixel_values=x).logits, masked_copy(vit)(pixel_values=x).logits)


def test_backbone_shrinks_too():
    torch.manual_seed(0)
    backbone = ViTModel(tiny_vit_config(num_hidden_layers=3, num_attention_heads=4)).eval()
    small = shrink_vit(backbone, KEEP_HEADS, KEEP_NEURONS).eval()
    assert isinstance(small, PrunedViTModel) and small.pooler is not None
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(pixel_values=x).pooler_output,
                                   masked_copy(backbone)(pixel_values=x).pooler_output)


def test_save_and_load_with_auto_classes(vit, tmp_path):
    small = shrink_vit(vit, KEEP_HEADS, KEEP_NEURONS).eval()
    small.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "pruned_vit"
    assert config["auto_map"]["AutoModelForImageClassification"].startswith("modeling_pruned_vit.")
    assert (tmp_path / "modeling_pruned_vit.py").is_file() and (tmp_path / "configuration_pruned_vit.py").is_file()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PrunedViTConfig)
    loaded, info = AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(small(pixel_values=x).logits, loaded.eval()(pixel_values=x).logits)
    assert isinstance(AutoModel.from_pretrained(tmp_path), PrunedViTModel)


@pytest.mark.parametrize("family", ["vit", "resnet", "dinov2"])
def test_trust_remote_code_without_cap_hf(vit, tmp_path, family):
    from cap_hf.structured import shrink_resnet

    if family == "vit":
        small, x = shrink_vit(vit, KEEP_HEADS, KEEP_NEURONS).eval(), torch.randn(3, 1, 8, 8)
    elif family == "dinov2":
        from test_structured_dinov2 import dinov2

        from cap_hf.structured.groups import ChannelGraph, remove_channels

        model = dinov2()
        small, x = remove_channels(model, ChannelGraph(model, 8), {0: [3], 1: [1], 4: [0, 2]}), torch.randn(3, 1, 8, 8)
    else:
        small, x = shrink_resnet(tiny_resnet(), {1: [[0, 1], [3]]}).eval(), torch.randn(3, 1, 16, 16)
    folder = tmp_path / "small"
    small.save_pretrained(folder)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(small(pixel_values=x).logits, tmp_path / "expected.pt")
    code = f"""
import sys
sys.modules["cap_hf"] = None  # importing cap_hf now fails: only the files in the folder may be used
import torch
torch.set_num_threads({torch.get_num_threads()})  # the parent's count: same reduction order, identical logits
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
assert "cap_hf" not in type(model).__module__, type(model).__module__
with torch.no_grad():
    logits = model(pixel_values=torch.load({str(tmp_path / 'x.pt')!r})).logits
assert torch.equal(logits, torch.load({str(tmp_path / 'expected.pt')!r}))
print("OK", type(model).__module__)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PYTHONPATH": "", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK transformers_modules" in result.stdout


def test_bad_sizes_are_rejected(vit):
    with pytest.raises(ValueError, match="layer_num_heads has 2 entries but the model has 3 layers"):
        PrunedViTConfig(**{**tiny_vit_config(num_hidden_layers=3).to_dict(), "layer_num_heads": [1, 1]})
    with pytest.raises(ValueError, match=r"layer 0 heads: kept indices must be distinct, in \[0, 4\)"):
        shrink_vit(vit, {0: [4]})
    with pytest.raises(ValueError, match=r"Layers \[7\] do not exist"):
        shrink_vit(vit, keep_neurons={7: [0]})


@pytest.mark.parametrize("layer_type", ["bottleneck", "basic"])
def test_shrunk_resnet_equals_masked_dense_and_round_trips(layer_type, tmp_path):
    from cap_hf.modeling import PrunedResNetForImageClassification
    from cap_hf.structured import shrink_resnet

    model = tiny_resnet(layer_type)
    if layer_type == "bottleneck":  # inner widths 4 / 4 / 8 for blocks 0 / 1 / 2
        keep = {0: [[0, 2, 3], [1]], 2: [None, [0, 5, 6]]}
    else:  # inner widths 16 / 16 / 32
        keep = {0: [[0, 2, 3, 9]], 2: [list(range(0, 32, 4))]}
    small = shrink_resnet(model, keep).eval()
    assert isinstance(small, PrunedResNetForImageClassification)
    assert small.num_parameters() < model.num_parameters()
    dense = copy.deepcopy(model)
    blocks = [block for stage in dense.resnet.encoder.stages for block in stage.layers]
    with torch.no_grad():  # zero the outgoing weights of the dropped channels
        for b, lists in keep.items():
            convs = list(blocks[b].layer)
            for j, channels in enumerate(lists):
                if channels is not None:
                    drop = sorted(set(range(convs[j].convolution.out_channels)) - set(channels))
                    convs[j + 1].convolution.weight[:, drop] = 0
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        expected = dense(pixel_values=x).logits
        torch.testing.assert_close(small(pixel_values=x).logits, expected)
    small.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert json.loads((tmp_path / "config.json").read_text())["block_widths"] == small.config.block_widths
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, small(pixel_values=x).logits)


def test_shrink_resnet_bad_input():
    from cap_hf.structured import shrink_resnet

    model = tiny_resnet()
    with pytest.raises(ValueError, match=r"Blocks \[9\] do not exist; the model has 3 residual blocks"):
        shrink_resnet(model, {9: [None, None]})
    with pytest.raises(ValueError, match="Block 0 has 2 inner widths to choose, got 1 lists"):
        shrink_resnet(model, {0: [[0]]})
