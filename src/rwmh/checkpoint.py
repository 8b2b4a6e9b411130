"""Checkpoint files of :func:`rwmh.sample`: atomic writes, and reads that never run code.

A checkpoint is a NumPy ``.npz`` archive (a zip of ``.npy`` arrays). Loading uses
``np.load(..., allow_pickle=False)``, so a file from an untrusted source can at worst fail to
load: it cannot execute code, as a pickle could. Besides plain numeric arrays the archive holds
one entry, ``"metadata"``, a JSON string (a 0-d unicode array) with the run's settings, its
phase and step, and the structure of the position PyTree.

Writes are atomic: the archive is written to a temporary file in the destination's directory,
flushed and ``fsync``-ed, then moved over the destination with ``os.replace``. A process killed at
any moment therefore leaves either the previous checkpoint or the new one, never half a file.

This module knows the file format only; :func:`rwmh.sample` decides what goes in it and
:func:`rwmh.resume` continues a run from it.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import Any

import numpy as np

__all__ = ["FORMAT", "VERSION", "check_path", "read", "write", "encode_tree", "decode_tree"]

#: Value of ``metadata["format"]``, which tells an rwmh checkpoint from any other ``.npz``.
FORMAT = "rwmh-checkpoint"
#: Version of the layout; a reader refuses versions it does not know.
VERSION = 1


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
    if os.path.isdir(path):
        raise ValueError(f"checkpoint must be a file path; {path!r} is a directory.")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"checkpoint: directory {directory!r} of {path!r} does not exist.")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".rwmh-probe-"):
            pass
    except OSError as error:
        raise ValueError(
            f"checkpoint: cannot write in directory {directory!r} of {path!r}: {error}."
        ) from None
    return path


def write(path: str, metadata: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` and the JSON ``metadata`` to ``path`` atomically.

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
    directory = os.path.dirname(os.path.abspath(path))
    handle = tempfile.NamedTemporaryFile(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            np.savez(handle, metadata=np.array(json.dumps(metadata)), **arrays)
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
    # The rename itself is durable only once the directory entry is on disk.
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
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("it holds a single .npy array, not an .npz archive")
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as error:
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

    Supported containers are dicts with string keys, lists and tuples, nested freely; any
    other node (a NamedTuple, a registered class) raises ``TypeError``, because rebuilding it
    would need to import and call arbitrary code, which checkpoints never do.
    """
    leaves: list = []

    def encode(node):
        if isinstance(node, dict):
            if not all(isinstance(key, str) for key in node):
                raise TypeError("checkpoint: position dicts must have string keys.")
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
    if kind in ("list", "tuple"):
        items = [decode_tree(item, leaves) for item in content]
        return items if kind == "list" else tuple(items)
    raise ValueError(f"unknown node {kind!r} in the position structure")
