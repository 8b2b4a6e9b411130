"""``store=``: draws streamed to a Zarr store, crash-safe, resumable, opened by ArviZ.

The kill test runs :mod:`store_worker` in a child process, SIGKILLs it at a random moment
after its store appears, opens the store with ArviZ (at the last commit) and resumes it in
this process: the draws must be bit-identical to those of the child run that was not killed.
A few moments by default; ``-m slow`` runs 30.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import store_worker
import zarr
from _scale_helpers import worker_env

import rwmh
from rwmh import checkpoint
from rwmh import store as store_file

WORKER = os.path.join(os.path.dirname(__file__), "store_worker.py")
DEFAULT_KILLS = 3
SLOW_KILLS = 30


def _start(path, cache):
    return subprocess.Popen(
        [sys.executable, WORKER, str(path), str(cache)],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path, process, timeout=120):
    """Wait until the store exists (it appears whole, with its first commit)."""
    deadline = time.monotonic() + timeout
    while not os.path.isdir(path):
        if process.poll() is not None:
            pytest.fail(f"the worker ended before its store appeared:\n{process.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail("the worker's store did not appear")
        time.sleep(0.005)
    return time.monotonic()


def _stored(path):
    """Every committed array of the store, as numpy arrays."""
    group = zarr.open_group(str(path), mode="r")
    return {
        f"{name}/{key}": np.asarray(array)
        for name, sub in group.groups()
        for key, array in sub.arrays()
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The store of a worker run that is not killed (which also fills the compilation cache
    for the killed runs)."""
    base = tmp_path_factory.mktemp("store")
    cache = base / "jax-cache"
    path = base / "whole.zarr"
    process = _start(path, cache)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return {"path": path, "cache": cache, "arrays": _stored(path), "commits": _record(path)}


def _record(path):
    with open(os.path.join(path, "zarr.json")) as handle:
        return json.load(handle)["attributes"]["rwmh"]


def _wait_for_commit(path, process, commit, timeout=120):
    """Wait until the store has made commit ``commit`` (or the process ended)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if _record(path)["commit"] >= commit:
                return
        except (OSError, ValueError, KeyError):
            pass  # not there yet (the root is replaced atomically, never torn)
        time.sleep(0.001)


def _evidence(path, record) -> list[str]:
    """What a kill left beyond the last commit: signs that it landed inside a write."""
    found = []
    for _, _, files in os.walk(path):
        for name in files:
            if name.endswith((".partial", ".tmp")):
                found.append("temporary file")
            elif name.startswith("rwmh-state-") and name != record["state"]:
                found.append("uncommitted state file")
    for group, phase in (("posterior", "sampling"), ("warmup_sample_stats", "warmup")):
        length = record["num_draws" if phase == "sampling" else "num_warmup_done"]
        chunks = path / group / "draw" / "c"
        size = record["chunks"][phase]
        if chunks.is_dir() and any(int(c) >= -(-length // size) for c in os.listdir(chunks)):
            found.append(f"uncommitted {phase} chunk")
    return found


def _kill_and_resume(uninterrupted, tmp_path, rng, index):
    """Kill a run at a random moment: after a random commit (the store's creation is commit
    0), a random 0 to 50 ms later (a commit takes tens of ms here), so that the moments fall
    in warmup and sampling alike, often inside a write."""
    path = tmp_path / f"killed{index}.zarr"
    process = _start(path, uninterrupted["cache"])
    try:
        _wait_for(path, process)
        _wait_for_commit(path, process, rng.integers(0, uninterrupted["commits"]["commit"]))
        if index % 2 == 0:
            # ArviZ opens the store while the run writes it: whatever commit it finds, the
            # draws are the uninterrupted run's up to there.
            live = store_file.open_inference_data(path)
            length = live.posterior.sizes["draw"]
            np.testing.assert_array_equal(
                live.posterior["mu"].values, uninterrupted["arrays"]["posterior/mu"][:, :length]
            )
        time.sleep(rng.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    record = _record(path)
    evidence = _evidence(path, record)
    if process.returncode != -signal.SIGKILL:
        return "finished", evidence  # the run ended before the kill: nothing to resume

    # ArviZ opens the killed store at its last commit, before anything repairs it.
    data = store_file.open_inference_data(path)
    whole = uninterrupted["arrays"]
    assert data.posterior.sizes["draw"] == record["num_draws"]
    np.testing.assert_array_equal(
        data.posterior["theta"].values, whole["posterior/theta"][:, : record["num_draws"]]
    )
    done = record["num_warmup_done"]
    assert data.warmup_sample_stats.sizes["draw"] == done
    np.testing.assert_array_equal(
        data.warmup_sample_stats["acceptance_rate"].values,
        whole["warmup_sample_stats/acceptance_rate"][:, :done],
    )

    resumed = rwmh.resume(path, store_worker.logdensity, progress_bar=False)
    assert resumed.store == str(path)
    stored = _stored(path)
    assert stored.keys() == whole.keys()
    for key, values in whole.items():
        np.testing.assert_array_equal(stored[key], values, err_msg=key)
    np.testing.assert_array_equal(np.asarray(resumed.positions["mu"]), whole["posterior/mu"])
    # Nothing beyond the final commit is left behind.
    assert sorted(n for n in os.listdir(path) if not os.path.isdir(path / n)) == [
        _record(path)["state"],
        "zarr.json",
    ]
    shutil.rmtree(path)
    return record["phase"], evidence


def _kills(uninterrupted, tmp_path, count, seed):
    rng = np.random.default_rng(seed)
    return [_kill_and_resume(uninterrupted, tmp_path, rng, i) for i in range(count)]


def test_sigkill_at_random_moments_resumes_to_the_same_draws(uninterrupted, tmp_path):
    outcomes = _kills(uninterrupted, tmp_path, DEFAULT_KILLS, seed=1)
    print("kills:", outcomes)
    assert any(phase != "finished" for phase, _ in outcomes), outcomes


@pytest.mark.slow
def test_sigkill_at_30_random_moments(uninterrupted, tmp_path):
    outcomes = _kills(uninterrupted, tmp_path, SLOW_KILLS, seed=2)
    phases = [phase for phase, _ in outcomes]
    print("kills:", outcomes)
    # The moments covered warmup, sampling and writes in progress.
    assert "warmup" in phases and "sampling" in phases, phases
    assert any(evidence for _, evidence in outcomes), outcomes


def test_store_run_equals_the_in_memory_run(tmp_path):
    kwargs = dict(num_samples=80, num_warmup=50, chunk_size=20, progress_bar=False)
    args = (jax.random.key(2), store_worker.logdensity, store_worker.initial_positions())
    memory = rwmh.sample(*args, **kwargs)
    path = tmp_path / "run.zarr"
    stored = rwmh.sample(*args, store=path, **kwargs)
    assert isinstance(stored.positions["theta"], zarr.Array)
    for name in ("mu", "theta"):
        np.testing.assert_array_equal(np.asarray(stored.positions[name]), memory.positions[name])
    for name, values in memory.stats.items():
        np.testing.assert_array_equal(np.asarray(stored.stats[name]), values)
    for name in memory.warmup_info._fields:
        np.testing.assert_array_equal(
            getattr(stored.warmup_info, name), getattr(memory.warmup_info, name)
        )
    data = stored.to_inference_data()
    in_memory = memory.to_inference_data()
    for group in ("posterior", "sample_stats"):
        for name, values in in_memory[group].data_vars.items():
            np.testing.assert_array_equal(data[group][name].values, values.values)
    np.testing.assert_array_equal(data.posterior["draw"].values, np.arange(80))
    # Resuming a finished store returns it as it is.
    again = rwmh.resume(path, store_worker.logdensity, progress_bar=False)
    np.testing.assert_array_equal(np.asarray(again.positions["mu"]), memory.positions["mu"])


def _theta_logdensity(theta):
    return store_worker.logdensity({"theta": theta, "mu": 0.0})


def _estimator(x, u):
    return -0.5 * jnp.sum(x**2) + 0.1 * jnp.sum(u)


@pytest.mark.parametrize(
    "target, kwargs",
    [
        (store_worker.logdensity, dict(num_warmup=0)),
        (rwmh.EstimatedLogDensity(_estimator, aux_shape=(3,)), dict(num_warmup=30, thin=2)),
        (store_worker.logdensity, dict(num_warmup="auto", max_warmup=150)),
    ],
    ids=["no-warmup", "pseudo-marginal-thinned", "auto-warmup"],
)
def test_an_interrupted_store_run_resumes(tmp_path, monkeypatch, target, kwargs):
    kwargs = dict(num_samples=40, chunk_size=10, progress_bar=False, **kwargs)
    positions = store_worker.initial_positions()
    if isinstance(target, rwmh.EstimatedLogDensity):
        positions = positions["theta"][:, :2]
    elif kwargs["num_warmup"] == "auto":
        # num_warmup="auto" takes arrays of positions only (warmup_length.AutoWarmup.record).
        positions = positions["theta"]
        target = _theta_logdensity
    args = (jax.random.key(3), target, positions)
    memory = rwmh.sample(*args, **kwargs)
    path = tmp_path / "run.zarr"
    commit = store_file.Store.commit
    calls = []

    def interrupt_third(self, *a, **k):
        calls.append(None)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return commit(self, *a, **k)

    monkeypatch.setattr(store_file.Store, "commit", interrupt_third)
    with pytest.warns(RuntimeWarning, match="interrupted"):
        partial = rwmh.sample(*args, store=path, **kwargs)
    monkeypatch.setattr(store_file.Store, "commit", commit)
    assert partial.extra["interrupted"]
    assert ("warmup_sample_stats" in os.listdir(path)) == (kwargs["num_warmup"] != 0)
    resumed = rwmh.resume(path, target, progress_bar=False)
    for got, expected in zip(
        jax.tree_util.tree_leaves(resumed.positions),
        jax.tree_util.tree_leaves(memory.positions),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), expected)
    np.testing.assert_array_equal(np.asarray(resumed.stats["lp"]), memory.stats["lp"])
    assert resumed.num_warmup == memory.num_warmup


def test_xarray_opens_the_store_as_arviz_lays_it_out(tmp_path):
    import xarray

    path = tmp_path / "run.zarr"
    rwmh.sample(
        jax.random.key(0),
        lambda x: -0.5 * jnp.sum(x**2),
        jnp.zeros((3, 2, 2)),
        num_samples=30,
        num_warmup=20,
        chunk_size=10,
        store=path,
        progress_bar=False,
    )
    tree = xarray.open_datatree(path, engine="zarr")
    assert set(tree.children) == {"posterior", "sample_stats", "warmup_sample_stats"}
    assert tree.posterior["x"].dims == ("chain", "draw", "x_dim_0", "x_dim_1")
    assert tree.posterior.sizes == {"chain": 3, "draw": 30, "x_dim_0": 2, "x_dim_1": 2}
    assert sorted(tree.sample_stats.data_vars) == [
        "acceptance_rate",
        "is_accepted",
        "lp",
        "step_size",
    ]
    assert tree.posterior.attrs["inference_library"] == "rwmh"
    from rwmh.arviz import arviz_major_version, import_arviz

    arviz = import_arviz()
    if arviz_major_version(arviz) >= 1:
        data = arviz.from_zarr(str(path))  # ArviZ 1.x: xarray.open_datatree(engine="zarr")
    else:
        # ArviZ 0.x's from_zarr refuses Zarr 3 and points here instead.
        data = arviz.from_datatree(tree)
        assert "warmup_sample_stats" in data.groups()
    assert data.posterior.sizes["draw"] == 30
    assert float(arviz.summary(data, var_names=["x"])["r_hat"].max()) > 0
    # The arrays' own metadata (read without the consolidated metadata) is final too.
    assert xarray.open_zarr(path, group="posterior", consolidated=False).sizes["draw"] == 30


# ---------------------------------------------------------------------------------------------
# Refusals and damaged stores.
# ---------------------------------------------------------------------------------------------

RUN = dict(num_samples=20, num_warmup=20, chunk_size=10, progress_bar=False)


def _sample(path, **kwargs):
    return rwmh.sample(
        jax.random.key(1),
        store_worker.logdensity,
        store_worker.initial_positions(),
        store=path,
        **{**RUN, **kwargs},
    )


@pytest.fixture
def finished(tmp_path):
    path = tmp_path / "finished.zarr"
    _sample(path)
    return path


def _snapshot(path):
    return {
        os.path.relpath(os.path.join(d, n), path): open(os.path.join(d, n), "rb").read()
        for d, _, files in os.walk(path)
        for n in files
    }


def test_an_existing_path_is_never_overwritten(finished, tmp_path):
    before = _snapshot(finished)
    with pytest.raises(ValueError, match=f"store '{finished}' already exists.*rwmh.resume"):
        _sample(finished)
    assert _snapshot(finished) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        _sample(other)
    assert (other / "data.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="checkpoint and store"):
        _sample(tmp_path / "new.zarr", checkpoint=tmp_path / "c.npz")
    with pytest.raises(ValueError, match="until"):
        _sample(tmp_path / "new.zarr", until=rwmh.Converged())
    with pytest.raises(ValueError, match="does not exist"):
        _sample(tmp_path / "missing" / "run.zarr")
    assert not (tmp_path / "new.zarr").exists()


def _resume_fails(path, match):
    before = _snapshot(path) if os.path.isdir(path) else None
    with pytest.raises(ValueError, match=match):
        rwmh.resume(path, store_worker.logdensity, progress_bar=False)
    if before is not None:
        assert _snapshot(path) == before


def test_foreign_directories_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _resume_fails(empty, f"store '{empty}' is not an rwmh store")
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w").create_array("x", shape=(3,), dtype="f4")
    _resume_fails(foreign, f"store '{foreign}' is a directory but not an rwmh store")


def test_truncated_root_is_a_clear_error(finished):
    root = finished / "zarr.json"
    root.write_bytes(root.read_bytes()[:100])
    _resume_fails(finished, f"store '{finished}'.*truncated or corrupt")


def test_missing_chunk_is_a_clear_error(finished):
    os.unlink(finished / "posterior" / "theta" / "c" / "0" / "1" / "0")
    _resume_fails(finished, f"store '{finished}' is truncated: chunk 1 of 'posterior/theta'")


def test_corrupt_chunk_is_a_clear_error(finished):
    # The warmup trace is read back on resume: its checksummed chunks fail to decode.
    chunk = finished / "warmup_sample_stats" / "acceptance_rate" / "c" / "0" / "1"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    _resume_fails(finished, f"store '{finished}' is damaged")


def test_a_damaged_draws_chunk_fails_when_read(finished):
    """Resume checks that every committed chunk is there, not what is in each; a damaged draws
    chunk fails its zstd checksum when it is read instead of giving numbers."""
    chunk = finished / "posterior" / "theta" / "c" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    result = rwmh.resume(finished, store_worker.logdensity, progress_bar=False)
    with pytest.raises(Exception, match="(?i)checksum"):
        np.asarray(result.positions["theta"])


def test_a_state_file_of_another_commit_is_a_clear_error(finished):
    root = finished / "zarr.json"
    content = json.loads(root.read_text())
    content["attributes"]["rwmh"]["commit"] -= 1
    root.write_text(json.dumps(content))
    _resume_fails(finished, f"store '{finished}' is inconsistent: state file .* is of commit")


def test_missing_or_damaged_state_is_a_clear_error(finished):
    (state,) = [n for n in os.listdir(finished) if n.startswith("rwmh-state-")]
    data = (finished / state).read_bytes()
    (finished / state).write_bytes(data[: len(data) // 2])
    _resume_fails(finished, f"store '{finished}'.*(truncated|corrupt)")
    (finished / state).unlink()
    _resume_fails(finished, f"store '{finished}'.*does not exist")


def test_a_store_state_is_not_a_checkpoint(finished, tmp_path):
    (state,) = [n for n in os.listdir(finished) if n.startswith("rwmh-state-")]
    with pytest.raises(ValueError, match="resume the store's directory"):
        rwmh.resume(finished / state, store_worker.logdensity)
    # And the .npz checkpoint still resumes as before.
    path = tmp_path / "run.npz"
    first = rwmh.sample(
        jax.random.key(1),
        store_worker.logdensity,
        store_worker.initial_positions(),
        checkpoint=path,
        **RUN,
    )
    again = rwmh.resume(path, store_worker.logdensity, progress_bar=False)
    np.testing.assert_array_equal(again.positions["theta"], first.positions["theta"])
    assert checkpoint.read(path)[0]["traces"] == "file"
