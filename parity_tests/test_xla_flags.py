"""`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot` (YNNPACK for XLA's CPU matmul fusions)
trains the CNN about 1.4x faster on CPU (docs/performance.md). It must compute the same function
as XLA's default compilation: the CNN's and ViT's logits and every gradient, compared here."""

import os
import subprocess
import sys

import numpy as np

YNN = "--xla_cpu_experimental_ynn_fusion_type=dot"

GRADS = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jaxvision.core.archs import get_config
from jaxvision.models import build_model
from jaxvision.training.trainer import cross_entropy
jax.config.update("jax_default_matmul_precision", "highest")
x = np.random.default_rng(0).normal(size=(16, 28, 28, 1)).astype(np.float32)
y = np.arange(16) % 10
out = {}
for arch in ("cnn", "vit"):
    model = nnx.view(build_model(get_config(arch), rngs=nnx.Rngs(0)), deterministic=True)
    graphdef, params = nnx.split(model)
    def loss_fn(p):
        logits = nnx.merge(graphdef, p)(jnp.asarray(x))
        return cross_entropy(logits, jnp.asarray(y)), logits
    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    out[arch + "/logits"] = np.asarray(logits)
    for i, g in enumerate(jax.tree.leaves(grads)):
        out[f"{arch}/grad{i}"] = np.asarray(g)
np.savez(sys.argv[1], **out)
"""


def test_ynn_compiled_models_equal_xlas_default_forward_and_gradient(tmp_path):
    results = {}
    for name, flags in (("fast", YNN), ("plain", "")):
        env = {**os.environ, "XLA_FLAGS": flags}
        path = tmp_path / f"{name}.npz"
        r = subprocess.run([sys.executable, "-c", GRADS, str(path)], env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr
        results[name] = dict(np.load(path))
    fast, plain = results["fast"], results["plain"]
    assert fast.keys() == plain.keys() and len(fast) > 10
    for key in fast:
        np.testing.assert_allclose(fast[key], plain[key], rtol=0, atol=1e-5, err_msg=key)
    assert np.abs(plain["cnn/logits"]).max() > 1e-2 and np.abs(plain["vit/logits"]).max() > 1e-2
