"""Step time on a CPU with XLA's concurrency-optimized scheduler on (the default) and off.

XLA's CPU runtime runs the independent operations of a compiled step on its thread pool, and
its default HLO scheduler orders them to run concurrently. With few chains every operation
takes a few hundred nanoseconds and handing them between threads costs more than it saves;
``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` orders them for one
thread instead. The flag is read once per process, when JAX starts its CPU backend. Given to
``jax.jit(..., compiler_options=...)``, it is accepted and has no effect on jax 0.10 and
0.12, so a library cannot set it for its own programs alone. This benchmark runs the same
measurements in two fresh processes, one with the flag and one without, and prints their
ratio. The flag changes the order of operations, not what they compute, so the draws are the
same bits (the workers hash every workload's draws, and the two hashes must match).

Measured in each process, compilation excluded, medians of ``--repeats`` runs:

* ``rwmh.sample`` on the regression log density of ``throughput.py`` (N data points, d = 3),
  ``S`` warmup steps and ``S`` draws, at (N, chains) = (100, 4), (1000, 4), (1000, 256),
  (10, 4096) and (10, 65536): time per step of all chains;
* ``numpyro_overhead.py``'s comparison: ``MCMC(RWMH)`` vectorized under ``jax.jit`` against
  ``rwmh.sample`` on the NumPyro linear regression (1000 points, 4 chains, 2000 + 2000 steps),
  as their ratio, in each process.

Run ``python benchmarks/xla_scheduler.py`` (about 2 minutes on 2 cores; ``--quick``: fewer
steps and workloads).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
WORKLOADS = [(100, 4), (1000, 4), (1000, 256), (10, 4096), (10, 65536)]
QUICK_WORKLOADS = [(100, 4), (1000, 256), (10, 4096)]


def median_seconds(run, repeats: int) -> tuple[float, object]:
    """Median wall time of ``run()`` after a first (compiling) call, and its last value."""
    import jax

    jax.block_until_ready(run())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def worker(quick: bool, repeats: int) -> dict:
    import warnings

    import jax
    import jax.numpy as jnp
    import numpy as np

    import rwmh

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import numpyro_overhead
    import throughput

    # Restarts of lagging chains are expected at these starts; their warning is not the point.
    warnings.filterwarnings("ignore", category=rwmh.RestartWarning)
    results = {"jax": jax.__version__, "rwmh.sample": []}
    for num_points, num_chains in QUICK_WORKLOADS if quick else WORKLOADS:
        logdensity = throughput.regression_logdensity(num_points)
        positions = jnp.asarray(np.random.default_rng(1).normal(size=(num_chains, 3)) * 0.1)
        budget = 1e5 if quick else 5e5  # chain-steps per phase
        steps = max(100, int(budget / num_chains))

        def run(logdensity=logdensity, positions=positions, steps=steps):
            return rwmh.sample(
                jax.random.key(0),
                logdensity,
                positions,
                num_samples=steps,
                num_warmup=steps,
                progress_bar=False,
            ).positions

        seconds, draws = median_seconds(run, repeats)
        results["rwmh.sample"].append(
            {
                "points": num_points,
                "chains": num_chains,
                "steps": 2 * steps,
                "us_per_step": seconds / (2 * steps) * 1e6,
                "digest": hashlib.sha256(np.asarray(draws).tobytes()).hexdigest()[:16],
            }
        )

    # numpyro_overhead.py's comparison, on the same settings as its defaults.
    from numpyro.infer.util import initialize_model

    from rwmh.models import linear_regression, simulate_linear_regression

    warmup = samples = 500 if quick else 2000
    x, y = simulate_linear_regression(jax.random.key(0), 1000)
    mcmc = numpyro_overhead.vectorized_mcmc(linear_regression, 4, warmup, samples)

    @jax.jit
    def run_numpyro():
        mcmc.run(jax.random.key(1), x, y)
        return mcmc.get_samples(group_by_chain=True)

    keys = jax.random.split(jax.random.key(2), 4)
    info, potential_fn, _, _ = initialize_model(keys, linear_regression, model_args=(x, y))

    def logdensity(z):  # one function for every call: rwmh.sample's programs are cached on it
        return -potential_fn(z)

    def run_rwmh():
        return rwmh.sample(
            jax.random.key(1),
            logdensity,
            info.z,
            num_samples=samples,
            num_warmup=warmup,
            progress_bar=False,
        ).positions

    mcmc_seconds, _ = median_seconds(run_numpyro, repeats)
    rwmh_seconds, _ = median_seconds(run_rwmh, repeats)
    results["numpyro"] = {
        "steps": warmup + samples,
        "mcmc_us_per_step": mcmc_seconds / (warmup + samples) * 1e6,
        "rwmh_us_per_step": rwmh_seconds / (warmup + samples) * 1e6,
    }
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and workloads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.quick, args.repeats)))
        return

    runs = {}
    for name, extra in (("default", ""), ("flag", FLAG)):
        env = dict(os.environ)
        flags = env.get("XLA_FLAGS", "").replace(FLAG, "").strip()
        env["XLA_FLAGS"] = f"{flags} {extra}".strip()
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            f"--repeats={args.repeats}",
        ] + (["--quick"] if args.quick else [])
        output = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        runs[name] = json.loads(output.stdout.strip().splitlines()[-1])

    default, flag = runs["default"], runs["flag"]
    print(
        f"jax {default['jax']}, CPU, {os.cpu_count()} cores; medians of {args.repeats} runs, "
        "compilation excluded"
    )
    print(f"flag: XLA_FLAGS={FLAG}\n")
    print("rwmh.sample, regression log density (d = 3), warmup + draws, us per step of all chains")
    print(
        f"{'points':>7} {'chains':>7} {'steps':>7} | {'default':>9} {'flag':>9} | "
        f"{'flag/default':>12}   draws, flag against default"
    )
    same = True
    for a, b in zip(default["rwmh.sample"], flag["rwmh.sample"], strict=True):
        same = same and a["digest"] == b["digest"]
        print(
            f"{a['points']:>7} {a['chains']:>7} {a['steps']:>7} | {a['us_per_step']:>9.2f} "
            f"{b['us_per_step']:>9.2f} | {b['us_per_step'] / a['us_per_step']:>12.3f}   "
            f"draws {'the same bits' if a['digest'] == b['digest'] else 'DIFFER'}"
        )
    print(
        "\nMCMC(RWMH) vectorized under jax.jit against rwmh.sample, NumPyro linear regression "
        f"(1000 points, 4 chains, {default['numpyro']['steps']} steps), us per step"
    )
    for name, run in runs.items():
        numpyro = run["numpyro"]
        print(
            f"  {name:8s} MCMC {numpyro['mcmc_us_per_step']:6.2f}, rwmh.sample "
            f"{numpyro['rwmh_us_per_step']:6.2f}: MCMC(RWMH) / rwmh.sample = "
            f"{numpyro['mcmc_us_per_step'] / numpyro['rwmh_us_per_step']:.2f}"
        )
    if not same:
        sys.exit("the flag changed the draws")


if __name__ == "__main__":
    main()
