"""Warmup that tunes the step size and the proposal covariance, pooled across chains.

The scheme follows Stan's windowed adaptation (Stan Reference Manual, "HMC algorithm
parameters"), carried over to random-walk Metropolis and to many chains at once:

* An initial fast phase (default 75 steps) where only the step size adapts, so that chains
  reach the typical set.
* Slow windows of doubling length (25, 50, 100, ...; the last one absorbs the remainder). In
  each window the mean and covariance of the target are estimated from the draws of *all*
  chains pooled together. Each step contributes the Rao-Blackwellised pair ``(x, 1 - a)`` and
  ``(x', a)`` (current point and proposal weighted by the acceptance probability ``a``),
  which is the conditional expectation of the next state and lowers the estimator's variance.
  Every 25 steps inside a window the proposal covariance is re-estimated (as in the adaptive
  Metropolis of Haario et al. 2001), so that the chains mix well long before the window ends;
  these estimates merge in the previous window's draws, which fade out linearly as the
  current window fills and no longer count once it holds twice as many, so that an estimate
  at a window end rests on that window alone, as in Stan, and transient draws from before
  the chains converged do not leak into the final covariance. At the end of a window the
  proposal covariance becomes the pooled estimate, shrunk toward its own diagonal while
  draws are few, ``w S + (1 - w) 1e-3 diag(S)`` with ``w = n / (n + 5)`` (Stan's
  regulariser, made scale-free so that it does not distort parameters on tiny scales), and
  the step size restarts from ``2.38 / sqrt(d)`` (Roberts, Gelman & Gilks 1997).
* A final fast phase (default 50 steps) where only the step size adapts.

The step size follows a Robbins-Monro recursion on its logarithm (Andrieu & Thoms 2008),
``log s <- log s + (t + 1)^(-0.6) (abar - target)``, where ``abar`` is the mean acceptance
probability over all chains, and ``t`` restarts with each window and each refresh. The value
used after warmup is the weighted average of the iterates (weights ``t^(-0.75)``, as Stan's
dual averaging does), which removes the recursion's noise. The default target acceptance rate
depends on the dimension: 0.44 in one dimension falling to 0.234 as ``d`` grows (Gelman,
Roberts & Gilks 1996; Roberts, Gelman & Gilks 1997): ``0.234 + 0.206 exp(-(d - 1) / 2)``.

Adaptation stops at the end of warmup: the parameters returned are fixed, so that sampling
afterwards is a valid (time-homogeneous) Markov chain.

References
----------
Andrieu, C. and Thoms, J. (2008). A tutorial on adaptive MCMC. Statistics and Computing 18,
343-373.

Gelman, A., Roberts, G. O. and Gilks, W. R. (1996). Efficient Metropolis jumping rules.
Bayesian Statistics 5, 599-607.

Haario, H., Saksman, E. and Tamminen, J. (2001). An adaptive Metropolis algorithm.
Bernoulli 7, 223-242.

Roberts, G. O., Gelman, A. and Gilks, W. R. (1997). Weak convergence and optimal scaling of
random walk Metropolis algorithms. Annals of Applied Probability 7, 110-120.

Stan Development Team. Stan Reference Manual, section "Automatic parameter tuning".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from rwmh import _checks
from rwmh import kernel as _kernel

__all__ = [
    "AdaptationState",
    "AdaptationInfo",
    "AdaptationResults",
    "WindowAdaptation",
    "build_schedule",
    "default_target_acceptance_rate",
    "init",
    "update",
    "parameters",
    "window_adaptation",
]

Array = jax.Array

#: Robbins-Monro gain exponent for the log step size.
_GAIN_EXPONENT = 0.6
#: Exponent of the weights that average the step-size iterates (Stan's kappa).
_AVERAGE_EXPONENT = 0.75
#: The previous window's draws stop counting once the current window holds this many times as
#: many (see :func:`_refresh`).
_FADE_RATIO = 2.0
#: Steps between covariance refreshes inside a window.
_REFRESH_INTERVAL = 25


class AdaptationState(NamedTuple):
    """State of the pooled warmup adaptation.

    step_size
        The step size the kernel uses at the next step.
    proposal_cov
        The current proposal covariance, ``(d,)`` variances or a ``(d, d)`` matrix.
    scale
        Its factor (standard deviations or lower Cholesky factor), recomputed only when the
        covariance changes.
    log_step_size_avg
        Weighted average of the log step-size iterates since the last restart.
    count
        Steps since the step-size recursion last restarted.
    weight
        Total weight of the pooled draws of the current slow window (one per chain and step).
    mean
        Weighted mean of those draws, ``(d,)``.
    m2
        Weighted sum of squared deviations, ``(d,)`` (diagonal) or ``(d, d)`` (dense).
    previous_weight, previous_mean, previous_m2
        The same statistics for the slow window before the current one. Estimates made inside
        a window merge the two, so that they never rest on fewer draws than a whole window.
    """

    step_size: Array
    proposal_cov: Array
    scale: Array
    log_step_size_avg: Array
    count: Array
    weight: Array
    mean: Array
    m2: Array
    previous_weight: Array
    previous_mean: Array
    previous_m2: Array


class AdaptationInfo(NamedTuple):
    """Trace of the warmup, one row per step.

    acceptance_rate
        Acceptance probability of every chain, ``(num_steps, num_chains)``.
    step_size
        Step size used at each step, ``(num_steps,)``.
    """

    acceptance_rate: Array
    step_size: Array


class AdaptationResults(NamedTuple):
    """What warmup returns: the chain states after warmup and the adapted parameters."""

    states: _kernel.RWMHState
    parameters: dict


def default_target_acceptance_rate(dimension: int) -> float:
    """Asymptotically optimal random-walk acceptance rate for ``dimension`` parameters.

    0.44 in one dimension, falling to 0.234 as the dimension grows (Gelman, Roberts & Gilks
    1996; Roberts, Gelman & Gilks 1997).
    """
    return 0.234 + 0.206 * math.exp(-(dimension - 1) / 2.0)


def initial_step_size(dimension: int) -> float:
    """The optimal scale ``2.38 / sqrt(d)`` for a proposal covariance equal to the target's."""
    return 2.38 / math.sqrt(dimension)


def build_schedule(
    num_steps: int,
    initial_buffer: int = 75,
    first_window: int = 25,
    final_buffer: int = 50,
    refresh_interval: int = _REFRESH_INTERVAL,
) -> np.ndarray:
    """Stan's warmup windows as a ``(num_steps, 4)`` boolean array.

    Column 0 says whether the step belongs to a slow window (covariance estimation); column 1
    marks the last step of each slow window, where the covariance is updated and the step
    size restarts; column 2 marks the steps, every ``refresh_interval`` steps into a window,
    where the covariance is re-estimated before the window ends; column 3 marks the window
    ends (all but the last) where chains stranded far from the others restart from another
    chain's state. With fewer than 20 steps
    only the step size adapts; when the default buffers do not fit, they become 15% and 10%
    of the steps, as in Stan.

    Parameters
    ----------
    num_steps
        Number of warmup steps.
    initial_buffer, first_window, final_buffer
        Stan's ``init_buffer``, ``window`` and ``term_buffer``.
    refresh_interval
        Steps between covariance refreshes inside a window (0 disables them).

    Examples
    --------
    >>> from rwmh.adaptation import build_schedule
    >>> schedule = build_schedule(1000)
    >>> [int(i) + 1 for i in schedule[:, 1].nonzero()[0]]
    [100, 150, 250, 450, 950]
    """
    _check_num_steps(num_steps)
    schedule = np.zeros((num_steps, 4), dtype=bool)
    if num_steps < 20:
        return schedule
    if initial_buffer + first_window + final_buffer > num_steps:
        initial_buffer = int(0.15 * num_steps)
        final_buffer = int(0.1 * num_steps)
        first_window = num_steps - initial_buffer - final_buffer
    slow_end = num_steps - final_buffer
    start, size = initial_buffer, first_window
    while start < slow_end:
        end = start + size
        # The last window absorbs what would be too short to make a window of its own.
        if end + 2 * size > slow_end:
            end = slow_end
        schedule[start:end, 0] = True
        schedule[end - 1, 1] = True
        # Stranded chains restart at every window end but the last (see _restart_stragglers).
        schedule[end - 1, 3] = end < slow_end
        if refresh_interval > 0:
            schedule[start + refresh_interval - 1 : end - 1 : refresh_interval, 2] = True
        start, size = end, 2 * size
    return schedule


def init(
    dimension: int,
    dtype: Any,
    step_size: Any = None,
    proposal_cov: Any = None,
    dense: bool = True,
) -> AdaptationState:
    """Start the adaptation from a step size and a proposal covariance (defaults: ``2.38 /
    sqrt(d)`` and the identity)."""
    if step_size is None:
        step_size = initial_step_size(dimension)
    if proposal_cov is None:
        proposal_cov = jnp.eye(dimension, dtype=dtype) if dense else jnp.ones(dimension, dtype)
    proposal_cov = jnp.asarray(proposal_cov, dtype)
    if dense and proposal_cov.ndim == 1:
        proposal_cov = jnp.diag(proposal_cov)
    elif not dense and proposal_cov.ndim == 2:
        proposal_cov = jnp.diag(proposal_cov)
    scale = _kernel.proposal_scale(proposal_cov, dimension)
    step_size = jnp.asarray(step_size, dtype)
    return AdaptationState(
        step_size=step_size,
        proposal_cov=proposal_cov,
        scale=scale,
        log_step_size_avg=jnp.log(step_size),
        count=jnp.zeros((), jnp.int32),
        weight=jnp.zeros((), dtype),
        mean=jnp.zeros(dimension, dtype),
        m2=jnp.zeros_like(proposal_cov),
        previous_weight=jnp.zeros((), dtype),
        previous_mean=jnp.zeros(dimension, dtype),
        previous_m2=jnp.zeros_like(proposal_cov),
    )


def _merge(weight_a, mean_a, m2_a, weight_b, mean_b, m2_b):
    """Merge two sets of weighted moments (Chan, Golub & LeVeque 1979); either may be empty."""
    total = weight_a + weight_b
    # An empty pair must merge to the other set, not to NaN.
    fraction = jnp.where(total > 0, weight_b / jnp.where(total > 0, total, 1.0), 0.0)
    delta = mean_b - mean_a
    mean = mean_a + fraction * delta
    correction = weight_a * fraction
    if m2_a.ndim == 2:
        m2 = m2_a + m2_b + correction * jnp.outer(delta, delta)
    else:
        m2 = m2_a + m2_b + correction * delta * delta
    return total, mean, m2


def _accumulate(state: AdaptationState, points: Array, weights: Array) -> AdaptationState:
    """Merge weighted points ``(n, d)`` into the current window's moments."""
    batch_weight = jnp.sum(weights)
    batch_mean = weights @ points / jnp.where(batch_weight > 0, batch_weight, 1.0)
    centred = points - batch_mean
    if state.m2.ndim == 2:
        batch_m2 = (centred * weights[:, None]).T @ centred
    else:
        batch_m2 = weights @ (centred * centred)
    weight, mean, m2 = _merge(
        state.weight, state.mean, state.m2, batch_weight, batch_mean, batch_m2
    )
    return state._replace(weight=weight, mean=mean, m2=m2)


def _regularised_covariance(m2: Array, weight: Array) -> Array:
    """The pooled covariance shrunk toward its diagonal, ``w S + (1 - w) 1e-3 diag(S)``.

    ``weight`` counts chain-steps (each contributes weight one), so the shrinkage vanishes as
    draws accumulate; it is Stan's regulariser made scale-free, so that it does not distort
    parameters on tiny scales.
    """
    covariance = m2 / weight
    w = weight / (weight + 5.0)
    if covariance.ndim == 1:
        return w * covariance + (1.0 - w) * 1e-3 * covariance
    return w * covariance + (1.0 - w) * 1e-3 * jnp.diag(jnp.diag(covariance))


#: Factor of a covariance, shared with the kernel (see :func:`rwmh.kernel.factor_covariance`).
_factor = _kernel.factor_covariance


def _refresh(state: AdaptationState, window_end: Array, dimension: int) -> AdaptationState:
    """New proposal covariance from the current and the previous window's pooled draws.

    Inside a window (``window_end`` False) the covariance improves as draws come in, so that
    the chains mix better for the rest of the window (as in Haario et al. 2001); the step
    size keeps its value and its recursion restarts. At a window end the step size also
    restarts from ``2.38 / sqrt(d)`` and the current window becomes the previous one.
    """
    # The previous window's draws fade out as the current window's accumulate: they fill in
    # for a window that has only just begun, but they were made with a worse proposal and
    # possibly before the chains converged, so once the current window holds twice as many
    # draws they no longer count. With doubling windows an estimate at a window end thus rests
    # on that window alone, as in Stan.
    has_previous = state.previous_weight > 0
    fade = jnp.clip(
        1.0 - state.weight / (_FADE_RATIO * jnp.where(has_previous, state.previous_weight, 1.0)),
        0.0,
        1.0,
    )
    fade = jnp.where(has_previous, fade, 0.0)
    weight, _, m2 = _merge(
        fade * state.previous_weight,
        state.previous_mean,
        fade * state.previous_m2,
        state.weight,
        state.mean,
        state.m2,
    )
    covariance = _regularised_covariance(m2, weight)
    variances = covariance if covariance.ndim == 1 else jnp.diag(covariance)
    scale = _factor(covariance)
    # Chains that did not move at all carry no information about the target's shape (and a
    # singular estimate cannot be factored): keep the previous covariance then.
    usable = jnp.all(jnp.isfinite(scale)) & jnp.all(variances > 0) & (weight > 0)
    covariance = jnp.where(usable, covariance, state.proposal_cov)
    scale = jnp.where(usable, scale, state.scale)
    restart = jnp.asarray(initial_step_size(dimension), state.step_size.dtype)
    step_size = jnp.where(usable & window_end, restart, state.step_size)

    def rotate(current, previous):
        return jnp.where(window_end, current, previous)

    return state._replace(
        proposal_cov=covariance,
        scale=scale,
        step_size=step_size,
        log_step_size_avg=jnp.log(step_size),
        count=jnp.zeros_like(state.count),
        weight=jnp.where(window_end, 0.0, state.weight).astype(state.weight.dtype),
        mean=jnp.where(window_end, 0.0, state.mean).astype(state.mean.dtype),
        m2=jnp.where(window_end, 0.0, state.m2).astype(state.m2.dtype),
        previous_weight=rotate(state.weight, state.previous_weight),
        previous_mean=rotate(state.mean, state.previous_mean),
        previous_m2=rotate(state.m2, state.previous_m2),
    )


def update(
    state: AdaptationState,
    schedule_row: Array,
    flat_positions: Array,
    flat_proposals: Array,
    acceptance_rates: Array,
    target_acceptance_rate: float,
    chain_mask: Array | None = None,
) -> AdaptationState:
    """One adaptation step from the transitions of all chains.

    Parameters
    ----------
    state
        The adaptation state.
    schedule_row
        A row of :func:`build_schedule`: ``(in_slow_window, window_end, refresh, ...)``. A
        row of two entries (no ``refresh``) is accepted and never refreshes inside a window.
        Column 3 (restart stranded chains) concerns the chain states, not this function.
    flat_positions, flat_proposals
        ``(num_chains, d)`` flattened positions before the step and the proposals made; a
        single chain may also pass ``(d,)``.
    acceptance_rates
        ``(num_chains,)`` acceptance probabilities of those proposals (or a scalar for one
        chain).
    target_acceptance_rate
        The acceptance rate the step size is tuned toward.
    chain_mask
        Optional ``(num_chains,)`` booleans; chains marked False (padding that fills devices)
        take no part in the pooled statistics. None: every chain counts.

    Returns
    -------
    The updated :class:`AdaptationState`.
    """
    dtype = state.step_size.dtype
    flat_positions = jnp.atleast_2d(flat_positions)
    flat_proposals = jnp.atleast_2d(flat_proposals)
    acceptance_rates = jnp.atleast_1d(acceptance_rates)
    schedule_row = jnp.asarray(schedule_row)
    in_slow_window, window_end = schedule_row[0], schedule_row[1]
    refresh = schedule_row[2] if schedule_row.shape[0] > 2 else jnp.zeros((), bool)
    dimension = flat_positions.shape[-1]
    acceptance_rates = jnp.where(jnp.isfinite(acceptance_rates), acceptance_rates, 0.0)
    if chain_mask is None:
        chain_weights = 1.0
        mean_acceptance = jnp.mean(acceptance_rates).astype(dtype)
    else:
        # Weight zero for a masked chain, here and in the window's covariance below, gives the
        # statistics of the chains without the padding.
        chain_weights = chain_mask.astype(acceptance_rates.dtype)
        acceptance_rates = acceptance_rates * chain_weights
        mean_acceptance = (jnp.sum(acceptance_rates) / jnp.sum(chain_weights)).astype(dtype)

    # Step size: Robbins-Monro on log s with the pooled acceptance, then averaged iterates.
    count = state.count + 1
    t = count.astype(dtype)
    log_step_size = jnp.log(state.step_size) + t ** (-_GAIN_EXPONENT) * (
        mean_acceptance - target_acceptance_rate
    )
    average_weight = t ** (-_AVERAGE_EXPONENT)
    log_step_size_avg = (
        average_weight * log_step_size + (1.0 - average_weight) * state.log_step_size_avg
    )
    new_state = state._replace(
        step_size=jnp.exp(log_step_size).astype(dtype),
        log_step_size_avg=log_step_size_avg.astype(dtype),
        count=count,
    )

    # Covariance: Rao-Blackwellised pooled draws while inside a slow window. The next state
    # is the proposal with probability a and the current point otherwise, so weighting both
    # by those probabilities gives the conditional expectation of each statistic.
    points = jnp.concatenate([flat_positions, flat_proposals]).astype(dtype)
    weights = jnp.concatenate([chain_weights - acceptance_rates, acceptance_rates]).astype(dtype)
    # A rejected proposal (weight 0) may lie at +-inf when the step overflowed, and 0 * inf is
    # NaN: it would poison the window's moments (no covariance update, no step-size restart for
    # this window and the next). Points of weight 0 count for nothing, so any value will do.
    points = jnp.where(weights[:, None] > 0, points, jnp.zeros_like(points))
    accumulated = _accumulate(new_state, points, weights)
    new_state = jax.tree_util.tree_map(
        lambda a, b: jnp.where(in_slow_window, a, b), accumulated, new_state
    )
    return jax.lax.cond(
        in_slow_window & (window_end | refresh),
        lambda s: _refresh(s, window_end, dimension),
        lambda s: s,
        new_state,
    )


def parameters(state: AdaptationState) -> dict:
    """The adapted ``{"step_size", "proposal_cov"}``: the averaged step size is used."""
    return {"step_size": jnp.exp(state.log_step_size_avg), "proposal_cov": state.proposal_cov}


def _check_target(target_acceptance_rate, name: str = "target_acceptance_rate"):
    """The target as a float, or None; an error naming ``name`` unless it lies in (0, 1)."""
    if target_acceptance_rate is None:
        return None
    try:
        value = float(target_acceptance_rate)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a number in (0, 1) or None; got {target_acceptance_rate!r}."
        ) from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in (0, 1); got {value}.")
    return value


def _check_num_steps(num_steps, name: str = "num_steps"):
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(f"{name} must be a non-negative integer; got {num_steps!r}.")
    if num_steps < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {num_steps}.")


def _chain_count(positions, name: str = "positions") -> int:
    leaves = jax.tree_util.tree_leaves(positions)
    if not leaves:
        raise ValueError(f"{name} must hold at least one array.")
    sizes = set()
    for leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"{name} must carry a leading chain axis (num_chains, ...); got a scalar leaf. "
                "For one chain, add an axis: position[None]."
            )
        sizes.add(shape[0])
    if len(sizes) != 1:
        raise ValueError(
            f"{name}: every leaf must have the same leading chain axis; got sizes {sorted(sizes)}."
        )
    return sizes.pop()


def straggler_threshold(dimension: int) -> float:
    """How far below the chains' median log density a chain must be to count as stranded.

    Draws from a roughly Gaussian posterior in ``d`` dimensions have log densities spread
    with sd ``sqrt(d / 2)`` (half a chi-squared), so ``20 + 5 sqrt(d)`` is more than seven of
    those sds for any ``d``: a chain in the typical set is never that far below the median.
    """
    return 20.0 + 5.0 * math.sqrt(dimension)


def _restart_stragglers(
    states: _kernel.RWMHState, dimension: int, enabled=True, chain_mask: Array | None = None
):
    """Move chains stranded far below the others onto the states of randomly chosen others.

    With proposals tuned on the pooled draws, a chain that started in a far corner of a
    narrow posterior (say a huge ``sigma`` with the coefficients far off) can stay there for
    the whole warmup, moving by steps fit for the bulk of the posterior; it would also keep
    inflating the pooled covariance. Warmup draws are discarded, so such a chain may start
    again anywhere: it restarts from the state of one of the chains within
    :func:`straggler_threshold` of the median log density (a chain with a non-finite log
    density always restarts; one that is within the threshold never does).
    Only done at the ends of all but the last slow window, so every chain has the last slow
    window and the final buffer to move away from its donor before sampling.
    Chains marked False in ``chain_mask`` (padding) neither count in the median nor donate.
    """
    logdensity = states.logdensity
    num_chains = logdensity.shape[0]
    finite = jnp.isfinite(logdensity)
    # Non-finite values count as -inf, so that they sit at the bottom of the median.
    values = jnp.where(finite, logdensity, -jnp.inf)
    if chain_mask is None:
        median = jnp.median(values)
    else:
        median = jnp.nanmedian(jnp.where(chain_mask, values, jnp.nan))
        finite = finite & chain_mask
    good = finite & (logdensity >= median - straggler_threshold(dimension))
    # Chain c restarts from the (c mod n_good)-th good chain, which spreads the restarted
    # chains over the donors without spending random numbers (compiling another threefry
    # hash costs more than all the rest of this function).
    num_good = jnp.sum(good)
    rank = jnp.cumsum(good) - 1
    wanted = jnp.arange(num_chains) % jnp.maximum(num_good, 1)
    donors = jnp.argmax(good[None, :] & (rank[None, :] == wanted[:, None]), axis=1)
    restart = enabled & ~good & (num_good > 0)

    def pick(x):
        mask = restart.reshape((num_chains,) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x[donors], x)

    return jax.tree_util.tree_map(pick, states)


def warmup_loop(
    logdensity_fn: Callable,
    target_acceptance_rate: float | None,
    chain_keys: Array,
    states: _kernel.RWMHState,
    adaptation_state: AdaptationState,
    step_indices: Array,
    schedule: Array,
    chain_mask: Array | None = None,
):
    """Run the adaptation over the rows of ``schedule``; pure, meant to be called under ``jit``.

    The key of chain ``c`` at warmup step ``t`` is ``fold_in(chain_keys[c], t)``, with ``t``
    taken from ``step_indices``, so a warmup run in pieces equals one run in a single piece.
    ``chain_mask`` is passed to :func:`update`.
    Returns ``(states, adaptation_state, AdaptationInfo)``.
    """
    flat_one, _ = ravel_pytree(jax.tree_util.tree_map(lambda x: x[0], states.position))
    dimension = flat_one.shape[0]
    if target_acceptance_rate is None:
        target_acceptance_rate = default_target_acceptance_rate(dimension)
    kernel = _kernel.build_kernel()
    ravel = jax.vmap(lambda p: ravel_pytree(p)[0])

    def one_step(carry, xs):
        states, adapt = carry
        step_index, row = xs
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(chain_keys, step_index)
        new_states, info = jax.vmap(
            lambda k, s: kernel(k, s, logdensity_fn, adapt.step_size, scale=adapt.scale)
        )(keys, states)
        adapt_next = update(
            adapt,
            row,
            ravel(states.position),
            ravel(info.proposal.position),
            info.acceptance_rate,
            target_acceptance_rate,
            chain_mask,
        )
        if row.shape[0] > 3:
            # A select rather than a cond: the work is a few comparisons per chain, and a
            # second branch in the loop costs more to compile than it saves at run time.
            new_states = _restart_stragglers(
                new_states, dimension, enabled=row[3], chain_mask=chain_mask
            )
        return (new_states, adapt_next), AdaptationInfo(info.acceptance_rate, adapt.step_size)

    (states, adaptation_state), info = jax.lax.scan(
        one_step, (states, adaptation_state), (step_indices, schedule)
    )
    return states, adaptation_state, info


@partial(jax.jit, static_argnames=("logdensity_fn", "target_acceptance_rate"))
def run_warmup(
    logdensity_fn, target_acceptance_rate, chain_keys, states, adapt, step_indices, schedule
):
    """Compiled :func:`warmup_loop`, cached per log density and array shapes."""
    return warmup_loop(
        logdensity_fn, target_acceptance_rate, chain_keys, states, adapt, step_indices, schedule
    )


def chain_keys(rng_key, num_chains: int) -> Array:
    """Key of chain ``c`` is ``fold_in(rng_key, c)``: it depends on the chain's index alone, so
    padding or sharding the chain axis never changes a chain's draws."""
    _checks.check_key(rng_key)
    return _fold_in_chains(rng_key, int(num_chains))


@partial(jax.jit, static_argnames=("num_chains",))
def _fold_in_chains(rng_key, num_chains: int) -> Array:
    # Compiled: run op by op, the vmapped fold_in would compile each primitive on first use,
    # which costs more than the whole warmup on small problems.
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        rng_key, jnp.arange(num_chains, dtype=jnp.uint32)
    )


def initial_state(
    logdensity_fn, positions, step_size=None, proposal_cov=None, dense=True, cov_name="proposal_cov"
):
    """Batched chain states and a fresh :class:`AdaptationState` for ``positions``.

    ``proposal_cov`` is validated against the positions' dimension first, outside ``jit`` where
    its values are concrete; errors call it ``cov_name``.
    """
    if proposal_cov is not None:
        _kernel.proposal_scale(proposal_cov, flat_dimension(positions), name=cov_name)
    return _initial_state(logdensity_fn, positions, step_size, proposal_cov, dense)


@partial(jax.jit, static_argnames=("logdensity_fn", "dense"))
def _initial_state(logdensity_fn, positions, step_size, proposal_cov, dense):
    states = init_states(logdensity_fn, positions)
    flat_one, _ = ravel_pytree(jax.tree_util.tree_map(lambda x: x[0], positions))
    dtype = flat_one.dtype if jnp.issubdtype(flat_one.dtype, jnp.floating) else float
    adapt = init(flat_one.shape[0], dtype, step_size, proposal_cov, dense=dense)
    return states, adapt


def flat_dimension(positions) -> int:
    """Length of one chain's flattened position, from the shapes alone (no computation)."""
    return sum(int(np.prod(np.shape(leaf)[1:])) for leaf in jax.tree_util.tree_leaves(positions))


def sampling_parameters(state: AdaptationState):
    """``(parameters(state), factor of its proposal_cov)`` for sampling.

    The state keeps the factor of its covariance up to date (``state.scale``), so nothing is
    factored (or compiled) again here.
    """
    return parameters(state), state.scale


@partial(jax.jit, static_argnames=("logdensity_fn",))
def init_states(logdensity_fn, positions) -> _kernel.RWMHState:
    """``jax.vmap(rwmh.init)`` over the chain axis, compiled."""
    return jax.vmap(lambda p: _kernel.init(p, logdensity_fn))(positions)


class WindowAdaptation(NamedTuple):
    """Adaptation algorithm with ``run(rng_key, positions, num_steps)``, as BlackJAX's."""

    run: Callable


def window_adaptation(
    logdensity_fn: Callable,
    target_acceptance_rate: float | None = None,
    dense: bool = True,
    initial_step_size: float | None = None,
    initial_proposal_cov: Any = None,
) -> WindowAdaptation:
    """Warmup that adapts ``step_size`` and ``proposal_cov`` with statistics pooled across chains.

    Parameters
    ----------
    logdensity_fn
        Log density of the target for one position.
    target_acceptance_rate
        Acceptance rate to tune the step size toward, in (0, 1). By default it depends on the
        dimension ``d``: ``0.234 + 0.206 exp(-(d - 1) / 2)`` (0.44 for d = 1).
    dense
        Estimate a dense covariance (True) or only the variances (False).
    initial_step_size, initial_proposal_cov
        Starting values; by default ``2.38 / sqrt(d)`` and the identity.

    Returns
    -------
    An object whose ``run(rng_key, positions, num_steps=1000)`` returns
    ``(AdaptationResults(states, parameters), info)``, where ``positions`` carry a leading chain
    axis, ``states`` are the chain states after warmup, ``parameters`` is
    ``{"step_size", "proposal_cov"}`` for :func:`rwmh.random_walk`, and ``info`` is an
    :class:`AdaptationInfo`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, rwmh
    >>> logdensity = lambda x: -0.5 * jnp.sum(x**2 / jnp.array([1.0, 100.0]))
    >>> warmup = rwmh.window_adaptation(logdensity)
    >>> (states, parameters), info = warmup.run(jax.random.key(0), jnp.zeros((8, 2)), 500)
    >>> sorted(parameters)
    ['proposal_cov', 'step_size']
    """
    _checks.check_callable(logdensity_fn)
    target_acceptance_rate = _check_target(target_acceptance_rate)
    dense = _checks.check_bool(dense, "dense")
    _kernel.check_step_size(initial_step_size, "initial_step_size")
    if initial_proposal_cov is not None:
        _kernel.proposal_scale(initial_proposal_cov, name="initial_proposal_cov")

    def run(rng_key, positions, num_steps: int = 1000):
        _checks.check_key(rng_key)
        _check_num_steps(num_steps)
        num_chains = _chain_count(positions)
        _checks.check_float_positions(positions, "positions", batched=True)
        positions = jax.tree_util.tree_map(jnp.asarray, positions)
        states, adapt = initial_state(
            logdensity_fn,
            positions,
            initial_step_size,
            initial_proposal_cov,
            dense,
            cov_name="initial_proposal_cov",
        )
        _checks.check_finite_logdensity(states.logdensity, "positions")
        schedule = build_schedule(num_steps)
        step_indices = np.arange(num_steps, dtype=np.uint32)
        keys = chain_keys(rng_key, num_chains)
        states, adapt, info = run_warmup(
            logdensity_fn, target_acceptance_rate, keys, states, adapt, step_indices, schedule
        )
        return AdaptationResults(states, parameters(adapt)), info

    return WindowAdaptation(run)
