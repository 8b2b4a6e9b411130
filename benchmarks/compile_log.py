"""Every program XLA compiles on a first call, how long it took, and which line asked for it.

Run ``python benchmarks/compile_log.py sample`` (the first ``rwmh.sample`` call with its
defaults, 4 chains of a 3-d Gaussian), ``... blackjax`` (BlackJAX's first call of a compiled
loop of as many vmapped ``normal_random_walk`` steps on the same Gaussian), or ``... regress``
(``rwmh regress`` with its defaults, without the persistent cache). Each runs in this fresh
process, with no compilation cache.

For every call of XLA's compiler it prints the program's name, the seconds XLA took, the
shapes of its arguments where JAX's compile log names them, and the innermost stack frame in
rwmh (or in this script, for the user's side) that led to it. The totals at the end separate
XLA's time from the call's wall time; what remains is tracing, lowering to MLIR, dispatch and
running. It relies on a private hook (``jax._src.compiler.compile_or_get_cached``), so it may
need updating with JAX; it prints, and asserts nothing.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import traceback

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
os.environ["RWMH_NO_COMPILATION_CACHE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax._src import compiler  # noqa: E402

NUM_CHAINS, NUM_STEPS = 4, 1000
HERE = os.path.abspath(__file__)

RECORDS: list[dict] = []
#: Index in RECORDS where the timed call began (programs before it came from imports and data).
TIMED_FROM = [0]
LOWERING = {"seconds": 0.0, "count": 0}
SHAPES: dict[str, str] = {}


def _where() -> str:
    """The innermost frame in rwmh's source or in this script, as ``file:line (function)``."""
    frames = traceback.extract_stack()[:-3]
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if f"{os.sep}rwmh{os.sep}" in path and "site-packages" not in path.split("rwmh")[0][-15:]:
            return f"rwmh/{path.split(os.sep + 'rwmh' + os.sep)[-1]}:{frame.lineno} ({frame.name})"
        if path == HERE:
            return f"benchmarks/compile_log.py:{frame.lineno} ({frame.name})"
    for frame in reversed(frames):
        if "jax" not in frame.filename:
            return f"{os.path.basename(frame.filename)}:{frame.lineno} ({frame.name})"
    return "?"


_original = compiler.compile_or_get_cached


def _recording(backend, computation, *args, **kwargs):
    name = str(computation.operation.attributes["sym_name"]).strip('"')
    where = _where()
    begin = time.perf_counter()
    executable = _original(backend, computation, *args, **kwargs)
    RECORDS.append(
        {
            "name": name,
            "seconds": time.perf_counter() - begin,
            "where": where,
            "shapes": SHAPES.pop(name, ""),
        }
    )
    return executable


class _LogHandler(logging.Handler):
    """Picks the argument shapes and the lowering times out of JAX's compile log."""

    def emit(self, record):
        message = record.getMessage()
        match = re.match(
            r"Compiling (\S+) with global shapes and types \((.*)\)\. Argument", message
        )
        if match:
            shapes = re.sub(r"ShapedArray\(|, weak_type=True|\)", "", match.group(2))
            SHAPES[match.group(1).replace("(", "_").rstrip(")")] = shapes[:70]
        match = re.match(r"Finished jaxpr to MLIR module conversion .* in ([0-9.e-]+) sec", message)
        if match:
            LOWERING["seconds"] += float(match.group(1))
            LOWERING["count"] += 1


def _gaussian(x):
    return -0.5 * jnp.sum(x**2 / jnp.array([1.0, 4.0, 0.25]))


def _begin() -> float:
    TIMED_FROM[0] = len(RECORDS)
    LOWERING.update(seconds=0.0, count=0)
    return time.perf_counter()


def run_sample():
    import rwmh

    positions = np.random.default_rng(0).normal(size=(NUM_CHAINS, 3)).astype(np.float32)
    key = jax.random.key(0)
    begin = _begin()
    result = rwmh.sample(key, _gaussian, positions, progress_bar=False)
    np.asarray(result.positions)
    return time.perf_counter() - begin


def run_blackjax():
    import blackjax

    positions = np.random.default_rng(0).normal(size=(NUM_CHAINS, 3)).astype(np.float32)
    key = jax.random.key(0)
    begin = _begin()

    @jax.jit
    def run(key, positions):
        algorithm = blackjax.normal_random_walk(_gaussian, 0.5 * jnp.ones(3))
        states = jax.vmap(algorithm.init)(positions)

        def one_step(states, key):
            states, info = jax.vmap(algorithm.step)(jax.random.split(key, NUM_CHAINS), states)
            return states, (states.position, info.acceptance_rate)

        _, (draws, acceptance) = jax.lax.scan(one_step, states, jax.random.split(key, 2000))
        return draws, acceptance

    np.asarray(run(key, positions)[0])
    return time.perf_counter() - begin


def run_regress():
    from rwmh.cli import main

    begin = _begin()
    status = main(["regress"])
    assert status == 0
    return time.perf_counter() - begin


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else "sample"
    handler = _LogHandler()
    for name in ("jax._src.interpreters.pxla", "jax._src.dispatch", "jax._src.compiler"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
    jax.config.update("jax_log_compiles", True)
    # Warm up the compiler itself (LLVM, the CPU client) on something neither side uses, so
    # that the first program below is not charged for it.
    jax.jit(lambda a: a + 1)(np.float32(0)).block_until_ready()
    RECORDS.clear()
    LOWERING.update(seconds=0.0, count=0)
    compiler.compile_or_get_cached = _recording
    wall = {"sample": run_sample, "blackjax": run_blackjax, "regress": run_regress}[what]()
    compiler.compile_or_get_cached = _original

    timed = RECORDS[TIMED_FROM[0] :]
    print(
        f"\n{what}: {len(timed)} programs compiled in the timed call, {TIMED_FROM[0]} before it "
        f"(imports, data); jax {jax.__version__}"
    )
    print(f"{'#':>3} {'XLA s':>7}  {'program':<28} {'asked for at':<58} argument shapes")
    for number, record in enumerate(RECORDS, 1 - TIMED_FROM[0]):
        print(
            f"{number if number > 0 else '-':>3} {record['seconds']:7.3f}  "
            f"{record['name'][:28]:<28} {record['where'][:58]:<58} {record['shapes']}"
        )
    total = sum(record["seconds"] for record in timed)
    print(
        f"\nwall time of the call {wall:.2f} s; XLA compilation {total:.2f} s in "
        f"{len(timed)} programs; lowering to MLIR {LOWERING['seconds']:.2f} s "
        f"({LOWERING['count']} modules); the rest (tracing, dispatch, running) "
        f"{wall - total - LOWERING['seconds']:.2f} s"
    )


if __name__ == "__main__":
    main()
