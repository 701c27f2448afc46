"""Shared fixtures. Parity runs in float32 at the highest matmul precision (no TF32 on GPUs)."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path


def _own_share_of_the_cores() -> list[int]:
    """Pins this xdist worker, and the scripts it runs, to its own share of the host's cores;
    returns them all. Two workers on two cores otherwise run two thread pools each (torch's
    OpenMP, XLA's) over the same cores, and torch's threads wait on each other: its
    tests ran 2-7x slower beside the other worker than alone, and the suite took 760 s rather
    than 610 s. Done before torch or JAX load, as both size their pools to the cores they see.
    `pytest -n 0` (no worker) runs on every core: the way to run one file, which `--dist
    loadfile` would give to one worker."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity to set
        return list(range(os.cpu_count() or 1))
    try:  # "gw0", "gw1", ...; a worker that replaces a crashed one counts on: gw2 takes gw0's
        index = int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw"))
        count = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    except (KeyError, ValueError):  # no worker (-n 0), or one named otherwise: every core
        return cores
    if 1 < count <= len(cores):
        os.sched_setaffinity(0, cores[index % count :: count])
    return cores


HOST_CORES = _own_share_of_the_cores()

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jaxvision.apps import backends
from jaxvision.apps.jax_backend import OURS
from jaxvision.core import data
from jaxvision.training.checkpoint import load_flax_model

jax.config.update("jax_default_matmul_precision", "highest")
# This process compiles with XLA's own settings: the parity tests hold there, and
# test_xla_flags proves that the flags a run of each classifier adds by default (YNNPACK's
# matmul fusions) compute the same function; the detector's runs add none. Set as ours (OURS),
# so that a test's `scripts/train.py` subprocess takes its arch's defaults, as a user's run
# does (the CNN and the ViT split the host into a device per core). A caller's XLA_FLAGS stands.
if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = os.environ[OURS] = ""
jax.devices()  # this process's flags, fixed now: an in-process run of the CNN keeps one device


def like_this_process() -> dict:
    """The environment for a subprocess that must compute bit for bit what this process does:
    its XLA_FLAGS made the user's (flags that differ from OURS are left alone), so that a CNN or
    ViT run neither splits the host nor takes YNNPACK."""
    return {**os.environ, OURS: "(none: XLA_FLAGS is the caller's)"}


@contextlib.contextmanager
def on_every_core(wanted: bool = True):
    """The subprocesses started inside run on every core of the host, not on this worker's
    share: for the tests of the CNN's and the ViT's default split (a CPU device per core), which
    the share would hide on a 2-core machine. The calling thread, whose mask a child inherits,
    holds every core until the block ends (a `preexec_fn` would make subprocess fork)."""
    if not (wanted and hasattr(os, "sched_getaffinity")):
        yield
        return
    share = os.sched_getaffinity(0)
    os.sched_setaffinity(0, HOST_CORES)
    try:
        yield
    finally:
        os.sched_setaffinity(0, share)


def split_device(batch_size: int) -> str:
    """The `device` a CLI run of the CNN or the ViT on every core (`on_every_core`) reports at
    `batch_size` under the default split (a CPU device per core, the most that divide the
    batch): 'cpu' or 'cpu xN'."""
    n = max(k for k in range(1, len(HOST_CORES) + 1) if batch_size % k == 0)
    return "cpu" if n == 1 else f"cpu x{n}"


torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session")
def sample():
    """The bundled 5,000 real MNIST digits, split 4,000 / 1,000."""
    return data.load_dataset("mnist", source="sample-split", verbose=False)


@pytest.fixture(scope="session")
def digits(sample):
    """32 real test digits as float32 NHWC, normalised like training does, with their labels."""
    x = (sample.x_test[:32].astype(np.float32) / 255.0 - sample.mean[0]) / sample.std[0]
    return x, sample.y_test[:32]


REPO = Path(__file__).resolve().parents[1]

FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def write_split(folder: Path, sample, suffix: str = "", n_train: int = 300, n_test: int = 100):
    """Writes the first n_train / n_test sample digits as the four MNIST IDX files."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = (
        sample.x_train[:n_train, ..., 0],
        sample.y_train[:n_train].astype(np.uint8),
        sample.x_test[:n_test, ..., 0],
        sample.y_test[:n_test].astype(np.uint8),
    )
    for name, arr in zip(FILES, arrays, strict=True):
        data.write_idx(folder / (name + suffix), arr)
    return folder


@pytest.fixture
def train_cli():
    """Runs scripts/train.py in a subprocess, as a user would (on this worker's cores, or with
    `every_core=True` on all of them); returns the CompletedProcess."""

    def run(*args: str, timeout: int = 600, env: dict | None = None, every_core: bool = False):
        with on_every_core(every_core):
            return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args],
                                  capture_output=True, text=True, timeout=timeout, cwd=REPO,
                                  env={**os.environ, **(env or {})})  # fmt: skip

    return run


@pytest.fixture
def assert_same_params():
    """Asserts that two Flax models hold bit-identical parameters."""

    def check(a: nnx.Module, b: nnx.Module) -> None:
        leaves_a = jax.tree.leaves(nnx.state(a, nnx.Param))
        leaves_b = jax.tree.leaves(nnx.state(b, nnx.Param))
        for x, y in zip(leaves_a, leaves_b, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    return check


@pytest.fixture(scope="session")
def small_data_dir(sample, tmp_path_factory):
    """Every 6th training and every 8th test digit of the sample (the sample is sorted by class,
    so every class is there: 667 and 125 digits) as MNIST IDX files, for `--data-dir`. CLI tests
    that check what a run writes, not how well it learns, train on a sixth of the data."""
    small = data.make_dataset("mnist", "subset", sample.x_train[::6], sample.y_train[::6],
                              sample.x_test[::8], sample.y_test[::8], 10)  # fmt: skip
    return write_split(tmp_path_factory.mktemp("idx"), small, n_train=small.n_train,
                       n_test=small.n_test)  # fmt: skip


# ---- checkpoints: what two runs must share ------------------------------------------------------


def read_meta(directory):
    """The latest checkpoint's folder and meta, whichever backend wrote it."""
    return backends.for_checkpoint(directory)[1:]


def figures(record):
    """metrics.json without the figures that are times (or the command that made it)."""
    drop = {"train_time_s", "eval_time_s", "compile_time_s", "finished_at", "command", "config"}
    history = [{k: v for k, v in h.items() if not k.endswith("time_s")} for h in record["history"]]
    return {**{k: v for k, v in record.items() if k not in drop}, "history": history}


def latest_params(directory):
    """The latest checkpoint's model variables, by path."""
    path, meta = read_meta(directory)
    if meta["backend"] == "torch":
        from torch_reference.checkpoint import load_state

        return {k: v.numpy() for k, v in load_state(path)["model"].items()}
    model = load_flax_model(path, meta)
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree.flatten_with_path(nnx.state(model))[0]}  # fmt: skip


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
