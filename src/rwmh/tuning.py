"""The tuning maths of warmup: the step size and the proposal covariance, pooled across chains.

This module holds the adaptation state and its ``init`` / ``update`` / ``final`` functions, in
the manner of BlackJAX's adaptation modules, and the schedule of windows; it knows nothing of
chains, keys or loops (:mod:`rwmh.chains` runs it, :mod:`rwmh.adaptation` is the front door).

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
  the step size restarts from ``2.38 / sqrt(d)`` (Roberts, Gelman & Gilks 1997). From 50
  parameters on, only every ``floor(d / 25)``-th step (at most every 8th) adds its draws to
  the moments, with that many times the weight (:func:`moment_stride`): in many dimensions
  the ``d x d`` update of every step cost as much as the chains' moves, and draws of a random
  walk a few steps apart carry almost the same information.
* A final fast phase (default 50 steps) where only the step size adapts. With fewer than four
  chains it is longer (at least 200 chain-steps, see :func:`final_buffer_extension`): the
  step size used after warmup rests on this phase alone.

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rwmh import checks
from rwmh.kernel import FactoredCov, factor_covariance, proposal_scale

__all__ = [
    "AdaptationState",
    "AdaptationInfo",
    "Schedule",
    "build_schedule",
    "slow_windows",
    "final_buffer_extension",
    "default_target_acceptance_rate",
    "initial_step_size",
    "init",
    "update",
    "final",
    "accumulate",
    "merge_moments",
    "moment_stride",
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
REFRESH_INTERVAL = 25


class AdaptationState(NamedTuple):
    """State of the pooled warmup adaptation.

    step_size
        The step size the kernel uses at the next step.
    proposal
        The current proposal covariance (``(d,)`` variances or a ``(d, d)`` matrix) with its
        factor, a :class:`rwmh.kernel.FactoredCov`; refactored only when the covariance changes.
        ``proposal_cov`` is a shorthand for ``proposal.covariance``.
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
    proposal: FactoredCov
    log_step_size_avg: Array
    count: Array
    weight: Array
    mean: Array
    m2: Array
    previous_weight: Array
    previous_mean: Array
    previous_m2: Array

    @property
    def proposal_cov(self) -> Array:
        return self.proposal.covariance


class AdaptationInfo(NamedTuple):
    """Trace of the warmup, one row per step.

    acceptance_rate
        Acceptance probability of every chain, ``(num_steps, num_chains)``.
    step_size
        Step size used at each step, ``(num_steps,)``.
    num_restarted
        Number of chains moved onto another chain's state at the end of each step,
        ``(num_steps,)``: nonzero only where a window ends and chains were stranded (see
        :mod:`rwmh.stragglers`).
    """

    acceptance_rate: Array
    step_size: Array
    num_restarted: Array


def default_target_acceptance_rate(dimension: int) -> float:
    """Asymptotically optimal random-walk acceptance rate for ``dimension`` parameters.

    0.44 in one dimension, falling to 0.234 as the dimension grows (Gelman, Roberts & Gilks
    1996; Roberts, Gelman & Gilks 1997).
    """
    return 0.234 + 0.206 * math.exp(-(dimension - 1) / 2.0)


def initial_step_size(dimension: int) -> float:
    """The optimal scale ``2.38 / sqrt(d)`` for a proposal covariance equal to the target's."""
    return 2.38 / math.sqrt(dimension)


class Schedule(NamedTuple):
    """Stan's warmup windows, one entry per warmup step (boolean arrays of equal length).

    slow_window
        The step belongs to a slow window (its draws estimate the covariance).
    window_end
        The last step of a slow window: the covariance is updated and the step size restarts.
    refresh
        Every ``refresh_interval`` steps into a window: the covariance is re-estimated before
        the window ends.
    restart
        The end of every slow window but the last: chains stranded far below the others
        restart from another chain's state (see :mod:`rwmh.stragglers`).

    A PyTree: ``lax.scan`` over it gives one row (a ``Schedule`` of scalars) per step.
    """

    slow_window: Any
    window_end: Any
    refresh: Any
    restart: Any

    @property
    def num_steps(self) -> int:
        return int(np.shape(self.slow_window)[0])

    def steps(self, first: int, length: int) -> Schedule:
        """The rows of steps ``first, ..., first + length - 1``."""
        return Schedule(*(column[first : first + length] for column in self))

    def at(self, index) -> Schedule:
        """The row of step ``index`` (which may be traced)."""
        return Schedule(*(jnp.asarray(column)[index] for column in self))


#: Chain-steps the final buffer gives the step size at least: its length is
#: ``max(50, ceil(FINAL_CHAIN_STEPS / num_chains))`` where the warmup has room (see
#: :func:`final_buffer_extension`).
FINAL_CHAIN_STEPS = 200
#: Stan's final buffer, and the least warmup that has Stan's fixed buffers (75 + 25 + 50).
_STAN_FINAL_BUFFER = 50
_STAN_MIN_STEPS = 150


def final_buffer_extension(num_steps: int, num_chains: int | None) -> int:
    """Steps the final buffer grows beyond Stan's 50 when few chains pool their acceptance.

    The step size used after warmup rests on the final buffer alone: the step-size recursion
    restarts at the last window end (as Stan's and NumPyro's dual averaging do), which also
    erases whatever rounding the pooled covariance put into it, so that runs over other device
    layouts agree. The acceptance rates of ``C`` chains over 50 steps pin the step size's root
    to about ``0.04 / sqrt(C)`` in acceptance (the sampling acceptance of one chain scattered
    by 0.041 around the target of a 5-d Gaussian, of 64 pooled chains by 0.005). So the final
    buffer holds at least :data:`FINAL_CHAIN_STEPS` chain-steps: 200 steps for one chain, 100
    for two, 67 for three, Stan's 50 from four chains on (one chain's scatter: 0.032). Carrying
    the step size over the last window end instead would use the slow window's steps too, but
    it carries the covariance's rounding into the draws, which then differ between layouts;
    a longer buffer keeps the restart. The extra steps come out of the slow windows,
    whose boundaries are NumPyro's for ``num_steps`` less the extension; it never leaves
    fewer than Stan's 150 steps to the buffers and first window, and is 0 where those do not
    fit (then NumPyro's proportional buffers apply unchanged) and for ``num_chains=None``.
    The result depends on the global chain count and ``num_steps`` only, so it is the same
    on every process and device layout.
    """
    if num_chains is None or num_steps < _STAN_MIN_STEPS:
        return 0
    wanted = -(-FINAL_CHAIN_STEPS // max(int(num_chains), 1)) - _STAN_FINAL_BUFFER
    return int(min(max(wanted, 0), num_steps - _STAN_MIN_STEPS))


def build_schedule(
    num_steps: int,
    refresh_interval: int = REFRESH_INTERVAL,
    restart_stranded: bool = True,
    num_chains: int | None = None,
) -> Schedule:
    """Stan's warmup windows for ``num_steps`` steps, as a :class:`Schedule`.

    The window boundaries are Stan's (:func:`slow_windows`; the same as NumPyro's
    ``build_adaptation_schedule`` and BlackJAX's: a 75-step initial buffer, slow windows of 25,
    50, 100, ... steps, the last absorbing what would be too short to stand alone, and a 50-step
    final buffer; 15% and 10% buffers when those do not fit; no slow window below 20 steps).
    With fewer than four chains pooled (``num_chains``) the final buffer is longer, so that the
    final step size rests on at least 200 chain-steps (:func:`final_buffer_extension`). The
    ``refresh`` and ``restart`` columns are rwmh's own: the in-window covariance refreshes and
    the straggler restarts that random-walk warmup needs and Stan's does not have.

    Parameters
    ----------
    num_steps
        Number of warmup steps.
    refresh_interval
        Steps between covariance refreshes inside a window (0 disables them).
    restart_stranded
        Whether stranded chains restart at the window ends (the ``restart`` column); False
        leaves that column all False.
    num_chains
        The number of chains whose acceptance rates the step size pools (all chains of the
        run, over every process); None gives NumPyro's boundaries whatever the chains.

    Examples
    --------
    >>> from rwmh.tuning import build_schedule
    >>> schedule = build_schedule(1000)
    >>> [int(i) + 1 for i in schedule.window_end.nonzero()[0]]
    [100, 150, 250, 450, 950]
    """
    num_steps = checks.check_int(num_steps, "num_steps", 0)
    if num_chains is not None:
        num_chains = checks.check_int(num_chains, "num_chains", 1)
    columns = np.zeros((4, num_steps), dtype=bool)
    slow_window, window_end, refresh, restart = columns
    # The extension only lengthens the final buffer.
    windows = slow_windows(num_steps - final_buffer_extension(num_steps, num_chains))
    for number, (start, last) in enumerate(windows):
        slow_window[start : last + 1] = True
        window_end[last] = True
        # Stranded chains restart at every window end but the last.
        restart[last] = restart_stranded and number < len(windows) - 1
        if refresh_interval > 0:
            refresh[start + refresh_interval - 1 : last : refresh_interval] = True
    return Schedule(slow_window, window_end, refresh, restart)


def slow_windows(num_steps: int) -> list[tuple[int, int]]:
    """The slow windows of Stan's warmup of ``num_steps`` steps, ``(first, last)`` step
    indices, ends inclusive; none below 20 steps.

    Stan's rule (Stan Reference Manual, "Automatic parameter tuning"): an initial buffer of
    75 steps, a terminal buffer of 50 and a first slow window of 25; when the three do not fit,
    buffers of 15% and 10% of the steps (rounded down) and one window of what is left. Each
    window is twice as long as the one before, and a window is stretched to the terminal
    buffer when the next one would not fit (less than three times its length remains).
    ``tests/test_adaptation.py`` checks it against NumPyro's ``build_adaptation_schedule``,
    which was used here before; it is written out because importing NumPyro costs the first
    :func:`rwmh.sample` call about half a second.
    """
    if num_steps < 20:
        return []
    initial, terminal, size = 75, 50, 25
    if initial + terminal + size > num_steps:
        initial, terminal = int(0.15 * num_steps), int(0.1 * num_steps)
        size = num_steps - initial - terminal
    end = num_steps - terminal
    windows, start = [], initial
    while start < end:
        if 3 * size > end - start:
            size = end - start
        windows.append((start, start + size - 1))
        start, size = start + size, 2 * size
    return windows


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
    factor = proposal_scale(proposal_cov, dimension)
    step_size = jnp.asarray(step_size, dtype)
    return AdaptationState(
        step_size=step_size,
        proposal=FactoredCov(proposal_cov, factor),
        log_step_size_avg=jnp.log(step_size),
        count=jnp.zeros((), jnp.int32),
        weight=jnp.zeros((), dtype),
        mean=jnp.zeros(dimension, dtype),
        m2=jnp.zeros_like(proposal_cov),
        previous_weight=jnp.zeros((), dtype),
        previous_mean=jnp.zeros(dimension, dtype),
        previous_m2=jnp.zeros_like(proposal_cov),
    )


def merge_moments(weight_a, mean_a, m2_a, weight_b, mean_b, m2_b):
    """Merge two sets of weighted moments (Chan, Golub & LeVeque 1979); either may be empty.

    Our own rather than a library's: the weights are the Rao-Blackwellised acceptance
    probabilities (fractional, possibly zero), and ``m2`` is a full ``d x d`` matrix or its
    diagonal, updated inside the compiled warmup loop.
    """
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


def accumulate(state: AdaptationState, points: Array, weights: Array) -> AdaptationState:
    """Merge weighted points ``(n, d)`` into the current window's moments."""
    batch_weight = jnp.sum(weights)
    batch_mean = weights @ points / jnp.where(batch_weight > 0, batch_weight, 1.0)
    centred = points - batch_mean
    if state.m2.ndim == 2:
        batch_m2 = (centred * weights[:, None]).T @ centred
    else:
        batch_m2 = weights @ (centred * centred)
    weight, mean, m2 = merge_moments(
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
    weight, _, m2 = merge_moments(
        fade * state.previous_weight,
        state.previous_mean,
        fade * state.previous_m2,
        state.weight,
        state.mean,
        state.m2,
    )
    covariance = _regularised_covariance(m2, weight)
    variances = covariance if covariance.ndim == 1 else jnp.diag(covariance)
    factor = factor_covariance(covariance)
    # Chains that did not move at all carry no information about the target's shape (and a
    # singular estimate cannot be factored): keep the previous covariance then.
    usable = jnp.all(jnp.isfinite(factor)) & jnp.all(variances > 0) & (weight > 0)
    covariance = jnp.where(usable, covariance, state.proposal.covariance)
    factor = jnp.where(usable, factor, state.proposal.factor)
    restart = jnp.asarray(initial_step_size(dimension), state.step_size.dtype)
    step_size = jnp.where(usable & window_end, restart, state.step_size)

    def rotate(current, previous):
        return jnp.where(window_end, current, previous)

    return state._replace(
        proposal=FactoredCov(covariance, factor),
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
    schedule_row: Schedule,
    flat_positions: Array,
    flat_proposals: Array,
    acceptance_rates: Array,
    target_acceptance_rate: float,
    chain_mask: Array | None = None,
    step_index: Array | None = None,
    moment_stride: int = 1,
) -> AdaptationState:
    """One adaptation step from the transitions of all chains.

    Parameters
    ----------
    state
        The adaptation state.
    schedule_row
        The :class:`Schedule` row of this step (its ``restart`` concerns the chain states,
        not this function).
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
    step_index, moment_stride
        With ``moment_stride`` k > 1 (static), only the steps whose warmup ``step_index`` is
        a multiple of k add their draws to the window's moments, each with weight k, so that
        the weight still counts chain-steps (:func:`moment_stride` gives k and says why).

    Returns
    -------
    The updated :class:`AdaptationState`.
    """
    dtype = state.step_size.dtype
    flat_positions = jnp.atleast_2d(flat_positions)
    flat_proposals = jnp.atleast_2d(flat_proposals)
    acceptance_rates = jnp.atleast_1d(acceptance_rates)
    in_slow_window = schedule_row.slow_window
    window_end, refresh = schedule_row.window_end, schedule_row.refresh
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

    moment_stride = checks.check_int(moment_stride, "moment_stride", 1)
    if moment_stride > 1 and step_index is None:
        raise ValueError("moment_stride > 1 needs the warmup step_index.")

    def add_draws(state):
        # Covariance: Rao-Blackwellised pooled draws while inside a slow window. The next
        # state is the proposal with probability a and the current point otherwise, so
        # weighting both by those probabilities gives the conditional expectation of each
        # statistic.
        points = jnp.concatenate([flat_positions, flat_proposals]).astype(dtype)
        weights = jnp.concatenate([chain_weights - acceptance_rates, acceptance_rates])
        weights = weights.astype(dtype)
        # Outside a slow window every weight is 0, which merges nothing: the moments come out
        # exactly as they went in (the batch's mean and m2 are 0, its merge fraction 0). This
        # costs the same as a select of the merged state and leaves XLA a dozen fewer
        # operations to compile and run per step.
        weights = weights * in_slow_window.astype(dtype)
        if moment_stride > 1:
            weights = weights * jnp.asarray(moment_stride, dtype)
        # A rejected proposal (weight 0) may lie at +-inf when the step overflowed, and
        # 0 * inf is NaN: it would poison the window's moments (no covariance update, no
        # step-size restart for this window and the next). Points of weight 0 count for
        # nothing, so any value will do.
        points = jnp.where(weights[:, None] > 0, points, jnp.zeros_like(points))
        return accumulate(state, points, weights)

    if moment_stride == 1:
        new_state = add_draws(new_state)
    else:
        # The points are gathered inside the branch, so skipped steps do not build them.
        joins = jnp.asarray(step_index) % moment_stride == 0
        new_state = jax.lax.cond(joins, add_draws, lambda s: s, new_state)
    return jax.lax.cond(
        in_slow_window & (window_end | refresh),
        lambda s: _refresh(s, window_end, dimension),
        lambda s: s,
        new_state,
    )


#: Parameters per step of stride in warmup's moments (see :func:`moment_stride`).
_STRIDE_DIMENSIONS = 25
#: The largest stride.
_MAX_MOMENT_STRIDE = 8


def moment_stride(dimension: int) -> int:
    """Every how many warmup steps the draws join the window's moments: every step below 50
    parameters, then every ``floor(d / 25)``-th step, at most every 8th.

    Each step that joins adds its ``2C`` points to the ``d x d`` moments: a product and a pass
    over the matrix, which cost as much as moving the chains when ``d`` is large and the
    chains few (warmup at 4 chains in 200 dimensions ran at 0.41x sampling's chain-steps per
    second in ``benchmarks/scale.py --dimension 200``). Random-walk draws that close together
    carry almost the same information: an optimally tuned random walk needs about ``3 d``
    steps per effective draw (Roberts, Gelman & Gilks 1997: efficiency ``0.331 / d``), so a
    stride of at most ``d / 25`` steps is under 2% of that and the estimate loses next to
    nothing. The stride depends only on the dimension, so that every chain count, device
    layout and chunking of a run takes the same steps.
    """
    dimension = checks.check_int(dimension, "dimension", 1)
    return int(min(max(dimension // _STRIDE_DIMENSIONS, 1), _MAX_MOMENT_STRIDE))


def final(state: AdaptationState) -> dict:
    """The adapted ``{"step_size", "proposal_cov"}``: the averaged step size is used.

    Outside ``jit`` the step size is computed on the host, with numpy, so that no program is
    compiled for one number (that cost the first :func:`rwmh.sample` call about 0.1 s).
    """
    try:
        log_step_size = np.asarray(state.log_step_size_avg)
    except jax.errors.TracerArrayConversionError:
        return {"step_size": jnp.exp(state.log_step_size_avg), "proposal_cov": state.proposal_cov}
    return {"step_size": np.asarray(np.exp(log_step_size)), "proposal_cov": state.proposal_cov}
