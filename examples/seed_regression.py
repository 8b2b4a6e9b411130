"""The problem rwmh started from, done right.

A modeller fitted ``y = intercept + slope * x + sigma * noise`` with four random-walk
Metropolis-Hastings chains written as a Python loop under ``jax.vmap``. It was wrong (no
Metropolis-Hastings test, so every proposal was accepted; the likelihood drew new ``x`` on every
call), slow (a Python loop of un-jitted steps) and opaque (``print`` inside ``vmap`` shows
tracers). Here:

* the data are simulated once, outside the log density, which closes over them;
* ``sigma`` is sampled as ``log_sigma`` and the log density includes the Jacobian;
* the kernel is rwmh's, whose Metropolis-Hastings test rejects proposals;
* the chains run in a BlackJAX-style loop (``jax.vmap`` over chains, ``lax.scan`` over steps,
  one ``jax.jit``);
* ``jax.debug.print`` shows per-chain values from inside the vmapped step, and the values
  returned by the scan are ordinary arrays once it finishes.

Run: ``python examples/seed_regression.py``.
"""

import argparse

import jax
import jax.numpy as jnp
import jax.scipy.stats as stats

import rwmh

NUM_CHAINS = 4
TRUE = {"intercept": 1.0, "slope": 2.0, "sigma": 0.5}


def simulate(rng_key, num_points=100):
    """Simulate the data once; the log density closes over these fixed arrays."""
    key_x, key_noise = jax.random.split(rng_key)
    x = jax.random.normal(key_x, (num_points,))
    noise = jax.random.normal(key_noise, (num_points,))
    y = TRUE["intercept"] + TRUE["slope"] * x + TRUE["sigma"] * noise
    return x, y


def make_logdensity(x, y):
    def logdensity(position):
        intercept, slope, log_sigma = position
        sigma = jnp.exp(log_sigma)
        log_prior = (
            stats.norm.logpdf(intercept, 0.0, 10.0)
            + stats.norm.logpdf(slope, 0.0, 10.0)
            # HalfNormal(5) on sigma, plus log|d sigma / d log_sigma| = log_sigma.
            + stats.norm.logpdf(sigma, 0.0, 5.0)
            + log_sigma
        )
        log_likelihood = jnp.sum(stats.norm.logpdf(y, intercept + slope * x, sigma))
        return log_prior + log_likelihood

    return logdensity


def run(num_steps=5000, show_every=1000, seed=0):
    data_key, init_key, sample_key = jax.random.split(jax.random.key(seed), 3)
    x, y = simulate(data_key)
    logdensity = make_logdensity(x, y)

    # Step size 2.38/sqrt(3) with a proposal covariance close to the posterior's (from a short
    # pilot, written out here to keep the example about the loop; rwmh.sample adapts it).
    proposal_cov = jnp.diag(jnp.array([0.05, 0.05, 0.07]) ** 2)
    algo = rwmh.random_walk(logdensity, step_size=2.38 / jnp.sqrt(3.0), proposal_cov=proposal_cov)

    initial_positions = jax.random.normal(init_key, (NUM_CHAINS, 3))
    states = jax.vmap(algo.init)(initial_positions)

    @jax.jit
    def sample(states, rng_key):
        def one_step(states, xs):
            step, key = xs
            keys = jax.random.split(key, NUM_CHAINS)
            states, info = jax.vmap(algo.step)(keys, states)

            # Inside vmap the values are tracers; jax.debug.print prints the per-chain values
            # when the compiled code runs (here every `show_every` steps).
            def show(_):
                jax.debug.print(
                    "step {step}: slope per chain {slope}, accepted {accepted}",
                    step=step,
                    slope=states.position[:, 1],
                    accepted=info.is_accepted,
                )

            jax.lax.cond(step % show_every == 0, show, lambda _: None, None)
            return states, (states.position, info.acceptance_rate)

        steps = jnp.arange(num_steps)
        return jax.lax.scan(one_step, states, (steps, jax.random.split(rng_key, num_steps)))

    _, (draws, acceptance) = sample(states, sample_key)
    # The scan returns ordinary arrays (draw, chain, ...): print them from the host.
    kept = draws[num_steps // 2 :]
    means = kept.mean(axis=0)
    print("posterior means per chain (intercept, slope, sigma):")
    for chain in range(NUM_CHAINS):
        intercept, slope, log_sigma = means[chain]
        sigma = jnp.exp(kept[:, chain, 2]).mean()
        print(
            f"  chain {chain}: intercept {intercept:.3f}  slope {slope:.3f}  sigma {sigma:.3f}"
            f"  acceptance {acceptance[:, chain].mean():.2f}"
        )
    print(f"truth:   intercept {TRUE['intercept']}  slope {TRUE['slope']}  sigma {TRUE['sigma']}")
    return draws, acceptance


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run(num_steps=args.steps, seed=args.seed)
