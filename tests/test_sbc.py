"""Simulation-based calibration of :class:`rwmh.numpyro.RWMH` on the regression model.

SBC (Talts, Betancourt, Simpson, Vehtari & Gelman 2018): draw :math:`\\theta \\sim p(\\theta)`,
then :math:`y \\sim p(y \\mid \\theta)`, then :math:`L` independent draws
:math:`\\theta_1, \\dots, \\theta_L \\sim p(\\theta \\mid y)`. Then :math:`\\theta` is one more
draw from the posterior, exchangeable with the others, so the rank
:math:`\\#\\{l : f(\\theta_l) < f(\\theta)\\}` of any scalar :math:`f` is uniform on
:math:`\\{0, \\dots, L\\}`. A sampler whose draws do not follow the posterior (biased,
too narrow, too wide) bends the histogram of the ranks over many simulated data sets.

Design, for ``linear_regression`` at a fixed design of 25 points on [0, 2] (not centred, so
the intercept and the slope are correlated a posteriori and the dense proposal matters):

* ``NUM_DATASETS = 1000`` draws of (intercept, slope, sigma, y) from the model's own prior
  (``Predictive``); each is fitted by ``MCMC(RWMH(model), num_warmup=1000, num_samples=1024,
  num_chains=4, chain_method="vectorized")``.
* Thinning (Talts et al., section 5): autocorrelated draws pile the ranks up at both ends, so
  every chain keeps one draw in 32, 4 x 32 = 128 draws of which the first ``L = 127`` are
  ranked. The test asserts that the ESS of the whole run (smallest over the parameters)
  reaches ``L`` for at least 99% of the data sets, so the kept draws are close to
  independent, and that the split R-hat is below 1.05 for at least 99% of them, so SBC
  cannot pass on chains that never mixed.
* Quantities ranked: intercept, slope, sigma, and the log likelihood of the data, which
  reacts to errors in the joint posterior rather than one margin.
* Uniformity, per quantity: Pearson's chi-square over the 128 ranks grouped into 16 bins of
  8 (62.5 expected per bin, 15 degrees of freedom), sensitive to U and hump shapes; and
  Kolmogorov-Smirnov on the randomised ranks ``(rank + u) / (L + 1)``, ``u ~ U(0, 1)``,
  which are exactly U(0, 1) under uniform ranks (the KS test needs a continuous law) and
  catch shifts (a biased posterior).
* Threshold: 4 quantities x 2 tests = 8 p-values, each compared with ``0.001 / 8``
  (Bonferroni), so that a correct sampler fails with probability below 0.1% over fresh
  seeds. The seeds are fixed, so the outcome is reproducible.

ESS and R-hat come from ``numpyro.diagnostics`` (Geyer's initial monotone sequence; split
R-hat), which takes all data sets in one array; ArviZ's rank-normalised versions loop over
the data sets in Python, about 0.1 s each here, and agreed with these on a subset.

``test_sbc_detects_a_wrong_prior`` shows that the check can fail: data come from the model,
but the sampler's model has ``intercept ~ Normal(0, 1)`` instead of ``Normal(0, 10)``.

Reference: Talts, S., Betancourt, M., Simpson, D., Vehtari, A. and Gelman, A. (2018).
Validating Bayesian inference algorithms with simulation-based calibration. arXiv:1804.06788.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer import MCMC, Predictive
from scipy import stats

from rwmh.models import SIGMA_PRIOR_SCALE, SLOPE_PRIOR_SCALE, linear_regression
from rwmh.numpyro import RWMH

pytestmark = pytest.mark.slow

X = jnp.linspace(0.0, 2.0, 25)
PARAMETERS = ("intercept", "slope", "sigma")
NUM_DATASETS = 1000
NUM_CHAINS = 4
NUM_WARMUP = 1000
NUM_SAMPLES = 1024  # per chain
NUM_RANKED = 127  # L: ranks take the L + 1 = 128 values 0..127
THIN = NUM_CHAINS * NUM_SAMPLES // (NUM_RANKED + 1)  # 32: one draw in 32 per chain
NUM_BINS = 16
FAMILY_ALPHA = 1e-3
NUM_TESTS = 2 * (len(PARAMETERS) + 1)  # chi-square and KS, for each parameter and the loglik
ALPHA = FAMILY_ALPHA / NUM_TESTS


def log_likelihood(intercept, slope, sigma, y):
    """The model's log likelihood, summed over the design points: parameters of shape
    ``(..., num_datasets)``, ``y`` of shape ``(num_datasets, num_points)``."""
    loc = intercept[..., None] + slope[..., None] * np.asarray(X)
    return np.sum(stats.norm.logpdf(y, loc, sigma[..., None]), axis=-1)


def simulate_ranks(model, num_datasets, seed):
    """Ranks of the prior draws among the thinned posterior draws of ``model``.

    Returns ``(ranks, ess_over_l, rhat, num_traces)``: ranks by quantity ``(num_datasets,)``;
    the smallest ESS over the parameters divided by L, and the largest split R-hat, per
    data set; and how often the sampling function was traced (1 means compiled once).
    """
    key_prior, key_mcmc = jax.random.split(jax.random.key(seed))
    prior = Predictive(linear_regression, num_samples=num_datasets)(key_prior, X)
    num_traces = 0

    # MCMC(..., jit_model_args=True) still compiles afresh on every run (NumPyro 0.22 passes a
    # new jit wrapper as a static argument each time), so jit the whole run instead: one
    # trace, one compilation, then every data set reuses it.
    @jax.jit
    def posterior_draws(rng_key, y):
        nonlocal num_traces
        num_traces += 1
        mcmc = MCMC(
            RWMH(model),
            num_warmup=NUM_WARMUP,
            num_samples=NUM_SAMPLES,
            num_chains=NUM_CHAINS,
            chain_method="vectorized",
            progress_bar=False,
        )
        mcmc.run(rng_key, X, y)
        samples = mcmc.get_samples(group_by_chain=True)
        return jnp.stack([samples[name] for name in PARAMETERS])

    keys = jax.random.split(key_mcmc, num_datasets)
    # (parameter, chain, draw, data set)
    draws = np.stack(
        [np.asarray(posterior_draws(keys[n], prior["y"][n])) for n in range(num_datasets)],
        axis=-1,
    )
    ess = np.stack([effective_sample_size(d) for d in draws])
    rhat = np.stack([split_gelman_rubin(d) for d in draws])

    # Every chain's draws THIN - 1, 2 THIN - 1, ...: (parameter, chain * kept, data set).
    thinned = draws[:, :, THIN - 1 :: THIN].reshape(len(PARAMETERS), -1, num_datasets)
    thinned = dict(zip(PARAMETERS, thinned[:, :NUM_RANKED], strict=True))
    truth = {name: np.asarray(prior[name]) for name in PARAMETERS}
    y = np.asarray(prior["y"])
    thinned["loglik"] = log_likelihood(*(thinned[name] for name in PARAMETERS), y)
    truth["loglik"] = log_likelihood(*(truth[name] for name in PARAMETERS), y)
    ranks = {name: np.sum(thinned[name] < truth[name], axis=0) for name in thinned}
    return ranks, ess.min(axis=0) / NUM_RANKED, rhat.max(axis=0), num_traces


def uniformity_tests(ranks, seed):
    """``{(quantity, test): (statistic, p-value)}`` for the chi-square and the KS tests."""
    rng = np.random.default_rng(seed)
    results = {}
    for name, r in ranks.items():
        assert r.min() >= 0 and r.max() <= NUM_RANKED
        counts = np.bincount(r * NUM_BINS // (NUM_RANKED + 1), minlength=NUM_BINS)
        chi2 = stats.chisquare(counts)
        results[name, "chi2"] = (float(chi2.statistic), float(chi2.pvalue))
        randomised = (r + rng.uniform(size=r.shape)) / (NUM_RANKED + 1)
        ks = stats.kstest(randomised, "uniform")
        results[name, "ks"] = (float(ks.statistic), float(ks.pvalue))
        print(
            f"{name:9s} chi2 {chi2.statistic:7.2f} p {chi2.pvalue:.3g}  "
            f"KS {ks.statistic:.4f} p {ks.pvalue:.3g}  counts {counts.tolist()}"
        )
    return results


def test_sbc_ranks_are_uniform():
    ranks, ess_over_l, rhat, num_traces = simulate_ranks(linear_regression, NUM_DATASETS, 0)
    assert num_traces == 1
    print(
        f"\nmin ESS / L: min {ess_over_l.min():.2f}, 1% {np.quantile(ess_over_l, 0.01):.2f}, "
        f"median {np.median(ess_over_l):.2f}; max R-hat: median {np.median(rhat):.4f}, "
        f"max {rhat.max():.4f}, {np.sum(rhat >= 1.05)} of {rhat.size} >= 1.05"
    )
    # The chains mixed and the kept draws are close to independent for nearly every data set.
    assert np.mean(rhat < 1.05) >= 0.99
    assert np.mean(ess_over_l >= 1.0) >= 0.99
    results = uniformity_tests(ranks, seed=1)
    failures = {k: v for k, v in results.items() if v[1] <= ALPHA}
    assert not failures, failures


def narrow_intercept_regression(x, y=None):
    """``linear_regression`` with ``intercept ~ Normal(0, 1)``: the wrong prior for its data."""
    x = jnp.asarray(x)
    intercept = numpyro.sample("intercept", dist.Normal(0.0, 1.0))
    slope = numpyro.sample("slope", dist.Normal(0.0, SLOPE_PRIOR_SCALE))
    sigma = numpyro.sample("sigma", dist.HalfNormal(SIGMA_PRIOR_SCALE))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(intercept + slope * x, sigma), obs=y)


def test_sbc_detects_a_wrong_prior():
    """A posterior shrunk toward intercept 0 puts true intercepts far out in its tails: their
    ranks crowd into the end bins. 100 data sets are plenty for an effect that size."""
    ranks, _, _, _ = simulate_ranks(narrow_intercept_regression, 100, 0)
    results = uniformity_tests(ranks, seed=1)
    assert results["intercept", "chi2"][1] <= ALPHA
    assert results["intercept", "ks"][1] <= ALPHA
