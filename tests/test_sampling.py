"""Tests of the multi-chain driver rwmh.sample."""

import gc
import json
import os
import subprocess
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import rwmh
from rwmh import chains


def standard_normal(x):
    return -0.5 * jnp.sum(x**2)


def test_shapes_stats_and_parameters():
    result = rwmh.sample(
        jax.random.key(0),
        standard_normal,
        jnp.zeros((4, 3)),
        num_samples=50,
        num_warmup=100,
        progress_bar=False,
    )
    assert result.positions.shape == (4, 50, 3)
    assert set(result.stats) >= {"acceptance_rate", "is_accepted", "lp"}
    for value in result.stats.values():
        assert value.shape == (4, 50)
    assert result.stats["is_accepted"].dtype == bool
    np.testing.assert_allclose(
        result.stats["lp"], -0.5 * np.sum(result.positions**2, axis=-1), rtol=1e-5
    )
    assert set(result.parameters) == {"step_size", "proposal_cov"}
    assert result.last_state.position.shape == (4, 3)
    np.testing.assert_array_equal(result.last_state.position, result.positions[:, -1])


def test_pytree_positions_keep_their_structure():
    def logdensity(p):
        return standard_normal(p["loc"]) + standard_normal(p["scale"])

    positions = {"loc": jnp.zeros((3, 2)), "scale": jnp.zeros(3)}
    result = rwmh.sample(
        jax.random.key(1), logdensity, positions, num_samples=20, num_warmup=0, progress_bar=False
    )
    assert result.positions["loc"].shape == (3, 20, 2)
    assert result.positions["scale"].shape == (3, 20)


def test_explicit_parameters_without_warmup_are_used_as_given():
    cov = np.array([[2.0, 0.3], [0.3, 1.0]])
    result = rwmh.sample(
        jax.random.key(2),
        standard_normal,
        jnp.zeros((2, 2)),
        num_samples=10,
        num_warmup=0,
        step_size=0.7,
        proposal_cov=cov,
        progress_bar=False,
    )
    assert float(result.parameters["step_size"]) == pytest.approx(0.7)
    np.testing.assert_array_equal(result.parameters["proposal_cov"], cov)


def test_thin_keeps_every_thin_th_state_of_the_unthinned_chain():
    kwargs = dict(num_warmup=0, step_size=0.8, progress_bar=False)
    full = rwmh.sample(jax.random.key(3), standard_normal, jnp.zeros((2, 2)), 60, **kwargs)
    thinned = rwmh.sample(
        jax.random.key(3), standard_normal, jnp.zeros((2, 2)), 20, thin=3, **kwargs
    )
    np.testing.assert_array_equal(thinned.positions, full.positions[:, 2::3])
    np.testing.assert_array_equal(thinned.stats["lp"], full.stats["lp"][:, 2::3])
    blocks = full.stats["acceptance_rate"].reshape(2, 20, 3)
    np.testing.assert_allclose(thinned.stats["acceptance_rate"], blocks.mean(-1), rtol=1e-6)
    accepted = full.stats["is_accepted"].reshape(2, 20, 3).any(-1)
    np.testing.assert_array_equal(thinned.stats["is_accepted"], accepted)


def test_second_call_with_the_same_logdensity_does_not_compile_again():
    def logdensity(x):
        return -0.5 * jnp.sum((x - 1.0) ** 2)

    kwargs = dict(num_samples=30, num_warmup=40, progress_bar=False)
    rwmh.sample(jax.random.key(4), logdensity, jnp.zeros((4, 2)), **kwargs)
    sizes = (chains.run_sampling._cache_size(), chains.run_warmup._cache_size())
    again = rwmh.sample(jax.random.key(5), logdensity, jnp.ones((4, 2)), **kwargs)
    assert again.positions.shape == (4, 30, 2)
    assert (
        chains.run_sampling._cache_size(),
        chains.run_warmup._cache_size(),
    ) == sizes


def test_same_key_same_draws_and_different_keys_differ():
    kwargs = dict(num_samples=20, num_warmup=50, progress_bar=False)
    a = rwmh.sample(jax.random.key(6), standard_normal, jnp.zeros((3, 2)), **kwargs)
    b = rwmh.sample(jax.random.key(6), standard_normal, jnp.zeros((3, 2)), **kwargs)
    c = rwmh.sample(jax.random.key(7), standard_normal, jnp.zeros((3, 2)), **kwargs)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert not np.array_equal(a.positions, c.positions)
    # Chains are driven by different keys.
    assert not np.array_equal(a.positions[0], a.positions[1])


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "legacy"])
def test_first_draw_uses_the_documented_key_of_its_chain(make_key):
    """Chain c's first sampling step uses fold_in(fold_in(split(key)[1], c), 0) (rwmh.chains,
    "Keys"), whichever compiled program derives the chain keys."""
    positions = np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)
    key = make_key(11)
    result = rwmh.sample(
        key,
        standard_normal,
        positions,
        num_samples=1,
        num_warmup=0,
        step_size=0.7,
        progress_bar=False,
    )
    sampling_key = jax.random.split(key)[1]
    kernel = rwmh.build_kernel()
    for chain in range(3):
        step_key = jax.random.fold_in(jax.random.fold_in(sampling_key, chain), 0)
        state = rwmh.init(positions[chain], standard_normal)
        expected, _ = kernel(step_key, state, standard_normal, 0.7)
        np.testing.assert_allclose(result.positions[chain, 0], expected.position, rtol=1e-6)


def test_legacy_key_is_accepted():
    result = rwmh.sample(
        jax.random.PRNGKey(0),
        standard_normal,
        jnp.zeros((2, 2)),
        num_samples=5,
        num_warmup=5,
        progress_bar=False,
    )
    assert result.positions.shape == (2, 5, 2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": 2.5}, TypeError, "num_samples"),
        ({"num_warmup": -1}, ValueError, "num_warmup"),
        ({"thin": 0}, ValueError, "thin"),
        ({"step_size": -0.1}, ValueError, "step_size"),
        ({"proposal_cov": np.eye(3)}, ValueError, "proposal_cov"),
        ({"initial_positions": jnp.zeros(())}, ValueError, "chain axis"),
        ({"initial_positions": jnp.zeros((4, 2), jnp.int32)}, TypeError, "initial_positions"),
        ({"logdensity_fn": 3}, TypeError, "logdensity_fn"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    arguments = dict(
        rng_key=jax.random.key(0),
        logdensity_fn=standard_normal,
        initial_positions=jnp.zeros((4, 2)),
        progress_bar=False,
    )
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        rwmh.sample(**arguments)


def test_gaussian_posterior_through_the_driver():
    """End to end: warmup, then draws whose means sit within 4.5 MCSE of the truth."""
    import arviz as az

    mean = np.array([1.0, -2.0])
    cov = np.array([[1.0, 0.8], [0.8, 2.0]])
    precision = jnp.asarray(np.linalg.inv(cov))
    logdensity = lambda x: -0.5 * (x - mean) @ precision @ (x - mean)
    result = rwmh.sample(jax.random.key(8), logdensity, jnp.zeros((8, 2)), 3000, progress_bar=False)
    draws = result.positions
    mcse = np.asarray(az.mcse(az.convert_to_dataset({"x": draws}))["x"])
    assert np.all(np.abs(draws.mean(axis=(0, 1)) - mean) < 4.5 * mcse)
    sample_cov = np.cov(draws.reshape(-1, 2).T)
    assert np.all(np.abs(sample_cov - cov) < 0.1 * np.sqrt(np.outer(np.diag(cov), np.diag(cov))))


# --- data as arguments, closures, and what the compiled programs keep alive -----------------

SMALL_RUN = dict(num_samples=100, num_warmup=100, progress_bar=False)


def _resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc (Linux)")
def test_one_function_over_100_data_sets_compiles_once_and_holds_memory_flat():
    traces = []

    def logdensity(x, data):
        traces.append(None)  # runs only while a program is traced
        return -0.5 * jnp.sum((x - jnp.mean(data)) ** 2)

    positions = jnp.zeros((4, 2))
    memory, live = [], []
    for i in range(100):
        data = np.random.default_rng(i).normal(size=2**16).astype(np.float32) + i
        # Started at the data's mode: 100 warmup steps need not travel to it.
        result = rwmh.sample(
            jax.random.key(i), logdensity, positions + i, logdensity_args=(data,), **SMALL_RUN
        )
        if i == 0:
            first_traces = len(traces)
        # Each fit sees its own data: the posterior mean is the data's mean, sd 1.
        assert abs(float(result.positions.mean()) - float(data.mean())) < 0.5
        if i >= 10:
            gc.collect()
            memory.append(_resident_mb())
            live.append(len(jax.live_arrays()))
    # Traced once, at the first fit, on jax 0.10 and 0.12 alike: the initial-state program
    # and the warmup and sampling loops serve every data set.
    assert len(traces) == first_traces, (first_traces, len(traces))
    assert max(live) == min(live), live
    assert memory[-1] - memory[0] < 16.0, (memory[0], memory[-1])


#: Fits in test_closures_are_freed_with_what_they_capture.
CLOSURE_FITS = 24


def _closure_fits(keep: list | None = None) -> tuple[list, list]:
    """Fit CLOSURE_FITS closures, each capturing its own 16 MB of data; resident MB after each
    (and weak references to the closures). ``keep`` holds them, as a leak would."""
    positions = jnp.zeros((4, 2))
    memory, references = [], []
    for i in range(CLOSURE_FITS):
        data = np.random.default_rng(i).normal(size=2**22).astype(np.float32)  # 16 MB
        shift = float(data.mean())
        logdensity = lambda x, data=data: -0.5 * jnp.sum((x - jnp.mean(data)) ** 2)  # noqa: E731
        result = rwmh.sample(jax.random.key(i), logdensity, positions, **SMALL_RUN)
        assert abs(float(result.positions.mean()) - shift) < 0.5
        references.append(weakref.ref(logdensity))
        if keep is not None:
            keep.append(logdensity)
        del logdensity, data, result
        gc.collect()
        memory.append(_resident_mb())
    return memory, references


def _growth_mb_per_fit(memory: list) -> float:
    """Resident MB added per fit over fits 9-24, as the Theil-Sen slope (the median of the
    slopes between every two fits): 16 MB a fit if every fit kept its data, 44 (jax 0.12) and
    80 (jax 0.10) MB a fit measured with the closures kept alive.

    A slope, and a robust one, because on jax 0.12 the memory is not flat when nothing leaks:
    the constants a fit's programs embed stay interned in the MLIR context they were lowered
    in until it retires (every 10 lowerings, 3 per fit), so memory climbs in 16 MB steps to a
    plateau 50-90 MB up and then swings across it. Differences of two windows read a late
    climb or a swing as growth (the least of fits 17-24 less the least of fits 9-16 measured
    -48.0, 2.3, 34.5 and 52.5 MB in four runs of this code; 51.2 failed a 48 MB bound in CI).
    Over the same seven runs without a leak (three on jax 0.10, four on 0.12) this slope was
    between -1.1 and 0.4 MB a fit."""
    return float(scipy.stats.theilslopes(memory[8:]).slope)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc (Linux)")
def test_closures_are_freed_with_what_they_capture():
    """Before the fix every closure stayed in ``jax.jit``'s caches as a static argument, with
    its captured data in the compiled constants: about 75 MB more per call with 16 MB of
    data, and the closure itself never freed.

    jax 0.12 also keeps a captured array, embedded in the lowered program, interned in the
    MLIR context it was lowered in until it retires that context (it reuses one for 10
    lowerings per thread; rwmh lowers three programs per new function): a bounded amount,
    not one that grows with the number of fits, so the growth per fit is measured robustly
    (:func:`_growth_mb_per_fit`). (Passed as ``logdensity_args`` the data is never a
    constant.)"""
    memory, freed = _closure_fits_in_a_fresh_process()
    assert freed == [True] * CLOSURE_FITS
    assert _growth_mb_per_fit(memory) < 8.0, memory


def _closure_fits_in_a_fresh_process() -> tuple[list, list]:
    """:func:`_closure_fits` in a new interpreter: inside the whole suite's process (several GB
    resident by then) the allocator's own growth, about 9 MB a fit on jax 0.10, is read as a
    leak; a fresh process measures only what the fits keep."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import test_sampling as t; "
        "memory, references = t._closure_fits(); "
        "print(json.dumps([memory, [reference() is None for reference in references]]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    memory, freed = json.loads(done.stdout.strip().splitlines()[-1])
    return memory, freed


class _ByValue:
    """Hashable and equal by value of its structure, like an Equinox module: two instances
    with different data compare equal."""

    def __init__(self, mu):
        self.mu = jnp.asarray(mu)

    def __call__(self, x):
        return -0.5 * jnp.sum((x - self.mu) ** 2)

    def __eq__(self, other):
        return type(other) is type(self)

    def __hash__(self):
        return hash(type(self))


class _Unhashable(_ByValue):
    """Like an Equinox module holding arrays: hashing fails."""

    __hash__ = None


@pytest.mark.parametrize("kind", [_ByValue, _Unhashable])
def test_callables_hashable_by_value_or_unhashable_each_sample_their_own_target(kind):
    """Before the fix the log density was a static argument of ``jax.jit``: an unhashable one
    failed with "Non-hashable static arguments are not supported", and one equal by value to
    an earlier one reused its program, and its data."""
    positions = jnp.full((4, 2), 5.5)  # halfway: a stale program would go to the other mode
    near = rwmh.sample(jax.random.key(0), kind(1.0), positions, **SMALL_RUN)
    far = rwmh.sample(jax.random.key(0), kind(10.0), positions, **SMALL_RUN)
    assert abs(float(near.positions.mean()) - 1.0) < 0.5
    assert abs(float(far.positions.mean()) - 10.0) < 0.5


def test_a_bound_method_compiles_once():
    model = _ByValue(2.0)
    positions = jnp.zeros((4, 2))
    rwmh.sample(jax.random.key(0), model.__call__, positions, **SMALL_RUN)
    sizes = (chains.run_warmup._cache_size(), chains.run_sampling._cache_size())
    rwmh.sample(jax.random.key(1), model.__call__, positions, **SMALL_RUN)
    assert (chains.run_warmup._cache_size(), chains.run_sampling._cache_size()) == sizes


@pytest.mark.parametrize(
    "value, words",
    [([1.0], None), ("data", "must be a tuple"), (("text",), "must hold arrays or numbers")],
)
def test_logdensity_args_are_checked(value, words):
    logdensity = lambda x, *args: -0.5 * jnp.sum(x**2)  # noqa: E731
    if words is None:  # a list is taken as the tuple it lists
        rwmh.sample(
            jax.random.key(0), logdensity, jnp.zeros((4, 2)), logdensity_args=value, **SMALL_RUN
        )
        return
    with pytest.raises(TypeError, match=f"logdensity_args {words}"):
        rwmh.sample(jax.random.key(0), logdensity, jnp.zeros((4, 2)), logdensity_args=value)


def test_window_adaptation_and_resume_take_logdensity_args(tmp_path):
    def logdensity(x, mu):
        return -0.5 * jnp.sum((x - mu) ** 2)

    mu = jnp.array([3.0, -3.0])
    warmup = rwmh.window_adaptation(logdensity)
    (states, _), _ = warmup.run(jax.random.key(0), jnp.zeros((4, 2)), 300, logdensity_args=(mu,))
    np.testing.assert_allclose(np.asarray(states.position).mean(0), mu, atol=1.5)
    path = tmp_path / "run.npz"
    kwargs = dict(num_samples=40, num_warmup=40, chunk_size=20, progress_bar=False)
    first = rwmh.sample(
        jax.random.key(1),
        logdensity,
        jnp.zeros((4, 2)),
        logdensity_args=(mu,),
        checkpoint=path,
        **kwargs,
    )
    again = rwmh.resume(path, logdensity, logdensity_args=(mu,), progress_bar=False)
    np.testing.assert_array_equal(again.positions, first.positions)
    with pytest.raises(ValueError, match="logdensity_fn does not match"):
        rwmh.resume(path, logdensity, logdensity_args=(mu + 1.0,), progress_bar=False)
