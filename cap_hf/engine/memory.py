"""Peak memory and time per phase of a pruning step.

On the CPU the peak is the process's resident set (RSS): Linux's high-water mark `VmHWM`, reset at the
start of each phase through /proc/self/clear_refs, and a sampling thread as a fallback (and for the
peak of the whole run, which the resets would hide). On CUDA it is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field

import psutil
import torch

GB = 1024 ** 3


def rss_bytes() -> int:
    """Resident memory of this process now."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return psutil.Process().memory_info().rss


def hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def device_memory_bytes(device: torch.device | str | None = None) -> int:
    """Memory in use where the Fisher lives: allocated CUDA memory, or this process's RSS on the CPU."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return rss_bytes()


@dataclass
class PhaseStats:
    seconds: float = 0.0
    peak_bytes: int = 0
    calls: int = 0


@dataclass
class PhaseProfiler:
    """Accumulates wall time and peak memory per named phase; phases may repeat (per layer group).

        profiler = PhaseProfiler()
        with profiler.phase("inversion"):
            ...
        profiler.summary()  # {"inversion": {"seconds": ..., "peak_gb": ...}, ...}

    `device="cuda"` measures torch.cuda.max_memory_allocated. With `track_memory=False` it only times the
    phases (no sampling thread, no resets of the high-water mark): what the engine uses by default.
    """

    device: str = "cpu"
    sample_seconds: float = 0.02
    track_memory: bool = True
    phases: dict[str, PhaseStats] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cuda = torch.device(self.device).type == "cuda" and self.track_memory
        self._hwm = self.track_memory and reset_hwm() and hwm_bytes() is not None
        self._current: str | None = None
        self._sampled = 0
        self._overall = rss_bytes()
        self._stop = threading.Event()
        self._thread = None
        if self.track_memory:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_seconds):
            value = rss_bytes()
            self._sampled = max(self._sampled, value)
            self._overall = max(self._overall, value)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def __del__(self) -> None:  # pragma: no cover - best effort
        self._stop.set()

    @contextlib.contextmanager
    def phase(self, name: str):
        if self._current is not None:
            raise RuntimeError(f"Phase {name!r} started inside phase {self._current!r}; phases do not nest.")
        self._current = name
        stats = self.phases.setdefault(name, PhaseStats())
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if self._hwm:
            reset_hwm()
        self._sampled = rss_bytes() if self.track_memory else 0
        start = time.perf_counter()
        try:
            yield stats
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            stats.seconds += time.perf_counter() - start
            stats.calls += 1
            if self.track_memory:
                host = max(self._sampled, rss_bytes(), (hwm_bytes() or 0) if self._hwm else 0)
                self._overall = max(self._overall, host)
                peak = torch.cuda.max_memory_allocated() if self.cuda else host
                stats.peak_bytes = max(stats.peak_bytes, peak)
            self._current = None

    @property
    def overall_peak_bytes(self) -> int:
        """Peak host RSS since the profiler started (phases and the code between them)."""
        return max(self._overall, rss_bytes(), *(s.peak_bytes for s in self.phases.values() if not self.cuda))

    def seconds(self, *names: str, prefix: str | None = None) -> float:
        """Total seconds of the named phases (and of those starting with `prefix`)."""
        return sum(s.seconds for n, s in self.phases.items() if n in names or (prefix and n.startswith(prefix)))

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: {"seconds": s.seconds, "peak_gb": s.peak_bytes / GB, "calls": s.calls}
                for name, s in self.phases.items()}


def maybe_phase(profiler: PhaseProfiler | None, name: str):
    """profiler.phase(name), or a no-op context without a profiler."""
    return profiler.phase(name) if profiler is not None else contextlib.nullcontext()
