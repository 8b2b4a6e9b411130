"""The catalogue of bad input: every public entry point, each case one test.

Each case asserts the exception type (``TypeError`` for the wrong kind of value, ``ValueError``
for a value out of range) and that the message names the argument. Where an error can be found
without evaluating the log density, the log density used is one that fails when called, so
that the test also shows the error comes before anything is traced or compiled; the errors
that need the log density's values (non-finite starts) are checked to come before the warmup
or sampling loop is compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import MCMC

import rwmh
from rwmh import chains, cli
from rwmh.numpyro import RWMH


def never_called(position):
    raise AssertionError("the log density was evaluated before the input was checked")


def standard_normal(position):
    return -0.5 * sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(position))


def positive_first(position):
    """Log density that is -inf where the first coordinate is negative."""
    return jnp.where(position[0] > 0, -0.5 * jnp.sum(position**2), -jnp.inf)


KEY = jax.random.key(0)
GOOD = jnp.zeros((4, 2))
RUN = dict(num_samples=10, num_warmup=10, progress_bar=False)


def compiled_loops() -> tuple[int, int]:
    return chains.run_warmup._cache_size(), chains.run_sampling._cache_size()


# --- rwmh.random_walk and its init / step ------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        (dict(logdensity_fn="normal"), TypeError, "logdensity_fn"),
        (dict(step_size=0.0), ValueError, "step_size"),
        (dict(step_size=-1.0), ValueError, "step_size"),
        (dict(step_size=float("nan")), ValueError, "step_size"),
        (dict(step_size=float("inf")), ValueError, "step_size"),
        (dict(step_size=jnp.ones(2)), ValueError, "step_size"),
        (dict(step_size=None), ValueError, "step_size"),
        (dict(step_size="big"), ValueError, "step_size"),
        (dict(proposal_cov=jnp.ones((2, 3))), ValueError, "proposal_cov"),
        (dict(proposal_cov=jnp.ones((2, 2, 2))), ValueError, "proposal_cov"),
        (dict(proposal_cov=jnp.array([1.0, -1.0])), ValueError, "proposal_cov"),
        (dict(proposal_cov=jnp.array([1.0, jnp.inf])), ValueError, "proposal_cov"),
        (dict(proposal_cov=jnp.array([1.0, jnp.nan])), ValueError, "proposal_cov"),
        (dict(proposal_cov=jnp.array([[1.0, 0.5], [0.0, 1.0]])), ValueError, "proposal_cov"),
        (dict(proposal_cov=jnp.array([[1.0, 2.0], [2.0, 1.0]])), ValueError, "proposal_cov"),
        (dict(proposal_cov=jnp.array([[1.0, jnp.nan], [jnp.nan, 1.0]])), ValueError, "proposal_"),
        (dict(proposal_cov="identity"), TypeError, "proposal_cov"),
    ],
)
def test_random_walk_arguments(kwargs, error, argument):
    arguments = dict(logdensity_fn=never_called, step_size=0.5) | kwargs
    with pytest.raises(error, match=argument):
        rwmh.random_walk(**arguments)


@pytest.mark.parametrize(
    ("position", "logdensity_fn", "error", "words"),
    [
        (jnp.zeros(2, jnp.int32), never_called, TypeError, "position.*floating"),
        ({"a": jnp.zeros(2), "b": np.arange(3)}, never_called, TypeError, "position.*floating"),
        (jnp.array([0.0, jnp.nan]), never_called, ValueError, "position.*NaN or infinite"),
        ({"a": jnp.array([jnp.inf])}, never_called, ValueError, "position.*NaN or infinite"),
        (jnp.array([-1.0, 0.0]), positive_first, ValueError, "logdensity_fn is not finite"),
        (jnp.zeros(2), lambda x: jnp.nan * x[0], ValueError, "logdensity_fn is not finite"),
        (jnp.zeros(2), lambda x: -0.5 * x**2, ValueError, "logdensity_fn must return a scalar"),
        (jnp.zeros(2), lambda x: jnp.sum(x > 0), TypeError, "logdensity_fn.*floating"),
        ({}, never_called, ValueError, "position"),
    ],
)
def test_init_position_and_logdensity(position, logdensity_fn, error, words):
    with pytest.raises(error, match=words):
        rwmh.random_walk(logdensity_fn).init(position)
    with pytest.raises(error, match=words):
        rwmh.init(position, logdensity_fn)


def test_init_checks_the_proposal_dimension():
    algo = rwmh.random_walk(standard_normal, proposal_cov=jnp.ones(3))
    with pytest.raises(ValueError, match=r"proposal_cov has shape \(3,\).*dimension 2"):
        algo.init(jnp.zeros(2))


@pytest.mark.parametrize(
    ("rng_key", "error", "words"),
    [
        (0, TypeError, "rng_key.*got int"),
        (jnp.zeros(2), TypeError, "rng_key.*dtype float32"),
        (jnp.zeros(2, jnp.int32), TypeError, "rng_key.*dtype int32"),
        (jnp.zeros(3, jnp.uint32), ValueError, r"rng_key.*shape \(3,\)"),
        (jax.random.split(KEY, 4), ValueError, r"rng_key.*batch of typed keys of shape \(4,\)"),
        (jax.random.split(jax.random.PRNGKey(0), 4), ValueError, r"rng_key.*shape \(4, 2\)"),
        (None, TypeError, "rng_key.*NoneType"),
    ],
)
def test_step_key(rng_key, error, words):
    algo = rwmh.random_walk(standard_normal)
    state = algo.init(jnp.zeros(2))
    with pytest.raises(error, match=words):
        algo.step(rng_key, state)


def test_step_key_is_checked_under_vmap_and_jit():
    algo = rwmh.random_walk(standard_normal)
    states = jax.vmap(algo.init)(GOOD)
    bad_keys = jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(TypeError, match="rng_key"):
        jax.jit(jax.vmap(algo.step))(bad_keys, states)


def test_step_state():
    algo = rwmh.random_walk(standard_normal)
    with pytest.raises(TypeError, match="state must be an RWMHState"):
        algo.step(KEY, jnp.zeros(2))


# --- rwmh.window_adaptation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        (dict(logdensity_fn=None), TypeError, "logdensity_fn"),
        (dict(target_acceptance_rate=1.5), ValueError, "target_acceptance_rate"),
        (dict(target_acceptance_rate=0.0), ValueError, "target_acceptance_rate"),
        (dict(target_acceptance_rate="high"), TypeError, "target_acceptance_rate"),
        (dict(dense="yes"), TypeError, "dense"),
        (dict(initial_step_size=-0.1), ValueError, "initial_step_size"),
        (dict(initial_proposal_cov=jnp.array([[1.0, 2.0], [2.0, 1.0]])), ValueError, "initial_"),
        (dict(initial_proposal_cov=jnp.array([0.0, 1.0])), ValueError, "initial_proposal_cov"),
    ],
)
def test_window_adaptation_arguments(kwargs, error, argument):
    arguments = dict(logdensity_fn=never_called) | kwargs
    with pytest.raises(error, match=argument):
        rwmh.window_adaptation(**arguments)


@pytest.mark.parametrize(
    ("rng_key", "positions", "num_steps", "error", "words"),
    [
        (0, GOOD, 10, TypeError, "rng_key"),
        (jnp.zeros(2, jnp.float32), GOOD, 10, TypeError, "rng_key"),
        (KEY, GOOD, -1, ValueError, "num_steps"),
        (KEY, GOOD, 2.5, TypeError, "num_steps"),
        (KEY, GOOD, True, TypeError, "num_steps"),
        (KEY, jnp.float32(0.0), 10, ValueError, "positions.*chain axis"),
        (KEY, {"a": jnp.zeros((4, 2)), "b": jnp.zeros((3,))}, 10, ValueError, "positions.*axis"),
        (KEY, jnp.zeros((4, 2), jnp.int32), 10, TypeError, "positions.*floating"),
        (KEY, GOOD.at[2, 1].set(jnp.nan), 10, ValueError, "positions: chain 2 hold"),
        (KEY, {}, 10, ValueError, "positions"),
    ],
)
def test_window_adaptation_run_arguments(rng_key, positions, num_steps, error, words):
    warmup = rwmh.window_adaptation(never_called)
    with pytest.raises(error, match=words):
        warmup.run(rng_key, positions, num_steps)


def test_window_adaptation_names_chains_outside_the_support():
    before = compiled_loops()
    warmup = rwmh.window_adaptation(positive_first)
    positions = jnp.ones((5, 2)).at[1, 0].set(-1.0).at[3, 0].set(-2.0)
    with pytest.raises(ValueError, match="not finite at positions of chains 1, 3"):
        warmup.run(KEY, positions, 10)
    assert compiled_loops() == before


def test_window_adaptation_checks_the_covariance_dimension():
    warmup = rwmh.window_adaptation(never_called, initial_proposal_cov=jnp.ones(3))
    with pytest.raises(ValueError, match="initial_proposal_cov has shape"):
        warmup.run(KEY, GOOD, 10)


# --- rwmh.sample -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        (dict(rng_key=1), TypeError, "rng_key"),
        (dict(rng_key=jnp.zeros(3, jnp.uint32)), ValueError, "rng_key"),
        (dict(rng_key=jax.random.split(KEY)), ValueError, "rng_key"),
        (dict(logdensity_fn=jnp.zeros(2)), TypeError, "logdensity_fn"),
        (dict(num_samples=0), ValueError, "num_samples"),
        (dict(num_samples=10.0), TypeError, "num_samples"),
        (dict(num_warmup=-1), ValueError, "num_warmup"),
        (dict(num_warmup="10"), TypeError, "num_warmup"),
        (dict(thin=0), ValueError, "thin"),
        (dict(step_size=-1.0), ValueError, "step_size"),
        (dict(proposal_cov=jnp.ones(3)), ValueError, "proposal_cov"),
        (dict(proposal_cov=-jnp.eye(2)), ValueError, "proposal_cov"),
        (dict(target_acceptance_rate=1.0), ValueError, "target_acceptance_rate"),
        (dict(dense="no"), TypeError, "dense"),
        (dict(progress_bar="yes"), TypeError, "progress_bar"),
        (dict(progress_bar=None), TypeError, "progress_bar"),
        (dict(initial_positions=jnp.zeros((4, 2), jnp.int32)), TypeError, "initial_positions"),
        (dict(initial_positions=jnp.zeros(())), ValueError, "initial_positions"),
        (dict(initial_positions=GOOD.at[0, 0].set(jnp.inf)), ValueError, "chain 0 hold"),
        (dict(initial_positions=np.full((12, 1), np.nan)), ValueError, "chains 0, 1, .* 2 more"),
        (dict(devices="gpus"), ValueError, "devices"),
        (dict(devices=[0]), TypeError, "devices"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(checkpoint=["run.npz"]), TypeError, "checkpoint"),
    ],
)
def test_sample_arguments(kwargs, error, argument):
    arguments = dict(rng_key=KEY, logdensity_fn=never_called, initial_positions=GOOD)
    with pytest.raises(error, match=argument):
        rwmh.sample(**(arguments | RUN | kwargs))


@pytest.mark.parametrize(
    ("logdensity_fn", "error", "words"),
    [
        (positive_first, ValueError, "logdensity_fn is not finite at initial_positions of chain 2"),
        (lambda x: -0.5 * x**2, ValueError, "logdensity_fn must return a scalar"),
        (lambda x: jnp.int32(0), TypeError, "logdensity_fn must return a floating"),
    ],
)
def test_sample_log_density_fails_before_the_loops_compile(logdensity_fn, error, words):
    before = compiled_loops()
    positions = jnp.ones((4, 2)).at[2, 0].set(-1.0)
    with pytest.raises(error, match=words):
        rwmh.sample(KEY, logdensity_fn, positions, **RUN)
    assert compiled_loops() == before


# --- rwmh.resume -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        (dict(path=7), TypeError, "path"),
        (dict(path="/nonexistent-dir/run.npz"), ValueError, "checkpoint '/nonexistent-dir"),
        (dict(logdensity_fn="f"), TypeError, "logdensity_fn"),
        (dict(progress_bar="no"), TypeError, "progress_bar"),
        (dict(devices="tpu"), ValueError, "devices"),
    ],
)
def test_resume_arguments(kwargs, error, argument, tmp_path):
    arguments = dict(path=str(tmp_path / "run.npz"), logdensity_fn=never_called) | kwargs
    with pytest.raises(error, match=argument):
        rwmh.resume(**arguments)


# --- rwmh.numpyro.RWMH -------------------------------------------------------------------------


def normal_model():
    import numpyro
    import numpyro.distributions as dist

    numpyro.sample("x", dist.Normal(0.0, 1.0))


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        (dict(model=3), TypeError, "model must be callable"),
        (dict(model=None, potential_fn="u"), TypeError, "potential_fn must be callable"),
        (dict(dense="yes"), TypeError, "dense"),
        (dict(adapt_step_size=None), TypeError, "adapt_step_size"),
        (dict(adapt_proposal_cov=1), TypeError, "adapt_proposal_cov"),
        (dict(init_strategy="uniform"), TypeError, "init_strategy"),
        (dict(target_accept_prob=2.0), ValueError, "target_accept_prob"),
        (dict(step_size=[0.1, 0.2]), ValueError, "step_size"),
        (dict(proposal_cov=jnp.array([[1.0, 3.0], [3.0, 1.0]])), ValueError, "proposal_cov"),
    ],
)
def test_numpyro_kernel_arguments(kwargs, error, argument):
    arguments = dict(model=normal_model) | kwargs
    with pytest.raises(error, match=argument):
        RWMH(**arguments)


@pytest.mark.parametrize("chain_method", ["vectorized", "sequential"])
def test_numpyro_init_params_outside_the_support_name_the_chain(chain_method):
    def potential(z):
        return jnp.where(z["x"][0] > 0, 0.5 * jnp.sum(z["x"] ** 2), jnp.inf)

    init = {"x": jnp.ones((3, 2)).at[1, 0].set(-1.0)}
    mcmc = MCMC(
        RWMH(potential_fn=potential),
        num_warmup=10,
        num_samples=10,
        num_chains=3,
        chain_method=chain_method,
        progress_bar=False,
    )
    # Sequential chains are initialised one by one; only the vectorized kernel sees them all.
    words = "of chain 1 " if chain_method == "vectorized" else r"\(value inf\)"
    with pytest.raises(ValueError, match=f"potential energy is not finite at init_params {words}"):
        mcmc.run(KEY, init_params=init)


def test_numpyro_non_finite_init_params():
    mcmc = MCMC(RWMH(potential_fn=lambda z: jnp.sum(z**2)), num_warmup=5, num_samples=5)
    with pytest.raises(ValueError, match="init_params.*NaN or infinite"):
        mcmc.run(KEY, init_params=jnp.array([0.0, jnp.nan]))


# --- rwmh.to_inference_data --------------------------------------------------------------------

DRAWS = {"mu": np.zeros((2, 5)), "theta": np.zeros((2, 5, 3))}


@pytest.mark.parametrize(
    ("positions", "kwargs", "error", "argument"),
    [
        (np.zeros(5), {}, ValueError, "positions leaf 'x'.*chain, draw"),
        ({"a": np.zeros((2, 5)), "b": np.zeros((2, 4))}, {}, ValueError, "positions"),
        (np.array([["a", "b"]]), {}, TypeError, "positions leaf 'x'.*numeric"),
        ({}, {}, ValueError, "positions"),
        (DRAWS, dict(var_names=["only_one"]), ValueError, "var_names"),
        (DRAWS, dict(var_names=["same", "same"]), ValueError, "unique"),
        (DRAWS, dict(var_name=""), ValueError, "var_name"),
        (DRAWS, dict(stats=[1, 2]), TypeError, "stats must be a mapping"),
        (DRAWS, dict(stats={"lp": np.zeros((2, 4))}), ValueError, "stats entry 'lp'"),
        (DRAWS, dict(dims={"theta": ["school"], "nu": ["a"]}), ValueError, "dims.*'nu'"),
        (DRAWS, dict(dims={"theta": "school"}), TypeError, r"dims\['theta'\]"),
        (DRAWS, dict(dims={"theta": ["a", "b"]}), ValueError, r"dims\['theta'\] names 2"),
        (DRAWS, dict(dims=["theta"]), TypeError, "dims must be a mapping"),
        (
            DRAWS,
            dict(dims={"theta": ["school"]}, coords={"school": ["a", "b"]}),
            ValueError,
            r"coords\['school'\] has 2 labels",
        ),
        (DRAWS, dict(attrs="note"), TypeError, "attrs must be a mapping"),
    ],
)
def test_to_inference_data_arguments(positions, kwargs, error, argument):
    with pytest.raises(error, match=argument):
        rwmh.to_inference_data(positions, **kwargs)


# --- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--chains", "1"], "--chains: must be an integer >= 2"),
        (["--samples", "x"], "--samples: must be an integer >= 4"),
        (["--warmup", "-2"], "--warmup: must be an integer >= 0"),
        (["/nonexistent/data.csv"], "CSV file '/nonexistent/data.csv' does not exist"),
        (["--out", "/nonexistent/fit.nc"], "--out '/nonexistent/fit.nc': directory"),
    ],
)
def test_command_line_arguments(argv, words, capsys):
    assert cli.main(["regress", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and words in err


def test_command_line_csv_columns(tmp_path, capsys):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n2,3\n3,5\n")
    assert cli.main(["regress", str(path), "--x", "a", "--y", "c"]) == 2
    assert "'c'" in capsys.readouterr().err
