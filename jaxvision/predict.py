"""`predict.py --checkpoint DIR IMAGE...`: classify image files with a trained checkpoint.

Preprocessing (`prepare`), from any PNG or JPG to the training data's 28x28 grey, light on dark:
  1. Read; apply the EXIF orientation; composite transparency onto white; colour -> luminance
     (ITU-R 601-2, Pillow's "L").
  2. Polarity: the median of the border pixels is the background. A light background (above
     mid-grey) means dark ink on light paper, and the image is inverted, since MNIST digits are
     light on dark.
  3. Contrast: the background level is subtracted and the brightest pixel scaled to 255.
  4. Fit, as the dataset was made (`--fit auto` picks by the checkpoint's dataset):
     digit  (MNIST, KMNIST) the ink's bounding box (pixels above 10% of the peak) is scaled,
            keeping its aspect ratio, to fit a 20x20 box, and placed in the 28x28 frame with its
            centre of mass on pixel (14, 14), as LeCun et al. prepared MNIST;
     item   (Fashion-MNIST) the bounding box is scaled to fit the whole 28x28 frame, centred;
     none   the whole image is resized to 28x28.
  Downscaling is Pillow's antialiased bilinear filter.
Then the checkpoint's own normalisation applies (the training set's mean and std, or ImageNet's
for VGG16 and AlexNet), and the model runs in eval mode in the framework that wrote the
checkpoint (a converted checkpoint runs in the other one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from jaxvision import checkpoint, configs
from jaxvision.data import DATASETS
from jaxvision.errors import UserError, exit_code

FITS = ("auto", "digit", "item", "none")
INK_FRACTION = 0.1  # of the peak: what counts as ink when finding the bounding box


def read_grey(path: str | Path) -> np.ndarray:
    """An image file -> (H, W) float32 luminance in [0, 255]. Raises UserError if unreadable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba)
            return np.asarray(im.convert("L"), dtype=np.float32)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{path}: cannot read it as an image ({e})") from None


def _resize(a: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(a, mode="F").resize((width, height), Image.BILINEAR))


def prepare(grey: np.ndarray, size: int = 28, fit: str = "digit") -> np.ndarray:
    """(H, W) luminance in [0, 255] -> (size, size) uint8, light on dark (see the module doc)."""
    g = np.asarray(grey, np.float32)
    h, w = g.shape
    b = max(1, min(h, w) // 20)
    border = np.concatenate([g[:b].ravel(), g[-b:].ravel(), g[:, :b].ravel(), g[:, -b:].ravel()])
    background = float(np.median(border))
    if background > 127.5:  # dark ink on light paper
        g, background = 255.0 - g, 255.0 - background
    g = np.clip(g - background, 0.0, None)
    peak = float(g.max())
    if peak <= 0.0:
        return np.zeros((size, size), np.uint8)  # blank: nothing to centre
    g = g * (255.0 / peak)
    if fit == "none":
        return np.clip(_resize(g, size, size), 0, 255).round().astype(np.uint8)
    ys, xs = np.nonzero(g > INK_FRACTION * 255.0)
    crop = g[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    box = size if fit == "item" else round(size * 20 / 28)
    scale = box / max(crop.shape)
    nh, nw = (max(1, min(box, round(n * scale))) for n in crop.shape)
    small = np.clip(_resize(crop, nh, nw), 0.0, 255.0)
    if fit == "item":
        top, left = (size - nh) // 2, (size - nw) // 2
    else:  # centre of mass on pixel (14, 14), as in MNIST; the whole box inside the frame
        mass = small.sum()
        cy = (small.sum(1) * np.arange(nh)).sum() / mass  # in pixel indices
        cx = (small.sum(0) * np.arange(nw)).sum() / mass
        top = int(np.clip(round(size / 2 - cy), 0, size - nh))
        left = int(np.clip(round(size / 2 - cx), 0, size - nw))
    out = np.zeros((size, size), np.float32)
    out[top : top + nh, left : left + nw] = small
    return out.round().astype(np.uint8)


class Classifier:
    """A checkpoint's model, in eval mode, in the framework that wrote it."""

    def __init__(self, directory: str | Path):
        self.path, self.meta = checkpoint.read_meta(directory)
        meta = self.meta
        if meta.get("format") != checkpoint.FORMAT:
            raise UserError(f"{self.path} is not a jaxvision checkpoint; pass a folder that "
                            "train.py --checkpoint-dir wrote")  # fmt: skip
        if meta["arch"] in configs.TORCH_ONLY_ARCHS:
            raise UserError(f"{self.path} holds a {meta['arch']} detector; predict.py classifies "
                            "with cnn, vit, vgg16 and alexnet checkpoints")  # fmt: skip
        self.arch, self.backend = meta["arch"], meta["backend"]
        self.model_cfg = configs.config_from_dict(self.arch, meta["model_config"])
        h, w, c = meta["image_shape"]
        if c != 1:
            raise UserError(f"{self.path}: predict.py handles greyscale datasets; this one has "
                            f"{c} channels")  # fmt: skip
        self.size = h
        spec = DATASETS.get(meta["dataset"])
        self.classes = spec.classes if spec else tuple(str(i) for i in range(meta["num_classes"]))
        self.fit = "item" if meta["dataset"] == "fashion_mnist" else "digit"
        self._forward = self._jax() if self.backend == "jax" else self._torch()

    def _jax(self):
        import jax
        import jax.numpy as jnp

        from jaxvision.train import imagenet_input, standardize

        model = checkpoint.load_flax_model(self.path, self.meta)
        meta = self.meta

        @jax.jit
        def forward(x):  # (N, H, W, 1) uint8 -> (N, K) probabilities
            x = x.astype(jnp.float32) / 255.0
            if self.arch in configs.IMAGENET_ARCHS:
                x = imagenet_input(x, self.model_cfg.image_size)
            else:
                x = standardize(x, meta["mean"], meta["std"])
            return jax.nn.softmax(model(x), axis=-1)

        return lambda x: np.asarray(forward(x))

    def _torch(self):
        import torch

        from torch_reference.checkpoint import load_model
        from torch_reference.train import imagenet_input

        model = load_model(self.path, self.meta)
        mean = torch.tensor(self.meta["mean"]).reshape(1, -1, 1, 1)
        std = torch.tensor(self.meta["std"]).reshape(1, -1, 1, 1)

        @torch.inference_mode()
        def forward(x):
            x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
            if self.arch in configs.IMAGENET_ARCHS:
                x = imagenet_input(x, self.model_cfg.image_size)
            else:
                x = (x - mean) / std
            return torch.softmax(model(x), dim=-1).numpy()

        return forward

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) or (N, H, W, 1) uint8 prepared images -> (N, K) class probabilities."""
        images = np.asarray(images, np.uint8).reshape(len(images), self.size, self.size, 1)
        return self._forward(images)


def predict_files(classifier: Classifier, files: list[str], fit: str = "auto"):
    """One record per file: {file, label, class, probability} or {file, error}."""
    fit = classifier.fit if fit == "auto" else fit
    records, images = [], []
    for f in files:
        try:
            images.append(prepare(read_grey(f), classifier.size, fit))
            records.append({"file": f})
        except UserError as e:
            records.append({"file": f, "error": str(e)})
    if images:
        probs = classifier.probabilities(np.stack(images))
        good = (r for r in records if "error" not in r)
        for r, p in zip(good, probs, strict=True):
            label = int(p.argmax())
            r.update(label=label, **{"class": classifier.classes[label]},
                     probability=float(p[label]))  # fmt: skip
    return records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="predict.py",
        description="Classify PNG or JPG images (any size, colour or grey, either polarity) "
        "with a checkpoint that train.py --checkpoint-dir wrote.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a --checkpoint-dir; its latest checkpoint is used")  # fmt: skip
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
        if args.json:
            print(json.dumps(records, indent=1))
        else:
            for r in records:
                if "error" not in r:
                    print(f"{r['file']}: {r['class']} ({r['probability']:.1%})")

    code = exit_code(body)
    return code or (1 if failed else 0)
