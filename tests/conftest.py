import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402


def tiny_vit_config(**overrides) -> ViTConfig:
    values = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=8, patch_size=2, num_channels=1, num_labels=10)
    values.update(overrides)
    return ViTConfig(**values)


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    return ViTForImageClassification(tiny_vit_config()).eval()


def load_script(name: str):
    """Import scripts/NAME.py as a module (registered in sys.modules, as dataclasses need)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"script_{name}", Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def random_batches(num, batch_size=4, channels=1, size=8, labels=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(batch_size, channels, size, size, generator=gen),
             "labels": torch.randint(0, labels, (batch_size,), generator=gen)} for _ in range(num)]


class FakeHfApi:
    """Records the calls push_checkpoint makes; `fail` makes upload_folder raise like a network error."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail, self.uploaded = [], fail, None

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return type("RepoUrl", (), {"repo_id": kwargs["repo_id"]})()

    def create_branch(self, **kwargs):
        self.calls.append(("create_branch", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if self.fail:
            raise ConnectionError("connection reset by peer")
        from huggingface_hub.utils import filter_repo_objects

        root = Path(kwargs["folder_path"])
        files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
        self.uploaded = sorted(filter_repo_objects(files, ignore_patterns=kwargs["ignore_patterns"]))
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/me/x/commit/abc", "pr_url": None})()
