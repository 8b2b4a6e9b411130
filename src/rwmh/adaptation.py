"""``rwmh.window_adaptation``: pooled warmup on its own, BlackJAX style.

The front door to the warmup of :func:`rwmh.sample`: the same tuning (:mod:`rwmh.tuning`,
where the scheme and its references are described) run by the same compiled loop
(:func:`rwmh.chains.run_warmup`), returning the chain states and the adapted parameters as
``blackjax.window_adaptation`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rwmh import chains, checks, stragglers, tuning
from rwmh.kernel import RWMHState, check_step_size, proposal_scale

__all__ = ["AdaptationResults", "WindowAdaptation", "window_adaptation"]


class AdaptationResults(NamedTuple):
    """What warmup returns: the chain states after warmup and the adapted parameters."""

    states: RWMHState
    parameters: dict


class WindowAdaptation(NamedTuple):
    """Adaptation algorithm with ``run(rng_key, positions, num_steps)``, as BlackJAX's."""

    run: Callable


def window_adaptation(
    logdensity_fn: Callable,
    target_acceptance_rate: float | None = None,
    dense: bool = True,
    initial_step_size: float | None = None,
    initial_proposal_cov: Any = None,
    restart_stranded: bool = True,
) -> WindowAdaptation:
    """Warmup that adapts ``step_size`` and ``proposal_cov`` with statistics pooled across chains.

    Parameters
    ----------
    logdensity_fn
        Log density of the target for one position, called as
        ``logdensity_fn(position, *logdensity_args)`` with the ``logdensity_args`` of ``run``
        (extra arguments such as data, traced: see :func:`rwmh.sample`); or an
        :class:`rwmh.EstimatedLogDensity` (pseudo-marginal; the default target acceptance
        rate is then :func:`rwmh.pmmh.default_target_acceptance_rate`).
    target_acceptance_rate
        Acceptance rate to tune the step size toward, in (0, 1). By default it depends on the
        dimension ``d``: ``0.234 + 0.206 exp(-(d - 1) / 2)`` (0.44 for d = 1).
    dense
        Estimate a dense covariance (True) or only the variances (False).
    initial_step_size, initial_proposal_cov
        Starting values; by default ``2.38 / sqrt(d)`` and the identity.
    restart_stranded
        At the end of every slow window but the last, move chains whose log density is far
        below the best chains' onto the states of chains in the typical set (the rule and its
        limits are in :mod:`rwmh.stragglers`). Every restart is counted in
        ``info.num_restarted`` and announced with an :class:`rwmh.RestartWarning`; False turns
        it off.

    Returns
    -------
    An object whose ``run(rng_key, positions, num_steps=1000, logdensity_args=())`` returns
    ``(AdaptationResults(states, parameters), info)``, where ``positions`` carry a leading chain
    axis, ``states`` are the chain states after warmup, ``parameters`` is
    ``{"step_size", "proposal_cov"}`` for :func:`rwmh.random_walk`, and ``info`` is an
    :class:`rwmh.tuning.AdaptationInfo`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, rwmh
    >>> logdensity = lambda x: -0.5 * jnp.sum(x**2 / jnp.array([1.0, 100.0]))
    >>> warmup = rwmh.window_adaptation(logdensity)
    >>> (states, parameters), info = warmup.run(jax.random.key(0), jnp.zeros((8, 2)), 500)
    >>> sorted(parameters)
    ['proposal_cov', 'step_size']
    """
    checks.check_callable(logdensity_fn)
    target_acceptance_rate = checks.check_probability(
        target_acceptance_rate, "target_acceptance_rate"
    )
    dense = checks.check_bool(dense, "dense")
    restart_stranded = checks.check_bool(restart_stranded, "restart_stranded")
    check_step_size(initial_step_size, "initial_step_size")
    if initial_proposal_cov is not None:
        proposal_scale(initial_proposal_cov, name="initial_proposal_cov")

    def run(rng_key, positions, num_steps: int = 1000, logdensity_args=()):
        checks.check_key(rng_key)
        logdensity_args = chains.check_logdensity_args(logdensity_args)
        num_steps = checks.check_int(num_steps, "num_steps", 0)
        num_chains = checks.check_chain_axis(positions, "positions")
        checks.check_float_positions(positions, "positions", batched=True)
        checks.check_dimension(positions, "positions", batched=True)
        check_step_size(
            initial_step_size,
            "initial_step_size",
            dtype=jnp.result_type(*jax.tree_util.tree_leaves(positions)),
        )
        positions = jax.tree_util.tree_map(jnp.asarray, positions)
        states, adapt = chains.initial_state(
            logdensity_fn,
            positions,
            initial_step_size,
            initial_proposal_cov,
            dense,
            cov_name="initial_proposal_cov",
            warmup_key=rng_key,
            logdensity_args=logdensity_args,
        )
        checks.check_finite_logdensity(states.logdensity, "positions")
        schedule = tuning.build_schedule(
            num_steps, restart_stranded=restart_stranded, num_chains=num_chains
        )
        step_indices = np.arange(num_steps, dtype=np.uint32)
        # The run's key is the warmup key (see rwmh.chains on keys).
        keys = chains.chain_keys(rng_key, num_chains)
        states, adapt, info = chains.run_warmup(
            logdensity_fn,
            target_acceptance_rate,
            keys,
            states,
            adapt,
            step_indices,
            schedule,
            logdensity_args=logdensity_args,
        )
        stragglers.warn_restarts(stragglers.restarts_by_step(info.num_restarted))
        return AdaptationResults(states, tuning.final(adapt)), info

    return WindowAdaptation(run)
