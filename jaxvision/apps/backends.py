"""The backend registry: the one place where a backend is chosen by its name.

An app asks for a backend by name (`get("jax")`) or by the checkpoint it has
(`for_checkpoint(DIR)`), and then only calls the `Backend` interface: train and evaluate, check a
config before any data is loaded, load a model from a checkpoint, classify images, export a
torch state_dict, describe the device, set up a benchmark worker.

Each backend lives in its own module (`jaxvision.apps.jax_backend`, `jaxvision.apps.torch_backend`),
imported only when it is asked for: a torch run never loads JAX and a JAX run never loads torch,
so each benchmark worker's memory is its own.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Protocol

import numpy as np

from jaxvision.core import checkpoint
from jaxvision.core.archs import get_arch
from jaxvision.core.config import BACKENDS, EVAL_BATCH_SIZE, TrainConfig
from jaxvision.core.data import Dataset
from jaxvision.core.errors import UserError
from jaxvision.core.results import RunResult


@dataclasses.dataclass(frozen=True)
class Entry:
    module: str
    cls: str
    trains: str  # the training backend it is, or a variant of (TrainConfig.backend)
    kwargs: dict = dataclasses.field(default_factory=dict)


# "torch-compile" is the torch backend with its model under torch.compile: a benchmark variant.
REGISTRY = {
    "jax": Entry("jaxvision.apps.jax_backend", "JaxBackend", "jax"),
    "torch": Entry("jaxvision.apps.torch_backend", "TorchBackend", "torch"),
    "torch-compile": Entry(
        "jaxvision.apps.torch_backend", "TorchBackend", "torch", {"compile": True}
    ),  # fmt: skip
}
TRAINING = BACKENDS  # what train.py --backend takes


class Backend(Protocol):
    name: str

    def check(self, config: TrainConfig) -> None:
        """Raises a UserError for a config this backend cannot run, before data is loaded."""

    def start(self, config: TrainConfig, distributed: tuple | None) -> None:
        """Process set-up before anything touches a device (--deterministic, multi-host)."""

    def is_primary(self) -> bool:
        """Whether this process writes the outputs (process 0 of a multi-host run)."""

    def train_and_evaluate(self, config: TrainConfig, data: Dataset) -> RunResult: ...

    def plan_checkpoint(self, config: TrainConfig, data: Dataset) -> None:
        """Raises a UserError when --checkpoint-dir and the flags disagree."""

    def read_meta(self, path: Path) -> dict:
        """The meta of checkpoint folder DIR/<step> this backend wrote."""

    def load_model(self, path: Path, meta: dict):
        """The model in checkpoint folder DIR/<step>, in eval mode."""

    def classifier(self, path: Path, meta: dict, batch_size: int = EVAL_BATCH_SIZE):
        """f((N, H, W, C) uint8 images) -> (N, K) log-probabilities (log-softmax, so that a
        cross-entropy stays exact where a float32 probability underflows), with the checkpoint's
        model and its own normalisation, `batch_size` images a call; f's `on_batch(n)`, if
        given, is called with each batch's count of images once it is done."""

    def torch_state_dict(self, model) -> dict:
        """The model's weights as a torch state_dict (the format both frameworks exchange)."""

    def save_torch_weights(self, model, path: Path) -> Path:
        """The model's weights as a torch state_dict file (model.pth)."""

    def write_weights(self, dst: Path, step: int, state_dict: dict, meta: dict) -> Path:
        """A weights-only checkpoint folder DST/<step> of this backend, from a torch state_dict."""

    def predict_proba(self, model, images: np.ndarray, data: Dataset) -> np.ndarray:
        """Eval-mode (N, K) class probabilities of (N, H, W, C) uint8 images; a classifier's
        model only (not the detector's)."""

    def attention_weights(self, model, images: np.ndarray, data: Dataset): ...

    def describe_device(self) -> str: ...

    def bench(self, config: TrainConfig, data: Dataset):
        """A benchmark worker (`jaxvision.core.bench.BenchWorker`) over this backend's trainer."""


def entry(name: str) -> Entry:
    if name not in REGISTRY:
        raise UserError(f"unknown backend {name!r}; available: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def get(name: str) -> Backend:
    """The backend called `name`; its module is imported now, and only its framework with it."""
    e = entry(name)
    return getattr(importlib.import_module(e.module), e.cls)(**e.kwargs)


def other(name: str) -> Backend:
    """The training backend that is not `name`: where a checkpoint converts to."""
    (to,) = [b for b in TRAINING if b != name]
    return get(to)


def plan_checkpoint(config: TrainConfig, data: Dataset) -> None:
    """Raises a UserError, before any model is built, when --checkpoint-dir and the flags
    disagree; the checkpoints there are read by the backend that wrote them."""
    good, _ = checkpoint.intact_steps(Path(config.checkpoint_dir))
    writer = config.backend
    if good:
        writer = checkpoint.written_by(Path(config.checkpoint_dir) / str(good[-1]))
    get(writer).plan_checkpoint(config, data)


def for_classifier_checkpoint(directory: str | Path, app: str) -> tuple[Backend, Path, dict]:
    """`for_checkpoint`, refusing a detector's checkpoint, which `app` (predict.py,
    evaluate.py) cannot classify with."""
    backend, path, meta = for_checkpoint(directory)
    if get_arch(meta["arch"]).detector:
        raise UserError(f"{path} holds a {meta['arch']} detector; {app} classifies with cnn, "
                        "vit, vgg16 and alexnet checkpoints")  # fmt: skip
    return backend, path, meta


def for_checkpoint(directory: str | Path) -> tuple[Backend, Path, dict]:
    """The backend that wrote `directory`'s latest checkpoint, that checkpoint's folder, and its
    meta (checked: `checkpoint.check_meta`)."""
    path, name = checkpoint.latest_step(directory)
    backend = get(name)
    return backend, path, backend.read_meta(path)
