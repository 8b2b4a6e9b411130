"""Fit the linear regression of :mod:`rwmh.models` with RWMH inside ``numpyro.infer.MCMC``.

Four chains run vectorized on one device; their warmup pools its statistics, so all chains
share one adapted step size and proposal covariance. The script prints NumPyro's summary,
then converts the run to ArviZ (posterior, sample_stats with ``acceptance_rate`` and ``lp``,
pointwise log likelihood) and prints ArviZ's summary, R-hat and the PSIS-LOO estimate.

Run::

    PYTHONPATH=src python examples/numpyro_regression.py [--points 200 --warmup 1000 --samples 2000]
"""

import argparse

import arviz as az
import jax
import numpy as np
from numpyro.infer import MCMC, Predictive

import rwmh.arviz
from rwmh.models import linear_regression, simulate_linear_regression
from rwmh.numpyro import RWMH

TRUTH = {"intercept": 1.0, "slope": 2.0, "sigma": 0.5}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data_key, mcmc_key, predictive_key = jax.random.split(jax.random.key(args.seed), 3)
    x, y = simulate_linear_regression(data_key, args.points, **TRUTH)

    mcmc = MCMC(
        RWMH(linear_regression),
        num_warmup=args.warmup,
        num_samples=args.samples,
        num_chains=args.chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(mcmc_key, x, y, extra_fields=("step_size",))
    print(f"simulated truth: {TRUTH}")
    mcmc.print_summary()

    fields = mcmc.get_extra_fields()
    print(
        f"adapted step size {float(fields['step_size'][-1]):.3f}, "
        f"mean acceptance probability {float(np.mean(fields['accept_prob'])):.3f}"
    )
    covariance = np.asarray(mcmc.last_state.adapt_state.proposal_cov)
    print("adapted proposal covariance (unconstrained intercept, sigma, slope):")
    print(np.array2string(covariance, precision=5))

    # Posterior predictive check: the share of observations inside the central 90% band.
    predictions = Predictive(linear_regression, posterior_samples=mcmc.get_samples())(
        predictive_key, x
    )["y"]
    low, high = np.percentile(np.asarray(predictions), [5, 95], axis=0)
    inside = np.mean((np.asarray(y) >= low) & (np.asarray(y) <= high))
    print(f"observations inside the 90% posterior predictive band: {inside:.1%}")

    # ArviZ 1.x leaves the pointwise log likelihood (for LOO) out unless asked; 0.x includes it.
    idata = az.from_numpyro(mcmc, log_likelihood=True)
    print(idata)
    print(rwmh.arviz.summary(idata, var_names=list(TRUTH)).round(3).to_string())
    print("sample_stats:", sorted(idata.sample_stats.data_vars))
    rhat = az.rhat(idata, var_names=list(TRUTH))
    print("max R-hat:", max(float(rhat[name]) for name in TRUTH))
    print(az.loo(idata))


if __name__ == "__main__":
    main()
