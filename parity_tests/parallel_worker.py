"""Trains the same run on a 1-device and an N-device mesh in one process; run by test_parallel.py
with N simulated CPU devices. Writes the step losses, eval metrics and final parameters to NPZ.

    python parity_tests/parallel_worker.py ARCH N OUT.npz
"""

import sys

import jax
import numpy as np

from jaxvision.apps.jax_backend import JaxBackend
from jaxvision.core.config import TrainConfig
from jaxvision.core.data import load_dataset, make_dataset
from jaxvision.training import parallel
from jaxvision.training.trainer import Trainer, run_keys


def run(arch: str, devices: int) -> dict:
    sample = load_dataset("mnist", source="sample-split", verbose=False)
    # 100 test images: the eval batch (100) is padded to a multiple of the device count
    tr, te = np.random.default_rng(0).permutation(sample.n_train)[:512], slice(None, None, 10)
    data = make_dataset("mnist", "subset", sample.x_train[tr], sample.y_train[tr],
                        sample.x_test[te], sample.y_test[te], 10)  # every class  # fmt: skip
    preset = "tiny" if arch == "vit" else None
    config = TrainConfig.for_arch(arch, preset=preset, epochs=2, batch_size=64,
                                  eval_batch_size=100, devices=devices,
                                  warmup_epochs=0.5)  # fmt: skip
    key, _ = run_keys(config.seed)
    model = JaxBackend().create_model(config, config.model_config(data), key)
    trainer = Trainer(model, config, data, mesh=parallel.make_data_mesh(devices))
    trainer.compile()
    losses = []
    for epoch in range(config.epochs):
        trainer.train_epoch(epoch)
        losses += trainer.step_losses
    ev = trainer.evaluate()
    params = {jax.tree_util.keystr(k): np.asarray(v)
              for k, v in jax.tree.flatten_with_path(trainer.state.params)[0]}  # fmt: skip
    sharding = trainer.state.params  # every parameter replicated over the whole mesh
    assert all(len(a.sharding.device_set) == devices for a in jax.tree.leaves(sharding))
    return {"losses": np.array(losses), "accuracy": ev["accuracy"], "test_loss": ev["loss"],
            "preds": ev["preds"], "confidence": ev["confidence"],
            **{f"param {k}": v for k, v in params.items()}}  # fmt: skip


if __name__ == "__main__":
    arch, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    assert jax.device_count() == n, jax.devices()
    one, many = run(arch, 1), run(arch, n)
    np.savez(out, **{f"one/{k}": v for k, v in one.items()},
             **{f"many/{k}": v for k, v in many.items()})  # fmt: skip
