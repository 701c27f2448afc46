"""Checkpoints, resume, determinism, Ctrl-C and SIGTERM, NaN and export, through the real command
line.

The CNN runs on the bundled sample (31 steps an epoch at batch 128). Most runs call
`jaxvision.apps.train.main` in-process; the ones that need a signal or a killed process run
scripts/train.py in a subprocess.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    assert_identical,
    figures,
    latest_params,
    like_this_process,
    read_meta,
    split_device,
)

from jaxvision.apps import backends
from jaxvision.apps import train as cli
from jaxvision.core import checkpoint, errors, loop
from jaxvision.core.config import TrainConfig, lr_factor
from jaxvision.core.data import load_dataset, make_dataset, write_idx
from jaxvision.training.checkpoint import load_flax_model
from torch_reference.checkpoint import TorchCheckpoints, write_folder
from torch_reference.train import Trainer as TorchTrainer
from torch_reference.train import create_model

# The lab's recipe (a constant lr: a run's schedule does not depend on --epochs) on the 4,000 /
# 1,000 split, whose step counts (31 per epoch at batch 128) the tests name.
CNN = ["--arch", "cnn", "--preset", "tiny", "--recipe", "lab-cpu", "--data-source", "sample-split",
       "--no-progress"]  # fmt: skip


def train(tmp, name, *args, ckpt=None):
    """scripts/train.py's main, in-process; returns (exit code, metrics.json or None)."""
    out = tmp / f"run-{name}"
    argv = [*CNN, "--out", str(out), "--checkpoint-dir", str(ckpt or tmp / name), *args]
    code = cli.main(argv)
    path = out / "metrics.json"
    return code, (json.loads(path.read_text()) if path.exists() else None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two straight 2-epoch JAX runs, and one of 1 epoch then resumed for 1."""
    tmp = tmp_path_factory.mktemp("ckpt")
    out = {"tmp": tmp}
    out["straight"] = train(tmp, "straight", "--epochs", "2")
    out["again"] = train(tmp, "again", "--epochs", "2")
    out["first"] = train(tmp, "split", "--epochs", "1")
    shutil.copytree(tmp / "split", tmp / "after-one")  # for the NaN and wrong-arch tests
    out["resumed"] = train(tmp, "resumed", "--epochs", "2", "--resume", ckpt=tmp / "split")
    return out


def test_resume_matches_an_uninterrupted_run(runs):
    tmp = runs["tmp"]
    assert runs["straight"][0] == runs["first"][0] == runs["resumed"][0] == 0
    assert_identical(latest_params(tmp / "straight"), latest_params(tmp / "split"))
    straight, resumed = runs["straight"][1], runs["resumed"][1]
    assert figures(resumed) == figures(straight)  # history included: epoch 1 comes from the ckpt
    assert len(resumed["history"]) == 2


def test_only_ascii_digit_folders_are_steps(runs, tmp_path):
    """'²' and '٣' are digits to str.isdigit, not to int: beside the checkpoints, or given as
    the folder, they are no step."""
    copy = tmp_path / "ckpt"
    shutil.copytree(runs["tmp"] / "straight", copy)
    for name in ("²", "٣", "12a"):
        (copy / name).mkdir()
    assert checkpoint.step_folders(copy) == [31, 62]
    assert checkpoint.latest_step(copy)[0] == copy / "62"
    with pytest.raises(errors.UserError, match="holds no finished checkpoint"):
        checkpoint.latest_step(copy / "²")


def test_checkpoint_holds_state_and_data_order(runs):
    tmp = runs["tmp"]
    assert checkpoint.step_folders(tmp / "straight") == [31, 62]  # one per epoch, by step
    path, meta = read_meta(tmp / "straight")
    assert meta["position"] == {"epoch": 2, "step": 0, "loss_total": 0.0, "seconds": 0.0}
    assert meta["data_order"]["seed"] == 0 and meta["data_order"]["epoch"] == 2
    assert (meta["arch"], meta["preset"], meta["backend"]) == ("cnn", "tiny", "jax")
    assert {p.name for p in path.iterdir()} >= {"model", "train", "meta"}


def test_same_seed_same_metrics(runs):
    """Determinism on the JAX CPU path: every figure but the times is identical."""
    assert figures(runs["again"][1]) == figures(runs["straight"][1])
    assert_identical(latest_params(runs["tmp"] / "again"), latest_params(runs["tmp"] / "straight"))


def test_nan_keeps_the_last_good_checkpoint(runs, capsys):
    tmp = runs["tmp"]
    ckpt = tmp / "nan"
    shutil.copytree(tmp / "after-one", ckpt)
    capsys.readouterr()
    code, record = train(tmp, "nan", "--epochs", "2", "--resume", "--lr", "1e30", ckpt=ckpt)
    err = capsys.readouterr().err.strip()
    assert code == 1 and record is None
    assert len(err.splitlines()) == 1, err
    assert "epoch 2, step" in err and "nan" in err.lower()
    assert f"last good checkpoint: {ckpt / '31'}, after epoch 1" in err
    assert checkpoint.step_folders(ckpt) == [31]
    assert_identical(latest_params(ckpt), latest_params(tmp / "after-one"))


def test_resume_on_another_device_count(runs, train_cli):
    """The runs above train in this process, on one device; this one resumes the same epoch-1
    checkpoint from the command line, where the CNN trains over a CPU device per core. The state
    is restored onto the new mesh whole, so epoch 1's record carries over exactly; epoch 2
    differs from the straight run only in the order the gradient's per-device parts are summed."""
    tmp = runs["tmp"]
    ckpt, out = tmp / "split-resumed", tmp / "run-split-resumed"
    shutil.copytree(tmp / "after-one", ckpt)
    p = train_cli(*CNN, "--epochs", "2", "--resume", "--checkpoint-dir", str(ckpt),
                  "--out", str(out), every_core=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    split, straight = json.loads((out / "metrics.json").read_text()), runs["straight"][1]
    assert straight["device"] == "cpu" and split["device"] == split_device(128)
    assert figures(split)["history"][0] == figures(straight)["history"][0]
    a, b = split["history"][1], straight["history"][1]  # measured: 4e-8 apart, the params 3e-8
    np.testing.assert_allclose([a["train_loss"], a["test_loss"]],
                               [b["train_loss"], b["test_loss"]], rtol=1e-6)  # fmt: skip
    assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 1 / 1000  # one digit at most
    mine, theirs = latest_params(ckpt), latest_params(tmp / "straight")
    for k in mine:
        np.testing.assert_allclose(mine[k], theirs[k], rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.parametrize(
    "args, names",
    [
        (
            ["--arch", "vit", "--warmup-epochs", "1"],
            ["--arch cnn --preset tiny", "--arch vit --preset tiny"],
        ),
        (["--preset", "lab"], ["--preset tiny", "--preset lab"]),
        (["--backend", "torch"], ["jax backend", "--backend jax"]),
        (["--seed", "1"], ["--seed 0", "--seed 1"]),
        (["--optimizer", "sgd"], ["optimizer adam -> sgd"]),
        (["--epochs", "1"], ["already trained 1 of --epochs 1"]),
    ],
)
def test_resume_refuses_a_checkpoint_that_does_not_fit(runs, capsys, args, names):
    tmp = runs["tmp"]
    capsys.readouterr()
    code = cli.main([*CNN, "--epochs", "2", "--checkpoint-dir", str(tmp / "after-one"), "--resume",
                     "--out", str(tmp / "refused"), *args])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for name in names:
        assert name in err, err
    assert checkpoint.step_folders(tmp / "after-one") == [31]


def test_resume_refuses_other_images_of_the_same_count(runs, capsys):
    """The checkpoint's 4,000 training digits as IDX files resume it; 4,000 others, the same
    dataset name and count, are refused: a checkpoint records the training images' digest."""
    tmp, ds = runs["tmp"], load_dataset("mnist", source="sample-split", verbose=False)
    for name, order in (("same", slice(None)), ("other", slice(None, None, -1))):
        folder = tmp / f"idx-{name}"
        folder.mkdir()
        for split, x, y in (("train", ds.x_train[order], ds.y_train[order]),
                            ("t10k", ds.x_test, ds.y_test)):  # fmt: skip
            write_idx(folder / f"{split}-images-idx3-ubyte", x[..., 0])
            write_idx(folder / f"{split}-labels-idx1-ubyte", y.astype(np.uint8))
    capsys.readouterr()
    ckpt = tmp / "after-one-other"
    shutil.copytree(tmp / "after-one", ckpt)
    code = cli.main([*CNN, "--epochs", "2", "--checkpoint-dir", str(ckpt), "--resume",
                     "--data-source", "idx", "--data-dir", str(tmp / "idx-other"),
                     "--out", str(tmp / "refused-other")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "must keep the training images" in err and str(tmp / "idx-other") in err
    assert "pass the checkpoint's --data-source sample-split," in err
    assert checkpoint.step_folders(ckpt) == [31]

    ckpt = tmp / "after-one-same"
    shutil.copytree(tmp / "after-one", ckpt)
    code = cli.main([*CNN, "--epochs", "2", "--checkpoint-dir", str(ckpt), "--resume",
                     "--data-source", "idx", "--data-dir", str(tmp / "idx-same"),
                     "--out", str(tmp / "run-same")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert_identical(latest_params(ckpt), latest_params(tmp / "straight"))


def test_existing_checkpoints_need_resume(runs, capsys):
    capsys.readouterr()
    code = cli.main([*CNN, "--checkpoint-dir", str(runs["tmp"] / "after-one")])
    err = capsys.readouterr().err
    assert code == 2 and "pass --resume" in err and "after epoch 1" in err


def test_resume_needs_a_checkpoint(tmp_path, capsys):
    code = cli.main([*CNN, "--checkpoint-dir", str(tmp_path / "empty"), "--resume"])
    assert code == 2 and "no checkpoint in" in capsys.readouterr().err


def test_step_numbered_folders_that_are_not_checkpoints_are_named(tmp_path, capsys):
    """A folder of years is not a run to --resume: the message says so, without suggesting it."""
    for year in ("2023", "2024"):
        (tmp_path / "photos" / year).mkdir(parents=True)
    code = cli.main([*CNN, "--checkpoint-dir", str(tmp_path / "photos")])
    err = capsys.readouterr().err
    assert code == 2 and "holds step-numbered folders that are not intact checkpoints" in err
    assert "(2023, 2024; " in err and "--resume" not in err
    assert err.endswith("2024 has no MANIFEST.json: its save did not finish, or it is not a "
                        "jaxvision checkpoint); choose another --checkpoint-dir\n")  # fmt: skip


def _train_subprocess(*args, env=None):
    return subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=env)  # fmt: skip


SMALL = [*CNN[:-1], "--batch-size", "32", "--epochs", "2"]  # 125 steps an epoch


def _signal_in_epoch_two(tmp_path, signum: int) -> tuple[int, str, Path]:
    """A run of SMALL sent `signum` once epoch 1 is saved, in epoch 2: its exit code, the last
    line of its stderr, and its checkpoint folder, which must hold epoch 1's and epoch 2's
    partial checkpoints."""
    ckpt = tmp_path / "ckpt"
    p = _train_subprocess(*SMALL, "--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "run"),
                          env=like_this_process())  # fmt: skip
    deadline = time.monotonic() + 120
    sealed = ckpt / "125" / checkpoint.MANIFEST  # written last: epoch 1's save is done
    while not sealed.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # epoch 2 is training
    p.send_signal(signum)
    _, err = p.communicate(timeout=120)
    saved = checkpoint.step_folders(ckpt)
    assert saved[0] == 125 and len(saved) == 2 and 125 < saved[1] < 250, (saved, err)
    last = err.strip().splitlines()[-1]
    assert last.endswith(f"saved {ckpt / str(saved[1])}; continue with --resume"), last
    return p.returncode, last, ckpt


def test_ctrl_c_saves_mid_epoch_and_resumes_exactly(tmp_path):
    """Ctrl-C in epoch 2 saves a partial epoch; resumed from it, the run ends bit for bit as the
    straight run does."""
    code, last, ckpt = _signal_in_epoch_two(tmp_path, signal.SIGINT)
    assert code == 130, last
    assert last.startswith("error: interrupted at epoch 2, step"), last
    assert cli.main([*SMALL, "--no-progress", "--checkpoint-dir", str(ckpt), "--resume",
                     "--out", str(tmp_path / "resumed")]) == 0  # fmt: skip
    assert cli.main([*SMALL, "--no-progress", "--checkpoint-dir", str(tmp_path / "straight"),
                     "--out", str(tmp_path / "straight-run")]) == 0  # fmt: skip
    assert_identical(latest_params(ckpt), latest_params(tmp_path / "straight"))
    resumed, straight = (json.loads((tmp_path / d / "metrics.json").read_text())
                         for d in ("resumed", "straight-run"))  # fmt: skip
    assert figures(resumed) == figures(straight)


def test_sigterm_saves_mid_epoch_like_ctrl_c_and_exits_143(tmp_path):
    """What a scheduler sends before it preempts a job: the same stop after the step and the same
    checkpoint as Ctrl-C (whose resume is checked above), and 128 + SIGTERM as the exit code."""
    code, last, _ = _signal_in_epoch_two(tmp_path, signal.SIGTERM)
    assert code == 143, last
    assert last.startswith("error: stopped by SIGTERM at epoch 2, step"), last


def test_a_second_sigterm_is_ignored_a_second_ctrl_c_is_not_and_the_handlers_are_put_back(
    capsys,
):
    """In this process: the first SIGTERM asks for a stop; a second one (Slurm sends one more
    before its SIGKILL) changes nothing, while a Ctrl-C would end the process at once; leaving
    restores the caller's handlers."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with loop.stop_on_signal():
        assert signal.getsignal(signal.SIGTERM) not in (before[signal.SIGTERM], signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        assert loop._stop.is_set() and loop._stopped_by == [signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)  # this process lives on, still stopping
        assert loop._stop.is_set() and loop._stopped_by == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        interrupted = loop._interrupted(None, loop.Position(1, 7), 125, [])
    said = capsys.readouterr().err.splitlines()
    assert said[-2:] == ["SIGTERM: stopping after this step (Ctrl-C or SIGKILL to quit now)",
                         "SIGTERM again: already stopping after this step"], said  # fmt: skip
    assert str(interrupted) == (
        "stopped by SIGTERM at epoch 2, step 7/125; nothing saved (no --checkpoint-dir)"
    )
    assert interrupted.exit_code == 143
    assert {s: signal.getsignal(s) for s in before} == before
    assert not loop._stop.is_set() and not loop._stopped_by


def test_a_distributed_run_stops_where_its_sync_point_says_and_passes_ctrl_c_on(capsys):
    """--distributed: SIGTERM stays with JAX's preemption notice (here a stand-in handler), a
    Ctrl-C is passed on to it instead of stopping this process alone, and the loop stops at the
    dispatch where the sync point (every process's, in a real run) comes true."""
    notices, counts = [], []
    fire_at = 3

    def reached(count):
        counts.append(count)
        return bool(notices) and count == fire_at

    sigint_before = signal.getsignal(signal.SIGINT)
    previous = signal.signal(signal.SIGTERM, lambda *a: notices.append(1))  # JAX's notifier
    try:
        notifier = signal.getsignal(signal.SIGTERM)
        with loop.stop_on_signal(loop.SyncPoint(reached)):
            assert signal.getsignal(signal.SIGTERM) is notifier
            os.kill(os.getpid(), signal.SIGINT)
            assert notices == [1] and not loop._stop.is_set()
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            tracker = loop.LossTracker(TrainConfig(arch="cnn", log_every=100), 0, 10, list)
            tracker.add(0.5)
            tracker.add(0.5)  # the sync point is not reached yet: training goes on
            with pytest.raises(loop.StopRequested) as stop:
                tracker.add(0.5)
            assert stop.value.position.step == 3 and counts == [1, 2, 3]
            assert str(loop._interrupted(None, stop.value.position, 10, [])).startswith(
                "interrupted at epoch 1, step 3/10"
            )
            loop._stopped_by.clear()  # another process, which had no signal, says why it stopped
            assert str(loop._interrupted(None, stop.value.position, 10, [])).startswith(
                "stopped with the whole run (a SIGTERM or Ctrl-C to one of its processes) at "
                "epoch 1, step 3/10"
            )
        assert signal.getsignal(signal.SIGTERM) is notifier and not loop._sync_point
        with loop.stop_on_signal(loop.SyncPoint(None)):  # JAX's preemption service is off
            assert signal.getsignal(signal.SIGTERM) is notifier
            assert signal.getsignal(signal.SIGINT) is sigint_before
            assert not loop._stop_requested()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "SIGINT: stopping every process after the same step" in capsys.readouterr().err


def test_orbax_saves_leave_jaxs_preemption_sync_to_the_loop(tmp_path, monkeypatch):
    """Orbax's CheckpointManager asks JAX's preemption sync at every save, with the step it
    saves. That moves the count the loop asks it with (`loop.SyncPoint`, one a dispatch): a
    notice handled just after a save would set the stop at that step + 1, which a --scan or
    resumed --distributed run reaches late or never. The manager here does not ask."""
    from jax.experimental import multihost_utils

    from jaxvision.training.checkpoint import JaxCheckpoints

    asked = []
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                        lambda step: asked.append(step) or False)  # fmt: skip
    manager = JaxCheckpoints.open(tmp_path / "ckpt")
    manager.save(156, {"w": np.ones(3, np.float32)}, None, {"step": 156})
    assert checkpoint.step_folders(tmp_path / "ckpt") == [156] and asked == []


def test_a_signal_after_the_last_epoch_lets_the_finished_run_finish(capsys):
    """A stop asked for during the last epoch's evaluation or save: the run is complete, so it
    returns its history (and writes its figures) instead of asking for a resume that would have
    nothing to train."""
    config = TrainConfig(arch="cnn", epochs=2, eval_every=1, progress=False)

    def train_epoch(epoch, bar, start):
        return 1.0, 0.0

    def evaluate():
        if len(history_seen) == 1:  # the last epoch's evaluation
            os.kill(os.getpid(), signal.SIGTERM)
        history_seen.append(1)
        return {"loss": 1.0, "accuracy": 0.5, "f1_macro": 0.5, "preds": np.zeros(3, int)}

    history_seen: list = []
    history, last = loop.run_epochs(config, 10, train_epoch, evaluate)
    assert [h.epoch for h in history] == [1, 2] and last["accuracy"] == 0.5
    # the same signal with an epoch still to train: a stop, at the end of the evaluated epoch
    history_seen.clear()
    with pytest.raises(errors.Interrupted, match="stopped by SIGTERM at the end of epoch 2"):
        loop.run_epochs(dataclasses.replace(config, epochs=3), 10, train_epoch, evaluate)


KILL_IN_SECOND_SAVE = """
import os, runpy, sys
from orbax.checkpoint._src.path import atomicity
finalize, calls = atomicity.AtomicRenameTemporaryPath.finalize, []
async def killed(self, *a, **k):  # the second checkpoint's files are written, not committed
    if os.path.basename(str(self._final_path)).isdigit():  # a step folder, not an item
        calls.append(1)
        if len(calls) == 2:  # every item of epoch 2 is written; the step is not renamed yet
            os._exit(137)
    return await finalize(self, *a, **k)
atomicity.AtomicRenameTemporaryPath.finalize = killed
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("scripts/train.py", run_name="__main__")
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint(runs, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = [*CNN, "--epochs", "2", "--checkpoint-dir", str(ckpt)]
    p = subprocess.run([sys.executable, "-c", KILL_IN_SECOND_SAVE, *args, "--out",
                        str(tmp_path / "a")], capture_output=True, text=True, cwd=REPO,
                       env=like_this_process())  # fmt: skip
    assert p.returncode == 137, p.stderr[-2000:]
    leftovers = [q.name for q in ckpt.iterdir() if not q.name.isdigit()]
    assert checkpoint.step_folders(ckpt) == [31] and leftovers, leftovers  # the unfinished save
    assert read_meta(ckpt)[1]["position"]["epoch"] == 1
    assert cli.main([*args, "--resume", "--out", str(tmp_path / "b")]) == 0
    assert checkpoint.step_folders(ckpt) == [31, 62]
    assert all(q.name.isdigit() for q in ckpt.iterdir())  # the temporary folder is gone
    assert_identical(latest_params(ckpt), latest_params(runs["tmp"] / "straight"))


def test_torch_backend_resumes_exactly(tmp_path):
    torch_args = ["--backend", "torch"]
    assert train(tmp_path, "straight", *torch_args, "--epochs", "2")[0] == 0
    assert train(tmp_path, "split", *torch_args, "--epochs", "1")[0] == 0
    code, resumed = train(tmp_path, "r", *torch_args, "--epochs", "2", "--resume",
                          ckpt=tmp_path / "split")  # fmt: skip
    assert code == 0 and len(resumed["history"]) == 2
    assert (tmp_path / "split" / "62" / checkpoint.TORCH_STATE).exists()
    assert_identical(latest_params(tmp_path / "split"), latest_params(tmp_path / "straight"))
    straight = json.loads((tmp_path / "run-straight" / "metrics.json").read_text())
    assert figures(resumed) == figures(straight)


def test_vit_resumes_exactly_from_an_epoch_checkpoint(sample, tmp_path):
    """The ViT recipe (cosine schedule, dropout, augmentation) from the checkpoint after epoch 1
    of a 2-epoch run: the same parameters as the run itself."""
    tr, te = np.random.default_rng(0).permutation(sample.n_train)[:256], slice(None, None, 10)
    data = make_dataset("mnist", "subset", sample.x_train[tr], sample.y_train[tr],
                        sample.x_test[te], sample.y_test[te], 10)  # every class  # fmt: skip
    config = TrainConfig(arch="vit", epochs=2, warmup_epochs=0.5, batch_size=64, progress=False,
                         checkpoint_dir=str(tmp_path / "full"))  # fmt: skip
    train_and_evaluate = backends.get("jax").train_and_evaluate
    full = train_and_evaluate(config, data)
    shutil.copytree(tmp_path / "full", tmp_path / "half")
    shutil.rmtree(tmp_path / "half" / "8")  # back to the checkpoint after epoch 1
    resumed = train_and_evaluate(
        TrainConfig(**{**vars_of(config), "checkpoint_dir": str(tmp_path / "half"),
                       "resume": True}), data)  # fmt: skip
    assert_identical(latest_params(tmp_path / "half"), latest_params(tmp_path / "full"))
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in full.history]


def vars_of(config):
    import dataclasses

    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def test_export_between_frameworks(runs, tmp_path, digits, monkeypatch):
    """A JAX checkpoint -> a torch state_dict, and a torch checkpoint -> a JAX checkpoint (to a
    relative path, as a user types it: orbax itself takes absolute paths only), each computing
    the same logits as the original."""
    from flax import nnx

    from jaxvision.apps import export
    from jaxvision.core.archs import get_config
    from torch_reference.checkpoint import load_model
    from torch_reference.models import build_model

    x, _ = digits
    path, meta = read_meta(runs["tmp"] / "straight")
    flax_model = load_flax_model(path, meta)
    export.export(runs["tmp"] / "straight", tmp_path / "cnn.PTH")  # a file, whatever the case
    torch_model = build_model(get_config("cnn", "tiny", num_classes=10)).eval()
    torch_model.load_state_dict(torch.load(tmp_path / "cnn.PTH", weights_only=True))
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(theirs, np.asarray(flax_model(x)), rtol=1e-5, atol=1e-5)

    assert train(tmp_path, "t", "--backend", "torch", "--epochs", "1")[0] == 0
    monkeypatch.chdir(tmp_path)
    assert export.export("t", "t-as-jax") == Path("t-as-jax") / "31"
    path, meta = read_meta(tmp_path / "t-as-jax")
    assert meta["backend"] == "jax" and meta["items"] == ["model", "meta"]
    flax_model = load_flax_model(path, meta)
    torch_model = load_model(*read_meta(tmp_path / "t"))
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(flax_model(x)), theirs, rtol=1e-5, atol=1e-5)
    assert isinstance(flax_model, nnx.Module)
    with pytest.raises(Exception, match="holds weights only"):
        cli.train(cli.config_from_args(cli.build_parser().parse_args(
            [*CNN, "--checkpoint-dir", str(tmp_path / "t-as-jax"),
             "--resume"])))  # fmt: skip


@pytest.mark.parametrize("dst", ["as-torch", "cnn.pth", "empty-folder", "as-jax"])
def test_an_export_stopped_midway_leaves_dst_as_it_was(runs, tmp_path, monkeypatch, dst):
    """A Ctrl-C (or any failure) during the write removes what was written, so that the same
    command runs again; a folder that was there, empty, stays. JAX -> torch (a folder, a .pth)
    and torch -> JAX (orbax's temporary folder)."""
    from jaxvision.apps import export
    from jaxvision.training import checkpoint as jax_checkpoint
    from torch_reference import checkpoint as torch_checkpoint

    def stopped(path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    src = runs["tmp"] / "straight"
    if dst == "as-jax":  # a torch checkpoint to convert, made by the export itself
        src = export.export(src, tmp_path / "torch-src").parent
    monkeypatch.setattr(export, "save_state_dict", lambda _, path: stopped(path))
    monkeypatch.setattr(torch_checkpoint, "write_folder", lambda d, *_: stopped(d / ".tmp-31-1"))
    monkeypatch.setattr(jax_checkpoint, "save_weights",
                        lambda d, *_: stopped(d / "31.orbax-checkpoint-tmp" / "x"))  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    if dst == "empty-folder":
        (out / dst).mkdir()
    with pytest.raises(KeyboardInterrupt):
        export.export(src, out / dst)
    assert [p.name for p in out.iterdir()] == (["empty-folder"] if dst == "empty-folder" else [])
    assert dst != "empty-folder" or not any((out / dst).iterdir())


def test_export_refuses_a_destination_it_cannot_write(runs, tmp_path, capsys):
    from jaxvision.apps import export

    src = str(runs["tmp"] / "straight")
    (tmp_path / "empty.pth").mkdir()
    (tmp_path / "notes.txt").write_text("")
    cases = {
        tmp_path / "empty.pth": "is a folder; give a file name",
        tmp_path / "notes.txt" / "cnn.pth": "notes.txt is a file; choose a folder you can write to",
        tmp_path
        / "notes.txt"
        / "as-torch": "notes.txt is a file; choose a folder you can write to",
    }
    for dst, message in cases.items():
        assert export.main([src, str(dst)]) == 2, dst
        err = capsys.readouterr().err
        assert err.startswith(f"error: DST {dst}") and err.endswith(message + "\n"), err
    # a device was a NotADirectoryError; a folder in the checkpoint folder became a "damaged"
    # checkpoint there, which the next --resume set aside
    assert export.main([src, "/dev/null"]) == 2
    assert capsys.readouterr().err == "error: /dev/null already exists; give a new path\n"
    inside = runs["tmp"] / "straight" / "99"
    assert export.main([src, str(inside)]) == 2 and not inside.exists()
    assert capsys.readouterr().err == (f"error: DST {inside} is inside {runs['tmp'] / 'straight'}, "
                                       "the checkpoint folder being converted; give a path "
                                       "outside it\n")  # fmt: skip


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_deterministic_flag_changes_no_figure_on_cpu(runs, tmp_path, train_cli, backend):
    """--deterministic only restricts GPU kernels: on the CPU paths the run is the same one."""
    args = [*CNN, "--epochs", "2", "--backend", backend]
    p = train_cli(*args, "--deterministic", "--out", str(tmp_path / "det"),
                  env=like_this_process())  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    record = json.loads((tmp_path / "det" / "metrics.json").read_text())
    assert record["config"]["deterministic"] is True
    if backend == "jax":
        reference = runs["straight"][1]
    else:
        assert cli.main([*args, "--out", str(tmp_path / "plain")]) == 0
        reference = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert figures(record) == figures(reference)


def test_resume_refuses_turning_sgd_momentum_on_or_off(sample):
    """SGD's momentum buffers are optimiser state: a checkpoint of momentum 0.9 cannot resume at
    0 (JAX's restore would meet another tree, and set the intact checkpoint aside as damaged),
    nor the other way; 0.9 -> 0.5 resumes, reported as a change. An older checkpoint's config,
    which lacks the derived key, is read the same way."""
    saved = TrainConfig(arch="cnn", optimizer="sgd", momentum=0.9)
    meta = {"backend": "jax", "config": checkpoint._settings(saved), "dataset": sample.name,
            "n_train": sample.n_train}  # fmt: skip
    older = {**meta, "config": {k: v for k, v in meta["config"].items() if k != "sgd_momentum"}}
    where = Path("ckpt/31")
    for m in (meta, older):
        with pytest.raises(errors.UserError, match=r"sgd_momentum True -> False; resume with"):
            checkpoint.check_resumable(m, dataclasses.replace(saved, momentum=0.0), sample, where)
        changed = checkpoint.check_resumable(m, dataclasses.replace(saved, momentum=0.5), sample,
                                             where)  # fmt: skip
        assert changed == ["momentum 0.9 -> 0.5"]
    off = {**meta, "config": checkpoint._settings(dataclasses.replace(saved, momentum=0.0))}
    with pytest.raises(errors.UserError, match=r"sgd_momentum False -> True"):
        checkpoint.check_resumable(off, saved, sample, where)


def test_resume_refuses_a_detector_checkpoint_of_the_other_batch_norm(sample):
    """The detector fine-tuned from COCO's weights has frozen batch norm, the one trained from
    scratch batch norm: another model, which the restore would meet as another tree (once: "not
    a checkpoint this jaxvision reads"). --pretrained must match, named in one line."""
    scratch = TrainConfig(arch="faster_rcnn", pretrained=False)
    meta = {"backend": "jax", "config": checkpoint._settings(scratch), "dataset": sample.name,
            "n_train": sample.n_train}  # fmt: skip
    where = Path("ckpt/12")
    with pytest.raises(errors.UserError, match=re.escape(
            f"{where} holds a faster_rcnn trained from scratch (batch norm), but this run is "
            "fine-tuned from COCO's weights; resume with --no-pretrained")):  # fmt: skip
        checkpoint.check_resumable(meta, dataclasses.replace(scratch, pretrained=True), sample,
                                   where)  # fmt: skip
    coco = {**meta, "config": checkpoint._settings(dataclasses.replace(scratch, pretrained=True))}
    with pytest.raises(errors.UserError, match=r"COCO's weights \(frozen batch norm\), but this "
                                               r"run is trained from scratch; resume with "
                                               r"--pretrained$"):  # fmt: skip
        checkpoint.check_resumable(coco, scratch, sample, where)
    assert checkpoint.check_resumable(coco, dataclasses.replace(scratch, pretrained=True), sample,
                                      where) == []  # fmt: skip


def torch_run(config: TrainConfig):
    """A torch CNN trainer on 256 random images, and its checkpoints (started: --resume
    restores)."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (256, 28, 28, 1), dtype=np.uint8), np.arange(256) % 10
    data = make_dataset("mnist", "toy", x, y, x[:50], y[:50], 10)
    model_cfg = config.model_config(data)
    trainer = TorchTrainer(create_model(config, model_cfg), config, data)
    checkpoints = TorchCheckpoints(config, data, model_cfg, trainer)
    checkpoints.start()
    return trainer, checkpoints


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_a_torch_run_resumed_with_a_new_lr_and_epochs_takes_them(tmp_path, schedule):
    """As the JAX side builds its optimiser from the run's config, the torch side keeps the
    checkpoint's moments and step count but this run's --lr and schedule: torch's own
    `load_state_dict` would bring back the saved lr and the schedule's old base lr."""
    first = TrainConfig(arch="cnn", backend="torch", preset="tiny", epochs=1, batch_size=64,
                        lr=1e-3, schedule=schedule, warmup_epochs=0.0, augment=False,
                        checkpoint_dir=str(tmp_path), progress=False)  # fmt: skip
    t, checkpoints = torch_run(first)
    t.train_epoch(0)
    checkpoints.save(loop.Position(1), [])
    t2, _ = torch_run(dataclasses.replace(first, lr=1e-2, epochs=3, resume=True))
    factor = 1.0 if schedule == "constant" else lr_factor(t.steps, 0, 3 * t.steps)
    assert 0 < factor < 1 or schedule == "constant"
    for g in t2.optimizer.param_groups:
        assert g["lr"] == pytest.approx(1e-2 * factor, rel=1e-12), g["lr"]
    saved, restored = t.optimizer.state_dict()["state"], t2.optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[0][k], v) for k, v in restored[0].items())


def test_a_torch_checkpoint_with_other_optimiser_groups_is_one_line(tmp_path):
    """A torch checkpoint whose optimiser holds other parameter groups than this version builds
    (an older version's AdamW for fine-tuning and the detector had no decay mask) is refused in
    one line naming it, and stays where it is: neither a traceback nor set aside as damaged."""
    config = TrainConfig(arch="cnn", backend="torch", preset="tiny", epochs=2, batch_size=64,
                         optimizer="adamw", augment=False, checkpoint_dir=str(tmp_path),
                         progress=False)  # fmt: skip
    t, checkpoints = torch_run(config)
    t.train_epoch(0)
    path = checkpoints.save(loop.Position(1), [])
    state = torch.load(path / checkpoint.TORCH_STATE, weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert len(groups) == 2  # decayed, not decayed
    state["optimizer"]["param_groups"] = [{**groups[0], "params": sorted(
        i for g in groups for i in g["params"])}]  # fmt: skip
    meta = json.loads((path / checkpoint.TORCH_META).read_text())
    shutil.rmtree(path)
    write_folder(tmp_path, int(path.name), state, meta)  # sealed again: intact, older layout
    with pytest.raises(errors.UserError, match=r"optimiser has other parameter groups .* start a "):
        torch_run(dataclasses.replace(config, resume=True))
    assert checkpoint.step_folders(tmp_path) == [int(path.name)]
    assert not list(tmp_path.glob("*.damaged"))
