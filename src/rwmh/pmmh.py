"""Pseudo-marginal random-walk Metropolis-Hastings: a log density estimated by simulation.

When the likelihood can only be estimated, by a particle filter, importance sampling over
latent variables or a stochastic simulator, write the estimator as a deterministic function
``logdensity_estimator(position, u)`` of the position and of standard normals ``u`` (shape
``aux_shape``), such that ``exp(logdensity_estimator(x, u))`` with ``u ~ N(0, I)`` is an unbiased,
non-negative estimate of the (unnormalised) target density ``pi(x)``. Random-walk
Metropolis-Hastings on the pair ``(x, u)`` then targets

.. math::

    \\bar\\pi(x, u) \\propto \\exp(\\hat\\ell(x, u))\\, \\mathcal{N}(u; 0, I),
    \\qquad \\int \\bar\\pi(x, u)\\, du = \\pi(x),

so its draws of ``x`` come from ``pi`` exactly (Andrieu and Roberts 2009). The proposal moves
``x`` as the exact kernel does (:mod:`rwmh.kernel`, ``x' = x + s L z``) and ``u`` by
Crank-Nicolson,

.. math::

    u' = \\rho u + \\sqrt{1 - \\rho^2}\\, e, \\qquad e \\sim \\mathcal{N}(0, I),

which is reversible with respect to ``N(0, I)``; the move is therefore accepted with probability
``min(1, exp(l(x', u') - l(x, u)))`` by the very accept/reject step of the exact kernel
(:func:`rwmh.kernel.accept_reject`). ``rho = 0`` is the plain pseudo-marginal kernel (a fresh
``u`` at each proposal); ``rho`` close to 1 is the correlated pseudo-marginal kernel of
Deligiannidis, Doucet and Pitt (2018), whose estimates at the current and the proposed points
share most of their randomness, so that their ratio is far less noisy than either estimate and
far fewer particles give the same acceptance. The estimate at the current point is carried in
the state with its ``u`` and **never recomputed**: recomputing it (a "Monte Carlo within
Metropolis" loop) targets another distribution (``tests/test_pseudo_marginal.py`` shows it).

Tuning (see the README): at ``rho = 0`` choose the number of particles so that the sd of the
log-likelihood estimate near the posterior is about 1.2 (Doucet, Pitt, Deligiannidis and Kohn
2015); :func:`estimator_noise` measures it, and for ``rho > 0`` the sd of the log ratio of the
estimates at two nearby points. The warmup of :func:`rwmh.sample` tunes the step size toward
:func:`default_target_acceptance_rate`: 0.1 at ``rho = 0``, 0.234 at ``rho > 0`` (why in its
docstring).

References
----------
Andrieu, C. and Roberts, G. O. (2009). The pseudo-marginal approach for efficient Monte Carlo
computations. Annals of Statistics 37, 697-725.

Deligiannidis, G., Doucet, A. and Pitt, M. K. (2018). The correlated pseudomarginal method.
Journal of the Royal Statistical Society B 80, 839-870.

Doucet, A., Pitt, M. K., Deligiannidis, G. and Kohn, R. (2015). Efficient implementation of
Markov chain Monte Carlo when using an unbiased likelihood estimator. Biometrika 102, 295-313.

Sherlock, C., Thiery, A. H., Roberts, G. O. and Rosenthal, J. S. (2015). On the efficiency of
pseudo-marginal random walk Metropolis algorithms. Annals of Statistics 43, 238-275.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

if TYPE_CHECKING:
    from blackjax.base import SamplingAlgorithm

from rwmh import checks
from rwmh.kernel import (
    RWMHInfo,
    accept_reject,
    check_step_size,
    factor_proposal_cov,
    propose,
)

__all__ = [
    "CORRELATED_TARGET_ACCEPTANCE_RATE",
    "DEFAULT_TARGET_ACCEPTANCE_RATE",
    "default_target_acceptance_rate",
    "EstimatedLogDensity",
    "EstimatorNoise",
    "PseudoMarginalState",
    "build_kernel",
    "estimator_noise",
    "init",
    "pseudo_marginal",
]

ArrayTree = Any
Array = jax.Array
PRNGKey = jax.Array

#: Default target acceptance rate of the pseudo-marginal warmup at ``correlation = 0`` (see
#: :func:`default_target_acceptance_rate`). Sherlock et al. (2015) find,
#: for a high-dimensional target and Gaussian noise of variance ``tau^2`` in the log of the
#: acceptance ratio, the acceptance rate ``2 Phi(-sqrt(l^2 + tau^2) / 2)`` at scale ``l``; the
#: rate that maximises ``l^2`` times it falls from 0.234 (no noise) to 0.07 at their
#: jointly optimal noise (``tau^2 = 2 * 3.283``) and can never exceed ``2 Phi(-tau / 2)``. A
#: target above that ceiling drives the step size to zero, one below the optimum only costs
#: some efficiency: at 0.1 the loss is at most 18% over ``0 <= tau <= 2.56`` (that is, from no
#: noise, as with ``rho`` near 1 and a smooth estimator, to the plain kernel at its optimal
#: noise), where 0.07 loses up to 31%, and 0.1 stays reachable up to ``tau = 3.3``.
DEFAULT_TARGET_ACCEPTANCE_RATE = 0.1
#: Default target acceptance rate at ``correlation > 0``: the exact kernel's high-dimensional
#: optimum (Roberts, Gelman and Gilks 1997), see :func:`default_target_acceptance_rate`.
CORRELATED_TARGET_ACCEPTANCE_RATE = 0.234


def default_target_acceptance_rate(correlation: float) -> float:
    """The acceptance rate the pseudo-marginal warmup tunes toward unless told otherwise.

    0.1 for ``correlation = 0`` (:data:`DEFAULT_TARGET_ACCEPTANCE_RATE`, below Sherlock et
    al.'s 7% optimum for the best particle count, and safe when the noise is smaller). 0.234
    for ``correlation > 0``: with correlated ``u`` the noise of the log ratio is small for a
    small step and grows with it (the estimates decorrelate as ``x`` moves), and a chain whose
    estimate is too high stays there for about ``1 / (1 - rho)`` accepted moves, so short
    steps accepted often pay, as for the exact kernel. On the AR(1) model of
    ``rwmh.models.ar1_state_space`` (3 parameters, 100 times, 20 particles, ``rho = 0.99``, 16
    chains of 1500 draws) targets 0.1, 0.25, 0.31 and 0.4 gave a smallest bulk ESS of 48, 163,
    114 and 59. If warmup cannot reach the target (its acceptance stays well below it and the
    step size shrinks), use more particles or pass a lower ``target_acceptance_rate``.
    """
    if correlation == 0:
        return DEFAULT_TARGET_ACCEPTANCE_RATE
    return CORRELATED_TARGET_ACCEPTANCE_RATE


class PseudoMarginalState(NamedTuple):
    """State of one pseudo-marginal chain.

    position
        The current position, a PyTree of arrays.
    logdensity
        The *estimate* of the log density at ``position`` made with ``u``, kept from the step
        that accepted it (never recomputed).
    u
        The standard normals, shape ``aux_shape``, that produced ``logdensity``.
    """

    position: ArrayTree
    logdensity: Array
    u: Array


def _check_aux_shape(aux_shape) -> tuple[int, ...]:
    message = f"aux_shape must be a tuple of positive integers; got {aux_shape!r}."
    if isinstance(aux_shape, (int, np.integer)) and not isinstance(aux_shape, bool):
        aux_shape = (aux_shape,)
    if not isinstance(aux_shape, (tuple, list)):
        raise ValueError(message)
    for size in aux_shape:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(message)
    return tuple(int(size) for size in aux_shape)


def _check_correlation(correlation) -> float:
    message = f"correlation must be a number in [0, 1); got {correlation!r}."
    try:
        value = float(correlation)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if isinstance(correlation, bool) or not (0.0 <= value < 1.0):
        raise ValueError(message)
    return value


@dataclass(frozen=True)
class EstimatedLogDensity:
    """A log density known only through an estimator, for :func:`rwmh.sample` and
    :func:`rwmh.window_adaptation` in place of an exact ``logdensity_fn``.

    Parameters
    ----------
    logdensity_estimator
        ``logdensity_estimator(position, u)``: a scalar estimate of the log density at
        ``position`` from the standard normals ``u`` of shape ``aux_shape`` (deterministic in
        ``u``; ``exp`` of it must be unbiased for the density).
    aux_shape
        Shape of ``u`` for one chain.
    correlation
        ``rho`` in ``[0, 1)`` of the Crank-Nicolson move of ``u``; 0 draws a fresh ``u`` at each
        proposal.

    With it the driver runs the pseudo-marginal kernel (:func:`build_kernel`): every chain
    carries its ``u`` (``result.last_state.u``, and the checkpoint holds it), ``stats["lp"]``
    is the estimate carried, and warmup tunes toward :func:`default_target_acceptance_rate`
    unless ``target_acceptance_rate`` is given. Equal
    targets (same estimator object, ``aux_shape`` and ``correlation``) share compiled code.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, rwmh
    >>> def estimator(x, u):  # exp(s u_0 - s^2 / 2) has mean 1: an unbiased estimate
    ...     return -0.5 * jnp.sum(x**2) + 0.5 * u[0] - 0.125
    >>> target = rwmh.EstimatedLogDensity(estimator, aux_shape=(1,), correlation=0.5)
    >>> result = rwmh.sample(jax.random.key(0), target, jnp.zeros((4, 2)), num_samples=100,
    ...                      num_warmup=100, progress_bar=False)
    >>> result.last_state.u.shape
    (4, 1)
    """

    logdensity_estimator: Callable
    aux_shape: tuple[int, ...]
    correlation: float = 0.0

    def __post_init__(self):
        checks.check_callable(self.logdensity_estimator, "logdensity_estimator")
        object.__setattr__(self, "aux_shape", _check_aux_shape(self.aux_shape))
        object.__setattr__(self, "correlation", _check_correlation(self.correlation))

    def __call__(self, position, u):
        """The estimate at ``position`` from ``u``."""
        return self.logdensity_estimator(position, u)

    def check(self, position) -> None:
        """Trace the estimator once at one chain's ``position`` (shapes only, nothing is
        compiled or run: ``jax.eval_shape``); ValueError naming the argument if it fails
        with ``u`` of shape ``aux_shape`` or does not return a floating-point scalar."""
        flat, _ = ravel_pytree(position)
        dtype = flat.dtype if jnp.issubdtype(flat.dtype, jnp.floating) else jnp.result_type(float)
        u = jax.ShapeDtypeStruct(self.aux_shape, dtype)
        try:
            out = jax.eval_shape(self.logdensity_estimator, position, u)
        except Exception as error:
            raise ValueError(
                f"logdensity_estimator failed on one position and u of shape aux_shape="
                f"{self.aux_shape} ({type(error).__name__}: {error}); is aux_shape the shape "
                "of u that the estimator expects?"
            ) from error
        shape = getattr(out, "shape", None)
        if shape != ():
            raise ValueError(
                "logdensity_estimator must return a scalar estimate for one position; got "
                f"{'a ' + type(out).__name__ if shape is None else 'shape ' + str(shape)}."
            )
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise ValueError(
                f"logdensity_estimator must return a floating-point scalar; got {out.dtype}."
            )


def _check_estimate(estimate) -> Array:
    estimate = jnp.asarray(estimate)
    if estimate.ndim != 0 or not jnp.issubdtype(estimate.dtype, jnp.floating):
        raise ValueError(
            "logdensity_estimator must return a floating-point scalar for one position; got "
            f"shape {estimate.shape} and dtype {estimate.dtype}."
        )
    return estimate


def _aux_dtype(position):
    flat, _ = ravel_pytree(position)
    return flat.dtype if jnp.issubdtype(flat.dtype, jnp.floating) else jnp.result_type(float)


def init(position, logdensity_estimator: Callable, rng_key: PRNGKey, aux_shape):
    """State of one chain at ``position``: draws ``u ~ N(0, I)`` of shape ``aux_shape`` with
    ``rng_key`` and stores the estimate ``logdensity_estimator(position, u)``."""
    checks.check_key(rng_key)
    position = jax.tree_util.tree_map(jnp.asarray, position)
    u = jax.random.normal(rng_key, tuple(aux_shape), _aux_dtype(position))
    estimate = _check_estimate(logdensity_estimator(position, u))
    return PseudoMarginalState(position, estimate, u)


def crank_nicolson(rng_key: PRNGKey, u: Array, correlation) -> Array:
    """``rho u + sqrt(1 - rho^2) e`` with ``e ~ N(0, I)`` drawn from ``rng_key``; the fresh
    ``e`` itself when ``rho`` is the number 0."""
    noise = jax.random.normal(rng_key, jnp.shape(u), jnp.result_type(u))
    if isinstance(correlation, (int, float)) and correlation == 0:
        return noise
    correlation = jnp.asarray(correlation, noise.dtype)
    return correlation * u + jnp.sqrt(1.0 - correlation**2) * noise


def build_kernel() -> Callable:
    """Build the pseudo-marginal transition kernel.

    Returns
    -------
    ``kernel(rng_key, state, logdensity_estimator, step_size, proposal_cov=None,
    correlation=0.0)`` moving one :class:`PseudoMarginalState` by one step and returning
    ``(PseudoMarginalState, rwmh.RWMHInfo)``: ``x`` is proposed as by the exact kernel
    (:func:`rwmh.kernel.propose`, same ``proposal_cov`` forms), ``u`` by Crank-Nicolson with
    ``correlation``, and the proposal, with its estimate, is accepted or rejected by
    :func:`rwmh.kernel.accept_reject` (a NaN or infinite estimate is never accepted). The
    state's own estimate is used as it is.
    """

    def kernel(
        rng_key: PRNGKey,
        state: PseudoMarginalState,
        logdensity_estimator: Callable,
        step_size,
        proposal_cov=None,
        correlation=0.0,
    ) -> tuple[PseudoMarginalState, RWMHInfo]:
        checks.check_key(rng_key)
        if not hasattr(state, "u"):
            raise TypeError(
                "state must be a PseudoMarginalState(position, logdensity, u), as made by "
                f"rwmh.pseudo_marginal's init; got {type(state).__name__}."
            )
        position_key, u_key = jax.random.split(rng_key)
        proposal_position, log_uniform = propose(position_key, state, step_size, proposal_cov)
        proposal_u = crank_nicolson(u_key, state.u, correlation)
        estimate = _check_estimate(logdensity_estimator(proposal_position, proposal_u))
        proposal = PseudoMarginalState(proposal_position, estimate, proposal_u)
        return accept_reject(log_uniform, state, proposal)

    return kernel


def pseudo_marginal(
    logdensity_estimator: Callable,
    step_size=1.0,
    proposal_cov=None,
    *,
    aux_shape,
    correlation: float = 0.0,
) -> SamplingAlgorithm:
    """Pseudo-marginal random-walk Metropolis-Hastings as a BlackJAX ``SamplingAlgorithm``.

    Parameters
    ----------
    logdensity_estimator
        ``logdensity_estimator(position, u)``, a scalar estimate of the log density from the
        standard normals ``u`` of shape ``aux_shape`` (see :class:`EstimatedLogDensity`).
    step_size, proposal_cov
        As in :func:`rwmh.random_walk`.
    aux_shape
        Shape of ``u`` for one chain.
    correlation
        Crank-Nicolson ``rho`` in ``[0, 1)`` for ``u``; 0 draws a fresh ``u`` per proposal.

    Returns
    -------
    ``SamplingAlgorithm(init, step)`` with ``init(position, rng_key)`` (draws ``u`` and stores
    the estimate; a ValueError if the estimator does not return a scalar for ``u`` of shape
    ``aux_shape``, found by tracing it, before anything is compiled) and
    ``step(rng_key, state)``; vmap both for several chains.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, rwmh
    >>> def estimator(x, u):
    ...     return -0.5 * jnp.sum(x**2) + 0.5 * u[0] - 0.125
    >>> algo = rwmh.pseudo_marginal(estimator, step_size=1.0, aux_shape=(3,), correlation=0.9)
    >>> state = algo.init(jnp.zeros(2), jax.random.key(0))
    >>> state, info = algo.step(jax.random.key(1), state)
    >>> state.u.shape
    (3,)
    """
    target = EstimatedLogDensity(logdensity_estimator, aux_shape, correlation)
    if step_size is None:
        raise ValueError("step_size must be a positive finite scalar; got None.")
    check_step_size(step_size)
    proposal = factor_proposal_cov(proposal_cov)
    kernel = build_kernel()

    def init_fn(position, rng_key: PRNGKey | None = None) -> PseudoMarginalState:
        if rng_key is None:
            raise ValueError("rng_key is required: init draws the chain's u.")
        checks.check_float_positions(position, "position", batched=False)
        target.check(position)
        state = init(position, logdensity_estimator, rng_key, target.aux_shape)
        factor = proposal.factor
        dimension = ravel_pytree(state.position)[0].shape[0]
        if factor is not None and jnp.shape(factor)[0] != dimension:
            raise ValueError(
                f"proposal_cov has shape {jnp.shape(proposal.covariance)} but the flattened "
                f"position has dimension {dimension}."
            )
        return state

    def step_fn(rng_key: PRNGKey, state: PseudoMarginalState):
        return kernel(rng_key, state, logdensity_estimator, step_size, proposal, target.correlation)

    from blackjax.base import SamplingAlgorithm

    return SamplingAlgorithm(init_fn, step_fn)


class EstimatorNoise(NamedTuple):
    """What :func:`estimator_noise` measured, one value per position.

    log_estimate_sd
        The sd of ``logdensity_estimator(x, u)`` over independent ``u ~ N(0, I)``.
    log_ratio_sd
        The sd of ``logdensity_estimator(x', u') - logdensity_estimator(x, u)`` with ``u ~ N(0,
        I)`` and ``u'`` its Crank-Nicolson move with the target's ``correlation``, for the
        ``nearby`` points ``x'``; None when no ``nearby`` points were given.
    """

    log_estimate_sd: np.ndarray
    log_ratio_sd: np.ndarray | None


def estimator_noise(
    target: EstimatedLogDensity, rng_key, positions, num_repeats: int = 100, nearby=None
) -> EstimatorNoise:
    """Measure the noise of a log-likelihood estimator, to choose the number of particles.

    Parameters
    ----------
    target
        The :class:`EstimatedLogDensity` (its ``aux_shape`` and ``correlation`` are used).
    rng_key
        A JAX key.
    positions
        Points to measure at, a PyTree with a leading axis (``(n, ...)``): a few posterior
        draws, or the posterior mean, from a pilot run.
    num_repeats
        Number of independent ``u`` per position.
    nearby
        Optional points ``x'`` shaped like ``positions``, one step away from them (e.g. the
        positions plus a proposal increment): the sd of the log ratio of the estimates at
        ``x'`` and ``x`` under correlated ``u`` is measured too.

    Returns
    -------
    :class:`EstimatorNoise` of ``(n,)`` host arrays. At ``rho = 0`` aim for a
    ``log_estimate_sd`` near 1.2 at the posterior (Doucet et al. 2015); at ``rho > 0`` what
    the acceptance sees is ``log_ratio_sd`` (the README says how to use it).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, rwmh
    >>> target = rwmh.EstimatedLogDensity(lambda x, u: -0.5 * jnp.sum(x**2) + 0.5 * u[0],
    ...                                   aux_shape=(1,))
    >>> noise = rwmh.estimator_noise(target, jax.random.key(0), jnp.zeros((2, 3)), 2000)
    >>> [round(float(s), 1) for s in noise.log_estimate_sd]
    [0.5, 0.5]
    """
    if not isinstance(target, EstimatedLogDensity):
        raise TypeError(f"target must be an rwmh.EstimatedLogDensity; got {type(target).__name__}.")
    checks.check_key(rng_key)
    num_repeats = checks.check_int(num_repeats, "num_repeats", 2)
    num_points = checks.check_chain_axis(positions, "positions")
    checks.check_float_positions(positions, "positions", batched=True)
    positions = jax.tree_util.tree_map(jnp.asarray, positions)
    target.check(jax.tree_util.tree_map(lambda x: x[0], positions))
    if nearby is not None:
        nearby = jax.tree_util.tree_map(jnp.asarray, nearby)
        if jax.tree_util.tree_structure(nearby) != jax.tree_util.tree_structure(positions) or any(
            a.shape != b.shape
            for a, b in zip(
                jax.tree_util.tree_leaves(nearby), jax.tree_util.tree_leaves(positions), strict=True
            )
        ):
            raise ValueError("nearby must have the structure and shapes of positions.")
    sd, ratio_sd = _noise(target, rng_key, positions, nearby, num_points, num_repeats)
    return EstimatorNoise(np.asarray(sd), None if ratio_sd is None else np.asarray(ratio_sd))


def _noise(target, rng_key, positions, nearby, num_points, num_repeats):
    dtype = _aux_dtype(jax.tree_util.tree_map(lambda x: x[0], positions))
    shape = (num_points, num_repeats, *target.aux_shape)
    estimate_key, current_key, move_key = jax.random.split(rng_key, 3)
    over_repeats = jax.vmap(target.logdensity_estimator, in_axes=(None, 0))
    estimate = jax.jit(jax.vmap(over_repeats))
    u = jax.random.normal(estimate_key, shape, dtype)
    sd = jnp.std(estimate(positions, u), axis=1, ddof=1)
    if nearby is None:
        return sd, None
    u = jax.random.normal(current_key, shape, dtype)
    moved = crank_nicolson(move_key, u, target.correlation)
    ratio = estimate(nearby, moved) - estimate(positions, u)
    return sd, jnp.std(ratio, axis=1, ddof=1)
