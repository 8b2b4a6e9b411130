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

So the draws depend neither on how a run is cut into chunks nor on how its chains are laid
out over devices, and a run resumed from a checkpoint continues with the very same keys.

The scans (:func:`warmup_loop`, :func:`sampling_loop`) are pure and meant to run under
``jit``; :func:`run_warmup` and :func:`run_sampling` are their compiled forms.
:mod:`rwmh.devices` compiles the same functions for sharded chains.

A pseudo-marginal chain (:class:`rwmh.EstimatedLogDensity`) draws its initial ``u`` with
``fold_in(chain_key, INIT_STEP)``, the warmup key of a step index no phase reaches.

Compiled programs
-----------------
A log density is called as ``logdensity_fn(position, *logdensity_args)``. The arguments are
traced, so one compiled program serves every data set of the same shapes; what the function
captures (globals, closure cells, attributes) is read once, when the program is traced, and
becomes a constant of it. The programs of a log density are kept in a cache keyed by the
function's identity (never by its ``__eq__``/``__hash__``, which may be by value, or fail, as
for an Equinox module holding arrays) and held through a weak reference: they, and the
constants captured with them, are freed when the function is. A callable that cannot be
weakly referenced gets programs compiled for the one call.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
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
    "run_keys",
    "step",
    "flat_dimension",
    "init_states",
    "initial_state",
    "init_keys",
    "recompute_logdensity",
    "warmup_loop",
    "run_warmup",
    "sampling_loop",
    "run_sampling",
    "check_logdensity_args",
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


def run_keys(rng_key, num_chains: int) -> tuple[Array, Array]:
    """The chain keys of both phases of a run of :func:`rwmh.sample`: ``chain_keys(k,
    num_chains)`` for each ``k`` of ``phase_keys(rng_key)``, from one compiled call (the
    same bits as those three calls, which compile three programs)."""
    checks.check_key(rng_key)
    return _run_keys(rng_key, int(num_chains))


@partial(jax.jit, static_argnames=("num_chains",))
def _run_keys(rng_key, num_chains: int) -> tuple[Array, Array]:
    warmup_key, sampling_key = phase_keys(rng_key)
    return _fold_in_chains(warmup_key, num_chains), _fold_in_chains(sampling_key, num_chains)


#: On a CPU, more chains than this step in blocks (see :func:`step`) of at most
#: :data:`CHAIN_BLOCK` and at least :data:`MIN_CHAIN_BLOCK` chains.
BLOCK_ABOVE = 32768
CHAIN_BLOCK = 8192
MIN_CHAIN_BLOCK = 2048


def chain_block(num_chains: int) -> int | None:
    """The block size of :func:`step` for ``num_chains`` chains: the largest divisor of
    ``num_chains`` from :data:`MIN_CHAIN_BLOCK` to :data:`CHAIN_BLOCK`, so that every block is
    alike (a shorter last block is compiled on its own and may round differently); None for
    no blocks (up to :data:`BLOCK_ABOVE` chains, or no such divisor)."""
    if num_chains <= BLOCK_ABOVE:
        return None
    for size in range(CHAIN_BLOCK, MIN_CHAIN_BLOCK - 1, -1):
        if num_chains % size == 0:
            return size
    return None


def step(
    logdensity_fn: Callable,
    keys: Array,
    step_index,
    states: RWMHState,
    step_size,
    proposal: FactoredCov,
    blocked: bool = False,
):
    """Move every chain by one step: chain ``c`` with key ``fold_in(keys[c], step_index)``.

    The one vmapped Metropolis-Hastings step of warmup and sampling; returns the batched
    ``(RWMHState, RWMHInfo)``.

    ``blocked`` (static): with more than :data:`BLOCK_ABOVE` chains, step them a block of
    :func:`chain_block` chains at a time (``lax.map`` with ``batch_size``): the draws of one
    chain are those of no blocks up to float rounding (identical where it was checked: 20,000,
    24,000 and 65,536 chains in blocks of 5,000, 8,000 and 8,192), and the same with or without
    chunks. Vmapped over all chains at once, every intermediate of the step is an array over
    all chains, and past about 32,768 chains these no longer fit in a CPU's cache: each
    chain-step then costs about twice as much (measured on 2 cores with 2 MiB of L2 each), in
    warmup and sampling alike; at 16,384 and 32,768 chains blocks cost more than they save.
    Meant for one CPU device; on a GPU, or sharded, all chains at once is right.
    """

    if isinstance(logdensity_fn, EstimatedLogDensity):
        estimator, correlation = logdensity_fn.logdensity_estimator, logdensity_fn.correlation
        kernel = pmmh.build_kernel()

        def one(key, state):
            key = jax.random.fold_in(key, step_index)
            return kernel(key, state, estimator, step_size, proposal, correlation)

    else:
        kernel = build_kernel()

        def one(key, state):
            key = jax.random.fold_in(key, step_index)
            return kernel(key, state, logdensity_fn, step_size, proposal)

    block = chain_block(keys.shape[0]) if blocked else None
    if block is not None:
        return jax.lax.map(lambda pair: one(*pair), (keys, states), batch_size=block)
    return jax.vmap(one)(keys, states)


def _blocked(keys, jit_options) -> bool:
    """Whether :func:`step` should run in blocks: unsharded, on CPU."""
    if jit_options is not None:
        return False
    devices = keys.devices() if isinstance(keys, jax.Array) else ()
    platforms = {device.platform for device in devices} or {jax.default_backend()}
    return platforms == {"cpu"}


def flat_dimension(positions) -> int:
    """Length of one chain's flattened position, from the shapes alone (no computation)."""
    return sum(int(np.prod(np.shape(leaf)[1:])) for leaf in jax.tree_util.tree_leaves(positions))


#: ``key -> (weak reference to the log density, {program name: compiled function})``.
_PROGRAMS: dict = {}


def check_logdensity_args(logdensity_args, name: str = "logdensity_args") -> tuple:
    """``logdensity_args`` as a tuple whose leaves are arrays or numbers (they are traced, so
    nothing else can pass); a ``TypeError`` naming ``name`` otherwise."""
    if not isinstance(logdensity_args, (tuple, list)):
        raise TypeError(
            f"{name} must be a tuple of the extra arguments of logdensity_fn(position, *args); "
            f"got {type(logdensity_args).__name__}."
        )
    for leaf in jax.tree_util.tree_leaves(tuple(logdensity_args)):
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex)):
            raise TypeError(
                f"{name} must hold arrays or numbers (PyTrees of them); got a "
                f"{type(leaf).__name__}. Pass other values by closing over them."
            )
    return tuple(logdensity_args)


def _weak_reference(fn):
    """``(key, reference)`` for the cache, or None for a callable that cannot be weakly
    referenced. A bound method is a new object at every attribute access: it is keyed and
    referenced through its instance and function."""
    try:
        if inspect.ismethod(fn):
            return (id(fn.__self__), id(fn.__func__)), weakref.WeakMethod(fn)
        return id(fn), weakref.ref(fn)
    except TypeError:
        return None


def _bound(fn, args):
    """``fn`` with ``args`` bound after the position (and, for an
    :class:`rwmh.EstimatedLogDensity`, after ``u``)."""
    if isinstance(fn, EstimatedLogDensity):
        if not args:
            return fn
        estimator = fn.logdensity_estimator
        return dataclasses.replace(
            fn, logdensity_estimator=lambda position, u: estimator(position, u, *args)
        )
    return lambda position: fn(position, *args)


def _same(a, b) -> bool:
    if inspect.ismethod(a) and inspect.ismethod(b):
        return a.__self__ is b.__self__ and a.__func__ is b.__func__
    return a is b


def _programs_of(logdensity_fn) -> tuple[dict, Callable]:
    """The compiled programs of ``logdensity_fn`` and ``bind(args) -> logdensity(position)``,
    which the programs trace; neither holds the function strongly."""
    found = _weak_reference(logdensity_fn)
    if found is None:
        return {}, lambda args: _bound(logdensity_fn, args)
    key, reference = found
    entry = _PROGRAMS.get(key)
    if entry is None or not _same(entry[0](), logdensity_fn):

        def forget(dead, key=key):
            if _PROGRAMS.get(key, (None,))[0] is dead:
                del _PROGRAMS[key]

        reference = type(reference)(logdensity_fn, forget)
        entry = _PROGRAMS[key] = (reference, {})
    reference = entry[0]

    def bind(args):
        # Called while tracing, for a caller that holds the function.
        return _bound(reference(), args)

    return entry[1], bind


def _program(logdensity_fn, name, build: Callable):
    """The compiled program ``name`` of ``logdensity_fn``: ``build(bind)``, made once."""
    programs, bind = _programs_of(logdensity_fn)
    if name not in programs:
        programs[name] = build(bind)
    return programs[name]


def _cache_size(kind: str) -> int:
    """Compiled specialisations of every live program of ``kind`` (for the tests)."""
    return sum(
        program._cache_size()
        for _, programs in list(_PROGRAMS.values())
        for name, program in list(programs.items())
        if (name[0] if isinstance(name, tuple) else name) == kind
    )


def _init_batch(logdensity_fn, positions, keys):
    """``jax.vmap(rwmh.init)`` over the chain axis (traced). For an
    :class:`rwmh.EstimatedLogDensity`, ``keys`` (one per chain) draw each chain's ``u``."""
    if isinstance(logdensity_fn, EstimatedLogDensity):
        estimator, aux_shape = logdensity_fn.logdensity_estimator, logdensity_fn.aux_shape
        return jax.vmap(lambda p, k: pmmh.init(p, estimator, k, aux_shape))(positions, keys)
    return jax.vmap(lambda p: init(p, logdensity_fn))(positions)


def init_states(logdensity_fn, positions, keys=None, logdensity_args=()) -> RWMHState:
    """``jax.vmap(rwmh.init)`` over the chain axis, compiled. For an
    :class:`rwmh.EstimatedLogDensity`, ``keys`` (one per chain) draw each chain's ``u``."""

    def build(bind):
        def init_states(positions, keys, args):
            return _init_batch(bind(args), positions, keys)

        return jax.jit(init_states)

    program = _program(logdensity_fn, "init_states", build)
    return program(positions, keys, tuple(logdensity_args))


def init_keys(warmup_key, num_chains: int) -> Array:
    """The keys that draw the initial ``u`` of pseudo-marginal chains: ``fold_in(chain_key,
    INIT_STEP)`` for each chain's warmup key."""
    keys = chain_keys(warmup_key, num_chains)
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, np.uint32(INIT_STEP))


def recompute_logdensity(logdensity_fn, states, logdensity_args=()) -> Array:
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
        estimator = _bound(logdensity_fn, tuple(logdensity_args)).logdensity_estimator
        return jax.jit(jax.vmap(estimator))(states.position, states.u)
    return init_states(logdensity_fn, states.position, logdensity_args=logdensity_args).logdensity


def initial_state(
    logdensity_fn,
    positions,
    step_size=None,
    proposal_cov=None,
    dense=True,
    cov_name="proposal_cov",
    warmup_key=None,
    logdensity_args=(),
    run_key=None,
):
    """Batched chain states and a fresh :class:`rwmh.tuning.AdaptationState` for ``positions``.

    ``proposal_cov`` (an array, None, or a :class:`rwmh.kernel.FactoredCov` that the caller
    has validated already) is validated against the positions' dimension here, outside
    ``jit`` where its values are concrete; errors call it ``cov_name``. For an
    :class:`rwmh.EstimatedLogDensity` the estimator is checked by tracing it (before anything
    is compiled) and ``warmup_key`` draws the chains' ``u`` (:func:`init_keys`); given
    ``run_key``, the key of a run of :func:`rwmh.sample`, instead, its warmup key
    (:func:`phase_keys`) does, derived only for such a log density.
    """
    if not isinstance(proposal_cov, FactoredCov):
        proposal_cov = factor_proposal_cov(proposal_cov, flat_dimension(positions), cov_name)
    covariance = proposal_cov.covariance
    keys = None
    if isinstance(logdensity_fn, EstimatedLogDensity):
        one = jax.tree_util.tree_map(lambda x: x[0], positions)
        _bound(logdensity_fn, tuple(logdensity_args)).check(one)
        num_chains = jax.tree_util.tree_leaves(positions)[0].shape[0]
        if run_key is not None:
            warmup_key = phase_keys(run_key)[0]
        keys = init_keys(warmup_key, num_chains)

    def build(bind):
        def initial_state(positions, step_size, proposal_cov, dense, keys, args):
            states = _init_batch(bind(args), positions, keys)
            flat_one, _ = ravel_pytree(jax.tree_util.tree_map(lambda x: x[0], positions))
            dtype = flat_one.dtype if jnp.issubdtype(flat_one.dtype, jnp.floating) else float
            adapt = tuning.init(flat_one.shape[0], dtype, step_size, proposal_cov, dense=dense)
            return states, adapt

        return jax.jit(initial_state, static_argnames=("dense",))

    program = _program(logdensity_fn, "initial_state", build)
    return program(positions, step_size, covariance, dense, keys, tuple(logdensity_args))


def warmup_loop(
    logdensity_fn: Callable,
    target_acceptance_rate: float | None,
    keys: Array,
    states: RWMHState,
    adaptation_state: tuning.AdaptationState,
    step_indices: Array,
    schedule: tuning.Schedule,
    chain_mask: Array | None = None,
    blocked: bool = False,
):
    """Run the adaptation over the rows of ``schedule``, the steps ``step_indices``.

    ``keys`` are the chains' warmup keys (:func:`chain_keys`); ``chain_mask`` is passed to
    :func:`rwmh.tuning.update`, ``blocked`` to :func:`step`. Returns ``(states,
    adaptation_state, AdaptationInfo)``.
    """
    flat_one, _ = ravel_pytree(jax.tree_util.tree_map(lambda x: x[0], states.position))
    dimension = flat_one.shape[0]
    if target_acceptance_rate is None and isinstance(logdensity_fn, EstimatedLogDensity):
        target_acceptance_rate = pmmh.default_target_acceptance_rate(logdensity_fn.correlation)
    elif target_acceptance_rate is None:
        target_acceptance_rate = tuning.default_target_acceptance_rate(dimension)
    ravel = jax.vmap(lambda p: ravel_pytree(p)[0])
    stride = tuning.moment_stride(dimension)

    def one_step(carry, xs):
        states, adapt = carry
        step_index, row = xs
        new_states, info = step(
            logdensity_fn, keys, step_index, states, adapt.step_size, adapt.proposal, blocked
        )
        adapt_next = tuning.update(
            adapt,
            row,
            ravel(states.position),
            ravel(info.proposal.position),
            info.acceptance_rate,
            target_acceptance_rate,
            chain_mask,
            step_index=step_index,
            moment_stride=stride,
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


def run_warmup(
    logdensity_fn,
    target_acceptance_rate,
    keys,
    states,
    adapt,
    step_indices,
    schedule,
    chain_mask=None,
    *,
    logdensity_args=(),
    jit_options=None,
):
    """Compiled :func:`warmup_loop`, cached per log density (see "Compiled programs") and
    array shapes; ``jit_options`` (hashable pairs, such as sharded outputs) go to ``jax.jit``."""
    options = dict(jit_options or ())

    def build(bind):
        def run_warmup(rate, blocked, keys, states, adapt, steps, schedule, mask, args):
            return warmup_loop(
                bind(args), rate, keys, states, adapt, steps, schedule, mask, blocked
            )

        return jax.jit(run_warmup, static_argnums=(0, 1), **options)

    program = _program(logdensity_fn, ("warmup", jit_options), build)
    return program(
        target_acceptance_rate,
        _blocked(keys, jit_options),
        keys,
        states,
        adapt,
        step_indices,
        schedule,
        chain_mask,
        tuple(logdensity_args),
    )


run_warmup._cache_size = lambda: _cache_size("warmup")


def sampling_loop(
    logdensity_fn: Callable,
    num_draws: int,
    thin: int,
    keys: Array,
    states: RWMHState,
    step_size,
    proposal: FactoredCov,
    first_step,
    blocked: bool = False,
):
    """Take ``num_draws * thin`` steps from ``states`` (steps ``first_step, ...`` of the
    sampling phase), keeping every ``thin``-th state; returns ``(states, (positions, stats))``
    with a leading draw axis. ``blocked`` is passed to :func:`step`."""

    def one_draw(states, draw_index):
        first = first_step + draw_index * thin

        def thin_step(carry, offset):
            states, acceptance_sum, any_accepted = carry
            states, info = step(
                logdensity_fn, keys, first + offset, states, step_size, proposal, blocked
            )
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


def run_sampling(
    logdensity_fn,
    num_draws,
    thin,
    keys,
    states,
    step_size,
    proposal,
    first_step,
    *,
    logdensity_args=(),
    jit_options=None,
):
    """Compiled :func:`sampling_loop`, cached per log density (see "Compiled programs") and
    array shapes; ``jit_options`` as in :func:`run_warmup`."""
    options = dict(jit_options or ())

    def build(bind):
        def run_sampling(num_draws, thin, blocked, keys, states, step_size, proposal, first, args):
            return sampling_loop(
                bind(args), num_draws, thin, keys, states, step_size, proposal, first, blocked
            )

        return jax.jit(run_sampling, static_argnums=(0, 1, 2), **options)

    program = _program(logdensity_fn, ("sampling", jit_options), build)
    return program(
        num_draws,
        thin,
        _blocked(keys, jit_options),
        keys,
        states,
        step_size,
        proposal,
        first_step,
        tuple(logdensity_args),
    )


run_sampling._cache_size = lambda: _cache_size("sampling")
