"""Checks of user input shared by every front door.

Each check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong
value) with a message that names the argument and says what was expected. They look at
shapes, dtypes and, where values are concrete (outside ``jit`` and ``vmap``), at values, so
that bad input fails before anything is compiled. Traced values pass the value checks
unchecked: inside a transformation only the static facts can be known.
"""

from __future__ import annotations

from functools import cache

import jax
import jax.numpy as jnp
import numpy as np

#: Chains listed by name in an error message before the rest are counted.
_MAX_LISTED = 10


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


@cache
def _legacy_key_shape() -> tuple[int, ...]:
    """Shape of a legacy ``jax.random.PRNGKey`` under the configured default implementation."""
    return jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape


def check_key(rng_key, name: str = "rng_key"):
    """A ``TypeError`` or ``ValueError`` naming ``name`` unless ``rng_key`` is one key: a typed
    key (``jax.random.key``) of shape ``()`` or a legacy ``jax.random.PRNGKey`` (``uint32`` of
    shape ``(2,)`` for the default threefry implementation). Works on traced keys too."""
    expected = f"{name} must be one key from jax.random.key(seed) or jax.random.PRNGKey(seed)"
    dtype = getattr(rng_key, "dtype", None)
    shape = getattr(rng_key, "shape", None)
    if dtype is None or shape is None:
        raise TypeError(f"{expected}; got {type(rng_key).__name__}.")
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(
                f"{expected}; got a batch of typed keys of shape {shape} (split keys are for "
                "jax.vmap; pass the key they were split from)."
            )
        return rng_key
    legacy = _legacy_key_shape()
    if dtype != np.uint32:
        raise TypeError(f"{expected}; got an array of dtype {dtype}, not a key.")
    if tuple(shape) != legacy:
        raise ValueError(
            f"{expected}; got a uint32 array of shape {tuple(shape)}, where a legacy key has "
            f"shape {legacy}."
        )
    return rng_key


def check_bool(value, name: str) -> bool:
    """``value`` as a bool; a ``TypeError`` naming ``name`` unless it is True or False."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False; got {value!r}.")


def check_callable(fn, name: str = "logdensity_fn"):
    if not callable(fn):
        raise TypeError(f"{name} must be callable; got {type(fn).__name__}.")
    return fn


def _describe_chains(bad: np.ndarray) -> str:
    chains = [int(c) for c in np.flatnonzero(bad)]
    listed = ", ".join(str(c) for c in chains[:_MAX_LISTED])
    more = f" and {len(chains) - _MAX_LISTED} more" if len(chains) > _MAX_LISTED else ""
    noun = "chain" if len(chains) == 1 else "chains"
    return f"{noun} {listed}{more}"


def check_float_positions(positions, name: str, batched: bool) -> None:
    """A ``TypeError`` naming ``name`` unless every leaf of ``positions`` is floating point
    (the random walk moves them continuously), and a ``ValueError`` naming the chains (when
    ``batched``, the leading axis indexes chains) whose values are NaN or infinite."""
    leaves = jax.tree_util.tree_leaves(positions)
    if not leaves:
        raise ValueError(f"{name} must hold at least one array; got an empty PyTree.")
    bad = None
    for leaf in leaves:
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name} must hold floating-point arrays (the random walk moves them "
                f"continuously); got dtype {dtype}. Convert with .astype(float)."
            )
        check_precision(dtype, name)
        if _is_tracer(leaf):
            continue
        finite = np.isfinite(np.asarray(leaf))
        if batched:
            leaf_bad = ~finite.reshape(finite.shape[0], -1).all(axis=1)
            bad = leaf_bad if bad is None else bad | leaf_bad
        elif not finite.all():
            raise ValueError(f"{name} holds NaN or infinite values; every entry must be finite.")
    if bad is not None and bad.any():
        raise ValueError(
            f"{name}: {_describe_chains(bad)} hold{'s' if bad.sum() == 1 else ''} NaN or infinite "
            "values; every entry of an initial position must be finite."
        )


#: The narrowest floating-point type a position may have, in bits.
MIN_POSITION_BITS = 32


def check_precision(dtype, name: str) -> None:
    """A ``TypeError`` naming ``name`` for positions narrower than float32 (float16, bfloat16).

    Refused rather than sampled: a proposal ``x + s L z`` rounded to an 8- or 11-bit mantissa
    lands on a grid whose spacing doubles at every power of two, so the rounded proposal is no
    longer symmetric and the Metropolis-Hastings ratio ``pi(x') / pi(x)`` would no longer leave
    the target invariant; steps below the grid spacing do not move at all. Computing the
    acceptance test in float32 would not repair the proposal.
    """
    if jnp.finfo(dtype).bits < MIN_POSITION_BITS:
        raise TypeError(
            f"{name} has dtype {np.dtype(dtype).name}; the random walk needs float32 or float64 "
            "positions (rounded to a 16-bit float grid the proposal is not symmetric, so the "
            "acceptance test would be wrong). Convert with .astype(jnp.float32)."
        )


def check_dimension(positions, name: str, batched: bool) -> int:
    """The flattened dimension of one position of ``positions`` (without the chain axis when
    ``batched``); a ``ValueError`` naming ``name`` when it is 0: there is nothing to move, and
    warmup's step size ``2.38 / sqrt(d)`` has no value."""
    leaves = jax.tree_util.tree_leaves(positions)
    shapes = [np.shape(leaf)[1:] if batched else np.shape(leaf) for leaf in leaves]
    dimension = sum(int(np.prod(shape)) for shape in shapes)
    if dimension == 0:
        shown = ", ".join(str(shape) for shape in shapes)
        raise ValueError(
            f"{name} has no entries to move: one position flattens to dimension 0 (leaves of "
            f"shape {shown}{' after the chain axis' if batched else ''}). Give at least one "
            "continuous parameter."
        )
    return dimension


def check_finite_logdensity(
    logdensity, name: str = "initial_positions", batched: bool = True, what: str = "logdensity_fn"
):
    """A ``ValueError`` naming the chains of ``name`` at which the log density is not finite.

    A chain must start where the target has positive density: from a NaN or infinite log
    density no Metropolis-Hastings ratio is meaningful.
    """
    if _is_tracer(logdensity):
        return
    values = np.asarray(logdensity)
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    if batched:
        shown = ", ".join(str(v) for v in values[bad][:_MAX_LISTED])
        raise ValueError(
            f"{what} is not finite at {name} of {_describe_chains(bad)} (value {shown}); start "
            "every chain inside the support of the target."
        )
    raise ValueError(
        f"{what} is not finite at {name} (value {values}); start inside the support of the target."
    )


def check_int(value, name: str, minimum: int) -> int:
    """``value`` as an int; a ``TypeError`` or ``ValueError`` naming ``name`` unless it is an
    integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}.")
    return int(value)


def check_probability(value, name: str, allow_traced: bool = False):
    """``value`` as a float, or None; an error naming ``name`` unless it lies in (0, 1).

    With ``allow_traced``, a traced scalar (inside ``jax.jit``, where NumPyro's kernels accept
    a traced ``target_accept_prob``) is returned as it is, its value unchecked.
    """
    if value is None:
        return None
    if allow_traced and _is_tracer(value):
        if jnp.ndim(value) != 0 or not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(
                f"{name} must be a scalar number in (0, 1); got a traced array of shape "
                f"{jnp.shape(value)} and dtype {value.dtype}."
            )
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in (0, 1) or None; got {value!r}.") from None
    if not 0.0 < number < 1.0:
        raise ValueError(f"{name} must lie in (0, 1); got {number}.")
    return number


def check_chain_axis(positions, name: str) -> int:
    """The number of chains, the common leading axis of every leaf of ``positions``; a
    ``ValueError`` naming ``name`` when there is none."""
    leaves = jax.tree_util.tree_leaves(positions)
    if not leaves:
        raise ValueError(f"{name} must hold at least one array.")
    sizes = set()
    for leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"{name} must carry a leading chain axis (num_chains, ...); got a scalar leaf. "
                "For one chain, add an axis: position[None]."
            )
        sizes.add(shape[0])
    if len(sizes) != 1:
        raise ValueError(
            f"{name}: every leaf must have the same leading chain axis; got sizes {sorted(sizes)}."
        )
    num_chains = sizes.pop()
    if num_chains == 0:
        raise ValueError(f"{name} must hold at least one chain; its leading chain axis has size 0.")
    return num_chains
