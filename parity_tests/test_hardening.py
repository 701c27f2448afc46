"""Bad input of every kind ends in one clean `UserError` line or a correct result: property-based
tests (hypothesis) of the IDX reader, the image reader and checkpoint loading, and the flag and
output checks of issue 15."""

import errno
import gzip
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from jaxvision.apps import backends, export, predict
from jaxvision.apps import train as cli
from jaxvision.core import checkpoint, data, errors, images, results
from jaxvision.core.config import TrainConfig
from jaxvision.core.errors import DamagedCheckpoint, DataError, UserError

# Small example counts: the suite runs on 2 CPU cores in CI.
FAST = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


# --- the IDX reader ----------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                       *array.shape)  # fmt: skip
    buf.write(header + array.astype(np.uint8).tobytes())
    return buf.getvalue()


def read_back(tmp_path, payload: bytes, gz: bool):
    path = tmp_path / ("f.idx.gz" if gz else "f.idx")
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return data.read_idx(path)


@FAST
@given(payload=st.binary(max_size=300), gz=st.booleans())
def test_idx_reader_on_random_bytes(tmp_path_factory, payload, gz):
    tmp = tmp_path_factory.mktemp("idx")
    try:
        arr = read_back(tmp, payload, gz)
    except DataError:
        return
    assert arr.size * arr.itemsize == len(payload) - 4 - 4 * arr.ndim  # the bytes, all used


@FAST
@given(
    shape=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    cut=st.integers(0, 400),
    gz=st.booleans(),
)
def test_idx_reader_on_truncations(tmp_path_factory, shape, cut, gz):
    tmp = tmp_path_factory.mktemp("idx")
    full = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape)
    payload = idx_bytes(full)
    cut = min(cut, len(payload))
    if cut == len(payload):
        np.testing.assert_array_equal(read_back(tmp, payload, gz), full)
    else:
        with pytest.raises(DataError, match="truncated"):
            read_back(tmp, payload[:cut], gz)


@FAST
@given(
    code=st.integers(0, 255),
    ndim=st.integers(0, 255),
    dims=st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=4),
    body=st.binary(max_size=64),
)
def test_idx_reader_on_random_headers(tmp_path_factory, code, ndim, dims, body):
    tmp = tmp_path_factory.mktemp("idx")
    header = bytes([0, 0, code, ndim]) + b"".join(struct.pack(">I", d) for d in dims)
    raw = header + body
    try:
        arr = read_back(tmp, raw, gz=False)
    except DataError:
        return
    declared = list(struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim]))  # some may come from body
    assert arr.ndim == ndim and list(arr.shape) == declared


def test_a_gzip_bomb_is_refused_in_bounded_memory(tmp_path):
    """A .gz whose header declares 10 digits but that inflates to 256 MB: refused after reading
    the declared size plus one byte; Python never holds more than a few MB."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    with open(path, "wb") as f:
        f.write(z.compress(struct.pack(">BBBBIII", 0, 0, 8, 3, 10, 28, 28)))
        chunk = bytes(1 << 20)
        for _ in range(256):
            f.write(z.compress(chunk))
        f.write(z.flush())
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="has trailing bytes: its header declares shape "
                                            r"\(10, 28, 28\)"):  # fmt: skip
            data.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak:,} bytes"


def test_a_header_declaring_too_much_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.idx"
    path.write_bytes(struct.pack(">BBBBIII", 0, 0, 8, 3, 60000, 2000, 2000))
    with pytest.raises(DataError, match="over the limit of 2,147,483,648"):
        data.read_idx(path)


def test_train_and_test_shapes_are_checked_at_load():
    with pytest.raises(DataError, match="training images are 28x28x1 but the test images 14x14x1"):
        data.make_dataset("mnist", "x", np.zeros((2, 28, 28, 1), np.uint8), np.zeros(2),
                          np.zeros((2, 14, 14, 1), np.uint8), np.zeros(2), 10)  # fmt: skip


@pytest.mark.filterwarnings("error")  # numpy's "Mean of empty slice" came first
def test_idx_images_of_no_pixels_are_one_line(tmp_path):
    for prefix, n in (("train", 20), ("t10k", 5)):
        data.write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", np.zeros((n, 0, 0), np.uint8))
        data.write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.zeros(n, np.uint8))
    with pytest.raises(
        DataError, match=r"the train images are 0x0x1: no pixels; give images of at least 1x1$"
    ):
        data.load_dataset("mnist", source="idx", data_dir=tmp_path, verbose=False)


# --- the image reader --------------------------------------------------------------------------

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F"]


@FAST
@given(
    mode=st.sampled_from(MODES),
    w=st.integers(1, 40),
    h=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    fmt=st.sampled_from(["PNG", "TIFF"]),
)
def test_image_reader_on_random_modes_sizes_and_depths(tmp_path_factory, mode, w, h, seed, fmt):
    rng = np.random.default_rng(seed)
    top = {"1": 2, "I;16": 65536, "I": 2**31 - 1, "F": 1}.get(mode, 256)
    a = rng.integers(0, top, size=(h, w, {"LA": 2, "RGB": 3, "RGBA": 4}.get(mode, 1)))
    a = a.squeeze(-1) if a.shape[-1] == 1 else a
    if mode == "F":
        im = Image.fromarray(rng.random((h, w)).astype(np.float32))
    elif mode in ("I;16", "I"):
        im = Image.fromarray(a.astype(np.uint16 if mode == "I;16" else np.int32))
        assert im.mode == mode
    elif mode == "1":
        im = Image.fromarray((a * 255).astype(np.uint8)).convert("1")
    elif mode == "P":
        im = Image.fromarray(a.astype(np.uint8)).convert("P")
    else:
        im = Image.fromarray(a.astype(np.uint8))
        assert im.mode == mode
    path = tmp_path_factory.mktemp("img") / f"x.{fmt.lower()}"
    try:
        im.save(path, fmt)
    except (OSError, ValueError, KeyError):
        return  # a mode this format cannot store
    grey = images.read_grey(path)
    assert grey.shape == (h, w) and grey.dtype == np.float32
    assert 0.0 <= grey.min() and grey.max() <= 255.0
    out = images.prepare(grey)
    assert out.shape == (28, 28) and out.dtype == np.uint8


def test_a_tiff_with_any_tag_retyped_reads_or_is_a_per_file_error(tmp_path):
    """Each entry of a TIFF's directory given another field type (a damaged file): Pillow fails
    in many ways while decoding (a rational strip offset is a TypeError inside `load`); each is
    this file's UserError, never another exception."""
    a = np.zeros((40, 30), np.uint8)
    a[5:35, 12:18] = 200
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "TIFF")
    tiff = buf.getvalue()
    assert tiff[:2] == b"II"
    ifd = struct.unpack_from("<I", tiff, 4)[0]
    outcomes = set()
    for i in range(struct.unpack_from("<H", tiff, ifd)[0]):
        for field_type in (1, 2, 5, 8, 9, 10, 11, 12):  # byte, ascii, rational, signed, floats
            damaged = bytearray(tiff)
            struct.pack_into("<H", damaged, ifd + 2 + 12 * i + 2, field_type)
            path = tmp_path / "scan.tif"
            path.write_bytes(damaged)
            try:
                grey = images.read_grey(path)
            except UserError as e:
                assert str(e).startswith(f"{path}: "), e
                outcomes.add("error")
                continue
            assert images.prepare(grey).dtype == np.uint8
            outcomes.add("read")
    assert outcomes == {"error", "read"}


@pytest.mark.parametrize("peak", [1e-45, 1e-40, 1e-37, 1e-30, 1e-3])
def test_a_faint_float_image_prepares_without_overflow(tmp_path, peak):
    """A float TIFF whose brightest value is tiny (a subnormal): 255 / peak overflows float32,
    and inf * 0 made NaN pixels. Too faint to scale, it is blank; any other is stretched."""
    a = np.zeros((40, 30), np.float32)
    a[5:35, 12:18] = peak
    Image.fromarray(a).save(tmp_path / "faint.tif")
    grey = images.read_grey(tmp_path / "faint.tif")
    with np.errstate(all="raise"):
        out = images.prepare(grey)
    assert images.is_blank(grey)
    scalable = float(grey.max()) * float(np.finfo(np.float32).max) >= 255.0
    assert out.max() == (255 if scalable else 0), (peak, float(grey.max()))


@pytest.mark.filterwarnings("error")  # numpy's "All-NaN slice encountered" leaked to stderr
def test_an_all_nan_float_image_is_blank_without_a_warning(tmp_path):
    Image.fromarray(np.full((28, 28), np.nan, np.float32)).save(tmp_path / "nan.tif")
    grey = images.read_grey(tmp_path / "nan.tif")
    assert images.is_blank(grey) and images.prepare(grey).max() == 0


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    """A dark-on-light 16-bit scan keeps its grey levels (Pillow's own conversion to 8 bits
    leaves only 0 and 255)."""
    ramp = np.linspace(20000, 60000, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "scan.png")  # mode I;16
    grey = images.read_grey(tmp_path / "scan.png")
    np.testing.assert_allclose(grey, ramp / 65535 * 255, atol=1.6e-5, rtol=0)  # a float32 step
    assert len(np.unique(grey.round())) > 100


@pytest.mark.parametrize("scale", [1000, 2**23])
def test_32_bit_integer_images_are_scaled_by_their_own_peak(tmp_path, sample, scale):
    """Past 16 bits an integer image has no conventional white: a digit stored x1000 (or
    x2**23) as a 32-bit TIFF reads back as the digit, not as a page too faint to hold ink."""
    digit = sample.x_test[0, ..., 0]
    Image.fromarray(digit.astype(np.int32) * scale).save(tmp_path / "deep.tif")  # mode I
    grey = images.read_grey(tmp_path / "deep.tif")
    # one float32 step at grey levels up to 255 (1.5e-5 apart there): the rounding, no more
    np.testing.assert_allclose(grey, digit * (255 / digit.max()), rtol=0, atol=1.6e-5)
    assert not images.is_blank(grey)


def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h grey pixels and holds one row: opening it reads the header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(w + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [8000, 13500])  # over our limit; over Pillow's own
def test_a_decompression_bomb_is_a_per_file_error(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(side, side))
    with pytest.raises(UserError, match=r"over the limit of 50,000,000 (pixels)?"):
        images.read_grey(path)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_a_file_of_several_frames_is_a_per_file_error(tmp_path, fmt):
    """An animated GIF, PNG or WebP, or a multi-page TIFF, holds no one image: refused, naming
    the frame count, not classified by whichever frame Pillow opens first. One frame reads."""
    blank, ink = Image.new("L", (20, 20), 0), Image.new("L", (20, 20), 0)
    ink.paste(255, (8, 4, 12, 16))
    path = tmp_path / f"two.{fmt.lower()}"
    blank.save(path, fmt, save_all=True, append_images=[ink])
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: holds 2 frames "):
        images.read_grey(path)
    ink.save(tmp_path / f"one.{fmt.lower()}", fmt, save_all=True)
    assert not images.is_blank(images.read_grey(tmp_path / f"one.{fmt.lower()}"))


def test_a_cameras_multi_picture_jpeg_reads_its_photo(tmp_path):
    """MPO, the JPEG a camera writes with a second picture: frame 0 is the photo, so it reads."""
    photo, other = Image.new("L", (20, 20), 255), Image.new("L", (20, 20), 0)
    photo.paste(0, (8, 4, 12, 16))  # a dark stroke on white paper
    photo.save(tmp_path / "cam.mpo", "MPO", save_all=True, append_images=[other])
    with Image.open(tmp_path / "cam.mpo") as im:
        assert (im.format, im.n_frames) == ("MPO", 2)
    grey = images.read_grey(tmp_path / "cam.mpo")
    assert grey[10, 10] < 50 and grey[0, 0] > 200


def test_blank_images_are_recognised(tmp_path):
    Image.new("L", (1, 1), 0).save(tmp_path / "dot.png")
    Image.new("RGBA", (40, 40), (10, 200, 30, 0)).save(tmp_path / "clear.png")
    Image.new("RGB", (50, 30), (240, 240, 240)).save(tmp_path / "paper.png")
    for name in ("dot.png", "clear.png", "paper.png"):
        assert images.is_blank(images.read_grey(tmp_path / name)), name
    digit = np.zeros((28, 28), np.float32)
    digit[8:20, 12:15] = 200.0
    assert not images.is_blank(digit)


def test_official_test_digits_saved_as_png_come_back_unchanged():
    """The README's claim: a real MNIST digit saved as a 28x28 PNG comes back unchanged."""
    x, _ = data.load_official_mnist_test()
    for img in x[:2000, ..., 0]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        buf.seek(0)
        np.testing.assert_array_equal(images.prepare(images.read_grey(buf)), img)


# --- flags -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"optimizer": "sgd", "momentum": float("nan")}, "--momentum must be a finite number"),
        ({"optimizer": "sgd", "momentum": -5.0}, "--momentum must be a finite number >= 0"),
        ({"weight_decay": float("nan")}, "--weight-decay must be a finite number"),
        ({"clip_norm": float("nan")}, "--clip-norm must be a finite number >= 0"),
        ({"lr": float("inf")}, "--lr must be a finite number > 0"),
        # float32's range: 1e39 overflows, 1e-320 flushes to zero (nothing trained, exit 0)
        (
            {"lr": 1e39},
            "--lr 1e+39 is outside float32's range, which training computes in: "
            "give a value in [1.175e-38, 3.403e+38]",
        ),
        (
            {"clip_norm": 1e-320},
            "--clip-norm 9.99989e-321 is outside float32's range, which "
            "training computes in: give 0 or a value in [1.175e-38, ",
        ),
        (
            {"log_every": 2**31},
            "--log-every must be between 1 and 2,147,483,647 (2**31 - 1), got 2147483648",
        ),
        (
            {"arch": "faster_rcnn", "box_margin": 10**20},
            "--box-margin must be in [0, 2,147,483,647] pixels",
        ),
        ({"label_smoothing": 1.0}, "--label-smoothing must be a finite number >= 0 and below 1"),
        ({"arch": "vgg16", "unfreeze": True, "feature_lr": -1.0}, "--feature-lr must be"),
        ({"seed": -1}, "--seed must be in [0, 2**32)"),
        ({"seed": 2**64}, "--seed must be in [0, 2**32)"),
        ({"image_size": 14}, "--image-size does not apply here: --arch cnn trains at the data's"),
        ({"arch": "vit", "weights": "x.pth"}, "--weights does not apply here: --arch vit trains"),
        (
            {"arch": "alexnet", "pretrained": False, "weights": "x.pth"},
            "--weights does not apply here: this run starts from random weights (--no-pretrained); "
            "drop --no-pretrained to start from x.pth",
        ),
        (
            {"arch": "alexnet", "recipe": "lab-cpu", "weights": "x.pth"},
            "--weights does not apply here: this run starts from random weights (recipe lab-cpu's "
            "default); add --pretrained to start from x.pth",
        ),
        ({"arch": "vgg16", "image_size": 10**20}, "--image-size must be in [1, 4096], got 1000"),
        ({"momentum": 0.5}, "--momentum does not apply here: it is SGD's; this run's optimizer"),
        ({"checkpoint_dir": ""}, "--checkpoint-dir is empty; give a value, or leave the flag out"),
        ({"out": " "}, "--out is empty; give a value, or leave the flag out for its default"),
        ({"backend": "torch", "scan": True}, "--scan does not apply here: it is the JAX"),
        ({"box_margin": 2}, "--box-margin does not apply here: it is faster_rcnn's"),
        ({"schedule": "constant", "warmup_epochs": 2.0}, "--warmup-epochs does not apply here"),
        ({"feature_lr": 1e-4, "arch": "vgg16"}, "--feature-lr does not apply here"),
        ({"arch": "vit", "preset": "huge"}, "unknown --preset 'huge' for vit; available:"),
    ],
)
def test_every_flag_is_validated_with_its_own_name(fields, message):
    with pytest.raises(UserError, match=re.escape(message)):
        TrainConfig(**fields)


@pytest.mark.parametrize(
    "arch, preset, shape, message",
    [
        ("cnn", None, (28, 29, 1), "--arch cnn trains on square images, and these are 28x29; "
                                   "crop or pad them, or use an arch that resizes its input "
                                   "(vgg16, alexnet, faster_rcnn)"),
        ("vit", "micro", (20, 24, 1), "--arch vit trains on square images, and these are 20x24"),
        ("cnn", "tiny", (3, 3, 1), "cnn needs images of at least 4x4 (it max-pools twice by 2), "
                                   "got 3x3"),
        ("vit", "micro", (32, 32, 1), "ViT patch size 7 does not divide the image size 32; use "
                                      "--preset lab or mnistvit"),
    ],
)  # fmt: skip
def test_a_data_shape_the_model_cannot_take_is_named(arch, preset, shape, message):
    """Found when the model's config is sized for the data, before it is built (it was a shape
    error, or a division by zero, from inside the model)."""
    from jaxvision.core.archs import model_config

    with pytest.raises(UserError) as e:
        model_config(arch, preset, 10, shape, None)
    assert str(e.value).startswith(message)
    assert model_config("cnn", "tiny", 10, (4, 4, 1), None).pooled_size == 1  # the smallest


@pytest.mark.parametrize("epochs, warmup", [(1, 0.5), (2, 1.0), (3, 1.5), (4, 3.0)])
def test_a_recipe_warmup_that_does_not_fit_the_epochs_is_adjusted_with_a_note(epochs, warmup):
    config = TrainConfig(arch="vit", epochs=epochs)
    assert config.warmup_epochs == warmup
    assert bool(config.notes) == (epochs < 4)  # the recipe's 3 fits 4 epochs
    if config.notes:
        assert config.notes == (f"--warmup-epochs {warmup:g}: the recipe's 3 does not fit "
                                f"--epochs {epochs}",)  # fmt: skip


def test_metrics_record_only_what_is_used():
    cnn = TrainConfig(arch="cnn")  # AdamW, cosine: no momentum
    assert (cnn.optimizer, cnn.momentum, cnn.warmup_epochs) == ("adamw", None, 1.0)
    lab = TrainConfig(arch="cnn", recipe="lab-cpu")  # Adam, constant: no momentum, no warmup
    assert (lab.momentum, lab.warmup_epochs, lab.feature_lr) == (None, None, None)
    assert TrainConfig(arch="vit", backend="torch").scan is None
    sgd = TrainConfig(arch="cnn", optimizer="sgd")  # the recipe's AdamW decay does not apply
    assert (sgd.momentum, sgd.weight_decay) == (0.9, 0.0)
    assert sgd.notes == ("--weight-decay 0: the recipe's 0.05 is AdamW's, and this run's "
                         "optimizer is sgd",)  # fmt: skip


def test_usage_errors_are_one_line(train_cli):
    r = train_cli("--epochs")
    assert r.returncode == 2
    assert r.stderr == "error: argument --epochs: expected one argument; see train.py --help\n"


# --- outputs -----------------------------------------------------------------------------------


def test_unwritable_outputs_fail_before_any_data_is_loaded(tmp_path, train_cli):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for flag in ("--out", "--checkpoint-dir"):
        r = train_cli("--arch", "cnn", "--epochs", "1", flag, str(blocker / "sub"))
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"error: {flag} {blocker / 'sub'} cannot be created: ")
        assert r.stderr.count("\n") == 1 and "dataset" not in r.stdout


def test_a_folder_where_a_command_writes_a_file_is_refused_before_any_data_is_loaded(
    tmp_path, capsys
):
    """A folder named mistakes.png in --out: one line now, not a traceback after training."""
    out = tmp_path / "run"
    (out / "mistakes.png").mkdir(parents=True)
    assert cli.main(["--arch", "cnn", "--epochs", "1", "--out", str(out)]) == 2
    out_text, err = capsys.readouterr()
    assert "dataset" not in out_text
    assert err == (f"error: --out {out} holds a folder named mistakes.png, where this command "
                   "writes a file; move it, or choose another --out\n")  # fmt: skip
    results.probe_writable(out, "--out", ["metrics.json", "confusion.png"])  # not those
    for names in (["attention.png"], ["comparison.md", "comparison.csv", "comparison.png"]):
        (out / names[-1]).mkdir()
        with pytest.raises(UserError, match=f"holds a folder named {names[-1]}, where"):
            results.probe_writable(out, "--out", names)


def test_a_path_that_is_not_utf8_prints_escaped_not_as_a_crash():
    """A file name from another system's encoding, printed under a strict UTF-8 stdout (a
    UTF-8 locale's): escaped as stderr escapes it. It was a UnicodeEncodeError after the work."""
    code = ("import sys; from jaxvision.core.errors import exit_code; "
            "sys.exit(exit_code(lambda: print('wrote caf\\udce9.png')))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=REPO, timeout=60,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8"})  # fmt: skip
    assert (r.returncode, r.stdout, r.stderr) == (0, b"wrote caf\\udce9.png\n", b"")


def test_a_checkpoint_folder_orbax_cannot_open_is_refused_before_any_data_is_loaded(
    tmp_path, capsys
):
    """orbax's tensorstore cannot open a path that is not UTF-8: it was a pybind11 traceback at
    the first save, after an epoch of training."""
    folder = os.fsdecode(os.fsencode(tmp_path) + b"/ck\xe9")
    assert cli.main(["--arch", "cnn", "--epochs", "1", "--checkpoint-dir", folder]) == 2
    captured = capsys.readouterr()
    assert "dataset" not in captured.out
    assert captured.err == (f"error: {tmp_path}/ck\\udce9: the JAX backend's checkpoints "
                            "(orbax) need a folder path that is valid UTF-8; rename it, or "
                            "choose another folder\n")  # fmt: skip
    assert not os.path.exists(folder)


def test_metrics_that_cannot_be_written_go_to_stderr(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write .*metrics.json .*on stderr, as JSON"):
        results.write_metrics({"test_accuracy": 0.99}, blocker / "run")
    assert json.loads(capsys.readouterr().err) == {"test_accuracy": 0.99}


# --- checkpoints -------------------------------------------------------------------------------

TINY = ["--arch", "cnn", "--preset", "tiny", "--no-progress", "--data-source", "sample-split",
        "--batch-size", "500"]  # fmt: skip


@pytest.fixture(scope="module", params=["jax", "torch"])
def run(request, tmp_path_factory):
    """A 2-epoch tiny-CNN run's checkpoint folder (one checkpoint per epoch), per backend."""
    tmp = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    args = [*TINY, "--backend", request.param, "--epochs", "2", "--out", str(tmp / "out"),
            "--checkpoint-dir", str(tmp / "ckpt")]  # fmt: skip
    assert cli.main(args) == 0
    return request.param, tmp / "ckpt"


def load(directory):
    """What predict.py and evaluate.py do: the latest checkpoint, verified, then its model."""
    backend, path, meta = backends.for_checkpoint(directory)
    return backend.classifier(path, meta)


def damage(folder, rng, how: str):
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    victim = files[rng.integers(len(files))]
    raw = bytearray(victim.read_bytes())
    if how == "truncate":  # into the content: a manifest without its final newline is intact
        content = len(raw.rstrip())
        raw = raw[: rng.integers(content)] if content else bytearray(b"x")
    elif how == "flip":
        for i in rng.integers(0, len(raw), size=min(len(raw), 1 + rng.integers(8))):
            raw[i] ^= 1 << rng.integers(8)
        if not raw:
            raw = bytearray(b"x")
    else:
        victim.unlink()
        return victim
    victim.write_bytes(bytes(raw))
    return victim


def test_a_classifier_reports_each_batch_as_it_is_done(run):
    """evaluate.py's progress bar: `on_batch` gets each batch's count, and changes nothing."""
    backend, path, meta = backends.for_checkpoint(run[1])
    classify = backend.classifier(path, meta, batch_size=64)
    x = data.load_official_mnist_test()[0][:150]
    counts = []
    np.testing.assert_array_equal(classify(x, on_batch=counts.append), classify(x))
    classify(x[:10], on_batch=counts.append)
    assert counts == [64, 64, 22, 10]


def test_run_lab_refuses_a_later_runs_checkpoint_folder_before_the_first_trains(
    run, tmp_path, capsys
):
    """A run's --checkpoint-dir that already holds checkpoints (of either backend): one line
    naming the run. The torch run's was refused by its train.py after the JAX run had trained."""
    from jaxvision.apps import lab

    shutil.copytree(run[1], tmp_path / "ckpt" / "cnn-torch")
    code = lab.main(["--archs", "cnn", "--checkpoint-dir", str(tmp_path / "ckpt"),
                     "--out", str(tmp_path / "lab")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: train.py --arch cnn --backend torch: {tmp_path / 'ckpt'}/"
                          "cnn-torch already holds checkpoints (latest intact: ")  # fmt: skip
    assert not (tmp_path / "lab" / "cnn-jax").exists()


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1), how=st.sampled_from(["truncate", "flip", "delete"]))
def test_a_damaged_checkpoint_is_never_loaded(run, tmp_path_factory, seed, how):
    _, ckpt = run
    copy = tmp_path_factory.mktemp("damaged") / "ckpt"
    shutil.copytree(ckpt, copy)
    latest = copy / str(checkpoint.step_folders(copy)[-1])
    victim = damage(latest, np.random.default_rng(seed), how)
    with pytest.raises(DamagedCheckpoint) as e:
        load(copy)
    assert str(e.value).startswith("damaged checkpoint: ")
    older = copy / str(checkpoint.step_folders(copy)[0])
    if victim.name != checkpoint.MANIFEST or how != "delete":
        assert f"the newest intact one is {older}" in str(e.value)


def test_predict_and_convert_refuse_a_damaged_checkpoint_in_one_line(run, tmp_path, capsys):
    backend, ckpt = run
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    latest = copy / str(checkpoint.step_folders(copy)[-1])
    state = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    state.write_bytes(state.read_bytes()[:100])
    digit = tmp_path / "digit.png"
    Image.new("L", (28, 28), 0).save(digit)
    for main, args in ((predict.main, ["--checkpoint", str(copy), str(digit)]),
                       (export.main, [str(copy), str(tmp_path / "out.pth")])):  # fmt: skip
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: damaged checkpoint: {state} is 100 bytes; its manifest")
        assert err.count("\n") == 1
    # One checkpoint's own folder is accepted too: the older, intact one.
    older = copy / str(checkpoint.step_folders(copy)[0])
    assert predict.main(["--checkpoint", str(older), str(digit)]) == 0
    assert "warning: " in capsys.readouterr().err  # the digit is blank


def test_resume_takes_the_newest_intact_checkpoint_and_sets_damage_aside(run, tmp_path, capsys):
    backend, ckpt = run
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    first, second = checkpoint.step_folders(copy)
    (copy / str(second) / checkpoint.MANIFEST).unlink()  # a save that never finished
    (copy / str(second + 100)).mkdir()  # a stray empty numbered folder
    args = [*TINY, "--backend", backend, "--epochs", "2", "--out", str(tmp_path / "out"),
            "--checkpoint-dir", str(copy), "--resume", "--lr", "0.0025"]  # fmt: skip
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert f"resumed from {copy / str(first)} (after epoch 1)\n" in out  # under --no-progress
    assert "  changed since the checkpoint: lr 0.003 -> 0.0025\n" in out
    assert f"skipping damaged checkpoint: {copy / str(second)} has no MANIFEST.json" in out
    assert f"moved it to {copy / f'{second}.damaged'}" in out
    assert f"{copy / str(second + 100)} has no MANIFEST.json" in out
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [1, 2]  # epoch 1 from the checkpoint
    assert (copy / f"{second}.damaged").is_dir() and (copy / f"{second + 100}.damaged").is_dir()
    assert checkpoint.step_folders(copy) == [first, second]  # epoch 2, saved again
    checkpoint.verify(copy / str(second))
    one = str(copy / str(first))  # a checkpoint's own folder, given as the --checkpoint-dir:
    said = f"{one} is one checkpoint's folder; pass the folder that holds it: --checkpoint-dir"
    for resume in (["--resume"], []):  # a new run would have written its steps inside it
        assert cli.main([*args[:-5], "--checkpoint-dir", one, *resume]) == 2
        assert capsys.readouterr().err == f"error: --checkpoint-dir {said} {copy}\n"
    checkpoint.verify(copy / str(first))


def test_a_checkpoint_this_user_may_not_read_is_one_line_and_not_damage(
    run, tmp_path, capsys, monkeypatch
):
    """A folder or manifest the operating system will not let this user read (here: the
    PermissionError it raises, since root reads anything) is one line naming it, exit 2: not a
    traceback, and not damage, which --resume would set aside."""
    backend, ckpt = run
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    steps = checkpoint.step_folders(copy)
    manifest = copy / str(steps[-1]) / checkpoint.MANIFEST
    locked = {copy: Path.iterdir, manifest: Path.read_text}

    def deny(method):
        def call(self, *args, **kw):
            if self in locked and locked[self] is method:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return method(self, *args, **kw)

        return call

    digit = tmp_path / "digit.png"
    Image.new("L", (28, 28), 0).save(digit)
    resume = [*TINY, "--backend", backend, "--epochs", "3", "--out", str(tmp_path / "out"),
              "--checkpoint-dir", str(copy), "--resume"]  # fmt: skip
    for where, method in locked.items():
        monkeypatch.setattr(Path, method.__name__, deny(method))
        for main, args in ((predict.main, ["--checkpoint", str(copy), str(digit)]),
                           (cli.main, resume)):  # fmt: skip
            assert main(args) == 2
            err = capsys.readouterr().err
            assert err == (
                f"error: permission denied: this user may not access {where}; give it "
                "access (chmod), or pass another path\n"
            ), err
        monkeypatch.setattr(Path, method.__name__, method)
    assert checkpoint.step_folders(copy) == steps  # none set aside


def test_non_finite_parameters_are_damage_not_a_learning_rate_problem(run, tmp_path, capsys):
    backend, ckpt = run
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    latest = copy / str(checkpoint.step_folders(copy)[-1])
    if backend == "torch":
        import torch

        state = torch.load(latest / checkpoint.TORCH_STATE, weights_only=True)
        state["model"]["fc1.weight"][0, 0] = float("nan")
        torch.save(state, latest / checkpoint.TORCH_STATE)
    else:
        from flax import nnx

        from jaxvision.training.checkpoint import load_flax_model, save_weights

        meta = backends.get("jax").read_meta(latest)
        model = load_flax_model(latest, meta)
        model.fc1.kernel[...] = model.fc1.kernel[...].at[0, 0].set(float("nan"))
        shutil.rmtree(copy)
        save_weights(copy, 7, model, {**meta, "items": ["model", "meta"]})
        latest = copy / "7"
        assert nnx.state(model)  # the model was real
    checkpoint.write_manifest(latest)  # sealed as it is: the manifest cannot see a NaN
    with pytest.raises(DamagedCheckpoint, match=r"holds non-finite numbers \(NaN or inf\) in "
                                                r"fc1.*not a learning-rate problem"):  # fmt: skip
        load(copy)


def sealed_with_meta(backend: str, ckpt: Path, folder: Path, meta: dict) -> Path:
    """A copy of `ckpt`'s latest checkpoint in `folder`, with `meta` for its meta, sealed by a
    manifest as train.py seals one: the manifest proves the files are what was written, not
    that this version wrote them."""
    latest = ckpt / str(checkpoint.step_folders(ckpt)[-1])
    if backend == "torch":
        shutil.copytree(latest, folder / latest.name)
        (folder / latest.name / checkpoint.TORCH_META).write_text(json.dumps(meta))
        checkpoint.write_manifest(folder / latest.name)
    else:
        from jaxvision.training.checkpoint import load_flax_model, save_weights

        model = load_flax_model(latest, backends.get("jax").read_meta(latest))
        save_weights(folder, int(latest.name), model, meta)
    return folder / latest.name


def no_image_shape(meta: dict):
    meta.pop("image_shape")


@pytest.mark.parametrize(
    "edit, said",
    [
        (no_image_shape, "its meta has no 'image_shape'"),
        (
            lambda m: m.update(model_config=[1, 2]),
            "its meta's 'model_config' is [1, 2], not a JSON object",
        ),  # fmt: skip
        (lambda m: m.update(arch="resnet"), "its arch 'resnet' is none of cnn, vit"),
        (
            lambda m: m.update(format="jaxvision-checkpoint/0"),
            "its format is 'jaxvision-checkpoint/0'",
        ),  # fmt: skip
        (lambda m: m["model_config"].update(depth=3), "does not fit this version's fields"),
        (lambda m: m.update(mean=[0.1, 0.2]), "are not one number a channel"),
        (lambda m: m["history"][0].pop("train_loss"), "does not fit this version's fields"),
        (lambda m: m.pop("n_train"), "its meta has no 'n_train'"),
        (lambda m: m["position"].update(epoch="3"), "(Position.epoch is '3', not int)"),
        (lambda m: m["model_config"].update(image_size=2), "cnn needs images of at least"),
    ],
    ids=[
        "no-image-shape",
        "model-config-a-list",
        "unknown-arch",
        "old-format",
        "unknown-model-field",
        "mean-per-channel",
        "history-field",
        "no-n-train",
        "epoch-a-string",
        "a-size-the-model-refuses",
    ],  # fmt: skip
)
def test_a_sealed_checkpoint_whose_meta_this_version_cannot_read_is_one_line(
    run, tmp_path, capsys, edit, said
):
    """An older format, or a meta edited and sealed again: every tool that reads a checkpoint
    (predict.py; for one edit also evaluate.py, the export and --resume, which read it through
    the same call) says so in one line, exit 2, and names the field; not a KeyError from
    whichever tool reads it first."""
    from jaxvision.apps import evaluate

    backend, ckpt = run
    meta = backends.get(backend).read_meta(ckpt / str(checkpoint.step_folders(ckpt)[-1]))
    edit(meta)
    path = sealed_with_meta(backend, ckpt, tmp_path / "ckpt", meta)
    digit = tmp_path / "digit.png"
    Image.new("L", (28, 28), 0).save(digit)
    resume = [*TINY, "--backend", backend, "--epochs", "3", "--out", str(tmp_path / "out"),
              "--checkpoint-dir", str(tmp_path / "ckpt"), "--resume"]  # fmt: skip
    tools = [(predict.main, ["--checkpoint", str(path), str(digit)])]
    if edit is no_image_shape:
        tools += [(evaluate.main, ["--checkpoint", str(path), "--out", str(tmp_path)]),
                  (export.main, [str(path), str(tmp_path / "out.pth")]),
                  (cli.main, resume)]  # fmt: skip
    for main, args in tools:
        assert main(args) == 2, main
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path} is not a checkpoint this jaxvision reads: ")
        assert said in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.pth").exists()
    if edit is no_image_shape:  # a new run there is refused for the folder, not for the meta
        assert cli.main(resume[:-1]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / 'ckpt'} already holds checkpoints (latest "
                              f"intact: {path}); pass --resume")  # fmt: skip


def sealed_with_arrays(backend: str, ckpt: Path, folder: Path, edit) -> Path:
    """A copy of `ckpt`'s latest checkpoint in `folder` whose arrays `edit(model, train)` changed
    (two {name: array} dicts, the optimiser state under train's "optimizer"), sealed by a
    manifest as train.py seals one: another version's checkpoint, as far as this one can tell."""
    latest = ckpt / str(checkpoint.step_folders(ckpt)[-1])
    meta = backends.get(backend).read_meta(latest)
    if backend == "torch":
        import torch

        from torch_reference.checkpoint import write_folder

        state = torch.load(latest / checkpoint.TORCH_STATE, weights_only=True)
        moments = {f"{i}/{k}": v for i, slots in state["optimizer"]["state"].items()
                   for k, v in slots.items() if v.ndim}  # fmt: skip
        edit(state["model"], moments)
        for name, v in moments.items():
            i, k = name.split("/")
            state["optimizer"]["state"][int(i)][k] = v
        return write_folder(folder, int(latest.name), state, meta)
    import jax
    import orbax.checkpoint as ocp

    from jaxvision.training.checkpoint import JaxCheckpoints

    items = ocp.args.Composite(model=ocp.args.StandardRestore(), train=ocp.args.StandardRestore())
    saved = JaxCheckpoints.open(ckpt, read_only=True).manager.restore(int(latest.name), args=items)
    model, train = dict(saved.model), dict(saved.train)
    flat = {"/".join(str(k.key) for k in keys): v
            for keys, v in jax.tree.flatten_with_path(train["opt_state"])[0]}  # fmt: skip
    moments = {k: v for k, v in flat.items() if v.ndim}
    edit(model, moments)
    leaves = [moments.get(k, v) for k, v in flat.items()]
    train["opt_state"] = jax.tree.unflatten(jax.tree.structure(train["opt_state"]), leaves)
    JaxCheckpoints.open(folder).save(int(latest.name), model, train, meta)
    return folder / latest.name


def renamed_layer(model: dict, moments: dict):
    for k in [k for k in model if k.split(".")[0] == "fc1"]:
        model[k.replace("fc1", "fc9", 1)] = model.pop(k)


def transposed_moment(model: dict, moments: dict):
    name = next(k for k, v in moments.items() if v.ndim == 2 and v.shape[0] != v.shape[1])
    moments[name] = moments[name].T


@pytest.mark.parametrize("edit", [renamed_layer, transposed_moment])
def test_a_sealed_checkpoint_whose_arrays_this_version_does_not_build_is_one_line(
    run, tmp_path, capsys, edit
):
    """A checkpoint whose model (or optimiser state) another version wrote: its manifest proves
    it intact, so it is refused in one line (exit 2) by every tool that reads it, naming the
    variables; not called damaged and set aside (orbax's tree mismatch), nor torch's
    load_state_dict error (or, for a moment, a shape error at the first step)."""
    from jaxvision.apps import evaluate

    backend, ckpt = run
    path = sealed_with_arrays(backend, ckpt, tmp_path / "ckpt", edit)
    resume = [*TINY, "--backend", backend, "--epochs", "3", "--out", str(tmp_path / "out"),
              "--checkpoint-dir", str(tmp_path / "ckpt"), "--resume"]  # fmt: skip
    tools = [(cli.main, resume)]
    if edit is renamed_layer:
        tools += [(evaluate.main, ["--checkpoint", str(path), "--out", str(tmp_path / "ev")]),
                  (export.main, [str(path), str(tmp_path / "out.pth")])]  # fmt: skip
        said = {"jax": "its model holds fc9/bias, fc9/kernel, which this version's cnn has not, "
                       "and lacks fc1/bias, fc1/kernel",
                "torch": "its model holds fc9.bias, fc9.weight, which this version's cnn has "
                         "not, and lacks fc1.bias, fc1.weight"}[backend]  # fmt: skip
    else:
        said = {"jax": "its training state has ", "torch": "its optimiser state has "}[backend]
    for main, args in tools:
        assert main(args) == 2, main
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path} is not a checkpoint this jaxvision reads: {said}")
        assert err.count("\n") == 1, err
    if edit is transposed_moment:
        assert re.search(r"of shape \((\d+), (\d+)\), not \(\2, \1\); use one", err), err
    assert checkpoint.step_folders(tmp_path / "ckpt") == [int(path.name)]  # not set aside
    checkpoint.verify(path)
    assert not (tmp_path / "out.pth").exists() and not (tmp_path / "ev").exists()


# --- out of memory -----------------------------------------------------------------------------


def under_limit(limit: str, value: int, *args: str, **kw) -> subprocess.CompletedProcess:
    """scripts/train.py `args` in a subprocess under resource limit `limit` (RLIMIT_FSIZE: a
    write past `value` bytes fails with EFBIG, as on a full disk; RLIMIT_AS: memory)."""
    code = (
        "import resource, runpy, sys; "
        f"resource.setrlimit(resource.{limit}, ({value}, resource.RLIM_INFINITY)); "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}  # glibc's arenas grow with the host's cores
    # no persistent compilation cache, should the caller have one: a write the limit cuts short
    # leaves a truncated entry, and JAX's warnings about it in this and later runs' stderr
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return subprocess.run([sys.executable, "-c", code, str(REPO / "scripts" / "train.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
                          **kw)  # fmt: skip


# Past the 47-bit user address space: refused at once, whatever the machine's overcommit setting.
BEYOND_ANY_ADDRESS_SPACE = 2**48


def raised(f, kinds=(MemoryError, RuntimeError)) -> BaseException:
    with pytest.raises(kinds) as info:
        f()
    return info.value


def test_each_frameworks_out_of_memory_error_is_recognised_with_its_size():
    import jax.numpy as jnp
    import torch

    n = BEYOND_ANY_ADDRESS_SPACE
    numpy_error = raised(lambda: np.empty(n, np.uint8))
    torch_error = raised(lambda: torch.empty(n, dtype=torch.uint8))
    xla_error = raised(lambda: jnp.zeros(n, jnp.uint8).block_until_ready())
    assert errors.failed_allocation(numpy_error) == "could not allocate 256.00 TiB"
    assert errors.failed_allocation(torch_error) == "could not allocate 262144.00 GiB"
    assert errors.failed_allocation(xla_error) == "could not allocate 262144.00 GiB"
    # torch's CUDA allocator, as torch.OutOfMemoryError words it (no GPU here to raise it)
    cuda = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.19 GiB "
        "of which 3.06 MiB is free."
    )
    assert errors.failed_allocation(cuda) == "could not allocate 20.00 MiB"
    for other in (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("memory"),
                  raised(lambda: torch.ones(2) @ torch.ones(3))):  # fmt: skip
        assert errors.failed_allocation(other) is None


def test_out_of_memory_is_one_line_and_other_errors_pass_through(capsys):
    def allocate():
        np.empty(BEYOND_ANY_ADDRESS_SPACE, np.uint8)

    assert errors.exit_code(allocate, out_of_memory_fix="use fewer") == 1
    assert capsys.readouterr().err == (
        "error: out of memory: could not allocate 256.00 TiB; use fewer\n"
    )

    def fail():
        raise RuntimeError("a bug, not memory")

    with pytest.raises(RuntimeError, match="a bug, not memory"):  # a traceback, as a bug should
        errors.exit_code(fail)

    def ctrl_c():  # outside training (loading data, compiling): nothing to save
        raise KeyboardInterrupt

    assert errors.exit_code(ctrl_c) == 130
    assert capsys.readouterr().err == "error: interrupted (Ctrl-C)\n"


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_run_too_large_for_memory_stops_with_one_line_naming_its_sizes(tmp_path, backend):
    """AlexNet at 2048 px, batch 64, under a 4 GB address-space limit: the step needs more
    (JAX one 7 GiB buffer, torch a 1 GiB input among others) than the limit leaves after the
    frameworks' own reservations (CI's 2 cores; many more cores reserve more)."""
    args = ["--arch", "alexnet", "--backend", backend, "--no-pretrained", "--image-size", "2048",
            "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")]  # fmt: skip
    r = under_limit("RLIMIT_AS", 4 * 10**9, *args)
    assert r.returncode == 1, r.stderr
    assert re.fullmatch(
        r"error: out of memory: could not allocate \d+\.\d\d GiB; use a smaller --batch-size "
        r"\(this run: 64\) or --eval-batch-size \(100\), or --image-size \(2048\)\n",
        r.stderr,
    ), r.stderr
    assert not (tmp_path / "run").exists()


# --- a disk that fills up ----------------------------------------------------------------------


def test_a_full_disks_failed_writes_are_told_apart_from_other_errors():
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/metrics.json")
    assert errors.failed_write(full) == "No space left on device"
    tensorstore = ValueError('OUT_OF_RANGE: Error writing "conv1.bias.value/0" in OCDBT database '
                             "at local file ...: File too large [os_error_code='27']")  # fmt: skip
    assert errors.failed_write(tensorstore) == "File too large"
    torch_zip = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 51 vs 50")
    assert errors.failed_write(torch_zip) == "torch.save's writer failed: unexpected pos 51 vs 50"
    # not a full disk's: a traceback, as before (train.py probes its folders up front)
    missing = raised(lambda: open("/nonexistent-folder/x", "w"), OSError)  # noqa: SIM115
    denied = ValueError("PERMISSION_DENIED: ... [os_error_code='13']")
    for other in (missing, denied, ValueError("bad value"), RuntimeError("Event loop is closed")):
        assert errors.failed_write(other) is None
    with pytest.raises(FileNotFoundError):
        errors.exit_code(lambda: open("/nonexistent-folder/x", "w"))  # noqa: SIM115


CHECKPOINT_FAILED = (r"error: cannot write {ckpt}/(\d+) \((File too large|torch.save's writer "
                     r"failed: .+)\); free disk space ")  # fmt: skip


def test_an_orbax_checkpoint_that_cannot_be_written_is_one_line_and_removed(tmp_path):
    """Orbax's writer threads fail in their own ways (logs, tracebacks, unraisable errors on
    closed event loops); the run ends in one line, and no step folder is left that --resume
    would have to skip. (tensorstore's C++ writers can still be flushing into orbax's temporary
    folder when it is removed; one that comes back is never taken for a checkpoint, and the next
    run there removes it.)"""
    ckpt = tmp_path / "ckpt"
    r = under_limit("RLIMIT_FSIZE", 2000, *TINY, "--epochs", "1", "--checkpoint-dir", str(ckpt),
                    "--out", str(tmp_path / "run"))  # fmt: skip
    assert r.returncode == 1, r.stderr
    pattern = CHECKPOINT_FAILED.format(ckpt=re.escape(str(ckpt)))
    assert re.fullmatch(pattern + r"\(or choose another --checkpoint-dir\) and run again\n",
                        r.stderr), r.stderr  # fmt: skip
    assert [p.name for p in ckpt.iterdir() if not p.name.endswith(".orbax-checkpoint-tmp")] == []


def test_a_torch_checkpoint_that_cannot_be_written_names_the_one_to_resume(tmp_path, train_cli):
    """Epoch 1 saved; epoch 2's save fails (torch's zip writer keeps no errno): one line naming
    the intact checkpoint, and nothing of epoch 2's left."""
    ckpt = tmp_path / "ckpt"
    args = [*TINY, "--backend", "torch", "--checkpoint-dir", str(ckpt), "--out", str(tmp_path)]
    assert train_cli(*args, "--epochs", "1").returncode == 0
    r = under_limit("RLIMIT_FSIZE", 2000, *args, "--epochs", "2", "--resume")
    assert r.returncode == 1, r.stderr
    pattern = CHECKPOINT_FAILED.format(ckpt=re.escape(str(ckpt)))
    resume = rf"and continue with --resume \(from {re.escape(str(ckpt))}/8, after epoch 1\)\n"
    assert re.fullmatch(pattern + resume, r.stderr), r.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == ["8"]


def test_a_figure_that_cannot_be_written_is_one_line_and_removed(tmp_path):
    out = tmp_path / "run"
    r = under_limit("RLIMIT_FSIZE", 20_000, *TINY, "--epochs", "1", "--out", str(out))
    assert r.returncode == 1, r.stderr
    assert r.stderr == (f"error: cannot write {out / 'confusion.png'} (File too large); free disk "
                        "space, or choose another --out\n")  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
