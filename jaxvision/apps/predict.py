"""`predict.py --checkpoint DIR IMAGE...`: classify image files with a trained checkpoint.

Each image is fitted to the training data's form (`jaxvision.core.images.prepare`: polarity,
contrast, MNIST's 20x20 box and centre of mass, or Fashion-MNIST's full frame), normalised as the
checkpoint's training was, and classified in eval mode by the backend that wrote the checkpoint
(a converted checkpoint runs in the other one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from jaxvision.apps import backends
from jaxvision.core import flags
from jaxvision.core.data import DATASETS
from jaxvision.core.errors import UserError, exit_code
from jaxvision.core.images import FITS, is_blank, prepare, read_grey


class Classifier:
    """A checkpoint's model, in eval mode, in the framework that wrote it."""

    def __init__(self, directory: str | Path):
        backend, self.path, self.meta = backends.for_classifier_checkpoint(directory, "predict.py")
        meta = self.meta
        self.arch = meta["arch"]
        h, w, c = meta["image_shape"]
        if c != 1:
            raise UserError(f"{self.path}: predict.py handles greyscale datasets; this one has "
                            f"{c} channels")  # fmt: skip
        self.size = h
        spec = DATASETS.get(meta["dataset"])
        self.classes = spec.classes if spec else tuple(str(i) for i in range(meta["num_classes"]))
        self.fit = "item" if meta["dataset"] == "fashion_mnist" else "digit"
        self._forward = backend.classifier(self.path, meta)

    def log_probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) or (N, H, W, 1) uint8 prepared images -> (N, K) class log-probabilities."""
        images = np.asarray(images, np.uint8).reshape(len(images), self.size, self.size, 1)
        return self._forward(images)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) or (N, H, W, 1) uint8 prepared images -> (N, K) class probabilities."""
        return np.exp(self.log_probabilities(images))


def predict_files(classifier: Classifier, files: list[str], fit: str = "auto"):
    """One record per file: {file, label, class, probability} or {file, error}."""
    fit = classifier.fit if fit == "auto" else fit
    records, images = [], []
    for f in files:
        try:
            grey = read_grey(f)
        except UserError as e:
            records.append({"file": f, "error": str(e)})
            continue
        images.append(prepare(grey, classifier.size, fit))
        records.append({"file": f, "blank": is_blank(grey)})
    if images:
        probs = classifier.probabilities(np.stack(images))
        good = (r for r in records if "error" not in r)
        for r, p in zip(good, probs, strict=True):
            label = int(p.argmax())
            r.update(label=label, **{"class": classifier.classes[label]},
                     probability=float(p[label]))  # fmt: skip
    return records


def build_parser() -> argparse.ArgumentParser:
    p = flags.Parser(
        prog="predict.py",
        description="Classify PNG or JPG images (any size, colour or grey, either polarity) "
        "with a checkpoint that train.py --checkpoint-dir wrote.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a --checkpoint-dir (its latest checkpoint is used), or one checkpoint's "
                   "DIR/<step> folder")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON list instead of lines")
    p.add_argument("--fit", default="auto", choices=FITS,
                   help="how an image is fitted to 28x28: digit (MNIST's 20x20 box, centre of "
                   "mass), item (Fashion-MNIST's full frame), none (resize); auto: by the "
                   "checkpoint's dataset")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    failed = []

    def body():
        classifier = Classifier(args.checkpoint)
        records = predict_files(classifier, args.images, args.fit)
        for r in records:
            if "error" in r:
                failed.append(r)
                print(f"error: {r['error']}", file=sys.stderr)
            elif r["blank"]:
                print(f"warning: {r['file']}: blank (no ink stands out from the background); "
                      "its class means nothing", file=sys.stderr)  # fmt: skip
        if args.json:
            print(json.dumps(records, indent=1))
        else:
            for r in records:
                if "error" not in r:
                    print(f"{r['file']}: {r['class']} ({r['probability']:.1%})")

    code = exit_code(body)
    return code or (1 if failed else 0)
