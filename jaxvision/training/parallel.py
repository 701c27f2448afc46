"""Data parallelism with `jax.sharding`: a ('data',) mesh, the batch sharded, the rest replicated.

The JAX trainer always runs on a mesh, even a one-device one, so that one code path serves a
laptop, a GPU box and a multi-host cluster:

  * `make_data_mesh(n, batch_size)`: the first `n` visible devices, every device a slice of the
    batch. With n = 0 (the default), all of them; on CPU, where the devices are a split of one
    host (`jaxvision.apps.jax_backend` splits it into one device per core unless XLA_FLAGS is
    set), the most of them that divide the batch (`auto_device_count`), so that any batch size
    runs on any core count;
  * the dataset, parameters and optimiser state are replicated (`replicate`); inside the jitted
    step the batch's indices are resharded along 'data' (`shard_batch`), so each device gathers,
    augments and differentiates its own slice, and XLA all-reduces the gradient of the global
    mean loss. The metrics are computed on the global arrays;
  * a global batch that the device count does not divide is an error (`check_divisible`), not a
    silent pad, because padding would change the loss the optimiser sees. The evaluation batch,
    where padding is already masked out, is rounded up instead.

Multi-host: `init_distributed` calls `jax.distributed.initialize` before any JAX computation.
With no arguments JAX reads the coordinator from its environment (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) or detects the cluster (SLURM, Open MPI, Kubernetes, TPU pods).
Every process loads the same data and seed, so every process builds the same replicas.
A SIGTERM to any process (or a Ctrl-C) stops them all after the same step
(`preemption_sync_point`), where the run is saved.
"""

from __future__ import annotations

import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvision.core.errors import UserError
from jaxvision.core.loop import SyncPoint

DATA_AXIS = "data"


def init_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None,
                     join_timeout: int):  # fmt: skip
    """Joins a multi-process JAX run. Call once, before anything touches a device.

    Says what it waits for. When not every process has joined after `join_timeout` seconds, the
    process stops with one `error:` line and exit code 2: JAX's own timeout aborts the process
    from C++, with a stack trace, so a watchdog stops it first."""
    address = coordinator if coordinator is not None else os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address is not None:
        named = "--coordinator-address" if coordinator is not None else "JAX_COORDINATOR_ADDRESS"
        check_coordinator(address, named)
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:  # CPU hosts: all-reduce via gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    rank = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
    count = num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
    who = f"process {rank} of {count}" if None not in (rank, count) else "this process"
    where = address or "the coordinator JAX finds"
    print(f"joining the multi-process run at {where} as {who}; waiting up to {join_timeout} s for "
          "every process", file=sys.stderr, flush=True)  # fmt: skip
    joined = threading.Event()

    def give_up():  # the blocking join releases the GIL, so this thread runs while it waits
        if not joined.wait(join_timeout):
            print(f"error: not every process joined the run at {where} within {join_timeout} s; "
                  "start every process with the same --coordinator-address and --num-processes "
                  "and its own --process-id, or raise --join-timeout",
                  file=sys.stderr, flush=True)  # fmt: skip
            os._exit(2)  # nothing is written yet; JAX's abort would follow with a stack trace

    threading.Thread(target=give_up, name="join-timeout", daemon=True).start()
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   initialization_timeout=join_timeout + 60)  # fmt: skip
    except (RuntimeError, ValueError) as e:
        raise UserError(
            f"jax.distributed.initialize failed ({str(e).splitlines()[0]}); check "
            "--coordinator-address, --num-processes and --process-id (or JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
        ) from None
    finally:
        joined.set()


def preemption_sync_point() -> SyncPoint | None:
    """In a multi-process (`--distributed`) run, where every process must stop after the same
    step: JAX's preemption sync, which a SIGTERM to any process triggers. None otherwise.

    With JAX's preemption service turned off (`jax_enable_preemption_service`), a sync point
    that handles no signal: SIGTERM and Ctrl-C then end a process as they would any program."""
    if not jax.distributed.is_initialized():
        return None
    try:
        multihost_utils.reached_preemption_sync_point(0)  # asks nothing: every count starts at 0
    except RuntimeError:  # the service is off
        return SyncPoint(None)
    return SyncPoint(multihost_utils.reached_preemption_sync_point)


def check_coordinator(address: str, named: str) -> None:
    """A UserError unless `address` is host:port (an IPv6 host in brackets), which
    jax.distributed.initialize splits at the last colon (an IndexError without one)."""
    host, _, port = address.rpartition(":")
    if not (host and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise UserError(f"{named} {address!r} is not host:port; give process 0's address and a "
                        "free port, e.g. 10.0.0.1:1234")  # fmt: skip


def is_primary() -> bool:
    """Process 0 of a multi-host run (or the only process) writes files and prints results."""
    return jax.process_index() == 0


def auto_device_count(batch_size: int | None, available: list) -> int:
    """How many of the visible devices `--devices 0` uses: all of them, except on a single CPU
    host, where it is the largest count that divides `batch_size`. A CPU device is a share of
    one host's cores, so using fewer of them loses only the split's speed-up (intra-op
    threading still runs on every core); a GPU left idle is lost, so there a batch that does not
    divide stays an error (`check_divisible`)."""
    n = len(available)
    if batch_size is None or available[0].platform != "cpu" or jax.process_count() > 1:
        return n
    return max(k for k in range(1, n + 1) if batch_size % k == 0)


def make_data_mesh(devices: int = 0, batch_size: int | None = None) -> jax.sharding.Mesh:
    """A 1-D ('data',) mesh over the first `devices` devices (0: `auto_device_count`)."""
    available = jax.devices()
    n = devices or auto_device_count(batch_size, available)
    if n > len(available):
        raise UserError(
            f"--devices {n}, but only {len(available)} {available[0].platform} device(s) are "
            f"visible; use --devices {len(available)} or fewer"
        )
    if jax.process_count() > 1 and n != len(available):
        raise UserError(
            f"--devices {n} with {jax.process_count()} processes: a multi-host run uses every "
            f"device ({len(available)}); leave --devices unset"
        )
    # Auto axes: XLA's partitioner propagates the batch sharding through the models, so they
    # carry no sharding annotations of their own.
    auto = (jax.sharding.AxisType.Auto,)
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=auto, devices=available[:n])


def check_divisible(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    n = mesh.size
    if batch_size % n:
        lower, upper = batch_size // n * n, -(-batch_size // n) * n
        hint = f"--batch-size {upper}" if lower == 0 else f"--batch-size {lower} or {upper}"
        raise UserError(
            f"--batch-size {batch_size} does not split evenly over {n} devices; use {hint}, "
            f"or --devices with a divisor of {batch_size}"
        )


def replicate(tree, mesh: jax.sharding.Mesh):
    """Every leaf (numpy or JAX) as a global array, the whole of it on every device of `mesh`."""
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(leaf):  # multi-host: each process supplies its (identical) copy
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(leaf)))
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def shard_batch(x: jax.Array) -> jax.Array:
    """Inside a jitted function under `jax.set_mesh`: `x` split along its first axis."""
    return jax.lax.with_sharding_constraint(x, P(DATA_AXIS))


def take_batch(data: jax.Array, idx: jax.Array) -> jax.Array:
    """`data[idx]` for replicated `data` and sharded indices: each device gathers its rows."""
    return shard_batch(jnp.take(data, idx, axis=0))


def gather(x: jax.Array) -> jax.Array:
    """Inside a jitted function under `jax.set_mesh`: `x` whole on every device."""
    return jax.lax.with_sharding_constraint(x, P())
