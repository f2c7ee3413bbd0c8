"""Where the per-layer results of a pruning step wait between prepare and apply: packed CAP snapshots,
OBS inverses, N:M weights. Rows are appended chunk by chunk and read back in the same order.

- "device": kept where they were computed (GPU memory on a GPU, host memory on the CPU);
- "host": copied to host memory (a GPU step whose results do not fit next to the Fisher);
- "disk": written to files in a temporary folder (`offload_dir`), removed by close().
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

STORES = ("device", "host", "disk")
READ_BYTES = 64 * 1024 ** 2  # what one read from disk brings back at most


class Store:
    def __init__(self, where: str = "device", offload_dir: str | None = None):
        if where not in STORES:
            raise ValueError(f"store must be one of {STORES}, got {where!r}.")
        self.where = where
        self._memory: dict[str, list[torch.Tensor]] = {}
        self._files: dict[str, tuple[Path, torch.dtype, tuple[int, ...]]] = {}
        self._tmp = None
        if where == "disk":
            self._tmp = tempfile.TemporaryDirectory(prefix="cap_hf_offload_", dir=offload_dir)
            self.path = Path(self._tmp.name)

    def append(self, key: str, rows: torch.Tensor) -> None:
        """Add rows (first dimension) under `key`. The tensor must not be modified afterwards."""
        rows = rows.detach()
        if self.where == "device":
            self._memory.setdefault(key, []).append(rows)
            return
        if self.where == "host":
            self._memory.setdefault(key, []).append(rows.to("cpu"))
            return
        if self._tmp is None:
            raise RuntimeError("The store was closed.")
        path, dtype, shape = self._files.setdefault(
            key, (self.path / f"{len(self._files):05d}.bin", rows.dtype, tuple(rows.shape[1:])))
        if (rows.dtype, tuple(rows.shape[1:])) != (dtype, shape):
            raise ValueError(f"Rows of {key} changed dtype or shape: {rows.dtype}{tuple(rows.shape[1:])} after "
                             f"{dtype}{shape}.")
        with open(path, "ab") as handle:
            rows.to("cpu").contiguous().numpy().tofile(handle)

    def read(self, key: str) -> Iterator[torch.Tensor]:
        """The rows of `key` in the order they were appended, in chunks."""
        if self.where != "disk":
            yield from self._memory.get(key, [])
            return
        if key not in self._files:
            return
        path, dtype, shape = self._files[key]
        numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        row_items = int(np.prod(shape, dtype=np.int64)) if shape else 1
        row_bytes = max(1, row_items * numpy_dtype.itemsize)
        total = path.stat().st_size // row_bytes
        per_read = max(1, READ_BYTES // row_bytes)
        with open(path, "rb") as handle:
            for start in range(0, total, per_read):
                count = min(per_read, total - start)
                values = np.fromfile(handle, dtype=numpy_dtype, count=count * row_items)
                yield torch.from_numpy(values).view(count, *shape)

    def cat(self, key: str) -> torch.Tensor:
        return torch.cat(list(self.read(key)))

    def close(self) -> None:
        self._memory.clear()
        self._files.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
