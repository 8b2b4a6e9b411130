"""Random-walk Metropolis-Hastings with a Gaussian proposal.

Given the current position :math:`x` (any PyTree, flattened in
``jax.flatten_util.ravel_pytree`` order to a vector of length :math:`d`), the kernel
proposes

.. math::

    x' = x + s \\, L z, \\qquad z \\sim \\mathcal{N}(0, I_d), \\qquad L L^\\top = \\Sigma,

where :math:`s` is ``step_size`` and :math:`\\Sigma` is ``proposal_cov``, a *covariance*
(identity when None, a vector of variances when diagonal, a dense matrix otherwise). The
proposal is symmetric, so the move is accepted with probability
:math:`\\min(1, \\pi(x') / \\pi(x))` (Metropolis et al. 1953; Hastings 1970). The test is made
in log space, ``log u < log pi(x') - log pi(x)``, and a proposal whose log density is NaN or
infinite is always rejected, so a log density that returns ``-inf`` (or NaN) outside its
support confines the chain to the support.

The factor :math:`L` is computed once when the algorithm is built (:func:`random_walk`) or
by :func:`factor_proposal_cov`, whose :class:`FactoredCov` the low-level kernel then uses as
it is. Given a plain covariance array, the low-level kernel validates and factors it on every
call (a Cholesky factorisation per step for a dense matrix): pass a :class:`FactoredCov` to
avoid that.

References
----------
Metropolis, N., Rosenbluth, A. W., Rosenbluth, M. N., Teller, A. H. and Teller, E. (1953).
Equation of state calculations by fast computing machines. J. Chem. Phys. 21, 1087.

Hastings, W. K. (1970). Monte Carlo sampling methods using Markov chains and their
applications. Biometrika 57, 97-109.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

if TYPE_CHECKING:
    from blackjax.base import SamplingAlgorithm

from rwmh import checks

__all__ = [
    "RWMHState",
    "RWMHInfo",
    "init",
    "build_kernel",
    "random_walk",
    "FactoredCov",
    "factor_proposal_cov",
    "proposal_scale",
    "propose",
    "accept_reject",
]

ArrayTree = Any
ArrayLikeTree = Any
Array = jax.Array
ArrayLike = Any
PRNGKey = jax.Array


class RWMHState(NamedTuple):
    """State of one random-walk Metropolis-Hastings chain.

    position
        The current position of the chain, a PyTree of arrays.
    logdensity
        The (unnormalised) log density of the target at ``position``, a scalar.
    """

    position: ArrayTree
    logdensity: Array


class RWMHInfo(NamedTuple):
    """What happened during one transition.

    acceptance_rate
        The Metropolis-Hastings acceptance probability of the proposal,
        ``min(1, exp(logdensity(proposal) - logdensity(current)))``; 0 when the proposal's log
        density is NaN or infinite.
    is_accepted
        Whether the proposal was accepted (the new state is the proposal).
    proposal
        The proposed state (position and its log density), whether accepted or not.
    """

    acceptance_rate: Array
    is_accepted: Array
    proposal: RWMHState


def _check_scalar_logdensity(logdensity: Array) -> Array:
    # As an array: a log density may return a Python float (``lambda x: 0.0``).
    logdensity = jnp.asarray(logdensity)
    if jnp.ndim(logdensity) != 0:
        raise ValueError(
            "logdensity_fn must return a scalar for one position; got an array of shape "
            f"{jnp.shape(logdensity)}. For several chains use jax.vmap over positions."
        )
    if not jnp.issubdtype(jnp.result_type(logdensity), jnp.floating):
        raise TypeError(
            "logdensity_fn must return a floating-point scalar; got dtype "
            f"{jnp.result_type(logdensity)}."
        )
    return logdensity


class FactoredCov(NamedTuple):
    """A proposal covariance together with its factor, so that it is factored once.

    covariance
        None (identity), ``(d,)`` variances or a ``(d, d)`` covariance matrix.
    factor
        Its ``L`` with ``L @ L.T == covariance``: None, the standard deviations, or the lower
        Cholesky factor (see :func:`factor_covariance`).

    Made by :func:`factor_proposal_cov`; a PyTree, so it passes through ``jit`` and ``scan``.
    """

    covariance: Array | None
    factor: Array | None


def init(position: ArrayLikeTree, logdensity_fn: Callable):
    """Create the state of one chain at ``position``.

    Parameters
    ----------
    position
        The initial position, any PyTree of arrays.
    logdensity_fn
        The log density of the target, a function of one position returning a scalar.

    Returns
    -------
    The chain's :class:`RWMHState`.

    Examples
    --------
    >>> import jax.numpy as jnp, rwmh
    >>> state = rwmh.init(jnp.zeros(2), lambda x: -0.5 * jnp.sum(x**2))
    >>> float(state.logdensity)
    -0.0
    """
    checks.check_callable(logdensity_fn)
    checks.check_float_positions(position, "position", batched=False)
    position = jax.tree_util.tree_map(jnp.asarray, position)
    logdensity = _check_scalar_logdensity(logdensity_fn(position))
    checks.check_finite_logdensity(logdensity, "position", batched=False)
    return RWMHState(position, logdensity)


def proposal_scale(
    proposal_cov: ArrayLike | None, dimension: int | None = None, name: str = "proposal_cov"
):
    """Factor a proposal covariance once: the ``L`` with ``L @ L.T == proposal_cov``.

    Parameters
    ----------
    proposal_cov
        None (identity), a vector of ``d`` variances (diagonal covariance) or a ``(d, d)``
        symmetric positive-definite covariance matrix.
    dimension
        If given, the flattened dimension ``d`` of the position that ``proposal_cov`` must match.
    name
        The argument's name in error messages.

    Returns
    -------
    None for the identity, the vector of standard deviations for a diagonal covariance, or
    the lower Cholesky factor for a dense one.

    Raises
    ------
    ValueError
        If the shape does not match, a variance is not positive or the matrix is not positive
        definite (checked when the values are concrete, that is outside of ``jit``).
    """
    if proposal_cov is None:
        return None
    try:
        proposal_cov = jnp.asarray(proposal_cov)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be None or an array of variances or covariances; got "
            f"{type(proposal_cov).__name__}."
        ) from None
    if jnp.issubdtype(proposal_cov.dtype, jnp.complexfloating):
        raise TypeError(
            f"{name} must hold real variances or covariances; got dtype {proposal_cov.dtype}."
        )
    if not jnp.issubdtype(proposal_cov.dtype, jnp.floating):
        proposal_cov = proposal_cov.astype(jnp.result_type(float))
    ndim = proposal_cov.ndim
    if ndim not in (1, 2) or (ndim == 2 and proposal_cov.shape[0] != proposal_cov.shape[1]):
        raise ValueError(
            f"{name} must be None, a vector of d variances or a (d, d) covariance matrix; "
            f"got shape {proposal_cov.shape}."
        )
    if dimension is not None and proposal_cov.shape[0] != dimension:
        raise ValueError(
            f"{name} has shape {proposal_cov.shape} but the flattened position has "
            f"dimension {dimension}; expected ({dimension},) or ({dimension}, {dimension})."
        )
    concrete = not isinstance(proposal_cov, jax.core.Tracer)
    if ndim == 1:
        variances = np.asarray(proposal_cov) if concrete else None
        if concrete and not bool(np.all(np.isfinite(variances) & (variances > 0))):
            raise ValueError(f"{name} (diagonal) must hold positive, finite variances.")
        return factor_covariance(proposal_cov)
    if concrete:
        dense = np.asarray(proposal_cov)
        if not np.all(np.isfinite(dense)):
            raise ValueError(f"{name} must be a finite, symmetric matrix.")
        asymmetry = float(np.max(np.abs(dense - dense.T)))
        tolerance = symmetry_tolerance(dense)
        if asymmetry > tolerance:
            raise ValueError(
                f"{name} must be a symmetric matrix; it is asymmetric by {asymmetry:.3g}, "
                f"beyond rounding in {dense.dtype} ({tolerance:.3g} = "
                f"{SYMMETRY_ULPS} * eps * max|{name}|). If it is a covariance, pass "
                f"({name} + {name}.T) / 2."
            )
    lower = factor_covariance(proposal_cov)
    # Only a concrete factor can be checked: a covariance closed over inside jit is concrete,
    # but its factor is traced.
    if not isinstance(lower, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(lower))):
        raise ValueError(f"{name} must be positive definite (its Cholesky factor failed).")
    return lower


def factor_proposal_cov(
    proposal_cov: ArrayLike | None, dimension: int | None = None, name: str = "proposal_cov"
) -> FactoredCov:
    """Validate ``proposal_cov`` (as :func:`proposal_scale`) and pair it with its factor.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from rwmh.kernel import factor_proposal_cov
    >>> factor_proposal_cov(jnp.array([4.0, 9.0])).factor
    Array([2., 3.], dtype=float32)
    """
    factor = proposal_scale(proposal_cov, dimension, name)
    covariance = None if proposal_cov is None else jnp.asarray(proposal_cov)
    if covariance is not None and not jnp.issubdtype(covariance.dtype, jnp.floating):
        covariance = covariance.astype(jnp.result_type(float))
    return FactoredCov(covariance, factor)


#: How far a dense ``proposal_cov`` may be from symmetric, in units of its dtype's machine
#: epsilon times its largest entry. Rounding alone leaves a few units: the float32 inverse
#: Hessian of benchmarks/ess.py is off by 0.1 (jax 0.12; 1.4e-11, which the former fixed
#: 1e-8 * max|C| refused), and ``jnp.linalg.inv`` of random badly scaled 6-d float32 Hessians
#: by up to about 8 units at condition number 1e2 and 30 at 1e3 (jax 0.10 and 0.12 alike;
#: at 1e4 up to about 140, past this tolerance: symmetrise such matrices). A matrix that is
#: not a covariance (a Cholesky factor, a typo) is off by far more. A fixed tolerance cannot
#: serve float32 and float64 at once.
SYMMETRY_ULPS = 64


def symmetry_tolerance(matrix) -> float:
    """The largest ``|C - C.T|`` entry accepted for a dense covariance ``C``:
    ``SYMMETRY_ULPS * finfo(C.dtype).eps * max|C|``, so that it follows the precision the
    matrix is held in (float32 unless ``jax_enable_x64`` is on and the matrix is float64)."""
    matrix = np.asarray(matrix)
    return float(SYMMETRY_ULPS * jnp.finfo(matrix.dtype).eps * np.max(np.abs(matrix)))


def factor_covariance(covariance: Array) -> Array:
    """The factor ``L`` of a covariance, without checks: ``sqrt`` of a vector of variances, or
    ``diag(sd) chol(R)`` for a matrix with standard deviations ``sd`` and correlations ``R``.

    Factoring the correlation matrix rather than the covariance keeps the factor accurate when
    parameters live on very different scales; it is the lower Cholesky factor all the same.
    Warmup and :func:`proposal_scale` both use it, so that a covariance handed from one to the
    other gives the same factor.
    """
    if covariance.ndim == 1:
        return jnp.sqrt(covariance)
    sd = jnp.sqrt(jnp.diag(covariance))
    correlation = covariance / jnp.outer(sd, sd)
    return sd[:, None] * jnp.linalg.cholesky(correlation)


def check_step_size(step_size, name: str = "step_size", dtype=None):
    """``step_size`` as a float, or None; a ValueError naming ``name`` unless it is a positive
    finite scalar (a ``TypeError`` for a bool). With ``dtype``, the positions' floating type,
    it must also stay positive and finite in that type: ``1e39`` becomes ``inf`` in float32
    and ``1e-50`` becomes 0, and either freezes every chain. Traced values (inside ``jit``)
    pass unchecked."""
    if step_size is None or isinstance(step_size, jax.core.Tracer):
        return step_size
    if isinstance(step_size, (bool, np.bool_)):
        raise TypeError(f"{name} must be a positive finite scalar; got the bool {step_size!r}.")
    message = f"{name} must be a positive finite scalar; got {step_size!r}."
    try:
        value = np.asarray(step_size, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if value.ndim != 0 or not np.isfinite(value) or value <= 0:
        raise ValueError(message)
    if dtype is not None:
        with np.errstate(over="ignore", under="ignore"):
            stored = np.asarray(value, dtype=dtype)
        if not (np.isfinite(stored) and stored > 0):
            info = np.finfo(dtype)
            raise ValueError(
                f"{name} = {float(value)!r} is not representable in {np.dtype(dtype).name}, the "
                f"positions' type (it becomes {stored}); use a value in [{info.tiny:.3g}, "
                f"{info.max:.3g}] or float64 positions."
            )
    return float(value)


def _check_factor(factor, dimension: int):
    if factor is not None and jnp.shape(factor)[0] != dimension:
        raise ValueError(
            f"proposal_cov has shape {jnp.shape(factor)} but the flattened position has "
            f"dimension {dimension}; expected ({dimension},) or ({dimension}, {dimension})."
        )


def _propose(rng_key: PRNGKey, flat_position: Array, step_size, factor) -> tuple[Array, Array]:
    """Draw the proposal ``x + step_size * L z`` and the log of the acceptance uniform.

    One key gives ``d + 1`` standard normals: ``z`` and one more, ``w``, whose normal CDF
    ``u = Phi(w)`` is uniform on (0, 1). This hashes the key once per step instead of splitting
    it and drawing twice, which matters when the log density is cheap. (``log(ndtr(w))`` rather
    than ``log_ndtr(w)``: the latter's three-branch form makes XLA's CPU fusion recompute the
    normals inside the log density's reductions; ``u`` never needs the far lower tail, which
    ``log_ndtr`` is for.)
    """
    dimension = flat_position.shape[0]
    noise = jax.random.normal(rng_key, (dimension + 1,), flat_position.dtype)
    extra = noise[dimension]
    noise = noise[:dimension]
    if factor is None:
        increment = noise
    elif jnp.ndim(factor) == 1:
        increment = factor.astype(noise.dtype) * noise
    else:
        increment = factor.astype(noise.dtype) @ noise
    proposal = flat_position + jnp.asarray(step_size, noise.dtype) * increment
    return proposal, jnp.log(jax.scipy.special.ndtr(extra))


def propose(rng_key: PRNGKey, state, step_size: ArrayLike, proposal_cov=None):
    """The proposal of every rwmh kernel: ``(position + step_size * L z, log uniform)``.

    ``state`` has a ``position`` (and a ``logdensity``); ``proposal_cov`` is None, a covariance
    array (validated and factored here) or a :class:`FactoredCov`. Returns the proposed
    position, a PyTree like ``state.position``, and the log of the uniform that
    :func:`accept_reject` compares with the log ratio.
    """
    checks.check_key(rng_key)
    if not (hasattr(state, "position") and hasattr(state, "logdensity")):
        raise TypeError(
            "state must be an RWMHState(position, logdensity), as made by init; got "
            f"{type(state).__name__}."
        )
    flat_position, unravel = ravel_pytree(state.position)
    if isinstance(proposal_cov, FactoredCov):
        factor = proposal_cov.factor
        _check_factor(factor, flat_position.shape[0])
    else:
        factor = proposal_scale(proposal_cov, flat_position.shape[0])
    flat_proposal, log_uniform = _propose(rng_key, flat_position, step_size, factor)
    return unravel(flat_proposal), log_uniform


def build_kernel() -> Callable:
    """Build the random-walk Metropolis-Hastings transition kernel.

    Returns
    -------
    ``kernel(rng_key, state, logdensity_fn, step_size, proposal_cov=None)`` that moves one
    chain by one step and returns ``(RWMHState, RWMHInfo)``. ``proposal_cov`` is None
    (identity), a covariance array, which is validated and factored on every call, or a
    :class:`FactoredCov` from :func:`factor_proposal_cov`, whose factor is used as it is (what
    :func:`random_walk`, the adaptation and the driver pass, so that nothing is factored per
    step).
    """

    def kernel(
        rng_key: PRNGKey,
        state: RWMHState,
        logdensity_fn: Callable,
        step_size: ArrayLike,
        proposal_cov: ArrayLike | FactoredCov | None = None,
    ) -> tuple[RWMHState, RWMHInfo]:
        proposal_position, log_uniform = propose(rng_key, state, step_size, proposal_cov)
        proposal_logdensity = _check_scalar_logdensity(logdensity_fn(proposal_position))
        proposal = RWMHState(proposal_position, proposal_logdensity)
        return accept_reject(log_uniform, state, proposal)

    return kernel


def accept_reject(log_uniform: Array, state, proposal) -> tuple[Any, RWMHInfo]:
    """The one Metropolis-Hastings accept/reject step of every rwmh kernel.

    ``state`` and ``proposal`` are states of the same type (an :class:`RWMHState`, or the
    pseudo-marginal state of :mod:`rwmh.pmmh`, whose ``logdensity`` is an
    estimate) with a scalar ``logdensity`` field; ``log_uniform`` is the log of a uniform
    draw. The proposal is accepted when ``log_uniform < proposal.logdensity -
    state.logdensity``, never when its log density is NaN or infinite or its position holds a
    non-finite value, and the new state is the proposal or ``state``, field by field. Returns
    ``(new_state, RWMHInfo)``.
    """
    proposal_logdensity = proposal.logdensity.astype(jnp.result_type(state.logdensity))
    proposal = proposal._replace(logdensity=proposal_logdensity)

    log_ratio = proposal_logdensity - state.logdensity
    # A step that overflowed (a position at +-inf or NaN) is never a draw, whatever the log
    # density says there: a flat or saturating target is finite at infinity.
    position_finite = jnp.array(True)
    for leaf in jax.tree_util.tree_leaves(proposal.position):
        position_finite = position_finite & jnp.all(jnp.isfinite(leaf))
    admissible = jnp.isfinite(proposal_logdensity) & ~jnp.isnan(log_ratio) & position_finite
    is_accepted = admissible & (log_uniform < log_ratio)
    acceptance_rate = jnp.where(
        admissible, jnp.exp(jnp.minimum(log_ratio, 0.0)), jnp.zeros_like(log_ratio)
    )

    new_state = jax.tree_util.tree_map(
        lambda new, old: jnp.where(is_accepted, new, old), proposal, state
    )
    return new_state, RWMHInfo(acceptance_rate, is_accepted, proposal)


def random_walk(
    logdensity_fn: Callable,
    step_size: ArrayLike = 1.0,
    proposal_cov: ArrayLike | None = None,
) -> SamplingAlgorithm:
    """Random-walk Metropolis-Hastings as a BlackJAX ``SamplingAlgorithm``.

    Parameters
    ----------
    logdensity_fn
        Log density of the target (up to a constant) for one position, returning a scalar.
    step_size
        The scalar ``s`` in ``x' = x + s L z``; must be positive.
    proposal_cov
        Proposal covariance ``L L^T``: None (identity), ``(d,)`` variances or a ``(d, d)``
        matrix over the flattened position. It is factored here, once.

    Returns
    -------
    ``blackjax.base.SamplingAlgorithm(init, step)`` with ``init(position, rng_key=None)`` and
    ``step(rng_key, state)``; vmap both for several chains.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, rwmh
    >>> algo = rwmh.random_walk(lambda x: -0.5 * jnp.sum(x**2), step_size=1.0)
    >>> states = jax.vmap(algo.init)(jnp.zeros((4, 2)))
    >>> keys = jax.random.split(jax.random.key(0), 4)
    >>> states, info = jax.vmap(algo.step)(keys, states)
    >>> info.acceptance_rate.shape
    (4,)
    """
    checks.check_callable(logdensity_fn)
    if step_size is None:
        raise ValueError("step_size must be a positive finite scalar; got None.")
    check_step_size(step_size)
    proposal = factor_proposal_cov(proposal_cov)
    kernel = build_kernel()

    def init_fn(position: ArrayLikeTree, rng_key: PRNGKey | None = None) -> RWMHState:
        # rng_key: unused, accepted for BlackJAX's ``init(position, rng_key)``.
        state = init(position, logdensity_fn)
        flat_position = ravel_pytree(state.position)[0]
        _check_factor(proposal.factor, flat_position.shape[0])
        check_step_size(step_size, dtype=flat_position.dtype)
        return state

    def step_fn(rng_key: PRNGKey, state: RWMHState) -> tuple[RWMHState, RWMHInfo]:
        return kernel(rng_key, state, logdensity_fn, step_size, proposal)

    # Imported here: BlackJAX costs a third of a second to import, and compiles a program at
    # import (a default argument of its step-size module), for this one NamedTuple.
    from blackjax.base import SamplingAlgorithm

    return SamplingAlgorithm(init_fn, step_fn)
