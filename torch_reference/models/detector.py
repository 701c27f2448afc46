"""torchvision's Faster R-CNN, built for small digit images.

`build_detector` makes the same network as torchvision's public builders
(`fasterrcnn_mobilenet_v3_large_320_fpn`, `fasterrcnn_resnet50_fpn`), with two differences that
the public builders cannot express without downloading weights:
- COCO-pretrained weights come from a local file (`torch_reference.pretrained`), loaded into the
  same structure torchvision loads them into: FrozenBatchNorm2d and `trainable_backbone_layers`
  of the backbone trainable (the rest frozen), then the 91-way box predictor is replaced by a
  new one;
- the transform's `min_size`/`max_size` and the RoI sample size come from `FasterRCNNConfig`.
From scratch (`pretrained=False`) the result is exactly the public builder's model with
`weights=None, weights_backbone=None` (BatchNorm2d, every layer trainable), which a test checks
parameter for parameter. The backbone extractors are torchvision's own (`backbone_utils`).
"""

from __future__ import annotations

import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops.misc import FrozenBatchNorm2d

from jaxvision.core.model_configs import FasterRCNNConfig

COCO_CLASSES = 91  # torchvision's COCO detectors: 90 category ids + background
ALL_LAYERS = {"mobilenet_v3_320": 6, "resnet50_fpn": 5}  # trainable_backbone_layers = "all"


def build_detector(
    config: FasterRCNNConfig, pretrained: bool = False, num_classes: int | None = None
) -> FasterRCNN:
    """Faster R-CNN for `config`; `pretrained` builds the COCO weights' structure (91 classes,
    frozen BatchNorm, early layers frozen) for `torch_reference.pretrained` to load into."""
    norm = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    trainable = config.trainable_backbone_layers if pretrained else ALL_LAYERS[config.detector]
    kwargs = dict(
        min_size=config.image_size,
        max_size=config.image_size,
        box_batch_size_per_image=config.box_batch_size_per_image,
    )
    if config.detector == "mobilenet_v3_320":
        body = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm)
        backbone = _mobilenet_extractor(body, True, trainable)
        kwargs.update(
            rpn_anchor_generator=AnchorGenerator(
                config.anchor_sizes, ((0.5, 1.0, 2.0),) * len(config.anchor_sizes)
            ),
        )
    else:
        body = torchvision.models.resnet50(weights=None, norm_layer=norm)
        backbone = _resnet_fpn_extractor(body, trainable)
    pre, post = config.rpn_pre_nms_top_n, config.rpn_post_nms_top_n
    kwargs.update(  # the builders' values (`FasterRCNNConfig`'s properties)
        rpn_pre_nms_top_n_train=pre["train"],
        rpn_pre_nms_top_n_test=pre["test"],
        rpn_post_nms_top_n_train=post["train"],
        rpn_post_nms_top_n_test=post["test"],
        rpn_score_thresh=config.rpn_score_thresh,
    )
    classes = num_classes or (COCO_CLASSES if pretrained else config.detector_classes)
    model = FasterRCNN(backbone, classes, **kwargs)
    if pretrained:
        overwrite_eps(model, config.frozen_bn_eps)  # as torchvision's builders do
    return model


def replace_box_predictor(model: FasterRCNN, num_classes: int) -> None:
    """A new, randomly initialised `num_classes`-way box predictor (classes + box deltas)."""
    in_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)
