"""Ctrl-C while ``import rwmh`` runs (it imports JAX, NumPyro and ArviZ: seconds).

A ``KeyboardInterrupt`` raised inside those imports does not reach the caller as one: inside
jaxlib's extension modules it became ``ImportError: Encountered an error while initializing
the extension``, or it was lost and the program went on. :func:`deferred` holds the first
Ctrl-C until the imports are done and raises it there; in the ``rwmh`` command, whose
:func:`rwmh.cli.main` cannot catch what its own import raises, it ends the process as
``main`` does (one line, exit status 130).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

#: The ``rwmh`` command's subcommands (:func:`rwmh.cli.build_parser`).
COMMANDS = ("regress",)


def _command_line_arguments() -> list[str] | None:
    """The arguments of the ``rwmh`` command when this process is it (``rwmh ...`` or
    ``python -m rwmh.cli ...``), else None."""
    argv = list(getattr(sys, "orig_argv", ()))
    for i in range(len(argv) - 1):
        if argv[i : i + 2] == ["-m", "rwmh.cli"]:
            return argv[i + 2 :]
    if sys.argv and os.path.basename(sys.argv[0]) in ("rwmh", "rwmh.exe"):
        return sys.argv[1:]
    return None


def _interrupted() -> None:
    """Ctrl-C held during the imports: raise it, or end the ``rwmh`` command as it would."""
    arguments = _command_line_arguments()
    if arguments is None:
        raise KeyboardInterrupt
    command = next((a for a in arguments if not a.startswith("-")), None)
    prog = f"rwmh {command}" if command in COMMANDS else "rwmh"
    print(f"{prog}: interrupted", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)  # as rwmh.cli.command_line after Ctrl-C


@contextlib.contextmanager
def deferred():
    """Hold the first Ctrl-C until the block ends, then raise ``KeyboardInterrupt``; a second
    raises at once. Only from the main thread and over Python's own handler (elsewhere Ctrl-C
    is left alone)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    presses = []

    def handler(signum, frame):
        presses.append(signum)
        if len(presses) > 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if presses:
        _interrupted()
