"""Checkpoints: one after every epoch and on Ctrl-C, `--resume`, and reading one back to predict.

`--checkpoint-dir DIR` holds the last `KEEP` checkpoints of one run, each in a folder named by the
number of optimiser steps done (`DIR/<step>/`). Each holds

  model   every variable of the model (parameters, frozen features, other state);
  train   the optimiser state and the RNG state (JAX: the run's key; torch: its generators);
  meta    JSON: the arch, preset, model config, dataset, normalisation statistics, the `Position`
          (epoch and step), the data-order state, the history so far, and the run's config.

The JAX backend writes them with orbax (`JaxCheckpoints`); the torch backend with `torch.save`
(`torch_reference.checkpoint`). Both are atomic: a checkpoint is written into a temporary folder
and renamed into place when complete, so a run killed mid-save leaves the previous checkpoint as
the latest valid one, never a half-written one that loads.

The data order needs no saved permutation: epoch `e` visits `epoch_permutation(n, seed, e)`, and
each step's dropout and augmentation keys are folded in from the global step. The seed, batch
size and training-set size that fix them must therefore match on resume (`check_resumable`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from jaxvision import configs
from jaxvision.errors import UserError
from jaxvision.run import EpochStats, Position, TrainConfig

FORMAT = "jaxvision-checkpoint/1"
KEEP = 3  # checkpoints kept per run: the newest ones
TORCH_STATE = "state.pt"  # the torch backend's files in DIR/<step>/
TORCH_META = "meta.json"

# What a resumed run must share with its checkpoint, and why.
SAME_MODEL = ("arch", "preset")
SAME_DATA_ORDER = ("dataset", "seed", "batch_size")
SAME_OPTIMISER_STATE = ("optimizer", "schedule", "unfreeze", "clipped")


def resolved_preset(config: TrainConfig) -> str:
    return config.preset or configs.DEFAULT_PRESET[config.arch]


def _settings(config: TrainConfig) -> dict:
    d = dataclasses.asdict(config)
    d["preset"] = resolved_preset(config)
    d["clipped"] = config.clip_norm > 0
    return d


def checkpoint_meta(config, data, model_cfg, position: Position, history, steps: int) -> dict:
    """The JSON part of a checkpoint."""
    return {
        "format": FORMAT,
        "backend": config.backend,
        "arch": config.arch,
        "preset": resolved_preset(config),
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
            "permutation": "jaxvision.data.epoch_permutation(n_train, seed, epoch)",
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


def plan(config: TrainConfig, data) -> tuple[Path | None, dict | None]:
    """Where a run with a --checkpoint-dir starts: (None, None) from scratch, or (--resume) the
    latest checkpoint's folder and meta. Raises a UserError, before any model is built, when the
    folder and the flags disagree."""
    directory = Path(config.checkpoint_dir).absolute()
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--checkpoint-dir {directory} is a file; give a folder")
    steps = step_folders(directory)
    if not config.resume:
        if steps:
            meta = meta_at(directory / str(steps[-1]))
            raise UserError(
                f"{directory} already holds checkpoints (latest {describe_position(meta)}); "
                "pass --resume to continue that run, or choose another --checkpoint-dir"
            )
        return None, None
    if not steps:
        raise UserError(f"--resume: no checkpoint in {directory}; check the path, or drop "
                        "--resume to start a new run there")  # fmt: skip
    where = directory / str(steps[-1])
    meta = meta_at(where)
    check_resumable(meta, config, data, where)
    if meta["position"]["epoch"] >= config.epochs:
        raise UserError(
            f"{where} has already trained {meta['position']['epoch']} of --epochs "
            f"{config.epochs}; pass a larger --epochs to train on"
        )
    return where, meta


class Checkpoints:
    """The framework-free half: which checkpoint to start from, and when one is saved.

    A backend supplies `_write(step, meta)` and `_restore(step)`.
    """

    def __init__(self, config: TrainConfig, data, model_cfg, steps: int):
        self.config, self.data, self.model_cfg, self.steps = config, data, model_cfg, steps
        self.directory = Path(config.checkpoint_dir).absolute()

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def _steps(self) -> list[int]:
        return step_folders(self.directory)

    def start(self) -> tuple[Position, list[EpochStats]]:
        """Where training starts: the beginning, or (--resume) the latest checkpoint, restored."""
        where, meta = plan(self.config, self.data)
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
        return f"{path}, {describe_position(meta_at(path))}"


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
    return path, "torch" if (path / TORCH_META).exists() else "jax"


def meta_at(path: Path) -> dict:
    """The meta of checkpoint folder `path` (DIR/<step>), whichever backend wrote it."""
    if (path / TORCH_META).exists():
        return json.loads((path / TORCH_META).read_text())
    return JaxCheckpoints.open(path.parent, read_only=True).restore_meta(int(path.name))


def read_meta(directory: str | Path) -> tuple[Path, dict]:
    """The latest checkpoint's folder and meta, whichever backend wrote it."""
    path, _ = latest_step(directory)
    return path, meta_at(path)


# --- JAX: orbax --------------------------------------------------------------------------------


def to_nested(tree) -> dict:
    """A pytree (nnx.State, optax state) -> nested dicts of its arrays, keyed by path parts, the
    form orbax stores with readable names."""
    import jax

    out: dict = {}
    for path, leaf in jax.tree.flatten_with_path(tree)[0]:
        keys = [_key_name(k) for k in path]
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return out


def from_nested(nested: dict, target):
    """The inverse of `to_nested`: `nested`'s arrays in `target`'s tree structure."""
    import jax

    leaves, treedef = jax.tree.flatten_with_path(target)
    values = []
    for path, _ in leaves:
        node = nested
        for k in path:
            node = node[_key_name(k)]
        values.append(node)
    return jax.tree.unflatten(treedef, values)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    raise TypeError(f"unsupported pytree path entry {k!r}")


def _abstract(nested: dict):
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        nested)  # fmt: skip


class JaxCheckpoints(Checkpoints):
    """Orbax checkpoints of a `jaxvision.train.Trainer`; the arrays are restored onto its mesh."""

    def __init__(self, config, data, model_cfg, trainer):
        super().__init__(config, data, model_cfg, trainer.steps)
        self.trainer = trainer
        self.manager = self.open(self.directory)

    @staticmethod
    def open(directory: Path, read_only: bool = False):
        import orbax.checkpoint as ocp

        if read_only:
            logging.getLogger("absl").setLevel(logging.ERROR)  # "directory is read only" notes
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=KEEP,
                create=True,
                enable_async_checkpointing=False,  # saved before the next epoch starts
                cleanup_tmp_directories=True,  # what a killed save left: a temporary folder
            )
        return _Manager(ocp.CheckpointManager(directory, options=options))

    def _state(self) -> tuple[dict, dict]:
        """(model, train) as nested dicts: the model's variables by module path, whether
        trained, frozen or neither; the optimiser state and the RNG key's data."""
        import jax

        t = self.trainer
        model = to_nested(t.params)
        for part in (t.frozen, t.rest):
            _merge(model, to_nested(part))
        return model, {"opt_state": to_nested(t.opt_state), "key": jax.random.key_data(t.key)}

    def _write(self, step: int, meta: dict) -> None:
        model, train = self._state()
        self.manager.save(step, model, train, {**meta, "items": ["model", "train", "meta"]})

    def _restore(self, step: int) -> None:
        import jax

        t = self.trainer
        model, train = self._state()
        model, train = self.manager.restore_state(step, _abstract(model), _abstract(train))
        t.params, t.frozen, t.rest = (from_nested(model, part) for part in (t.params, t.frozen,
                                                                             t.rest))  # fmt: skip
        t.opt_state = from_nested(train["opt_state"], t.opt_state)
        t.key = jax.random.wrap_key_data(train["key"])


def load_flax_model(path: Path, meta: dict):
    """The Flax model in checkpoint folder `path` (DIR/<step>), in eval mode."""
    from flax import nnx

    from jaxvision.models import build_model
    from jaxvision.train import with_mode

    model = build_model(configs.config_from_dict(meta["arch"], meta["model_config"]),
                        rngs=nnx.Rngs(0))  # fmt: skip
    target = to_nested(nnx.state(model))
    manager = JaxCheckpoints.open(path.parent, read_only=True)
    restored, _ = manager.restore_state(int(path.name), _abstract(target))
    nnx.update(model, from_nested(restored, nnx.state(model)))
    return with_mode(model, train=False)


def _merge(into: dict, other: dict) -> None:
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


class _Manager:
    """An orbax CheckpointManager with this project's three items."""

    def __init__(self, manager):
        self.manager = manager

    def save(self, step: int, model: dict, train: dict | None, meta: dict) -> None:
        import orbax.checkpoint as ocp

        items = dict(model=ocp.args.StandardSave(model), meta=ocp.args.JsonSave(meta))
        if train is not None:
            items["train"] = ocp.args.StandardSave(train)
        self.manager.save(step, args=ocp.args.Composite(**items))
        self.manager.wait_until_finished()

    def restore_meta(self, step: int) -> dict:
        import orbax.checkpoint as ocp

        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore_state(self, step: int, model, train=None):
        import orbax.checkpoint as ocp

        items = dict(model=ocp.args.StandardRestore(model))
        if train is not None:
            items["train"] = ocp.args.StandardRestore(train)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out.model, (out.train if train is not None else None)
