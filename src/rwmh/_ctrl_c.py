"""Deferred Ctrl-C: the first press is held until a safe point, a second raises at once.

A ``KeyboardInterrupt`` raised inside JAX does not reach the caller as one: inside jaxlib's
imports it became ``ImportError: Encountered an error while initializing the extension``, or
it was lost and the program went on; raised in the wait for an XLA compilation it abandons
the wait, not the compilation. So ``import rwmh``, :func:`rwmh.sample` and ``rwmh regress``
hold it (:func:`deferring`) and act on it where nothing is in flight (:func:`presses`).
Blocks nest: the outermost one installs the handler and counts the presses for all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

#: The ``rwmh`` command's subcommands (:func:`rwmh.cli.build_parser`).
COMMANDS = ("regress",)

_state = {"depth": 0, "presses": 0, "previous": None}


def _handler(signum, frame):
    _state["presses"] += 1
    if _state["presses"] > 1:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferring():
    """Hold Ctrl-C inside the block (see :func:`presses`). Only from the main thread and over
    Python's own handler: elsewhere Ctrl-C is left alone and raises where it lands.

    Yields a dict whose ``"presses"``, once the block has ended, is how many presses it held
    (counted until the previous handler was back, so none falls in between), for a caller
    whose last safe point came before the block's end: a press after it is not lost."""
    held = {"presses": 0}
    if _state["depth"] == 0:
        if (
            threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        ):
            yield held
            return
        _state["presses"] = 0
        _state["previous"] = signal.signal(signal.SIGINT, _handler)
    _state["depth"] += 1
    try:
        yield held
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0:
            signal.signal(signal.SIGINT, _state["previous"])
        held["presses"] = _state["presses"]


def presses() -> int:
    """Ctrl-C presses held by the enclosing :func:`deferring` blocks (0 outside them)."""
    return _state["presses"] if _state["depth"] else 0


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


@contextlib.contextmanager
def deferred_import():
    """For ``import rwmh``: Ctrl-C held until the imports are done, then raised there; in
    the ``rwmh`` command, whose :func:`rwmh.cli.main` cannot catch what its own import
    raises, the process ends as ``main`` ends it after Ctrl-C (one line, exit status 130)."""
    with deferring():
        yield
        pressed = presses()
    if not pressed:
        return
    arguments = _command_line_arguments()
    if arguments is None:
        raise KeyboardInterrupt
    command = next((a for a in arguments if not a.startswith("-")), None)
    prog = f"rwmh {command}" if command in COMMANDS else "rwmh"
    print(f"{prog}: interrupted", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)  # as rwmh.cli.command_line after Ctrl-C
