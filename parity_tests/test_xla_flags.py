"""`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot` (YNNPACK for XLA's CPU matmul fusions)
trains the CNN about 1.6x faster on CPU (docs/performance.md), and JAX runs of every classifier
use it (the CNN and the ViT with the host split into a CPU device per core) unless the user sets
XLA_FLAGS; the detector, 1.4x faster without it, runs with XLA's own settings. It must compute
the same function as XLA's own compilation, which the rest of the suite runs under (conftest):
every classifier's logits and every gradient, compared here."""

import os
import subprocess
import sys

import numpy as np
from conftest import HOST_CORES, on_every_core

from jaxvision.apps import jax_backend
from jaxvision.apps.jax_backend import OURS, default_xla_flags
from jaxvision.core.archs import get_arch

YNN = "--xla_cpu_experimental_ynn_fusion_type=dot"

GRADS = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jaxvision.core.archs import get_config
from jaxvision.models import build_model
from jaxvision.training.trainer import cross_entropy
jax.config.update("jax_default_matmul_precision", "highest")
rng = np.random.default_rng(0)
out = {}
# (arch, batch, side, channels): the ImageNet archs small, as the lab-cpu recipes run them, with
# their full convolution stacks and a 256-wide classifier (4096 adds 100M parameters, no new op).
for arch, n, side, c in (("cnn", 16, 28, 1), ("vit", 16, 28, 1), ("alexnet", 4, 64, 3),
                         ("vgg16", 2, 32, 3)):
    x = rng.normal(size=(n, side, side, c)).astype(np.float32)
    y = np.arange(n) % 10
    config = get_config(arch, image_size=side, hidden=256) if c == 3 else get_config(arch)
    model = nnx.view(build_model(config, rngs=nnx.Rngs(0)), deterministic=True)
    graphdef, params = nnx.split(model)
    def loss_fn(p, x=x, y=y):
        logits = nnx.merge(graphdef, p)(jnp.asarray(x))
        return cross_entropy(logits, jnp.asarray(y)), logits
    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    out[arch + "/logits"] = np.asarray(logits)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        out[f"{arch}/grad/{name}"] = np.asarray(g)
np.savez(sys.argv[1], **out)
"""


def test_ynn_compiled_models_equal_xlas_default_forward_and_gradient(tmp_path):
    results = {}
    for name, flags in (("fast", YNN), ("plain", "")):
        env = {**os.environ, "XLA_FLAGS": flags, OURS: "(none: the test's)"}  # kept as set
        path = tmp_path / f"{name}.npz"
        r = subprocess.run([sys.executable, "-c", GRADS, str(path)], env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr
        results[name] = dict(np.load(path))
    fast, plain = results["fast"], results["plain"]
    assert fast.keys() == plain.keys() and len(fast) > 40
    worst = 0.0
    for key in fast:
        arch = key.split("/")[0]
        scale = float(np.abs(plain[key]).max())
        if ".attn.k.bias" in key:
            # Zero in exact arithmetic (softmax ignores a constant added to a row of scores):
            # rounding noise in both builds, far below the model's gradients.
            largest = max(float(np.abs(v).max()) for k, v in plain.items() if k.startswith(arch))
            assert max(scale, float(np.abs(fast[key]).max())) <= 1e-6 * largest, key
            continue
        # Each tensor within 1e-5 of its own largest value (84 float32 steps; measured: 3.1e-6)
        assert scale > 0, f"{key}: all zeros, which would prove nothing"
        worst = max(worst, float(np.abs(fast[key] - plain[key]).max()) / scale)
        np.testing.assert_allclose(fast[key], plain[key], rtol=0, atol=1e-5 * scale, err_msg=key)
    print(f"largest difference: {worst:.2g} of its tensor's largest value")
    for arch in ("cnn", "vit", "alexnet", "vgg16"):
        assert np.abs(plain[f"{arch}/logits"]).max() > 1e-3, arch


FLAGS_AFTER_START = r"""
import os, sys
from jaxvision.apps import backends
from jaxvision.core.config import TrainConfig
backend = backends.get("jax")
print(repr(os.environ.get("XLA_FLAGS")))
if len(sys.argv) > 1:
    backend.start(TrainConfig.for_arch(sys.argv[1]), None)
    print(repr(os.environ.get("XLA_FLAGS")))
"""


def flags_after_start(env_flags, arch=None, ours=None):
    """XLA_FLAGS in a fresh process on every core once the JAX backend is created, then (with
    `arch`) once a run of that arch has started."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", OURS)}
    env.update({k: v for k, v in (("XLA_FLAGS", env_flags), (OURS, ours)) if v is not None})
    with on_every_core():
        r = subprocess.run([sys.executable, "-c", FLAGS_AFTER_START, *([arch] if arch else [])],
                           env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return [eval(line) for line in r.stdout.splitlines()]


def test_jax_runs_default_to_the_ynn_flag_unless_the_user_sets_xla_flags():
    assert default_xla_flags() == YNN
    assert flags_after_start(None) == [YNN]
    assert flags_after_start("") == [""]  # set, though empty: the user's
    mine = "--xla_force_host_platform_device_count=2"
    assert flags_after_start(mine, "cnn") == [mine, mine]


def test_each_arch_takes_its_defaults_the_small_ones_a_cpu_device_per_core(monkeypatch):
    cnn = get_arch("cnn")
    # this worker may hold a share of the cores (conftest); the rule is checked for the host's
    monkeypatch.setattr(jax_backend, "host_cores", lambda: len(HOST_CORES))
    split = default_xla_flags(cnn)
    assert default_xla_flags(cnn, cores=1) == YNN  # one core: nothing to split
    four = f"{YNN} --xla_force_host_platform_device_count=4"
    assert default_xla_flags(cnn, cores=4) == four
    # End to end in a fresh process: the backend's default, then the CNN's run.
    assert flags_after_start(None, "cnn") == [YNN, split]
    assert flags_after_start(None, "faster_rcnn") == [YNN, ""]  # the detector: no YNN
    # A child of a detector run (ours, empty) and of a CNN run (ours, the split), another arch:
    assert flags_after_start("", "cnn", ours="") == ["", split]
    assert flags_after_start(split, "faster_rcnn", ours=split) == [split, ""]

    # The rule itself, in this process, as before JAX starts:
    monkeypatch.setattr(jax_backend, "jax_started", lambda: False)

    def after(arch, xla_flags, ours):
        for k, v in (("XLA_FLAGS", xla_flags), (OURS, ours)):
            monkeypatch.delenv(k, raising=False) if v is None else monkeypatch.setenv(k, v)
        jax_backend.use_default_xla_flags(get_arch(arch))
        return os.environ.get("XLA_FLAGS")

    for arch, want in (("cnn", split), ("vit", split), ("vgg16", YNN), ("alexnet", YNN),
                       ("faster_rcnn", "")):  # fmt: skip
        assert after(arch, None, None) == want, arch
        assert os.environ[OURS] == want
    # A child of a run (a test's or the lab's): the parent's defaults are replaced, a user's not.
    assert after("alexnet", split, split) == YNN
    assert after("vit", YNN, YNN) == split
    assert after("faster_rcnn", YNN, YNN) == ""  # XLA's own settings
    assert after("cnn", "", "") == split  # the detector's empty defaults are ours too
    assert after("cnn", "", None) == ""  # an empty XLA_FLAGS of the user's stands
    assert after("vit", YNN, None) == YNN
    assert after("alexnet", split, None) == split
    # Once JAX has started, this process's flags are what they are.
    monkeypatch.setattr(jax_backend, "jax_started", lambda: True)
    assert after("vit", YNN, YNN) == YNN
