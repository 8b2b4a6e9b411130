"""Many chains at once: their keys, initial states, the one vmapped step and the two scans.

Keys
----
This module is the one answer to "which key does chain ``c`` use at step ``t``":

* :func:`rwmh.sample` splits its key once into a warmup key and a sampling key
  (:func:`phase_keys`); :func:`rwmh.window_adaptation` uses its key as the warmup key.
* Chain ``c`` of a phase has the key ``fold_in(phase_key, c)`` (:func:`chain_keys`): it
  depends on the chain's index alone, so padding or sharding the chain axis never changes a
  chain's draws.
* At step ``t`` of the phase (counted from 0 over the whole phase, whatever the chunking)
  chain ``c`` steps with ``fold_in(chain_key, t)`` (:func:`step`).

A pseudo-marginal chain (:class:`rwmh.EstimatedLogDensity`) draws its initial ``u`` with
``fold_in(chain_key, INIT_STEP)``, the warmup key of a step index no phase reaches.

So the draws depend neither on how a run is cut into chunks nor on how its chains are laid
out over devices, and a run resumed from a checkpoint continues with the very same keys.

The scans (:func:`warmup_loop`, :func:`sampling_loop`) are pure and meant to run under
``jit``; :func:`run_warmup` and :func:`run_sampling` are their compiled forms, cached per log
density and array shapes. :mod:`rwmh.devices` compiles the same functions for sharded chains.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from rwmh import checks, pmmh, stragglers, tuning
from rwmh.kernel import FactoredCov, RWMHState, build_kernel, factor_proposal_cov, init
from rwmh.pmmh import EstimatedLogDensity

__all__ = [
    "phase_keys",
    "chain_keys",
    "step",
    "flat_dimension",
    "init_states",
    "init_keys",
    "recompute_logdensity",
    "initial_state",
    "warmup_loop",
    "run_warmup",
    "sampling_loop",
    "run_sampling",
]

Array = jax.Array

#: The warmup step index whose key draws a pseudo-marginal chain's initial ``u``: the largest
#: ``uint32``, which no run reaches.
INIT_STEP = 2**32 - 1


def phase_keys(rng_key) -> tuple[Array, Array]:
    """``(warmup_key, sampling_key)`` of a run of :func:`rwmh.sample`: ``split(rng_key)``."""
    warmup_key, sampling_key = jax.random.split(rng_key)
    return warmup_key, sampling_key


def chain_keys(phase_key, num_chains: int) -> Array:
    """The keys of chains ``0, ..., num_chains - 1``: ``fold_in(phase_key, c)``."""
    checks.check_key(phase_key)
    return _fold_in_chains(phase_key, int(num_chains))


@partial(jax.jit, static_argnames=("num_chains",))
def _fold_in_chains(rng_key, num_chains: int) -> Array:
    # Compiled: run op by op, the vmapped fold_in would compile each primitive on first use,
    # which costs more than the whole warmup on small problems.
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        rng_key, jnp.arange(num_chains, dtype=jnp.uint32)
    )


def step(
    logdensity_fn: Callable,
    keys: Array,
    step_index,
    states: RWMHState,
    step_size,
    proposal: FactoredCov,
):
    """Move every chain by one step: chain ``c`` with key ``fold_in(keys[c], step_index)``.

    The one vmapped Metropolis-Hastings step of warmup and sampling; returns the batched
    ``(RWMHState, RWMHInfo)``.
    """
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step_index)
    if isinstance(logdensity_fn, EstimatedLogDensity):
        estimator, correlation = logdensity_fn.logdensity_estimator, logdensity_fn.correlation
        kernel = pmmh.build_kernel()
        return jax.vmap(lambda k, s: kernel(k, s, estimator, step_size, proposal, correlation))(
            step_keys, states
        )
    kernel = build_kernel()
    return jax.vmap(lambda k, s: kernel(k, s, logdensity_fn, step_size, proposal))(
        step_keys, states
    )


def flat_dimension(positions) -> int:
    """Length of one chain's flattened position, from the shapes alone (no computation)."""
    return sum(int(np.prod(np.shape(leaf)[1:])) for leaf in jax.tree_util.tree_leaves(positions))


@partial(jax.jit, static_argnames=("logdensity_fn",))
def init_states(logdensity_fn, positions, keys=None) -> RWMHState:
    """``jax.vmap(rwmh.init)`` over the chain axis, compiled. For an
    :class:`rwmh.EstimatedLogDensity`, ``keys`` (one per chain) draw each chain's ``u``."""
    if isinstance(logdensity_fn, EstimatedLogDensity):
        estimator, aux_shape = logdensity_fn.logdensity_estimator, logdensity_fn.aux_shape
        return jax.vmap(lambda p, k: pmmh.init(p, estimator, k, aux_shape))(positions, keys)
    return jax.vmap(lambda p: init(p, logdensity_fn))(positions)


def init_keys(warmup_key, num_chains: int) -> Array:
    """The keys that draw the initial ``u`` of pseudo-marginal chains: ``fold_in(chain_key,
    INIT_STEP)`` for each chain's warmup key."""
    keys = chain_keys(warmup_key, num_chains)
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, np.uint32(INIT_STEP))


def recompute_logdensity(logdensity_fn, states) -> Array:
    """The log densities (for an :class:`rwmh.EstimatedLogDensity`: the estimates from the
    states' own ``u``) at the positions of batched ``states``; ValueError if the states are
    not of the kind ``logdensity_fn`` runs."""
    estimated = isinstance(logdensity_fn, EstimatedLogDensity)
    if estimated != hasattr(states, "u"):
        raise ValueError(
            "logdensity_fn must be an rwmh.EstimatedLogDensity exactly when the states carry "
            f"u (pseudo-marginal); got {type(logdensity_fn).__name__} for "
            f"{type(states).__name__}."
        )
    if estimated:
        return jax.jit(jax.vmap(logdensity_fn.logdensity_estimator))(states.position, states.u)
    return init_states(logdensity_fn, states.position).logdensity


def initial_state(
    logdensity_fn,
    positions,
    step_size=None,
    proposal_cov=None,
    dense=True,
    cov_name="proposal_cov",
    warmup_key=None,
):
    """Batched chain states and a fresh :class:`rwmh.tuning.AdaptationState` for ``positions``.

    ``proposal_cov`` (an array, None, or a :class:`rwmh.kernel.FactoredCov` that the caller
    has validated already) is validated against the positions' dimension here, outside
    ``jit`` where its values are concrete; errors call it ``cov_name``. For an
    :class:`rwmh.EstimatedLogDensity` the estimator is checked by tracing it (before anything
    is compiled) and ``warmup_key`` draws the chains' ``u`` (:func:`init_keys`).
    """
    if not isinstance(proposal_cov, FactoredCov):
        proposal_cov = factor_proposal_cov(proposal_cov, flat_dimension(positions), cov_name)
    covariance = proposal_cov.covariance
    keys = None
    if isinstance(logdensity_fn, EstimatedLogDensity):
        logdensity_fn.check(jax.tree_util.tree_map(lambda x: x[0], positions))
        num_chains = jax.tree_util.tree_leaves(positions)[0].shape[0]
        keys = init_keys(warmup_key, num_chains)
    return _initial_state(logdensity_fn, positions, step_size, covariance, dense, keys)


@partial(jax.jit, static_argnames=("logdensity_fn", "dense"))
def _initial_state(logdensity_fn, positions, step_size, proposal_cov, dense, keys=None):
    states = init_states(logdensity_fn, positions, keys)
    flat_one, _ = ravel_pytree(jax.tree_util.tree_map(lambda x: x[0], positions))
    dtype = flat_one.dtype if jnp.issubdtype(flat_one.dtype, jnp.floating) else float
    adapt = tuning.init(flat_one.shape[0], dtype, step_size, proposal_cov, dense=dense)
    return states, adapt


def warmup_loop(
    logdensity_fn: Callable,
    target_acceptance_rate: float | None,
    keys: Array,
    states: RWMHState,
    adaptation_state: tuning.AdaptationState,
    step_indices: Array,
    schedule: tuning.Schedule,
    chain_mask: Array | None = None,
):
    """Run the adaptation over the rows of ``schedule``, the steps ``step_indices``.

    ``keys`` are the chains' warmup keys (:func:`chain_keys`); ``chain_mask`` is passed to
    :func:`rwmh.tuning.update`. Returns ``(states, adaptation_state, AdaptationInfo)``.
    """
    flat_one, _ = ravel_pytree(jax.tree_util.tree_map(lambda x: x[0], states.position))
    dimension = flat_one.shape[0]
    if target_acceptance_rate is None and isinstance(logdensity_fn, EstimatedLogDensity):
        target_acceptance_rate = pmmh.default_target_acceptance_rate(logdensity_fn.correlation)
    elif target_acceptance_rate is None:
        target_acceptance_rate = tuning.default_target_acceptance_rate(dimension)
    ravel = jax.vmap(lambda p: ravel_pytree(p)[0])

    def one_step(carry, xs):
        states, adapt = carry
        step_index, row = xs
        new_states, info = step(
            logdensity_fn, keys, step_index, states, adapt.step_size, adapt.proposal
        )
        adapt_next = tuning.update(
            adapt,
            row,
            ravel(states.position),
            ravel(info.proposal.position),
            info.acceptance_rate,
            target_acceptance_rate,
            chain_mask,
        )
        # Under a cond, so the sort it needs costs nothing at the steps that end no window.
        new_states, num_restarted = stragglers.restart_at_window_end(
            row.restart, new_states, dimension, chain_mask
        )
        return (new_states, adapt_next), tuning.AdaptationInfo(
            info.acceptance_rate, adapt.step_size, num_restarted
        )

    (states, adaptation_state), info = jax.lax.scan(
        one_step, (states, adaptation_state), (step_indices, schedule)
    )
    return states, adaptation_state, info


@partial(jax.jit, static_argnames=("logdensity_fn", "target_acceptance_rate"))
def run_warmup(logdensity_fn, target_acceptance_rate, keys, states, adapt, step_indices, schedule):
    """Compiled :func:`warmup_loop`, cached per log density and array shapes."""
    return warmup_loop(
        logdensity_fn, target_acceptance_rate, keys, states, adapt, step_indices, schedule
    )


def sampling_loop(
    logdensity_fn: Callable,
    num_draws: int,
    thin: int,
    keys: Array,
    states: RWMHState,
    step_size,
    proposal: FactoredCov,
    first_step,
):
    """Take ``num_draws * thin`` steps from ``states`` (steps ``first_step, ...`` of the
    sampling phase), keeping every ``thin``-th state; returns ``(states, (positions, stats))``
    with a leading draw axis."""

    def one_draw(states, draw_index):
        first = first_step + draw_index * thin

        def thin_step(carry, offset):
            states, acceptance_sum, any_accepted = carry
            states, info = step(logdensity_fn, keys, first + offset, states, step_size, proposal)
            return (
                states,
                acceptance_sum + info.acceptance_rate,
                any_accepted | info.is_accepted,
            ), None

        dtype = jnp.result_type(states.logdensity)
        zeros = jnp.zeros(states.logdensity.shape, dtype)
        falses = jnp.zeros(states.logdensity.shape, bool)
        (states, acceptance_sum, any_accepted), _ = jax.lax.scan(
            thin_step, (states, zeros, falses), jnp.arange(thin, dtype=jnp.uint32)
        )
        stats = {
            "acceptance_rate": acceptance_sum / thin,
            "is_accepted": any_accepted,
            "lp": states.logdensity,
        }
        return states, (states.position, stats)

    return jax.lax.scan(one_draw, states, jnp.arange(num_draws, dtype=jnp.uint32))


@partial(jax.jit, static_argnames=("logdensity_fn", "num_draws", "thin"))
def run_sampling(logdensity_fn, num_draws, thin, keys, states, step_size, proposal, first_step):
    """Compiled :func:`sampling_loop`, cached per log density and array shapes."""
    return sampling_loop(
        logdensity_fn, num_draws, thin, keys, states, step_size, proposal, first_step
    )
