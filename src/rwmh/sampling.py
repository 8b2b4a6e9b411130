"""``rwmh.sample`` and ``rwmh.resume``: warmup, then sampling, chunk by chunk.

A call checks its arguments, builds the chain states (:mod:`rwmh.chains`), a
:class:`rwmh.devices.Layout` for ``devices=`` and a :class:`rwmh.run.Run`, then :func:`_drive`
advances the run one phase after the other. Each phase is a series of compiled chunks
(:func:`rwmh.chains.run_warmup`, :func:`rwmh.chains.run_sampling`) run by one loop,
:func:`_run_phase`, which keeps one chunk in flight on the device while the previous one is
copied to the host buffers of the run, shown by the progress bar (:mod:`rwmh.progress`) and,
with ``checkpoint=``, saved (:mod:`rwmh.checkpoint`), from where :func:`resume` continues it.

Which key each chain uses at each step is decided in :mod:`rwmh.chains` alone; the draws
therefore depend neither on the chunking nor on the device layout.

The scans are compiled once per log density and array shapes and cached by ``jax.jit``: a
second call with the same ``logdensity_fn`` (the same Python object) and the same shapes does
not compile again.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwmh import chains, checks, progress, stragglers, tuning
from rwmh import checkpoint as checkpoint_file
from rwmh.devices import Layout, resolve_devices
from rwmh.kernel import RWMHState, check_step_size, factor_proposal_cov
from rwmh.run import Run, Settings

__all__ = ["SampleResult", "resume", "sample"]


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
        The :class:`rwmh.tuning.AdaptationInfo` trace of warmup, or None without warmup.
    """

    positions: Any
    stats: dict
    parameters: dict
    last_state: RWMHState
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


def _chunks(total: int, size: int, start: int = 0):
    """``(first, length)`` pieces of ``range(start, total)``, all of length ``size`` but the
    last."""
    for first in range(start, total, size):
        yield first, min(size, total - first)


def _result(
    run: Run, layout: Layout, interrupted: bool = False, stacklevel: int = 4
) -> SampleResult:
    """The draws of ``run`` so far as a :class:`SampleResult`; a warning if warmup restarted
    chains (``stacklevel`` counts from here to the user's call)."""
    warmup_info, completed = run.completed()
    if completed is not None:
        draws, stats = completed
    else:
        # Stopped before the first stored draw: empty draw axis, right shapes and dtypes.
        host = layout.to_host(run.states, chain_axis=0)
        draws = jax.tree_util.tree_map(
            lambda x: np.empty((x.shape[0], 0, *x.shape[1:]), x.dtype), host.position
        )
        lp = host.logdensity
        stats = {
            "acceptance_rate": np.empty((lp.shape[0], 0), lp.dtype),
            "is_accepted": np.empty((lp.shape[0], 0), bool),
            "lp": np.empty((lp.shape[0], 0), lp.dtype),
        }
    parameters = run.parameters if run.parameters is not None else tuning.final(run.adapt)
    extra = {"interrupted": True} if interrupted else {}
    if warmup_info is not None:
        extra["restarted_chains"] = stragglers.restarts_by_step(warmup_info.num_restarted)
        # Announced with every result that holds them, interrupted and resumed runs included.
        stragglers.warn_restarts(extra["restarted_chains"], stacklevel)
    return SampleResult(
        positions=draws,
        stats=stats,
        parameters=parameters,
        last_state=layout.unpadded(run.states),
        warmup_info=warmup_info,
        num_warmup=run.settings.num_warmup,
        thin=run.settings.thin,
        extra=extra,
    )


def _save(run: Run, layout: Layout, path) -> None:
    if path is None:
        return
    # Every process takes part in gathering the sharded state; one of them writes it.
    states = layout.to_host(run.states, chain_axis=0)
    adapt = layout.to_host(run.adapt, chain_axis=None)
    if jax.process_index() == 0:
        checkpoint_file.save(path, run, states, adapt)


class _InFlight:
    """The chunk dispatched to the device but not yet recorded: at most one."""

    def __init__(self):
        self._pending = None

    def hold(self, record: Callable, *arguments) -> None:
        """Record the chunk held so far, then hold this one."""
        self.finish()
        self._pending = (record, arguments)

    def finish(self) -> None:
        """Record the chunk held, if any, once the device finishes it."""
        if self._pending is not None:
            (record, arguments), self._pending = self._pending, None
            record(*arguments)


def _run_phase(pieces, dispatch: Callable, record: Callable, in_flight: _InFlight) -> None:
    """Dispatch a chunk per ``(first, length)`` of ``pieces``, recording each while the next
    one runs, so the device never waits for the host; ``run`` only ever holds recorded
    chunks, whatever interrupts the loop."""
    for first, length in pieces:
        outputs = dispatch(first, length)
        in_flight.hold(record, first, length, *outputs)
    in_flight.finish()


def _drive(run: Run, logdensity_fn: Callable, layout: Layout, checkpoint_path, show):
    """Run ``run`` from where it stands to the end, chunk by chunk.

    After every chunk the draws go to the host and, with ``checkpoint_path``, the whole run is
    saved. A ``KeyboardInterrupt`` returns what was completed (with a warning); any other
    exception carries it as ``error.partial_result``.
    """
    settings = run.settings
    num_warmup, num_samples, thin = settings.num_warmup, settings.num_samples, settings.thin
    warmup_key, sampling_key = chains.phase_keys(run.rng_key)
    bar = progress.progress_bar(show)
    in_flight = _InFlight()
    # The device side of the run: the latest dispatched states (and adaptation state).
    carry = {"states": run.states, "adapt": run.adapt}
    try:
        if run.phase == "warmup":
            bar.start("warmup", num_warmup - run.next_step)
            run_warmup = layout.warmup_fn()
            schedule = tuning.build_schedule(num_warmup, restart_stranded=settings.restart_stranded)
            keys = layout.chain_keys(warmup_key)
            # Only a padded layout passes a mask: without one the statistics are computed
            # exactly as the unsharded run computes them.
            chain_mask = layout.chain_mask()
            mask = () if chain_mask is None else (chain_mask,)

            def dispatch_warmup(first, length):
                carry["states"], carry["adapt"], info = run_warmup(
                    logdensity_fn,
                    settings.target_acceptance_rate,
                    keys,
                    carry["states"],
                    carry["adapt"],
                    layout.replicated(np.arange(first, first + length, dtype=np.uint32)),
                    layout.replicated(schedule.steps(first, length)),
                    *mask,
                )
                return carry["states"], carry["adapt"], info

            def record_warmup(first, length, states, adapt, info):
                host_info = layout.to_host(tuple(info), chain_axis=1)
                run.store_warmup(host_info, first)
                bar.update(length, host_info[0])
                run.states, run.adapt, run.next_step = states, adapt, first + length
                _save(run, layout, checkpoint_path)

            warmup_chunk = settings.chunk_size or bar.chunk_length(num_warmup)
            pieces = _chunks(num_warmup, warmup_chunk, run.next_step)
            _run_phase(pieces, dispatch_warmup, record_warmup, in_flight)
            run.start_sampling()

        run_sampling = layout.sampling_fn()
        keys = layout.chain_keys(sampling_key)
        step_size, proposal = layout.replicated((run.parameters["step_size"], run.proposal))
        bar.start("sampling", (num_samples - run.next_step) * thin)

        def dispatch_draws(first, num_draws):
            carry["states"], draws = run_sampling(
                logdensity_fn,
                num_draws,
                thin,
                keys,
                carry["states"],
                step_size,
                proposal,
                layout.replicated(np.asarray(first * thin, np.uint32)),
            )
            return carry["states"], draws

        def record_draws(first, num_draws, states, draws):
            host_draws = layout.to_host(draws, chain_axis=1)
            run.store_draws(host_draws, first)
            bar.update(num_draws * thin, host_draws[1]["acceptance_rate"], host_draws[0])
            run.states, run.next_step = states, first + num_draws
            if run.next_step == num_samples:
                run.phase = "done"
            _save(run, layout, checkpoint_path)

        carry["states"] = run.states
        sampling_chunk = settings.chunk_size or bar.chunk_length(num_samples)
        pieces = _chunks(num_samples, sampling_chunk, run.next_step)
        _run_phase(pieces, dispatch_draws, record_draws, in_flight)
        run.phase = "done"
        bar.close()
    except KeyboardInterrupt:
        try:
            # Dispatched before the stop, the chunk in flight belongs to the completed draws.
            in_flight.finish()
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: stop now, without the chunk in flight

        bar.close()
        warnings.warn(
            f"rwmh.sample was interrupted in {run.phase} at step {run.next_step}; returning the "
            "draws completed so far (result.extra['interrupted'] is True).",
            RuntimeWarning,
            stacklevel=3,
        )
        return _result(run, layout, interrupted=True)
    except Exception as error:
        bar.close()
        try:
            try:
                in_flight.finish()
            except Exception:
                pass  # the chunk in flight failed too: keep what was recorded before it
            error.partial_result = _result(run, layout, interrupted=True)
        except Exception:
            # The failure may have left the devices unusable: never hide the original error.
            raise error from None
        error.add_note(
            f"rwmh: the draws completed before the failure (phase {run.phase}, step "
            f"{run.next_step}) are in this exception's partial_result attribute."
        )
        raise
    return _result(run, layout)


def _check_logdensity(path, logdensity_fn, states) -> None:
    """Refuse to resume with a log density other than the one the run was sampling."""
    count = min(4, np.shape(states.logdensity)[0])
    position = jax.tree_util.tree_map(lambda x: jnp.asarray(x[:count]), states.position)
    recomputed = np.asarray(chains.init_states(logdensity_fn, position).logdensity)
    saved = np.asarray(states.logdensity[:count])
    if not np.allclose(recomputed, saved, rtol=1e-3, atol=1e-3, equal_nan=True):
        raise ValueError(
            f"checkpoint {path!r}: logdensity_fn does not match the run that wrote it (log "
            f"densities at the saved positions: {recomputed} now, {saved} in the file)."
        )


def resume(path, logdensity_fn: Callable, *, devices=None, progress_bar: bool = True):
    """Finish a run of :func:`rwmh.sample` from its checkpoint.

    The draws are identical to those of the run without interruption: every random number
    depends only on the key saved in the file, the chain index and the step index, and the
    state saved after the last completed chunk is exactly the state the run continued from.
    The resumed run keeps writing its checkpoint to ``path``, so it can be interrupted and
    resumed again.

    Parameters
    ----------
    path
        The ``checkpoint=`` file of the interrupted run.
    logdensity_fn
        The log density the run was sampling (functions cannot be stored safely, so it is
        given again; a mismatch at the saved positions raises ``ValueError``).
    devices
        As in :func:`rwmh.sample`; it need not be the layout of the interrupted run.
    progress_bar
        As in :func:`rwmh.sample`.

    Returns
    -------
    :class:`SampleResult` of the whole run: every draw, the earlier ones read from the file.

    Raises
    ------
    ValueError
        If the file is missing, truncated, corrupt, not an rwmh checkpoint, or does not fit
        ``logdensity_fn``; the message names the path and the problem.

    Examples
    --------
    >>> import os, tempfile, jax, jax.numpy as jnp, rwmh
    >>> logdensity = lambda x: -0.5 * jnp.sum(x**2)
    >>> path = os.path.join(tempfile.mkdtemp(), "run.npz")
    >>> first = rwmh.sample(jax.random.key(0), logdensity, jnp.zeros((4, 2)), num_samples=100,
    ...                     num_warmup=100, chunk_size=50, checkpoint=path, progress_bar=False)
    >>> again = rwmh.resume(path, logdensity, progress_bar=False)
    >>> bool((again.positions == first.positions).all())
    True
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or PathLike); got {type(path).__name__}.")
    checks.check_callable(logdensity_fn)
    progress_bar = checks.check_bool(progress_bar, "progress_bar")
    mesh = resolve_devices(devices)
    path = os.fspath(path)
    run = checkpoint_file.load(path)
    _check_logdensity(path, logdensity_fn, run.states)
    layout = Layout(mesh, run.settings.num_chains)
    run.states = layout.chains(run.states)
    run.adapt = layout.replicated(run.adapt)
    if run.phase == "warmup" and run.next_step >= run.settings.num_warmup:
        run.start_sampling()
    if run.phase == "done":
        return _result(run, layout, stacklevel=3)
    return _drive(run, logdensity_fn, layout, checkpoint_file.check_path(path), progress_bar)


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
    restart_stranded: bool = True,
    progress_bar: bool = True,
    chunk_size: int | None = None,
    devices=None,
    checkpoint=None,
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
        Keep every ``thin``-th state; the chains take ``num_samples * thin`` steps. Thinning
        happens inside the compiled loop: the skipped states never reach memory.
    step_size, proposal_cov
        Starting values for warmup, or the parameters used when ``num_warmup == 0``. Default:
        ``2.38 / sqrt(d)`` and the identity.
    target_acceptance_rate, dense, restart_stranded
        Passed to the warmup (see :func:`rwmh.window_adaptation`). Chains that warmup restarts
        are counted in ``result.extra["restarted_chains"]`` (``{warmup step: chains}``) and
        announced with an :class:`rwmh.RestartWarning` whenever a result holds them (interrupted and
        resumed runs included).
    progress_bar
        Show a tqdm bar per phase with the mean acceptance rate and, while sampling, the
        largest split R-hat so far, when ``sys.stderr`` is a terminal (see
        :mod:`rwmh.progress`). It is updated between chunks; with ``chunk_size=None`` each
        phase is then cut into about 20 chunks.
    chunk_size
        Number of warmup steps, and of stored draws, computed per compiled call before the
        results move to the host; device memory is then bounded by the chunk, not the run.
        None computes each phase in one call. The draws do not depend on it.
    devices
        None: the default device. ``"all"``: every device of ``jax.devices()`` (all processes
        after ``jax.distributed.initialize``). A sequence of devices, or a one-dimensional
        ``jax.sharding.Mesh`` (whatever its axis is called): those devices. The chain axis is
        sharded over them and the
        warmup statistics are pooled with collective sums; the draws equal those of the
        unsharded run (up to the rounding of the pooled sums, which XLA adds in another order).
        Chain counts that do not divide evenly are padded internally; exactly
        ``num_chains`` chains are returned and the padding never enters the warmup statistics.
    checkpoint
        None, or a file path: after every chunk the run's state and all draws so far are
        written there atomically (an ``.npz`` archive that loads without running code), and
        :func:`rwmh.resume` finishes an interrupted run with identical draws. An existing file
        is replaced. Each write holds all draws so far, so pick ``chunk_size`` to write every
        few minutes rather than every second.

    Returns
    -------
    :class:`SampleResult` with ``positions`` (leaves ``(chain, draw, ...)``), ``stats``,
    ``parameters``, ``last_state`` and ``to_inference_data()``.

    Interrupting (Ctrl-C, ``KeyboardInterrupt``) returns the draws of the chunks completed so
    far, with a ``RuntimeWarning`` and ``result.extra["interrupted"] = True``, as PyMC does.
    The driver keeps one chunk running on the device while it copies the previous one; after
    Ctrl-C it waits for that chunk and keeps it (a second Ctrl-C stops at once without it). A
    chunk being copied when Ctrl-C arrives is lost. Any other exception carries that partial
    result as its ``partial_result`` attribute.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, rwmh
    >>> logdensity = lambda x: -0.5 * jnp.sum(x**2)
    >>> result = rwmh.sample(jax.random.key(0), logdensity, jnp.zeros((4, 2)),
    ...                      num_samples=200, num_warmup=200, progress_bar=False)
    >>> result.positions.shape
    (4, 200, 2)
    """
    checks.check_key(rng_key)
    checks.check_callable(logdensity_fn)
    num_samples = checks.check_int(num_samples, "num_samples", 1)
    num_warmup = checks.check_int(num_warmup, "num_warmup", 0)
    thin = checks.check_int(thin, "thin", 1)
    if chunk_size is not None:
        chunk_size = checks.check_int(chunk_size, "chunk_size", 1)
    target_acceptance_rate = checks.check_probability(
        target_acceptance_rate, "target_acceptance_rate"
    )
    check_step_size(step_size)
    dense = checks.check_bool(dense, "dense")
    restart_stranded = checks.check_bool(restart_stranded, "restart_stranded")
    progress_bar = checks.check_bool(progress_bar, "progress_bar")
    num_chains = checks.check_chain_axis(initial_positions, "initial_positions")
    checks.check_float_positions(initial_positions, "initial_positions", batched=True)
    checks.check_dimension(initial_positions, "initial_positions", batched=True)
    check_step_size(step_size, dtype=jnp.result_type(*jax.tree_util.tree_leaves(initial_positions)))
    mesh = resolve_devices(devices)
    if checkpoint is not None:
        checkpoint = checkpoint_file.check_path(checkpoint)
        checkpoint_file.encode_tree(initial_positions)
    positions = jax.tree_util.tree_map(jnp.asarray, initial_positions)

    layout = Layout(mesh, num_chains)
    if mesh is not None:
        positions = layout.chains(positions)
    # Validated once, here: warmup starts from it, or sampling uses it as it is.
    proposal = factor_proposal_cov(proposal_cov, chains.flat_dimension(positions))
    states, adapt = chains.initial_state(logdensity_fn, positions, step_size, proposal, dense)
    checks.check_finite_logdensity(layout.to_host(states.logdensity, 0), "initial_positions")
    settings = Settings(
        num_chains=num_chains,
        num_samples=num_samples,
        num_warmup=num_warmup,
        thin=thin,
        chunk_size=chunk_size,
        target_acceptance_rate=target_acceptance_rate,
        dense=dense,
        restart_stranded=restart_stranded,
    )
    run = Run(settings, rng_key, "warmup", 0, states, layout.replicated(adapt))
    if num_warmup == 0:
        run.parameters = {"step_size": adapt.step_size, "proposal_cov": proposal_cov}
        run.proposal = proposal
        run.phase = "sampling"
    return _drive(run, logdensity_fn, layout, checkpoint, progress_bar)
