"""ViT training end to end: both frameworks learn the bundled digits, and --save-attention."""

import numpy as np
import pytest

from jaxvision.apps import backends
from jaxvision.core.config import TrainConfig


@pytest.fixture(scope="module")
def short_vit_runs(sample):
    """The default recipe (AdamW, warmup + cosine, clipping, smoothing, augmentation) on the
    `tiny` preset, cut to 10 epochs, on the bundled 4,000 digits, in each framework."""
    results = {}
    for backend in ("jax", "torch"):
        config = TrainConfig(arch="vit", backend=backend, preset="tiny", progress=False,
                             epochs=10, warmup_epochs=1.0)  # fmt: skip
        results[backend] = backends.get(backend).train_and_evaluate(config, sample)
    return results


def test_short_vit_run_accuracy_in_both_frameworks(short_vit_runs):
    # Floor: 85% after 10 epochs on 4,000 digits (measured: ~88%; the full 60-epoch default
    # reaches ~98%; the lab's ViTs reported 75.9% to 97.1% on all 60,000 digits). The two
    # frameworks land within 2 points of each other.
    acc = {b: r.final.test_accuracy for b, r in short_vit_runs.items()}
    assert acc["jax"] >= 0.85 and acc["torch"] >= 0.85, acc
    assert abs(acc["jax"] - acc["torch"]) <= 0.02, acc
    for r in short_vit_runs.values():
        assert r.history[-1].train_loss < r.history[0].train_loss
        assert r.params == 139_018


def test_save_attention_writes_a_png_grid(tmp_path, train_cli, small_data_dir):
    out = tmp_path / "run"
    r = train_cli("--arch", "vit", "--preset", "micro", "--epochs", "1", "--warmup-epochs", "0",
                  "--data-dir", str(small_data_dir), "--no-progress", "--save-attention",
                  "--out", str(out), timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    png = out / "attention.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    h, w, _ = matplotlib.image.imread(png).shape
    assert w > 2 * h  # a row of digits above a row of maps
    assert f"wrote {png}" in r.stdout


def test_save_attention_refuses_a_cnn(train_cli):
    r = train_cli("--arch", "cnn", "--save-attention", timeout=120)
    assert r.returncode == 2
    assert (
        r.stderr.strip() == "error: --save-attention draws a ViT's attention; --arch cnn has none"
    )


def test_attention_rollout_is_row_stochastic_and_mixes_the_identity():
    from jaxvision.core.attention import attention_rollout, patch_map

    rng = np.random.default_rng(0)
    attns = []
    for _ in range(3):
        a = rng.random((2, 4, 17, 17))
        attns.append(a / a.sum(-1, keepdims=True))
    rollout = attention_rollout(attns)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-12)
    # One layer of uniform attention: 0.5 identity + 0.5 uniform.
    uniform = np.full((1, 1, 5, 5), 0.2)
    np.testing.assert_allclose(attention_rollout([uniform])[0], 0.5 * np.eye(5) + 0.1)
    maps = patch_map(rollout, 4, has_cls=True)
    assert maps.shape == (2, 4, 4)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0)


def test_scanned_chunks_train_exactly_like_the_per_step_loop(sample):
    """The ViT trains `log_every` steps per call under lax.scan. Against the one-step-per-call
    loop, over 2 epochs of 10 steps in chunks of 4, 4 and 2: the same step losses (the forward),
    the same parameters (the gradients and updates) and the same evaluation, bit for bit."""
    import jax

    from jaxvision.apps.jax_backend import JaxBackend
    from jaxvision.core.data import make_dataset
    from jaxvision.training.trainer import Trainer

    tr = np.random.default_rng(0).permutation(sample.n_train)[:640]
    data = make_dataset("mnist", "subset", sample.x_train[tr], sample.y_train[tr],
                        sample.x_test[::10], sample.y_test[::10], 10)  # fmt: skip
    runs = []
    for scan in (False, True):
        config = TrainConfig(arch="vit", epochs=2, warmup_epochs=0.5, batch_size=64, log_every=4,
                             scan=scan)  # fmt: skip
        model = JaxBackend().create_model(config, config.model_config(data), jax.random.key(0))
        trainer = Trainer(model, config, data)
        trainer.compile()
        losses = []
        for epoch in range(config.epochs):
            trainer.train_epoch(epoch)
            losses += trainer.step_losses
        runs.append((losses, jax.tree.leaves(trainer.state.params), trainer.evaluate()))
    (loop_losses, loop_params, loop_eval), (scan_losses, scan_params, scan_eval) = runs
    assert len(scan_losses) == 20 and scan_losses == loop_losses
    for a, b in zip(loop_params, scan_params, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert scan_eval["loss"] == loop_eval["loss"]
    np.testing.assert_array_equal(scan_eval["preds"], loop_eval["preds"])
    # A --log-every past the epoch scans the epoch's 10 steps, not 2**31 - 1 (24 GB, then killed)
    config = TrainConfig(arch="vit", epochs=1, batch_size=64, log_every=2**31 - 1, scan=True)
    model = JaxBackend().create_model(config, config.model_config(data), jax.random.key(0))
    trainer = Trainer(model, config, data)
    with jax.set_mesh(trainer.mesh):
        _, chunk_losses = jax.eval_shape(trainer._chunk, *trainer._example_args(), 0)
    assert chunk_losses.shape == (10,)
