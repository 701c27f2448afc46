"""Data parallelism on a device mesh: 8 simulated CPU devices against 1, same global batch.

Each case runs `parallel_worker.py` in a subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=8, which trains the same 2 epochs on a 1-device
and an 8-device ('data',) mesh and saves the step losses, the evaluation and the parameters.
"""

import json
import os
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from conftest import REPO

from jaxvision.apps import train as cli
from jaxvision.core import checkpoint
from jaxvision.core.config import TrainConfig
from jaxvision.core.errors import UserError
from jaxvision.training import parallel

EIGHT = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


@pytest.fixture(scope="module", params=["cnn", "vit"])
def trained(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh") / f"{request.param}.npz"
    p = subprocess.run([sys.executable, str(REPO / "parity_tests" / "parallel_worker.py"),
                        request.param, "8", str(out)], capture_output=True, text=True, env=EIGHT,
                       cwd=REPO, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    z = np.load(out)
    return (
        request.param,
        {k[4:]: z[k] for k in z if k.startswith("one/")},
        {k[5:]: z[k] for k in z if k.startswith("many/")},
    )


def test_same_loss_trajectory(trained):
    _, one, many = trained
    assert one["losses"].shape == (16,)  # 2 epochs of 8 steps
    np.testing.assert_allclose(many["losses"], one["losses"], rtol=2e-6, atol=0)  # ~16 ulp


def test_same_global_metrics(trained):
    """Evaluation on 100 images, padded to 104 for 8 devices: the padding is masked out."""
    _, one, many = trained
    np.testing.assert_array_equal(many["preds"], one["preds"])
    assert many["preds"].shape == many["confidence"].shape == (100,)
    np.testing.assert_allclose(many["confidence"], one["confidence"], rtol=1e-5)
    assert many["accuracy"] == one["accuracy"]
    np.testing.assert_allclose(many["test_loss"], one["test_loss"], rtol=1e-6)


def test_same_final_parameters(trained):
    arch, one, many = trained
    names = [k for k in one if k.startswith("param ")]
    assert names and names == [k for k in many if k.startswith("param ")]
    for k in names:
        if arch == "vit" and "['k']['bias']" in k:
            # Softmax ignores a constant added to a row of scores, so the key bias's exact
            # gradient is 0; what reaches it is rounding (~1e-9), different on 1 and 8 devices,
            # and AdamW scales any nonzero gradient to a step of about lr. It changes no output
            # (the losses and predictions above agree); it is checked to have stayed small.
            assert np.abs(many[k]).max() < 1e-2 and np.abs(one[k]).max() < 1e-2
            continue
        # Adam divides by sqrt(v): where a gradient is ~0 (a dead ReLU's weights), the all-reduce's
        # different summation order, a rounding change, moves the step by a fraction of lr
        # (1e-3). Every element agrees within 1% of one step; almost all of them within 1e-6.
        np.testing.assert_allclose(many[k], one[k], rtol=1e-5, atol=1e-5, err_msg=k)
        assert np.mean(np.abs(many[k] - one[k]) > 1e-6) < 1e-4, k


def test_a_batch_the_devices_do_not_divide_is_an_error():
    """Checked against an 8-device mesh's size: this process sees one CPU device."""
    mesh8 = types.SimpleNamespace(size=8)
    with pytest.raises(UserError, match=r"--batch-size 100 does not split evenly over 8 devices; "
                       r"use --batch-size 96 or 104"):  # fmt: skip
        parallel.check_divisible(100, mesh8)
    with pytest.raises(UserError, match=r"use --batch-size 8,"):
        parallel.check_divisible(4, mesh8)
    parallel.check_divisible(128, mesh8)


def test_more_devices_than_visible_is_an_error():
    n = len(jax.devices())
    with pytest.raises(UserError, match=rf"--devices {n + 1}, but only {n} cpu device\(s\)"):
        parallel.make_data_mesh(n + 1)
    assert parallel.make_data_mesh(0).size == n


def test_torch_backend_refuses_devices():
    with pytest.raises(UserError, match="the torch backend trains on one device"):
        TrainConfig(backend="torch", devices=2)


def test_eight_devices_from_the_command_line(train_cli, tmp_path):
    p = train_cli("--arch", "cnn", "--preset", "tiny", "--epochs", "1", "--no-progress",
                  "--out", str(tmp_path), env=EIGHT)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "| cpu x8 |" in p.stdout
    p = train_cli("--arch", "cnn", "--batch-size", "100", "--devices", "8", env=EIGHT)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr  # a one-line error
    assert "--batch-size 100 does not split evenly over 8 devices" in p.stderr


def test_a_log_every_longer_than_the_epoch_trains_on_a_split_host(train_cli, tmp_path):
    """--log-every 1000 leaves 250 steps without a host sync: the trainer still waits on a step
    every MAX_IN_FLIGHT, since with 150 or so queued, XLA:CPU's collectives over a host split
    into devices stalled until XLA aborted the process (exit 134, after 66 s)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    p = train_cli("--arch", "cnn", "--preset", "tiny", "--epochs", "1", "--no-progress",
                  "--data-source", "sample-split", "--batch-size", "16", "--log-every", "1000",
                  "--out", str(tmp_path), env=env, timeout=180)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| cpu x2 |" in p.stdout


def test_cpu_devices_left_to_the_default_take_the_most_that_divide_the_batch():
    cpus = jax.devices()[:1] * 8  # the count is all that is read
    assert parallel.auto_device_count(128, cpus) == 8
    assert parallel.auto_device_count(100, cpus) == 5
    assert parallel.auto_device_count(33, cpus) == 3
    assert parallel.auto_device_count(7, cpus) == 7
    assert parallel.auto_device_count(13, cpus) == 1
    assert parallel.auto_device_count(None, cpus) == 8  # no batch: every device


def test_a_batch_the_default_split_does_not_divide_trains_on_fewer_devices(train_cli, tmp_path):
    p = train_cli("--arch", "cnn", "--preset", "tiny", "--epochs", "1", "--no-progress",
                  "--batch-size", "100", "--out", str(tmp_path), env=EIGHT)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "note: --batch-size 100 splits over 5 of the 8 CPU devices" in p.stdout
    assert "| cpu x5 |" in p.stdout


@pytest.mark.parametrize(
    "address", ["notahost", "host:", ":1234", "host:99999", "host:http", "host:12²", "host:١٢٣٤"]
)
def test_a_coordinator_address_without_a_port_is_named(address, monkeypatch):
    """Checked before jax.distributed.initialize, whose own parsing raised an IndexError."""
    with pytest.raises(UserError, match=rf"--coordinator-address '{address}' is not host:port"):
        parallel.init_distributed(address, 2, 0, 300)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", address)
    with pytest.raises(UserError, match=rf"JAX_COORDINATOR_ADDRESS '{address}' is not host:port"):
        parallel.init_distributed(None, 2, 0, 300)


@pytest.mark.parametrize("address", ["10.0.0.1:1234", "localhost:65535", "[::1]:1234"])
def test_a_host_port_coordinator_address_passes_the_check(address):
    parallel.check_coordinator(address, "--coordinator-address")  # raises nothing


def test_a_process_left_waiting_stops_with_one_line_at_its_join_timeout(train_cli):
    """Process 1 of 2 with no process 0: JAX's own timeout aborts from C++ with a stack trace;
    --join-timeout stops it first, with the waiting line and one error line."""
    r = train_cli("--arch", "cnn", "--preset", "tiny", "--distributed", "--coordinator-address",
                  f"localhost:{free_port()}", "--num-processes", "2", "--process-id", "1",
                  "--join-timeout", "3", timeout=120)  # fmt: skip
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 2, r.stderr[-2000:]
    assert lines[0].endswith("as process 1 of 2; waiting up to 3 s for every process")
    assert lines[1].startswith("error: not every process joined the run at localhost:")
    assert lines[1].endswith("within 3 s; start every process with the same --coordinator-address "
                             "and --num-processes and its own --process-id, or raise "
                             "--join-timeout")  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--join-timeout", "5"],
            "--join-timeout does not apply here: it is for --distributed runs",
        ),
        (
            ["--distributed", "--join-timeout", "0"],
            "--join-timeout must be 1 to 86400 seconds, got 0",
        ),
        (["--distributed", "--join-timeout", "10000000000"], "--join-timeout must be 1 to 86400"),
    ],
)
def test_join_timeout_is_checked(args, message, capsys):
    assert cli.main(["--arch", "cnn", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


TWO_PROCESSES = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def start_two_processes(args: list[str], tmp_path) -> tuple[list[subprocess.Popen], int]:
    """train.py ARGS as processes 0 and 1 of a --distributed run on this machine, 2 CPU devices
    each, process i writing to tmp_path/multi<i>; and the coordinator's port."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "scripts" / "train.py"),
                *args,
                "--distributed",
                "--coordinator-address",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--out",
                str(tmp_path / f"multi{i}"),
            ],
            env=TWO_PROCESSES,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    return procs, port


def test_two_processes_train_like_one(tmp_path):
    """Multi-host on one machine: 2 processes x 2 CPU devices, joined by --distributed, give the
    1-device run's figures; process 0 writes metrics.json, both write the orbax checkpoint."""
    args = ["--arch", "cnn", "--preset", "tiny", "--epochs", "2", "--no-progress"]
    procs, port = start_two_processes([*args, "--checkpoint-dir", str(tmp_path / "ckpt")], tmp_path)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    for i, (_, err) in enumerate(outs):  # a process left waiting for the others says so
        joining = f"joining the multi-process run at localhost:{port} as process {i} of 2"
        assert err.startswith(joining + "; waiting up to 300 s for every process\n"), err[:300]
    assert not (tmp_path / "multi1").exists()  # only process 0 writes
    multi = json.loads((tmp_path / "multi0" / "metrics.json").read_text())
    assert multi["device"] == "cpu x4"
    assert cli.main([*args, "--devices", "1", "--out", str(tmp_path / "single")]) == 0
    one = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert multi["test_accuracy"] == one["test_accuracy"]
    for k in ("train_loss", "test_loss"):
        np.testing.assert_allclose(multi[k], one[k], rtol=1e-5)
    steps = 5000 // 64  # the default data and the CNN's default batch
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir()) == [steps, 2 * steps]
    checkpoint.verify(tmp_path / "ckpt" / str(2 * steps))  # sealed once, by process 0


@pytest.mark.parametrize("signum, to", [(signal.SIGTERM, 1), (signal.SIGINT, 0)])
def test_a_signal_to_one_process_stops_every_process_after_the_same_step(signum, to, tmp_path):
    """A scheduler's SIGTERM, or a Ctrl-C, to one process alone, in epoch 2: JAX's preemption
    sync stops both processes after the same step (one stopping alone would leave the other
    waiting in that step's all-reduce), where they save one checkpoint and exit, 130 where the
    Ctrl-C was and 143 elsewhere. Under --scan, so a dispatch is not a step and orbax's saves
    must not move the sync's count. The checkpoint resumes, here in one process on one device."""
    ckpt = tmp_path / "ckpt"
    args = ["--arch", "cnn", "--preset", "tiny", "--batch-size", "32", "--scan", "--no-progress",
            "--checkpoint-dir", str(ckpt)]  # fmt: skip
    steps = 5000 // 32
    procs, _ = start_two_processes([*args, "--epochs", "6"], tmp_path)
    sealed = ckpt / str(steps) / checkpoint.MANIFEST  # epoch 1 is saved: epoch 2 is training
    deadline = time.monotonic() + 240
    while not sealed.exists() and procs[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sealed.exists(), [p.communicate(timeout=60)[1][-2000:] for p in procs]
    procs[to].send_signal(signum)
    outs = [p.communicate(timeout=240) for p in procs]
    saved = checkpoint.step_folders(ckpt)
    codes = [130 if i == to and signum == signal.SIGINT else 143 for i in range(2)]
    assert [p.returncode for p in procs] == codes, (saved, *(err[-2000:] for _, err in outs))
    assert saved[0] == steps and len(saved) == 2 and steps < saved[1] < 6 * steps, saved
    epoch, step = divmod(saved[1], steps)
    where = f"epoch {epoch + 1}, step {step}/{steps}" if step else f"the end of epoch {epoch}"
    after = f" at {where}; saved {ckpt / str(saved[1])}; continue with --resume"
    lines = ["error: stopped with the whole run (a SIGTERM or Ctrl-C to one of its processes)"
             + after] * 2  # fmt: skip
    if signum == signal.SIGINT:
        lines[to] = "error: interrupted" + after
    assert [err.strip().splitlines()[-1] for _, err in outs] == lines
    checkpoint.verify(ckpt / str(saved[1]))
    assert cli.main([*args, "--epochs", str(epoch + 1), "--devices", "1", "--resume",
                     "--out", str(tmp_path / "resumed")]) == 0  # fmt: skip
    assert checkpoint.step_folders(ckpt)[-1] == (epoch + 1) * steps
