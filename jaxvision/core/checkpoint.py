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
previous checkpoint as the latest valid one, never a half-written one that loads.

Every checkpoint folder ends with `MANIFEST.json`, written last and atomically: each file's size
and SHA-256. Every load verifies it first (`verify`), so a truncated file, flipped bits or a
folder without a manifest (a save that never finished) is reported as damage, naming the file,
never loaded. `--resume` takes the newest intact checkpoint and moves damaged ones aside to
`<step>.damaged` (it never deletes them); predict.py, evaluate.py and convert_checkpoint.py refuse
a damaged one with one line that names an intact one.

The data order needs no saved permutation: epoch `e` visits `epoch_permutation(n, seed, e)`, and
each step's dropout and augmentation keys are folded in from the global step. The seed, batch
size and training-set size that fix them must therefore match on resume (`check_resumable`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

from jaxvision.core.archs import ARCHS, config_from_dict
from jaxvision.core.config import TrainConfig
from jaxvision.core.errors import DamagedCheckpoint, UserError, denied, writing
from jaxvision.core.loop import Position
from jaxvision.core.results import EpochStats

FORMAT = "jaxvision-checkpoint/1"
MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "jaxvision-manifest/1"
KEEP = 3  # checkpoints kept per run: the newest ones
TORCH_STATE = "state.pt"  # the torch backend's files in DIR/<step>/
TORCH_META = "meta.json"

# What a resumed run must share with its checkpoint, and why.
SAME_MODEL = ("arch", "preset")
SAME_DATA_ORDER = ("dataset", "seed", "batch_size")
SAME_OPTIMISER_STATE = ("optimizer", "schedule", "unfreeze", "clipped", "sgd_momentum")
DATA_FLAGS = ("data_source", "data_dir", "tfds_data_dir")  # what chose the training images


def _settings(config: TrainConfig) -> dict:
    d = dataclasses.asdict(config)
    d["preset"] = config.resolved_preset
    return {**d, **_state_shape(d)}


def _state_shape(settings: dict) -> dict:
    """Settings whose value decides which optimiser state exists: clipping, and SGD's momentum
    (its buffers). Derived, so that an older checkpoint's config, which has the flags behind
    them, is read the same way."""
    momentum = settings.get("optimizer") == "sgd" and settings["momentum"] > 0
    return {"clipped": settings["clip_norm"] > 0, "sgd_momentum": momentum}


def checkpoint_meta(config, data, model_cfg, position: Position, history, steps: int) -> dict:
    """The JSON part of a checkpoint."""
    return {
        "format": FORMAT,
        "backend": config.backend,
        "arch": config.arch,
        "preset": config.resolved_preset,
        "model_config": dataclasses.asdict(model_cfg),
        "dataset": data.name,
        "data_source": data.data_source,
        "train_source": data.source,
        "train_digest": data.train_digest,
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


# What the tools read from a checkpoint's meta, and the JSON type each must have.
META_FIELDS = {
    "backend": str,
    "arch": str,
    "preset": str,
    "model_config": dict,
    "dataset": str,
    "num_classes": int,
    "n_train": int,
    "image_shape": list,
    "mean": list,
    "std": list,
    "position": dict,
    "steps_per_epoch": int,
    "history": list,
    "config": dict,
}
_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer"}


def not_ours(where: Path, what: str) -> UserError:
    """The one line for a sealed checkpoint folder `where` that this version cannot read, `what`
    saying why; a UserError, not damage: its manifest proved the files are what was written."""
    return UserError(f"{where} is not a checkpoint this jaxvision reads: {what}; use one that "
                     "train.py --checkpoint-dir wrote")  # fmt: skip


def check_fits(saved: dict, wanted: dict, where: Path, item: str, arch: str) -> None:
    """`not_ours` when checkpoint `where`'s `item` (its model, its optimiser state: {name:
    shape}) is not what this version builds for `arch` (`wanted`): a checkpoint of another
    version, or one edited and sealed again, is refused before a framework reads it (orbax
    would call it damaged, torch raise), naming the first differences."""

    def few(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    extra = sorted(k for k in saved if k not in wanted)
    missing = sorted(k for k in wanted if k not in saved)
    reshaped = sorted(k for k in saved if k in wanted and tuple(saved[k]) != tuple(wanted[k]))
    parts = [f"holds {few(extra)}, which this version's {arch} has not"] if extra else []
    parts += [f"lacks {few(missing)}"] if missing else []
    parts += [f"has {k} of shape {tuple(saved[k])}, not {tuple(wanted[k])}" for k in reshaped[:1]]
    if parts:
        raise not_ours(where, f"its {item} " + ", and ".join(parts))


def check_meta(meta, where: Path) -> dict:
    """`meta`, read from checkpoint folder `where`, when it is one this version reads; else a
    UserError naming what is not. Its manifest proves it is what was written, not that this
    version wrote it: an older format, or one edited and sealed again, stops here as one line
    rather than as a KeyError in whichever tool reads the field."""

    def refuse(what: str):
        return not_ours(where, what)

    if not isinstance(meta, dict):
        raise refuse(
            f"its meta is a JSON {_JSON_NAMES.get(type(meta), type(meta).__name__)}, not an object"
        )
    if meta.get("format") != FORMAT:
        raise refuse(f"its format is {meta.get('format')!r}, not {FORMAT!r}")
    for key, kind in META_FIELDS.items():
        if key not in meta:
            raise refuse(f"its meta has no {key!r}")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise refuse(f"its meta's {key!r} is {meta[key]!r}, not a JSON {_JSON_NAMES[kind]}")
    if meta["arch"] not in ARCHS:
        raise refuse(f"its arch {meta['arch']!r} is none of {', '.join(ARCHS)}")
    shape, stats = meta["image_shape"], (meta["mean"], meta["std"])
    if not (len(shape) == 3 and all(type(n) is int and n > 0 for n in shape)):
        raise refuse(f"its image_shape {shape} is not (height, width, channels)")
    if not all(len(v) == shape[2] and all(type(x) in (int, float) for x in v) for v in stats):
        raise refuse(f"its mean {stats[0]} and std {stats[1]} are not one number a channel")
    try:  # the dataclasses that take these fields reject a missing or unknown one
        config_from_dict(meta["arch"], meta["model_config"])
        for cls, fields in [
            (Position, meta["position"]),
            *((EpochStats, h) for h in meta["history"]),
        ]:
            cls(**fields)
            for f in dataclasses.fields(cls):
                if f.name in fields and not _fits(fields[f.name], str(f.type)):
                    raise TypeError(f"{cls.__name__}.{f.name} is {fields[f.name]!r}, not {f.type}")
    except (TypeError, ValueError, UserError) as e:  # UserError: a config the model refuses
        raise refuse(f"its meta does not fit this version's fields ({e})") from None
    return meta


_JSON_TYPES = {"int": (int,), "float": (int, float), "None": (type(None),), "dict": (dict,)}


def _fits(value, annotation: str) -> bool:
    """Whether a JSON value fits a dataclass field's annotation ('int', 'float | None', ...)."""
    kinds = [_JSON_TYPES.get(part.strip(), (object,)) for part in annotation.split("|")]
    return isinstance(value, sum(kinds, ())) and not isinstance(value, bool)


def describe_position(meta: dict) -> str:
    p, steps = meta["position"], meta["steps_per_epoch"]
    if p["step"] == 0:
        return f"after epoch {p['epoch']}"
    return f"epoch {p['epoch'] + 1}, step {p['step']}/{steps}"


def check_resumable(meta: dict, config: TrainConfig, data, where: Path) -> list[str]:
    """Raises a UserError naming both sides when `config` cannot continue the checkpointed run;
    returns the settings that changed but may (e.g. --epochs, --lr)."""
    saved, now = meta["config"], _settings(config)
    numbers = (int, float)
    if isinstance(saved.get("clip_norm"), numbers) and isinstance(saved.get("momentum"), numbers):
        saved = {**saved, **_state_shape(saved)}
    lacking = [k for k in (*SAME_MODEL, *SAME_DATA_ORDER, *SAME_OPTIMISER_STATE) if k not in saved]
    if lacking:  # a checkpoint from an older version, or one made outside train.py
        raise UserError(f"{where} cannot be resumed: its config has no {', '.join(lacking)}; "
                        "start a new run")  # fmt: skip
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
    if ARCHS[saved["arch"]].detector and saved.get("pretrained") != now["pretrained"]:
        kind = {True: "fine-tuned from COCO's weights (frozen batch norm)",
                False: "trained from scratch (batch norm)"}  # fmt: skip
        raise UserError(
            f"{where} holds a faster_rcnn {kind[bool(saved.get('pretrained'))]}, but this run "
            f"is {kind[bool(now['pretrained'])].split(' (')[0]}; resume with "
            f"{'--pretrained' if saved.get('pretrained') else '--no-pretrained'}"
        )
    if (meta["dataset"], meta["n_train"]) != (data.name, data.n_train) or any(
        saved[k] != now[k] for k in SAME_DATA_ORDER
    ):
        raise UserError(
            f"resuming must keep the data order: {where} was trained with "
            f"{both(SAME_DATA_ORDER, saved)} ({meta['n_train']:,} training images), this run has "
            f"{both(SAME_DATA_ORDER, now)} ({data.n_train:,})"
        )
    # The same name and size may be other images: synthetic's 60,000 are not MNIST's. (Older
    # checkpoints have no digest.)
    if meta.get("train_digest", data.train_digest) != data.train_digest:
        flags = " ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in DATA_FLAGS if saved.get(k))
        raise UserError(
            f"resuming must keep the training images: {where} was trained on "
            f"{meta['n_train']:,} {meta['dataset']} images from {meta.get('train_source', '?')}, "
            f"but this run's {data.n_train:,} from {data.source} differ (or come in another "
            f"order); pass the checkpoint's {flags}, or another --checkpoint-dir"
        )
    changed = [k for k in SAME_OPTIMISER_STATE if saved[k] != now[k]]
    if changed:
        raise UserError(
            f"{where}'s optimiser state does not fit this run: "
            + ", ".join(f"{k} {saved[k]} -> {now[k]}" for k in changed)
            + "; resume with the checkpoint's settings"
        )
    ignore = {"resume", "checkpoint_dir", "out", "progress", "devices", "clipped", "sgd_momentum",
              "notes"}  # fmt: skip
    return [
        f"{k} {saved[k]} -> {now[k]}"
        for k in now
        if k not in ignore and k in saved and saved[k] != now[k]
    ]


class Checkpoints:
    """The framework-free half: which checkpoint to start from, and when one is saved.

    A backend supplies `read_meta(path)`, `_write(step, meta)`, `_restore(step)` and
    `_partial(step)` (the temporary folders a failed `_write` of `step` leaves).
    """

    @staticmethod
    def read_meta(path: Path) -> dict:
        """The meta of checkpoint folder `path` (DIR/<step>)."""
        raise NotImplementedError

    @classmethod
    def plan(cls, config: TrainConfig, data) -> tuple[Path | None, dict | None]:
        """Where a run with a --checkpoint-dir starts: (None, None) from scratch, or (--resume) the
        newest intact checkpoint's folder and meta. Raises a UserError, before any model is built,
        when the folder and the flags disagree. --resume moves damaged checkpoints aside to
        `<step>.damaged`, with a line each; it never deletes them."""
        good, damaged = cls.check_folder(config)
        if not config.resume:
            return None, None
        directory = Path(config.checkpoint_dir).absolute()
        if not good and not damaged:
            raise UserError(f"--resume: no checkpoint in {directory}; check the path, or drop "
                            "--resume to start a new run there")  # fmt: skip
        if not good:
            raise DamagedCheckpoint(
                f"--resume: no intact checkpoint in {directory} ("
                + "; ".join(damaged.values())
                + "); start a new run in another --checkpoint-dir"
            )
        for step, why in damaged.items():  # out of the step numbering: kept, never pruned
            aside = set_aside(directory / str(step))
            print(f"skipping damaged checkpoint: {why}; moved it to {aside}", flush=True)
        where = directory / str(good[-1])
        meta = cls.read_meta(where)
        check_resumable(meta, config, data, where)
        if meta["position"]["epoch"] >= config.epochs:
            raise UserError(
                f"{where} has already trained {meta['position']['epoch']} of --epochs "
                f"{config.epochs}; pass a larger --epochs to train on"
            )
        return where, meta

    @classmethod
    def check_folder(cls, config: TrainConfig) -> tuple[list[int], dict[int, str]]:
        """`plan`'s checks that need no data (`run_lab.py` makes them before its first run): a
        UserError when --checkpoint-dir is a file or one checkpoint's folder, or, without
        --resume, already holds checkpoints. Returns its (intact, damaged) steps."""
        directory = Path(config.checkpoint_dir).absolute()
        if directory.exists() and not directory.is_dir():
            raise UserError(f"--checkpoint-dir {directory} is a file; give a folder")
        if is_step(directory.name) and (directory / MANIFEST).exists():
            raise UserError(
                f"--checkpoint-dir {directory} is one checkpoint's folder; pass the folder that "
                f"holds it: --checkpoint-dir {directory.parent}"
            )
        good, damaged = intact_steps(directory)
        if not config.resume:
            if damaged and not good:  # nothing --resume could continue from
                raise UserError(
                    f"--checkpoint-dir {directory} holds step-numbered folders that are not "
                    f"intact checkpoints ({', '.join(map(str, damaged))}; "
                    f"{damaged[max(damaged)]}); choose another --checkpoint-dir"
                )
            if good:
                raise UserError(
                    f"{directory} already holds checkpoints (latest intact: "
                    f"{describe_folder(cls, directory)}); "
                    "pass --resume to continue that run, or choose another --checkpoint-dir"
                )
        return good, damaged

    def __init__(self, config: TrainConfig, data, model_cfg, steps: int):
        self.config, self.data, self.model_cfg, self.steps = config, data, model_cfg, steps
        self.directory = Path(config.checkpoint_dir).absolute()

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def _steps(self) -> list[int]:
        return step_folders(self.directory)

    def start(self) -> tuple[Position, list[EpochStats]]:
        """Where training starts: the beginning, or (--resume) the latest checkpoint, restored."""
        while True:
            where, meta = self.plan(self.config, self.data)
            if where is None:
                return Position(), []
            try:
                self._restore(int(where.name))
                break
            except DamagedCheckpoint as e:  # intact files, non-finite numbers: try the next
                aside = set_aside(where)
                print(f"skipping damaged checkpoint: {e}; moved it to {aside}", flush=True)
        print(f"resumed from {where} ({describe_position(meta)})")  # --no-progress too
        changed = check_resumable(meta, self.config, self.data, where)
        if changed:  # a recipe's default among them, which the user did not type
            print("  changed since the checkpoint: " + ", ".join(changed))
        return Position(**meta["position"]), [EpochStats(**h) for h in meta["history"]]

    def save(self, position: Position, history: list[EpochStats]) -> Path:
        step = position.epoch * self.steps + position.step
        if step not in self._steps():  # Ctrl-C right after an epoch's save: it is saved
            meta = checkpoint_meta(
                self.config, self.data, self.model_cfg, position, history, self.steps
            )
            with writing(self.path(step), self._after_failed_save,
                         discard=lambda: self._discard_partial(step)):  # fmt: skip
                self._write(step, meta)
        return self.path(step)

    def _after_failed_save(self) -> str:
        if not intact_steps(self.directory)[0]:
            return "free disk space (or choose another --checkpoint-dir) and run again"
        return f"free disk space and continue with --resume (from {self.describe_latest()})"

    def _partial(self, step: int) -> list[Path]:
        raise NotImplementedError

    def _discard_partial(self, step: int) -> None:
        """Removes what a failed save of `step` left: the backend's temporary folders, and
        `DIR/<step>` itself if it got that far unsealed (`save` writes only a new step)."""
        for folder in [*self._partial(step), self.path(step)]:
            shutil.rmtree(folder, ignore_errors=True)

    def describe_latest(self) -> str:
        """The newest intact checkpoint, for messages."""
        return describe_folder(self, self.directory)


def describe_folder(backend, directory: Path) -> str:
    """The newest intact checkpoint, '<dir>/<step>, after epoch 3', and any damaged newer ones,
    for messages."""
    good, damaged = intact_steps(directory)
    newer = [str(directory / str(s)) for s in damaged if not good or s > good[-1]]
    note = f"; damaged: {', '.join(newer)}" if newer else ""
    if not good:
        return f"none intact in {directory}{note}"
    path = directory / str(good[-1])
    try:
        return f"{path}, {describe_position(backend.read_meta(path))}{note}"
    except UserError:  # a meta this version cannot read: its reader says so where it matters
        return f"{path}{note}"
    except NotImplementedError:  # `Checkpoints` itself, where no backend is loaded (run_lab.py)
        return f"{path}{note}"


def set_aside(folder: Path) -> Path:
    """Renames a damaged checkpoint folder to `<step>.damaged` (or `.damaged-2`, ...), out of the
    step numbering, and returns its new path."""
    aside, i = folder.with_name(f"{folder.name}.damaged"), 2
    while aside.exists():
        aside, i = folder.with_name(f"{folder.name}.damaged-{i}"), i + 1
    try:
        os.rename(folder, aside)
    except FileNotFoundError:  # another process of a multi-host run moved it first
        pass
    return aside


def step_folders(directory: Path) -> list[int]:
    """The finished checkpoints' steps in `directory`, oldest first (temporary folders aside)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if is_step(p.name) and p.is_dir())


def is_step(name: str) -> bool:
    """Whether a folder name is a step number: ASCII digits only. `str.isdigit` also takes '²',
    which `int` refuses, and '٣', which `int` reads as 3 (the folder named '3', not this one)."""
    return name.isascii() and name.isdigit()


def latest_step(directory: str | Path) -> tuple[Path, str]:
    """(the latest checkpoint's folder, 'jax' or 'torch'), after verifying its manifest; or a
    UserError saying what is wrong (damage, naming the newest intact checkpoint to use instead).
    The folder comes back absolute: orbax reads only absolute paths."""
    directory = Path(directory).absolute()
    if directory.is_file():
        raise UserError(f"{directory} is a file, not a checkpoint folder; pass a --checkpoint-dir "
                        "that train.py wrote")  # fmt: skip
    if not directory.is_dir():
        raise UserError(f"checkpoint folder {directory} does not exist; pass a --checkpoint-dir "
                        "that train.py wrote")  # fmt: skip
    steps = step_folders(directory)
    if not steps and is_step(directory.name):
        directory, steps = directory.parent, [int(directory.name)]  # one checkpoint's own folder
    if not steps:
        raise UserError(f"{directory} holds no finished checkpoint; pass the folder given to "
                        "train.py --checkpoint-dir")  # fmt: skip
    path = directory / str(steps[-1])
    try:
        verify(path)
    except DamagedCheckpoint as e:
        good, _ = intact_steps(directory)
        hint = (
            f"the newest intact one is {directory / str(good[-1])}; pass that folder instead"
            if good
            else "no checkpoint there is intact"
        )
        raise DamagedCheckpoint(f"damaged checkpoint: {e}; {hint}") from None
    return path, written_by(path)


def written_by(path: Path) -> str:
    """The backend that wrote checkpoint folder `path`: torch's holds a meta.json, orbax's not."""
    return "torch" if (path / TORCH_META).exists() else "jax"


# ---------------------------------------------------------------------------------------------
# The manifest: every file's size and SHA-256, written last
# ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def fsync(path: Path) -> None:
    """Flushes a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> Path:
    """`folder`/MANIFEST.json: the size and SHA-256 of every other file in it, written through a
    temporary file, flushed and renamed, so the manifest exists whole or not at all."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(folder)
    }
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1) + "\n")
    fsync(tmp)
    os.replace(tmp, folder / MANIFEST)
    fsync(folder)
    return folder / MANIFEST


def verify(folder: Path) -> None:
    """Raises DamagedCheckpoint naming the first problem when checkpoint folder `folder` does not
    match its manifest: no manifest, a file missing, of another size, or with another SHA-256."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest["format"] != MANIFEST_FORMAT or not all(
            isinstance(v, dict) and isinstance(v["size"], int) and isinstance(v["sha256"], str)
            for v in files.values()
        ):
            raise ValueError("unexpected contents")
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{folder} has no {MANIFEST}: its save did not finish, or it is "
                                "not a jaxvision checkpoint") from None  # fmt: skip
    except PermissionError as e:  # intact, as far as anyone can tell: not damage
        raise UserError(denied(e)) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise DamagedCheckpoint(f"{path} is damaged (not a readable manifest)") from None
    try:
        signature = tuple((n, (folder / n).stat().st_size, (folder / n).stat().st_mtime_ns)
                          for n in sorted(files))  # fmt: skip
    except OSError:
        signature = None
    if signature is not None and _verified.get(folder.absolute()) == signature:
        return  # verified already, and no file has changed since (a run reads it 3 times)
    for name, want in files.items():
        f = folder / name
        try:
            if not f.is_file():
                raise DamagedCheckpoint(f"{f} is missing" if not f.exists() else
                                        f"{f} is not a file")  # fmt: skip
            size = f.stat().st_size
            if size != want["size"]:
                raise DamagedCheckpoint(f"{f} is {size:,} bytes; its manifest says "
                                        f"{want['size']:,}")  # fmt: skip
            if _sha256(f) != want["sha256"]:
                raise DamagedCheckpoint(f"{f} does not match its SHA-256 in {MANIFEST} (bit "
                                        "rot or an edit)")  # fmt: skip
        except PermissionError as e:
            raise UserError(denied(e)) from None
        except OSError as e:
            raise DamagedCheckpoint(f"{f} cannot be read ({e.strerror or e})") from None
    if signature is not None:
        _verified[folder.absolute()] = signature


_verified: dict[Path, tuple] = {}  # folder -> the files' (name, size, mtime) when it verified


def intact_steps(directory: Path) -> tuple[list[int], dict[int, str]]:
    """(the steps whose folders verify, oldest first; {step: what is wrong} for the others)."""
    good, damaged = [], {}
    for step in step_folders(directory):
        try:
            verify(directory / str(step))
            good.append(step)
        except DamagedCheckpoint as e:
            damaged[step] = str(e)
    return good, damaged


def damaged_if_not_finite(bad: list[str], path: Path) -> None:
    """DamagedCheckpoint naming the variables of checkpoint `path` that hold NaN or inf."""
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise DamagedCheckpoint(
            f"{path} holds non-finite numbers (NaN or inf) in {shown}: the checkpoint is damaged "
            "(not a learning-rate problem); use an older checkpoint"
        )
