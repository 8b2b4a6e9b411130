"""Tests of the pooled window adaptation (``rwmh.adaptation``) and of warmup in ``rwmh.sample``."""

from __future__ import annotations

import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scale_worker

import rwmh
from rwmh import chains, tuning

DIMENSION = 10


def _rotated_gaussian(seed: int = 0, dimension: int = DIMENSION):
    """Covariance with eigenvalues log-spaced from 1e-2 to 1e2 in a random rotation."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(dimension, dimension)))
    covariance = (rotation * np.logspace(-2, 2, dimension)) @ rotation.T
    return covariance


COVARIANCE = _rotated_gaussian()
PRECISION = jnp.asarray(np.linalg.inv(COVARIANCE), jnp.float32)


def rotated_logdensity(x):
    # A module-level function, so that every test reuses the same compiled warmup.
    return -0.5 * x @ PRECISION @ x


def _relative_spread(matrix, covariance):
    """max / min eigenvalue of ``Sigma^{-1/2} A Sigma^{-1/2}``: 1 when A is a multiple of Sigma."""
    values, vectors = np.linalg.eigh(covariance)
    inverse_root = (vectors / np.sqrt(values)) @ vectors.T
    eigenvalues = np.linalg.eigvalsh(inverse_root @ matrix @ inverse_root)
    return eigenvalues.max() / eigenvalues.min()


# --- the estimator on an ill-conditioned Gaussian ------------------------------------------


@pytest.mark.parametrize("num_chains", [4, 8])
def test_adapted_proposal_matches_target_shape(num_chains):
    """``step_size**2 * proposal_cov`` is close to a multiple of the target covariance (spread
    below 4, against 1e4 for the identity) and sampling then accepts 15-50% of proposals."""
    key = jax.random.key(0)
    initial = jax.random.uniform(jax.random.key(1), (num_chains, DIMENSION), minval=-2, maxval=2)
    result = rwmh.sample(key, rotated_logdensity, initial, num_samples=500, progress_bar=False)
    step_size = float(result.parameters["step_size"])
    adapted = step_size**2 * np.asarray(result.parameters["proposal_cov"], float)
    assert _relative_spread(adapted, COVARIANCE) < 4.0
    acceptance = float(np.mean(result.stats["acceptance_rate"]))
    assert 0.15 < acceptance < 0.5


def test_diagonal_adaptation_learns_the_variances():
    """``dense=False`` adapts a vector of variances; on a diagonal target with variances from
    1e-2 to 1e2 they come out proportional to the true ones (ratio spread below 2)."""
    variances = np.logspace(-2, 2, 6)
    inverse = jnp.asarray(1.0 / variances, jnp.float32)

    def logdensity(x):
        return -0.5 * jnp.sum(x * x * inverse)

    warmup = rwmh.window_adaptation(logdensity, dense=False)
    initial = jax.random.uniform(jax.random.key(2), (8, 6), minval=-2, maxval=2)
    (states, parameters), info = warmup.run(jax.random.key(3), initial, 1000)
    proposal_cov = np.asarray(parameters["proposal_cov"])
    assert proposal_cov.shape == (6,)
    ratio = proposal_cov / variances
    assert ratio.max() / ratio.min() < 2.0
    assert info.acceptance_rate.shape == (1000, 8)


def test_step_size_reaches_the_target_acceptance():
    """In one dimension the pooled Robbins-Monro recursion tunes toward 0.44; the acceptance
    of the fixed kernel afterwards is within 0.05 of it (about 8 Monte Carlo SEs for the
    4000 correlated acceptance probabilities used here)."""
    result = rwmh.sample(
        jax.random.key(4),
        lambda x: -0.5 * jnp.sum(x**2) / 9.0,
        jnp.zeros((4, 1)),
        num_samples=1000,
        progress_bar=False,
    )
    assert tuning.default_target_acceptance_rate(1) == pytest.approx(0.44)
    assert abs(float(np.mean(result.stats["acceptance_rate"])) - 0.44) < 0.05
    # The adapted proposal sd (step size times sd of the proposal) is near the optimum of
    # about 2.4 target sds (Gelman, Roberts & Gilks 1996), so within a factor 1.5 of it.
    scale = float(result.parameters["step_size"]) * np.sqrt(
        float(np.asarray(result.parameters["proposal_cov"]).reshape(-1)[0])
    )
    assert 2.4 * 3.0 / 1.5 < scale < 2.4 * 3.0 * 1.5


# --- the pooled moment accumulator ----------------------------------------------------------


def test_weighted_moments_match_numpy():
    """Merging batches of weighted points gives numpy's weighted mean and covariance."""
    rng = np.random.default_rng(0)
    points = rng.normal(size=(3, 10, 4)) * np.array([1e-3, 1.0, 10.0, 100.0]) + 5.0
    # Compare on the float32 points themselves: rounding them to float32 is not the
    # accumulator's error (it is 3e-4 sd for the first column, sd 1e-3 around 5).
    points = points.astype(np.float32).astype(float)
    weights = rng.uniform(size=(3, 10))
    for dense in (True, False):
        state = tuning.init(4, jnp.float64 if jax.config.x64_enabled else jnp.float32, dense=dense)
        for batch, batch_weights in zip(points, weights, strict=True):
            state = tuning.accumulate(
                state, jnp.asarray(batch, state.mean.dtype), jnp.asarray(batch_weights)
            )
        flat_points, flat_weights = points.reshape(-1, 4), weights.reshape(-1)
        expected_mean = np.average(flat_points, axis=0, weights=flat_weights)
        expected = np.cov(flat_points.T, aweights=flat_weights, ddof=0)
        np.testing.assert_allclose(state.weight, flat_weights.sum(), rtol=1e-5)
        np.testing.assert_allclose(state.mean, expected_mean, rtol=1e-5)
        covariance = np.asarray(state.m2, float) / float(state.weight)
        # float32 sums: judge each entry on the scale of its standard deviations, so that the
        # test does not depend on how the parameters are scaled.
        sd = np.sqrt(np.diag(expected))
        if dense:
            assert np.max(np.abs(covariance - expected) / np.outer(sd, sd)) < 1e-4
        else:
            assert np.max(np.abs(covariance - np.diag(expected)) / sd**2) < 1e-4


def test_update_with_one_chain_and_under_vmap():
    """``update`` takes any number of chains, one included, and works under ``jax.vmap`` (as
    when NumPyro vmaps a single-chain kernel): vmapped results equal one call per chain."""
    dimension, num_chains = 3, 5
    rng = np.random.default_rng(1)
    positions = jnp.asarray(rng.normal(size=(num_chains, dimension)), jnp.float32)
    proposals = positions + jnp.asarray(rng.normal(size=(num_chains, dimension)), jnp.float32)
    rates = jnp.asarray(rng.uniform(size=num_chains), jnp.float32)
    schedule = tuning.build_schedule(200)
    state = tuning.init(dimension, jnp.float32)

    @jax.jit
    def run(state, position, proposal, rate):
        # Three steps inside a slow window, the last one ending it.
        for row in (schedule.at(75), schedule.at(76), schedule.at(99)):
            state = tuning.update(state, row, position, proposal, rate, 0.3)
        return state

    one_chain = [
        run(state, positions[i : i + 1], proposals[i : i + 1], rates[i : i + 1])
        for i in range(num_chains)
    ]
    states = jax.tree_util.tree_map(lambda x: jnp.stack([x] * num_chains), state)
    batched = jax.vmap(run)(states, positions, proposals, rates)
    for i, single in enumerate(one_chain):
        leaves = jax.tree_util.tree_leaves_with_path(single)
        for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(batched), strict=True):
            np.testing.assert_allclose(a, b[i], rtol=1e-5, atol=1e-6, err_msg=str(path))
    # A single chain given without its chain axis, as a vmapped kernel sees it.
    unbatched = run(state, positions[0], proposals[0], rates[0])
    np.testing.assert_allclose(unbatched.proposal_cov, one_chain[0].proposal_cov, rtol=1e-6)
    assert np.isfinite(np.asarray(unbatched.step_size))
    # The pooled update over all chains keeps the public fields the kernel uses.
    pooled = run(state, positions, proposals, rates)
    factor = pooled.proposal.factor
    assert pooled.step_size.shape == () and factor.shape == (dimension, dimension)
    np.testing.assert_allclose(factor @ factor.T, pooled.proposal_cov, rtol=1e-4, atol=1e-6)


def _far_start_positions(num_chains=8, far=(3,)):
    """Chains of a narrow 2-d Gaussian (sd 0.1) at its mode, but ``far`` ones 1000 sds off:
    a random walk with steps fit for the bulk needs far more than a warmup to come back."""
    positions = np.zeros((num_chains, 2), np.float32)
    positions[list(far)] = 100.0
    return jnp.asarray(positions)


def _narrow(x):
    return -0.5 * jnp.sum((x / 0.1) ** 2)


def test_stranded_chains_restart_reported_and_warned():
    """A chain stranded far below the others restarts from a chain in the typical set; the
    warmup trace counts it, the result reports where, and a warning says so."""
    positions = _far_start_positions()
    with pytest.warns(rwmh.RestartWarning, match=r"warmup moved 1 chain whose .*1 at step 100"):
        result = rwmh.sample(
            jax.random.key(0),
            _narrow,
            positions,
            num_samples=50,
            num_warmup=500,
            progress_bar=False,
        )
    assert result.extra["restarted_chains"] == {100: 1}
    assert int(np.sum(result.warmup_info.num_restarted)) == 1
    assert float(np.max(np.abs(result.positions))) < 1.0
    with pytest.warns(rwmh.RestartWarning, match="warmup moved 1 chain "):
        (_, _), info = rwmh.window_adaptation(_narrow).run(jax.random.key(0), positions, 500)
    assert int(np.sum(info.num_restarted)) == 1


def _sample_without_warnings(seed, logdensity, positions, num_warmup, **kwargs):
    """``rwmh.sample`` (50 draws) with every warning an error: no restart may be announced."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return rwmh.sample(
            jax.random.key(seed),
            logdensity,
            positions,
            num_samples=50,
            num_warmup=num_warmup,
            progress_bar=False,
            **kwargs,
        )


def test_restarts_can_be_turned_off():
    """With restart_stranded=False no chain is moved and nothing is warned (the same run
    restarts one chain with restarts on, as the test above shows)."""
    positions = _far_start_positions()
    result = _sample_without_warnings(0, _narrow, positions, 500, restart_stranded=False)
    assert result.extra["restarted_chains"] == {}
    assert int(np.sum(result.warmup_info.num_restarted)) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = rwmh.window_adaptation(_narrow, restart_stranded=False).run(
            jax.random.key(0), positions, 500
        )
    assert int(np.sum(info.num_restarted)) == 0


def test_equal_mass_modes_keep_their_chains():
    """Two modes of equal mass and different widths, 2 of 8 chains started in the wide one:
    the restart rule moves none of them, so the wide mode keeps its draws (tests/
    test_stragglers.py has a case in d = 100 where the former median rule would move them).
    The pooled proposal lets chains cross between these modes, so no chain's mode is fixed."""

    def bimodal(x):
        narrow = -0.5 * jnp.sum((x + 10.0) ** 2)
        wide = -0.5 * jnp.sum(((x - 10.0) / 2.0) ** 2) - 2 * jnp.log(2.0)
        return jnp.logaddexp(narrow, wide)

    positions = jnp.asarray([[10.0, 10.0]] * 2 + [[-10.0, -10.0]] * 6)
    result = _sample_without_warnings(1, bimodal, positions, 1000)
    assert result.extra["restarted_chains"] == {}
    assert int(np.sum(result.warmup_info.num_restarted)) == 0
    assert np.mean(result.positions[..., 0] > 0) > 0.05


# --- the schedule and the compiled loop -----------------------------------------------------


def test_slow_windows_are_numpyros_for_every_length_up_to_3000():
    from numpyro.infer.hmc_util import build_adaptation_schedule

    for num_steps in range(3001):
        # NumPyro's list is (initial buffer, slow windows..., final buffer); below 20 steps
        # it is one window that rwmh does not adapt the covariance in.
        expected = [] if num_steps < 20 else build_adaptation_schedule(num_steps)[1:-1]
        assert tuning.slow_windows(num_steps) == [tuple(w) for w in expected], num_steps


def test_building_a_schedule_does_not_import_numpyro():
    code = "import sys, rwmh.tuning as t; t.build_schedule(1000); print('numpyro' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_schedule_windows():
    schedule = tuning.build_schedule(1000)
    table = np.stack(schedule, axis=1)
    assert table.shape == (1000, 4) and schedule.num_steps == 1000
    ends = list(np.flatnonzero(schedule.window_end) + 1)
    assert ends == [100, 150, 250, 450, 950]
    assert not table[:75].any() and not table[950:].any()
    assert schedule.slow_window[75:950].all()
    # Refreshes fall strictly inside windows, every 25 steps.
    refreshes = np.flatnonzero(schedule.refresh) + 1
    assert not (schedule.window_end[refreshes - 1]).any()
    assert set(np.diff(refreshes)) <= {25, 50, 75}
    # Short warmups: buffers scale down, very short ones adapt only the step size.
    assert tuning.build_schedule(100).slow_window.sum() == 100 - 15 - 10
    assert not np.stack(tuning.build_schedule(19)).any()
    assert tuning.build_schedule(0).num_steps == 0
    # Stranded chains restart at every window end but the last.
    assert list(np.flatnonzero(schedule.restart) + 1) == [100, 150, 250, 450]


def test_warmup_compiles_once():
    """The schedule is data, not structure: windows of any length reuse one compilation."""
    warmup = rwmh.window_adaptation(rotated_logdensity)
    initial = jnp.zeros((4, DIMENSION))
    warmup.run(jax.random.key(0), initial, 300)
    size = chains.run_warmup._cache_size()
    warmup.run(jax.random.key(1), initial + 0.5, 300)
    assert chains.run_warmup._cache_size() == size
    # Other windows, same number of steps: still no new compilation.
    states, adapt = chains.initial_state(rotated_logdensity, initial)
    other = tuning.build_schedule(300, refresh_interval=10)._replace(
        slow_window=np.roll(tuning.build_schedule(300).slow_window, -30)
    )
    keys = chains.chain_keys(jax.random.key(2), 4)
    steps = np.arange(300, dtype=np.uint32)
    chains.run_warmup(rotated_logdensity, None, keys, states, adapt, steps, other)
    assert chains.run_warmup._cache_size() == size
    # And through rwmh.sample, whose warmup is the same compiled function.
    rwmh.sample(jax.random.key(3), rotated_logdensity, initial, 10, 300, progress_bar=False)
    assert chains.run_warmup._cache_size() == size


def test_adaptation_stops_after_warmup():
    """Sampling after warmup is the fixed kernel with the returned parameters: sampling again
    from the warmup's final states with those parameters and no warmup gives the same draws."""
    key = jax.random.key(5)
    initial = jax.random.uniform(jax.random.key(6), (4, DIMENSION), minval=-2, maxval=2)
    adapted = rwmh.sample(
        key, rotated_logdensity, initial, num_samples=200, num_warmup=300, progress_bar=False
    )
    warmup_key, _ = jax.random.split(key)
    (states, parameters), _ = rwmh.window_adaptation(rotated_logdensity).run(
        warmup_key, initial, 300
    )
    for name in ("step_size", "proposal_cov"):
        np.testing.assert_array_equal(parameters[name], adapted.parameters[name])
    fixed = rwmh.sample(
        key,
        rotated_logdensity,
        states.position,
        num_samples=200,
        num_warmup=0,
        progress_bar=False,
        **parameters,
    )
    np.testing.assert_allclose(fixed.positions, adapted.positions, rtol=1e-4, atol=1e-5)


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.0, 1.0, -0.2, 1.5])
def test_target_acceptance_rate_outside_unit_interval(target):
    with pytest.raises(ValueError, match="target_acceptance_rate"):
        rwmh.window_adaptation(rotated_logdensity, target_acceptance_rate=target)
    with pytest.raises(ValueError, match="target_acceptance_rate"):
        rwmh.sample(
            jax.random.key(0),
            rotated_logdensity,
            jnp.zeros((2, DIMENSION)),
            target_acceptance_rate=target,
            progress_bar=False,
        )


def test_negative_num_steps():
    warmup = rwmh.window_adaptation(rotated_logdensity)
    with pytest.raises(ValueError, match="num_steps"):
        warmup.run(jax.random.key(0), jnp.zeros((2, DIMENSION)), -1)
    with pytest.raises(ValueError, match="num_steps"):
        tuning.build_schedule(-5)
    with pytest.raises(ValueError, match="num_warmup"):
        rwmh.sample(
            jax.random.key(0),
            rotated_logdensity,
            jnp.zeros((2, DIMENSION)),
            num_warmup=-1,
            progress_bar=False,
        )


def test_positions_without_chain_axis():
    warmup = rwmh.window_adaptation(lambda p: -0.5 * (p["a"] ** 2 + jnp.sum(p["b"] ** 2)))
    with pytest.raises(ValueError, match="positions"):
        warmup.run(jax.random.key(0), {"a": jnp.float32(0.0), "b": jnp.zeros(3)}, 100)
    # Leaves that disagree on the chain axis.
    with pytest.raises(ValueError, match="positions"):
        warmup.run(jax.random.key(0), {"a": jnp.zeros(4), "b": jnp.zeros((3, 3))}, 100)
    with pytest.raises(ValueError, match="positions"):
        rwmh.sample(jax.random.key(0), lambda x: -0.5 * x**2, jnp.float32(0.0), progress_bar=False)


def test_final_buffer_grows_when_few_chains_pool():
    # The final step size rests on at least 200 chain-steps (issue 18, item 7); from four
    # chains on, and without a chain count, the windows are NumPyro's.
    def ends(num_steps, num_chains):
        schedule = tuning.build_schedule(num_steps, num_chains=num_chains)
        return list(np.flatnonzero(schedule.window_end) + 1)

    assert ends(1000, 1) == [100, 150, 250, 800]
    assert ends(1000, 2) == [100, 150, 250, 450, 900]
    assert ends(1000, 3) == [100, 150, 250, 450, 933]
    for num_chains in (4, 64, None):
        assert ends(1000, num_chains) == [100, 150, 250, 450, 950]
    # It never takes the initial buffer or the first window: 300 steps leave 75 + 25.
    assert ends(300, 1) == [100] and ends(160, 1) == [100]
    # Below Stan's 150 steps NumPyro's proportional buffers apply unchanged.
    assert ends(149, 1) == ends(149, None) == [135]
    with pytest.raises(ValueError, match="num_chains"):
        tuning.build_schedule(1000, num_chains=0)


def test_one_chain_samples_near_the_target_acceptance():
    """One chain adapting alone: its sampling acceptance stays close to the target.

    Over 48 seeds of this run (regression posterior, d = 3, target 0.310; 1000 warmup steps
    and 1000 draws) the sampling acceptance had sd 0.054 and rms distance from the target
    0.053 when the step size rested on Stan's 50-step final buffer, and sd and rms 0.029
    with the 200-step buffer of one chain (each run's own Monte Carlo error is 0.011 of
    that). With 48 runs the rms is known to about 10%: 0.038 lies about three of those from
    either.
    """
    target = tuning.default_target_acceptance_rate(3)
    acceptance = []
    for seed in range(48):
        key, init_key = jax.random.split(jax.random.key(1000 + seed))
        start = jnp.array([[0.5, 1.5, 0.0]]) + 0.1 * jax.random.normal(init_key, (1, 3))
        result = rwmh.sample(
            key,
            scale_worker.regression_logdensity,
            start,
            num_samples=1000,
            num_warmup=1000,
            progress_bar=False,
        )
        acceptance.append(float(np.mean(result.stats["acceptance_rate"])))
    acceptance = np.array(acceptance)
    rms = float(np.sqrt(np.mean((acceptance - target) ** 2)))
    assert rms < 0.038, (rms, acceptance)
    # No bias either: the mean of 48 runs, sd 0.029 / sqrt(48) = 0.004, within 3 of those.
    assert abs(acceptance.mean() - target) < 0.012, acceptance.mean()


# --- the stride of the moments in many dimensions --------------------------------------------


def test_moment_stride_rule():
    """Every step below 50 parameters, every floor(d / 25)-th from there, at most every 8th."""
    strides = {d: tuning.moment_stride(d) for d in (1, 3, 49, 50, 74, 75, 100, 199, 200, 5000)}
    assert strides == {1: 1, 3: 1, 49: 1, 50: 2, 74: 2, 75: 3, 100: 4, 199: 7, 200: 8, 5000: 8}
    with pytest.raises(ValueError, match="dimension"):
        tuning.moment_stride(0)


def test_update_with_a_stride_adds_every_kth_step_with_weight_k():
    """With ``moment_stride`` k only steps whose index is a multiple of k join the moments, each
    weighted k; the step size adapts at every step all the same."""
    dimension, num_chains, stride = 3, 4, 3
    rng = np.random.default_rng(2)
    schedule = tuning.build_schedule(200)
    state = tuning.init(dimension, jnp.float32)
    strided, plain = state, state
    for index in range(76, 76 + 7):  # inside the first slow window, before its first refresh
        positions = jnp.asarray(rng.normal(size=(num_chains, dimension)), jnp.float32)
        proposals = positions + jnp.asarray(rng.normal(size=(num_chains, dimension)), jnp.float32)
        rates = jnp.asarray(rng.uniform(size=num_chains), jnp.float32)
        row = schedule.at(index)
        strided = tuning.update(
            strided, row, positions, proposals, rates, 0.3, step_index=index, moment_stride=stride
        )
        points = jnp.concatenate([positions, proposals])
        weights = jnp.concatenate([1.0 - rates, rates])
        if index % stride == 0:
            plain = tuning.accumulate(plain, points, stride * weights)
        # The step size recursion sees every step.
        full = tuning.update(state, row, positions, proposals, rates, 0.3)
        state = full
        np.testing.assert_allclose(strided.step_size, full.step_size, rtol=1e-6)
    np.testing.assert_allclose(strided.weight, plain.weight, rtol=1e-6)
    np.testing.assert_allclose(strided.mean, plain.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(strided.m2, plain.m2, rtol=1e-4, atol=1e-5)
    # Two of the seven steps (78 and 81) joined, each with weight 3 per chain-step.
    np.testing.assert_allclose(strided.weight, 2 * stride * num_chains, rtol=1e-6)
    with pytest.raises(ValueError, match="step_index"):
        tuning.update(state, row, positions, proposals, rates, 0.3, moment_stride=2)


def test_strided_warmup_is_the_same_in_chunks():
    """In 60 dimensions (stride 2) the stride follows the global step, not the chunk: warmup
    in chunks of 7 steps gives bit for bit the run of one chunk."""
    dimension = 60
    assert tuning.moment_stride(dimension) == 2
    logdensity = lambda x: -0.5 * jnp.sum(x**2 * jnp.linspace(1.0, 4.0, dimension))
    start = np.random.default_rng(3).normal(size=(4, dimension)).astype(np.float32)
    runs = [
        rwmh.sample(
            jax.random.key(1),
            logdensity,
            start,
            num_warmup=160,
            num_samples=10,
            chunk_size=chunk,
            progress_bar=False,
        )
        for chunk in (None, 7)
    ]
    np.testing.assert_array_equal(
        runs[0].parameters["proposal_cov"], runs[1].parameters["proposal_cov"]
    )
    np.testing.assert_array_equal(runs[0].positions, runs[1].positions)
