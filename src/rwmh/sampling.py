"""The multi-chain driver: warmup, then sampling, chains vmapped and steps in ``lax.scan``.

Every chain ``c`` draws its randomness from ``fold_in(fold_in(phase_key, c), t)`` where ``t``
is the global step index of the phase (warmup or sampling). The draws therefore depend neither
on how the run is cut into chunks nor on how chains are laid out over devices.

The scans are compiled once per log density and array shapes and cached by ``jax.jit``: a
second call with the same ``logdensity_fn`` (the same Python object) and the same shapes does
not compile again.

A run is a :class:`_Run` advanced chunk by chunk by :func:`_drive`: after every chunk its draws
move to preallocated host arrays and, with ``checkpoint=``, the whole run is written to disk
(:mod:`rwmh.checkpoint`), from where :func:`resume` continues it. With ``devices=`` the chain
axis is sharded over a one-dimensional :class:`jax.sharding.Mesh` (:class:`_Layout`), on one
process or several (``jax.distributed``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rwmh import _checks
from rwmh import adaptation as _adaptation
from rwmh import checkpoint as _checkpoint
from rwmh import kernel as _kernel
from rwmh import progress as _progress

__all__ = ["SampleResult", "resume", "sample"]

#: Name of the mesh axis that the chain axis is sharded over.
CHAIN_AXIS = "chains"


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
    num_chains = _adaptation._chain_count(initial_positions, "initial_positions")
    _checks.check_float_positions(initial_positions, "initial_positions", batched=True)
    return num_chains


def _chunks(total: int, size: int, start: int = 0):
    """``(first, length)`` pieces of ``range(start, total)``, all of length ``size`` but the
    last."""
    for first in range(start, total, size):
        yield first, min(size, total - first)


# ---------------------------------------------------------------------------------------------
# Devices: the chain axis over a one-dimensional mesh.
# ---------------------------------------------------------------------------------------------


def _resolve_devices(devices) -> Mesh | None:
    """``devices=`` as a one-dimensional :class:`jax.sharding.Mesh`, or None (no sharding)."""
    if devices is None:
        return None
    if isinstance(devices, Mesh):
        if devices.devices.ndim != 1:
            raise ValueError(
                "devices: a Mesh must be one-dimensional (the chain axis is sharded over its "
                f"single axis); got axes {devices.axis_names} of shape {devices.devices.shape}."
            )
        return devices
    if isinstance(devices, str):
        if devices != "all":
            raise ValueError(f'devices must be None, "all", devices or a Mesh; got {devices!r}.')
        # Global devices: under jax.distributed this spans every process.
        return Mesh(np.array(jax.devices()), (CHAIN_AXIS,))
    try:
        devices = list(devices)
    except TypeError:
        raise TypeError(
            'devices must be None, "all", a sequence of jax devices or a jax.sharding.Mesh; '
            f"got {type(devices).__name__}."
        ) from None
    if not devices:
        raise ValueError("devices: the sequence of devices is empty.")
    for device in devices:
        if not isinstance(device, jax.Device):
            raise TypeError(
                f"devices must hold jax devices (from jax.devices()); got {type(device).__name__}."
            )
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices: a device appears more than once in {devices}.")
    return Mesh(np.array(devices), (CHAIN_AXIS,))


class _Layout:
    """Where the chains live: on the default device, or padded and sharded over a 1-d mesh.

    With a mesh of ``D`` devices the chain axis is padded to a multiple of ``D`` with copies of
    chain 0. The padded chains have their own keys (``fold_in(key, c)`` for ``c >=
    num_chains``), so the real chains draw exactly what they draw unpadded; the padding carries
    weight zero in the pooled warmup statistics (``chain_mask``) and is dropped on the host.
    """

    def __init__(self, mesh: Mesh | None, num_chains: int):
        self.mesh = mesh
        self.num_chains = num_chains
        size = 1 if mesh is None else mesh.devices.size
        self.num_padded = -(-num_chains // size) * size

    @property
    def padding(self) -> int:
        return self.num_padded - self.num_chains

    def _sharding(self, spec: P):
        return NamedSharding(self.mesh, spec)

    def _put(self, x, spec: P):
        if self.mesh is None:
            # Host arrays stay on the host: jit takes them as they come, and passing them like
            # window_adaptation.run does keeps one dispatch-cache entry for both.
            return x if isinstance(x, np.ndarray) else jnp.asarray(x)
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = self._put(np.asarray(jax.random.key_data(x)), spec)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        # Built from host values shard by shard: this works when the mesh spans several
        # processes (each one fills its own devices), where device_put of a local array
        # would not.
        return jax.make_array_from_callback(
            host.shape, self._sharding(spec), lambda index: host[index]
        )

    def chains(self, tree):
        """Pad the leading chain axis of every leaf and shard it over the mesh."""

        def place(x):
            if self.padding:
                if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
                    raise AssertionError("chain keys are derived for the padded count")
                x = np.asarray(x)
                x = np.concatenate([x, np.repeat(x[:1], self.padding, axis=0)])
            return self._put(x, P(CHAIN_AXIS))

        return jax.tree_util.tree_map(place, tree)

    def replicated(self, tree):
        return jax.tree_util.tree_map(lambda x: self._put(x, P()), tree)

    def chain_keys(self, rng_key):
        keys = _adaptation.chain_keys(rng_key, self.num_padded)
        return self._put(keys, P(CHAIN_AXIS))

    def chain_mask(self):
        """None without padding, so that the pooled statistics are computed as unsharded."""
        if not self.padding:
            return None
        return self._put(np.arange(self.num_padded) < self.num_chains, P(CHAIN_AXIS))

    def to_host(self, tree, chain_axis: int | None):
        """Numpy copies of ``tree`` (gathered from all processes) without the padding chains
        along ``chain_axis`` (None: arrays without a chain axis, kept whole)."""

        def fetch(x):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                x = multihost_utils.process_allgather(x, tiled=True)
            x = np.asarray(x)
            if self.padding and chain_axis is not None and x.ndim > chain_axis:
                x = np.take(x, np.arange(self.num_chains), axis=chain_axis)
            return x

        return jax.tree_util.tree_map(fetch, tree)

    def unpadded(self, tree):
        """Device arrays without the padding chains (the returned ``last_state``)."""
        if not self.padding:
            return tree
        return jax.tree_util.tree_map(lambda x: x[: self.num_chains], tree)

    def warmup_fn(self):
        if self.mesh is None:
            return _adaptation.run_warmup
        return _sharded_warmup(self.mesh)

    def sampling_fn(self):
        return run_sampling if self.mesh is None else _sharded_sampling(self.mesh)


@lru_cache(maxsize=8)
def _sharded_warmup(mesh: Mesh):
    """:func:`rwmh.adaptation.warmup_loop` compiled for chains sharded over ``mesh``.

    The same function as the unsharded run, under ``jit`` with sharded inputs and outputs:
    XLA partitions the vmapped steps by chain and turns the pooled sums of
    :func:`rwmh.adaptation.update` (the mean acceptance, the weighted mean and covariance of the
    window) into per-device partial sums and an all-reduce, ``d x d`` numbers per step however
    many chains there are. ``shard_map`` with ``psum`` would do the same but needs the
    adaptation written against a named mesh axis; this way one code path serves both runs and
    the adaptation stays unaware of devices.

    The partial sums add in another order than one device does, and XLA's CPU code for
    ``exp`` and friends rounds differently for different batch sizes, so the draws agree with
    the unsharded run to float rounding (about 1e-6 relative in float32), not bit for bit.
    """
    chains = NamedSharding(mesh, P(CHAIN_AXIS))
    replicated = NamedSharding(mesh, P())
    info = _adaptation.AdaptationInfo(NamedSharding(mesh, P(None, CHAIN_AXIS)), replicated)
    return jax.jit(
        _adaptation.warmup_loop,
        static_argnums=(0, 1),
        out_shardings=(chains, replicated, info),
    )


@lru_cache(maxsize=8)
def _sharded_sampling(mesh: Mesh):
    """:func:`_sampling_loop` compiled for chains sharded over ``mesh``: no collectives, each
    device steps its own chains."""
    chains = NamedSharding(mesh, P(CHAIN_AXIS))
    draws = NamedSharding(mesh, P(None, CHAIN_AXIS))
    return jax.jit(_sampling_loop, static_argnums=(0, 1, 2), out_shardings=(chains, draws))


# ---------------------------------------------------------------------------------------------
# The run: everything needed to continue it, so that a checkpoint can be written at any chunk.
# ---------------------------------------------------------------------------------------------


def _leaf_pairs(a, b):
    return zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)


@dataclass
class _Run:
    """A run in progress.

    ``phase`` is ``"warmup"``, ``"sampling"`` or ``"done"``; ``next_step`` is the next warmup
    step, or the next stored draw, to compute. ``states`` live on the device(s) in the padded
    layout. ``warmup_trace`` (step axis first) and ``draws`` (chain axis first) are host arrays
    allocated for the whole run when the first chunk arrives and filled chunk by chunk, so the
    host never holds the draws twice (as joining a list of chunks at the end would).
    """

    settings: dict
    rng_key: Any
    phase: str
    next_step: int
    states: _kernel.RWMHState
    adapt: _adaptation.AdaptationState
    parameters: dict | None = None
    scale: Any = None
    warmup_trace: Any = None
    draws: Any = None

    def store_warmup(self, info, first: int) -> None:
        """Copy a chunk of the warmup trace, ``(steps, ...)``, to rows ``first, ...``."""
        if self.warmup_trace is None:
            total = self.settings["num_warmup"]
            self.warmup_trace = jax.tree_util.tree_map(
                lambda x: np.empty((total, *x.shape[1:]), x.dtype), info
            )
        for buffer, part in _leaf_pairs(self.warmup_trace, info):
            buffer[first : first + part.shape[0]] = part

    def store_draws(self, draws, first: int) -> None:
        """Copy a chunk of draws, ``(draw, chain, ...)``, to draws ``first, ...`` of every chain."""
        if self.draws is None:
            total = self.settings["num_samples"]
            self.draws = jax.tree_util.tree_map(
                lambda x: np.empty((x.shape[1], total, *x.shape[2:]), x.dtype), draws
            )
        for buffer, part in _leaf_pairs(self.draws, draws):
            buffer[:, first : first + part.shape[0]] = np.swapaxes(part, 0, 1)

    def completed(self):
        """``(warmup_info, (positions, stats))`` of the steps completed so far (views), or None
        for a part not started."""
        num_warmup = self.next_step if self.phase == "warmup" else self.settings["num_warmup"]
        num_draws = {"warmup": 0, "sampling": self.next_step, "done": None}[self.phase]
        warmup = draws = None
        if self.warmup_trace is not None:
            warmup = _adaptation.AdaptationInfo(*(x[:num_warmup] for x in self.warmup_trace))
        if self.draws is not None and num_draws != 0:
            draws = jax.tree_util.tree_map(lambda x: x[:, :num_draws], self.draws)
        return warmup, draws

    def result(self, layout: _Layout, interrupted: bool = False) -> SampleResult:
        """The draws made so far as a :class:`SampleResult`."""
        settings = self.settings
        warmup_info, completed = self.completed()
        if completed is not None:
            draws, stats = completed
        else:
            # Stopped before the first stored draw: empty draw axis, right shapes and dtypes.
            host = layout.to_host(self.states, chain_axis=0)
            draws = jax.tree_util.tree_map(
                lambda x: np.empty((x.shape[0], 0, *x.shape[1:]), x.dtype), host.position
            )
            lp = host.logdensity
            stats = {
                "acceptance_rate": np.empty((lp.shape[0], 0), lp.dtype),
                "is_accepted": np.empty((lp.shape[0], 0), bool),
                "lp": np.empty((lp.shape[0], 0), lp.dtype),
            }
        parameters = self.parameters
        if parameters is None:
            parameters = _adaptation.parameters(self.adapt)
        extra = {"interrupted": True} if interrupted else {}
        return SampleResult(
            positions=draws,
            stats=stats,
            parameters=parameters,
            last_state=layout.unpadded(self.states),
            warmup_info=warmup_info,
            num_warmup=settings["num_warmup"],
            thin=settings["thin"],
            extra=extra,
        )


def _start_sampling(run: _Run) -> None:
    """Fix the parameters at the end of warmup (or take the given ones without warmup)."""
    if run.settings["num_warmup"] > 0:
        run.parameters, run.scale = _adaptation.sampling_parameters(run.adapt)
    run.phase, run.next_step = "sampling", 0


def _record_in_flight(in_flight) -> None:
    """Record the chunk in flight after a run stopped, once the device finishes it: it was
    dispatched before the stop, so it belongs to the draws completed so far."""
    if in_flight:
        record, arguments = in_flight.pop()
        record(*arguments)


def _drive(run: _Run, logdensity_fn: Callable, layout: _Layout, checkpoint_path, progress_bar):
    """Run ``run`` from where it stands to the end, chunk by chunk.

    After every chunk the draws go to the host and, with ``checkpoint_path``, the whole run is
    saved. A ``KeyboardInterrupt`` returns what was completed (with a warning); any other
    exception carries it as ``error.partial_result``.
    """
    settings = run.settings
    num_warmup, num_samples = settings["num_warmup"], settings["num_samples"]
    chunk_size, thin = settings["chunk_size"], settings["thin"]
    warmup_key, sampling_key = jax.random.split(run.rng_key)
    bar = _progress.progress_bar(progress_bar)
    # The chunk dispatched but not yet recorded (at most one): (record function, arguments).
    in_flight = []
    try:
        if run.phase == "warmup":
            bar.start("warmup", num_warmup - run.next_step)
            run_warmup = layout.warmup_fn()
            schedule = _adaptation.build_schedule(num_warmup)
            keys = layout.chain_keys(warmup_key)
            # Only a padded layout passes a mask: without one the statistics are computed
            # exactly as the unsharded run computes them.
            chain_mask = layout.chain_mask()
            mask = () if chain_mask is None else (chain_mask,)
            warmup_chunk = chunk_size or bar.chunk_length(num_warmup)

            def record_warmup(first, length, states, adapt, info):
                host_info = layout.to_host(tuple(info), chain_axis=1)
                run.store_warmup(host_info, first)
                bar.update(length, host_info[0])
                run.states, run.adapt, run.next_step = states, adapt, first + length
                _save(run, layout, checkpoint_path)

            # One chunk in flight: the next chunk is dispatched before the last one is copied
            # to the host, shown and saved, so the device never waits for the host. `run`
            # only ever holds recorded chunks, whatever interrupts the loop.
            states, adapt = run.states, run.adapt
            for first, length in _chunks(num_warmup, warmup_chunk, run.next_step):
                states, adapt, info = run_warmup(
                    logdensity_fn,
                    settings["target_acceptance_rate"],
                    keys,
                    states,
                    adapt,
                    layout.replicated(np.arange(first, first + length, dtype=np.uint32)),
                    layout.replicated(schedule[first : first + length]),
                    *mask,
                )
                if in_flight:
                    record, arguments = in_flight.pop()
                    record(*arguments)
                in_flight.append((record_warmup, (first, length, states, adapt, info)))
            if in_flight:
                record, arguments = in_flight.pop()
                record(*arguments)
            _start_sampling(run)

        run_sampling_chunk = layout.sampling_fn()
        keys = layout.chain_keys(sampling_key)
        step_size, scale = layout.replicated((run.parameters["step_size"], run.scale))
        bar.start("sampling", (num_samples - run.next_step) * thin)
        sampling_chunk = chunk_size or bar.chunk_length(num_samples)

        def record_draws(first, num_draws, states, draws):
            host_draws = layout.to_host(draws, chain_axis=1)
            run.store_draws(host_draws, first)
            bar.update(num_draws * thin, host_draws[1]["acceptance_rate"], host_draws[0])
            run.states, run.next_step = states, first + num_draws
            if run.next_step == num_samples:
                run.phase = "done"
            _save(run, layout, checkpoint_path)

        states = run.states
        for first, num_draws in _chunks(num_samples, sampling_chunk, run.next_step):
            states, draws = run_sampling_chunk(
                logdensity_fn,
                num_draws,
                thin,
                keys,
                states,
                step_size,
                scale,
                layout.replicated(np.asarray(first * thin, np.uint32)),
            )
            if in_flight:
                record, arguments = in_flight.pop()
                record(*arguments)
            in_flight.append((record_draws, (first, num_draws, states, draws)))
        if in_flight:
            record, arguments = in_flight.pop()
            record(*arguments)
        run.phase = "done"
        bar.close()
    except KeyboardInterrupt:
        try:
            _record_in_flight(in_flight)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: stop now, without the chunk in flight

        bar.close()
        warnings.warn(
            f"rwmh.sample was interrupted in {run.phase} at step {run.next_step}; returning the "
            "draws completed so far (result.extra['interrupted'] is True).",
            RuntimeWarning,
            stacklevel=3,
        )
        return run.result(layout, interrupted=True)
    except Exception as error:
        bar.close()
        try:
            try:
                _record_in_flight(in_flight)
            except Exception:
                pass  # the chunk in flight failed too: keep what was recorded before it
            error.partial_result = run.result(layout, interrupted=True)
        except Exception:
            # The failure may have left the devices unusable: never hide the original error.
            raise error from None
        error.add_note(
            f"rwmh: the draws completed before the failure (phase {run.phase}, step "
            f"{run.next_step}) are in this exception's partial_result attribute."
        )
        raise
    return run.result(layout)


# ---------------------------------------------------------------------------------------------
# Checkpoints: what a run writes after each chunk, and how resume() reads it back.
# ---------------------------------------------------------------------------------------------


def _key_record(rng_key) -> tuple[dict, np.ndarray]:
    if jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
        return {"typed": True, "impl": str(jax.random.key_impl(rng_key))}, np.asarray(
            jax.random.key_data(rng_key)
        )
    return {"typed": False}, np.asarray(rng_key)


def _save(run: _Run, layout: _Layout, path) -> None:
    if path is None:
        return
    # Every process takes part in gathering the sharded state; one of them writes it.
    states = layout.to_host(run.states, chain_axis=0)
    adapt = layout.to_host(run.adapt, chain_axis=None)
    if jax.process_index() != 0:
        return
    structure, position_leaves = _checkpoint.encode_tree(states.position)
    key_meta, key_data = _key_record(run.rng_key)
    arrays = {"rng_key": key_data, "state/logdensity": states.logdensity}
    arrays.update({f"state/position/{i}": leaf for i, leaf in enumerate(position_leaves)})
    arrays.update({f"adapt/{name}": value for name, value in adapt._asdict().items()})
    optional = {}
    if run.parameters is not None:
        optional["parameters/step_size"] = run.parameters["step_size"]
        optional["parameters/proposal_cov"] = run.parameters["proposal_cov"]
        optional["parameters/scale"] = run.scale
    warmup, completed = run.completed()
    if warmup is not None:
        optional["warmup/acceptance_rate"], optional["warmup/step_size"] = warmup
    if completed is not None:
        draws, stats = completed
        _, draw_leaves = _checkpoint.encode_tree(draws)
        optional.update({f"draws/position/{i}": leaf for i, leaf in enumerate(draw_leaves)})
        optional.update({f"draws/stats/{name}": value for name, value in stats.items()})
    present = sorted(name for name, value in optional.items() if value is not None)
    arrays.update({name: np.asarray(optional[name]) for name in present})
    metadata = {
        "settings": run.settings,
        "phase": run.phase,
        "next_step": run.next_step,
        "position_structure": structure,
        "rng_key": key_meta,
        "optional": present,
    }
    _checkpoint.write(path, metadata, arrays)


def _load(path) -> tuple[_Run, dict]:
    """Read a checkpoint into a :class:`_Run` with host arrays; ValueError if inconsistent."""
    metadata, arrays = _checkpoint.read(path)

    def fail(what):
        return ValueError(f"checkpoint {path!r} is inconsistent: {what}.")

    try:
        settings = metadata["settings"]
        num_chains = int(settings["num_chains"])
        phase, next_step = metadata["phase"], int(metadata["next_step"])
        structure = metadata["position_structure"]
        key_meta = metadata["rng_key"]
        optional = set(metadata["optional"])
        for name in ("num_samples", "num_warmup", "thin", "chunk_size", "dense"):
            settings[name]
    except (KeyError, TypeError, ValueError) as error:
        raise fail(f"its metadata lacks or garbles {error}") from None
    if phase not in ("warmup", "sampling", "done"):
        raise fail(f"unknown phase {phase!r}")

    def array(name):
        if name not in arrays:
            raise fail(f"array {name!r} is missing")
        return arrays[name]

    num_leaves = sum(1 for name in arrays if name.startswith("state/position/"))
    try:
        position = _checkpoint.decode_tree(
            structure, [array(f"state/position/{i}") for i in range(num_leaves)]
        )
    except (ValueError, TypeError, IndexError, AttributeError) as error:
        raise fail(f"its position structure is invalid ({error})") from None
    states = _kernel.RWMHState(position, array("state/logdensity"))
    for leaf in jax.tree_util.tree_leaves(states):
        if np.shape(leaf)[:1] != (num_chains,):
            raise fail(f"a state array has shape {np.shape(leaf)}, not ({num_chains}, ...)")
    adapt = _adaptation.AdaptationState(
        *(array(f"adapt/{name}") for name in _adaptation.AdaptationState._fields)
    )
    if key_meta.get("typed"):
        rng_key = jax.random.wrap_key_data(array("rng_key"), impl=key_meta["impl"])
    else:
        rng_key = jnp.asarray(array("rng_key"))

    run = _Run(settings, rng_key, phase, next_step, states, adapt)
    if "parameters/step_size" in optional:
        run.parameters = {
            "step_size": jnp.asarray(array("parameters/step_size")),
            "proposal_cov": (
                jnp.asarray(array("parameters/proposal_cov"))
                if "parameters/proposal_cov" in optional
                else None
            ),
        }
        run.scale = (
            jnp.asarray(array("parameters/scale")) if "parameters/scale" in optional else None
        )
    elif phase != "warmup":
        raise fail(f"phase {phase!r} without sampling parameters")
    if "warmup/acceptance_rate" in optional:
        info = _adaptation.AdaptationInfo(
            array("warmup/acceptance_rate"), array("warmup/step_size")
        )
        done = settings["num_warmup"] if phase != "warmup" else next_step
        if info.acceptance_rate.shape != (done, num_chains):
            raise fail(
                f"warmup trace has shape {info.acceptance_rate.shape}, expected "
                f"({done}, {num_chains})"
            )
        run.store_warmup(tuple(info), 0)
    if "draws/position/0" in optional:
        draws = _checkpoint.decode_tree(
            structure, [array(f"draws/position/{i}") for i in range(num_leaves)]
        )
        stats = {
            name: array(f"draws/stats/{name}") for name in ("acceptance_rate", "is_accepted", "lp")
        }
        done = settings["num_samples"] if phase == "done" else next_step
        for leaf in jax.tree_util.tree_leaves((draws, stats)):
            if np.shape(leaf)[:2] != (num_chains, done):
                expected = f"({num_chains}, {done}, ...)"
                raise fail(f"a draws array has shape {np.shape(leaf)}, not {expected}")
        run.store_draws(jax.tree_util.tree_map(lambda x: np.swapaxes(x, 0, 1), (draws, stats)), 0)
    elif phase == "done" or (phase == "sampling" and next_step > 0):
        raise fail("the draws are missing")
    return run, metadata


def _check_logdensity(path, logdensity_fn, states) -> None:
    """Refuse to resume with a log density other than the one the run was sampling."""
    count = min(4, np.shape(states.logdensity)[0])
    position = jax.tree_util.tree_map(lambda x: jnp.asarray(x[:count]), states.position)
    recomputed = np.asarray(_adaptation.init_states(logdensity_fn, position).logdensity)
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
    _checks.check_callable(logdensity_fn)
    progress_bar = _checks.check_bool(progress_bar, "progress_bar")
    mesh = _resolve_devices(devices)
    path = os.fspath(path)
    run, _ = _load(path)
    _check_logdensity(path, logdensity_fn, run.states)
    layout = _Layout(mesh, run.settings["num_chains"])
    run.states = layout.chains(run.states)
    run.adapt = layout.replicated(run.adapt)
    if run.phase == "warmup" and run.next_step >= run.settings["num_warmup"]:
        _start_sampling(run)
    if run.phase == "done":
        return run.result(layout)
    return _drive(run, logdensity_fn, layout, _checkpoint.check_path(path), progress_bar)


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
    target_acceptance_rate, dense
        Passed to the warmup (see :func:`rwmh.window_adaptation`).
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
        ``jax.sharding.Mesh``: those devices. The chain axis is sharded over them and the
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
    _checks.check_key(rng_key)
    _checks.check_callable(logdensity_fn)
    num_samples = _check_int(num_samples, "num_samples", 1)
    num_warmup = _check_int(num_warmup, "num_warmup", 0)
    thin = _check_int(thin, "thin", 1)
    if chunk_size is not None:
        chunk_size = _check_int(chunk_size, "chunk_size", 1)
    _adaptation._check_target(target_acceptance_rate)
    _kernel.check_step_size(step_size)
    dense = _checks.check_bool(dense, "dense")
    progress_bar = _checks.check_bool(progress_bar, "progress_bar")
    num_chains = _check_positions(initial_positions)
    mesh = _resolve_devices(devices)
    if checkpoint is not None:
        checkpoint = _checkpoint.check_path(checkpoint)
        _checkpoint.encode_tree(initial_positions)
    positions = jax.tree_util.tree_map(jnp.asarray, initial_positions)

    layout = _Layout(mesh, num_chains)
    if mesh is not None:
        positions = layout.chains(positions)
    states, adapt = _adaptation.initial_state(
        logdensity_fn, positions, step_size, proposal_cov, dense
    )
    _checks.check_finite_logdensity(layout.to_host(states.logdensity, 0), "initial_positions")
    settings = {
        "num_chains": num_chains,
        "num_samples": num_samples,
        "num_warmup": num_warmup,
        "thin": thin,
        "chunk_size": chunk_size,
        "target_acceptance_rate": (
            None if target_acceptance_rate is None else float(target_acceptance_rate)
        ),
        "dense": bool(dense),
    }
    run = _Run(settings, rng_key, "warmup", 0, states, layout.replicated(adapt))
    if num_warmup == 0:
        run.parameters = {"step_size": adapt.step_size, "proposal_cov": proposal_cov}
        run.scale = _kernel.proposal_scale(proposal_cov, _adaptation.flat_dimension(positions))
        run.phase = "sampling"
    return _drive(run, logdensity_fn, layout, checkpoint, progress_bar)
