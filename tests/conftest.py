import os
import subprocess
import sys
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


def tiny_resnet(layer_type="bottleneck", classifier=True, **overrides):
    """A small transformers ResNet with non-trivial batch-norm statistics, in eval mode."""
    from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel

    torch.manual_seed(0)
    values = dict(num_channels=1, embedding_size=8, hidden_sizes=[16, 32], depths=[2, 1], layer_type=layer_type,
                  num_labels=10)
    values.update(overrides)
    config = ResNetConfig(**values)
    model = ResNetForImageClassification(config) if classifier else ResNetModel(config)
    for module in model.modules():  # non-trivial batch-norm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


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
    """Records the calls push_checkpoint makes; `fail` makes upload_folder raise like a network error. `whoami` is
    what the Hub's whoami-v2 answers (default: user 'me' with a write token); `existing` maps repo ids that exist
    to whether this token may write to them."""

    def __init__(self, fail: bool = False, whoami: dict | Exception | None = None, existing: dict | None = None):
        self.calls, self.fail, self.uploaded = [], fail, None
        self.who = whoami if whoami is not None else {"name": "me", "orgs": [{"name": "my-org", "roleInOrg": "write"}],
                                                      "auth": {"accessToken": {"role": "write"}}}
        self.existing = existing or {}

    def whoami(self, token=None):
        self.calls.append(("whoami", {"token": token}))
        if isinstance(self.who, Exception):
            raise self.who
        return self.who

    def auth_check(self, repo_id, *, repo_type=None, token=None, write=False):
        self.calls.append(("auth_check", {"repo_id": repo_id, "write": write}))
        if repo_id not in self.existing:
            raise hub_error("RepositoryNotFoundError", 404)
        if write and not self.existing[repo_id]:
            raise hub_error("HfHubHTTPError", 403)

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


def hub_error(kind: str, status: int):
    """An error of huggingface_hub.errors as the Hub's answer `status` raises it."""
    import importlib

    from huggingface_hub import errors

    http = importlib.import_module(errors.Response.__module__.split(".")[0])  # the HTTP library huggingface_hub uses
    request = http.Request("GET", "https://huggingface.co/api/models/x/auth-check")
    return getattr(errors, kind)(f"{status} from the Hub", response=http.Response(status, request=request))


ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def run_script(name, *args, check=True):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], env=ENV,
                            capture_output=True, text=True, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "digits"
    run_script("prepare_data.py", "--dataset", "digits", "--output_dir", out)
    return out


@pytest.fixture(scope="session")
def digits_model(digits_dir, tmp_path_factory):
    """A small ViT trained on scikit-learn digits by scripts/train_dense.py."""
    out = tmp_path_factory.mktemp("models") / "digits-vit"
    run_script("train_dense.py", "--dataset_name", digits_dir, "--output_dir", out, "--image_size", 8,
               "--patch_size", 2, "--hidden_size", 32, "--num_hidden_layers", 2, "--num_attention_heads", 2,
               "--num_train_epochs", 20, "--learning_rate", 3e-3, "--per_device_train_batch_size", 32,
               "--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none")
    return out


def assert_computes_and_reloads(small, reference, x, folder):
    """`small` computes what `reference` (the masked dense model) does on x, and reloads from `folder` with
    AutoModelForImageClassification to the same outputs bit for bit."""
    from transformers import AutoModelForImageClassification

    with torch.no_grad():
        torch.testing.assert_close(small(pixel_values=x).logits, reference(pixel_values=x).logits, rtol=1e-4, atol=1e-5)
    small.save_pretrained(folder)
    loaded = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, small(pixel_values=x).logits)


def assert_cap_on_top(folder, data, out, num_grads=8):
    """scripts/oneshot.py prunes a structurally pruned folder to 50% with CAP (structured first, then CAP)."""
    import json

    run_script("oneshot.py", "--model_name_or_path", folder, "--dataset_name", data, "--method", "cap",
               "--sparsity", 0.5, "--num_grads", num_grads, "--grad_batch_size", 8, "--fisher_block_size", 8,
               "--output_dir", out)
    record = next(r for r in json.loads((out / "results.json").read_text()) if r["method"] == "cap")
    assert abs(record["achieved_sparsity"] - 0.5) < 0.01 and record["accuracy"] > 0.1
