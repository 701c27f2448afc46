"""Faster R-CNN trained on MNIST as a detection task, and read out as a classifier (torch only).

Every digit is one object: its target box is the tight box around its ink (`--box-margin` pixels
wider), its label digit + 1 (`jaxvision.core.detection`). The detector trains on its own summed
losses (RPN objectness + RPN box regression + box-head classification + box regression). At
evaluation the predicted digit is the label of the highest-scoring detection at or above
`--score-threshold`, or, when none clears it, the box head's best foreground class over all
proposals (counted and reported as fallbacks). The test split also gets mAP@0.5 and the mean IoU of
the top box against the target box.

Images stay on the device as uint8 and are index-gathered per step, as in `torch_reference.train`;
targets are built for the whole split at once. A blank image (no ink, so no box) is skipped in
training and left out of the detection figures, and both counts are reported.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from jaxvision.core import detection
from jaxvision.core.config import TrainConfig
from jaxvision.core.data import Dataset, epoch_permutation
from jaxvision.core.results import RunResult
from torch_reference import metrics
from torch_reference.models.detector import build_detector, replace_box_predictor
from torch_reference.preprocess import to_nchw
from torch_reference.pretrained import load_into_torch, weights_name
from torch_reference.train import Trainer, optimizer_for


def create_detector(config: TrainConfig, model_cfg, verbose: bool = True) -> nn.Module:
    """Faster R-CNN from scratch, or from torchvision's COCO weights with a new box predictor."""
    if not config.pretrained:
        return build_detector(model_cfg)
    model = build_detector(model_cfg, pretrained=True)
    name = weights_name(config.arch, model_cfg.detector)
    load_into_torch(model, name, config.weights, verbose=verbose)
    replace_box_predictor(model, model_cfg.detector_classes)
    return model


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """--unfreeze: the backbone's body at --feature-lr, everything else at --lr."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return optimizer_for(config, named, lambda n: n.startswith("backbone.body."))


def as_rgb(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, 3, H, W) in [0, 1]; the detector's transform normalises."""
    x = x.float() / 255.0
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def make_targets(boxes: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """torchvision's per-image target dicts, one box each: boxes (B, 4), labels (B,) digit + 1."""
    return [{"boxes": boxes[i : i + 1], "labels": labels[i : i + 1]} for i in range(len(boxes))]


@torch.no_grad()
def detect(
    model, images: torch.Tensor, proposals: list[torch.Tensor] | None = None
) -> tuple[list[dict], torch.Tensor]:
    """Eval-mode detections, and each image's best softmax score per class over its proposals.

    The same computation as `model(list(images))` in eval mode (a test checks it), opened up at
    the box head so that its class scores are kept for the no-detection fallback.
    `proposals` (per image, (P, 4) in the transformed image's pixels) replaces the RPN's, for
    comparing the box head's stage alone. Returns detections (per image: boxes in input pixels,
    scores, labels) and class_scores (B, K + 1), column 0 background.
    """
    original_sizes = [tuple(img.shape[-2:]) for img in images]
    batch, _ = model.transform(list(images))
    features = model.backbone(batch.tensors)
    if proposals is None:
        proposals, _ = model.rpn(batch, features)
    heads = model.roi_heads
    box_features = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
    class_logits, box_regression = heads.box_predictor(box_features)
    boxes, scores, labels = heads.postprocess_detections(
        class_logits, box_regression, proposals, batch.image_sizes
    )
    detections = [
        {"boxes": b, "scores": s, "labels": lab}
        for b, s, lab in zip(boxes, scores, labels, strict=True)
    ]
    detections = model.transform.postprocess(detections, batch.image_sizes, original_sizes)
    probs = torch.softmax(class_logits, -1).split([len(p) for p in proposals])
    empty = class_logits.new_zeros(class_logits.shape[-1])
    class_scores = torch.stack([p.max(0).values if len(p) else empty for p in probs])
    return detections, class_scores


@torch.no_grad()
def detector_loss(model: nn.Module, images: torch.Tensor, targets: list[dict]) -> float:
    """The training objective on held-out images: the summed losses with BatchNorm in eval mode
    and the RNG untouched (the RoI sampling draws from a forked stream)."""
    devices = [images.device.index or 0] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        losses = model(list(images), targets)
    model.eval()
    return float(sum(losses.values()))


class DetectorTrainer(Trainer):
    """`torch_reference.train.Trainer`'s loop, with detection batches and evaluation."""

    def load_data(self) -> int:
        config, data, device = self.config, self.data, self.device
        boxes, ink, self.test_boxes, self.test_ink = detection.split_boxes(
            data.x_train, data.x_test, config.box_margin
        )
        self.train_index = np.flatnonzero(ink)  # blank images have no box: skipped
        self.skipped_train = int(data.n_train - len(self.train_index))
        self.x_train = to_nchw(data.x_train, device)  # (N, C, H, W) uint8
        self.boxes_train = torch.from_numpy(boxes).to(device)  # (N, 4)
        self.labels_train = torch.from_numpy(data.y_train.astype(np.int64) + 1).to(device)
        self.x_test = to_nchw(data.x_test, device)
        self.y_test = torch.from_numpy(data.y_test).to(device)
        if self.skipped_train:  # a note, not progress: --no-progress keeps it
            print(f"skipped {self.skipped_train} blank training images (no ink, so no box)")
        return len(self.train_index)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.config, self.model)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return self.train_index[epoch_permutation(len(self.train_index), self.config.seed, epoch)]

    def batch_loss(self, idx: torch.Tensor) -> torch.Tensor:
        """The detector's summed losses on the training images `idx` (B,)."""
        images = as_rgb(self.x_train[idx])
        targets = make_targets(self.boxes_train[idx], self.labels_train[idx])
        return sum(self.model(list(images), targets).values())

    def evaluate(self) -> dict:
        cfg, e = self.config, self.config.eval_batch_size
        self.model.eval()
        detections, class_scores, losses = [], [], []
        for i in range(0, self.data.n_test, e):
            images = as_rgb(self.x_test[i : i + e])
            dets, scores = detect(self.model, images)
            detections += [{k: v.cpu().numpy() for k, v in d.items()} for d in dets]
            class_scores.append(scores.cpu().numpy())
            ink = self.test_ink[i : i + e]
            if ink.any():  # the detector's loss needs a box per image
                keep = torch.from_numpy(np.flatnonzero(ink)).to(self.device)
                boxes = torch.from_numpy(self.test_boxes[i : i + e][ink]).to(self.device)
                labels = self.y_test[i : i + e][keep].long() + 1
                losses.append(
                    detector_loss(self.model, images[keep], make_targets(boxes, labels)) * len(keep)
                )
        preds, extras = detection.readout(detections, np.concatenate(class_scores),
                                          self.data.y_test, self.test_boxes, self.test_ink,
                                          cfg.score_threshold)  # fmt: skip
        pred = torch.from_numpy(preds).to(self.device)
        return {
            "loss": sum(losses) / max(int(self.test_ink.sum()), 1),
            "accuracy": metrics.accuracy(self.y_test, pred).item(),
            "f1_macro": metrics.f1_macro(self.y_test, pred, self.data.num_classes).item(),
            "preds": preds,
            "extras": extras,
        }


def train_and_evaluate(config: TrainConfig, data: Dataset) -> RunResult:
    torch.manual_seed(config.seed)  # initialisation and the RoI / anchor sampling
    model_cfg = config.model_config(data)
    trainer = DetectorTrainer(create_detector(config, model_cfg), config, data)
    result = trainer.run()
    result.extras = detection.run_extras(
        config, model_cfg, result.final.extras, data.n_test, trainer.skipped_train,
        int(data.n_test - trainer.test_ink.sum()),
    )  # fmt: skip
    return result
