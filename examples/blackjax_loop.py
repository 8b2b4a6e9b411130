"""rwmh's kernel in your own BlackJAX loop.

``rwmh.random_walk`` is a ``blackjax.base.SamplingAlgorithm``, so any BlackJAX tooling runs it.
This example

1. adapts the step size and a dense proposal covariance with ``rwmh.window_adaptation``
   (statistics pooled over all chains),
2. runs every chain with ``blackjax.util.run_inference_algorithm`` under ``jax.vmap``,
3. converts the draws (a dict PyTree) with ``rwmh.to_inference_data``, prints ArviZ's summary
   next to the exact answer, and writes a trace plot.

The target is a correlated Gaussian over ``{"loc": (), "coef": (2,)}``, so the exact mean and
standard deviations are known and the output can be judged by eye.

Run ``python examples/blackjax_loop.py --plot trace.png``; ``--help`` lists the settings.
"""

from __future__ import annotations

import argparse

import blackjax
import jax
import jax.numpy as jnp
import numpy as np

import rwmh

MEAN = np.array([1.0, -2.0, 0.5])
STD = np.array([1.0, 0.5, 2.0])
CORRELATION = np.array([[1.0, 0.8, 0.0], [0.8, 1.0, -0.3], [0.0, -0.3, 1.0]])
COV = CORRELATION * np.outer(STD, STD)


def logdensity(position):
    """Correlated Gaussian log density (up to a constant) of ``{"loc", "coef"}``."""
    flat = jnp.concatenate([jnp.atleast_1d(position["loc"]), position["coef"]])
    residual = flat - MEAN
    return -0.5 * residual @ jnp.linalg.solve(COV, residual)


def run(num_chains=4, num_warmup=1000, num_samples=2000, seed=0, plot="blackjax_loop.png"):
    """Adapt, sample in a BlackJAX loop, convert to ArviZ; returns the ArviZ data."""
    warmup_key, init_key, sample_key = jax.random.split(jax.random.key(seed), 3)
    # Dispersed starting points, one per chain (leading chain axis on every leaf).
    positions = {
        "loc": 3.0 * jax.random.normal(init_key, (num_chains,)),
        "coef": 3.0 * jax.random.normal(jax.random.fold_in(init_key, 1), (num_chains, 2)),
    }

    warmup = rwmh.window_adaptation(logdensity)
    (states, parameters), _ = warmup.run(warmup_key, positions, num_steps=num_warmup)
    algorithm = rwmh.random_walk(logdensity, **parameters)

    def keep(state, info):
        # What to store per step: the position and ArviZ-named statistics.
        stats = {
            "acceptance_rate": info.acceptance_rate,
            "is_accepted": info.is_accepted,
            "lp": state.logdensity,
        }
        return state.position, stats

    def one_chain(key, state):
        _, (draws, stats) = blackjax.util.run_inference_algorithm(
            key, algorithm, num_samples, initial_state=state, transform=keep
        )
        return draws, stats

    keys = jax.random.split(sample_key, num_chains)
    draws, stats = jax.vmap(one_chain)(keys, states)  # leaves (chain, draw, ...)
    stats["step_size"] = parameters["step_size"]
    idata = rwmh.to_inference_data(draws, stats, dims={"coef": ["coefficient"]})

    # ArviZ's summary with the same columns and 94% HDI on ArviZ 0.x and 1.x.
    print(
        f"adapted step size {float(parameters['step_size']):.3f}, mean acceptance rate "
        f"{float(idata.sample_stats['acceptance_rate'].mean()):.3f}"
    )
    print(rwmh.arviz.summary(idata).round(3).to_string())
    exact = zip(["loc", "coef[0]", "coef[1]"], MEAN, STD, strict=True)
    print("exact: " + ", ".join(f"{name} {mean:g} (sd {sd:g})" for name, mean, sd in exact))
    if plot:
        rwmh.arviz.plot_trace(idata, plot, title="rwmh.random_walk in a BlackJAX loop")
        print(f"wrote {plot}")
    return idata


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="blackjax_loop.png", help="PNG path ('' for none)")
    args = parser.parse_args(argv)
    return run(args.chains, args.warmup, args.samples, args.seed, args.plot)


if __name__ == "__main__":
    main()
