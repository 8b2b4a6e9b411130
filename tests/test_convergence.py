"""``rwmh.sample(until=rwmh.Converged(...))``: stopping when ArviZ says the chains converged.

Every figure the stop rule uses is recomputed here with ArviZ on the returned draws; the draws
of a run that stops are the first draws of the same run without ``until``; a resumed run stops
where the uninterrupted one stops.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _scale_helpers import interrupt_on_call

import rwmh
from rwmh import chains, checkpoint, convergence, warmup_length
from rwmh.arviz import summary

COV = np.array([[1.0, 0.9], [0.9, 1.0]], np.float32)
PRECISION = jnp.asarray(np.linalg.inv(COV))


def correlated(x):
    return -0.5 * x @ PRECISION @ x


INITIAL = np.asarray(jax.random.normal(jax.random.key(1), (4, 2)))
RUN = dict(num_samples=5000, num_warmup=500, progress_bar=False)


@pytest.fixture(scope="module")
def stopped():
    return rwmh.sample(jax.random.key(0), correlated, INITIAL, until=rwmh.Converged(), **RUN)


def test_stops_converged_by_arviz_on_the_returned_draws(stopped):
    stop = stopped.extra["stop"]
    assert stop["reason"] == "converged"
    assert stopped.num_draws == stop["draw"] < RUN["num_samples"]
    table = summary(stopped.to_inference_data())
    assert (table["r_hat"] <= 1.01).all(), table
    assert (table[["ess_bulk", "ess_tail"]] >= 400).all().all(), table
    # The very figures the rule used are ArviZ's on these draws.
    assert stop["max_rhat"] == table["r_hat"].max()
    assert stop["min_ess_bulk"] == table["ess_bulk"].min()
    assert stop["min_ess_tail"] == table["ess_tail"].min()
    # The check before the stop had not converged, and the checks followed the schedule.
    checks = stopped.extra["checks"]
    assert [c["converged"] for c in checks] == [False] * (len(checks) - 1) + [True]
    points = convergence.check_points(100, 1.5, 100, RUN["num_samples"])
    assert [c["draw"] for c in checks] == points[: len(checks)]


def test_draws_are_the_first_draws_of_the_fixed_length_run(stopped):
    fixed = rwmh.sample(jax.random.key(0), correlated, INITIAL, **RUN)
    n = stopped.num_draws
    np.testing.assert_array_equal(stopped.positions, fixed.positions[:, :n])
    for name in stopped.stats:
        np.testing.assert_array_equal(stopped.stats[name], fixed.stats[name][:, :n])
    # last_state is the state at the stop, not after a chunk dispatched beyond it.
    np.testing.assert_array_equal(stopped.last_state.position, fixed.positions[:, n - 1])


def test_cap_unconverged_warns_naming_the_worst_component():
    with pytest.warns(
        rwmh.ConvergenceWarning, match=r"worst component, x\[\d\], has R-hat"
    ) as record:
        result = rwmh.sample(
            jax.random.key(0), correlated, INITIAL, until=rwmh.Converged(min_ess=10**6), **RUN
        )
    # The warning points at the user's call.
    assert record[0].filename == __file__
    stop = result.extra["stop"]
    assert stop["reason"] == "cap" and stop["draw"] == result.num_draws == RUN["num_samples"]
    assert stop["min_ess_bulk"] < 10**6


def test_one_compiled_sampling_length_with_thin():
    before = chains.run_sampling._cache_size()
    result = rwmh.sample(
        jax.random.key(2),
        correlated,
        INITIAL,
        num_samples=3000,
        num_warmup=300,
        thin=3,
        chunk_size=50,
        until=rwmh.Converged(min_ess=300),
        progress_bar=False,
    )
    assert result.extra["stop"]["reason"] == "converged"
    assert result.num_draws % 50 == 0
    # Every chunk has one length: one program, whatever the run's length.
    assert chains.run_sampling._cache_size() - before == 1


def test_resume_stops_at_the_same_draw(monkeypatch, tmp_path):
    kwargs = dict(RUN, chunk_size=100, until=rwmh.Converged())
    reference = rwmh.sample(jax.random.key(0), correlated, INITIAL, **kwargs)
    path = tmp_path / "run.npz"
    # Ctrl-C while the third sampling chunk is dispatched: two checks are behind the run.
    interrupt_on_call(monkeypatch, chains, "run_sampling", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rwmh.sample(jax.random.key(0), correlated, INITIAL, checkpoint=path, **kwargs)
    monkeypatch.undo()
    metadata, _ = checkpoint.read(path)
    assert metadata["phase"] == "sampling" and metadata["next_step"] < reference.num_draws
    resumed = rwmh.resume(path, correlated, progress_bar=False)
    assert resumed.extra["stop"]["draw"] == reference.extra["stop"]["draw"]
    assert [c["draw"] for c in resumed.extra["checks"]] == [
        c["draw"] for c in reference.extra["checks"]
    ]
    np.testing.assert_array_equal(resumed.positions, reference.positions)
    # The finished file resumes to the same result, without sampling again.
    again = rwmh.resume(path, correlated, progress_bar=False)
    assert again.num_draws == reference.num_draws
    np.testing.assert_array_equal(again.positions, reference.positions)


def test_check_points_are_geometric():
    points = convergence.check_points(100, 1.5, 100, 100_000)
    assert points[-1] == 100_000
    assert all(b >= 1.5 * a for a, b in zip(points[:-2], points[1:-1], strict=True))
    assert len(points) < 20


def test_component_names_follow_arviz():
    names = convergence.component_names({"a": np.zeros((2, 3)), "b": np.zeros(2)})
    assert names == ["a[0]", "a[1]", "a[2]", "b"]
    assert convergence.component_names(np.zeros((2, 2))) == ["x[0]", "x[1]"]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(min_ess=-1), ValueError),
        (dict(min_ess="400"), TypeError),
        (dict(max_rhat=1.0), ValueError),
        (dict(max_nested_rhat=0.9), ValueError),
        (dict(first_check=2), ValueError),
        (dict(check_growth=1.0), ValueError),
        (dict(superchains=[0.5, 1.5]), ValueError),
    ],
)
def test_bad_converged_is_refused(kwargs, error):
    with pytest.raises(error, match="Converged"):
        rwmh.Converged(**kwargs)


def test_until_must_be_converged():
    with pytest.raises(TypeError, match="until"):
        rwmh.sample(jax.random.key(0), correlated, INITIAL, until=400)


# --- num_warmup="auto" ------------------------------------------------------------------------


def _rotated_gaussian(dimension=6, seed=0):
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(dimension, dimension)))
    cov = rotation @ np.diag(np.logspace(-2, 2, dimension)) @ rotation.T
    precision = jnp.asarray(np.linalg.inv(cov), jnp.float32)
    return (lambda x: -0.5 * x @ precision @ x), cov


ROTATED, ROTATED_COV = _rotated_gaussian()
ROTATED_INITIAL = np.asarray(jax.random.normal(jax.random.key(5), (8, 6)))
AUTO = dict(num_samples=400, num_warmup="auto", progress_bar=False)


@pytest.fixture(scope="module")
def auto_run():
    before = chains.run_warmup._cache_size()
    result = rwmh.sample(jax.random.key(4), ROTATED, ROTATED_INITIAL, **AUTO)
    return result, chains.run_warmup._cache_size() - before


def test_auto_warmup_ends_when_settled_and_compiles_once(auto_run):
    result, compiled = auto_run
    report = result.extra["warmup"]
    assert report["reason"] == "settled"
    assert result.num_warmup == report["steps"] == result.warmup_info.acceptance_rate.shape[0]
    assert result.num_warmup < warmup_length.DEFAULT_MAX_STEPS
    # Windows double, and the last one met every criterion.
    lengths = [end - start for start, end, *_ in report["windows"]]
    assert lengths == [25 * 2**i for i in range(len(lengths))]
    _, _, b, rhat, restarted = report["windows"][-1]
    assert b <= warmup_length.MAX_SUBOPTIMALITY and rhat <= warmup_length.MAX_WINDOW_RHAT
    assert restarted == 0
    assert compiled == 1
    # The adapted covariance is the target's up to scale: a small Roberts-Rosenthal factor.
    adapted = np.asarray(result.parameters["proposal_cov"])
    assert warmup_length.suboptimality(ROTATED_COV, adapted) < 1.5


def test_auto_warmup_stops_at_its_cap():
    result = rwmh.sample(jax.random.key(4), ROTATED, ROTATED_INITIAL, max_warmup=250, **AUTO)
    assert result.extra["warmup"]["reason"] == "cap"
    assert result.num_warmup == 250


def test_auto_warmup_resumes_to_the_same_run(monkeypatch, tmp_path, auto_run):
    reference, _ = auto_run
    path = tmp_path / "auto.npz"
    interrupt_on_call(monkeypatch, chains, "run_warmup", 15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rwmh.sample(jax.random.key(4), ROTATED, ROTATED_INITIAL, checkpoint=path, **AUTO)
    monkeypatch.undo()
    metadata, _ = checkpoint.read(path)
    assert metadata["phase"] == "warmup" and 0 < metadata["next_step"] < reference.num_warmup
    resumed = rwmh.resume(path, ROTATED, progress_bar=False)
    assert resumed.extra["warmup"] == reference.extra["warmup"]
    np.testing.assert_array_equal(resumed.positions, reference.positions)


def test_auto_warmup_takes_pytree_positions():
    """A dict of position leaves is decided on its states flattened in PyTree order (the
    planner once called ``np.asarray`` on the dict and failed)."""
    split = {"a": ROTATED_INITIAL[:, :2], "b": ROTATED_INITIAL[:, 2:]}
    np.testing.assert_array_equal(
        warmup_length.flat_states(split, ROTATED_INITIAL.shape[0]), ROTATED_INITIAL
    )

    def logdensity(position):
        return ROTATED(jnp.concatenate([position["a"], position["b"]]))

    result = rwmh.sample(jax.random.key(4), logdensity, split, **AUTO)
    report = result.extra["warmup"]
    assert report["reason"] == "settled"
    assert result.num_warmup == report["steps"] == result.warmup_info.acceptance_rate.shape[0]
    assert all(np.isfinite(result.positions[name]).all() for name in ("a", "b"))


def test_auto_warmup_final_buffer_grows_when_few_chains_pool():
    # As in a fixed warmup (tuning.final_buffer_extension), in whole 25-step chunks, and
    # never taking the initial buffer or the first window from under the cap.
    def final_buffer(max_steps, num_chains):
        return warmup_length.AutoWarmup(max_steps, True, num_chains=num_chains).final_buffer

    assert [final_buffer(100_000, c) for c in (1, 2, 3, 4, 8, None)] == [200, 100, 75, 50, 50, 50]
    assert final_buffer(150, 1) == 50 and final_buffer(200, 1) == 100
    # The cap cuts the windows before the longer buffer: 300 steps leave one 25-step window.
    result = rwmh.sample(jax.random.key(4), ROTATED, ROTATED_INITIAL[:1], max_warmup=300, **AUTO)
    report = result.extra["warmup"]
    assert report["reason"] == "cap" and result.num_warmup == 300
    assert [window[:2] for window in report["windows"]] == [[75, 100]]


def test_bad_num_warmup_is_refused():
    with pytest.raises(TypeError, match="num_warmup"):
        rwmh.sample(jax.random.key(0), correlated, INITIAL, num_warmup="long")
    with pytest.raises(ValueError, match="max_warmup"):
        rwmh.sample(jax.random.key(0), correlated, INITIAL, num_warmup="auto", max_warmup=100)


# --- superchains and nested R-hat ---------------------------------------------------------------

K, M = 16, 16
STARTS = np.asarray(jax.random.normal(jax.random.key(3), (K, 2)))
NESTED = rwmh.Converged(max_rhat=None, max_nested_rhat=1.01)


def _bimodal(x):
    return jnp.logaddexp(-0.5 * jnp.sum((x - 10.0) ** 2), -0.5 * jnp.sum((x + 10.0) ** 2))


def _standard(x):
    return -0.5 * jnp.sum(x**2)


def test_nested_rhat_does_not_stop_on_two_separated_modes():
    # Half the superchains start in each mode, 20 sds apart; a random walk of scale 0.8 never
    # crosses (no warmup, whose pooled covariance would span both modes).
    signs = np.where(np.arange(K) % 2 == 0, 10.0, -10.0)[:, None]
    initial = rwmh.superchain_positions(STARTS + signs, M)
    with pytest.warns(rwmh.ConvergenceWarning, match="nested R-hat"):
        result = rwmh.sample(
            jax.random.key(0),
            _bimodal,
            initial,
            num_samples=2000,
            num_warmup=0,
            step_size=0.8,
            until=NESTED,
            progress_bar=False,
        )
    stop = result.extra["stop"]
    assert stop["reason"] == "cap" and stop["max_nested_rhat"] > 1.5


def test_nested_rhat_stops_on_one_mode_and_equals_arviz_stats():
    from arviz_stats import rhat_nested

    initial = rwmh.superchain_positions(3.0 * STARTS, M)
    result = rwmh.sample(
        jax.random.key(0), _standard, initial, num_samples=5000, until=NESTED, progress_bar=False
    )
    stop = result.extra["stop"]
    assert stop["reason"] == "converged" and stop["max_nested_rhat"] <= 1.01
    ids = list(np.repeat(np.arange(K), M))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ArviZ 0.x: more chains than draws
        data = result.to_inference_data()
    assert float(rhat_nested(data, superchain_ids=ids)["x"].max()) == stop["max_nested_rhat"]


def test_superchains_are_found_or_refused():
    initial = rwmh.superchain_positions(STARTS[:2], 3)
    assert convergence.superchain_ids(initial, 6, NESTED) == (0, 0, 0, 1, 1, 1)
    explicit = rwmh.Converged(max_nested_rhat=1.01, superchains=[1, 0, 1, 0])
    assert convergence.superchain_ids(np.zeros((4, 2)), 4, explicit) == (1, 0, 1, 0)
    with pytest.raises(ValueError, match="superchain_positions"):
        convergence.superchain_ids(np.arange(8.0).reshape(4, 2), 4, NESTED)
    with pytest.raises(ValueError, match="equal size"):
        convergence.superchain_ids(np.array([[0.0], [0.0], [1.0]]), 3, NESTED)
    with pytest.raises(ValueError, match="entries for 4 chains"):
        convergence.superchain_ids(
            np.zeros((4, 2)), 4, rwmh.Converged(max_nested_rhat=1.01, superchains=[0, 1])
        )


def test_progress_bar_shows_the_goal():
    import io

    from rwmh.progress import ProgressBar

    file = io.StringIO()
    bar = ProgressBar(file=file)
    bar.start("sampling", 200)
    bar.update(100, np.full((100, 4), 0.3), np.zeros((100, 4, 2)))
    report = {"min_ess_bulk": 312.4, "min_ess_tail": 350.0, "max_rhat": 1.0132}
    bar.goal(report, rwmh.Converged())
    bar.close()
    assert "ess=312/400 rhat=1.013/1.01" in file.getvalue()
