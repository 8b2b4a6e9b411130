"""Faults inside the log density: NaN, infinities, huge finite values and float32 overflow.

The contract (``rwmh.kernel``): a proposal whose log density is NaN or infinite is rejected
with acceptance probability 0 and the chain goes on. Every front door is checked: the kernel
vmapped in a scan, ``rwmh.sample`` (warmup too, so that the adaptation sees the faults) and
NumPyro's ``MCMC`` with :class:`rwmh.numpyro.RWMH`. Each test also asserts that its fault
actually fired, so that a target which never misbehaves cannot pass for one that does.

The NaN holes are grid cells of side 1/4 picked by an integer hash of the cell's index, so
they are a deterministic function of the position that any draw can be checked against, and
the exact moments of a Gaussian with those holes cut out are known.
"""

from __future__ import annotations

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC
from scipy import stats

import rwmh
from rwmh import tuning
from rwmh.numpyro import RWMH

#: Side of the grid cells that the NaN holes are made of (a power of two: exact cell indices).
CELL = 0.25
#: One cell in HOLE_MODULUS is a hole.
HOLE_MODULUS = 5


def _mix(h):
    """An avalanching 32-bit integer hash (Wellons' lowbias32)."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * np.uint32(0x846CA68B)
    return h ^ (h >> 16)


def in_hole(flat):
    """Whether the points ``(..., d)`` lie in a NaN hole: 1 in 5 grid cells, chosen by a hash
    of the cell's integer index. Integer arithmetic, so the kernel and the test agree exactly
    on every point."""
    cells = jnp.floor(jnp.asarray(flat) * (1.0 / CELL)).astype(jnp.int32).astype(jnp.uint32)
    h = jnp.full(cells.shape[:-1], 0x9E3779B9, jnp.uint32)
    for i in range(cells.shape[-1]):
        h = _mix(h ^ cells[..., i])
    return h % HOLE_MODULUS == 0


def holey_gaussian(x):
    """Standard normal log density, NaN in the holes."""
    return jnp.where(in_hole(x), jnp.nan, -0.5 * jnp.sum(x**2))


def holey_tree(tree):
    """A PyTree target whose NaN comes from one entry of one leaf: ``tree["b"][1][1]`` in a
    one-dimensional hole poisons the sum; the other entries are plain standard normals."""
    a, (b0, b1) = tree["a"], tree["b"]
    terms = -0.5 * b1**2
    terms = jnp.where(in_hole(b1[:, None]) & (jnp.arange(b1.shape[0]) == 1), jnp.nan, terms)
    return -0.5 * jnp.sum(a**2) - 0.5 * b0**2 + jnp.sum(terms)


def standard_normal(x):
    return -0.5 * jnp.sum(x**2)


def gaussian_potential(z):
    return 0.5 * jnp.sum(z**2)


# --- harnesses ------------------------------------------------------------------------------


def run_kernel(logdensity_fn, positions, num_steps, step_size, seed=0):
    """The kernel in a vmap + scan loop. Returns numpy arrays ``(chain, step, ...)``: the
    states (position PyTree, logdensity) after each step and the step's info."""
    algo = rwmh.random_walk(logdensity_fn, step_size)
    states = jax.vmap(algo.init)(positions)
    num_chains = states.logdensity.shape[0]

    @jax.jit
    def loop(states, key):
        def one_step(states, key):
            states, info = jax.vmap(algo.step)(jax.random.split(key, num_chains), states)
            return states, (states, info)

        return jax.lax.scan(one_step, states, jax.random.split(key, num_steps))

    _, (trace, info) = loop(states, jax.random.key(seed))
    swap = lambda x: np.swapaxes(np.asarray(x), 0, 1)
    return jax.tree_util.tree_map(swap, trace), jax.tree_util.tree_map(swap, info)


def flat_draws(positions):
    """``(chain, step, d)`` from a PyTree of ``(chain, step, ...)`` leaves."""
    leaves = jax.tree_util.tree_leaves(positions)
    return np.concatenate([leaf.reshape(*leaf.shape[:2], -1) for leaf in leaves], axis=-1)


def recompute(logdensity_fn, positions):
    """``logdensity_fn`` at every draw of ``positions`` (leaves ``(chain, step, ...)``)."""
    fn = jax.jit(jax.vmap(jax.vmap(logdensity_fn)))
    return np.asarray(fn(positions))


def assert_healthy(positions, lp, acceptance_rate, logdensity_fn):
    """Draws and log densities finite, acceptance probabilities in [0, 1], and every recorded
    log density that of its draw."""
    for leaf in jax.tree_util.tree_leaves(positions):
        assert np.all(np.isfinite(leaf))
    assert np.all(np.isfinite(lp))
    assert not np.any(np.isnan(acceptance_rate))
    assert np.all((acceptance_rate >= 0) & (acceptance_rate <= 1))
    np.testing.assert_allclose(recompute(logdensity_fn, positions), lp, rtol=1e-5, atol=1e-5)


def assert_kernel_contract(trace, info, logdensity_fn):
    """:func:`assert_healthy` on a kernel run, and the accept/reject bookkeeping: a proposal
    with a non-finite log density has acceptance 0 and is not taken; an accepted step moves
    to the proposal, a rejected one stays. Returns the mask of faulty proposals."""
    assert_healthy(trace.position, trace.logdensity, info.acceptance_rate, logdensity_fn)
    faulty = ~np.isfinite(info.proposal.logdensity)
    assert np.all(info.acceptance_rate[faulty] == 0.0)
    assert not np.any(info.is_accepted[faulty])
    new, proposed = flat_draws(trace.position), flat_draws(info.proposal.position)
    np.testing.assert_array_equal(new[info.is_accepted], proposed[info.is_accepted])
    previous = np.concatenate([new[:, :1], new[:, :-1]], axis=1)
    rejected = ~info.is_accepted
    rejected[:, 0] = False  # the state before the first step is not in the trace
    np.testing.assert_array_equal(new[rejected], previous[rejected])
    return faulty


def starts_outside_holes(num_chains, dimension, seed=0):
    """``num_chains`` standard-normal points that are not in a hole (the first that qualify)."""
    candidates = np.asarray(jax.random.normal(jax.random.key(seed), (8 * num_chains, dimension)))
    return jnp.asarray(candidates[~np.asarray(in_hole(candidates))][:num_chains])


def holey_gaussian_moments(dimension=2, half_width=12.0):
    """Exact mean and second moment of each coordinate of the standard normal in
    ``dimension = 2`` restricted to the cells that are not holes (the holes only ever cut
    whole cells, so the integrals factor cell by cell)."""
    assert dimension == 2
    edges = np.arange(-half_width, half_width + CELL, CELL)
    a, b = edges[:-1], edges[1:]
    mass = stats.norm.cdf(b) - stats.norm.cdf(a)
    first = stats.norm.pdf(a) - stats.norm.pdf(b)
    second = mass + a * stats.norm.pdf(a) - b * stats.norm.pdf(b)
    centres = (a + b) / 2
    grid = np.stack(np.meshgrid(centres, centres, indexing="ij"), axis=-1)
    kept = ~np.asarray(in_hole(grid))
    total = np.sum(kept * np.outer(mass, mass))
    mean = [np.sum(kept * np.outer(first, mass)), np.sum(kept * np.outer(mass, first))]
    square = [np.sum(kept * np.outer(second, mass)), np.sum(kept * np.outer(mass, second))]
    return np.array(mean) / total, np.array(square) / total


# --- NaN at random places -------------------------------------------------------------------


def test_hash_holes_cover_a_fifth_of_the_plane():
    """The fault generator itself: about 1 cell in 5 is a hole, and the exact moments of the
    holey Gaussian differ from the standard normal's (so the moment test below can fail)."""
    centres = (np.arange(-40, 40) + 0.5) * CELL
    grid = np.stack(np.meshgrid(centres, centres, indexing="ij"), axis=-1)
    fraction = float(np.mean(np.asarray(in_hole(grid))))
    assert 0.17 < fraction < 0.23
    mean, square = holey_gaussian_moments()
    assert np.all(np.abs(square - 1.0) > 1e-3)


def test_kernel_never_stops_in_a_nan_hole():
    """16 chains of 4000 steps on a 2-d normal with NaN in a fifth of the cells: proposals land
    in holes often, are all rejected with probability 0, no draw is in a hole, and the draws
    have the exact mean and second moment of the normal with the holes cut out."""
    positions = starts_outside_holes(16, 2)
    trace, info = run_kernel(holey_gaussian, positions, 4000, step_size=1.5, seed=1)
    faulty = assert_kernel_contract(trace, info, holey_gaussian)
    assert np.all(np.isnan(info.proposal.logdensity[faulty]))
    assert faulty.mean() > 0.1
    assert not np.any(np.asarray(in_hole(trace.position)))
    assert info.acceptance_rate.mean() > 0.2

    draws = trace.position[:, 500:]
    dataset = az.convert_to_dataset({"x": draws, "x2": draws**2})
    mcse = az.mcse(dataset)
    mean, square = holey_gaussian_moments()
    for name, values, truth in (("x", draws, mean), ("x2", draws**2, square)):
        error = np.abs(values.mean(axis=(0, 1)) - truth)
        assert np.all(error < 4.5 * np.asarray(mcse[name])), (name, error, mcse[name])


def test_nan_in_one_entry_of_one_leaf():
    """A dict/tuple PyTree whose log density is NaN when one entry of one leaf is in a hole:
    that entry never stops in a hole, the other leaves move freely, the state stays
    consistent."""
    num_chains = 8
    start = starts_outside_holes(num_chains, 1, seed=2)[:, 0]
    positions = {
        "a": jnp.zeros((num_chains, 2)),
        "b": (jnp.zeros(num_chains), jnp.stack([start, start], axis=1)),
    }
    trace, info = run_kernel(holey_tree, positions, 2000, step_size=1.0, seed=3)
    faulty = assert_kernel_contract(trace, info, holey_tree)
    assert faulty.mean() > 0.05
    entry = trace.position["b"][1][..., 1]
    assert not np.any(np.asarray(in_hole(entry[..., None])))
    # The entry next to it has no holes and does visit hole cells.
    assert np.any(np.asarray(in_hole(trace.position["b"][1][..., :1])))
    for leaf in jax.tree_util.tree_leaves(trace.position):
        assert np.all(np.std(leaf, axis=1) > 0.3)


# --- huge finite values ---------------------------------------------------------------------


def make_terraces(height):
    """A flat box at ``+height`` (|x0| < 1), a normal band right of it (1 <= x0 < 4) and a
    floor at ``-height`` everywhere else. From the floor left of the box the only way up is a
    jump into the box, whose log ratio ``2 * height`` overflows to +inf in float32 for height
    3e38; a jump from the box to the floor overflows to -inf."""

    def terraces(x):
        normal = -0.5 * jnp.sum(x**2)
        band = (x[0] >= 1.0) & (x[0] < 4.0)
        return jnp.where(jnp.abs(x[0]) < 1.0, height, jnp.where(band, normal, -height))

    return terraces


TERRACES = {height: make_terraces(height) for height in (1e30, 3e38)}


@pytest.mark.parametrize("height", [1e30, 3e38])
def test_huge_log_densities_and_overflowing_ratios(height):
    """Chains that start on the floor, in the band and in the box all end in the box and
    never leave it; acceptance probabilities are 0 or 1 across the cliffs, never NaN."""
    logdensity = TERRACES[height]
    x0 = jnp.array([-6.0, -3.0, -1.5, 0.0, 0.5, 2.0, 3.0, 6.0])
    positions = jnp.stack([x0, jnp.zeros(8)], axis=1)
    trace, info = run_kernel(logdensity, positions, 1000, step_size=2.0, seed=4)
    assert_kernel_contract(trace, info, logdensity)
    in_box = np.abs(trace.position[..., 0]) < 1.0
    # Once in the box, always in the box; every chain gets there.
    assert np.all(np.diff(in_box.astype(int), axis=1) >= 0)
    assert np.all(in_box[:, -1])
    # Moves inside the box have log ratio 0 and are accepted.
    assert info.acceptance_rate[:, -100:].mean() > 0.1
    current = np.concatenate(
        [np.asarray(jax.vmap(logdensity)(positions))[:, None], trace.logdensity[:, :-1]], axis=1
    )
    proposed = info.proposal.logdensity
    up = (current == -height) & (proposed == height)
    down = (current == height) & (proposed == -height)
    # Both cliffs were proposed: every jump up is taken with probability 1, none down.
    assert up.sum() > 0 and down.sum() > 0
    assert np.all(info.acceptance_rate[up] == 1.0) and np.all(info.is_accepted[up])
    assert np.all(info.acceptance_rate[down] == 0.0) and not np.any(info.is_accepted[down])


# --- float32 overflow -----------------------------------------------------------------------


def power_wall(x):
    """``exp(-sum x^40)``: almost uniform on the unit cube; ``x^40`` overflows to inf (log
    density -inf) for ``|x| > 9.3``."""
    return -jnp.sum(x**40)


def power_wall_nan(x):
    """``-p`` computed as ``p - 2p``: -inf once ``2p`` overflows, NaN (inf - inf) once ``p``
    does."""
    p = jnp.sum(x**40)
    return p - 2.0 * p


def softplus_overflow(x):
    """A normal times ``1 + exp(-x0^2)``, written the naive way: ``log(1 + exp(x0^2)) - x0^2``
    is +inf once ``exp`` overflows (``|x0| > 9.4``)."""
    y = x[0] ** 2
    return -0.5 * jnp.sum(x**2) + (jnp.log(1.0 + jnp.exp(y)) - y)


@pytest.mark.parametrize(
    "logdensity, fault",
    [(power_wall, -np.inf), (power_wall_nan, np.nan), (softplus_overflow, np.inf)],
    ids=["minus_inf", "nan", "plus_inf"],
)
def test_overflowing_log_densities_are_rejected(logdensity, fault):
    positions = jax.random.uniform(jax.random.key(5), (8, 2), minval=-0.5, maxval=0.5)
    trace, info = run_kernel(logdensity, positions, 1000, step_size=4.0, seed=6)
    faulty = assert_kernel_contract(trace, info, logdensity)
    fired = info.proposal.logdensity[faulty]
    assert np.any(np.isnan(fired) if np.isnan(fault) else fired == fault)
    assert info.acceptance_rate.mean() > 0.01
    assert np.all(np.abs(flat_draws(trace.position)) < 9.3)


def heavy_tails(x):
    """Density proportional to ``prod (1 + |x_i|)^-2``: finite at 1e38, -inf at inf."""
    return -2.0 * jnp.sum(jnp.log1p(jnp.abs(x)))


def test_proposals_that_overflow_to_infinity_are_rejected():
    """Chains at 1e38 with step size 3e38: a quarter of the proposed coordinates overflow to
    +-inf and are rejected; the chains still move and stay finite."""
    positions = jnp.full((8, 2), 1e38, jnp.float32)
    trace, info = run_kernel(heavy_tails, positions, 200, step_size=3e38, seed=7)
    faulty = assert_kernel_contract(trace, info, heavy_tails)
    proposed = flat_draws(info.proposal.position)
    assert np.isinf(proposed).any(axis=-1).mean() > 0.1
    assert np.all(faulty[np.isinf(proposed).any(axis=-1)])
    # Every chain moved.
    assert np.all(info.is_accepted.any(axis=1))


def test_a_proposal_at_infinity_is_rejected_where_the_log_density_is_finite():
    """A flat log density is finite at +-inf and NaN positions too: the kernel must reject a
    proposal that overflowed by its position, not only by its log density (before the fix
    every such proposal was accepted and the chains went to NaN with a finite ``lp``)."""
    flat = lambda x: jnp.zeros((), x.dtype)
    positions = jnp.full((8, 2), 1e38, jnp.float32)
    trace, info = run_kernel(flat, positions, 200, step_size=3e38, seed=7)
    proposed = flat_draws(info.proposal.position)
    overflowed = ~np.isfinite(proposed).all(axis=-1)
    assert overflowed.mean() > 0.1  # the fault fired
    assert not np.any(info.is_accepted[overflowed])
    assert np.all(info.acceptance_rate[overflowed] == 0.0)
    assert np.all(np.isfinite(flat_draws(trace.position)))


@pytest.mark.parametrize(
    "logdensity",
    [lambda x: 0.0, lambda x: jnp.sum(jnp.log(jax.nn.sigmoid(x)))],
    ids=["constant", "log-sigmoid"],
)
def test_improper_flat_targets_never_give_non_finite_draws(logdensity):
    """Targets that are flat toward infinity: every proposal is accepted, warmup grows the
    step size until proposals overflow. Before the fix the overflowed proposals were accepted
    (their log density is finite) and every draw was NaN or inf with a finite ``lp``."""
    result = rwmh.sample(
        jax.random.key(0), logdensity, jnp.zeros((4, 2)), 500, 20_000, progress_bar=False
    )
    assert np.all(np.isfinite(result.positions))
    assert np.all(np.isfinite(result.stats["lp"]))
    assert np.isfinite(float(result.parameters["step_size"]))
    # The fault fired: the chains went to float32's range, where proposals overflow.
    assert np.abs(result.positions).max() > 1e30


# --- the driver: warmup and sampling --------------------------------------------------------


def assert_parameters_valid(parameters):
    """A positive finite step size and a covariance that ``rwmh.random_walk`` accepts:
    positive variances, or a matrix symmetric to float32 rounding (the check of
    ``proposal_scale``) and positive definite."""
    step_size = float(parameters["step_size"])
    assert np.isfinite(step_size) and step_size > 0
    cov = np.asarray(parameters["proposal_cov"], float)
    assert np.all(np.isfinite(cov))
    rwmh.random_walk(standard_normal, step_size, parameters["proposal_cov"])
    if cov.ndim == 1:
        assert np.all(cov > 0)
    else:
        assert np.linalg.eigvalsh((cov + cov.T) / 2).min() > 0


def test_sample_with_nan_holes_warmup_and_sampling():
    """``rwmh.sample`` on the holey normal: warmup and sampling run through the holes, the
    adapted parameters are valid, and no draw is in a hole. Chains may not start in a hole
    (log density NaN): that is refused before anything runs, naming those chains."""
    good = starts_outside_holes(4, 2, seed=8)
    grid = (np.arange(-20, 20) + 0.5) * CELL
    grid = np.stack(np.meshgrid(grid, grid), axis=-1).reshape(-1, 2)
    bad = jnp.asarray(grid[np.asarray(in_hole(grid))][:4])
    assert np.all(np.isnan(np.asarray(jax.vmap(holey_gaussian)(bad))))
    with pytest.raises(ValueError, match="not finite at initial_positions of chains 4, 5, 6, 7"):
        rwmh.sample(
            jax.random.key(9),
            holey_gaussian,
            jnp.concatenate([good, bad]),
            1000,
            500,
            progress_bar=False,
        )

    positions = starts_outside_holes(8, 2, seed=8)
    result = rwmh.sample(
        jax.random.key(9), holey_gaussian, positions, 1000, 500, progress_bar=False
    )
    stats_ = result.stats
    assert_healthy(result.positions, stats_["lp"], stats_["acceptance_rate"], holey_gaussian)
    assert not np.any(np.asarray(in_hole(result.positions)))
    assert_parameters_valid(result.parameters)
    assert np.all(stats_["acceptance_rate"].mean(axis=1) > 0.1)
    warmup = np.asarray(result.warmup_info.acceptance_rate)
    assert not np.any(np.isnan(warmup)) and np.all((warmup >= 0) & (warmup <= 1))


def test_sample_recovers_from_a_step_size_that_overflows_proposals():
    """An initial step size of 3e38: during the first slow window (steps 3-17 of 20) proposals
    overflow to +-inf and are rejected with weight 0 in the Rao-Blackwellised covariance.
    0 * inf is NaN: before the fix it poisoned the window's moments, so the covariance never
    updated, the step size never restarted and the chains sampled with a step of 2e37,
    accepting nothing."""
    positions = jax.random.normal(jax.random.key(0), (64, 2))
    result = rwmh.sample(
        jax.random.key(1),
        standard_normal,
        positions,
        200,
        20,
        step_size=3e38,
        progress_bar=False,
    )
    # The fault fired: the step size was still above 1e38 when the slow window started.
    assert float(result.warmup_info.step_size[3]) > 1e38
    stats_ = result.stats
    assert_healthy(result.positions, stats_["lp"], stats_["acceptance_rate"], standard_normal)
    assert_parameters_valid(result.parameters)
    assert float(result.parameters["step_size"]) < 10.0
    assert stats_["acceptance_rate"].mean() > 0.1


def test_update_ignores_an_infinite_proposal_of_weight_zero():
    """``tuning.update`` given a proposal at +-inf with acceptance 0 (its weight): the
    window's moments stay finite and equal those without that proposal."""
    row = tuning.build_schedule(200).at(80)
    positions = jnp.array([[0.0, 1.0], [2.0, -1.0], [1.0, 0.5]])
    finite = positions + 0.5
    proposals = finite.at[1].set(jnp.array([jnp.inf, -jnp.inf]))
    rates = jnp.array([0.5, 0.0, 0.25])
    update = jax.jit(tuning.update, static_argnums=5)
    for dense in (True, False):
        state = tuning.init(2, jnp.float32, dense=dense)
        faulty = update(state, row, positions, proposals, rates, 0.3)
        clean = update(state, row, positions, finite, rates, 0.3)
        for name in ("weight", "mean", "m2"):
            value = np.asarray(getattr(faulty, name))
            assert np.all(np.isfinite(value)), (name, dense)
            np.testing.assert_allclose(value, getattr(clean, name), rtol=1e-6, err_msg=name)


# --- NumPyro ------------------------------------------------------------------------------


def run_numpyro(kernel, num_warmup, num_samples, num_chains, seed=0, **run_kwargs):
    mcmc = MCMC(
        kernel,
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.key(seed), **run_kwargs)
    return mcmc


def assert_numpyro_healthy(mcmc, logdensity_fn, positions):
    fields = mcmc.get_extra_fields(group_by_chain=True)
    lp = -np.asarray(fields["potential_energy"])
    assert_healthy(positions, lp, np.asarray(fields["accept_prob"]), logdensity_fn)
    # Vectorized: one adaptation state shared by all chains, its step size repeated per chain.
    adapt = mcmc.last_state.adapt_state
    step_sizes = np.asarray(adapt.step_size)
    assert step_sizes.shape == (mcmc.num_chains,) and np.all(step_sizes == step_sizes[0])
    assert_parameters_valid({"step_size": step_sizes[0], "proposal_cov": adapt.proposal_cov})
    for name in ("mean", "m2", "previous_mean", "previous_m2"):
        assert np.all(np.isfinite(np.asarray(getattr(adapt, name)))), name


def holey_model():
    x = numpyro.sample("x", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    numpyro.factor("holes", jnp.where(in_hole(x), jnp.nan, 0.0))


def holey_model_logdensity(x):
    # The model's log density includes the normal's constant, -log(2 pi) in two dimensions.
    return holey_gaussian(x) - jnp.log(2 * jnp.pi)


def test_numpyro_model_with_nan_holes():
    """A model whose ``factor`` is NaN in the holes: NumPyro's initialisation avoids them, RWMH
    never stops in one."""
    mcmc = run_numpyro(RWMH(holey_model), 500, 500, 4, seed=11)
    draws = np.asarray(mcmc.get_samples(group_by_chain=True)["x"])
    assert_numpyro_healthy(mcmc, holey_model_logdensity, draws)
    assert not np.any(np.asarray(in_hole(draws)))


def test_numpyro_recovers_from_a_step_size_that_overflows_proposals():
    """The NumPyro adapter shares the adaptation: the same overflowing first window as
    :func:`test_sample_recovers_from_a_step_size_that_overflows_proposals`."""
    init = jax.random.normal(jax.random.key(0), (64, 2))
    mcmc = run_numpyro(
        RWMH(potential_fn=gaussian_potential, step_size=3e38), 20, 200, 64, init_params=init
    )
    draws = np.asarray(mcmc.get_samples(group_by_chain=True))
    assert_numpyro_healthy(mcmc, standard_normal, draws)
    assert np.all(np.asarray(mcmc.last_state.adapt_state.step_size) < 10.0)
    assert np.mean(mcmc.get_extra_fields()["accept_prob"]) > 0.1
