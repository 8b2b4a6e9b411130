"""Models used across rwmh: the linear regression as a NumPyro model, and its simulator.

The regression is ``y_i ~ Normal(intercept + slope * x_i, sigma)`` with weakly informative
priors, broad relative to data on a unit scale so that the likelihood dominates:

* ``intercept ~ Normal(0, 10)``
* ``slope ~ Normal(0, 10)``
* ``sigma ~ HalfNormal(5)`` (positive; NumPyro samples it as ``log sigma`` with its Jacobian)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "linear_regression",
    "simulate_linear_regression",
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
