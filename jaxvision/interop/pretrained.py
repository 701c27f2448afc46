"""torchvision's pretrained weights in Flax: found and read by `torch_reference.pretrained`,
converted (`jaxvision.interop.convert`) and cached as `.npz` beside them, keyed by the source
file's name and size, so that the conversion runs once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flax import nnx

from jaxvision.core.errors import UserError
from jaxvision.interop import convert
from jaxvision.models.detector import FasterRCNN, FastRCNNPredictor
from torch_reference.models.detector import COCO_CLASSES, build_detector
from torch_reference.pretrained import find_weights, load_state_dict, weights_name

__all__ = ["find_weights", "load_into_flax", "weights_name"]


def cache_path(source: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    root = Path(cache_dir or os.environ.get("JAXVISION_CACHE", "~/.cache/jaxvision")).expanduser()
    return root / f"{source.stem}-{source.stat().st_size}-flax.npz"


def load_into_flax(model, arch: str, weights=None, cache_dir=None, verbose: bool = True) -> Path:
    """Writes torchvision's pretrained weights into the Flax `model` (1000 classes, or COCO's
    91), in place: every variable, so `model` may be abstract (`nnx.eval_shape`). `arch`: the
    weights' name (`weights_name`)."""
    source = find_weights(arch, weights)
    cached = cache_path(source, cache_dir)
    params = convert.flax_variables(model)  # with batch norm's statistics and buffers
    if cached.is_file():
        with np.load(cached) as npz:
            arrays = {
                tuple(int(p) if p.isdigit() else p for p in k.split("/")): npz[k] for k in npz
            }
        if set(arrays) != set(params) or any(
            arrays[p].shape != tuple(params[p].shape) for p in params
        ):
            raise UserError(f"{cached}: converted cache does not match the model; delete it")
        convert.check_all_set(model, arrays, f"the converted cache {cached}")
        for path, value in arrays.items():
            params[path].set_value(value)
        origin = f"{source} (converted cache {cached})"
    else:
        convert.load_torch_state_dict(model, load_state_dict(source))
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npz")
        np.savez(tmp, **{"/".join(map(str, p)): np.asarray(v[...]) for p, v in params.items()})
        tmp.replace(cached)  # never leave a half-written cache behind
        origin = f"{source} (converted, cached at {cached})"
    if verbose:
        print(f"pretrained {arch} weights: {origin}")
    return source


def coco_detector(model_cfg, weights, key, verbose: bool = True):
    """The Flax Faster R-CNN with torchvision's COCO weights, as the torch side builds it
    (`torch_reference.detection.create_detector`): FrozenBatchNorm2d, the 91-way predictor
    replaced by a new `detector_classes`-way one, and the same backbone layers frozen
    (`trainable_backbone_layers`), read off torchvision's own builder. The frozen variables'
    paths are kept as `model.frozen_paths` for the trainer."""
    # Built abstractly: the COCO weights fill every variable, so no initialiser need run.
    model = nnx.eval_shape(
        lambda: FasterRCNN(model_cfg, frozen=True, num_classes=COCO_CLASSES, rngs=nnx.Rngs(0))
    )
    load_into_flax(model, weights_name("faster_rcnn", model_cfg.detector), weights,
                   verbose=verbose)  # fmt: skip
    hidden = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(hidden, model_cfg.detector_classes,
                                                      nnx.Rngs(params=key))  # fmt: skip
    torch_model = build_detector(model_cfg, pretrained=True)
    frozen = {n for n, p in torch_model.named_parameters() if not p.requires_grad}
    model.frozen_paths = frozenset(
        r.flax_path for r in convert.rules_for(model) if r.torch_key in frozen
    )
    return model
