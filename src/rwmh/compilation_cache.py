"""JAX's persistent compilation cache, on in the user's cache directory.

A short run of rwmh spends most of its time compiling: ``rwmh regress`` on its 100 built-in
points compiles for several seconds and samples for well under one. JAX can keep compiled
programs on disk and load them in a later process instead of compiling them again (the
persistent compilation cache, https://docs.jax.dev/en/latest/persistent_compilation_cache.html).
It is off by default; :func:`enable_compilation_cache` turns it on, and the ``rwmh`` command
line does so unless ``--no-compilation-cache`` is given or the environment variable
``RWMH_NO_COMPILATION_CACHE`` is set (to anything but ``""`` or ``"0"``).

Two settings matter beyond the directory. JAX only writes programs that took at least
``jax_persistent_cache_min_compile_time_secs`` (1 s by default) to compile; rwmh's programs
take well under a second each on small models, so the default would cache almost none of them,
and the threshold is lowered to :data:`MIN_COMPILE_TIME_SECS` (every program is written). And
a cache entry is keyed on the program, the compiler options, the devices and the JAX/jaxlib
versions, so an upgrade or a new machine simply misses and compiles again; stale entries are
never used. Programs with host callbacks (``jax.debug.print``, ``jax.pure_callback``) are never
written, by JAX's rule.

The cache is trusted code: anyone who can write to the directory can make this user's JAX
processes run what they like. The default directory is in the user's own cache directory
(``$XDG_CACHE_HOME/rwmh/jax``, ``~/.cache/rwmh/jax`` without it; ``~/Library/Caches/rwmh/jax``
on macOS; ``%LOCALAPPDATA%\\rwmh\\jax`` on Windows); do not point it at a shared directory.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

__all__ = [
    "DISABLE_ENV_VAR",
    "MIN_COMPILE_TIME_SECS",
    "default_cache_dir",
    "enable_compilation_cache",
]

#: Setting this environment variable (to anything but ``""`` or ``"0"``) keeps the command line
#: from enabling the cache.
DISABLE_ENV_VAR = "RWMH_NO_COMPILATION_CACHE"
#: Programs that compiled faster than this are not written to the cache. rwmh writes them all:
#: loading an entry (a file read and a deserialisation) is never slower than compiling it, and a
#: threshold near the compile times of the small programs would make what is cached depend on
#: how busy the machine was.
MIN_COMPILE_TIME_SECS = 0.0


def default_cache_dir() -> str:
    """The directory rwmh keeps JAX's compiled programs in, by platform convention.

    ``$XDG_CACHE_HOME/rwmh/jax`` (``~/.cache/rwmh/jax`` when ``XDG_CACHE_HOME`` is unset or
    not absolute) on Linux and other Unixes, ``~/Library/Caches/rwmh/jax`` on macOS and
    ``%LOCALAPPDATA%\\rwmh\\jax`` on Windows.

    Examples
    --------
    >>> from rwmh.compilation_cache import default_cache_dir
    >>> default_cache_dir().endswith(("rwmh/jax", "rwmh\\\\jax"))
    True
    """
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(
            os.path.expanduser("~"), "AppData", "Local"
        )
    elif sys.platform == "darwin":
        base = os.path.join(os.path.expanduser("~"), "Library", "Caches")
    else:
        # The XDG Base Directory specification: a relative value is invalid and is ignored.
        base = os.environ.get("XDG_CACHE_HOME", "")
        if not os.path.isabs(base):
            base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rwmh", "jax")


def _writable_directory(path: str) -> str | None:
    """Create ``path`` if needed and prove it writable; the reason why not, or None."""
    try:
        os.makedirs(path, exist_ok=True)
        # os.access does not see read-only mounts or some ACLs; a real file does.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


def enable_compilation_cache(
    path: str | os.PathLike | None = None,
    *,
    min_compile_time_secs: float = MIN_COMPILE_TIME_SECS,
) -> str | None:
    """Keep JAX's compiled programs on disk, so that later processes load instead of compiling.

    Call it once, before the first compilation of the programs to be cached (programs compiled
    earlier in the process are not written). It changes JAX's global configuration, for every
    JAX program in the process, not only rwmh's.

    Parameters
    ----------
    path
        The cache directory, created if missing. None: the directory JAX is already configured
        with (``JAX_COMPILATION_CACHE_DIR`` or ``jax_compilation_cache_dir``), else
        :func:`default_cache_dir`.
    min_compile_time_secs
        Programs that compile faster than this are not written. JAX's default, 1 s, would skip
        every program of a small model.

    Returns
    -------
    The directory in use, or None when it cannot be created or written: then a
    ``RuntimeWarning`` says why, and JAX runs without the cache, as it would have anyway.

    Examples
    --------
    >>> import os, tempfile
    >>> from rwmh.compilation_cache import enable_compilation_cache
    >>> path = enable_compilation_cache(os.path.join(tempfile.mkdtemp(), "jax"))
    >>> os.path.isdir(path)
    True
    """
    path, problem = _enable(path, min_compile_time_secs)
    if problem is not None:
        warnings.warn(
            f"rwmh: JAX's compilation cache stays off: {problem}; compiled programs will not "
            "be reused by later runs.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return path


def _enable(path, min_compile_time_secs: float) -> tuple[str, str | None]:
    """Turn the cache on in ``path``; ``(path, None)``, or ``(path, why not)`` leaving it off."""
    import jax

    if path is None:
        path = jax.config.jax_compilation_cache_dir or default_cache_dir()
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    problem = _writable_directory(path)
    if problem is not None:
        return path, f"cannot write to {path!r} ({problem})"
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    return path, None


def disabled_by_environment() -> bool:
    """Whether ``RWMH_NO_COMPILATION_CACHE`` asks the command line to leave the cache off."""
    return os.environ.get(DISABLE_ENV_VAR, "") not in ("", "0")


def enable_for_command_line(prog: str) -> str | None:
    """:func:`enable_compilation_cache` for the ``rwmh`` command, unless the environment
    variable says not to; a failure to enable it is one warning line on stderr."""
    if disabled_by_environment():
        return None
    path, problem = _enable(None, MIN_COMPILE_TIME_SECS)
    if problem is not None:
        print(
            f"{prog}: warning: JAX's compilation cache stays off: {problem}; set "
            f"{DISABLE_ENV_VAR}=1 or pass --no-compilation-cache to silence this",
            file=sys.stderr,
        )
        return None
    return path
