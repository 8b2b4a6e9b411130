"""Validation of ``rwmh.sample`` with its defaults against posteriordb reference posteriors.

Each posterior is a Gaussian linear regression written as a JAX log density on the
unconstrained space ``(coefficients, log sigma)``: the priors are exactly those of the Stan
program (a parameter with no ``~`` statement has a flat prior on its constrained scale) and
the change of variables adds the Jacobian ``log sigma``. Predictors are built as in each
program's ``transformed data``. For every parameter, on the constrained scale, the posterior
mean must lie within 5 combined Monte Carlo standard errors of the reference, the sd within
10% and the R-hat below 1.02.

The data live in ``../shared/posteriordb`` beside the repository; see its README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwmh

POSTERIORDB = Path(__file__).resolve().parents[1].parent / "shared" / "posteriordb"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not POSTERIORDB.is_dir(),
        reason=f"posteriordb data not found at {POSTERIORDB} (expected beside the repository)",
    ),
]

NUM_CHAINS = 8
NUM_SAMPLES = 4000


def _normal_logpdf(x, loc, scale):
    """Normal log density up to its constant, which cancels in Metropolis-Hastings."""
    return -0.5 * jnp.sum(((x - loc) / scale) ** 2)


def _flat(x):
    return 0.0


def _regression(X, y, coef_logprior, sigma_logprior):
    """Log density of ``y ~ normal(X @ coef, sigma)`` on ``theta = (coef, log sigma)``."""
    X = jnp.asarray(X, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    num_points = y.shape[0]

    def logdensity(theta):
        coef, log_sigma = theta[:-1], theta[-1]
        sigma = jnp.exp(log_sigma)
        residual = (y - X @ coef) / sigma
        loglik = -num_points * log_sigma - 0.5 * jnp.sum(residual**2)
        # + log_sigma: the Jacobian of sigma = exp(log_sigma), so that the prior stays the one
        # Stan puts on sigma itself.
        return loglik + coef_logprior(coef) + sigma_logprior(sigma) + log_sigma

    return logdensity


def _half_cauchy(scale):
    return lambda sigma: -jnp.log1p((sigma / scale) ** 2)


def _half_normal(scale):
    return lambda sigma: -0.5 * (sigma / scale) ** 2


def _build(name, data):
    """``(logdensity, parameter names)`` for one posterior, as its model.stan reads."""
    ones = np.ones(data["N"])
    if name.startswith("kidiq-"):
        predictor = "mom_hs" if name.endswith("momhs") else "mom_iq"
        X = np.column_stack([ones, data[predictor]])
        logdensity = _regression(X, data["kid_score"], _flat, _half_cauchy(2.5))
        return logdensity, ["beta[1]", "beta[2]", "sigma"]
    if name == "earnings-logearn_interaction_z":
        height = np.asarray(data["height"], float)
        male = np.asarray(data["male"], float)
        z_height = (height - height.mean()) / height.std(ddof=1)  # Stan's sd() is N - 1
        X = np.column_stack([ones, z_height, male, z_height * male])
        logdensity = _regression(X, np.log(data["earn"]), _flat, _flat)
        return logdensity, [f"beta[{i}]" for i in range(1, 5)] + ["sigma"]
    if name == "mesquite-logmesquite_logvolume":
        diam1, diam2 = np.asarray(data["diam1"]), np.asarray(data["diam2"])
        log_canopy_volume = np.log(diam1 * diam2 * np.asarray(data["canopy_height"]))
        X = np.column_stack([ones, log_canopy_volume])
        logdensity = _regression(X, np.log(data["weight"]), _flat, _flat)
        return logdensity, ["beta[1]", "beta[2]", "sigma"]
    if name == "mesquite-logmesquite":
        columns = ["diam1", "diam2", "canopy_height", "total_height", "density"]
        X = np.column_stack([ones] + [np.log(data[c]) for c in columns] + [data["group"]])
        logdensity = _regression(X, np.log(data["weight"]), _flat, _flat)
        return logdensity, [f"beta[{i}]" for i in range(1, 8)] + ["sigma"]
    if name in ("sblri-blr", "sblrc-blr"):
        # No intercept: mu = X * beta.
        logdensity = _regression(
            data["X"], data["y"], lambda b: _normal_logpdf(b, 0.0, 10.0), _half_normal(10.0)
        )
        return logdensity, [f"beta[{i}]" for i in range(1, data["D"] + 1)] + ["sigma"]
    if name == "kilpisjarvi_mod-kilpisjarvi":
        X = np.column_stack([ones, data["x"]])
        loc = jnp.asarray([data["pmualpha"], data["pmubeta"]], jnp.float32)
        scale = jnp.asarray([data["psalpha"], data["psbeta"]], jnp.float32)
        logdensity = _regression(X, data["y"], lambda c: _normal_logpdf(c, loc, scale), _flat)
        return logdensity, ["alpha", "beta", "sigma"]
    raise KeyError(name)


POSTERIORS = [
    "earnings-logearn_interaction_z",
    "kidiq-kidscore_momhs",
    "kidiq-kidscore_momiq",
    "kilpisjarvi_mod-kilpisjarvi",
    "mesquite-logmesquite",
    "mesquite-logmesquite_logvolume",
    "sblrc-blr",
    "sblri-blr",
]


def _sample(name, seed=0):
    folder = POSTERIORDB / name
    data = json.loads((folder / "data.json").read_text())
    logdensity, names = _build(name, data)
    init_key, key = jax.random.split(jax.random.key(seed))
    # Random initial positions in the unconstrained space, as NumPyro's init_to_uniform.
    initial = jax.random.uniform(init_key, (NUM_CHAINS, len(names)), minval=-2.0, maxval=2.0)
    result = rwmh.sample(key, logdensity, initial, num_samples=NUM_SAMPLES, progress_bar=False)
    draws = np.asarray(result.positions, float)
    constrained = draws.copy()
    constrained[..., -1] = np.exp(draws[..., -1])
    posterior = {n: constrained[..., i] for i, n in enumerate(names)}
    reference = json.loads((folder / "reference_summary.json").read_text())["parameters"]
    return result, rwmh.to_inference_data(posterior), reference


# Seed 1 on kidiq-kidscore_momiq starts one chain where sigma runs off to about 700 with the
# coefficients far from the fit; tuned on the other chains, its proposals are too small for it
# to come back within the warmup unless warmup restarts stranded chains (R-hat was 2.1).
CASES = [(name, 0) for name in POSTERIORS] + [("kidiq-kidscore_momiq", 1)]


@pytest.mark.parametrize("name, seed", CASES)
def test_matches_reference(name, seed):
    result, idata, reference = _sample(name, seed)
    mean_mcse = az.mcse(idata, method="mean")
    rhat = az.rhat(idata)
    lines = []
    failures = []
    for parameter, ref in reference.items():
        draws = idata.posterior[parameter].values
        mean, sd = draws.mean(), draws.std(ddof=1)
        mcse = float(np.hypot(mean_mcse[parameter].values, ref["mcse_mean_approx"]))
        z = (mean - ref["mean"]) / mcse
        sd_error = sd / ref["sd"] - 1.0
        r_hat = float(rhat[parameter].values)
        lines.append(
            f"{parameter}: mean {mean:.6g} ref {ref['mean']:.6g} z {z:+.2f}, "
            f"sd error {sd_error:+.3f}, R-hat {r_hat:.4f}"
        )
        if abs(z) > 5 or abs(sd_error) > 0.10 or not r_hat < 1.02:
            failures.append(parameter)
    report = (
        f"{name}, seed {seed} (acceptance {np.mean(result.stats['acceptance_rate']):.3f}):\n  "
        + ("\n  ".join(lines))
    )
    print(report)
    assert not failures, report
