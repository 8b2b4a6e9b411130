"""Tests of the multi-chain driver rwmh.sample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
