"""Timing and memory helpers shared by the benchmark and its workers, framework-free."""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path


def median_time(fn, repeats: int = 5) -> float:
    """The median wall time of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_host_mb() -> float:
    """This process's peak resident set size (VmHWM), in MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class BenchWorker:
    """What every backend's benchmark worker shares: its own `Trainer` (`train_epoch` over the
    real training path, `evaluate`), timed. A subclass sets `self.trainer`, then `warm_up()`."""

    trainer = None
    epoch = 0

    def threads(self) -> int:
        """The threads its framework computes with: XLA:CPU's intra-op pool takes one per core
        this process may run on (torch overrides this with its own setting)."""
        return len(os.sched_getaffinity(0))

    def float32_matmuls(self) -> str:
        """What a float32 matmul computes in: 'float32', or 'tf32' on a GPU's tensor cores."""
        return "float32"

    def warm_up(self) -> float:
        """An epoch, an evaluation, another epoch; returns how much longer the first took (the
        first-call costs: compilation, allocation)."""
        first = self.train()
        self.infer()
        return max(first - self.train(), 0.0)

    def train(self) -> float:
        """One training epoch; its seconds."""
        _, seconds = self.trainer.train_epoch(self.epoch)
        self.epoch += 1
        return seconds

    def infer(self) -> float:
        """One evaluation over the test split; its seconds, after the device is done."""
        t0 = time.perf_counter()
        self.trainer.evaluate()
        self.sync()
        return time.perf_counter() - t0

    def sync(self) -> None:
        """Waits for the device; a no-op where `evaluate` already returns host values."""
