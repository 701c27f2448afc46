"""VGG16 and AlexNet: torchvision's layout in Flax, conversion, the input pipeline, frozen
fine-tuning, pretrained-weight handling. Offline: torchvision models are random-initialised.

Tolerance: logits and `features` within 1e-4 max abs difference (float32, highest precision).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from jaxvision.apps.jax_backend import JaxBackend
from jaxvision.core.config import TrainConfig
from jaxvision.core.errors import UserError
from jaxvision.core.model_configs import AlexNetConfig, VGGConfig
from jaxvision.interop import convert, pretrained
from jaxvision.models import build_model, layers
from jaxvision.models.layers import adaptive_pool_matrix
from jaxvision.training.preprocess import imagenet_input
from jaxvision.training.trainer import Trainer
from torch_reference import pretrained as torch_pretrained
from torch_reference.models import build_model as torch_build
from torch_reference.preprocess import imagenet_input as torch_imagenet_input
from torch_reference.train import Trainer as TorchTrainer

# Of each output's largest value: 168 float32 steps. Measured: up to 3e-6 (VGG16 at 224 px,
# whose 13 convolutions sum up to 4,608 products each).
REL = 2e-5
TORCHVISION_PARAMS = {"vgg16": 138_357_544, "alexnet": 61_100_840}  # at 1000 classes
CONFIGS = {"vgg16": VGGConfig, "alexnet": AlexNetConfig}


def random_biases(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """torchvision starts VGG16's biases at zero, which would leave their conversion untested."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data.normal_(0.0, 0.1, generator=g)
    return model


def pair(arch: str, size: int, classes: int = 1000, seed: int = 0):
    """torchvision's model from scratch, biases randomised, in eval mode; its conversion."""
    c = CONFIGS[arch](num_classes=classes, image_size=size)
    torch.manual_seed(seed)
    tmodel = random_biases(torch_build(c), seed + 1).eval()
    shell = nnx.eval_shape(lambda: build_model(c, rngs=nnx.Rngs(seed)))  # filled whole below
    fmodel = convert.load_torch_state_dict(shell, tmodel.state_dict())
    return tmodel, nnx.view(fmodel, deterministic=True)


@pytest.mark.parametrize("arch", ["vgg16", "alexnet"])
def test_parameter_counts_equal_torchvisions(arch):
    """Counted on the structures alone (no initialisation): Flax's abstract model, torch's on
    the meta device."""
    c = CONFIGS[arch](num_classes=1000)
    shell = nnx.eval_shape(lambda: build_model(c, rngs=nnx.Rngs(0)))
    n_flax = sum(x.size for x in jax.tree.leaves(nnx.state(shell)))
    with torch.device("meta"):
        n_torch = sum(p.numel() for p in torch_build(c).parameters())
    assert n_flax == n_torch == TORCHVISION_PARAMS[arch]


# VGG16 at 32 px: its last block's convolutions see a 2x2 map, where `layers.Conv` is a matmul.
@pytest.mark.parametrize("arch, size", [("vgg16", 224), ("vgg16", 64), ("vgg16", 32),
                                        ("alexnet", 224), ("alexnet", 100)])  # fmt: skip
def test_converted_weights_give_torchvisions_logits(arch, size):
    tmodel, fmodel = pair(arch, size)
    x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        t_features, t_logits = tmodel.features(xt), tmodel(xt)
    f_logits, f_out = fmodel.forward_intermediates(jnp.asarray(x))
    for name, got, want in [("features", f_out["features"], t_features.permute(0, 2, 3, 1)),
                            ("logits", f_logits, t_logits)]:  # fmt: skip
        want = want.numpy()
        scale = float(np.abs(want).max())
        assert scale > 1e-2, f"{name}: too small to compare ({scale:.2g})"
        np.testing.assert_allclose(np.asarray(got), want, atol=REL * scale, rtol=0, err_msg=name)


@pytest.mark.parametrize(
    "side, k, pad, stride",
    [(1, 3, 1, 1), (2, 3, 1, 1), (2, 1, 0, 1), (2, 3, 2, 1), (5, 3, 1, 1), (4, 3, 1, 2),
     (5, 3, 1, 2), (3, 1, 0, 2),
     # a rectangular kernel, and padding of another size on each side
     (3, (3, 2), ((1, 1), (0, 1)), 1), (4, (2, 3), ((0, 1), (2, 0)), 2)],
)  # fmt: skip
def test_patch_conv_is_the_convolution_value_and_gradient(side, k, pad, stride):
    """`layers.patch_conv` (one matmul over the windows) against `conv_general_dilated`, value
    and the gradients of the input, kernel and bias: 1e-12 in float64."""
    rng = np.random.default_rng(side)
    kh, kw = (k, k) if isinstance(k, int) else k
    padding = ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad
    out = [(side + sum(p) - kk) // stride + 1 for p, kk in zip(padding, (kh, kw), strict=True)]

    def conv(x, kernel, bias):
        dims = ("NHWC", "HWIO", "NHWC")
        strides = (stride, stride)
        return (
            jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dims) + bias
        )

    with jax.enable_x64(True):
        args = [jnp.asarray(rng.normal(size=s)) for s in ((3, side, side, 5), (kh, kw, 5, 7),
                                                           (7,))]  # fmt: skip
        ct = jnp.asarray(rng.normal(size=(3, *out, 7)))
        results = []
        for f in (lambda *a: layers.patch_conv(*a, padding, stride), conv):
            y, vjp = jax.vjp(f, *args)
            results.append([y, *vjp(ct)])
        for a, b in zip(*results, strict=True):
            assert a.shape == b.shape and a.dtype == jnp.float64
            np.testing.assert_allclose(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("side", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_takes_the_matmul_where_its_output_is_two_pixels_or_fewer(side, stride):
    """Stride 1 keeps the map's side, stride 2 halves it (rounding up): the matmul up to 2x2
    out, XLA's convolution above; both with and without a bias, as the detector's are."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, side, side, 5)), jnp.float32)
    out = (side - 1) // stride + 1
    for bias in (True, False):
        conv = layers.Conv(5, 7, (3, 3), strides=stride, padding=((1, 1), (1, 1)), use_bias=bias,
                           bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))  # fmt: skip
        assert not bias or np.abs(conv.bias[...]).min() > 0  # a bias that a dropped one changes
        b = conv.bias[...] if bias else None
        patches = layers.patch_conv(x, conv.kernel[...], b, conv.padding, stride)
        expected = patches if out <= layers.SMALL_MAP else nnx.Conv.__call__(conv, x)
        np.testing.assert_array_equal(conv(x), expected)
        convs = str(jax.make_jaxpr(conv)(x)).count("conv_general_dilated")
        assert convs == (out > layers.SMALL_MAP)


@pytest.mark.parametrize(
    "setting",
    [{"mask": np.ones((3, 3, 2, 7), np.float32) * (np.arange(7) % 2)},
     {"dtype": jnp.bfloat16}, {"precision": "highest"},
     {"preferred_element_type": jnp.float32}, {"unbatched": True},
     {"conv_general_dilated": lambda *a, **k: jax.lax.conv_general_dilated(*a, **k) * 2}],
    ids=lambda s: next(iter(s)),
)  # fmt: skip
def test_conv_leaves_what_the_matmul_does_not_compute_to_nnx(setting):
    """A 2x2 output that sets a kernel mask, a compute dtype, a precision, a preferred element
    type or its own convolution function, or has no batch axis, is nnx.Conv's convolution, bit
    for bit. Two input channels, so that an unbatched (2, 2, 2) input would also read as a 2x2
    map."""
    setting = dict(setting)
    unbatched = setting.pop("unbatched", False)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2, 2, 2)), jnp.float32)
    x = x[0] if unbatched else x
    conv = layers.Conv(2, 7, (3, 3), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0), **setting)
    np.testing.assert_array_equal(conv(x), nnx.Conv.__call__(conv, x))
    assert str(jax.make_jaxpr(conv)(x)).count("conv_general_dilated") == 1


def test_adaptive_pool_bins_follow_torch():
    for size, out in [(7, 7), (13, 6), (2, 7), (9, 4)]:
        x = np.random.default_rng(size).normal(size=(1, size, size, 3)).astype(np.float32)
        m = adaptive_pool_matrix(size, out)
        mine = np.einsum("oh,bhwc,pw->bopc", m, x, m)
        want = F.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), out)
        np.testing.assert_allclose(mine, want.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_flax_torch_flax_round_trip_is_exact(assert_same_params):
    c = AlexNetConfig(num_classes=10)
    fmodel = build_model(c, rngs=nnx.Rngs(3))
    state_dict = convert.to_torch_state_dict(fmodel)
    tmodel = torch_build(c)
    tmodel.load_state_dict(state_dict, strict=True)  # loads into torchvision's own model
    shell = nnx.eval_shape(lambda: build_model(c, rngs=nnx.Rngs(4)))
    assert_same_params(fmodel, convert.load_torch_state_dict(shell, tmodel.state_dict()))


@pytest.mark.parametrize("size", [224, 64])
def test_resize_and_normalise_agree_on_real_digits(sample, size):
    x = sample.x_test[:16].astype(np.float32) / 255.0  # (16, 28, 28, 1)
    j = np.asarray(imagenet_input(jnp.asarray(x), size))
    t = torch_imagenet_input(torch.from_numpy(x).permute(0, 3, 1, 2), size)
    assert j.shape == (16, size, size, 3)
    np.testing.assert_allclose(j, t.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)


def small(sample, n_train=64, n_test=32):
    from jaxvision.core.data import make_dataset

    x, y = sample.x_train[:n_train], sample.y_train[:n_train]
    return make_dataset("mnist", "subset", x, y, sample.x_test[:n_test], sample.y_test[:n_test], 10)


@pytest.mark.parametrize("arch, size", [("alexnet", 64), ("vgg16", 32)])
def test_one_frozen_step_changes_only_the_head_in_both_frameworks(sample, arch, size):
    data = small(sample)
    config = TrainConfig(arch=arch, epochs=1, batch_size=32, optimizer="sgd", lr=0.1,
                         momentum=0.0, image_size=size, progress=False)  # fmt: skip
    tmodel, fmodel = pair(arch, size, classes=10)
    before = {k: v.clone() for k, v in tmodel.state_dict().items()}

    jt = Trainer(fmodel, config, data)
    assert {p[0] for p in dict(nnx.to_flat_state(jt.state.params))} == {
        "classifier"
    }  # no feature grads
    jt.train_epoch(0)
    tt = TorchTrainer(tmodel, config, data)
    assert all(not p.requires_grad for p in tmodel.features.parameters())
    torch.manual_seed(0)
    tt.train_epoch(0)

    after_jax = convert.to_torch_state_dict(jt.model())
    after_torch = tmodel.state_dict()
    for k, v in before.items():
        if k.startswith("features."):
            assert torch.equal(after_torch[k], v), k  # bit-identical
            assert torch.equal(after_jax[k], v), k
        elif k == "classifier.6.weight":
            assert not torch.equal(after_torch[k], v) and not torch.equal(after_jax[k], v)


def test_frozen_step_gives_the_same_head_in_both_frameworks(sample):
    """Dropout off (eval-mode forward would hide it), SGD, two steps: both frameworks move every
    head tensor by the same step, and no feature. The steps are compared, not the weights: a
    step is about 1e-3 of its weights here, so a bound on the weights would pass a step half
    wrong.

    The bound is on each tensor's step as a whole (its norm), 1e-3: where a pre-activation lies
    within float32 rounding of ReLU's kink (one here is 5.5e-9 from it), the frameworks may put
    it on either side, which moves that unit's row by a few percent, and the tensor's step by
    about 8e-5 in norm (measured). A wrong learning rate, or a step taken twice, is 1e-2 or
    more."""
    data = small(sample)
    config = TrainConfig(arch="alexnet", epochs=1, batch_size=32, optimizer="sgd", lr=0.05,
                         momentum=0.0, image_size=64, progress=False)  # fmt: skip
    c = AlexNetConfig(num_classes=10, image_size=64, dropout=0.0)
    torch.manual_seed(0)
    tmodel = torch_build(c)
    fmodel = convert.load_torch_state_dict(build_model(c, rngs=nnx.Rngs(0)), tmodel.state_dict())
    before = {k: v.numpy().copy() for k, v in tmodel.state_dict().items()}
    jt, tt = Trainer(fmodel, config, data), TorchTrainer(tmodel, config, data)
    jt.train_epoch(0)
    tt.train_epoch(0)
    after_jax = convert.to_torch_state_dict(jt.model())
    for k, v in tmodel.state_dict().items():
        step_jax, step_torch = after_jax[k].numpy() - before[k], v.numpy() - before[k]
        if k.startswith("features."):
            assert not step_jax.any() and not step_torch.any(), f"{k}: a frozen tensor moved"
            continue
        size = float(np.linalg.norm(step_torch))
        assert size > 0, f"{k}: torch's step left it where it was"
        error = float(np.linalg.norm(step_jax - step_torch)) / size
        print(f"{k}: steps differ by {error:.2g} of torch's")
        assert error <= 1e-3, f"{k}: JAX's step differs from torch's by {error:.2g} of it"


def test_unfreeze_trains_features_at_their_own_rate(sample):
    data = small(sample)
    config = TrainConfig(arch="alexnet", epochs=1, batch_size=32, optimizer="sgd", lr=0.1,
                         momentum=0.0, image_size=64, unfreeze=True, feature_lr=1e-3,
                         progress=False)  # fmt: skip
    tmodel, fmodel = pair("alexnet", 64, classes=10)
    jt = Trainer(fmodel, config, data)
    assert {p[0] for p in dict(nnx.to_flat_state(jt.state.params))} == {"features", "classifier"}
    tt = TorchTrainer(tmodel, config, data)
    lrs = sorted(g["lr"] for g in tt.optimizer.param_groups)
    assert lrs == [1e-3, 0.1]


def test_bf16_compute_keeps_float32_parameters(sample):
    data = small(sample)
    config = TrainConfig(arch="alexnet", epochs=1, batch_size=32, image_size=64,
                         dtype="bfloat16", progress=False)  # fmt: skip
    _, fmodel = pair("alexnet", 64, classes=10)
    jt = Trainer(fmodel, config, data)
    jt.compile()
    loss, _ = jt.train_epoch(0)
    assert np.isfinite(loss)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(jt.state.params))
    assert np.isfinite(jt.evaluate()["loss"])


def test_missing_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch_pretrained, "host_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(UserError, match=r"no pretrained vgg16 weights: expected .*vgg16-397923af"
                                         r".pth .* or use --no-pretrained"):  # fmt: skip
        torch_pretrained.find_weights("vgg16")
    with pytest.raises(UserError, match=r"--weights .*nope.pth does not exist"):
        torch_pretrained.find_weights("vgg16", tmp_path / "nope.pth")
    with pytest.raises(UserError, match=r"--weights .* is a folder; pass the .pth file in it"):
        torch_pretrained.find_weights("vgg16", tmp_path)


def test_weights_file_loads_converts_and_caches(tmp_path):
    torch.manual_seed(0)
    tmodel = torch_build(AlexNetConfig(num_classes=1000))
    path = tmp_path / "alexnet.pth"
    torch.save(tmodel.state_dict(), path)
    cache = tmp_path / "cache"
    for _ in range(2):  # converts, then reads the cache; into the abstract model, as a run does
        model = nnx.eval_shape(lambda: build_model(AlexNetConfig(num_classes=1000),
                                                   rngs=nnx.Rngs(1)))  # fmt: skip
        pretrained.load_into_flax(model, "alexnet", path, cache_dir=cache, verbose=False)
        got = convert.to_torch_state_dict(model)
        for k, v in tmodel.state_dict().items():
            assert torch.equal(got[k], v), k
    (cached,) = cache.glob("*.npz")
    with np.load(cached) as npz:  # the same names, one array of another shape: refused
        arrays = {k: (npz[k].T if k == "classifier/1/kernel" else npz[k]) for k in npz}
    np.savez(cached, **arrays)
    with pytest.raises(UserError, match=r"converted cache does not match the model; delete it"):
        pretrained.load_into_flax(model, "alexnet", path, cache_dir=cache, verbose=False)
    cached.unlink()
    model.extra = nnx.Variable(jax.ShapeDtypeStruct((3,), jnp.float32))  # no weight holds it
    with pytest.raises(convert.ConversionError, match=r"state_dict leaves 1 variable.*\['extra'\]"):
        pretrained.load_into_flax(model, "alexnet", path, cache_dir=cache, verbose=False)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"junk.pth: not a readable torch state_dict") as e:
        torch_pretrained.load_state_dict(tmp_path / "junk.pth")
    assert "\n" not in str(e.value) and str(e.value).endswith("or pass a torchvision .pth")
    torch.save({"f": print}, tmp_path / "objects.pth")  # a global weights-only loading refuses
    with pytest.raises(UserError) as e:
        torch_pretrained.load_state_dict(tmp_path / "objects.pth")
    assert str(e.value) == (
        f"{tmp_path / 'objects.pth'}: not a readable torch state_dict (weights-only loading "
        "refused it: Unsupported global: GLOBAL print was not an allowed global by default); "
        "download it again, or pass a torchvision .pth"
    )  # torch's page of text, and its advice to load the file unsafely, left out


def test_a_pretrained_run_starts_from_the_weights_with_a_new_head(tmp_path, monkeypatch, sample):
    """The JAX backend's pretrained model: every ImageNet layer from the weights file, bit for
    bit, and a fresh 10-way last layer from the run's key."""
    monkeypatch.setenv("JAXVISION_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    tmodel = torch_build(AlexNetConfig(num_classes=1000))
    path = tmp_path / "alexnet.pth"
    torch.save(tmodel.state_dict(), path)
    config = TrainConfig(arch="alexnet", pretrained=True, weights=str(path), image_size=64)
    model_cfg, key = config.model_config(small(sample)), jax.random.key(5)
    model = JaxBackend().create_model(config, model_cfg, key, verbose=False)
    leaves = jax.tree.leaves(nnx.state(model))
    assert not any(isinstance(a, jax.ShapeDtypeStruct) for a in leaves), "a variable left abstract"
    got = convert.to_torch_state_dict(model)
    for k, v in tmodel.state_dict().items():
        if not k.startswith("classifier.6."):
            assert torch.equal(got[k], v), k
    head = nnx.Linear(model_cfg.hidden, 10, rngs=nnx.Rngs(params=key))
    np.testing.assert_array_equal(got["classifier.6.weight"].numpy(), np.asarray(head.kernel).T)
    logits = nnx.view(model, deterministic=True)(np.zeros((2, 64, 64, 3), np.float32))
    assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_cli_fine_tunes_offline_with_no_pretrained(tmp_path, backend, train_cli, small_data_dir):
    r = train_cli("--arch", "alexnet", "--backend", backend, "--no-pretrained", "--image-size",
                  "64", "--epochs", "1", "--data-dir", str(small_data_dir), "--no-progress",
                  "--save-weights", "--out", str(tmp_path / "run"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "metrics.json").exists()
    assert f"| alexnet | {backend} |" in r.stdout and "57,044,810" in r.stdout
    # --save-weights: a torchvision state_dict that torchvision's own AlexNet loads.
    state_dict = torch.load(tmp_path / "run" / "model.pth", weights_only=True)
    torch_build(AlexNetConfig(num_classes=10, image_size=64)).load_state_dict(state_dict)


def test_cli_pretrained_without_weights_is_one_line(tmp_path, train_cli):
    r = train_cli("--arch", "vgg16", timeout=120, env={"TORCH_HOME": str(tmp_path)})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--no-pretrained" in r.stderr
    assert "Traceback" not in r.stderr
