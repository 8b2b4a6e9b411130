"""Child processes for the scale tests: runs that need their own JAX configuration.

JAX fixes its devices when it starts, so runs over several CPU devices, over several processes
(``jax.distributed``) or that get killed mid-run happen here, in a fresh interpreter, and the
tests compare what they write. Usage::

    python scale_worker.py sharded OUT              # (XLA_FLAGS gives 4 CPU devices)
    python scale_worker.py distributed OUT PORT ID  # one of two jax.distributed processes
    python scale_worker.py distributed_store OUT PORT ID  # the same with store=, resumed
    python scale_worker.py single OUT               # the same run in one process, unsharded
    python scale_worker.py checkpointed CKPT        # a slow checkpointed run, to be killed
    python scale_worker.py memory STEPS_FACTOR CHUNK  # peak RSS of a 4096-chain run
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np

NUM_DATA = 100


def regression_data():
    """Fixed data for the regression log density (numpy, so that no device is touched)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=NUM_DATA).astype(np.float32)
    y = (1.0 + 2.0 * x + 0.5 * rng.normal(size=NUM_DATA)).astype(np.float32)
    return x, y


_X, _Y = regression_data()


def regression_logdensity(position):
    """Linear regression posterior in ``(intercept, slope, log_sigma)``, weak normal priors."""
    import jax.numpy as jnp

    intercept, slope, log_sigma = position[0], position[1], position[2]
    residual = (_Y - intercept - slope * _X) / jnp.exp(log_sigma)
    loglik = -0.5 * jnp.sum(residual**2) - NUM_DATA * log_sigma
    return loglik - 0.5 * (intercept**2 + slope**2) / 100.0 - 0.5 * log_sigma**2


def gaussian_logdensity(position):
    """A dict-valued position (PyTree), so that checkpoints round-trip structure too."""
    import jax.numpy as jnp

    return -0.5 * jnp.sum(position["x"] ** 2 / jnp.array([1.0, 4.0])) - 0.5 * position["y"] ** 2


def initial_regression(num_chains):
    return (
        np.tile(np.array([0.5, 1.5, 0.0], np.float32), (num_chains, 1))
        + np.linspace(-0.2, 0.2, num_chains, dtype=np.float32)[:, None]
    )


def initial_gaussian(num_chains):
    return {
        "x": np.linspace(-1, 1, 2 * num_chains, dtype=np.float32).reshape(num_chains, 2),
        "y": np.linspace(0, 1, num_chains, dtype=np.float32),
    }


#: Chunks of one length, so that each phase compiles once.
DISTRIBUTED_RUN = dict(num_samples=50, num_warmup=100, chunk_size=50, progress_bar=False)


def save_result(path, result, **extra):
    np.savez(
        path,
        positions=np.asarray(result.positions),
        lp=result.stats["lp"],
        step_size=np.asarray(result.parameters["step_size"]),
        warmup_acceptance=result.warmup_info.acceptance_rate,
        **extra,
    )


def _initialize_distributed(port, process_id):
    import jax

    jax.config.update("jax_platforms", "cpu")
    # CPU collectives across processes go through gloo (the default in recent jax; set so that
    # an older default, "none", does not make the first all-reduce hang or fail).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=int(process_id),
        initialization_timeout=30,
    )


#: A run with ``until``: every process must stop at the same draw.
UNTIL_RUN = dict(num_samples=3000, num_warmup=300, chunk_size=50, progress_bar=False)


def until_run(**kwargs):
    import jax

    import rwmh

    return rwmh.sample(
        jax.random.key(7),
        regression_logdensity,
        initial_regression(8),
        until=rwmh.Converged(min_ess=200),
        **UNTIL_RUN,
        **kwargs,
    )


def distributed_until(out, port, process_id):
    """Each process writes its own stop: ``OUT.<process>.npz``."""
    import jax

    _initialize_distributed(port, process_id)
    result = until_run(devices="all")
    stop = result.extra["stop"]
    np.savez(
        f"{out}.{process_id}.npz",
        draw=stop["draw"],
        num_draws=result.num_draws,
        checks=[c["draw"] for c in result.extra["checks"]],
        positions=np.asarray(result.positions),
    )
    jax.distributed.shutdown()


def distributed(out, port, process_id):
    import jax

    _initialize_distributed(port, process_id)
    import rwmh

    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
    result = rwmh.sample(
        jax.random.key(7),
        regression_logdensity,
        initial_regression(8),
        devices="all",
        **DISTRIBUTED_RUN,
    )
    state_devices = len(result.last_state.logdensity.sharding.device_set)
    if jax.process_index() == 0:
        save_result(out, result, state_devices=state_devices)
    jax.distributed.shutdown()


def distributed_store(out, port, process_id):
    """Both processes sample with ``store=`` (process 0 writes it), stop at the 13th commit (in
    sampling, as Ctrl-C would, in both), then both resume from the store; each saves what it
    returns."""
    import jax

    _initialize_distributed(port, process_id)
    import rwmh
    from rwmh import store as store_file

    path = f"{out}.zarr"
    commit = store_file.Store.commit
    calls = []

    def stop_after_third(self, *args, **kwargs):
        calls.append(None)
        if len(calls) == 13:
            raise KeyboardInterrupt
        return commit(self, *args, **kwargs)

    store_file.Store.commit = stop_after_third
    partial = rwmh.sample(
        jax.random.key(7),
        regression_logdensity,
        initial_regression(8),
        devices="all",
        store=path,
        **{**DISTRIBUTED_RUN, "chunk_size": 10},
    )
    store_file.Store.commit = commit
    assert partial.extra["interrupted"]
    result = rwmh.resume(path, regression_logdensity, devices="all", progress_bar=False)
    np.savez(
        f"{out}.{jax.process_index()}.npz",
        partial_draws=partial.num_draws,
        positions=np.asarray(result.positions),
        lp=np.asarray(result.stats["lp"]),
    )
    jax.distributed.shutdown()


def single(out):
    import jax

    import rwmh

    result = rwmh.sample(
        jax.random.key(7), regression_logdensity, initial_regression(8), **DISTRIBUTED_RUN
    )
    save_result(out, result)


def checkpointed(path):
    """A checkpointed run slowed down on the host side, so that a test can kill it mid-run."""
    import jax

    import rwmh
    from rwmh import checkpoint

    write = checkpoint.write

    def slow_write(*args, **kwargs):
        write(*args, **kwargs)
        time.sleep(0.3)

    checkpoint.write = slow_write
    rwmh.sample(
        jax.random.key(11),
        gaussian_logdensity,
        initial_gaussian(6),
        checkpoint=path,
        **CHECKPOINT_RUN,
    )


CHECKPOINT_RUN = dict(num_samples=200, num_warmup=100, thin=2, chunk_size=10, progress_bar=False)


def memory(steps_factor, chunk_size):
    """Peak resident memory of a 4096-chain run with ``100`` stored draws and ``thin`` =
    ``steps_factor``: the steps grow with ``steps_factor``, the stored draws do not."""
    import jax
    import jax.numpy as jnp

    import rwmh

    def logdensity(x):
        return -0.5 * jnp.sum(x**2)

    chunk = None if chunk_size == "none" else int(chunk_size)
    result = rwmh.sample(
        jax.random.key(0),
        logdensity,
        np.zeros((4096, 3), np.float32),
        num_samples=100,
        num_warmup=0,
        thin=int(steps_factor),
        step_size=1.0,
        chunk_size=chunk,
        progress_bar=False,
    )
    assert result.positions.shape == (4096, 100, 3)
    # ru_maxrss is in kilobytes on Linux: the peak of host memory, which on CPU also holds
    # the "device" buffers.
    print(json.dumps({"max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def sharded(out):
    import jax

    import rwmh

    assert jax.device_count() == 4, jax.devices()
    results = {}
    for num_chains in (8, 6):
        positions = initial_regression(num_chains)
        kwargs = dict(num_samples=50, num_warmup=150, progress_bar=False)
        unsharded = rwmh.sample(jax.random.key(5), regression_logdensity, positions, **kwargs)
        on_all = rwmh.sample(
            jax.random.key(5), regression_logdensity, positions, devices="all", **kwargs
        )
        results[f"unsharded_{num_chains}"] = unsharded.positions
        results[f"sharded_{num_chains}"] = on_all.positions
        results[f"unsharded_step_size_{num_chains}"] = np.asarray(unsharded.parameters["step_size"])
        results[f"sharded_step_size_{num_chains}"] = np.asarray(on_all.parameters["step_size"])
        logdensity = on_all.last_state.logdensity
        results[f"state_devices_{num_chains}"] = len(logdensity.sharding.device_set)
        results[f"state_shard_{num_chains}"] = logdensity.addressable_shards[0].data.shape[0]
    # A Mesh, chunks and a diagonal proposal without warmup: no pooled statistics, no batched
    # matrix product, so the sharded draws are bit-for-bit those of one device.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("chains",))
    kwargs = dict(
        num_samples=60,
        num_warmup=0,
        proposal_cov=np.array([0.1, 0.5, 0.01]),
        step_size=0.5,
        progress_bar=False,
    )
    positions = initial_regression(8)
    results["exact_unsharded"] = rwmh.sample(
        jax.random.key(6), regression_logdensity, positions, **kwargs
    ).positions
    results["exact_sharded_chunked"] = rwmh.sample(
        jax.random.key(6), regression_logdensity, positions, devices=mesh, chunk_size=25, **kwargs
    ).positions
    # Chunked against unchunked, both sharded and with warmup.
    kwargs = dict(num_samples=50, num_warmup=150, progress_bar=False, devices=jax.devices())
    results["chunked"] = rwmh.sample(
        jax.random.key(5), regression_logdensity, initial_regression(8), chunk_size=50, **kwargs
    ).positions
    results["unchunked"] = results["sharded_8"]
    results.update(padded_checkpoint(out))
    np.savez(out, **results)


def padded_checkpoint(out):
    """6 chains padded to 8 over 4 devices, stopped by Ctrl-C right after the first checkpoint
    (in warmup: the chunk being recorded and the one in flight are kept, 100 steps), then
    resumed sharded: the draws must equal the uninterrupted sharded run."""
    import warnings

    import jax

    import rwmh
    from rwmh import checkpoint

    path = f"{out}.ckpt"
    kwargs = dict(num_samples=50, num_warmup=150, chunk_size=50, progress_bar=False)
    positions = initial_regression(6)
    key = jax.random.key(9)
    whole = rwmh.sample(key, regression_logdensity, positions, devices="all", **kwargs)
    write, writes = checkpoint.write, []

    def write_then_interrupt(*args, **kwargs):
        write(*args, **kwargs)
        writes.append(None)
        if len(writes) == 1:
            raise KeyboardInterrupt

    checkpoint.write = write_then_interrupt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        partial = rwmh.sample(
            key, regression_logdensity, positions, devices="all", checkpoint=path, **kwargs
        )
    checkpoint.write = write
    resumed = rwmh.resume(path, regression_logdensity, devices="all", progress_bar=False)
    return {
        "padded_whole": whole.positions,
        "padded_resumed": resumed.positions,
        "padded_partial_warmup_steps": partial.warmup_info.acceptance_rate.shape[0],
    }


if __name__ == "__main__":
    role, *arguments = sys.argv[1:]
    {
        "distributed": distributed,
        "distributed_until": distributed_until,
        "distributed_store": distributed_store,
        "single": single,
        "checkpointed": checkpointed,
        "memory": memory,
        "sharded": sharded,
    }[role](*arguments)
