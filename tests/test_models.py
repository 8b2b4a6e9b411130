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


# --- the AR(1) state-space model --------------------------------------------------------------


def _ar1_position(phi, state_sd, observation_sd):
    return jnp.array([np.arctanh(phi), np.log(state_sd), np.log(observation_sd)])


def test_kalman_loglik_is_the_gaussian_loglik_of_the_observations():
    from rwmh.models import ar1_kalman_loglik, simulate_ar1

    phi, state_sd, observation_sd = 0.7, 0.6, 0.9
    _, y = simulate_ar1(jax.random.key(0), 12, phi, state_sd, observation_sd)
    lags = np.abs(np.subtract.outer(np.arange(12), np.arange(12)))
    cov = state_sd**2 / (1 - phi**2) * phi**lags + observation_sd**2 * np.eye(12)
    exact = stats.multivariate_normal(np.zeros(12), cov).logpdf(np.asarray(y, np.float64))
    kalman = ar1_kalman_loglik(_ar1_position(phi, state_sd, observation_sd), y)
    np.testing.assert_allclose(float(kalman), exact, rtol=1e-5)


def test_simulated_states_follow_the_ar1_law():
    from rwmh.models import simulate_ar1

    phi, state_sd = 0.8, 0.5
    x, y = simulate_ar1(jax.random.key(1), 50_000, phi, state_sd, 1.0)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    # Standard errors at n = 50000 with autocorrelation 0.8: about 0.01 on these values.
    assert abs(np.corrcoef(x[1:], x[:-1])[0, 1] - phi) < 0.01
    assert abs(np.var(x) - state_sd**2 / (1 - phi**2)) < 0.05
    assert abs(np.var(y - x) - 1.0) < 0.03


def test_particle_filter_is_unbiased_for_the_likelihood():
    from rwmh.models import ar1_kalman_loglik, ar1_particle_loglik, simulate_ar1

    position = _ar1_position(0.8, 0.5, 1.0)
    _, y = simulate_ar1(jax.random.key(2), 10)
    exact = ar1_kalman_loglik(position, y)
    u = jax.random.normal(jax.random.key(3), (20_000, 10, 11))
    estimates = jax.jit(jax.vmap(lambda u: ar1_particle_loglik(position, y, u)))(u)
    ratio = np.exp(np.asarray(estimates - exact, np.float64))
    # E[exp(estimate)] = likelihood: the ratio's mean is 1 within 4 standard errors.
    assert abs(ratio.mean() - 1.0) < 4 * ratio.std() / np.sqrt(ratio.size), ratio.mean()
    # The log estimate itself is biased low (Jensen), as it must be for an unbiased exp.
    assert np.mean(np.log(ratio)) < 0


def test_correlated_u_correlates_the_particle_filter_estimates():
    import rwmh
    from rwmh.models import ar1_state_space, simulate_ar1

    _, y = simulate_ar1(jax.random.key(4), 50)
    position = _ar1_position(0.8, 0.5, 1.0)[None]
    nearby = position + 0.02
    sds = {}
    for correlation in (0.0, 0.99):
        target = ar1_state_space(y, 20, correlation).target
        noise = rwmh.estimator_noise(target, jax.random.key(5), position, 400, nearby=nearby)
        sds[correlation] = float(noise.log_ratio_sd[0])
    # The sorted, systematic resampling keeps the estimate continuous in u: with rho = 0.99
    # the log ratio is several times less noisy than with independent u.
    assert sds[0.99] < 0.3 * sds[0.0], sds


def test_state_space_model_checks_its_arguments():
    import rwmh
    from rwmh.models import ar1_state_space, simulate_ar1

    _, y = simulate_ar1(jax.random.key(0), 5)
    with pytest.raises(ValueError, match="num_particles"):
        ar1_state_space(y, 1)
    with pytest.raises(ValueError, match="y must be"):
        ar1_state_space(jnp.zeros((2, 2)), 10)
    with pytest.raises(ValueError, match="num_times"):
        simulate_ar1(jax.random.key(0), 0)
    with pytest.raises(ValueError, match="phi"):
        simulate_ar1(jax.random.key(0), 5, phi=1.0)
    model = ar1_state_space(y, 10)
    wrong = rwmh.EstimatedLogDensity(model.target.logdensity_estimator, (5, 10))
    with pytest.raises(ValueError, match="aux_shape"):
        wrong.check(jnp.zeros(3))
