"""JAX training and evaluation: `train_and_evaluate(config, data, model) -> RunResult`.

How the step is built (Flax's performance guide, REFERENCE.md):
  * the model is split once into a graphdef and a `TrainState` pytree (trainable params, frozen
    params, other variables, optimiser state, RNG key), as Flax's `TrainState`; a pure step
    `(state, ...) -> (state, loss)` is `jax.jit`-compiled ahead of time and calls `nnx.merge`
    inside, so no Python object-graph walk happens per step;
  * the state is donated, so XLA updates it in place;
  * the whole dataset sits on the device as uint8; each epoch sends one permutation (the same one
    the torch backend uses, `jaxvision.core.data.epoch_permutation`), and the step gathers its
    batch on the device. No per-batch host copies;
  * train and eval modes are explicit views (`nnx.view(deterministic=...)`), never a default.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxvision.core.archs import arch_of
from jaxvision.core.config import EVAL_BATCH_SIZE, TrainConfig
from jaxvision.core.data import Dataset, epoch_permutation
from jaxvision.core.loop import LossTracker, Position, run_epochs
from jaxvision.core.results import RunResult
from jaxvision.training import metrics, parallel
from jaxvision.training.augment import random_affine
from jaxvision.training.checkpoint import JaxCheckpoints
from jaxvision.training.preprocess import model_input, standardize
from jaxvision.training.state import TrainState, with_mode

# Training steps dispatched ahead of the host at most, whatever --log-every is: with 150 or so
# queued, XLA:CPU's collectives on a host split into devices wait for each other until XLA
# aborts the process (jax 0.10.2, 2 devices, --log-every 1000). Every MAX_IN_FLIGHT / 2 steps
# the host waits (fetching nothing) for the step as many back, so half a queue stays in flight.
MAX_IN_FLIGHT = 32


def learning_rate(config: TrainConfig, steps_per_epoch: int) -> float | optax.Schedule:
    if config.schedule == "constant":
        return config.lr
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_steps(steps_per_epoch)
    if warmup == 0:
        return optax.cosine_decay_schedule(config.lr, total)
    if warmup >= total:  # --warmup-epochs == --epochs: all warmup, no decay (as `lr_factor`)
        return optax.linear_schedule(0.0, config.lr, warmup)
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, total, end_value=0.0)


def decay_mask(params: nnx.State) -> nnx.State:
    """Weight decay on kernels (Linear and conv weights) only: not biases, norms, tokens."""

    def is_kernel(path, _):  # path: DictKeys down to the Variable, then its GetAttrKey('value')
        return any(getattr(k, "key", None) == "kernel" for k in path)

    return jax.tree.map_with_path(is_kernel, params)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", k) for k in path)


def feature_labels(detector: bool):
    """params -> 'features' for the pretrained feature extractor's parameters (a classifier's
    all but `classifier`, a detector's backbone body), 'head' for the rest: `--unfreeze`
    trains the features at `--feature-lr`."""

    def label(path, _):
        keys = _keys(path)
        features = keys[:2] == ("backbone", "body") if detector else "classifier" not in keys
        return "features" if features else "head"

    return lambda params: jax.tree.map_with_path(label, params)


def trainable_filter(config: TrainConfig, model: nnx.Module | None = None):
    """What gets gradients: everything; or, fine-tuning with frozen features, the classifier;
    or, for a pretrained detector, all but the backbone layers torchvision freezes
    (`model.frozen_paths`)."""
    frozen = getattr(model, "frozen_paths", None)
    if frozen:
        return lambda path, x: isinstance(x, nnx.Param) and tuple(path) not in frozen
    if config.arch_spec.imagenet and not config.unfreeze:
        return nnx.All(nnx.Param, nnx.PathContains("classifier"))
    return nnx.Param


def _base_optimizer(config: TrainConfig, lr) -> optax.GradientTransformation:
    if config.optimizer == "adam":  # b1 0.9, b2 0.999, eps 1e-8: torch.optim.Adam's defaults
        return optax.adam(lr)
    if config.optimizer == "adamw":  # decoupled: p -= lr * wd * p, as torch.optim.AdamW
        return optax.adamw(lr, weight_decay=config.weight_decay, mask=decay_mask)
    return optax.sgd(lr, momentum=config.momentum or None)


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    lr = learning_rate(config, steps_per_epoch)
    opt = _base_optimizer(config, lr)
    spec = config.arch_spec
    if (spec.imagenet or spec.detector) and config.unfreeze:  # features at their own, lower lr
        feature_lr = learning_rate(
            dataclasses.replace(config, lr=config.feature_lr), steps_per_epoch
        )
        opt = optax.multi_transform(
            {"head": opt, "features": _base_optimizer(config, feature_lr)},
            feature_labels(spec.detector),
        )
    if config.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(config.clip_norm), opt)
    return opt


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Mean cross-entropy, with torch's label smoothing: (1 - s) one-hot + s / K."""
    if smoothing == 0.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def count_params(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def describe_device(n: int = 1) -> str:
    """'cpu', 'gpu:NVIDIA H100 80GB HBM3', with ' x8' for a mesh of 8 devices."""
    d = jax.devices()[0]
    name = "cpu" if d.platform == "cpu" else f"{d.platform}:{d.device_kind}"
    return name if n == 1 else f"{name} x{n}"


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(the model's initialisation key, the run's key for dropout and augmentation)."""
    init, run = jax.random.split(jax.random.key(seed))
    return init, run


class Trainer:
    """The compiled train and eval functions of one model, over device-resident data, on a
    ('data',) device mesh (`jaxvision.training.parallel`): the batch is sharded, the rest
    replicated. The trained variables live in `self.state`, a `TrainState`."""

    def __init__(self, model: nnx.Module, config: TrainConfig, data: Dataset, mesh=None):
        self.config = config
        self.data = data
        self.steps = config.steps_per_epoch(self.train_size())
        self.mesh = (
            mesh if mesh is not None else parallel.make_data_mesh(config.devices, config.batch_size)
        )
        parallel.check_divisible(config.batch_size, self.mesh)
        self.tx = make_optimizer(config, self.steps)
        # Frozen parameters are split off: no gradient is computed or stored for them.
        trainable = trainable_filter(config, model)
        self.train_graphdef, params, frozen, rest = nnx.split(
            with_mode(model, train=True), trainable, nnx.Param, ...
        )
        self.eval_graphdef = nnx.split(with_mode(model, train=False), trainable, nnx.Param, ...)[0]
        params, frozen, rest, key = parallel.replicate(
            (params, frozen, rest, run_keys(config.seed)[1]), self.mesh
        )
        with jax.set_mesh(self.mesh):
            # One program: eagerly, every parameter shape compiles its own zeros (the detector's
            # 77 took 2 s)
            opt_state = jax.jit(self.tx.init)(params)
        self.state = TrainState(params, frozen, rest, opt_state, key)

        # The data goes on every device once, as uint8; each step shards its batch's indices.
        self.x_train, self.y_train = parallel.replicate(
            (data.x_train, data.y_train.astype(np.int32)), self.mesh
        )  # (N, H, W, C) uint8, (N,)
        n_dev = self.mesh.size  # eval batches split over the devices; the padding is masked
        e = -(-min(config.eval_batch_size, data.n_test) // n_dev) * n_dev
        n_eval_batches = -(-data.n_test // e)
        pad = n_eval_batches * e - data.n_test
        self.eval_batch, self.n_eval_batches = e, n_eval_batches
        self.x_test, self.y_test = parallel.replicate(
            (
                np.pad(data.x_test, ((0, pad), (0, 0), (0, 0), (0, 0))),
                np.pad(data.y_test.astype(np.int32), (0, pad)),
            ),
            self.mesh,
        )
        model_cfg = model.config
        self.norm = functools.partial(model_input, arch=config.arch_spec, model_cfg=model_cfg,
                                      mean=data.mean, std=data.std)  # fmt: skip
        self.compute_dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32

        self._train_step = jax.jit(self._step, donate_argnums=0)
        self._evaluate = jax.jit(self._eval)
        # With `config.scan` (the ViT's recipe), `log_every` steps run per call, under lax.scan:
        # +24% on CPU, where the ViT's small matmuls leave per-step dispatch a large share
        # (docs/performance.md). The CNN's convolutions fall off XLA's fast path inside a loop
        # (-92%), so its recipe steps one by one. Losses reach the host every `log_every` steps
        # either way.
        self.scan = config.scan
        self._chunk_jit = jax.jit(self._chunk, donate_argnums=0)

    # --- pure functions, traced once -------------------------------------------------------------

    def _cast(self, params, frozen):
        """bf16 compute: cast the float32 parameters on the way in (gradients flow back)."""
        if self.compute_dtype == jnp.float32:
            return params, frozen
        cast = functools.partial(jax.tree.map, lambda a: a.astype(self.compute_dtype))
        return cast(params), cast(frozen)

    def _step(self, state: TrainState, x_all, y_all, perm, step, global_step):
        b = self.config.batch_size
        idx = parallel.shard_batch(jax.lax.dynamic_slice_in_dim(perm, step * b, b))  # (B,)
        x = parallel.take_batch(x_all, idx).astype(jnp.float32) / 255.0  # (B, H, W, C), [0, 1]
        y = parallel.take_batch(y_all, idx)  # (B,)
        dropout_key, augment_key = jax.random.split(jax.random.fold_in(state.key, global_step))
        if self.config.augment:
            x = random_affine(augment_key, x)
        x = self.norm(x)

        def loss_fn(p):
            model = nnx.merge(
                self.train_graphdef, *self._cast(p, state.frozen), state.rest, copy=True
            )  # batch statistics mutate under jax.grad (flax#5050)
            logits = model(x.astype(self.compute_dtype), rngs=dropout_key).astype(jnp.float32)
            loss = cross_entropy(logits, y, self.config.label_smoothing)
            return loss, nnx.state(model, nnx.Not(nnx.Param))

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return dataclasses.replace(state, params=params, rest=rest, opt_state=opt_state), loss

    def _chunk(self, state: TrainState, x_all, y_all, perm, step, global_step, n):
        """Steps `step` .. `step + n - 1` as one scan of `log_every` iterations (at most an
        epoch's: no chunk is longer), the ones past `n` skipped: one compiled function serves
        every chunk an epoch needs. Returns the state and the (iterations,) losses, of which the
        first `n` are real."""

        def body(state, i):
            def run(state):
                return self._step(state, x_all, y_all, perm, step + i, global_step + i)

            skip = lambda state: (state, jnp.zeros((), jnp.float32))  # noqa: E731
            return jax.lax.cond(i < n, run, skip, state)

        return jax.lax.scan(body, state, jnp.arange(min(self.config.log_every, self.steps)))

    def _eval(self, state: TrainState, x_pad, y_pad):
        model = nnx.merge(self.eval_graphdef, *self._cast(state.params, state.frozen), state.rest)
        e, n = self.eval_batch, self.data.n_test

        def one_batch(i):
            x = jax.lax.dynamic_slice_in_dim(x_pad, i * e, e)
            x = self.norm(parallel.shard_batch(x).astype(jnp.float32) / 255.0)  # (E, H, W, C)
            y = parallel.shard_batch(jax.lax.dynamic_slice_in_dim(y_pad, i * e, e))  # (E,)
            logits = model(x.astype(self.compute_dtype)).astype(jnp.float32)  # (E, K)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            confidence = jax.nn.softmax(logits, axis=-1).max(-1)  # the prediction's probability
            return tuple(parallel.gather(a) for a in (loss, logits.argmax(-1), confidence))

        out = jax.lax.map(one_batch, jnp.arange(self.n_eval_batches))  # (nb, E) each
        losses, preds, confidence = (a.reshape(-1)[:n] for a in out)  # (nb*E,) -> (N,)
        labels = y_pad[:n]
        k = self.data.num_classes
        return {
            "loss": losses.mean(),
            "accuracy": metrics.accuracy(labels, preds),
            "f1_macro": metrics.f1_macro(labels, preds, k),
            "preds": preds,
            "confidence": confidence,
        }

    # --- the host side ---------------------------------------------------------------------------

    def train_size(self) -> int:
        """How many training images an epoch draws from."""
        return self.data.n_train

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The training images' indices in `epoch`'s order (the torch backend's too)."""
        return epoch_permutation(self.data.n_train, self.config.seed, epoch)

    def _example_args(self) -> tuple:
        """A training step's arguments, for ahead-of-time compilation (the values don't matter)."""
        perm = parallel.replicate(np.zeros(self.train_size(), np.int32), self.mesh)
        return (self.state, self.x_train, self.y_train, perm, 0, 0)

    def compile(self) -> float:
        """Compiles the training chunk (scan) or step, and the evaluation, ahead of time; returns
        the seconds it took."""
        t0 = time.perf_counter()
        args = self._example_args()
        with jax.set_mesh(self.mesh):
            if self.scan:
                self._chunk_jit = self._chunk_jit.lower(*args, 0).compile()
            else:
                self._train_step = self._train_step.lower(*args).compile()
            self._evaluate = self._evaluate.lower(self.state, self.x_test, self.y_test).compile()
        return time.perf_counter() - t0

    def step_cost(self) -> dict:
        """XLA's cost analysis of one compiled training step (the benchmark's FLOP count)."""
        with jax.set_mesh(self.mesh):
            cost = jax.jit(self._step).lower(*self._example_args()).compile().cost_analysis()
        return cost[0] if isinstance(cost, list | tuple) else cost

    def train_epoch(self, epoch: int, bar=None, start: Position | None = None):
        """One epoch, or its rest from `start`; returns (mean training loss, seconds)."""
        cfg, steps = self.config, self.steps
        start = start or Position(epoch)
        perm = parallel.replicate(self.epoch_order(epoch).astype(np.int32), self.mesh)
        jax.block_until_ready(perm)
        tracker = LossTracker(cfg, epoch, steps, jax.device_get, bar, start)
        step, waypoint = start.step, None
        with jax.set_mesh(self.mesh):
            while step < steps:
                # a chunk ends where the per-step loop would fetch losses: every log_every steps
                n = min(cfg.log_every - step % cfg.log_every, steps - step) if self.scan else 1
                args = (self.state, self.x_train, self.y_train, perm, step, epoch * steps + step)
                if self.scan:
                    self.state, loss = self._chunk_jit(*args, n)
                else:
                    self.state, loss = self._train_step(*args)
                    if (step + 1 - start.step) % (MAX_IN_FLIGHT // 2) == 0:
                        if waypoint is not None:  # half the queue back: the device stays fed
                            waypoint.block_until_ready()  # waits; fetches nothing
                        waypoint = loss
                tracker.add(loss, n)
                step += n
        jax.block_until_ready(self.state)
        self.step_losses = tracker.values
        return tracker.mean, tracker.elapsed()

    def evaluate(self) -> dict:
        with jax.set_mesh(self.mesh):
            out = self._evaluate(self.state, self.x_test, self.y_test)
        return jax.device_get(out)

    def model(self, *, train: bool = False) -> nnx.Module:
        graphdef = self.train_graphdef if train else self.eval_graphdef
        return nnx.merge(graphdef, self.state.params, self.state.frozen, self.state.rest)


def predictor(model: nnx.Module, mean, std, batch_size: int = EVAL_BATCH_SIZE):
    """f((N, H, W, C) uint8 images) -> their eval-mode class log-probabilities (N, K), log-softmax
    of the logits (exact where a probability underflows float32), normalised as the model was
    trained (`mean`, `std`: the training set's statistics). One compilation: for
    the N images when N <= `batch_size`, else for `batch_size` (the last batch padded). The
    weights are put on this process's first device once. f's `on_batch(n)`, if given, is called
    with each batch's count of images once it is done (a progress bar's update)."""
    graphdef, state = nnx.split(with_mode(model, train=False))
    # A mesh-replicated state, fetched and put on one local device, needs no other process.
    state = jax.device_put(jax.device_get(state), jax.local_devices()[0])
    arch = arch_of(model.config)

    @jax.jit
    def forward(state, x):  # (B, H, W, C) uint8 -> (B, K)
        x = model_input(x.astype(jnp.float32) / 255.0, arch, model.config, mean, std)
        return jax.nn.log_softmax(nnx.merge(graphdef, state)(x), axis=-1)

    def log_probabilities(images: np.ndarray, on_batch=None) -> np.ndarray:
        on_batch = on_batch or (lambda n: None)
        if len(images) <= batch_size:
            out = np.asarray(forward(state, images))
            on_batch(len(images))
            return out
        out = []
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            n = len(batch)  # the last batch, padded to the others' shape: no second compilation
            batch = np.concatenate(
                [batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)]
            )
            out.append(np.asarray(forward(state, batch))[:n])
            on_batch(n)
        return np.concatenate(out)

    return log_probabilities


def attention_weights(model: nnx.Module, images: np.ndarray, data: Dataset):
    """Eval-mode attention weights, per layer (B, heads, T, T), and predictions, as numpy."""
    x = standardize(jnp.asarray(images, jnp.float32) / 255.0, data.mean, data.std)
    logits, out = model.forward_intermediates(x)
    attns = [np.asarray(out[f"attn{i}"]) for i in range(model.config.depth)]
    return attns, np.asarray(logits.argmax(-1))


def train_and_evaluate(config: TrainConfig, data: Dataset, model: nnx.Module) -> RunResult:
    """Trains `model` (built for `config.model_config(data)`) and evaluates it after every epoch."""
    return run(Trainer(model, config, data), model)


def run(trainer: Trainer, model: nnx.Module) -> RunResult:
    """Compiles `trainer`'s step, runs its epochs (checkpointing where configured), and returns
    the run's result."""
    config, data = trainer.config, trainer.data
    checkpoints = None
    if config.checkpoint_dir:
        checkpoints = JaxCheckpoints(config, data, model.config, trainer)
    compile_s = trainer.compile()
    history, last = run_epochs(
        config, trainer.steps, trainer.train_epoch, trainer.evaluate, checkpoints,
        sync_point=parallel.preemption_sync_point(),
    )  # fmt: skip
    return RunResult(
        history,
        count_params(model),
        describe_device(trainer.mesh.size),
        compile_s,
        last["preds"],
        trainer.model(train=False),
        confidence=last.get("confidence"),
    )
