"""The scenarios NumPyro and BlackJAX test their own kernels with, in our own words, and the
edges where rwmh must behave as they do (issue 18).

NumPyro (``test/infer/test_mcmc.py``, ``test_gibbs.py``): models without a continuous latent
site, ``MCMC`` inside ``jax.jit`` with a traced ``target_accept_prob``, a random-walk block of
``numpyro.infer.Gibbs`` next to constrained sites. BlackJAX (``tests/mcmc``): a univariate
normal and a linear regression, with as many steps as a random walk needs. Statistical checks
are in units of Monte Carlo standard error (ArviZ's ESS), with fixed seeds.
"""

import os
import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.sharding import Mesh
from numpyro.infer import MCMC, NUTS, Gibbs

import rwmh
from rwmh import cli
from rwmh.arviz import plot_trace
from rwmh.numpyro import RWMH


def mcse(draws):
    """Monte Carlo standard error of the mean of ``(chain, draw, ...)`` draws (ArviZ)."""
    return np.asarray(az.mcse(az.convert_to_dataset({"x": np.asarray(draws)}))["x"])


def run(kernel, *args, num_warmup=20, num_samples=10, seed=0, init_params=None, **kwargs):
    mcmc = MCMC(
        kernel, num_warmup=num_warmup, num_samples=num_samples, progress_bar=False, **kwargs
    )
    mcmc.run(jax.random.key(seed), *args, init_params=init_params)
    return mcmc


# --- models without a continuous latent site (item 1) --------------------------------------


def empty_model():
    pass


def deterministic_model():
    numpyro.deterministic("c", jnp.array([1.0, 2.0]))


def one_category_model():
    # A Dirichlet with one category: one constrained value, an empty unconstrained space.
    numpyro.sample("p", dist.Dirichlet(jnp.ones(1)))


@pytest.mark.parametrize("chain_method", ["sequential", "vectorized"])
@pytest.mark.parametrize("model", [empty_model, deterministic_model, one_category_model])
def test_models_without_continuous_latent_sites_return_what_nuts_returns(model, chain_method):
    kw = dict(num_chains=2, chain_method=chain_method)
    ours = run(RWMH(model), **kw).get_samples(group_by_chain=True)
    nuts = run(NUTS(model), **kw).get_samples(group_by_chain=True)
    assert set(ours) == set(nuts)
    for name in nuts:
        np.testing.assert_array_equal(ours[name], nuts[name])


def test_enumerated_discrete_only_model_runs_as_nuts_runs_it():
    pytest.importorskip("funsor")

    def model():
        numpyro.sample("k", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
        numpyro.deterministic("d", jnp.array(5.0))

    ours = run(RWMH(model)).get_samples()
    nuts = run(NUTS(model)).get_samples()
    assert set(ours) == set(nuts) == {"d"}
    np.testing.assert_array_equal(ours["d"], nuts["d"])


# --- MCMC inside jax.jit (item 2) ------------------------------------------------------------


def normal_model():
    numpyro.sample("x", dist.Normal(0.0, 1.0))


def test_mcmc_inside_jit_with_a_traced_target_accept_prob():
    @jax.jit
    def draws(target):
        kernel = RWMH(normal_model, target_accept_prob=target)
        mcmc = MCMC(kernel, num_warmup=200, num_samples=50, progress_bar=False)
        mcmc.run(jax.random.key(0), extra_fields=("accept_prob",))
        return mcmc.get_samples()["x"], mcmc.get_extra_fields()["accept_prob"]

    low_x, low = draws(0.2)
    high_x, high = draws(0.8)
    assert low_x.shape == high_x.shape == (50,)
    # The traced target reaches the adaptation: a higher target, a higher acceptance.
    assert float(high.mean()) > float(low.mean()) + 0.2


# --- RWMH as a block of numpyro.infer.Gibbs (item 3) ---------------------------------------

GIBBS_DATA = jnp.array([0.3, 1.2, -0.4, 0.8, 1.5])
GIBBS_COUNTS = jnp.array([0, 0, 1])


def gibbs_model():
    p = numpyro.sample("p", dist.Dirichlet(jnp.ones(3)))  # simplex: 3 values, 2 unconstrained
    s = numpyro.sample("s", dist.HalfNormal(1.0))  # positive
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    numpyro.sample("obs", dist.Normal(mu, s), obs=GIBBS_DATA)
    numpyro.sample("c", dist.Categorical(p), obs=GIBBS_COUNTS)


def test_gibbs_block_with_constrained_sites_matches_the_exact_simplex():
    kernel = Gibbs([(RWMH(gibbs_model), ["p", "s"]), (NUTS(gibbs_model), ["mu"])])
    mcmc = run(kernel, num_warmup=1000, num_samples=4000)
    samples = mcmc.get_samples()
    assert samples["p"].shape == (4000, 3)
    assert np.all(np.asarray(samples["s"]) > 0)
    # p | counts (2, 1, 0) is Dirichlet(3, 2, 1), whatever mu and s are.
    exact = np.array([3.0, 2.0, 1.0]) / 6.0
    p = np.asarray(samples["p"])[None]
    assert np.all(np.abs(p.mean(axis=(0, 1)) - exact) < 4 * mcse(p))


def test_gibbs_hands_constrained_init_values_and_they_are_read_as_such():
    kernel = Gibbs([(RWMH(gibbs_model), ["p", "s"]), (RWMH(gibbs_model), ["mu"])])
    start = {"p": jnp.array([0.2, 0.3, 0.5]), "s": jnp.array(2.0), "mu": jnp.array(0.5)}
    mcmc = MCMC(kernel, num_warmup=0, num_samples=1, progress_bar=False)
    state = kernel.init(jax.random.key(0), 0, start, (), {})
    block = state.block_states[0]
    constrain = kernel.blocks[0][0].get_constrain_fn((), {})
    constrained = constrain(block.z)
    np.testing.assert_allclose(constrained["p"], start["p"], rtol=1e-5)
    np.testing.assert_allclose(constrained["s"], start["s"], rtol=1e-5)
    assert block.z["p"].shape == (2,)
    mcmc.run(jax.random.key(1), init_params=start)
    assert mcmc.get_samples()["p"].shape == (1, 3)


# --- BlackJAX's scenarios, with random-walk efficiency ---------------------------------------


def test_univariate_normal_scenario():
    # BlackJAX's univariate normal: mean 1, standard deviation 2.
    def logdensity(x):
        return jax.scipy.stats.norm.logpdf(x, 1.0, 2.0)

    result = rwmh.sample(
        jax.random.key(3),
        logdensity,
        jnp.zeros(4),
        num_samples=4000,
        num_warmup=1000,
        progress_bar=False,
    )
    draws = result.positions
    assert abs(draws.mean() - 1.0) < 4 * mcse(draws)
    var_draws = (draws - 1.0) ** 2
    assert abs(var_draws.mean() - 4.0) < 4 * mcse(var_draws)


def test_linear_regression_scenario_matches_the_exact_posterior():
    # BlackJAX's regression with a known noise scale: the posterior is Gaussian and exact.
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    noise, prior_sd = 1.0, 10.0
    y = 1.0 + 3.0 * x + noise * rng.normal(size=50)
    design = np.column_stack([np.ones_like(x), x])
    precision = design.T @ design / noise**2 + np.eye(2) / prior_sd**2
    covariance = np.linalg.inv(precision)
    mean = covariance @ design.T @ y / noise**2

    def logdensity(beta):
        fitted = beta[0] + beta[1] * x
        return -0.5 * jnp.sum((y - fitted) ** 2) / noise**2 - 0.5 * jnp.sum(beta**2) / prior_sd**2

    result = rwmh.sample(
        jax.random.key(4),
        logdensity,
        jnp.zeros((4, 2)),
        num_samples=4000,
        num_warmup=1000,
        progress_bar=False,
    )
    draws = result.positions
    assert np.all(np.abs(draws.mean(axis=(0, 1)) - mean) < 4 * mcse(draws))
    centred = draws - mean
    variances = centred**2
    assert np.all(np.abs(variances.mean(axis=(0, 1)) - np.diag(covariance)) < 4 * mcse(variances))


# --- low precision (item 4) ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_positions_are_refused_before_compiling(dtype):
    logdensity = lambda x: -0.5 * jnp.sum(x**2)
    with pytest.raises(TypeError, match="initial_positions has dtype .*float32 or float64"):
        rwmh.sample(jax.random.key(0), logdensity, jnp.zeros((2, 3), dtype), num_samples=5)
    with pytest.raises(TypeError, match="position has dtype"):
        rwmh.random_walk(logdensity).init(jnp.zeros(3, dtype))
    kernel = RWMH(potential_fn=lambda z: 0.5 * jnp.sum(z**2))
    with pytest.raises(TypeError, match="init_params has dtype"):
        run(kernel, init_params=jnp.zeros(3, dtype))


# --- degenerate input gets a named error (item 5) --------------------------------------------

LOGDENSITY = lambda x: -0.5 * jnp.sum(x**2)  # noqa: E731


def sample(positions, **kwargs):
    kwargs = {"num_samples": 5, "num_warmup": 5, "progress_bar": False, **kwargs}
    return rwmh.sample(jax.random.key(0), LOGDENSITY, positions, **kwargs)


@pytest.mark.parametrize(
    "positions, kwargs, error, match",
    [
        (jnp.zeros((2, 0)), {}, ValueError, "initial_positions has no entries.*dimension 0"),
        (jnp.zeros((0, 2)), {}, ValueError, "initial_positions must hold at least one chain"),
        (jnp.zeros((2, 2)), {"step_size": True}, TypeError, "step_size .*bool"),
        (jnp.zeros((2, 2)), {"step_size": 1e39}, ValueError, "step_size = 1e\\+39 .*float32"),
        (jnp.zeros((2, 2)), {"step_size": 1e-50}, ValueError, "step_size = 1e-50 .*float32"),
        (jnp.zeros((2, 2)), {"proposal_cov": jnp.array([1 + 1j, 1.0])}, TypeError, "real"),
    ],
)
def test_degenerate_sample_input_is_a_named_error(positions, kwargs, error, match):
    with pytest.raises(error, match=match):
        sample(positions, **kwargs)


def test_degenerate_input_of_the_other_front_doors():
    with pytest.raises(ValueError, match="positions has no entries"):
        rwmh.window_adaptation(LOGDENSITY).run(jax.random.key(0), jnp.zeros((2, 0)), 5)
    with pytest.raises(ValueError, match="positions must hold at least one chain"):
        rwmh.window_adaptation(LOGDENSITY).run(jax.random.key(0), jnp.zeros((0, 2)), 5)
    with pytest.raises(TypeError, match="step_size .*bool"):
        rwmh.random_walk(LOGDENSITY, step_size=True)
    with pytest.raises(ValueError, match="step_size = 1e\\+39"):
        rwmh.random_walk(LOGDENSITY, step_size=1e39).init(jnp.zeros(2))
    with pytest.raises(TypeError, match="proposal_cov must hold real"):
        rwmh.random_walk(LOGDENSITY, proposal_cov=jnp.array([1 + 1j, 1.0]))
    with pytest.raises(TypeError, match="step_size .*bool"):
        RWMH(normal_model, step_size=True)
    with pytest.raises(ValueError, match="step_size = 1e\\+39"):
        run(RWMH(normal_model, step_size=1e39))


def test_a_mesh_with_another_axis_name_shards_the_chains():
    mesh = Mesh(np.array(jax.devices()), ("x",))
    sharded = sample(jnp.zeros((2, 2)), devices=mesh)
    plain = sample(jnp.zeros((2, 2)))
    np.testing.assert_array_equal(sharded.positions, plain.positions)


def test_potential_fn_of_shape_one_is_a_named_error():
    kernel = RWMH(potential_fn=lambda z: jnp.sum(z**2, keepdims=True))
    with pytest.raises(ValueError, match="potential_fn must return a scalar.*\\(1,\\)"):
        run(kernel, init_params=jnp.zeros(2))


def test_post_warmup_state_from_nuts_is_a_named_error():
    nuts = MCMC(NUTS(normal_model), num_warmup=10, num_samples=5, progress_bar=False)
    nuts.warmup(jax.random.key(0))
    mcmc = MCMC(RWMH(normal_model), num_warmup=10, num_samples=5, progress_bar=False)
    mcmc.post_warmup_state = nuts.post_warmup_state
    with pytest.raises(TypeError, match="RWMHKernelState; got HMCState"):
        mcmc.run(jax.random.key(1))


def test_seed_beyond_the_key_range_is_a_usage_error(capsys):
    assert cli.main(["regress", "--seed", str(2**63)]) == 2
    assert "--seed: must be an integer from 0 to 9223372036854775807" in capsys.readouterr().err


def test_plot_extension_gives_the_format_and_unknown_ones_fail_before_sampling(tmp_path, capsys):
    idata = rwmh.to_inference_data({"sigma": np.random.default_rng(0).normal(size=(2, 50))})
    plot_trace(idata, str(tmp_path / "fit.jpg"))
    assert (tmp_path / "fit.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG
    plot_trace(idata, str(tmp_path / "fit.png"))
    assert (tmp_path / "fit.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="'xyz', expected one of"):
        plot_trace(idata, str(tmp_path / "fit.xyz"))
    code = cli.main(["regress", "--plot", str(tmp_path / "fit.xyz"), "--no-progress"])
    assert code != 0
    assert "--plot" in capsys.readouterr().err
    assert not (tmp_path / "fit.xyz").exists()


def test_plot_trace_var_names_string_empty_and_no_draws(tmp_path):
    idata = rwmh.to_inference_data(
        {"sigma": np.ones((2, 20)) + np.arange(20), "mu": np.zeros((2, 20))}
    )
    plot_trace(idata, str(tmp_path / "one.png"), var_names="sigma")
    with pytest.raises(ValueError, match="var_names is empty"):
        plot_trace(idata, str(tmp_path / "none.png"), var_names=[])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ: more chains than draws, which is the point
        empty = rwmh.to_inference_data({"sigma": np.zeros((2, 0))})
    with pytest.raises(ValueError, match="no draws of 'sigma'"):
        plot_trace(empty, str(tmp_path / "empty.png"))


# --- scale of the small parts (item 6) -------------------------------------------------------


def test_plot_trace_of_many_components_is_bounded(tmp_path):
    from PIL import Image

    from rwmh.arviz import MAX_TRACE_ROWS

    idata = rwmh.to_inference_data({"x": np.random.default_rng(0).normal(size=(2, 100, 300))})
    path = tmp_path / "many.png"
    with pytest.warns(UserWarning, match=f"first {MAX_TRACE_ROWS} of 300 components"):
        plot_trace(idata, str(path))
    with Image.open(path) as image:
        width, height = image.size
    # 100 dpi, 10 inches wide, 2.4 inches a row and a margin: the height bounds the rows drawn.
    assert width == 1000
    assert height == round(100 * (2.4 * MAX_TRACE_ROWS + 0.4))


def test_csv_reader_memory_is_a_small_multiple_of_the_file(tmp_path):
    import subprocess
    import sys

    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak memory is read from Linux's /proc/self/status")
    rng = np.random.default_rng(0)
    num_rows = 500_000
    x = rng.normal(size=num_rows)
    path = tmp_path / "big.csv"
    with open(path, "w") as handle:
        handle.write("x,y\n")
        np.savetxt(handle, np.column_stack([x, 1 + 2 * x]), delimiter=",", fmt="%.6g")
    # Peak resident memory (VmHWM) of a fresh process: ru_maxrss would carry over the large
    # peak of this pytest process through fork and exec.
    script = (
        "import sys\n"
        "import numpy, pandas\n"
        "from rwmh.cli import read_xy\n"
        "def peak():\n"
        "    lines = open('/proc/self/status').read().splitlines()\n"
        "    return int(next(l for l in lines if l.startswith('VmHWM')).split()[1]) * 1024\n"
        "before = peak()\n"
        "x, y = read_xy(sys.argv[1])\n"
        "print(len(x), peak() - before)\n"
    )
    # The rwmh this test imported, in the subprocess too.
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(rwmh.__file__))}
    out = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.split()
    assert int(out[0]) == num_rows
    growth = int(out[1])
    size = os.path.getsize(path)
    # The floats alone take 16 bytes a row (about 1.8x a file of 6-digit numbers) and are
    # copied once when the chunks are joined: 4x measured; reading the whole file as text
    # took 16x.
    assert growth < 8 * size, (growth / size, growth, size)
