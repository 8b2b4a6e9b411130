"""What ``until=rwmh.Converged()`` costs and what it buys, in one process.

Two problems: the regression posterior of ``rwmh regress`` (its built-in 100 points, 4 chains,
on NumPyro's unconstrained space) and a 10-d Gaussian with a dense covariance (condition number
100) sampled by 4096 chains. For each:

* the share of wall time spent in the convergence checks (ArviZ's R-hat and bulk/tail ESS on
  all draws so far, ``sum(result.extra["checks"][i]["seconds"])``) in a call whose programs
  are compiled already (by a 100-draw fixed-length run of the same shapes, made first);
* the run length the rule chose (``extra["stop"]["draw"]``) against the shortest fixed length,
  on a 100-draw grid (bisected between the last failed check and the stop), at which the same
  draws (the stopped run's draws are the first draws of the fixed-length run with the same
  key) first meet the same bounds: the cost of checking on a geometric schedule instead of
  after every chunk; and the default fixed length (1000 draws) with its worst R-hat and ESS.

Run ``python benchmarks/until.py`` (``--quick``: the regression alone, 1 repeat;
``--check-cost``: for each problem, only the compiled call of 1000 warmup steps and 1000 draws
against one check of its draws, a minute where the whole run takes about 20).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import rwmh
from rwmh import convergence
from rwmh.cli import SIMULATION_SEED, SIMULATION_SIZE
from rwmh.models import linear_regression, simulate_linear_regression
from rwmh.numpyro import initialize


def regression_problem(num_chains=4):
    x, y = simulate_linear_regression(jax.random.PRNGKey(SIMULATION_SEED), SIMULATION_SIZE)
    init_key, key = jax.random.split(jax.random.PRNGKey(0))
    params, potential_gen, _ = initialize(
        jax.random.split(init_key, num_chains), linear_regression, (x, y)
    )
    potential = potential_gen(x, y)
    return "regression, 4 chains", (lambda p: -potential(p)), params.z, key


def gaussian_problem(num_chains=4096, dimension=10):
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(dimension, dimension)))
    precision = jnp.asarray(basis @ np.diag(np.logspace(-1, 1, dimension)) @ basis.T, jnp.float32)
    initial = jax.random.normal(jax.random.key(1), (num_chains, dimension))
    return (
        f"10-d Gaussian, {num_chains} chains",
        (lambda x: -0.5 * x @ precision @ x),
        initial,
        jax.random.key(2),
    )


def timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def measure(label, logdensity, initial, key, repeats, cap):
    until = rwmh.Converged()

    def run():
        return rwmh.sample(
            key, logdensity, initial, num_samples=cap, until=until, progress_bar=False
        )

    # A fixed-length run of one 100-draw chunk compiles the very programs the until run uses
    # (1000 warmup steps in one call, 100-draw sampling chunks), and ArviZ is imported.
    compiled, compile_wall = timed(
        lambda: rwmh.sample(key, logdensity, initial, num_samples=100, progress_bar=False)
    )
    convergence.check(compiled.positions, until)
    walls, shares, check_times = [], [], []
    for _ in range(repeats):
        result, wall = timed(run)
        checks = sum(c["seconds"] for c in result.extra["checks"])
        walls.append(wall)
        check_times.append(checks)
        shares.append(checks / wall)
    stop = result.extra["stop"]
    print(
        f"\n{label}: stopped {stop['reason']} at draw {stop['draw']} per chain, "
        f"{len(result.extra['checks'])} checks at {[c['draw'] for c in result.extra['checks']]}"
    )
    print(
        f"  compiled call: wall {statistics.median(walls):.3f} s, checks "
        f"{statistics.median(check_times):.3f} s, share {100 * statistics.median(shares):.1f}% "
        f"(median of {repeats})"
    )
    print(f"  (compiling first, in a 100-draw fixed-length run: {compile_wall:.3f} s)")

    # The fixed-length run with the same key: its first draws are the stopped run's.
    fixed = rwmh.sample(key, logdensity, initial, num_samples=stop["draw"], progress_bar=False)
    fixed_draws = convergence.flat_draws(fixed.positions)
    np.testing.assert_array_equal(fixed_draws, convergence.flat_draws(result.positions))
    # Between the last check that failed and the stop, bisect on the 100-draw grid for the
    # first length that meets the bounds (taking the bounds, once met, to stay met there).
    failed = [c["draw"] for c in result.extra["checks"] if not c["converged"]]
    low, high = (failed[-1] if failed else 0) // 100, stop["draw"] // 100
    while high - low > 1:
        middle = (low + high) // 2
        if convergence.check(fixed_draws[:, : 100 * middle], until)["converged"]:
            high = middle
        else:
            low = middle
    print(
        f"  shortest fixed length meeting the bounds (100-draw grid, bisected): {100 * high}; "
        f"chosen/shortest = {stop['draw'] / (100 * high):.2f}"
    )
    default = rwmh.sample(key, logdensity, initial, num_samples=1000, progress_bar=False)
    report = convergence.check(default.positions, until)
    print(
        f"  default fixed length 1000: max R-hat {report['max_rhat']:.4f}, least bulk ESS "
        f"{report['min_ess_bulk']:.0f}, least tail ESS {report['min_ess_tail']:.0f} "
        f"({'meets' if report['converged'] else 'misses'} the bounds)"
    )


def check_cost(label, logdensity, initial, key, num_draws=1000):
    """Wall time of a compiled fixed-length call (default warmup, ``num_draws`` draws) against
    one check of all its draws: the least any rule that checks with ArviZ on all draws pays."""

    def run():
        result = rwmh.sample(key, logdensity, initial, num_samples=num_draws, progress_bar=False)
        return jax.block_until_ready(result.positions)

    run()  # compiles
    draws, call = timed(run)
    convergence.check(convergence.flat_draws(draws)[:, :100], rwmh.Converged())  # imports ArviZ
    report, check = timed(lambda: convergence.check(draws, rwmh.Converged()))
    print(
        f"\n{label}: compiled call of 1000 warmup steps and {num_draws} draws {call:.3f} s; one "
        f"check of its {np.shape(convergence.flat_draws(draws))} draws {check:.3f} s "
        f"({check / call:.2f}x the call; max R-hat {report['max_rhat']:.4f}, least bulk ESS "
        f"{report['min_ess_bulk']:.0f})"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the regression alone, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--check-cost", action="store_true", help="one call against one check, per problem"
    )
    args = parser.parse_args()
    if args.check_cost:
        print(f"jax {jax.__version__}, {jax.default_backend()}")
        check_cost(*regression_problem())
        check_cost(*gaussian_problem())
        return
    repeats = 1 if args.quick else args.repeats
    print(
        f"jax {jax.__version__}, {jax.default_backend()}, until=rwmh.Converged() "
        "(min_ess=400, max_rhat=1.01), default warmup (1000 steps)"
    )
    measure(*regression_problem(), repeats=repeats, cap=100_000)
    if not args.quick:
        measure(*gaussian_problem(), repeats=repeats, cap=20_000)


if __name__ == "__main__":
    main()
