"""Child process for the store tests: a run with ``store=`` that the parent kills.

Usage::

    python store_worker.py STORE CACHE_DIR

It runs :data:`STORE_RUN` with ``store=STORE``, JAX's compilation cache in ``CACHE_DIR`` (so
that every child after the first loads its programs instead of compiling them), and exits.
The run is sized so that writing and committing the chunks takes most of its time, and a kill
at a random moment often lands inside a write.
"""

from __future__ import annotations

import sys

import numpy as np

NUM_CHAINS = 64
DIMENSION = 32
STORE_RUN = dict(num_samples=600, num_warmup=300, chunk_size=30, progress_bar=False)
SEED = 5


def logdensity(position):
    import jax.numpy as jnp

    scales = jnp.linspace(0.5, 2.0, DIMENSION)
    return -0.5 * jnp.sum((position["theta"] / scales) ** 2) - 0.5 * position["mu"] ** 2


def initial_positions():
    rng = np.random.default_rng(SEED)
    return {
        "mu": rng.normal(size=(NUM_CHAINS,)).astype(np.float32),
        "theta": rng.normal(size=(NUM_CHAINS, DIMENSION)).astype(np.float32),
    }


def run(store, cache_dir):
    import jax

    import rwmh
    from rwmh.compilation_cache import enable_compilation_cache

    enable_compilation_cache(cache_dir, min_compile_time_secs=0)
    return rwmh.sample(
        jax.random.key(SEED), logdensity, initial_positions(), store=store, **STORE_RUN
    )


if __name__ == "__main__":
    run(*sys.argv[1:])
