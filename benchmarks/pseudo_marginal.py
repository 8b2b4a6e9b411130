"""Correlated against plain pseudo-marginal RWMH on the AR(1) state-space model, one process.

For ``correlation`` 0 and 0.99 and a range of particle counts, ``rwmh.sample`` runs the
pseudo-marginal kernel on the posterior of ``rwmh.models.ar1_state_space`` with the *same*
step size and proposal covariance (those adapted by the exact, Kalman-likelihood run, which
also gives the starting points: its last states, draws from the posterior), so that the
acceptance rate measures the estimator's noise alone. Printed per row: the sd of the
log-likelihood estimate and of the log ratio at a nearby point (``rwmh.estimator_noise``), the
mean acceptance rate, the minimum bulk ESS and the ESS per second (compilation excluded: every
configuration is compiled by a first call of one chunk, then timed).

The summary gives, for each correlation, the fewest particles reaching the same acceptance
rate (half the exact kernel's at these parameters), and the ESS per second of rho = 0.99
against rho = 0 at each particle count. Absolute times drift on shared machines; read the
ratios. Run::

    python benchmarks/pseudo_marginal.py          # 100 observations, 16 chains, 2000 draws
    python benchmarks/pseudo_marginal.py --quick  # 50 observations, 4 chains, 500 draws
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

warnings.filterwarnings("ignore", category=rwmh.RestartWarning)

SETTINGS = {
    "full": {"times": 100, "chains": 16, "samples": 2000, "particles": (4, 8, 16, 32, 64)},
    "quick": {"times": 50, "chains": 4, "samples": 500, "particles": (4, 16, 32)},
}
CHUNK = 250
CORRELATIONS = (0.0, 0.99)


def timed_run(key, logdensity, start, num_samples, parameters):
    """Sampling only, with fixed parameters; the compiled chunk is reused from a first call."""
    options = dict(num_warmup=0, progress_bar=False, chunk_size=CHUNK, **parameters)
    rwmh.sample(key, logdensity, start, CHUNK, **options)  # compiles the chunk
    begin = time.perf_counter()
    result = rwmh.sample(key, logdensity, start, num_samples, **options)
    seconds = time.perf_counter() - begin
    ess = np.asarray(az.ess(az.convert_to_dataset({"x": np.asarray(result.positions)}))["x"])
    return float(np.mean(result.stats["acceptance_rate"])), float(ess.min()), seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 observations, 4 chains")
    args = parser.parse_args(argv)
    settings = SETTINGS["quick" if args.quick else "full"]

    data_key, start_key, key = jax.random.split(jax.random.key(0), 3)
    _, y = simulate_ar1(data_key, settings["times"])
    exact_model = ar1_state_space(y, 2)
    start = jnp.array([np.arctanh(0.95), np.log(0.3), 0.0]) + 0.1 * jax.random.normal(
        start_key, (settings["chains"], 3)
    )
    exact = rwmh.sample(key, exact_model.logdensity_fn, start, 1000, 1000, progress_bar=False)
    parameters = {
        "step_size": float(exact.parameters["step_size"]),
        "proposal_cov": np.asarray(exact.parameters["proposal_cov"]),
    }
    posterior = exact.last_state.position
    draws = np.asarray(exact.positions).reshape(-1, 3)
    mean, sd = draws.mean(axis=0), draws.std(axis=0)
    exact_acceptance, exact_ess, exact_seconds = timed_run(
        key, exact_model.logdensity_fn, posterior, settings["samples"], parameters
    )
    target_acceptance = 0.5 * exact_acceptance
    print(
        f"AR(1), {settings['times']} observations, {settings['chains']} chains x "
        f"{settings['samples']} draws; step size {parameters['step_size']:.3f} and covariance "
        "from the exact run"
    )
    print(
        f"exact (Kalman): acceptance {exact_acceptance:.3f}, min bulk ESS {exact_ess:.0f}, "
        f"ESS/s {exact_ess / exact_seconds:.0f}"
    )
    print(
        f"{'rho':>5} {'particles':>9} {'sd log L':>9} {'sd ratio':>9} {'accept':>7} "
        f"{'min ESS':>8} {'ESS/s':>8}"
    )
    rows = {}
    for correlation in CORRELATIONS:
        for num_particles in settings["particles"]:
            target = ar1_state_space(y, num_particles, correlation).target
            noise = rwmh.estimator_noise(
                target, jax.random.key(1), mean[None], 100, nearby=(mean + 0.5 * sd)[None]
            )
            acceptance, ess, seconds = timed_run(
                key, target, posterior, settings["samples"], parameters
            )
            rows[correlation, num_particles] = (acceptance, ess / seconds)
            print(
                f"{correlation:>5} {num_particles:>9} {noise.log_estimate_sd[0]:>9.2f} "
                f"{noise.log_ratio_sd[0]:>9.2f} {acceptance:>7.3f} {ess:>8.0f} "
                f"{ess / seconds:>8.1f}",
                flush=True,
            )

    print(
        f"\nfewest particles for acceptance >= {target_acceptance:.3f} (half the exact kernel's):"
    )
    for correlation in CORRELATIONS:
        enough = [n for n in settings["particles"] if rows[correlation, n][0] >= target_acceptance]
        found = str(min(enough)) if enough else f"more than {max(settings['particles'])}"
        print(f"  rho = {correlation}: {found}")
    print("ESS per second, rho = 0.99 against rho = 0, at the same particle count:")
    for n in settings["particles"]:
        plain, correlated = rows[0.0, n][1], rows[0.99, n][1]
        ratio = correlated / plain if plain > 0 else float("inf")
        print(f"  {n:>4} particles: {correlated:.1f} / {plain:.1f} = {ratio:.2f}")
    return rows


if __name__ == "__main__":
    main()
