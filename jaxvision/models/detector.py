"""torchvision's Faster R-CNN in Flax NNX, with static shapes, for digit images.

Ren et al. 2015, as torchvision builds it (`fasterrcnn_mobilenet_v3_large_320_fpn`,
`fasterrcnn_resnet50_fpn`). The torch twin is torchvision's own model
(`torch_reference.models.detector`); the module names are torchvision's (`backbone.body`,
`backbone.fpn`, `rpn.head`, `roi_heads.box_head`, `roi_heads.box_predictor`), so conversion is a
table (`jaxvision.interop.convert.faster_rcnn_rules`).

The one deviation is of form, not number: every variable-length list torchvision makes
(proposals, detections) is a fixed-size array with a `valid` mask, so a step compiles once
(`jaxvision.models.box_ops`). Inputs are (B, S, S, 3) in [0, 1], NHWC; the transform normalises,
resizes to `config.image_size` and pads to a multiple of 32, as `GeneralizedRCNNTransform`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxvision.core.model_configs import FASTER_RCNN_PRESETS as PRESETS  # noqa: F401
from jaxvision.core.model_configs import FasterRCNNConfig
from jaxvision.models import box_ops
from jaxvision.models.backbones import (
    BackboneWithFPN,
    BatchNorm2d,
    FrozenBatchNorm2d,
    Sequential,
    conv,
)
from jaxvision.models.layers import torch_linear

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
RPN_NMS_THRESH, RPN_MIN_SIZE = 0.7, 1e-3
BOX_SCORE_THRESH, BOX_NMS_THRESH, BOX_MIN_SIZE, DETECTIONS_PER_IMG = 0.05, 0.5, 1e-2, 100
ROI_SIZE, ROI_SAMPLING = 7, 2
ROI_CHUNK_BYTES = 64 * 2**20  # the features gathered for one chunk of RoIs in `box_outputs`
# Training (torchvision's defaults): the matchers' IoU thresholds, the samplers, smooth-L1's beta.
RPN_FG_IOU, RPN_BG_IOU, RPN_BATCH, RPN_POSITIVE = 0.7, 0.3, 256, 0.5
BOX_FG_IOU, BOX_BG_IOU, BOX_POSITIVE = 0.5, 0.5, 0.25
SMOOTH_L1_BETA = 1.0 / 9
LOSSES = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


class RPNHead(nnx.Module):
    """torchvision's RPNHead: a shared 3x3 conv + ReLU, then objectness and box deltas."""

    def __init__(self, channels: int, anchors: int, rngs: nnx.Rngs):
        init = dict(bias=True, init="normal_0.01")
        self.conv = Sequential([Sequential([conv(channels, channels, 3, rngs, **init)])])
        self.cls_logits = conv(channels, anchors, 1, rngs, **init)
        self.bbox_pred = conv(channels, anchors * 4, 1, rngs, **init)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, C) -> objectness (B, H*W*A) and deltas (B, H*W*A, 4), location-major."""
        t = nnx.relu(self.conv(x))
        b = x.shape[0]
        logits = self.cls_logits(t).reshape(b, -1)  # (B, H, W, A) -> (B, H*W*A)
        deltas = self.bbox_pred(t).reshape(b, -1, 4)  # (B, H, W, A*4) -> (B, H*W*A, 4)
        return logits, deltas


class RegionProposalNetwork(nnx.Module):
    def __init__(self, channels: int, anchors: int, rngs: nnx.Rngs):
        self.head = RPNHead(channels, anchors, rngs)


class TwoMLPHead(nnx.Module):
    """fc6, fc7 with ReLU. Its input is flattened (H, W, C); the converter permutes fc6's rows
    from torch's (C, H, W)."""

    def __init__(self, features: int, hidden: int, rngs: nnx.Rngs):
        self.fc6 = torch_linear(features, hidden, rngs)
        self.fc7 = torch_linear(hidden, hidden, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)  # (R, 7, 7, C) -> (R, 7*7*C)
        return nnx.relu(self.fc7(nnx.relu(self.fc6(x))))


class FastRCNNPredictor(nnx.Module):
    def __init__(self, hidden: int, classes: int, rngs: nnx.Rngs):
        self.cls_score = torch_linear(hidden, classes, rngs)
        self.bbox_pred = torch_linear(hidden, classes * 4, rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nnx.Module):
    def __init__(self, classes: int, rngs: nnx.Rngs):
        self.box_head = TwoMLPHead(256 * ROI_SIZE**2, 1024, rngs)
        self.box_predictor = FastRCNNPredictor(1024, classes, rngs)


class FasterRCNN(nnx.Module):
    """`frozen`: FrozenBatchNorm2d, the structure torchvision loads pretrained weights into;
    otherwise trainable BatchNorm2d, as torchvision builds it from scratch. `num_classes`
    includes background (default: the config's digits + 1)."""

    def __init__(
        self,
        config: FasterRCNNConfig = FasterRCNNConfig(),
        *,
        frozen: bool = False,
        num_classes: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.config = c = config
        self.frozen = frozen
        self.backbone = BackboneWithFPN(c.detector, rngs, frozen)
        per_location = len(c.anchor_sizes[0]) * len(ASPECT_RATIOS)
        self.rpn = RegionProposalNetwork(256, per_location, rngs)
        self.roi_heads = RoIHeads(num_classes or c.detector_classes, rngs)
        for _, m in nnx.iter_graph(self):  # torchvision's builder sets the COCO weights' eps
            if isinstance(m, FrozenBatchNorm2d):
                m.eps = c.frozen_bn_eps

    # --- static geometry (Python ints and numpy, fixed by the config) ---
    def resized(self, size: int) -> int:
        """The side an input of side `size` is resized to: `image_size`, or one less where
        torchvision's floor(size * image_size / size) rounds down (e.g. 49 -> 63 at 64). Boxes
        are clipped to it and scaled back from it."""
        return box_ops.resized_size(size, self.config.image_size)

    def anchors(self, feature_sizes: list[int], padded: int) -> list[np.ndarray]:
        """Each level's (H*W*A, 4) anchors for square maps of these sides over a padded batch of
        side `padded`, as torchvision's AnchorGenerator makes them."""
        return [
            box_ops.grid_anchors(box_ops.base_anchors(sizes, ASPECT_RATIOS), f, padded)
            for sizes, f in zip(self.config.anchor_sizes, feature_sizes, strict=True)
        ]

    # --- stages ---
    def transform(self, images: jax.Array) -> jax.Array:
        """GeneralizedRCNNTransform: normalise, resize (bilinear) to image_size, zero-pad to a
        multiple of 32. (B, S, S, 3) in [0, 1] -> (B, P, P, 3)."""
        b, h, w, ch = images.shape
        if h != w or ch != 3:
            raise ValueError(f"FasterRCNN expects square RGB (B, S, S, 3), got {images.shape}")
        x = (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        x = box_ops.resize_bilinear(x, self.resized(h))  # (B, r, r, 3)
        pad = _padded(x.shape[1]) - x.shape[1]
        return jnp.pad(x, ((0, 0), (0, pad), (0, pad), (0, 0))) if pad else x

    def proposals(
        self, features: list[jax.Array], size: int, mode: str, out: dict | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
        """The RPN: objectness and deltas on every level, then torchvision's `filter_proposals`
        with `mode`'s ('train' or 'test') top-n settings, for images resized to `size`.

        Returns objectness (B, N) and deltas (B, N, 4) over all N anchors (for the RPN loss),
        and proposals (B, P, 4), their sigmoid scores (B, P) and valid mask (B, P)."""
        c = self.config
        heads = [self.rpn.head(f) for f in features]
        logits = jnp.concatenate([h[0] for h in heads], 1)  # (B, N)
        deltas = jnp.concatenate([h[1] for h in heads], 1)  # (B, N, 4)
        anchors = self.anchors([f.shape[1] for f in features], _padded(size))
        anchors_all = jnp.asarray(np.concatenate(anchors))  # (N, 4)
        boxes = box_ops.decode(
            jax.lax.stop_gradient(deltas)[:, :, None, :], anchors_all, box_ops.RPN_WEIGHTS
        )[:, :, 0]  # (B, N, 4)
        obj = jax.lax.stop_gradient(logits)
        # top-n per level, then torchvision's filter_proposals; NMS runs per level
        cands, scores, keeps, offset = [], [], [], 0
        for a in anchors:
            k = min(c.rpn_pre_nms_top_n[mode], len(a))
            top_obj, top = jax.lax.top_k(obj[:, offset : offset + len(a)], k)  # (B, k)
            box = box_ops.clip(jnp.take_along_axis(boxes, top[..., None] + offset, 1), size)
            score = jax.nn.sigmoid(top_obj)
            ok = box_ops.not_small(box, RPN_MIN_SIZE) & (score >= c.rpn_score_thresh)
            keeps.append(jax.vmap(box_ops.nms, (0, 0, 0, None))(box, score, ok, RPN_NMS_THRESH))
            cands.append(box)
            scores.append(score)
            offset += len(a)
        cand, scores = jnp.concatenate(cands, 1), jnp.concatenate(scores, 1)  # (B, K, 4), (B, K)
        n_out = min(c.rpn_post_nms_top_n[mode], cand.shape[1])
        keep, found = jax.vmap(box_ops.top_survivors, (0, 0, None))(
            scores, jnp.concatenate(keeps, 1), n_out
        )  # (B, P)
        props = jnp.take_along_axis(cand, keep[..., None], 1)  # (B, P, 4)
        prop_scores = jnp.take_along_axis(scores, keep, 1)
        if out is not None:
            out.update({"rpn.objectness": logits, "rpn.deltas": deltas, "anchors": anchors_all,
                        "proposals": props, "proposals.scores": prop_scores,
                        "proposals.valid": found})  # fmt: skip
        return logits, deltas, props, prop_scores, found

    def box_features(self, features: list[jax.Array], boxes: jax.Array, size: int) -> jax.Array:
        """MultiScaleRoIAlign over the levels but `pool` (its scales inferred against the
        resized side `size`), then the box head: (B, R, 4) boxes -> (B, R, 1024)."""
        b, r, _ = boxes.shape
        pooled = box_ops.multiscale_roi_align(features[:-1], boxes, size,
                                              ROI_SIZE, ROI_SAMPLING)  # fmt: skip
        return self.roi_heads.box_head(pooled.reshape(b * r, *pooled.shape[2:])).reshape(b, r, -1)

    def box_outputs(
        self, features: list[jax.Array], boxes: jax.Array, valid: jax.Array, size: int
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`box_features` and the predictor on the valid boxes only, as torchvision runs them on
        its variable-length proposal lists: boxes (B, P, 4), valid (B, P) -> box-head features
        (B, P, 1024), class logits (B, P, K), box regression (B, P, K * 4), zero where not valid.

        The batch's valid boxes are packed first (image by image, in rank order) and pooled and
        run through the head in chunks, under a loop that stops after the chunk holding the
        last of them: the cost follows how many proposals survive NMS, not the padded P. Each
        row is the computation `box_features` does. For detection and the evaluation's loss
        (`losses(packed=True)`): under `jax.grad` in `jit` its data-dependent loop raises."""
        b, p, _ = boxes.shape
        levels = features[:-1]
        per_roi = sum(int(np.prod(f.shape[1:])) for f in levels) * 4  # bytes gathered per RoI
        chunk = min(int(np.clip(ROI_CHUNK_BYTES // per_roi, 16, 512)), b * p)
        n_chunks = -(-b * p // chunk)
        order = jnp.argsort(~valid.reshape(-1), stable=True)  # (B*P,): the valid ones first
        order_padded = jnp.pad(order, (0, n_chunks * chunk - b * p))
        heads = self.roi_heads
        k = heads.box_predictor.cls_score.out_features

        def run_chunk(i, acc):
            rows = jax.lax.dynamic_slice_in_dim(order_padded, i * chunk, chunk)
            img = rows // p
            pooled = box_ops.multiscale_roi_align(
                [f[img] for f in levels], boxes.reshape(-1, 4)[rows][:, None], size,
                ROI_SIZE, ROI_SAMPLING,
            )[:, 0]  # fmt: skip  # (chunk, 7, 7, C)
            feats = heads.box_head(pooled)
            new = (feats, *heads.box_predictor(feats))
            return tuple(jax.lax.dynamic_update_slice_in_dim(a, v, i * chunk, 0)
                         for a, v in zip(acc, new, strict=True))  # fmt: skip

        hidden = heads.box_head.fc7.out_features
        acc = tuple(jnp.zeros((n_chunks * chunk, d)) for d in (hidden, k, k * 4))
        n_valid = valid.sum()
        acc = jax.lax.fori_loop(0, (n_valid + chunk - 1) // chunk, run_chunk, acc)
        inverse = jnp.argsort(order)  # packed row of each (image, rank)
        ok = valid.reshape(-1, 1)
        feats, class_logits, box_regression = (
            jnp.where(ok, a[inverse], 0.0).reshape(b, p, -1) for a in acc
        )
        return feats, class_logits, box_regression

    def postprocess(
        self, class_logits: jax.Array, box_regression: jax.Array, proposals: jax.Array,
        valid: jax.Array, size: int,
    ) -> dict[str, jax.Array]:  # fmt: skip
        """`RoIHeads.postprocess_detections` per image: class-specific boxes, softmax, clip, drop
        background, score > 0.05, small-box removal, per-class NMS, the top 100."""
        b, p, k = class_logits.shape
        boxes = box_ops.decode(
            box_regression.reshape(b, p, k, 4), proposals, box_ops.BOX_HEAD_WEIGHTS
        )  # (B, P, K, 4)
        boxes = box_ops.clip(boxes, size)[:, :, 1:]  # (B, P, K-1, 4): no background
        scores = jax.nn.softmax(class_logits, -1)[:, :, 1:]  # (B, P, K-1)
        ok = valid[..., None] & (scores > BOX_SCORE_THRESH) & box_ops.not_small(boxes, BOX_MIN_SIZE)
        per_class = jax.vmap(jax.vmap(box_ops.nms, (1, 1, 1, None), 1), (0, 0, 0, None))
        keep = per_class(boxes, scores, ok, BOX_NMS_THRESH)  # (B, P, K-1), NMS within each class
        boxes, scores = boxes.reshape(b, -1, 4), scores.reshape(b, -1)  # (B, P*(K-1)), p-major
        n_out = min(DETECTIONS_PER_IMG, scores.shape[1])
        keep, found = jax.vmap(box_ops.top_survivors, (0, 0, None))(
            scores, keep.reshape(b, -1), n_out
        )  # (B, D)
        labels = keep % (k - 1) + 1
        return {
            "boxes": jnp.take_along_axis(boxes, keep[..., None], 1),
            "scores": jnp.where(found, jnp.take_along_axis(scores, keep, 1), 0.0),
            "labels": jnp.where(found, labels, 0),
            "valid": found,
        }

    def detect(self, images: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """Eval-mode detection: torchvision's `model(images)` with BatchNorm's running statistics.

        images (B, S, S, 3) in [0, 1]. Returns the detections (`boxes` (B, D, 4) in input pixels,
        `scores`, `labels` (digit + 1), `valid`; D = 100) plus `class_scores` (B, K), each
        class's best softmax score over the image's proposals (the no-detection fallback), and
        the named intermediates of every stage.
        """
        training = [m for _, m in nnx.iter_graph(self)
                    if isinstance(m, BatchNorm2d) and not m.use_running_average]  # fmt: skip
        if training:  # batch statistics would be used, and the running ones overwritten
            raise ValueError(
                "FasterRCNN.detect needs eval mode: nnx.view(model, use_running_average=True)"
            )
        out = {}
        out["transform"] = x = self.transform(images)
        features = self.backbone(x)
        for name, f in zip(self.level_names(), features, strict=True):
            out[f"features.{name}"] = f
        size = self.resized(images.shape[1])
        _, _, props, _, valid = self.proposals(features, size, "test", out)
        feats, class_logits, box_regression = self.box_outputs(features, props, valid, size)
        out["box_head"] = feats  # (B, P, 1024)
        out["class_logits"], out["box_regression"] = class_logits, box_regression
        det = self.postprocess(class_logits, box_regression, props, valid, size)
        ratio = np.float32(images.shape[1]) / np.float32(size)
        det["boxes"] = det["boxes"] * ratio  # back to input pixels (transform.postprocess)
        probs = jax.nn.softmax(class_logits, -1)
        det["class_scores"] = jnp.where(valid[..., None], probs, 0.0).max(1)  # (B, K)
        out["detections"] = det
        return det, out

    def losses(
        self,
        images: jax.Array,
        boxes: jax.Array,
        labels: jax.Array,
        gt_valid: jax.Array,
        key: jax.Array | None = None,
        *,
        samples: dict[str, jax.Array] | None = None,
        image_valid: jax.Array | None = None,
        features: list[jax.Array] | None = None,
        packed: bool = False,
        out: dict | None = None,
    ) -> dict[str, jax.Array]:
        """torchvision's training-mode `model(images, targets)`: the four losses (`LOSSES`).

        images (B, S, S, 3) in [0, 1]; ground truth padded to G per image: boxes (B, G, 4) in
        input pixels, labels (B, G) (digit + 1), gt_valid (B, G) bool. BatchNorm follows the
        model's view (batch statistics in training). `key` draws the RPN's and the box head's
        balanced samples; `samples` injects them instead (masks `rpn.positive`, `rpn.negative`
        over the anchors (B, N) and `roi.positive`, `roi.negative` over the box head's
        candidates (B, P + G): the proposals, then the ground truth), which is how the parity
        tests give both frameworks the same draw. `image_valid` (B,) leaves images out
        (padding; blank images, which torchvision cannot take). `features`: the backbone's
        levels for `images` where they are at hand (evaluation: `detect`'s, with the same
        running statistics), saving the second pass. `packed` (evaluation; not differentiable):
        the box head runs on the sampled RoIs only, packed as `box_outputs` packs detection's
        proposals, instead of on every image's fixed `box_batch_size_per_image` rows; a
        trained RPN leaves far fewer candidates than that. `out` receives the named
        intermediates (with `packed`, the RoIs' logits and deltas are zero where not sampled).
        """
        b, s = images.shape[:2]
        size = self.resized(s)
        out = {} if out is None else out
        if features is None:
            features = self.backbone(self.transform(images))
        logits, deltas, props, _, valid = self.proposals(features, size, "train", out)
        gt = boxes * (np.float32(size) / np.float32(s))  # the transform's resize_boxes
        if samples is None:
            if key is None:
                raise ValueError("FasterRCNN.losses needs a PRNG key (or injected samples)")
            k_rpn, k_roi = jax.random.split(key)
        else:
            k_rpn = k_roi = None
        gather = jax.vmap(lambda a, i: a[i])  # per image: (G, ...)[(M,)] -> (M, ...)

        # RPN: anchors matched at 0.7 / 0.3 (with low-quality matches), 256 sampled per image
        anchors = out["anchors"]  # (N, 4)
        quality = box_ops.pairwise_iou(gt, jnp.broadcast_to(anchors, (b, *anchors.shape)))
        matches = jax.vmap(box_ops.match, (0, 0, None, None, None))(
            quality, gt_valid, RPN_FG_IOU, RPN_BG_IOU, True
        )  # (B, N)
        rpn_labels = jnp.where(matches >= 0, 1, jnp.where(matches == box_ops.BELOW_LOW, 0, -1))
        pos, neg = _draw(samples, "rpn", k_rpn, rpn_labels, RPN_BATCH, RPN_POSITIVE, image_valid)
        targets = box_ops.encode(gather(gt, jnp.maximum(matches, 0)), anchors, box_ops.RPN_WEIGHTS)
        targets = jnp.where(pos[..., None], targets, 0.0)  # (B, N, 4); finite where unused
        n_rpn = jnp.maximum((pos | neg).sum(), 1)  # 0 only when every image is left out
        box_rpn = jnp.where(pos, box_ops.smooth_l1(deltas - targets, SMOOTH_L1_BETA).sum(-1), 0.0)
        bce = optax.sigmoid_binary_cross_entropy(logits, pos.astype(logits.dtype))
        out.update({"rpn.matches": matches, "rpn.positive": pos, "rpn.negative": neg})

        # Box head: proposals plus the ground truth, matched at 0.5, a balanced sample of them
        cand = jnp.concatenate([props, gt], 1)  # (B, P + G, 4)
        cand_valid = jnp.concatenate([valid, gt_valid], 1)
        matches = jax.vmap(box_ops.match, (0, 0, None, None, None))(
            box_ops.pairwise_iou(gt, cand), gt_valid, BOX_FG_IOU, BOX_BG_IOU, False
        )  # (B, P + G)
        roi_labels = jnp.where(
            matches >= 0,
            gather(labels, jnp.maximum(matches, 0)),
            jnp.where(matches == box_ops.BELOW_LOW, 0, -1),
        )
        roi_labels = cand_labels = jnp.where(cand_valid, roi_labels, -1)
        per_image = self.config.box_batch_size_per_image
        r_pos, r_neg = _draw(samples, "roi", k_roi, roi_labels, per_image, BOX_POSITIVE,
                             image_valid)  # fmt: skip
        sampled = r_pos | r_neg
        # the sampled candidates first, in index order (torchvision's `where`): a fixed count
        idx = jnp.argsort(~sampled, axis=1, stable=True)[:, : min(per_image, cand.shape[1])]
        ok = jnp.take_along_axis(sampled, idx, 1)  # (B, R)
        rois = gather(cand, idx)  # (B, R, 4)
        roi_labels = jnp.where(ok, jnp.take_along_axis(roi_labels, idx, 1), 0)
        roi_gt = gather(gt, jnp.maximum(jnp.take_along_axis(matches, idx, 1), 0))
        if packed:  # zero where not `ok`, which every loss below masks
            _, class_logits, box_regression = self.box_outputs(features, rois, ok, size)
        else:
            class_logits, box_regression = self.roi_heads.box_predictor(
                self.box_features(features, rois, size)
            )  # (B, R, K), (B, R, K * 4)
        k = class_logits.shape[-1]
        fg = ok & (roi_labels > 0)
        reg = jnp.take_along_axis(
            box_regression.reshape(b, -1, k, 4), roi_labels[..., None, None], 2
        )[:, :, 0]  # (B, R, 4): each RoI's deltas for its own class
        roi_targets = box_ops.encode(roi_gt, rois, box_ops.BOX_HEAD_WEIGHTS)
        roi_targets = jnp.where(fg[..., None], roi_targets, 0.0)
        n_roi = jnp.maximum(ok.sum(), 1)
        ce = optax.softmax_cross_entropy_with_integer_labels(class_logits, roi_labels)
        box_roi = jnp.where(fg, box_ops.smooth_l1(reg - roi_targets, SMOOTH_L1_BETA).sum(-1), 0.0)
        out.update({"roi.candidates": cand, "roi.candidate_labels": cand_labels,
                    "roi.positive": r_pos, "roi.negative": r_neg, "roi.boxes": rois,
                    "roi.labels": roi_labels, "roi.valid": ok,
                    "roi.class_logits": class_logits,
                    "roi.box_regression": box_regression})  # fmt: skip
        return {
            "loss_classifier": jnp.where(ok, ce, 0.0).sum() / n_roi,
            "loss_box_reg": box_roi.sum() / n_roi,
            "loss_objectness": jnp.where(pos | neg, bce, 0.0).sum() / n_rpn,
            "loss_rpn_box_reg": box_rpn.sum() / n_rpn,
        }

    def level_names(self) -> list[str]:
        return [*map(str, range(len(self.config.anchor_sizes) - 1)), "pool"]


def _padded(size: int) -> int:
    """The batch's side after the transform pads to a multiple of 32."""
    return -(-size // 32) * 32


def _draw(samples, stage, key, labels, batch, fraction, image_valid):
    """A stage's (positive, negative) masks (B, M): injected, or drawn per image from `key`;
    images outside `image_valid` sample nothing."""
    if samples is None:
        keys = jax.random.split(key, labels.shape[0])
        pos, neg = jax.vmap(box_ops.sample, (0, 0, None, None))(keys, labels, batch, fraction)
    else:
        pos, neg = samples[f"{stage}.positive"], samples[f"{stage}.negative"]
    if image_valid is not None:
        pos, neg = pos & image_valid[:, None], neg & image_valid[:, None]
    return pos, neg
