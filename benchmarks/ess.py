"""Minimum bulk-ESS per second on a correlated linear-regression posterior.

One process compares, on the same posterior and with the same number of kept draws:

* ``rwmh.sample`` with its defaults (pooled warmup, 1000 steps, included in its time);
* BlackJAX's ``normal_random_walk`` at the best of five isotropic proposal scales (the grid
  search and its burn-in, from posterior draws, are not counted in its time);
* NumPyro NUTS (warmup included in its time);
* emcee's affine-invariant ensemble (burn-in included in its time);
* the oracle: rwmh's kernel with the true posterior covariance (Laplace, exact here to
  ``O(1/n)``) and the optimal scale ``2.38 / sqrt(d)``, started at stationarity.

Times are the fastest of five calls after a first one, taken in turns, so that compilation
and bursts of load on a shared machine are excluded (NUTS and emcee: one timed call), except
in the last lines, which
compares the *first* call of ``rwmh.sample`` (compilation included) with the first call of
a compiled BlackJAX loop of as many steps. Absolute times drift on shared machines; the
ratios are what to read.

The posterior: 1000 points with ``x ~ N(2, 1)`` and ``y = 1 + 2 x + 0.5 e``, so that the
intercept and slope correlate at about -0.89 (the issue's posterior); priors as in
:func:`rwmh.models.linear_regression`; parameters ``(intercept, slope, log sigma)``. Run it
with::

    python benchmarks/ess.py             # x ~ N(2, 1), corr -0.89
    python benchmarks/ess.py --x-mean 3  # x ~ N(3, 1), corr -0.95
"""

from __future__ import annotations

import time
import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np

import rwmh
from rwmh import models

# These targets have one mode, and warmup moving a chain that lags far behind is expected; the
# benchmark times the runs, so it does not print the warning each of them would give.
warnings.filterwarnings("ignore", category=rwmh.RestartWarning)

NUM_CHAINS = 4
NUM_WARMUP = 1000
NUM_SAMPLES = 10000  # kept draws per chain, the same for every method
NAMES = ("intercept", "slope", "log_sigma")
ISOTROPIC_SCALES = (0.01, 0.02, 0.035, 0.06, 0.1)


#: Mean of the predictor. 2 gives corr(intercept, slope) of about -2 / sqrt(5) = -0.89, the
#: issue's posterior; ``--x-mean 3`` gives -3 / sqrt(10) = -0.95, on which the best isotropic
#: proposal is further from the full covariance (condition number 117 against 33), so every
#: covariance-adapting sampler gains more.
X_MEAN = 2.0


def make_data(seed=0, num_points=1000, x_mean=X_MEAN):
    rng = np.random.default_rng(seed)
    x = rng.normal(x_mean, 1.0, num_points)
    y = 1.0 + 2.0 * x + 0.5 * rng.normal(size=num_points)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


X, Y = make_data()


def logdensity(theta):
    """The NumPyro model's log density on ``(intercept, slope, log sigma)``, Jacobian included."""
    intercept, slope, log_sigma = theta[0], theta[1], theta[2]
    sigma = jnp.exp(log_sigma)
    prior = (
        -0.5 * (intercept / models.INTERCEPT_PRIOR_SCALE) ** 2
        - 0.5 * (slope / models.SLOPE_PRIOR_SCALE) ** 2
        - 0.5 * (sigma / models.SIGMA_PRIOR_SCALE) ** 2
        + log_sigma
    )
    residual = (Y - intercept - slope * X) / sigma
    return prior - X.shape[0] * log_sigma - 0.5 * jnp.sum(residual**2)


def min_ess(draws):
    """Minimum bulk ESS over parameters; ``draws`` is ``(chain, draw, 3)``."""
    posterior = {name: np.asarray(draws[..., i], float) for i, name in enumerate(NAMES)}
    ess = az.ess(rwmh.to_inference_data(posterior), method="bulk")
    return min(float(ess[name]) for name in NAMES)


def initial_positions(key, num=NUM_CHAINS):
    # As NumPyro's init_to_uniform: uniform(-2, 2) in the unconstrained space.
    return jax.random.uniform(key, (num, 3), minval=-2.0, maxval=2.0)


def timed(fn, *args, repeats=3):
    """``(output, seconds)``: the fastest of ``repeats`` calls, since on a shared machine the
    slower ones measure other people's work."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return out, best


# --- rwmh -----------------------------------------------------------------------------------


def run_rwmh(seed, positions=None):
    if positions is None:
        positions = initial_positions(jax.random.key(100 + seed))
    result = rwmh.sample(
        jax.random.key(seed),
        logdensity,
        positions,
        num_samples=NUM_SAMPLES,
        num_warmup=NUM_WARMUP,
        progress_bar=False,
    )
    return result


# --- BlackJAX -------------------------------------------------------------------------------


def blackjax_loop(num_steps):
    """A compiled loop of ``num_steps`` vmapped BlackJAX random-walk steps at a given scale."""
    import blackjax

    @jax.jit
    def run(key, positions, scale):
        algorithm = blackjax.normal_random_walk(logdensity, scale * jnp.ones(3))
        states = jax.vmap(algorithm.init)(positions)

        def one_step(states, key):
            keys = jax.random.split(key, NUM_CHAINS)
            states, info = jax.vmap(algorithm.step)(keys, states)
            return states, (states.position, info.acceptance_rate)

        states, (draws, acceptance) = jax.lax.scan(
            one_step, states, jax.random.split(key, num_steps)
        )
        return states.position, jnp.swapaxes(draws, 0, 1), acceptance

    return run


# --- NumPyro NUTS and emcee -----------------------------------------------------------------


def make_nuts():
    from numpyro.infer import MCMC, NUTS, init_to_uniform

    return MCMC(
        NUTS(models.linear_regression, init_strategy=init_to_uniform),
        num_warmup=NUM_WARMUP,
        num_samples=NUM_SAMPLES,
        num_chains=NUM_CHAINS,
        chain_method="vectorized",
        progress_bar=False,
    )


def run_nuts(mcmc, seed):
    mcmc.run(jax.random.key(seed), X, Y, extra_fields=("accept_prob",))
    samples = mcmc.get_samples(group_by_chain=True)
    draws = np.stack([samples["intercept"], samples["slope"], np.log(samples["sigma"])], axis=-1)
    return jax.block_until_ready(draws)


def run_emcee(seed, num_walkers=8):
    import emcee

    batched = jax.jit(jax.vmap(logdensity))
    log_prob = lambda thetas: np.asarray(batched(jnp.asarray(thetas, jnp.float32)), float)
    log_prob(np.zeros((num_walkers, 3)))  # compile outside the timed region
    start = np.asarray(initial_positions(jax.random.key(100 + seed), num_walkers), float)
    np.random.seed(seed)  # emcee draws from numpy's global generator
    sampler = emcee.EnsembleSampler(num_walkers, 3, log_prob, vectorize=True)
    t0 = time.perf_counter()
    sampler.run_mcmc(start, NUM_WARMUP + NUM_SAMPLES, progress=False)
    elapsed = time.perf_counter() - t0
    draws = np.swapaxes(sampler.get_chain()[NUM_WARMUP:], 0, 1)
    return draws, elapsed, float(np.mean(sampler.acceptance_fraction)), num_walkers


# --- the oracle -----------------------------------------------------------------------------


def laplace():
    """Posterior mode and covariance (inverse Hessian of -log density at the mode)."""
    theta = jnp.asarray([1.0, 2.0, np.log(0.5)], jnp.float32)
    grad, hess = jax.grad(logdensity), jax.hessian(logdensity)
    for _ in range(20):  # Newton from near the truth
        theta = theta - jnp.linalg.solve(hess(theta), grad(theta))
    covariance = np.linalg.inv(-np.asarray(hess(theta), float))
    return np.asarray(theta, float), covariance


def run_oracle(seed, mode, covariance):
    rng = np.random.default_rng(seed)
    start = rng.multivariate_normal(mode, covariance, NUM_CHAINS).astype(np.float32)
    return rwmh.sample(
        jax.random.key(seed),
        logdensity,
        jnp.asarray(start),
        num_samples=NUM_SAMPLES,
        num_warmup=0,
        step_size=2.38 / np.sqrt(3),
        proposal_cov=covariance.astype(np.float32),
        progress_bar=False,
    )


def main():
    print(
        f"Posterior: 1000-point regression, sample mean of x {float(np.mean(X)):.2f}; "
        f"{NUM_CHAINS} chains, {NUM_SAMPLES} kept draws per chain for every method "
        f"({NUM_WARMUP} warmup/burn-in steps where a method has them)."
    )
    mode, covariance = laplace()
    sd = np.sqrt(np.diag(covariance))
    print(
        f"Laplace sd {np.round(sd, 4)}, corr(intercept, slope) "
        f"{covariance[0, 1] / (sd[0] * sd[1]):.3f}, condition number of the covariance "
        f"{np.linalg.cond(covariance):.0f}"
    )
    rows = []

    # First calls, compilation included: rwmh.sample against a compiled BlackJAX loop of as
    # many steps (warmup + sampling). The initial positions are made beforehand, so neither
    # call pays for compiling the uniform draw; rwmh goes first, so it also pays for whatever
    # the first compilation of a loop in a process costs.
    first_positions = jax.block_until_ready(initial_positions(jax.random.key(100)))
    start = time.perf_counter()
    result = run_rwmh(0, first_positions)
    rwmh_first = time.perf_counter() - start
    loop = blackjax_loop(NUM_WARMUP + NUM_SAMPLES)
    start = time.perf_counter()
    jax.block_until_ready(loop(jax.random.key(0), first_positions, 0.02))
    blackjax_first = time.perf_counter() - start

    # BlackJAX: a grid of isotropic scales, each burnt in and sampled. To be fair to the
    # baseline the grid starts from draws of the posterior itself, so that a small scale is
    # not penalised for a slow burn-in (which is not timed anyway).
    rng = np.random.default_rng(7)
    positions = jnp.asarray(rng.multivariate_normal(mode, covariance, NUM_CHAINS), jnp.float32)
    burn_in, sampling = blackjax_loop(NUM_WARMUP), blackjax_loop(NUM_SAMPLES)
    grid = []
    for scale in ISOTROPIC_SCALES:
        start_positions, _, _ = burn_in(jax.random.key(2), positions, scale)
        _, draws, acceptance = sampling(jax.random.key(3), start_positions, scale)
        grid.append((min_ess(draws), scale, start_positions, draws, acceptance))
    print(
        "BlackJAX isotropic grid (scale: min ESS): "
        + ", ".join(f"{g[1]}: {g[0]:.0f}" for g in grid)
    )
    blackjax_ess, best_scale, start_positions, _, acceptance = max(grid, key=lambda g: g[0])
    run_oracle(0, mode, covariance)

    # The fast methods are timed in turns, fastest of five each, so that a burst of load on
    # the shared machine does not favour one of them.
    times = {"rwmh": [], "blackjax": [], "oracle": []}
    for _ in range(5):
        _, seconds = timed(run_rwmh, 1, repeats=1)
        times["rwmh"].append(seconds)
        _, seconds = timed(sampling, jax.random.key(4), start_positions, best_scale, repeats=1)
        times["blackjax"].append(seconds)
        _, seconds = timed(run_oracle, 1, mode, covariance, repeats=1)
        times["oracle"].append(seconds)
    result = run_rwmh(1)
    rwmh_elapsed, rwmh_ess = min(times["rwmh"]), min_ess(result.positions)
    rows.append(
        (
            "rwmh.sample (warmup incl.)",
            rwmh_elapsed,
            rwmh_ess,
            float(np.mean(result.stats["acceptance_rate"])),
        )
    )
    blackjax_elapsed = min(times["blackjax"])
    rows.append(
        (
            f"BlackJAX RW, isotropic {best_scale}",
            blackjax_elapsed,
            blackjax_ess,
            float(np.mean(acceptance)),
        )
    )

    # NumPyro NUTS: second run of the same MCMC object reuses its compiled functions.
    mcmc = make_nuts()
    run_nuts(mcmc, 0)
    draws, elapsed = timed(run_nuts, mcmc, 1, repeats=1)
    accept = float(np.mean(mcmc.get_extra_fields()["accept_prob"]))
    rows.append(("NumPyro NUTS (warmup incl.)", elapsed, min_ess(draws), accept))

    draws, elapsed, accept, walkers = run_emcee(0)
    rows.append((f"emcee, {walkers} walkers (burn-in incl.)", elapsed, min_ess(draws), accept))

    result = run_oracle(1, mode, covariance)
    elapsed = min(times["oracle"])
    rows.append(
        (
            "oracle: RWMH, true covariance",
            elapsed,
            min_ess(result.positions),
            float(np.mean(result.stats["acceptance_rate"])),
        )
    )
    oracle_rate = rows[-1][2] / elapsed

    print()
    print(f"{'method':<40} {'time s':>8} {'min ESS':>9} {'ESS/s':>10} {'accept':>7}")
    for name, seconds, ess, accept in rows:
        print(f"{name:<40} {seconds:8.3f} {ess:9.0f} {ess / seconds:10.0f} {accept:7.3f}")
    rwmh_rate = rwmh_ess / rwmh_elapsed
    print()
    print(
        f"rwmh / best isotropic BlackJAX, min ESS per second: "
        f"{rwmh_rate / (blackjax_ess / blackjax_elapsed):.1f}x (acceptance line: >= 3)"
    )
    print(f"rwmh / best isotropic BlackJAX, min ESS per draw:   {rwmh_ess / blackjax_ess:.1f}x")
    print(f"rwmh / oracle, min ESS per second:                  {rwmh_rate / oracle_rate:.2f}")
    print()
    print(f"first call, compilation included ({NUM_WARMUP + NUM_SAMPLES} steps x {NUM_CHAINS}):")
    print(
        f"  rwmh.sample {rwmh_first:.2f} s, BlackJAX loop {blackjax_first:.2f} s, ratio "
        f"{rwmh_first / blackjax_first:.2f} (acceptance line: <= 3)"
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--x-mean", type=float, default=X_MEAN, help="mean of the predictor x")
    parser.add_argument("--quick", action="store_true", help="200 warmup steps and 500 draws")
    arguments = parser.parse_args()
    if arguments.quick:  # every function reads these module globals when it runs
        NUM_WARMUP, NUM_SAMPLES = 200, 500
    if arguments.x_mean != X_MEAN:
        X, Y = make_data(x_mean=arguments.x_mean)
    main()
