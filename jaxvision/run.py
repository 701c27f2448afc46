"""What a training run is given and what it reports, shared by both backends.

`TrainConfig` is built by the CLI (`jaxvision.cli`) from argparse. A backend's
`train_and_evaluate(config, data)` returns a `RunResult`, and `metrics_record` turns it into the
`metrics.json` that every arch and backend writes with the same keys.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from jaxvision.configs import ARCH_PRESETS, IMAGENET_ARCHS, TORCH_ONLY_ARCHS, get_config
from jaxvision.data import Dataset
from jaxvision.errors import Interrupted, TrainingDiverged, UserError

BACKENDS = ("jax", "torch")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")

# Per-arch defaults for the flags left unset on the command line. The CNN trains as the lab did
# (constant-lr Adam); the ViT gets the recipe a from-scratch transformer needs.
ARCH_DEFAULTS: dict[str, dict] = {
    "cnn": dict(
        epochs=10,
        batch_size=128,
        lr=1e-3,
        optimizer="adam",
        momentum=0.9,
        weight_decay=0.0,
        schedule="constant",
        warmup_epochs=0.0,
        clip_norm=0.0,
        label_smoothing=0.0,
        augment=False,
    ),
    "vit": dict(
        epochs=100,
        batch_size=128,
        lr=3e-3,
        optimizer="adamw",
        momentum=0.9,
        weight_decay=0.05,
        schedule="cosine",
        warmup_epochs=3.0,
        clip_norm=1.0,
        label_smoothing=0.1,
        augment=True,
    ),
}
# The lab's fine-tuning: ImageNet weights, features frozen, a new 10-way head.
for _arch in ("vgg16", "alexnet"):
    ARCH_DEFAULTS[_arch] = dict(
        epochs=3, batch_size=64, lr=1e-3, optimizer="adam", momentum=0.9, weight_decay=0.0,
        schedule="constant", warmup_epochs=0.0, clip_norm=0.0, label_smoothing=0.0,
        augment=False, image_size=224, pretrained=True, feature_lr=1e-4,
    )  # fmt: skip
# Faster R-CNN: torchvision's recipe (SGD, momentum 0.9, warmup) at a CPU-sized batch; the
# transform resizes each 28x28 digit to 64x64 (`FasterRCNNConfig.image_size`).
ARCH_DEFAULTS["faster_rcnn"] = dict(
    epochs=3, batch_size=8, lr=0.01, optimizer="sgd", momentum=0.9, weight_decay=0.0,
    schedule="cosine", warmup_epochs=0.25, clip_norm=10.0, label_smoothing=0.0, augment=False,
    image_size=64, pretrained=True, feature_lr=1e-3,
)  # fmt: skip
for _defaults in (ARCH_DEFAULTS["cnn"], ARCH_DEFAULTS["vit"]):
    _defaults.update(image_size=None, pretrained=False, feature_lr=None)
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, slots=True)
class TrainConfig:
    arch: str = "cnn"
    backend: str = "jax"
    preset: str | None = None  # None: the arch's default preset
    dataset: str = "mnist"
    data_source: str = "auto"
    data_dir: str | None = None
    tfds_data_dir: str | None = None
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 1000
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0  # AdamW only; decoupled, on weight matrices and kernels only
    schedule: str = "constant"  # constant | cosine (linear warmup, then cosine decay to 0)
    warmup_epochs: float = 0.0
    clip_norm: float = 0.0  # global gradient-norm clipping; 0 is off
    label_smoothing: float = 0.0
    augment: bool = False  # random affine (jaxvision.augment), on the device
    # VGG16 / AlexNet fine-tuning
    image_size: int | None = None  # inputs resized to this; None: the data's own size
    pretrained: bool = False  # torchvision's ImageNet weights (jaxvision.pretrained)
    weights: str | None = None  # a .pth state_dict instead of torch hub's cache
    unfreeze: bool = False  # train the convolutional features too, at feature_lr
    feature_lr: float | None = None
    dtype: str = "float32"  # compute dtype; parameters stay float32
    # Faster R-CNN (torch_reference.detection)
    box_margin: int = 0  # pixels added around the digit's ink box
    score_threshold: float = 0.5  # a detection below this does not decide the class
    seed: int = 0
    out: str | None = None  # None: runs/<arch>-<backend>-<timestamp>/
    progress: bool = True
    save_attention: bool = False  # ViT only: attention.png in the output folder
    log_every: int = 10  # steps between progress-bar loss updates (and NaN checks)
    devices: int = 0  # JAX data parallelism over this many devices; 0: every visible device
    checkpoint_dir: str | None = None  # a checkpoint after every epoch (and on Ctrl-C)
    resume: bool = False  # continue from checkpoint_dir's latest checkpoint
    deterministic: bool = False  # GPU: deterministic kernels only (see README, Determinism)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise UserError(f"unknown --backend {self.backend!r}; available: {', '.join(BACKENDS)}")
        if self.arch in TORCH_ONLY_ARCHS:
            self._check_detector()
        if self.optimizer not in OPTIMIZERS:
            raise UserError(
                f"unknown --optimizer {self.optimizer!r}; available: {', '.join(OPTIMIZERS)}"
            )
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if self.dtype not in DTYPES:
            raise UserError(f"unknown --dtype {self.dtype!r}; available: {', '.join(DTYPES)}")
        if self.unfreeze and self.feature_lr is None:
            raise UserError("--unfreeze needs --feature-lr (the features' learning rate)")
        if self.schedule not in SCHEDULES:
            raise UserError(
                f"unknown --schedule {self.schedule!r}; available: {', '.join(SCHEDULES)}"
            )
        if self.weight_decay < 0 or (self.weight_decay > 0 and self.optimizer != "adamw"):
            raise UserError(
                f"--weight-decay {self.weight_decay:g} needs --optimizer adamw "
                f"(decoupled decay), not {self.optimizer}"
            )
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.clip_norm < 0:
            raise UserError(f"--clip-norm must be >= 0 (0 is off), got {self.clip_norm}")
        if self.devices < 0:
            raise UserError(f"--devices must be at least 1 (or 0 for all), got {self.devices}")
        if self.backend == "torch" and self.devices > 1:
            raise UserError(
                f"--devices {self.devices}: the torch backend trains on one device; data "
                "parallelism is the JAX backend's (--backend jax)"
            )
        if self.resume and not self.checkpoint_dir:
            raise UserError("--resume needs --checkpoint-dir (the folder to resume from)")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise UserError(
                f"--warmup-epochs must be between 0 and --epochs ({self.epochs}), "
                f"got {self.warmup_epochs}"
            )

    def _check_detector(self) -> None:
        if self.backend == "jax":
            jax_archs = ", ".join(a for a in ARCH_PRESETS if a not in TORCH_ONLY_ARCHS)
            raise UserError(
                f"--arch {self.arch} has no JAX backend: the detector (RPN, RoIAlign, box heads) "
                f"is torchvision's; use --backend torch (JAX trains {jax_archs})"
            )
        if self.augment:
            raise UserError("--augment is not supported for faster_rcnn (its boxes would need "
                            "the same transform); use --no-augment")  # fmt: skip
        if self.label_smoothing:
            raise UserError("--label-smoothing does not apply to faster_rcnn: the loss is "
                            "torchvision's detector loss")  # fmt: skip
        if self.dtype != "float32":
            raise UserError(f"--dtype {self.dtype} is not supported for faster_rcnn; use float32")
        if not 0 <= self.score_threshold <= 1:
            raise UserError(f"--score-threshold must be in [0, 1], got {self.score_threshold}")
        if self.box_margin < 0:
            raise UserError(f"--box-margin must be >= 0 pixels, got {self.box_margin}")

    def steps_per_epoch(self, n_train: int) -> int:
        """Full batches per epoch; the last partial batch is dropped (a new one each epoch)."""
        if n_train < self.batch_size:
            raise UserError(
                f"--batch-size {self.batch_size} is larger than the {n_train} training images"
            )
        return n_train // self.batch_size

    def warmup_steps(self, steps_per_epoch: int) -> int:
        return round(self.warmup_epochs * steps_per_epoch)


def model_config(config: TrainConfig, data: Dataset):
    """The model's config: the preset, sized for the data (or for --image-size)."""
    h, _, c = data.image_shape
    # 3-channel input at --image-size; the head is replaced
    if config.arch in IMAGENET_ARCHS or config.arch in TORCH_ONLY_ARCHS:
        return get_config(
            config.arch, config.preset, num_classes=data.num_classes, image_size=config.image_size
        )
    return get_config(
        config.arch, config.preset, num_classes=data.num_classes, in_channels=c, image_size=h
    )


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The cosine schedule's multiplier of --lr at optimiser step `step` (0-based).

    Linear warmup from 0 over `warmup` steps, then cosine decay to 0 at `total`. The torch
    backend uses this function; the JAX backend uses optax's `warmup_cosine_decay_schedule`,
    which a test checks against it step for step.
    """
    if step < warmup:
        return step / warmup
    progress = min(step - warmup, total - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclasses.dataclass
class EpochStats:
    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    test_f1_macro: float
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

    @property
    def final(self) -> EpochStats:
        return self.history[-1]

    @property
    def train_time_s(self) -> float:
        """Wall time of the training steps of every epoch; excludes loading, compiling, eval."""
        return sum(h.train_time_s for h in self.history)


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
    """Ctrl-C was pressed; raised between two optimiser steps, with the position reached."""

    def __init__(self, position: Position):
        super().__init__(position)
        self.position = position


_stop = threading.Event()


class stop_on_ctrl_c:
    """Within it, the first Ctrl-C asks training to stop after the current step (so a checkpoint
    of a consistent state can be saved); a second one interrupts at once."""

    def __enter__(self):
        _stop.clear()
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        _stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second press
        print("\nstopping after this step (Ctrl-C again to quit now)", file=sys.stderr)

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)
        _stop.clear()


class LossTracker:
    """The running mean of an epoch's step losses, for the progress bar and the NaN check.

    Step losses stay on the device; every `log_every` steps they are fetched in one go (the only
    host sync inside an epoch), checked for NaN/inf, and shown on the bar. A resumed epoch starts
    from its checkpointed `Position`. After a Ctrl-C, `add` checks the pending losses and raises
    `StopRequested`.
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
        if (
            self.n_pending >= self.config.log_every
            or self.seen + self.n_pending == self.steps
            or _stop.is_set()
        ):
            self.flush()
        if _stop.is_set() and self.seen < self.steps:
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


def run_epochs(config: TrainConfig, steps: int, train_epoch, evaluate, checkpoints=None):
    """The epoch loop both backends share: a progress bar per epoch, then a test-set line.

    train_epoch(epoch, bar, start: Position) -> (mean train loss, seconds); evaluate() -> dict
    with loss, accuracy, f1_macro and preds. `checkpoints` (a `jaxvision.checkpoint.Checkpoints`)
    resumes the run, saves it after every epoch and on Ctrl-C. Returns the history and the last
    predictions.
    """
    from tqdm.auto import tqdm

    start, history = checkpoints.start() if checkpoints else (Position(), [])
    with stop_on_ctrl_c():
        for epoch in range(start.epoch, config.epochs):
            position = start if epoch == start.epoch else Position(epoch)
            ev = _train_and_evaluate_epoch(config, steps, train_epoch, evaluate, checkpoints,
                                           position, history, tqdm)  # fmt: skip
            if _stop.is_set():  # Ctrl-C during evaluation or saving: the epoch is saved
                raise _interrupted(checkpoints, Position(epoch + 1), steps, history)
    return history, np.asarray(ev["preds"])


def _interrupted(checkpoints, position: Position, steps: int, history) -> Interrupted:
    where = f"epoch {position.epoch + 1}, step {position.step}/{steps}"
    if position.step == 0:
        where = f"the end of epoch {position.epoch}"
    if checkpoints is None:
        return Interrupted(f"interrupted at {where}; nothing saved (no --checkpoint-dir)")
    path = checkpoints.save(position, history)
    return Interrupted(f"interrupted at {where}; saved {path}; continue with --resume")


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
        "data_source": data.source,
        "n_train": data.n_train,
        "n_test": data.n_test,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "test_accuracy": final.test_accuracy,
        "test_f1_macro": final.test_f1_macro,
        "train_loss": final.train_loss,
        "test_loss": final.test_loss,
        "train_time_s": result.train_time_s,
        "compile_time_s": result.compile_time_s,
        "eval_time_s": sum(h.eval_time_s for h in result.history),
        "params": result.params,
        "device": result.device,
        "host": describe_host(),
        "seed": config.seed,
        **({"detection": result.extras} if result.extras else {}),
        "history": [dataclasses.asdict(h) for h in result.history],
        "config": dataclasses.asdict(config),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def write_metrics(record: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


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


def results_row(record: dict) -> str:
    return (
        f"| {record['arch']}"
        + (f" ({record['preset']})" if record.get("preset") else "")
        + f" | {record['backend']}"
        + f" | {record['dataset']} ({record['n_train']:,}/{record['n_test']:,})"
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
    return (
        f"epoch {stats.epoch}/{epochs}: train loss {stats.train_loss:.4f} | "
        f"test loss {stats.test_loss:.4f} | test acc {stats.test_accuracy:.2%} | "
        f"F1 {stats.test_f1_macro:.4f}{detection} | {stats.train_time_s:.1f} s"
    )
