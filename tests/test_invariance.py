"""One-step invariance of the random-walk Metropolis-Hastings kernel (rwmh.kernel).

A Metropolis-Hastings kernel ``K`` leaves its target ``pi`` invariant: if ``X ~ pi`` and
``X' ~ K(X, .)`` then ``X' ~ pi``. So ``NUM_CHAINS`` independent chains started from *exact*
draws of the target must, after ONE vmapped step, still be exact draws. Unlike a long-run
moment test this needs no burn-in or ESS, and any bias of the step (a wrong acceptance
probability, a proposal correlated with the acceptance uniform, an accepted out-of-support
proposal) shows at once, with no mixing to dilute it.

Each case (target x proposal kind) computes, with fixed seeds:

* paired z-scores: for each test function ``f``, the differences ``f(X') - f(X)`` are i.i.d.
  across chains with mean 0 under invariance, so ``z = mean / (sd / sqrt(N))`` is
  asymptotically standard normal. Pairing cancels most of the sampling noise of the start,
  which makes these the sharpest statistics;
* exact z-scores: ``(mean f(X') - E_pi f) / (sd f(X') / sqrt(N))`` against closed-form moments;
* two-sample Kolmogorov-Smirnov p-values between ``X'`` and a fresh, independent exact sample
  of the same size, on each coordinate and on fixed random 1-d projections.

Thresholds: Bonferroni over every statistic in this file, with family-wise false-alarm
probability ``FAMILY_ALPHA`` for a correct kernel. Each of the ``len(CASES)`` cases gets
``FAMILY_ALPHA / len(CASES)``, split evenly over its ``m`` statistics; a z-score fails when
``|z| > norm.isf(alpha / 2)`` (two-sided, about 4.5 for the 3-d Gaussian's m = 26) and a KS
test when ``p < alpha``. The thresholds follow from ``FAMILY_ALPHA`` and the counts alone; none
is tuned to the observed values.

The step sizes give a moderate acceptance rate (checked to lie in ``ACCEPTANCE_BAND``), so that
neither "always rejected" (trivially invariant) nor "always accepted" makes the test vacuous.
``tests/test_mutation.py`` checks that these tests fail on deliberately broken kernels.
"""

import zlib
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import rwmh

NUM_CHAINS = 200_000
FAMILY_ALPHA = 1e-3
ACCEPTANCE_BAND = (0.2, 0.6)
NUM_PROJECTIONS = 3


class Target(NamedTuple):
    """A target with exact draws and exact moments.

    logdensity
        JAX log density of one position ``(d,)``, up to a constant; ``-inf`` off the support.
    sample
        ``sample(rng, n)``: ``n`` exact independent draws, a float64 ``(n, d)`` NumPy array.
    mean, second_moment
        Exact ``E[x]`` and ``E[x x^T]``.
    extras
        More test functions: ``(name, f, exact)`` with ``f`` mapping ``(n, d)`` to ``(n,)`` and
        ``exact`` its expectation under the target (None where no closed form is used).
    proposals
        ``{"diagonal": (step_size, variances), "dense": (step_size, covariance)}``.
    in_support
        ``in_support(x)``, a boolean ``(n,)``, for a target with a bounded support, else None.
    """

    logdensity: Callable
    sample: Callable
    mean: np.ndarray
    second_moment: np.ndarray
    extras: tuple
    proposals: dict
    in_support: Callable | None = None


def gaussian_target() -> Target:
    """A correlated 3-d Gaussian; exact draws ``mean + L z`` with ``L`` its Cholesky factor."""
    mean = np.array([1.0, -2.0, 0.5])
    sd = np.array([1.0, 2.0, 0.5])
    correlation = np.array([[1.0, 0.6, -0.3], [0.6, 1.0, 0.4], [-0.3, 0.4, 1.0]])
    cov = correlation * np.outer(sd, sd)
    lower = np.linalg.cholesky(cov)
    precision = jnp.asarray(np.linalg.inv(cov), jnp.float32)
    mean32 = jnp.asarray(mean, jnp.float32)

    def logdensity(x):
        centred = x - mean32
        return -0.5 * centred @ precision @ centred

    def sample(rng, n):
        return mean + rng.standard_normal((n, 3)) @ lower.T

    above = ("1{x0 > mean0 + sd0}", lambda x: (x[:, 0] > mean[0] + sd[0]) * 1.0, stats.norm.sf(1))
    return Target(
        logdensity,
        sample,
        mean,
        cov + np.outer(mean, mean),
        extras=(above,),
        proposals={"diagonal": (1.0, np.diag(cov)), "dense": (1.4, cov)},
    )


def banana_target(a: float = 1.0, b: float = 1.5) -> Target:
    """The twisted Gaussian of Haario et al. (1999), scaled down: ``x0 ~ N(0, a^2)`` and
    ``x1 | x0 ~ N(b (x0^2 - a^2), 1)``; exact draws by that transform.

    Moments: ``E x = 0``, ``E x0^2 = a^2``, ``E x0 x1 = 0``, ``E x1^2 = 1 + 2 b^2 a^4`` and
    ``E x0^2 x1 = b (E x0^4 - a^2 E x0^2) = 2 b a^4``.
    """

    def logdensity(x):
        return -0.5 * (x[0] / a) ** 2 - 0.5 * (x[1] - b * (x[0] ** 2 - a**2)) ** 2

    def sample(rng, n):
        x0 = a * rng.standard_normal(n)
        return np.stack([x0, b * (x0**2 - a**2) + rng.standard_normal(n)], axis=1)

    var1 = 1 + 2 * b**2 * a**4
    # The target is uncorrelated; the dense proposal is correlated all the same, so that it
    # runs the (d, d) factor's code path with a genuinely dense factor.
    dense = np.array([[a**2, 0.5 * a * np.sqrt(var1)], [0.5 * a * np.sqrt(var1), var1]])
    return Target(
        logdensity,
        sample,
        np.zeros(2),
        np.diag([a**2, var1]),
        extras=(
            ("x0^2 x1", lambda x: x[:, 0] ** 2 * x[:, 1], 2 * b * a**4),
            ("1{x0 > a}", lambda x: (x[:, 0] > a) * 1.0, stats.norm.sf(1)),
        ),
        proposals={"diagonal": (0.9, np.array([a**2, var1])), "dense": (0.9, dense)},
    )


def truncated_target() -> Target:
    """A correlated, mean-zero 2-d Gaussian ``N(0, S)`` restricted to the half-plane
    ``x0 >= 0``; the log density is ``-inf`` on the other side, where many proposals land.

    Exact draws: ``x0 = s0 |z0|`` (half-normal) and ``x1 | x0 ~ N(beta x0, S11 - beta^2 s0^2)``
    with ``beta = S01 / S00``. The second moments are those of ``N(0, S)`` (the truncation is
    symmetric under ``x -> -x``); ``E x0 = s0 sqrt(2 / pi)`` and ``E x1 = beta E x0``.
    """
    sd = np.array([1.0, 1.5])
    cov = np.array([[1.0, 0.7], [0.7, 1.0]]) * np.outer(sd, sd)
    precision = jnp.asarray(np.linalg.inv(cov), jnp.float32)
    beta = cov[0, 1] / cov[0, 0]
    residual_sd = np.sqrt(cov[1, 1] - beta**2 * cov[0, 0])

    def logdensity(x):
        return jnp.where(x[0] >= 0, -0.5 * x @ precision @ x, -jnp.inf)

    def sample(rng, n):
        x0 = sd[0] * np.abs(rng.standard_normal(n))
        return np.stack([x0, beta * x0 + residual_sd * rng.standard_normal(n)], axis=1)

    mean_x0 = sd[0] * np.sqrt(2 / np.pi)
    return Target(
        logdensity,
        sample,
        np.array([mean_x0, beta * mean_x0]),
        cov,
        extras=(("1{x0 > s0}", lambda x: (x[:, 0] > sd[0]) * 1.0, 2 * stats.norm.sf(1)),),
        proposals={"diagonal": (1.2, np.diag(cov)), "dense": (1.2, cov)},
        in_support=lambda x: x[:, 0] >= 0,
    )


TARGETS = {"gaussian": gaussian_target, "banana": banana_target, "truncated": truncated_target}
CASES = [(name, kind) for name in TARGETS for kind in ("diagonal", "dense")]


def moment_functions(target: Target):
    """``(name, f, exact)`` for each coordinate, each product ``x_i x_j`` (i <= j) and the
    target's extras."""
    dimension = target.mean.shape[0]
    functions = [(f"x{i}", lambda x, i=i: x[:, i], target.mean[i]) for i in range(dimension)]
    functions += [
        (f"x{i} x{j}", lambda x, i=i, j=j: x[:, i] * x[:, j], target.second_moment[i, j])
        for i in range(dimension)
        for j in range(i, dimension)
    ]
    return functions + list(target.extras)


def one_step(target: Target, kind: str, seed: int):
    """Exact draws ``before``, one kernel step to ``after``, and a fresh exact sample; all
    float32 values returned as float64 arrays, with the step's info."""
    rng = np.random.default_rng(seed)
    before = target.sample(rng, NUM_CHAINS).astype(np.float32)
    fresh = target.sample(rng, NUM_CHAINS).astype(np.float32).astype(np.float64)
    step_size, proposal_cov = target.proposals[kind]
    algo = rwmh.random_walk(target.logdensity, step_size, proposal_cov)
    states = jax.vmap(algo.init)(jnp.asarray(before))
    keys = jax.random.split(jax.random.key(seed), NUM_CHAINS)
    new_states, info = jax.jit(jax.vmap(algo.step))(keys, states)
    after = np.asarray(new_states.position, dtype=np.float64)
    return before.astype(np.float64), after, fresh, info


def invariance_statistics(target_name: str, kind: str) -> dict:
    """Every statistic of one case, with its threshold: ``{"z": {name: z}, "ks": {name: p},
    "z_threshold", "p_threshold", "acceptance", ...}``."""
    target = TARGETS[target_name]()
    seed = zlib.crc32(f"{target_name}-{kind}".encode())
    before, after, fresh, info = one_step(target, kind, seed)
    root_n = np.sqrt(NUM_CHAINS)

    z = {}
    for name, f, exact in moment_functions(target):
        difference = f(after) - f(before)
        sd = difference.std(ddof=1)
        z[f"paired {name}"] = 0.0 if sd == 0 else difference.mean() / (sd / root_n)
        if exact is not None:
            values = f(after)
            z[f"exact {name}"] = (values.mean() - exact) / (values.std(ddof=1) / root_n)

    dimension = target.mean.shape[0]
    directions = np.random.default_rng(seed + 1).standard_normal((NUM_PROJECTIONS, dimension))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    ks = {f"KS x{i}": stats.ks_2samp(after[:, i], fresh[:, i]).pvalue for i in range(dimension)}
    for direction in directions:
        projection = "KS (" + ", ".join(f"{c:+.2f}" for c in direction) + ").x"
        ks[projection] = stats.ks_2samp(after @ direction, fresh @ direction).pvalue

    alpha = FAMILY_ALPHA / len(CASES) / (len(z) + len(ks))
    proposal_logdensity = np.asarray(info.proposal.logdensity)
    return {
        "z": z,
        "ks": ks,
        "z_threshold": stats.norm.isf(alpha / 2),
        "p_threshold": alpha,
        "acceptance": float(np.mean(np.asarray(info.is_accepted))),
        "off_support_proposals": float(np.mean(~np.isfinite(proposal_logdensity))),
        "after_in_support": None if target.in_support is None else target.in_support(after),
    }


@pytest.mark.parametrize(("target_name", "kind"), CASES, ids=[f"{t}-{k}" for t, k in CASES])
def test_one_step_leaves_the_target_invariant(target_name, kind):
    result = invariance_statistics(target_name, kind)
    z_threshold, p_threshold = result["z_threshold"], result["p_threshold"]
    # Written as "not within" so that a NaN statistic (say, NaN positions) fails too.
    failures = [
        f"{name}: z = {z:+.2f}" for name, z in result["z"].items() if not abs(z) <= z_threshold
    ]
    failures += [f"{name}: p = {p:.2e}" for name, p in result["ks"].items() if not p >= p_threshold]
    assert not failures, (
        f"not invariant: one step of {rwmh.kernel.__file__} changes the {target_name} target "
        f"({kind} proposal); thresholds |z| <= {z_threshold:.2f}, p >= {p_threshold:.1e}:\n"
        + "\n".join(failures)
    )

    if result["after_in_support"] is not None:
        # The support check is exact, not statistical: a chain that started inside must stay.
        outside = int(np.sum(~result["after_in_support"]))
        assert outside == 0, f"not invariant: {outside} chains left the support"
        # ... and the -inf branch of the kernel must really have been taken, often.
        assert result["off_support_proposals"] > 0.05, result["off_support_proposals"]

    # Checked after the invariance statistics, so that a broken kernel reports those; a step
    # that never (or always) moves would make them pass vacuously.
    low, high = ACCEPTANCE_BAND
    assert low < result["acceptance"] < high, result["acceptance"]
