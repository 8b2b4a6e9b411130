"""Restart warmup chains stranded far below the typical set, in O(C log C) for C chains.

Why restart at all
------------------
With the proposal tuned on the draws of all chains, a chain that started in a far corner of a
narrow posterior (a huge noise scale with the coefficients far off, say) can stay there for
the whole warmup, moving by steps fit for the bulk; it also inflates the pooled covariance.
Warmup draws are thrown away, so such a chain may start again from another chain's state.

What "stranded" means
---------------------
A chain is stranded when its log density is lower than a draw from the posterior's typical set
can be. For a Gaussian posterior in ``d`` dimensions the log density of a draw is
``lp(mode) - chi2_d / 2``: it lies below the mode by half a chi-squared variable with ``d``
degrees of freedom, whose spread is ``sqrt(d / 2)`` around ``d / 2``. No chain, however good,
is above the mode, so a chain in the typical set is never further below the best chains than
``chi2_d / 2`` below the mode. :func:`stranded_threshold` is the ``1e-12`` upper quantile of
``chi2_d / 2``: a chain further below the *reference* (the best chains' log density) than that
is stranded; one in the typical set is mistaken for stranded with probability below ``1e-12``
on a Gaussian posterior, so that not even a million chains lose one by chance.

The reference is the ``k``-th highest log density among the chains, ``k = ceil(C / 16)``
(:func:`reference_rank`): the best chains, not the median. A median rule misses stranded
chains as soon as half the chains are stranded (the median is then a stranded chain); this
rule finds them as long as at least ``k`` chains, one in sixteen, have reached the typical set.
Taking the ``k``-th best rather than the very best keeps one chain at a spike of the log
density (a numerical artefact, a degenerate corner) from sending every other chain onto it,
unless one chain in sixteen sits there.

Two modes of equal mass but different widths have typical log densities that differ by
``d log(width ratio)``. The median rule this replaces measured the wide mode's chains against
the narrow mode's median and restarted them whenever they were in the minority and that gap
exceeded ``20 + 5 sqrt(d)``. Here they are measured against the best chains with the whole
``chi2_d / 2`` allowance, so chains in a mode whose typical log density is within about
``d / 2 + 20`` of the best mode's are not moved, however few they are (more room than the
median rule's for ``d`` above about 50, about as much below). A rule on the log density alone
cannot tell a chain in the typical set of a *much* wider mode from a stranded chain: when
``d log(width ratio)`` exceeds that, the wide mode's chains are restarted. Telling them apart
needs the chain's own path, e.g. whether its log density still climbs over the window.

Non-finite log densities always count as stranded; chains marked False in ``chain_mask``
(the padding that fills devices) neither count, nor donate, nor are restarted.

Donors
------
Stranded chain number ``r`` (in chain order) restarts from the state of good chain number
``r mod n_good``: the restarted chains spread evenly over all the good ones (no donor gets
more than ``ceil(n_stranded / n_good)``), in proportion to where the good chains are, so the
share of chains in each mode is kept; and no random numbers are spent (a new threefry program
compiles longer than all the rest of this).

Cost
----
One sort of the ``C`` log densities (the reference), two cumulative sums, a scatter and a
gather: ``O(C log C)`` work and ``O(C)`` memory, no ``C x C`` array. Under sharding over a
``chains`` mesh axis the sort and the cumulative sums communicate across devices, which is why
:func:`restart_at_window_end` runs it under ``lax.cond`` only at the steps that end a warmup
window (a handful per warmup), not at every step as a select.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "RestartWarning",
    "reference_rank",
    "restart_at_window_end",
    "restart_stranded",
    "restarts_by_step",
    "stranded_threshold",
    "warn_restarts",
]

#: One chain in this many must have reached the typical set for the others to be judged.
REFERENCE_FRACTION = 16


def stranded_threshold(dimension: int) -> float:
    """How far below the reference log density a chain is stranded: ``d/2 + 20 + 5 sqrt(d)``.

    This is the ``1e-12`` upper quantile of ``chi2_d / 2`` (how far below its mode a draw from
    a ``d``-dimensional Gaussian lies) in closed form: never below it and at most 5% above it
    for ``d`` from 1 to 10,000 (``tests/test_stragglers.py`` checks it against
    ``scipy.special.chdtri``).
    """
    return dimension / 2.0 + 20.0 + 5.0 * math.sqrt(dimension)


def reference_rank(num_chains):
    """``k``: the reference is the ``k``-th highest log density, ``k = ceil(C / 16)`` for ``C``
    chains (a Python int, or a traced count: :func:`restart_stranded` passes the number of
    chains its mask leaves, so padding is excluded)."""
    return (num_chains + REFERENCE_FRACTION - 1) // REFERENCE_FRACTION


def restart_stranded(states, dimension: int, chain_mask=None):
    """Move stranded chains onto the states of chains in the typical set.

    Parameters
    ----------
    states
        Batched chain states with fields ``position`` (a PyTree, leaves ``(C, ...)``) and
        ``logdensity`` (``(C,)``), e.g. a batched :class:`rwmh.RWMHState`.
    dimension
        Length of one chain's flattened position (static).
    chain_mask
        Optional ``(C,)`` booleans; chains marked False take no part.

    Returns
    -------
    ``(states, num_restarted)``: the states with every stranded chain replaced by a donor's,
    and the number of chains restarted (an int32 scalar), for the driver to report.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from rwmh import RWMHState
    >>> from rwmh.stragglers import restart_stranded
    >>> states = RWMHState(jnp.array([[0.0], [0.1], [50.0], [-0.2]]),
    ...                    jnp.array([-0.9, -0.9, -1250.9, -0.9]))
    >>> new, count = restart_stranded(states, dimension=1)
    >>> int(count), new.position[2].tolist()
    (1, [0.0])
    """
    logdensity = states.logdensity
    num_chains = logdensity.shape[0]
    valid = jnp.ones(num_chains, bool) if chain_mask is None else jnp.asarray(chain_mask, bool)
    finite = jnp.isfinite(logdensity) & valid
    values = jnp.where(finite, logdensity, -jnp.inf)
    # The k-th highest finite value (the highest when fewer than k are finite).
    num_finite = jnp.sum(finite)
    # k counts the valid chains only, so padding the chain axis never changes a decision.
    k = jnp.clip(jnp.minimum(reference_rank(jnp.sum(valid)), num_finite), 1, None)
    reference = jnp.sort(values)[num_chains - k]
    good = finite & (values >= reference - stranded_threshold(dimension))
    num_good = jnp.sum(good)
    restart = valid & ~good & (num_good > 0)

    # donor_list[j] is the index of the j-th good chain: a scatter by rank among the good.
    index = jnp.arange(num_chains)
    good_rank = jnp.cumsum(good) - 1
    donor_list = (
        jnp.zeros(num_chains, index.dtype)
        .at[jnp.where(good, good_rank, num_chains)]
        .set(index, mode="drop")
    )
    restart_rank = jnp.cumsum(restart) - 1
    donors = donor_list[jnp.where(restart, restart_rank % jnp.maximum(num_good, 1), 0)]
    donors = jnp.where(restart, donors, index)

    def pick(x):
        return x[donors]

    return jax.tree_util.tree_map(pick, states), jnp.sum(restart).astype(jnp.int32)


def restart_at_window_end(window_end, states, dimension: int, chain_mask=None):
    """:func:`restart_stranded` where ``window_end`` (a scalar boolean) is True, else nothing.

    Meant for the body of the warmup scan: a ``lax.cond``, so the sort runs only at the few
    steps that end a window (a select would run it at every step). Returns ``(states,
    num_restarted)``, with 0 restarted where ``window_end`` is False.
    """

    def restart(states):
        return restart_stranded(states, dimension, chain_mask)

    def keep(states):
        return states, jnp.zeros((), jnp.int32)

    return jax.lax.cond(window_end, restart, keep, states)


def restarts_by_step(num_restarted, first_step: int = 0) -> dict[int, int]:
    """``{warmup step: chains restarted}`` for the steps where any chain was restarted.

    ``num_restarted`` is the per-step count of :class:`rwmh.tuning.AdaptationInfo`; a step is
    numbered from 1, as the window ends of :func:`rwmh.tuning.build_schedule` are quoted.
    """
    counts = np.asarray(num_restarted)
    return {int(first_step + i + 1): int(counts[i]) for i in np.flatnonzero(counts)}


class RestartWarning(RuntimeWarning):
    """Warmup moved stranded chains onto other chains' states (:func:`warn_restarts`).

    Its own category, so that it can be filtered alone:
    ``warnings.filterwarnings("ignore", category=rwmh.RestartWarning)``; the counts stay in
    ``result.extra["restarted_chains"]`` and ``info.num_restarted``.
    """


def warn_restarts(restarts: dict[int, int], stacklevel: int = 2) -> None:
    """A :class:`RestartWarning` naming how many chains were moved and where, if any were."""
    if not restarts:
        return
    total = sum(restarts.values())
    where = ", ".join(f"{count} at step {step}" for step, count in restarts.items())
    warnings.warn(
        f"warmup moved {total} chain{'s' if total != 1 else ''} whose log density was far below "
        f"the best chains' onto chains in the typical set ({where}; see "
        "result.extra['restarted_chains']). On a target with separated modes this can empty a "
        "mode: compare with restart_stranded=False.",
        RestartWarning,
        stacklevel=stacklevel + 1,
    )
