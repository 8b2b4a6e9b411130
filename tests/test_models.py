"""Tests of rwmh.models: the regression simulator and the NumPyro regression model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer import Predictive
from scipy import stats

from rwmh.models import linear_regression, simulate_linear_regression


def test_simulation_follows_the_stated_line_and_noise():
    x, y = simulate_linear_regression(
        jax.random.key(0), 20_000, intercept=-1.0, slope=0.5, sigma=2.0
    )
    assert x.shape == y.shape == (20_000,)
    slope, intercept = np.polyfit(np.asarray(x), np.asarray(y), 1)
    residual_sd = np.std(np.asarray(y) - (intercept + slope * np.asarray(x)))
    # Least-squares standard errors at n = 20000 are about 0.014; allow 5 of them.
    assert abs(intercept - -1.0) < 0.07
    assert abs(slope - 0.5) < 0.07
    assert abs(residual_sd - 2.0) < 0.05


def test_simulation_is_reproducible_and_accepts_both_key_kinds():
    a = simulate_linear_regression(jax.random.key(3), 10)
    b = simulate_linear_regression(jax.random.key(3), 10)
    c = simulate_linear_regression(jax.random.PRNGKey(3), 10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert c[0].shape == (10,)
    assert np.asarray(simulate_linear_regression(jax.random.key(3), np.int64(4))[0]).shape == (4,)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_points": 0}, "num_points"),
        ({"num_points": 2.5}, "num_points"),
        ({"num_points": True}, "num_points"),
        ({"num_points": 5, "sigma": 0.0}, "sigma"),
        ({"num_points": 5, "sigma": float("nan")}, "sigma"),
    ],
)
def test_simulation_rejects_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        simulate_linear_regression(jax.random.key(0), **kwargs)


def test_model_sites_and_supports():
    x, y = simulate_linear_regression(jax.random.key(0), 7)
    trace = handlers.trace(handlers.seed(linear_regression, 0)).get_trace(x, y)
    latent = {k for k, s in trace.items() if s["type"] == "sample" and not s["is_observed"]}
    assert latent == {"intercept", "slope", "sigma"}
    assert trace["y"]["is_observed"]
    np.testing.assert_array_equal(trace["y"]["value"], y)
    assert float(trace["sigma"]["value"]) > 0
    assert trace["sigma"]["fn"].support is constraints.positive


def test_log_joint_matches_the_formula():
    x, y = simulate_linear_regression(jax.random.key(0), 5)
    params = {"intercept": jnp.array(0.3), "slope": jnp.array(-1.2), "sigma": jnp.array(0.7)}
    trace = handlers.trace(
        handlers.substitute(handlers.seed(linear_regression, 0), params)
    ).get_trace(x, y)
    log_joint = sum(
        jnp.sum(s["fn"].log_prob(s["value"])) for s in trace.values() if s["type"] == "sample"
    )
    expected = (
        stats.norm(0, 10).logpdf(0.3)
        + stats.norm(0, 10).logpdf(-1.2)
        + stats.halfnorm(scale=5).logpdf(0.7)
        + stats.norm(0.3 - 1.2 * np.asarray(x), 0.7).logpdf(np.asarray(y)).sum()
    )
    np.testing.assert_allclose(float(log_joint), expected, rtol=1e-5)


def test_prior_predictive_simulates_y_without_observations():
    x, _ = simulate_linear_regression(jax.random.key(0), 30)
    prior = Predictive(linear_regression, num_samples=200)(jax.random.key(1), x)
    assert prior["y"].shape == (200, 30)
    assert prior["sigma"].shape == (200,)
    assert np.all(np.asarray(prior["sigma"]) > 0)
