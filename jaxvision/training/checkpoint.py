"""The JAX backend's checkpoints: `jaxvision.core.checkpoint`'s layout, written with orbax.

DIR/<step>/ holds three orbax items: `model` (every variable of the model, by module path:
trained, frozen or neither), `train` (the optimiser state and the run's RNG key) and `meta`
(JSON, `jaxvision.core.checkpoint.checkpoint_meta`). What is saved is the trainer's
`TrainState` pytree; the arrays are restored onto the trainer's mesh.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from jaxvision.core.archs import config_from_dict
from jaxvision.core.checkpoint import (
    KEEP,
    Checkpoints,
    check_fits,
    check_meta,
    damaged_if_not_finite,
    write_manifest,
)
from jaxvision.core.errors import DamagedCheckpoint, UserError
from jaxvision.models import build_model
from jaxvision.training.state import TrainState, with_mode


def to_nested(tree) -> dict:
    """A pytree (nnx.State, optax state) -> nested dicts of its arrays, keyed by path parts, the
    form orbax stores with readable names."""
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


def _shapes(tree) -> dict[str, tuple]:
    """{variable name ("fc1/kernel"): shape} of a nested tree of arrays, abstract arrays or
    orbax's saved metadata."""
    return {
        "/".join(_key_name(k) for k in keys).removesuffix("/value"): tuple(leaf.shape)
        for keys, leaf in jax.tree.flatten_with_path(tree)[0]
    }


def _saved_shapes(folder: Path, item: str) -> dict[str, tuple] | None:
    """`_shapes` of item `item` in checkpoint folder `folder`, from orbax's metadata; None when
    that cannot be read."""
    try:
        return _shapes(ocp.StandardCheckpointHandler().metadata(epath.Path(folder / item)))
    except Exception:  # noqa: BLE001  (orbax raises many kinds; the restore reports damage)
        return None


def _abstract(nested: dict):
    """Shapes, dtypes and placements to restore into (one device for a model `nnx.eval_shape`
    made, which has none)."""
    one = jax.sharding.make_single_device_sharding(jax.devices()[0])

    def spec(a):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None) or one)

    return jax.tree.map(spec, nested)


class JaxCheckpoints(Checkpoints):
    """Orbax checkpoints of a `Trainer`'s `TrainState`; the arrays are restored onto its mesh."""

    def __init__(self, config, data, model_cfg, trainer):
        super().__init__(config, data, model_cfg, trainer.steps)
        self.trainer = trainer  # its `state` is what is saved and restored
        self.manager = self.open(self.directory)

    @staticmethod
    def open(directory: Path, read_only: bool = False):
        directory = utf8_folder(directory)
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
        return _Manager(_CheckpointManager(directory, options=options))

    @staticmethod
    def read_meta(path: Path) -> dict:
        meta = JaxCheckpoints.open(path.parent, read_only=True).restore_meta(int(path.name))
        return check_meta(meta, path)

    @staticmethod
    def _items(state: TrainState) -> tuple[dict, dict]:
        """(model, train) as nested dicts: the model's variables by module path, whether
        trained, frozen or neither; the optimiser state and the RNG key's data."""
        model = to_nested(state.params)
        for part in (state.frozen, state.rest):
            _merge(model, to_nested(part))
        train = {"opt_state": to_nested(state.opt_state), "key": jax.random.key_data(state.key)}
        return model, train

    def _write(self, step: int, meta: dict) -> None:
        model, train = self._items(self.trainer.state)
        self.manager.save(step, model, train, {**meta, "items": ["model", "train", "meta"]})

    def _partial(self, step: int) -> list[Path]:
        return list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"))

    def _restore(self, step: int) -> None:
        state = self.trainer.state
        model, train = self._items(state)
        model, train = self.manager.restore_state(step, _abstract(model), _abstract(train),
                                                  arch=self.config.arch)  # fmt: skip
        check_finite({"model": model, "optimizer": train["opt_state"]}, self.path(step))
        self.trainer.state = TrainState(
            params=from_nested(model, state.params),
            frozen=from_nested(model, state.frozen),
            rest=from_nested(model, state.rest),
            opt_state=from_nested(train["opt_state"], state.opt_state),
            key=jax.random.wrap_key_data(train["key"]),
        )


def save_weights(directory: Path, step: int, model: nnx.Module, meta: dict) -> None:
    """A weights-only checkpoint DIR/<step> (model and meta, no optimiser state) of `model`."""
    JaxCheckpoints.open(directory).save(step, to_nested(nnx.state(model)), None, meta)


def load_flax_model(path: Path, meta: dict):
    """The Flax model in checkpoint folder `path` (DIR/<step>), in eval mode. The model is built
    abstractly (`nnx.eval_shape`): no initialiser runs, since the checkpoint fills every
    variable."""
    config = config_from_dict(meta["arch"], meta["model_config"])
    pretrained = meta["config"].get("pretrained", False)
    model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0), pretrained=pretrained))
    target = to_nested(nnx.state(model))
    manager = JaxCheckpoints.open(path.parent, read_only=True)
    restored, _ = manager.restore_state(int(path.name), _abstract(target), arch=meta["arch"])
    check_finite(restored, path)
    nnx.update(model, from_nested(restored, nnx.state(model)))
    return with_mode(model, train=False)


def check_finite(nested: dict, path: Path) -> None:
    """DamagedCheckpoint when a floating-point variable of `nested` holds NaN or inf."""
    bad = [
        "/".join(_key_name(k) for k in keys)
        for keys, leaf in jax.tree.flatten_with_path(nested)[0]
        if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)
        and not np.isfinite(np.asarray(leaf)).all()
    ]
    damaged_if_not_finite(bad, path)


def _merge(into: dict, other: dict) -> None:
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _from_orbax(tb) -> bool:
    frames = traceback.extract_tb(tb) if tb is not None else []
    return any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in frames)


def _orbax_noise(unraisable) -> bool:
    """An unraisable error from orbax's unwinding of a failed save: tensorstore's late callbacks
    onto orbax's closed event loops, or its abandoned coroutines, collected at exit."""
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
        return True
    return _from_orbax(unraisable.exc_traceback)


class _OrbaxFailureLogs(logging.Filter):
    """Drops the absl and asyncio records of orbax's threads about a failed write (their
    tracebacks run through orbax's files, or name its writer)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _from_orbax(record.exc_info[2]):
            return False
        return "orbax" not in record.getMessage() and "OCDBT" not in record.getMessage()


_FILTER = _OrbaxFailureLogs()
_LOGGERS = ("absl", "asyncio")


@contextlib.contextmanager
def _hushed_orbax():
    """A failed orbax write as one error, not pages: orbax's threads log it, tracebacks and
    all, through absl and asyncio, while the save unwinds and after it; its abandoned event
    loops and coroutines raise unraisable errors and warnings until the process exits. The
    save's own error carries the cause and becomes the command's one line. During a save, and
    for the rest of the process after one that failed, those records, unraisable errors and
    warnings are dropped; nothing else is (other records, other unraisable errors and warnings
    go through as before)."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _orbax_noise(unraisable):
            previous(unraisable)

    for name in _LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)
    sys.unraisablehook = hook
    before = set(threading.enumerate())
    failed = False
    try:
        yield
    except Exception:
        failed = True
        warnings.filterwarnings("ignore", "coroutine 'async_serialize", RuntimeWarning)
        _join_new_threads(before)
        raise
    finally:
        if not failed:  # after a failure the filters stay: orbax's threads have more to say
            sys.unraisablehook = previous
            for name in _LOGGERS:
                logging.getLogger(name).removeFilter(_FILTER)


def _join_new_threads(before: set, timeout: float = 10.0) -> None:
    """Waits, up to `timeout` seconds, for the Python threads started since `before` (the save's,
    still writing the other items after the first failed one) to end, so that the caller's
    cleanup is not written into. (tensorstore's own C++ writers cannot be waited for.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = [t for t in threading.enumerate()
                   if t not in before and t is not threading.current_thread()
                   and type(t).__name__ != "_DummyThread"]  # fmt: skip
        if not pending:
            return
        try:
            if pending[0].is_alive():
                pending[0].join(timeout=max(deadline - time.monotonic(), 0))
            else:  # created, not yet running
                time.sleep(0.01)
        except RuntimeError:
            time.sleep(0.01)


def utf8_folder(directory: Path | str) -> Path:
    """`directory` as the absolute path orbax takes; a UserError when that is not valid UTF-8 (a
    name from another system's encoding), which orbax's tensorstore cannot open."""
    directory = Path(directory).absolute()
    try:
        str(directory).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(directory).encode("utf-8", "backslashreplace").decode()
        why = "the JAX backend's checkpoints (orbax) need a folder path that is valid UTF-8"
        raise UserError(f"{shown}: {why}; rename it, or choose another folder") from None
    return directory


class _CheckpointManager(ocp.CheckpointManager):
    """Orbax's, kept from asking JAX's preemption sync where to stop: `run_epochs` asks it at
    every dispatch with a count of its own (`jaxvision.core.loop.SyncPoint`), which orbax's
    asking with the step it saves would move, so that a stop came late, or never."""

    def reached_preemption(self, step: int) -> bool:
        return False


class _Manager:
    """An orbax CheckpointManager with this project's three items."""

    def __init__(self, manager):
        self.manager = manager

    def save(self, step: int, model: dict, train: dict | None, meta: dict) -> None:
        items = dict(model=ocp.args.StandardSave(model), meta=ocp.args.JsonSave(meta))
        if train is not None:
            items["train"] = ocp.args.StandardSave(train)
        with _hushed_orbax():  # a failed write is the caller's one line, not pages of logs
            self.manager.save(step, args=ocp.args.Composite(**items))
            self.manager.wait_until_finished()
        if jax.process_index() == 0:  # orbax has finished every process's part by now
            write_manifest(Path(self.manager.directory) / str(step))  # last: it seals the folder

    def restore_meta(self, step: int) -> dict:
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return self._restore(step, args).meta

    def restore_state(self, step: int, model, train=None, *, arch: str):
        """The model's (and the training state's) arrays into the abstract trees `model` and
        `train`, after checking that the saved trees are theirs: `check_fits`, one line for a
        checkpoint `arch`'s model in this version does not fit, where orbax's mismatch would
        read as damage."""
        where = Path(self.manager.directory) / str(step)
        items = dict(model=ocp.args.StandardRestore(model))
        if train is not None:
            items["train"] = ocp.args.StandardRestore(train)
        for item, what in (("model", "model"), ("train", "training state")):
            saved = _saved_shapes(where, item) if item in items else None
            if saved is not None:  # unreadable metadata: the restore below says so, as damage
                wanted = _shapes({"model": model, "train": train}[item])
                check_fits(saved, wanted, where, what, arch)
        out = self._restore(step, ocp.args.Composite(**items))
        return out.model, (out.train if train is not None else None)

    def _restore(self, step: int, args):
        """Callers verify the manifest first; this catches what it cannot see (a checkpoint
        folder orbax does not understand), as damage, in one line."""
        try:
            return self.manager.restore(step, args=args)
        except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds)
            where = Path(self.manager.directory) / str(step)
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise DamagedCheckpoint(
                f"cannot read checkpoint {where} ({type(e).__name__}: {first})"
            ) from None
