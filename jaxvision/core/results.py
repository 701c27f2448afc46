"""What a run reports, framework-free: `metrics.json`, the results table row, the epoch line and
the host description.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jaxvision.core.config import TrainConfig
from jaxvision.core.data import OFFICIAL_TEST_SET, Dataset
from jaxvision.core.errors import UserError, WriteFailed
from jaxvision.core.figures import confusion_matrix


@dataclasses.dataclass
class EpochStats:
    epoch: int
    train_loss: float
    test_loss: float | None  # None: no evaluation after this epoch (--eval-every)
    test_accuracy: float | None
    test_f1_macro: float | None
    train_time_s: float
    eval_time_s: float
    extras: dict = dataclasses.field(default_factory=dict)  # arch-specific figures (detection)


@dataclasses.dataclass
class RunResult:
    history: list[EpochStats]
    params: int
    device: str
    compile_time_s: float  # JAX: ahead-of-time compilation of the train and eval steps
    predictions: np.ndarray | None = None  # the last evaluation's predicted test labels
    model: object = None  # the trained model (Flax, in eval mode, or torch), for inspection
    extras: dict | None = None  # arch-specific figures for metrics.json (faster_rcnn: detection)
    # classifiers: the softmax probability of each of `predictions`, from the same evaluation
    confidence: np.ndarray | None = None

    @property
    def final(self) -> EpochStats:
        return self.history[-1]

    @property
    def train_time_s(self) -> float:
        """Wall time of the training steps of every epoch; excludes loading, compiling, eval."""
        return sum(h.train_time_s for h in self.history)


# Accuracy arrives as a float32 mean: 9,900 of 10,000 reads 0.98999995. One image in a million
# is far below that slack and far above float32's rounding near 1.
TARGET_SLACK = 1e-6


def reached(stats: EpochStats, target: float | None) -> bool:
    """Whether this epoch's evaluation reached --target-accuracy."""
    return (
        target is not None
        and stats.test_accuracy is not None
        and (stats.test_accuracy >= target - TARGET_SLACK)
    )


def time_to_target(history: list[EpochStats], target: float | None) -> tuple[int, float] | None:
    """(epoch, seconds): the first evaluation whose test accuracy reaches `target`, and the
    training and evaluation seconds up to and including it (compilation excluded); None when no
    evaluation reached it (or no target)."""
    if target is None:
        return None
    seconds = 0.0
    for h in history:
        seconds += h.train_time_s + h.eval_time_s
        if reached(h, target):
            return h.epoch, seconds
    return None


def describe_host() -> str:
    """'<CPU model>, <n> cores' for the results table."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def default_out_dir(config: TrainConfig) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{config.arch}-{config.backend}-{stamp}"
    out, i = base, 1
    while out.exists():
        out, i = Path(f"{base}-{i}"), i + 1
    return out


def metrics_record(config: TrainConfig, data: Dataset, result: RunResult) -> dict:
    final = result.final
    return {
        "arch": config.arch,
        "backend": config.backend,
        "preset": config.preset,
        "dataset": data.name,
        "data_source": data.data_source,
        "data": data.source,
        "n_train": data.n_train,
        "n_test": data.n_test,
        "test_set": data.test_set,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "test_accuracy": final.test_accuracy,
        "test_f1_macro": final.test_f1_macro,
        "train_loss": final.train_loss,
        "test_loss": final.test_loss,
        "train_time_s": result.train_time_s,
        "compile_time_s": result.compile_time_s,
        "eval_time_s": sum(h.eval_time_s for h in result.history),
        "epochs_trained": final.epoch,
        **target_record(config.target_accuracy, result.history),
        "params": result.params,
        "device": result.device,
        "host": describe_host(),
        "seed": config.seed,
        **({"detection": result.extras} if result.extras else {}),
        "confusion_matrix": confusion_matrix(
            data.y_test, result.predictions, data.num_classes
        ).tolist(),  # fmt: skip
        "history": [dataclasses.asdict(h) for h in result.history],
        "config": dataclasses.asdict(config),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def target_record(target: float | None, history: list[EpochStats]) -> dict:
    """metrics.json's --target-accuracy fields: the target, and the epoch and seconds to it
    (None where it was not reached); nothing without a target."""
    if target is None:
        return {}
    epoch, seconds = time_to_target(history, target) or (None, None)
    return {"target_accuracy": target, "target_epoch": epoch, "time_to_target_s": seconds}


def target_line(record: dict) -> str | None:
    """The run's --target-accuracy line: the time to it ('time to 99.00%: 12.3 s (epoch 7,
    ...)'), or a note that it was not reached; None without a target."""
    if record.get("target_accuracy") is None:
        return None
    target = f"{record['target_accuracy']:.2%}"
    if record["time_to_target_s"] is None:
        return (f"note: --target-accuracy {target} was not reached in {record['epochs']} epochs "
                f"(last: {record['test_accuracy']:.2%})")  # fmt: skip
    return (
        f"time to {target}: {record['time_to_target_s']:.1f} s (epoch "
        f"{record['target_epoch']}, training and evaluation, compilation excluded)"
    )


def write_metrics(record: dict, out_dir: Path) -> Path:
    """out_dir/metrics.json. When it cannot be written, the record goes to stderr as JSON, so
    the run's result is not lost, and a UserError says so."""
    path = out_dir / "metrics.json"
    text = json.dumps(record, indent=2) + "\n"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        print(text, file=sys.stderr, end="")
        raise WriteFailed(f"cannot write {path} ({e.strerror}); the metrics are above, on stderr, "
                          "as JSON") from None  # fmt: skip
    return path


def probe_writable(folder: Path, flag: str, files: Iterable[str] = ()) -> None:
    """A UserError now, before any data is loaded or step taken, when `folder` could not be
    created or written, or already holds a folder by the name of one of the `files` the command
    will write there. Creates nothing: it writes and removes a file in `folder`, or in the
    nearest folder above it that exists."""
    for name in files:
        if (folder / name).is_dir():
            raise UserError(f"{flag} {folder} holds a folder named {name}, where this command "
                            f"writes a file; move it, or choose another {flag}")  # fmt: skip
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {folder} cannot be created: {existing} is a file; choose a "
                        "folder you can write to")  # fmt: skip
    probe = existing / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {folder} is not writable ({e.strerror}); choose a folder you "
                        "can write to") from None  # fmt: skip


def probe_writable_file(path: Path, flag: str) -> None:
    """`probe_writable` for a file to be written at `path`: a UserError now if it is a folder,
    or its folder could not be created or written."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    probe_writable(path.parent, f"{flag} {path}: its folder")


RESULTS_COLUMNS = (
    "model",
    "backend",
    "dataset",
    "accuracy",
    "F1 (macro)",
    "train loss",
    "test loss",
    "train time",
    "params",
    "device",
)
RESULTS_HEADER = "| " + " | ".join(RESULTS_COLUMNS) + " |\n" + "|---" * len(RESULTS_COLUMNS) + "|"


def data_label(record: dict) -> str:
    """A run's data for a table cell: "mnist (5,000/10,000 official test)"."""
    if "n_train" not in record:
        return record["dataset"]
    official = " official test" if record.get("test_set") == OFFICIAL_TEST_SET else ""
    return f"{record['dataset']} ({record['n_train']:,}/{record['n_test']:,}{official})"


def results_row(record: dict) -> str:
    return (
        f"| {record['arch']}"
        + (f" ({record['preset']})" if record.get("preset") else "")
        + f" | {record['backend']}"
        + f" | {data_label(record)}"
        f" | {record['test_accuracy']:.2%} | {record['test_f1_macro']:.4f}"
        f" | {record['train_loss']:.4f} | {record['test_loss']:.4f}"
        f" | {record['train_time_s']:.1f} s | {record['params']:,} | {record['device']} |"
    )


def epoch_line(stats: EpochStats, epochs: int) -> str:
    extras = stats.extras
    detection = (
        f" | mAP@0.5 {extras['map50']:.4f} | top-box IoU {extras['mean_iou']:.3f} | "
        f"fallbacks {extras['fallbacks']}"
        if "map50" in extras
        else ""
    )
    test = (
        f"test loss {stats.test_loss:.4f} | test acc {stats.test_accuracy:.2%} | "
        f"F1 {stats.test_f1_macro:.4f}{detection}"
        if stats.test_accuracy is not None
        else "(not evaluated: --eval-every)"
    )
    return (
        f"epoch {stats.epoch}/{epochs}: train loss {stats.train_loss:.4f} | {test} | "
        f"{stats.train_time_s:.1f} s"
    )
