"""Tests of rwmh.numpyro.RWMH, in the manner NumPyro checks its own kernels.

The statistical checks follow NumPyro's ``test/infer/test_mcmc.py`` (same targets and
tolerances); the rest checks the MCMCKernel contract: every chain method, continuation from
``post_warmup_state``, pickling, extra fields, Predictive and ArviZ.
"""

import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpy.testing import assert_allclose
from numpyro.infer import MCMC, Predictive
from numpyro.infer.initialization import init_to_value

from rwmh import arviz as rwmh_arviz
from rwmh.models import linear_regression, simulate_linear_regression
from rwmh.numpyro import RWMH, RWMHKernelState

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def make_mcmc(kernel, *, num_warmup, num_samples, num_chains=1, chain_method="vectorized"):
    return MCMC(
        kernel,
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method=chain_method,
        progress_bar=False,
    )


def run_mcmc(
    kernel,
    *args,
    num_warmup,
    num_samples,
    num_chains=1,
    seed=0,
    chain_method="vectorized",
    **kwargs,
):
    mcmc = make_mcmc(
        kernel,
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method=chain_method,
    )
    mcmc.run(jax.random.key(seed), *args, **kwargs)
    return mcmc


# --- statistical checks (NumPyro's own targets) -------------------------------------------


def test_unnormalized_normal_from_potential_fn():
    true_mean, true_std = 1.0, 0.5

    def potential_fn(z):
        return 0.5 * jnp.sum(((z - true_mean) / true_std) ** 2)

    mcmc = run_mcmc(
        RWMH(potential_fn=potential_fn),
        num_warmup=1000,
        num_samples=8000,
        init_params=jnp.array(0.0),
    )
    draws = mcmc.get_samples()
    assert draws.shape == (8000,)
    assert_allclose(jnp.mean(draws), true_mean, rtol=0.07)
    assert_allclose(jnp.std(draws), true_std, rtol=0.07)
    # One dimension: the step size is tuned toward 0.44 acceptance.
    assert abs(float(jnp.mean(mcmc.get_extra_fields()["accept_prob"])) - 0.44) < 0.05


def test_logistic_regression():
    num_points, dim = 3000, 3
    data = jax.random.normal(jax.random.PRNGKey(0), (num_points, dim))
    true_coefs = jnp.arange(1.0, dim + 1.0)
    logits = jnp.sum(true_coefs * data, axis=-1)
    labels = dist.Bernoulli(logits=logits).sample(jax.random.PRNGKey(1))

    def model(labels):
        coefs = numpyro.sample("coefs", dist.Normal(jnp.zeros(dim), jnp.ones(dim)))
        logits = numpyro.deterministic("logits", jnp.sum(coefs * data, axis=-1))
        return numpyro.sample("obs", dist.Bernoulli(logits=logits), obs=labels)

    mcmc = run_mcmc(RWMH(model), labels, num_warmup=1000, num_samples=4000)
    samples = mcmc.get_samples()
    assert samples["logits"].shape == (4000, num_points)
    assert_allclose(jnp.mean(samples["coefs"], 0), true_coefs, atol=0.4)


def test_beta_bernoulli():
    def model(data):
        alpha = jnp.array([1.1, 1.1])
        beta = jnp.array([1.1, 1.1])
        p_latent = numpyro.sample("p_latent", dist.Beta(alpha, beta))
        numpyro.sample("obs", dist.Bernoulli(p_latent), obs=data)
        return p_latent

    true_probs = jnp.array([0.9, 0.1])
    data = dist.Bernoulli(true_probs).sample(jax.random.PRNGKey(1), (1000, 2))
    mcmc = run_mcmc(RWMH(model), data, num_warmup=500, num_samples=8000)
    samples = mcmc.get_samples()
    assert_allclose(jnp.mean(samples["p_latent"], 0), true_probs, atol=0.05)


def test_dirichlet_categorical():
    def model(data):
        concentration = jnp.array([1.0, 1.0, 1.0])
        p_latent = numpyro.sample("p_latent", dist.Dirichlet(concentration))
        numpyro.sample("obs", dist.Categorical(p_latent), obs=data)
        return p_latent

    true_probs = jnp.array([0.1, 0.6, 0.3])
    data = dist.Categorical(true_probs).sample(jax.random.PRNGKey(1), (2000,))
    mcmc = run_mcmc(RWMH(model), data, num_warmup=500, num_samples=8000)
    samples = mcmc.get_samples()
    assert_allclose(jnp.mean(samples["p_latent"], 0), true_probs, atol=0.02)


def test_model_without_usable_gradient():
    """The kink of sqrt|x| at the start 0 has an infinite gradient: NumPyro's gradient-based
    kernels refuse this initial point; a random walk needs no gradient."""

    def model():
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        numpyro.factor("kink", -jnp.sqrt(jnp.abs(x)))

    kernel = RWMH(model, init_strategy=init_to_value(values={"x": 0.0}))
    mcmc = run_mcmc(kernel, num_warmup=500, num_samples=8000)
    draws = np.asarray(mcmc.get_samples()["x"])
    grid = np.linspace(-8.0, 8.0, 40001)
    density = np.exp(-0.5 * grid**2 - np.sqrt(np.abs(grid)))
    true_sd = np.sqrt(np.sum(grid**2 * density) / np.sum(density))
    ess = float(az.ess(draws[None]))
    assert abs(draws.mean()) < 4 * true_sd / np.sqrt(ess)
    assert_allclose(draws.std(), true_sd, rtol=0.07)


# --- the regression, 4 vectorized chains: one run shared by several checks ----------------

TRUTH = {"intercept": 1.0, "slope": 2.0, "sigma": 0.5}


@pytest.fixture(scope="module")
def regression():
    x, y = simulate_linear_regression(jax.random.key(0), 100, **TRUTH)
    mcmc = make_mcmc(RWMH(linear_regression), num_warmup=1000, num_samples=2000, num_chains=4)
    mcmc.run(jax.random.key(1), x, y, extra_fields=("step_size", "mean_accept_prob", "i"))
    return mcmc, x, y


def test_arviz_imported_before_numpyro_then_from_numpyro_and_loo():
    """The README's order (``import arviz`` first, as isort sorts it): with ArviZ 1.x, NumPyro
    then loads ``numpyro.infer`` twice and the copy in use lacks ``initialization``, which
    ``arviz.from_numpyro`` reads; ``import rwmh.numpyro`` binds it again."""
    code = textwrap.dedent(
        """
        import arviz as az
        import jax
        from numpyro.infer import MCMC
        from rwmh.models import linear_regression, simulate_linear_regression
        from rwmh.numpyro import RWMH
        import numpyro
        print(hasattr(numpyro.infer, "initialization"))
        x, y = simulate_linear_regression(jax.random.key(0), 20)
        mcmc = MCMC(RWMH(linear_regression), num_warmup=100, num_samples=100, num_chains=2,
                    chain_method="vectorized", progress_bar=False)
        mcmc.run(jax.random.key(1), x, y)
        idata = az.from_numpyro(mcmc, log_likelihood=True)
        print(idata.log_likelihood["y"].shape)
        print("elpd_loo" in str(az.loo(idata)))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["True", "(2, 100, 20)", "True"], out.stdout


def test_regression_recovers_the_simulated_truth(regression):
    mcmc, _, _ = regression
    idata = az.from_numpyro(mcmc)
    summary = az.summary(idata, var_names=list(TRUTH), kind="all")
    for name, truth in TRUTH.items():
        mean, sd, mcse = summary.loc[name, ["mean", "sd", "mcse_mean"]]
        # The posterior of 100 points sits within a few posterior sd of the truth; the
        # Monte Carlo error adds a few of its own standard errors.
        assert abs(mean - truth) < 3 * sd + 4 * mcse, (name, mean, sd, mcse)
        assert mcse < 0.1 * sd


def test_regression_arviz_groups_and_rhat(regression):
    mcmc, x, y = regression
    # log_likelihood=True: ArviZ 1.x leaves it out unless asked, ArviZ 0.x includes it anyway.
    idata = az.from_numpyro(mcmc, log_likelihood=True)
    groups = set(rwmh_arviz.group_names(idata))
    assert {"posterior", "sample_stats", "log_likelihood", "observed_data"} <= groups
    assert rwmh_arviz.group_names(rwmh_arviz.from_numpyro(mcmc)) == rwmh_arviz.group_names(idata)
    assert idata.posterior["slope"].shape == (4, 2000)
    stats = idata.sample_stats
    assert {"acceptance_rate", "lp", "step_size"} <= set(stats.data_vars)
    assert stats["acceptance_rate"].shape == (4, 2000)
    assert float(stats["acceptance_rate"].min()) >= 0 and float(stats["acceptance_rate"].max()) <= 1
    # ArviZ's lp is the log density, NumPyro's potential energy negated.
    potential_energy = mcmc.get_extra_fields(group_by_chain=True)["potential_energy"]
    assert_allclose(stats["lp"].values, -np.asarray(potential_energy))
    assert idata.log_likelihood["y"].shape == (4, 2000, x.shape[0])
    # The pointwise log likelihood is that of the draws.
    draw = {k: float(idata.posterior[k][2, 7]) for k in TRUTH}
    expected = dist.Normal(draw["intercept"] + draw["slope"] * x, draw["sigma"]).log_prob(y)
    assert_allclose(idata.log_likelihood["y"][2, 7].values, expected, rtol=1e-4, atol=1e-5)
    rhat = az.rhat(idata, var_names=list(TRUTH))
    for name in TRUTH:
        assert float(rhat[name]) < 1.01, (name, float(rhat[name]))


def test_vectorized_warmup_is_pooled_and_sampling_parameters_frozen(regression):
    mcmc, _, _ = regression
    fields = mcmc.get_extra_fields(group_by_chain=True)
    step_size = np.asarray(fields["step_size"])
    # One step size for all chains (pooled), and none of it changes while sampling.
    assert np.all(step_size == step_size[0, 0])
    assert step_size[0, 0] > 0
    state = mcmc.last_state
    assert isinstance(state, RWMHKernelState)
    # One adaptation state for all chains (pooled), held once rather than per chain.
    assert state.adapt_state.proposal_cov.shape == (3, 3)
    assert_allclose(state.adapt_state.step_size, step_size[:, -1])
    # The iteration counter is not reset: it runs from num_warmup + 1.
    assert_allclose(fields["i"][:, 0], 1001)
    assert_allclose(fields["i"][:, -1], 3000)
    # The step size was tuned toward the dimension's target, 0.234 + 0.206 exp(-1).
    target = 0.234 + 0.206 * np.exp(-1.0)
    assert abs(float(np.mean(fields["accept_prob"])) - target) < 0.05
    assert_allclose(
        fields["mean_accept_prob"][:, -1], np.mean(fields["accept_prob"], axis=1), rtol=1e-4
    )


def test_predictive_and_print_summary(regression, capsys):
    mcmc, x, _ = regression
    samples = mcmc.get_samples()
    predictions = Predictive(linear_regression, posterior_samples=samples)(jax.random.key(5), x)
    assert predictions["y"].shape == (8000, x.shape[0])
    line = np.mean(samples["intercept"]) + np.mean(samples["slope"]) * np.asarray(x)
    # 8000 predictive draws with sd ~0.5: their mean sits within 0.05 of the fitted line.
    assert np.max(np.abs(np.mean(predictions["y"], 0) - line)) < 0.05
    mcmc.print_summary()
    out = capsys.readouterr().out
    for name in TRUTH:
        assert name in out
    assert "r_hat" in out


def test_pickle_keeps_the_draws(regression):
    mcmc, _, _ = regression
    restored = pickle.loads(pickle.dumps(mcmc))
    for name, value in mcmc.get_samples().items():
        np.testing.assert_array_equal(restored.get_samples()[name], value)
    assert restored.sampler.model is linear_regression


# --- the MCMCKernel contract ---------------------------------------------------------------


def small_model(data):
    loc = numpyro.sample("loc", dist.Normal(0.0, 5.0))
    scale = numpyro.sample("scale", dist.HalfNormal(2.0))
    with numpyro.plate("data", data.shape[0]):
        numpyro.sample("obs", dist.Normal(loc, scale), obs=data)


SMALL_DATA = jnp.array([0.3, -1.2, 0.8, 2.1, 0.4, -0.1, 1.3])


def fixed_kernel():
    return RWMH(small_model, step_size=0.4, adapt_step_size=False, adapt_proposal_cov=False)


@pytest.fixture(scope="module")
def fixed_draws():
    """Draws of two chains with adaptation off, for each in-process chain method."""
    draws = {}
    for method in ("sequential", "vectorized", jax.vmap):
        with warnings.catch_warnings():
            # NumPyro donates buffers that XLA cannot reuse under jax.vmap: harmless.
            warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            mcmc = run_mcmc(
                fixed_kernel(),
                SMALL_DATA,
                num_warmup=20,
                num_samples=100,
                num_chains=2,
                chain_method=method,
            )
        draws[getattr(method, "__name__", method)] = {
            **mcmc.get_samples(group_by_chain=True),
            **mcmc.get_extra_fields(group_by_chain=True),
        }
    return draws


def assert_same_draws(reference, other):
    assert set(reference) == set(other)
    for name in reference:
        # vmap may reorder floating-point sums in the potential, hence not bitwise equality.
        assert_allclose(np.asarray(other[name]), np.asarray(reference[name]), rtol=1e-5, atol=1e-6)


def test_chain_methods_give_the_same_draws_without_adaptation(fixed_draws):
    reference = fixed_draws["sequential"]
    assert set(reference) == {"loc", "scale", "accept_prob", "potential_energy"}
    assert reference["loc"].shape == (2, 100)
    assert np.ptp(np.asarray(reference["loc"][0])) > 0  # the chains moved
    assert not np.allclose(reference["loc"][0], reference["loc"][1])  # independent keys
    assert_same_draws(reference, fixed_draws["vectorized"])
    assert_same_draws(reference, fixed_draws["vmap"])


@pytest.mark.slow
def test_sequential_chains_adapt_separately():
    mcmc = run_mcmc(
        RWMH(small_model),
        SMALL_DATA,
        num_warmup=200,
        num_samples=10,
        num_chains=2,
        chain_method="sequential",
        extra_fields=("step_size",),
    )
    step_size = np.asarray(mcmc.get_extra_fields(group_by_chain=True)["step_size"])
    assert step_size[0, 0] != step_size[1, 0]


@pytest.mark.parametrize("chain_method", ["vectorized", "sequential"])
def test_adapt_state_step_size_is_collected_per_chain(chain_method):
    """``extra_fields=("adapt_state.step_size",)``, as NumPyro users collect it from HMC and
    NUTS, gives one step size per chain and draw; vectorized, where the adaptation state is
    shared by the chains, it failed in NumPyro's collection (IndexError in swapaxes)."""
    mcmc = run_mcmc(
        RWMH(small_model),
        SMALL_DATA,
        num_warmup=100,
        num_samples=30,
        num_chains=3,
        chain_method=chain_method,
        extra_fields=("adapt_state.step_size", "step_size"),
    )
    fields = mcmc.get_extra_fields(group_by_chain=True)
    collected = np.asarray(fields["adapt_state.step_size"])
    assert collected.shape == (3, 30)
    assert np.array_equal(collected, np.asarray(fields["step_size"]))
    assert np.all(collected > 0)
    if chain_method == "vectorized":
        # The adaptation is pooled: one step size for all chains, and one covariance.
        assert np.all(collected == collected[0, 0])
        assert mcmc.last_state.adapt_state.proposal_cov.shape == (2, 2)


def test_sampling_iterations_keep_the_last_warmup_parameters():
    """rwmh.numpyro keeps sampling iterations from adapting with a lax.cond on i < num_warmup:
    warmup adapts, and every parameter stays at its last warmup value after."""
    mcmc = make_mcmc(RWMH(small_model), num_warmup=300, num_samples=50, num_chains=3)
    mcmc.warmup(jax.random.key(4), SMALL_DATA, extra_fields=("step_size",), collect_warmup=True)
    warmup_steps = np.asarray(mcmc.get_extra_fields()["step_size"])
    warmed = mcmc.post_warmup_state
    mcmc.run(warmed.rng_key, SMALL_DATA, extra_fields=("step_size",))
    sampling_steps = np.asarray(mcmc.get_extra_fields()["step_size"])
    # Warmup moved the step size away from its start and the covariance away from the
    # identity.
    assert np.unique(warmup_steps).size > 10
    assert not np.allclose(np.asarray(warmed.adapt_state.proposal_cov), np.eye(2))
    # Every sampling iteration used exactly the step size warmup ended with, and the whole
    # adaptation state (covariance, its factor, the window statistics) is where warmup left it.
    assert np.all(sampling_steps == np.asarray(warmed.step_size)[0])
    now = jax.tree_util.tree_leaves(mcmc.last_state.adapt_state)
    then = jax.tree_util.tree_leaves(warmed.adapt_state)
    for a, b in zip(now, then, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_post_warmup_state_continues_the_same_chain(regression):
    whole, x, y = regression
    pieces = make_mcmc(
        RWMH(linear_regression),
        num_warmup=whole.num_warmup,
        num_samples=whole.num_samples,
        num_chains=whole.num_chains,
    )
    pieces.warmup(jax.random.key(1), x, y)
    state = pieces.post_warmup_state
    assert np.all(np.asarray(state.i) == whole.num_warmup)
    # A pickled and restored MCMC picks up from its warmup state; run with the state's own
    # keys it continues exactly the chains of the one-piece run.
    pieces = pickle.loads(pickle.dumps(pieces))
    pieces.run(state.rng_key, x, y)
    for name, value in whole.get_samples().items():
        assert_allclose(pieces.get_samples()[name], value, rtol=1e-6)
    assert_allclose(pieces.last_state.step_size, whole.last_state.step_size)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({}, "potential_fn"),
        ({"model": small_model, "potential_fn": lambda z: z}, "potential_fn"),
        ({"model": small_model, "target_accept_prob": 0.0}, "target_accept_prob"),
        ({"model": small_model, "target_accept_prob": 1.0}, "target_accept_prob"),
        ({"model": small_model, "target_accept_prob": -0.3}, "target_accept_prob"),
        ({"model": small_model, "step_size": 0.0}, "step_size"),
        ({"model": small_model, "step_size": -1.0}, "step_size"),
        ({"model": small_model, "step_size": float("nan")}, "step_size"),
        ({"model": small_model, "proposal_cov": jnp.array([1.0, -1.0])}, "proposal_cov"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RWMH(**kwargs)


def test_bad_arguments_found_at_init():
    with pytest.raises(ValueError, match="init_params"):
        RWMH(potential_fn=lambda z: jnp.sum(z**2)).init(jax.random.key(0), 10, None, (), {})
    kernel = RWMH(small_model, proposal_cov=jnp.ones(3))
    with pytest.raises(ValueError, match="proposal_cov"):
        kernel.init(jax.random.key(0), 10, None, (SMALL_DATA,), {})


def test_kernel_interface():
    kernel = fixed_kernel()
    assert kernel.model is small_model
    assert kernel.sample_field == "z"
    assert {"z", "accept_prob", "potential_energy"} <= set(kernel.default_fields)
    assert RWMHKernelState._fields[-1] == "rng_key"
    state = kernel.init(jax.random.key(0), 10, None, (SMALL_DATA,), {})
    assert set(state.z) == {"loc", "scale"}
    assert kernel.get_diagnostics_str(state).startswith("step size")
    new_state = kernel.sample(state, (SMALL_DATA,), {})
    assert int(new_state.i) == 1
    constrained = kernel.postprocess_fn((SMALL_DATA,), {})(new_state.z)
    assert_allclose(constrained["scale"], jnp.exp(new_state.z["scale"]), rtol=1e-6)
    # Pickling drops the closures that init built; MCMC rebuilds them by calling init.
    restored = pickle.loads(pickle.dumps(kernel))
    assert restored._sample_fn is None
    # refresh recomputes the cached potential for new data (what NumPyro's Gibbs needs).
    new_data = SMALL_DATA + 1.0
    refreshed = kernel.refresh(new_state, (new_data,), {})
    expected = kernel.get_potential_fn((new_data,), {})(new_state.z)
    assert_allclose(refreshed.potential_energy, expected, rtol=1e-6)
    assert not np.allclose(refreshed.potential_energy, new_state.potential_energy)
    wrapped = kernel.wrap_model(lambda model: model)
    assert wrapped is not kernel and wrapped._sample_fn is None and kernel._sample_fn is not None


def run_script(script: str, env_extra: dict) -> str:
    env = {**os.environ, "PYTHONPATH": SRC, "JAX_PLATFORMS": "cpu", **env_extra}
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_parallel_chains_match_the_other_methods(fixed_draws, tmp_path):
    """pmap needs one device per chain: fake two CPU devices in a fresh process."""
    out = run_script(
        f"""
        import numpyro
        numpyro.set_host_device_count(2)
        import jax, numpy as np
        from numpyro.infer import MCMC
        {_HELPER}
        assert jax.local_device_count() == 2
        mcmc = MCMC(fixed_kernel(), num_warmup=20, num_samples=100, num_chains=2,
                    chain_method="parallel", progress_bar=False)
        mcmc.run(jax.random.key(0), SMALL_DATA)
        draws = {{**mcmc.get_samples(group_by_chain=True),
                  **mcmc.get_extra_fields(group_by_chain=True)}}
        np.savez({str(tmp_path / "parallel.npz")!r}, **draws)
        print("ok")
        """,
        {},
    )
    assert out.strip() == "ok"
    parallel = dict(np.load(tmp_path / "parallel.npz"))
    assert_same_draws(fixed_draws["sequential"], parallel)


# The subprocess cannot import this test module (it is not a package); it gets the same
# small model and kernel settings as source.
_HELPER = textwrap.dedent(
    """
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from rwmh.numpyro import RWMH
    def small_model(data):
        loc = numpyro.sample("loc", dist.Normal(0.0, 5.0))
        scale = numpyro.sample("scale", dist.HalfNormal(2.0))
        with numpyro.plate("data", data.shape[0]):
            numpyro.sample("obs", dist.Normal(loc, scale), obs=data)
    SMALL_DATA = jnp.array([0.3, -1.2, 0.8, 2.1, 0.4, -0.1, 1.3])
    def fixed_kernel():
        return RWMH(small_model, step_size=0.4, adapt_step_size=False, adapt_proposal_cov=False)
    """
).replace("\n", "\n        ")


def test_float64_under_x64():
    """x64 is switched on in a fresh process so that it cannot leak into the other tests."""
    out = run_script(
        """
        import jax, jax.numpy as jnp, numpy as np
        from numpyro.infer import MCMC
        from rwmh.numpyro import RWMH
        from rwmh.models import linear_regression, simulate_linear_regression
        assert jax.config.jax_enable_x64
        x, y = simulate_linear_regression(jax.random.key(0), 100)
        mcmc = MCMC(RWMH(linear_regression), num_warmup=500, num_samples=1000, num_chains=2,
                    chain_method="vectorized", progress_bar=False)
        mcmc.run(jax.random.key(1), x, y, extra_fields=("step_size",))
        samples, fields = mcmc.get_samples(), mcmc.get_extra_fields()
        state = mcmc.last_state
        dtypes = {jnp.asarray(v).dtype for v in [*samples.values(), *fields.values(),
                  *state.z.values(), state.adapt_state.proposal_cov]}
        assert dtypes == {np.dtype("float64")}, dtypes
        assert abs(float(samples["slope"].mean()) - 2.0) < 0.2
        print("ok")
        """,
        {"JAX_ENABLE_X64": "1"},
    )
    assert out.strip() == "ok"


def gaussian_5d():
    numpyro.sample("x", dist.Normal(jnp.zeros(5), 1.0))


def test_one_chain_adapting_alone_samples_near_the_target_acceptance():
    """Issue 18, item 7: a chain adapting on its own draws alone (``jax.vmap`` runs 48 such
    chains side by side, each with its own kernel state) samples near the target acceptance.

    With the final step size resting on Stan's 50-step final buffer these 48 chains' sampling
    acceptance had rms distance 0.053 from the target (0.14 to 0.35 here; the issue saw 0.36
    against 0.26; over seeds 0-2, 48 chains: sd 0.054, 0.17 to 0.40); with one chain's
    200-step buffer, rms 0.035 here (0.18 to 0.33; seeds 0-2: sd 0.031, 0.21 to 0.32), of
    which about 0.01 is the 1000 draws' own Monte Carlo error. The rms of 48 chains is known
    to about 10%: 0.040 lies about three of those from the expected 0.031 and 0.054.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NumPyro's note on vmap as the chain method
        mcmc = run_mcmc(
            RWMH(gaussian_5d),
            num_warmup=1000,
            num_samples=1000,
            num_chains=48,
            chain_method=jax.vmap,
            seed=3,
        )
    acceptance = np.asarray(mcmc.last_state.mean_accept_prob)
    assert acceptance.shape == (48,)
    target = 0.234 + 0.206 * np.exp(-2.0)
    rms = float(np.sqrt(np.mean((acceptance - target) ** 2)))
    assert rms < 0.040, (rms, acceptance)
    assert abs(acceptance.mean() - target) < 0.012, acceptance.mean()
