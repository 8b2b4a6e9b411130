"""The multi-chain driver: warmup, then sampling, chains vmapped and steps in ``lax.scan``.

Every chain ``c`` draws its randomness from ``fold_in(fold_in(phase_key, c), t)`` where ``t``
is the global step index of the phase (warmup or sampling). The draws therefore depend neither
on how the run is cut into chunks nor on how chains are laid out over devices.

The scans are compiled once per log density and array shapes and cached by ``jax.jit``: a
second call with the same ``logdensity_fn`` (the same Python object) and the same shapes does
not compile again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwmh import adaptation as _adaptation
from rwmh import kernel as _kernel

__all__ = ["SampleResult", "sample"]


@dataclass
class SampleResult:
    """The output of :func:`rwmh.sample`.

    positions
        The draws, a PyTree shaped like one position with leaves ``(chain, draw, ...)``
        (numpy arrays on the host).
    stats
        ``{"acceptance_rate", "is_accepted", "lp"}``, each ``(chain, draw)``. With ``thin > 1``
        ``acceptance_rate`` is the mean acceptance probability over the ``thin`` transitions
        that lead to a stored draw, ``is_accepted`` says whether any of them was accepted (the
        draw differs from the previous one), and ``lp`` is the log density of the stored draw.
    parameters
        ``{"step_size", "proposal_cov"}`` used for sampling (adapted during warmup).
    last_state
        Batched :class:`rwmh.RWMHState` after the last step, to continue sampling.
    warmup_info
        The :class:`rwmh.adaptation.AdaptationInfo` trace of warmup, or None without warmup.
    """

    positions: Any
    stats: dict
    parameters: dict
    last_state: _kernel.RWMHState
    warmup_info: Any = None
    num_warmup: int = 0
    thin: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def num_chains(self) -> int:
        return int(np.shape(self.stats["lp"])[0])

    @property
    def num_draws(self) -> int:
        return int(np.shape(self.stats["lp"])[1])

    def to_inference_data(self, **kwargs):
        """ArviZ ``InferenceData`` with ``posterior`` and ``sample_stats`` groups; keyword
        arguments go to :func:`rwmh.to_inference_data`."""
        from rwmh.arviz import to_inference_data

        stats = dict(self.stats)
        stats["step_size"] = np.broadcast_to(
            np.asarray(self.parameters["step_size"]), np.shape(stats["lp"])
        )
        return to_inference_data(self.positions, stats, **kwargs)


def _sampling_loop(
    logdensity_fn: Callable,
    num_draws: int,
    thin: int,
    chain_keys,
    states: _kernel.RWMHState,
    step_size,
    scale,
    first_step,
):
    """Take ``num_draws * thin`` steps from ``states``, keeping every ``thin``-th state."""
    kernel = _kernel.build_kernel()

    def transition(states, step_index):
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(chain_keys, step_index)
        return jax.vmap(lambda k, s: kernel(k, s, logdensity_fn, step_size, scale=scale))(
            keys, states
        )

    def one_draw(states, draw_index):
        first = first_step + draw_index * thin

        def thin_step(carry, offset):
            states, acceptance_sum, any_accepted = carry
            states, info = transition(states, first + offset)
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
def run_sampling(logdensity_fn, num_draws, thin, chain_keys, states, step_size, scale, first_step):
    """Compiled :func:`_sampling_loop`; returns ``(states, (positions, stats))`` with a
    leading draw axis."""
    return _sampling_loop(
        logdensity_fn, num_draws, thin, chain_keys, states, step_size, scale, first_step
    )


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}.")
    return int(value)


def _check_positions(initial_positions) -> int:
    num_chains = _adaptation._chain_count(initial_positions)
    for leaf in jax.tree_util.tree_leaves(initial_positions):
        dtype = np.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                "initial_positions must hold floating-point arrays (the random walk moves them "
                f"continuously); got dtype {dtype}."
            )
    return num_chains


def _chunks(total: int, size: int):
    """``(first, length)`` pieces of ``range(total)``, all of length ``size`` but the last."""
    for first in range(0, total, size):
        yield first, min(size, total - first)


def _draws_to_host(positions, stats):
    """Move one chunk of draws ``(draw, chain, ...)`` to host memory."""
    return jax.tree_util.tree_map(np.asarray, (positions, stats))


def _concatenate_chunks(chunks):
    """Join chunks along the draw axis and put the chain axis first."""
    joined = jax.tree_util.tree_map(lambda *parts: np.concatenate(parts, axis=0), *chunks)
    return jax.tree_util.tree_map(lambda x: np.swapaxes(x, 0, 1), joined)


def sample(
    rng_key,
    logdensity_fn: Callable,
    initial_positions,
    num_samples: int = 1000,
    num_warmup: int = 1000,
    thin: int = 1,
    step_size=None,
    proposal_cov=None,
    *,
    target_acceptance_rate: float | None = None,
    dense: bool = True,
    progress_bar: bool = True,
    chunk_size: int | None = None,
) -> SampleResult:
    """Run several random-walk Metropolis-Hastings chains: pooled warmup, then sampling.

    Parameters
    ----------
    rng_key
        A typed key (``jax.random.key``) or a legacy ``jax.random.PRNGKey``.
    logdensity_fn
        Log density of the target for one position (a PyTree), returning a scalar.
    initial_positions
        A PyTree whose leaves carry a leading chain axis: ``(num_chains, ...)``.
    num_samples
        Number of draws kept per chain (after thinning).
    num_warmup
        Number of warmup steps that adapt ``step_size`` and ``proposal_cov`` with statistics
        pooled over all chains (:func:`rwmh.window_adaptation`); 0 samples with the given
        parameters as they are.
    thin
        Keep every ``thin``-th state; the chains take ``num_samples * thin`` steps.
    step_size, proposal_cov
        Starting values for warmup, or the parameters used when ``num_warmup == 0``. Default:
        ``2.38 / sqrt(d)`` and the identity.
    target_acceptance_rate, dense
        Passed to the warmup (see :func:`rwmh.window_adaptation`).
    progress_bar
        Show progress (when the output is a terminal).
    chunk_size
        Number of stored draws computed per compiled call before they are moved to the host;
        None computes all of them in one call.

    Returns
    -------
    :class:`SampleResult` with ``positions`` (leaves ``(chain, draw, ...)``), ``stats``,
    ``parameters``, ``last_state`` and ``to_inference_data()``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, rwmh
    >>> logdensity = lambda x: -0.5 * jnp.sum(x**2)
    >>> result = rwmh.sample(jax.random.key(0), logdensity, jnp.zeros((4, 2)),
    ...                      num_samples=200, num_warmup=200, progress_bar=False)
    >>> result.positions.shape
    (4, 200, 2)
    """
    if not callable(logdensity_fn):
        raise TypeError(f"logdensity_fn must be callable; got {type(logdensity_fn).__name__}.")
    num_samples = _check_int(num_samples, "num_samples", 1)
    num_warmup = _check_int(num_warmup, "num_warmup", 0)
    thin = _check_int(thin, "thin", 1)
    if chunk_size is not None:
        chunk_size = _check_int(chunk_size, "chunk_size", 1)
    _adaptation._check_target(target_acceptance_rate)
    if step_size is not None:
        if np.ndim(step_size) != 0 or not np.isfinite(step_size) or step_size <= 0:
            raise ValueError(f"step_size must be a positive finite scalar; got {step_size!r}.")
    num_chains = _check_positions(initial_positions)
    positions = jax.tree_util.tree_map(jnp.asarray, initial_positions)
    dimension = _adaptation.flat_dimension(positions)
    if proposal_cov is not None:
        _kernel.proposal_scale(proposal_cov, dimension)

    warmup_key, sampling_key = jax.random.split(rng_key)
    states, adapt = _adaptation.initial_state(
        logdensity_fn, positions, step_size, proposal_cov, dense
    )
    warmup_info = None
    if num_warmup > 0:
        # Host arrays: slicing them costs no compilation.
        schedule = _adaptation.build_schedule(num_warmup)
        keys = _adaptation.chain_keys(warmup_key, num_chains)
        infos = []
        for first, length in _chunks(num_warmup, chunk_size or num_warmup):
            states, adapt, info = _adaptation.run_warmup(
                logdensity_fn,
                target_acceptance_rate,
                keys,
                states,
                adapt,
                np.arange(first, first + length, dtype=np.uint32),
                schedule[first : first + length],
            )
            infos.append(info)
        warmup_info = (
            infos[0]
            if len(infos) == 1
            else jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *infos)
        )
        parameters, scale = _adaptation.sampling_parameters(adapt)
    else:
        parameters = {"step_size": adapt.step_size, "proposal_cov": proposal_cov}
        scale = _kernel.proposal_scale(proposal_cov, dimension)

    keys = _adaptation.chain_keys(sampling_key, num_chains)
    chunks = []
    for first, num_draws in _chunks(num_samples, chunk_size or num_samples):
        states, draws = run_sampling(
            logdensity_fn,
            num_draws,
            thin,
            keys,
            states,
            parameters["step_size"],
            scale,
            jnp.asarray(first * thin, jnp.uint32),
        )
        chunks.append(_draws_to_host(*draws))
    draws, stats = _concatenate_chunks(chunks)
    return SampleResult(
        positions=draws,
        stats=stats,
        parameters=parameters,
        last_state=states,
        warmup_info=warmup_info,
        num_warmup=num_warmup,
        thin=thin,
    )
