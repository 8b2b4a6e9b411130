"""Where the chains live: one device, or the chain axis sharded over a one-dimensional mesh.

:class:`Layout` pads the chain axis to fill the devices, places arrays (on one process or
several, ``jax.distributed``), gathers them back to the host and picks the compiled loops:
the functions of :mod:`rwmh.chains` as they are, or compiled for sharded inputs and outputs
(:func:`sharded_warmup`, :func:`sharded_sampling`).
"""

from __future__ import annotations

from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rwmh import chains, tuning

__all__ = ["CHAIN_AXIS", "Layout", "resolve_devices", "sharded_sampling", "sharded_warmup"]

#: Name of the mesh axis that the chain axis is sharded over.
CHAIN_AXIS = "chains"


def resolve_devices(devices) -> Mesh | None:
    """``devices=`` as a one-dimensional :class:`jax.sharding.Mesh`, or None (no sharding)."""
    if devices is None:
        return None
    if isinstance(devices, Mesh):
        if devices.devices.ndim != 1:
            raise ValueError(
                "devices: a Mesh must be one-dimensional (the chain axis is sharded over its "
                f"single axis); got axes {devices.axis_names} of shape {devices.devices.shape}."
            )
        # Whatever its one axis is called, the chains are sharded over it: the same devices
        # in the same order, under the axis name the compiled loops use.
        if devices.axis_names != (CHAIN_AXIS,):
            return Mesh(devices.devices, (CHAIN_AXIS,))
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


class Layout:
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
            host.shape, NamedSharding(self.mesh, spec), lambda index: host[index]
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

    def run_keys(self, rng_key):
        """The chain keys of both phases (:func:`rwmh.chains.run_keys`), for the padded count
        and sharded like the chains."""
        return tuple(
            self._put(keys, P(CHAIN_AXIS)) for keys in chains.run_keys(rng_key, self.num_padded)
        )

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
        """The compiled :func:`rwmh.chains.warmup_loop` for this layout."""
        if self.mesh is None:
            return chains.run_warmup
        return partial(chains.run_warmup, jit_options=sharded_warmup(self.mesh))

    def sampling_fn(self):
        """The compiled :func:`rwmh.chains.sampling_loop` for this layout."""
        if self.mesh is None:
            return chains.run_sampling
        return partial(chains.run_sampling, jit_options=sharded_sampling(self.mesh))


@lru_cache(maxsize=8)
def sharded_warmup(mesh: Mesh):
    """The ``jax.jit`` options of :func:`rwmh.chains.warmup_loop` for chains sharded over
    ``mesh`` (:func:`rwmh.chains.run_warmup` compiles it with them).

    The same function as the unsharded run, under ``jit`` with sharded inputs and outputs:
    XLA partitions the vmapped steps by chain and turns the pooled sums of
    :func:`rwmh.tuning.update` (the mean acceptance, the weighted mean and covariance of the
    window) into per-device partial sums and an all-reduce, ``d x d`` numbers per step however
    many chains there are. ``shard_map`` with ``psum`` would do the same but needs the
    adaptation written against a named mesh axis; this way one code path serves both runs and
    the adaptation stays unaware of devices.

    The partial sums add in another order than one device does, and XLA's CPU code for
    ``exp`` and friends rounds differently for different batch sizes, so the draws agree with
    the unsharded run to float rounding (about 1e-6 relative in float32), not bit for bit.
    """
    by_chain = NamedSharding(mesh, P(CHAIN_AXIS))
    replicated = NamedSharding(mesh, P())
    info = tuning.AdaptationInfo(NamedSharding(mesh, P(None, CHAIN_AXIS)), replicated, replicated)
    return (("out_shardings", (by_chain, replicated, info)),)


@lru_cache(maxsize=8)
def sharded_sampling(mesh: Mesh):
    """The ``jax.jit`` options of :func:`rwmh.chains.sampling_loop` for chains sharded over
    ``mesh``: no collectives, each device steps its own chains."""
    by_chain = NamedSharding(mesh, P(CHAIN_AXIS))
    draws = NamedSharding(mesh, P(None, CHAIN_AXIS))
    return (("out_shardings", (by_chain, draws)),)
