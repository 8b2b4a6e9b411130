"""How long a new user waits for a first result: fresh processes, medians of several runs.

Run ``python benchmarks/first_result.py`` (``--quick``: one run each, about a minute on two
cores; ``--runs N``: N runs each, default 3). Every figure is the wall time of a fresh Python
process (or a part of one, said so), so imports, tracing and compilation are all counted:

(a) ``rwmh regress --no-progress`` on its built-in data (100 points) with its defaults: 4
    chains, 1000 warmup steps, then draws until bulk and tail ESS reach 400 and R-hat is at
    most 1.01, checked with ArviZ on all draws so far at 100, 200, 300, 500, 800, ... draws
    (:mod:`rwmh.convergence`; at most 100,000 per chain; the command prints where it
    stopped), then ArviZ's summary. Twice per run: the *first* invocation with
    ``JAX_COMPILATION_CACHE_DIR`` pointing at a fresh empty directory, and the *second* with
    the same directory, as a user's second run finds it. Where the command line turns JAX's
    persistent compilation cache on (it honours ``JAX_COMPILATION_CACHE_DIR``), the second run
    loads what the first compiled; the entries written are counted, so a run without a cache
    shows as 0 entries. Also the first
    invocation with ``--no-compilation-cache`` where the option exists, which shows what
    writing the cache costs.
(b) A script that fits the same model (``rwmh.models.linear_regression``, loaded from its
    file without importing the rest of rwmh, on the same simulated data) with NumPyro NUTS
    as a NumPyro user would: ``MCMC(NUTS(model), num_warmup=1000, num_samples=5000,
    num_chains=4)``, defaults otherwise (on one CPU device the chains run one after another),
    then ``print_summary()``. No compilation cache. 5000 draws is ``rwmh regress --fixed``'s
    number; NUTS's draws are far less correlated than random-walk draws, so it is a fixed
    amount of work rather than the same effective sample size.
(c) ``python -c "import rwmh"``, beside ``python -c "pass"`` and ``python -c "import jax"``.
(d) The first call of ``rwmh.sample`` (1000 warmup steps and 1000 draws of 4 chains on the
    3-parameter regression log density with 100 points, ``progress_bar=False``) against
    BlackJAX's first call of a compiled loop of 2000 vmapped ``normal_random_walk`` steps of 4
    chains on the same log density, each timed inside a fresh process from just before the
    call to the draws on the host (imports and data are made before, identically), with no
    compilation cache. The two do not do the same work: ``rwmh.sample`` also adapts the step
    size and a dense proposal covariance pooled over the chains (with window-end restarts of
    stranded chains), BlackJAX's loop has a fixed diagonal scale. For that reason it also
    prints, for information, the first call of ``rwmh.sample`` with ``num_warmup=0`` and
    2000 draws at BlackJAX's step size and diagonal: the loop alone.

It ends with the acceptance lines of issue 13 as ratios. It prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

#: ``rwmh regress``'s chains and warmup steps, and the draws of ``rwmh regress --fixed``
#: (src/rwmh/cli.py), which the NumPyro script makes.
NUM_CHAINS, NUM_WARMUP, NUM_SAMPLES = 4, 1000, 5000
#: The work of (d): rwmh.sample's warmup plus draws, as many steps in BlackJAX's loop.
FIRST_CALL_WARMUP, FIRST_CALL_SAMPLES = 1000, 1000

NUMPYRO_SCRIPT = """
import importlib.util, sys
import jax
from numpyro.infer import MCMC, NUTS
spec = importlib.util.spec_from_file_location("rwmh_models", sys.argv[1])
models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(models)
x, y = models.simulate_linear_regression(jax.random.PRNGKey(0), 100)
mcmc = MCMC(NUTS(models.linear_regression), num_warmup={warmup}, num_samples={samples},
            num_chains={chains}, progress_bar=False)
mcmc.run(jax.random.PRNGKey(0), x, y)
mcmc.print_summary()
""".format(warmup=NUM_WARMUP, samples=NUM_SAMPLES, chains=NUM_CHAINS)  # noqa: UP032

FIRST_CALL_SCRIPT = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
side = sys.argv[1]
import_start = time.perf_counter()
if side.startswith("rwmh"):
    import rwmh
else:
    import blackjax
import_seconds = time.perf_counter() - import_start
rng = np.random.default_rng(0)
x = rng.normal(size=100).astype(np.float32)
y = (1.0 + 2.0 * x + 0.5 * rng.normal(size=100)).astype(np.float32)

def logdensity(position):
    intercept, slope, log_sigma = position[0], position[1], position[2]
    residual = (y - intercept - slope * x) / jnp.exp(log_sigma)
    loglik = -0.5 * jnp.sum(residual**2) - 100 * log_sigma
    return loglik - 0.5 * (intercept**2 + slope**2) / 100.0 - 0.5 * log_sigma**2

positions = np.random.default_rng(1).uniform(-2.0, 2.0, size=({chains}, 3)).astype(np.float32)
key = jax.random.key(0)
jax.block_until_ready(key)
start = time.perf_counter()
if side == "rwmh":
    result = rwmh.sample(key, logdensity, positions, num_samples={samples},
                         num_warmup={warmup}, progress_bar=False)
    draws = np.asarray(result.positions)
elif side == "rwmh-no-warmup":
    result = rwmh.sample(key, logdensity, positions, num_samples={steps}, num_warmup=0,
                         step_size=0.1, proposal_cov=np.ones(3, np.float32),
                         progress_bar=False)
    draws = np.asarray(result.positions)
else:
    @jax.jit
    def run(key, positions):
        algorithm = blackjax.normal_random_walk(logdensity, 0.1 * jnp.ones(3))
        states = jax.vmap(algorithm.init)(positions)

        def one_step(states, key):
            states, info = jax.vmap(algorithm.step)(jax.random.split(key, {chains}), states)
            return states, (states.position, info.acceptance_rate)

        _, (draws, acceptance) = jax.lax.scan(one_step, states,
                                              jax.random.split(key, {steps}))
        return jnp.swapaxes(draws, 0, 1), acceptance

    draws = np.asarray(run(key, positions)[0])
seconds = time.perf_counter() - start
print(json.dumps(dict(seconds=seconds, import_seconds=import_seconds, shape=draws.shape)))
""".format(  # noqa: UP032
    chains=NUM_CHAINS,
    samples=FIRST_CALL_SAMPLES,
    warmup=FIRST_CALL_WARMUP,
    steps=FIRST_CALL_WARMUP + FIRST_CALL_SAMPLES,
)


def _clean_env(**changes) -> dict:
    """The environment without JAX or rwmh settings that would change what is measured."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("JAX_") and name != "RWMH_NO_COMPILATION_CACHE"
    }
    env.update(changes)
    return env


def _wall(command, env=None) -> tuple[float, subprocess.CompletedProcess]:
    begin = time.perf_counter()
    done = subprocess.run(command, env=env or _clean_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - begin
    if done.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done


def _rwmh_command() -> list[str]:
    return [sys.executable, "-m", "rwmh.cli", "regress", "--no-progress"]


def _has_cache_option() -> bool:
    done = subprocess.run(_rwmh_command()[:-1] + ["--help"], capture_output=True, text=True)
    return "--no-compilation-cache" in done.stdout


def _entries(path: str) -> int:
    return len(os.listdir(path)) if os.path.isdir(path) else 0


def measure_regress(runs: int, with_nocache: bool) -> dict:
    figures = {"first": [], "second": [], "entries": [], "no_cache": []}
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="rwmh-first-result-") as tmp:
            cache = os.path.join(tmp, "jax")
            env = _clean_env(JAX_COMPILATION_CACHE_DIR=cache)
            seconds, _ = _wall(_rwmh_command(), env)
            figures["first"].append(seconds)
            figures["entries"].append(_entries(cache))
            seconds, _ = _wall(_rwmh_command(), env)
            figures["second"].append(seconds)
        if with_nocache:
            seconds, _ = _wall(_rwmh_command() + ["--no-compilation-cache"])
            figures["no_cache"].append(seconds)
    return figures


def measure_numpyro(runs: int) -> list[float]:
    spec = importlib.util.find_spec("rwmh")
    models_path = os.path.join(list(spec.submodule_search_locations)[0], "models.py")
    return [_wall([sys.executable, "-c", NUMPYRO_SCRIPT, models_path])[0] for _ in range(runs)]


def measure_imports(runs: int) -> dict:
    figures = {}
    for code in ("pass", "import jax", "import rwmh"):
        figures[code] = [_wall([sys.executable, "-c", code])[0] for _ in range(runs)]
    return figures


def measure_first_calls(runs: int) -> dict:
    sides = ("rwmh", "blackjax", "rwmh-no-warmup")
    figures = {side: [] for side in sides} | {"rwmh_import": [], "blackjax_import": []}
    for _ in range(runs):
        # In turns, so that a burst of load on a shared machine hits all sides alike.
        for side in sides:
            _, done = _wall([sys.executable, "-c", FIRST_CALL_SCRIPT, side])
            result = json.loads(done.stdout.strip().splitlines()[-1])
            figures[side].append(result["seconds"])
            if f"{side}_import" in figures:
                figures[f"{side}_import"].append(result["import_seconds"])
    return figures


def _median(values) -> float:
    return statistics.median(values)


def _fmt(values) -> str:
    spread = "" if len(values) < 2 else f" (runs {', '.join(f'{v:.2f}' for v in values)})"
    return f"{_median(values):6.2f} s{spread}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run of each")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (default 3)")
    args = parser.parse_args(argv)
    runs = 1 if args.quick else args.runs

    import jax

    print(
        f"jax {jax.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPU cores, "
        f"{jax.devices()[0].platform}; medians of {runs} fresh process(es) each"
    )
    has_option = _has_cache_option()
    regress = measure_regress(runs, with_nocache=has_option and not args.quick)
    numpyro = measure_numpyro(runs)
    imports = measure_imports(runs)
    first_calls = measure_first_calls(runs)

    print(
        f"\n(a) rwmh regress, built-in data ({NUM_CHAINS} chains, {NUM_WARMUP} warmup, "
        "draws until converged)"
    )
    print(f"  first, empty cache dir:       {_fmt(regress['first'])}")
    print(f"  second, same cache dir:       {_fmt(regress['second'])}")
    print(f"  cache entries after the first: {regress['entries']}")
    if regress["no_cache"]:
        print(f"  first, --no-compilation-cache: {_fmt(regress['no_cache'])}")
    elif not has_option:
        print("  (this rwmh has no --no-compilation-cache option)")
    print(f"(b) NumPyro NUTS script, same model and data, {NUM_SAMPLES} draws: {_fmt(numpyro)}")
    print("(c) imports, whole process:")
    for label, values in imports.items():
        print(f"  python -c {label!r:14}: {_fmt(values)}")
    print(
        f"  inside the (d) processes: import rwmh {_median(first_calls['rwmh_import']):.2f} s, "
        f"import blackjax {_median(first_calls['blackjax_import']):.2f} s (after import jax)"
    )
    print(
        f"(d) first call, compilation included, {FIRST_CALL_WARMUP} + {FIRST_CALL_SAMPLES} steps "
        f"x {NUM_CHAINS} chains:"
    )
    print(f"  rwmh.sample:        {_fmt(first_calls['rwmh'])}")
    print(f"  BlackJAX jit loop:  {_fmt(first_calls['blackjax'])}")
    print(
        f"  rwmh.sample without warmup ({FIRST_CALL_WARMUP + FIRST_CALL_SAMPLES} draws, "
        f"BlackJAX's step size and diagonal), the loop alone: {_fmt(first_calls['rwmh-no-warmup'])}"
    )

    first, second = _median(regress["first"]), _median(regress["second"])
    nuts = _median(numpyro)
    ratio_d = _median(first_calls["rwmh"]) / _median(first_calls["blackjax"])
    print("\nAcceptance lines (issue 13), medians:")
    print(f"  first rwmh regress / NumPyro NUTS script: {first / nuts:.2f} (at most 1.5)")
    print(f"  second rwmh regress / first:              {second / first:.2f} (at most 0.5)")
    print(f"  first rwmh.sample / first BlackJAX call:  {ratio_d:.2f} (at most 1.5)")
    loop_alone = _median(first_calls["rwmh-no-warmup"]) / _median(first_calls["blackjax"])
    print(f"  (information) rwmh.sample without warmup / BlackJAX: {loop_alone:.2f}")


if __name__ == "__main__":
    main()
