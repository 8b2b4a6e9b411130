"""Checkpoints: atomic files that load without code, and exact resumption."""

from __future__ import annotations

import os
import signal
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scale_worker
from _scale_helpers import interrupt_on_call, start_worker

import rwmh
from rwmh import chains, checkpoint

RUN = dict(num_samples=40, num_warmup=60, chunk_size=20, progress_bar=False)


def _assert_same_run(a, b):
    for x, y in zip(jax.tree.leaves(a.positions), jax.tree.leaves(b.positions), strict=True):
        np.testing.assert_array_equal(x, y)
    for name in a.stats:
        np.testing.assert_array_equal(a.stats[name], b.stats[name])
    for x, y in zip(a.warmup_info, b.warmup_info, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.extra.get("restarted_chains") == b.extra.get("restarted_chains")
    np.testing.assert_array_equal(a.parameters["step_size"], b.parameters["step_size"])


@pytest.fixture(scope="module")
def reference():
    return rwmh.sample(
        jax.random.key(3), scale_worker.gaussian_logdensity, scale_worker.initial_gaussian(4), **RUN
    )


def _interrupted_run(monkeypatch, path, module, name, call):
    original = getattr(module, name)
    interrupt_on_call(monkeypatch, module, name, call)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rwmh.sample(
            jax.random.key(3),
            scale_worker.gaussian_logdensity,
            scale_worker.initial_gaussian(4),
            checkpoint=path,
            **RUN,
        )
    monkeypatch.setattr(module, name, original)


@pytest.mark.parametrize(
    "module, name, call", [(chains, "run_sampling", 2), (chains, "run_warmup", 2)]
)
def test_resume_after_interrupt_equals_uninterrupted(
    monkeypatch, tmp_path, reference, module, name, call
):
    path = tmp_path / "run.ckpt"
    _interrupted_run(monkeypatch, path, module, name, call)
    metadata, _ = checkpoint.read(path)
    assert metadata["phase"] != "done"
    resumed = rwmh.resume(path, scale_worker.gaussian_logdensity, progress_bar=False)
    _assert_same_run(resumed, reference)
    # The resumed run kept checkpointing: the file now holds the finished run.
    assert checkpoint.read(path)[0]["phase"] == "done"
    _assert_same_run(rwmh.resume(path, scale_worker.gaussian_logdensity), reference)
    # Atomic writes leave no temporary files behind.
    assert sorted(os.listdir(tmp_path)) == ["run.ckpt"]


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    path = tmp_path / "killed.npz"
    process = start_worker("checkpointed", path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"the run ended before it was killed:\n{process.stderr.read()}")
            if path.exists():
                metadata, _ = checkpoint.read(path)
                if metadata["phase"] == "sampling" and metadata["next_step"] >= 40:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the checkpointed run made no progress in 120 s")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    metadata, _ = checkpoint.read(path)
    assert metadata["phase"] == "sampling" and metadata["next_step"] < 200

    resumed = rwmh.resume(path, scale_worker.gaussian_logdensity, progress_bar=False)
    uninterrupted = rwmh.sample(
        jax.random.key(11),
        scale_worker.gaussian_logdensity,
        scale_worker.initial_gaussian(6),
        **scale_worker.CHECKPOINT_RUN,
    )
    _assert_same_run(resumed, uninterrupted)


@pytest.fixture
def finished(tmp_path):
    path = tmp_path / "finished.npz"
    rwmh.sample(
        jax.random.key(3),
        scale_worker.gaussian_logdensity,
        scale_worker.initial_gaussian(4),
        checkpoint=path,
        **RUN,
    )
    return path


def test_truncated_checkpoint_is_a_clear_error(finished):
    size = os.path.getsize(finished)
    with open(finished, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(ValueError, match=f"{finished}.*(truncated|corrupt)"):
        rwmh.resume(finished, scale_worker.gaussian_logdensity)


def test_corrupt_bytes_are_a_clear_error(finished):
    data = bytearray(finished.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    finished.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=str(finished)):
        rwmh.resume(finished, scale_worker.gaussian_logdensity)


def test_foreign_files_are_clear_errors(tmp_path):
    foreign = tmp_path / "foreign.npz"
    with open(foreign, "wb") as handle:
        np.savez(handle, x=np.zeros(3))
    with pytest.raises(ValueError, match="not an rwmh checkpoint"):
        rwmh.resume(foreign, scale_worker.gaussian_logdensity)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint at all")
    with pytest.raises(ValueError, match=str(text)):
        rwmh.resume(text, scale_worker.gaussian_logdensity)
    with pytest.raises(ValueError, match="does not exist"):
        rwmh.resume(tmp_path / "missing.npz", scale_worker.gaussian_logdensity)


def test_pickled_data_is_never_loaded(tmp_path):
    # An object array can only be stored as a pickle, which could run code when loaded.
    evil = tmp_path / "evil.npz"
    with open(evil, "wb") as handle:
        np.savez(handle, metadata=np.array([{"format": "rwmh-checkpoint"}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        rwmh.resume(evil, scale_worker.gaussian_logdensity)


def test_wrong_logdensity_is_refused(finished):
    with pytest.raises(ValueError, match="logdensity_fn does not match"):
        rwmh.resume(finished, lambda p: -jnp.sum(p["x"] ** 2) - p["y"] ** 2)


def test_positions_checkpoint_needs_plain_containers(tmp_path):
    from typing import NamedTuple

    class Point(NamedTuple):
        x: jax.Array

    with pytest.raises(TypeError, match="checkpoint"):
        rwmh.sample(
            jax.random.key(0),
            lambda p: -jnp.sum(p.x**2),
            Point(jnp.zeros((4, 2))),
            checkpoint=tmp_path / "run.npz",
            progress_bar=False,
        )


def test_legacy_key_round_trips(tmp_path):
    path = tmp_path / "legacy.npz"
    kwargs = dict(num_samples=10, num_warmup=20, chunk_size=10, progress_bar=False)
    positions = scale_worker.initial_gaussian(4)
    logdensity = scale_worker.gaussian_logdensity
    first = rwmh.sample(jax.random.PRNGKey(1), logdensity, positions, checkpoint=path, **kwargs)
    again = rwmh.resume(path, logdensity)
    _assert_same_run(again, first)
