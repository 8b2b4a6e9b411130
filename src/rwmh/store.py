"""Zarr stores of :func:`rwmh.sample` (``store=``): draws streamed to disk chunk by chunk.

A store is a Zarr (format 3) directory in ArviZ's layout: groups ``posterior`` (one variable
per leaf of the positions, dims ``chain``, ``draw``, ``<name>_dim_<i>``), ``sample_stats``
(``acceptance_rate``, ``is_accepted``, ``lp``, ``step_size``) and, with warmup,
``warmup_sample_stats`` (``acceptance_rate`` per chain and step, ``step_size`` and
``num_restarted`` per step), each with its ``chain`` and ``draw`` coordinates. Besides them it
holds one ``rwmh-state-<n>.npz`` file: the chain states, keys, adaptation state and settings
that :func:`rwmh.resume` continues from, written by :func:`rwmh.checkpoint.save` without the
draws (it loads without running code).

Every array is created at its full length (the cap of its phase) when the run starts, so that
an append writes chunk objects only, never an array's metadata, and costs one chunk whatever
the run's length. What has been completed is said in one file, the root ``zarr.json``: its
consolidated metadata (which xarray and ArviZ read by default) gives every array the length
completed so far, and its ``rwmh`` attribute names the state file of that moment. A chunk is
committed in three steps: (1) its chunk objects are written (each by Zarr to a temporary file
renamed into place), (2) a new state file is written, flushed, ``fsync``-ed and renamed into
place, (3) the root ``zarr.json`` is replaced the same way; only then is the previous state file
removed. A process killed at any moment therefore leaves the previous commit or the new one:
chunk objects beyond the committed length are ignored by readers of the consolidated metadata
and rewritten, identically, by :func:`rwmh.resume`. The store itself is assembled in a temporary
directory and renamed into place with its first commit.

What is not covered: Zarr does not ``fsync`` its chunk objects, so a power failure (not a killed
process) can lose chunk data that a later commit on disk describes; a reader that ignores
consolidated metadata (``xarray.open_zarr(..., consolidated=False)``) sees every array at its full
length, the part not yet written as fill values (NaN, False).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import tempfile
import warnings

import jax
import numpy as np

from rwmh import checkpoint
from rwmh.run import Run

__all__ = [
    "FORMAT",
    "VERSION",
    "Store",
    "check_new",
    "is_store",
    "lengths",
    "open_inference_data",
]

#: ``attributes["rwmh"]["format"]`` of the root group, which tells an rwmh store from any other.
FORMAT = "rwmh-store"
#: Version of the layout; a reader refuses versions it does not know.
VERSION = 1
_ROOT = "zarr.json"
_STATE = re.compile(r"rwmh-state-[0-9]{8}\.npz")
_STATS = ("acceptance_rate", "is_accepted", "lp")
_WARMUP = "warmup_sample_stats"


def _fspath(path, name: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be None or a directory path; got {type(path).__name__}.")
    path = os.fspath(path)
    return os.fsdecode(path) if isinstance(path, bytes) else path


def check_new(path, check_exists: bool = True) -> str:
    """Validate ``store=`` before any work starts; return it as a string.

    The store must not exist (a run never overwrites a directory: :func:`rwmh.resume`
    continues an rwmh store), and its parent directory must exist and accept new files.
    ``check_exists=False`` (processes other than 0, which never write) skips the first check.
    """
    path = _fspath(path, "store")
    if not os.path.basename(os.path.normpath(path)):
        raise ValueError(f"store must name a directory to create; got {path!r}.")
    if check_exists and os.path.lexists(path):
        raise ValueError(
            f"store {path!r} already exists; rwmh.sample does not overwrite it. "
            f"rwmh.resume({path!r}, logdensity_fn) continues an rwmh store; otherwise remove it "
            "or choose another path."
        )
    checkpoint.check_writable_parent(path, "store")
    return path


def is_store(path) -> bool:
    """Whether ``rwmh.resume(path)`` reads ``path`` as a store (a directory) rather than an
    ``.npz`` checkpoint."""
    return os.path.isdir(path)


def _write_atomic(path: str, data: bytes) -> None:
    checkpoint.replace_atomically(path, lambda handle: handle.write(data))


def _variables(positions, num_chains: int):
    """``(name, dims, dtype, event shape)`` of every posterior variable, in leaf order."""
    from rwmh.arviz import leaf_names

    names, leaves = leaf_names(positions, "x")
    if len(set(names)) != len(names):
        raise ValueError(f"store: the position leaves have clashing names {names}.")
    variables = []
    for name, leaf in zip(names, leaves, strict=True):
        if "/" in name or name.startswith(".") or name in ("chain", "draw", _ROOT):
            raise ValueError(
                f"store: position leaf {name!r} cannot be a Zarr array name (no '/', no leading "
                "'.', not 'chain' or 'draw'); rename it."
            )
        event = tuple(int(n) for n in np.shape(leaf)[1:])
        dims = ["chain", "draw", *(f"{name}_dim_{i}" for i in range(len(event)))]
        variables.append((name, dims, np.dtype(leaf.dtype), event))
    return variables


class Store:
    """A store being written (process 0) or followed (other processes) by a run.

    ``record`` is the root's ``rwmh`` attribute of the last commit: ``phase``, ``next_step``,
    ``num_warmup_done`` and ``num_draws`` (the committed lengths), ``state`` (the state file),
    ``commit`` (a counter), ``chunks`` (the warmup and sampling chunk lengths, fixed for the
    store's life so that an append never rewrites a committed chunk object), ``structure``
    (the position PyTree) and ``variables``.
    """

    def __init__(self, path: str, root: dict, writer: bool):
        self.path = path
        self.root = root
        self.writer = writer
        self._arrays = None

    @property
    def record(self) -> dict:
        return self.root["attributes"]["rwmh"]

    @property
    def chunks(self) -> dict:
        return self.record["chunks"]

    # -- creation --------------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str, run: Run, position, states, adapt, chunks: dict, writer: bool
    ) -> Store:
        """Create the store of ``run`` (positions shaped like ``position``, host arrays with
        the chain axis first) with its first commit, atomically: assembled in a temporary
        directory beside ``path`` and renamed to it. ``writer=False`` writes nothing."""
        settings = run.settings
        variables = _variables(position, settings.num_chains)
        structure, _ = checkpoint.encode_tree(position)
        lp_dtype = np.dtype(states.logdensity.dtype)
        record = {
            "format": FORMAT,
            "version": VERSION,
            "chunks": chunks,
            "structure": structure,
            "variables": [name for name, *_ in variables],
            "commit": -1,
        }
        store = cls(path, {"attributes": {"rwmh": record}}, writer)
        if not writer:
            store.commit(run, states, adapt)
            return store
        parent = os.path.dirname(os.path.abspath(path))
        building = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.creating-")
        try:
            store.path = building
            store.root = _build(building, settings, variables, lp_dtype, chunks, record)
            store._open_arrays()
            store.commit(run, states, adapt)
            if os.path.lexists(path):
                raise ValueError(f"store {path!r} appeared while the run started; not replaced.")
            os.rename(building, path)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        checkpoint.fsync_directory(parent)
        store.path = path
        store._open_arrays()
        return store

    # -- reading a store back --------------------------------------------------------------

    @classmethod
    def open(cls, path, writer: bool) -> tuple[Store, Run]:
        """Open the store at ``path`` and the run of its last commit (warmup trace filled,
        draws left in the store). ``ValueError`` naming ``path`` for anything that is not a
        complete rwmh store; nothing is modified unless ``writer`` (then stale files beyond the
        last commit are removed)."""
        path = _fspath(path, "path")
        root = _read_root(path)
        store = cls(path, root, writer)
        record = store.record

        def fail(what):
            return ValueError(f"store {path!r} is inconsistent: {what}.")

        state = record.get("state")
        if not isinstance(state, str) or not _STATE.fullmatch(state):
            raise fail(f"its root names no valid state file ({state!r})")
        try:
            run, metadata = checkpoint.load_state(os.path.join(path, state))
        except ValueError as error:
            raise ValueError(f"store {path!r}: {error}") from None
        if (metadata.get("store_commit"), run.phase, run.next_step) != (
            record.get("commit"),
            record.get("phase"),
            record.get("next_step"),
        ):
            raise fail(
                f"state file {state!r} is of commit {metadata.get('store_commit')} "
                f"({run.phase}, step {run.next_step}), the root of commit {record.get('commit')} "
                f"({record.get('phase')}, step {record.get('next_step')})"
            )
        try:
            store._open_arrays()
            store._check(run)
            warmup = store._read_warmup()
        except ValueError:
            raise
        except Exception as error:
            raise ValueError(
                f"store {path!r} is damaged (truncated, corrupt or edited): "
                f"{type(error).__name__}: {error}"
            ) from error
        if warmup is not None:
            run.store_warmup(warmup, 0)
        if writer:
            store._remove_stale()
        return store, run

    def _check(self, run: Run) -> None:
        settings = run.settings
        record = self.record
        expected = {"num_warmup_done": self._warmup_done(run), "num_draws": self._draws_done(run)}
        for name, value in expected.items():
            if record.get(name) != value:
                raise ValueError(
                    f"store {self.path!r} is inconsistent: its root says {name} "
                    f"{record.get(name)!r}, its state {value}."
                )
        metadata = self.root["consolidated_metadata"]["metadata"]
        for key, (array, axis) in self._arrays.items():
            committed = metadata.get(key, {}).get("shape")
            capacity = self._capacity(settings, key)
            if array.shape[0] != settings.num_chains and axis == 1:
                raise ValueError(
                    f"store {self.path!r}: array {key!r} has {array.shape[0]} chains, the run "
                    f"{settings.num_chains}."
                )
            # A finished run's arrays are trimmed to their length after its last commit.
            lengths = {capacity, self._length(key) if record.get("phase") == "done" else capacity}
            if array.shape[axis] not in lengths or committed is None:
                raise ValueError(
                    f"store {self.path!r}: array {key!r} has shape {array.shape}, not the "
                    f"{capacity} steps of the run."
                )
            length = self._length(key)
            if committed[axis] != length:
                raise ValueError(
                    f"store {self.path!r} is inconsistent: array {key!r} is committed with "
                    f"shape {committed}, the run has {length} steps."
                )
            self._check_chunks(key, array, axis, length)

    def _check_chunks(self, key: str, array, axis: int, length: int) -> None:
        """Every chunk object of the committed part must be there (Zarr reads a missing one
        as fill values, without a word)."""
        size = array.chunks[axis]
        grid = [1 if i != axis else -(-length // size) for i in range(array.ndim)]
        for index in range(grid[axis]):
            parts = ["0"] * array.ndim
            parts[axis] = str(index)
            chunk = os.path.join(self.path, key, "c", *parts)
            if not os.path.isfile(chunk) or os.path.getsize(chunk) == 0:
                raise ValueError(
                    f"store {self.path!r} is truncated: chunk {index} of {key!r} is missing."
                )

    def _read_warmup(self):
        """The committed warmup trace, ``(acceptance_rate (step, chain), step_size,
        num_restarted)``, or None without warmup."""
        done = self.record["num_warmup_done"]
        if f"{_WARMUP}/acceptance_rate" not in self._arrays:
            return None
        acceptance = self._arrays[f"{_WARMUP}/acceptance_rate"][0][:, :done]
        step_size = self._arrays[f"{_WARMUP}/step_size"][0][:done]
        restarted = self._arrays[f"{_WARMUP}/num_restarted"][0][:done]
        return np.ascontiguousarray(acceptance.T), step_size, restarted

    def _remove_stale(self) -> None:
        """Remove what a killed run left beyond its last commit: other state files, Zarr's and
        our temporary files."""
        keep = self.record["state"]
        for name in os.listdir(self.path):
            if (_STATE.fullmatch(name) and name != keep) or name.endswith(".tmp"):
                os.unlink(os.path.join(self.path, name))
        for directory, _, files in os.walk(self.path):
            for name in files:
                if name.endswith(".partial") or (name.startswith(".") and name.endswith(".tmp")):
                    os.unlink(os.path.join(directory, name))

    # -- writing ---------------------------------------------------------------------------

    def _open_arrays(self) -> None:
        """Handles of every growing array at its full length (``(array, time axis)``)."""
        import zarr

        group = zarr.open_group(
            self.path, mode="r+" if self.writer else "r", use_consolidated=False
        )
        arrays = {}
        for key in self._growing_keys():
            array = group[key]
            if self.writer:
                array = array.with_config({"write_empty_chunks": True})
            dims = tuple(array.metadata.dimension_names or ())
            arrays[key] = (array, 1 if dims[:2] == ("chain", "draw") else 0)
        self._arrays = arrays

    def _growing_keys(self) -> list[str]:
        record = self.record
        keys = [f"posterior/{name}" for name in record["variables"]]
        keys += ["posterior/draw", *(f"sample_stats/{n}" for n in (*_STATS, "step_size"))]
        keys.append("sample_stats/draw")
        metadata = self.root.get("consolidated_metadata", {}).get("metadata", {})
        if f"{_WARMUP}/acceptance_rate" in metadata:
            keys += [f"{_WARMUP}/{name}" for name in ("acceptance_rate", "step_size")]
            keys += [f"{_WARMUP}/num_restarted", f"{_WARMUP}/draw"]
        return keys

    def _capacity(self, settings, key: str) -> int:
        return settings.num_warmup if key.startswith(_WARMUP) else settings.num_samples

    def _length(self, key: str) -> int:
        record = self.record
        return record["num_warmup_done"] if key.startswith(_WARMUP) else record["num_draws"]

    @staticmethod
    def _warmup_done(run: Run) -> int:
        return run.next_step if run.phase == "warmup" else run.num_warmup

    @staticmethod
    def _draws_done(run: Run) -> int:
        return 0 if run.phase == "warmup" else run.next_step

    def write_warmup(self, info, first: int) -> None:
        """Write a chunk of the warmup trace (``AdaptationInfo`` fields, step axis first) at
        steps ``first, ...``; committed by the next :meth:`commit`."""
        if not self.writer:
            return
        acceptance, step_size, restarted = info
        stop = first + acceptance.shape[0]
        arrays = self._arrays
        arrays[f"{_WARMUP}/acceptance_rate"][0][:, first:stop] = np.swapaxes(acceptance, 0, 1)
        arrays[f"{_WARMUP}/step_size"][0][first:stop] = step_size
        arrays[f"{_WARMUP}/num_restarted"][0][first:stop] = restarted
        arrays[f"{_WARMUP}/draw"][0][first:stop] = np.arange(first, stop)

    def write_draws(self, draws, first: int, step_size) -> None:
        """Write a chunk of draws ``(positions, stats)`` (draw axis first, as the sampling
        loop gives them) at draws ``first, ...``; committed by the next :meth:`commit`."""
        if not self.writer:
            return
        positions, stats = draws
        leaves = jax.tree_util.tree_leaves(positions)
        stop = first + leaves[0].shape[0]
        arrays = self._arrays
        for name, leaf in zip(self.record["variables"], leaves, strict=True):
            arrays[f"posterior/{name}"][0][:, first:stop] = np.swapaxes(leaf, 0, 1)
        for name in _STATS:
            arrays[f"sample_stats/{name}"][0][:, first:stop] = np.swapaxes(stats[name], 0, 1)
        lp = stats["lp"]
        step = arrays["sample_stats/step_size"][0]
        step[:, first:stop] = np.broadcast_to(
            np.asarray(step_size, step.dtype), (lp.shape[1], lp.shape[0])
        )
        for group in ("posterior", "sample_stats"):
            arrays[f"{group}/draw"][0][first:stop] = np.arange(first, stop)

    def commit(self, run: Run, states, adapt) -> None:
        """Make everything written so far part of the store: the state of ``run`` (``states``
        and ``adapt`` as host arrays) to a new state file, then the root, atomically."""
        record = dict(self.record)
        record["commit"] = commit = record["commit"] + 1
        if not self.writer:
            self.root = {**self.root, "attributes": {**self.root["attributes"], "rwmh": record}}
            self._set_committed(run)
            return
        previous = record.get("state")
        record["state"] = state = f"rwmh-state-{commit:08d}.npz"
        checkpoint.save(
            os.path.join(self.path, state),
            run,
            states,
            adapt,
            traces=False,
            extra={"store_commit": commit},
        )
        self.root = {**self.root, "attributes": {**self.root["attributes"], "rwmh": record}}
        self._set_committed(run)
        self._write_root()
        if previous is not None and previous != state:
            try:
                os.unlink(os.path.join(self.path, previous))
            except FileNotFoundError:
                pass
        if run.phase == "done":
            self._trim_array_metadata()

    def _set_committed(self, run: Run) -> None:
        record = self.record
        record.update(
            phase=run.phase,
            next_step=run.next_step,
            num_warmup_done=self._warmup_done(run),
            num_draws=self._draws_done(run),
        )
        metadata = self.root.get("consolidated_metadata", {}).get("metadata", {})
        for key in self._growing_keys() if metadata else ():
            shape = list(metadata[key]["shape"])
            shape[1 if metadata[key]["dimension_names"][:2] == ["chain", "draw"] else 0] = (
                self._length(key)
            )
            metadata[key]["shape"] = shape

    def _write_root(self) -> None:
        _write_atomic(os.path.join(self.path, _ROOT), json.dumps(self.root, indent=1).encode())

    def _trim_array_metadata(self) -> None:
        """At the end of the run, give every array's own metadata its final length, so that
        readers of the arrays (not of the consolidated metadata) see no unwritten tail."""
        metadata = self.root["consolidated_metadata"]["metadata"]
        for key in self._growing_keys():
            path = os.path.join(self.path, key, _ROOT)
            with open(path, "rb") as handle:
                own = json.load(handle)
            if own["shape"] != metadata[key]["shape"]:
                own["shape"] = metadata[key]["shape"]
                _write_atomic(path, json.dumps(own, indent=1).encode())

    # -- the run's results -----------------------------------------------------------------

    def results(self):
        """``(positions, stats)`` of the committed draws as read-only Zarr arrays (read on
        indexing, ``np.asarray`` reads all), leaves ``(chain, draw, ...)``."""
        import zarr

        group = zarr.open_group(self.path, mode="r", use_consolidated=True)
        record = self.record
        leaves = [group[f"posterior/{name}"] for name in record["variables"]]
        positions = checkpoint.decode_tree(record["structure"], leaves)
        stats = {name: group[f"sample_stats/{name}"] for name in _STATS}
        return positions, stats


def _build(directory: str, settings, variables, lp_dtype, chunks: dict, record: dict) -> dict:
    """Create every group and array of a new store in ``directory``; return its root."""
    import zarr
    from zarr.codecs import ZstdCodec

    from rwmh import __version__

    created = datetime.datetime.now(datetime.UTC).isoformat()
    attrs = {
        "created_at": created,
        "inference_library": "rwmh",
        "inference_library_version": __version__,
    }
    root = zarr.open_group(directory, mode="w-", zarr_format=3, attributes=attrs)
    # Checksummed chunks: a damaged chunk object fails to decode instead of reading as numbers.
    options = {
        "compressors": ZstdCodec(level=0, checksum=True),
        "config": {"write_empty_chunks": True},
    }
    num_chains = settings.num_chains

    def coordinate(group, name, values):
        array = group.create_array(
            name, shape=values.shape, dtype=values.dtype, dimension_names=[name], **options
        )
        array[:] = values

    def growing(group, name, length, chunk, dtype, dims, event=(), per_chain=True):
        shape = (num_chains, length, *event) if per_chain else (length,)
        chunk_shape = (num_chains, chunk, *event) if per_chain else (chunk,)
        fill = False if dtype == np.bool_ else (np.nan if dtype.kind == "f" else 0)
        group.create_array(
            name,
            shape=shape,
            chunks=tuple(max(1, n) for n in chunk_shape),
            dtype=dtype,
            fill_value=fill,
            dimension_names=dims,
            **options,
        )

    def trace_group(name, length, chunk):
        group = root.create_group(name, attributes=attrs)
        coordinate(group, "chain", np.arange(num_chains))
        growing(group, "draw", length, chunk, np.dtype(np.int64), ["draw"], per_chain=False)
        return group

    posterior = trace_group("posterior", settings.num_samples, chunks["sampling"])
    for name, dims, dtype, event in variables:
        growing(posterior, name, settings.num_samples, chunks["sampling"], dtype, dims, event)
        for dim, size in zip(dims[2:], event, strict=True):
            coordinate(posterior, dim, np.arange(size))
    stats = trace_group("sample_stats", settings.num_samples, chunks["sampling"])
    for name, dtype in (
        ("acceptance_rate", lp_dtype),
        ("is_accepted", np.dtype(np.bool_)),
        ("lp", lp_dtype),
        ("step_size", lp_dtype),
    ):
        growing(stats, name, settings.num_samples, chunks["sampling"], dtype, ["chain", "draw"])
    if settings.num_warmup > 0:
        warm = trace_group(_WARMUP, settings.num_warmup, chunks["warmup"])
        growing(
            warm,
            "acceptance_rate",
            settings.num_warmup,
            chunks["warmup"],
            lp_dtype,
            ["chain", "draw"],
        )
        for name, dtype in (("step_size", lp_dtype), ("num_restarted", np.dtype(np.int32))):
            growing(
                warm,
                name,
                settings.num_warmup,
                chunks["warmup"],
                dtype,
                ["draw"],
                per_chain=False,
            )
    with warnings.catch_warnings():
        # "Consolidated metadata is currently not part in the Zarr format 3 specification":
        # xarray and zarr-python read it (and use it by default), which is all it is for here.
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(directory)
    with open(os.path.join(directory, _ROOT), "rb") as handle:
        built = json.load(handle)
    built["attributes"]["rwmh"] = record
    return built


def _read_root(path: str) -> dict:
    """The root ``zarr.json`` of an rwmh store, checked; ``ValueError`` naming ``path``."""
    if not os.path.isdir(path):
        raise ValueError(f"store {path!r} does not exist or is not a directory.")
    root_path = os.path.join(path, _ROOT)
    if not os.path.isfile(root_path):
        raise ValueError(
            f"store {path!r} is not an rwmh store: it has no {_ROOT} (another kind of "
            "directory, or a store whose creation was interrupted before its first commit)."
        )
    try:
        with open(root_path, "rb") as handle:
            root = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"store {path!r}: its {_ROOT} is not readable JSON (truncated or corrupt): {error}"
        ) from None
    record = root.get("attributes", {}).get("rwmh") if isinstance(root, dict) else None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"store {path!r} is a directory but not an rwmh store.")
    if record.get("version") != VERSION:
        raise ValueError(
            f"store {path!r} has format version {record.get('version')!r}; this rwmh reads "
            f"version {VERSION}."
        )
    metadata = root.get("consolidated_metadata", {}).get("metadata")
    if not isinstance(metadata, dict) or "posterior" not in metadata:
        raise ValueError(f"store {path!r} is inconsistent: its root has no consolidated metadata.")
    return root


def open_inference_data(path):
    """The store at ``path`` as ArviZ data, read lazily, at its last commit: an
    ``InferenceData`` with ArviZ 0.x (``arviz.from_datatree`` of ``xarray.open_datatree``, as
    ArviZ 0.x's own ``from_zarr`` asks with Zarr 3), the ``xarray.DataTree`` with ArviZ 1.x."""
    import xarray

    from rwmh.arviz import arviz_major_version, import_arviz

    _read_root(os.fspath(path))
    tree = xarray.open_datatree(os.fspath(path), engine="zarr")
    arviz = import_arviz()
    if arviz_major_version(arviz) >= 1:
        return tree
    return arviz.from_datatree(tree)


def lengths(run: Run) -> dict:
    """The chunk lengths of a store for ``run`` (``chunk_size``, or 20 chunks a phase)."""
    settings = run.settings
    if settings.auto_warmup:
        from rwmh import warmup_length

        warmup = warmup_length.CHUNK
    else:
        warmup = settings.chunk_size or max(1, -(-settings.num_warmup // 20))
    sampling = settings.chunk_size or max(1, -(-settings.num_samples // 20))
    return {"warmup": int(warmup), "sampling": int(sampling)}
