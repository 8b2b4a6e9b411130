"""Tests of the random-walk Metropolis-Hastings kernel (rwmh.kernel).

Statistical checks use fixed seeds and judge errors in Monte Carlo standard errors from ArviZ's
ESS; the kernel runs with the target's own covariance as proposal, so any bias comes from the
Metropolis-Hastings step itself.
"""

import subprocess
import sys
import textwrap

import arviz as az
import blackjax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blackjax.base import SamplingAlgorithm

import rwmh


def run_chains(algo, rng_key, positions, num_steps):
    """The kernel in a plain vmap + scan harness; returns draws ``(chain, draw, ...)``."""
    states = jax.vmap(algo.init)(positions)
    num_chains = jax.tree_util.tree_leaves(positions)[0].shape[0]

    @jax.jit
    def loop(states, key):
        def one_step(states, key):
            keys = jax.random.split(key, num_chains)
            states, info = jax.vmap(algo.step)(keys, states)
            return states, (states.position, info.acceptance_rate)

        return jax.lax.scan(one_step, states, jax.random.split(key, num_steps))

    _, (draws, acceptance) = loop(states, rng_key)
    swap = lambda x: np.swapaxes(np.asarray(x), 0, 1)
    return jax.tree_util.tree_map(swap, draws), swap(acceptance)


def assert_moments(draws, mean, cov, num_mcse=4.5, cov_rtol=0.10):
    """Means within ``num_mcse`` MCSE and covariances within ``cov_rtol`` (relative to
    ``sqrt(cov_ii cov_jj)``) of the truth; ``draws`` are ``(chain, draw, d)``."""
    mean, cov = np.atleast_1d(mean), np.atleast_2d(cov)
    dataset = az.convert_to_dataset({"x": draws})
    mcse = np.asarray(az.mcse(dataset)["x"])
    error = np.abs(draws.mean(axis=(0, 1)) - mean)
    assert np.all(error < num_mcse * mcse), (error / mcse, mcse)
    flat = draws.reshape(-1, draws.shape[-1])
    sample_cov = np.atleast_2d(np.cov(flat.T))
    scale = np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
    assert np.all(np.abs(sample_cov - cov) < cov_rtol * scale), (sample_cov, cov)


def gaussian_logdensity(mean, cov):
    precision = jnp.linalg.inv(jnp.asarray(cov))
    mean = jnp.asarray(mean)
    return lambda x: -0.5 * (x - mean) @ precision @ (x - mean)


def random_covariance(seed, dimension, condition=10.0):
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(dimension, dimension)))
    eigenvalues = np.logspace(0, np.log10(condition), dimension)
    return (rotation * eigenvalues) @ rotation.T


def test_random_walk_is_a_blackjax_sampling_algorithm():
    algo = rwmh.random_walk(lambda x: -0.5 * jnp.sum(x**2), step_size=0.5)
    assert isinstance(algo, SamplingAlgorithm)
    state = algo.init(jnp.zeros(3))
    assert isinstance(state, rwmh.RWMHState)
    new_state, info = algo.step(jax.random.key(0), state)
    assert isinstance(info, rwmh.RWMHInfo)
    assert new_state.position.shape == (3,)
    assert info.proposal.position.shape == (3,)
    assert 0.0 <= float(info.acceptance_rate) <= 1.0


def test_runs_in_blackjax_run_inference_algorithm_under_vmap():
    logdensity = gaussian_logdensity(jnp.array([1.0, -1.0]), jnp.eye(2))
    algo = rwmh.random_walk(logdensity, step_size=1.7)

    def one_chain(key, position):
        _, (states, infos) = blackjax.util.run_inference_algorithm(
            key, algo, 3000, initial_position=position, transform=lambda s, i: (s, i)
        )
        return states.position, infos.acceptance_rate

    keys = jax.random.split(jax.random.key(1), 8)
    draws, acceptance = jax.jit(jax.vmap(one_chain))(keys, jnp.zeros((8, 2)))
    assert draws.shape == (8, 3000, 2)
    assert_moments(np.asarray(draws[:, 500:]), [1.0, -1.0], np.eye(2))
    assert 0.2 < float(acceptance.mean()) < 0.6


@pytest.mark.parametrize(
    "dimension, condition, proposal",
    [(1, 1.0, "dense"), (3, 10.0, "dense"), (10, 100.0, "dense"), (3, 10.0, "diagonal")],
)
def test_gaussian_moments(dimension, condition, proposal):
    cov = random_covariance(dimension, dimension, condition)
    if proposal == "diagonal":
        cov = np.diag(np.diag(cov))
    mean = np.linspace(-1.0, 2.0, dimension)
    proposal_cov = np.diag(cov) if proposal == "diagonal" else cov
    algo = rwmh.random_walk(gaussian_logdensity(mean, cov), 2.38 / np.sqrt(dimension), proposal_cov)
    positions = jnp.asarray(np.random.default_rng(0).multivariate_normal(mean, cov, 16))
    draws, _ = run_chains(algo, jax.random.key(dimension), positions, 6000)
    assert_moments(draws, mean, cov)


def test_gaussian_moments_for_a_dict_pytree():
    cov = random_covariance(7, 3, 10.0)
    mean = np.array([0.5, -2.0, 1.0])

    def logdensity(position):
        x = jnp.concatenate([position["a"], position["b"][None]])
        return gaussian_logdensity(mean, cov)(x)

    algo = rwmh.random_walk(logdensity, 2.38 / np.sqrt(3), cov)
    positions = {"a": jnp.zeros((16, 2)), "b": jnp.zeros(16)}
    draws, _ = run_chains(algo, jax.random.key(3), positions, 6000)
    assert draws["a"].shape == (16, 6000, 2) and draws["b"].shape == (16, 6000)
    stacked = np.concatenate([draws["a"], draws["b"][..., None]], axis=-1)[:, 500:]
    assert_moments(stacked, mean, cov)


@pytest.mark.parametrize("outside", [-jnp.inf, jnp.nan])
def test_truncated_target_never_leaves_the_support(outside):
    # A standard normal truncated to x > 0 in each of 2 coordinates (a half-normal).
    def logdensity(x):
        return jnp.where(jnp.all(x > 0), -0.5 * jnp.sum(x**2), outside)

    algo = rwmh.random_walk(logdensity, step_size=1.5)
    draws, acceptance = run_chains(algo, jax.random.key(4), jnp.ones((16, 2)), 5000)
    assert np.all(draws > 0)
    assert np.all(np.isfinite(acceptance)) and np.all((acceptance >= 0) & (acceptance <= 1))
    half_normal_mean = np.sqrt(2 / np.pi)
    half_normal_var = 1 - 2 / np.pi
    assert_moments(draws, [half_normal_mean] * 2, np.eye(2) * half_normal_var)


@pytest.mark.parametrize("value", [jnp.nan, -jnp.inf, jnp.inf])
def test_nan_and_infinite_proposals_are_rejected(value):
    kernel = rwmh.build_kernel()
    logdensity = lambda x: jnp.where(x[0] > 10.0, 0.0, value)
    state = rwmh.RWMHState(jnp.array([100.0]), jnp.array(0.0))
    keys = jax.random.split(jax.random.key(5), 200)
    new_states, info = jax.vmap(lambda k: kernel(k, state, logdensity, 200.0))(keys)
    # Proposals left of 10 have a NaN/inf log density: never accepted, probability 0.
    moved_left = np.asarray(info.proposal.position[:, 0] <= 10.0)
    assert 0 < moved_left.sum() < 200
    assert not np.any(np.asarray(new_states.position[:, 0]) <= 10.0)
    assert np.all(np.asarray(info.acceptance_rate)[moved_left] == 0.0)
    assert not np.asarray(info.is_accepted)[moved_left].any()
    # Admissible proposals (log ratio 0) are all accepted.
    assert np.all(np.asarray(info.is_accepted)[~moved_left])


@pytest.mark.parametrize("kind", ["diagonal", "dense"])
def test_flat_target_increments_have_the_proposal_covariance(kind):
    cov = random_covariance(11, 3, 20.0)
    proposal_cov = np.diag(cov) if kind == "diagonal" else cov
    expected = np.diag(proposal_cov) if kind == "diagonal" else proposal_cov
    step_size = 0.3
    algo = rwmh.random_walk(lambda x: jnp.zeros(()), step_size, proposal_cov)
    draws, acceptance = run_chains(algo, jax.random.key(6), jnp.zeros((64, 3)), 2000)
    assert np.all(acceptance == 1.0)
    increments = np.diff(draws, axis=1).reshape(-1, 3)
    sample_cov = np.cov(increments.T)
    target = step_size**2 * expected
    # 127,936 independent increments: the relative error of each entry is about 0.5%.
    scale = np.sqrt(np.outer(np.diag(target), np.diag(target)))
    assert np.all(np.abs(sample_cov - target) < 0.03 * scale), (sample_cov, target)
    assert np.all(np.abs(increments.mean(axis=0)) < 4 * np.sqrt(np.diag(target) / len(increments)))


def test_typed_and_legacy_keys_give_valid_steps():
    algo = rwmh.random_walk(lambda x: -0.5 * jnp.sum(x**2), step_size=1.0)
    state = algo.init(jnp.zeros(2))
    typed, _ = algo.step(jax.random.key(0), state)
    legacy, _ = algo.step(jax.random.PRNGKey(0), state)
    # A typed key and the legacy key of the same seed hold the same bits.
    np.testing.assert_array_equal(typed.position, legacy.position)


def test_float32_is_kept():
    algo = rwmh.random_walk(lambda x: -0.5 * jnp.sum(x**2), step_size=1.0, proposal_cov=jnp.eye(2))
    state = algo.init(jnp.zeros(2, jnp.float32))
    new_state, info = algo.step(jax.random.key(0), state)
    assert new_state.position.dtype == jnp.float32
    assert new_state.logdensity.dtype == jnp.float32
    assert info.acceptance_rate.dtype == jnp.float32


def test_float64_is_kept_under_x64():
    code = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, numpy as np, rwmh
        algo = rwmh.random_walk(lambda x: -0.5 * jnp.sum(x**2), 0.5, np.eye(2))
        state = algo.init(jnp.zeros(2, jnp.float64))
        state, info = algo.step(jax.random.key(0), state)
        result = rwmh.sample(jax.random.key(1), lambda x: -0.5 * jnp.sum(x**2),
                             jnp.zeros((2, 2)), num_samples=10, num_warmup=30,
                             progress_bar=False)
        print(state.position.dtype, state.logdensity.dtype, info.acceptance_rate.dtype,
              result.positions.dtype, result.stats["lp"].dtype)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["float64"] * 5


def test_dense_proposal_is_factored_once_not_per_step():
    calls = []
    original = jnp.linalg.cholesky

    def counting_cholesky(matrix):
        calls.append(1)
        return original(matrix)

    algo = None
    jnp.linalg.cholesky, saved = counting_cholesky, jnp.linalg.cholesky
    try:
        algo = rwmh.random_walk(lambda x: -0.5 * jnp.sum(x**2), 1.0, np.eye(3) * 2.0)
        assert len(calls) == 1
        state = algo.init(jnp.zeros(3))
        for key in jax.random.split(jax.random.key(0), 3):
            state, _ = algo.step(key, state)
        assert len(calls) == 1
    finally:
        jnp.linalg.cholesky = saved


def test_low_level_kernel_takes_a_factored_covariance_as_it_is():
    """``build_kernel()``'s kernel factors a covariance array on every call, but uses a
    ``FactoredCov`` as it is: same step, no factorisation, dimension still checked."""
    from rwmh.kernel import factor_proposal_cov

    logdensity = lambda x: -0.5 * jnp.sum(x**2)
    covariance = jnp.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 0.5]])
    factored = factor_proposal_cov(covariance)
    kernel = rwmh.build_kernel()
    state = rwmh.init(jnp.ones(3), logdensity)
    key = jax.random.key(4)
    calls = []
    original = jnp.linalg.cholesky
    jnp.linalg.cholesky = lambda matrix: (calls.append(1), original(matrix))[1]
    try:
        from_array, _ = kernel(key, state, logdensity, 0.7, covariance)
        assert len(calls) == 1
        from_factor, _ = kernel(key, state, logdensity, 0.7, factored)
        assert len(calls) == 1
    finally:
        jnp.linalg.cholesky = original
    np.testing.assert_array_equal(from_array.position, from_factor.position)
    with pytest.raises(ValueError, match="proposal_cov"):
        kernel(key, rwmh.init(jnp.ones(2), logdensity), logdensity, 0.7, factored)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"step_size": 0.0}, "step_size"),
        ({"step_size": -1.0}, "step_size"),
        ({"step_size": np.nan}, "step_size"),
        ({"proposal_cov": np.ones((2, 3))}, "proposal_cov"),
        ({"proposal_cov": np.array([1.0, -1.0])}, "proposal_cov"),
        ({"proposal_cov": np.array([[1.0, 2.0], [2.0, 1.0]])}, "positive definite"),
        ({"proposal_cov": np.array([[1.0, 0.5], [0.0, 1.0]])}, "symmetric"),
    ],
)
def test_bad_parameters_are_named(kwargs, match):
    kwargs = {"step_size": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        rwmh.random_walk(lambda x: -0.5 * jnp.sum(x**2), **kwargs)


def laplace_covariance():
    """The inverse Hessian of a correlated regression's negative log density, all in float32:
    a covariance symmetric only to float32 rounding, like benchmarks/ess.py's (which with jax
    0.12 is asymmetric by 1.4e-11 with entries up to 1.3e-3, and which a fixed tolerance of
    1e-8 * max|C| refused)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(2.0, 1.0, 1000), jnp.float32)
    y = 1.0 + 2.0 * x + 0.5 * jnp.asarray(rng.normal(size=1000), jnp.float32)

    def neg_logdensity(theta):
        residual = (y - theta[0] - theta[1] * x) / jnp.exp(theta[2])
        return 0.5 * jnp.sum(residual**2) + x.shape[0] * theta[2]

    hessian = jax.hessian(neg_logdensity)(jnp.asarray([1.0, 2.0, np.log(0.5)], jnp.float32))
    return jnp.linalg.inv(hessian)


def test_a_float32_covariance_symmetric_to_rounding_is_accepted():
    covariance = laplace_covariance()
    assert covariance.dtype == jnp.float32
    rounding = np.max(np.abs(covariance - covariance.T))
    eps_max = np.finfo(np.float32).eps * np.max(np.abs(covariance))
    # Within float32 rounding, but (on some jax versions) not exactly symmetric.
    assert rounding <= 4 * eps_max
    algo = rwmh.random_walk(lambda x: -0.5 * jnp.sum(x**2), 1.0, covariance)
    state, info = algo.step(jax.random.key(0), algo.init(jnp.zeros(3)))
    assert np.all(np.isfinite(state.position))
    # The same covariance made exactly asymmetric by a few units of rounding also passes.
    nudged = covariance.at[0, 2].add(8 * eps_max)
    rwmh.random_walk(lambda x: -0.5 * jnp.sum(x**2), 1.0, nudged)


@pytest.mark.parametrize("relative", [1e-5, 1e-3, 0.5])
def test_a_float32_covariance_asymmetric_beyond_rounding_is_refused(relative):
    covariance = np.asarray(laplace_covariance())
    bad = covariance.copy()
    bad[0, 2] += relative * np.max(np.abs(covariance))
    # Still positive definite: only the symmetry check can refuse it.
    assert np.linalg.eigvalsh((bad + bad.T) / 2).min() > 0
    with pytest.raises(ValueError, match="proposal_cov must be a symmetric matrix"):
        rwmh.random_walk(lambda x: -0.5 * jnp.sum(x**2), 1.0, bad)


def test_the_symmetry_tolerance_follows_the_dtype():
    """An asymmetry of 1e-9 * max|C| is rounding in float32 but real in float64."""
    code = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, numpy as np, rwmh
        cov = np.array([[2.0, 0.5], [0.5 + 2e-9, 1.0]])
        rwmh.random_walk(lambda x: -0.5 * jnp.sum(x**2), 1.0, cov.astype(np.float32))
        try:
            rwmh.random_walk(lambda x: -0.5 * jnp.sum(x**2), 1.0, cov)
        except ValueError as error:
            print(error)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "proposal_cov must be a symmetric matrix" in out.stdout
    assert "beyond rounding in float64" in out.stdout


def test_proposal_cov_of_the_wrong_dimension_is_named():
    algo = rwmh.random_walk(lambda x: -0.5 * jnp.sum(x**2), 1.0, np.eye(3))
    with pytest.raises(ValueError, match="proposal_cov"):
        algo.init(jnp.zeros(2))


def test_a_non_scalar_logdensity_is_named():
    with pytest.raises(ValueError, match="logdensity_fn must return a scalar"):
        rwmh.init(jnp.zeros(3), lambda x: -0.5 * x**2)


@pytest.mark.parametrize("x64", [False, True])
def test_a_python_float_logdensity(x64):
    """``lambda x: 0.0`` returns a Python float: the state holds a 0-d array, and the step
    (eager and under jit) works; it used to fail calling ``.astype`` on the float."""
    enable_x64 = getattr(jax, "enable_x64", None)
    if enable_x64 is None:
        from jax.experimental import enable_x64
    dtype = jnp.float64 if x64 else jnp.float32
    with enable_x64(x64):
        algo = rwmh.random_walk(lambda x: 0.0, 1.0)
        state = algo.init(jnp.zeros(2, dtype))
        assert isinstance(state.logdensity, jax.Array) and state.logdensity.shape == ()
        state, info = algo.step(jax.random.key(0), state)
        assert bool(info.is_accepted) and state.position.dtype == dtype
        state, info = jax.jit(algo.step)(jax.random.key(1), state)
        assert bool(info.is_accepted) and state.position.dtype == dtype


def test_low_level_kernel_with_a_dense_covariance_closed_over_inside_jit():
    """A concrete dense ``proposal_cov`` captured by a jitted step factors to a tracer there;
    its check must not try to read that tracer's value."""
    logdensity = lambda x: -0.5 * jnp.sum(x**2)
    covariance = jnp.array([[2.0, 0.3], [0.3, 1.0]])
    kernel = rwmh.build_kernel()
    step = jax.jit(lambda key, state: kernel(key, state, logdensity, 0.5, covariance))
    state = rwmh.init(jnp.zeros(2), logdensity)
    new, _ = step(jax.random.key(0), state)
    expected, _ = kernel(jax.random.key(0), state, logdensity, 0.5, covariance)
    np.testing.assert_allclose(new.position, expected.position, rtol=1e-6)
