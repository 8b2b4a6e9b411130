"""Overhead of running RWMH through ``numpyro.infer.MCMC`` instead of :func:`rwmh.sample`.

Both sides sample the same posterior (the linear regression of :mod:`rwmh.models` on the same
simulated data) with the same number of chains, warmup steps and draws, chains vectorized on
one device, in one process. ``rwmh.sample`` gets the very potential energy that NumPyro derives
from the model (``numpyro.infer.util.initialize_model``), as ``logdensity = -potential_fn(z)``
on the dict of unconstrained sites, so both do the same work per step.

Compilation is excluded by timing second and later runs. ``rwmh.sample`` caches its compiled
loops, so a second call only executes. ``MCMC.run`` does not: every call builds a new jitted
body and NumPyro compiles its ``fori_collect`` loop (and ``initialize_model``'s ``lax.map``)
again, HMC and NUTS included. To time execution alone, ``MCMC.run`` is therefore called inside
``jax.jit`` (NumPyro supports running MCMC under a JAX transform, see the ``MCMC`` docstring);
its second call then executes the cached program. The plain ``MCMC.run`` second-call time is
printed too, for information. The ratio of medians is what matters: absolute times drift on
shared machines, and the two sides are interleaved so that drift affects both alike.

A second part measures the loop carry of vectorized ``MCMC(RWMH)``, the state that NumPyro's
loop passes from one step to the next (``mcmc.last_state``), on a ``--carry-dimension``-d
Gaussian with ``--carry-chains`` chains (default 256 and 20): its size in bytes, and how much
of it is the adaptation state (one copy shared by all chains, or one per chain), and the time
per vectorized step of ``MCMC.run`` under ``jax.jit``.

Run::

    PYTHONPATH=src python benchmarks/numpyro_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC
from numpyro.infer.util import initialize_model

import rwmh
from rwmh.models import linear_regression, simulate_linear_regression
from rwmh.numpyro import RWMH

# These targets have one mode, and warmup moving a chain that lags far behind is expected; the
# benchmark times the runs, so it does not print the warning each of them would give.
warnings.filterwarnings("ignore", category=rwmh.RestartWarning)


def seconds(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


#: Every MCMC of this benchmark: all chains in one vmapped program, no progress bar.
MCMC_OPTIONS = {"chain_method": "vectorized", "progress_bar": False}


def vectorized_mcmc(model, num_chains: int, num_warmup: int, num_samples: int) -> MCMC:
    lengths = {"num_warmup": num_warmup, "num_samples": num_samples, "num_chains": num_chains}
    return MCMC(RWMH(model), **lengths, **MCMC_OPTIONS)


def nbytes(tree) -> int:
    def data(leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(leaf)
        return leaf

    return sum(int(np.asarray(data(leaf)).nbytes) for leaf in jax.tree_util.tree_leaves(tree))


def carry_report(num_chains: int, dimension: int, warmup: int, samples: int, repeats: int):
    """Loop carry of vectorized MCMC(RWMH) on a ``dimension``-d Gaussian, and its step time."""
    scales = jnp.linspace(0.5, 2.0, dimension)

    def gaussian():
        numpyro.sample("theta", dist.Normal(0.0, scales).to_event(1))

    mcmc = vectorized_mcmc(gaussian, num_chains, warmup, samples)

    @jax.jit
    def run(key):
        mcmc.run(key)
        return mcmc.get_samples(group_by_chain=True), mcmc.last_state

    key = jax.random.key(3)
    seconds(lambda: run(key))
    times = [seconds(lambda: run(key)) for _ in range(repeats)]
    _, state = run(key)
    total, adapt = nbytes(state), nbytes(state.adapt_state)
    per_step = statistics.median(times) / (warmup + samples)
    print(
        f"vectorized MCMC(RWMH) carry, {num_chains} chains, d = {dimension}: {total} bytes, of "
        f"which adapt_state {adapt} bytes (its m2 has shape {tuple(state.adapt_state.m2.shape)}); "
        f"median {per_step * 1e6:.1f} us per step ({warmup} + {samples} steps, {repeats} runs)"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1000, help="data points")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs after compiling")
    parser.add_argument("--carry-chains", type=int, default=256)
    parser.add_argument("--carry-dimension", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="100 points, 200 + 200 steps, 1 run")
    args = parser.parse_args(argv)
    if args.quick:
        args.points, args.warmup, args.samples, args.repeats = 100, 200, 200, 1

    x, y = simulate_linear_regression(jax.random.key(0), args.points)
    key = jax.random.key(1)

    def make_mcmc():
        return vectorized_mcmc(linear_regression, args.chains, args.warmup, args.samples)

    traced_mcmc = make_mcmc()

    @jax.jit
    def run_numpyro(key):
        traced_mcmc.run(key, x, y)
        return traced_mcmc.get_samples(group_by_chain=True)

    # The same potential energy NumPyro builds from the model, and the same kind of start:
    # uniform(-2, 2) on the unconstrained scale (NumPyro's init_to_uniform).
    keys = jax.random.split(jax.random.key(2), args.chains)
    info, potential_fn, postprocess_fn, _ = initialize_model(
        keys, linear_regression, model_args=(x, y)
    )

    def logdensity(z):
        return -potential_fn(z)

    def run_rwmh():
        return rwmh.sample(
            key,
            logdensity,
            info.z,
            num_samples=args.samples,
            num_warmup=args.warmup,
            progress_bar=False,
        )

    numpyro_first = seconds(lambda: run_numpyro(key))
    rwmh_first = seconds(lambda: run_rwmh().positions)
    numpyro_times, rwmh_times = [], []
    for _ in range(args.repeats):
        numpyro_times.append(seconds(lambda: run_numpyro(key)))
        rwmh_times.append(seconds(lambda: run_rwmh().positions))
    numpyro_time = statistics.median(numpyro_times)
    rwmh_time = statistics.median(rwmh_times)

    plain_mcmc = make_mcmc()
    plain_first = seconds(lambda: (plain_mcmc.run(key, x, y), plain_mcmc.get_samples())[1])
    plain_second = seconds(lambda: (plain_mcmc.run(key, x, y), plain_mcmc.get_samples())[1])

    # Same posterior on both sides: compare the constrained posterior means.
    numpyro_means = {k: float(np.mean(v)) for k, v in plain_mcmc.get_samples().items()}
    rwmh_draws = jax.vmap(jax.vmap(postprocess_fn))(run_rwmh().positions)
    rwmh_means = {k: float(np.mean(v)) for k, v in rwmh_draws.items()}

    print(
        f"linear regression, {args.points} points, {args.chains} chains x "
        f"({args.warmup} warmup + {args.samples} draws), jax {jax.__version__}, "
        f"{jax.devices()[0].platform}, {args.repeats} timed runs per side"
    )
    print(f"{'':40s}{'first run (s)':>14s}{'median of next (s)':>20s}")
    print(f"{'MCMC(RWMH) vectorized, under jax.jit':40s}{numpyro_first:14.3f}{numpyro_time:20.3f}")
    print(f"{'rwmh.sample':40s}{rwmh_first:14.3f}{rwmh_time:20.3f}")
    print(f"timed runs (s): MCMC {np.round(numpyro_times, 3).tolist()}")
    print(f"                rwmh.sample {np.round(rwmh_times, 3).tolist()}")
    print(f"sampling time ratio MCMC(RWMH) / rwmh.sample = {numpyro_time / rwmh_time:.2f}")
    print(
        f"for information, plain MCMC.run (recompiles on every call): first {plain_first:.3f} s, "
        f"second {plain_second:.3f} s"
    )
    for name, means in (("MCMC(RWMH)", numpyro_means), ("rwmh.sample", rwmh_means)):
        listed = ", ".join(f"{k} {v:.3f}" for k, v in means.items())
        print(f"posterior means, {name:11s}: {listed}")
    carry_report(args.carry_chains, args.carry_dimension, args.warmup, args.samples, args.repeats)


if __name__ == "__main__":
    main()
