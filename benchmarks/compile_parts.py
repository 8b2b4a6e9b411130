"""What each part of the warmup program costs XLA to compile, against BlackJAX's whole loop.

Run ``python benchmarks/compile_parts.py`` (``--runs N``: N fresh processes per variant,
default 3; the median counts). Each variant compiles one program of 1000 steps of 4 chains on
the 3-parameter regression log density of ``first_result.py`` (d), in a fresh process with no
compilation cache, and prints the seconds of ``lower`` and of ``compile`` (XLA):

* ``warmup``: :func:`rwmh.chains.warmup_loop`, as :func:`rwmh.sample` compiles it;
* ``warmup - refresh``, ``- accumulate``, ``- restart``, ``- update``: the same with one part
  replaced by the identity (the covariance refresh of :func:`rwmh.tuning._refresh`, the pooled
  moments of :func:`rwmh.tuning.accumulate`, the window-end restarts of
  :func:`rwmh.stragglers.restart_at_window_end`, all of :func:`rwmh.tuning.update`), so the
  difference to ``warmup`` is what that part costs;
* ``sampling``: :func:`rwmh.chains.sampling_loop` (1000 draws);
* ``blackjax``: BlackJAX's compiled loop of vmapped ``normal_random_walk`` steps, the peer.

Variants with a part removed are not valid samplers; they exist to apportion compile time. It
patches rwmh's module attributes in its own child process, prints, and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
variant = sys.argv[1]
rng = np.random.default_rng(0)
x = rng.normal(size=100).astype(np.float32)
y = (1.0 + 2.0 * x + 0.5 * rng.normal(size=100)).astype(np.float32)

def logdensity(position):
    intercept, slope, log_sigma = position[0], position[1], position[2]
    residual = (y - intercept - slope * x) / jnp.exp(log_sigma)
    loglik = -0.5 * jnp.sum(residual**2) - 100 * log_sigma
    return loglik - 0.5 * (intercept**2 + slope**2) / 100.0 - 0.5 * log_sigma**2

positions = np.random.default_rng(1).uniform(-2.0, 2.0, size=(4, 3)).astype(np.float32)
if variant == "blackjax":
    import blackjax

    def run(key, positions):
        algorithm = blackjax.normal_random_walk(logdensity, 0.1 * jnp.ones(3))
        states = jax.vmap(algorithm.init)(positions)

        def one_step(states, key):
            states, info = jax.vmap(algorithm.step)(jax.random.split(key, 4), states)
            return states, (states.position, info.acceptance_rate)

        return jax.lax.scan(one_step, states, jax.random.split(key, 1000))[1]

    program, arguments = jax.jit(run), (jax.random.key(0), positions)
else:
    from rwmh import chains, stragglers, tuning

    if variant == "warmup - refresh":
        tuning._refresh = lambda state, window_end, dimension: state
    elif variant == "warmup - accumulate":
        tuning.accumulate = lambda state, points, weights: state
    elif variant == "warmup - restart":
        stragglers.restart_at_window_end = lambda end, states, d, mask=None: (
            states, jnp.zeros((), jnp.int32))
    elif variant == "warmup - update":
        tuning.update = lambda state, *rest, **options: state
    states, adapt = chains.initial_state(logdensity, positions)
    keys = chains.chain_keys(jax.random.key(0), 4)
    if variant == "sampling":
        program = jax.jit(lambda keys, states, step_size, proposal, first: chains.sampling_loop(
            logdensity, 1000, 1, keys, states, step_size, proposal, first))
        arguments = (keys, states, adapt.step_size, adapt.proposal, np.uint32(0))
    else:
        schedule = tuning.build_schedule(1000, restart_stranded=True, num_chains=4)
        program = jax.jit(lambda keys, states, adapt, steps, rows: chains.warmup_loop(
            logdensity, None, keys, states, adapt, steps, rows))
        arguments = (keys, states, adapt, np.arange(1000, dtype=np.uint32),
                     schedule.steps(0, 1000))
start = time.perf_counter()
lowered = program.lower(*arguments)
middle = time.perf_counter()
lowered.compile()
end = time.perf_counter()
print(json.dumps(dict(lower=middle - start, compile=end - middle)))
"""

VARIANTS = [
    "warmup",
    "warmup - refresh",
    "warmup - accumulate",
    "warmup - restart",
    "warmup - update",
    "sampling",
    "blackjax",
]


def _measure(variant: str) -> dict:
    # Without JAX settings (a compilation cache directory would serve later runs from disk).
    environment = {name: value for name, value in os.environ.items() if not name.startswith("JAX_")}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, variant],
        capture_output=True,
        text=True,
        check=True,
        env=environment,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per variant")
    options = parser.parse_args()
    import jax

    print(f"jax {jax.__version__}; medians of {options.runs} fresh processes per variant")
    figures: dict[str, dict] = {variant: {"lower": [], "compile": []} for variant in VARIANTS}
    for _ in range(options.runs):
        # In turns, so that every variant sees the same load on a shared machine.
        for variant in VARIANTS:
            for name, value in _measure(variant).items():
                figures[variant][name].append(value)
    medians = {
        variant: {name: statistics.median(values) for name, values in parts.items()}
        for variant, parts in figures.items()
    }
    full = medians["warmup"]["compile"]
    peer = medians["blackjax"]["compile"]
    print(f"{'program':22s} {'lower s':>8s} {'XLA s':>8s} {'part s':>8s} {'/ blackjax':>10s}")
    for variant in VARIANTS:
        lower, compile_seconds = medians[variant]["lower"], medians[variant]["compile"]
        part = f"{full - compile_seconds:8.3f}" if variant.startswith("warmup - ") else " " * 8
        print(
            f"{variant:22s} {lower:8.3f} {compile_seconds:8.3f} {part} "
            f"{compile_seconds / peer:10.2f}"
        )
    print("part s: what the removed part costs XLA (warmup minus the variant without it).")


if __name__ == "__main__":
    main()
