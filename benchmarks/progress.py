"""What the progress bar costs: ``rwmh.sample`` with the bar shown vs. hidden, one process.

The bar is shown by pointing ``sys.stderr`` at a pseudo-terminal (what a user's terminal is),
so the measured path is exactly the one users get: the driver cuts each phase into about 20
chunks, updates tqdm and the split R-hat between them, and compiles one extra chunk shape.
Both settings are compiled before timing (compilation is cached per log density and shape),
then timed in rounds, the order rotated each round, so that drift on a shared machine hits all
settings alike. It prints the medians, the median ratio within rounds, the same with the bar's
chunking but no bar (the bar's own cost), and the time measured inside the bar's methods.

Run ``python benchmarks/progress.py`` (``--help`` for the problem size). The target is a
``--dim``-dimensional Gaussian with a dense, ill-conditioned covariance.
"""

from __future__ import annotations

import argparse
import fcntl
import math
import os
import statistics
import struct
import subprocess
import sys
import termios
import time

import jax
import jax.numpy as jnp
import numpy as np

import rwmh
from rwmh.progress import DEFAULT_UPDATES, ProgressBar


def make_target(dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    precision = jnp.asarray(basis @ np.diag(np.logspace(-1, 1, dim)) @ basis.T, jnp.float32)

    def logdensity(x):
        return -0.5 * x @ precision @ x

    return logdensity


# The terminal's reader runs in its own process, as a real terminal does, so that it takes
# neither the GIL nor time from the process being measured; it prints how many bytes it got.
_READER = """
import os, sys
count = 0
while True:
    try:
        data = os.read(0, 65536)
    except OSError:  # EIO: every writer has closed the terminal
        break
    if not data:
        break
    count += len(data)
print(count)
"""


class PseudoTerminal:
    """``sys.stderr`` replaced by a 120-column pseudo-terminal whose output a child process
    reads and counts, so that a full terminal buffer never blocks the sampler."""

    def __enter__(self):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
        self.reader = subprocess.Popen(
            [sys.executable, "-c", _READER], stdin=master, stdout=subprocess.PIPE, text=True
        )
        os.close(master)  # the child holds it now
        self.file = os.fdopen(slave, "w")
        self.saved, sys.stderr = sys.stderr, self.file
        return self

    def __exit__(self, *exc):
        sys.stderr = self.saved
        self.file.close()
        self.received = int(self.reader.communicate(timeout=60)[0] or 0)


class BarClock:
    """Adds up the wall time spent inside the bar's methods: its whole host-side cost."""

    def __init__(self):
        self.seconds = 0.0
        self.saved = {}

    def __enter__(self):
        for name in ("start", "update", "close"):
            method = self.saved[name] = getattr(ProgressBar, name)
            setattr(ProgressBar, name, self._timed(method))
        return self

    def _timed(self, method):
        def timed(*args, **kwargs):
            # Wait for the device first, so that only the bar's own work is counted; this
            # stalls the device, which is why these runs are kept apart from the timed ones.
            jax.block_until_ready((args, kwargs))
            begin = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - begin

        return timed

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(ProgressBar, name, method)


def run_once(logdensity, start, args, setting: str, clock: BarClock) -> float:
    chunk_size = math.ceil(args.samples / DEFAULT_UPDATES) if setting == "off, chunked" else None
    begin = time.perf_counter()
    result = rwmh.sample(
        jax.random.key(args.seed),
        logdensity,
        start,
        num_samples=args.samples,
        num_warmup=args.warmup,
        progress_bar=setting == "on",
        chunk_size=chunk_size,
    )
    jax.block_until_ready(result.last_state)
    return time.perf_counter() - begin


SETTINGS = ("off", "off, chunked", "on")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--chains", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10000, help="warmup and sampling steps")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="10 dimensions, 500 steps, 1 run")
    args = parser.parse_args(argv)
    if args.quick:
        args.dim, args.steps, args.repeats = 10, 500, 1
    # Equal phases, so that one chunk_size reproduces the bar's chunking in both.
    args.warmup = args.samples = args.steps

    logdensity = make_target(args.dim)
    start = jax.random.normal(jax.random.key(1), (args.chains, args.dim))
    times = {setting: [] for setting in SETTINGS}
    clock = BarClock()
    with PseudoTerminal() as terminal:
        assert sys.stderr.isatty()
        for setting in SETTINGS:  # compile every chunking before timing
            run_once(logdensity, start, args, setting, clock)
        for round_ in range(args.repeats):
            # Rotate the order every round so that no setting always runs first or last.
            shift = round_ % len(SETTINGS)
            for setting in SETTINGS[shift:] + SETTINGS[:shift]:
                times[setting].append(run_once(logdensity, start, args, setting, clock))
        # Measured apart, so that the clock cannot slow the timed runs.
        with clock:
            clocked = [run_once(logdensity, start, args, "on", clock) for _ in range(3)]
    if terminal.received == 0:
        raise SystemExit("the bar wrote nothing to the terminal: the benchmark measured nothing")

    def paired(a, b):
        # Each run is paired with its neighbour of the same round: drift cancels in the ratio.
        return statistics.median(y / x for x, y in zip(times[a], times[b], strict=True)) - 1

    median = {setting: statistics.median(values) for setting, values in times.items()}
    inside = clock.seconds / len(clocked)
    print(
        f"rwmh.sample, {args.chains} chains x {args.dim}-d Gaussian, {args.warmup} warmup + "
        f"{args.samples} sampling steps, {args.repeats} repeats, interleaved "
        f"(jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPUs)"
    )
    print(f"{'progress bar':<24}{'median s':>10}{'min s':>10}")
    for setting in SETTINGS:
        label = {"on": "on (pseudo-terminal)", "off, chunked": "off, bar's chunks"}.get(
            setting, setting
        )
        print(f"{label:<24}{median[setting]:>10.3f}{min(times[setting]):>10.3f}")
    print(f"overhead, on vs off (ratio of medians):     {median['on'] / median['off'] - 1:+.2%}")
    print(f"overhead, on vs off (median paired ratio):  {paired('off', 'on'):+.2%}")
    print(f"bar alone, on vs off with the same chunks:  {paired('off, chunked', 'on'):+.2%}")
    print(
        f"time inside the bar's methods: {inside * 1e3:.1f} ms per run, "
        f"{inside / statistics.median(clocked):.2%} of the run "
        f"({2 * DEFAULT_UPDATES} updates, {terminal.received} bytes drawn)"
    )


if __name__ == "__main__":
    main()
