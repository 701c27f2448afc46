"""Weight conversion between PyTorch state_dicts and Flax NNX models, in both directions.

Each model has one explicit key table (`cnn_rules`, ...): a list of `Rule`s mapping a torch key
onto a Flax parameter path with a layout transform. Conversion is exhaustive: every torch key is
consumed, every Flax parameter is written, every shape is checked, and anything left over on
either side is an error that names it.

Layouts (REFERENCE.md): torch conv kernels are (O, I, kh, kw) and Flax's (kh, kw, I, O); torch
Linear weights are (out, in) and Flax kernels (in, out). The first Linear after a flatten also
differs in row order: torch flattens (C, H, W), Flax (H, W, C).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from jaxvision.core.archs import arch_of
from jaxvision.core.errors import ConversionError, UserError
from jaxvision.core.model_configs import (
    AlexNetConfig,
    CNNConfig,
    FasterRCNNConfig,
    VGGConfig,
    ViTConfig,
)
from jaxvision.models.backbones import Buffer
from jaxvision.models.detector import ROI_SIZE, FasterRCNN

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    """torch key <-> Flax path, with the layout transform between them.

    kind: 'copy' (biases, norms, embeddings), 'linear' (transpose), 'conv' (OIHW <-> HWIO), or
    'linear_chw' (a Linear fed by a flatten of a (C, H, W) map; `chw` gives its shape).
    """

    torch_key: str
    flax_path: Path
    kind: str = "copy"
    chw: tuple[int, int, int] | None = None

    def to_flax(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "copy":
            return w
        if self.kind == "linear":
            return w.T  # (out, in) -> (in, out)
        if self.kind == "conv":
            return w.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
        if self.kind == "linear_chw":
            c, h, wd = self.chw
            w = w.reshape(-1, c, h, wd)  # (out, C*H*W) -> (out, C, H, W)
            return w.transpose(2, 3, 1, 0).reshape(h * wd * c, -1)  # -> (H*W*C, out)
        raise ValueError(f"unknown rule kind {self.kind!r}")

    def to_torch(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "copy":
            return w
        if self.kind == "linear":
            return w.T  # (in, out) -> (out, in)
        if self.kind == "conv":
            return w.transpose(3, 2, 0, 1)  # (kh, kw, I, O) -> (O, I, kh, kw)
        if self.kind == "linear_chw":
            c, h, wd = self.chw
            w = w.reshape(h, wd, c, -1)  # (H*W*C, out) -> (H, W, C, out)
            return w.transpose(3, 2, 0, 1).reshape(-1, c * h * wd)  # -> (out, C*H*W)
        raise ValueError(f"unknown rule kind {self.kind!r}")


def _linear(torch_name: str, flax_name: str | Path | None = None) -> list[Rule]:
    path = _as_path(flax_name or torch_name)
    return [
        Rule(f"{torch_name}.weight", path + ("kernel",), "linear"),
        Rule(f"{torch_name}.bias", path + ("bias",)),
    ]


def _conv(torch_name: str, flax_name: str | Path | None = None) -> list[Rule]:
    path = _as_path(flax_name or torch_name)
    return [
        Rule(f"{torch_name}.weight", path + ("kernel",), "conv"),
        Rule(f"{torch_name}.bias", path + ("bias",)),
    ]


def _as_path(name: str | Path) -> Path:
    if isinstance(name, tuple):
        return name
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def cnn_rules(config: CNNConfig) -> list[Rule]:
    s = config.pooled_size
    return [
        *_conv("conv1"),
        *_conv("conv2"),
        Rule("fc1.weight", ("fc1", "kernel"), "linear_chw", (config.conv2_features, s, s)),
        Rule("fc1.bias", ("fc1", "bias")),
        *_linear("fc2"),
    ]


def _layer_norm(name: str) -> list[Rule]:
    path = _as_path(name)
    return [Rule(f"{name}.weight", path + ("scale",)), Rule(f"{name}.bias", path + ("bias",))]


def vit_rules(config: ViTConfig) -> list[Rule]:
    rules = [*_linear("patch_embed")]
    if config.pool == "cls":
        rules.append(Rule("cls_token", ("cls_token",)))
    if config.pos_encoding == "learned":
        rules.append(Rule("pos_embed", ("pos_embed",)))
    for i in range(config.depth):
        b = f"blocks.{i}"
        rules += _layer_norm(f"{b}.norm1")
        for proj in ("q", "k", "v", "proj"):
            rules += _linear(f"{b}.attn.{proj}")
        rules += _layer_norm(f"{b}.norm2")
        rules += _linear(f"{b}.mlp.fc1") + _linear(f"{b}.mlp.fc2")
    return rules + _layer_norm("norm") + _linear("head")


def vgg_rules(config: VGGConfig) -> list[Rule]:
    rules, idx, width = [], 0, config.in_channels
    for v in config.layers:  # torchvision's features: conv, ReLU per number; one pool per 'M'
        if v == "M":
            idx += 1
        else:
            rules += _conv(f"features.{idx}")
            idx, width = idx + 2, v
    s = config.pool_size
    return rules + [
        Rule("classifier.0.weight", ("classifier", 0, "kernel"), "linear_chw", (width, s, s)),
        Rule("classifier.0.bias", ("classifier", 0, "bias")),
        *_linear("classifier.3"),
        *_linear("classifier.6"),
    ]


def alexnet_rules(config: AlexNetConfig) -> list[Rule]:
    s = config.pool_size
    return [
        *[r for i in (0, 3, 6, 8, 10) for r in _conv(f"features.{i}")],
        Rule("classifier.1.weight", ("classifier", 1, "kernel"), "linear_chw", (256, s, s)),
        Rule("classifier.1.bias", ("classifier", 1, "bias")),
        *_linear("classifier.4"),
        *_linear("classifier.6"),
    ]


# Flax leaf name -> torch's, where they differ (batch norm keeps torch's own buffer names).
_TORCH_LEAF = {"kernel": "weight"}


def faster_rcnn_rules(config: FasterRCNNConfig, *, frozen: bool = False) -> list[Rule]:
    """The detector's table, read off its Flax structure: the module names are torchvision's
    (`jaxvision.models.detector`), so each path is its torch key. `frozen`: FrozenBatchNorm2d's
    four buffers per norm, where BatchNorm2d also has `num_batches_tracked`."""
    model = nnx.eval_shape(lambda: FasterRCNN(config, frozen=frozen, rngs=nnx.Rngs(0)))
    rules = []
    for path, var in flax_variables(model).items():
        *module, leaf = path
        key = ".".join(map(str, [*module, _TORCH_LEAF.get(leaf, leaf)]))
        if module == ["roi_heads", "box_head", "fc6"] and leaf == "kernel":
            rules.append(Rule(key, path, "linear_chw", (256, ROI_SIZE, ROI_SIZE)))
        elif leaf == "kernel":
            rules.append(Rule(key, path, "conv" if len(var.shape) == 4 else "linear"))
        else:
            rules.append(Rule(key, path))
    return rules


def rules_for(model: nnx.Module) -> list[Rule]:
    """The conversion table the arch registry names for `model`'s config."""
    config = getattr(model, "config", None)
    if isinstance(model, FasterRCNN):  # its table depends on its batch norm, not only its config
        return faster_rcnn_rules(config, frozen=model.frozen)
    try:
        return arch_of(config).load("conversion")(config)
    except (TypeError, UserError):
        raise ConversionError(f"no conversion table for {type(model).__name__}") from None


def _to_numpy(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    return np.asarray(t)


def flax_variables(model: nnx.Module) -> dict[Path, nnx.Variable]:
    """Every variable a torch state_dict holds: parameters, batch-norm statistics, buffers."""
    return dict(nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat, Buffer))))


def check_all_set(model: nnx.Module, filled, source: str) -> None:
    """Raises a ConversionError if a variable of `model` that `filled` (paths) does not name is
    abstract (`nnx.eval_shape`): `source` would leave it unset."""
    unset = [".".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(model))
             if p not in filled and isinstance(v.get_value(), jax.ShapeDtypeStruct)]  # fmt: skip
    if unset:
        raise ConversionError(
            f"{source} leaves {len(unset)} variable(s) of the abstract {type(model).__name__} "
            f"unset: {unset[:5]}; the conversion table must cover them"
        )


def load_torch_state_dict(
    model: nnx.Module, state_dict: Mapping[str, Any], rules: Sequence[Rule] | None = None
) -> nnx.Module:
    """Writes a torch state_dict into the Flax `model`, in place, and returns the model. `model`
    may be abstract (`nnx.eval_shape`) when the state_dict sets every variable."""
    rules = rules_for(model) if rules is None else rules
    params = flax_variables(model)
    _check_coverage(rules, params)
    missing = [r.torch_key for r in rules if r.torch_key not in state_dict]
    if missing:
        raise ConversionError(
            f"state_dict lacks {len(missing)} key(s) the {type(model).__name__} needs: {missing}; "
            f"is it from another architecture or preset?"
        )
    used = {r.torch_key for r in rules}
    leftover = [k for k in state_dict if k not in used]
    if leftover:
        raise ConversionError(
            f"state_dict has {len(leftover)} key(s) the {type(model).__name__} does not use: "
            f"{leftover}; is it from another architecture or preset?"
        )
    new_values = {}
    for rule in rules:
        src = _to_numpy(state_dict[rule.torch_key])
        var = params[rule.flax_path]
        try:
            value = rule.to_flax(src)
        except ValueError as e:  # a reshape that cannot work: the shapes disagree
            raise ConversionError(
                f"{rule.torch_key}: torch shape {src.shape} does not fit Flax "
                f"{'.'.join(map(str, rule.flax_path))} {var.shape} ({e})"
            ) from None
        if value.shape != var.shape:
            raise ConversionError(
                f"{rule.torch_key}: torch shape {src.shape} becomes {value.shape}, but Flax "
                f"{'.'.join(map(str, rule.flax_path))} is {var.shape}"
            )
        new_values[rule.flax_path] = jnp.asarray(value, dtype=var.dtype)
    check_all_set(model, new_values, "the state_dict")
    for path, value in new_values.items():  # write only once everything has been checked
        params[path].set_value(value)
    return model


def to_torch_state_dict(model: nnx.Module, rules: Sequence[Rule] | None = None) -> dict:
    """The torch state_dict (an ordered dict of CPU tensors) of the Flax `model`."""
    rules = rules_for(model) if rules is None else rules
    params = flax_variables(model)
    _check_coverage(rules, params)
    out = {}
    for rule in rules:
        w = np.asarray(params[rule.flax_path][...])
        out[rule.torch_key] = torch.from_numpy(np.array(rule.to_torch(w), copy=True, order="C"))
    return out


def _check_coverage(rules: Sequence[Rule], params: Mapping[Path, Any]) -> None:
    ruled = {r.flax_path for r in rules}
    unknown = [".".join(map(str, p)) for p in ruled if p not in params]
    uncovered = [".".join(map(str, p)) for p in params if p not in ruled]
    if unknown or uncovered:
        raise ConversionError(
            f"conversion table and Flax model disagree: table paths not in the model {unknown}, "
            f"model parameters not in the table {uncovered}"
        )
