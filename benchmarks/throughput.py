"""Chain-steps per second: rwmh's kernel against BlackJAX's and against the floor.

All three run in the same harness, from one process: ``jax.jit`` of a ``lax.scan`` over steps
of ``jax.vmap`` over chains, on the linear-regression log density (intercept, slope, log sigma)
with N data points. The floor is one normal draw and one log density per chain-step, with no
accept step: what any random walk must pay. Times are medians of 5 runs after compilation;
results are printed as ratios, since absolute times drift on shared machines.

The headline row times the original looped code at (10, 4): a Python loop of un-jitted vmapped
steps, whose likelihood redraws its data on every call and which accepts every proposal.

Run: ``python benchmarks/throughput.py`` (about a minute on 2 cores).
"""

import argparse
import statistics
import time

import blackjax
import jax
import jax.numpy as jnp
import jax.scipy.stats as stats
import numpy as np

import rwmh

WORKLOADS = [(10, 4), (1000, 4), (1000, 256), (10, 4096)]
STEP_SIZE = 0.05


def regression_logdensity(num_points, seed=0):
    key_x, key_noise = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(key_x, (num_points,))
    y = 1.0 + 2.0 * x + 0.5 * jax.random.normal(key_noise, (num_points,))

    def logdensity(position):
        intercept, slope, log_sigma = position[0], position[1], position[2]
        sigma = jnp.exp(log_sigma)
        log_prior = (
            stats.norm.logpdf(intercept, 0.0, 10.0)
            + stats.norm.logpdf(slope, 0.0, 10.0)
            + stats.norm.logpdf(sigma, 0.0, 5.0)
            + log_sigma
        )
        return log_prior + jnp.sum(stats.norm.logpdf(y, intercept + slope * x, sigma))

    return logdensity


def harness(step, init, num_chains, num_steps):
    """Compiled vmap + scan loop over ``step(key, state)``; returns a function of the key."""

    @jax.jit
    def run(rng_key, positions):
        states = jax.vmap(init)(positions)

        def one_step(states, key):
            keys = jax.random.split(key, num_chains)
            states, _ = jax.vmap(step)(keys, states)
            return states, None

        states, _ = jax.lax.scan(one_step, states, jax.random.split(rng_key, num_steps))
        return states

    return run


def floor_step(logdensity):
    def init(position):
        return position, logdensity(position)

    def step(key, state):
        position, _ = state
        proposal = position + STEP_SIZE * jax.random.normal(key, position.shape, position.dtype)
        return (proposal, logdensity(proposal)), None

    return init, step


def time_median(run, positions, repeats=5, clock=time.perf_counter):
    jax.block_until_ready(run(jax.random.key(0), positions))  # compile
    times = []
    for repeat in range(repeats):
        start = clock()
        jax.block_until_ready(run(jax.random.key(repeat + 1), positions))
        times.append(clock() - start)
    return statistics.median(times)


def looped_original(num_points, num_chains, num_steps):
    """The code rwmh replaced: a Python loop of un-jitted vmapped steps that redraws its data
    inside the likelihood and accepts every proposal."""

    def logdensity(position, key):
        key_x, key_noise = jax.random.split(key)
        x = jax.random.normal(key_x, (num_points,))  # redrawn on every call: the bug
        y = 1.0 + 2.0 * x + 0.5 * jax.random.normal(key_noise, (num_points,))
        sigma = jnp.exp(position[2])
        return jnp.sum(stats.norm.logpdf(y, position[0] + position[1] * x, sigma))

    def step(position, key):
        key_step, key_data = jax.random.split(key)
        proposal = position + STEP_SIZE * jax.random.normal(key_step, position.shape)
        print(proposal)  # the user's attempt to see the chains: prints a BatchTrace
        logdensity(proposal, key_data)
        return proposal  # no Metropolis-Hastings test: every proposal accepted

    import contextlib
    import io

    positions = jnp.zeros((num_chains, 3))
    key = jax.random.key(0)
    vmapped = jax.vmap(step)
    with contextlib.redirect_stdout(io.StringIO()):
        vmapped(positions, jax.random.split(key, num_chains))  # warm the op caches
        start = time.perf_counter()
        for _ in range(num_steps):
            key, subkey = jax.random.split(key)
            positions = vmapped(positions, jax.random.split(subkey, num_chains))
        jax.block_until_ready(positions)
    return num_steps * num_chains / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description="rwmh throughput against BlackJAX and the floor")
    parser.add_argument("--chain-steps", type=float, default=4e5, help="chain-steps per run")
    parser.add_argument("--looped-steps", type=int, default=200)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall-clock time, or this process's CPU time (steadier on a busy machine)",
    )
    parser.add_argument("--quick", action="store_true", help="2e4 chain-steps, 20 looped steps")
    args = parser.parse_args()
    if args.quick:
        args.chain_steps, args.looped_steps = 2e4, 20
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    print(f"jax {jax.__version__}, blackjax {blackjax.__version__}, device {jax.devices()[0]}")
    header = (
        f"{'N':>5} {'chains':>6} {'steps':>6} | {'rwmh':>11} {'blackjax':>11} {'floor':>11}"
        f" | {'rwmh/bjax':>9} {'floor/rwmh':>10}"
    )
    print(f"chain-steps per second (median of 5 runs after compilation, {args.clock} clock)")
    print(header)
    print("-" * len(header))
    rwmh_at_10_4 = None
    for num_points, num_chains in WORKLOADS:
        num_steps = max(100, int(args.chain_steps / num_chains))
        logdensity = regression_logdensity(num_points)
        positions = jnp.asarray(np.random.default_rng(1).normal(size=(num_chains, 3)) * 0.1)
        ours = rwmh.random_walk(logdensity, step_size=STEP_SIZE)
        theirs = blackjax.additive_step_random_walk.normal_random_walk(
            logdensity, STEP_SIZE * jnp.ones(3)
        )
        floor_init, floor = floor_step(logdensity)
        rates = {}
        for name, (init, step) in {
            "rwmh": (ours.init, ours.step),
            "blackjax": (theirs.init, theirs.step),
            "floor": (floor_init, floor),
        }.items():
            run = harness(step, init, num_chains, num_steps)
            seconds = time_median(run, positions, clock=clock)
            rates[name] = num_steps * num_chains / seconds
        if (num_points, num_chains) == (10, 4):
            rwmh_at_10_4 = rates["rwmh"]
        print(
            f"{num_points:>5} {num_chains:>6} {num_steps:>6} | {rates['rwmh']:>11.4g}"
            f" {rates['blackjax']:>11.4g} {rates['floor']:>11.4g}"
            f" | {rates['rwmh'] / rates['blackjax']:>9.3f} {rates['floor'] / rates['rwmh']:>10.3f}"
        )
    looped = looped_original(10, 4, args.looped_steps)
    print(
        f"\noriginal looped code at (10, 4): {looped:.4g} chain-steps/s; "
        f"rwmh is {rwmh_at_10_4 / looped:.0f}x faster"
    )


if __name__ == "__main__":
    main()
