"""``store=``: host memory and the cost of a checkpointed chunk as a run grows.

Run ``python benchmarks/store.py`` (``--quick`` for a CI-size run of a minute or so).
``--dir`` is where the stores go (default: a temporary directory; they are removed after).

* Memory: ``rwmh.sample(..., num_warmup=0, chunk_size=CHUNK, store=...)`` of ``CHAINS`` chains
  in ``DIM`` dimensions (float32) for ``N`` and ``10 N`` draws, each in its own child process
  whose data segment is capped with ``RLIMIT_DATA`` at ``--limit-gb`` (default 2 GiB; an
  allocation beyond it raises ``MemoryError``): the larger run's draws (4.2 GB in the full
  run) do not fit in it. Each child prints its peak resident set size (``ru_maxrss``, which on
  CPU also counts the "device" buffers); flat means the 10x run peaks where the 1x run does.
* Chunk cost: a run of 100 chunks with ``store=`` and the same run with ``checkpoint=`` (an
  ``.npz`` holding every draw so far, rewritten after each chunk). Each child times what the
  run spends writing after every chunk (``Store.write_draws`` + ``Store.commit``;
  ``checkpoint.save``) by wrapping those functions, and the wall time between the ends of
  successive chunks; the first and last chunks, and the mean of the first and last ten, are
  printed.

The benchmark prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

FULL = dict(chains=131072, dim=8, draws=100, chunk=10)
QUICK = dict(chains=4096, dim=8, draws=100, chunk=10)
CHUNK_RUN = dict(chains=2048, dim=16, chunks=100, chunk=10)
QUICK_CHUNK_RUN = dict(chains=256, dim=8, chunks=100, chunk=5)


def _logdensity(x):
    import jax.numpy as jnp

    return -0.5 * jnp.sum(x**2)


def memory_child(path, chains, dim, draws, chunk, limit_gb):
    limit = int(float(limit_gb) * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    import jax

    import rwmh

    start = time.perf_counter()
    result = rwmh.sample(
        jax.random.key(0),
        _logdensity,
        np.zeros((int(chains), int(dim)), np.float32),
        num_samples=int(draws),
        num_warmup=0,
        step_size=1.0,
        chunk_size=int(chunk),
        store=path,
        progress_bar=False,
    )
    seconds = time.perf_counter() - start
    assert result.positions.shape == (int(chains), int(draws), int(dim))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"max_rss_kb": peak_kb, "seconds": seconds}))


def chunks_child(path, kind, chains, dim, chunks, chunk):
    import jax

    import rwmh
    from rwmh import checkpoint
    from rwmh import store as store_file

    writing, ends = [], []

    def timed(function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                writing.append(time.perf_counter() - start)
                if function.__name__ in ("commit", "save"):
                    ends.append(time.perf_counter())

        wrapper.__name__ = function.__name__
        return wrapper

    if kind == "store":
        store_file.Store.write_draws = timed(store_file.Store.write_draws)
        store_file.Store.commit = timed(store_file.Store.commit)
        target = dict(store=path)
    else:
        checkpoint.save = timed(checkpoint.save)
        target = dict(checkpoint=path)
    rwmh.sample(
        jax.random.key(0),
        _logdensity,
        np.zeros((int(chains), int(dim)), np.float32),
        num_samples=int(chunks) * int(chunk),
        num_warmup=0,
        step_size=1.0,
        chunk_size=int(chunk),
        progress_bar=False,
        **target,
    )
    if kind == "store":
        # write_draws then commit, per chunk (the store's creation commits once first).
        writing = writing[1:]
        per_chunk = [a + b for a, b in zip(writing[0::2], writing[1::2], strict=True)]
        ends = ends[1:]
    else:
        per_chunk = writing
    intervals = np.diff(ends).tolist()
    print(json.dumps({"write_s": per_chunk, "interval_s": intervals}))


def _child(*arguments):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    output = subprocess.run(
        [sys.executable, __file__, *map(str, arguments)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if output.returncode != 0:
        return {"error": output.stderr.strip().splitlines()[-1:]}
    return json.loads(output.stdout.strip().splitlines()[-1])


def _size_gb(path) -> float:
    total = 0
    for directory, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(directory, name)) for name in files)
    return total / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--limit-gb", type=float, default=2.0)
    options = parser.parse_args()
    memory_run = QUICK if options.quick else FULL
    chunk_run = QUICK_CHUNK_RUN if options.quick else CHUNK_RUN
    base = tempfile.mkdtemp(prefix="rwmh-store-bench-", dir=options.dir)
    try:
        print(
            f"memory: {memory_run['chains']} chains x {memory_run['dim']} float32, chunks of "
            f"{memory_run['chunk']} draws, RLIMIT_DATA {options.limit_gb} GiB"
        )
        for factor in (1, 10):
            draws = memory_run["draws"] * factor
            path = os.path.join(base, f"memory{factor}.zarr")
            figures = _child(
                "memory",
                path,
                memory_run["chains"],
                memory_run["dim"],
                draws,
                memory_run["chunk"],
                options.limit_gb,
            )
            gb = memory_run["chains"] * memory_run["dim"] * draws * 4 / 1e9
            if "error" in figures:
                print(f"  {draws:>6} draws ({gb:.2f} GB of draws): failed: {figures['error']}")
            else:
                print(
                    f"  {draws:>6} draws ({gb:.2f} GB of draws, store {_size_gb(path):.2f} GB on "
                    f"disk): peak RSS {figures['max_rss_kb'] / 2**20:.2f} GiB, "
                    f"{figures['seconds']:.1f} s"
                )
            shutil.rmtree(path, ignore_errors=True)
        total = chunk_run["chains"] * chunk_run["dim"] * chunk_run["chunks"] * chunk_run["chunk"]
        print(
            f"chunk cost: {chunk_run['chunks']} chunks of {chunk_run['chunk']} draws, "
            f"{chunk_run['chains']} chains x {chunk_run['dim']} float32 ({total * 4 / 1e6:.0f} MB "
            "of draws in all)"
        )
        for kind in ("store", "npz"):
            path = os.path.join(base, "run.zarr" if kind == "store" else "run.npz")
            figures = _child(
                "chunks",
                path,
                kind,
                chunk_run["chains"],
                chunk_run["dim"],
                chunk_run["chunks"],
                chunk_run["chunk"],
            )
            if "error" in figures:
                print(f"  {kind}: failed: {figures['error']}")
                continue
            write, interval = np.array(figures["write_s"]), np.array(figures["interval_s"])
            print(
                f"  {kind:>5}: write per chunk first {write[0] * 1e3:.1f} ms, last "
                f"{write[-1] * 1e3:.1f} ms (mean of first 10 {write[:10].mean() * 1e3:.1f} ms, "
                f"last 10 {write[-10:].mean() * 1e3:.1f} ms); chunk to chunk first "
                f"{interval[0] * 1e3:.1f} ms, last {interval[-1] * 1e3:.1f} ms; "
                f"total writing {write.sum():.2f} s"
            )
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.unlink(path)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "memory":
        memory_child(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "chunks":
        chunks_child(*sys.argv[2:])
    else:
        main()
