"""PyTorch training and evaluation, the twin of `jaxvision.training.trainer` (same recipe, same
data order).

The dataset is preloaded on the device as a uint8 tensor; batches are index-gathered from it with
the same per-epoch permutation the JAX backend uses. No `Dataset.__getitem__` loop.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
import torch.nn.functional as F

from jaxvision.core.archs import arch_of
from jaxvision.core.config import EVAL_BATCH_SIZE, TrainConfig, lr_factor
from jaxvision.core.data import Dataset, epoch_permutation
from jaxvision.core.loop import LossTracker, Position, run_epochs
from jaxvision.core.results import RunResult
from torch_reference import metrics
from torch_reference.augment import random_affine
from torch_reference.checkpoint import TorchCheckpoints
from torch_reference.models import build_model
from torch_reference.preprocess import model_input, standardize, to_nchw
from torch_reference.pretrained import load_into_torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else f"{device.type}:{torch.cuda.get_device_name(device)}"


def freeze_features(config: TrainConfig, model: torch.nn.Module) -> None:
    """Fine-tuning as the lab did it: the convolutional features get no gradient."""
    if config.arch_spec.imagenet and not config.unfreeze:
        for p in model.features.parameters():
            p.requires_grad_(False)


def _is_decayed(name: str, p: torch.Tensor) -> bool:
    return name.endswith("weight") and p.ndim >= 2  # the Flax side's "kernel" mask


def optimizer_for(config: TrainConfig, named: list, is_feature=None) -> torch.optim.Optimizer:
    """The optimiser over `named` (name, parameter) pairs, as the JAX side builds it: with
    --unfreeze, the parameters `is_feature(name)` picks at --feature-lr and the rest at --lr;
    under AdamW, --weight-decay on the weights of rank 2 and up only (the Flax side's kernels,
    `decay_mask`), in every lr group."""
    if is_feature is not None and config.unfreeze:
        head = [(n, p) for n, p in named if not is_feature(n)]
        features = [(n, p) for n, p in named if is_feature(n)]
        sets = [(head, {}), (features, {"lr": config.feature_lr})]
    else:
        sets = [(named, {})]
    groups = []
    for members, lr in sets:
        if config.optimizer == "adamw":
            groups += [
                {"params": [p for n, p in members if _is_decayed(n, p)],
                 "weight_decay": config.weight_decay, **lr},
                {"params": [p for n, p in members if not _is_decayed(n, p)],
                 "weight_decay": 0.0, **lr},
            ]  # fmt: skip
        else:
            groups.append({"params": [p for _, p in members], **lr})
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """A classifier's optimiser: fine-tuning with --unfreeze trains the features (all but
    `classifier`) at --feature-lr."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    features = (lambda n: not n.startswith("classifier.")) if config.arch_spec.imagenet else None
    return optimizer_for(config, named, features)


def make_scheduler(config: TrainConfig, optimizer, steps_per_epoch: int):
    if config.schedule == "constant":
        return None
    total, warmup = config.epochs * steps_per_epoch, config.warmup_steps(steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))


def _fetch(losses: list[torch.Tensor]) -> np.ndarray:
    return torch.stack(losses).double().cpu().numpy()


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Trainer:
    """The training loop of one model over device-resident data. Subclasses change what a batch
    is and how it is scored through the hooks `load_data`, `make_optimizer`, `epoch_order`,
    `batch_loss` and `evaluate` (`torch_reference.detection.DetectorTrainer`)."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, data: Dataset, device=None):
        self.device = device or default_device()
        self.model = model.to(self.device)
        self.config = config
        self.data = data
        n_train = self.load_data()
        self.optimizer = self.make_optimizer()
        self.steps = config.steps_per_epoch(n_train)
        self.scheduler = make_scheduler(config, self.optimizer, self.steps)
        self.generator = torch.Generator(self.device).manual_seed(config.seed)  # augmentation

    # --- hooks -----------------------------------------------------------------------------------

    def load_data(self) -> int:
        """Puts the data on the device; returns the number of training images."""
        data, device = self.data, self.device
        self.x_train = to_nchw(data.x_train, device)  # (N, C, H, W) uint8
        self.y_train = torch.from_numpy(data.y_train).to(device)
        self.x_test = to_nchw(data.x_test, device)
        self.y_test = torch.from_numpy(data.y_test).to(device)
        self.norm = functools.partial(model_input, arch=self.config.arch_spec,
                                      model_cfg=self.model.config, mean=data.mean,
                                      std=data.std)  # fmt: skip
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16,
                             enabled=self.config.dtype == "bfloat16")  # fmt: skip
        return data.n_train

    def make_optimizer(self) -> torch.optim.Optimizer:
        freeze_features(self.config, self.model)
        return make_optimizer(self.config, self.model)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The training images of `epoch`, in order; the same permutation as the JAX backend."""
        return epoch_permutation(self.data.n_train, self.config.seed, epoch)

    def batch_loss(self, idx: torch.Tensor) -> torch.Tensor:
        """The mean training loss of the batch of training images `idx` (B,)."""
        cfg = self.config
        x = self.x_train[idx].float() / 255.0  # (B, C, H, W) in [0, 1]
        if cfg.augment:
            x = random_affine(x, self.generator)
        x = self.norm(x)
        with torch.autocast(**self.autocast):
            logits = self.model(x)
        return F.cross_entropy(
            logits.float(), self.y_train[idx], label_smoothing=cfg.label_smoothing
        )

    @torch.inference_mode()
    def evaluate(self) -> dict:
        self.model.eval()
        e = self.config.eval_batch_size
        losses, preds, confidence = [], [], []
        for i in range(0, self.data.n_test, e):
            x = self.norm(self.x_test[i : i + e].float() / 255.0)
            with torch.autocast(**self.autocast):
                logits = self.model(x).float()  # (E, K)
            losses.append(F.cross_entropy(logits, self.y_test[i : i + e], reduction="none"))
            preds.append(logits.argmax(-1))
            confidence.append(torch.softmax(logits, -1).amax(-1))  # the prediction's probability
        loss, pred = torch.cat(losses), torch.cat(preds)
        k = self.data.num_classes
        return {
            "loss": loss.mean().item(),
            "accuracy": metrics.accuracy(self.y_test, pred).item(),
            "f1_macro": metrics.f1_macro(self.y_test, pred, k).item(),
            "preds": pred.cpu().numpy(),
            "confidence": torch.cat(confidence).cpu().numpy(),
        }

    # --- the loop --------------------------------------------------------------------------------

    def train_epoch(self, epoch: int, bar=None, start: Position | None = None):
        """One epoch of optimiser steps, or its rest from `start`; returns (mean training loss,
        seconds)."""
        cfg = self.config
        order = torch.from_numpy(self.epoch_order(epoch)).to(self.device)
        self.model.train()
        self.sync()
        tracker = LossTracker(cfg, epoch, self.steps, _fetch, bar, start)
        for step in range(tracker.seen, self.steps):
            loss = self.batch_loss(order[step * cfg.batch_size : (step + 1) * cfg.batch_size])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            tracker.add(loss.detach())
        self.sync()
        return tracker.mean, tracker.elapsed()

    def run(self) -> RunResult:
        """Every epoch, each followed by an evaluation (and a checkpoint with --checkpoint-dir)."""
        checkpoints = None
        if self.config.checkpoint_dir:
            model_cfg = self.config.model_config(self.data)
            checkpoints = TorchCheckpoints(self.config, self.data, model_cfg, self)
        history, last = run_epochs(
            self.config, self.steps, self.train_epoch, self.evaluate, checkpoints
        )
        return RunResult(history, count_params(self.model), describe_device(self.device), 0.0,
                         last["preds"], self.model, confidence=last.get("confidence"))  # fmt: skip

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@torch.inference_mode()
def predict_log_proba(model: torch.nn.Module, images: np.ndarray, mean, std,
                      batch_size: int = EVAL_BATCH_SIZE, on_batch=None):  # fmt: skip
    """Eval-mode class log-probabilities (N, K) of (N, H, W, C) uint8 images, log-softmax of the
    logits, normalised as the model was trained (`mean`, `std`: the training set's statistics).
    `on_batch(n)`, if given, is called with each batch's count of images once it is done."""
    model.eval()
    device = next(model.parameters()).device
    arch = arch_of(model.config)
    out = []
    for i in range(0, len(images), batch_size):
        x = to_nchw(images[i : i + batch_size], device).float() / 255.0
        x = model_input(x, arch, model.config, mean, std)
        out.append(torch.log_softmax(model(x), dim=-1).cpu().numpy())
        if on_batch is not None:
            on_batch(len(x))
    return np.concatenate(out)


@torch.inference_mode()
def attention_weights(model: torch.nn.Module, images: np.ndarray, data: Dataset):
    """Eval-mode attention weights, per layer (B, heads, T, T), and predictions, as numpy."""
    model.eval()
    device = next(model.parameters()).device
    x = standardize(to_nchw(images, device).float() / 255.0, data.mean, data.std)
    logits, out = model.forward_intermediates(x)
    attns = [out[f"attn{i}"].cpu().numpy() for i in range(model.config.depth)]
    return attns, logits.argmax(-1).cpu().numpy()


def create_model(config: TrainConfig, model_cfg, verbose: bool = True) -> torch.nn.Module:
    """The torch model to train: fresh, or (VGG16 / AlexNet) torchvision's ImageNet weights with
    a new `num_classes`-way last layer."""
    if not (config.arch_spec.imagenet and config.pretrained):
        return build_model(model_cfg)
    model = build_model(dataclasses.replace(model_cfg, num_classes=1000))
    load_into_torch(model, config.arch, config.weights, verbose=verbose)
    model.classifier[-1] = torch.nn.Linear(model_cfg.hidden, model_cfg.num_classes)
    model.config = model_cfg
    return model


def train_and_evaluate(config: TrainConfig, data: Dataset) -> RunResult:
    torch.manual_seed(config.seed)  # initialisation and dropout
    return Trainer(create_model(config, config.model_config(data)), config, data).run()
