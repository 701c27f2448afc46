"""The epoch loop both backends share, framework-free: progress bars, the running loss and its
NaN check, Ctrl-C and SIGTERM handling, checkpoints after every epoch, and what a run returns.

A backend supplies `train_epoch(epoch, bar, start) -> (mean loss, seconds)` and `evaluate() ->
dict`; `run_epochs` does the rest.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time

import numpy as np
from tqdm.auto import tqdm

from jaxvision.core.config import TrainConfig
from jaxvision.core.errors import Interrupted, TrainingDiverged
from jaxvision.core.results import EpochStats, epoch_line, reached


def check_finite(loss: float, epoch: int, step: int, steps_per_epoch: int, lr: float) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"training loss became {loss} at epoch {epoch}, step {step}/{steps_per_epoch}; "
            f"lower --lr (now {lr:g}) or check the input data"
        )


@dataclasses.dataclass
class Position:
    """Where a run stands: the epoch being trained (0-based) and the steps done in it.

    A checkpoint stores it; with the seed it fixes the data order (`epoch_permutation(seed,
    epoch)`, from batch `step` on) and the step's RNG (folded in from the global step).
    """

    epoch: int = 0
    step: int = 0
    loss_total: float = 0.0  # the sum of those steps' losses
    seconds: float = 0.0  # their training time


class StopRequested(Exception):
    """Ctrl-C or SIGTERM arrived; raised between two optimiser steps, with the position reached."""

    def __init__(self, position: Position):
        super().__init__(position)
        self.position = position


_stop = threading.Event()
_stopped_by: list[int] = []  # the signal that this process received


class SyncPoint:
    """A multi-process run's agreement on where to stop. `reached(n)` is asked at every dispatch
    of training steps, with n = 1, 2, 3, ... counted from the start of this process's run, by
    every process alike, and comes true at the same n in all of them once any process has had a
    preemption notice (`jax.experimental.multihost_utils.reached_preemption_sync_point`: the
    notice fixes the count after the furthest one asked, so no count may be skipped, and nothing
    else may ask it; `jaxvision.training.checkpoint` keeps orbax from asking). `reached=None`:
    JAX's preemption service is off, and no signal is handled. JAX takes one notice a process."""

    def __init__(self, reached=None):
        self.reached, self.calls = reached, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.reached(self.calls)


_sync_point: list[SyncPoint] = []  # while a --distributed run trains


class stop_on_signal:
    """Within it, the first Ctrl-C (SIGINT), or a SIGTERM (what a scheduler or `kill` sends
    before it preempts a job), asks training to stop after the current step, so that a checkpoint
    of a consistent state can be saved. A second Ctrl-C ends the process at once; a second SIGTERM
    is ignored (Slurm sends one more before its SIGKILL), so the save it asked for can finish.

    With a `sync_point` (a `--distributed` run) every process must stop after the same step, or
    the others would wait in that step's collectives. SIGTERM is left to the preemption notice
    that `jax.distributed` installs, Ctrl-C is passed on to it, and training stops where the
    sync point says."""

    def __init__(self, sync_point: SyncPoint | None = None):
        self.sync_point = sync_point
        self.signals = (signal.SIGINT, signal.SIGTERM)
        if sync_point:  # without JAX's notice (the service off), Ctrl-C ends the process
            self.signals = (signal.SIGINT,) if sync_point.reached else ()

    def __enter__(self):
        _stop.clear()
        _stopped_by.clear()
        _sync_point[:] = [self.sync_point] if self.sync_point else []
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def _handle(self, signum, frame):
        _stopped_by.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once
        if self.sync_point:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notice, which tells every process
            print("\nSIGINT: stopping every process after the same step (Ctrl-C again to quit "
                  "now)", file=sys.stderr)  # fmt: skip
            return
        _stop.set()
        signal.signal(signal.SIGTERM, self._again)
        quit_now = "Ctrl-C again" if signum == signal.SIGINT else "Ctrl-C or SIGKILL"
        print(f"\n{signal.Signals(signum).name}: stopping after this step ({quit_now} to quit "
              "now)", file=sys.stderr)  # fmt: skip

    def _again(self, signum, frame):
        print("SIGTERM again: already stopping after this step", file=sys.stderr)

    def __exit__(self, *exc):
        if self.installed:
            for s, previous in self.previous.items():
                signal.signal(s, previous)
        _stop.clear()
        _stopped_by.clear()
        _sync_point.clear()


def _stop_requested() -> bool:
    """Whether training stops after the steps just dispatched. Called once per dispatch."""
    sync = _sync_point[0] if _sync_point else None
    if sync and sync.reached and not _stop.is_set() and sync():
        _stop.set()
    return _stop.is_set()


class LossTracker:
    """The running mean of an epoch's step losses, for the progress bar and the NaN check.

    Step losses stay on the device; every `log_every` steps they are fetched in one go (the only
    fetch inside an epoch; the JAX trainer also waits, without fetching, so that no more than
    its MAX_IN_FLIGHT steps are queued), checked for NaN/inf, and shown on the bar. A resumed
    epoch starts from its checkpointed `Position`. After a Ctrl-C or SIGTERM (in a
    `--distributed` run: at the dispatch its `SyncPoint` names), `add` checks the pending losses
    and raises `StopRequested`.
    """

    def __init__(self, config: TrainConfig, epoch: int, steps: int, fetch, bar=None,
                 start: Position | None = None):  # fmt: skip
        self.config, self.epoch, self.steps, self.fetch, self.bar = config, epoch, steps, fetch, bar
        start = start or Position(epoch)
        self.pending: list = []  # device losses: scalars, or arrays whose first n are real
        self.counts: list[int] = []  # the n of each
        self.n_pending = 0
        self.values: list[float] = []  # this call's step losses, in order
        self.total, self.seen, self.seconds = start.loss_total, start.step, start.seconds
        self.t0 = time.perf_counter()

    def add(self, loss, n: int = 1) -> None:
        """The loss of the step just taken, or the n steps just taken: the first n of `loss`."""
        self.pending.append(loss)
        self.counts.append(n)
        self.n_pending += n
        stop = _stop_requested()
        if (
            self.n_pending >= self.config.log_every
            or self.seen + self.n_pending == self.steps
            or stop
        ):
            self.flush()
        if stop and self.seen < self.steps:
            raise StopRequested(self.position())

    def position(self) -> Position:
        return Position(self.epoch, self.seen, self.total, self.elapsed())

    def elapsed(self) -> float:
        """Training seconds of this epoch so far, including those before a resume."""
        return self.seconds + time.perf_counter() - self.t0

    def flush(self) -> None:
        if not self.pending:
            return
        fetched = zip(self.fetch(self.pending), self.counts, strict=True)
        values = np.concatenate([np.ravel(v)[:n] for v, n in fetched])
        for i, v in enumerate(values):  # name the first bad step, not just "some step"
            check_finite(float(v), self.epoch + 1, self.seen + i + 1, self.steps, self.config.lr)
        values = [float(v) for v in values]
        self.values += values
        for v in values:  # one by one, in float64, which holds a sum of an epoch's float32 losses
            self.total += v  # exactly: the mean does not depend on where a resume split the epoch
        self.seen += len(values)
        self.pending, self.counts, self.n_pending = [], [], 0
        if self.bar is not None:
            self.bar.update(len(values))
            self.bar.set_postfix(loss=f"{self.mean:.4f}", refresh=False)

    @property
    def mean(self) -> float:
        return self.total / max(self.seen, 1)


def run_epochs(config: TrainConfig, steps: int, train_epoch, evaluate, checkpoints=None,
               sync_point: SyncPoint | None = None):  # fmt: skip
    """The epoch loop both backends share: a progress bar per epoch, then a test-set line.

    train_epoch(epoch, bar, start: Position) -> (mean train loss, seconds); evaluate() -> dict
    with loss, accuracy, f1_macro and preds (a classifier's also confidence, each prediction's
    probability). `checkpoints` (a `jaxvision.core.checkpoint.Checkpoints`) resumes the run,
    saves it after every epoch and on Ctrl-C or SIGTERM (a `--distributed` run: where its
    `sync_point` says, on every process).
    Returns the history and the last evaluation, its preds and confidence as numpy.
    """
    start, history = checkpoints.start() if checkpoints else (Position(), [])
    if any(reached(h, config.target_accuracy) for h in history):  # resumed after the target
        print(f"note: the checkpoint already reached --target-accuracy "
              f"{config.target_accuracy:.2%}; nothing more to train")  # fmt: skip
        return history, _as_numpy(evaluate())
    with stop_on_signal(sync_point):
        for epoch in range(start.epoch, config.epochs):
            position = start if epoch == start.epoch else Position(epoch)
            ev = _train_and_evaluate_epoch(config, steps, train_epoch, evaluate, checkpoints,
                                           position, history, tqdm)  # fmt: skip
            # A signal during evaluation or saving: the epoch is saved. After the last epoch the
            # run is complete, and finishes (a resume would have nothing left to train).
            if _stop.is_set() and epoch + 1 < config.epochs:
                raise _interrupted(checkpoints, Position(epoch + 1), steps, history)
            if ev is not None and reached(history[-1], config.target_accuracy):
                if config.progress:
                    tqdm.write(f"reached --target-accuracy {config.target_accuracy:.2%}: "
                               f"stopping after epoch {epoch + 1}")  # fmt: skip
                break
    return history, _as_numpy(ev)


def _as_numpy(ev: dict) -> dict:
    return {**ev, **{k: np.asarray(ev[k]) for k in ("preds", "confidence") if k in ev}}


def _interrupted(checkpoints, position: Position, steps: int, history) -> Interrupted:
    where = f"epoch {position.epoch + 1}, step {position.step}/{steps}"
    if position.step == 0:
        where = f"the end of epoch {position.epoch}"
    signum = _stopped_by[0] if _stopped_by else signal.SIGTERM
    what = {signal.SIGINT: "interrupted", signal.SIGTERM: "stopped by SIGTERM"}[signum]
    if not _stopped_by:  # a --distributed run's sync point: JAX had the SIGTERM, not Python
        what = "stopped with the whole run (a SIGTERM or Ctrl-C to one of its processes)"
    if checkpoints is None:
        return Interrupted(f"{what} at {where}; nothing saved (no --checkpoint-dir)", signum)
    path = checkpoints.save(position, history)
    return Interrupted(f"{what} at {where}; saved {path}; continue with --resume", signum)


def _train_and_evaluate_epoch(config, steps, train_epoch, evaluate, checkpoints, position,
                              history, tqdm) -> dict:  # fmt: skip
    epoch = position.epoch
    with tqdm(
        total=steps,
        initial=position.step,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        unit="step",
        disable=not config.progress,
        leave=False,
        mininterval=0.5,
    ) as bar:
        try:
            train_loss, train_s = train_epoch(epoch, bar, position)
        except StopRequested as stop:
            raise _interrupted(checkpoints, stop.position, steps, history) from None
        except TrainingDiverged as e:
            kept = checkpoints.describe_latest() if checkpoints else "no --checkpoint-dir"
            raise TrainingDiverged(f"{e} (last good checkpoint: {kept})") from None
    if (epoch + 1) % config.eval_every and epoch + 1 < config.epochs:  # --eval-every
        ev, stats = None, EpochStats(epoch + 1, float(train_loss), None, None, None, train_s, 0.0)
    else:
        t0 = time.perf_counter()
        ev = evaluate()
        stats = EpochStats(
            epoch + 1,
            float(train_loss),
            float(ev["loss"]),
            float(ev["accuracy"]),
            float(ev["f1_macro"]),
            train_s,
            time.perf_counter() - t0,
            ev.get("extras", {}),
        )
    history.append(stats)
    if config.progress:
        tqdm.write(epoch_line(stats, config.epochs))
    if checkpoints is not None:
        checkpoints.save(Position(epoch + 1), history)
    return ev
