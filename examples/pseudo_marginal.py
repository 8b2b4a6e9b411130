"""A likelihood estimated by a particle filter: pseudo-marginal RWMH, plain and correlated.

The model is a latent AR(1) observed with noise (``rwmh.models.ar1_state_space``):
``x_t = phi x_{t-1} + s_x e_t``, ``y_t = x_t + s_y f_t``. Its likelihood is known exactly
(Kalman filter), which lets this example check the pseudo-marginal answer; in the models
people actually fit this way it is not, and a bootstrap particle filter estimates it. The
filter's randomness is not a bug here: it is an *estimator* of the likelihood, written as a
deterministic function of standard normals ``u``, and ``rwmh.EstimatedLogDensity`` tells
``rwmh.sample`` to carry ``u`` and the estimate in each chain's state, which makes the draws
exact (pseudo-marginal Metropolis-Hastings, Andrieu and Roberts 2009).

The example

1. fits the model with the exact likelihood;
2. measures the particle filter's noise at the posterior mean (``rwmh.estimator_noise``): the
   sd of the log-likelihood estimate (aim for about 1.2 with ``correlation=0``) and the sd of
   the log ratio of the estimates at two nearby points under correlated ``u``;
3. fits it pseudo-marginally with ``correlation=0`` and ``correlation=0.99`` (the same particle
   count), and prints each posterior against the exact one and the bulk ESS per second.

Run ``python examples/pseudo_marginal.py`` (about a minute or two on a laptop);
``--quick`` for a smaller run, ``--help`` for the settings.
"""

from __future__ import annotations

import argparse
import time
import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np

import rwmh
from rwmh.models import ar1_state_space, simulate_ar1

TRUE = {"phi": 0.95, "state_sd": 0.3, "observation_sd": 1.0}


def fit(rng_key, logdensity, start, num_warmup, num_samples):
    """Run ``rwmh.sample``; return ``(draws (chain, draw, 3), seconds, min bulk ESS)``. The
    time includes compilation, which costs about the same for both pseudo-marginal runs."""
    begin = time.perf_counter()
    result = rwmh.sample(rng_key, logdensity, start, num_samples, num_warmup, progress_bar=False)
    draws = np.asarray(result.positions)
    seconds = time.perf_counter() - begin
    ess = np.asarray(az.ess(az.convert_to_dataset({"x": draws}))["x"])
    return draws, seconds, float(ess.min()), float(np.mean(result.stats["acceptance_rate"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, default=100, help="number of observations")
    parser.add_argument("--particles", type=int, default=32)
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="50 times, 4 chains, 300 + 300")
    args = parser.parse_args(argv)
    if args.quick:
        args.times, args.particles, args.chains, args.warmup, args.samples = 50, 20, 4, 300, 300
    # A chain that warmup moves is not news here.
    warnings.filterwarnings("ignore", category=rwmh.RestartWarning)

    data_key, start_key, key = jax.random.split(jax.random.key(0), 3)
    _, y = simulate_ar1(data_key, args.times, **TRUE)
    model = ar1_state_space(y, args.particles)
    truth = np.array([np.arctanh(TRUE["phi"]), np.log(TRUE["state_sd"]), 0.0])
    start = jnp.asarray(truth) + 0.1 * jax.random.normal(start_key, (args.chains, 3))

    exact, seconds, ess, acceptance = fit(
        key, model.logdensity_fn, start, args.warmup, args.samples
    )
    mean, sd = exact.mean(axis=(0, 1)), exact.std(axis=(0, 1))
    print(f"{args.times} observations, {args.particles} particles, {args.chains} chains")
    print(f"exact (Kalman): {seconds:.1f} s, min bulk ESS {ess:.0f}, acceptance {acceptance:.2f}")

    nearby = mean + 0.5 * sd  # a typical proposal away, on every coordinate
    fits = {"exact": exact}
    for correlation in (0.0, 0.99):
        target = rwmh.EstimatedLogDensity(
            model.target.logdensity_estimator, model.aux_shape, correlation
        )
        noise = rwmh.estimator_noise(
            target, jax.random.key(1), mean[None], num_repeats=200, nearby=nearby[None]
        )
        draws, seconds, ess, acceptance = fit(key, target, start, args.warmup, args.samples)
        fits[correlation] = draws
        print(
            f"\ncorrelation {correlation}: sd of the log-likelihood estimate "
            f"{noise.log_estimate_sd[0]:.2f}, sd of the log ratio at a nearby point "
            f"{noise.log_ratio_sd[0]:.2f}"
        )
        print(
            f"  {seconds:.1f} s, acceptance {acceptance:.2f}, min bulk ESS {ess:.0f}, "
            f"ESS per second {ess / seconds:.1f}"
        )
        print("  parameter            exact mean (sd)    pseudo-marginal mean (sd)")
        for i, name in enumerate(model.names):
            pm_mean, pm_sd = draws[..., i].mean(), draws[..., i].std()
            print(f"  {name:<20} {mean[i]:+.3f} ({sd[i]:.3f})    {pm_mean:+.3f} ({pm_sd:.3f})")
    return fits


if __name__ == "__main__":
    main()
