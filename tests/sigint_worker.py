"""Child process for the Ctrl-C test: runs of ``rwmh.sample`` that the parent interrupts.

Usage::

    python sigint_worker.py CHUNK_SIZE NUM_RUNS    # CHUNK_SIZE: an int, or "none"

The child first makes an uninterrupted reference run and prints ``ready SECONDS`` (how long a
second, compiled run takes). Then, ``NUM_RUNS`` times, it prints ``start I``, runs the same
``rwmh.sample`` call until the parent's SIGINT stops it, and prints ``result I JSON``.

What "computed before the signal" means is measured, not assumed: the log density counts its
evaluations in a host callback, and a thread woken by ``signal.set_wakeup_fd`` (written by
the C-level handler the moment the signal arrives, before Python gets to run any handler)
reads that count. A step's log density is evaluated only after the previous step finished,
so ``count`` evaluations mean at least ``(count - initial) // chains - 1`` complete steps.
The JSON says how many steps that is, how many the result holds, and whether those are a
bit-identical prefix of the reference run.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import threading
import time
import warnings

import numpy as np

NUM_CHAINS = 4
NUM_WARMUP = 3000
NUM_SAMPLES = 3000

_count = [0]


def _counted(x):
    _count[0] += 1 if x.ndim == 1 else x.shape[0]
    return np.zeros(x.shape[:-1], np.float32)


def logdensity(x):
    import jax
    import jax.numpy as jnp

    zero = jax.pure_callback(
        _counted, jax.ShapeDtypeStruct((), jnp.float32), x, vmap_method="broadcast_all"
    )
    return -0.5 * jnp.sum(x**2 / jnp.array([1.0, 4.0])) + zero


def _run(chunk_size):
    import jax
    import jax.numpy as jnp

    import rwmh

    positions = jnp.linspace(-1.0, 1.0, NUM_CHAINS * 2).reshape(NUM_CHAINS, 2)
    return rwmh.sample(
        jax.random.key(3),
        logdensity,
        positions,
        NUM_SAMPLES,
        NUM_WARMUP,
        chunk_size=chunk_size,
        progress_bar=False,
    )


def _watch_signals(read_fd, seen):
    """Note the evaluation count the moment each signal arrives."""
    while True:
        select.select([read_fd], [], [])
        if os.read(read_fd, 64):
            seen.append(_count[0])


def _compare(result, reference, initial, count_at_signal):
    computed = max(0, (count_at_signal - initial) // NUM_CHAINS - 1)
    # No warmup information when the signal came before the first chunk (while compiling).
    info = result.warmup_info
    warmup_rows = 0 if info is None else int(np.shape(info.acceptance_rate)[0])
    returned = warmup_rows + result.num_draws
    same = True
    for name in ("acceptance_rate", "step_size", "num_restarted") if warmup_rows else ():
        got = np.asarray(getattr(result.warmup_info, name))
        want = np.asarray(getattr(reference.warmup_info, name))[:warmup_rows]
        same &= bool(np.array_equal(got, want))
    n = result.num_draws
    same &= bool(np.array_equal(result.positions, reference.positions[:, :n]))
    for name in ("lp", "acceptance_rate", "is_accepted"):
        same &= bool(np.array_equal(result.stats[name], reference.stats[name][:, :n]))
    return {
        "computed_steps": int(computed),
        "returned_steps": int(returned),
        "returned_draws": n,
        "identical_prefix": same,
        "interrupted": bool(result.extra.get("interrupted", False)),
    }


def main(chunk_size: str, num_runs: str) -> None:
    warnings.simplefilter("ignore")
    chunk_size = None if chunk_size == "none" else int(chunk_size)
    reference = _run(chunk_size)
    total_steps = NUM_WARMUP + NUM_SAMPLES
    start = _count[0]
    began = time.perf_counter()
    _run(chunk_size)
    seconds = time.perf_counter() - began
    initial = _count[0] - start - NUM_CHAINS * total_steps
    assert initial == NUM_CHAINS, initial

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    seen = []
    threading.Thread(target=_watch_signals, args=(read_fd, seen), daemon=True).start()
    print(f"ready {seconds}", flush=True)
    for index in range(int(num_runs)):
        _count[0] = 0
        seen.clear()
        print(f"start {index}", flush=True)
        result = None
        try:
            result = _run(chunk_size)
            if not result.extra.get("interrupted"):
                while True:  # finished first: wait for the signal that is on its way
                    time.sleep(0.01)
        except KeyboardInterrupt:
            pass
        while not seen:
            time.sleep(0.001)
        if result is None:
            # Legitimate only before the driver started: nothing was computed then.
            steps = max(0, (seen[0] - initial) // NUM_CHAINS - 1)
            report = {"escaped": True, "computed_steps": int(steps)}
        else:
            report = _compare(result, reference, initial, seen[0])
        print(f"result {index} {json.dumps(report)}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
