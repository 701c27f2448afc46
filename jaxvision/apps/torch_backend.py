"""The PyTorch backend: `torch_reference`'s models and training loop (torchvision's detector for
Faster R-CNN). Imports no JAX."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from jaxvision.core.bench import BenchWorker, median_time
from jaxvision.core.config import EVAL_BATCH_SIZE, TrainConfig
from jaxvision.core.data import Dataset
from jaxvision.core.detection import ink_boxes
from jaxvision.core.errors import UserError
from jaxvision.core.results import RunResult
from torch_reference import checkpoint, detection, train
from torch_reference.preprocess import model_input
from torch_reference.pretrained import find_weights, weights_name


def float32_like_jax() -> None:
    """On a GPU, lets float32 matmuls run on TF32 tensor cores, as JAX's do by
    default, so that the two backends train (and benchmark) the same arithmetic; torch's own
    default is TF32 for cuDNN's convolutions but not for cuBLAS's matmuls. The parity tests pin
    full float32 in both instead (parity_tests/conftest.py). Nothing changes on a CPU."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # cuBLAS; cuDNN allows TF32 by default


def float32_matmuls(device: torch.device) -> str:
    """What a float32 matmul computes in, here: 'tf32' or 'float32'."""
    tf32 = device.type == "cuda" and torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "float32"


class TorchBackend:
    name = "torch"

    def __init__(self, compile: bool = False):
        self.compile = compile  # the benchmark's torch-compile variant

    def check(self, config: TrainConfig) -> None:
        if config.pretrained:
            find_weights(weights_name(config.arch, config.preset), config.weights)

    def start(self, config: TrainConfig, distributed: tuple | None) -> None:
        if distributed is not None:
            raise UserError("--distributed is for the JAX backend; the torch backend runs one "
                            "process")  # fmt: skip
        float32_like_jax()
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's requirement
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False

    def is_primary(self) -> bool:
        return True

    def train_and_evaluate(self, config: TrainConfig, data: Dataset) -> RunResult:
        if config.arch_spec.detector:
            return detection.train_and_evaluate(config, data)
        return train.train_and_evaluate(config, data)

    def plan_checkpoint(self, config: TrainConfig, data: Dataset) -> None:
        checkpoint.TorchCheckpoints.plan(config, data)

    def read_meta(self, path: Path) -> dict:
        return checkpoint.TorchCheckpoints.read_meta(path)

    def load_model(self, path: Path, meta: dict) -> torch.nn.Module:
        return checkpoint.load_model(path, meta)

    def classifier(self, path: Path, meta: dict, batch_size: int = EVAL_BATCH_SIZE):
        model = self.load_model(path, meta)
        mean, std = meta["mean"], meta["std"]
        return lambda x, on_batch=None: train.predict_log_proba(model, x, mean, std, batch_size,
                                                                on_batch)  # fmt: skip

    def predict_proba(self, model, images: np.ndarray, data: Dataset) -> np.ndarray:
        return np.exp(train.predict_log_proba(model, images, data.mean, data.std))

    def torch_state_dict(self, model: torch.nn.Module) -> dict:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def save_torch_weights(self, model: torch.nn.Module, path: Path) -> Path:
        return checkpoint.save_state_dict(self.torch_state_dict(model), path)

    def write_weights(self, dst: Path, step: int, state_dict: dict, meta: dict) -> Path:
        return checkpoint.write_folder(dst, step, {"model": state_dict},
                                       {**meta, "backend": self.name})  # fmt: skip

    def attention_weights(self, model, images: np.ndarray, data: Dataset):
        return train.attention_weights(model, images, data)

    def describe_device(self) -> str:
        return train.describe_device(train.default_device())

    def bench(self, config: TrainConfig, data: Dataset) -> TorchBench:
        float32_like_jax()
        return TorchBench(self, config, data)

    @staticmethod
    def model_flops(config: TrainConfig, data: Dataset) -> float:
        """Training FLOPs per image (forward + backward convolutions and matmuls), from torch's
        FlopCounterMode on one step of the arch's torch model over `data`'s training images."""
        model_cfg = config.model_config(data)
        torch.manual_seed(0)
        x = torch.from_numpy(data.x_train).permute(0, 3, 1, 2).float() / 255.0
        y = torch.from_numpy(data.y_train)
        counter = FlopCounterMode(display=False)
        if config.arch_spec.detector:
            model = detection.create_detector(config, model_cfg, verbose=False).train()
            boxes, _ = ink_boxes(data.x_train)
            targets = detection.make_targets(torch.from_numpy(boxes), y + 1)
            with counter:
                sum(model(list(detection.as_rgb(x * 255.0)), targets).values()).backward()
        else:
            model = train.create_model(config, model_cfg, verbose=False).train()
            x = model_input(x, config.arch_spec, model_cfg, data.mean, data.std)
            with counter:
                F.cross_entropy(model(x), y).backward()
        return counter.get_total_flops() / data.n_train


class TorchBench(BenchWorker):
    """A benchmark worker: the real training path (`Trainer.train_epoch`) and evaluation."""

    def __init__(self, backend: TorchBackend, config: TrainConfig, data: Dataset):
        torch.manual_seed(config.seed)
        model_cfg = config.model_config(data)
        if config.arch_spec.detector:
            if backend.compile:
                raise UserError("torch.compile does not handle torchvision's detection models")
            model = detection.create_detector(config, model_cfg, verbose=False)
            self.trainer = detection.DetectorTrainer(model, config, data)
        else:
            model = train.create_model(config, model_cfg, verbose=False)
            self.trainer = train.Trainer(model, config, data)
        if backend.compile:  # after the optimiser holds the eager parameters
            self.trainer.model = torch.compile(self.trainer.model)
        self.device = self.trainer.device
        first_call_s = self.warm_up()
        self.info = dict(
            device=train.describe_device(self.device),
            params=train.count_params(model),
            image_size=getattr(model_cfg, "image_size", None),
            compile_s=first_call_s,
        )

    def sync(self) -> None:
        self.trainer.sync()

    def threads(self) -> int:
        return torch.get_num_threads()

    def float32_matmuls(self) -> str:
        return float32_matmuls(self.device)

    def matmul_peak(self) -> float:
        n = 2048 if self.device.type == "cpu" else 8192
        a = torch.randn(n, n, device=self.device)

        def run():
            torch.mm(a, a)
            self.trainer.sync()

        return 2 * n**3 / median_time(run)

    def peak_device_mb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**20
