"""The training recipe is the same function in both frameworks: augmentation, schedule, AdamW
(with its decay mask), clipping and label smoothing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from jaxvision.core.archs import get_config
from jaxvision.core.config import TrainConfig, lr_factor
from jaxvision.core.data import make_dataset
from jaxvision.core.model_configs import VIT_PRESETS
from jaxvision.interop import convert
from jaxvision.models.vit import ViT
from jaxvision.training import augment as jaug
from jaxvision.training.trainer import Trainer, cross_entropy, learning_rate, make_optimizer
from torch_reference import augment as taug
from torch_reference.detection import make_optimizer as detector_optimizer
from torch_reference.models import build_model as torch_build
from torch_reference.models.vit import ViT as TorchViT
from torch_reference.train import Trainer as TorchTrainer
from torch_reference.train import make_optimizer as torch_optimizer
from torch_reference.train import make_scheduler


def test_augmentation_is_the_same_warp_in_both_frameworks(sample):
    x = sample.x_test[:64].astype(np.float32) / 255.0  # (64, 28, 28, 1) real digits in [0, 1]
    params = [np.array(p) for p in jaug.sample_params(jax.random.key(0), 64)]  # writable copies
    j = np.asarray(jaug.warp_affine(jnp.asarray(x), jaug.affine_theta(*map(jnp.asarray, params))))
    t = taug.warp_affine(
        torch.from_numpy(x).permute(0, 3, 1, 2), taug.affine_theta(*map(torch.from_numpy, params))
    )
    np.testing.assert_allclose(j, t.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)
    assert np.abs(j - x).mean() > 0.05  # the images really moved


def test_identity_parameters_leave_the_image_alone(sample):
    x = jnp.asarray(sample.x_test[:4].astype(np.float32) / 255.0)
    zeros, ones = jnp.zeros(4), jnp.ones(4)
    np.testing.assert_allclose(
        jaug.warp_affine(x, jaug.affine_theta(zeros, zeros, zeros, ones)), x, atol=1e-5
    )


def test_augmentation_parameters_stay_in_range_and_differ_per_image():
    angle, tx, ty, scale = (np.asarray(p) for p in jaug.sample_params(jax.random.key(1), 4096))
    assert np.abs(angle).max() <= np.radians(15) and np.abs(angle).max() > np.radians(14)
    assert np.abs(tx).max() <= 0.1 and np.abs(ty).max() <= 0.1
    assert 0.9 <= scale.min() and scale.max() <= 1.1
    per_image = np.asarray(jaug.sample_params(jax.random.key(2), 64)[0])
    assert len(np.unique(per_image)) == 64  # one draw per image, not one per batch
    g = torch.Generator().manual_seed(0)
    t_angle, t_tx, _, t_scale = (p.numpy() for p in taug.sample_params(4096, g, "cpu"))
    assert np.abs(t_angle).max() <= np.radians(15) and 0.9 <= t_scale.min() <= t_scale.max() <= 1.1


@pytest.mark.parametrize("warmup_epochs", [0.0, 2.5, 10.0])  # 10: warmup to the end, no decay
def test_cosine_schedule_is_the_same_in_both_frameworks(warmup_epochs):
    config = TrainConfig(
        arch="vit",
        optimizer="adamw",
        schedule="cosine",
        epochs=10,
        lr=3e-3,
        warmup_epochs=warmup_epochs,
    )
    steps_per_epoch = 7
    total, warmup = 70, config.warmup_steps(steps_per_epoch)
    optax_lr = learning_rate(config, steps_per_epoch)
    ours = [config.lr * lr_factor(s, warmup, total) for s in range(total + 1)]
    np.testing.assert_allclose([float(optax_lr(s)) for s in range(total + 1)], ours, atol=1e-9)
    # And torch's LambdaLR walks the same values.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    sched = make_scheduler(config, opt, steps_per_epoch)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(seen, ours[:total], atol=1e-12)
    assert ours[0] == (0.0 if warmup else config.lr)
    assert ours[total] == pytest.approx(0.0 if warmup < total else config.lr)


def test_label_smoothing_matches_torch():
    logits = np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32)
    labels = np.arange(16) % 10
    for s in (0.0, 0.1):
        j = float(cross_entropy(jnp.asarray(logits), jnp.asarray(labels), s))
        t = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), label_smoothing=s)
        assert j == pytest.approx(t.item(), abs=1e-6)


def _pair(c, seed=0):
    """A torch ViT and a Flax ViT holding the same weights, both in train mode."""
    torch.manual_seed(seed)
    tmodel = TorchViT(c).train()
    fmodel = nnx.view(ViT(c, rngs=nnx.Rngs(0)), deterministic=False)
    return tmodel, convert.load_torch_state_dict(fmodel, tmodel.state_dict())


def test_loss_gradients_match_with_label_smoothing(digits):
    c = VIT_PRESETS["micro"]  # no dropout, so the forward pass is deterministic
    x, y = digits[0][:16], digits[1][:16]
    tmodel, fmodel = _pair(c)
    graphdef, params = nnx.split(fmodel, nnx.Param)
    grads = jax.grad(
        lambda p: cross_entropy(nnx.merge(graphdef, p)(jnp.asarray(x)), jnp.asarray(y), 0.1)
    )(params)
    loss = F.cross_entropy(
        tmodel(torch.from_numpy(x).permute(0, 3, 1, 2)), torch.from_numpy(y), label_smoothing=0.1
    )
    loss.backward()
    nnx.update(fmodel, grads)
    flax_grads = convert.to_torch_state_dict(fmodel)  # the gradients, in torch's layout
    for name, p in tmodel.named_parameters():  # 1e-5 of each gradient's scale (the key bias's,
        scale = max(p.grad.abs().max().item(), 1e-3)  # zero in exact arithmetic, of 1e-3)
        np.testing.assert_allclose(
            flax_grads[name].numpy(), p.grad.numpy(), atol=1e-5 * scale, rtol=0, err_msg=name
        )
    assert max(p.grad.abs().max().item() for p in tmodel.parameters()) > 1e-2


def test_optimizer_steps_match_given_the_same_gradients():
    """AdamW + decay mask + warmup/cosine + clipping, fed identical gradients, move the weights
    identically. (Feeding each framework its own gradients instead would compare float noise:
    Adam's first steps are ~lr * sign(g), and a gradient that is zero in exact arithmetic, like
    the key bias's under softmax, gets a full step of arbitrary sign in each framework.)"""
    c = VIT_PRESETS["micro"]
    config = TrainConfig(
        arch="vit",
        optimizer="adamw",
        lr=3e-3,
        weight_decay=0.05,
        schedule="cosine",
        warmup_epochs=1.0,
        epochs=2,
        clip_norm=0.5,
    )
    steps_per_epoch = 3
    tmodel, fmodel = _pair(c)
    graphdef, params = nnx.split(fmodel, nnx.Param)
    tx = make_optimizer(config, steps_per_epoch)
    opt_state = tx.init(params)
    topt = torch_optimizer(config, tmodel)
    tsched = make_scheduler(config, topt, steps_per_epoch)
    grad_model = nnx.view(ViT(c, rngs=nnx.Rngs(1)), deterministic=False)
    rng = np.random.default_rng(0)
    for _ in range(2 * steps_per_epoch - 1):  # the last step has lr 0
        grads = {
            n: torch.from_numpy(rng.normal(scale=0.3, size=p.shape).astype(np.float32))
            for n, p in tmodel.named_parameters()
        }
        for n, p in tmodel.named_parameters():
            p.grad = grads[n].clone()
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), config.clip_norm)
        topt.step()
        tsched.step()
        convert.load_torch_state_dict(grad_model, grads)
        updates, opt_state = tx.update(nnx.state(grad_model, nnx.Param), opt_state, params)
        params = optax.apply_updates(params, updates)
    nnx.update(fmodel, params)
    after = convert.to_torch_state_dict(fmodel)
    for k, v in tmodel.state_dict().items():
        np.testing.assert_allclose(after[k].numpy(), v.numpy(), atol=1e-6, rtol=0, err_msg=k)
    # The weights moved by many steps' worth, so a wrong rule would show.
    assert all(
        np.abs(after[k].numpy() - v.numpy()).max() > 1e-3
        for k, v in _pair(c)[0].state_dict().items()
    )


def test_weight_decay_mask_is_the_same_set_of_weights():
    c = VIT_PRESETS["micro"]
    fmodel = ViT(c, rngs=nnx.Rngs(0))
    from jaxvision.training.trainer import decay_mask

    mask = dict(nnx.to_flat_state(decay_mask(nnx.state(fmodel, nnx.Param))))
    decayed_flax = {r.torch_key for r in convert.vit_rules(c) if mask[r.flax_path].get_value()}
    tmodel = TorchViT(c)
    config = TrainConfig(arch="vit", optimizer="adamw", weight_decay=0.05)
    groups = torch_optimizer(config, tmodel).param_groups
    ids = {id(p) for p in groups[0]["params"]}
    decayed_torch = {n for n, p in tmodel.named_parameters() if id(p) in ids}
    assert decayed_flax == decayed_torch
    assert "blocks.0.attn.q.weight" in decayed_torch and "cls_token" not in decayed_torch
    assert "norm.weight" not in decayed_torch and "head.bias" not in decayed_torch


@pytest.mark.parametrize("arch", ["alexnet", "faster_rcnn"])
def test_torch_adamw_decays_the_weights_only_at_the_flags_rate_in_every_lr_group(arch):
    """Fine-tuning with --unfreeze and the detector build torch's AdamW themselves: each lr
    group is split as the JAX side's `decay_mask` splits it (weights of rank 2 and up decayed at
    --weight-decay, biases and norms not), not left at torch's default decay of 0.01 on all."""
    config = TrainConfig(arch=arch, optimizer="adamw", weight_decay=0.05, unfreeze=True,
                         feature_lr=1e-4, lr=1e-3)  # fmt: skip
    model = torch_build(get_config(arch))
    build = detector_optimizer if arch == "faster_rcnn" else torch_optimizer
    groups = build(config, model).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            decayed = names[id(p)].endswith("weight") and p.ndim >= 2
            assert g["weight_decay"] == (0.05 if decayed else 0.0), names[id(p)]
            seen.add(id(p))
    assert seen == {id(p) for p in model.parameters() if p.requires_grad}
    assert sorted({g["lr"] for g in groups}) == [1e-4, 1e-3]


def test_both_trainers_take_the_same_steps_with_clipping_and_the_schedule(sample):
    """The trainers' own loops, not just their optimisers: from the same micro ViT (no dropout,
    no kink: every function smooth), two epochs of SGD with momentum, label smoothing, warmup +
    cosine and clipping that acts at every step move every tensor by the same steps in both
    frameworks. A clip skipped, or the schedule stepped before the optimiser, moves them by more
    than 1e-2 of a step (checked below for the clip)."""
    data = make_dataset("mnist", "subset", sample.x_train[:64], sample.y_train[:64],
                        sample.x_test[:16], sample.y_test[:16], 10)  # fmt: skip
    config = TrainConfig(arch="vit", preset="micro", epochs=2, batch_size=16, optimizer="sgd",
                         lr=0.5, momentum=0.9, weight_decay=0.0, schedule="cosine",
                         warmup_epochs=1.0, clip_norm=0.05, label_smoothing=0.1, augment=False,
                         progress=False)  # fmt: skip
    c = VIT_PRESETS["micro"]
    tmodel, fmodel = _pair(c)
    before = {k: v.numpy().copy() for k, v in tmodel.state_dict().items()}
    jt, tt = Trainer(fmodel, config, data), TorchTrainer(tmodel, config, data)
    unclipped = TorchTrainer(_pair(c)[0], dataclasses.replace(config, clip_norm=0.0), data)
    for epoch in range(2):
        jt.train_epoch(epoch)
        tt.train_epoch(epoch)
        unclipped.train_epoch(epoch)
    after_jax = convert.to_torch_state_dict(jt.model())
    after_unclipped = unclipped.model.state_dict()
    steps = {k: (after_jax[k].numpy() - before[k], v.numpy() - before[k])
             for k, v in tmodel.state_dict().items()}  # fmt: skip
    largest = max(float(np.abs(s).max()) for _, s in steps.values())
    for k, (step_jax, step_torch) in steps.items():
        if k.endswith("attn.k.bias"):  # zero gradient in exact arithmetic: rounding noise at most
            assert max(np.abs(step_jax).max(), np.abs(step_torch).max()) <= 1e-6 * largest, k
            continue
        size = float(np.linalg.norm(step_torch))
        error = float(np.linalg.norm(step_jax - step_torch)) / size
        off = float(np.linalg.norm(after_unclipped[k].numpy() - before[k] - step_torch)) / size
        print(f"{k}: step {size:.2g}, JAX's differs by {error:.2g} of it; unclipped by {off:.2g}")
        assert error <= 1e-5, f"{k}: JAX's steps differ from torch's by {error:.2g} of them"
        assert off > 1e-2, f"{k}: the clip did not act"
