"""Checkpoints: one after every epoch and on Ctrl-C, `--resume`, and reading one back to predict.

`--checkpoint-dir DIR` holds the last `KEEP` checkpoints of one run, each in a folder named by the
number of optimiser steps done (`DIR/<step>/`). Each holds

  model   every variable of the model (parameters, frozen features, other state);
  train   the optimiser state and the RNG state (JAX: the run's key; torch: its generators);
  meta    JSON: the arch, preset, model config, dataset, normalisation statistics, the `Position`
          (epoch and step), the data-order state, the history so far, and the run's config.

This module is the framework-free half: the format, the checks, and when a checkpoint is saved.
The JAX backend writes them with orbax (`jaxvision.training.checkpoint`); the torch backend with
`torch.save` (`torch_reference.checkpoint`). Both are atomic: a checkpoint is written into a
temporary folder and renamed into place when complete, so a run killed mid-save leaves the
previous checkpoint as
the latest valid one, never a half-written one that loads.

The data order needs no saved permutation: epoch `e` visits `epoch_permutation(n, seed, e)`, and
each step's dropout and augmentation keys are folded in from the global step. The seed, batch
size and training-set size that fix them must therefore match on resume (`check_resumable`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxvision.core.config import TrainConfig
from jaxvision.core.errors import UserError
from jaxvision.core.loop import Position
from jaxvision.core.results import EpochStats

FORMAT = "jaxvision-checkpoint/1"
KEEP = 3  # checkpoints kept per run: the newest ones
TORCH_STATE = "state.pt"  # the torch backend's files in DIR/<step>/
TORCH_META = "meta.json"

# What a resumed run must share with its checkpoint, and why.
SAME_MODEL = ("arch", "preset")
SAME_DATA_ORDER = ("dataset", "seed", "batch_size")
SAME_OPTIMISER_STATE = ("optimizer", "schedule", "unfreeze", "clipped")


def _settings(config: TrainConfig) -> dict:
    d = dataclasses.asdict(config)
    d["preset"] = config.resolved_preset
    d["clipped"] = config.clip_norm > 0
    return d


def checkpoint_meta(config, data, model_cfg, position: Position, history, steps: int) -> dict:
    """The JSON part of a checkpoint."""
    return {
        "format": FORMAT,
        "backend": config.backend,
        "arch": config.arch,
        "preset": config.resolved_preset,
        "model_config": dataclasses.asdict(model_cfg),
        "dataset": data.name,
        "n_train": data.n_train,
        "num_classes": data.num_classes,
        "image_shape": list(data.image_shape),
        "mean": list(data.mean),
        "std": list(data.std),
        "position": dataclasses.asdict(position),
        "steps_per_epoch": steps,
        "data_order": {
            "permutation": "jaxvision.core.data.epoch_permutation(n_train, seed, epoch)",
            "seed": config.seed,
            "epoch": position.epoch,
            "next_batch": position.step,
            "batch_size": config.batch_size,
        },
        "history": [dataclasses.asdict(h) for h in history],
        "config": _settings(config),
    }


def describe_position(meta: dict) -> str:
    p, steps = meta["position"], meta["steps_per_epoch"]
    if p["step"] == 0:
        return f"after epoch {p['epoch']}"
    return f"epoch {p['epoch'] + 1}, step {p['step']}/{steps}"


def check_resumable(meta: dict, config: TrainConfig, data, where: Path) -> list[str]:
    """Raises a UserError naming both sides when `config` cannot continue the checkpointed run;
    returns the settings that changed but may (e.g. --epochs, --lr)."""
    saved, now = meta["config"], _settings(config)
    if meta.get("format") != FORMAT:
        raise UserError(f"{where} is not a jaxvision checkpoint ({FORMAT}); start a new run")
    if meta["backend"] != config.backend:
        raise UserError(
            f"{where} was written by the {meta['backend']} backend; resume it with --backend "
            f"{meta['backend']}, or convert its weights with scripts/convert_checkpoint.py"
        )
    if "train" not in meta.get("items", ["train"]):
        raise UserError(
            f"{where} holds weights only (no optimiser state); use it with scripts/predict.py, "
            "or start a new run without --resume"
        )

    def both(keys, source):
        return " ".join(f"--{k.replace('_', '-')} {source[k]}" for k in keys)

    if any(saved[k] != now[k] for k in SAME_MODEL):
        raise UserError(
            f"{where} holds a {both(SAME_MODEL, saved)} checkpoint, but this run is "
            f"{both(SAME_MODEL, now)}; pass the checkpoint's --arch/--preset, or another "
            "--checkpoint-dir"
        )
    if (meta["dataset"], meta["n_train"]) != (data.name, data.n_train) or any(
        saved[k] != now[k] for k in SAME_DATA_ORDER
    ):
        raise UserError(
            f"resuming must keep the data order: {where} was trained with "
            f"{both(SAME_DATA_ORDER, saved)} ({meta['n_train']:,} training images), this run has "
            f"{both(SAME_DATA_ORDER, now)} ({data.n_train:,})"
        )
    changed = [k for k in SAME_OPTIMISER_STATE if saved[k] != now[k]]
    if changed:
        raise UserError(
            f"{where}'s optimiser state does not fit this run: "
            + ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in changed)
            + "; resume with the checkpoint's settings"
        )
    ignore = {"resume", "checkpoint_dir", "out", "progress", "devices", "clipped"}
    return [
        f"{k} {saved[k]} -> {now[k]}"
        for k in now
        if k not in ignore and k in saved and saved[k] != now[k]
    ]


class Checkpoints:
    """The framework-free half: which checkpoint to start from, and when one is saved.

    A backend supplies `read_meta(path)`, `_write(step, meta)` and `_restore(step)`.
    """

    @staticmethod
    def read_meta(path: Path) -> dict:
        """The meta of checkpoint folder `path` (DIR/<step>)."""
        raise NotImplementedError

    @classmethod
    def plan(cls, config: TrainConfig, data) -> tuple[Path | None, dict | None]:
        """Where a run with a --checkpoint-dir starts: (None, None) from scratch, or (--resume) the
        latest checkpoint's folder and meta. Raises a UserError, before any model is built, when the
        folder and the flags disagree."""
        directory = Path(config.checkpoint_dir).absolute()
        if directory.exists() and not directory.is_dir():
            raise UserError(f"--checkpoint-dir {directory} is a file; give a folder")
        steps = step_folders(directory)
        if not config.resume:
            if steps:
                meta = cls.read_meta(directory / str(steps[-1]))
                raise UserError(
                    f"{directory} already holds checkpoints (latest {describe_position(meta)}); "
                    "pass --resume to continue that run, or choose another --checkpoint-dir"
                )
            return None, None
        if not steps:
            raise UserError(f"--resume: no checkpoint in {directory}; check the path, or drop "
                            "--resume to start a new run there")  # fmt: skip
        where = directory / str(steps[-1])
        meta = cls.read_meta(where)
        check_resumable(meta, config, data, where)
        if meta["position"]["epoch"] >= config.epochs:
            raise UserError(
                f"{where} has already trained {meta['position']['epoch']} of --epochs "
                f"{config.epochs}; pass a larger --epochs to train on"
            )
        return where, meta

    def __init__(self, config: TrainConfig, data, model_cfg, steps: int):
        self.config, self.data, self.model_cfg, self.steps = config, data, model_cfg, steps
        self.directory = Path(config.checkpoint_dir).absolute()

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def _steps(self) -> list[int]:
        return step_folders(self.directory)

    def start(self) -> tuple[Position, list[EpochStats]]:
        """Where training starts: the beginning, or (--resume) the latest checkpoint, restored."""
        where, meta = self.plan(self.config, self.data)
        if where is None:
            return Position(), []
        self._restore(int(where.name))
        if self.config.progress:
            print(f"resumed from {where} ({describe_position(meta)})")
            changed = check_resumable(meta, self.config, self.data, where)
            if changed:
                print("  changed since the checkpoint: " + ", ".join(changed))
        return Position(**meta["position"]), [EpochStats(**h) for h in meta["history"]]

    def save(self, position: Position, history: list[EpochStats]) -> Path:
        step = position.epoch * self.steps + position.step
        if step not in self._steps():  # Ctrl-C right after an epoch's save: it is saved
            meta = checkpoint_meta(
                self.config, self.data, self.model_cfg, position, history, self.steps
            )
            self._write(step, meta)
        return self.path(step)

    def describe_latest(self) -> str:
        steps = self._steps()
        if not steps:
            return f"none saved yet in {self.directory}"
        path = self.path(steps[-1])
        return f"{path}, {describe_position(self.read_meta(path))}"


def step_folders(directory: Path) -> list[int]:
    """The finished checkpoints' steps in `directory`, oldest first (temporary folders aside)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def latest_step(directory: str | Path) -> tuple[Path, str]:
    """(the latest checkpoint's folder, 'jax' or 'torch'), or a UserError saying what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"checkpoint folder {directory} does not exist; pass a --checkpoint-dir "
                        "that train.py wrote")  # fmt: skip
    steps = step_folders(directory)
    if not steps:
        raise UserError(f"{directory} holds no finished checkpoint; pass the folder given to "
                        "train.py --checkpoint-dir")  # fmt: skip
    path = directory / str(steps[-1])
    return path, written_by(path)


def written_by(path: Path) -> str:
    """The backend that wrote checkpoint folder `path`: torch's holds a meta.json, orbax's not."""
    return "torch" if (path / TORCH_META).exists() else "jax"
