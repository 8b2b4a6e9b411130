"""Throughput and peak memory of rwmh.sample as the number of chains grows.

Run ``python benchmarks/scale.py`` (about two to four minutes on two CPU cores). Every
configuration runs in its own child process, because peak memory (``ru_maxrss``) is per
process and never goes down, and because the cache of compiled code would blur the timings.

* Throughput: chain-steps per second (chains x steps / wall time of the fastest of three
  compiled calls, including the copy of the draws to the host) on the linear-regression log
  density with 100 data points, from 4 to 65,536 chains, without warmup (warmup's cost is a
  few pooled sums per step on top of the same kernel).
* Memory: peak resident set size of the process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``,
  host memory; on CPU the "device" buffers are host memory too, and ``memory_stats()`` of a
  CPU device is None, so there is no separate device figure) for one run with and without
  ``chunk_size``. The draws kept on the host are the same in both; what chunking removes is
  the device-side copy of the whole run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

NUM_DATA = 100
THROUGHPUT = [(4, 4000), (64, 3000), (1024, 600), (16384, 60), (65536, 20)]
#: Timed calls per configuration; the fastest counts (the machine is shared, and slower calls
#: measure the neighbours).
REPEATS = 3
MEMORY = dict(num_chains=16384, num_samples=1000)
MEMORY_CHUNK = 50


def _logdensity_and_start(num_chains):
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x = rng.normal(size=NUM_DATA).astype(np.float32)
    y = (1.0 + 2.0 * x + 0.5 * rng.normal(size=NUM_DATA)).astype(np.float32)

    def logdensity(position):
        intercept, slope, log_sigma = position[0], position[1], position[2]
        residual = (y - intercept - slope * x) / jnp.exp(log_sigma)
        loglik = -0.5 * jnp.sum(residual**2) - NUM_DATA * log_sigma
        return loglik - 0.5 * (intercept**2 + slope**2) / 100.0 - 0.5 * log_sigma**2

    start = np.tile(np.array([1.0, 2.0, np.log(0.5)], np.float32), (num_chains, 1))
    return logdensity, start


def _one(config: dict) -> dict:
    """Run one configuration in this process; return its figures."""
    import jax

    import rwmh

    logdensity, start = _logdensity_and_start(config["num_chains"])
    kwargs = dict(
        num_samples=config["num_samples"],
        num_warmup=0,
        step_size=0.05,
        proposal_cov=np.array([1.0, 1.0, 0.1], np.float32),
        chunk_size=config.get("chunk_size"),
        progress_bar=False,
    )
    if config["kind"] == "throughput":
        # The first call compiles; the later ones are timed.
        rwmh.sample(jax.random.key(0), logdensity, start, **kwargs)
        seconds = float("inf")
        for repeat in range(REPEATS):
            begin = time.perf_counter()
            rwmh.sample(jax.random.key(1 + repeat), logdensity, start, **kwargs)
            seconds = min(seconds, time.perf_counter() - begin)
        steps = config["num_chains"] * config["num_samples"]
        return {"seconds": seconds, "chain_steps_per_s": steps / seconds}
    result = rwmh.sample(jax.random.key(0), logdensity, start, **kwargs)
    draws_mb = sum(x.nbytes for x in jax.tree.leaves((result.positions, result.stats))) / 2**20
    device_stats = jax.devices()[0].memory_stats()
    return {
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "draws_mb": draws_mb,
        "device_peak_mb": None
        if not device_stats
        else device_stats.get("peak_bytes_in_use", 0) / 2**20,
    }


def _in_child(config: dict) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    import jax

    devices = jax.devices()
    print(
        f"jax {jax.__version__}; devices: {len(devices)} x {devices[0].platform} "
        f"({devices[0].device_kind}); {os.cpu_count()} CPU cores"
    )
    if not any(d.platform == "gpu" for d in devices):
        print("No GPU on this machine: every figure below is CPU-only.")
    print("\nThroughput, regression log density (100 data points), no warmup, float32")
    print(f"{'chains':>8} {'steps':>6} {'seconds':>8} {'chain-steps/s':>14} {'vs 4 chains':>12}")
    baseline = None
    for num_chains, num_samples in THROUGHPUT:
        figures = _in_child(
            {"kind": "throughput", "num_chains": num_chains, "num_samples": num_samples}
        )
        rate = figures["chain_steps_per_s"]
        baseline = baseline or rate
        print(
            f"{num_chains:>8} {num_samples:>6} {figures['seconds']:>8.2f} {rate:>14.3g} "
            f"{rate / baseline:>11.1f}x"
        )

    print(
        f"\nPeak memory, {MEMORY['num_chains']} chains x {MEMORY['num_samples']} draws "
        "(ru_maxrss of a fresh process: host RSS, which on CPU includes device buffers)"
    )
    rows = {}
    for label, chunk in (("chunk_size=None", None), (f"chunk_size={MEMORY_CHUNK}", MEMORY_CHUNK)):
        rows[label] = _in_child({"kind": "memory", "chunk_size": chunk, **MEMORY})
        figures = rows[label]
        device = figures["device_peak_mb"]
        device = "n/a (CPU)" if device is None else f"{device:.0f} MB"
        print(
            f"{label:>16}: peak RSS {figures['max_rss_mb']:7.0f} MB; draws kept on host "
            f"{figures['draws_mb']:.0f} MB; device peak {device}"
        )
    unchunked, chunked = (rows[label]["max_rss_mb"] for label in rows)
    print(f"chunked / unchunked peak RSS: {chunked / unchunked:.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(_one(json.loads(sys.argv[2]))))
    elif sys.argv[1:] == ["--quick"]:  # a short run that only checks the benchmark works
        THROUGHPUT, MEMORY = [(4, 200), (256, 50)], dict(num_chains=256, num_samples=200)
        main()
    elif sys.argv[1:]:
        sys.exit(f"usage: {sys.argv[0]} [--quick]")
    else:
        main()
