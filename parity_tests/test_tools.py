"""scripts/benchmark.py, scripts/compare.py and scripts/run_lab.py, run as a user runs them.

No timing is asserted: the benchmark's figures are checked for shape and consistency only.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import HOST_CORES, on_every_core, split_device

from jaxvision.apps import benchmark
from jaxvision.apps.jax_backend import default_xla_flags
from jaxvision.core import checkpoint
from jaxvision.core.archs import get_arch

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def script(name: str, *args: str, timeout: int = 600, every_core: bool = False):
    with on_every_core(every_core):
        return subprocess.run(
            [sys.executable, str(REPO / "scripts" / name), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )


def test_benchmark_tiny_mode_writes_records_with_the_schema(tmp_path):
    out = tmp_path / "bench.json"
    r = script(
        "benchmark.py",
        "--archs",
        "cnn",  # one arch: the ViT's worker is the same code, and its setup doubles the test
        "--backends",
        "jax,torch",
        "--preset",
        "tiny",
        "--batch-size",
        "8",
        "--steps",
        "3",
        "--repeats",
        "2",
        "--json",
        str(out),
        every_core=True,  # the CNN's split, which a worker's share of the cores would hide
    )
    assert r.returncode == 0, r.stderr
    records = json.loads(out.read_text())
    assert [(x["arch"], x["backend"]) for x in records] == [("cnn", "jax"), ("cnn", "torch")]
    for x in records:
        assert set(benchmark.RECORD_KEYS) <= x.keys(), x
        # The JAX CNN splits the host into a CPU device per core.
        assert x["device"] == (split_device(8) if x["backend"] == "jax" else "cpu"), x["device"]
        assert x["batch_size"] == 8 and x["repeats"] == 2
        assert x["image_size"] == 28 and x["peak_device_mb"] is None  # no GPU here
        for key in (
            "train_images_per_s",
            "infer_images_per_s",
            "peak_host_mb",
            "flops_per_image",
            "peak_flops_per_s",
        ):
            assert isinstance(x[key], float) and x[key] > 0, key
        assert x["compile_s"] >= 0 and len(x["train_times_s"]) == 2
        # each worker holds its own framework only, and says what it ran under
        assert x["frameworks_loaded"] == [x["backend"]], x["frameworks_loaded"]
        # a JAX worker sets its arch's defaults in place of this process's (see conftest)
        mine = (default_xla_flags(get_arch(x["arch"]), len(HOST_CORES)) if x["backend"] == "jax"
                else os.environ["XLA_FLAGS"])  # fmt: skip
        assert x["xla_flags"] == mine
        assert isinstance(x["threads"], int) and x["threads"] >= 1
        assert x["float32_matmuls"] == "float32"  # TF32 is a GPU's
        assert 0 < x["fraction_of_peak"] < 1
        assert x["fraction_of_peak"] == pytest.approx(
            x["flops_per_image"] * x["train_images_per_s"] / x["peak_flops_per_s"]
        )
    by = {(x["arch"], x["backend"]): x for x in records}
    jax_r, torch_r = by["cnn", "jax"], by["cnn", "torch"]  # the same model in both frameworks
    assert jax_r["params"] == torch_r["params"]
    assert jax_r["xla_flops_per_image"] > 0 and "xla_flops_per_image" not in torch_r
    # the tiny CNN's training FLOPs by hand: forward 2*MACs of two 3x3 convs and two linears,
    # backward twice that, except the first conv's input gradient (the image needs none)
    conv1, conv2 = 28 * 28 * 4 * 9 * 1, 14 * 14 * 8 * 9 * 4
    fc = 7 * 7 * 8 * 16 + 16 * 10
    assert by["cnn", "jax"]["flops_per_image"] == 2 * (3 * (conv1 + conv2 + fc) - conv1)
    assert f"| cnn | jax | {by['cnn', 'jax']['device']} | 8 |" in r.stdout
    assert "| cnn |" in r.stdout.split("JAX ÷ torch, train")[1]  # the ratio table
    assert f"XLA_FLAGS: `{default_xla_flags(get_arch('cnn'), len(HOST_CORES))}`." in r.stdout


def test_benchmark_summary_names_each_jax_workers_flags_where_they_differ():
    """The summary line's XLA_FLAGS part, from the workers' records (the full line: above)."""

    def record(arch, backend, flags):
        r = {"arch": arch, "backend": backend, "xla_flags": flags}
        return {**r, "xla_flops_per_image": 1.0} if backend == "jax" else r

    detector, cnn = default_xla_flags(get_arch("faster_rcnn")), default_xla_flags(get_arch("cnn"))
    both = benchmark._jax_flags([record("cnn", "jax", cnn), record("cnn", "torch", None),
                                 record("faster_rcnn", "jax", detector)])  # fmt: skip
    assert both == f" XLA_FLAGS: cnn `{cnn}`, faster_rcnn empty (XLA's own)."
    one = benchmark._jax_flags([record("cnn", "jax", cnn), record("cnn", "torch", None)])
    assert one == f" XLA_FLAGS: `{cnn}`."  # the torch worker's are not XLA's
    assert benchmark._jax_flags([record("cnn", "torch", "anything")]) == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--archs", "resnet"], "unknown --arch 'resnet'"),
        (["--backends", "tensorflow"], "unknown backend 'tensorflow' in --backends"),
        (["--steps", "0"], "--steps must be between 1 and 2,147,483,647 (2**31 - 1), got 0"),
        (["--batch-size", str(10**20)], "--batch-size must be between 1 and 2,147,483,647"),
        # Checked for every configuration before any worker starts:
        (["--archs", "vit,cnn", "--preset", "micro"], "unknown --preset 'micro' for cnn"),
        (["--archs", "vgg16", "--image-size", "8"], "vgg16 needs --image-size of at least 32"),
        (
            ["--archs", "cnn,vit", "--image-size", "-5"],
            "--image-size does not apply here: --archs cnn,vit train at the data's",
        ),
        (["--archs", "cnn", "--json", "/"], "--json / is a folder; give a file name"),
        (["--archs", ","], "--archs is empty; name one or more of cnn, vit, vgg16"),
        (["--backends="], "--backends is empty; name one or more of jax, torch"),
    ],
)
def test_benchmark_bad_requests_are_one_line_exit_2(args, message):
    r = script("benchmark.py", *args, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr


def test_benchmark_out_of_memory_names_both_flags_that_size_its_data():
    """The benchmark's data holds --batch-size x --steps images: a fix naming only the batch
    size was wrong when --steps was the typo."""
    r = script("benchmark.py", "--archs", "cnn", "--backends", "torch", "--preset", "tiny",
               "--batch-size", "500", "--steps", "100000000", "--repeats", "1",
               timeout=120)  # fmt: skip
    last = r.stderr.splitlines()[-1]  # after the progress lines
    assert r.returncode == 1 and r.stderr.count("error: ") == 1, r.stderr
    assert last.startswith("error: 1 configuration(s) failed: cnn / torch: out of memory: ")
    assert "; use a smaller --batch-size (500) or --steps (100000000)" in last


def _metrics(arch, backend, accuracy, seconds, params):
    return {
        "arch": arch,
        "backend": backend,
        "preset": None,
        "dataset": "mnist",
        "n_train": 4000,
        "n_test": 1000,
        "test_accuracy": accuracy,
        "test_f1_macro": accuracy - 0.001,
        "train_loss": 0.05,
        "train_time_s": seconds,
        "params": params,
        "device": "cpu",
        "host": "test host, 2 cores",
    }


def test_compare_builds_table_csv_and_png_from_two_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "metrics.json").write_text(json.dumps(_metrics("vit", "torch", 0.979, 127.8, 139018)))
    (b / "metrics.json").write_text(json.dumps(_metrics("cnn", "jax", 0.974, 22.1, 421642)))
    r = script("compare.py", str(a / "metrics.json"), str(b), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    assert (
        "| cnn | jax | mnist (4,000/1,000) | 97.40% | 0.9730 | 0.0500 | 22.1 | 421,642 |"
        in r.stdout
    )
    assert "| vit | torch |" in r.stdout and "Measured on test host, 2 cores." in r.stdout
    with open(tmp_path / "rep" / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["model"] for row in rows] == ["cnn", "vit"]  # sorted by model
    assert float(rows[1]["accuracy"]) == 0.979 and int(rows[0]["parameters"]) == 421642
    png = tmp_path / "rep" / "comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400
    assert np.ptp(image[..., :3]) > 0.5  # something is drawn


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("{not json", "not a readable metrics.json"),
        ('{"arch": "cnn"}', "not a train.py metrics.json (missing backend, dataset"),
        ("[" * 100_000, "not a readable metrics.json (maximum recursion depth"),  # RecursionError
        ('{"params": ' + "9" * 5000 + "}", "not a readable metrics.json (Exceeds the limit"),
        ("fifo", "not a regular file; pass a metrics.json that train.py wrote"),  # it waited
    ],
)
def test_compare_bad_input_is_one_line_exit_2(tmp_path, content, message):
    path = tmp_path / "metrics.json"
    if content == "fifo":
        os.mkfifo(path)
    elif content is not None:
        path.write_text(content)
    r = script("compare.py", str(path), "--out", str(tmp_path / "rep"), timeout=120)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize(
    "field, value",
    [
        ("test_accuracy", None),
        ("test_accuracy", 97.4),
        ("params", "6794"),
        ("params", 0),
        ("train_time_s", float("nan")),
        ("train_time_s", 0),
        ("n_train", "60k"),
        ("n_test", 0),
        ("train_loss", True),
        ("arch", 3),
        ("host", 5),  # a TypeError
        ("device", ["a"]),
        ("preset", {}),
        ("n_test", "missing"),  # n_train alone: a KeyError
    ],  # fmt: skip
)
def test_compare_names_a_damaged_field_in_one_line(tmp_path, capsys, field, value):
    from jaxvision.apps import report

    record = {**_metrics("cnn", "jax", 0.974, 22.1, 421642), field: value}
    if value == "missing":
        record = {**record, "n_train": 5000}
        del record[field]
        value = "missing"
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    assert report.main([str(tmp_path), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    shown = value if value == "missing" else json.dumps(value)
    assert err == (f"error: {tmp_path / 'metrics.json'}: a damaged metrics.json ({field}: "
                   f"{shown}); train that run again\n")  # fmt: skip
    assert not (tmp_path / "rep").exists()


def test_compare_output_paths_and_a_parent_folder_are_one_line(tmp_path, capsys):
    from jaxvision.apps import report

    run = tmp_path / "runs" / "cnn-jax"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(_metrics("cnn", "jax", 0.974, 22.1, 421642)))
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 2
    runs = tmp_path / "runs"
    assert capsys.readouterr().err == (
        f"error: {runs} holds no metrics.json, but its folders do; pass them: {runs / '*'}\n"
    )
    assert report.main([str(run), "--out", str(run / "metrics.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {run / 'metrics.json'} cannot be created: ") and (
        err.endswith("is a file; choose a folder you can write to\n")
    )


def test_run_lab_dry_run_lists_every_arch_and_backend():
    r = script("run_lab.py", "--dry-run", "--out", "lab", timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 10  # 5 archs x 2 backends
    assert any("faster_rcnn --backend jax" in line for line in lines)
    assert lines[0] == (
        "[1/10] python scripts/train.py --arch cnn --backend jax --recipe lab-cpu --out lab/cnn-jax"
    )


def test_run_lab_refuses_flags_that_one_arch_would_refuse_before_training(tmp_path):
    r = script("run_lab.py", "--out", str(tmp_path / "lab"), "--", "--image-size", "64",
               timeout=120)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: train.py --arch cnn --backend jax: --image-size does not "
                               "apply here")  # fmt: skip
    assert not (tmp_path / "lab").exists()  # nothing trained


def test_run_lab_refuses_what_a_later_run_would_refuse_before_the_first_trains(
    tmp_path, capsys, monkeypatch
):
    """Pretrained weights not on disk (the second run's), or an --out that cannot be written: one
    line naming the run, before the CNN trains (it was the run's own error line after the earlier
    runs had trained, then run_lab's second)."""
    from jaxvision.apps import lab
    from torch_reference import pretrained

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    monkeypatch.setattr(pretrained, "host_reachable", lambda url, timeout=3.0: False)  # offline
    code = lab.main(["--pretrained", "--archs", "cnn,alexnet", "--backends", "jax",
                     "--out", str(tmp_path / "lab")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: train.py --arch alexnet --backend jax: no pretrained alexnet "
                          f"weights: expected {tmp_path / 'no-weights'}")  # fmt: skip
    (tmp_path / "a-file").write_text("")
    assert lab.main(["--archs", "cnn", "--out", str(tmp_path / "a-file")]) == 2
    err = capsys.readouterr().err  # the lab's own --out, where its report goes, is checked first
    assert err == (f"error: --out {tmp_path / 'a-file'} cannot be created: {tmp_path / 'a-file'} "
                   "is a file; choose a folder you can write to\n")  # fmt: skip
    assert not (tmp_path / "lab").exists()
    # --dry-run lists the commands: it neither fetches weights nor creates a folder
    assert lab.main(["--pretrained", "--archs", "alexnet", "--dry-run", "--out",
                     str(tmp_path / "lab")]) == 0  # fmt: skip
    assert "--arch alexnet" in capsys.readouterr().out and not (tmp_path / "lab").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--archs", "cnn", "--", "--arch", "vit"], "--arch after -- would override the lab's"),
        (["--", "--out", "x", "--backend=torch"], "--backend, --out after -- would override"),
        (["--epochs", "1"], "unrecognized arguments: --epochs (train.py's flags go after --, "),
        (["--", "--checkpoint-dir", "c"], "--checkpoint-dir after -- would override the lab's"),
        (["--checkpoint-dir", "c", "--", "--resume"], "--resume after -- would resume every run"),
        (["--checkpoint-dir", ""], "--checkpoint-dir is empty; give a value, or leave the flag"),
        (["--archs", " "], "--archs is empty; give a value, or leave the flag out"),
        (["--archs", "cnn,vit,cnn"], "--archs names cnn more than once; give each once"),
    ],
)
def test_run_lab_refuses_flags_it_sets_itself_and_points_train_flags_after_the_dashes(
    tmp_path, capsys, argv, message
):
    from jaxvision.apps import lab

    try:
        code = lab.main(["--out", str(tmp_path / "lab"), *argv])
    except SystemExit as e:  # argparse's own usage errors exit
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: " + message) and err.count("\n") == 1, err
    assert not (tmp_path / "lab").exists()


def test_run_lab_trains_and_reports_end_to_end(tmp_path):
    out = tmp_path / "lab"
    r = script(
        "run_lab.py",
        "--archs",
        "cnn",
        "--out",
        str(out),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--",
        "--preset",
        "tiny",
        "--epochs",
        "1",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert (out / "cnn-jax" / "metrics.json").exists() and (
        out / "cnn-torch" / "metrics.json"
    ).exists()
    assert "| cnn (tiny) | jax |" in r.stdout and "| cnn (tiny) | torch |" in r.stdout
    for run in ("cnn-jax", "cnn-torch"):  # a checkpoint folder each, as its --out
        assert checkpoint.step_folders(tmp_path / "ckpt" / run) == [5000 // 128], run
    assert {p.name for p in out.glob("comparison.*")} == {
        "comparison.md",
        "comparison.csv",
        "comparison.png",
    }


def _fake_run(folder, weights, losses, accuracies):
    """A run folder as train.py --save-weights writes it: metrics.json and model.pth."""
    import torch

    folder.mkdir(parents=True)
    history = [
        {"epoch": i + 1, "train_loss": loss, "test_accuracy": acc, "train_time_s": 2.0,
         "eval_time_s": 0.5}
        for i, (loss, acc) in enumerate(zip(losses, accuracies, strict=True))
    ]  # fmt: skip
    metrics = {"arch": "cnn", "backend": "jax", "batch_size": 64, "device": "cpu",
               "history": history, "confusion_matrix": [[1, 0], [0, 1]],
               "test_accuracy": accuracies[-1], "compile_time_s": 1.0}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics))
    torch.save({"w": torch.tensor(weights)}, folder / "model.pth")


def test_gpu_checks_det_finds_a_one_bit_difference_and_summary_reads_the_marks(
    tmp_path, monkeypatch
):
    """scripts/gpu_checks.py, the GPU run's judge: a pair whose weights differ in the last bit of
    one float is reported as differing (exit 1), identical pairs as identical; the summary's
    time to accuracy is the cumulative train + eval time to the first epoch at each mark."""
    import torch

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import gpu_checks

    w = [0.1, 0.2, 0.3]
    bumped = torch.tensor(w).view(torch.int32)
    bumped[1] += 1  # the next float32 after 0.2
    for arch in ("cnn", "vit"):
        for backend in ("jax", "torch"):
            for r in (1, 2):
                other = r == 2 and (arch, backend) == ("vit", "torch")
                weights = bumped.view(torch.float32).tolist() if other else w
                _fake_run(tmp_path / f"det-{arch}-{backend}-{r}", weights, [1.0, 0.5], [0.9, 0.95])
    assert gpu_checks.det(tmp_path) == 1
    rows = {(r["arch"], r["backend"]): r for r in json.loads((tmp_path / "det.json").read_text())}
    assert rows["cnn", "jax"]["weights_identical"] and rows["vit", "jax"]["weights_identical"]
    assert not rows["vit", "torch"]["weights_identical"]
    assert rows["vit", "torch"]["losses_and_confusion_identical"]

    # 98.5% first at epoch 2 (5.0 s), 99.0% read as 0.98999995 at epoch 3 (7.5 s)
    _fake_run(tmp_path / "tta-cnn-jax", w, [1.0, 0.8, 0.6], [0.97, 0.985, 0.98999995])
    out = tmp_path / "out"
    out.mkdir()
    assert gpu_checks.summary(tmp_path, out) == 0
    text = (out / "summary.md").read_text()
    assert "| cnn | jax | 5.0 s (ep 2) | 5.0 s (ep 2) | 7.5 s (ep 3) | 99.00% |" in text
    assert "| vit | torch | NO | yes |" in text

    # a run its step's limit cut: no metrics.json, so the marks come from its logged epoch lines
    (tmp_path / "tta-vit-jax.log").write_text(
        "epoch 1/150: train loss 1.9 | test loss 0.9 | test acc 96.10% | F1 0.9600 | 1.5 s\n"
        "epoch 2/150: train loss 1.2 | test loss 0.4 | test acc 97.00% | F1 0.9700 | 1.2 s\n"
    )
    assert gpu_checks.summary(tmp_path, out) == 0
    text = (out / "summary.md").read_text()
    assert "| vit | jax | 2.7 s of training, eval not logged (ep 2) | not reached |" in text


def test_gpu_checks_names_a_missing_work_folder_in_one_line(tmp_path, monkeypatch, capsys):
    """gpu_checks.py det / summary given a folder that is not there: one error line, exit 2."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import gpu_checks

    gone = tmp_path / "gone"
    for argv in (["det", str(gone)], ["summary", str(tmp_path), str(gone)]):
        assert gpu_checks.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {gone} is not a folder") and err.count("\n") == 1
