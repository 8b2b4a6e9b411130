"""Checkpoint files of :func:`rwmh.sample`: atomic writes, and reads that never run code.

A checkpoint is a NumPy ``.npz`` archive (a zip of ``.npy`` arrays). Loading uses
``np.load(..., allow_pickle=False)``, so a file from an untrusted source can at worst fail to
load: it cannot execute code, as a pickle could. Besides plain numeric arrays the archive holds
one entry, ``"metadata"``, a JSON string (a 0-d unicode array) with the run's settings, its
phase and step, and the structure of the position PyTree.

Writes are atomic: the archive is written to a temporary file in the destination's directory,
flushed and ``fsync``-ed, then moved over the destination with ``os.replace``. A process killed at
any moment therefore leaves either the previous checkpoint or the new one, never half a file.

The format (:func:`write`, :func:`read`, :func:`encode_tree`, :func:`decode_tree`) knows
nothing of runs; the schema (:func:`save`, :func:`load`) says which arrays and metadata of a
:class:`rwmh.run.Run` go in, under which names, and checks them on the way back.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

from rwmh import checks, tuning
from rwmh.kernel import FactoredCov, RWMHState
from rwmh.pmmh import PseudoMarginalState
from rwmh.run import PHASES, Run, Settings

__all__ = [
    "FORMAT",
    "VERSION",
    "check_path",
    "fsync_directory",
    "replace_atomically",
    "read",
    "write",
    "encode_tree",
    "decode_tree",
    "save",
    "load",
    "load_state",
]

#: Value of ``metadata["format"]``, which tells an rwmh checkpoint from any other ``.npz``.
FORMAT = "rwmh-checkpoint"
#: Version of the layout; a reader refuses versions it does not know.
#: 2: the warmup trace counts restarted chains (``warmup/num_restarted``) and the settings
#: say whether restarts were on; version-1 files came from the former restart rule.
VERSION = 2


def check_path(path) -> str:
    """Validate ``checkpoint=`` before any work starts; return it as a string.

    The directory must exist and accept a new file (tested by creating and removing a
    temporary file), so that a run does not compile and sample for an hour before failing to
    save its first chunk.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be None or a file path; got {type(path).__name__}.")
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not os.path.basename(path):
        raise ValueError(f"checkpoint must name a file; got {path!r}.")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint must be a file path; {path!r} is a directory.")
    check_writable_parent(path, "checkpoint")
    return path


def check_writable_parent(path: str, name: str) -> None:
    """Raise a ValueError naming argument ``name`` unless the directory that would hold
    ``path`` exists and accepts a new file (tested by creating and removing a temporary one)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{name}: directory {directory!r} of {path!r} does not exist.")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".rwmh-probe-"):
            pass
    except OSError as error:
        raise ValueError(
            f"{name}: cannot write in directory {directory!r} of {path!r}: {error}."
        ) from None


def replace_atomically(path: str, write_to: Callable[[BinaryIO], Any]) -> None:
    """Replace ``path`` by what ``write_to(handle)`` writes: to a temporary file in the same
    directory, flushed and ``fsync``-ed, moved over ``path`` with ``os.replace``, then the
    directory ``fsync``-ed so that the rename is durable too. A process killed at any moment
    leaves the old file or the new one (and at worst a hidden ``.tmp`` file)."""
    directory = os.path.dirname(os.path.abspath(path))
    handle = tempfile.NamedTemporaryFile(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            write_to(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        # Never leave temporary files behind, whatever interrupted the write.
        try:
            os.unlink(handle.name)
        except FileNotFoundError:
            pass
        raise
    fsync_directory(directory)


def fsync_directory(directory: str) -> None:
    """``fsync`` a directory (its entries), where the file system allows it."""
    try:
        directory_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory_fd)
    except OSError:
        pass
    finally:
        os.close(directory_fd)


def write(path: str, metadata: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` and the JSON ``metadata`` to ``path`` atomically
    (:func:`replace_atomically`).

    Parameters
    ----------
    path
        Destination file; replaced as a whole, never modified in place.
    metadata
        JSON-serialisable settings; ``format`` and ``version`` are added.
    arrays
        Numeric host arrays; names must not be ``"metadata"``.
    """
    metadata = {"format": FORMAT, "version": VERSION, **metadata}
    replace_atomically(
        path, lambda handle: np.savez(handle, metadata=np.array(json.dumps(metadata)), **arrays)
    )


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a checkpoint written by :func:`write`; return ``(metadata, arrays)``.

    Every array is read (and its zip checksum verified) here, so that a damaged file fails now
    with a clear message rather than halfway through a resumed run.

    Raises
    ------
    ValueError
        Naming ``path`` and what is wrong: missing, unreadable, truncated or corrupt, not an
        rwmh checkpoint, or written by an unknown format version.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist or is not a file.")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single .npy array, not an .npz archive")
        with archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as error:
        # Whatever the damage (a torn zip directory raises NotImplementedError for an unknown
        # compression, RuntimeError for the encryption flag, zlib.error, ...), it is this file.
        raise ValueError(
            f"checkpoint {path!r} is not a readable rwmh checkpoint (truncated, corrupt or "
            f"another kind of file): {type(error).__name__}: {error}"
        ) from error
    if "metadata" not in arrays:
        raise ValueError(
            f"checkpoint {path!r} is an .npz archive but not an rwmh checkpoint: it has no "
            "'metadata' entry."
        )
    try:
        metadata = json.loads(str(arrays.pop("metadata")))
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint {path!r}: its metadata is not JSON ({error}).") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint {path!r} is an .npz archive but not an rwmh checkpoint (format "
            f"{metadata.get('format') if isinstance(metadata, dict) else None!r})."
        )
    if metadata.get("version") != VERSION:
        raise ValueError(
            f"checkpoint {path!r} has format version {metadata.get('version')!r}; this rwmh "
            f"reads version {VERSION}."
        )
    return metadata, arrays


def encode_tree(tree) -> tuple[Any, list]:
    """Describe a PyTree of arrays as JSON and list its leaves in the same order.

    Supported containers are dicts and ``OrderedDict`` objects with string keys, lists and
    tuples, nested freely; any other node (a NamedTuple, a registered class) raises
    ``TypeError``, because rebuilding it would need to import and call arbitrary code, which
    checkpoints never do.
    """
    leaves: list = []

    def encode(node):
        if type(node) in (dict, OrderedDict):
            if not all(isinstance(key, str) for key in node):
                raise TypeError("checkpoint: position dicts must have string keys.")
            if type(node) is OrderedDict:
                # JAX flattens an OrderedDict in insertion order (a dict in sorted order):
                # the order of the saved covariance's rows.
                return {"ordered_dict": [[key, encode(value)] for key, value in node.items()]}
            return {"dict": [[key, encode(node[key])] for key in sorted(node)]}
        if isinstance(node, (list, tuple)) and type(node) in (list, tuple):
            return {type(node).__name__: [encode(item) for item in node]}
        if hasattr(node, "shape") and hasattr(node, "dtype"):
            leaves.append(node)
            return {"leaf": len(leaves) - 1}
        raise TypeError(
            "checkpoint: positions must be arrays or dicts, lists and tuples of arrays; got a "
            f"{type(node).__name__} node."
        )

    return encode(tree), leaves


def decode_tree(structure, leaves: list):
    """Rebuild the PyTree that :func:`encode_tree` described, from its ``leaves``."""
    ((kind, content),) = structure.items()
    if kind == "leaf":
        return leaves[content]
    if kind == "dict":
        return {key: decode_tree(item, leaves) for key, item in content}
    if kind == "ordered_dict":
        return OrderedDict((key, decode_tree(item, leaves)) for key, item in content)
    if kind in ("list", "tuple"):
        items = [decode_tree(item, leaves) for item in content]
        return items if kind == "list" else tuple(items)
    raise ValueError(f"unknown node {kind!r} in the position structure")


# ---------------------------------------------------------------------------------------------
# The schema: a run in a checkpoint.
# ---------------------------------------------------------------------------------------------


def _key_record(rng_key) -> tuple[dict, np.ndarray]:
    if jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
        return {"typed": True, "impl": str(jax.random.key_impl(rng_key))}, np.asarray(
            jax.random.key_data(rng_key)
        )
    return {"typed": False}, np.asarray(rng_key)


def _adapt_arrays(adapt: tuning.AdaptationState) -> dict:
    """The adaptation state under its names in the file (the covariance and its factor as
    ``proposal_cov`` and ``scale``)."""
    values = adapt._asdict()
    proposal = values.pop("proposal")
    values.update(proposal_cov=proposal.covariance, scale=proposal.factor)
    return {f"adapt/{name}": value for name, value in values.items()}


def save(
    path: str,
    run: Run,
    states: RWMHState,
    adapt: tuning.AdaptationState,
    traces: bool = True,
    extra: dict | None = None,
) -> None:
    """Write ``run`` to ``path`` atomically; ``states`` and ``adapt`` are its chain and
    adaptation states as host arrays (the caller gathers them from the devices).

    ``traces=False`` leaves out the warmup trace and the draws (a Zarr store holds them, see
    :mod:`rwmh.store`), so that the file costs the state alone; ``extra`` is added to the
    metadata."""
    structure, position_leaves = encode_tree(states.position)
    key_meta, key_data = _key_record(run.rng_key)
    arrays = {"rng_key": key_data, "state/logdensity": states.logdensity}
    if isinstance(states, PseudoMarginalState):
        arrays["state/u"] = states.u
    arrays.update({f"state/position/{i}": leaf for i, leaf in enumerate(position_leaves)})
    arrays.update(_adapt_arrays(adapt))
    optional = {}
    if run.parameters is not None:
        optional["parameters/step_size"] = run.parameters["step_size"]
        optional["parameters/proposal_cov"] = run.parameters["proposal_cov"]
        optional["parameters/scale"] = run.proposal.factor
    warmup, completed = run.completed() if traces else (None, None)
    if warmup is not None:
        optional.update({f"warmup/{name}": value for name, value in warmup._asdict().items()})
    if completed is not None:
        draws, stats = completed
        _, draw_leaves = encode_tree(draws)
        optional.update({f"draws/position/{i}": leaf for i, leaf in enumerate(draw_leaves)})
        optional.update({f"draws/stats/{name}": value for name, value in stats.items()})
    present = sorted(name for name, value in optional.items() if value is not None)
    arrays.update({name: np.asarray(optional[name]) for name in present})
    metadata = {
        "settings": run.settings.to_dict(),
        "phase": run.phase,
        "next_step": run.next_step,
        "position_structure": structure,
        "rng_key": key_meta,
        "optional": present,
        "traces": "file" if traces else "store",
        **(extra or {}),
    }
    if run.settings.until is not None:
        # The checks so far and the stop, so that a resumed run reports the whole run.
        metadata["checks"] = run.checks
        metadata["stop"] = run.stop
    if run.settings.auto_warmup:
        # Written at window ends only, where the windows so far are the warmup's whole state.
        metadata["warmup_length"] = run.warmup_length
        metadata["warmup_report"] = run.warmup_report
    write(path, metadata, arrays)


def load(path) -> Run:
    """Read a checkpoint into a :class:`rwmh.run.Run` with host arrays; ``ValueError`` naming
    ``path`` if it is unreadable or inconsistent."""
    return _load(path, traces=True)[0]


def load_state(path) -> tuple[Run, dict]:
    """Read a file written by ``save(..., traces=False)`` into a :class:`rwmh.run.Run` without
    warmup trace or draws (the caller fills them); return it with the file's metadata."""
    return _load(path, traces=False)


def _load(path, traces: bool) -> tuple[Run, dict]:
    metadata, arrays = read(path)

    def fail(what):
        return ValueError(f"checkpoint {path!r} is inconsistent: {what}.")

    if metadata.get("traces", "file") != ("file" if traces else "store"):
        raise fail(
            "it is the resume state inside an rwmh store; resume the store's directory"
            if traces
            else "it holds its own draws, it is not the state of an rwmh store"
        )

    try:
        settings = Settings.from_dict(metadata["settings"])
        num_chains = settings.num_chains
        phase = metadata["phase"]
        next_step = checks.check_int(metadata["next_step"], "next_step", 0)
        structure = metadata["position_structure"]
        key_meta = metadata["rng_key"]
        optional = set(metadata["optional"])
    except KeyError as error:
        raise fail(f"its metadata lacks {error}") from None
    except (TypeError, ValueError) as error:
        raise fail(f"its metadata is invalid: {str(error).rstrip('.')}") from None
    if phase not in PHASES:
        raise fail(f"unknown phase {phase!r}")
    last_step = settings.num_warmup if phase == "warmup" else settings.num_samples
    # A run with `until` may be done before its cap, after at least one draw.
    if phase != "done":
        first_step = 0
    else:
        first_step = 1 if settings.until is not None else settings.num_samples
    if not first_step <= next_step <= last_step:
        raise fail(f"next_step {next_step} is outside [{first_step}, {last_step}] in {phase}")

    def array(name):
        if name not in arrays:
            raise fail(f"array {name!r} is missing")
        return arrays[name]

    num_leaves = sum(1 for name in arrays if name.startswith("state/position/"))
    try:
        position = decode_tree(structure, [array(f"state/position/{i}") for i in range(num_leaves)])
    except (ValueError, TypeError, IndexError, AttributeError) as error:
        raise fail(f"its position structure is invalid ({error})") from None
    states = RWMHState(position, array("state/logdensity"))
    if "state/u" in arrays:
        states = PseudoMarginalState(*states, arrays["state/u"])
    for leaf in jax.tree_util.tree_leaves(states):
        if np.shape(leaf)[:1] != (num_chains,):
            raise fail(f"a state array has shape {np.shape(leaf)}, not ({num_chains}, ...)")
    fields = {
        name: array(f"adapt/{name}")
        for name in tuning.AdaptationState._fields
        if name != "proposal"
    }
    proposal = FactoredCov(array("adapt/proposal_cov"), array("adapt/scale"))
    adapt = tuning.AdaptationState(proposal=proposal, **fields)
    if key_meta.get("typed"):
        rng_key = jax.random.wrap_key_data(array("rng_key"), impl=key_meta["impl"])
    else:
        rng_key = jnp.asarray(array("rng_key"))

    run = Run(settings, rng_key, phase, next_step, states, adapt)
    run.checks = list(metadata.get("checks") or [])
    run.stop = metadata.get("stop")
    run.warmup_length = metadata.get("warmup_length")
    run.warmup_report = metadata.get("warmup_report")
    if "parameters/step_size" in optional:

        def optional_array(name):
            return jnp.asarray(array(name)) if name in optional else None

        proposal_cov = optional_array("parameters/proposal_cov")
        run.parameters = {
            "step_size": jnp.asarray(array("parameters/step_size")),
            "proposal_cov": proposal_cov,
        }
        run.proposal = FactoredCov(proposal_cov, optional_array("parameters/scale"))
    elif phase != "warmup":
        raise fail(f"phase {phase!r} without sampling parameters")
    if not traces:
        return run, metadata
    if "warmup/acceptance_rate" in optional:
        info = tuning.AdaptationInfo(
            *(array(f"warmup/{name}") for name in tuning.AdaptationInfo._fields)
        )
        done = run.num_warmup if phase != "warmup" else next_step
        if info.acceptance_rate.shape != (done, num_chains):
            raise fail(
                f"warmup trace has shape {info.acceptance_rate.shape}, expected "
                f"({done}, {num_chains})"
            )
        run.store_warmup(tuple(info), 0)
    if "draws/position/0" in optional:
        draws = decode_tree(structure, [array(f"draws/position/{i}") for i in range(num_leaves)])
        stats = {
            name: array(f"draws/stats/{name}") for name in ("acceptance_rate", "is_accepted", "lp")
        }
        # A run stopped by `until` is done before its cap: next_step counts its draws.
        done = next_step
        for leaf in jax.tree_util.tree_leaves((draws, stats)):
            if np.shape(leaf)[:2] != (num_chains, done):
                expected = f"({num_chains}, {done}, ...)"
                raise fail(f"a draws array has shape {np.shape(leaf)}, not {expected}")
        run.store_draws(jax.tree_util.tree_map(lambda x: np.swapaxes(x, 0, 1), (draws, stats)), 0)
    elif phase == "done" or (phase == "sampling" and next_step > 0):
        raise fail("the draws are missing")
    return run, metadata
