"""Faster R-CNN trained in JAX on MNIST as a detection task, and read out as a classifier.

The JAX twin of `torch_reference.detection`: the same targets (each digit's ink box, labelled
digit + 1), the same epoch order (blank images skipped), the same summed losses
(`FasterRCNN.losses`), and the same readout (`jaxvision.core.detection.readout`: accuracy,
macro F1, mAP@0.5, top-box IoU, fallbacks). The step is `jaxvision.training.trainer.Trainer`'s:
one `jax.jit`, the data on the device as uint8, the batch gathered there. The RoI and anchor
samples are drawn from the run's key, folded with the global step, so a resumed run draws what
an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxvision.core import detection
from jaxvision.core.config import TrainConfig
from jaxvision.core.data import Dataset, epoch_permutation
from jaxvision.core.results import RunResult
from jaxvision.training import metrics, parallel
from jaxvision.training.state import TrainState
from jaxvision.training.trainer import Trainer, run


def as_rgb(x: jax.Array) -> jax.Array:
    """uint8 (B, H, W, C) -> float (B, H, W, 3) in [0, 1]; the detector's transform normalises."""
    x = x.astype(jnp.float32) / 255.0
    return jnp.broadcast_to(x, (*x.shape[:3], 3)) if x.shape[-1] == 1 else x


class DetectorTrainer(Trainer):
    """`Trainer` with detection batches: the labels it gathers are (digit, ink box) pairs, and
    evaluation is detection plus the shared readout."""

    def __init__(self, model: nnx.Module, config: TrainConfig, data: Dataset, mesh=None):
        boxes, ink, self.test_boxes, self.test_ink = detection.split_boxes(
            data.x_train, data.x_test, config.box_margin
        )
        self.train_index = np.flatnonzero(ink)  # blank images have no box: skipped
        self.skipped_train = int(data.n_train - len(self.train_index))
        super().__init__(model, config, data, mesh)
        if self.skipped_train:  # a note, not progress: --no-progress keeps it
            print(f"skipped {self.skipped_train} blank training images (no ink, so no box)")
        pad = self.n_eval_batches * self.eval_batch - data.n_test
        self.y_train = (self.y_train, parallel.replicate(boxes, self.mesh))  # (N,), (N, 4)
        self.y_test = (
            self.y_test,
            parallel.replicate(np.pad(self.test_boxes, ((0, pad), (0, 0))), self.mesh),
            parallel.replicate(np.pad(self.test_ink, (0, pad)), self.mesh),  # padding: False
        )

    def train_size(self) -> int:
        return len(self.train_index)

    def epoch_order(self, epoch: int) -> np.ndarray:
        return self.train_index[epoch_permutation(len(self.train_index), self.config.seed, epoch)]

    def _step(self, state: TrainState, x_all, y_all, perm, step, global_step):
        b = self.config.batch_size
        idx = parallel.shard_batch(jax.lax.dynamic_slice_in_dim(perm, step * b, b))  # (B,)
        labels, boxes = (parallel.take_batch(a, idx) for a in y_all)  # (B,), (B, 4)
        x = as_rgb(parallel.take_batch(x_all, idx))
        key = jax.random.fold_in(state.key, global_step)

        def loss_fn(p):
            # copy=True: its batch statistics are mutated under jax.grad (flax#5050)
            model = nnx.merge(self.train_graphdef, p, state.frozen, state.rest, copy=True)
            losses = model.losses(x, boxes[:, None], labels[:, None] + 1,
                                  jnp.ones((b, 1), bool), key)  # fmt: skip
            return sum(losses.values()), nnx.state(model, nnx.Not(nnx.Param))

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return dataclasses.replace(state, params=params, rest=rest, opt_state=opt_state), loss

    def _eval(self, state: TrainState, x_pad, y_pad):
        """Detections and class scores of every test image, and each batch's loss (eval-mode
        BatchNorm, samples from a fixed key, on the detection's backbone features, the box head
        on the sampled RoIs only) over its inked images, weighted by their count."""
        model = nnx.merge(self.eval_graphdef, state.params, state.frozen, state.rest)
        labels_all, boxes_all, ink_all = y_pad
        e = self.eval_batch

        def one_batch(i):
            x = as_rgb(parallel.shard_batch(jax.lax.dynamic_slice_in_dim(x_pad, i * e, e)))
            labels, boxes, ink = (
                parallel.shard_batch(jax.lax.dynamic_slice_in_dim(a, i * e, e))
                for a in (labels_all, boxes_all, ink_all)
            )
            det, out = model.detect(x)
            features = [out[f"features.{name}"] for name in model.level_names()]
            losses = model.losses(
                x, boxes[:, None], labels[:, None] + 1, ink[:, None], jax.random.key(0),
                image_valid=ink, features=features, packed=True,
            )  # fmt: skip
            det = {k: parallel.gather(det[k]) for k in ("boxes", "scores", "labels", "valid",
                                                         "class_scores")}  # fmt: skip
            return det, sum(losses.values()) * ink.sum()

        det, losses = jax.lax.map(one_batch, jnp.arange(self.n_eval_batches))
        n = self.data.n_test
        det = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[:n], det)  # (N, ...)
        return det, losses.sum()

    def evaluate(self) -> dict:
        with jax.set_mesh(self.mesh):
            det, loss = jax.device_get(self._evaluate(self.state, self.x_test, self.y_test))
        detections = [
            {k: det[k][i][det["valid"][i]] for k in ("boxes", "scores", "labels")}
            for i in range(self.data.n_test)
        ]
        preds, extras = detection.readout(detections, det["class_scores"], self.data.y_test,
                                          self.test_boxes, self.test_ink,
                                          self.config.score_threshold)  # fmt: skip
        labels, k = jnp.asarray(self.data.y_test), self.data.num_classes
        return {
            "loss": float(loss) / max(int(self.test_ink.sum()), 1),
            "accuracy": float(metrics.accuracy(labels, jnp.asarray(preds))),
            "f1_macro": float(metrics.f1_macro(labels, jnp.asarray(preds), k)),
            "preds": preds,
            "extras": extras,
        }


def train_and_evaluate(config: TrainConfig, data: Dataset, model: nnx.Module) -> RunResult:
    """Trains the Flax `FasterRCNN` and evaluates it as a classifier and a detector."""
    trainer = DetectorTrainer(model, config, data)
    result = run(trainer, model)
    result.extras = detection.run_extras(
        config, model.config, result.final.extras, data.n_test, trainer.skipped_train,
        int(data.n_test - trainer.test_ink.sum()),
    )  # fmt: skip
    return result
