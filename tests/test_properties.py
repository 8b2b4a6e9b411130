"""Property-based tests (hypothesis) of the kernel's invariants (``rwmh.kernel``).

Positions are PyTrees of dicts, tuples and lists (nested) around one to three leaves of shapes
``()``, ``(2,)``, ``(3,)`` and ``(2, 2)``, flattened dimension 1 to 8 (``LEAF_SEQUENCES``); in
float32, in float64 under ``jax_enable_x64`` and in float32 under x64. Proposal covariances are
None, positive vectors or ``D (A A^T + eps I) D`` with random ``A`` and scales ``D`` spread over
up to six decades; keys are typed (``jax.random.key``) or legacy (``jax.random.PRNGKey``).

The kernel runs op by op (no ``jit`` around it): each primitive compiles once per shape and is
then cached, which costs less over a few dozen PyTrees than compiling a whole step per example.
x64 is switched on only inside ``jax.enable_x64``, which restores the setting on exit.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rwmh
from rwmh.kernel import proposal_scale

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)
#: For the tests whose examples compile the most (batched steps, a new shape per example).
FEWER = settings(SETTINGS, max_examples=15)

MAX_DIMENSION = 8
#: name -> (dtype of the positions, whether x64 is on)
PRECISIONS = {
    "float32": (np.float32, False),
    "float64": (np.float64, True),
    "float32 under x64": (np.float32, True),
}


def _enable_x64(enabled: bool):
    # jax.enable_x64 is the context manager in current jax; older versions kept it in
    # jax.experimental.
    manager = getattr(jax, "enable_x64", None)
    if manager is None:
        from jax.experimental import enable_x64 as manager
    return manager(enabled)


@contextlib.contextmanager
def precision(name):
    dtype, x64 = PRECISIONS[name]
    with _enable_x64(x64):
        yield np.dtype(dtype)


class Leaf:
    """Placeholder for an array of ``shape`` in a drawn PyTree structure."""

    def __init__(self, shape):
        self.shape = shape


#: The leaf shapes of the positions, one sequence per flattened dimension 1 to 8. Every
#: sequence compiles its own ravel, unravel and log density (and every dimension its own random
#: numbers), so they come from this short list, shared by all the tests; the containers around
#: the leaves (dicts, tuples, lists, nested) cost no compilation and are drawn freely.
LEAF_SEQUENCES = (
    ((),),
    ((2,),),
    ((), (2,)),
    ((2, 2),),
    ((3,), (), ()),
    ((2,), (), (3,)),
    ((2, 2), (3,)),
    ((), (3,), (2, 2)),
)


@st.composite
def containers(draw, leaves, depth=0):
    """A PyTree of dicts, tuples and lists holding ``leaves`` in order (a bare leaf too)."""
    if len(leaves) == 1 and (depth >= 2 or draw(st.booleans())):
        return leaves[0]
    if depth >= 2 or len(leaves) == 1:
        groups = [[leaf] for leaf in leaves]
    else:
        # Cut between leaves i and i + 1 where drawn: consecutive groups, in order.
        cuts = draw(st.lists(st.booleans(), min_size=len(leaves) - 1, max_size=len(leaves) - 1))
        groups = [[leaves[0]]]
        for leaf, cut in zip(leaves[1:], cuts, strict=True):
            if cut:
                groups.append([leaf])
            else:
                groups[-1].append(leaf)
    children = [draw(containers(group, depth + 1)) for group in groups]
    kind = draw(st.sampled_from(["dict", "tuple", "list"]))
    if kind == "dict":
        # Keys in any order: ravel_pytree flattens dicts by sorted key.
        keys = draw(st.permutations("abcdefgh"))[: len(children)]
        return dict(zip(keys, children, strict=True))
    return tuple(children) if kind == "tuple" else children


@st.composite
def structures(draw):
    return draw(containers([Leaf(shape) for shape in draw(st.sampled_from(LEAF_SEQUENCES))]))


def dimension_of(structure):
    leaves = jax.tree_util.tree_leaves(structure, is_leaf=lambda x: isinstance(x, Leaf))
    return sum(math.prod(leaf.shape) for leaf in leaves)


def build_position(structure, dtype, seed, num_chains=None):
    """Arrays for the leaves of ``structure``: standard normals (with a leading chain axis of
    ``num_chains`` when given)."""
    rng = np.random.default_rng(seed)
    batch = () if num_chains is None else (num_chains,)

    def make(leaf):
        return jnp.asarray(rng.normal(size=batch + leaf.shape), dtype)

    return jax.tree_util.tree_map(make, structure, is_leaf=lambda x: isinstance(x, Leaf))


@st.composite
def covariances(draw, dimension):
    """None, positive variances, or a dense SPD ``D (A A^T + eps I) D``; the scales ``D``
    span up to six decades (badly scaled), ``eps`` down to 1e-2 (strong correlations)."""
    kind = draw(st.sampled_from(["none", "diagonal", "dense"]))
    if kind == "none":
        return None
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    decades = draw(st.sampled_from([0.0, 1.0, 3.0]))
    scales = 10.0 ** rng.uniform(-decades, decades, dimension)
    if kind == "diagonal":
        return scales**2
    a = rng.normal(size=(dimension, dimension)) / np.sqrt(dimension)
    eps = draw(st.sampled_from([1e-2, 1e-1, 1.0]))
    return scales[:, None] * (a @ a.T + eps * np.eye(dimension)) * scales[None, :]


step_sizes = st.floats(-3.0, 3.0).map(lambda exponent: 10.0**exponent)
key_kinds = st.sampled_from(["typed", "legacy"])
seeds = st.integers(0, 2**31 - 1)


@pytest.fixture(autouse=True)
def x64_does_not_leak():
    """Every test leaves ``jax_enable_x64`` as it found it (off)."""
    assert not jax.config.jax_enable_x64
    yield
    assert not jax.config.jax_enable_x64


def make_key(kind, seed):
    return jax.random.key(seed) if kind == "typed" else jax.random.PRNGKey(seed)


def gaussian(position):
    """Standard normal over all the entries of a PyTree position."""
    return -0.5 * sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(position))


def tolerance(dtype):
    return 1e-5 if dtype == np.float32 else 1e-12


def assert_like(tree, reference, batch=()):
    """Same PyTree structure as ``reference``; leaves of the same dtype and of its shape with
    ``batch`` in front."""
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(reference)
    for leaf, ref in zip(
        jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(reference), strict=True
    ):
        assert leaf.shape == batch + ref.shape and leaf.dtype == ref.dtype


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_step_invariants(old, new, info, dtype):
    """One transition of one chain: structure and dtypes kept, a consistent state, the
    acceptance probability of the definition, and the state is the proposal if and only if
    it was accepted."""
    assert_like(new.position, old.position)
    assert_like(info.proposal.position, old.position)
    assert new.logdensity.shape == () and new.logdensity.dtype == dtype
    np.testing.assert_allclose(new.logdensity, gaussian(new.position), rtol=tolerance(dtype))
    rate = float(info.acceptance_rate)
    assert info.acceptance_rate.shape == () and 0.0 <= rate <= 1.0
    log_ratio = float(info.proposal.logdensity) - float(old.logdensity)
    np.testing.assert_allclose(
        rate, min(1.0, math.exp(min(log_ratio, 0.0))), rtol=10 * tolerance(dtype), atol=1e-30
    )
    assert info.is_accepted.dtype == bool and info.is_accepted.shape == ()
    if bool(info.is_accepted):
        assert rate > 0.0
        assert_trees_equal(new, info.proposal)
    else:
        assert_trees_equal(new, old)


# --- one chain --------------------------------------------------------------------------------


@SETTINGS
@given(structures(), st.sampled_from(sorted(PRECISIONS)), st.data(), step_sizes, key_kinds, seeds)
def test_init_and_steps_keep_structure_dtype_and_a_consistent_state(
    structure, precision_name, data, step_size, key_kind, seed
):
    proposal_cov = data.draw(covariances(dimension_of(structure)))
    with precision(precision_name) as dtype:
        position = build_position(structure, dtype, seed)
        algo = rwmh.random_walk(gaussian, step_size, proposal_cov)
        state = algo.init(position)
        assert_like(state.position, position)
        assert state.logdensity.shape == () and state.logdensity.dtype == dtype
        np.testing.assert_allclose(state.logdensity, gaussian(position), rtol=tolerance(dtype))
        for key in jax.random.split(make_key(key_kind, seed), 3):
            new, info = algo.step(key, state)
            assert_step_invariants(state, new, info, dtype)
            # Deterministic: the same key and state give the same transition, bit for bit.
            again, info_again = algo.step(key, state)
            assert_trees_equal((new, info), (again, info_again))
            state = new


@SETTINGS
@given(structures(), st.sampled_from(sorted(PRECISIONS)), st.data(), step_sizes, seeds)
def test_typed_and_legacy_keys_of_a_seed_give_the_same_transition(
    structure, precision_name, data, step_size, seed
):
    """``jax.random.key(s)`` wraps the same bits as ``jax.random.PRNGKey(s)`` (checked here,
    not assumed), so the two kinds of key give the same proposal and decision."""
    proposal_cov = data.draw(covariances(dimension_of(structure)))
    with precision(precision_name) as dtype:
        typed, legacy = jax.random.key(seed), jax.random.PRNGKey(seed)
        np.testing.assert_array_equal(jax.random.key_data(typed), legacy)
        algo = rwmh.random_walk(gaussian, step_size, proposal_cov)
        state = algo.init(build_position(structure, dtype, seed))
        assert_trees_equal(algo.step(typed, state), algo.step(legacy, state))


@FEWER
@given(structures(), st.sampled_from(sorted(PRECISIONS)), st.data(), step_sizes, key_kinds, seeds)
def test_vmapped_chains_are_independent_single_chains(
    structure, precision_name, data, step_size, key_kind, seed
):
    """``jax.vmap(algo.init)`` and ``jax.vmap(algo.step)`` over three chains: batched leaves,
    and chain ``c`` makes the same move as one chain stepped alone with key ``c`` (to the
    rounding of batched arithmetic), with the same decision."""
    num_chains = 3
    proposal_cov = data.draw(covariances(dimension_of(structure)))
    with precision(precision_name) as dtype:
        positions = build_position(structure, dtype, seed, num_chains)
        algo = rwmh.random_walk(gaussian, step_size, proposal_cov)
        states = jax.vmap(algo.init)(positions)
        keys = jax.random.split(make_key(key_kind, seed), num_chains)
        new, info = jax.vmap(algo.step)(keys, states)
        one = build_position(structure, dtype, seed)
        assert_like(new.position, one, (num_chains,))
        assert new.logdensity.shape == (num_chains,) and new.logdensity.dtype == dtype
        for c in range(num_chains):
            chain = jax.tree_util.tree_map(lambda x, c=c: x[c], (states, new, info))
            old_c, new_c, info_c = chain
            assert_step_invariants(old_c, new_c, info_c, dtype)
            alone, info_alone = algo.step(keys[c], old_c)
            assert bool(info_alone.is_accepted) == bool(info_c.is_accepted)
            for x, y in zip(
                jax.tree_util.tree_leaves((alone, info_alone)),
                jax.tree_util.tree_leaves((new_c, info_c)),
                strict=True,
            ):
                np.testing.assert_allclose(x, y, rtol=tolerance(dtype), atol=0)


# --- the proposal -----------------------------------------------------------------------------


def flat_python_float(position):
    """A flat target written the shortest way: a Python float, not an array."""
    return 0.0


def flat_array(position):
    return 0.0 * gaussian(position)


@SETTINGS
@given(
    structures(),
    st.sampled_from(sorted(PRECISIONS)),
    st.data(),
    step_sizes,
    key_kinds,
    seeds,
    st.sampled_from([flat_python_float, flat_array]),
)
def test_a_flat_target_accepts_every_proposal(
    structure, precision_name, data, step_size, key_kind, seed, flat
):
    proposal_cov = data.draw(covariances(dimension_of(structure)))
    with precision(precision_name) as dtype:
        position = build_position(structure, dtype, seed)
        algo = rwmh.random_walk(flat, step_size, proposal_cov)
        state = algo.init(position)
        assert jnp.ndim(state.logdensity) == 0
        for key in jax.random.split(make_key(key_kind, seed), 3):
            new, info = algo.step(key, state)
            assert bool(info.is_accepted) and float(info.acceptance_rate) == 1.0
            assert_trees_equal(new.position, info.proposal.position)
            assert_like(new.position, position)
            state = new


NUM_PROPOSALS = 2000


@FEWER
@given(
    # Each dimension and dtype compiles a batched step of its own: a few of each.
    st.sampled_from([1, 3, MAX_DIMENSION]),
    st.sampled_from(["float32", "float64"]),
    st.data(),
    step_sizes,
    key_kinds,
    seeds,
)
def test_increments_are_step_size_times_the_factor_times_standard_normals(
    dimension, precision_name, data, step_size, key_kind, seed
):
    """From the origin (so that the increments are exact), 2000 proposals whitened with the
    float64 Cholesky factor of ``proposal_cov`` and divided by ``step_size`` have mean 0 and
    covariance I, entry by entry within 6 standard errors."""
    proposal_cov = data.draw(covariances(dimension))
    with precision(precision_name) as dtype:
        algo = rwmh.random_walk(flat_array, step_size, proposal_cov)
        state = algo.init(jnp.zeros(dimension, dtype))
        keys = jax.random.split(make_key(key_kind, seed), NUM_PROPOSALS)
        _, info = jax.vmap(algo.step, in_axes=(0, None))(keys, state)
        increments = np.asarray(info.proposal.position, float) / step_size
    assert increments.dtype == np.float64 and np.all(np.isfinite(increments))
    if proposal_cov is None:
        z = increments
    elif np.ndim(proposal_cov) == 1:
        z = increments / np.sqrt(proposal_cov)
    else:
        z = np.linalg.solve(np.linalg.cholesky(proposal_cov), increments.T).T
    standard_error = 1.0 / np.sqrt(NUM_PROPOSALS)
    assert np.all(np.abs(z.mean(axis=0)) < 6 * standard_error)
    covariance = np.cov(z.T, bias=True).reshape(dimension, dimension)
    # Entry (i, j) of the sample covariance of N(0, I) has sd sqrt(1 + [i == j]) / sqrt(n).
    bound = 6 * standard_error * np.sqrt(1.0 + np.eye(dimension))
    assert np.all(np.abs(covariance - np.eye(dimension)) < bound), covariance


# --- proposal_scale ---------------------------------------------------------------------------


@SETTINGS
@given(st.integers(1, MAX_DIMENSION), st.sampled_from(sorted(PRECISIONS)), st.data())
def test_proposal_scale_factors_the_covariance(dimension, precision_name, data):
    """Dense: a lower-triangular ``L`` with positive diagonal and ``L L^T = cov`` to rounding
    (judged relative to ``sqrt(cov_ii cov_jj)``); diagonal: ``scale**2 = cov``; None: None."""
    proposal_cov = data.draw(covariances(dimension))
    with precision(precision_name) as dtype:
        if proposal_cov is None:
            assert proposal_scale(None, dimension) is None
            return
        cov = jnp.asarray(proposal_cov, dtype)
        scale = proposal_scale(cov, dimension)
        assert scale.dtype == cov.dtype and scale.shape == cov.shape
    scale, cov = np.asarray(scale, float), np.asarray(cov, float)
    assert np.all(np.isfinite(scale))
    eps = np.finfo(dtype).eps
    if cov.ndim == 1:
        assert np.all(scale > 0)
        np.testing.assert_allclose(scale**2, cov, rtol=4 * eps)
        return
    assert np.all(np.triu(scale, 1) == 0) and np.all(np.diag(scale) > 0)
    sd = np.sqrt(np.diag(cov))
    error = np.abs(scale @ scale.T - cov) / np.outer(sd, sd)
    # Cholesky's backward error on the correlation matrix is a few d * eps.
    assert np.max(error) < 10 * dimension * eps, np.max(error)
