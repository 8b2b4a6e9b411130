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

The scans are compiled once per log density and array shapes (:mod:`rwmh.chains`, "Compiled
programs"): a second call with the same ``logdensity_fn`` (the same Python object) and the
same shapes does not compile again, whatever the values of ``logdensity_args``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rwmh import _ctrl_c, chains, checks, convergence, progress, stragglers, tuning, warmup_length
from rwmh import checkpoint as checkpoint_file
from rwmh import store as store_file
from rwmh.devices import Layout, resolve_devices
from rwmh.kernel import RWMHState, check_step_size, factor_proposal_cov
from rwmh.run import Run, Settings

__all__ = ["SampleResult", "resume", "sample"]

#: ``num_samples`` without ``until``.
DEFAULT_NUM_SAMPLES = 1000


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
    store
        With ``store=``: the store's path. ``positions`` and ``stats`` are then read-only Zarr
        arrays of the store (read when indexed; ``np.asarray`` reads one whole), and
        :meth:`to_inference_data` opens the store lazily.
    """

    positions: Any
    stats: dict
    parameters: dict
    last_state: RWMHState
    warmup_info: Any = None
    num_warmup: int = 0
    thin: int = 1
    extra: dict = field(default_factory=dict)
    store: str | None = None

    @property
    def num_chains(self) -> int:
        return int(np.shape(self.stats["lp"])[0])

    @property
    def num_draws(self) -> int:
        return int(np.shape(self.stats["lp"])[1])

    def to_inference_data(self, **kwargs):
        """ArviZ ``InferenceData`` with ``posterior`` and ``sample_stats`` groups; keyword
        arguments go to :func:`rwmh.to_inference_data`.

        With ``store=`` and no keyword arguments: the store opened lazily (ArviZ 0.x
        ``InferenceData``, ArviZ 1.x ``xarray.DataTree``), with its ``warmup_sample_stats``
        group too; keyword arguments read every draw into memory first."""
        from rwmh.arviz import to_inference_data

        if self.store is not None and not kwargs:
            return store_file.open_inference_data(self.store)

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
    run: Run,
    layout: Layout,
    interrupted: bool = False,
    stacklevel: int = 4,
    store: store_file.Store | None = None,
) -> SampleResult:
    """The draws of ``run`` so far as a :class:`SampleResult`; a warning if warmup restarted
    chains (``stacklevel`` counts from here to the user's call). With ``store``, the draws are
    the store's committed ones, read lazily."""
    warmup_info, completed = run.completed()
    if store is not None:
        if jax.process_count() > 1:
            # Process 0 writes the store: the others read it once its last commit is made.
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("rwmh store committed")
        completed = store.results()
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
    if run.warmup_report is not None:
        extra["warmup"] = dict(run.warmup_report)
    if run.settings.until is not None:
        extra["checks"] = list(run.checks)
        if run.stop is not None:
            extra["stop"] = dict(run.stop)
            if run.stop["reason"] != "converged":
                until = convergence.Converged.from_dict(run.settings.until)
                convergence.warn_unconverged(run.stop, until, stacklevel)
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
        num_warmup=run.num_warmup,
        thin=run.settings.thin,
        extra=extra,
        store=None if store is None else store.path,
    )


def _save(run: Run, layout: Layout, path, store: store_file.Store | None = None) -> None:
    if path is None and store is None:
        return
    # Every process takes part in gathering the sharded state; one of them writes it.
    states = layout.to_host(run.states, chain_axis=0)
    adapt = layout.to_host(run.adapt, chain_axis=None)
    if store is not None:
        store.commit(run, states, adapt)
    elif jax.process_index() == 0:
        checkpoint_file.save(path, run, states, adapt)


class _InFlight:
    """The chunks dispatched to the device but not yet recorded, oldest first.

    A chunk leaves the queue only once its record step has run to the end. Ctrl-C raises
    ``KeyboardInterrupt`` at whatever line runs when it arrives, most often inside a record
    step, which blocks on the device; the chunk it was recording stays queued, and so does
    the one dispatched after it, and :meth:`finish` records both again from the start (a record
    step only copies and overwrites, so running it twice is harmless).
    """

    def __init__(self):
        self._queue = []
        self._deferral = contextlib.ExitStack()
        self._held = None

    @property
    def interrupts(self) -> int:
        """Ctrl-C presses held since :meth:`defer_ctrl_c` (or by an enclosing deferral)."""
        return _ctrl_c.presses()

    def defer_ctrl_c(self) -> None:
        """Turn the first Ctrl-C into a stop at the next chunk boundary (:func:`_run_phase`
        raises ``KeyboardInterrupt`` there, once every chunk dispatched is recorded); the
        second raises at once. Only from the main thread and over Python's own handler:
        elsewhere Ctrl-C raises where it lands, and the queue keeps what it interrupted."""
        self._held = self._deferral.enter_context(_ctrl_c.deferring())

    def restore_ctrl_c(self) -> int:
        """End the deferral; the presses it held (see :func:`rwmh._ctrl_c.deferring`)."""
        self._deferral.close()
        held, self._held = self._held, None
        return 0 if held is None else held["presses"]

    def hold(self, record: Callable, *arguments) -> None:
        """Queue this chunk, then record every chunk queued before it."""
        self._queue.append((record, arguments))
        self._record(keep=1)

    def finish(self) -> None:
        """Record every chunk queued, each once the device finishes it."""
        self._record(keep=0)

    def _record(self, keep: int) -> None:
        while len(self._queue) > keep:
            record, arguments = self._queue[0]
            record(*arguments)
            self._queue.pop(0)


def _run_phase(pieces, dispatch: Callable, record: Callable, in_flight: _InFlight) -> None:
    """Dispatch a chunk per ``(first, length)`` of ``pieces``, recording each while the next
    one runs, so the device never waits for the host; ``run`` only ever holds recorded
    chunks, whatever interrupts the loop."""
    for first, length in pieces:
        # Also before the first chunk: a Ctrl-C while the run was being set up (compiling)
        # stops it before anything more is dispatched.
        if in_flight.interrupts:
            break
        in_flight.hold(record, first, length, *dispatch(first, length))
    in_flight.finish()
    if in_flight.interrupts:
        raise KeyboardInterrupt


def _auto_warmup(run: Run, layout: Layout) -> warmup_length.AutoWarmup:
    """The planner of ``num_warmup="auto"``, continued from ``run`` (fresh or resumed at a
    window end)."""
    auto = warmup_length.AutoWarmup(
        run.settings.num_warmup,
        run.settings.restart_stranded,
        run.warmup_report,
        num_chains=run.settings.num_chains,
    )
    if auto.windows:
        # Resumed at a window end: the covariance adapted there is the one to compare with.
        auto.previous_cov = layout.to_host(run.adapt.proposal.covariance, chain_axis=None)
    return auto


def _record_auto_warmup(run: Run, layout: Layout, auto) -> bool:
    """Feed the chunk just recorded to the planner; whether a checkpoint may be written."""
    host = layout.to_host((run.states.position, run.states.logdensity), chain_axis=0)
    covariance = None
    if auto.at_window_end(run.next_step):
        covariance = layout.to_host(run.adapt.proposal.covariance, chain_axis=None)
    savable = auto.record(run.next_step, *host, covariance, run.warmup_trace[2])
    run.warmup_report = auto.report()
    run.warmup_length = auto.end
    return savable


class _Stopping:
    """The checks of a run with ``until``: where they fall and what they decide."""

    def __init__(self, settings: Settings, bar):
        self.until = convergence.Converged.from_dict(settings.until)
        self.superchains = self.until.superchains if self.until.max_nested_rhat else None
        self.chunk = settings.chunk_size or min(convergence.DEFAULT_CHUNK, settings.num_samples)
        self.points = set(
            convergence.check_points(
                self.until.first_check, self.until.check_growth, self.chunk, settings.num_samples
            )
        )
        self.bar = bar
        self.names = None

    def until_done(self, pieces, run: Run):
        """The chunks of ``pieces`` until a check stops the run."""
        for piece in pieces:
            if run.phase == "done":
                return
            yield piece

    def after_chunk(self, run: Run) -> None:
        """Check the draws so far if the schedule says so; stop the run if they converged."""
        if run.next_step not in self.points:
            return
        draws, _ = jax.tree_util.tree_map(lambda x: x[:, : run.next_step], run.draws)
        if self.names is None:
            self.names = convergence.component_names(
                jax.tree_util.tree_map(lambda x: x[:, 0], draws)
            )
        report = convergence.check(draws, self.until, self.superchains, self.names)
        if jax.process_count() > 1:
            # Every process holds the same gathered draws; process 0's decision is everyone's,
            # so that no rounding difference can split the processes.
            from jax.experimental import multihost_utils

            decided = multihost_utils.broadcast_one_to_all(np.asarray(report["converged"]))
            report["converged"] = bool(decided)
        run.checks.append(report)
        self.bar.goal(report, self.until)
        if report["converged"]:
            run.stop = {"reason": "converged", **report}
            run.phase = "done"
        elif run.next_step == run.settings.num_samples:
            run.stop = {"reason": "cap", **report}


def _drive(
    run: Run,
    logdensity_fn: Callable,
    layout: Layout,
    checkpoint_path,
    show,
    logdensity_args=(),
    *,
    in_flight: _InFlight,
    store: store_file.Store | None = None,
):
    """Run ``run`` from where it stands to the end, chunk by chunk.

    After every chunk the draws go to the host and, with ``checkpoint_path``, the whole run is
    saved; with ``store``, the chunk is appended to it and committed (the draws are then not
    kept in memory). A ``KeyboardInterrupt`` returns what was completed (with a warning); any other
    exception carries it as ``error.partial_result``.
    """
    settings = run.settings
    num_warmup, num_samples, thin = settings.num_warmup, settings.num_samples, settings.thin
    warmup_keys, sampling_keys = layout.run_keys(run.rng_key)
    bar = progress.progress_bar(show)
    # The device side of the run: the latest dispatched states (and adaptation state).
    carry = {"states": run.states, "adapt": run.adapt}
    args = layout.replicated(logdensity_args)
    try:
        if run.phase == "warmup":
            run_warmup = layout.warmup_fn()
            auto = _auto_warmup(run, layout) if settings.auto_warmup else None
            if auto is not None:
                schedule = auto
                bar.start("warmup", None)  # its length is for the chains to say
            else:
                bar.start("warmup", num_warmup - run.next_step)
                schedule = tuning.build_schedule(
                    num_warmup,
                    restart_stranded=settings.restart_stranded,
                    num_chains=settings.num_chains,
                )
            # Only a padded layout passes a mask: without one the statistics are computed
            # exactly as the unsharded run computes them.
            chain_mask = layout.chain_mask()
            mask = () if chain_mask is None else (chain_mask,)

            def dispatch_warmup(first, length):
                carry["states"], carry["adapt"], info = run_warmup(
                    logdensity_fn,
                    settings.target_acceptance_rate,
                    warmup_keys,
                    carry["states"],
                    carry["adapt"],
                    layout.replicated(np.arange(first, first + length, dtype=np.uint32)),
                    layout.replicated(schedule.steps(first, length)),
                    *mask,
                    logdensity_args=args,
                )
                return carry["states"], carry["adapt"], info

            def record_warmup(first, length, states, adapt, info):
                host_info = layout.to_host(tuple(info), chain_axis=1)
                run.store_warmup(host_info, first)
                if store is not None:
                    store.write_warmup(host_info, first)
                bar.update(length, host_info[0])
                run.states, run.adapt, run.next_step = states, adapt, first + length
                if auto is not None and not _record_auto_warmup(run, layout, auto):
                    return
                _save(run, layout, checkpoint_path, store)

            if auto is not None:
                pieces = auto.pieces(run.next_step, in_flight)
            else:
                if store is not None:
                    # The store's chunk length: no append rewrites a committed chunk object.
                    warmup_chunk = store.chunks["warmup"]
                else:
                    warmup_chunk = settings.chunk_size or bar.chunk_length(num_warmup)
                pieces = _chunks(num_warmup, warmup_chunk, run.next_step)
            _run_phase(pieces, dispatch_warmup, record_warmup, in_flight)
            run.start_sampling()

        run_sampling = layout.sampling_fn()
        step_size, proposal = layout.replicated((run.parameters["step_size"], run.proposal))
        bar.start("sampling", (num_samples - run.next_step) * thin)

        def dispatch_draws(first, num_draws):
            carry["states"], draws = run_sampling(
                logdensity_fn,
                num_draws,
                thin,
                sampling_keys,
                carry["states"],
                step_size,
                proposal,
                layout.replicated(np.asarray(first * thin, np.uint32)),
                logdensity_args=args,
            )
            return carry["states"], draws

        stopping = _Stopping(settings, bar) if settings.until is not None else None

        def record_draws(first, num_draws, states, draws):
            if run.phase == "done":
                return  # dispatched before the check that stopped the run: not part of it
            host_draws = layout.to_host(draws, chain_axis=1)
            if store is not None:
                store.write_draws(host_draws, first, run.parameters["step_size"])
            else:
                run.store_draws(host_draws, first)
            bar.update(num_draws * thin, host_draws[1]["acceptance_rate"], host_draws[0])
            run.states, run.next_step = states, first + num_draws
            if stopping is not None:
                stopping.after_chunk(run)
            if run.next_step == num_samples:
                run.phase = "done"
            _save(run, layout, checkpoint_path, store)

        carry["states"] = run.states
        if stopping is not None:
            sampling_chunk = stopping.chunk
        elif store is not None:
            sampling_chunk = store.chunks["sampling"]
        else:
            sampling_chunk = settings.chunk_size or bar.chunk_length(num_samples)
        pieces = _chunks(num_samples, sampling_chunk, run.next_step)
        if stopping is not None:
            pieces = stopping.until_done(pieces, run)
        _run_phase(pieces, dispatch_draws, record_draws, in_flight)
        run.phase = "done"
        bar.close()
    except KeyboardInterrupt:
        try:
            # Dispatched before the stop, the chunks in flight belong to the completed draws,
            # the one being recorded when Ctrl-C arrived included; a second Ctrl-C (the first
            # deferred, or this one raised) stops now, without them.
            if in_flight.interrupts < 2:
                in_flight.finish()
        except KeyboardInterrupt:
            pass

        bar.close()
        warnings.warn(
            f"rwmh.sample was interrupted in {run.phase} at step {run.next_step}; returning the "
            "draws completed so far (result.extra['interrupted'] is True).",
            RuntimeWarning,
            stacklevel=3,
        )
        return _result(run, layout, interrupted=True, store=store)
    except Exception as error:
        bar.close()
        try:
            try:
                in_flight.finish()
            except Exception:
                pass  # the chunk in flight failed too: keep what was recorded before it
            error.partial_result = _result(run, layout, interrupted=True, store=store)
        except Exception:
            # The failure may have left the devices unusable: never hide the original error.
            raise error from None
        error.add_note(
            f"rwmh: the draws completed before the failure (phase {run.phase}, step "
            f"{run.next_step}) are in this exception's partial_result attribute."
        )
        raise
    return _result(run, layout, store=store)


def _acknowledge_late_ctrl_c(result: SampleResult, presses: int, name: str) -> SampleResult:
    """A Ctrl-C held after the run's last chunk boundary, when no chunk was left for it to
    stop, still counts: the result, complete, says it was interrupted, as every interrupted
    run's does. (It used to be dropped with the deferral, and the caller went on as if no key
    had been pressed.)"""
    if presses and not result.extra.get("interrupted"):
        result.extra["interrupted"] = True
        warnings.warn(
            f"rwmh.{name} was interrupted after its last step; every draw was computed "
            "(result.extra['interrupted'] is True).",
            RuntimeWarning,
            stacklevel=3,
        )
    return result


#: Rounding allowed between the saved and the recomputed log density of a chain, in units of
#: the float epsilon of its magnitude. The same function evaluated by another compiled program
#: (another batch size, another device layout) differed by at most 0.54 of these on a 1e5-point
#: float32 regression; anything beyond 64 is another target.
_RESUME_ULPS = 64


def _check_logdensity(path, logdensity_fn, states, logdensity_args=()) -> None:
    """Refuse to resume with a log density other than the one the run was sampling.

    Every chain's log density is recomputed at its saved position and must equal the saved
    value to rounding: ``|now - saved| <= 64 eps max(1, |saved|, |now|)``, an absolute bound
    that scales with the values' float precision (a relative tolerance such as 1e-3 lets a
    log density near -1e5 change by 100). A constant offset is refused too, although it is the
    same posterior: the saved states carry the old values, the ``lp`` of the resumed draws
    would not continue those before, and the resumed run would no longer be the
    uninterrupted one; the message says it is a constant.
    """
    on_device = jax.tree_util.tree_map(jnp.asarray, states)
    try:
        recomputed = np.asarray(
            chains.recompute_logdensity(logdensity_fn, on_device, logdensity_args)
        )
    except ValueError as error:
        raise ValueError(f"checkpoint {path!r}: {error}") from None
    saved = np.asarray(states.logdensity)
    eps = np.finfo(saved.dtype).eps if np.issubdtype(saved.dtype, np.floating) else 0.0
    difference = recomputed.astype(np.float64) - saved.astype(np.float64)
    scale = np.maximum(1.0, np.maximum(np.abs(saved), np.abs(recomputed)))
    tolerance = _RESUME_ULPS * eps * scale
    wrong = ~(np.abs(difference) <= tolerance)
    if not wrong.any():
        return
    chains_ = np.flatnonzero(wrong)
    shown = ", ".join(str(c) for c in chains_[:8]) + (", ..." if chains_.size > 8 else "")
    offset = difference - np.median(difference)
    # Only for the message: a constant is told apart from a change to rounding (8 eps).
    constant = np.all(np.isfinite(difference)) and np.all(np.abs(offset) <= 8 * eps * scale)
    why = (
        f"it differs by a constant, {np.median(difference):.6g}, at every saved position (the "
        "same posterior, but the saved states and lp were computed without it)"
        if constant
        else f"at the saved positions of chains {shown} it gives {recomputed[chains_[:4]]}, "
        f"the file {saved[chains_[:4]]}"
    )
    raise ValueError(
        f"checkpoint {path!r}: logdensity_fn does not match the run that wrote it: {why}; "
        "resume with the log density the run was sampling."
    )


def resume(
    path,
    logdensity_fn: Callable,
    *,
    logdensity_args=(),
    devices=None,
    progress_bar: bool = True,
):
    """Finish a run of :func:`rwmh.sample` from its checkpoint.

    The draws are identical to those of the run without interruption: every random number
    depends only on the key saved in the file, the chain index and the step index, and the
    state saved after the last completed chunk is exactly the state the run continued from.
    The resumed run keeps writing its checkpoint to ``path``, so it can be interrupted and
    resumed again.

    Parameters
    ----------
    path
        The ``checkpoint=`` file, or the ``store=`` directory, of the interrupted run (a store
        is continued from its last commit, and the draws beyond it are computed again).
    logdensity_fn, logdensity_args
        The log density the run was sampling and its extra arguments (functions and data are
        not stored, so they are given again; a mismatch at the saved positions raises
        ``ValueError``).
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
    logdensity_args = chains.check_logdensity_args(logdensity_args)
    progress_bar = checks.check_bool(progress_bar, "progress_bar")
    mesh = resolve_devices(devices)
    path = os.fspath(path)
    store = None
    if store_file.is_store(path):
        # Every process reads the store; process 0 goes on writing it.
        store, run = store_file.Store.open(path, writer=jax.process_index() == 0)
    else:
        run = checkpoint_file.load(path)
    # Ctrl-C from here on (compiling included) stops the run at a chunk boundary: see sample.
    in_flight = _InFlight()
    in_flight.defer_ctrl_c()
    try:
        _check_logdensity(path, logdensity_fn, run.states, logdensity_args)
        layout = Layout(mesh, run.settings.num_chains)
        run.states = layout.chains(run.states)
        run.adapt = layout.replicated(run.adapt)
        if run.phase == "warmup" and run.next_step >= run.num_warmup:
            run.start_sampling()
        if run.phase == "done":
            result = _result(run, layout, stacklevel=3, store=store)
        else:
            path = None if store is not None else checkpoint_file.check_path(path)
            result = _drive(
                run,
                logdensity_fn,
                layout,
                path,
                progress_bar,
                logdensity_args,
                in_flight=in_flight,
                store=store,
            )
    finally:
        presses = in_flight.restore_ctrl_c()
    return _acknowledge_late_ctrl_c(result, presses, "resume")


def sample(
    rng_key,
    logdensity_fn: Callable,
    initial_positions,
    num_samples: int | None = None,
    num_warmup: int | str = 1000,
    thin: int = 1,
    step_size=None,
    proposal_cov=None,
    *,
    logdensity_args=(),
    target_acceptance_rate: float | None = None,
    dense: bool = True,
    restart_stranded: bool = True,
    progress_bar: bool = True,
    chunk_size: int | None = None,
    devices=None,
    checkpoint=None,
    until=None,
    max_warmup: int = warmup_length.DEFAULT_MAX_STEPS,
    store=None,
) -> SampleResult:
    """Run several random-walk Metropolis-Hastings chains: pooled warmup, then sampling.

    Parameters
    ----------
    rng_key
        A typed key (``jax.random.key``) or a legacy ``jax.random.PRNGKey``.
    logdensity_fn
        Log density of the target for one position (a PyTree), returning a scalar, called as
        ``logdensity_fn(position, *logdensity_args)``; or an :class:`rwmh.EstimatedLogDensity`,
        a log density estimated by simulation, which runs the pseudo-marginal kernel
        (:mod:`rwmh.pmmh`: the states carry the estimate and its ``u``, ``stats["lp"]`` is the
        estimate; its estimator is called as ``logdensity_estimator(position, u,
        *logdensity_args)``).
    initial_positions
        A PyTree whose leaves carry a leading chain axis: ``(num_chains, ...)``.
    num_samples
        Number of draws kept per chain (after thinning); default 1000. With ``until``, the
        most draws per chain (default 100,000).
    num_warmup
        Number of warmup steps that adapt ``step_size`` and ``proposal_cov`` with statistics
        pooled over all chains (:func:`rwmh.window_adaptation`); 0 samples with the given
        parameters as they are. ``"auto"``: slow windows double until the adapted covariance
        has settled and the chains agree, at most ``max_warmup`` steps (see
        :mod:`rwmh.warmup_length`); ``result.num_warmup`` and ``result.extra["warmup"]`` say
        how long it took and why it ended. It runs in chunks of 25 steps, one compiled
        program whatever its length, and ignores ``chunk_size``.
    thin
        Keep every ``thin``-th state; the chains take ``num_samples * thin`` steps. Thinning
        happens inside the compiled loop: the skipped states never reach memory.
    logdensity_args
        Extra arguments of ``logdensity_fn``, a tuple of arrays or PyTrees of arrays (the
        data), as NumPyro's model arguments or scipy's ``args=``. They are traced: one
        compiled program serves every data set of the same shapes. Values the function
        captures instead (globals, closures, attributes) are read once, when the program is
        compiled for that function object, and changing them later has no effect (see the
        README, "Data and closures").
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
    store
        None, or the path of a directory to create: after every chunk the draws and statistics
        are appended to a Zarr store there, in ArviZ's layout, with the run's state, and
        committed atomically (see :mod:`rwmh.store`); each append costs one chunk, and the
        host holds one chunk of draws, not the run (plus the warmup's acceptance-rate trace,
        a float per chain and warmup step). ``result.positions`` and ``result.stats`` then read
        from the store. An existing path is refused (nothing is overwritten);
        :func:`rwmh.resume` continues a store killed at any moment with identical draws, and
        ArviZ opens it during and after the run (``xarray.open_datatree(path, engine="zarr")``).
        ``chunk_size=None`` then means about 20 chunks a phase. Not with ``checkpoint`` or
        ``until``.

    max_warmup
        The cap of ``num_warmup="auto"`` (rounded down to a multiple of 25); unused otherwise.
    until
        None, or an :class:`rwmh.Converged`: sample until the chains have converged, with
        ``num_samples`` as the cap. The draws are checked with ArviZ at chunk boundaries on a
        geometric schedule (see :mod:`rwmh.convergence`); the run stops at the first check
        where every scalar component has rank-normalised split R-hat <= ``max_rhat`` and bulk
        and tail ESS >= ``min_ess``, as ArviZ computes them on all draws so far. The result
        holds exactly the draws up to that check; ``result.extra["stop"]`` says why it stopped
        (``"reason"``: ``"converged"`` or ``"cap"``), at which draw (``"draw"``) and with
        which figures, and ``result.extra["checks"]`` lists every check. Reaching the cap
        unconverged warns (:class:`rwmh.ConvergenceWarning`) naming the worst component.
        Sampling then runs in chunks of ``chunk_size`` draws (default 100), one compiled
        length (two when the cap is not a multiple of it).

    Returns
    -------
    :class:`SampleResult` with ``positions`` (leaves ``(chain, draw, ...)``), ``stats``,
    ``parameters``, ``last_state`` and ``to_inference_data()``.

    Interrupting (Ctrl-C, ``KeyboardInterrupt``) returns every draw computed before it, with a
    ``RuntimeWarning`` and ``result.extra["interrupted"] = True``, as PyMC does. A compiled
    chunk cannot be stopped halfway, so Ctrl-C takes effect when the chunks already dispatched
    to the device (the one running and at most one queued after it) have finished; their draws
    are returned with everything before them. With ``chunk_size=None`` and no progress bar a
    phase is one chunk: Ctrl-C during sampling then returns all draws once that chunk ends. A
    second Ctrl-C stops at once, without the unfinished chunks. Any other exception carries the
    partial result as its ``partial_result`` attribute.

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
    if num_samples is None:
        num_samples = DEFAULT_NUM_SAMPLES if until is None else convergence.DEFAULT_CAP
    logdensity_args = chains.check_logdensity_args(logdensity_args)
    num_samples = checks.check_int(num_samples, "num_samples", 1)
    auto_warmup = isinstance(num_warmup, str) and num_warmup == "auto"
    if auto_warmup:
        max_warmup = checks.check_int(max_warmup, "max_warmup", warmup_length.MIN_STEPS)
        # Whole chunks: every window boundary falls on a chunk boundary.
        num_warmup = max_warmup - max_warmup % warmup_length.CHUNK
    elif isinstance(num_warmup, str):
        raise TypeError(f'num_warmup must be an integer >= 0 or "auto"; got {num_warmup!r}.')
    else:
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
    if until is not None:
        if not isinstance(until, convergence.Converged):
            raise TypeError(f"until must be None or an rwmh.Converged; got {type(until).__name__}.")
        superchains = convergence.superchain_ids(initial_positions, num_chains, until)
        until = dataclasses.replace(until, superchains=superchains).to_dict()
    mesh = resolve_devices(devices)
    if checkpoint is not None:
        checkpoint = checkpoint_file.check_path(checkpoint)
        checkpoint_file.encode_tree(initial_positions)
    if store is not None:
        if checkpoint is not None:
            raise ValueError("checkpoint and store: pass one of them (a store is a checkpoint).")
        if until is not None:
            raise ValueError(
                "store= does not support until= (its checks read every draw so far); run "
                "with num_samples instead."
            )
        # Only process 0 writes, and only it may find the store there before it creates it.
        store = store_file.check_new(store, check_exists=jax.process_index() == 0)
        checkpoint_file.encode_tree(initial_positions)
    positions = jax.tree_util.tree_map(jnp.asarray, initial_positions)

    # Ctrl-C from here on, while the first programs compile included, is deferred to the
    # first chunk boundary (a KeyboardInterrupt raised inside JAX's compilation or a host
    # callback would not reach the caller as one): the run then returns what it completed.
    in_flight = _InFlight()
    in_flight.defer_ctrl_c()
    try:
        layout = Layout(mesh, num_chains)
        if mesh is not None:
            positions = layout.chains(positions)
        # Validated once, here: warmup starts from it, or sampling uses it as it is.
        proposal = factor_proposal_cov(proposal_cov, chains.flat_dimension(positions))
        states, adapt = chains.initial_state(
            logdensity_fn,
            positions,
            step_size,
            proposal,
            dense,
            run_key=rng_key,
            logdensity_args=logdensity_args,
        )
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
            until=until,
            auto_warmup=auto_warmup,
        )
        run = Run(settings, rng_key, "warmup", 0, states, layout.replicated(adapt))
        if num_warmup == 0:
            run.parameters = {"step_size": adapt.step_size, "proposal_cov": proposal_cov}
            run.proposal = proposal
            run.phase = "sampling"
        if store is not None:
            host = layout.to_host(run.states, chain_axis=0)
            store = store_file.Store.create(
                store,
                run,
                jax.tree_util.tree_map(np.asarray, host.position),
                host,
                layout.to_host(run.adapt, chain_axis=None),
                store_file.lengths(run),
                writer=jax.process_index() == 0,
            )
        result = _drive(
            run,
            logdensity_fn,
            layout,
            checkpoint,
            progress_bar,
            logdensity_args,
            in_flight=in_flight,
            store=store,
        )
    finally:
        presses = in_flight.restore_ctrl_c()
    return _acknowledge_late_ctrl_c(result, presses, "sample")
