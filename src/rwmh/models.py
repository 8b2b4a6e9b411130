"""Models used across rwmh: the linear regression as a NumPyro model, and its simulator; a
linear-Gaussian state-space model with its exact (Kalman) and estimated (particle filter)
likelihoods, for the pseudo-marginal kernel (:mod:`rwmh.pmmh`).

The regression is ``y_i ~ Normal(intercept + slope * x_i, sigma)`` with weakly informative
priors, broad relative to data on a unit scale so that the likelihood dominates:

* ``intercept ~ Normal(0, 10)``
* ``slope ~ Normal(0, 10)``
* ``sigma ~ HalfNormal(5)`` (positive; NumPyro samples it as ``log sigma`` with its Jacobian)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "linear_regression",
    "simulate_linear_regression",
    "StateSpaceModel",
    "ar1_state_space",
    "simulate_ar1",
    "ar1_kalman_loglik",
    "ar1_particle_loglik",
]

INTERCEPT_PRIOR_SCALE = 10.0
SLOPE_PRIOR_SCALE = 10.0
SIGMA_PRIOR_SCALE = 5.0


def linear_regression(x, y=None):
    """NumPyro model ``y ~ Normal(intercept + slope * x, sigma)``.

    Parameters
    ----------
    x
        Predictor, shape ``(num_points,)``.
    y
        Observed responses, shape ``(num_points,)``, or None to simulate them (prior or
        posterior predictive).

    Sample sites: ``intercept ~ Normal(0, 10)``, ``slope ~ Normal(0, 10)``,
    ``sigma ~ HalfNormal(5)``; observed site ``y``.

    Examples
    --------
    >>> import jax
    >>> from numpyro.infer import Predictive
    >>> from rwmh.models import linear_regression, simulate_linear_regression
    >>> x, y = simulate_linear_regression(jax.random.key(0), 50)
    >>> prior = Predictive(linear_regression, num_samples=10)(jax.random.key(1), x)
    >>> prior["y"].shape
    (10, 50)
    """
    import numpyro
    import numpyro.distributions as dist

    x = jnp.asarray(x)
    intercept = numpyro.sample("intercept", dist.Normal(0.0, INTERCEPT_PRIOR_SCALE))
    slope = numpyro.sample("slope", dist.Normal(0.0, SLOPE_PRIOR_SCALE))
    sigma = numpyro.sample("sigma", dist.HalfNormal(SIGMA_PRIOR_SCALE))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(intercept + slope * x, sigma), obs=y)


def simulate_linear_regression(
    rng_key, num_points: int, intercept: float = 1.0, slope: float = 2.0, sigma: float = 0.5
):
    """Simulate ``(x, y)`` with ``x ~ Normal(0, 1)`` and ``y = intercept + slope x + sigma e``.

    Parameters
    ----------
    rng_key
        A typed key (``jax.random.key``) or a legacy ``jax.random.PRNGKey``.
    num_points
        Number of observations, a positive integer.
    intercept, slope, sigma
        The true line and the noise standard deviation (positive).

    Returns
    -------
    ``(x, y)``, two arrays of shape ``(num_points,)``.

    Examples
    --------
    >>> import jax
    >>> from rwmh.models import simulate_linear_regression
    >>> x, y = simulate_linear_regression(jax.random.key(0), 100, slope=-1.0)
    >>> x.shape, y.shape
    ((100,), (100,))
    """
    if isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer)):
        raise ValueError(f"num_points must be a positive integer; got {num_points!r}.")
    if num_points < 1:
        raise ValueError(f"num_points must be a positive integer; got {num_points!r}.")
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive finite number; got {sigma!r}.")
    num_points = int(num_points)
    key_x, key_noise = jax.random.split(rng_key)
    x = jax.random.normal(key_x, (num_points,))
    y = intercept + slope * x + sigma * jax.random.normal(key_noise, (num_points,))
    return x, y


# ---------------------------------------------------------------------------------------------
# A linear-Gaussian state-space model: latent AR(1), noisy observations.
# ---------------------------------------------------------------------------------------------

#: Names of the unconstrained coordinates of :func:`ar1_state_space`'s positions.
AR1_NAMES = ("atanh_phi", "log_state_sd", "log_observation_sd")


def simulate_ar1(
    rng_key,
    num_times: int,
    phi: float = 0.95,
    state_sd: float = 0.3,
    observation_sd: float = 1.0,
):
    """Simulate the state-space model of :func:`ar1_state_space`.

    ``x_1 ~ N(0, state_sd^2 / (1 - phi^2))`` (the stationary law), ``x_t = phi x_{t-1} +
    state_sd e_t`` and ``y_t = x_t + observation_sd f_t`` with independent standard normals
    ``e_t``, ``f_t``. Returns ``(x, y)``, two arrays of shape ``(num_times,)``.

    The defaults make a posterior on which the bootstrap filter's noise stays moderate
    everywhere: with 100 observations and 32 particles the sd of its log-likelihood estimate
    is 0.7 to 2.3 between the 1% and 99% posterior quantiles of each parameter (about 1.1 at
    the median). With a less persistent state (``phi = 0.8, state_sd = 0.5``) the posterior
    of ``log observation_sd`` has a long lower tail, where the sd reaches 8.5 at its 1%
    quantile, and plain pseudo-marginal chains hardly enter it.

    Examples
    --------
    >>> import jax
    >>> from rwmh.models import simulate_ar1
    >>> x, y = simulate_ar1(jax.random.key(0), 50)
    >>> y.shape
    (50,)
    """
    if isinstance(num_times, bool) or not isinstance(num_times, (int, np.integer)):
        raise ValueError(f"num_times must be a positive integer; got {num_times!r}.")
    if num_times < 1:
        raise ValueError(f"num_times must be a positive integer; got {num_times!r}.")
    if not (-1.0 < phi < 1.0):
        raise ValueError(f"phi must lie in (-1, 1); got {phi!r}.")
    for name, value in (("state_sd", state_sd), ("observation_sd", observation_sd)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number; got {value!r}.")
    state_key, observation_key = jax.random.split(rng_key)
    noise = jax.random.normal(state_key, (int(num_times),))
    first = noise[0] * state_sd / np.sqrt(1.0 - phi**2)

    def advance(x, e):
        x = phi * x + state_sd * e
        return x, x

    _, rest = jax.lax.scan(advance, first, noise[1:])
    x = jnp.concatenate([first[None], rest])
    y = x + observation_sd * jax.random.normal(observation_key, x.shape)
    return x, y


def _ar1_parameters(position):
    """``(phi, state_sd, observation_sd)`` from the unconstrained ``position`` (3,)."""
    return jnp.tanh(position[0]), jnp.exp(position[1]), jnp.exp(position[2])


def _normal_logpdf(x, mean, sd):
    return -0.5 * ((x - mean) / sd) ** 2 - jnp.log(sd) - 0.5 * np.log(2 * np.pi)


def ar1_kalman_loglik(position, y):
    """The exact log likelihood of ``y`` under the AR(1) state-space model, by the Kalman
    filter (prediction error decomposition), at the unconstrained ``position`` ``(atanh phi,
    log state_sd, log observation_sd)``."""
    phi, state_sd, observation_sd = _ar1_parameters(position)
    y = jnp.asarray(y, jnp.result_type(position))

    def step(carry, y_t):
        mean, variance = carry
        predictive_variance = variance + observation_sd**2
        loglik = _normal_logpdf(y_t, mean, jnp.sqrt(predictive_variance))
        gain = variance / predictive_variance
        mean, variance = mean + gain * (y_t - mean), (1.0 - gain) * variance
        return (phi * mean, phi**2 * variance + state_sd**2), loglik

    start = (jnp.zeros_like(phi), state_sd**2 / (1.0 - phi**2))
    _, logliks = jax.lax.scan(step, start, y)
    return jnp.sum(logliks)


def ar1_particle_loglik(position, y, u):
    """Bootstrap particle filter estimate of the log likelihood of ``y``, from normals ``u``.

    ``u`` has shape ``(num_times, num_particles + 1)``: ``u[t, :N]`` move the ``N`` particles
    to time ``t`` (the first row draws them from the stationary law), ``u[t, N]`` drives the
    resampling before that move (``u[0, N]`` is not used). ``exp`` of the estimate is unbiased
    for the likelihood (Del Moral 2004), whatever ``u``'s correlation with another estimate's.

    The estimate is made continuous in ``u`` and in the parameters, as the correlated kernel
    needs (a small move of ``u`` or ``x`` must move the estimate a little, Deligiannidis,
    Doucet and Pitt 2018), by their recipe for a one-dimensional state: the particles are
    sorted by value before each resampling (the Hilbert sort of their Section 4 reduces to an
    ordinary sort in one dimension), and resampled by systematic resampling, inverting the
    weights' cumulative distribution at ``(Phi(u[t, N]) + k) / N``, ``k = 0, ..., N - 1``. A
    small change then moves a resampled index, if at all, to a neighbour in sorted order, whose
    value is close; without sorting it would jump to an unrelated particle.
    """
    phi, state_sd, observation_sd = _ar1_parameters(position)
    dtype = jnp.result_type(u)
    y = jnp.asarray(y, dtype)
    num_particles = u.shape[1] - 1
    log_n = jnp.log(jnp.asarray(num_particles, dtype))

    def weigh(particles, y_t):
        logw = _normal_logpdf(y_t, particles, observation_sd)
        return logw, jax.scipy.special.logsumexp(logw) - log_n

    def resample(particles, logw, normal):
        order = jnp.argsort(particles)
        particles, logw = particles[order], logw[order]
        cdf = jnp.cumsum(jax.nn.softmax(logw))
        offsets = jnp.arange(num_particles, dtype=dtype)
        points = (jax.scipy.special.ndtr(normal) + offsets) / num_particles
        index = jnp.clip(jnp.searchsorted(cdf, points), 0, num_particles - 1)
        return particles[index]

    def step(carry, xs):
        particles, logw = carry
        y_t, u_t = xs
        particles = phi * resample(particles, logw, u_t[-1]) + state_sd * u_t[:-1]
        logw, loglik = weigh(particles, y_t)
        return (particles, logw), loglik

    particles = u[0, :-1] * state_sd / jnp.sqrt(1.0 - phi**2)
    logw, first = weigh(particles, y[0])
    _, rest = jax.lax.scan(step, (particles, logw), (y[1:], u[1:]))
    return first + jnp.sum(rest)


def _ar1_logprior(position):
    # Standard normals on the unconstrained coordinates.
    return jnp.sum(_normal_logpdf(position, 0.0, 1.0))


class StateSpaceModel(NamedTuple):
    """The AR(1) state-space posterior both ways (see :func:`ar1_state_space`).

    logdensity_fn
        The exact log posterior (Kalman likelihood) of an unconstrained position ``(3,)``.
    target
        The :class:`rwmh.EstimatedLogDensity` of the same posterior with the particle filter.
    aux_shape
        ``(num_times, num_particles + 1)``, the shape of ``u``.
    names
        The coordinates' names, :data:`AR1_NAMES`.
    """

    logdensity_fn: Callable
    target: Any
    aux_shape: tuple
    names: tuple


def ar1_state_space(y, num_particles: int, correlation: float = 0.0) -> StateSpaceModel:
    """The posterior of a latent AR(1) observed with noise, exact and pseudo-marginal.

    The model is ``x_1 ~ N(0, s_x^2 / (1 - phi^2))``, ``x_t = phi x_{t-1} + s_x e_t``,
    ``y_t = x_t + s_y f_t``, on the unconstrained position ``(atanh phi, log s_x, log s_y)``
    with independent standard normal priors on those three coordinates. ``logdensity_fn``
    uses the exact likelihood (:func:`ar1_kalman_loglik`), ``target`` the bootstrap particle
    filter with ``num_particles`` particles (:func:`ar1_particle_loglik`) and the
    Crank-Nicolson ``correlation`` of its normals.

    Examples
    --------
    >>> import jax, rwmh
    >>> from rwmh.models import ar1_state_space, simulate_ar1
    >>> _, y = simulate_ar1(jax.random.key(0), 40)
    >>> model = ar1_state_space(y, num_particles=50, correlation=0.99)
    >>> model.target.aux_shape
    (40, 51)
    """
    from rwmh.pmmh import EstimatedLogDensity

    y = jnp.asarray(y)
    if y.ndim != 1 or y.shape[0] < 1:
        raise ValueError(f"y must be a non-empty vector of observations; got shape {y.shape}.")
    if isinstance(num_particles, bool) or not isinstance(num_particles, (int, np.integer)):
        raise ValueError(f"num_particles must be an integer >= 2; got {num_particles!r}.")
    if num_particles < 2:
        raise ValueError(f"num_particles must be an integer >= 2; got {num_particles!r}.")
    aux_shape = (int(y.shape[0]), int(num_particles) + 1)

    def logdensity_fn(position):
        return _ar1_logprior(position) + ar1_kalman_loglik(position, y)

    def logdensity_estimator(position, u):
        if u.shape != aux_shape:
            raise ValueError(
                f"the particle filter expects u of shape aux_shape={aux_shape} "
                f"(num_times, num_particles + 1); got {u.shape}."
            )
        return _ar1_logprior(position) + ar1_particle_loglik(position, y, u)

    target = EstimatedLogDensity(logdensity_estimator, aux_shape, correlation)
    return StateSpaceModel(logdensity_fn, target, aux_shape, AR1_NAMES)
