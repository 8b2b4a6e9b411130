"""Warmup and sampling throughput of rwmh as the number of chains grows, and peak memory.

Run ``python benchmarks/scale.py`` (``--quick`` for a smoke run of a minute or two; ``--huge``
adds 1,048,576 chains, for a GPU; ``--dimension D`` times a correlated D-dimensional Gaussian
instead of the 3-parameter regression). Every chain count runs in its own child process, because
peak memory (``ru_maxrss``) is per process and never goes down, and so that the figures of one
count do not depend on what an earlier one compiled.

* Warmup: ``rwmh.window_adaptation(logdensity).run(key, positions, num_steps=W)`` (pooled
  dense covariance, Stan's windows, stranded-chain restarts: everything ``rwmh.sample`` does
  in warmup).
* Sampling: ``rwmh.sample(..., num_warmup=0)`` with the parameters that warmup adapted, for
  ``S`` steps, keeping every 10th state (thinning happens inside the compiled loop), so that the
  copy of the draws to the host is a small part of the time, as in a real run.
* Compilation is excluded: each function is called once first (which compiles it for this
  chain count), then timed on later calls with other keys and the same shapes, which
  ``jax.jit`` serves from its cache. Timed warmup and sampling calls alternate (3 pairs, 5 up
  to 4,096 chains), so that both see the same load on a shared machine, and the fastest call
  of each kind counts (slower calls measure the neighbours). The figure is chain-steps per
  second, ``chains x steps / seconds``.
* Linear growth: between successive chain counts, ``log(T2 / T1) / log(C2 / C1)`` for the
  warmup wall times ``T``; at most 1 (up to timing noise, 1.1 here) is linear or better. The
  same exponent for sampling is printed beside it: where both exceed 1 the machine (its
  caches), not warmup, is what grows faster than the chains.
* A count whose child runs past ``--budget`` seconds is stopped; what it measured so far is
  printed (with warmup still O(C^2), rwmh 0.1 needs this above a few thousand chains), and
  larger counts are skipped, since they would take longer still.
* Memory (skipped with ``--quick`` or ``--no-memory``): peak resident set size of the process
  (host memory; on CPU the device buffers are host memory too) for one sampling run of 16,384
  chains x 1000 draws with and without ``chunk_size``. The draws kept on the host are the same
  in both; what chunking removes is the device-side copy of the whole run.

The benchmark prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np

NUM_DATA = 100
CHAIN_COUNTS = [4, 16, 256, 4096, 16384, 65536]
HUGE = 1_048_576
#: Warmup steps and sampling steps per timed call (the issue's measurement used 300 and 300).
STEPS = 300
QUICK_COUNTS = [4, 256, 4096]
QUICK_STEPS = 100
THIN = 10
#: Growth exponents up to this count as linear: timings on a shared machine drift by ~10%.
LINEAR_TOLERANCE = 1.1
MEMORY = dict(num_chains=16384, num_samples=1000)
MEMORY_CHUNK = 50


def _logdensity_and_start(num_chains, dimension=None):
    """The regression (d = 3), or with ``dimension`` a correlated Gaussian in that many
    dimensions: precision ``A A' / d + I`` for a standard normal ``A`` (seed 0), mean 0."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    if dimension is not None:
        factor = rng.normal(size=(dimension, dimension)) / np.sqrt(dimension)
        precision = jnp.asarray(factor @ factor.T + np.eye(dimension), jnp.float32)

        def gaussian(position):
            return -0.5 * position @ precision @ position

        start = 0.1 * np.random.default_rng(1).normal(size=(num_chains, dimension))
        return gaussian, start.astype(np.float32)

    x = rng.normal(size=NUM_DATA).astype(np.float32)
    y = (1.0 + 2.0 * x + 0.5 * rng.normal(size=NUM_DATA)).astype(np.float32)

    def logdensity(position):
        intercept, slope, log_sigma = position[0], position[1], position[2]
        residual = (y - intercept - slope * x) / jnp.exp(log_sigma)
        loglik = -0.5 * jnp.sum(residual**2) - NUM_DATA * log_sigma
        return loglik - 0.5 * (intercept**2 + slope**2) / 100.0 - 0.5 * log_sigma**2

    truth = np.array([1.0, 2.0, np.log(0.5)], np.float32)
    # Spread around the posterior, as chains started from a rough guess are.
    start = truth + 0.1 * np.random.default_rng(1).normal(size=(num_chains, 3)).astype(np.float32)
    return logdensity, start


def _emit(**figures):
    """One JSON line to the parent, at once: a child stopped by the budget keeps what it said."""
    print(json.dumps(figures), flush=True)


def _seconds(call, *args, **kwargs):
    begin = time.perf_counter()
    call(*args, **kwargs)
    return time.perf_counter() - begin


def _child_throughput(config: dict) -> None:
    import jax

    import rwmh

    num_chains, steps, repeats = config["num_chains"], config["steps"], config["repeats"]
    logdensity, start = _logdensity_and_start(num_chains, config.get("dimension"))
    warmup = rwmh.window_adaptation(logdensity)

    def run_warmup(seed):
        (states, parameters), info = warmup.run(jax.random.key(seed), start, num_steps=steps)
        return jax.block_until_ready((states, parameters, info))

    begin = time.perf_counter()
    _, parameters, _ = run_warmup(0)
    _emit(warmup_first_call=time.perf_counter() - begin)
    # A warmup as slow as rwmh 0.1's is timed once before sampling compiles, so that a child
    # stopped by the budget still reports it.
    warmup_seconds = _seconds(run_warmup, 1)
    _emit(warmup_seconds=warmup_seconds)

    kwargs = dict(
        num_samples=steps // THIN,
        thin=THIN,
        num_warmup=0,
        progress_bar=False,
        step_size=float(parameters["step_size"]),
        proposal_cov=np.asarray(parameters["proposal_cov"]),
    )
    begin = time.perf_counter()
    result = rwmh.sample(jax.random.key(100), logdensity, start, **kwargs)
    _emit(
        sampling_first_call=time.perf_counter() - begin,
        acceptance_rate=float(np.mean(result.stats["acceptance_rate"])),
    )
    sampling_seconds = float("inf")
    for repeat in range(repeats):
        # Alternating, so that the two kinds see the same load on a shared machine.
        if repeat > 0:
            warmup_seconds = min(warmup_seconds, _seconds(run_warmup, 1 + repeat))
        key = jax.random.key(101 + repeat)
        seconds = _seconds(rwmh.sample, key, logdensity, start, **kwargs)
        sampling_seconds = min(sampling_seconds, seconds)
        _emit(warmup_seconds=warmup_seconds, sampling_seconds=sampling_seconds)
    _emit(max_rss_mb=_max_rss_mb())


def _max_rss_mb() -> float:
    # Linux reports kilobytes, macOS bytes.
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _child_memory(config: dict) -> None:
    import jax

    import rwmh

    logdensity, start = _logdensity_and_start(config["num_chains"])
    result = rwmh.sample(
        jax.random.key(0),
        logdensity,
        start,
        num_samples=config["num_samples"],
        num_warmup=0,
        step_size=0.05,
        proposal_cov=np.array([1.0, 1.0, 0.1], np.float32),
        chunk_size=config.get("chunk_size"),
        progress_bar=False,
    )
    draws_mb = sum(x.nbytes for x in jax.tree.leaves((result.positions, result.stats))) / 2**20
    device_stats = jax.devices()[0].memory_stats()
    _emit(
        max_rss_mb=_max_rss_mb(),
        draws_mb=draws_mb,
        device_peak_mb=None
        if not device_stats
        else device_stats.get("peak_bytes_in_use", 0) / 2**20,
    )


def _in_child(config: dict, budget: float) -> tuple[dict, bool]:
    """Run ``config`` in a fresh process; ``(figures so far, finished)``."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=budget)
        finished = process.returncode == 0
        if not finished:
            print(f"  child failed (exit {process.returncode}):\n{stderr.strip()[-2000:]}")
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, _ = process.communicate()
        finished = False
    figures = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            figures.update(json.loads(line))
    return figures, finished


def _growth(previous, column, num_chains, seconds):
    """``log(T2 / T1) / log(C2 / C1)`` against the previous row, or None if either is missing."""
    if seconds is None or previous.get(column) is None:
        return None
    return math.log(seconds / previous[column]) / math.log(num_chains / previous["num_chains"])


def _throughput_table(counts, steps, budget, dimension=None):
    target = (
        f"regression log density ({NUM_DATA} points, d = 3)"
        if dimension is None
        else f"correlated Gaussian (d = {dimension})"
    )
    print(
        f"\nWarmup ({steps} steps, window_adaptation.run) and sampling ({steps} steps, "
        f"rwmh.sample, thin={THIN}), {target}, float32; compilation excluded"
    )
    header = (
        f"{'chains':>8} {'warmup s':>9} {'warmup c-s/s':>13} {'sampling s':>11} "
        f"{'sampling c-s/s':>15} {'warm/samp':>10} {'warmup us/chain':>16} {'growth':>7} "
        f"{'samp growth':>12}"
    )
    print(header)
    rows = []
    for num_chains in counts:
        config = {
            "kind": "throughput",
            "num_chains": num_chains,
            "steps": steps,
            "repeats": 5 if num_chains <= 4096 else 3,
            "dimension": dimension,
        }
        begin = time.perf_counter()
        figures, finished = _in_child(config, budget)
        elapsed = time.perf_counter() - begin
        warmup_s = figures.get("warmup_seconds")
        sampling_s = figures.get("sampling_seconds")
        chain_steps = num_chains * steps
        cells = [f"{num_chains:>8}"]
        if warmup_s is not None:
            cells += [f"{warmup_s:>9.3f}", f"{chain_steps / warmup_s:>13.3g}"]
        else:
            # Not timed: at least the time the child ran, or its first call's (with compilation).
            first = figures.get("warmup_first_call")
            lower = f">{elapsed:.0f}" if first is None else f"~{first:.1f}"
            cells += [f"{lower:>9}", f"{'n/a':>13}"]
        if sampling_s is not None:
            cells += [f"{sampling_s:>11.3f}", f"{chain_steps / sampling_s:>15.3g}"]
        else:
            cells += [f"{'n/a':>11}", f"{'n/a':>15}"]
        ratio = None if warmup_s is None or sampling_s is None else sampling_s / warmup_s
        cells.append(f"{'n/a' if ratio is None else format(ratio, '.3g'):>10}")
        per_chain = None if warmup_s is None else 1e6 * warmup_s / num_chains
        cells.append(f"{'n/a' if per_chain is None else format(per_chain, '.1f'):>16}")
        previous = rows[-1] if rows else {}
        growth = _growth(previous, "warmup_s", num_chains, warmup_s)
        sampling_growth = _growth(previous, "sampling_s", num_chains, sampling_s)
        cells.append(f"{'' if growth is None else format(growth, '.2f'):>7}")
        cells.append(f"{'' if sampling_growth is None else format(sampling_growth, '.2f'):>12}")
        print(" ".join(cells), flush=True)
        rows.append(
            dict(
                num_chains=num_chains,
                warmup_s=warmup_s,
                sampling_s=sampling_s,
                ratio=ratio,
                growth=growth,
                **figures,
            )
        )
        if not finished:
            note = (
                f"  stopped after {elapsed:.0f} s (--budget {budget:.0f})"
                if elapsed >= budget
                else "  did not finish"
            )
            if "warmup_first_call" in figures and warmup_s is None:
                note += (
                    f"; the first warmup call (compilation included) took "
                    f"{figures['warmup_first_call']:.1f} s"
                )
            print(note + "; larger chain counts skipped")
            break
    return rows


def _summary(rows, counts):
    measured = [row for row in rows if row["ratio"] is not None]
    print("\nAcceptance lines (issue 13):")
    if measured:
        worst = min(measured, key=lambda row: row["ratio"])
        every = len(measured) == len(counts) and worst["ratio"] >= 0.5
        print(
            f"  warmup chain-steps/s >= 0.5 x sampling at every count {counts[0]}..{counts[-1]}: "
            f"{'yes' if every else 'no'} (lowest {worst['ratio']:.3g} at {worst['num_chains']} "
            f"chains; {len(measured)} of {len(counts)} counts measured)"
        )
    growths = [row for row in rows if row["growth"] is not None]
    if growths:
        steepest = max(growths, key=lambda row: row["growth"])
        linear = all(row["growth"] <= LINEAR_TOLERANCE for row in growths)
        print(
            f"  total warmup time grows at most linearly with chains: "
            f"{'yes' if linear and len(measured) == len(counts) else 'no'} (steepest growth "
            f"exponent {steepest['growth']:.2f}, up to {steepest['num_chains']} chains; "
            f"linear means <= 1, {LINEAR_TOLERANCE} allowed for timing noise)"
        )


def _memory_table(budget):
    print(
        f"\nPeak memory, {MEMORY['num_chains']} chains x {MEMORY['num_samples']} draws, no "
        "warmup (ru_maxrss of a fresh process: host RSS, which on CPU includes device buffers)"
    )
    rows = {}
    for label, chunk in (("chunk_size=None", None), (f"chunk_size={MEMORY_CHUNK}", MEMORY_CHUNK)):
        figures, finished = _in_child({"kind": "memory", "chunk_size": chunk, **MEMORY}, budget)
        if not finished:
            print(f"{label:>16}: did not finish within {budget:.0f} s")
            return
        rows[label] = figures
        device = figures["device_peak_mb"]
        device = "n/a (CPU)" if device is None else f"{device:.0f} MB"
        print(
            f"{label:>16}: peak RSS {figures['max_rss_mb']:7.0f} MB; draws kept on host "
            f"{figures['draws_mb']:.0f} MB; device peak {device}"
        )
    unchunked, chunked = (rows[label]["max_rss_mb"] for label in rows)
    print(f"chunked / unchunked peak RSS: {chunked / unchunked:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 steps, 4 to 4096 chains")
    parser.add_argument("--huge", action="store_true", help=f"add {HUGE:,} chains (GPU)")
    parser.add_argument("--max-chains", type=int, default=None, help="largest chain count")
    parser.add_argument("--steps", type=int, default=None, help="warmup and sampling steps")
    parser.add_argument(
        "--budget", type=float, default=600.0, help="seconds per chain count (default 600)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--dimension",
        type=int,
        default=None,
        help="time a correlated Gaussian in this many dimensions instead of the regression",
    )
    args = parser.parse_args(argv)

    import jax

    devices = jax.devices()
    print(
        f"jax {jax.__version__}; devices: {len(devices)} x {devices[0].platform} "
        f"({devices[0].device_kind}); {os.cpu_count()} CPU cores"
    )
    if not any(d.platform == "gpu" for d in devices):
        print("No GPU on this machine: every figure below is CPU-only.")
    counts = list(QUICK_COUNTS if args.quick else CHAIN_COUNTS)
    if args.huge:
        counts.append(HUGE)
    if args.max_chains is not None:
        counts = [c for c in counts if c <= args.max_chains]
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    if args.dimension is not None and args.dimension < 1:
        parser.error(f"--dimension must be a positive integer; got {args.dimension}")
    rows = _throughput_table(counts, steps, args.budget, args.dimension)
    _summary(rows, counts)
    if not (args.quick or args.no_memory):
        _memory_table(args.budget)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        config = json.loads(sys.argv[2])
        {"throughput": _child_throughput, "memory": _child_memory}[config["kind"]](config)
    else:
        main()
