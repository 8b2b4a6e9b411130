"""Slow acceptance runs of ``until=rwmh.Converged()`` and ``num_warmup="auto"``.

* posteriordb: the eight reference posteriors of ``tests/test_posteriordb.py``, sampled with
  ``until=rwmh.Converged(), num_warmup="auto"``, 8 chains, every other setting default: the
  run must stop converged, and on the returned draws (constrained scale, as a user reads them)
  ArviZ must give R-hat <= 1.01 and bulk and tail ESS >= 400 for every parameter, the means
  must lie within 5 combined MCSE of the references and the sds within 10%.
* Stopping does not bias: 1000 independent runs of 4 chains on a correlated Gaussian, each
  stopped by the rule of ``Converged(min_ess=400)`` (the function and schedule the driver
  uses); the coverage of mean +- 1.96 MCSE for every coordinate must lie inside the binomial
  99% band around 0.95. A deliberately early rule (R-hat alone at 1.1) must fall outside it,
  which shows that the test can fail.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.stats
from test_posteriordb import POSTERIORDB, POSTERIORS, _build

import rwmh
from rwmh import convergence
from rwmh.arviz import import_arviz, summary

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not POSTERIORDB.is_dir(), reason=f"posteriordb not found at {POSTERIORDB}")
@pytest.mark.parametrize("name", POSTERIORS)
def test_posteriordb_until_converged(name):
    import json

    folder = POSTERIORDB / name
    data = json.loads((folder / "data.json").read_text())
    logdensity, names = _build(name, data)
    init_key, key = jax.random.split(jax.random.key(0))
    initial = jax.random.uniform(init_key, (8, len(names)), minval=-2.0, maxval=2.0)
    result = rwmh.sample(
        key, logdensity, initial, until=rwmh.Converged(), num_warmup="auto", progress_bar=False
    )
    stop = result.extra["stop"]
    draws = np.asarray(result.positions, float)
    constrained = draws.copy()
    constrained[..., -1] = np.exp(draws[..., -1])
    idata = rwmh.to_inference_data({n: constrained[..., i] for i, n in enumerate(names)})
    table = summary(idata)
    reference = json.loads((folder / "reference_summary.json").read_text())["parameters"]
    lines, failures = [], []
    for parameter, ref in reference.items():
        row = table.loc[parameter]
        mcse = float(np.hypot(row["mcse_mean"], ref["mcse_mean_approx"]))
        z = (row["mean"] - ref["mean"]) / mcse
        sd_error = row["sd"] / ref["sd"] - 1.0
        lines.append(
            f"{parameter}: z {z:+.2f}, sd error {sd_error:+.3f}, R-hat {row['r_hat']:.4f}, "
            f"ESS {row['ess_bulk']:.0f}/{row['ess_tail']:.0f}"
        )
        if (
            abs(z) > 5
            or abs(sd_error) > 0.10
            or not row["r_hat"] <= 1.01
            or not min(row["ess_bulk"], row["ess_tail"]) >= 400
        ):
            failures.append(parameter)
    report = (
        f"{name}: warmup {result.num_warmup} ({result.extra['warmup']['reason']}), "
        f"stop {stop['reason']} at draw {stop['draw']}:\n  " + "\n  ".join(lines)
    )
    print(report)
    assert stop["reason"] == "converged", report
    assert not failures, report


# --- stopping does not bias ---------------------------------------------------------------------

NUM_RUNS = 1000
CHAINS_PER_RUN = 4
CAP = 6000
COV = np.array([[1.0, 0.8, 0.3], [0.8, 1.0, 0.5], [0.3, 0.5, 1.0]])


def _coverage(draws, until) -> tuple[np.ndarray, list[int]]:
    """Per run, whether mean +- 1.96 MCSE covers 0 for each coordinate, with the run stopped
    by ``until`` on the schedule of ``rwmh.sample`` (chunks of 100 draws)."""
    az = import_arviz()
    points = convergence.check_points(until.first_check, until.check_growth, 100, CAP)
    covered, stops = [], []
    for run in draws:
        for point in points:
            if convergence.check(run[:, :point], until)["converged"]:
                break
        stopped = run[:, :point]
        data = rwmh.to_inference_data(stopped)
        mcse = az.mcse(data, method="mean")["x"].values
        mean = stopped.mean(axis=(0, 1))
        covered.append(np.abs(mean) <= 1.96 * mcse)
        stops.append(point)
    return np.asarray(covered), stops


@pytest.fixture(scope="module")
def gaussian_draws():
    precision = np.linalg.inv(COV).astype(np.float32)
    dimension = COV.shape[0]

    def logdensity(x):
        return -0.5 * x @ precision @ x

    # Overdispersed starts (sd 5), no warmup: the proposal is the target's covariance at the
    # optimal scale, so each run's chains are independent of every other run's.
    chains = NUM_RUNS * CHAINS_PER_RUN
    initial = 5.0 * jax.random.normal(jax.random.key(1), (chains, dimension))
    result = rwmh.sample(
        jax.random.key(2),
        logdensity,
        initial,
        num_samples=CAP,
        num_warmup=0,
        step_size=2.38 / np.sqrt(dimension),
        proposal_cov=COV,
        chunk_size=1000,
        progress_bar=False,
    )
    return np.asarray(result.positions).reshape(NUM_RUNS, CHAINS_PER_RUN, CAP, dimension)


def _band(level=0.99, p=0.95):
    return scipy.stats.binom.interval(level, NUM_RUNS, p)


def test_stopping_does_not_bias(gaussian_draws):
    covered, stops = _coverage(gaussian_draws, rwmh.Converged(min_ess=400))
    low, high = _band()
    counts = covered.sum(axis=0)
    # A run that reaches the cap unconverged ends there, as rwmh.sample ends it (with a
    # warning); it counts like any other.
    at_cap = sum(stop == CAP for stop in stops)
    print(
        f"coverage {counts / NUM_RUNS}, band [{low / NUM_RUNS}, {high / NUM_RUNS}], "
        f"stops median {np.median(stops)}, {at_cap} of {NUM_RUNS} runs at the cap {CAP}"
    )
    assert ((counts >= low) & (counts <= high)).all(), counts


def test_an_early_stop_fails_the_same_test(gaussian_draws):
    covered, stops = _coverage(gaussian_draws, rwmh.Converged(min_ess=0, max_rhat=1.1))
    low, high = _band()
    counts = covered.sum(axis=0)
    print(f"early rule: coverage {counts / NUM_RUNS}, stops median {np.median(stops)}")
    assert ((counts < low) | (counts > high)).any(), counts


# --- rwmh regress -----------------------------------------------------------------------------


def test_regress_defaults_twenty_seeds(capsys):
    """``rwmh regress`` with its defaults on the built-in data ends without an R-hat warning
    on every one of 20 seeds."""
    from rwmh import cli

    lines = []
    for seed in range(20):
        status = cli.main(["regress", "--no-progress", "--seed", str(seed)])
        out, err = capsys.readouterr()
        stop = next(line for line in out.splitlines() if line.startswith("sampling stopped"))
        rhat = max(float(line.split()[-1]) for line in out.splitlines()[-3:])
        lines.append(f"seed {seed}: {stop}; max R-hat {rhat}; stderr {err.strip()!r}")
        assert status == 0, err
        assert "warning" not in err, lines[-1]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
