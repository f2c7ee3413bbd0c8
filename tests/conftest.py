import os

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


def random_batches(num, batch_size=4, channels=1, size=8, labels=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(batch_size, channels, size, size, generator=gen),
             "labels": torch.randint(0, labels, (batch_size,), generator=gen)} for _ in range(num)]
